"""The protocols a run's unset and `auto` settings come from: the data-set defaults (`PRESETS`,
by data-set family) and whole protocols (`RUN_PRESETS`, `--preset`). Plain values: the config
(`ltexp.config.resolve_config`) applies them; nothing here imports torch or ltexp.
"""

from __future__ import annotations

from typing import Any

# Data-set dependent defaults, applied to every field the user left at "auto".
# Digits: sized so the quickstart (`mlflow run . -e baseline`) takes well under a minute on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar": {"model": "resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1,
              "weight_decay": 2e-4, "lr_step": 150, "augment": "crop_flip", "val_per_class": 0},
    "digits": {"model": "smallcnn", "epochs": 100, "batch_size": 64, "lr": 0.05,
               "weight_decay": 5e-4, "lr_step": 70, "augment": "crop", "val_per_class": 20},
    "folder": {"model": "resnet18", "epochs": 30, "batch_size": 64, "lr": 0.05,
               "weight_decay": 5e-4, "lr_step": 20, "augment": "crop_flip", "val_per_class": 10},
}
# Holdout validation images per class for CIFAR (the source has 5,000 / 500 per class).
CIFAR_VAL_PER_CLASS = {"cifar10": 100, "cifar100": 20}
# Share of the epochs before LDAM's deferred re-weighting starts (Cao et al.: epoch 160 of 200).
DRW_START = 0.8


# Whole protocols (`--preset`): field values applied by `resolve_config` to every field that is
# unset or "auto", before the data-set defaults above. "ltexp": those defaults and a balanced
# holdout validation set. "paper": the paper's protocol (its Table 1) on any data set: ResNet-18,
# SGD momentum 0.9, lr 0.1, weight decay 2e-4, batch 128, StepLR 150 / 0.1 (so no decay within
# its 100 epochs), LWS trained jointly, validation carved 9:1 from the test set; split clips
# gradients at norm 5. `by_method` holds the values that apply to one method only.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "ltexp": {},
    # The field's protocol (Cao et al. 2019, kaidic/LDAM-DRW's cifar_train.py): ResNet-32, 200
    # epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay 2e-4, 5 warm-up epochs, lr x 0.01
    # after epoch 160 and x 0.0001 after 180, DRW (beta 0.9999) from epoch 161 (its `epoch // 160`
    # counts from 0), LDAM margin 0.5 and scale 30, crop 32 / padding 4 + flip. Validation: the
    # default holdout drawn from training images (the anchors select on the test set).
    "field": {"model": "resnet32", "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
              "weight_decay": 2e-4, "lr_schedule": "multistep", "lr_milestones": "160,180", "lr_gamma": 0.01,
              "warmup_epochs": 5, "augment": "crop_flip", "ldam_max_margin": 0.5, "ldam_scale": 30.0,
              "drw_epoch": 161, "drw_beta": 0.9999},
    "paper": {"model": "resnet18", "epochs": 100, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
              "weight_decay": 2e-4, "lr_step": 150, "lr_gamma": 0.1, "lws_mode": "joint", "val_source": "paper",
              "by_method": {"split": {"clip_norm": 5.0}}},
    # The large benchmarks, as classifier balancing trains its instance-balanced representation
    # (Kang et al. 2020, facebookresearch/classifier-balancing's config/*/feat_uniform.yaml): SGD
    # momentum 0.9, cosine to 0, 224-px images (a `list:` data set of the benchmark's split files,
    # long-tailed already: imb_factor 1 keeps their counts). Its augmentation is
    # RandomResizedCrop(224) + flip, which ltexp has not got: crop_flip (a padded crop, 28 px at
    # 224) is the closest. ltexp has not run these at full scale; docs/large-benchmarks.md.
    # ImageNet-LT, ResNeXt-50 32x4d, 90 epochs, batch 512, lr 0.2, weight decay 5e-4. Published
    # top-1: joint (CE) 44.4 %, NCM 47.3 %, cRT 49.6 %, tau-norm 49.4 %, LWS 49.9 %.
    "imagenet_lt": {"model": "resnext50_32x4d", "epochs": 90, "batch_size": 512, "lr": 0.2, "momentum": 0.9,
                    "weight_decay": 5e-4, "lr_schedule": "cosine", "augment": "crop_flip", "image_size": 224,
                    "imb_factor": 1.0},
    # Places-LT: a ResNet-152 pre-trained on ImageNet (give it with --weights), fine-tuned 30 epochs
    # (OLTR's config/Places_LT/stage_1.py: batch 128, step 10 / 0.1, backbone lr 0.001, classifier
    # 0.1); batch 256, lr 0.01 and weight decay 5e-4 are classifier balancing's Places_LT/cls_*.yaml
    # backbone values, one rate for the whole net here. Published top-1 (Kang et al. 2020):
    # joint 30.2 %, NCM 36.4 %, cRT 36.7 %, tau-norm 37.9 %, LWS 37.6 % (OLTR 35.9 %).
    "places_lt": {"model": "resnet152", "epochs": 30, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
                  "weight_decay": 5e-4, "lr_schedule": "cosine", "augment": "crop_flip", "image_size": 224,
                  "imb_factor": 1.0},
    # iNaturalist 2018, ResNet-50, 90 epochs (Kang et al. also train 200: --epochs 200), batch 512,
    # lr 0.2, weight decay 1e-4. Published top-1 at 90 / 200 epochs: joint 61.7 / 65.8 %, cRT
    # 65.2 / 67.6 %, tau-norm 65.6 / 69.3 %, LWS 65.9 / 69.5 %.
    "inat18": {"model": "resnet50", "epochs": 90, "batch_size": 512, "lr": 0.2, "momentum": 0.9,
               "weight_decay": 1e-4, "lr_schedule": "cosine", "augment": "crop_flip", "image_size": 224,
               "imb_factor": 1.0},
}
