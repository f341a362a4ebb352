"""Batched candidate evaluation equals evaluating each candidate's program from scratch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Accumulator
from hwq.quant.model import QuantConfig

from .helpers import calibration_images, program_for


def perturbed(weight: np.ndarray, population: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    limit = (1 << (bits - 1)) - 1
    steps = rng.integers(-1, 2, size=(population, *weight.shape))
    return np.clip(weight[None] + steps, -limit, limit)


@pytest.mark.parametrize(
    "layers",
    [["conv1"], ["layer2.0.conv2"], ["fc"], ["layer1.1.conv1", "layer3.2.conv2"]],
    ids=lambda v: "+".join(v),
)
def test_population_logits_equal_one_program_per_candidate(layers):
    program = program_for(QuantConfig(4, 8))
    images = calibration_images()[:6]
    sim = FunctionalSim(program)
    env = {program.input: sim.input_carrier(images)}
    sim.execute(env)
    candidates = {name: perturbed(program.op(name).weight, 3, 4, seed=i) for i, name in enumerate(layers)}
    start = min(i for i, op in enumerate(program.ops) if op.name in candidates)
    got = sim.run_population(env, start, candidates)
    assert got is not None and got.shape == (3, 6, 10)
    for p in range(3):
        single = program.with_weights({name: w[p] for name, w in candidates.items()})
        want = FunctionalSim(single).run(images).logits
        assert torch.equal(got[p], want), f"candidate {p}"


def test_population_refuses_when_a_candidate_could_overflow():
    program = program_for(QuantConfig(4, 8)).with_accumulator(Accumulator(12, "wrap"))
    sim = FunctionalSim(program)
    env = {program.input: sim.input_carrier(calibration_images()[:2])}
    sim.execute(env)
    weight = program.op("layer3.0.conv1").weight
    assert sim.run_population(env, 0, {"layer3.0.conv1": perturbed(weight, 2, 4, 0)}) is None
