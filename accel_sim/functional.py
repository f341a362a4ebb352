"""Bit-exact functional model of the accelerator: runs an IR program on a batch of images.

This is the trainer's fitness oracle, so it is fast: a convolution runs as a float32 GEMM
when the layer's worst-case partial sum of products (from its actual integer weights and
its input range) stays below 2**24, where float32 represents every partial sum exactly in
any summation order; as float64 below 2**53; otherwise as an int64 GEMM. Accumulator
overflow is exact too: wrap-around is a modulo of the exact sum, and saturation, which
depends on the summation order, is replayed (vectorized, `saturate.py`) only for the
outputs whose positive or negative products could leave the accumulator range.

The same code evaluates a population of candidate programs that differ from this one in
some weights, biases or requantization multipliers (`run_population`): candidates become a
leading batch dimension, and every bound (GEMM dtype, overflow, requantization) is taken
over all of them. On devices other than the CPU, convolutions run as explicit GEMMs under
`device.exact_arithmetic()`, and a self-check against the int64 path guards each new
combination of arithmetic and device (`self_check.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import self_check as _self_check
from .conv_backends import BACKENDS, int64_conv
from .device import exact_arithmetic, resolve_device
from .errors import DeviceError
from .ir import (
    BIAS,
    MULT,
    WEIGHT,
    Accumulator,
    Conv2d,
    GlobalAvgPool,
    IRError,
    Op,
    ParamKey,
    Program,
    TensorSpec,
    param_of,
)
from .requant import FLOAT64_EXACT, RequantParams, RequantStage, by_candidate, carrier_dtype, channel_tensor
from .saturate import replay_at_risk

FLOAT32_EXACT = 1 << 24


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
    """Bound of a conv with `weight` (..., O, C, k, k) and `bias` (..., O): any leading dims
    are candidates (broadcast against each other)."""
    w = weight.astype(np.int64)
    init = bias - np.einsum("...ocij,c->...o", w, x.zero_points())
    at_lo, at_hi = w * x.qmin, w * x.qmax
    pos = np.maximum(np.maximum(at_lo, at_hi), 0).sum(axis=(-3, -2, -1))
    neg = np.minimum(np.minimum(at_lo, at_hi), 0).sum(axis=(-3, -2, -1))
    magnitude = int(max(pos.max(initial=0), -neg.min(initial=0)))
    return AccumulatorBound(init=init, lo=init + neg, hi=init + pos, product_magnitude=magnitude)


def arithmetic_for(magnitude: int) -> torch.dtype:
    """The cheapest dtype in which every integer up to this magnitude, and every sum or
    difference that stays within it, is exact."""
    if magnitude < FLOAT32_EXACT:
        return torch.float32
    if magnitude < FLOAT64_EXACT:
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


def pad_with_zero_point(x: torch.Tensor, zp: torch.Tensor, padding: int) -> torch.Tensor:
    """Spatial padding with each channel's zero point (a real-valued zero)."""
    z = zp.view(1, -1, 1, 1).to(x.dtype)
    return F.pad(x - z, (padding,) * 4) + z


def wrap_to(acc: torch.Tensor, a: Accumulator) -> torch.Tensor:
    """Two's-complement wrap-around; exact in a float dtype holding |acc - lo| exactly (the
    modulus is a power of two)."""
    return torch.remainder(acc - a.lo, 1 << a.bits) + a.lo


def _long(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)


def residual_of(plan: _ConvPlan | _PoolPlan, env: dict[str, torch.Tensor]) -> torch.Tensor | None:
    res = plan.requant.residual
    return None if res is None else env[res.input]


Accumulators = dict[str, torch.Tensor] | None


def recorded(accumulators: Accumulators, name: str, acc: torch.Tensor) -> torch.Tensor:
    """Keep a copy of an op's accumulators when asked (the requant stage may reuse them)."""
    if accumulators is not None:
        accumulators[name] = acc.to(torch.int64, copy=True)
    return acc


@dataclass
class _Accumulated:
    """Accumulators (R*N, O, H, W); `with_init`: the initial value is in them, which happens
    exactly when overflow had to be handled (it is folded into the requant stage otherwise);
    `overflows`: per candidate (R,), how many outputs left the accumulator's range, when
    counted (None: not counted, or none could)."""

    acc: torch.Tensor
    with_init: bool
    overflows: torch.Tensor | None = None

    def overflow_total(self) -> int:
        return 0 if self.overflows is None else int(self.overflows.sum())


class _ConvPlan:
    def __init__(
        self, op: Conv2d, program: Program, device: torch.device, backend, force_int64: bool, fuse: bool
    ):
        x = program.tensors[op.input]
        self.op, self.x_spec, self.acc = op, x, program.accumulator
        self.device, self.backend, self.force_int64 = device, backend, force_int64
        self.input_signed = x.qmin < 0
        self.bound = accumulator_bound(op.weight, op.bias, x)
        self.dtype = self.conv_dtype(self.bound)
        self.weight = self.on_device(op.weight, self.dtype)
        zp = x.zero_points()
        self.zero_point = _long(zp, device) if np.any(zp != 0) else None
        self.requant = RequantStage(
            op.requant, program.tensors[op.output], program, device, force_int64, fuse
        )
        with_init = not self.bound.fits(self.acc)
        self.own = {with_init: self.requant_params(op.requant.mult, self.bound, with_init)}

    def conv_dtype(self, bound: AccumulatorBound) -> torch.dtype:
        return torch.int64 if self.force_int64 else arithmetic_for(bound.product_magnitude)

    def on_device(self, weight: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        w = torch.as_tensor(weight, device=self.device).to(dtype)
        if w.dim() == 4 and dtype != torch.int64 and self.backend.name == "native":
            return w.contiguous(memory_format=torch.channels_last)
        return w

    def requant_params(self, mult: np.ndarray, bound: AccumulatorBound, with_init: bool) -> RequantParams:
        """Overflow handled (`with_init`): the accumulators are in the accumulator's range and
        hold their initial value; otherwise they are bounded by the products alone."""
        if with_init:
            return self.requant.params(mult, None, 1 << (self.acc.bits - 1))
        return self.requant.params(mult, bound.init, bound.product_magnitude)

    def stats(self) -> LayerStats:
        return LayerStats(
            name=self.op.name,
            arithmetic=str(self.dtype).removeprefix("torch."),
            worst_case_bits=self.bound.bits,
            acc_min=int(self.bound.lo.min()),
            acc_max=int(self.bound.hi.max()),
        )

    def signature(self) -> tuple:
        """What decides which arithmetic this layer runs (the self-check's cache key)."""
        mode = "exact" if self.bound.fits(self.acc) else self.acc.overflow
        requant = tuple(str(p.dtype) for p in self.own.values())
        flags = (self.input_signed, self.zero_point is not None, self.requant.fuse)
        return ("conv", str(self.dtype), mode, requant, *flags)

    def padded_input(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.zero_point is None:
            return x, self.op.padding
        return pad_with_zero_point(x, self.zero_point, self.op.padding), 0

    def conv(self, xp: torch.Tensor, w: torch.Tensor, pad: int, images: int) -> torch.Tensor:
        """Exact products' sums (R*N, O, H, W) for weights (O, ...) or per candidate (P, O, ...)."""
        stride = self.op.stride
        if w.dtype == torch.int64:
            return int64_conv(xp, w, stride, pad)
        if w.dim() == 4:
            return self.backend.conv(xp, w, stride, pad)
        return self.backend.population_conv(xp, w, stride, pad, shared_input=xp.shape[0] == images)

    def accumulate(
        self, x: torch.Tensor, w: torch.Tensor, bound: AccumulatorBound, images: int, count: bool
    ) -> _Accumulated:
        xp, pad = self.padded_input(x)
        if bound.fits(self.acc):
            return _Accumulated(self.conv(xp, w, pad, images), False)
        a = self.acc
        wide = arithmetic_for(bound.product_magnitude + int(np.abs(bound.init).max()) + (1 << a.bits))
        wide = torch.int64 if self.force_int64 else wide
        init = channel_tensor(bound.init, wide, self.device)
        if a.overflow == "saturate":
            return self.saturated(xp, w, pad, bound, init, images)
        exact = by_candidate(self.conv(xp, w, pad, images).to(wide), images) + init
        overflows = ((exact < a.lo) | (exact > a.hi)).flatten(1).sum(1) if count else None
        return _Accumulated(wrap_to(exact, a).flatten(0, 1), True, overflows)

    def signed_sums(
        self, xp: torch.Tensor, w: torch.Tensor, pad: int, images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of all products and of the positive ones, for every output."""
        w_pos = w.clamp(min=0)
        if not self.input_signed:
            both = self.conv(xp, torch.cat([w, w_pos], dim=-4), pad, images)
            o = w.shape[-4]
            return both[:, :o], both[:, o:]
        total = self.conv(xp, w, pad, images)
        pos = self.conv(xp.clamp(min=0), w_pos, pad, images) + self.conv(
            xp.clamp(max=0), w.clamp(max=0), pad, images
        )
        return total, pos

    def saturated(
        self,
        xp: torch.Tensor,
        w: torch.Tensor,
        pad: int,
        bound: AccumulatorBound,
        init: torch.Tensor,
        images: int,
    ) -> _Accumulated:
        """Exact sums for outputs whose positive (negative) products alone keep the running
        sum in range, which therefore cannot clip; the vectorized replay for the rest."""
        a = self.acc
        total, pos = (by_candidate(t.to(init.dtype), images) for t in self.signed_sums(xp, w, pad, images))
        acc = total + init
        at_risk = (pos + init > a.hi) | (acc - pos < a.lo) | (init < a.lo) | (init > a.hi)
        acc = acc.flatten(0, 1)
        if not bool(at_risk.any()):
            return _Accumulated(acc, True)
        reach = 2 * bound.product_magnitude + int(np.abs(bound.init).max()) + (1 << a.bits)
        dtype = torch.int64 if self.force_int64 else arithmetic_for(2 * reach)
        k = self.op.kernel
        rows = w.reshape(-1, w.shape[-4], w.shape[-3] * k * k).to(dtype)
        starts = torch.as_tensor(np.asarray(bound.init).reshape(-1, rows.shape[1]), device=self.device).to(
            dtype
        )
        padded = F.pad(xp, (pad,) * 4) if pad else xp
        clipped = replay_at_risk(
            acc, at_risk.flatten(0, 1), padded, rows, starts, a, k, self.op.stride, images
        )
        return _Accumulated(acc, True, clipped)

    def run(
        self, env: dict[str, torch.Tensor], accumulators: Accumulators = None
    ) -> tuple[torch.Tensor, int, int]:
        x = env[self.op.input]
        result = self.accumulate(x, self.weight, self.bound, x.shape[0], count=True)
        acc = recorded(accumulators, self.op.name, result.acc)
        out = self.requant.apply(acc, residual_of(self, env), self.own[result.with_init], x.shape[0])
        return out, result.overflow_total(), acc.numel()

    def run_candidates(
        self,
        env: dict[str, torch.Tensor],
        params: dict[str, np.ndarray],
        images: int,
        accumulators: Accumulators,
        overflows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Outputs (P*N, ...) of P candidates' `params` (field -> (P, ...)) on inputs that
        are shared (N, ...) or per candidate (P*N, ...); None if a GEMM needs int64. Each
        candidate's count of overflowed outputs is added to `overflows` (P,) when given."""
        weight, bias, mult = params.get(WEIGHT), params.get(BIAS), params.get(MULT)
        bound, w = self.bound, self.weight
        if weight is not None or bias is not None:
            bound = accumulator_bound(
                self.op.weight if weight is None else weight,
                self.op.bias if bias is None else bias,
                self.x_spec,
            )
        if weight is not None:
            w = self.on_device(weight, self.conv_dtype(bound))
        if w.dtype == torch.int64:
            return None
        result = self.accumulate(env[self.op.input], w, bound, images, count=overflows is not None)
        if overflows is not None and result.overflows is not None:
            overflows += result.overflows.to(overflows.device)
        if params:
            rq = self.requant_params(self.op.requant.mult if mult is None else mult, bound, result.with_init)
        else:
            rq = self.own[result.with_init]
        acc = recorded(accumulators, self.op.name, result.acc)
        return self.requant.apply(acc, residual_of(self, env), rq, images)


class _PoolPlan:
    def __init__(
        self, op: GlobalAvgPool, program: Program, device: torch.device, force_int64: bool, fuse: bool
    ):
        self.op = op
        x = program.tensors[op.input]
        area = x.shape[1] * x.shape[2]
        self.magnitude = area * max(abs(x.qmin), abs(x.qmax))
        self.init = -area * x.zero_points()
        self.requant = RequantStage(
            op.requant, program.tensors[op.output], program, device, force_int64, fuse
        )
        self.own = self.requant.params(op.requant.mult, self.init, self.magnitude)

    def stats(self) -> LayerStats:
        return LayerStats(self.op.name, str(self.own.dtype).removeprefix("torch."), 0, 0, 0)

    def signature(self) -> tuple:
        return ("pool", str(self.own.dtype), self.requant.fuse)

    def pooled(
        self, x: torch.Tensor, params: RequantParams, images: int, accumulators: Accumulators
    ) -> torch.Tensor:
        total = recorded(accumulators, self.op.name, x.to(params.dtype).sum(dim=(2, 3), keepdim=True))
        return self.requant.apply(total, None, params, images)

    def run(
        self, env: dict[str, torch.Tensor], accumulators: Accumulators = None
    ) -> tuple[torch.Tensor, int, int]:
        x = env[self.op.input]
        out = self.pooled(x, self.own, x.shape[0], accumulators)
        return out, 0, out.numel()

    def run_candidates(
        self,
        env: dict[str, torch.Tensor],
        params: dict[str, np.ndarray],
        images: int,
        accumulators: Accumulators,
        overflows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As a conv's; the pool's sum cannot overflow (its dtype holds the worst case)."""
        mult = params.get(MULT)
        rq = self.own if mult is None else self.requant.params(mult, self.init, self.magnitude)
        return self.pooled(env[self.op.input], rq, images, accumulators)


def choose_backend(name: str | None, device: torch.device):
    """`native` on the CPU and `gemm` elsewhere by default; `native` only on the CPU."""
    name = name or ("native" if device.type == "cpu" else "gemm")
    if name not in BACKENDS:
        raise DeviceError(f"unknown conv backend {name!r} (one of {sorted(BACKENDS)})")
    if name == "native" and device.type != "cpu":
        raise DeviceError(f"the native conv backend is exact on the CPU only, not on {device}; use 'gemm'")
    return BACKENDS[name]


class FunctionalSim:
    """Executes a Program bit-exactly on batches of uint8 images (N, C, H, W)."""

    def __init__(
        self,
        program: Program,
        device: str | torch.device = "cpu",
        force_int64: bool = False,
        compile: bool = False,
        conv_backend: str | None = None,
        self_check: bool | None = None,
    ):
        """`force_int64` runs every layer in int64 (slow): a cross-check of the fast paths.
        `compile` fuses each requant stage with torch.compile: faster on large batches,
        after a one-time compilation of several seconds per process. `conv_backend`:
        "native" (torch's convolution; the CPU default) or "gemm" (unfold + matmul; the
        only one allowed elsewhere). `self_check`: compare a probe batch with the int64
        path before use; None does it on devices other than the CPU, once per arithmetic
        and device; True always (and ignores that cache)."""
        program.validate()
        self.program = program
        self.device = resolve_device(device)
        self.backend = choose_backend(conv_backend, self.device)
        self.force_int64 = force_int64
        self.plans = [self._plan(op, compile) for op in program.ops]
        self.op_index = {op.name: i for i, op in enumerate(program.ops)}
        if self_check or (self_check is None and self.device.type != "cpu"):
            _self_check.check_exactness(self, cached=self_check is None)

    def _plan(self, op: Op, fuse: bool) -> _ConvPlan | _PoolPlan:
        if isinstance(op, Conv2d):
            return _ConvPlan(op, self.program, self.device, self.backend, self.force_int64, fuse)
        return _PoolPlan(op, self.program, self.device, self.force_int64, fuse)

    def layer_stats(self) -> dict[str, LayerStats]:
        return {plan.op.name: plan.stats() for plan in self.plans}

    def arithmetic(self) -> tuple:
        """Every choice of arithmetic this simulator makes for its own program."""
        return (str(self.device), self.backend.name, tuple(plan.signature() for plan in self.plans))

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
        self,
        env: dict[str, torch.Tensor],
        start: int = 0,
        stop: int | None = None,
        accumulators: Accumulators = None,
    ) -> dict[str, LayerStats]:
        """Run ops[start:stop] over `env` (tensor name -> carrier tensor), adding their outputs
        (and, into `accumulators` when given, each op's int64 accumulators before requant).

        Starting past op 0 lets a caller reuse activations it already has (the trainer's
        incremental fitness, per-layer comparisons).
        """
        stats = {}
        with torch.no_grad(), exact_arithmetic():
            for plan in self.plans[start:stop]:
                out, overflows, outputs = plan.run(env, accumulators)
                env[plan.op.output] = out
                layer = plan.stats()
                layer.overflows, layer.outputs = overflows, outputs
                stats[plan.op.name] = layer
        return stats

    def grouped_candidates(
        self, start: int, candidates: dict[ParamKey, np.ndarray]
    ) -> tuple[int, dict[str, dict[str, np.ndarray]]]:
        """The population size and each op's candidate fields, checked against the program."""
        if not candidates:
            raise IRError("a population needs at least one candidate parameter")
        population = len(next(iter(candidates.values())))
        by_op: dict[str, dict[str, np.ndarray]] = {}
        for (name, fld), values in candidates.items():
            if name not in self.op_index:
                raise IRError(f"candidates name no op {name!r}")
            if self.op_index[name] < start:
                raise IRError(f"candidates for {name!r}, which runs before the start op {start}")
            want = (population, *param_of(self.program.ops[self.op_index[name]], fld).shape)
            v = np.asarray(values, dtype=np.int64)
            if v.shape != want:
                raise IRError(f"candidates for {name}.{fld} must have shape {want}, not {v.shape}")
            by_op.setdefault(name, {})[fld] = v
        return population, by_op

    def population_activations(
        self,
        env: dict[str, torch.Tensor],
        start: int,
        candidates: dict[ParamKey, np.ndarray],
        accumulators: Accumulators = None,
        overflows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """Every tensor of P candidates (see `run_population`): (P*N, ...) for the tensors
        the candidates change, (N, ...) for the others; None if a GEMM needs int64. Each
        op's accumulators go into `accumulators` when given, its overflow counts into
        `overflows`."""
        population, by_op = self.grouped_candidates(start, candidates)
        images = next(iter(env.values())).shape[0]
        tensors = dict(env)
        per_candidate: set[str] = set()
        with torch.no_grad(), exact_arithmetic():
            for plan in self.plans[start:]:
                op, res = plan.op, plan.requant.residual
                params = by_op.get(op.name, {})
                reads = [op.input] + ([res.input] if res is not None else [])
                if not params and not per_candidate.intersection(reads):
                    tensors[op.output], shared_overflows, _ = plan.run(tensors, accumulators)
                    if overflows is not None:
                        overflows += shared_overflows
                    continue
                out = plan.run_candidates(tensors, params, images, accumulators, overflows)
                if out is None:
                    return None
                tensors[op.output] = out
                per_candidate.add(op.output)
        return tensors

    def run_population(
        self,
        env: dict[str, torch.Tensor],
        start: int,
        candidates: dict[ParamKey, np.ndarray],
        overflows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Logits (P, N, classes) of P candidates that differ from the program in the
        parameters `candidates` names: (op, field) -> (P, ...) values of a conv's `weight`
        or `bias`, or of an op's requant `mult` (any parameter absent is the program's).

        `env` holds the program's own activations of N images for every tensor an op from
        `start` on reads before it is recomputed: the cache that makes fitness incremental.
        Candidate values are not checked against the IR's limits (`Program.with_params`
        does that); every bound is computed from them, so the result is exact whatever
        they are. Returns None only when a convolution's products need int64 (beyond
        2**53), which the batched form does not do: run such candidates one by one.

        `overflows`, a (P,) int64 tensor when given, gains each candidate's count of
        accumulator outputs that left the range (wrapped, or clipped at some step when
        saturating) in the ops from `start` on, as `LayerStats.overflows` counts them.
        """
        tensors = self.population_activations(env, start, candidates, overflows=overflows)
        if tensors is None:
            return None
        population = len(next(iter(candidates.values())))
        logits = tensors[self.program.output].to(torch.int64)
        return logits.reshape(population, -1, logits.shape[1])

    def run(self, images: torch.Tensor | np.ndarray, record: bool = False) -> SimResult:
        env = {self.program.input: self.input_carrier(images)}
        stats = self.execute(env)
        logits = env[self.program.output].to(torch.int64).flatten(1)
        activations = {k: v.to(torch.int64) for k, v in env.items()} if record else {}
        return SimResult(logits=logits, layers=stats, activations=activations)
