"""Long-tail construction, validation carving, ranks, groups and shots."""

import subprocess
import sys

import numpy as np
import pytest

from ltexp import LtexpError
from ltexp.data import build_long_tail, load_source, long_tail_counts
from ltexp.data.longtail import ClassInfo, default_split_at, validate_split_at
from ltexp.data.sources import _digits_arrays, load_cifar_source, load_digits_source

from conftest import bomb_png, write_cifar_archive, write_image_folder
from PIL import Image


def test_ldam_counts_cifar10_exp_001():
    assert long_tail_counts(5000, 10, "exp", 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_ldam_totals_cifar100():
    assert sum(long_tail_counts(500, 100, "exp", 0.01)) == 10847
    assert sum(long_tail_counts(500, 100, "exp", 0.1)) == 19573


def test_step_counts():
    assert long_tail_counts(5000, 10, "step", 0.1) == [5000] * 5 + [500] * 5
    assert long_tail_counts(500, 100, "step", 0.01) == [500] * 50 + [5] * 50


def test_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    pixels, target = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.images) and pixels.dtype == bunch.images.dtype
    assert np.array_equal(target, bunch.target) and target.dtype == bunch.target.dtype
    assert pixels.shape == (1797, 8, 8) and np.bincount(target).min() >= 174
    # Found without importing scikit-learn (~1 s of CPU in every digits process).
    code = ("import sys; from ltexp.data.sources import load_digits_source; load_digits_source(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_full_size_cifar10_archive_paper_protocol_keeps_exact_counts(tmp_path):
    # A full-size generated archive (50,000 train images): the exact LDAM-DRW counts come out.
    write_cifar_archive(tmp_path, "cifar10", 5000, 20)
    source = load_cifar_source("cifar10", tmp_path, download=False)
    data = build_long_tail(source, "exp", 0.01, "paper", 0, seed=0)
    assert np.bincount(data.train_labels).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert data.info.class_names[0] == "airplane"
    assert data.train_images.shape == (12406, 32, 32, 3) and data.train_images.dtype == np.uint8


def test_cifar100_archive_totals_and_holdout(tmp_path):
    write_cifar_archive(tmp_path, "cifar100", 60, 4)
    source = load_cifar_source("cifar100", tmp_path, download=False)
    assert source.num_classes == 100 and source.balanced
    paper = build_long_tail(source, "exp", 0.1, "paper", 0, seed=0)
    assert len(paper.train_labels) == sum(long_tail_counts(60, 100, "exp", 0.1))
    # holdout: 10 per class set aside first, the formula runs on the 50 left (exact factor 0.1).
    holdout = build_long_tail(source, "exp", 0.1, "holdout", 10, seed=0)
    assert np.bincount(holdout.train_labels, minlength=100).tolist() == long_tail_counts(50, 100, "exp", 0.1)
    assert np.bincount(holdout.val_labels).tolist() == [10] * 100
    assert len(holdout.test_labels) == 400


@pytest.mark.parametrize("val_source", ["holdout", "paper"])
def test_validation_never_overlaps_train_or_test(val_source):
    source = load_digits_source()
    data = build_long_tail(source, "exp", 0.01, val_source, 20, seed=3)
    assert len(np.unique(data.train_index)) == len(data.train_index)
    if val_source == "paper":
        # Validation and test are both rows of the official test set: disjoint, 9 : 1.
        assert data.val_from_test
        assert len(np.intersect1d(data.val_index, data.test_index)) == 0
        assert len(data.val_labels) == 450 and len(data.test_labels) == 50
    else:
        # Validation and training are both rows of the training pool: disjoint; test untouched.
        assert len(np.intersect1d(data.train_index, data.val_index)) == 0
        assert np.bincount(data.val_labels).tolist() == [20] * 10
        assert len(data.test_labels) == 500
    assert np.array_equal(data.val_images, (source.test_images if data.val_from_test else source.train_images)[data.val_index])


def test_digits_carve_is_balanced_and_fixed():
    a, b = load_digits_source(), load_digits_source()
    assert np.bincount(a.test_labels).tolist() == [50] * 10
    assert np.bincount(a.train_labels).tolist() == [120] * 10
    assert np.array_equal(a.test_images, b.test_images)
    assert a.train_images.shape[1:] == (8, 8, 1) and a.train_images.max() == 255


def test_digits_exp_001_profile():
    data = build_long_tail(load_digits_source(), "exp", 0.01, "holdout", 20, seed=0)
    assert data.info.train_counts.tolist() == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert data.info.is_head.tolist() == [True] * 5 + [False] * 5
    assert data.info.shot.tolist() == ["medium"] * 4 + ["few"] * 6


def test_same_seed_same_images_other_seed_other_images():
    source = load_digits_source()
    a = build_long_tail(source, "exp", 0.1, "holdout", 20, seed=0)
    b = build_long_tail(source, "exp", 0.1, "holdout", 20, seed=0)
    c = build_long_tail(source, "exp", 0.1, "holdout", 20, seed=1)
    assert np.array_equal(a.train_index, b.train_index)
    assert not np.array_equal(a.train_index, c.train_index)


def test_ranks_ties_by_label_and_groups():
    info = ClassInfo(tuple("abcde"), np.array([5, 50, 5, 20, 50]))
    assert info.rank_order.tolist() == [1, 4, 3, 0, 2]
    assert info.group_of().tolist() == [1, 0, 1, 1, 0]  # split at rank 2: {1, 4} head
    assert info.group_of([1, 3]).tolist() == [2, 0, 2, 1, 1]
    assert default_split_at(10) == (5,) and default_split_at(10, 3) == (3, 6)


@pytest.mark.parametrize("split", [[0], [10], [5, 5], [6, 3], []])
def test_bad_split_at(split):
    with pytest.raises(LtexpError, match="split-at"):
        validate_split_at(split, 10)


def test_zero_image_class_is_a_clear_error():
    with pytest.raises(LtexpError, match="0 training images after --imb-type exp --imb-factor 0.001"):
        build_long_tail(load_digits_source(), "exp", 0.001, "holdout", 20, seed=0)


def test_folder_source_keeps_real_counts(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", {"cat": 9, "dog": 4, "emu": 3}), ("test", {"cat": 2, "dog": 2, "emu": 2})):
        for cname, n in counts.items():
            d = tmp_path / split / cname
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    source = load_source(f"folder:{tmp_path}", image_size=16)
    assert source.class_names == ("cat", "dog", "emu") and source.train_images.shape == (16, 16, 16, 3)
    data = build_long_tail(source, "exp", 1.0, "holdout", 5, seed=0)
    # The rarest class has 3 images, so the balanced holdout takes 2 of each; counts keep their shape.
    assert np.bincount(data.val_labels).tolist() == [2, 2, 2]
    assert data.info.train_counts.tolist() == [7, 2, 1]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(LtexpError, match="holds no images"):
        load_source(f"folder:{tmp_path}")


def test_unreadable_image_is_a_clear_error(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(LtexpError, match=r"image .*broken\.png: cannot decode as an image \(UnidentifiedImageError\)"):
        load_source(f"folder:{tmp_path}")


def test_folder_image_over_the_pixel_limit_is_refused_naming_it(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    write_image_folder(tmp_path, 3, 2, size=12)
    bomb = tmp_path / "train" / "b" / "bomb.png"
    bomb.write_bytes(bomb_png(20000, 20000))  # 400 million pixels in ~50 KB: PIL refuses it in open()
    with pytest.raises(LtexpError, match=rf"^image {bomb} has 400000000 pixels, more than the limit "
                                         rf"{Image.MAX_IMAGE_PIXELS} \(PIL's Image.MAX_IMAGE_PIXELS\)$"):
        load_source(f"folder:{tmp_path}", image_size=12)
    # Between the limit and twice it PIL itself only warns and decodes; ltexp refuses, silently.
    bomb.unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 12 x 12 images have 144
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LtexpError, match=r"^image .*/train/a/0\.png has 144 pixels, more than the limit 100 "):
            load_source(f"folder:{tmp_path}", image_size=12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 144)
    assert load_source(f"folder:{tmp_path}", image_size=12).train_images.shape == (9, 12, 12, 3)


def test_folder_with_one_class_is_refused(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / split / "cat" / f"{i}.png")
    with pytest.raises(LtexpError, match=rf"^folder data set {tmp_path} has only one class \('cat' in "
                                         rf"{tmp_path / 'train'}\): a classifier needs at least 2 classes"):
        load_source(f"folder:{tmp_path}")


def test_folder_whose_test_split_lacks_a_class_is_refused(tmp_path):
    import shutil

    write_image_folder(tmp_path, 4, 2, size=8)
    shutil.rmtree(tmp_path / "test" / "c")
    with pytest.raises(LtexpError, match=rf"^folder data set {tmp_path}: class 'c' has training images but none "
                                         rf"in {tmp_path / 'test' / 'c'}; every class needs test images"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "test" / "c").mkdir()  # an empty folder is no better
    with pytest.raises(LtexpError, match="class 'c' has training images but none"):
        load_source(f"folder:{tmp_path}")
    shutil.rmtree(tmp_path / "test" / "a")
    with pytest.raises(LtexpError, match=r"class 'a' .*\(2 classes lack them: 'a', 'c'\)$"):
        load_source(f"folder:{tmp_path}")


@pytest.mark.parametrize("imb_type,imb_factor,most,keep", [("exp", 0.01, 20, 100), ("step", 0.1, 110, 10),
                                                           ("exp", 1.0, 119, 1)])
def test_val_per_class_over_the_limit_names_the_largest_allowed(imb_type, imb_factor, most, keep):
    source = load_digits_source()  # 120 pool images per class
    data = build_long_tail(source, imb_type, imb_factor, "holdout", most, seed=0)  # the limit itself works
    assert np.bincount(data.val_labels).tolist() == [most] * 10 and data.info.train_counts.min() >= 1
    for too_many in (most + 1, 500):
        with pytest.raises(LtexpError, match=rf"^--val-per-class {too_many} is more than digits allows: at most "
                                             rf"{most}, as its classes have 120 training images each and .*"
                                             rf"use --val-per-class {most} or less, or --val-source paper$") as err:
            build_long_tail(source, imb_type, imb_factor, "holdout", too_many, seed=0)
        assert (f"needs {keep} left for training" in str(err.value)) == (keep > 1)


def test_holdout_from_a_folder_class_of_one_image_names_it(tmp_path):
    write_image_folder(tmp_path, 3, 1, size=8)
    for extra in (tmp_path / "train" / "c").glob("[12].png"):
        extra.unlink()
    with pytest.raises(LtexpError, match=r"holdout needs at least 2 training images in every class \(class 'c' has 1\)"):
        build_long_tail(load_source(f"folder:{tmp_path}", image_size=8), "exp", 1.0, "holdout", 10, seed=0)


def test_unreadable_cifar_member_is_named_with_its_archive(tmp_path):
    import pickle

    folder = write_cifar_archive(tmp_path, "cifar10", 5, 2)
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": np.zeros((3, 3072), np.uint8)}, fh, protocol=2)  # no labels
    with pytest.raises(LtexpError, match=rf"^unreadable cifar10 file data_batch_3 in {folder} \(from "
                                         rf"cifar-10-python.tar.gz\): KeyError: 'labels'$"):
        load_cifar_source("cifar10", tmp_path, download=False)
    (folder / "data_batch_3").write_bytes(b"\x80\x02truncated")
    with pytest.raises(LtexpError, match=r"^unreadable cifar10 file data_batch_3 in .* \(from cifar-10-python"):
        load_cifar_source("cifar10", tmp_path, download=False)
    write_cifar_archive(tmp_path, "cifar10", 5, 2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump([1, 2], fh, protocol=2)  # not a dict
    with pytest.raises(LtexpError, match=r"^unreadable cifar10 file batches.meta in .*: TypeError"):
        load_cifar_source("cifar10", tmp_path, download=False)


def test_missing_cifar_offline_is_a_clear_error(tmp_path, monkeypatch):
    from ltexp.data import sources

    # The real download utility, pointed at a closed loopback port: fails at once, like offline.
    layout = sources.CIFAR["cifar10"]
    monkeypatch.setitem(sources.CIFAR, "cifar10", layout.__class__(**{**layout.__dict__, "url": "http://127.0.0.1:9/cifar-10-python.tar.gz"}))
    with pytest.raises(LtexpError, match=r"cifar10 not found in .*cifar-10-batches-py and download failed"):
        load_cifar_source("cifar10", tmp_path, download=True)
    with pytest.raises(LtexpError, match="downloads are off"):
        load_cifar_source("cifar10", tmp_path, download=False)
