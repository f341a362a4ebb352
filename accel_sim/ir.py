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
import tempfile
import zipfile
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
    hw = output_hw(x.shape[1], op.kernel, op.stride, op.padding)
    _need(y.shape[1:] == (hw, hw), where, f"output spatial size must be {hw}x{hw}")


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
    rhw = (r.shape[1] - 1) // res.stride + 1
    _need((rhw, rhw) == out_shape[1:], where, "residual spatial size does not match the output")
    _need(res.mult.shape == (channels,), where, f"residual mult must have {channels} entries")
    _need(bool(np.all(np.abs(res.mult) < mlim)), where, f"residual mult exceeds {program.mult_bits} bits")
    _need(res.shift.shape == (channels,), where, f"residual shift must have {channels} entries")
    _need(
        bool(np.all((res.shift >= 0) & (res.shift <= MAX_SHIFT))),
        where,
        f"residual shift outside [0, {MAX_SHIFT}]",
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
        raise IRError(f"array {key!r} is not integer")
    return arr.astype(np.int64)


def _requant_from_json(d: dict, prefix: str, arrays: dict[str, np.ndarray]) -> Requant:
    res = d.get("residual")
    residual = None
    if res is not None:
        residual = Residual(
            input=str(res["input"]),
            mult=_array(arrays, f"{prefix}.residual_mult"),
            shift=_array(arrays, f"{prefix}.residual_shift"),
            stride=int(res["stride"]),
            channel_pad=(int(res["channel_pad"][0]), int(res["channel_pad"][1])),
        )
    return Requant(
        mult=_array(arrays, f"{prefix}.mult"),
        shift=_array(arrays, f"{prefix}.shift"),
        offset=_array(arrays, f"{prefix}.offset"),
        residual=residual,
    )


def _op_from_json(d: dict, arrays: dict[str, np.ndarray]) -> Op:
    name = str(d["name"])
    common = dict(
        name=name,
        input=str(d["input"]),
        output=str(d["output"]),
        requant=_requant_from_json(d["requant"], name, arrays),
    )
    if d["kind"] == "conv2d":
        return Conv2d(
            weight=_array(arrays, f"{name}.weight"),
            weight_bits=int(d["weight_bits"]),
            bias=_array(arrays, f"{name}.bias"),
            stride=int(d["stride"]),
            padding=int(d["padding"]),
            **common,
        )
    if d["kind"] == "avgpool":
        return GlobalAvgPool(**common)
    raise IRError(f"op {name!r} has unknown kind {d['kind']!r}")


def program_from_dict(header: dict, arrays: dict[str, np.ndarray]) -> Program:
    if header.get("format") != IR_FORMAT:
        raise IRError(f"not an {IR_FORMAT} file (format field is {header.get('format')!r})")
    if header.get("version") != IR_VERSION:
        raise IRError(f"IR version {header.get('version')!r} is not supported (expected {IR_VERSION})")
    try:
        tensors = {
            t["name"]: TensorSpec(
                name=str(t["name"]),
                shape=tuple(int(s) for s in t["shape"]),
                bits=int(t["bits"]),
                signed=bool(t["signed"]),
                zero_point=tuple(int(z) for z in t["zero_point"]),
                scale=float(t["scale"]),
            )
            for t in header["tensors"]
        }
        program = Program(
            tensors=tensors,
            ops=[_op_from_json(d, arrays) for d in header["ops"]],
            input=str(header["input"]),
            output=str(header["output"]),
            accumulator=Accumulator(
                bits=int(header["accumulator"]["bits"]),
                overflow=header["accumulator"]["overflow"],
            ),
            mult_bits=int(header["mult_bits"]),
            rounding=str(header["rounding"]),
            meta=dict(header.get("meta", {})),
        )
    except (KeyError, TypeError, IndexError) as exc:
        raise IRError(f"malformed IR header: missing or bad field {exc}") from None
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
    """The file's header bytes, array blobs and their digest (one canonical encoding)."""
    header, arrays = program_to_dict(program)
    blobs = {f"{k}.npy": _npy_bytes(_compact(v)) for k, v in arrays.items()}
    header_bytes = json.dumps(header, sort_keys=True, indent=1).encode()
    return header_bytes, blobs, _digest(header_bytes, blobs)


def program_digest(program: Program) -> str:
    """SHA-256 that identifies the program's content: the digest its IR file stores."""
    return _encode(program)[2]


def save_program(program: Program, path: str | os.PathLike) -> str:
    """Validate and write `program` atomically; returns the content digest."""
    program.validate()
    header_bytes, blobs, digest = _encode(program)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("program.json", header_bytes)
        for key, blob in blobs.items():
            zf.writestr(f"arrays/{key}", blob)
        zf.writestr("sha256", digest)
    atomic_write_bytes(Path(path), buf.getvalue())
    return digest


def load_program(path: str | os.PathLike) -> Program:
    """Read and validate an IR file; any damage or inconsistency raises IRError."""
    path = Path(path)
    if not path.is_file():
        raise IRError(f"IR file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            header_bytes = zf.read("program.json")
            stored = zf.read("sha256").decode().strip()
            blobs = {n.removeprefix("arrays/"): zf.read(n) for n in zf.namelist() if n.startswith("arrays/")}
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise IRError(f"{path} is not a readable IR file ({exc})") from None
    if _digest(header_bytes, blobs) != stored:
        raise IRError(f"{path} fails its checksum: the file was modified or corrupted")
    try:
        header = json.loads(header_bytes)
        arrays = {
            k.removesuffix(".npy"): np.load(io.BytesIO(v), allow_pickle=False) for k, v in blobs.items()
        }
    except (ValueError, OSError) as exc:
        raise IRError(f"{path} has unreadable content ({exc})") from None
    return program_from_dict(header, arrays)
