"""`hwq baseline`: every Brevitas method lowers to an IR that accel_sim runs, its summary's
accuracy is what accel_sim measures on that IR, and each method does what it claims to
the integer weights (tiny random workspace, tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from accel_sim.functional import FunctionalSim
from accel_sim.ir import load_program, program_digest
from hwq import HwqError
from hwq.baselines import METHODS, PTQ_METHODS
from hwq.baselines.run import BaselineConfig, run_baseline
from hwq.cli import main
from hwq.data import load_split
from hwq.quant.evaluate import evaluate_program, prepare
from hwq.search.start import same_scales

from .helpers import weight_levels, write_checkpoint, write_cifar_batches

A2Q_ACC_BITS = 16
BUDGETS = {
    "learned-round": {"iters": 3, "batch_size": 8},
    "qat": {"epochs": 1, "batch_size": 32},
    # 6-bit activations, so that the first layer's 8-bit image input is told apart
    "a2q": {"epochs": 1, "batch_size": 32, "accumulator_bits": A2Q_ACC_BITS, "abits": 6},
    "a2q-plus": {
        "epochs": 1,
        "batch_size": 32,
        "accumulator_bits": A2Q_ACC_BITS,
        "abits": 6,
        "per_channel": True,
    },
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    data = write_cifar_batches(root / "data", images_per_batch=40)
    return root, str(data), str(write_checkpoint(root / "model.th"))


def config(workspace, method: str, out: str | None = None, **kw) -> BaselineConfig:
    root, data, checkpoint = workspace
    values = {
        "wbits": 4,
        "abits": 8,
        "calibration_images": 16,
        **BUDGETS.get(method, {}),
        **kw,
    }
    return BaselineConfig(
        method=method, checkpoint=checkpoint, data=data, out=str(root / (out or method)), **values
    )


class Runs(dict):
    """Each method's summary, run the first time a test asks for it."""

    def __init__(self, workspace) -> None:
        super().__init__()
        self.workspace = workspace

    def __missing__(self, method: str) -> dict:
        self[method] = run_baseline(config(self.workspace, method))
        return self[method]


@pytest.fixture(scope="module")
def runs(workspace):
    return Runs(workspace)


# GPTQ and GPFQ walk every input column of every layer in Python (Brevitas' GPxQ), tens of
# seconds on ResNet-20 whatever the number of images: their runs are slow tests.
SLOW = {"gptq", "gpfq"}


@pytest.fixture(scope="module")
def reference(workspace):
    """The round-to-nearest program the methods start from (per-tensor and per-channel)."""
    _, data, checkpoint = workspace
    return {
        pc: prepare(checkpoint, config(workspace, "rtn", per_channel=pc).quant(), data, 16).program
        for pc in (False, True)
    }


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in METHODS]
)
def test_every_method_lowers_to_an_ir_whose_accuracy_is_its_summarys(workspace, runs, reference, method):
    summary = runs[method]
    program = load_program(summary["final_ir"])  # loads and validates
    if method in PTQ_METHODS:  # post-training: integer weights change, scales stay the lowering's
        rtn = reference[False]
        assert same_scales(program, rtn)
        changed = sum(
            int((a.weight != b.weight).sum()) for a, b in zip(program.conv_ops(), rtn.conv_ops(), strict=True)
        )
        assert (changed == 0) == (method == "rtn")
    assert program_digest(program) == summary["final_ir_sha256"]
    assert program.meta["training"]["method"] == method
    val = load_split(workspace[1], "val")
    again = evaluate_program(program, val)
    assert again.accuracy == summary["val_accuracy"] and again.correct == summary["val_correct"]
    assert summary["val_images"] == len(val)
    assert 0 <= summary["top1_agreement"] <= 1 and 0 <= summary["brevitas_val_accuracy"] <= 1
    assert FunctionalSim(program).run(val.images[:2]).logits.shape == (2, 10)
    log = [json.loads(line) for line in (workspace[0] / method / "log.jsonl").read_text().splitlines()]
    assert (not log) == (method == "rtn") and all("elapsed_s" in entry for entry in log)
    assert summary["recipe"]["algorithm"]


def test_learned_round_picks_floor_or_ceiling_of_each_weight(runs, reference):
    learned = load_program(runs["learned-round"]["final_ir"])
    for a, b in zip(learned.conv_ops(), reference[False].conv_ops(), strict=True):
        assert np.abs(a.weight - b.weight).max() <= 1, a.name  # AdaRound's space: CC-EDA's radius 1


def test_training_methods_learn_and_log_each_epoch(workspace, runs, reference):
    for method in ("qat", "a2q", "a2q-plus"):
        assert runs[method]["recipe"]["optimizer"].startswith("SGD")
        log = [json.loads(line) for line in (workspace[0] / method / "log.jsonl").read_text().splitlines()]
        assert [entry["epoch"] for entry in log] == [1] and log[-1]["step"] == runs[method]["recipe"]["steps"]
        assert np.isfinite(log[-1]["train_loss"])
        assert runs[method]["recipe"]["lr"] == 1e-3 and "cosine" in runs[method]["recipe"]["schedule"]
    assert not same_scales(load_program(runs["qat"]["final_ir"]), reference[False])  # scales are learned


def test_qat_can_distill_the_float_network_with_adam(workspace, reference):
    summary = run_baseline(config(workspace, "qat", "qat_distill", optimizer="adam", distill=True))
    recipe = summary["recipe"]
    assert recipe["optimizer"] == "Adam" and recipe["lr"] == 1e-4
    assert "KL divergence to the float network" in recipe["loss"] and "train mode" in recipe["batchnorm"]
    program = load_program(summary["final_ir"])
    pairs = zip(program.conv_ops(), reference[False].conv_ops(), strict=True)
    assert any((a.weight != b.weight).any() for a, b in pairs)


def test_the_distillation_loss_is_zero_where_the_logits_are_the_float_networks(workspace):
    from hwq.baselines.qat import Batch, make_loss, recipe_of
    from hwq.baselines.run import MethodContext

    cfg = config(workspace, "qat", distill=True)
    prepared = prepare(workspace[2], cfg.quant(), workspace[1], 16)
    ctx = MethodContext(cfg, prepared, None, workspace[0] / "n")
    loss = make_loss(ctx, recipe_of(ctx))
    train = load_split(workspace[1], "train")
    batch = Batch(train.images[:8], train.labels[:8], train.labels[:8])
    with torch.no_grad():
        teacher = prepared.float_model.eval()(batch.images)
        assert float(loss(batch, teacher)) == pytest.approx(0, abs=1e-5)
        assert float(loss(batch, teacher.flip(1))) > 0.01


def test_mixup_blends_8_bit_images_and_weighs_both_labels_as_it_blended_them(workspace):
    from hwq.baselines.qat import Batch, label_loss, mixup

    train = load_split(workspace[1], "train")
    images, labels = train.images[:16], train.labels[:16]
    batch = mixup(images, labels, np.random.default_rng(3), alpha=0.4)
    rng = np.random.default_rng(3)
    lam, partner = rng.beta(0.4, 0.4), torch.from_numpy(rng.permutation(16))
    assert batch.lam == lam and 0 < lam < 1 and batch.images.dtype == torch.uint8
    assert (batch.partners == labels[partner]).all() and (batch.labels == labels).all()
    exact = lam * images.double() + (1 - lam) * images[partner].double()
    assert (batch.images.double() - exact).abs().max() <= 0.5 + 1e-4  # rounded to the nearest pixel
    logits = torch.randn(16, 10)
    own, theirs = F.cross_entropy(logits, labels), F.cross_entropy(logits, labels[partner])
    assert float(label_loss(batch, logits)) == pytest.approx(float(lam * own + (1 - lam) * theirs))
    assert float(label_loss(Batch(images, labels, labels[partner]), logits)) == float(own)


def test_qat_with_mixup_trains_on_other_images_and_repeats_itself(workspace):
    summaries = [
        run_baseline(config(workspace, "qat", f"qat_mixup_{i}", optimizer="adam", mixup=0.4)) for i in (0, 1)
    ]
    plain = run_baseline(config(workspace, "qat", "qat_adam", optimizer="adam"))
    assert "mixup of pairs" in summaries[0]["recipe"]["augmentation"]
    assert "mixup" not in plain["recipe"]["augmentation"]
    first, again, without = (load_program(s["final_ir"]) for s in (*summaries, plain))
    assert program_digest(first) == program_digest(again)  # the same seed, the same mixing
    pairs = zip(first.conv_ops(), without.conv_ops(), strict=True)
    assert any((a.weight != b.weight).any() for a, b in pairs)  # trained on other images


def test_qat_with_full_range_weights_trains_2_bit_weights_on_four_levels(workspace):
    summary = run_baseline(config(workspace, "qat", "qat_full_w2", wbits=2, weight_range="full"))
    program = load_program(summary["final_ir"])
    assert program.meta["weight_range"] == "full"
    assert weight_levels(program) == {-2, -1, 0, 1}
    assert evaluate_program(program, load_split(workspace[1], "val")).accuracy == summary["val_accuracy"]


@pytest.mark.slow
def test_qat_from_gpfq_fine_tunes_gpfqs_program_with_frozen_batchnorm(workspace, runs):
    """At a vanishing learning rate the fine-tune ends where it started: on GPFQ's integers,
    not round-to-nearest's, and with the statistics GPFQ computed them against."""
    tuned = run_baseline(
        config(workspace, "qat", "qat_gpfq", start="gpfq", optimizer="adam", distill=True, lr=1e-12)
    )
    assert tuned["recipe"]["start"]["method"] == "gpfq" and "frozen" in tuned["recipe"]["batchnorm"]
    gpfq, program = load_program(runs["gpfq"]["final_ir"]), load_program(tuned["final_ir"])
    for a, b in zip(program.conv_ops(), gpfq.conv_ops(), strict=True):
        assert (a.weight == b.weight).all(), a.name
        assert np.abs(a.bias.astype(np.int64) - b.bias).max() <= 1, a.name


def test_a2q_sees_each_layers_input_and_bounds_its_accumulator(runs):
    """A2Q's guarantee on our datapath: with the input widths of the integer program (the raw
    uint8 image for conv1, unsigned activations after), every convolution's worst-case
    accumulator fits the target's accumulator, whatever the weights were before."""
    for method in ("a2q", "a2q-plus"):
        summary = runs[method]
        inputs = summary["recipe"]["layer_inputs"]
        assert inputs.pop("conv1") == {"bits": 8, "signed": False}  # the raw image
        assert all(v == {"bits": 6, "signed": False} for v in inputs.values())  # after QuantReLU / head_act
        worst = summary["worst_case_acc_bits"]
        assert all(bits <= A2Q_ACC_BITS for name, bits in worst.items() if name != "fc"), worst
        assert any("constrains" in note for note in summary["notes"])  # the random net's norms exceed it
    rtn = FunctionalSim(load_program(runs["rtn"]["final_ir"])).layer_stats()
    assert max(s.worst_case_bits for s in rtn.values()) > A2Q_ACC_BITS  # so the bound did something


def test_a2q_says_whether_its_bound_constrains_the_target(workspace, reference):
    """Brevitas' own L1 bound for a 32-bit accumulator is far above any ResNet-20 layer's
    norm (A2Q is then QAT with weight-normalized quantizers); at 12 bits it binds."""
    from brevitas.function import get_upper_bound_on_l1_norm

    from hwq.baselines.qat import note_when_inactive
    from hwq.baselines.run import MethodContext

    prepared = prepare(workspace[2], config(workspace, "a2q").quant(), workspace[1], 16)
    for bits, expected in ((32, "does not constrain"), (12, "constrains 20 of 20 layers")):
        ctx = MethodContext(
            config(workspace, "a2q", accumulator_bits=bits), prepared, None, workspace[0] / "n"
        )
        bound = float(get_upper_bound_on_l1_norm(torch.tensor(float(bits)), torch.tensor(8.0), False))
        note_when_inactive(ctx, {op.name: bound for op in prepared.program.conv_ops()}, plus=False)
        assert len(ctx.notes) == 1 and expected in ctx.notes[0], ctx.notes


@pytest.mark.slow
def test_a2q_at_a_wide_accumulator_and_per_tensor_point_says_what_it_did(workspace):
    summary = run_baseline(config(workspace, "a2q-plus", "a2q32", accumulator_bits=32, per_channel=False))
    assert any("does not constrain" in note for note in summary["notes"])
    assert any("per-channel weight scales" in note for note in summary["notes"])


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bad_input_is_one_line(workspace, runs, capsys):
    root, data, checkpoint = workspace
    assert runs["rtn"]  # a finished run directory
    base = ["baseline", "--checkpoint", checkpoint, "--data", data, "--wbits", "4", "--abits", "8"]
    one_line_error(
        capsys, [*base, "--method", "qat", "--out", str(root / "x")], "needs exactly one of --epochs"
    )
    one_line_error(capsys, [*base, "--method", "gptq", "--epochs", "2", "--out", str(root / "x")], "not gptq")
    one_line_error(
        capsys,
        [*base, "--method", "learned-round", "--budget-minutes", "1", "--out", str(root / "x")],
        "--iters",
    )
    one_line_error(
        capsys,
        [*base, "--method", "qat", "--epochs", "1", "--iters", "3", "--out", str(root / "x")],
        "--iters applies",
    )
    one_line_error(
        capsys,
        [*base, "--method", "a2q", "--epochs", "1", "--start", "gptq", "--out", str(root / "x")],
        "--start applies to --method qat",
    )
    one_line_error(
        capsys,
        [*base, "--method", "gptq", "--distill", "--out", str(root / "x")],
        "--distill, --mixup and --optim",
    )
    one_line_error(
        capsys,
        [*base, "--method", "qat", "--epochs", "1", "--mixup", "0", "--out", str(root / "x")],
        "--mixup must be a positive alpha",
    )
    one_line_error(
        capsys,
        [*base, "--method", "a2q", "--epochs", "1", "--weight-range", "full", "--out", str(root / "x")],
        "--weight-range full does not apply to --method a2q",
    )
    one_line_error(capsys, [*base, "--method", "rtn", "--out", str(root / "rtn")], "already holds a finished")
    one_line_error(
        capsys, [*base, "--method", "rtn", "--wbits", "1", "--out", str(root / "x")], "out of range"
    )
    one_line_error(
        capsys,
        [*base, "--method", "rtn", "--data", str(root / "none"), "--out", str(root / "x")],
        "does not exist",
    )
    assert not (root / "x").exists()


def test_cli_runs_a_baseline_for_an_accelerator_file(workspace, capsys):
    root, data, checkpoint = workspace
    hw = root / "tiny.toml"
    hw.write_text(
        'name = "tiny"\n[array]\nrows = 4\ncols = 4\ndataflow = "os"\nclock_mhz = 100\n'
        '[precision]\nweight_bits = 4\nact_bits = 8\n[accumulator]\nbits = 20\noverflow = "saturate"\n'
        "[buffers]\nweight_bytes = 4096\ninput_bytes = 4096\noutput_bytes = 4096\n"
        "[dram]\nbytes_per_cycle = 4\n"
    )
    out = root / "hw"
    argv = ["baseline", "--method", "rtn", "--checkpoint", checkpoint, "--data", data, "--hw", str(hw)]
    assert main([*argv, "--calibration-images", "16", "--out", str(out)]) == 0
    assert "val accuracy on accel_sim" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accumulator"] == {"bits": 20, "overflow": "saturate"}
    assert (summary["settings"]["wbits"], summary["settings"]["abits"]) == (4, 8)
    with pytest.raises(HwqError, match="needs exactly one"):
        run_baseline(config(workspace, "qat", "never", epochs=None))
    mixed = [4] + [2] * 18 + [3]
    widths = ["--layer-wbits", ",".join(map(str, mixed))]
    assert main([*argv, *widths, "--calibration-images", "16", "--out", str(root / "hw_mixed")]) == 0
    program = load_program(root / "hw_mixed" / "final.ir")
    assert [op.weight_bits for op in program.conv_ops()] == mixed
    capsys.readouterr()
    assert main([*argv, "--layer-wbits", ",".join(["8"] * 20), "--out", str(root / "hw_wide")]) == 2
    assert "--wbits 8 does not fit" in capsys.readouterr().err, "no layer may be wider than the PEs"


def test_a_baselines_ir_runs_on_hwq_eval_sim_and_the_rtl(workspace, runs, tmp_path, capsys):
    from rtl_models import sim

    summary = runs["a2q"]  # learned scales and a 16-bit accumulator: not the lowering's defaults
    ir, data = summary["final_ir"], workspace[1]
    out = tmp_path / "eval.json"
    assert main(["eval", "--ir", ir, "--data", data, "--split", "val", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["accel_sim"]["accuracy"] == summary["val_accuracy"]
    assert (
        main(["sim", "--hw", "examples/rtl_8x8.toml", "--ir", ir, "--json", str(tmp_path / "sim.json")]) == 0
    )
    assert json.loads((tmp_path / "sim.json").read_text())
    if sim.missing("icarus"):
        pytest.skip(sim.missing("icarus"))
    verify = ["verify", "--rtl", "--ir", ir, "--data", data, "--rows", "4", "--cols", "4", "--pixels", "4"]
    build = str(Path(__file__).resolve().parents[1] / "sim_build")
    assert main([*verify, "--layer", "conv1", "--layer", "fc", "--build-dir", build]) == 0
    assert "MISMATCH" not in capsys.readouterr().out


@pytest.mark.slow
def test_training_is_deterministic_given_the_seed(workspace, runs):
    again = run_baseline(config(workspace, "qat", "qat_again"))
    assert again["final_ir_sha256"] == runs["qat"]["final_ir_sha256"]
    other = run_baseline(config(workspace, "qat", "qat_seed1", seed=1))
    assert other["final_ir_sha256"] != runs["qat"]["final_ir_sha256"]
