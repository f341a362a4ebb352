"""Co-simulation of the RTL against accel_sim: a conv layer as GEMM tiles in, first mismatch out.

A conv layer in im2col form is a GEMM with the datapath's epilogue: M output pixels
(activation rows of length K = C*k*k, in the accumulation order of docs/datapath.md) times
N output channels (weight rows), each output starting from acc0 and ending in the
requantization stage. The array computes it in tiles of rows x cols outputs.

The oracle is accel_sim, never a second model: the expected requantized outputs of a layer
are what FunctionalSim records for it while running the whole program, and the expected raw
accumulators come from a one-op program holding the same convolution with an identity
requantization (mult 1, shift 0, offset 0, 32-bit signed output). Both are computed,
vectorized, before the simulation; the RTL's recording is compared after it.

The operands are the compiler's job (docs/datapath.md, Conv2d): the im2col rows with the
zero-point padding, each channel's starting value ovf(acc0) and the residual operand are
computed here from the IR with this module's own code, not with accel_sim's, and
tests/test_rtl.py holds them to the int64 reference tests/reference_datapath.py.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Accumulator, Conv2d, Program, Requant, TensorSpec
from hwq import HwqError

from .sim import DEFAULT_BUILD_ROOT, ArrayConfig, run_job
from .tiles import RtlResult, decode, mapping, tile_job, tile_position

IDENTITY_OUT_BITS = 32
ROW_PRINT_THRESHOLD = 48


@dataclass
class Gemm:
    """One conv layer in im2col form: the tile operands and accel_sim's answers for them."""

    name: str
    acts: np.ndarray  # (M, K) activation operands, t in accumulation order
    weights: np.ndarray  # (N, K)
    acc_init: np.ndarray  # (N,) acc0, already reduced to the accumulator (ovf(acc0))
    mult: np.ndarray  # (N,) requantization settings of each output channel
    res_mult: np.ndarray
    res_shift: np.ndarray
    shift: np.ndarray
    offset: np.ndarray
    zero_point: np.ndarray
    residual: np.ndarray  # (M, N) residual operand R - zp_R, 0 where there is none
    expected_y: np.ndarray  # (M, N) requantized outputs, from accel_sim
    expected_acc: np.ndarray | None  # (M, N) raw accumulators, None if wider than 32 bits
    out_shape: tuple[int, int, int, int]  # (images, N, H, W): where GEMM row m sits in the layer
    act: TensorSpec
    out: TensorSpec
    weight_bits: int
    accumulator: Accumulator
    mult_bits: int
    res_bits: int

    @property
    def m(self) -> int:
        return self.acts.shape[0]

    @property
    def n(self) -> int:
        return self.weights.shape[0]

    @property
    def k(self) -> int:
        return self.acts.shape[1]

    def config(self, rows: int, cols: int, dataflow: str = "os") -> ArrayConfig:
        """The RTL build that computes this layer on a rows x cols array."""
        return ArrayConfig(
            dataflow=dataflow,
            rows=rows,
            cols=cols,
            weight_bits=self.weight_bits,
            act_bits=self.act.bits,
            act_signed=self.act.signed,
            acc_bits=self.accumulator.bits,
            overflow=self.accumulator.overflow,
            mult_bits=self.mult_bits,
            res_bits=self.res_bits,
            out_bits=self.out.bits,
            out_signed=self.out.signed,
        )

    def rows_of(self, start: int, stop: int) -> Gemm:
        """The GEMM restricted to output rows [start, stop) (a few pixels of a big layer)."""
        part = slice(start, stop)
        acc = None if self.expected_acc is None else self.expected_acc[part]
        return replace(
            self,
            acts=self.acts[part],
            residual=self.residual[part],
            expected_y=self.expected_y[part],
            expected_acc=acc,
        )


@dataclass
class LayerReport:
    """`hwq verify --rtl` for one layer: match or the first mismatch, and cycles."""

    name: str
    simulator: str
    config: ArrayConfig
    m: int
    n: int
    k: int
    tiles: int
    mismatch: str | None
    rtl_tile_cycles: list[int]  # distinct per-tile cycles, first input to last accumulator out
    formula_tile_cycles: int  # accel_sim.timing.tile_compute_cycles for the same tile
    requant_latency: int  # cycles from an accumulator leaving the array to its requantized output
    total_cycles: int  # all tiles back to back, each to its last requantized output

    @property
    def match(self) -> bool:
        return self.mismatch is None

    @property
    def cycles_match(self) -> bool:
        return self.rtl_tile_cycles == [self.formula_tile_cycles]

    def to_json(self) -> dict:
        fields = (
            "name",
            "simulator",
            "m",
            "n",
            "k",
            "tiles",
            "match",
            "mismatch",
            "rtl_tile_cycles",
            "formula_tile_cycles",
            "cycles_match",
            "requant_latency",
            "total_cycles",
        )
        array = {"rows": self.config.rows, "cols": self.config.cols, "dataflow": self.config.dataflow}
        return array | {f: getattr(self, f) for f in fields}


# ---------------------------------------------------------------------------------------
# Operands and expected values from accel_sim


def ovf(values: np.ndarray, accumulator: Accumulator) -> np.ndarray:
    """docs/datapath.md's ovf: two's-complement wrap-around or saturation to the accumulator."""
    v = np.asarray(values, dtype=np.int64)
    if accumulator.overflow == "wrap":
        return (v - accumulator.lo) % (1 << accumulator.bits) + accumulator.lo
    return np.clip(v, accumulator.lo, accumulator.hi)


def initial_accumulator(op: Conv2d, x: TensorSpec, accumulator: Accumulator) -> np.ndarray:
    """ovf(acc0), acc0 = bias - sum of weight * input zero point: each output channel's
    starting value, which the compiler computes and the tile takes on `acc_init`."""
    acc0 = op.bias - op.weight.sum(axis=(2, 3)) @ x.zero_points()
    return ovf(acc0, accumulator)


def im2col(x: np.ndarray, op: Conv2d, spec: TensorSpec) -> np.ndarray:
    """(images * H_out * W_out, C*k*k) operand rows, t in accumulation order (c, i, j), the
    border padded with each channel's zero point: what the input buffer feeds the array."""
    n, c, h, w = x.shape
    p, k, s = op.padding, op.kernel, op.stride
    padded = np.empty((n, c, h + 2 * p, w + 2 * p), dtype=np.int64)
    padded[:] = spec.zero_points().reshape(1, c, 1, 1)
    padded[:, :, p : p + h, p : p + w] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)


def channels_last(t: np.ndarray) -> np.ndarray:
    """(images, C, H, W) -> (images * H * W, C): GEMM rows are output pixels."""
    return np.asarray(t).transpose(0, 2, 3, 1).reshape(-1, t.shape[1])


def residual_operand(program: Program, op: Conv2d, activations: dict[str, np.ndarray]) -> np.ndarray:
    """R - zp_R at every output, subsampled and channel-padded (option A); zeros without one."""
    y = program.tensors[op.output]
    images = activations[op.input].shape[0]
    res = op.requant.residual
    if res is None:
        return np.zeros((images * y.shape[1] * y.shape[2], y.channels), dtype=np.int64)
    spec = program.tensors[res.input]
    r = activations[res.input][:, :, :: res.stride, :: res.stride] - spec.zero_points().reshape(1, -1, 1, 1)
    return channels_last(np.pad(r, ((0, 0), res.channel_pad, (0, 0), (0, 0))))


def identity_program(program: Program, op: Conv2d) -> Program:
    """The conv alone, its output the raw accumulator (exact while it fits in 32 bits)."""
    channels = op.out_channels
    out = TensorSpec("acc", program.tensors[op.output].shape, IDENTITY_OUT_BITS, signed=True)
    ones, zeros = np.ones(channels, dtype=np.int64), np.zeros(channels, dtype=np.int64)
    conv = replace(op, output="acc", requant=Requant(mult=ones, shift=zeros, offset=zeros))
    return Program(
        tensors={op.input: program.tensors[op.input], "acc": out},
        ops=[conv],
        input=op.input,
        output="acc",
        accumulator=program.accumulator,
        mult_bits=program.mult_bits,
    )


def raw_accumulators(program: Program, op: Conv2d, x: torch.Tensor) -> np.ndarray | None:
    if program.accumulator.bits > IDENTITY_OUT_BITS:
        return None
    single = identity_program(program, op)
    acc = FunctionalSim(single).run(x).logits.reshape(x.shape[0], op.out_channels, -1)
    return acc.transpose(1, 2).reshape(-1, op.out_channels).numpy()


def layer_gemm(
    program: Program,
    op: Conv2d,
    activations: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor] | None = None,
) -> Gemm:
    """The GEMM of conv `op` on the input tensors `activations`, and accel_sim's answers.

    The operands (im2col rows with zero-point padding, acc_init, the residual operand) are
    the compiler's work and computed here from the IR; only the expected values come from
    accel_sim: its output tensor in `expected` (by default `activations`, the tensors a
    FunctionalSim run of `program` recorded), its raw accumulators for these inputs."""
    x_spec, y_spec = program.tensors[op.input], program.tensors[op.output]
    ints = {name: t.numpy() for name, t in activations.items()}
    want = (activations if expected is None else expected)[op.output].numpy()
    x, rq, res = activations[op.input], op.requant, op.requant.residual
    none = np.zeros_like(rq.mult)
    res_mult, res_shift = (none, none) if res is None else (res.mult, res.shift)
    res_spec = x_spec if res is None else program.tensors[res.input]
    return Gemm(
        name=op.name,
        acts=im2col(ints[op.input], op, x_spec),
        weights=op.weight.reshape(op.out_channels, -1).astype(np.int64),
        acc_init=initial_accumulator(op, x_spec, program.accumulator),
        mult=rq.mult,
        res_mult=res_mult,
        res_shift=res_shift,
        shift=rq.shift,
        offset=rq.offset,
        zero_point=y_spec.zero_points(),
        residual=residual_operand(program, op, ints),
        expected_y=channels_last(want),
        expected_acc=raw_accumulators(program, op, x),
        out_shape=(x.shape[0], *y_spec.shape),
        act=x_spec,
        out=y_spec,
        weight_bits=op.weight_bits,
        accumulator=program.accumulator,
        mult_bits=program.mult_bits,
        res_bits=res_spec.bits + 1,
    )


def conv_op(program: Program, name: str) -> Conv2d:
    try:
        op = program.op(name)
    except KeyError:
        names = ", ".join(op.name for op in program.conv_ops())
        raise HwqError(f"no layer named {name!r} (conv layers: {names})") from None
    if not isinstance(op, Conv2d):
        raise HwqError(f"layer {name!r} is a {op.kind}: only convolutions run on the MAC array")
    return op


def square_side(m: int) -> int:
    """Side of the smallest square map with at least m pixels (the IR validates square maps)."""
    return math.isqrt(m - 1) + 1


def gemm_program(
    k: int,
    m: int,
    weights: np.ndarray,
    act: TensorSpec,
    weight_bits: int,
    bias: np.ndarray,
    requant: Requant,
    out: TensorSpec,
    accumulator: Accumulator,
    mult_bits: int = 16,
) -> Program:
    """A GEMM as a one-op program: a 1x1 conv whose output pixels are the GEMM's rows.

    The M rows sit in the first M pixels of a square (K, s, s) input; `act` and `out` give
    bits, signedness and zero points, their names and shapes are set here.
    """
    side, n = square_side(m), weights.shape[0]
    x = replace(act, name="x", shape=(k, side, side))
    y = replace(out, name="y", shape=(n, side, side))
    conv = Conv2d(
        name="gemm",
        input="x",
        output="y",
        weight=weights.reshape(n, k, 1, 1).astype(np.int64),
        weight_bits=weight_bits,
        bias=np.asarray(bias, dtype=np.int64),
        stride=1,
        padding=0,
        requant=requant,
    )
    program = Program(
        tensors={"x": x, "y": y},
        ops=[conv],
        input="x",
        output="y",
        accumulator=accumulator,
        mult_bits=mult_bits,
    )
    program.validate()
    return program


def gemm_case(
    acts: np.ndarray,
    weights: np.ndarray,
    act: TensorSpec,
    weight_bits: int,
    bias: np.ndarray,
    requant: Requant,
    out: TensorSpec,
    accumulator: Accumulator,
    mult_bits: int = 16,
) -> Gemm:
    """The Gemm of given operand rows, with accel_sim's answers from its one-op program."""
    m, k = acts.shape
    program = gemm_program(k, m, weights, act, weight_bits, bias, requant, out, accumulator, mult_bits)
    side = program.tensors["x"].shape[1]
    image = np.zeros((k, side * side), dtype=np.int64)
    image[:, :m] = acts.T
    x = torch.as_tensor(image).reshape(1, k, side, side)
    return program_gemm(program, x, "gemm").rows_of(0, m)


def program_gemm(program: Program, images: torch.Tensor, layer: str) -> Gemm:
    """Run `program` on accel_sim and take layer `layer`'s GEMM from what it recorded."""
    op = conv_op(program, layer)
    activations = FunctionalSim(program).run(images, record=True).activations
    return layer_gemm(program, op, activations)


def run_gemm(
    gemm: Gemm,
    rows: int,
    cols: int,
    simulator: str,
    build_root: Path = DEFAULT_BUILD_ROOT,
    dataflow: str = "os",
) -> RtlResult:
    config = gemm.config(rows, cols, dataflow)
    return decode(run_job(tile_job(gemm, config), config, simulator, build_root), gemm, config)


# ---------------------------------------------------------------------------------------
# Comparison


def operand_row(values: np.ndarray) -> str:
    return np.array2string(
        values, separator=",", threshold=ROW_PRINT_THRESHOLD, edgeitems=16, max_line_width=sys.maxsize
    )


def describe(
    gemm: Gemm, config: ArrayConfig, stage: str, m: int, n: int, got: int, count: int, want: int
) -> str:
    """The first mismatch: where it is, both values and every input that produced it."""
    images, _, h, w = gemm.out_shape
    image, pixel = divmod(m, h * w)
    rtl = f"RTL {got}" if count == 1 else f"RTL emitted it {count} times"
    return (
        f"{gemm.name}: {stage} mismatch at output (image {image}, channel {n}, y {pixel // w}, "
        f"x {pixel % w}), GEMM element (m={m}, n={n}), {tile_position(gemm, config, m, n)}: "
        f"{rtl}, accel_sim {want}. Inputs: activation row acts[{m}] = {operand_row(gemm.acts[m])}; "
        f"weight row weights[{n}] = {operand_row(gemm.weights[n])}; acc_init {gemm.acc_init[n]} "
        f"({gemm.accumulator.bits}-bit {gemm.accumulator.overflow}); requant mult {gemm.mult[n]} "
        f"shift {gemm.shift[n]} offset {gemm.offset[n]} zero point {gemm.zero_point[n]} "
        f"residual {gemm.residual[m, n]} x res_mult {gemm.res_mult[n]} << res_shift {gemm.res_shift[n]}"
    )


def first_mismatch(gemm: Gemm, result: RtlResult, config: ArrayConfig) -> str | None:
    """None when the RTL matches accel_sim on every accumulator and output; else the first difference."""
    stages = (
        ("accumulator", result.acc, result.acc_count, gemm.expected_acc),
        ("output", result.y, result.y_count, gemm.expected_y),
    )
    for stage, got, count, want in stages:
        if want is None:
            continue
        bad = (got != want) | (count != 1)
        if bad.any():
            m, n = (int(i) for i in np.argwhere(bad)[0])
            return describe(gemm, config, stage, m, n, int(got[m, n]), int(count[m, n]), int(want[m, n]))
    return None


def verify_gemm(
    gemm: Gemm,
    rows: int,
    cols: int,
    simulator: str,
    build_root: Path = DEFAULT_BUILD_ROOT,
    dataflow: str = "os",
) -> LayerReport:
    """Run the GEMM's tiles on the RTL and compare with accel_sim, bit for bit and cycle for cycle."""
    config = gemm.config(rows, cols, dataflow)
    result = run_gemm(gemm, rows, cols, simulator, build_root, dataflow)
    return LayerReport(
        name=gemm.name,
        simulator=simulator,
        config=config,
        m=gemm.m,
        n=gemm.n,
        k=gemm.k,
        tiles=len(result.acc_cycles),
        mismatch=first_mismatch(gemm, result, config),
        rtl_tile_cycles=sorted(set(result.acc_cycles)),
        formula_tile_cycles=mapping(gemm, config).tile_cycles,
        requant_latency=max(y - a for y, a in zip(result.y_cycles, result.acc_cycles, strict=True)),
        total_cycles=sum(result.y_cycles),
    )


def verify_program(
    program: Program,
    images: torch.Tensor,
    layers: list[str],
    rows: int,
    cols: int,
    simulator: str,
    build_root: Path = DEFAULT_BUILD_ROOT,
    pixels: int | None = None,
    dataflow: str = "os",
) -> list[LayerReport]:
    """Each conv layer in `layers`, fed the input accel_sim computed for it, on the RTL.

    `pixels` keeps only the first output pixels of each layer (a quick check of big layers).
    """
    ops = [conv_op(program, name) for name in layers]
    activations = FunctionalSim(program).run(images, record=True).activations
    reports = []
    for op in ops:
        gemm = layer_gemm(program, op, activations)
        part = gemm.rows_of(0, pixels or gemm.m)
        reports.append(verify_gemm(part, rows, cols, simulator, build_root, dataflow))
    return reports
