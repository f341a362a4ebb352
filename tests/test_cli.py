"""`hwq eval` end to end on a synthetic data set and checkpoint, and its error messages."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import load_program, save_program
from hwq.cli import main
from hwq.data import load_split
from hwq.quant.evaluate import prepare
from hwq.quant.model import QuantConfig

from .helpers import program_for, random_resnet, write_checkpoint, write_cifar_batches


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_cifar_batches(root / "data", images_per_batch=60)
    checkpoint = write_checkpoint(root / "model.th")
    return root, str(data), str(checkpoint)


def run_eval(*args: str) -> int:
    return main(["eval", *args])


def test_eval_all_modes_writes_json_and_ir_reproduces_it(workspace):
    root, data, checkpoint = workspace
    common = ["--data", data, "--split", "val", "--limit", "20", "--batch-size", "8"]
    out, ir = root / "eval.json", root / "w4a8.ir"
    assert (
        run_eval(
            "--checkpoint",
            checkpoint,
            "--wbits",
            "4",
            "--abits",
            "8",
            *common,
            "--json",
            str(out),
            "--save-ir",
            str(ir),
            "--calibration-images",
            "32",
        )
        == 0
    )
    report = json.loads(out.read_text())
    # The three models' predictions on the same 20 val images, made here without the eval
    # command: the float and Brevitas models as prepared for these flags, the saved IR on
    # accel_sim (held to the int64 reference by tests/test_bit_exact.py).
    ds = load_split(data, "val").head(20)
    prepared = prepare(checkpoint, QuantConfig(4, 8), data, calibration_images=32)
    with torch.no_grad():
        predictions = {
            "float": prepared.float_model(ds.images).argmax(1),
            "brevitas": prepared.qmodel(ds.images).argmax(1),
            "accel_sim": FunctionalSim(load_program(ir)).run(ds.images).logits.argmax(1),
        }
    for mode, predicted in predictions.items():
        correct = int((predicted == ds.labels).sum())
        assert (report[mode]["n"], report[mode]["correct"]) == (20, correct), mode
        assert report[mode]["accuracy"] == pytest.approx(correct / 20)
    agreement = float((predictions["brevitas"] == predictions["accel_sim"]).float().mean())
    assert report["agreement"]["top1_brevitas_vs_accel_sim"] == pytest.approx(agreement)
    layers = report["accel_sim"]["overflows"]
    assert len(layers) == 21 and all(v == 0 for v in layers.values())
    again = root / "again.json"
    assert run_eval("--ir", str(ir), *common, "--json", str(again)) == 0
    replay = json.loads(again.read_text())
    assert replay["accel_sim"] == report["accel_sim"]
    assert replay["config"]["ir_sha256"] == report["config"]["ir_sha256"]


def test_eval_takes_every_layers_width_and_the_ir_records_them(workspace):
    """hwq codesign's mixed precision from the command line: --wbits is the widest layer's."""
    root, data, checkpoint = workspace
    widths = [8] + [2] * 18 + [8]
    ir = root / "mixed.ir"
    args = ["--checkpoint", checkpoint, "--data", data, "--abits", "8", "--limit", "8"]
    assert run_eval(*args, "--layer-wbits", ",".join(map(str, widths)), "--save-ir", str(ir)) == 0
    program = load_program(ir)
    assert [op.weight_bits for op in program.conv_ops()] == widths
    assert program.meta["wbits"] == 8 and program.meta["layer_wbits"] == widths


def test_accumulator_override_counts_overflows(workspace):
    root, data, checkpoint = workspace
    out = root / "narrow.json"
    assert (
        run_eval(
            "--checkpoint",
            checkpoint,
            "--wbits",
            "8",
            "--abits",
            "8",
            "--data",
            data,
            "--limit",
            "8",
            "--mode",
            "accel_sim",
            "--acc-bits",
            "10",
            "--overflow",
            "saturate",
            "--json",
            str(out),
            "--calibration-images",
            "16",
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["config"]["accumulator"] == {"bits": 10, "overflow": "saturate"}
    assert sum(report["accel_sim"]["overflows"].values()) > 0


def one_line_error(capsys, *args: str) -> str:
    assert run_eval(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(workspace, capsys, tmp_path):
    root, data, checkpoint = workspace
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"not a checkpoint")
    tampered = tmp_path / "tampered.ir"
    tampered.write_bytes(b"PK\x03\x04 truncated archive")
    q = ["--wbits", "4", "--abits", "8"]
    cases = {
        "not a PyTorch checkpoint": ["--checkpoint", str(corrupt), *q, "--data", data],
        "does not exist": ["--checkpoint", checkpoint, *q, "--data", str(tmp_path / "missing")],
        "--wbits 1 is out of range": [
            "--checkpoint",
            checkpoint,
            "--wbits",
            "1",
            "--abits",
            "8",
            "--data",
            data,
        ],
        "accumulator bits 4": ["--checkpoint", checkpoint, *q, "--data", data, "--acc-bits", "4"],
        "not a readable IR file": ["--ir", str(tampered), "--data", data],
        "exactly one of --checkpoint or --ir": ["--data", data],
        "needs --checkpoint": ["--ir", str(tampered), "--mode", "float", "--data", data],
        "--fit-accumulator needs the target accumulator": [
            "--checkpoint",
            checkpoint,
            *q,
            "--data",
            data,
            "--fit-accumulator",
        ],
        "an IR file is already lowered": ["--ir", str(tampered), "--data", data, "--fit-accumulator"],
        "0.3 is not between 0.5 and 1": [
            "--checkpoint",
            checkpoint,
            *q,
            "--data",
            data,
            "--acc-bits",
            "12",
            "--fit-accumulator",
            "0.3",
        ],
    }
    for message, args in cases.items():
        err = one_line_error(capsys, *args)
        assert message in err, (message, err)


# ----- every bad input: exit status 2, one line naming the problem, nothing left behind

EDGE = str(Path(__file__).resolve().parents[1] / "examples" / "edge_16x16.toml")


TRAIN = (
    "train --checkpoint {ckpt} --data {data} --wbits 4 --abits 8 --layers fc --population 4 --selected 2"
    " --fitness-images 16"
)
EVAL = "eval --checkpoint {ckpt} --data {data} --wbits 4 --abits 8"
SWEEP = "sweep --checkpoint {ckpt} --data {data}"
REPORT = "report --results {tmp}/results.jsonl"
BAD_INPUTS = {  # case: (command line, what its one-line message must say)
    "budget-evals 0": (
        TRAIN + " --budget-evals 0 --out {tmp}/r",
        "argument --budget-evals: 0 is not a positive",
    ),
    "budget-minutes 0": (
        TRAIN + " --budget-minutes 0 --out {tmp}/r",
        "argument --budget-minutes: 0 is not positive",
    ),
    "train --out a file": (
        TRAIN + " --budget-evals 8 --out {tmp}/afile",
        "afile exists and is not a directory",
    ),
    "train --out under a file": (TRAIN + " --budget-evals 8 --out {tmp}/afile/r", "afile is not a directory"),
    "train --out unwritable": (TRAIN + " --budget-evals 8 --out {unwritable}/r", "cannot write in"),
    "train --resume, no run": ("train --out {tmp}/none --resume", "no run to resume in"),
    "train --seed -1": (
        TRAIN + " --budget-evals 8 --seed -1 --out {tmp}/r",
        "argument --seed: -1 is negative",
    ),
    "train --mult-bits 0": (
        TRAIN + " --budget-evals 8 --mult-bits 0 --out {tmp}/r",
        "0 is out of range [2, 20]",
    ),
    "train --device bogus": (
        TRAIN + " --budget-evals 8 --device bogus --out {tmp}/r",
        "unknown torch device 'bogus'",
    ),
    "train NaN weights": (
        TRAIN.replace("{ckpt}", "{nan}") + " --budget-evals 8 --out {tmp}/r",
        "has NaN or Inf values in conv1.weight",
    ),
    "sweep --out a file": (SWEEP + " --out {tmp}/afile", "afile exists and is not a directory"),
    "sweep --out unwritable": (SWEEP + " --out {unwritable}/s", "cannot write in"),
    "sweep --area binary": (
        SWEEP + " --out {tmp}/s --area {tmp}/binary.bin",
        "binary.bin is not a CSV text file",
    ),
    "sweep --limit -1": (SWEEP + " --out {tmp}/s --limit -1", "argument --limit: -1 is negative"),
    "sweep --jobs 0": (SWEEP + " --out {tmp}/s --jobs 0", "argument --jobs: 0 is not a positive integer"),
    "report --out a file": (REPORT + " --out {tmp}/afile", "afile exists and is not a directory"),
    "report --out under a file": (REPORT + " --out {tmp}/afile/r", "afile is not a directory"),
    "report --out unwritable": (REPORT + " --out {unwritable}/r", "cannot write in"),
    "eval --json a directory": (EVAL + " --json {tmp}/adir", "argument --json: {tmp}/adir is a directory"),
    "eval --json under a file": (EVAL + " --json {tmp}/afile/x.json", "afile is not a directory"),
    "eval --save-ir a directory": (
        EVAL + " --save-ir {tmp}/adir",
        "argument --save-ir: {tmp}/adir is a directory",
    ),
    "sim --csv a directory": (
        "sim --hw {edge} --ir x.ir --csv {tmp}/adir",
        "argument --csv: {tmp}/adir is a dir",
    ),
    "eval --split-seed -1": (EVAL + " --split-seed -1", "argument --split-seed: -1 is negative"),
    "eval --calibration-images 0": (
        EVAL + " --calibration-images 0",
        "--calibration-images: 0 is not a positive",
    ),
    "eval --calibration-images -1": (
        EVAL + " --calibration-images -1",
        "--calibration-images: -1 is not a positive",
    ),
    "eval --batch-size 0": (EVAL + " --batch-size 0", "argument --batch-size: 0 is not a positive integer"),
    "eval --limit -5": (EVAL + " --limit -5", "argument --limit: -5 is not a positive integer"),
    "eval --val-fraction 1": (
        EVAL + " --val-fraction 1",
        "argument --val-fraction: 1 is not between 0 and 1",
    ),
    "eval --acc-bits 0": (EVAL + " --acc-bits 0 --calibration-images 16", "accumulator bits 0 out of range"),
    "eval --device bogus": (EVAL + " --device bogus", "--device: unknown torch device 'bogus'"),
    "eval --device cuda:7": (EVAL + " --device cuda:7", "--device: device 'cuda:7' requested but"),
    "train --device cuda, no CUDA": (
        TRAIN + " --budget-evals 8 --device cuda --out {tmp}/r",
        "--device: device 'cuda' requested but",
    ),
    "eval NaN weights": (EVAL.replace("{ckpt}", "{nan}"), "has NaN or Inf values in conv1.weight"),
    "verify --rows 0": ("verify --ir x.ir --rows 0", "argument --rows: 0 is not a positive integer"),
    "eval --layer-wbits too few": (
        EVAL + " --layer-wbits 4,2,4",
        "3 per-layer weight widths given for a network of 20",
    ),
    "eval --layer-wbits not a width": (
        EVAL + " --layer-wbits 8,x",
        "argument --layer-wbits: 'x' is not an integer",
    ),
    "eval --layer-wbits with --first-wbits": (
        EVAL.replace("--wbits 4", "--first-wbits 8") + " --layer-wbits " + ",".join(["4"] * 20),
        "--layer-wbits sets every layer's width: drop --first-wbits",
    ),
    "train --wbits beside --layer-wbits": (
        TRAIN + " --budget-evals 8 --layer-wbits " + ",".join(["2"] * 20) + " --out {tmp}/r",
        "--wbits 4 is not the widest of --layer-wbits (2)",
    ),
    "eval --weight-range wide": (EVAL + " --weight-range wide", "argument --weight-range: invalid choice"),
}


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory nobody may write in: permission bits for a user, sysfs for root."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked
    try:
        os.close(tempfile.mkstemp(dir="/sys")[0])
    except OSError:
        return Path("/sys")
    pytest.skip("no directory here that root may not write in")


@pytest.fixture(scope="module")
def nan_checkpoint(workspace):
    model = random_resnet()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    return str(write_checkpoint(workspace[0] / "nan.th", model))


NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=NEEDS_NO_CUDA) if "no CUDA" in c else c for c in BAD_INPUTS]
)
def test_every_bad_input_is_one_line_and_leaves_nothing(case, workspace, nan_checkpoint, tmp_path, capsys):
    _, data, checkpoint = workspace
    command, message = BAD_INPUTS[case]
    (tmp_path / "afile").write_text("a file, not a directory\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "results.jsonl").write_text('{"key": "x", "wbits": 4}\n')
    values = {"ckpt": checkpoint, "nan": nan_checkpoint, "data": data, "tmp": tmp_path, "edge": EDGE}
    if "{unwritable}" in command:
        values["unwritable"] = unwritable_dir(tmp_path)
    args, message = shlex.split(command.format(**values)), message.format(**values)
    before = sorted(tmp_path.rglob("*"))
    assert main(args) == 2, case
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err and err.startswith(f"hwq {args[0]}: error: "), (message, err)
    assert sorted(tmp_path.rglob("*")) == before  # no output file, directory or lock left behind


# ----- start-up: the torch-free commands import no torch

TORCH_FREE = """
import sys
from hwq.cli import main
status = main(sys.argv[1:])
print(status, sorted({name.split(".")[0] for name in sys.modules} & {"torch", "brevitas", "torchvision"}))
"""


@pytest.mark.parametrize("command", ["--help", "sim --ir {ir} --hw {edge} --json {json}"])
def test_torch_free_commands_import_no_torch(command, tmp_path):
    ir = tmp_path / "w4a8.ir"
    save_program(program_for(QuantConfig(4, 8)), ir)
    json_file = tmp_path / "new" / "sim.json"  # a missing directory is created
    argv = shlex.split(command.format(ir=ir, edge=EDGE, json=json_file))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, *argv], capture_output=True, text=True, env=env)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
    assert json_file.exists() == ("--json" in argv)
