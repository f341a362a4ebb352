"""A whole network on the RTL (rtl_models.network, `hwq verify --whole-network`).

The expected logits come from tests/reference_datapath.py, the plain int64 implementation
of docs/datapath.md, as well as from accel_sim: the RTL has to agree with both. The
default suite runs a small hand-built network (signed inputs with per-channel zero points,
a stride-2 residual with option-A channel padding, a pool and a classifier) whose 12-bit
saturating accumulator overflows; ResNet-20 on a 16x16 array is in `make test-slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from accel_sim.ir import Accumulator, save_program
from hwq.cli import main
from hwq.quant.model import QuantConfig
from rtl_models import network, sim

from . import reference_datapath as reference
from .helpers import DATA, HAVE_SHARED, program_for, write_cifar_batches
from .small_programs import signed_images, signed_program
from .test_rtl import BUILD_ROOT, DATAFLOWS

SATURATING = Accumulator(12, "saturate")


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_whole_small_network_on_the_rtl_equals_the_reference(dataflow, simulator):
    program = signed_program(SATURATING)
    image = signed_images(program, 1)
    overflows: dict[str, int] = {}
    want = reference.run_reference(program, image.numpy(), overflows=overflows)
    assert sum(overflows.values()) > 0, "the accumulator must overflow for this to test anything"
    run = network.run_network(program, image, 3, 4, dataflow, simulator, BUILD_ROOT, progress=False)
    assert [(layer.name, layer.engine) for layer in run.layers] == [
        ("c1", "rtl"),
        ("c2", "rtl"),
        ("pool", "software"),
        ("fc", "rtl"),
    ]
    assert run.match and not run.skipped, [layer.mismatch for layer in run.layers]
    np.testing.assert_array_equal(run.rtl_logits, want[program.output].reshape(1, -1))
    np.testing.assert_array_equal(run.rtl_logits, run.sim_logits)
    assert run.cycles_match, [(layer.name, layer.rtl_cycles, layer.model_cycles) for layer in run.layers]
    assert all(layer.requant_latency == 2 for layer in run.layers if layer.engine == "rtl")


def test_the_first_layer_that_differs_is_named_and_the_run_stops(monkeypatch):
    if sim.missing("icarus"):
        pytest.skip(sim.missing("icarus"))
    program = signed_program(SATURATING)
    real = network.run_gemm

    def faulty(gemm, *args):
        result = real(gemm, *args)
        if gemm.name == "c2":
            result.y[5, 2] += 1
        return result

    monkeypatch.setattr(network, "run_gemm", faulty)
    run = network.run_network(program, signed_images(program, 1), 3, 4, "os", "icarus", BUILD_ROOT, False)
    assert [layer.match for layer in run.layers] == [True, False]
    assert run.skipped == ["pool", "fc"] and run.rtl_logits is None and not run.match
    message = run.layers[1].mismatch
    # pixel 5 of the 3x3 output map is (y 1, x 2)
    assert "c2: output mismatch at output (image 0, channel 2, y 1, x 2)" in message, message


def test_whole_network_flags_are_checked(tmp_path, capsys):
    ir = tmp_path / "small.ir"
    save_program(signed_program(SATURATING), ir)
    data = write_cifar_batches(tmp_path / "data", images_per_batch=10)
    base = ["verify", "--whole-network", "--ir", str(ir), "--data", str(data), "--build-dir", str(BUILD_ROOT)]
    for extra, problem in (
        (["--layer", "c1"], "drop --layer"),
        (["--limit", "3"], "drop --limit"),
        (["--image", "999"], "--image 999 is past the end of the val split"),
        ([], "the images are (3, 32, 32), the program's input is (4, 6, 6)"),
    ):
        assert main([*base, *extra]) == 2
        error = capsys.readouterr().err
        assert problem in error and error.count("\n") == 1, error


@pytest.mark.slow
@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_whole_resnet20_on_a_16x16_array(tmp_path, dataflow, capsys):
    """One CIFAR-10 image through all ResNet-20 layers on Verilator (a shared image when present)."""
    if sim.missing("verilator"):
        pytest.skip(sim.missing("verilator"))
    ir = tmp_path / "w4a8.ir"
    save_program(program_for(QuantConfig(4, 8)), ir)
    data = str(DATA) if HAVE_SHARED else str(write_cifar_batches(tmp_path / "data", images_per_batch=10))
    out = tmp_path / "run.json"
    args = ["verify", "--whole-network", "--ir", str(ir), "--data", data, "--rows", "16", "--cols", "16"]
    assert main([*args, "--dataflow", dataflow, "--build-dir", str(BUILD_ROOT), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["match"] and report["cycles_match"] and report["rtl_logits"] == report["accel_sim_logits"]
    assert len(report["layers"]) == 21 and "integer logits equal accel_sim's" in capsys.readouterr().out
