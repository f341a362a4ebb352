"""Analytical timing model of a systolic MAC array, in SCALE-Sim's conventions.

Cycles, utilization, off-chip traffic and energy of every layer of an IR program on an
accelerator described by accel_sim.hardware.Accelerator. Each quantity is a closed formula
per tile, so a whole ResNet-20 takes well under a millisecond to model, and the per-tile
cycle count lives in one function (tile_compute_cycles) that the RTL is checked against.
docs/timing.md states the equations, the assumptions and where the model is approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import DATAFLOWS, Accelerator
from .ir import Conv2d, GlobalAvgPool, IRError, Op, Program, TensorSpec


def tile_compute_cycles(rows: int, cols: int, temporal: int, dataflow: str = "os") -> int:
    """Cycles one tile (SCALE-Sim: one "fold") occupies a rows x cols systolic array.

    This single formula is what the RTL is measured against, so the microarchitecture it
    assumes is stated exactly. Cycles are numbered from 0; "in cycle n" means between
    rising edges n and n+1, and a register written in cycle n holds its value in n+1.

    Output stationary ("os", `temporal` = K, the reduction length). Array row r holds
    output pixel r of the tile, column c output channel c. Activation a[r][t] (t = 0..K-1,
    the datapath's accumulation order) enters row r at the left edge in cycle t + r and
    weight w[c][t] enters column c at the top edge in cycle t + c (the skew: row r / column
    c is delayed by r / c cycles); both move one PE per cycle (right / down), so PE(r, c)
    multiplies and accumulates element t in cycle t + r + c, starting from acc0 at t = 0.
    PE(r, c) adds its last product in cycle K - 1 + r + c; the PEs of one column therefore
    finish on consecutive cycles, and one output port per column carries row r's
    accumulator in cycle K + r + c (no shift-out drain). The last output, PE(R-1, C-1)'s,
    is on its port in cycle K + R + C - 2:  cycles = K + R + C - 2.

    Weight stationary ("ws", `temporal` = the output pixels streamed, T). Array row r
    holds reduction index r, column c output channel c. Weights enter at the top, one
    array row per cycle, bottom row first, in cycles 0..R-1. Activation x[m][r] enters
    row r at the left in cycle R + m + r and moves right one PE per cycle; partial sums
    move down one PE per cycle, so PE(r, c) adds its product for pixel m in cycle
    R + m + r + c and the sum for (m, c) leaves the bottom of column c in cycle
    2R + m + c. The last leaves in cycle 2R + T + C - 2:  cycles = T + 2R + C - 2.
    Input stationary ("is") is the same array with activations held and weights
    streamed (`temporal` = output channels), so it has the same formula as "ws".

    "Enters row r in cycle t + r" is what the array's own skew registers produce when the
    driver presents element t of every row and column stream in cycle t (rtl_models'
    mac_array), or what SCALE-Sim's skewed SRAM reads produce; either way the first operand
    is presented in cycle 0. The returned count is (cycle in which the last output is on
    its output port) - (cycle in which the first operand is presented): first input to
    last output. For R = C = K = 1: operands in cycle 0, the sum on the port in cycle 1,
    1 cycle. It is also the period of back-to-back tiles (the next tile's first operand may
    be presented in the cycle the last output leaves), which is how SCALE-Sim v2/v3
    (systolic_compute_os.py / _ws.py / _is.py: demand matrices of exactly these many rows
    per fold) runs consecutive folds. Fill and drain are the R + C - 2 (ws/is: 2R + C - 2)
    terms.
    """
    if min(rows, cols, temporal) < 1:
        raise ValueError(f"rows, cols and temporal must be >= 1, got {rows}, {cols}, {temporal}")
    if dataflow == "os":
        return temporal + rows + cols - 2
    if dataflow in ("ws", "is"):
        return temporal + 2 * rows + cols - 2
    raise ValueError(f"dataflow {dataflow!r} not in {DATAFLOWS}")


@dataclass(frozen=True)
class Gemm:
    """A conv layer in im2col form: M = output pixels x batch, N = output channels,
    K = C_in * kh * kw (a fully connected layer is a 1x1 conv on a 1x1 map: M = batch)."""

    m: int
    n: int
    k: int

    @property
    def macs(self) -> int:
        return self.m * self.n * self.k


@dataclass(frozen=True)
class Mapping:
    """Where a GEMM sits on a rows x cols array (SCALE-Sim's mapping): the extent laid along
    the array's rows, the one along its columns, and the one each tile streams in time."""

    along_rows: int
    along_cols: int
    temporal: int
    rows: int
    cols: int
    dataflow: str

    @property
    def row_folds(self) -> int:
        return math.ceil(self.along_rows / self.rows)

    @property
    def col_folds(self) -> int:
        return math.ceil(self.along_cols / self.cols)

    @property
    def tiles(self) -> int:
        return self.row_folds * self.col_folds

    @property
    def mapping_efficiency(self) -> float:
        """Share of the PEs that hold real work, averaged over the tiles."""
        return self.along_rows * self.along_cols / (self.tiles * self.rows * self.cols)

    @property
    def tile_cycles(self) -> int:
        return tile_compute_cycles(self.rows, self.cols, self.temporal, self.dataflow)

    @property
    def compute_cycles(self) -> int:
        """Tiles run back to back and a partial tile takes as long as a full one (its idle
        PEs still sit in the skew), as in SCALE-Sim and the RTL."""
        return self.tiles * self.tile_cycles


def map_gemm(gemm: Gemm, rows: int, cols: int, dataflow: str) -> Mapping:
    """os: pixels x channels on the array, K in time; ws: K x channels, pixels in time;
    is: K x pixels, channels in time."""
    extents = {"os": (gemm.m, gemm.n, gemm.k), "ws": (gemm.k, gemm.n, gemm.m), "is": (gemm.k, gemm.m, gemm.n)}
    if dataflow not in extents:
        raise ValueError(f"dataflow {dataflow!r} not in {DATAFLOWS}")
    return Mapping(*extents[dataflow], rows, cols, dataflow)


def gemm_compute_cycles(gemm: Gemm, rows: int, cols: int, dataflow: str) -> int:
    return map_gemm(gemm, rows, cols, dataflow).compute_cycles


def nbytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


@dataclass(frozen=True)
class Widths:
    """Bits each operand of a layer is stored, moved and multiplied at."""

    weight: int
    act: int
    out: int
    residual: int
    acc: int


@dataclass(frozen=True)
class Traffic:
    """Bytes a layer moves over the off-chip link, and through the on-chip buffers (the
    array's reads and writes plus the buffer side of every DRAM transfer)."""

    dram: int
    buffer: int


def fetches(reused: int, buffer: int, outer_iterations: int) -> int:
    """Times an operand crosses the off-chip link: once if the part of it that the inner
    loop reuses fits in its buffer, once per outer-loop iteration otherwise."""
    return 1 if reused <= buffer else outer_iterations


def conv_traffic(acc: Accelerator, gemm: Gemm, input_elems: int, residual_elems: int, w: Widths) -> Traffic:
    """SCALE-Sim's loop order: column folds outside, row folds inside. ws/is partial sums
    are written to the output buffer and read back between reduction folds, and spill to
    DRAM when one column of tiles' worth does not fit there. Inputs move as the raw tensor
    (the buffer's address generator does im2col), not as the K x M matrix."""
    mp = map_gemm(gemm, acc.rows, acc.cols, acc.dataflow)
    m, n, k = gemm.m, gemm.n, gemm.k
    weights, inputs = nbytes(n * k, w.weight), nbytes(input_elems, w.act)
    outputs, residual = nbytes(m * n, w.out), nbytes(residual_elems, w.residual)
    psums = 2 * (mp.row_folds - 1) * nbytes(m * n, w.acc)
    if acc.dataflow == "os":  # row folds split the pixels, not K: no partial sums
        weight_reads, input_reads = mp.row_folds, mp.col_folds  # times the array reads each element
        weight_tile = nbytes(k * min(acc.cols, n), w.weight)
        weight_fetches = fetches(weight_tile, acc.weight_buffer_bytes, mp.row_folds)
        input_fetches = fetches(inputs, acc.input_buffer_bytes, mp.col_folds)
        psums = psum_tile = 0
    elif acc.dataflow == "ws":
        weight_reads, input_reads = 1, mp.col_folds
        weight_fetches = 1
        input_fetches = fetches(inputs, acc.input_buffer_bytes, mp.col_folds)
        psum_tile = nbytes(m * min(acc.cols, n), w.acc)
    else:
        weight_reads, input_reads = mp.col_folds, 1
        weight_fetches = fetches(weights, acc.weight_buffer_bytes, mp.col_folds)
        input_fetches = 1
        psum_tile = nbytes(n * min(acc.cols, m), w.acc)
    spilled = psums if psum_tile > acc.output_buffer_bytes else 0
    dram = weights * weight_fetches + inputs * input_fetches + spilled + outputs + residual
    array_side = nbytes(n * k * weight_reads, w.weight) + nbytes(m * k * input_reads, w.act)
    return Traffic(dram, array_side + psums + outputs + residual + dram)


@dataclass(frozen=True)
class LayerTiming:
    """One op on the accelerator, for the whole batch."""

    name: str
    kind: str
    gemm: Gemm | None  # None for ops that do not run on the MAC array
    mapping: Mapping | None
    compute_cycles: int
    stall_cycles: int
    pes: int
    traffic: Traffic
    arithmetic_energy_pj: float
    buffer_energy_pj: float
    dram_energy_pj: float

    @property
    def cycles(self) -> int:
        return self.compute_cycles + self.stall_cycles

    @property
    def macs(self) -> int:
        return self.gemm.macs if self.gemm else 0

    @property
    def utilization(self) -> float:
        """Useful MACs over what the array could do in the layer's cycles, stalls included
        (SCALE-Sim's "overall utilization")."""
        return self.macs / (self.pes * self.cycles) if self.cycles else 0.0

    @property
    def energy_pj(self) -> float:
        return self.arithmetic_energy_pj + self.buffer_energy_pj + self.dram_energy_pj

    def to_json(self) -> dict:
        """Flat, so that it is also a CSV row."""
        gemm, mp = self.gemm, self.mapping
        return {
            "name": self.name,
            "kind": self.kind,
            "m": gemm.m if gemm else None,
            "n": gemm.n if gemm else None,
            "k": gemm.k if gemm else None,
            "macs": self.macs,
            "row_folds": mp.row_folds if mp else None,
            "col_folds": mp.col_folds if mp else None,
            "tiles": mp.tiles if mp else None,
            "tile_cycles": mp.tile_cycles if mp else None,
            "compute_cycles": self.compute_cycles,
            "stall_cycles": self.stall_cycles,
            "cycles": self.cycles,
            "utilization": self.utilization,
            "mapping_efficiency": mp.mapping_efficiency if mp else None,
            "dram_bytes": self.traffic.dram,
            "buffer_bytes": self.traffic.buffer,
            "energy_pj": self.energy_pj,
            "arithmetic_energy_pj": self.arithmetic_energy_pj,
            "buffer_energy_pj": self.buffer_energy_pj,
            "dram_energy_pj": self.dram_energy_pj,
        }


@dataclass(frozen=True)
class ProgramTiming:
    """Every layer of a program on one accelerator, and the totals."""

    accelerator: Accelerator
    batch: int
    layers: list[LayerTiming]

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def latency_s(self) -> float:
        return self.cycles / (self.accelerator.clock_mhz * 1e6)

    @property
    def fps(self) -> float:
        return self.batch / self.latency_s

    @property
    def energy_pj(self) -> float:
        return sum(layer.energy_pj for layer in self.layers)

    def total_json(self) -> dict:
        macs = sum(layer.macs for layer in self.layers)
        return {
            "batch": self.batch,
            "cycles": self.cycles,
            "compute_cycles": sum(layer.compute_cycles for layer in self.layers),
            "stall_cycles": sum(layer.stall_cycles for layer in self.layers),
            "latency_s": self.latency_s,
            "fps": self.fps,
            "macs": macs,
            "utilization": macs / (self.accelerator.pes * self.cycles),
            "dram_bytes": sum(layer.traffic.dram for layer in self.layers),
            "energy_pj": self.energy_pj,
            "energy_per_inference_pj": self.energy_pj / self.batch,
        }


def operand_bits(bits: int, hw_bits: int | None, layer: str, what: str, key: str) -> int:
    """The width an operand runs at: the hardware's when it has a fixed one, which must be
    at least the program's (a narrower operand is extended, a wider one cannot run)."""
    if hw_bits is None:
        return bits
    if bits > hw_bits:
        raise IRError(f"layer {layer!r} has {bits}-bit {what}; the accelerator's {key} is {hw_bits}")
    return hw_bits


def stored_bits(spec: TensorSpec, hw_act_bits: int | None) -> int:
    """Activations are stored at the hardware's width; wider tensors (the logits) as they are."""
    return max(spec.bits, hw_act_bits or 0)


def finish_layer(
    acc: Accelerator,
    op: Op,
    compute: int,
    traffic: Traffic,
    arithmetic_pj: float,
    gemm: Gemm | None = None,
    mapping: Mapping | None = None,
) -> LayerTiming:
    """Stalls and energy: DRAM transfers overlap compute (double-buffered prefetch), so a
    layer takes max(compute, DRAM bytes / bandwidth) cycles."""
    memory_cycles = math.ceil(traffic.dram / acc.dram_bytes_per_cycle)
    return LayerTiming(
        name=op.name,
        kind=op.kind,
        gemm=gemm,
        mapping=mapping,
        compute_cycles=compute,
        stall_cycles=max(0, memory_cycles - compute),
        pes=acc.pes,
        traffic=traffic,
        arithmetic_energy_pj=arithmetic_pj,
        buffer_energy_pj=traffic.buffer * acc.energy.buffer_pj_per_byte,
        dram_energy_pj=traffic.dram * acc.energy.dram_pj_per_byte,
    )


def conv_gemm(program: Program, op: Conv2d, batch: int) -> Gemm:
    _, h, w = program.tensors[op.output].shape
    return Gemm(m=h * w * batch, n=op.out_channels, k=op.reduction)


def conv_timing(program: Program, op: Conv2d, acc: Accelerator, batch: int) -> LayerTiming:
    x, y = program.tensors[op.input], program.tensors[op.output]
    res = program.tensors[op.requant.residual.input] if op.requant.residual else None
    widths = Widths(
        weight=operand_bits(op.weight_bits, acc.weight_bits, op.name, "weights", "precision.weight_bits"),
        act=operand_bits(x.bits, acc.act_bits, op.name, "activations", "precision.act_bits"),
        out=stored_bits(y, acc.act_bits),
        residual=stored_bits(res, acc.act_bits) if res else 0,
        acc=acc.acc_bits,
    )
    residual_elems = res.channels * y.shape[1] * y.shape[2] * batch if res else 0  # subsampled by stride
    gemm = conv_gemm(program, op, batch)
    mapping = map_gemm(gemm, acc.rows, acc.cols, acc.dataflow)
    traffic = conv_traffic(acc, gemm, math.prod(x.shape) * batch, residual_elems, widths)
    mac_pj = acc.energy.mac_pj(widths.weight, widths.act, acc.acc_bits)
    return finish_layer(acc, op, mapping.compute_cycles, traffic, gemm.macs * mac_pj, gemm, mapping)


def avgpool_timing(program: Program, op: GlobalAvgPool, acc: Accelerator, batch: int) -> LayerTiming:
    """Not a GEMM: the output stage's adders (one per array column) sum each channel's map
    while the array idles, one element per adder per cycle."""
    x, y = program.tensors[op.input], program.tensors[op.output]
    elems = math.prod(x.shape) * batch
    inputs = nbytes(elems, stored_bits(x, acc.act_bits))
    outputs = nbytes(y.channels * batch, stored_bits(y, acc.act_bits))
    traffic = Traffic(inputs + outputs, 2 * (inputs + outputs))  # buffers: DRAM side and adder side
    compute = math.ceil(elems / acc.cols)
    return finish_layer(acc, op, compute, traffic, elems * acc.energy.add_pj(acc.acc_bits))


def program_timing(program: Program, accelerator: Accelerator, batch: int = 1) -> ProgramTiming:
    """Every op of `program` on `accelerator`, run layer by layer: each layer reads its
    inputs from DRAM and writes its outputs back (SCALE-Sim's model of a network)."""
    if batch < 1:
        raise IRError(f"batch must be >= 1, got {batch}")
    layers = []
    for op in program.ops:
        if isinstance(op, Conv2d):
            layers.append(conv_timing(program, op, accelerator, batch))
        else:
            layers.append(avgpool_timing(program, op, accelerator, batch))
    return ProgramTiming(accelerator, batch, layers)
