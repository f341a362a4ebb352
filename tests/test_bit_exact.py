"""accel_sim against the plain int64 reference of docs/datapath.md, element for element,
with both convolution backends (the CPU's native one and the GEMM form every other device
uses), and the overflow counts layer by layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Accumulator
from hwq.quant.model import QuantConfig

from .helpers import calibration_images, program_for
from .reference_datapath import run_reference
from .small_programs import signed_images, signed_program

BACKENDS = ("native", "gemm")
CASES = [
    # (config, accumulator, expected arithmetic of the widest conv)
    (QuantConfig(4, 8, per_channel=True), Accumulator(32, "wrap"), "float32"),
    (QuantConfig(8, 16), Accumulator(40, "wrap"), "float64"),
    (QuantConfig(2, 4, first_wbits=8, last_wbits=8), Accumulator(24, "saturate"), "float32"),
    (QuantConfig(4, 8), Accumulator(12, "wrap"), "float32"),
    (QuantConfig(4, 8), Accumulator(12, "saturate"), "float32"),
]


def images(n: int = 3) -> torch.Tensor:
    return calibration_images()[-n:]


def assert_equals_reference(sim: FunctionalSim, x: torch.Tensor, want: dict, overflows: dict) -> None:
    got = sim.run(x, record=True)
    for name, ref in want.items():
        np.testing.assert_array_equal(got.activations[name].numpy(), ref, err_msg=f"tensor {name}")
    np.testing.assert_array_equal(got.logits.numpy(), want[sim.program.output].reshape(len(x), -1))
    assert {name: s.overflows for name, s in got.layers.items() if name in overflows} == overflows


@pytest.mark.parametrize("cfg,acc,arith", CASES, ids=lambda v: str(v))
def test_simulator_equals_reference_on_every_tensor_and_overflow_count(cfg, acc, arith):
    program = program_for(cfg).with_accumulator(acc)
    overflows: dict[str, int] = {}
    want = run_reference(program, images().numpy(), overflows=overflows)
    if acc.bits < 16:
        assert sum(overflows.values()) > 0, "this case must exercise overflow"
    for backend in BACKENDS:
        sim = FunctionalSim(program, conv_backend=backend)
        assert arith in {s.arithmetic for s in sim.layer_stats().values()}
        assert_equals_reference(sim, images(), want, overflows)


@pytest.mark.parametrize(
    "acc",
    [
        Accumulator(32, "wrap"),
        Accumulator(10, "wrap"),
        Accumulator(10, "saturate"),
        Accumulator(11, "saturate"),
    ],
)
def test_signed_inputs_zero_points_and_residual_equal_reference(acc):
    """Signed activations reach the saturate replay with negative products from both
    operand signs; at 10 bits most outputs clip, many at both bounds."""
    program = signed_program(acc)
    x = signed_images(program, 6)
    overflows: dict[str, int] = {}
    want = run_reference(program, x.numpy(), overflows=overflows)
    if acc.bits < 16:
        assert all(count > 0 for count in overflows.values())
    for backend in BACKENDS:
        assert_equals_reference(FunctionalSim(program, conv_backend=backend), x, want, overflows)


def test_compiled_requant_equals_reference():
    program = program_for(QuantConfig(4, 8, per_channel=True))
    got = FunctionalSim(program, compile=True).run(images(), record=True)
    want = run_reference(program, images().numpy())
    for name, ref in want.items():
        np.testing.assert_array_equal(got.activations[name].numpy(), ref, err_msg=f"tensor {name}")


def test_forced_int64_paths_agree_with_fast_paths():
    program = program_for(QuantConfig(8, 16)).with_accumulator(Accumulator(20, "saturate"))
    fast = FunctionalSim(program).run(images(4), record=True)
    slow_sim = FunctionalSim(program, force_int64=True)
    assert {s.arithmetic for s in slow_sim.layer_stats().values()} == {"int64"}
    slow = slow_sim.run(images(4), record=True)
    for name in fast.activations:
        assert torch.equal(fast.activations[name], slow.activations[name]), name
    assert [s.overflows for s in fast.layers.values()] == [s.overflows for s in slow.layers.values()]
