"""`hwq sweep` on a random network and random images: rows carry what reruns them, a sweep
killed midway resumes without redoing finished points, and training points work."""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hwq.studies.sweep as sweep_module
from accel_sim.hardware import load_accelerator
from accel_sim.ir import Accumulator, load_program, program_digest
from accel_sim.timing import program_timing
from hwq import HwqError
from hwq.cli import main
from hwq.search.cceda import EDAConfig
from hwq.studies.report import build_report
from hwq.studies.rows import append_rows, read_results
from hwq.studies.sweep import SweepConfig, is_done, parse_arrays, parse_int_list, sweep

from .helpers import write_checkpoint, write_cifar_batches

ARRAYS = ((8, 8), (16, 16))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = write_cifar_batches(root / "data", images_per_batch=40)
    return root, str(data), str(write_checkpoint(root / "model.th"))


def config(workspace, out: str, **kw) -> SweepConfig:
    root, data, checkpoint = workspace
    values = {
        "checkpoint": checkpoint,
        "data": data,
        "out": str(root / out),
        "wbits": (4,),
        "abits": (8,),
        "acc_bits": (12, 16, 32),
        "overflow": ("wrap",),
        "arrays": ARRAYS,
        "calibration_images": 16,
        "limit": 4,  # a narrow saturating accumulator is replayed product by product: slow
        "progress": False,
    }
    values.update(kw)
    return SweepConfig(**values)


class Counting:
    """evaluate_program, counted, optionally interrupted (like Ctrl-C or a kill) at call k."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at
        self.real = sweep_module.evaluate_program
        monkeypatch.setattr(sweep_module, "evaluate_program", self)

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.real(*args, **kw)


def test_interrupted_sweep_resumes_without_redoing_finished_points(workspace, monkeypatch):
    cfg = config(workspace, "interrupted")
    Counting(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg)
    first = read_results(cfg.results_path)
    assert len(first) == 2 * len(ARRAYS)  # two points finished, the third was in flight
    with open(cfg.results_path, "a") as f:
        f.write('{"key": "w4a8-pt-acc32-wr')  # and a kill in the middle of a write
    again = Counting(monkeypatch)
    summary = sweep(cfg)
    assert again.calls == 1 and summary.measured == 1 and summary.already_done == 2
    rows = read_results(cfg.results_path)
    assert len(rows) == 3 * len(ARRAYS) and len({r["key"] for r in rows}) == len(rows)
    assert all(line.strip() for line in cfg.results_path.read_text().splitlines())
    kept = {r["key"]: r for r in rows}
    assert all(kept[r["key"]] == r for r in first)  # finished rows are untouched
    third = Counting(monkeypatch)
    assert sweep(cfg).measured == 0 and third.calls == 0


@pytest.fixture(scope="module")
def finished(workspace):
    cfg = config(workspace, "finished", acc_bits=(12, 32), overflow=("wrap", "saturate"))
    sweep(cfg)
    return cfg, read_results(cfg.results_path)


def test_rows_record_what_reruns_them_exactly(finished, tmp_path):
    cfg, rows = finished
    assert {r["key"] for r in rows} == {
        f"w4a8-pt-acc{b}-{m}-{r}x{c}" for b in (12, 32) for m in ("wrap", "saturate") for r, c in ARRAYS
    }
    for row in rows:
        assert set(row["versions"]) == {"hwq", "torch", "brevitas", "numpy", "python"}
        assert (
            row["seed"] == 0
            and row["config"]["checkpoint_sha256"]
            and row["config"]["calibration_images"] == 16
        )
        program = load_program(row["ir_file"]).with_accumulator(Accumulator(row["acc_bits"], row["overflow"]))
        assert program_digest(program) == row["ir_sha256"]
        rows_, cols_ = (int(n) for n in row["array"].split("x"))
        hw = dataclasses.replace(load_accelerator(sweep_module.DEFAULT_HW), rows=rows_, cols=cols_)
        assert row["cycles"] == program_timing(program, hw).cycles  # the timing model on this array
        assert row["energy_per_inference_pj"] > 0 and row["area_cells"] is None
    narrow = next(r for r in rows if r["acc_bits"] == 12 and r["overflow"] == "wrap")
    assert narrow["overflows"] > 0 and narrow["worst_case_acc_bits"] > 12
    out = tmp_path / "rerun.json"
    argv = shlex.split(narrow["rerun"])
    assert argv[:2] == ["hwq", "eval"] and main([*argv[1:], "--json", str(out)]) == 0
    replay = json.loads(out.read_text())
    assert replay["config"]["ir_sha256"] == narrow["ir_sha256"]
    assert replay["accel_sim"]["correct"] == narrow["correct"]
    assert sum(replay["accel_sim"]["overflows"].values()) == narrow["overflows"]
    by_array = {r["array"]: r for r in rows if r["acc_bits"] == 32 and r["overflow"] == "wrap"}
    assert by_array["8x8"]["accuracy"] == by_array["16x16"]["accuracy"]
    assert by_array["8x8"]["cycles"] > by_array["16x16"]["cycles"]


def test_area_is_joined_by_widths_and_scaled_to_the_array(workspace, tmp_path):
    area = tmp_path / "area.csv"
    area.write_text(
        "flavour,top,rows,cols,weight_bits,act_bits,acc_bits,overflow,cells,flip_flops,luts,carries,seconds\n"
        "generic,mac_array,4,4,4,8,32,wrap,1000,100,,,1\n"
        "ice40,mac_array,4,4,4,8,32,wrap,500,100,400,10,1\n"
        "generic,mac_array,8,8,4,8,32,wrap,3900,390,,,1\n"
    )
    cfg = config(workspace, "area", acc_bits=(12, 32), area=(str(area),))
    sweep(cfg)
    rows = {r["key"]: r for r in read_results(cfg.results_path)}
    exact, scaled = rows["w4a8-pt-acc32-wrap-8x8"], rows["w4a8-pt-acc32-wrap-16x16"]
    assert exact["area_cells"] == 3900 and exact["area_source"] == "yosys 8x8 mac_array"
    assert scaled["area_cells"] == 4 * 3900 and "scaled x4" in scaled["area_source"]
    assert rows["w4a8-pt-acc12-wrap-8x8"]["area_cells"] is None


def test_area_is_taken_from_the_array_of_the_hardware_dataflow():
    widths = {"rows": "4", "cols": "4", "weight_bits": "4", "act_bits": "8", "acc_bits": "32"}
    area = [
        {"flavour": "generic", "top": "mac_array", "cells": "1000", **widths},
        {"flavour": "generic", "top": "ws_mac_array", "cells": "900", **widths},
    ]
    point = sweep_module.Point(4, 8, False, 32, "wrap")
    os_area, ws_area = (sweep_module.area_for(area, point, 4, 4, dataflow) for dataflow in ("os", "ws"))
    assert (os_area["area_cells"], os_area["area_source"]) == (1000, "yosys 4x4 mac_array")
    assert (ws_area["area_cells"], ws_area["area_source"]) == (900, "yosys 4x4 ws_mac_array")
    no_top = [{k: v for k, v in area[0].items() if k != "top"}]
    assert sweep_module.area_for(no_top, point, 4, 4, "ws")["area_cells"] is None


def test_a_directory_keeps_its_settings(finished, workspace):
    cfg, _ = finished
    with pytest.raises(HwqError, match="calibration_images"):
        sweep(config(workspace, "finished", acc_bits=(12, 32), calibration_images=8))


def test_grid_skips_accumulators_narrower_than_a_product_and_parses_lists():
    assert parse_int_list("2,4-6, 8", "--wbits") == (2, 4, 5, 6, 8)
    assert parse_arrays("8x8,16X16,8x8") == ((8, 8), (16, 16))
    cfg = SweepConfig(checkpoint="x", out="y", wbits=(8,), abits=(8,), acc_bits=(12, 16), overflow=("wrap",))
    points, skipped = sweep_module.grid(cfg)
    assert [p.acc_bits for p in points] == [16] and [p.acc_bits for p in skipped] == [12]


def test_training_points_record_their_curve_and_report_it(workspace, tmp_path):
    cfg = config(
        workspace,
        "trained",
        acc_bits=(32,),
        arrays=((8, 8),),
        train_budget=8,
        train_overrides={
            "layers": ("fc",),
            "eda": EDAConfig(population=4, selected=2, group_size=64),
            "fitness_images": 16,
            "eval_every": 1,
            "checkpoint_every": 1,
        },
    )
    sweep(cfg)
    (row,) = read_results(cfg.results_path)
    trained = row["trained"]
    assert trained["budget_evals"] == 8 and trained["evaluations"] >= 8 and trained["seed"] == 0
    assert trained["curve"] and all("best_fitness" in p for p in trained["curve"])
    assert any("val_accuracy" in p for p in trained["curve"])
    final_ir = Path(trained["run_dir"]) / "final.ir"
    assert hashlib.sha256(final_ir.read_bytes()).hexdigest() == trained["ir_sha256"]  # `sha256sum final.ir`
    replay, argv = tmp_path / "trained.json", shlex.split(row["rerun"])  # the point's own eval, on final.ir
    argv[argv.index("--ir") + 1] = str(final_ir)
    assert main([*argv[1:], "--json", str(replay)]) == 0
    assert json.loads(replay.read_text())["accel_sim"]["correct"] == trained["correct"]
    assert trained["n"] == row["n"] == 4
    report = build_report(cfg.results_path, tmp_path / "report")
    assert "training_curve" in report.figures and "training" in report.tables


@pytest.mark.slow
def test_parallel_sweep_equals_serial(workspace):
    serial, parallel = (
        config(workspace, "serial", wbits=(3, 4)),
        config(workspace, "parallel", wbits=(3, 4), jobs=2),
    )
    sweep(serial)
    sweep(parallel)
    strip = ("seconds", "finished", "ir_file", "rerun")

    def numbers(cfg):
        return {
            r["key"]: {k: v for k, v in r.items() if k not in strip} for r in read_results(cfg.results_path)
        }

    assert numbers(serial) == numbers(parallel)


# ----- one owner per sweep directory; workers die with the sweep; no row twice

ROOT = Path(__file__).resolve().parents[1]


def processes() -> dict[int, tuple[int, str, str]]:
    """pid: (parent pid, state, command line) of every process (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0], cmdline)
    return found


def workers_of(parent: int) -> list[int]:
    return [pid for pid, (ppid, _, cmd) in processes().items() if ppid == parent and "spawn_main" in cmd]


def alive(pids: list[int]) -> list[int]:
    table = processes()
    return [pid for pid in pids if pid in table and table[pid][1] not in "ZX"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_killed_sweep_leaves_no_workers_and_a_rerun_no_duplicate_rows(workspace, capsys):
    root, data, checkpoint = workspace
    out = root / "killed"
    out.mkdir()
    results = out / "results.jsonl"
    results.touch()
    argv = ["sweep", "--checkpoint", checkpoint, "--data", data, "--out", str(out), "--wbits", "3,4"]
    argv += ["--abits", "8", "--acc-bits", "16,32", "--overflow", "wrap", "--arrays", "8x8"]
    argv += ["--limit", "4", "--calibration-images", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(results) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the workers' appends wait: they are mid-sweep when it dies
        proc = subprocess.Popen([sys.executable, "-m", "hwq.cli", *argv, "--jobs", "2"], cwd=ROOT, env=env)
        workers: list[int] = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (
                len(workers) == 2 and len(list((out / "ir").glob("*.ir"))) == 2
            ):
                assert proc.poll() is None
                workers = workers_of(proc.pid)
                time.sleep(0.1)
            assert len(workers) == 2, "the sweep did not start its two workers"
            assert main(argv) == 2
            assert f"{out} is in use by process {proc.pid}" in capsys.readouterr().err
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 10
            while alive(workers) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(workers), "workers outlived their sweep"
        finally:
            proc.kill()
            for pid in alive(workers):
                os.kill(pid, signal.SIGKILL)
    assert results.read_text() == ""
    assert main(argv) == 0 and main(argv) == 0  # the rerun measures everything, the next nothing
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert sorted(keys) == sorted(f"w{w}a8-pt-acc{a}-wrap-8x8" for w in (3, 4) for a in (16, 32))


def test_a_row_is_not_appended_twice(finished, tmp_path):
    """Two writers that measured the same point: the second's rows are left out (checked
    under the results file's lock), unless the present row lacks what this run asks for."""
    cfg, rows = finished
    path = tmp_path / "results.jsonl"
    assert append_rows(path, rows[:2], unless=lambda row: is_done(row, cfg)) == rows[:2]
    assert append_rows(path, rows[:3], unless=lambda row: is_done(row, cfg)) == rows[2:3]
    trained = dataclasses.replace(cfg, train_budget=8)
    assert append_rows(path, rows[:1], unless=lambda row: is_done(row, trained)) == rows[:1]
    assert len(path.read_text().splitlines()) == 4


def test_methods_run_at_each_point_their_rows_are_their_summaries_and_a_rerun_skips_them(
    workspace, tmp_path, monkeypatch
):
    cfg = config(
        workspace,
        "methods",
        acc_bits=(32,),
        arrays=((8, 8),),
        methods=("rtn", "learned-round", "cc-eda", "cc-eda-best"),
        method_minutes=0.02,
        baseline_overrides={"learned-round": {"iters": 2, "batch_size": 8}},
        train_overrides={
            "layers": ("fc",),
            "eda": EDAConfig(population=4, selected=2, group_size=64),
            "fitness_images": 16,
            "eval_every": 1,
            "checkpoint_every": 1,
        },
    )
    sweep(cfg)
    rows = {r["key"]: r for r in read_results(cfg.results_path)}
    assert "w4a8-pt-acc32-wrap-8x8" in rows  # the grid row, as without --methods
    methods = {r["method"]: r for r in rows.values() if "method" in r}
    assert list(methods) == ["rtn", "learned-round", "cc-eda", "cc-eda-best"]
    assert all(r["status"] == "ok" and r["key"] == f"w4a8-pt-acc32-wrap-{m}" for m, r in methods.items())
    for method in ("rtn", "learned-round"):
        summary = json.loads((sweep_module.Path(methods[method]["run_dir"]) / "summary.json").read_text())
        assert methods[method]["accuracy"] == summary["val_accuracy"]
        assert methods[method]["wall_s"] == summary["method_s"]
        assert methods[method]["run_dir"].startswith(str(workspace[0] / "methods" / "baselines"))
    for method in ("cc-eda", "cc-eda-best"):
        summary = json.loads((sweep_module.Path(methods[method]["run_dir"]) / "summary.json").read_text())
        assert methods[method]["accuracy"] == summary["final_val_accuracy"]
        assert methods[method]["run_dir"].startswith(str(workspace[0] / "methods" / "train"))
        assert summary["elapsed_s"] >= 0.02 * 60
    best = max(("rtn", "learned-round"), key=lambda m: (methods[m]["accuracy"], -methods[m]["wall_s"]))
    assert methods["cc-eda-best"]["init_method"] == best
    start = json.loads((sweep_module.Path(methods["cc-eda-best"]["run_dir"]) / "summary.json").read_text())
    assert start["start"]["init_ir"] == str(sweep_module.Path(methods[best]["run_dir"]) / "final.ir")

    report = build_report(cfg.results_path, tmp_path / "report")
    assert "method_comparison" in report.figures and "comparison" in report.tables
    with open(tmp_path / "report" / "tables" / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [line["method"] for line in table] == list(methods)
    for line in table:
        assert float(line["accuracy"]) == methods[line["method"]]["accuracy"]
    page = (tmp_path / "report" / "summary.md").read_text()
    assert all(f"{100 * r['accuracy']:.2f} %" in page for r in methods.values())

    def never(*_a, **_k):
        raise AssertionError("a finished method ran again")

    monkeypatch.setattr("hwq.baselines.run.run_baseline", never)
    monkeypatch.setattr("hwq.search.train.train", never)
    assert sweep(cfg).measured == 0
    assert read_results(cfg.results_path) == list(rows.values())


def test_methods_need_their_budget_and_exist(workspace, capsys):
    with pytest.raises(HwqError, match="needs exactly one of --method-epochs or --method-minutes"):
        sweep(config(workspace, "m1", methods=("qat",)))
    with pytest.raises(HwqError, match="needs qat in --methods"):
        sweep(config(workspace, "m2", methods=("rtn", "cc-eda")))
    argv = [
        "sweep",
        "--checkpoint",
        workspace[2],
        "--out",
        str(workspace[0] / "m3"),
        "--methods",
        "rtn,adaround",
    ]
    assert main(argv) == 2
    assert "--methods 'rtn,adaround': methods are rtn, gptq" in capsys.readouterr().err
