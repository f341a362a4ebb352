"""`hwq train`: runs are reproducible, resumable exactly, and their IR replays their numbers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import load_program, program_digest, save_program
from hwq import HwqError
from hwq.cli import main
from hwq.data import load_split
from hwq.quant.evaluate import evaluate_program, prepare
from hwq.quant.lower import lower
from hwq.quant.model import QuantConfig, ResNetCifar, calibrate, quantize_model
from hwq.search.cceda import EDAConfig
from hwq.search.evaluator import BrevitasEvaluator, IntegerFitness, SimEvaluator, Targets
from hwq.search.train import TrainConfig, train

from .helpers import write_checkpoint, write_cifar_batches


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_cifar_batches(root / "data", images_per_batch=60)
    return root, str(data), str(write_checkpoint(root / "model.th"))


def config(workspace, out: str, budget: int, **kw) -> TrainConfig:
    root, data, checkpoint = workspace
    return TrainConfig(
        checkpoint=checkpoint,
        data=data,
        out=str(root / out),
        wbits=4,
        abits=8,
        budget_evals=budget,
        layers=("layer3.2.conv2", "fc"),
        eda=EDAConfig(population=4, selected=2, group_size=64),
        fitness_images=16,
        new_batch_every=3,
        eval_every=2,
        checkpoint_every=2,
        calibration_images=32,
        progress=False,
        **kw,
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
    with pytest.raises(HwqError, match="nothing to resume"):
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
    brevitas.set_solution({op.name: op.weight for op in prepared.program.conv_ops()})
    sim_logits = FunctionalSim(prepared.program).run(ds.images).logits
    assert (brevitas.integer_logits() - sim_logits).abs().double().median() <= 2

    summary = train(cfg)
    run = workspace[0] / "brevitas"
    assert json.loads((run / "config.json").read_text())["target"] == "brevitas"
    final = load_program(run / "final.ir")
    assert final.meta["training"]["target"] == "brevitas" and summary["evaluations"] == 24
    assert evaluate_program(final, load_split(cfg.data, "val")).accuracy == summary["final_val_accuracy"]


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
    summary = train(config(workspace, "from_rtn", 40, init_ir=init))
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


def test_a_changed_init_ir_is_refused_on_resume(workspace, uninterrupted, capsys):
    init, _ = edited_program(workspace, "changing", requant=False)
    train(config(workspace, "changing", 4, init_ir=init))
    edited_program(workspace, "changing", requant=True)  # the file is rewritten with other contents
    with pytest.raises(HwqError, match="differ from the run's: init_ir_sha256"):
        train(config(workspace, "changing", 8, init_ir=init), resume=True)
    capsys.readouterr()
    assert main(["train", "--out", str(workspace[0] / "changing"), "--resume", "--budget-evals", "8"]) == 2
    assert "changed since the run started" in capsys.readouterr().err
