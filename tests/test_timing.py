"""The timing model (accel_sim.timing) and the accelerator description (accel_sim.hardware).

Expected cycle counts are derived by hand in the comments from the microarchitecture that
tile_compute_cycles documents, or are SCALE-Sim v3.0.0's reported numbers for the same layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from accel_sim.hardware import Accelerator, EnergyTable, accelerator_from_dict, load_accelerator
from accel_sim.ir import (
    Accumulator,
    Conv2d,
    GlobalAvgPool,
    IRError,
    Program,
    Requant,
    TensorSpec,
    load_program,
    save_program,
)
from accel_sim.timing import (
    Gemm,
    Widths,
    conv_traffic,
    gemm_compute_cycles,
    program_timing,
    tile_compute_cycles,
)
from hwq.cli import main
from hwq.quant.model import QuantConfig

from .helpers import program_for

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(EXAMPLE_DIR.glob("*.toml"))
EDGE = EXAMPLE_DIR / "edge_16x16.toml"
BIG = 1 << 30


def array(rows: int, cols: int, dataflow: str, **kw) -> Accelerator:
    """An accelerator whose buffers and bandwidth never limit, unless `kw` says otherwise."""
    fields = dict(
        weight_buffer_bytes=BIG,
        input_buffer_bytes=BIG,
        output_buffer_bytes=BIG,
        dram_bytes_per_cycle=1e9,
        clock_mhz=100.0,
    )
    acc = Accelerator(rows=rows, cols=cols, dataflow=dataflow, **(fields | kw))
    acc.validate()
    return acc


def test_one_by_one_array_takes_one_cycle_per_product():
    # PE(0,0) takes element t in cycle t; K = 1: one cycle, first input to last output.
    assert tile_compute_cycles(1, 1, 1) == 1
    assert tile_compute_cycles(1, 1, 5, "os") == 5


@pytest.mark.parametrize(
    "m, n, k, expected",
    [
        # Exactly one tile on 4x4: PE(r,c) adds element t in cycle t + r + c; the last
        # product, t = 9 in PE(3,3), is in cycle 9 + 3 + 3 = 15, its output on the column
        # port in cycle 16: 16 cycles from the first input (K + R + C - 2 = 10 + 4 + 4 - 2).
        (4, 4, 10, 16),
        # 12 pixels x 8 channels: 3 row folds x 2 column folds = 6 tiles of 16 cycles.
        (12, 8, 10, 96),
        # 5 pixels: a full tile and a 1-row remainder that takes as long as a full one.
        (5, 4, 10, 32),
    ],
)
def test_output_stationary_cycles_on_4x4(m, n, k, expected):
    assert gemm_compute_cycles(Gemm(m, n, k), 4, 4, "os") == expected


@pytest.mark.parametrize(
    "m, n, k, expected",
    [
        # One tile on 4x4 (K = 4 rows, N = 4 columns): weights load in cycles 0..3; pixel m
        # reaches PE(r,c) in cycle 4 + m + r + c; the last, m = 9 in PE(3,3), in cycle 19,
        # leaving the column in cycle 20: T + 2R + C - 2 = 10 + 8 + 4 - 2 = 20.
        (10, 4, 4, 20),
        # K = 12, N = 8: 3 reduction folds x 2 column folds = 6 tiles of 20 cycles.
        (10, 8, 12, 120),
        # K = 5: a full fold and a 1-row remainder fold, 20 cycles each.
        (10, 4, 5, 40),
    ],
)
def test_weight_stationary_cycles_on_4x4(m, n, k, expected):
    assert gemm_compute_cycles(Gemm(m, n, k), 4, 4, "ws") == expected


def test_rows_and_columns_are_not_interchangeable():
    # 2 rows x 3 columns, one tile. os: K + R + C - 2 = 5 + 2 + 3 - 2 = 8.
    assert gemm_compute_cycles(Gemm(2, 3, 5), 2, 3, "os") == 8
    # ws (K = 2 on the rows, N = 3 on the columns, 5 pixels): T + 2R + C - 2 = 5 + 4 + 3 - 2 = 10;
    # rows and columns swapped would be 5 + 6 + 2 - 2 = 11.
    assert gemm_compute_cycles(Gemm(5, 3, 2), 2, 3, "ws") == 10
    # is (K = 2 on the rows, M = 3 pixels on the columns, N = 5 channels streamed): 10 as well.
    assert gemm_compute_cycles(Gemm(3, 5, 2), 2, 3, "is") == 10


@pytest.mark.parametrize(
    "dataflow, m, n, k, scalesim_reported",
    [
        # SCALE-Sim v3.0.0, 4x4 array, conv layers 6x6x1 -> 4 filters (3x3), 6x6x2 -> 10,
        # 8x8x2 -> 7, stride 1, no padding, buffers and bandwidth that never stall: printed by
        # `python bench/scalesim_compare.py --test-layers` (its TEST_LAYERS and CONFIG). Its
        # report is one cycle less than the length of its own demand matrices, which is what
        # we count (docs/timing.md).
        ("os", 16, 4, 9, 59),
        ("os", 16, 10, 18, 287),
        ("os", 36, 7, 18, 431),
        ("ws", 16, 4, 9, 77),
        ("ws", 16, 10, 18, 389),
        ("ws", 36, 7, 18, 459),
    ],
)
def test_layer_cycles_agree_with_scalesim(dataflow, m, n, k, scalesim_reported):
    assert gemm_compute_cycles(Gemm(m, n, k), 4, 4, dataflow) == scalesim_reported + 1


def test_bad_tile_arguments_are_refused():
    with pytest.raises(ValueError, match="dataflow"):
        tile_compute_cycles(4, 4, 4, "rs")
    with pytest.raises(ValueError, match=">= 1"):
        tile_compute_cycles(0, 4, 4)


W8 = Widths(weight=8, act=8, out=8, residual=8, acc=32)


def test_operands_cross_the_link_once_when_they_fit():
    # 16 pixels x 8 channels x K = 9 from a 1x6x6 input: weights 72 B, input 36 B, outputs 128 B.
    traffic = conv_traffic(array(4, 4, "os"), Gemm(16, 8, 9), 36, 0, W8)
    assert traffic.dram == 72 + 36 + 128


def test_weights_refetched_per_row_fold_when_a_column_of_tiles_does_not_fit():
    # os reuses a K x C = 9 x 4 = 36 B weight block across the 4 row folds; a 20 B buffer
    # cannot hold it, so all 72 B of weights come in once per row fold: 4 x 72 = 288.
    acc = array(4, 4, "os", weight_buffer_bytes=20)
    assert conv_traffic(acc, Gemm(16, 8, 9), 36, 0, W8).dram == 288 + 36 + 128


def test_input_refetched_per_column_fold_when_it_does_not_fit():
    # The 36 B input does not fit in 10 B: read once per column fold (8 channels / 4 = 2).
    acc = array(4, 4, "os", input_buffer_bytes=10)
    assert conv_traffic(acc, Gemm(16, 8, 9), 36, 0, W8).dram == 72 + 2 * 36 + 128


def test_weight_stationary_partial_sums_spill_when_the_output_buffer_is_small():
    # ws, K = 8 on 4 rows: 2 reduction folds. The 16 x 4 partial sums (32-bit: 256 B) do not
    # fit in 100 B, so they go to DRAM and come back once: 2 x 256 = 512 B.
    # Weights 32 B, input 32 B (2x4x4), outputs 64 B.
    gemm = Gemm(16, 4, 8)
    fits = conv_traffic(array(4, 4, "ws"), gemm, 32, 0, W8)
    spills = conv_traffic(array(4, 4, "ws", output_buffer_bytes=100), gemm, 32, 0, W8)
    assert fits.dram == 32 + 32 + 64
    assert spills.dram == fits.dram + 512


def conv_and_pool() -> Program:
    """A 3x3 conv of a 1x6x6 8-bit input to 4 channels (4-bit weights, 8-bit 4x4 outputs),
    then a GlobalAvgPool: small enough to time by hand."""
    ones, zeros = np.ones(4, dtype=np.int64), np.zeros(4, dtype=np.int64)
    identity = Requant(mult=ones, shift=zeros, offset=zeros)
    tensors = {
        "x": TensorSpec("x", (1, 6, 6), 8, False),
        "y": TensorSpec("y", (4, 4, 4), 8, False),
        "p": TensorSpec("p", (4, 1, 1), 8, False),
    }
    weight = np.ones((4, 1, 3, 3), dtype=np.int64)
    ops = [
        Conv2d("conv", "x", "y", weight, 4, zeros, stride=1, padding=0, requant=identity),
        GlobalAvgPool("pool", "y", "p", identity),
    ]
    return Program(tensors, ops, "x", "p")


def test_totals_of_a_small_program_by_hand():
    # conv on 4x4 os: M = 16 pixels, N = 4, K = 9: 4 row folds x 1 column fold = 4 tiles of
    # K + R + C - 2 = 15 cycles: 60. DRAM: weights 36 x 4 bits = 18 B, input 36 B, outputs
    # 64 B: 118 B. The pool: 4 adders sum 64 elements in 16 cycles; input 64 B, output 4 B.
    fast = program_timing(conv_and_pool(), array(4, 4, "os")).total_json()
    assert (fast["cycles"], fast["stall_cycles"], fast["macs"], fast["dram_bytes"]) == (76, 0, 576, 186)
    assert fast["latency_s"] == pytest.approx(76 / 100e6)  # the 100 MHz clock of array()
    assert fast["fps"] == pytest.approx(100e6 / 76)
    assert fast["utilization"] == pytest.approx(576 / (16 * 76))
    # At 1 byte per cycle both layers wait for DRAM: the conv 118 cycles, the pool 68.
    slow = program_timing(conv_and_pool(), array(4, 4, "os", dram_bytes_per_cycle=1.0))
    assert [(layer.cycles, layer.stall_cycles) for layer in slow.layers] == [(118, 58), (68, 52)]
    assert slow.total_json()["cycles"] == 186


def test_mac_energy_scales_with_operand_and_accumulator_widths():
    table = EnergyTable()
    # Horowitz 2014: an 8-bit multiply is 0.2 pJ, a 32-bit add 0.1 pJ.
    assert table.mac_pj(8, 8, 32) == pytest.approx(0.3)
    # 4 x 8 bits: half the partial products (0.1 pJ); a 16-bit accumulator: half the add.
    assert table.mac_pj(4, 8, 16) == pytest.approx(0.1 + 0.05)


def test_resnet20_totals_and_json():
    program = program_for(QuantConfig(4, 8))
    acc = load_accelerator(EDGE)
    timing = program_timing(program, acc)
    assert [layer.name for layer in timing.layers] == [op.name for op in program.ops]
    total = timing.total_json()
    # MACs = pixels x out channels x C_in*k*k: conv1 1024*16*27 = 442,368; layer1 6 x 1024*16*144
    # = 14,155,776; layer2 256*32*144 + 5 x 256*32*288 = 12,976,128; layer3 64*64*288 +
    # 5 x 64*64*576 = 12,976,128; fc 10*64 = 640.
    assert total["macs"] == 40_551_040
    pool = next(layer for layer in timing.layers if layer.kind == "avgpool")
    assert pool.macs == 0 and pool.utilization == 0 and pool.traffic.dram > 0


def test_a_batch_fetches_the_weights_once():
    program = program_for(QuantConfig(4, 8))
    acc = array(16, 16, "os")
    one, four = program_timing(program, acc, 1), program_timing(program, acc, 4)
    # Every activation, output and residual is 8 or 32 bits wide, so they scale exactly by 4.
    weights = sum(math.ceil(op.out_channels * op.reduction * op.weight_bits / 8) for op in program.conv_ops())
    assert four.total_json()["dram_bytes"] == 4 * one.total_json()["dram_bytes"] - 3 * weights


def test_array_sweep_cycles_fall_and_small_layer_utilization_falls():
    program = program_for(QuantConfig(4, 8))
    sweep = [program_timing(program, array(n, n, "os")) for n in (8, 16, 32, 64)]
    cycles = [t.cycles for t in sweep]
    assert cycles == sorted(cycles, reverse=True) and len(set(cycles)) == len(cycles)
    fc = [next(layer for layer in t.layers if layer.name == "fc").utilization for t in sweep]
    assert fc == sorted(fc, reverse=True) and len(set(fc)) == len(fc)


def test_fixed_precision_hardware_refuses_wider_program_operands():
    program = program_for(QuantConfig(4, 8))
    with pytest.raises(IRError, match="conv1.*precision.act_bits is 4"):
        program_timing(program, array(8, 8, "os", act_bits=4))


# ---------------------------------------------------------------------------------------
# The accelerator description


def minimal_doc() -> dict:
    return {
        "array": {"rows": 8, "cols": 8, "dataflow": "os", "clock_mhz": 200},
        "buffers": {"weight_bytes": 4096, "input_bytes": 4096, "output_bytes": 4096},
        "dram": {"bytes_per_cycle": 4},
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_shipped_examples_load(path):
    acc = load_accelerator(path)
    assert acc.name == path.stem
    assert isinstance(acc.accumulator(), Accumulator)


def test_accumulator_and_widths_for_the_trainer():
    doc = minimal_doc() | {
        "accumulator": {"bits": 20, "overflow": "saturate"},
        "precision": {"weight_bits": 4, "act_bits": 8},
    }
    acc = accelerator_from_dict(doc)
    assert acc.accumulator() == Accumulator(20, "saturate")
    assert (acc.weight_bits, acc.act_bits) == (4, 8)
    assert accelerator_from_dict(minimal_doc()).accumulator() == Accumulator(32, "wrap")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["array"].pop("rows"), "array.rows"),
        (lambda d: d["array"].update(rows=0), "array.rows"),
        (lambda d: d["array"].update(cols="8"), "array.cols"),
        (lambda d: d["array"].update(dataflow="rs"), "array.dataflow"),
        (lambda d: d["array"].update(clock_mhz=-1), "array.clock_mhz"),
        (lambda d: d["array"].update(row=8), "array.row"),
        (lambda d: d["buffers"].update(weight_bytes=-4), "buffers.weight_bytes"),
        (lambda d: d["dram"].update(bytes_per_cycle=0), "dram.bytes_per_cycle"),
        (lambda d: d.update(accumulator={"bits": 48}), "accumulator.bits"),
        (lambda d: d.update(accumulator={"overflow": "clip"}), "accumulator.overflow"),
        (lambda d: d.update(precision={"weight_bits": 1}), "precision.weight_bits"),
        (lambda d: d.update(energy={"dram_pj_per_byte": -1.0}), "energy.dram_pj_per_byte"),
        (lambda d: d.update(energy={"sram_pj": 1.0}), "energy.sram_pj"),
        (lambda d: d.update(memory={}), "memory"),
        # 8 x 8-bit products need 16 bits: a 12-bit accumulator is inconsistent with them.
        (
            lambda d: d.update(accumulator={"bits": 12}, precision={"weight_bits": 8, "act_bits": 8}),
            "accumulator.bits",
        ),
        # ws holds an 8x8 tile of 8-bit weights (64 B) in the array: a 32 B buffer cannot load it.
        (
            lambda d: (
                d.update(precision={"weight_bits": 8})
                or d["array"].update(dataflow="ws")
                or d["buffers"].update(weight_bytes=32)
            ),
            "buffers.weight_bytes",
        ),
    ],
)
def test_config_errors_name_the_field(edit, field):
    doc = minimal_doc()
    edit(doc)
    with pytest.raises(IRError, match=field.replace(".", r"\.")):
        accelerator_from_dict(doc)


@pytest.mark.parametrize(
    "dataflow, buffer, operand, bits, need",
    [
        # One 8x8 tile of the operand the dataflow holds, at precision 4-bit weights, 8-bit activations:
        ("os", "output_bytes", "outputs", 8, 64),  # 64 outputs x 8 bits, drained from the PEs
        ("ws", "weight_bytes", "weights", 4, 32),  # 64 weights x 4 bits, loaded into the PEs
        ("is", "input_bytes", "activations", 8, 64),  # 64 activations x 8 bits
    ],
)
def test_each_dataflow_needs_one_tile_of_its_stationary_operand(dataflow, buffer, operand, bits, need):
    doc = minimal_doc() | {"precision": {"weight_bits": 4, "act_bits": 8}}
    doc["array"]["dataflow"] = dataflow
    doc["buffers"][buffer] = need
    accelerator_from_dict(doc)
    doc["buffers"][buffer] = need - 1
    with pytest.raises(IRError) as caught:
        accelerator_from_dict(doc)
    assert str(caught.value) == (
        f"buffers.{buffer} = {need - 1} is smaller than one 8x8 tile of the {dataflow} dataflow's "
        f"stationary {operand} ({need} bytes at {bits} bits)"
    )


def test_one_byte_buffers_are_refused_without_precision():
    # The case: an os array with 1-byte buffers. Unset precision: 2-bit outputs at
    # least, so one 8x8 tile needs 64 x 2 / 8 = 16 bytes.
    doc = minimal_doc()
    doc["buffers"] = {"weight_bytes": 1, "input_bytes": 1, "output_bytes": 1}
    with pytest.raises(IRError, match=r"buffers\.output_bytes = 1 .* \(16 bytes at 2 bits\)"):
        accelerator_from_dict(doc)


def test_unreadable_file_is_one_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[array\nrows = 8\n")
    with pytest.raises(IRError, match="bad.toml is not a readable TOML file"):
        load_accelerator(bad)
    with pytest.raises(IRError, match="does not exist"):
        load_accelerator(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------------------
# hwq sim


@pytest.fixture(scope="module")
def ir_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "w4a8.ir"
    save_program(program_for(QuantConfig(4, 8)), path)
    return path


def test_hwq_sim_writes_json_and_csv(ir_file, tmp_path, capsys):
    out_json, out_csv = tmp_path / "sim.json", tmp_path / "sim.csv"
    hw = str(EDGE)
    args = ["--ir", str(ir_file), "--json", str(out_json), "--csv", str(out_csv)]
    assert main(["sim", "--hw", hw, *args]) == 0
    report = json.loads(out_json.read_text())
    assert len(report["layers"]) == 21
    for layer in report["layers"]:
        assert {"name", "cycles", "utilization", "dram_bytes", "energy_pj"} <= set(layer)
    assert {"cycles", "latency_s", "fps", "energy_pj"} <= set(report["total"])
    timing = program_timing(load_program(ir_file), load_accelerator(EDGE))
    assert report["total"] == timing.total_json()
    assert [layer["cycles"] for layer in report["layers"]] == [layer.cycles for layer in timing.layers]
    assert out_csv.read_text().splitlines()[0].startswith("name,kind,m,n,k,")
    assert len(out_csv.read_text().splitlines()) == 22
    printed = capsys.readouterr().out
    assert f"{report['total']['cycles']:,}" in printed and "frames/s" in printed


def test_hwq_sim_bad_config_is_one_line(ir_file, tmp_path, capsys):
    hw = tmp_path / "hw.toml"
    hw.write_text(EDGE.read_text().replace('dataflow = "os"', 'dataflow = "rowstationary"'))
    assert main(["sim", "--hw", str(hw), "--ir", str(ir_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "array.dataflow" in err


def test_hwq_sim_needs_a_program(tmp_path, capsys):
    assert main(["sim", "--hw", str(EDGE)]) == 2
    assert "--ir or --checkpoint" in capsys.readouterr().err
