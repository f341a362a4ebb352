"""The Verilog MAC array (rtl_models/) against accel_sim, through cocotb, on Icarus and Verilator.

Every expected value comes from accel_sim: one-op programs for synthetic GEMMs, the
tensors a whole-program run records for real ResNet-20 layers. A simulator that is not
installed skips its tests with the reason; CI installs both. A Verilator build costs 20 s
(4x4) to 70 s (8x8), so the default suite builds two arrays per simulator and reuses them:
4x4 with a 16-bit wrapping accumulator (random extremes and real ResNet-20 tiles) and 3x5
saturating (non-square, so that a swap of rows and columns cannot go unnoticed).
8x8 and 16x16 arrays, the program's own 32-bit accumulator and whole layers are marked slow
(`make test-slow`); the CLI test runs the 32-bit case on Icarus.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from accel_sim.ir import Accumulator, Requant, TensorSpec, save_program
from accel_sim.timing import tile_compute_cycles
from hwq.cli import main
from hwq.quant.model import QuantConfig
from rtl_models import area, cosim, cycles, sim

from . import reference_datapath as reference
from .helpers import calibration_images, program_for, write_cifar_batches

BUILD_ROOT = Path(__file__).resolve().parents[1] / "sim_build"
DATAFLOWS = ("os", "ws")
REAL_LAYERS = ("conv1", "layer2.0.conv2", "layer3.2.conv2")  # zero-point padding; option-A shortcut; deepest


@dataclass(frozen=True)
class ExtremeCase:
    """An array build and the operand widths its random GEMMs are drawn at the ends of."""

    rows: int
    cols: int
    weight_bits: int
    act: TensorSpec
    out: TensorSpec
    accumulator: Accumulator


def spec(bits: int, signed: bool, zero_point: int = 0) -> TensorSpec:
    return TensorSpec("t", (1, 1, 1), bits, signed, (zero_point,))


WRAP = ExtremeCase(4, 4, 4, spec(8, False, 128), spec(8, False), Accumulator(16, "wrap"))
SATURATE = ExtremeCase(3, 5, 8, spec(6, True, -3), spec(8, True), Accumulator(16, "saturate"))
EXTREME_CASES = {"wrap-4x4-w4a8u": WRAP, "saturate-3x5-w8a6s": SATURATE}


def at_the_ends(lo: int, hi: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Mostly lo, hi and their neighbours; a quarter uniform in between."""
    ends = np.array(sorted({lo, lo + 1, hi - 1, hi}))
    return np.where(rng.random(shape) < 0.75, rng.choice(ends, shape), rng.integers(lo, hi + 1, shape))


def extreme_gemm(case: ExtremeCase, m: int, n: int, k: int, seed: int = 0) -> cosim.Gemm:
    """A GEMM whose operands, initial values and requant settings sit at the ends of their ranges.

    Rows 0-2 are built to overflow the accumulator: all-positive products, all-negative
    products, and positive then negative (saturation there depends on the order).
    """
    rng = np.random.default_rng(seed)
    act, out, acc = case.act, case.out, case.accumulator
    wmin, wmax = -(1 << (case.weight_bits - 1)), (1 << (case.weight_bits - 1)) - 1
    acts = at_the_ends(act.qmin, act.qmax, (m, k), rng)
    weights = at_the_ends(wmin, wmax, (n, k), rng)
    acts[:3] = act.qmax
    weights[:3] = wmax
    weights[1] = wmin
    weights[2, k // 2 :] = wmin
    bias = rng.choice([0, acc.hi, acc.lo - 1, 1 << 40, -(1 << 40)], n) + rng.integers(-99, 100, n)
    limit = (1 << 15) - 1
    requant = Requant(
        mult=rng.choice([limit, -limit, 1, -1, 0, 12345], n),
        shift=rng.choice([0, 1, 13, 31, 48], n),
        offset=rng.choice([0, 1 << 59, -(1 << 59), 777], n),
    )
    zero_point = rng.choice([out.qmin, 0, out.qmax], n)
    # zp_out << shift is part of the requantization bound (docs/datapath.md): a 32-bit output
    # at its ends with a large shift would exceed it, so |zp| << shift is kept within 2**59.
    zero_point = np.sign(zero_point) * np.minimum(np.abs(zero_point), (1 << 59) >> requant.shift)
    out = replace(out, zero_point=tuple(int(z) for z in zero_point))
    return cosim.gemm_case(acts, weights, act, case.weight_bits, bias, requant, out, acc)


def assert_covers_overflow_and_clamps(gemm: cosim.Gemm) -> None:
    """The data does what the test claims: accumulators overflow, outputs clamp both ways."""
    acc = gemm.accumulator
    exact = gemm.acts @ gemm.weights.T
    overflowed = (gemm.expected_acc - gemm.acc_init) != exact
    assert overflowed.sum() >= 3, "the extreme operands must overflow the accumulator"
    if acc.overflow == "saturate":
        assert np.any(np.clip(exact + gemm.acc_init, acc.lo, acc.hi) != gemm.expected_acc), (
            "some sum must saturate and then come back (order-dependent saturation)"
        )
    assert {gemm.out.qmin, gemm.out.qmax} <= set(gemm.expected_y.ravel().tolist())


def assert_matches(
    gemm: cosim.Gemm, result: cosim.RtlResult, rows: int, cols: int, dataflow: str = "os"
) -> None:
    mismatch = cosim.first_mismatch(gemm, result, gemm.config(rows, cols, dataflow))
    assert mismatch is None, mismatch


@pytest.mark.parametrize("dataflow", DATAFLOWS)
@pytest.mark.parametrize("case", EXTREME_CASES.values(), ids=EXTREME_CASES.keys())
def test_extreme_operands_and_overflow_match_accel_sim(case, dataflow, simulator):
    """ws: K = 48 on 3 or 4 rows is 12 to 16 reduction folds, each fold's partial sums
    coming back into the array, with sums that saturate and come back in between."""
    gemm = extreme_gemm(case, m=2 * case.rows + 1, n=case.cols + 2, k=48)
    assert_covers_overflow_and_clamps(gemm)
    result = cosim.run_gemm(gemm, case.rows, case.cols, simulator, BUILD_ROOT, dataflow)
    assert_matches(gemm, result, case.rows, case.cols, dataflow)


UNUSUAL_WIDTHS = {  # the ends of every parameter range; Icarus builds them in a second
    "1x1-w2a2u-acc8wrap-o2u": ExtremeCase(1, 1, 2, spec(2, False, 1), spec(2, False), Accumulator(8, "wrap")),
    "2x3-w16a16s-acc40sat-o32s": ExtremeCase(
        2, 3, 16, spec(16, True, -5), spec(32, True), Accumulator(40, "saturate")
    ),
    "5x2-w3a3u-acc9sat-o4s": ExtremeCase(
        5, 2, 3, spec(3, False, 7), spec(4, True), Accumulator(9, "saturate")
    ),
}


@pytest.mark.parametrize("dataflow", DATAFLOWS)
@pytest.mark.parametrize("case", UNUSUAL_WIDTHS.values(), ids=UNUSUAL_WIDTHS.keys())
def test_unusual_widths_match_accel_sim_on_icarus(case, dataflow):
    if sim.missing("icarus"):
        pytest.skip(sim.missing("icarus"))
    gemm = extreme_gemm(case, m=2 * case.rows + 1, n=case.cols + 2, k=33)
    result = cosim.run_gemm(gemm, case.rows, case.cols, "icarus", BUILD_ROOT, dataflow)
    assert_matches(gemm, result, case.rows, case.cols, dataflow)
    temporal = {"os": gemm.k, "ws": gemm.m}[dataflow]  # what a tile streams in time
    assert result.acc_cycles[0] == tile_compute_cycles(case.rows, case.cols, temporal, dataflow)


@pytest.mark.parametrize("case", EXTREME_CASES.values(), ids=EXTREME_CASES.keys())
def test_tile_cycles_equal_accel_sim_formula(case, simulator):
    for k in (1, 2, 9, 40):
        gemm = extreme_gemm(case, m=case.rows, n=case.cols, k=k, seed=k)
        result = cosim.run_gemm(gemm, case.rows, case.cols, simulator, BUILD_ROOT)
        assert_matches(gemm, result, case.rows, case.cols)
        formula = tile_compute_cycles(case.rows, case.cols, k)
        assert result.acc_cycles == [formula], f"{case.rows}x{case.cols}, K={k}: RTL {result.acc_cycles[0]}"


@pytest.mark.parametrize("case", EXTREME_CASES.values(), ids=EXTREME_CASES.keys())
def test_ws_tile_cycles_equal_accel_sim_formula(case, simulator):
    """A ws tile streams the layer's pixels: T + 2R + C - 2 for every reduction fold, the
    folds back to back, and the sums requantized only after the last one."""
    for m, k in ((1, 1), (3, 2 * case.rows), (17, 2 * case.rows + 1)):
        gemm = extreme_gemm(case, m=max(m, 3), n=case.cols, k=k, seed=k).rows_of(0, m)
        result = cosim.run_gemm(gemm, case.rows, case.cols, simulator, BUILD_ROOT, "ws")
        assert_matches(gemm, result, case.rows, case.cols, "ws")
        folds = -(-k // case.rows)
        assert result.acc_cycles == [tile_compute_cycles(case.rows, case.cols, m, "ws")] * folds, (m, k)
        assert result.y_cycles[-1] == result.acc_cycles[-1] + 2, "requantized 2 cycles after the last fold"


@pytest.mark.parametrize(
    "rows,cols,accumulator",
    [
        pytest.param(4, 4, Accumulator(16, "wrap"), id="4x4-acc16wrap"),  # the build of the wrap case above
        pytest.param(8, 8, Accumulator(32, "wrap"), id="8x8-acc32wrap", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_real_resnet_tiles_match_accel_sim(rows, cols, accumulator, dataflow, simulator):
    program = program_for(QuantConfig(4, 8)).with_accumulator(accumulator)
    assert program.tensors[program.input].zero_point != (0,)
    assert program.op("layer2.0.conv2").requant.residual.channel_pad != (0, 0)
    image, layers = calibration_images()[:1], list(REAL_LAYERS)
    reports = cosim.verify_program(
        program, image, layers, rows, cols, simulator, BUILD_ROOT, pixels=rows, dataflow=dataflow
    )
    for report in reports:
        assert report.match, report.mismatch
        assert report.cycles_match, (report.name, report.rtl_tile_cycles, report.formula_tile_cycles)


@pytest.mark.parametrize("layer", ["conv1", "layer2.0.conv1"])  # zero-point padding; stride 2
@pytest.mark.parametrize(
    "accumulator", [Accumulator(12, "saturate"), Accumulator(12, "wrap"), Accumulator(32, "wrap")], ids=str
)
def test_compiler_operands_reproduce_the_reference_accumulators(layer, accumulator):
    """The compiler's share of the datapath (docs/datapath.md, Conv2d): acc_init = ovf(acc0)
    and the im2col rows, zero-point padded, in accumulation order. Accumulated as the array
    does (acc_init, then ovf after each product in order), they give the int64 reference's
    accumulators on random inputs, with no accel_sim code involved."""
    program = program_for(QuantConfig(4, 8)).with_accumulator(accumulator)
    op, x_spec = program.op(layer), program.tensors[program.op(layer).input]
    x = np.random.default_rng(3).integers(x_spec.qmin, x_spec.qmax + 1, (2, *x_spec.shape))
    acts = cosim.im2col(x, op, x_spec)
    weights = op.weight.reshape(op.out_channels, -1)
    acc = np.tile(cosim.initial_accumulator(op, x_spec, accumulator), (len(acts), 1))
    for t in range(acts.shape[1]):
        acc = reference.overflow(acc + acts[:, t, None] * weights[None, :, t], accumulator)
    want, _ = reference.conv_accumulate(op, x, x_spec.zero_points(), accumulator)
    np.testing.assert_array_equal(acc, cosim.channels_last(want))
    if accumulator.bits == 12:
        exact, _ = reference.conv_accumulate(op, x, x_spec.zero_points(), Accumulator(40, "wrap"))
        assert np.any(want != exact), "a 12-bit accumulator must overflow here"


def test_first_mismatch_names_the_element_its_inputs_and_both_values():
    gemm = extreme_gemm(WRAP, m=9, n=6, k=5)
    config = gemm.config(4, 4)
    ones = np.ones_like(gemm.expected_y)
    result = cosim.RtlResult(
        acc=gemm.expected_acc.copy(),
        acc_count=ones.copy(),
        y=gemm.expected_y.copy(),
        y_count=ones.copy(),
        acc_cycles=[],
        y_cycles=[],
    )
    assert cosim.first_mismatch(gemm, result, config) is None
    result.y[5, 3] += 1
    result.y[7, 1] += 1
    message = cosim.first_mismatch(gemm, result, config)
    for part in (
        "output mismatch",
        "(m=5, n=3)",
        "array row 1, column 3",
        f"RTL {gemm.expected_y[5, 3] + 1}, accel_sim {gemm.expected_y[5, 3]}",
        f"acts[5] = {cosim.operand_row(gemm.acts[5])}",
        f"weights[3] = {cosim.operand_row(gemm.weights[3])}",
        f"acc_init {gemm.acc_init[3]}",
    ):
        assert part in message, (part, message)
    result.acc_count[2, 4] = 0
    assert "accumulator mismatch" in cosim.first_mismatch(gemm, result, config)
    assert "RTL emitted it 0 times" in cosim.first_mismatch(gemm, result, config)


def test_rtl_built_for_the_wrong_overflow_mode_is_caught():
    if sim.missing("icarus"):
        pytest.skip(sim.missing("icarus"))
    gemm = extreme_gemm(WRAP, m=4, n=4, k=48)
    wrong = replace(gemm, accumulator=Accumulator(16, "saturate"))
    result = cosim.run_gemm(wrong, 4, 4, "icarus", BUILD_ROOT)
    message = cosim.first_mismatch(wrong, result, gemm.config(4, 4))
    assert message is not None and "accumulator mismatch" in message


def test_verify_cli_runs_layers_on_the_rtl_and_reports(tmp_path, capsys):
    if sim.missing("icarus"):
        pytest.skip(sim.missing("icarus"))
    ir = tmp_path / "w4a8.ir"
    save_program(program_for(QuantConfig(4, 8)), ir)
    data = write_cifar_batches(tmp_path / "data", images_per_batch=10)
    out = tmp_path / "verify.json"
    common = [
        "verify",
        "--rtl",
        "--ir",
        str(ir),
        "--data",
        str(data),
        "--rows",
        "4",
        "--cols",
        "4",
        "--build-dir",
        str(BUILD_ROOT),
    ]
    assert main([*common, "--layer", "conv1", "--layer", "fc", "--pixels", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv1" in printed and "fc" in printed and "MISMATCH" not in printed
    layers = json.loads(out.read_text())["layers"]
    assert [(r["name"], r["match"], r["cycles_match"]) for r in layers] == [
        ("conv1", True, True),
        ("fc", True, True),
    ]
    assert layers[1]["m"] == 1 and layers[1]["n"] == 10
    for bad, problem in ((["--layer", "avgpool"], "avgpool"), (["--layer", "nope"], "no layer named 'nope'")):
        assert main([*common, *bad]) == 2
        error = capsys.readouterr().err
        assert problem in error and error.count("\n") == 1


def test_area_script_writes_cells_and_luts_that_grow_with_bit_width(tmp_path):
    if area.shutil.which("yosys") is None:
        pytest.skip("Yosys is not installed (apt-get install yosys)")
    out = tmp_path / "area.csv"
    argv = [
        "--out",
        str(out),
        "--rows",
        "2",
        "--cols",
        "2",
        "--weight-bits",
        "2,8",
        "--act-bits",
        "8",
        "--acc-bits",
        "16",
    ]
    assert area.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["flavour"], r["weight_bits"]) for r in rows] == [
        ("generic", "2"),
        ("ice40", "2"),
        ("generic", "8"),
        ("ice40", "8"),
    ]
    by = {(r["flavour"], r["weight_bits"]): r for r in rows}
    for flavour in area.FLAVOURS:
        assert int(by[flavour, "8"]["cells"]) > int(by[flavour, "2"]["cells"]) > 0
    assert int(by["ice40", "8"]["luts"]) > int(by["ice40", "2"]["luts"]) > 0
    assert by["generic", "2"]["luts"] == ""


def test_missing_simulator_is_reported_not_passed(monkeypatch):
    monkeypatch.setattr(sim.shutil, "which", lambda _name: None)
    assert "apt-get install iverilog" in sim.missing("icarus")
    with pytest.raises(sim.HwqError, match="apt-get install iverilog"):
        sim.build(cosim.ArrayConfig(), "icarus", BUILD_ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("accumulator", [Accumulator(32, "wrap"), Accumulator(16, "saturate")], ids=str)
def test_every_real_layer_on_a_16x16_array(accumulator, simulator):
    program = program_for(QuantConfig(4, 8)).with_accumulator(accumulator)
    layers = [op.name for op in program.conv_ops()]
    reports = cosim.verify_program(
        program, calibration_images()[:1], layers, 16, 16, simulator, BUILD_ROOT, pixels=64
    )
    for report in reports:
        assert report.match, report.mismatch
        assert report.cycles_match, (report.name, report.rtl_tile_cycles, report.formula_tile_cycles)


@pytest.mark.slow
def test_cycle_table_command(tmp_path, simulator):
    out = tmp_path / "cycles.csv"
    assert cycles.main(["--simulator", simulator, "--out", str(out), "--build-dir", str(BUILD_ROOT)]) == 0
    assert all(row["equal"] == "True" for row in csv.DictReader(out.open()))
