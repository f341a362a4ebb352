"""Bit-exact functional model of the accelerator: runs an IR program on a batch of images.

This is the trainer's fitness oracle, so it is fast: a convolution runs as a float32 GEMM
when the layer's worst-case partial sum (from its actual integer weights, its bias and its
input range) stays below 2**24, where float32 represents every partial sum exactly in any
summation order; as float64 below 2**53; otherwise as an int64 GEMM. Accumulator overflow
is exact too: wrap-around is a modulo of the exact sum, and saturation, which depends on
the summation order, is replayed step by step only for the outputs whose positive or
negative products could leave the accumulator range.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .ir import Accumulator, Conv2d, GlobalAvgPool, Op, Program, Requant, TensorSpec

FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53
SATURATE_CHUNK = 1 << 15


def signed_bits(lo: int, hi: int) -> int:
    """Smallest two's-complement width holding every integer in [lo, hi]."""
    bits = 1
    while -(1 << (bits - 1)) > lo or (1 << (bits - 1)) - 1 < hi:
        bits += 1
    return bits


@dataclass(frozen=True)
class AccumulatorBound:
    """Range of every partial sum of a conv layer, over all inputs in the input's range.

    A partial sum is the initial value plus any subset of the products, so it lies between
    init + (sum of negative products) and init + (sum of positive products). This is the
    data-independent bound of FINN's minimize_accumulator_width and Brevitas' A2Q.
    """

    init: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    product_magnitude: int

    @property
    def bits(self) -> int:
        return signed_bits(int(self.lo.min()), int(self.hi.max()))

    @property
    def acc_magnitude(self) -> int:
        return max(-int(self.lo.min()), int(self.hi.max()))

    def fits(self, acc: Accumulator) -> bool:
        return int(self.lo.min()) >= acc.lo and int(self.hi.max()) <= acc.hi


def accumulator_bound(weight: np.ndarray, bias: np.ndarray, x: TensorSpec) -> AccumulatorBound:
    """Bound of a conv with `weight` (..., O, C, k, k): any leading dims are candidates."""
    w = weight.astype(np.int64)
    init = bias - np.einsum("...ocij,c->...o", w, x.zero_points())
    at_lo, at_hi = w * x.qmin, w * x.qmax
    pos = np.maximum(np.maximum(at_lo, at_hi), 0).sum(axis=(-3, -2, -1))
    neg = np.minimum(np.minimum(at_lo, at_hi), 0).sum(axis=(-3, -2, -1))
    magnitude = int(max(pos.max(initial=0), -neg.min(initial=0)))
    return AccumulatorBound(init=init, lo=init + neg, hi=init + pos, product_magnitude=magnitude)


def arithmetic_for(product_magnitude: int) -> torch.dtype:
    """The cheapest dtype whose GEMM is exact for sums of this magnitude."""
    if product_magnitude < FLOAT32_EXACT:
        return torch.float32
    if product_magnitude < FLOAT64_EXACT:
        return torch.float64
    return torch.int64


@dataclass
class LayerStats:
    """What the simulator reports for one layer: arithmetic used, worst case, overflows."""

    name: str
    arithmetic: str
    worst_case_bits: int
    acc_min: int
    acc_max: int
    overflows: int = 0
    outputs: int = 0


@dataclass
class SimResult:
    logits: torch.Tensor
    layers: dict[str, LayerStats]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)


def exact_conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Integer convolution in the dtype of `w`; the caller has checked it is exact."""
    if w.dtype != torch.int64:
        return F.conv2d(x.to(w.dtype), w, stride=stride, padding=padding)
    n, _, h, _ = x.shape
    o, _, k, _ = w.shape
    cols = F.unfold(x.to(torch.float64), k, padding=padding, stride=stride).to(torch.int64)
    out_hw = (h + 2 * padding - k) // stride + 1
    return (w.reshape(o, -1) @ cols).reshape(n, o, out_hw, out_hw)


def pad_with_zero_point(x: torch.Tensor, zp: torch.Tensor, padding: int) -> torch.Tensor:
    """Spatial padding with each channel's zero point (a real-valued zero)."""
    z = zp.view(1, -1, 1, 1).to(x.dtype)
    return F.pad(x - z, (padding,) * 4) + z


def wrap_to(acc: torch.Tensor, a: Accumulator) -> torch.Tensor:
    return torch.remainder(acc - a.lo, 1 << a.bits) + a.lo


def saturating_sums(
    products: torch.Tensor, init: torch.Tensor, a: Accumulator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay acc = clamp(acc + p_k) in order k = 0..K-1; also say which outputs clipped."""
    unclamped = init.clone()
    acc = init.clamp(a.lo, a.hi)
    clipped = acc != unclamped
    for k in range(products.shape[1]):
        unclamped = acc + products[:, k]
        acc = unclamped.clamp(a.lo, a.hi)
        clipped |= acc != unclamped
    return acc, clipped


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

    Same arithmetic as _RequantPlan.apply's in-place eager form (which is faster without
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


def _as_long(t: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(t, dtype=np.int64), device=device)


def _channel_view(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, device=device).to(dtype).view(1, -1, 1, 1)


class _RequantPlan:
    """One requantization stage: y = clamp((acc * mult + add + residual) >> shift).

    `add` gathers every per-channel constant (offset, rounding, output zero point, the
    residual's zero point and, on the fast path, the accumulator's initial value), so the
    stage is a multiply-add per input followed by floor and clamp. It runs in float64,
    where every value is an exact multiple of 2**-shift below 2**53, and falls back to
    int64 when the layer's bounds do not prove that.
    """

    def __init__(
        self,
        rq: Requant,
        out: TensorSpec,
        program: Program,
        device: torch.device,
        acc_magnitude: int,
        init: np.ndarray,
        force_int64: bool,
        fuse: bool,
    ):
        self.qmin, self.qmax = out.qmin, out.qmax
        self.carrier = carrier_dtype(out)
        base = rq.offset + ((1 << rq.shift) >> 1) + (out.zero_points() << rq.shift)
        self.residual = rq.residual
        res_magnitude = 0
        if rq.residual is not None:
            res = program.tensors[rq.residual.input]
            lo, hi = rq.residual.channel_pad
            self.res_channels = slice(lo, out.channels - hi)
            res_mult = rq.residual.mult[self.res_channels] << rq.residual.shift[self.res_channels]
            base[self.res_channels] -= res.zero_points() * res_mult
            res_magnitude = max(abs(res.qmin), abs(res.qmax)) * int(np.abs(res_mult).max(initial=0))
        self.base = base
        self.init_term = init * rq.mult
        worst = (
            acc_magnitude * int(np.abs(rq.mult).max())
            + res_magnitude
            + int(np.abs(base).max())
            + int(np.abs(self.init_term).max(initial=0))
        )
        self.dtype = torch.int64 if force_int64 or worst >= FLOAT64_EXACT else torch.float64
        headroom = FLOAT64_EXACT - 1 - res_magnitude - int(np.abs(base).max())
        self.exact_acc_limit = (
            headroom // max(int(np.abs(rq.mult).max()), 1) if self.dtype == torch.float64 else None
        )
        self.fused = fuse and self.dtype == torch.float64 and self.carrier == torch.float32
        if self.dtype == torch.float64:
            scale = np.exp2(-rq.shift.astype(np.float64))
            self.m = _channel_view(rq.mult * scale, torch.float64, device)
            self.add_with_init = _channel_view((base + self.init_term) * scale, torch.float64, device)
            self.add_plain = _channel_view(base * scale, torch.float64, device)
            if rq.residual is not None:
                self.rm = _channel_view(res_mult * scale[self.res_channels], torch.float64, device)
                padded = np.zeros(out.channels)
                padded[self.res_channels] = res_mult * scale[self.res_channels]
                self.rm_padded = _channel_view(padded, torch.float64, device)
        else:
            self.m = _channel_view(rq.mult, torch.int64, device)
            self.add_with_init = _channel_view(base + self.init_term, torch.int64, device)
            self.add_plain = _channel_view(base, torch.int64, device)
            self.s = _channel_view(rq.shift, torch.int64, device)
            if rq.residual is not None:
                self.rm = _channel_view(res_mult, torch.int64, device)

    def subsampled(self, residual: torch.Tensor) -> torch.Tensor:
        stride = self.residual.stride
        return residual[:, :, ::stride, ::stride]

    def apply(self, acc: torch.Tensor, residual: torch.Tensor | None, with_init: bool) -> torch.Tensor:
        """Requantize `acc`; `with_init` says the accumulator's initial value is not in it yet.

        The result comes back in the output's carrier dtype. The clamp runs after that cast,
        which is safe because the cast is monotonic and the clamp range is exact in it.
        """
        if self.fused:
            return self.apply_fused(acc, residual, with_init)
        v = acc.to(self.dtype)
        torch.addcmul(self.add_with_init if with_init else self.add_plain, v, self.m, out=v)
        if self.residual is not None:
            r = self.subsampled(residual)
            v[:, self.res_channels].addcmul_(r if self.dtype == torch.float64 else r.to(torch.int64), self.rm)
        if self.dtype == torch.float64:
            v.floor_()
        else:
            v.bitwise_right_shift_(self.s)
        return v.to(self.carrier).clamp_(self.qmin, self.qmax)

    def apply_fused(self, acc: torch.Tensor, residual: torch.Tensor | None, with_init: bool) -> torch.Tensor:
        add = self.add_with_init if with_init else self.add_plain
        if self.residual is None:
            return compiled_requant()(acc, add, self.m, None, None, (0, 0), self.qmin, self.qmax)
        return compiled_requant()(
            acc,
            add,
            self.m,
            self.subsampled(residual),
            self.rm_padded,
            self.residual.channel_pad,
            self.qmin,
            self.qmax,
        )


def residual_of(plan: _ConvPlan | _PoolPlan, env: dict[str, torch.Tensor]) -> torch.Tensor | None:
    res = plan.requant.residual
    return None if res is None else env[res.input]


class _ConvPlan:
    def __init__(self, op: Conv2d, program: Program, device: torch.device, force_int64: bool, fuse: bool):
        x = program.tensors[op.input]
        self.op = op
        self.acc = program.accumulator
        self.bound = accumulator_bound(op.weight, op.bias, x)
        self.no_overflow = self.bound.fits(self.acc)
        self.input_signed = x.qmin < 0
        self.x_spec = x
        self.dtype = torch.int64 if force_int64 else arithmetic_for(self.bound.product_magnitude)
        self.weight = self.to_device(op.weight, self.dtype, device)
        self.weight_long = torch.as_tensor(op.weight, dtype=torch.int64, device=device)
        self.init = _as_long(self.bound.init, device).view(1, -1, 1, 1)
        zp = x.zero_points()
        self.zero_point = _as_long(zp, device) if np.any(zp != 0) else None
        acc_magnitude = self.bound.acc_magnitude
        if not self.no_overflow:
            acc_magnitude = 1 << (self.acc.bits - 1)
        self.requant = _RequantPlan(
            op.requant,
            program.tensors[op.output],
            program,
            device,
            acc_magnitude,
            self.bound.init,
            force_int64,
            fuse,
        )

    @staticmethod
    def to_device(weight: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        w = torch.as_tensor(weight, device=device).to(dtype)
        return w if dtype == torch.int64 else w.contiguous(memory_format=torch.channels_last)

    def stats(self) -> LayerStats:
        return LayerStats(
            name=self.op.name,
            arithmetic=str(self.dtype).removeprefix("torch."),
            worst_case_bits=self.bound.bits,
            acc_min=int(self.bound.lo.min()),
            acc_max=int(self.bound.hi.max()),
        )

    def padded_input(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.zero_point is None:
            return x, self.op.padding
        return pad_with_zero_point(x, self.zero_point, self.op.padding), 0

    def conv(self, x: torch.Tensor, w: torch.Tensor, pad: int) -> torch.Tensor:
        return exact_conv(x, w, self.op.stride, pad)

    def candidate_accumulators(
        self, x: torch.Tensor, weights: np.ndarray, shared_input: bool
    ) -> torch.Tensor | None:
        """Accumulators (P*N, O, H, W) of P candidate weight sets (P, O, C, k, k) at once.

        The input is either one batch (N, ...) shared by all candidates or one batch per
        candidate (P*N, ...), which becomes a grouped convolution. None when the fast path
        cannot prove exactness for every candidate (the caller replays them one by one).
        """
        p, o = weights.shape[:2]
        bound = accumulator_bound(weights, self.op.bias, self.x_spec)
        limit = self.requant.exact_acc_limit
        if not bound.fits(self.acc) or (limit is not None and bound.acc_magnitude > limit):
            return None
        dtype = arithmetic_for(max(bound.product_magnitude, bound.acc_magnitude))
        if dtype == torch.int64 or self.dtype == torch.int64:
            return None
        w = torch.as_tensor(weights, device=self.weight.device).to(dtype).reshape(p * o, *weights.shape[2:])
        xp, pad = self.padded_input(x)
        if shared_input:
            y = F.conv2d(xp.to(dtype), w, stride=self.op.stride, padding=pad)
        else:
            n = xp.shape[0] // p
            grouped = xp.reshape(p, n, *xp.shape[1:]).transpose(0, 1).reshape(n, -1, *xp.shape[2:])
            y = F.conv2d(grouped.to(dtype), w, stride=self.op.stride, padding=pad, groups=p)
        n = y.shape[0]
        y = y.reshape(n, p, o, *y.shape[2:]).transpose(0, 1)
        y = y + torch.as_tensor(bound.init, device=y.device).to(dtype).view(p, 1, o, 1, 1)
        return y.reshape(p * n, o, *y.shape[3:]).contiguous(memory_format=torch.channels_last)

    def run(self, env: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        xp, pad = self.padded_input(env[self.op.input])
        if self.no_overflow:
            acc = self.conv(xp, self.weight, pad)
            return self.requant.apply(acc, residual_of(self, env), with_init=True), 0, acc.numel()
        if self.acc.overflow == "wrap":
            acc, overflows = self.wrapped(xp, pad)
        else:
            acc, overflows = self.saturated(xp, pad)
        return self.requant.apply(acc, residual_of(self, env), with_init=False), overflows, acc.numel()

    def wrapped(self, xp: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
        exact = self.conv(xp, self.weight, pad).to(torch.int64) + self.init
        outside = (exact < self.acc.lo) | (exact > self.acc.hi)
        return wrap_to(exact, self.acc), int(outside.sum())

    def signed_parts(self, xp: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of the positive and of the negative products of every output."""
        w_pos, w_neg = self.weight.clamp(min=0), self.weight.clamp(max=0)
        x_pos = xp.clamp(min=0)
        pos = self.conv(x_pos, w_pos, pad).to(torch.int64)
        neg = self.conv(x_pos, w_neg, pad).to(torch.int64)
        if self.input_signed:
            x_neg = xp.clamp(max=0)
            pos += self.conv(x_neg, w_neg, pad).to(torch.int64)
            neg += self.conv(x_neg, w_pos, pad).to(torch.int64)
        return pos, neg

    def saturated(self, xp: torch.Tensor, pad: int) -> tuple[torch.Tensor, int]:
        """Exact sums for outputs that cannot saturate; an in-order replay for the rest."""
        pos, neg = self.signed_parts(xp, pad)
        acc = self.init + pos + neg
        at_risk = (self.init + pos > self.acc.hi) | (self.init + neg < self.acc.lo)
        at_risk |= (self.init < self.acc.lo) | (self.init > self.acc.hi)
        idx = at_risk.nonzero()
        if len(idx) == 0:
            return acc, 0
        cols = F.unfold(xp.to(torch.float64), self.op.kernel, padding=pad, stride=self.op.stride)
        cols = cols.to(torch.int64)
        w_rows = self.weight_long.reshape(self.op.out_channels, -1)
        width = acc.shape[3]
        clipped_total = 0
        for chunk in idx.split(SATURATE_CHUNK):
            n, o, i, j = chunk.unbind(1)
            products = cols[n, :, i * width + j] * w_rows[o]
            values, clipped = saturating_sums(products, self.init.view(-1)[o], self.acc)
            acc[n, o, i, j] = values
            clipped_total += int(clipped.sum())
        return acc, clipped_total


class _PoolPlan:
    def __init__(
        self, op: GlobalAvgPool, program: Program, device: torch.device, force_int64: bool, fuse: bool
    ):
        self.op = op
        x = program.tensors[op.input]
        area = x.shape[1] * x.shape[2]
        magnitude = area * max(abs(x.qmin), abs(x.qmax))
        self.requant = _RequantPlan(
            op.requant,
            program.tensors[op.output],
            program,
            device,
            magnitude,
            -area * x.zero_points(),
            force_int64,
            fuse,
        )

    def stats(self) -> LayerStats:
        return LayerStats(self.op.name, str(self.requant.dtype).removeprefix("torch."), 0, 0, 0)

    def run(self, env: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        total = env[self.op.input].to(self.requant.dtype).sum(dim=(2, 3), keepdim=True)
        return self.requant.apply(total, None, with_init=True), 0, total.numel()


def _plan(
    op: Op, program: Program, device: torch.device, force_int64: bool, fuse: bool
) -> _ConvPlan | _PoolPlan:
    if isinstance(op, Conv2d):
        return _ConvPlan(op, program, device, force_int64, fuse)
    return _PoolPlan(op, program, device, force_int64, fuse)


class FunctionalSim:
    """Executes a Program bit-exactly on batches of uint8 images (N, C, H, W)."""

    def __init__(
        self,
        program: Program,
        device: str | torch.device = "cpu",
        force_int64: bool = False,
        compile: bool = False,
    ):
        """`force_int64` runs every layer in int64 (slow): a cross-check of the fast paths.
        `compile` fuses each requant stage with torch.compile: faster on large batches,
        after a one-time compilation of several seconds per process."""
        program.validate()
        self.program = program
        self.device = torch.device(device)
        self.plans = [_plan(op, program, self.device, force_int64, compile) for op in program.ops]

    def layer_stats(self) -> dict[str, LayerStats]:
        return {plan.op.name: plan.stats() for plan in self.plans}

    def _exactness_context(self):
        """On CUDA, TF32 and cuDNN's Winograd/FFT algorithms would round: switch them off."""
        if self.device.type != "cuda":
            return nullcontext()
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.backends.cudnn.flags(enabled=False)

    def input_carrier(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Check a batch of images against the program input and put it in carrier form."""
        x = torch.as_tensor(images, device=self.device)
        spec = self.program.tensors[self.program.input]
        if tuple(x.shape[1:]) != spec.shape:
            raise ValueError(f"input shape {tuple(x.shape[1:])} does not match program input {spec.shape}")
        if x.dtype.is_floating_point or int(x.min()) < spec.qmin or int(x.max()) > spec.qmax:
            raise ValueError(f"input must hold integers in [{spec.qmin}, {spec.qmax}]")
        return self.to_carrier(self.program.input, x)

    def to_carrier(self, tensor: str, values: torch.Tensor) -> torch.Tensor:
        dtype = carrier_dtype(self.program.tensors[tensor])
        return values.to(self.device, dtype).contiguous(memory_format=torch.channels_last)

    def execute(
        self, env: dict[str, torch.Tensor], start: int = 0, stop: int | None = None
    ) -> dict[str, LayerStats]:
        """Run ops[start:stop] over `env` (tensor name -> carrier tensor), adding their outputs.

        Starting past op 0 lets a caller reuse activations it already has (the trainer's
        incremental fitness, per-layer comparisons).
        """
        stats = {}
        with torch.no_grad(), self._exactness_context():
            for plan in self.plans[start:stop]:
                out, overflows, outputs = plan.run(env)
                env[plan.op.output] = out
                layer = plan.stats()
                layer.overflows, layer.outputs = overflows, outputs
                stats[plan.op.name] = layer
        return stats

    def run_population(
        self, env: dict[str, torch.Tensor], start: int, candidates: dict[str, np.ndarray]
    ) -> torch.Tensor | None:
        """Logits (P, N, classes) of P candidates that differ from the program only in the
        weights of the conv ops named in `candidates` (each (P, O, C, k, k)).

        `env` holds the program's own activations of N images for every tensor an op from
        `start` on reads before it is recomputed: the cache that makes fitness incremental.
        Returns None when exactness cannot be proved for the batched form (a candidate
        might overflow the accumulator); run such candidates with `with_weights` instead.
        """
        population = len(next(iter(candidates.values())))
        tensors = dict(env)
        per_candidate: set[str] = set()

        def matched(name: str) -> torch.Tensor:
            t = tensors[name]
            return t if name in per_candidate else t.repeat(population, 1, 1, 1)

        with torch.no_grad(), self._exactness_context():
            for plan in self.plans[start:]:
                op = plan.op
                res = plan.requant.residual
                inputs = [op.input] + ([res.input] if res is not None else [])
                if op.name in candidates:
                    acc = plan.candidate_accumulators(
                        tensors[op.input], candidates[op.name], op.input not in per_candidate
                    )
                    if acc is None:
                        return None
                    out = plan.requant.apply(acc, matched(res.input) if res else None, with_init=False)
                elif any(name in per_candidate for name in inputs):
                    out = plan.run({name: matched(name) for name in inputs})[0]
                else:
                    out = plan.run(tensors)[0]
                    tensors[op.output] = out
                    continue
                tensors[op.output] = out
                per_candidate.add(op.output)
        logits = tensors[self.program.output].to(torch.int64)
        return logits.reshape(population, -1, logits.shape[1])

    def run(self, images: torch.Tensor | np.ndarray, record: bool = False) -> SimResult:
        env = {self.program.input: self.input_carrier(images)}
        stats = self.execute(env)
        logits = env[self.program.output].to(torch.int64).flatten(1)
        activations = {k: v.to(torch.int64) for k, v in env.items()} if record else {}
        return SimResult(logits=logits, layers=stats, activations=activations)
