"""Small hand-built programs for the datapath's corners that ResNet-20 never reaches:
signed inputs, per-channel input zero points, a residual with channel padding, and
accumulators narrow enough that most sums overflow."""

from __future__ import annotations

import numpy as np
import torch

from accel_sim.ir import Accumulator, Conv2d, GlobalAvgPool, Program, Requant, Residual, TensorSpec


def _requant(
    rng: np.random.Generator, channels: int, shift: int, residual: Residual | None = None
) -> Requant:
    return Requant(
        mult=rng.integers(-3000, 3000, channels),
        shift=np.full(channels, shift),
        offset=rng.integers(-(1 << (shift + 4)), 1 << (shift + 4), channels),
        residual=residual,
    )


def signed_program(accumulator: Accumulator, seed: int = 0) -> Program:
    """x (signed, zero points) -conv-> y (signed) -conv, stride 2, + residual y-> z (unsigned)
    -pool-> p (signed) -fc-> logits."""
    rng = np.random.default_rng(seed)
    tensors = {
        "x": TensorSpec("x", (4, 6, 6), 6, True, zero_point=(1, -2, 0, 3)),
        "y": TensorSpec("y", (5, 6, 6), 7, True, zero_point=(-3,)),
        "z": TensorSpec("z", (6, 3, 3), 8, False),
        "p": TensorSpec("p", (6, 1, 1), 8, True, zero_point=(2,)),
        "logits": TensorSpec("logits", (4, 1, 1), 32, True),
    }
    residual = Residual(
        "y", mult=rng.integers(-2000, 2000, 6), shift=np.full(6, 3), stride=2, channel_pad=(1, 0)
    )
    ops = [
        Conv2d(
            "c1",
            "x",
            "y",
            rng.integers(-16, 16, (5, 4, 3, 3)),
            5,
            rng.integers(-500, 500, 5),
            1,
            1,
            _requant(rng, 5, 14),
        ),
        Conv2d(
            "c2",
            "y",
            "z",
            rng.integers(-8, 8, (6, 5, 3, 3)),
            4,
            rng.integers(-300, 300, 6),
            2,
            1,
            _requant(rng, 6, 14, residual),
        ),
        GlobalAvgPool("pool", "z", "p", _requant(rng, 6, 12)),
        Conv2d(
            "fc",
            "p",
            "logits",
            rng.integers(-32, 32, (4, 6, 1, 1)),
            6,
            rng.integers(-100, 100, 4),
            1,
            0,
            Requant(np.ones(4, dtype=np.int64), np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64)),
        ),
    ]
    program = Program(tensors, ops, "x", "logits", accumulator)
    program.validate()
    return program


def signed_images(program: Program, n: int, seed: int = 1) -> torch.Tensor:
    spec = program.tensors[program.input]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(spec.qmin, spec.qmax + 1, (n, *spec.shape), generator=generator)
