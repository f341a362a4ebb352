"""Lowering: a calibrated Brevitas ResNet becomes an integer program (accel_sim.ir.Program).

The lowering walks the network once, block by block, and each layer goes through the same
small passes: read the integer weights and scales Brevitas quantized with, fold the
following BatchNorm into a real per-channel affine map, then turn that map (and the
residual's scale, if a shortcut joins) into fixed-point multipliers, shifts and offsets.
Scales only exist here; the program that comes out is integer-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from accel_sim.ir import (
    MAX_SHIFT,
    Accumulator,
    Conv2d,
    GlobalAvgPool,
    Program,
    Requant,
    Residual,
    TensorSpec,
)

from .. import HwqError, __version__
from .model import BasicBlock, QuantConfig, ResNetCifar, input_zero_points

LOGIT_BITS = 32
DEFAULT_MULT_BITS = 16


@dataclass(frozen=True)
class Affine:
    """A real per-channel map acc -> scale * acc + shift (the float ops between two quantizers)."""

    scale: np.ndarray
    shift: np.ndarray


def fixed_point(multiplier: np.ndarray, mult_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the integer M and shift s with M / 2**s closest to `multiplier`, |M| within mult_bits.

    The shift is as large as the multiplier allows (at most MAX_SHIFT), so M keeps
    mult_bits - 1 significant bits; a zero multiplier gets the largest shift.
    """
    limit = (1 << (mult_bits - 1)) - 1
    with np.errstate(divide="ignore"):
        shift = np.floor(np.log2(limit / np.abs(multiplier)))
    shift = np.nan_to_num(shift, posinf=MAX_SHIFT)
    if np.any(shift < 0):
        raise HwqError(f"a requantization multiplier does not fit in {mult_bits} bits with shift >= 0")
    shift = np.minimum(shift, MAX_SHIFT).astype(np.int64)
    return np.rint(multiplier * np.exp2(shift)).astype(np.int64), shift


def aligned_residual(
    multiplier: np.ndarray, shift: np.ndarray, mult_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """The residual's M and left shift L with M * 2**L / 2**shift closest to `multiplier`.

    The residual operand is small (an activation), so a left shift costs it almost
    nothing, while the accumulator path keeps the full precision of its own shift.
    """
    mantissa, own_shift = fixed_point(multiplier, mult_bits)
    left = np.maximum(shift - own_shift, 0)
    return np.rint(multiplier * np.exp2(shift - left)).astype(np.int64), left


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def per_channel(value: torch.Tensor, channels: int) -> np.ndarray:
    return np.broadcast_to(to_numpy(value).reshape(-1), (channels,)).copy()


def weight_ints_and_scale(layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The integer weights Brevitas rounds to, and their per-output-channel scale."""
    qw = layer.quant_weight()
    ints = qw.int().detach().cpu().numpy().astype(np.int64)
    return ints, per_channel(qw.scale, ints.shape[0])


def weight_positions(model: ResNetCifar, program: Program) -> dict[str, np.ndarray]:
    """Each conv op's float weights in units of their quantization step: the real values
    the integer weights were rounded from (the trainer's prior over levels). A weight the
    quantizer clamps (full range: the largest positive ones) sits half a level beyond its
    level, as close as it can be while that level stays the nearest."""
    modules = dict(model.named_modules())
    out = {}
    for name, path in program.meta["weight_sources"].items():
        layer = modules[path]
        qw = layer.quant_weight()
        position = (layer.weight.detach() / qw.scale.detach()).double().numpy()
        level = qw.int().detach().double().numpy()
        out[name] = np.clip(position, level - 0.5, level + 0.5).reshape(program.op(name).weight.shape)
    return out


def act_scale(act: nn.Module) -> float:
    return float(act.act_quant.scale().detach())


def batchnorm_affine(bn: nn.BatchNorm2d) -> Affine:
    scale = to_numpy(bn.weight) / np.sqrt(to_numpy(bn.running_var) + bn.eps)
    return Affine(scale=scale, shift=to_numpy(bn.bias) - to_numpy(bn.running_mean) * scale)


class _Lowering:
    def __init__(self, model: ResNetCifar, cfg: QuantConfig, mult_bits: int):
        self.model = model
        self.cfg = cfg
        self.mult_bits = mult_bits
        self.tensors: dict[str, TensorSpec] = {}
        self.ops: list[Conv2d | GlobalAvgPool] = []
        self.sources: dict[str, str] = {}
        self.weight_sources: dict[str, str] = {}

    def add_tensor(
        self,
        name: str,
        shape: tuple[int, int, int],
        bits: int,
        signed: bool,
        scale: float,
        zero_point: tuple[int, ...] = (0,),
    ) -> TensorSpec:
        spec = TensorSpec(name, shape, bits, signed, zero_point, scale)
        self.tensors[name] = spec
        return spec

    def requant(
        self, affine: Affine, out_scale: float, residual: tuple[TensorSpec, int, int] | None
    ) -> Requant:
        """Fixed-point form of y = affine(acc) [+ residual], measured in units of out_scale."""
        mult, shift = fixed_point(affine.scale / out_scale, self.mult_bits)
        offset = np.rint(affine.shift / out_scale * np.exp2(shift)).astype(np.int64)
        res = None
        if residual is not None:
            spec, stride, pad = residual
            res_mult, res_shift = aligned_residual(
                np.full_like(affine.scale, spec.scale / out_scale), shift, self.mult_bits
            )
            res = Residual(
                input=spec.name, mult=res_mult, shift=res_shift, stride=stride, channel_pad=(pad, pad)
            )
        return Requant(mult=mult, shift=shift, offset=offset, residual=res)

    def conv(
        self,
        name: str,
        conv: nn.Module,
        bn: nn.BatchNorm2d,
        act: nn.Module,
        x: TensorSpec,
        residual: tuple[TensorSpec, int, int] | None = None,
    ) -> TensorSpec:
        w, w_scale = weight_ints_and_scale(conv)
        bn_map = batchnorm_affine(bn)
        affine = Affine(scale=bn_map.scale * w_scale * x.scale, shift=bn_map.shift)
        out_scale = act_scale(act)
        stride, padding = conv.stride[0], conv.padding[0]
        hw = (x.shape[1] + 2 * padding - w.shape[2]) // stride + 1
        y = self.add_tensor(name, (w.shape[0], hw, hw), self.cfg.abits, False, out_scale)
        self.weight_sources[name] = name
        self.ops.append(
            Conv2d(
                name=name,
                input=x.name,
                output=y.name,
                weight=w,
                weight_bits=int(conv.weight_quant.bit_width()),
                bias=np.zeros(w.shape[0], dtype=np.int64),
                stride=stride,
                padding=padding,
                requant=self.requant(affine, out_scale, residual),
            )
        )
        return y

    def block(self, prefix: str, block: BasicBlock, x: TensorSpec) -> TensorSpec:
        h = self.conv(f"{prefix}.conv1", block.conv1, block.bn1, block.relu1, x)
        self.sources[h.name] = f"{prefix}.relu1"
        shortcut = (x, block.shortcut.stride, block.shortcut.pad_channels)
        y = self.conv(f"{prefix}.conv2", block.conv2, block.bn2, block.relu2, h, residual=shortcut)
        self.sources[y.name] = f"{prefix}.relu2"
        return y

    def head(self, x: TensorSpec) -> TensorSpec:
        pool_scale = act_scale(self.model.head_act)
        pooled = self.add_tensor("avgpool", (x.channels, 1, 1), self.cfg.abits, False, pool_scale)
        area = x.shape[1] * x.shape[2]
        mean = Affine(np.full(x.channels, x.scale / area), np.zeros(x.channels))
        self.ops.append(GlobalAvgPool("avgpool", x.name, pooled.name, self.requant(mean, pool_scale, None)))
        self.sources[pooled.name] = "head_act"
        linear = self.model.linear
        w, w_scale = weight_ints_and_scale(linear)
        acc_scale = w_scale * pooled.scale
        bias = np.rint(to_numpy(linear.bias) / acc_scale).astype(np.int64)
        logit_scale = float(acc_scale.max())
        logits = self.add_tensor("logits", (w.shape[0], 1, 1), LOGIT_BITS, True, logit_scale)
        self.weight_sources["fc"] = "linear"
        self.ops.append(
            Conv2d(
                name="fc",
                input=pooled.name,
                output=logits.name,
                weight=w[:, :, None, None],
                weight_bits=int(linear.weight_quant.bit_width()),
                bias=bias,
                stride=1,
                padding=0,
                requant=self.requant(Affine(acc_scale, np.zeros_like(acc_scale)), logit_scale, None),
            )
        )
        return logits

    def run(self) -> Program:
        m = self.model
        image = self.add_tensor("input", (3, 32, 32), 8, False, 1.0, input_zero_points())
        x = self.conv("conv1", m.conv1, m.bn1, m.relu, image)
        self.sources[x.name] = "relu"
        for s, stage in enumerate(m.stages(), start=1):
            for b, block in enumerate(stage):
                x = self.block(f"layer{s}.{b}", block, x)
        logits = self.head(x)
        return Program(
            tensors=self.tensors,
            ops=self.ops,
            input=image.name,
            output=logits.name,
            accumulator=Accumulator(),
            mult_bits=self.mult_bits,
            meta={
                "model": f"resnet{m.depth}",
                "depth": m.depth,
                "wbits": self.cfg.wbits,
                "abits": self.cfg.abits,
                "per_channel": self.cfg.per_channel,
                "first_wbits": self.cfg.stem_wbits,
                "last_wbits": self.cfg.head_wbits,
                **({"layer_wbits": list(self.cfg.layer_wbits)} if self.cfg.layer_wbits else {}),
                **({} if self.cfg.narrow_weights else {"weight_range": self.cfg.weight_range}),
                "input": "raw uint8 RGB; per-channel normalization folded into conv1",
                "sources": self.sources,
                "weight_sources": self.weight_sources,
                "hwq_version": __version__,
            },
        )


def lower(
    model: ResNetCifar,
    cfg: QuantConfig,
    accumulator: Accumulator | None = None,
    mult_bits: int = DEFAULT_MULT_BITS,
) -> Program:
    """The integer program computing what the calibrated Brevitas `model` computes."""
    with torch.no_grad():
        program = _Lowering(model, cfg, mult_bits).run()
    if accumulator is not None:
        program = program.with_accumulator(accumulator)
    program.validate()
    return program
