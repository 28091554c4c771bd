"""`--dataset list:<root>:<train.txt>,<test.txt>` (ltexp/data/sources.py): the published split-file
format of ImageNet-LT, Places-LT and iNaturalist 2018, each bad line refused naming file and line."""

import numpy as np
import pytest

from conftest import write_image_folder
from ltexp import LtexpError
from ltexp.cli import main
from ltexp.config import resolve_config
from ltexp.data import build_dataset
from ltexp.data.sources import load_folder_source, load_list_source


def _lists(root, train_lines=None, test_lines=None):
    """Split files for the three-class folder data set under root (labels a=0, b=1, c=2)."""
    def lines(split):
        return [f"{split}/{cls}/{path.name} {k}" for k, cls in enumerate("abc")
                for path in sorted((root / split / cls).iterdir())]
    (root / "train.txt").write_text("\n".join(train_lines if train_lines is not None else lines("train")) + "\n")
    (root / "test.txt").write_text("\n".join(test_lines if test_lines is not None else lines("test")) + "\n")
    return f"{root}:train.txt,test.txt"


def test_split_files_read_the_images_they_name_as_a_folder_would(tmp_path):
    root = write_image_folder(tmp_path / "set", 8, 3, size=8)
    listed = load_list_source(_lists(root), 8)
    folder = load_folder_source(root, 8)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(listed, name), getattr(folder, name)), name
    assert listed.class_names == ("0", "1", "2") and listed.train_files == folder.train_files
    # Long-tailed and carved like the folder data set of the same images: the same arrays.
    built = [build_dataset(resolve_config({"data": {"dataset": name, "imb_factor": 0.5, "image_size": 8,
                                                    "val_per_class": 2}}).data)
             for name in (f"list:{_lists(root)}", f"folder:{root}")]
    assert built[0].info.train_counts.tolist() == built[1].info.train_counts.tolist() == [6, 4, 3]
    assert np.array_equal(built[0].train_images, built[1].train_images)


@pytest.mark.parametrize("train, test, fragment", [
    (["train/a/0.png"], None, "train.txt line 1: expected '<relative path> <label>', got 'train/a/0.png'"),
    (["train/a/0.png zero"], None, "train.txt line 1: expected '<relative path> <label>'"),
    (["train/a/0.png -1"], None, "train.txt line 1: label -1 is negative"),
    (["train/a/0.png 0", "train/a/nope.png 1"], None, "train.txt line 2: image"),
    (["train/a/0.png 0", "train/b/0.png 2"], None, "train.txt: class 1 has no training images"),
    (["train/a/0.png 0", "train/b/0.png 1"], ["test/a/0.png 0", "test/b/0.png 5"], "label 5 (image"),
    (["train/a/0.png 0", "train/b/0.png 1"], ["test/a/0.png 0"], "test.txt: class 1 has no test images"),
    ([], None, "lists no images"),
])
def test_a_bad_split_file_is_one_line_naming_file_and_line(tmp_path, train, test, fragment):
    root = write_image_folder(tmp_path / "set", 2, 1, size=8)
    with pytest.raises(LtexpError) as exc:
        load_list_source(_lists(root, train, test), 8)
    assert fragment in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_a_list_data_set_trains_and_names_its_runs_by_its_root(mlflow_store, tmp_path, capsys):
    from mlflow import MlflowClient

    from ltexp.tune import default_model_name

    root = write_image_folder(tmp_path / "ImageNet_LT", 6, 2, size=8)
    dataset = f"list:{_lists(root)}"
    assert main(["train", "--dataset", dataset, "--imb-factor", "1", "--image-size", "8", "--epochs", "1",
                 "--no-progress"]) == 0
    (run,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["ltexp.data_name"] == "list:ImageNet_LT"
    assert run.info.run_name.startswith("baseline·list:ImageNet_LT·")
    assert default_model_name(dataset) == "ltexp-list-ImageNet_LT"
    with pytest.raises(SystemExit):
        main(["data", "--dataset", f"list:{root}:train.txt"])
    assert "give list:<root>:<train.txt>,<test.txt>" in capsys.readouterr().err
