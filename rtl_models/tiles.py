"""A layer's GEMM as the bus beats of its tiles, per dataflow, and the recording back into outputs.

The testbench (rtl_models.testbench) knows nothing about the datapath's numbers: the job
written here holds every bus value already packed, and the recording holds the raw output
buses, so the operands' layout on the array and the decoding live in one place.

Output stationary (mac_tile): a tile is ROWS output pixels x COLS output channels, K in
time; tiles go output channels outer, pixels inner. Weight stationary (ws_mac_tile): a
tile is ROWS reduction indices x COLS output channels, every output pixel of the layer in
time; tiles go output channels outer, reduction folds inner, so that each fold's partial
sums come back (through the testbench, which plays the output buffer) as the next
fold's starting values, and only the last fold's sums are requantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from accel_sim import timing
from accel_sim.timing import Mapping, map_gemm

from .sim import OFFSET_BITS, SHIFT_BITS, ArrayConfig

if TYPE_CHECKING:
    from .cosim import Gemm

COLUMN_SETTINGS = ("acc_init", "mult", "res_mult", "res_shift", "shift", "offset", "zero_point")
SETTINGS = {"os": (*COLUMN_SETTINGS, "res_in"), "ws": (*COLUMN_SETTINGS, "first_fold", "last_fold")}


@dataclass
class RtlResult:
    """What the RTL produced for a GEMM, and how many cycles each tile took."""

    acc: np.ndarray  # (M, N) final accumulators
    acc_count: np.ndarray  # (M, N) how many times the RTL emitted each final accumulator
    y: np.ndarray
    y_count: np.ndarray
    acc_cycles: list[int]  # per tile: first input to last accumulator leaving the array
    y_cycles: list[int]  # per tile: first input to its last output (requantized, where it is)


def pack(values: np.ndarray, bits: int) -> int:
    """Lane i of the bus holds values[i] in two's complement, lane 0 in the low bits."""
    mask, word = (1 << bits) - 1, 0
    for i, v in enumerate(np.asarray(values).ravel().tolist()):
        word |= (v & mask) << (i * bits)
    return word


def lane(word: int, index: int, bits: int, signed: bool) -> int:
    v = (word >> (index * bits)) & ((1 << bits) - 1)
    return v - (1 << bits) if signed and v >> (bits - 1) else v


def padded(block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-fill an edge tile to the full array (the extra rows and columns are ignored)."""
    out = np.zeros(shape, dtype=np.int64)
    out[tuple(slice(0, s) for s in block.shape)] = block
    return out


def mapping(gemm: Gemm, config: ArrayConfig) -> Mapping:
    """The timing model's mapping of the GEMM onto the array: what the tiles lay along the
    rows and columns, and what they stream in time."""
    return map_gemm(timing.Gemm(gemm.m, gemm.n, gemm.k), config.rows, config.cols, config.dataflow)


def tile_origins(gemm: Gemm, config: ArrayConfig) -> list[tuple[int, int]]:
    """os: (first pixel, first channel) of each tile; ws: (first reduction index, first channel)."""
    mp = mapping(gemm, config)
    return [(i0, n0) for n0 in range(0, mp.along_cols, mp.cols) for i0 in range(0, mp.along_rows, mp.rows)]


def column_settings(gemm: Gemm, config: ArrayConfig, cols: slice) -> dict[str, int]:
    """acc0 and the requantization settings of the tile's output channels, packed."""
    lanes = {
        "acc_init": (gemm.acc_init, config.acc_bits),
        "mult": (gemm.mult, config.mult_bits),
        "res_mult": (gemm.res_mult, config.mult_bits),
        "res_shift": (gemm.res_shift, SHIFT_BITS),
        "shift": (gemm.shift, SHIFT_BITS),
        "offset": (gemm.offset, OFFSET_BITS),
        "zero_point": (gemm.zero_point, config.out_bits + 1),
    }
    return {name: pack(padded(values[cols], (config.cols,)), bits) for name, (values, bits) in lanes.items()}


def os_tile(gemm: Gemm, config: ArrayConfig, m0: int, n0: int) -> dict:
    r, c = config.rows, config.cols
    rows, cols = slice(m0, m0 + r), slice(n0, n0 + c)
    acts = padded(gemm.acts[rows], (r, gemm.k))
    weights = padded(gemm.weights[cols], (c, gemm.k))
    settings = column_settings(gemm, config, cols)
    settings["res_in"] = pack(padded(gemm.residual[rows, cols], (r, c)), config.res_bits)
    return {
        "settings": settings,
        "act": [pack(acts[:, t], config.act_bits) for t in range(gemm.k)],
        "wgt": [pack(weights[:, t], config.weight_bits) for t in range(gemm.k)],
        "outputs": {"acc": r * c, "y": r * c},
    }


def ws_tile(gemm: Gemm, config: ArrayConfig, k0: int, n0: int) -> dict:
    r, c, m = config.rows, config.cols, gemm.m
    cols = slice(n0, n0 + c)
    weights = padded(gemm.weights[cols, k0 : k0 + r], (c, r))
    acts = padded(gemm.acts[:, k0 : k0 + r], (m, r))
    residual = padded(gemm.residual[:, cols], (m, c))
    first, last = k0 == 0, k0 + r >= gemm.k
    settings = column_settings(gemm, config, cols) | {"first_fold": int(first), "last_fold": int(last)}
    return {
        "settings": settings,
        "wgt": [pack(weights[:, r - 1 - j], config.weight_bits) for j in range(r)],  # bottom row first
        "act": [pack(acts[i], config.act_bits) for i in range(m)],
        "res": [pack(residual[i], config.res_bits) for i in range(m)],
        "psum": "init" if first else "previous",
        "outputs": {"acc": m * c, "y": m * c if last else 0},
    }


def tile_job(gemm: Gemm, config: ArrayConfig) -> dict:
    """The testbench's input: every bus value of every tile, packed."""
    make = os_tile if config.dataflow == "os" else ws_tile
    return {
        "dataflow": config.dataflow,
        "settings": list(SETTINGS[config.dataflow]),
        "tiles": [make(gemm, config, i0, n0) for i0, n0 in tile_origins(gemm, config)],
        "cols": config.cols,
        "acc_bits": config.acc_bits,
        "timeout_cycles": mapping(gemm, config).temporal + 4 * (config.rows + config.cols) + 16,
    }


def place(beats: list, config: ArrayConfig, bits: int, signed: bool, where) -> list[tuple[int, int, int]]:
    """(m, n, value) of every output lane in `beats`; `where(column, row tag, order)` gives
    its (m, n), `order` being how many outputs that column emitted before it."""
    emitted = [0] * config.cols
    placed = []
    for _edge, mask, rows, data in beats:
        for c in range(config.cols):
            if mask >> c & 1:
                m, n = where(c, lane(rows, c, config.row_bits, False), emitted[c])
                placed.append((m, n, lane(data, c, bits, signed)))
                emitted[c] += 1
    return placed


def output_index(config: ArrayConfig, i0: int, n0: int) -> Callable[[int, int, int], tuple[int, int]]:
    """(column, row tag, order) -> (m, n) for a tile at (i0, n0): os outputs name their array
    row; ws outputs leave each column in pixel order."""
    if config.dataflow == "os":
        return lambda c, row, _order: (i0 + row, n0 + c)
    return lambda c, _row, order: (order, n0 + c)


def decode(recording: dict, gemm: Gemm, config: ArrayConfig) -> RtlResult:
    """Place every final output at its (m, n); count emissions; time each tile."""
    shape = (gemm.m, gemm.n)
    out = {key: (np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)) for key in ("acc", "y")}
    widths = {"acc": (config.acc_bits, True), "y": (config.out_bits, config.out_signed)}
    cycles: dict[str, list[int]] = {"acc": [], "y": []}
    for (i0, n0), tile in zip(tile_origins(gemm, config), recording["tiles"], strict=True):
        final = config.dataflow == "os" or i0 + config.rows >= gemm.k
        for key, (values, counts) in out.items() if final else ():
            for m, n, value in place(tile[key], config, *widths[key], output_index(config, i0, n0)):
                if m < gemm.m and n < gemm.n:
                    values[m, n] = value
                    counts[m, n] += 1
        acc_end = tile["acc"][-1][0] + 1 if tile["acc"] else 0
        cycles["acc"].append(acc_end)
        cycles["y"].append(tile["y"][-1][0] + 1 if tile["y"] else acc_end)
    return RtlResult(
        acc=out["acc"][0],
        acc_count=out["acc"][1],
        y=out["y"][0],
        y_count=out["y"][1],
        acc_cycles=cycles["acc"],
        y_cycles=cycles["y"],
    )


def tile_position(gemm: Gemm, config: ArrayConfig, m: int, n: int) -> str:
    """Which tile, and where on the array, output (m, n) was computed."""
    origins = tile_origins(gemm, config)
    if config.dataflow == "os":
        tile = origins.index((m - m % config.rows, n - n % config.cols))
        return f"tile {tile} (array row {m % config.rows}, column {n % config.cols})"
    last_fold = (gemm.k - 1) // config.rows * config.rows
    tile = origins.index((last_fold, n - n % config.cols))
    return f"tile {tile}, its last reduction fold (array column {n % config.cols}, pixel {m} of the stream)"
