"""Accuracy of the real checkpoint on the shared CIFAR-10 subset, float vs Brevitas vs accel_sim."""

from __future__ import annotations

import pytest

from hwq.data import load_split
from hwq.quant.evaluate import evaluate_model, evaluate_program, layer_lsb_differences
from hwq.quant.model import QuantConfig

from .helpers import DATA, HAVE_SHARED, brevitas_model, float_model, program_for

pytestmark = pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared (checkpoint and CIFAR-10 subset)")

# Measured by the data's provider on these 4,660 training images (../shared/README.md).
FLOAT_ACCURACY_ON_SUBSET = 0.997


def test_float_model_reproduces_the_checkpoint_accuracy():
    train, val = load_split(str(DATA), "train"), load_split(str(DATA), "val")
    correct = (
        evaluate_model(float_model(), train, 250).correct + evaluate_model(float_model(), val, 250).correct
    )
    assert correct / (len(train) + len(val)) == pytest.approx(FLOAT_ACCURACY_ON_SUBSET, abs=0.001)


def test_w8a8_on_accel_sim_is_within_one_point_of_float(val_set):
    float_acc = evaluate_model(float_model(), val_set).accuracy
    sim_acc = evaluate_program(program_for(QuantConfig(8, 8)), val_set).accuracy
    assert abs(sim_acc - float_acc) <= 0.01


@pytest.mark.parametrize(
    "cfg",
    [QuantConfig(8, 8), QuantConfig(4, 8), QuantConfig(4, 8, per_channel=True)],
    ids=["W8A8", "W4A8", "W4A8-per-channel"],
)
def test_accel_sim_agrees_with_brevitas(cfg, val_set):
    brevitas = evaluate_model(brevitas_model(cfg), val_set)
    sim = evaluate_program(program_for(cfg), val_set)
    agreement = float((brevitas.predictions == sim.predictions).float().mean())
    assert agreement >= 0.99
    diffs = layer_lsb_differences(brevitas_model(cfg), program_for(cfg), val_set.images[:32])
    program = program_for(cfg)
    hidden = {name: d for name, d in diffs["local"].items() if name != program.output}
    assert max(hidden.values()) <= 1, f"an op differs from Brevitas by more than rounding: {hidden}"
