"""cocotb testbench of mac_tile: plays a job of GEMM tiles into the RTL and records what leaves.

It knows nothing about the datapath's numbers: the job (written by rtl_models.cosim) holds
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

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge

CLOCK_NS = 10
RESET_CYCLES = 2
TILE_INPUTS = ("in_valid", "in_first", "in_last", "act_in", "wgt_in")
MONITORED = (("acc", "acc_valid", "acc_row", "acc_out"), ("y", "y_valid", "y_row", "y_out"))


async def reset(dut, settings: list[str]) -> None:
    """Drive every input to zero (no X reaches a register), then hold reset."""
    for name in (*TILE_INPUTS, *settings):
        getattr(dut, name).value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, RESET_CYCLES)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


async def play_tile(dut, tile: dict, outputs: int, timeout: int) -> dict[str, list[list[int]]]:
    """Stream one tile's operands and record every output beat until all outputs left."""
    for name, value in tile["settings"].items():
        getattr(dut, name).value = value
    acts, wgts = tile["act"], tile["wgt"]
    valid, first, last = dut.in_valid, dut.in_first, dut.in_last
    act_in, wgt_in = dut.act_in, dut.wgt_in
    monitors = [(key, getattr(dut, v), getattr(dut, r), getattr(dut, d)) for key, v, r, d in MONITORED]
    beats: dict[str, list[list[int]]] = {key: [] for key, *_ in MONITORED}
    seen = dict.fromkeys(beats, 0)
    k = len(acts)
    edge = 0
    while min(seen.values()) < outputs and edge < timeout:
        if edge < k:
            act_in.value, wgt_in.value = acts[edge], wgts[edge]
            valid.value, first.value, last.value = 1, int(edge == 0), int(edge == k - 1)
        elif edge == k:
            valid.value, first.value, last.value = 0, 0, 0
        await FallingEdge(dut.clk)
        for key, v, r, d in monitors:
            mask = int(v.value)  # int(): a one-column array has 1-bit buses (Logic, not LogicArray)
            if mask:
                beats[key].append([edge, mask, int(r.value), int(d.value)])
                seen[key] += mask.bit_count()
        edge += 1
    valid.value = 0
    return beats


@cocotb.test()
async def play_job(dut) -> None:
    """Run every tile of the job, one after the other, and write the recording."""
    with open(os.environ["HWQ_RTL_JOB"]) as f:
        job = json.load(f)
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    await reset(dut, job["settings"])
    recording = [
        await play_tile(dut, tile, job["outputs_per_tile"], job["timeout_cycles"]) for tile in job["tiles"]
    ]
    with open(os.environ["HWQ_RTL_RESULT"], "w") as f:
        json.dump({"tiles": recording}, f)
