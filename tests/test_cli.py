"""`hwq eval` end to end on a synthetic data set and checkpoint, and its error messages."""

from __future__ import annotations

import json

import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import load_program
from hwq.cli import main
from hwq.data import load_split
from hwq.quant.evaluate import prepare
from hwq.quant.model import QuantConfig

from .helpers import write_checkpoint, write_cifar_batches


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
    }
    for message, args in cases.items():
        err = one_line_error(capsys, *args)
        assert message in err, (message, err)
