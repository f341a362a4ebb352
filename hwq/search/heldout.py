"""Held-out figures of a program on the `val` split: accuracy, and how close it is to the
float network (top-1 agreement, L1 distance of the logits), to know when to stop.

The float network's val logits are computed once per run (and kept in the run's state,
so a resumed run logs the same figures wherever it runs); the program's integer logits
are converted to real logit units with the program's logit scale.
"""

from __future__ import annotations

import numpy as np
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Program

from ..data import Dataset
from ..quant import DEFAULT_BATCH


def float_logits(model: torch.nn.Module, ds: Dataset, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """(N, classes) float64 logits of the float network on raw uint8 images."""
    with torch.no_grad():
        parts = [model(ds.images[s : s + batch_size]).double() for s in range(0, len(ds), batch_size)]
    return torch.cat(parts).numpy()


def program_logits(program: Program, ds: Dataset, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """(N, classes) integer logits of the program on accel_sim."""
    sim = FunctionalSim(program)
    parts = [sim.run(ds.images[s : s + batch_size]).logits.cpu() for s in range(0, len(ds), batch_size)]
    return torch.cat(parts).to(torch.int64).flatten(1).numpy()


def held_out_figures(program: Program, ds: Dataset, reference: np.ndarray) -> dict[str, float]:
    """`val_accuracy` (top-1, argmax with the lowest index on ties, as `hwq eval`),
    `val_agreement` (share of images whose top-1 class equals the float network's) and
    `val_logit_l1` (mean over images of the L1 distance between the program's logits and
    the float network's `reference` logits, summed over classes, in real logit units)."""
    logits = program_logits(program, ds)
    predictions = logits.argmax(axis=1)
    real = logits * program.tensors[program.output].scale
    return {
        "val_accuracy": float(np.mean(predictions == ds.labels.numpy())),
        "val_agreement": float(np.mean(predictions == reference.argmax(axis=1))),
        "val_logit_l1": float(np.abs(real - reference).sum(axis=1).mean()),
    }
