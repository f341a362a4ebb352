"""Overflow-aware calibration: scales at which the sums a layer really computes fit the
accumulator.

A2Q and FINN size the accumulator for the worst case over all inputs (the weights' L1
norm times the largest activation): 18 bits for W4A8 ResNet-20, where the sums measured
on real images stay within 14. This pass measures them instead. For each convolution,
the exact accumulator values on the calibration images (accel_sim at a width that cannot
overflow) give a magnitude, their `quantile`; where it exceeds the accumulator's range,
the scale of the convolution's input grows by the ratio, so that tensor's integers, and
with them the sums, shrink by it. An 8-bit activation then uses fewer of its levels,
which costs far less than fewer weight levels would at 4 bits. The first convolution
reads the raw image, whose scale is fixed; its weight scale grows instead (per channel
with per-channel weights).

Each tensor is read by one convolution (a block's input also feeds its shortcut, which
enters the requantization, not an accumulator), and the lowering recomputes every
multiplier from the scales, so a ratio changes one layer's sums and leaves the network's
function as it was up to rounding. Rounding moves the sums a little, hence a few passes.
In `saturate` mode the running sums may still clip on the way where the final sums fit;
the simulator counts those (docs/datapath.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from accel_sim.functional import FunctionalSim
from accel_sim.ir import MAX_ACC_BITS, Accumulator, Conv2d, Program

from .. import HwqError
from .lower import lower
from .model import QuantConfig, ResNetCifar

PASSES = 4
BATCH = 128


@dataclass(frozen=True)
class AccumulatorFit:
    """Fit the network's scales so that the `quantile` of each layer's measured |sum|
    (1.0: the largest) fits `accumulator`."""

    accumulator: Accumulator
    quantile: float = 1.0

    def validate(self) -> None:
        if not 0.5 <= self.quantile <= 1.0:
            raise HwqError(f"--fit-accumulator quantile {self.quantile} must be in [0.5, 1]")


def measured_sums(program: Program, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per convolution, |exact accumulator value| of every output on `images`, (N, O, H, W)."""
    sim = FunctionalSim(program.with_accumulator(Accumulator(MAX_ACC_BITS, "wrap")))
    parts: dict[str, list[np.ndarray]] = {}
    for batch in images.split(BATCH):
        env = {program.input: sim.input_carrier(batch)}
        accumulators: dict[str, torch.Tensor] = {}
        sim.execute(env, accumulators=accumulators)
        for plan in sim.plans:
            if isinstance(plan.op, Conv2d):
                init = torch.as_tensor(plan.bound.init).view(1, -1, 1, 1)
                parts.setdefault(plan.op.name, []).append((accumulators[plan.op.name] + init).abs().numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


def magnitude(sums: np.ndarray, quantile: float, per_channel: bool) -> np.ndarray:
    """The `quantile` of |sum|, over everything or per output channel (axis 1)."""
    values = np.moveaxis(sums, 1, 0).reshape(sums.shape[1], -1) if per_channel else sums.reshape(1, -1)
    return np.quantile(values, quantile, axis=1, method="higher").astype(np.float64)


def scale_parameter(model: ResNetCifar, program: Program, op: Conv2d) -> tuple[nn.Parameter, bool]:
    """The Brevitas parameter whose growth shrinks `op`'s sums, and whether it is per channel:
    the input activation's scale, or for the layer reading the image its weight scale."""
    modules = dict(model.named_modules())
    try:
        if op.input == program.input:
            impl = modules[program.meta["weight_sources"][op.name]].weight_quant.tensor_quant.scaling_impl
        else:
            act = modules[program.meta["sources"][op.input]].act_quant
            impl = act.fused_activation_quant_proxy.tensor_quant.scaling_impl
        value = impl.value
    except (AttributeError, KeyError):
        raise HwqError(
            f"--fit-accumulator needs learned (parameter) scales, and {op.name}'s input has none"
        ) from None
    return value, value.numel() > 1


def fit_accumulator(
    model: ResNetCifar, cfg: QuantConfig, images: torch.Tensor, fit: AccumulatorFit, mult_bits: int
) -> dict[str, float]:
    """Grow `model`'s scales in place (see the module's docstring); returns, per
    convolution, the factor its sums were divided by in all (1.0 where they fitted)."""
    fit.validate()
    limit = float(fit.accumulator.hi)
    total: dict[str, float] = {}
    for _ in range(PASSES):
        program = lower(model, cfg, mult_bits=mult_bits)
        grown = False
        for name, sums in measured_sums(program, images).items():
            op = program.op(name)
            param, per_channel = scale_parameter(model, program, op)
            ratio = np.maximum(magnitude(sums, fit.quantile, per_channel) / limit, 1.0)
            if np.all(ratio <= 1.0):
                total.setdefault(name, 1.0)
                continue
            with torch.no_grad():
                param.mul_(torch.as_tensor(ratio, dtype=param.dtype).view(param.shape))
            total[name] = total.get(name, 1.0) * float(ratio.max())
            grown = True
        if not grown:
            break
    return total
