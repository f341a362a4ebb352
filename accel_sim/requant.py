"""The requantization stage of docs/datapath.md, exact in float64 where the bounds allow.

y = clamp(zp + ((acc * mult + offset + residual term) >> shift), rounded half up). Every per-
channel constant (offset, rounding, output zero point, the residual's zero point and, when
the caller has not added it yet, the accumulator's initial value times mult) is gathered
into one `add`, so the stage is a multiply-add per element followed by floor and clamp. In
float64 every value is an exact multiple of 2**-shift; below 2**53 nothing rounds. When a
bound does not prove that, the stage runs in int64 with an arithmetic shift.

Multipliers may differ per candidate of a population: `params` builds the stage's tensors
(and its float64-or-int64 choice) for one multiplier set (O,) or for P of them (P, O).
Tensors are handled as (R, N, C, H, W) views of the (R*N, C, H, W) batches, R = 1 or P.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .ir import Program, Requant, TensorSpec

FLOAT64_EXACT = 1 << 53


def carrier_dtype(spec: TensorSpec) -> torch.dtype:
    """float32 holds every activation exactly and feeds the GEMM without a cast."""
    return torch.float32 if spec.bits <= 24 else torch.int64


def fused_requant(
    acc: torch.Tensor,
    add: torch.Tensor,
    mult: torch.Tensor,
    res: torch.Tensor | None,
    res_mult: torch.Tensor | None,
    pad: tuple[int, int],
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """The float64 requant stage as one expression, for torch.compile to fuse into one pass.

    Same arithmetic as RequantStage.apply's in-place eager form (which is faster without
    a compiler); every intermediate is an exact multiple of 2**-shift below 2**53, so
    fusing, reordering or contracting to FMA cannot change a bit.
    """
    v = acc.to(torch.float64) * mult + add
    if res is not None:
        v = v + F.pad(res, (0, 0, 0, 0, *pad)).to(torch.float64) * res_mult
    return torch.floor(v).to(torch.float32).clamp(qmin, qmax)


_compiled_requant = None


def compiled_requant():
    global _compiled_requant
    if _compiled_requant is None:
        _compiled_requant = torch.compile(fused_requant, dynamic=True)
    return _compiled_requant


def by_candidate(t: torch.Tensor, images: int) -> torch.Tensor:
    """(R*N, ...) -> (R, N, ...)."""
    return t.unflatten(0, (-1, images))


def channel_tensor(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(O,) or (R, O) per-channel values as an (R, 1, O, 1, 1) tensor."""
    v = np.asarray(values)
    return torch.as_tensor(v.reshape(-1, v.shape[-1]), device=device).to(dtype)[:, None, :, None, None]


@dataclass(frozen=True)
class RequantParams:
    """The stage's tensors for one multiplier set (R = 1) or one per candidate (R = P)."""

    dtype: torch.dtype
    m: torch.Tensor
    add: torch.Tensor


class RequantStage:
    """One op's requantization: the constant parts, and `params` for any multipliers."""

    def __init__(
        self,
        rq: Requant,
        out: TensorSpec,
        program: Program,
        device: torch.device,
        force_int64: bool,
        fuse: bool,
    ):
        self.device = device
        self.force_int64 = force_int64
        self.qmin, self.qmax = out.qmin, out.qmax
        self.carrier = carrier_dtype(out)
        self.shift = rq.shift
        self.scale = np.exp2(-rq.shift.astype(np.float64))
        base = rq.offset + ((1 << rq.shift) >> 1) + (out.zero_points() << rq.shift)
        self.residual = rq.residual
        self.res_magnitude = 0
        if rq.residual is not None:
            res = program.tensors[rq.residual.input]
            lo, hi = rq.residual.channel_pad
            self.res_channels = slice(lo, out.channels - hi)
            res_mult = rq.residual.mult[self.res_channels] << rq.residual.shift[self.res_channels]
            base[self.res_channels] -= res.zero_points() * res_mult
            self.res_magnitude = max(abs(res.qmin), abs(res.qmax)) * int(np.abs(res_mult).max(initial=0))
            self.rm = {
                torch.float64: channel_tensor(
                    res_mult * self.scale[self.res_channels], torch.float64, device
                ),
                torch.int64: channel_tensor(res_mult, torch.int64, device),
            }
            padded = np.zeros(out.channels)
            padded[self.res_channels] = res_mult * self.scale[self.res_channels]
            self.rm_padded = channel_tensor(padded, torch.float64, device)
        self.base = base
        self.fuse = fuse and self.carrier == torch.float32
        self.s = channel_tensor(rq.shift, torch.int64, device)

    def params(self, mult: np.ndarray, init: np.ndarray | None, acc_magnitude: int) -> RequantParams:
        """Tensors for multipliers `mult` ((O,) or (P, O)), for accumulators bounded by
        `acc_magnitude` that still lack the initial value `init` (None: they include it)."""
        mult = np.asarray(mult, dtype=np.int64)
        init_term = np.zeros_like(mult) if init is None else np.asarray(init, dtype=np.int64) * mult
        add = self.base + init_term
        worst = (
            acc_magnitude * int(np.abs(mult).max())
            + self.res_magnitude
            + int(np.abs(self.base).max())
            + int(np.abs(init_term).max(initial=0))
        )
        if self.force_int64 or worst >= FLOAT64_EXACT:
            return RequantParams(
                torch.int64,
                channel_tensor(mult, torch.int64, self.device),
                channel_tensor(add, torch.int64, self.device),
            )
        return RequantParams(
            torch.float64,
            channel_tensor(mult * self.scale, torch.float64, self.device),
            channel_tensor(add * self.scale, torch.float64, self.device),
        )

    def subsampled(self, residual: torch.Tensor, images: int) -> torch.Tensor:
        stride = self.residual.stride
        return by_candidate(residual[:, :, ::stride, ::stride], images)

    def apply(
        self, acc: torch.Tensor, residual: torch.Tensor | None, params: RequantParams, images: int
    ) -> torch.Tensor:
        """Requantize accumulators (R*N, O, H, W) of N images; the result (R'*N, ...) has as
        many candidates as acc, params and residual have at most, in the carrier dtype. The
        clamp runs after that cast, which is safe because the cast is monotonic and the clamp
        range is exact in it."""
        v = by_candidate(acc.to(params.dtype), images)
        if self.fuse and params.dtype == torch.float64:
            return self.apply_fused(v, residual, params, images).flatten(0, 1)
        if v.shape[0] >= max(params.m.shape[0], params.add.shape[0]):
            torch.addcmul(params.add, v, params.m, out=v)
        else:
            v = torch.addcmul(params.add, v, params.m)
        if self.residual is not None:
            r = self.subsampled(residual, images)
            if r.shape[0] > v.shape[0]:
                v = v.expand(r.shape[0], *v.shape[1:]).clone()
            r = r if params.dtype == torch.float64 else r.to(torch.int64)
            v[:, :, self.res_channels].addcmul_(r, self.rm[params.dtype])
        if params.dtype == torch.float64:
            v.floor_()
        else:
            v.bitwise_right_shift_(self.s)
        return v.flatten(0, 1).to(self.carrier).clamp_(self.qmin, self.qmax)

    def apply_fused(
        self, v: torch.Tensor, residual: torch.Tensor | None, params: RequantParams, images: int
    ) -> torch.Tensor:
        if self.residual is None:
            return compiled_requant()(v, params.add, params.m, None, None, (0, 0), self.qmin, self.qmax)
        return compiled_requant()(
            v,
            params.add,
            params.m,
            self.subsampled(residual, images),
            self.rm_padded,
            self.residual.channel_pad,
            self.qmin,
            self.qmax,
        )
