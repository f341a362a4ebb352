"""CIFAR-10 in the standard python-batch layout, as raw uint8 images.

The loader reads any number of `data_batch_*` files of any length (no checksums), so
subsets work like the official set. The `train`/`val` splits partition all training
batches with a seeded permutation: the first `round(val_fraction * N)` permuted images are
`val`, the rest `train`, so a seed and a fraction name the same split on every machine.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import HwqError, cache_dir

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")
BATCHES_DIR = "cifar-10-batches-py"
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64, as torch tensors."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Dataset:
        if n is None or n >= len(self):
            return self
        return Dataset(self.images[:n], self.labels[:n], self.name)


def data_root(flag: str | None) -> Path:
    """--data, then $HWQ_DATA, then the cache directory."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get("HWQ_DATA"):
        return Path(os.environ["HWQ_DATA"]).expanduser()
    return cache_dir() / "cifar10"


def find_batches(root: Path) -> Path | None:
    for candidate in (root, root / BATCHES_DIR):
        if any(candidate.glob("data_batch_*")) or (candidate / "test_batch").exists():
            return candidate
    return None


def download(root: Path) -> Path:
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP, disk: one message
        raise HwqError(
            f"CIFAR-10 not found in {root} and the download failed ({type(exc).__name__}: {exc}); "
            "pass --data DIR with cifar-10-batches-py, or set HWQ_DATA"
        ) from None
    return root / BATCHES_DIR


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises anything
        raise HwqError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise HwqError(
            f"{path} has data of shape {data.shape} and {len(labels)} labels; expected N x 3072 and N"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise HwqError(f"{path} has labels outside 0-9")
    return data.reshape(-1, 3, 32, 32), labels


def load_split(
    data: str | None,
    split: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    allow_download: bool = True,
) -> Dataset:
    if split not in SPLITS:
        raise HwqError(f"split {split!r} is not one of {SPLITS}")
    if not 0 < val_fraction < 1:
        raise HwqError(f"validation fraction {val_fraction} must be between 0 and 1")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise HwqError(f"split seed {seed!r} must be a non-negative integer (numpy seeds are)")
    root = data_root(data)
    batches = find_batches(root)
    if batches is None:
        if data and not root.exists():
            raise HwqError(f"data directory {root} does not exist")
        if not allow_download:
            raise HwqError(f"no CIFAR-10 batches in {root}")
        batches = download(root)
    if split == "test":
        if not (batches / "test_batch").exists():
            raise HwqError(f"{batches} has no test_batch (a training subset?); use --split val")
        images, labels = read_batch(batches / "test_batch")
        return as_dataset(images, labels, "test")
    files = sorted(batches.glob("data_batch_*"))
    if not files:
        raise HwqError(f"{batches} has no data_batch_* files")
    parts = [read_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = round(val_fraction * len(labels))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return as_dataset(images[chosen], labels[chosen], split)


def as_dataset(images: np.ndarray, labels: np.ndarray, name: str) -> Dataset:
    import torch  # here, so that the torch-free commands (hwq sim, report) start fast

    return Dataset(torch.from_numpy(images), torch.from_numpy(labels), name)
