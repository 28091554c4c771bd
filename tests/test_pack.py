"""Packed data sets (ltexp/data/pack.py): written by `ltexp data --pack`, read by `--dataset pack:`."""

import json
import zipfile

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import write_cifar_archive, write_image_folder
from ltexp import LtexpError
from ltexp.cli import main
from ltexp.config import resolve_config
from ltexp.data import build_dataset
from ltexp.data.pack import pack_meta

SPLIT_FIELDS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels",
                "train_index", "val_index", "test_index")


def _data(**values):
    return resolve_config({"data": values}).data


def _pack(capsys, out, *flags):
    assert main(["data", "--pack", str(out), "--output-dir", str(out.parent), *flags]) == 0
    return capsys.readouterr().out


def _same(a, b):
    for name in SPLIT_FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.info.class_names == b.info.class_names and np.array_equal(a.info.train_counts, b.info.train_counts)
    assert a.val_from_test == b.val_from_test


def _jpeg_folder(root):
    """A three-class folder data set of JPEG files (lossy: a second encoding would change pixels)."""
    write_image_folder(root, 12, 4, size=16)
    for png in sorted(root.rglob("*.png")):
        Image.open(png).save(png.with_suffix(".jpg"), quality=75)
        png.unlink()
    return root


@pytest.mark.parametrize("source", ["digits", "cifar10", "folder"])
def test_a_pack_holds_exactly_the_data_set_it_was_made_from(tmp_path, capsys, source, monkeypatch):
    flags = {"digits": ["--imb-type", "step", "--imb-factor", "0.1", "--data-seed", "3"],
             "cifar10": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--val-source", "paper"],
             "folder": ["--dataset", f"folder:{tmp_path / 'jpeg'}", "--imb-factor", "0.5", "--image-size", "16"]}[source]
    if source == "cifar10":
        write_cifar_archive(tmp_path / "c", "cifar10", 200, 10)
        monkeypatch.setenv("LTEXP_UNVERIFIED_CIFAR", "1")
    if source == "folder":
        _jpeg_folder(tmp_path / "jpeg")
    out = tmp_path / "set.ltpack"
    printed = _pack(capsys, out, *flags)
    assert f"train on it with --dataset pack:{out}" in printed

    def values(dataset=None):
        sections = {"data": {}}
        it = iter(flags)
        for flag, value in zip(it, it):
            sections["data"][flag[2:].replace("-", "_")] = value
        for key, cast in (("imb_factor", float), ("data_seed", int), ("image_size", int)):
            if key in sections["data"]:
                sections["data"][key] = cast(sections["data"][key])
        if dataset:
            sections["data"]["dataset"] = dataset
        return resolve_config(sections)

    direct, packed = values(), values(f"pack:{out}")
    _same(build_dataset(direct.data), build_dataset(packed.data))
    # The data set's defaults come with it: model, augmentation, validation size.
    assert (packed.model, packed.data.augment, packed.data.val_per_class) == \
        (direct.model, direct.data.augment, direct.data.val_per_class)
    meta = pack_meta(out)
    assert meta["sets"][0]["settings"]["imb_factor"] == direct.data.imb_factor and len(meta["sha256"]) == 64


def test_a_folders_jpeg_files_travel_byte_for_byte(tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "jpeg")
    out = tmp_path / "set.ltpack"
    _pack(capsys, out, "--dataset", f"folder:{root}", "--imb-factor", "1", "--image-size", "16")
    with np.load(out, allow_pickle=False) as archive:
        raw, offsets = archive["test_bytes"], archive["test_offsets"]
    first_test_file = sorted((root / "test" / "a").iterdir())[0]
    assert raw[offsets[0]:offsets[1]].tobytes() == first_test_file.read_bytes()


def test_training_on_a_pack_gives_the_metrics_of_its_folder(mlflow_store, tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "jpeg")
    common = ["--imb-factor", "0.5", "--image-size", "16"]
    out = tmp_path / "set.ltpack"
    _pack(capsys, out, "--dataset", f"folder:{root}", *common)
    train = ["train", "--epochs", "3", "--method", "balanced_softmax", "--no-progress", *common]
    assert main([*train, "--dataset", f"folder:{root}"]) == 0
    assert main([*train, "--dataset", f"pack:{out}"]) == 0
    runs = {r.data.tags["ltexp.dataset"]: r for r in MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])}
    folder, pack = runs[f"folder:{root}"], runs[f"pack:{out}"]
    metrics = [k for k in folder.data.metrics if k.startswith(("test_", "val_", "best_val")) and not k.endswith("_s")]
    assert "test_acc" in metrics and "val_acc" in metrics
    assert {k: pack.data.metrics[k] for k in metrics} == {k: folder.data.metrics[k] for k in metrics}
    assert pack.data.tags["ltexp.pack_sha256"] == pack_meta(out)["sha256"]
    assert pack.data.tags["ltexp.pack_source"] == f"folder:{root}"
    assert pack.data.tags["ltexp.data_name"] == folder.data.tags["ltexp.data_name"] == "folder:jpeg"
    assert pack.info.run_name.startswith("balanced_softmax·pack:set·")
    assert "image_size" not in pack.data.params  # not used: a pack's images keep their packed size


def test_a_run_whose_settings_match_no_set_of_the_pack_is_refused_listing_them(tmp_path, capsys):
    out = tmp_path / "set.ltpack"
    _pack(capsys, out)
    with pytest.raises(SystemExit) as exc:
        main(["data", "--dataset", f"pack:{out}", "--imb-factor", "0.1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"ltexp: error: the pack {out} holds no set made with --imb-type exp --imb-factor 0.1 --val-source holdout "
        f"--val-per-class 20 --data-seed 0: it holds --imb-type exp --imb-factor 0.01 --val-source holdout "
        f"--val-per-class 20 --data-seed 0; give one of those settings, or add yours with "
        f"`ltexp data --pack {out} --dataset digits ...`")


def test_several_sets_of_one_source_share_a_pack_and_its_images(tmp_path, capsys):
    settings = [["--imb-type", "exp", "--imb-factor", "0.01"], ["--imb-type", "step", "--imb-factor", "0.1"],
                ["--imb-type", "exp", "--imb-factor", "0.1", "--val-source", "paper"]]
    shared = tmp_path / "all.ltpack"
    alone = 0
    for i, flags in enumerate(settings):
        _pack(capsys, shared, *flags)
        _pack(capsys, tmp_path / f"{i}.ltpack", *flags)
        alone += (tmp_path / f"{i}.ltpack").stat().st_size
    _pack(capsys, shared, *settings[0])  # packing a set again replaces it: still three sets
    meta = pack_meta(shared)
    assert len(meta["sets"]) == 3 and shared.stat().st_size < 0.75 * alone  # each image stored once
    for flags in settings:
        values = dict(zip(flags[::2], flags[1::2]))
        sections = {"imb_type": values["--imb-type"], "imb_factor": float(values["--imb-factor"]),
                    "val_source": values.get("--val-source", "holdout")}
        _same(build_dataset(_data(**sections)), build_dataset(_data(**sections, dataset=f"pack:{shared}")))


def test_a_pack_takes_sets_of_one_source_only(tmp_path, capsys):
    out = tmp_path / "set.ltpack"
    _pack(capsys, out)
    root = write_image_folder(tmp_path / "png", 6, 2, size=8)
    with pytest.raises(SystemExit):
        main(["data", "--pack", str(out), "--dataset", f"folder:{root}", "--imb-factor", "1", "--image-size", "8"])
    assert "a pack holds sets of one source; choose another file" in capsys.readouterr().err


def _flip_last_byte_of(path, member):
    """Damage `member` of the zip at `path` in place, as a disk or a copy would (its CRC no longer holds)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "r+b") as fh:  # stored, not compressed: the member's bytes follow its local header
        fh.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1)
        last = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([last[0] ^ 0xFF]))


def _rewrite(path, change):
    """Rewrite the zip at `path` with `change(members)` applied, CRCs recomputed (a tampered pack)."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, body)


def _other_format(members):
    meta = json.loads(members["meta.json"])
    meta["format"] = "ltexp-pack/0"
    members["meta.json"] = json.dumps(meta).encode()


def _other_image_byte(members):
    body = bytearray(members["train_bytes.npy"])
    body[-1] ^= 0xFF
    members["train_bytes.npy"] = bytes(body)


@pytest.mark.parametrize("damage, fragment", [
    ("torn", "is damaged (BadZipFile: Bad CRC-32 for file 'train_bytes.npy')"),
    ("tampered", "is damaged: its contents hash to"),
    ("not a zip", "is not an ltexp pack (BadZipFile"),
    ("other format", "has format 'ltexp-pack/0', this ltexp reads 'ltexp-pack/1'"),
    ("missing", "no such file"),
])
def test_a_damaged_or_foreign_pack_is_one_line(tmp_path, capsys, damage, fragment):
    out = tmp_path / "set.ltpack"
    _pack(capsys, out)
    if damage == "torn":
        _flip_last_byte_of(out, "train_bytes.npy")
    elif damage == "tampered":
        _rewrite(out, _other_image_byte)
    elif damage == "not a zip":
        out.write_bytes(b"text, not a pack\n")
    elif damage == "other format":
        _rewrite(out, _other_format)
    else:
        out.unlink()
    with pytest.raises(SystemExit) as exc:
        main(["data", "--dataset", f"pack:{out}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltexp: error: ") and fragment in err and "\n" not in err, err


def test_a_pack_is_no_source_and_needs_a_path():
    with pytest.raises(LtexpError, match="--dataset pack: needs a path"):
        _data(dataset="pack:")
    with pytest.raises(LtexpError, match="pack:<file>"):
        _data(dataset="mnist")


def test_a_pack_names_runs_and_models_by_its_file():
    from ltexp.tune import default_model_name

    assert default_model_name("pack:/data/cifar10 LT.ltpack") == "ltexp-pack-cifar10-LT"
    assert default_model_name("folder:/data/my images") == "ltexp-folder-my-images"
