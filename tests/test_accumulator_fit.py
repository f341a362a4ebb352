"""Overflow-aware calibration (hwq.quant.accumulator_fit): the measured sums fit the
accumulator afterwards, the network is the same network, and the fit is recorded."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Accumulator
from hwq import HwqError
from hwq.quant.accumulator_fit import AccumulatorFit, fit_accumulator, measured_sums
from hwq.quant.evaluate import layer_lsb_differences
from hwq.quant.lower import lower
from hwq.quant.model import QuantConfig

from .helpers import brevitas_model, calibration_images

CFG = QuantConfig(4, 8)
NARROW = Accumulator(12, "wrap")


def fresh_model():
    """A copy of the shared calibrated model: the fit changes its scales in place."""
    return copy.deepcopy(brevitas_model(CFG))


def overflows(program, images) -> int:
    result = FunctionalSim(program.with_accumulator(NARROW)).run(images)
    return sum(s.overflows for s in result.layers.values())


@pytest.fixture(scope="module")
def fitted():
    images = calibration_images()
    model = fresh_model()
    before = lower(model, CFG)
    ratios = fit_accumulator(model, CFG, images, AccumulatorFit(NARROW), mult_bits=16)
    return images, model, before, lower(model, CFG), ratios


def test_measured_sums_fit_the_accumulator_after_the_fit(fitted):
    images, _, before, after, ratios = fitted
    assert overflows(before, images) > 0
    assert overflows(after, images) == 0
    for name, sums in measured_sums(after, images).items():
        assert sums.max() <= NARROW.hi, name
    assert any(r > 1 for r in ratios.values())


def test_only_the_inputs_of_layers_that_overflowed_change_scale(fitted):
    _, _, before, after, ratios = fitted
    for op in after.conv_ops():
        grew = after.tensors[op.input].scale / before.tensors[op.input].scale
        if op.input == after.input:  # the raw image: its weights' scale grows instead
            assert grew == 1.0 and (ratios[op.name] == 1.0) == np.array_equal(
                before.op(op.name).weight, after.op(op.name).weight
            )
        elif ratios[op.name] == 1.0:
            assert grew == 1.0, op.name
        else:
            assert grew > 1.0, op.name


def test_the_fitted_brevitas_model_and_its_program_still_agree(fitted):
    images, model, _, after, _ = fitted
    local = layer_lsb_differences(model, after, images[:8])["local"]
    assert max(v for k, v in local.items() if k != after.output) <= 1


def test_a_lower_quantile_shrinks_sums_less():
    images = calibration_images()
    full, partial = (
        fit_accumulator(fresh_model(), CFG, images, AccumulatorFit(NARROW, q), mult_bits=16)
        for q in (1.0, 0.99)
    )
    assert all(partial[name] <= full[name] for name in full)
    assert sum(partial.values()) < sum(full.values())


def test_a_quantile_out_of_range_is_refused():
    with pytest.raises(HwqError, match="quantile 0.2"):
        fit_accumulator(fresh_model(), CFG, calibration_images(), AccumulatorFit(NARROW, 0.2), 16)
