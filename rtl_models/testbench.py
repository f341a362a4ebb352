"""cocotb testbench of mac_tile and ws_mac_tile: plays a job of GEMM tiles into the RTL and
records what leaves.

It knows nothing about the datapath's numbers: the job (written by rtl_models.tiles) holds
every bus value already packed, and the recording holds the raw output buses, so decoding
and the comparison with accel_sim live in one place, outside the simulator. What it does
own is the clocking: all inputs change and all outputs are sampled at falling edges, so
each rising edge consumes one input beat and each recorded beat is the state one rising
edge produced, identically on every simulator. Edge 0 is the one that takes a tile's
first operands; the recording names the edge after which each output was visible.

Environment: HWQ_RTL_JOB (the job JSON) and HWQ_RTL_RESULT (where to write the recording).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge

Beats = dict[str, list[list[int]]]  # recording -> [edge, valid mask, row tags, data] per beat
CLOCK_NS = 10
RESET_CYCLES = 2
INPUTS = {
    "os": ("in_valid", "in_first", "in_last", "act_in", "wgt_in"),
    "ws": ("wgt_load", "wgt_in", "in_valid", "act_in", "psum_in", "res_in"),
}
# (recording, valid, row tag, data); ws_mac_tile has no row tags: its outputs leave in pixel order
MONITORED = (("acc", "acc_valid", "acc_row", "acc_out"), ("y", "y_valid", "y_row", "y_out"))


async def reset(dut, inputs: list[str]) -> None:
    """Drive every input to zero (no X reaches a register), then hold reset."""
    for name in inputs:
        getattr(dut, name).value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, RESET_CYCLES)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


def record(beats: Beats, seen: dict[str, int], monitors: list, edge: int) -> None:
    """Append every output bus that is valid after `edge` to its recording."""
    for key, v, r, d in monitors:
        mask = int(v.value)  # int(): a one-column array has 1-bit buses (Logic, not LogicArray)
        if mask:
            beats[key].append([edge, mask, int(r.value) if r is not None else 0, int(d.value)])
            seen[key] += mask.bit_count()


def monitored(dut) -> list:
    return [(key, getattr(dut, v), getattr(dut, r, None), getattr(dut, d)) for key, v, r, d in MONITORED]


def done(seen: dict[str, int], outputs: dict[str, int]) -> bool:
    return all(seen[key] >= count for key, count in outputs.items())


async def play_tile(dut, tile: dict, timeout: int, drive: Callable[[int], None]) -> Beats:
    """Drive the tile's inputs for each edge (`drive(edge)`) and record every output beat
    until all its outputs left; then drop `in_valid`."""
    monitors = monitored(dut)
    beats: Beats = {key: [] for key, *_ in MONITORED}
    seen = dict.fromkeys(beats, 0)
    edge = 0
    while not done(seen, tile["outputs"]) and edge < timeout:
        drive(edge)
        await FallingEdge(dut.clk)
        record(beats, seen, monitors, edge)
        edge += 1
    dut.in_valid.value = 0
    return beats


def os_driver(dut, tile: dict, _previous: list[int]) -> Callable[[int], None]:
    """Element t of every row and column stream in cycle t, flagged first and last."""
    acts, wgts = tile["act"], tile["wgt"]
    valid, first, last = dut.in_valid, dut.in_first, dut.in_last
    act_in, wgt_in = dut.act_in, dut.wgt_in
    k = len(acts)

    def drive(edge: int) -> None:
        if edge < k:
            act_in.value, wgt_in.value = acts[edge], wgts[edge]
            valid.value, first.value, last.value = 1, int(edge == 0), int(edge == k - 1)
        elif edge == k:
            valid.value, first.value, last.value = 0, 0, 0

    return drive


def ws_driver(dut, tile: dict, previous: list[int]) -> Callable[[int], None]:
    """The weights one array row per cycle, then the pixels, each with every column's
    starting partial sum: the previous fold's sums (`previous`, as this testbench's output
    buffer kept them) or, on the first fold, none (the tile takes acc_init)."""
    wgts, acts, res = tile["wgt"], tile["act"], tile["res"]
    psums = previous if tile["psum"] == "previous" else [0] * len(acts)
    assert len(psums) == len(acts), f"the previous fold left {len(psums)} partial sums for {len(acts)} pixels"
    r, t = len(wgts), len(acts)

    def drive(edge: int) -> None:
        dut.wgt_load.value = int(edge < r)
        if edge < r:
            dut.wgt_in.value = wgts[edge]
        pixel = edge - r
        dut.in_valid.value = int(0 <= pixel < t)
        if 0 <= pixel < t:
            dut.act_in.value, dut.psum_in.value, dut.res_in.value = acts[pixel], psums[pixel], res[pixel]

    return drive


def buffered_partial_sums(beats: list[list[int]], cols: int, bits: int) -> list[int]:
    """The output buffer: each column's partial sums in the order they left, regrouped into
    one psum_in word per pixel (lane c for column c)."""
    mask = (1 << bits) - 1
    columns: list[list[int]] = [[] for _ in range(cols)]
    for _edge, valid, _row, data in beats:
        for c in range(cols):
            if valid >> c & 1:
                columns[c].append((data >> (c * bits)) & mask)
    return [sum(v << (c * bits) for c, v in enumerate(pixel)) for pixel in zip(*columns, strict=True)]


DRIVERS = {"os": os_driver, "ws": ws_driver}


@cocotb.test()
async def play_job(dut) -> None:
    """Run every tile of the job, one after the other, and write the recording."""
    with open(os.environ["HWQ_RTL_JOB"]) as f:
        job = json.load(f)
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    await reset(dut, [*job["settings"], *INPUTS[job["dataflow"]]])
    driver, recording, previous = DRIVERS[job["dataflow"]], [], []
    for tile in job["tiles"]:
        for name, value in tile["settings"].items():
            getattr(dut, name).value = value
        beats = await play_tile(dut, tile, job["timeout_cycles"], driver(dut, tile, previous))
        if job["dataflow"] == "ws":
            previous = buffered_partial_sums(beats["acc"], job["cols"], job["acc_bits"])
        recording.append(beats)
    with open(os.environ["HWQ_RTL_RESULT"], "w") as f:
        json.dump({"tiles": recording}, f)
