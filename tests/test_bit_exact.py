"""accel_sim against the plain int64 reference of docs/datapath.md, element for element."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Accumulator
from hwq.quant.model import QuantConfig

from .helpers import calibration_images, program_for
from .reference_datapath import run_reference

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


@pytest.mark.parametrize("cfg,acc,arith", CASES, ids=lambda v: str(v))
def test_simulator_equals_reference_on_every_tensor(cfg, acc, arith):
    program = program_for(cfg).with_accumulator(acc)
    sim = FunctionalSim(program)
    assert arith in {s.arithmetic for s in sim.layer_stats().values()}
    got = sim.run(images(), record=True)
    if acc.bits < 16:
        assert sum(s.overflows for s in got.layers.values()) > 0, "this case must exercise overflow"
    want = run_reference(program, images().numpy())
    for name, ref in want.items():
        np.testing.assert_array_equal(got.activations[name].numpy(), ref, err_msg=f"tensor {name}")
    np.testing.assert_array_equal(got.logits.numpy(), want[program.output].reshape(len(ref), -1))


@pytest.mark.parametrize("overflow", ["wrap", "saturate"])
def test_narrow_accumulator_overflows_and_is_counted(overflow):
    program = program_for(QuantConfig(4, 8)).with_accumulator(Accumulator(12, overflow))
    result = FunctionalSim(program).run(images())
    counts = {name: s.overflows for name, s in result.layers.items()}
    assert sum(counts.values()) > 0, "a 12-bit accumulator should overflow somewhere"
    wide = FunctionalSim(program.with_accumulator(Accumulator(32, overflow))).run(images())
    assert sum(s.overflows for s in wide.layers.values()) == 0
    assert not torch.equal(result.logits, wide.logits)


def test_compiled_requant_equals_reference():
    program = program_for(QuantConfig(4, 8, per_channel=True))
    got = FunctionalSim(program, compile=True).run(images(), record=True)
    want = run_reference(program, images().numpy())
    for name, ref in want.items():
        np.testing.assert_array_equal(got.activations[name].numpy(), ref, err_msg=f"tensor {name}")


def test_forced_int64_paths_agree_with_fast_paths():
    program = program_for(QuantConfig(8, 16)).with_accumulator(Accumulator(20, "saturate"))
    fast = FunctionalSim(program).run(images(8), record=True)
    slow_sim = FunctionalSim(program, force_int64=True)
    assert {s.arithmetic for s in slow_sim.layer_stats().values()} == {"int64"}
    slow = slow_sim.run(images(8), record=True)
    for name in fast.activations:
        assert torch.equal(fast.activations[name], slow.activations[name]), name
    assert [s.overflows for s in fast.layers.values()] == [s.overflows for s in slow.layers.values()]
