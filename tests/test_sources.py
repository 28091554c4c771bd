"""--dataset is parsed once (ltexp.data.sources.parse_dataset) and each kind has one loader."""

import pytest

from ltexp import LtexpError
from ltexp.data.sources import DATASETS, KINDS, LOADERS, DatasetSpec, load_source, parse_dataset


def test_every_kind_of_dataset_parses_to_its_kind_argument_and_short_name():
    assert parse_dataset("cifar100") == DatasetSpec("cifar100") and parse_dataset("cifar100").short_name == "cifar100"
    folder = parse_dataset("folder:/data/my photos:v2/")   # only the first colon separates the kind
    assert (folder.kind, folder.argument, folder.location, folder.short_name) == (
        "folder", "/data/my photos:v2/", "/data/my photos:v2/", "folder:my photos:v2")
    listed = parse_dataset("list:/data/ImageNet_LT:train.txt,test.txt")
    assert (listed.kind, listed.location, listed.short_name) == ("list", "/data/ImageNet_LT", "list:ImageNet_LT")
    pack = parse_dataset("pack:~/sets/cifar10-lt.ltpack")
    assert (pack.kind, pack.location, pack.short_name) == ("pack", "~/sets/cifar10-lt.ltpack", "pack:cifar10-lt")


@pytest.mark.parametrize("dataset, line", [
    ("imagenet", "unknown --dataset 'imagenet': allowed are digits, cifar10, cifar100, folder:<path>, "
                 "list:<root>:<train.txt>,<test.txt> or pack:<file>"),
    ("tar:/x", "unknown --dataset 'tar:/x': allowed are digits"),
    ("folder:", "--dataset folder: needs a path, e.g. folder:/data/my_images"),
    ("pack:", "--dataset pack: needs a path, e.g. pack:cifar10-lt.ltpack"),
])
def test_a_dataset_no_kind_reads_is_one_line_naming_what_is_allowed(dataset, line):
    with pytest.raises(LtexpError) as caught:
        parse_dataset(dataset)
    assert str(caught.value).startswith(line)


def test_every_named_data_set_and_kind_but_a_pack_has_a_loader(tmp_path):
    assert set(LOADERS) == set(DATASETS) | (set(KINDS) - {"pack"})
    assert load_source("digits").name == "digits"
    with pytest.raises(LtexpError, match="a pack is read whole"):
        load_source(f"pack:{tmp_path / 'x.ltpack'}")
