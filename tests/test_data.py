"""The CIFAR-10 loader: any batch length, a seeded documented split, clear errors."""

from __future__ import annotations

import pytest
import torch

from hwq import HwqError
from hwq.data import load_split

from .helpers import write_cifar_batches


def test_train_and_val_partition_the_training_batches(tmp_path):
    root = write_cifar_batches(tmp_path, images_per_batch=40, batches=2)
    train = load_split(str(root), "train", val_fraction=0.25, seed=3)
    val = load_split(str(root), "val", val_fraction=0.25, seed=3)
    assert (len(train), len(val)) == (60, 20)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    both = torch.cat([train.images, val.images]).flatten(1)
    assert len({tuple(row.tolist()) for row in both}) == 80, "train and val overlap or lose images"


def test_split_depends_on_seed_only(tmp_path):
    root = write_cifar_batches(tmp_path)
    a = load_split(str(root), "val", seed=1)
    b = load_split(str(root), "val", seed=1)
    c = load_split(str(root), "val", seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_image_layout_is_planes_of_rows(tmp_path):
    root = write_cifar_batches(tmp_path, batches=1)
    import pickle

    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    test = load_split(str(root), "test")
    first = test.images[0]
    assert first[1, 0, 0] == raw["data"][0][1024] and first[2, 31, 31] == raw["data"][0][3071]


def test_root_may_be_the_batches_folder_itself(tmp_path):
    root = write_cifar_batches(tmp_path)
    assert len(load_split(str(root / "cifar-10-batches-py"), "test")) == 40


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(HwqError, match="does not exist"):
        load_split(str(tmp_path / "nowhere"), "val")


def test_empty_directory_without_network_says_how_to_fix(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(HwqError, match="download failed.*--data"):
        load_split(str(tmp_path), "val")


def test_corrupt_batch_is_named(tmp_path):
    root = write_cifar_batches(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(HwqError, match="data_batch_2 is not a CIFAR-10 python batch"):
        load_split(str(root), "train")


def test_test_split_without_test_batch_points_to_val(tmp_path):
    root = write_cifar_batches(tmp_path, test=False)
    with pytest.raises(HwqError, match="no test_batch.*--split val"):
        load_split(str(root), "test")


def test_data_location_falls_back_to_environment(tmp_path, monkeypatch):
    root = write_cifar_batches(tmp_path)
    monkeypatch.setenv("HWQ_DATA", str(root))
    assert len(load_split(None, "test")) == 40
