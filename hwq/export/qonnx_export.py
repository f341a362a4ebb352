"""The integer program as a QONNX graph that computes the same integers, element for element.

QONNX carries integers in float tensors. A float op is exact when every value it produces
(and, for a reduction, every partial sum in any order) is an integer of magnitude at most
2**24 in float32 or 2**53 in float64; this module proves that bound for every op it
emits, from the program's own weights and ranges, and refuses the program with a message
naming the op where no exact form exists. The forms (docs/export.md):

- weights: float initializers behind a `Quant` node (scale 1, zero point 0, the weight
  bits), the QONNX idiom that FINN folds into integer weights with a datatype;
- zero points: `Sub` of the zero point, so that a convolution's zero padding is the
  datapath's zero-point padding;
- convolutions: float32 `Conv`, split over input channels (partial results summed in
  float64) when one float32 convolution could pass 2**24;
- wrap-around overflow: `Mod` of the exact sum; saturation, which depends on the order of
  the sums, has no exact form, so a program whose saturating accumulator can overflow is
  refused;
- requantization to at most 8 bits: FINN's `MultiThreshold`, with integer thresholds in
  accumulator units (the clamp of a monotone function of an integer is a threshold count);
  wider outputs (the logits): the exact float64 `acc * mult + offset` scaled by 2**-shift,
  then a `Quant` node rounding down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from accel_sim.functional import FLOAT32_EXACT, FLOAT64_EXACT, accumulator_bound, signed_bits
from accel_sim.ir import Conv2d, GlobalAvgPool, Program, Requant, Residual, TensorSpec, program_digest

from .. import HwqError, __version__

QONNX_DOMAIN = "qonnx.custom_op.general"
THRESHOLD_MAX_BITS = 8
BATCH = 1


@dataclass(frozen=True)
class Value:
    """A graph tensor holding integers: its name, carrier and per-channel value range.

    The ranges are Python integers (object arrays), so bounds far beyond int64 (a
    residual multiplier shifted left by 48) are still computed exactly.
    """

    name: str
    double: bool
    lo: np.ndarray
    hi: np.ndarray

    @property
    def magnitude(self) -> int:
        return int(max(np.max(-self.lo), np.max(self.hi), 0))


def _ints(values) -> np.ndarray:
    return np.array([int(v) for v in np.asarray(values).reshape(-1)], dtype=object)


def _channel_const(values, double: bool) -> np.ndarray:
    dtype = np.float64 if double else np.float32
    return np.asarray([float(v) for v in values], dtype=dtype).reshape(1, -1, 1, 1)


def _scaled_range(lo: np.ndarray, hi: np.ndarray, factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Range of factor * x for x in [lo, hi], per channel (factor may be negative)."""
    a, b = lo * factor, hi * factor
    return np.minimum(a, b), np.maximum(a, b)


def _datatype(lo: int, hi: int) -> str:
    """The narrowest qonnx integer DataType name holding [lo, hi] (at least 2 bits)."""
    return f"UINT{max(hi, 3).bit_length()}" if lo >= 0 else f"INT{max(signed_bits(lo, hi), 2)}"


def _need_exact(bound: int, double: bool, where: str, what: str) -> None:
    """Refuse a value whose magnitude the carrier does not hold exactly (2**24 or 2**53)."""
    limit, carrier = (FLOAT64_EXACT, "float64") if double else (FLOAT32_EXACT, "float32")
    if bound >= limit:
        raise HwqError(
            f"{where}: {what} reaches {bound} (>= 2^{limit.bit_length() - 1}), "
            f"beyond the integers {carrier} holds exactly; no exact QONNX form"
        )


def threshold_table(
    rq: Requant, out: TensorSpec, coefficient: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray
) -> np.ndarray:
    """Integer thresholds T[o, k]: the output is qmin + #{k : D >= T[o, k]}.

    For the input D of the MultiThreshold, v = coefficient * D + offset with a coefficient
    >= 0, so the output clamp(zp + (v + 2**(shift-1)) >> shift) is non-decreasing in D:
    it reaches level qmin + k exactly when D >= ceil(X / coefficient), X the value of
    coefficient * D at which u first equals that level. Thresholds outside D's reachable
    range are moved to its edge (every D passes, or none), which keeps them small and
    exact in the carrier without changing any output.
    """
    zp = out.zero_points()
    levels = np.arange(out.qmin + 1, out.qmax + 1, dtype=object)
    table = np.empty((out.channels, len(levels)), dtype=object)
    for o in range(out.channels):
        s = int(rq.shift[o])
        half = (1 << (s - 1)) if s > 0 else 0
        x = (levels - int(zp[o])) * (1 << s) - half - int(rq.offset[o])
        a = int(coefficient[o])
        lo, hi = int(d_lo[o]), int(d_hi[o])
        if a == 0:
            t = np.where(x <= 0, lo, hi + 1)
        else:
            t = -((-x) // a)
        table[o] = np.minimum(np.maximum(t, lo), hi + 1)
    return table


class _Graph:
    """Accumulates nodes, initializers and datatype annotations in program order."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: dict[str, np.ndarray] = {}
        self.datatypes: dict[str, str] = {}
        self.casts: dict[str, str] = {}
        self.names: set[str] = set()

    def claim(self, name: str) -> str:
        """Every graph tensor is named once (ONNX's single assignment); an IR whose names
        collide with the exporter's derived names (such as `x.centered`) is refused."""
        if name in self.names:
            raise HwqError(
                f"tensor name {name!r} would be used twice in the QONNX graph; rename it in the IR"
            )
        self.names.add(name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers[self.claim(name)] = np.asarray(value)
        return name

    def node(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(
            helper.make_node(
                op_type, inputs, [self.claim(output)], name=f"{output}/{op_type}", domain=domain, **attrs
            )
        )
        return output

    def annotate(self, value: Value) -> Value:
        self.datatypes[value.name] = _datatype(int(np.min(value.lo)), int(np.max(value.hi)))
        return value

    def as_double(self, value: Value) -> Value:
        if value.double:
            return value
        if value.name not in self.casts:
            self.casts[value.name] = self.node(
                "Cast", [value.name], f"{value.name}.f64", to=TensorProto.DOUBLE
            )
        return self.annotate(Value(self.casts[value.name], True, value.lo, value.hi))


class QonnxExporter:
    """Builds the QONNX model of one program (batch 1, NCHW, as FINN expects)."""

    def __init__(self, program: Program):
        program.validate()
        self.program = program
        self.g = _Graph()
        self.values: dict[str, Value] = {}
        self.centered_values: dict[str, Value] = {}
        self.residual_values: dict[tuple, Value] = {}

    # -- tensors --------------------------------------------------------------------

    def activation(self, spec: TensorSpec) -> Value:
        c = spec.channels
        return Value(spec.name, False, _ints([spec.qmin] * c), _ints([spec.qmax] * c))

    def centered(self, name: str) -> Value:
        """q - zero_point of a tensor (the tensor itself when every zero point is 0)."""
        if name in self.centered_values:
            return self.centered_values[name]
        spec, x = self.program.tensors[name], self.values[name]
        zp = spec.zero_points()
        if np.any(zp != 0):
            self.g.node(
                "Sub",
                [x.name, self.g.const(f"{name}.zero_point", _channel_const(zp, False))],
                f"{name}.centered",
            )
            x = self.g.annotate(Value(f"{name}.centered", False, x.lo - _ints(zp), x.hi - _ints(zp)))
        self.centered_values[name] = x
        return x

    # -- convolution ----------------------------------------------------------------

    def quant_weight(self, name: str, weight: np.ndarray, bits: int) -> str:
        raw = self.g.const(f"{name}.weight", weight.astype(np.float32))
        inputs = [
            raw,
            self.g.const(f"{name}.weight_scale", np.array(1.0, dtype=np.float32)),
            self.g.const(f"{name}.weight_zero_point", np.array(0.0, dtype=np.float32)),
            self.g.const(f"{name}.weight_bits", np.array(float(bits), dtype=np.float32)),
        ]
        return self.g.node(
            "Quant",
            inputs,
            f"{name}.weight_q",
            domain=QONNX_DOMAIN,
            signed=1,
            narrow=0,
            rounding_mode="ROUND",
        )

    @staticmethod
    def product_sums(weight: np.ndarray, x: Value) -> tuple[np.ndarray, np.ndarray]:
        """Per (output, input channel): sums of the positive and of the negative products."""
        lo = np.array([int(v) for v in x.lo], dtype=np.int64).reshape(1, -1, 1, 1)
        hi = np.array([int(v) for v in x.hi], dtype=np.int64).reshape(1, -1, 1, 1)
        at_lo, at_hi = weight * lo, weight * hi
        pos = np.maximum(np.maximum(at_lo, at_hi), 0).sum(axis=(2, 3))
        neg = np.minimum(np.minimum(at_lo, at_hi), 0).sum(axis=(2, 3))
        return pos, neg

    @staticmethod
    def channel_chunks(pos: np.ndarray, neg: np.ndarray, where: str) -> list[tuple[int, int]]:
        """Consecutive input-channel groups whose float32 convolutions stay exact."""
        chunks, start = [], 0
        run_pos, run_neg = np.zeros(pos.shape[0], dtype=np.int64), np.zeros(pos.shape[0], dtype=np.int64)
        for c in range(pos.shape[1]):
            _need_exact(
                int(max(pos[:, c].max(), -neg[:, c].min())), False, where, "one input channel's products"
            )
            run_pos, run_neg = run_pos + pos[:, c], run_neg + neg[:, c]
            if max(run_pos.max(), -run_neg.min()) >= FLOAT32_EXACT:
                chunks.append((start, c))
                start, run_pos, run_neg = c, pos[:, c].copy(), neg[:, c].copy()
        chunks.append((start, pos.shape[1]))
        return chunks

    def conv_sum(self, op: Conv2d, x: Value) -> Value:
        """bias + sum of weight * (q - zp): the exact accumulator before any overflow."""
        w = op.weight.astype(np.int64)
        pos, neg = self.product_sums(w, x)
        bias = _ints(op.bias)
        lo, hi = bias + _ints(neg.sum(axis=1)), bias + _ints(pos.sum(axis=1))
        attrs = dict(
            kernel_shape=[op.kernel] * 2,
            pads=[op.padding] * 4,
            strides=[op.stride] * 2,
            dilations=[1, 1],
            group=1,
        )
        where = f"op {op.name!r}"
        one_pass = int(np.max(np.abs(bias))) + int(max(pos.sum(axis=1).max(), -neg.sum(axis=1).min()))
        if one_pass < FLOAT32_EXACT:
            inputs = [x.name, self.quant_weight(op.name, w, op.weight_bits)]
            if np.any(op.bias != 0):
                inputs.append(self.g.const(f"{op.name}.bias", op.bias.astype(np.float32)))
            self.g.node("Conv", inputs, f"{op.name}.acc", **attrs)
            return self.g.annotate(Value(f"{op.name}.acc", False, lo, hi))
        _need_exact(max(int(np.max(np.abs(lo))), int(np.max(np.abs(hi)))), True, where, "the accumulator")
        parts = []
        for i, (c0, c1) in enumerate(self.channel_chunks(pos, neg, where)):
            part = f"{op.name}.part{i}"
            sliced = self.g.node(
                "Slice",
                [
                    x.name,
                    self.g.const(f"{part}.starts", np.array([c0])),
                    self.g.const(f"{part}.ends", np.array([c1])),
                    self.g.const(f"{part}.axes", np.array([1])),
                ],
                f"{part}.input",
            )
            self.g.node(
                "Conv", [sliced, self.quant_weight(part, w[:, c0:c1], op.weight_bits)], f"{part}.acc", **attrs
            )
            parts.append(self.g.node("Cast", [f"{part}.acc"], f"{part}.f64", to=TensorProto.DOUBLE))
        total = self.g.node("Sum", parts, f"{op.name}.products")
        bias_const = self.g.const(f"{op.name}.bias", _channel_const(op.bias, True))
        self.g.node("Add", [total, bias_const], f"{op.name}.acc")
        return self.g.annotate(Value(f"{op.name}.acc", True, lo, hi))

    def overflowed(self, op: Conv2d, acc: Value) -> Value:
        """The accumulator after the program's overflow rule (nothing to do if it cannot overflow)."""
        a = self.program.accumulator
        bound = accumulator_bound(op.weight, op.bias, self.program.tensors[op.input])
        if bound.fits(a):
            return acc
        if a.overflow == "saturate":
            raise HwqError(
                f"op {op.name!r}: its worst-case accumulator needs {bound.bits} bits and can overflow the "
                f"{a.bits}-bit saturating accumulator; saturation depends on the summation order and has no "
                "exact QONNX form (export for a wider accumulator, or in wrap mode)"
            )
        modulus = 1 << a.bits
        lift = -(-max(0, a.lo - int(np.min(acc.lo))) // modulus) * modulus - a.lo
        _need_exact(acc.magnitude + abs(lift) + modulus, True, f"op {op.name!r}", "the wrapped sum")
        x = self.g.as_double(acc)
        self.g.node(
            "Add", [x.name, self.g.const(f"{op.name}.wrap_lift", np.array(float(lift)))], f"{op.name}.lifted"
        )
        self.g.node(
            "Mod",
            [f"{op.name}.lifted", self.g.const(f"{op.name}.wrap_modulus", np.array(float(modulus)))],
            f"{op.name}.mod",
            fmod=1,
        )
        self.g.node(
            "Add",
            [f"{op.name}.mod", self.g.const(f"{op.name}.wrap_lo", np.array(float(a.lo)))],
            f"{op.name}.wrapped",
        )
        c = len(acc.lo)
        return self.g.annotate(Value(f"{op.name}.wrapped", True, _ints([a.lo] * c), _ints([a.hi] * c)))

    # -- global average pool --------------------------------------------------------

    def pool_sum(self, op: GlobalAvgPool, x: Value) -> Value:
        """The exact sum over H x W of q - zp (GlobalAveragePool times the area when exact)."""
        _, h, w = self.program.tensors[op.input].shape
        area = h * w
        lo, hi = x.lo * area, x.hi * area
        bound = x.magnitude * area
        name = f"{op.name}.acc"
        if bound < FLOAT32_EXACT and area & (area - 1) == 0:
            # A power-of-two area makes the mean exact too; FINN maps GlobalAveragePool to its
            # GlobalAccPool layer and folds the two scalar multiplies.
            self.g.node("GlobalAveragePool", [x.name], f"{op.name}.mean")
            self.g.node(
                "Mul",
                [f"{op.name}.mean", self.g.const(f"{op.name}.area", np.array(float(area), dtype=np.float32))],
                name,
            )
            return self.g.annotate(Value(name, False, lo, hi))
        _need_exact(bound, True, f"op {op.name!r}", "the pooled sum")
        src = x if bound < FLOAT32_EXACT else self.g.as_double(x)
        self.g.node("ReduceSum", [src.name], name, axes=[2, 3], keepdims=1)
        return self.g.annotate(Value(name, src.double, lo, hi))

    # -- requantization -------------------------------------------------------------

    def residual_operand(self, rq: Requant) -> Value:
        """r = R - zp_R, subsampled by the stride and zero-padded in channels (option A)."""
        res = rq.residual
        key = (res.input, res.stride, res.channel_pad)
        if key not in self.residual_values:
            self.residual_values[key] = self.g.annotate(self.shortcut(res))
        return self.residual_values[key]

    def shortcut(self, res: Residual) -> Value:
        r = self.centered(res.input)
        name = r.name
        if res.stride > 1:
            prefix = f"{res.input}.subsampled{res.stride}"
            name = self.g.node(
                "Slice",
                [
                    name,
                    self.g.const(f"{prefix}.starts", np.array([0, 0])),
                    self.g.const(f"{prefix}.ends", np.array([1 << 30, 1 << 30])),
                    self.g.const(f"{prefix}.axes", np.array([2, 3])),
                    self.g.const(f"{prefix}.steps", np.array([res.stride, res.stride])),
                ],
                prefix,
            )
        a, b = res.channel_pad
        zeros_a, zeros_b = _ints([0] * a), _ints([0] * b)
        lo, hi = np.concatenate([zeros_a, r.lo, zeros_b]), np.concatenate([zeros_a, r.hi, zeros_b])
        if a or b:
            pads = self.g.const(f"{name}.pads{a}_{b}", np.array([0, a, 0, 0, 0, b, 0, 0]))
            name = self.g.node("Pad", [name, pads], f"{name}.padded{a}_{b}", mode="constant")
        return Value(name, False, lo, hi)

    def combined_sum(
        self, name: str, rq: Requant, acc: Value, channels: int, scale_shift: bool
    ) -> tuple[Value, int]:
        """acc * mult + r * (res_mult << res_shift) in float64, optionally times 2**-shift.

        Returns the sum (its range in integer units, before the scaling) and the largest
        magnitude of any term, which bounds every intermediate of the float64 ops.
        """
        mult = _ints(rq.mult)
        scale = np.exp2(-rq.shift.astype(np.float64)) if scale_shift else np.ones(channels)
        lo, hi = _scaled_range(acc.lo, acc.hi, mult)
        terms = int(np.max(np.maximum(-lo, hi)))
        x = self.g.as_double(acc)
        self.g.node(
            "Mul",
            [x.name, self.g.const(f"{name}.mult", _channel_const(rq.mult * scale, True))],
            f"{name}.scaled_acc",
        )
        total = f"{name}.scaled_acc"
        if rq.residual is not None:
            r = self.g.as_double(self.residual_operand(rq))
            res_mult = _ints(rq.residual.mult) * (_ints([1] * channels) << _ints(rq.residual.shift))
            r_lo, r_hi = _scaled_range(r.lo, r.hi, res_mult)
            terms += int(np.max(np.maximum(-r_lo, r_hi)))
            res_const = np.asarray([float(m) * s for m, s in zip(res_mult, scale, strict=True)]).reshape(
                1, -1, 1, 1
            )
            self.g.node("Mul", [r.name, self.g.const(f"{name}.res_mult", res_const)], f"{name}.scaled_res")
            total = self.g.node("Add", [total, f"{name}.scaled_res"], f"{name}.sum")
            lo, hi = lo + r_lo, hi + r_hi
        _need_exact(terms, True, f"op {name!r}", "the requantization sum")
        return Value(total, True, lo, hi), terms

    def requantize(self, name: str, rq: Requant, acc: Value) -> None:
        out = self.program.tensors[name]
        if out.bits <= THRESHOLD_MAX_BITS:
            self.threshold_requant(name, rq, acc, out)
        else:
            self.floor_requant(name, rq, acc, out)
        self.values[name] = self.activation(out)
        self.g.datatypes[name] = _datatype(out.qmin, out.qmax)

    def threshold_requant(self, name: str, rq: Requant, acc: Value, out: TensorSpec) -> None:
        """MultiThreshold over D, where v = a * D + offset with an integer a >= 0.

        Without a residual D is the accumulator, negated in the channels whose multiplier
        is negative (a = |mult|); with one, D is the exact float64 sum acc * mult +
        r * res_mult_shifted, which alone determines the output (a = 1).
        """
        if rq.residual is None:
            sign = np.where(rq.mult < 0, -1, 1)
            d = acc
            if np.any(sign < 0):
                self.g.node(
                    "Mul",
                    [acc.name, self.g.const(f"{name}.sign", _channel_const(sign, acc.double))],
                    f"{name}.signed_acc",
                )
                lo, hi = _scaled_range(acc.lo, acc.hi, _ints(sign))
                d = self.g.annotate(Value(f"{name}.signed_acc", acc.double, lo, hi))
            coefficient = np.abs(rq.mult)
        else:
            d, _ = self.combined_sum(name, rq, acc, out.channels, scale_shift=False)
            d = self.g.annotate(d)
            coefficient = np.ones(out.channels, dtype=np.int64)
        table = threshold_table(rq, out, coefficient, d.lo, d.hi)
        dtype = np.float64 if d.double else np.float32
        thresholds = self.g.const(f"{name}.thresholds", table.astype(np.float64).astype(dtype))
        mt_out = f"{name}.thresholded" if d.double else name
        self.g.node(
            "MultiThreshold",
            [d.name, thresholds],
            mt_out,
            domain=QONNX_DOMAIN,
            out_dtype=_datatype(out.qmin, out.qmax),
            out_scale=1.0,
            out_bias=float(out.qmin),
        )
        if d.double:
            self.g.node("Cast", [mt_out], name, to=TensorProto.FLOAT)

    def floor_requant(self, name: str, rq: Requant, acc: Value, out: TensorSpec) -> None:
        """(acc * mult + r * res + offset + 2**(shift-1) + zp * 2**shift) * 2**-shift, rounded down.

        Every term is an integer below 2**53 times a power of two, so the float64 sum is
        exact and `Quant` (scale 1, FLOOR, the output's bits) gives clamp(zp + u).
        """
        v, terms = self.combined_sum(name, rq, acc, out.channels, scale_shift=True)
        shift = [int(s) for s in rq.shift]
        const = [
            int(off) + ((1 << s) >> 1) + (int(z) << s)
            for off, s, z in zip(rq.offset, shift, out.zero_points(), strict=True)
        ]
        _need_exact(terms + max(abs(c) for c in const), True, f"op {name!r}", "the requantization sum")
        scaled = [c * 2.0**-s for c, s in zip(const, shift, strict=True)]
        self.g.node(
            "Add",
            [v.name, self.g.const(f"{name}.offset", np.asarray(scaled).reshape(1, -1, 1, 1))],
            f"{name}.v",
        )
        y_lo = max(
            out.qmin,
            min(out.qmax, min((int(lo) + c) >> s for lo, c, s in zip(v.lo, const, shift, strict=True))),
        )
        y_hi = min(
            out.qmax,
            max(out.qmin, max((int(hi) + c) >> s for hi, c, s in zip(v.hi, const, shift, strict=True))),
        )
        _need_exact(max(-y_lo, y_hi), False, f"tensor {name!r}", "the output (qonnx's Quant returns float32)")
        inputs = [
            f"{name}.v",
            self.g.const(f"{name}.quant_scale", np.array(1.0, dtype=np.float32)),
            self.g.const(f"{name}.quant_zero_point", np.array(0.0, dtype=np.float32)),
            self.g.const(f"{name}.quant_bits", np.array(float(out.bits), dtype=np.float32)),
        ]
        self.g.node(
            "Quant",
            inputs,
            name,
            domain=QONNX_DOMAIN,
            signed=int(out.signed),
            narrow=0,
            rounding_mode="FLOOR",
        )

    # -- program --------------------------------------------------------------------

    def op(self, op: Conv2d | GlobalAvgPool) -> None:
        x = self.centered(op.input)
        if isinstance(op, Conv2d):
            acc = self.overflowed(op, self.conv_sum(op, x))
        else:
            acc = self.pool_sum(op, x)
        self.requantize(op.output, op.requant, acc)

    def build(self) -> ModelWrapper:
        p = self.program
        image = p.tensors[p.input]
        self.values[self.g.claim(p.input)] = self.activation(image)
        self.g.datatypes[p.input] = _datatype(image.qmin, image.qmax)
        for op in p.ops:
            self.op(op)
        out = p.tensors[p.output]
        graph_out = p.output
        if out.shape[1:] == (1, 1):
            self.rename_output(f"{p.output}_nchw")
            self.g.node("Flatten", [f"{p.output}_nchw"], graph_out, axis=1)
            out_shape = [BATCH, out.channels]
        else:
            out_shape = [BATCH, *out.shape]
        graph = helper.make_graph(
            self.g.nodes,
            f"hwq_{p.meta.get('model', 'program')}",
            [helper.make_tensor_value_info(p.input, TensorProto.FLOAT, [BATCH, *image.shape])],
            [helper.make_tensor_value_info(graph_out, TensorProto.FLOAT, out_shape)],
            initializer=[numpy_tensor(k, v) for k, v in self.g.initializers.items()],
        )
        model = ModelWrapper(qonnx_make_model(graph, producer_name="hwq", producer_version=__version__))
        model = model.transform(InferShapes()).transform(InferDataTypes())
        self.g.datatypes[graph_out] = self.g.datatypes[p.output]
        for name, dt in self.g.datatypes.items():
            model.set_tensor_datatype(name, DataType[dt])
        self.set_metadata(model)
        return model

    def rename_output(self, new: str) -> None:
        """The last op wrote the program output; it becomes the 4-D tensor before Flatten."""
        old = self.program.output
        self.g.names.discard(old)
        self.g.claim(new)
        for node in self.g.nodes:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        self.g.datatypes[new] = self.g.datatypes[old]

    def set_metadata(self, model: ModelWrapper) -> None:
        p = self.program
        tensors = {
            t.name: {
                "datatype": self.g.datatypes[t.name],
                "scale": t.scale,
                "zero_point": [int(z) for z in t.zero_points()],
                "shape": list(t.shape),
            }
            for t in p.tensors.values()
        }
        model.set_metadata_prop("hwq.version", __version__)
        model.set_metadata_prop("hwq.ir_sha256", program_digest(p))
        model.set_metadata_prop(
            "hwq.accumulator", json.dumps({"bits": p.accumulator.bits, "overflow": p.accumulator.overflow})
        )
        model.set_metadata_prop(
            "hwq.program",
            json.dumps({k: v for k, v in p.meta.items() if k not in ("sources", "weight_sources")}),
        )
        model.set_metadata_prop("hwq.tensors", json.dumps(tensors))
        model.set_metadata_prop(
            "hwq.semantics",
            "integers in float tensors; real value = scale * (q - zero_point) per hwq.tensors; "
            "computes accel_sim's integers exactly (docs/export.md)",
        )


def numpy_tensor(name: str, value: np.ndarray) -> TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(value, name)


def export_qonnx(program: Program) -> ModelWrapper:
    """The QONNX model (batch 1) of `program`; raises HwqError where no exact form exists."""
    return QonnxExporter(program).build()
