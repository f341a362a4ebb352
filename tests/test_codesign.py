"""`hwq codesign`: the space is checked, the front is non-dominated and replays, a killed
run resumes to the same front, and Ray workers give the in-process front."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from accel_sim.ir import load_program
from accel_sim.timing import program_timing
from hwq.cli import main
from hwq.codesign.candidate import copy_matching_weights, nearest_trained
from hwq.codesign.cost import timing_view
from hwq.codesign.front import hypervolume, minimized, non_dominated
from hwq.codesign.run import Codesign, CodesignConfig, codesign, design_from_json
from hwq.codesign.space import Design, load_space, space_from_dict
from hwq.data import load_split
from hwq.quant.evaluate import evaluate_program

from .helpers import weight_levels, write_checkpoint, write_cifar_batches

ROOT = Path(__file__).resolve().parents[1]
TINY = """
[precision]
weight_bits = [3, 4, 8]
per_layer = false
act_bits = [6, 8]
[precision.layers]
fc = [4, 8]
[accumulator]
bits = [16, 32]
[array]
rows = [4, 8]
cols = [8]
dataflow = ["os", "ws"]
[constraints]
max_area_um2 = 1.0e7
[search]
generations = 2
population = 4
finetune_per_generation = 2
finetune_evals = 48
fitness_images = 8
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("codesign")
    data = write_cifar_batches(root / "data", images_per_batch=40)
    space = root / "space.toml"
    space.write_text(TINY)
    return root, str(data), str(write_checkpoint(root / "model.th")), str(space)


def run_config(workspace, out: str, **kw) -> CodesignConfig:
    root, data, checkpoint, space = workspace
    return CodesignConfig(
        space=space, checkpoint=checkpoint, out=str(root / out), data=data, progress=False, **kw
    )


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    summary = codesign(run_config(workspace, "full"))
    return summary, json.loads((workspace[0] / "full" / "front.json").read_text())


def relative(front: dict, out: Path) -> list[dict]:
    """Front points with paths relative to their run directory (runs in two places)."""
    return [{**p, "ir": str(Path(p["ir"]).relative_to(out))} for p in front["points"]]


def numerics(design: dict) -> str:
    return design_from_json(design).numerics_key


def rows_without_times(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    strip = ("seconds", "ir", "warm_start")
    return sorted(({k: v for k, v in r.items() if k not in strip} for r in rows), key=lambda r: r["key"])


# ----- the space file ------------------------------------------------------------------


def one_line_error(capsys, workspace, text: str, needle: str) -> None:
    root, data, checkpoint, _ = workspace
    bad = root / "bad.toml"
    bad.write_text(text)
    out = root / "refused"
    argv = ["codesign", "--space", str(bad), "--checkpoint", checkpoint, "--data", data, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists() or not any(p.name != ".lock" for p in out.iterdir())


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[precision\nweight_bits = [4]", "is not a readable TOML file"),
        (
            "[precision]\nweight_bits = [4, 9]\n[array]\nrows = [8]\ncols = [8]",
            "precision.weight_bits value 9",
        ),
        (
            "[precision]\nweight_bits = []\n[array]\nrows = [8]\ncols = [8]",
            "precision.weight_bits is an empty list",
        ),
        (
            "[precision]\nweight_bits = [4]\n[array]\nrows = [8]\ncols = [8]\nspeed = 1",
            "unknown key array.speed",
        ),
        ("[precision]\nweight_bits = [4]\n[array]\ncols = [8]", "array.rows is missing"),
        (
            "[precision]\nweight_bits = [4]\n[array]\nrows = [8]\ncols = [8]\ndataflow = ['xs']",
            "'xs' is not one of",
        ),
        (
            TINY.replace("max_area_um2 = 1.0e7", "min_accuracy = 1.5"),
            "constraints.min_accuracy = 1.5 is above 1",
        ),
        (TINY.replace("population = 4", "population = 1"), "search.population must be at least 2"),
        (TINY.replace('start = "rtn"', "") + 'start = "qat"', "search.start = 'qat'"),
        (TINY.replace("fc = [4, 8]", "conv9 = [4]"), "precision.layers names 'conv9'"),
        (TINY + "fit_accumulator = 0.2\n", "search.fit_accumulator must be true, false or a quantile"),
        (TINY + "overflow_penalty = -1\n", "search.overflow_penalty must be a non-negative integer"),
        (TINY + 'weight_range = "wide"\n', "search.weight_range = 'wide' is not one of narrow, full"),
    ],
)
def test_bad_space_files_are_one_line_errors(capsys, workspace, text, needle):
    one_line_error(capsys, workspace, text, needle)


def test_impossible_constraints_are_refused_before_the_search(capsys, workspace):
    one_line_error(
        capsys,
        workspace,
        TINY.replace("max_area_um2 = 1.0e7", "max_area_um2 = 1000"),
        "constraints.max_area_um2 = 1000",
    )
    one_line_error(
        capsys,
        workspace,
        TINY.replace("max_area_um2 = 1.0e7", "max_energy_uj = 1e-9"),
        "max_energy_uj = 1e-09 cannot",
    )


def test_genes_decode_to_the_designs_they_name():
    space = space_from_dict(
        json.loads(
            json.dumps(
                {
                    "precision": {"weight_bits": [2, 4], "per_layer": True, "layers": {"a": [8]}},
                    "array": {"rows": [4, 8], "cols": [8]},
                }
            )
        )
    )
    genes = space.genes(["a", "b", "c"])
    assert [g.name for g in genes] == ["w:b", "w:c", "rows"]  # fixed choices take no gene
    design = space.decode(genes, [1, 0, 1], ["a", "b", "c"])
    assert design.layer_wbits == (8, 4, 2) and design.rows == 8 and design.cols == 8


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "codesign").glob("*.toml")))
def test_shipped_spaces_load_and_decode(path):
    space = load_space(path)
    layers = [f"conv{i}" for i in range(19)] + ["fc"]
    genes = space.genes(layers)
    design = space.decode(genes, [len(g.choices) - 1 for g in genes], layers)
    assert len(design.layer_wbits) == len(layers) and space.accelerator(design).rows == design.rows


# ----- pieces ------------------------------------------------------------------------


def test_non_dominated_keeps_exactly_the_undominated_points():
    rng = np.random.default_rng(0)
    points = [
        {"accuracy": float(a), "energy_uj": float(e), "area_um2": 1.0, "cycles": 1}
        for a, e in rng.uniform(0, 1, (40, 2))
    ]
    objectives = ("accuracy", "energy")
    front = non_dominated(points, objectives)
    f = minimized(points, objectives)
    for i, p in enumerate(points):
        dominated = any(np.all(f[j] <= f[i]) and np.any(f[j] < f[i]) for j in range(len(points)))
        assert (p in front) == (not dominated)
    ref = {"accuracy": 0.0, "energy": 1.0}
    assert hypervolume(front, objectives, ref) == pytest.approx(hypervolume(points, objectives, ref))
    assert hypervolume(front[:-1], objectives, ref) < hypervolume(front, objectives, ref)


def test_warm_start_takes_the_weights_of_layers_of_equal_width(workspace):
    from hwq.codesign.candidate import CandidateEvaluator, Settings

    root, data, checkpoint, _ = workspace
    evaluator = CandidateEvaluator(Settings(checkpoint, data, str(root / "w"), False, "rtn", 1, 8, 0))
    base = dict(
        act_bits=8,
        acc_bits=32,
        overflow="wrap",
        rows=8,
        cols=8,
        dataflow="os",
        weight_bytes=65536,
        input_bytes=65536,
        output_bytes=65536,
    )
    four = evaluator.start_program(Design(layer_wbits=(4,) * 19 + (8,), **base))
    mixed = evaluator.start_program(Design(layer_wbits=(4,) * 10 + (3,) * 9 + (8,), **base))
    donor = four.with_weights({op.name: np.clip(op.weight + 1, -7, 7) for op in four.conv_ops()})
    warm, copied = copy_matching_weights(mixed, donor)
    for a, b, d in zip(warm.conv_ops(), mixed.conv_ops(), donor.conv_ops(), strict=True):
        np.testing.assert_array_equal(a.weight, d.weight if a.weight_bits == d.weight_bits else b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)  # requantization stays the design's own
    assert copied == sum(op.weight.size for op in mixed.conv_ops()[:10]) + mixed.conv_ops()[-1].weight.size
    designs = [
        (Design(layer_wbits=(3,) * 20, **base), "three", 0.9),
        (Design(layer_wbits=(4,) * 20, **base), "four", 0.1),
    ]
    assert nearest_trained(Design(layer_wbits=(4,) * 12 + (3,) * 8, **base), designs) == "four"
    assert nearest_trained(Design(layer_wbits=(2,) * 20, **base), designs) is None


def test_the_fit_gives_each_accumulator_width_its_own_start(workspace):
    """With search.fit_accumulator each design starts calibrated for its own accumulator:
    fewer of its sums overflow than the shared start's, and a donor's stem weights (whose
    scale the fit grew by another factor) are not copied into it."""
    from hwq.codesign.candidate import CandidateEvaluator, Settings

    root, data, checkpoint, _ = workspace
    base = dict(rows=8, cols=8, dataflow="os", weight_bytes=65536, input_bytes=65536, output_bytes=65536)
    narrow = Design(layer_wbits=(4,) * 20, act_bits=8, acc_bits=14, overflow="wrap", **base)
    wide = Design(layer_wbits=(4,) * 20, act_bits=8, acc_bits=32, overflow="wrap", **base)
    fitted = CandidateEvaluator(
        Settings(checkpoint, data, str(root / "fit"), False, "rtn", 1, 8, 0, fit_accumulator=1.0)
    )
    shared = CandidateEvaluator(Settings(checkpoint, data, str(root / "nofit"), False, "rtn", 1, 8, 0))
    own = fitted.screen(narrow, str(root / "fit" / "narrow"))
    common = shared.screen(narrow, str(root / "nofit" / "narrow"))
    assert common["overflows"] > 0 and own["overflows"] < common["overflows"]
    program = load_program(own["ir"])
    grown = program.meta["accumulator_fit"]["sums_divided_by"]
    assert program.meta["accumulator_fit"]["bits"] == 14 and grown["conv1"] > 1
    donor = fitted.start_program(wide)
    assert set(donor.meta["accumulator_fit"]["sums_divided_by"].values()) == {1.0}  # 32 bits: nothing grew
    _, copied = copy_matching_weights(program, donor)
    assert copied == sum(op.weight.size for op in program.conv_ops()[1:])  # all but the stem


def one_design_evaluator(workspace, name: str, wbits: int, acc_bits: int, **changed):
    """An 8x8 design of one weight width, its candidate directory, and an evaluator with
    a 4-evaluation fine-tune on 8 images, the given Settings changed."""
    from hwq.codesign.candidate import CandidateEvaluator, Settings

    root, data, checkpoint, _ = workspace
    base = dict(rows=8, cols=8, dataflow="os", weight_bytes=65536, input_bytes=65536, output_bytes=65536)
    design = Design(layer_wbits=(wbits,) * 20, act_bits=8, acc_bits=acc_bits, overflow="wrap", **base)
    where = root / name
    settings = Settings(checkpoint, data, str(where), False, "rtn", 4, 8, 0, **changed)
    return design, where, CandidateEvaluator(settings)


def test_the_fine_tune_searches_with_the_spaces_overflow_penalty(workspace):
    design, where, evaluator = one_design_evaluator(workspace, "penalty", 4, 14, overflow_penalty=5)
    screened = evaluator.screen(design, str(where / "screen"))
    assert screened["overflows"] > 0
    evaluator.finetune(design, str(where / "tune"), screened["ir"], None)
    run = json.loads((where / "tune" / "train" / "config.json").read_text())
    assert run["overflow_penalty"] == 5 and run["accumulator_bits"] == 14


def test_a_full_range_space_quantizes_starts_and_fine_tunes_on_every_level(workspace):
    design, where, evaluator = one_design_evaluator(workspace, "full_range", 2, 32, weight_range="full")
    screened = evaluator.screen(design, str(where / "screen"))
    start = load_program(screened["ir"])
    assert start.meta["weight_range"] == "full" and weight_levels(start) == {-2, -1, 0, 1}
    evaluator.finetune(design, str(where / "tune"), screened["ir"], None)
    assert json.loads((where / "tune" / "train" / "config.json").read_text())["weight_range"] == "full"


# ----- a whole run -------------------------------------------------------------------


def test_tiny_run_gives_a_non_dominated_front_that_replays(workspace, uninterrupted):
    root, data, _, _ = workspace
    summary, front = uninterrupted
    out = root / "full"
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    screened = [r for r in rows if r["phase"] == "screen"]
    tuned = [r for r in rows if r["phase"] == "finetune"]
    assert summary["candidates"] == len(screened) >= 6 and summary["finetuned"] == len(tuned) >= 2
    assert any(r["weights_copied"] > 0 and r["warm_start"] for r in tuned if r["generation"] == 1)
    points = front["points"]
    assert points and summary["front_points"] == len(points)
    f = minimized(points, tuple(front["objectives"]))
    for i in range(len(points)):
        for j in range(len(points)):
            assert not (np.all(f[j] <= f[i]) and np.any(f[j] < f[i])), (points[j]["name"], points[i]["name"])
    val = load_split(data, "val")
    reference = load_program(out / "candidates" / "g000-000" / "start.ir")
    from hwq.codesign.space import load_space

    space = load_space(workspace[3])
    for p in points:
        program = load_program(p["ir"])
        assert evaluate_program(program, val).correct == p["correct"]  # bit-exact on accel_sim
        assert tuple(op.weight_bits for op in program.conv_ops()) == tuple(p["layer_wbits"])
        assert (program.accumulator.bits, program.accumulator.overflow) == (p["acc_bits"], p["overflow"])
        design = Design(
            **{k: (tuple(p[k]) if k == "layer_wbits" else p[k]) for k in Design.__dataclass_fields__}
        )
        timing = program_timing(timing_view(reference, design), space.accelerator(design))
        assert timing.cycles == p["cycles"] and timing.energy_pj / 1e6 == pytest.approx(p["energy_uj"])
        assert program_timing(program, space.accelerator(design)).cycles == p["cycles"]
    csv_lines = (out / "front.csv").read_text().splitlines()
    assert len(csv_lines) == len(points) + 1 and "layer_wbits" in csv_lines[0]


def test_front_holds_the_best_hardware_of_each_numerics(workspace, uninterrupted):
    """Accuracy belongs to the numerics, so no array, dataflow or buffer size of the space
    may beat a front point's hardware at its numerics; and the front has hardware that
    NSGA-II never proposed for that numerics."""
    _, front = uninterrupted
    run = Codesign(run_config(workspace, "full"), resume=True)
    run.pool.close()
    proposed = {
        (r["design"]["rows"], r["design"]["dataflow"], numerics(r["design"])) for r in run.rows.values()
    }
    hardware = ("energy_uj", "area_um2", "cycles")
    unproposed = 0
    for p in front["points"]:
        design = Design(
            **{k: (tuple(p[k]) if k == "layer_wbits" else p[k]) for k in Design.__dataclass_fields__}
        )
        unproposed += (p["rows"], p["dataflow"], design.numerics_key) not in proposed
        mine = np.array([p[f] for f in hardware])
        for variant in run.space.hardware_variants(design):
            cost, why = run.cost(variant)
            if why is None:
                other = np.array([cost.to_json()[f] for f in hardware])
                assert not (np.all(other <= mine) and np.any(other < mine)), (variant.name, p["name"])
    assert unproposed > 0


KILLED_RUN = """
import sys, time
from pathlib import Path
from hwq.search.evaluator import SimEvaluator
from hwq.codesign.run import codesign
from tests.test_codesign import run_config

root, data, checkpoint, space, block_at = sys.argv[1:]
evaluate, calls = SimEvaluator.evaluate, []
def blocking(self, candidates):
    if Path(root, "killed", "state.pkl").exists():  # generation 0 is done
        calls.append(1)
    if len(calls) == int(block_at):
        Path(root, "blocked").write_text("")
        time.sleep(600)  # SIGKILLed here, inside a candidate's CC-EDA run
    return evaluate(self, candidates)
SimEvaluator.evaluate = blocking
codesign(run_config((Path(root), data, checkpoint, space), "killed"))
"""


def test_sigkilled_run_resumes_to_the_same_front(workspace, uninterrupted):
    root, data, checkpoint, space = workspace
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Killed in the second CC-EDA generation of generation 1's first fine-tuning.
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(root), data, checkpoint, space, "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (root / "blocked").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    out = root / "killed"
    assert (out / "state.pkl").exists() and list(out.glob("candidates/g001-*/train/state.npz"))
    assert not (out / "summary.json").exists()
    codesign(run_config(workspace, "killed"), resume=True)
    _, front = uninterrupted
    assert relative(json.loads((out / "front.json").read_text()), out) == relative(front, root / "full")
    assert rows_without_times(out) == rows_without_times(root / "full")


def test_two_ray_workers_give_the_in_process_front(workspace, uninterrupted):
    pytest.importorskip("ray")
    root = workspace[0]
    codesign(run_config(workspace, "ray", workers=2))
    _, front = uninterrupted
    out = root / "ray"
    assert relative(json.loads((out / "front.json").read_text()), out) == relative(front, root / "full")
    assert rows_without_times(out) == rows_without_times(root / "full")


def test_resume_refuses_another_space_and_a_used_directory(capsys, workspace, uninterrupted):
    root, data, checkpoint, space = workspace
    other = root / "other.toml"
    other.write_text(TINY.replace("rows = [4, 8]", "rows = [4, 16]"))
    argv = ["codesign", "--checkpoint", checkpoint, "--data", data, "--out", str(root / "full")]
    assert main([*argv, "--space", str(other), "--resume"]) == 2
    assert "holds a co-design run of another space" in capsys.readouterr().err
    assert main([*argv, "--space", space]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


def test_grid_beside_the_front_and_the_report_that_draws_them(capsys, workspace, uninterrupted):
    root, data, checkpoint, space = workspace
    out, report = root / "gridded", root / "report"
    shutil.copytree(root / "full", out)
    argv = ["codesign", "--space", space, "--checkpoint", checkpoint, "--data", data, "--out", str(out)]
    assert main([*argv, "--resume", "--grid-seconds", "600", "--quiet"]) == 0
    grid = json.loads((out / "grid.json").read_text())
    assert grid["grid_size"] == 3 * 2 * 2 * 1 == len(grid["points"])  # wbits, abits, acc, one square side
    assert {p["rows"] for p in grid["points"]} == {8} and all(
        len(set(p["layer_wbits"])) == 1 for p in grid["points"]
    )
    val = load_split(data, "val")
    first = grid["points"][0]
    assert evaluate_program(load_program(first["ir"]), val).correct == first["correct"]
    capsys.readouterr()
    assert main(["report", "--codesign", str(out), "--out", str(report)]) == 0
    front = json.loads((out / "front.json").read_text())["points"]
    layers = json.loads((out / "codesign.json").read_text())["layers"]
    for name in ("energy", "area", "cycles"):
        assert (report / "figures" / f"codesign_accuracy_vs_{name}.png").stat().st_size > 0
    widths = (report / "tables" / "layer_widths.csv").read_text().splitlines()
    assert widths[0] == ",".join(["design", *layers])
    assert widths[1:] == [",".join([p["name"], *map(str, p["layer_wbits"])]) for p in front]
    summary = (report / "summary.md").read_text()
    assert (
        all(p["name"] in summary for p in front)
        and f"{sum(p['feasible'] for p in grid['points'])} uniform-grid points" in summary
    )
    assert 'id="codesign_accuracy_vs_energy"' in (report / "report.html").read_text()


def test_report_refuses_what_is_not_a_codesign_run(capsys, workspace):
    root = workspace[0]
    assert main(["report", "--codesign", str(root / "data"), "--out", str(root / "r1")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a hwq codesign run directory" in err
    assert main(["report", "--results", str(root), "--grid", "x.json", "--out", str(root / "r2")]) == 2
    assert "--grid goes with --codesign" in capsys.readouterr().err
    assert not (root / "r1").exists() and not (root / "r2").exists()
