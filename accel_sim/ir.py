"""The integer program (IR): the one contract shared by lowering, simulator, RTL and trainer.

Every number the accelerator computes is defined here and in docs/datapath.md; nothing in
this module is float except the informational `scale` of a tensor (used only to read
results in real units, never by the datapath). The file format is a zip archive holding
`program.json` and one `.npy` per array, with a SHA-256 over both so that a modified or
truncated file is refused on load instead of silently computing something else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

IR_FORMAT = "hwq-ir"
IR_VERSION = 1
OVERFLOW_MODES = ("wrap", "saturate")
ROUNDING_MODES = ("half_up",)

MIN_ACT_BITS, MAX_ACT_BITS = 2, 16
MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 16
MIN_ACC_BITS, MAX_ACC_BITS = 8, 40
MAX_OUTPUT_BITS = 32
MAX_MULT_BITS = 20
MAX_SHIFT = 48
MAX_OFFSET = 2**60
# Every requantization sum's worst case stays below this (docs/datapath.md, Requantization).
# Folding acc0 and the zero points into per-channel constants, as accel_sim does, at most
# triples a term, and 3 * 2**61 < 2**63: every such rearrangement fits in int64.
REQUANT_BOUND_BITS = 61
REQUANT_BOUND = 1 << REQUANT_BOUND_BITS
REQUANT_BOUND_TEXT = f"2**{REQUANT_BOUND_BITS}"

# The integer parameters a search may change, keyed (op name, field): a conv's `weight`
# (O, C, k, k) and `bias` (O,), and any op's requantization multiplier `mult` (O,).
ParamKey = tuple[str, str]
WEIGHT, BIAS, MULT = "weight", "bias", "mult"
PARAM_FIELDS = (WEIGHT, BIAS, MULT)


class IRError(ValueError):
    """A program, or an IR file, that breaks the datapath contract."""


@dataclass(frozen=True)
class Accumulator:
    """Accumulator width and what happens when a partial sum leaves its range."""

    bits: int = 32
    overflow: Literal["wrap", "saturate"] = "wrap"

    @property
    def lo(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def hi(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def validate(self) -> None:
        if not MIN_ACC_BITS <= self.bits <= MAX_ACC_BITS:
            raise IRError(f"accumulator bits {self.bits} out of range [{MIN_ACC_BITS}, {MAX_ACC_BITS}]")
        if self.overflow not in OVERFLOW_MODES:
            raise IRError(f"accumulator overflow mode {self.overflow!r} not in {OVERFLOW_MODES}")


@dataclass(frozen=True)
class TensorSpec:
    """An integer activation tensor: q in [qmin, qmax]; real value = scale * (q - zero_point)."""

    name: str
    shape: tuple[int, int, int]
    bits: int
    signed: bool
    zero_point: tuple[int, ...] = (0,)
    scale: float = 1.0

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def channels(self) -> int:
        return self.shape[0]

    def zero_points(self) -> np.ndarray:
        """Zero point of every channel (a single stored value applies to all)."""
        zp = np.asarray(self.zero_point, dtype=np.int64)
        return np.broadcast_to(zp, (self.channels,)).copy()

    def validate(self, max_bits: int = MAX_ACT_BITS) -> None:
        where = f"tensor {self.name!r}"
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise IRError(f"{where}: shape {self.shape} is not a positive (C, H, W)")
        if not MIN_ACT_BITS <= self.bits <= max_bits:
            raise IRError(f"{where}: bits {self.bits} out of range [{MIN_ACT_BITS}, {max_bits}]")
        if len(self.zero_point) not in (1, self.channels):
            raise IRError(f"{where}: needs 1 or {self.channels} zero points")
        if any(not self.qmin <= z <= self.qmax for z in self.zero_point):
            raise IRError(f"{where}: zero point outside [{self.qmin}, {self.qmax}]")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise IRError(f"{where}: scale must be a positive finite number")


@dataclass(frozen=True)
class Residual:
    """A second input added in the requantization stage (the ResNet shortcut).

    The shortcut tensor is subsampled by `stride` and padded with `channel_pad`
    channels of its zero point ("option A"); `(q - zero_point) * mult * 2**shift` joins
    the sum. The left shift lets a residual scale far above the accumulator's keep the
    full multiplier precision without costing the accumulator path its precision.
    """

    input: str
    mult: np.ndarray
    shift: np.ndarray
    stride: int = 1
    channel_pad: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Requant:
    """Per-output-channel fixed-point rescale: y = clamp(zp + round_half_up(v / 2**shift)).

    v = acc * mult + offset (+ residual term); `offset` carries the folded BatchNorm shift
    at the precision of the product, so tiny or negative BN scales need no special case.
    """

    mult: np.ndarray
    shift: np.ndarray
    offset: np.ndarray
    residual: Residual | None = None


@dataclass(frozen=True)
class Conv2d:
    """Integer convolution (a linear layer is a 1x1 convolution on a 1x1 map).

    acc starts at bias - sum(weight * input_zero_point) and adds weight * input in the
    order (channel, kernel row, kernel column), with the program's overflow mode.
    """

    name: str
    input: str
    output: str
    weight: np.ndarray
    weight_bits: int
    bias: np.ndarray
    stride: int
    padding: int
    requant: Requant
    kind: Literal["conv2d"] = "conv2d"

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])

    @property
    def reduction(self) -> int:
        """Number of products summed into one output (C_in * kh * kw)."""
        return int(np.prod(self.weight.shape[1:]))


@dataclass(frozen=True)
class GlobalAvgPool:
    """Exact sum over H x W of (q - zero_point), then requantized (the 1/(H*W) is in mult)."""

    name: str
    input: str
    output: str
    requant: Requant
    kind: Literal["avgpool"] = "avgpool"


Op = Conv2d | GlobalAvgPool


def param_of(op: Op, field: str) -> np.ndarray:
    """The op's own value of a searchable parameter; IRError if the op has no such field."""
    if field == MULT:
        return op.requant.mult
    if field in (WEIGHT, BIAS) and isinstance(op, Conv2d):
        return getattr(op, field)
    raise IRError(f"op {op.name!r} has no searchable parameter {field!r} (fields: {PARAM_FIELDS})")


@dataclass
class Program:
    """A straight-line integer program: ops in execution order over named tensors."""

    tensors: dict[str, TensorSpec]
    ops: list[Op]
    input: str
    output: str
    accumulator: Accumulator = field(default_factory=Accumulator)
    mult_bits: int = 16
    rounding: str = "half_up"
    meta: dict[str, Any] = field(default_factory=dict)

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def conv_ops(self) -> list[Conv2d]:
        return [op for op in self.ops if isinstance(op, Conv2d)]

    def with_accumulator(self, accumulator: Accumulator) -> Program:
        accumulator.validate()
        return replace(self, accumulator=accumulator)

    def with_weights(self, weights: dict[str, np.ndarray]) -> Program:
        """A copy with some conv weights replaced (the trainer's candidate solutions)."""
        return self.with_params({(name, WEIGHT): w for name, w in weights.items()})

    def with_params(self, params: dict[ParamKey, np.ndarray]) -> Program:
        """A validated copy with some searchable parameters replaced (see `param_of`)."""
        unknown = sorted({name for name, _ in params} - {op.name for op in self.ops})
        if unknown:
            raise IRError(f"no ops named {unknown}")
        ops = []
        for op in self.ops:
            values = {f: np.asarray(v, dtype=np.int64) for (name, f), v in params.items() if name == op.name}
            for f, v in values.items():
                if v.shape != param_of(op, f).shape:
                    raise IRError(
                        f"op {op.name!r}: {f} must have shape {param_of(op, f).shape}, not {v.shape}"
                    )
            if MULT in values:
                op = replace(op, requant=replace(op.requant, mult=values.pop(MULT)))
            ops.append(replace(op, **values) if values else op)
        program = replace(self, ops=ops)
        program.validate()
        return program

    def validate(self) -> None:
        """Check every rule of docs/datapath.md that can be checked without data."""
        self.accumulator.validate()
        if self.rounding not in ROUNDING_MODES:
            raise IRError(f"rounding mode {self.rounding!r} not in {ROUNDING_MODES}")
        if not 2 <= self.mult_bits <= MAX_MULT_BITS:
            raise IRError(f"mult_bits {self.mult_bits} out of range [2, {MAX_MULT_BITS}]")
        if self.input not in self.tensors or self.output not in self.tensors:
            raise IRError("program input or output is not a declared tensor")
        for name, spec in self.tensors.items():
            if name != spec.name:
                raise IRError(f"tensor table key {name!r} names tensor {spec.name!r}")
            spec.validate(MAX_OUTPUT_BITS if name == self.output else MAX_ACT_BITS)
        if len({op.name for op in self.ops}) != len(self.ops):
            raise IRError("op names are not unique")
        defined = {self.input}
        for op in self.ops:
            _validate_op(self, op, defined)
            if op.output in defined:
                raise IRError(f"op {op.name!r}: tensor {op.output!r} is written twice")
            defined.add(op.output)
        if self.output not in defined:
            raise IRError(f"no op produces the program output {self.output!r}")


def output_hw(in_hw: int, kernel: int, stride: int, padding: int) -> int:
    return (in_hw + 2 * padding - kernel) // stride + 1


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise IRError(f"{where}: {what}")


def _validate_op(program: Program, op: Op, defined: set[str]) -> None:
    where = f"op {op.name!r}"
    for name in (op.input, op.output):
        _need(name in program.tensors, where, f"tensor {name!r} is not declared")
    _need(op.input in defined, where, f"reads {op.input!r} before it is written")
    x, y = program.tensors[op.input], program.tensors[op.output]
    if isinstance(op, Conv2d):
        _validate_conv(program, op, x, y, where)
    elif isinstance(op, GlobalAvgPool):
        _need(y.shape == (x.channels, 1, 1), where, f"output shape must be ({x.channels}, 1, 1)")
    else:
        raise IRError(f"{where}: unknown op kind {type(op).__name__}")
    _validate_requant(program, op.requant, y.channels, y.shape, defined, where)
    _validate_requant_bound(program, op, where)


def _validate_conv(program: Program, op: Conv2d, x: TensorSpec, y: TensorSpec, where: str) -> None:
    w = op.weight
    _need(w.ndim == 4 and w.shape[2] == w.shape[3], where, "weight must be (O, C, k, k)")
    _need(w.shape[1] == x.channels, where, f"weight has {w.shape[1]} input channels, input has {x.channels}")
    _need(
        w.shape[0] == y.channels, where, f"weight has {w.shape[0]} output channels, output has {y.channels}"
    )
    _need(op.stride >= 1 and op.padding >= 0, where, "stride must be >= 1 and padding >= 0")
    _need(
        MIN_WEIGHT_BITS <= op.weight_bits <= MAX_WEIGHT_BITS,
        where,
        f"weight bits {op.weight_bits} out of range [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}]",
    )
    wmax = (1 << (op.weight_bits - 1)) - 1
    _need(
        int(w.min(initial=0)) >= -wmax - 1 and int(w.max(initial=0)) <= wmax,
        where,
        f"weights outside the {op.weight_bits}-bit range [{-wmax - 1}, {wmax}]",
    )
    _need(op.bias.shape == (y.channels,), where, f"bias must have {y.channels} entries")
    _need(bool(np.all(np.abs(op.bias) < MAX_OFFSET)), where, "bias magnitude too large")
    _need(op.kernel >= 1, where, "kernel size must be >= 1")
    h, w_out = (output_hw(size, op.kernel, op.stride, op.padding) for size in x.shape[1:])
    _need(y.shape[1:] == (h, w_out), where, f"output spatial size must be {h}x{w_out}")


def _validate_requant(
    program: Program,
    rq: Requant,
    channels: int,
    out_shape: tuple[int, int, int],
    defined: set[str],
    where: str,
) -> None:
    for name in ("mult", "shift", "offset"):
        arr = getattr(rq, name)
        _need(arr.shape == (channels,), where, f"requant {name} must have {channels} entries")
    mlim = 1 << (program.mult_bits - 1)
    _need(bool(np.all(np.abs(rq.mult) < mlim)), where, f"requant mult exceeds {program.mult_bits} bits")
    _need(bool(np.all((rq.shift >= 0) & (rq.shift <= MAX_SHIFT))), where, f"shift outside [0, {MAX_SHIFT}]")
    _need(bool(np.all(np.abs(rq.offset) < MAX_OFFSET)), where, "requant offset magnitude too large")
    if rq.residual is None:
        return
    res = rq.residual
    _need(res.input in defined, where, f"residual {res.input!r} is not computed before this op")
    r = program.tensors[res.input]
    lo, hi = res.channel_pad
    _need(res.stride >= 1 and lo >= 0 and hi >= 0, where, "bad residual stride or channel padding")
    _need(r.channels + lo + hi == channels, where, "residual channels do not match the output")
    subsampled = tuple((size - 1) // res.stride + 1 for size in r.shape[1:])
    _need(subsampled == out_shape[1:], where, "residual spatial size does not match the output")
    _need(res.mult.shape == (channels,), where, f"residual mult must have {channels} entries")
    _need(bool(np.all(np.abs(res.mult) < mlim)), where, f"residual mult exceeds {program.mult_bits} bits")
    _need(res.shift.shape == (channels,), where, f"residual shift must have {channels} entries")
    _need(
        bool(np.all((res.shift >= 0) & (res.shift <= MAX_SHIFT))),
        where,
        f"residual shift outside [0, {MAX_SHIFT}]",
    )


def max_deviation(spec: TensorSpec) -> list[int]:
    """Per channel, the largest |q - zero_point| over the tensor's range."""
    return [max(spec.qmax - z, z - spec.qmin) for z in spec.zero_points().tolist()]


def accumulator_magnitude(program: Program, op: Op) -> list[int]:
    """Per output channel, a bound on |acc| as the requantization stage receives it.

    A conv's acc is an accumulator value, and the bound is taken at the widest accumulator
    the IR allows, so that re-targeting the program (`with_accumulator`) cannot break it; a
    pool's acc is the exact sum of H*W values of (q - zp).
    """
    if isinstance(op, Conv2d):
        return [1 << (MAX_ACC_BITS - 1)] * op.out_channels
    x = program.tensors[op.input]
    return [x.shape[1] * x.shape[2] * d for d in max_deviation(x)]


def requant_worst_case(program: Program, op: Op) -> list[int]:
    """Per output channel, the worst case of |acc*mult| + |r*(res_mult << res_shift)| +
    |offset| + 2**(shift-1) + |zp_out << shift|, in Python integers: a bound on the
    requantization sum and on every partial sum of it, in any order (docs/datapath.md)."""
    rq, out = op.requant, program.tensors[op.output]
    residual = [0] * out.channels
    if rq.residual is not None:
        res = rq.residual
        first = res.channel_pad[0]
        for c, deviation in enumerate(max_deviation(program.tensors[res.input])):
            residual[first + c] = deviation * (abs(int(res.mult[first + c])) << int(res.shift[first + c]))
    acc = accumulator_magnitude(program, op)
    shifts = rq.shift.tolist()
    return [
        acc[o] * abs(int(rq.mult[o]))
        + residual[o]
        + abs(int(rq.offset[o]))
        + ((1 << shifts[o]) >> 1)
        + (abs(zp) << shifts[o])
        for o, zp in enumerate(out.zero_points().tolist())
    ]


def _validate_requant_bound(program: Program, op: Op, where: str) -> None:
    worst = requant_worst_case(program, op)
    channel = max(range(len(worst)), key=worst.__getitem__)
    _need(
        worst[channel] < REQUANT_BOUND,
        where,
        f"requantization sum can reach {worst[channel]} on output channel {channel}, not below the "
        f"requantization bound {REQUANT_BOUND_TEXT} of docs/datapath.md (|acc*mult| + "
        "|r*(res_mult << res_shift)| + |offset| + rounding + |zp_out << shift|)",
    )


# ---------------------------------------------------------------------------------------
# Serialization


def _requant_to_json(rq: Requant, prefix: str, arrays: dict[str, np.ndarray]) -> dict:
    for name in ("mult", "shift", "offset"):
        arrays[f"{prefix}.{name}"] = getattr(rq, name)
    out: dict[str, Any] = {"residual": None}
    if rq.residual is not None:
        arrays[f"{prefix}.residual_mult"] = rq.residual.mult
        arrays[f"{prefix}.residual_shift"] = rq.residual.shift
        out["residual"] = {
            "input": rq.residual.input,
            "stride": rq.residual.stride,
            "channel_pad": list(rq.residual.channel_pad),
        }
    return out


def _op_to_json(op: Op, arrays: dict[str, np.ndarray]) -> dict:
    base = {"kind": op.kind, "name": op.name, "input": op.input, "output": op.output}
    base["requant"] = _requant_to_json(op.requant, op.name, arrays)
    if isinstance(op, Conv2d):
        arrays[f"{op.name}.weight"] = op.weight
        arrays[f"{op.name}.bias"] = op.bias
        base.update(weight_bits=op.weight_bits, stride=op.stride, padding=op.padding)
    return base


def program_to_dict(program: Program) -> tuple[dict, dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    header = {
        "format": IR_FORMAT,
        "version": IR_VERSION,
        "input": program.input,
        "output": program.output,
        "accumulator": {"bits": program.accumulator.bits, "overflow": program.accumulator.overflow},
        "mult_bits": program.mult_bits,
        "rounding": program.rounding,
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "bits": t.bits,
                "signed": t.signed,
                "zero_point": list(t.zero_point),
                "scale": t.scale,
            }
            for t in program.tensors.values()
        ],
        "ops": [_op_to_json(op, arrays) for op in program.ops],
        "meta": program.meta,
    }
    return header, arrays


def _array(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in arrays:
        raise IRError(f"array {key!r} is missing")
    arr = arrays[key]
    if arr.dtype.kind not in "iu":
        raise IRError(f"array {key!r} has dtype {arr.dtype}, not an integer type")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise IRError(f"array {key!r} holds values beyond the int64 range")
    return arr.astype(np.int64)


_JSON_KINDS = {
    int: "an integer",
    str: "a string",
    bool: "true or false",
    float: "a number",
    list: "a list",
    dict: "a JSON object",
}


def _checked(value: Any, path: str, kind: type) -> Any:
    """`value` if it has JSON type `kind` (bool is not an integer; a number may be an int)."""
    if kind is float:
        ok = isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))
        ok = ok and abs(value) <= sys.float_info.max  # no NaN, no infinity, no int beyond a float
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise IRError(f"IR header: {path} must be {_JSON_KINDS[kind]}, got {shown}")
    return float(value) if kind is float else value


def _get(obj: dict, key: str, path: str, kind: type) -> Any:
    """obj[key] of JSON type `kind`; `path` names the field in the header (for the message)."""
    if key not in obj:
        raise IRError(f"IR header: {path} is missing")
    return _checked(obj[key], path, kind)


def _int_list(obj: dict, key: str, path: str, length: int | None = None) -> tuple[int, ...]:
    values = _get(obj, key, path, list)
    if length is not None and len(values) != length:
        raise IRError(f"IR header: {path} must have {length} entries, not {len(values)}")
    return tuple(_checked(v, f"{path}[{i}]", int) for i, v in enumerate(values))


def _objects(obj: dict, key: str) -> list[tuple[str, dict]]:
    """The JSON objects of list obj[key], each with its path."""
    items = _get(obj, key, key, list)
    return [(f"{key}[{i}]", _checked(d, f"{key}[{i}]", dict)) for i, d in enumerate(items)]


def _tensor_from_json(t: dict, path: str) -> TensorSpec:
    return TensorSpec(
        name=_get(t, "name", f"{path}.name", str),
        shape=_int_list(t, "shape", f"{path}.shape"),
        bits=_get(t, "bits", f"{path}.bits", int),
        signed=_get(t, "signed", f"{path}.signed", bool),
        zero_point=_int_list(t, "zero_point", f"{path}.zero_point"),
        scale=_get(t, "scale", f"{path}.scale", float),
    )


def _requant_from_json(d: dict, path: str, prefix: str, arrays: dict[str, np.ndarray]) -> Requant:
    residual = None
    if d.get("residual") is not None:
        res = _get(d, "residual", f"{path}.residual", dict)
        where = f"{path}.residual"
        residual = Residual(
            input=_get(res, "input", f"{where}.input", str),
            mult=_array(arrays, f"{prefix}.residual_mult"),
            shift=_array(arrays, f"{prefix}.residual_shift"),
            stride=_get(res, "stride", f"{where}.stride", int),
            channel_pad=_int_list(res, "channel_pad", f"{where}.channel_pad", length=2),
        )
    return Requant(
        mult=_array(arrays, f"{prefix}.mult"),
        shift=_array(arrays, f"{prefix}.shift"),
        offset=_array(arrays, f"{prefix}.offset"),
        residual=residual,
    )


def _op_from_json(d: dict, path: str, arrays: dict[str, np.ndarray]) -> Op:
    name = _get(d, "name", f"{path}.name", str)
    kind = _get(d, "kind", f"{path}.kind", str)
    requant = _get(d, "requant", f"{path}.requant", dict)
    common = dict(
        name=name,
        input=_get(d, "input", f"{path}.input", str),
        output=_get(d, "output", f"{path}.output", str),
        requant=_requant_from_json(requant, f"{path}.requant", name, arrays),
    )
    if kind == "conv2d":
        return Conv2d(
            weight=_array(arrays, f"{name}.weight"),
            weight_bits=_get(d, "weight_bits", f"{path}.weight_bits", int),
            bias=_array(arrays, f"{name}.bias"),
            stride=_get(d, "stride", f"{path}.stride", int),
            padding=_get(d, "padding", f"{path}.padding", int),
            **common,
        )
    if kind == "avgpool":
        return GlobalAvgPool(**common)
    raise IRError(f"IR header: {path}.kind {kind!r} of op {name!r} is not one of ('conv2d', 'avgpool')")


def program_from_dict(header: Any, arrays: dict[str, np.ndarray]) -> Program:
    """The program a parsed header and its arrays describe; a field of the wrong type, a
    missing array or a broken rule is an IRError naming it."""
    if not isinstance(header, dict):
        raise IRError(f"IR header must be a JSON object, not a JSON {type(header).__name__}")
    if header.get("format") != IR_FORMAT:
        raise IRError(f"not an {IR_FORMAT} file (format field is {header.get('format')!r})")
    version = header.get("version")
    if isinstance(version, bool) or version != IR_VERSION:
        raise IRError(f"IR version {version!r} is not supported (expected {IR_VERSION})")
    tensors: dict[str, TensorSpec] = {}
    for path, t in _objects(header, "tensors"):
        spec = _tensor_from_json(t, path)
        if spec.name in tensors:
            raise IRError(f"tensor {spec.name!r} is declared twice")
        tensors[spec.name] = spec
    accumulator = _get(header, "accumulator", "accumulator", dict)
    program = Program(
        tensors=tensors,
        ops=[_op_from_json(d, path, arrays) for path, d in _objects(header, "ops")],
        input=_get(header, "input", "input", str),
        output=_get(header, "output", "output", str),
        accumulator=Accumulator(
            bits=_get(accumulator, "bits", "accumulator.bits", int),
            overflow=_get(accumulator, "overflow", "accumulator.overflow", str),
        ),
        mult_bits=_get(header, "mult_bits", "mult_bits", int),
        rounding=_get(header, "rounding", "rounding", str),
        meta=dict(_get(header, "meta", "meta", dict)) if "meta" in header else {},
    )
    program.validate()
    return program


def _digest(header_bytes: bytes, arrays: dict[str, bytes]) -> str:
    h = hashlib.sha256(header_bytes)
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(arrays[key])
    return h.hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _compact(arr: np.ndarray) -> np.ndarray:
    """Store each array in the smallest integer type that holds it (weights become int8)."""
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(dtype)
    return arr


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode(program: Program) -> tuple[bytes, dict[str, bytes], str]:
    """The file's header bytes, array blobs and their checksum (one canonical encoding)."""
    header, arrays = program_to_dict(program)
    blobs = {f"{k}.npy": _npy_bytes(_compact(v)) for k, v in arrays.items()}
    header_bytes = json.dumps(header, sort_keys=True, indent=1).encode()
    return header_bytes, blobs, _digest(header_bytes, blobs)


# The zip format's own epoch: no clock time in the file, so equal programs give equal bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def _zip_member(name: str) -> zipfile.ZipInfo:
    """A member whose every header field is fixed. Stored, not deflated: the bytes then
    depend on nothing but the program (deflate output differs between zlib builds)."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def program_bytes(program: Program) -> bytes:
    """The program's IR file, byte for byte: the same program always gives the same bytes."""
    header_bytes, blobs, checksum = _encode(program)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_zip_member("program.json"), header_bytes)
        for key in sorted(blobs):
            zf.writestr(_zip_member(f"arrays/{key}"), blobs[key])
        zf.writestr(_zip_member("sha256"), checksum)
    return buf.getvalue()


def program_digest(program: Program) -> str:
    """The SHA-256 of the program's IR file: what `sha256sum` prints for any file
    save_program writes for it, and the `ir_sha256` of every report."""
    return hashlib.sha256(program_bytes(program)).hexdigest()


def save_program(program: Program, path: str | os.PathLike) -> str:
    """Validate and write `program` atomically; returns the file's SHA-256 (program_digest)."""
    program.validate()
    data = program_bytes(program)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


# What reading a damaged archive can raise: bad structures and CRCs, a flipped compression
# method or encryption flag, a size field pointing past the end, a name that is not UTF-8.
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    OverflowError,
    MemoryError,
)
_CONTENT_ERRORS = (ValueError, OSError, EOFError, RecursionError, MemoryError)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_archive(path: Path) -> tuple[bytes, str, dict[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as zf:
            header_bytes = zf.read("program.json")
            stored = zf.read("sha256").decode("ascii").strip()
            blobs = {n.removeprefix("arrays/"): zf.read(n) for n in zf.namelist() if n.startswith("arrays/")}
    except _ARCHIVE_ERRORS as exc:
        raise IRError(f"{path} is not a readable IR file ({_reason(exc)})") from None
    return header_bytes, stored, blobs


def load_program(path: str | os.PathLike) -> Program:
    """Read and validate an IR file; any damage or inconsistency raises IRError."""
    path = Path(path)
    if not path.exists():
        raise IRError(f"IR file {path} does not exist")
    if not path.is_file():
        raise IRError(f"IR file {path} is not a file")
    header_bytes, stored, blobs = _read_archive(path)
    if _digest(header_bytes, blobs) != stored:
        raise IRError(f"{path} fails its checksum: the file was modified or corrupted")
    try:
        header = json.loads(header_bytes)
        arrays = {
            k.removesuffix(".npy"): np.load(io.BytesIO(v), allow_pickle=False) for k, v in blobs.items()
        }
    except _CONTENT_ERRORS as exc:
        raise IRError(f"{path} has unreadable content ({_reason(exc)})") from None
    return program_from_dict(header, arrays)
