"""Shared fixtures: the real checkpoint and CIFAR-10 subset from ../shared when present,
otherwise a deterministic random ResNet-20 and random images, so the suite runs anywhere."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from accel_sim.ir import Program
from hwq.data import load_split
from hwq.quant.lower import lower
from hwq.quant.model import QuantConfig, ResNetCifar, calibrate, load_float_model, quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "models" / "resnet20-12fca82f.th"
DATA = SHARED / "data" / "cifar10-subset"
HAVE_SHARED = CHECKPOINT.exists() and DATA.exists()


def random_resnet(seed: int = 0) -> ResNetCifar:
    """A float ResNet-20 with random weights and BatchNorm statistics of a trained scale."""
    torch.manual_seed(seed)
    model = ResNetCifar(20)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-0.2, 1.0)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@functools.cache
def float_model() -> ResNetCifar:
    return load_float_model(str(CHECKPOINT)) if HAVE_SHARED else random_resnet()


@functools.cache
def calibration_images() -> torch.Tensor:
    if HAVE_SHARED:
        return load_split(str(DATA), "train").images[:256]
    return torch.randint(
        0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


@functools.cache
def brevitas_model(cfg: QuantConfig):
    q = quantize_model(float_model(), cfg)
    calibrate(q, calibration_images())
    return q


@functools.cache
def program_for(cfg: QuantConfig):
    return lower(brevitas_model(cfg), cfg)


@pytest.fixture(scope="session")
def val_set():
    if HAVE_SHARED:
        return load_split(str(DATA), "val")
    pytest.skip("needs the shared CIFAR-10 subset and checkpoint (../shared)")


@pytest.fixture(params=("icarus", "verilator"))
def simulator(request) -> str:
    """Each RTL simulator in turn; one that is not installed skips with the reason."""
    from rtl_models import sim

    reason = sim.missing(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


def write_cifar_batches(root: Path, images_per_batch: int = 40, batches: int = 2, test: bool = True) -> Path:
    """A CIFAR-10 directory in the official python-batch format, with random images."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, batches + 1)] + (["test_batch"] if test else [])
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, images_per_batch).tolist(),
            "batch_label": name,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def write_checkpoint(path: Path, model: ResNetCifar | None = None) -> Path:
    """A checkpoint in the layout of akamaster/pytorch_resnet_cifar10 (`module.` keys)."""
    state = (model or random_resnet()).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 0.0}, path)
    return path


def weight_levels(program: Program) -> set[int]:
    """Every integer level some weight of the program takes."""
    return {int(v) for v in np.unique(np.concatenate([op.weight.ravel() for op in program.conv_ops()]))}
