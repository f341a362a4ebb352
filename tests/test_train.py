"""`hwq train`: runs are reproducible, resumable exactly, and their IR replays their numbers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import WEIGHT, load_program, program_digest, save_program
from hwq import HwqError
from hwq.cli import main
from hwq.data import load_split
from hwq.quant.evaluate import evaluate_program, prepare
from hwq.quant.lower import lower
from hwq.quant.model import QuantConfig, ResNetCifar, calibrate, load_float_model, quantize_model
from hwq.search.cceda import EDAConfig
from hwq.search.evaluator import BrevitasEvaluator, IntegerFitness, SimEvaluator, Targets
from hwq.search.schedule import BatchSchedule
from hwq.search.state import read_state, write_state
from hwq.search.train import TrainConfig, train

from .helpers import random_resnet, write_checkpoint, write_cifar_batches


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_cifar_batches(root / "data", images_per_batch=60)
    return root, str(data), str(write_checkpoint(root / "model.th"))


def config(workspace, out: str, budget: int, **kw) -> TrainConfig:
    root, data, checkpoint = workspace
    values = {
        "layers": ("layer3.2.conv2", "fc"),
        "eda": EDAConfig(population=4, selected=2, group_size=64),
        "fitness_images": 16,
        "new_batch_every": 3,
        "eval_every": 2,
        "checkpoint_every": 2,
        "calibration_images": 32,
        "progress": False,
    }
    return TrainConfig(
        checkpoint=checkpoint,
        data=data,
        out=str(root / out),
        wbits=4,
        abits=8,
        budget_evals=budget,
        **values | kw,
    )


def final_weights(workspace, out: str) -> dict[str, np.ndarray]:
    program = load_program(workspace[0] / out / "final.ir")
    return {op.name: op.weight for op in program.conv_ops()}


def log_lines(workspace, out: str) -> list[dict]:
    lines = [json.loads(x) for x in (workspace[0] / out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in d.items() if k not in ("elapsed_s", "evals_per_s")} for d in lines]


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    summary = train(config(workspace, "full", 40))
    return summary, final_weights(workspace, "full"), log_lines(workspace, "full")


def assert_same_run(workspace, out: str, reference, reference_out: str = "full") -> None:
    _, weights, log = reference
    got = final_weights(workspace, out)
    assert got.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(got[name], weights[name], err_msg=name)
    assert log_lines(workspace, out) == log
    best_val = [program_digest(load_program(workspace[0] / d / "best_val.ir")) for d in (out, reference_out)]
    assert best_val[0] == best_val[1]


def test_run_searches_and_reports(uninterrupted, workspace):
    summary, _, log = uninterrupted
    assert hashlib.sha256(Path(summary["final_ir"]).read_bytes()).hexdigest() == summary["final_ir_sha256"]
    assert summary["evaluations"] == 40 and summary["complete"]
    assert summary["generations"] == 10 == log[-1]["generation"]
    assert [d["generation"] for d in log] == list(range(11))
    assert all(d["evaluations"] == 4 * d["generation"] for d in log)
    assert summary["macs_per_eval"] > 0 and summary["weights_searched"] == 64 * 64 * 9 + 640


def test_resume_after_budget_stop_is_exact(workspace, uninterrupted):
    train(config(workspace, "split", 20))
    train(config(workspace, "split", 40), resume=True)
    assert_same_run(workspace, "split", uninterrupted)


def test_resume_after_a_crash_is_exact(workspace, uninterrupted, monkeypatch):
    calls = {"n": 0}
    original = SimEvaluator.evaluate

    def crashing(self, candidates):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("machine lost")
        return original(self, candidates)

    monkeypatch.setattr(SimEvaluator, "evaluate", crashing)
    with pytest.raises(RuntimeError, match="machine lost"):
        train(config(workspace, "crash", 40))
    monkeypatch.setattr(SimEvaluator, "evaluate", original)
    train(config(workspace, "crash", 40), resume=True)
    assert_same_run(workspace, "crash", uninterrupted)


def test_resume_restores_the_float_logits_of_the_batch(workspace, monkeypatch):
    """Float convolutions may round differently on another machine or thread count; a
    resumed run takes its batch's float logits from the state instead of recomputing them."""
    train(config(workspace, "teacher", 8))

    def recomputed(*_):
        raise AssertionError("the batch's float logits were recomputed on resume")

    monkeypatch.setattr("hwq.search.train.integer_logits", recomputed)
    assert train(config(workspace, "teacher", 12), resume=True)["evaluations"] == 12


def test_accuracy_fitness_run_resumes_exactly(workspace, uninterrupted):
    """Both fitness kinds resume exactly (the default, distill, recomputes the float
    network's logits for the batch on resume); distill scores minus a distance, accuracy
    a positive count."""
    assert all(d["best_fitness"] < 0 for d in uninterrupted[2])
    reference = train(config(workspace, "accuracy", 24, fitness="accuracy"))
    reference = (reference, final_weights(workspace, "accuracy"), log_lines(workspace, "accuracy"))
    assert all(d["best_fitness"] > 0 for d in reference[2])
    train(config(workspace, "accuracy_split", 12, fitness="accuracy"))
    train(config(workspace, "accuracy_split", 24, fitness="accuracy"), resume=True)
    assert_same_run(workspace, "accuracy_split", reference, "accuracy")


def test_final_ir_replays_the_reported_accuracy(workspace, uninterrupted, capsys):
    summary, _, _ = uninterrupted
    root, data, _ = workspace
    out = root / "replay.json"
    assert (
        main(
            [
                "eval",
                "--ir",
                str(root / "full" / "final.ir"),
                "--data",
                data,
                "--split",
                "val",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["accel_sim"]["accuracy"] == summary["final_val_accuracy"]


def test_best_held_out_solution_is_kept_and_replays(workspace, uninterrupted):
    summary, _, log = uninterrupted
    measured = [d["val_accuracy"] for d in log if "val_accuracy" in d]
    best = summary["best_val"]
    assert best["val_accuracy"] == max(measured)
    assert best["generation"] == next(d["generation"] for d in log if d.get("val_accuracy") == max(measured))
    program = load_program(best["ir"])
    assert program.meta["training"]["generations"] == best["generation"]
    val = load_split(workspace[1], "val")
    assert evaluate_program(program, val).accuracy == best["val_accuracy"]


def test_run_directory_is_protected(workspace, uninterrupted):
    with pytest.raises(HwqError, match="already holds a run"):
        train(config(workspace, "full", 40))
    with pytest.raises(HwqError, match="differ from the run's: wbits"):
        train(TrainConfig(**{**config(workspace, "full", 40).__dict__, "wbits": 3}), resume=True)
    with pytest.raises(HwqError, match="no run to resume in"):
        train(config(workspace, "never", 40), resume=True)


def test_cli_trains_and_resumes_from_the_run_directory(workspace, capsys):
    root, data, checkpoint = workspace
    out = str(root / "cli")
    common = [
        "--layers",
        "fc",
        "--population",
        "4",
        "--selected",
        "2",
        "--fitness-images",
        "16",
        "--calibration-images",
        "32",
        "--eval-every",
        "2",
    ]
    assert (
        main(
            [
                "train",
                "--checkpoint",
                checkpoint,
                "--data",
                data,
                "--wbits",
                "4",
                "--abits",
                "8",
                "--budget-evals",
                "8",
                "--out",
                out,
                *common,
            ]
        )
        == 0
    )
    assert main(["train", "--out", out, "--resume", "--budget-evals", "16"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy on accel_sim" in text and "final IR" in text
    assert json.loads((root / "cli" / "summary.json").read_text())["evaluations"] == 16
    assert main(["train", "--out", out, "--resume", "--budget-evals", "24", "--wbits", "3"]) == 2


HW_TOML = """
name = "tiny"
[array]
rows = 4
cols = 4
dataflow = "os"
clock_mhz = 100
[precision]
weight_bits = 4
act_bits = 8
[accumulator]
bits = 20
overflow = "saturate"
[buffers]
weight_bytes = 4096
input_bytes = 4096
output_bytes = 4096
[dram]
bytes_per_cycle = 4
"""


def test_hw_file_sets_the_target_arithmetic(workspace, capsys):
    root, data, checkpoint = workspace
    hw = root / "tiny.toml"
    hw.write_text(HW_TOML)
    out = root / "hw"
    common = ["train", "--checkpoint", checkpoint, "--data", data, "--hw", str(hw), "--layers", "fc"]
    small = ["--population", "4", "--selected", "2", "--fitness-images", "16", "--calibration-images", "32"]
    assert main([*common, "--budget-evals", "4", "--out", str(out), *small]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["wbits"], cfg["abits"], cfg["accumulator_bits"], cfg["overflow"]) == (4, 8, 20, "saturate")
    assert load_program(out / "final.ir").accumulator.bits == 20
    assert main([*common, "--wbits", "3", "--budget-evals", "4", "--out", str(root / "hw3"), *small]) == 0
    assert json.loads((root / "hw3" / "config.json").read_text())["wbits"] == 3
    capsys.readouterr()
    assert main([*common, "--wbits", "6", "--budget-evals", "4", "--out", str(root / "hw6")]) == 2
    assert "--wbits 6 does not fit" in capsys.readouterr().err
    assert main([*common, "--acc-bits", "32", "--budget-evals", "4", "--out", str(root / "hw32")]) == 2
    assert "accumulator.bits is 20" in capsys.readouterr().err


def test_brevitas_target_scores_like_accel_sim_and_is_reevaluated_on_it(workspace):
    """Fake-quant fitness must see the same network as accel_sim (its logits, rounded to the
    program's logit LSB, land within a few LSB), and its result is re-scored on accel_sim."""
    cfg = config(workspace, "brevitas", 24, target="brevitas")
    prepared = prepare(cfg.checkpoint, cfg.quant(), cfg.data, cfg.calibration_images)
    ds = load_split(cfg.data, "train").head(32)
    brevitas = BrevitasEvaluator(prepared.qmodel, prepared.program, IntegerFitness("margin", 1))
    brevitas.set_batch(ds.images, Targets(ds.labels))
    brevitas.set_solution({(op.name, WEIGHT): op.weight for op in prepared.program.conv_ops()})
    sim_logits = FunctionalSim(prepared.program).run(ds.images).logits
    assert (brevitas.integer_logits() - sim_logits).abs().double().median() <= 2

    summary = train(cfg)
    run = workspace[0] / "brevitas"
    assert json.loads((run / "config.json").read_text())["target"] == "brevitas"
    final = load_program(run / "final.ir")
    assert final.meta["training"]["target"] == "brevitas" and summary["evaluations"] == 24
    assert evaluate_program(final, load_split(cfg.data, "val")).accuracy == summary["final_val_accuracy"]


# ----- run directories: one owner, stop signals, damaged or foreign files, moved inputs

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--layers fc --population 4 --selected 2 --fitness-images 16 --calibration-images 32 --eval-every 2"


def python(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_generation(run: Path, generation: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").exists() else []
        if any(line.endswith("}") and json.loads(line)["generation"] >= generation for line in lines):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run did not reach generation {generation}")


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_second_process_is_refused_and_ctrl_c_saves_and_exits_130(workspace, capsys):
    root, data, checkpoint = workspace
    run = root / "owned"
    argv = ["train", "--checkpoint", checkpoint, "--data", data, "--wbits", "4", "--abits", "8"]
    argv += ["--budget-evals", "1000000", "--out", str(run), *SMALL.split()]
    first = python("-m", "hwq.cli", *argv, "--seed", "3")
    try:
        wait_for_generation(run, 2, first)
        one_line_error(capsys, [*argv, "--seed", "4"], f"{run} is in use by process {first.pid}")
        assert json.loads((run / "config.json").read_text())["seed"] == 3
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130
    assert "run incomplete: stopped by SIGINT" in err and f"hwq train --out {run} --resume" in err
    summary = json.loads((run / "summary.json").read_text())
    state, _ = read_state(run / "state.npz")
    assert not summary["complete"] and state["search"]["generation"] == summary["generations"]
    generations = [json.loads(line)["generation"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert generations == list(range(summary["generations"] + 1))  # the second process wrote nothing
    more = summary["evaluations"] + 8
    assert main(["train", "--out", str(run), "--resume", "--budget-evals", str(more)]) == 0
    assert json.loads((run / "summary.json").read_text())["evaluations"] == more


BLOCKING_RUN = """
import sys, time
from pathlib import Path
from hwq.search.evaluator import SimEvaluator
from hwq.search.train import train
from tests.test_train import config

root, data, checkpoint, out, block_at = sys.argv[1:]
evaluate, calls = SimEvaluator.evaluate, []
def blocking(self, candidates):
    calls.append(1)
    if len(calls) == int(block_at):
        time.sleep(600)  # where the machine is lost: SIGKILLed here
    return evaluate(self, candidates)
SimEvaluator.evaluate = blocking
train(config((Path(root), data, checkpoint), out, 40, checkpoint_every=4))
"""


def test_sigkilled_run_leaves_no_lock_and_resumes_exactly_dropping_lines(workspace, uninterrupted):
    """Killed in generation 7 with its state from generation 4: the log lines of
    generations 5 and 6 (and a half-written one) are dropped and written again, the
    kernel has dropped the lock, and the temporaries of atomic writes are removed."""
    root, data, checkpoint = workspace
    run = root / "killed"
    proc = python("-c", BLOCKING_RUN, str(root), data, checkpoint, "killed", "7")
    try:
        wait_for_generation(run, 6, proc)
    finally:
        proc.kill()
        proc.wait()
    state, _ = read_state(run / "state.npz")
    logged = [json.loads(line)["generation"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert state["search"]["generation"] == 4 and logged[-1] == 6
    with open(run / "log.jsonl", "a") as f:
        f.write('{"generation": 7, "lay')
    stale = [run / ".state.npz.k1ll3d_x.tmp", run / ".log.jsonl.abcd1234.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(config(workspace, "killed", 40), resume=True)
    assert_same_run(workspace, "killed", uninterrupted)
    assert not any(path.exists() for path in stale)


def test_sigterm_stops_like_ctrl_c(workspace, monkeypatch):
    original, calls = SimEvaluator.evaluate, []

    def terminated_at_the_third(self, candidates):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends
        return original(self, candidates)

    monkeypatch.setattr(SimEvaluator, "evaluate", terminated_at_the_third)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM at generation 3"):
        train(config(workspace, "terminated", 40))
    summary = json.loads((workspace[0] / "terminated" / "summary.json").read_text())
    assert summary["generations"] == 3 and not summary["complete"]
    state, _ = read_state(workspace[0] / "terminated" / "state.npz")
    assert state["search"]["generation"] == 3


@pytest.fixture(scope="module")
def other_run(workspace):
    train(config(workspace, "other", 8, seed=1))
    return workspace[0] / "other"


def copy_of_full(workspace, tmp_path, name: str) -> Path:
    return Path(shutil.copytree(workspace[0] / "full", tmp_path / name))


def test_foreign_or_damaged_run_files_are_refused(workspace, uninterrupted, other_run, tmp_path, capsys):
    def damaged(name: str, damage) -> list[str]:
        run = copy_of_full(workspace, tmp_path, name)
        damage(run)
        return ["train", "--out", str(run), "--resume"]

    state = lambda run: run / "state.npz"  # noqa: E731
    cases = {
        "state from another run": (
            lambda run: shutil.copy(other_run / "state.npz", state(run)),
            "belongs to another run (its run_id, config_sha256 differ",
        ),
        "truncated state": (
            lambda run: state(run).write_bytes(state(run).read_bytes()[:5000]),
            "state.npz is damaged",
        ),
        "random state": (lambda run: state(run).write_bytes(os.urandom(5000)), "state.npz is damaged"),
        "garbage config": (
            lambda run: (run / "config.json").write_text("{garbage"),
            "config.json is damaged",
        ),
        "missing config": (lambda run: (run / "config.json").unlink(), "has a state but no config.json"),
        "state.pkl of an older hwq": (
            lambda run: state(run).rename(run / "state.pkl"),
            "was made by an older hwq",
        ),
    }
    for name, (damage, message) in cases.items():
        one_line_error(capsys, damaged(name.replace(" ", "_"), damage), message)


def test_resume_checks_that_the_state_reproduces_its_best_fitness(workspace, uninterrupted, tmp_path, capsys):
    """A state rewritten consistently (valid file, right run) but with a best fitness its
    own best solution does not score is refused, not continued."""
    run = copy_of_full(workspace, tmp_path, "tampered")
    state, identity = read_state(run / "state.npz")
    state["search"]["best_fitness"] += 1
    write_state(run / "state.npz", state, identity)
    one_line_error(
        capsys, ["train", "--out", str(run), "--resume"], "does not reproduce its own best fitness"
    )


def test_resume_from_another_directory_and_with_moved_data(workspace, tmp_path, monkeypatch, capsys):
    root, data, checkpoint = workspace
    shutil.copytree(data, tmp_path / "data")
    shutil.copy(checkpoint, tmp_path / "model.th")
    monkeypatch.chdir(tmp_path)
    fresh = "train --checkpoint model.th --data data --wbits 4 --abits 8 --budget-evals 4 --out run"
    assert main([*fresh.split(), *SMALL.split()]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["checkpoint"], saved["data"]) == (str(tmp_path / "model.th"), str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path / "data")  # relative paths would now point nowhere
    resume = ["train", "--out", str(tmp_path / "run"), "--resume", "--budget-evals"]
    assert main([*resume, "8"]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").rename(tmp_path / "moved")
    one_line_error(capsys, [*resume, "12"], "does not exist; if it moved, give its new place with --data")
    other = write_cifar_batches(tmp_path / "other", images_per_batch=61)
    one_line_error(capsys, [*resume, "12", "--data", str(other)], "does not hold the run's train/val images")
    other_checkpoint = write_checkpoint(tmp_path / "other.th", random_resnet(seed=1))
    one_line_error(
        capsys,
        [*resume, "12", "--data", "moved", "--checkpoint", str(other_checkpoint)],
        "is not the run's checkpoint",
    )
    assert main([*resume, "12", "--data", "moved"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "moved")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["evaluations"] == 12


def test_budget_minutes_stops_on_time_and_is_complete(workspace):
    budget = 0.05  # 3 s of search
    cfg = config(workspace, "minutes", None, budget_minutes=budget, layers=("fc",), eval_every=1000)
    summary = train(cfg)
    assert summary["complete"] and summary["elapsed_s"] >= 60 * budget - 0.05
    lines = [json.loads(x) for x in (workspace[0] / "minutes" / "log.jsonl").read_text().splitlines()]
    assert len(lines) >= 3  # the search ran generations, then stopped by itself
    # a generation starts only while budget is left, so only the last one may end past it
    assert all(line["elapsed_s"] < 60 * budget for line in lines[:-1])


def all_features(workspace, out: str, budget: int) -> TrainConfig:
    """Every evaluation-spending and stopping feature on, tuned so that each one acts in a
    tiny run: the batch grows, weights widen, and patience may stop it."""
    cfg = config(
        workspace,
        out,
        budget,
        grow_batch=True,
        grow_window=1,
        grow_below=1.0,
        patience_evals=36,
        confirm_images=16,
        accumulator_bits=12,
        fit_accumulator=1.0,
        overflow_penalty=2,
        weight_range="full",
    )
    eda = EDAConfig(population=4, selected=2, group_size=64, widen_after=1, widen_below=0.99)
    return TrainConfig(**{**cfg.__dict__, "eda": eda, "max_fitness_images": 64, "eval_every": 1})


@pytest.fixture(scope="module")
def featured(workspace):
    summary = train(all_features(workspace, "featured", 80))
    return summary, final_weights(workspace, "featured"), log_lines(workspace, "featured")


def test_every_feature_acts_in_the_tiny_run(featured):
    summary, _, log = featured
    sizes = [d["fitness_images"] for d in log[1:]]
    assert sizes[0] == 16 and max(sizes) > 16 and sizes == sorted(sizes)
    draws = [d for d in log if d["generation"] > 1 and (d["generation"] - 1) % 3 == 0]
    assert all("fresh_gain" in d for d in draws if d["fitness_images"] < 64) and draws
    assert summary["weights_widened"] > 0
    fit = load_program(Path(summary["final_ir"]).parent / "initial.ir").meta["accumulator_fit"]
    assert fit["bits"] == 12 and max(fit["sums_divided_by"].values()) > 1, "the scales were fitted"
    final = load_program(summary["final_ir"])
    lowest = min(int(final.op(n).weight.min()) for n in ("layer3.2.conv2", "fc"))
    assert lowest == -8, "--weight-range full: 4-bit weights take -8, which narrow weights never do"
    assert summary["stopped"] in ("budget", "patience") and summary["complete"]
    confirmation = summary["confirmation"]
    assert confirmation["tested"] > confirmation["held"] > 0, "some winners fail on fresh images"
    assert confirmation["held"] == sum(d.get("improved", False) for d in log)
    assert confirmation["evaluations"] == confirmation["tested"]
    measured = sum("fresh_gain" in d for d in log)  # at most one evaluation each, for the schedule
    searched = summary["evaluations"] - confirmation["tested"] - 4 * summary["generations"]
    assert 0 <= searched <= measured, "the confirmation's evaluations count in the budget"


def test_interrupted_run_with_every_feature_resumes_exactly(workspace, featured, monkeypatch):
    """Ctrl-C (SIGINT) stops at the end of a generation, the summary says so, and --resume
    goes on to the same log, final weights and held-out selection as a run left alone."""
    calls = {"n": 0}
    original = SimEvaluator.evaluate

    def interrupting(self, candidates):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, candidates)

    monkeypatch.setattr(SimEvaluator, "evaluate", interrupting)
    with pytest.raises(KeyboardInterrupt, match="run incomplete: stopped by SIGINT"):
        train(all_features(workspace, "featured_split", 80))
    stopped = json.loads((workspace[0] / "featured_split" / "summary.json").read_text())
    assert stopped["stopped"] == "interrupted" and not stopped["complete"]
    monkeypatch.setattr(SimEvaluator, "evaluate", original)
    resumed = train(all_features(workspace, "featured_split", 80), resume=True)
    assert resumed["stopped"] == featured[0]["stopped"]
    assert_same_run(workspace, "featured_split", featured, "featured")


def test_patience_stops_a_run_whose_held_out_accuracy_does_not_improve(workspace):
    cfg = config(workspace, "patience", 4000, patience_evals=8)
    summary = train(TrainConfig(**{**cfg.__dict__, "eval_every": 1}))
    log = log_lines(workspace, "patience")
    assert summary["stopped"] == "patience" and summary["complete"] and summary["evaluations"] < 4000
    best, stop = summary["best_val"], log[-1]
    assert stop["evaluations"] - best["evaluations"] >= 8
    later = [d for d in log if d["evaluations"] > best["evaluations"]]
    assert all(d["val_accuracy"] <= best["val_accuracy"] for d in later)
    assert [d for d in later if d["evaluations"] - best["evaluations"] >= 8] == [stop]


def test_logged_agreement_and_logit_distance_match_the_float_network(workspace, featured):
    """The held-out figures of best_val.ir, recomputed here from the IR and the float
    checkpoint: agreement of top-1 classes, mean L1 distance of the logits in logit units."""
    summary, _, log = featured
    _, data, checkpoint = workspace
    val = load_split(data, "val")
    program = load_program(summary["best_val"]["ir"])
    logits = FunctionalSim(program).run(val.images).logits.double()
    real = logits * program.tensors[program.output].scale
    with torch.no_grad():
        reference = load_float_model(checkpoint)(val.images).double()
    point = next(d for d in log if d["generation"] == summary["best_val"]["generation"])
    assert point["val_agreement"] == (logits.argmax(1) == reference.argmax(1)).double().mean().item()
    assert point["val_logit_l1"] == pytest.approx((real - reference).abs().sum(1).mean().item(), rel=1e-6)
    assert point["val_accuracy"] == evaluate_program(program, val).accuracy
    assert summary["best_val"]["val_agreement"] == point["val_agreement"]


def test_batch_grows_only_when_gains_stop_carrying_over():
    schedule = BatchSchedule(256, 1024, window=2, below=0.5)
    schedule.observe(100, 80)
    assert schedule.carry_over() is None and not schedule.grow(), "the window is not full yet"
    schedule.observe(100, 40)
    assert schedule.carry_over() == 0.6 and not schedule.grow() and schedule.size == 256
    schedule.observe(100, -20)  # the window slides: (100, 40), (100, -20)
    assert schedule.carry_over() == 0.1 and schedule.grow() and schedule.size == 512
    assert schedule.carry_over() is None, "a grown batch is judged on its own gains"
    restored = BatchSchedule(256, 1024, window=2, below=0.5)
    schedule.observe(0, 0)
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert restored == schedule
    for _ in range(4):
        schedule.observe(0, 0)  # no gain at all: nothing carries over
        schedule.grow()
    assert schedule.size == 1024 and not schedule.grows
    with pytest.raises(HwqError, match="max-fitness-images 128 is below"):
        BatchSchedule(256, 128)


def test_cli_flags_of_the_evaluation_spending_and_stopping_features(tmp_path):
    from hwq.cli import build_parser
    from hwq.search.cli import train_config

    flags = "--grow-batch --grow-window 3 --grow-below 0.4 --max-fitness-images 1024 --widen-after 2"
    flags += " --overflow-penalty 3"
    flags += (
        " --widen-below 0.8 --max-radius 3 --patience-evals 5000 --group-scope global --confirm-images 512"
    )
    args = build_parser().parse_args(
        ["train", "--checkpoint", "c.th", "--wbits", "4", "--abits", "8", "--budget-evals", "10"]
        + ["--out", str(tmp_path / "run"), *flags.split()]
    )
    cfg = train_config(args)
    assert (cfg.grow_batch, cfg.grow_window, cfg.grow_below, cfg.max_fitness_images) == (True, 3, 0.4, 1024)
    assert (cfg.eda.widen_after, cfg.eda.widen_below, cfg.max_radius) == (2, 0.8, 3)
    assert cfg.patience_evals == 5000 and cfg.eda.group_scope == "global" and cfg.confirm_images == 512
    assert cfg.overflow_penalty == 3 and "overflow_penalty" in cfg.defining()
    with pytest.raises(HwqError, match="needs the distill or margin fitness"):
        TrainConfig(**{**cfg.__dict__, "fitness": "accuracy"}).validate()
    with pytest.raises(HwqError, match="--overflow-penalty needs --target accel_sim"):
        TrainConfig(**{**cfg.__dict__, "target": "brevitas", "confirm_images": 0}).validate()
    with pytest.raises(HwqError, match="--confirm-images needs --target accel_sim"):
        TrainConfig(**{**cfg.__dict__, "target": "brevitas", "overflow_penalty": 0}).validate()
    assert "patience_evals" not in cfg.defining(), "patience is a budget: it may change on --resume"
    with pytest.raises(HwqError, match="widen-after needs a --max-radius above"):
        TrainConfig(**{**cfg.__dict__, "max_radius": 1}).validate()


# ----- --init-ir ---------------------------------------------------------------------------


def edited_program(workspace, name: str, requant: bool) -> tuple[str, object]:
    """The run's round-to-nearest program with some classifier weights moved one level (a
    baseline's output), and with `requant` another requantization (learned scales)."""
    program = load_program(workspace[0] / "full" / "initial.ir")
    ops = []
    for op in program.ops:
        if op.name == "fc":
            weight = op.weight.copy()
            limit = (1 << (op.weight_bits - 1)) - 1
            weight.flat[::7] = np.clip(weight.flat[::7] + 1, -limit, limit)
            op = dataclasses.replace(op, weight=weight)
            if requant:
                op = dataclasses.replace(
                    op, requant=dataclasses.replace(op.requant, mult=op.requant.mult - 3)
                )
        ops.append(op)
    edited = dataclasses.replace(program, ops=ops)
    path = workspace[0] / f"{name}.ir"
    save_program(edited, path)
    return str(path), edited


def test_init_ir_of_the_round_to_nearest_program_is_the_plain_run(workspace, uninterrupted):
    init = str(workspace[0] / "full" / "initial.ir")
    summary = train(config(workspace, "from_rtn", 40, init_ir=init, confirm_images=0))
    assert summary["start"] == {
        "init_ir": init,
        "init_ir_sha256": program_digest(load_program(init)),
        "positions": "checkpoint",
        "positions_clipped": 0,
    }
    assert_same_run(workspace, "from_rtn", uninterrupted)


def test_an_init_ir_is_the_start_and_its_prior_comes_from_the_checkpoint_where_scales_agree(
    workspace, uninterrupted
):
    init, program = edited_program(workspace, "edited", requant=False)
    summary = train(config(workspace, "init_same_scales", 4, init_ir=init))
    start = load_program(workspace[0] / "init_same_scales" / "initial.ir")
    assert np.array_equal(start.op("fc").weight, program.op("fc").weight)
    assert summary["start"]["positions"] == "checkpoint"
    assert summary["start"]["positions_clipped"] > 0  # the moved weights: half a level from their level
    saved = json.loads((workspace[0] / "init_same_scales" / "config.json").read_text())
    assert saved["init_ir_sha256"] == program_digest(program) == summary["start"]["init_ir_sha256"]


def test_a_run_from_an_init_ir_with_its_own_scales_resumes_exactly(workspace, uninterrupted):
    init, program = edited_program(workspace, "rescaled", requant=True)
    full = train(config(workspace, "init_full", 24, init_ir=init))
    start = load_program(workspace[0] / "init_full" / "initial.ir")
    assert np.array_equal(start.op("fc").requant.mult, program.op("fc").requant.mult)  # the program's own
    assert full["start"]["positions"] == "levels"
    left = len(load_split(workspace[1], "train")) - 16  # beside the 16-image fitness batch
    assert full["confirmation"]["images"] == left, "on by default from an --init-ir, within the split"
    reference = (full, final_weights(workspace, "init_full"), log_lines(workspace, "init_full"))
    train(config(workspace, "init_split", 12, init_ir=init))
    train(config(workspace, "init_split", 24, init_ir=init), resume=True)
    assert_same_run(workspace, "init_split", reference, "init_full")


def test_init_ir_must_match_the_architecture_and_widths(workspace, uninterrupted, capsys):
    root, data, checkpoint = workspace
    w3 = prepare(checkpoint, QuantConfig(3, 8), data, 32).program
    save_program(w3, root / "w3.ir")
    with pytest.raises(HwqError, match="op conv1: weight_bits is 3, expected 4"):
        train(config(workspace, "w3", 4, init_ir=str(root / "w3.ir")))
    torch.manual_seed(0)
    deeper = quantize_model(ResNetCifar(32).eval(), QuantConfig(4, 8))
    calibrate(deeper, load_split(data, "train").images[:32])
    save_program(lower(deeper, QuantConfig(4, 8)), root / "r32.ir")
    with pytest.raises(HwqError, match="op 8 is conv2d layer1.3.conv1, expected conv2d layer2.0.conv1"):
        train(config(workspace, "r32", 4, init_ir=str(root / "r32.ir")))
    init, _ = edited_program(workspace, "scaled", requant=True)
    with pytest.raises(HwqError, match="--target brevitas .* requantizes differently"):
        train(config(workspace, "scaled_brevitas", 4, init_ir=init, target="brevitas"))
    argv = [
        "train",
        "--checkpoint",
        checkpoint,
        "--data",
        data,
        "--wbits",
        "4",
        "--abits",
        "8",
        "--fitness-images",
        "16",
    ]
    assert (
        main([*argv, "--budget-evals", "4", "--init-ir", str(root / "w3.ir"), "--out", str(root / "w3cli")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match the program lowered from" in err
    assert not (root / "w3cli" / "state.pkl").exists()


def test_a_full_range_init_ir_is_refused_by_a_narrow_run_and_taken_by_a_full_one(workspace, uninterrupted):
    root, data, checkpoint = workspace
    full = prepare(checkpoint, QuantConfig(4, 8, weight_range="full"), data, 32).program
    assert full.meta["weight_range"] == "full" and full.op("fc").weight.min() == -8
    save_program(full, root / "full.ir")
    with pytest.raises(HwqError, match=r"outside the narrow range \[-7, 7\] .*--weight-range full"):
        train(config(workspace, "full_into_narrow", 4, init_ir=str(root / "full.ir")))
    summary = train(
        config(workspace, "full_into_full", 4, init_ir=str(root / "full.ir"), weight_range="full")
    )
    assert summary["start"]["positions"] == "checkpoint", "the same lowering: the same scales"


def test_a_changed_init_ir_is_refused_on_resume(workspace, uninterrupted, capsys):
    init, _ = edited_program(workspace, "changing", requant=False)
    train(config(workspace, "changing", 4, init_ir=init))
    edited_program(workspace, "changing", requant=True)  # the file is rewritten with other contents
    with pytest.raises(HwqError, match="differ from the run's: init_ir_sha256"):
        train(config(workspace, "changing", 8, init_ir=init), resume=True)
    capsys.readouterr()
    assert main(["train", "--out", str(workspace[0] / "changing"), "--resume", "--budget-evals", "8"]) == 2
    assert "changed since the run started" in capsys.readouterr().err
