"""Batched candidate evaluation equals evaluating each candidate's program from scratch,
for candidates that change weights, biases and requantization multipliers, at wide and
narrow accumulators; and the evaluator's chunking and one-by-one fallback change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel_sim import functional
from accel_sim.functional import FunctionalSim
from accel_sim.ir import BIAS, MULT, WEIGHT, Accumulator, Conv2d, IRError, Program
from hwq import HwqError
from hwq.quant.model import QuantConfig
from hwq.search.evaluator import BrevitasEvaluator, IntegerFitness, SimEvaluator, Targets

from .helpers import brevitas_model, calibration_images, program_for
from .reference_datapath import run_reference
from .small_programs import signed_images, signed_program

W4A8 = QuantConfig(4, 8)


def perturbed(
    values: np.ndarray, population: int, step: int, limit: int, rng: np.random.Generator
) -> np.ndarray:
    steps = rng.integers(-step, step + 1, size=(population, *values.shape))
    return np.clip(values[None] + steps, -limit, limit)


def candidates_for(
    program: Program, layers: list[str], fields: tuple[str, ...], population: int, seed: int = 0
) -> dict[tuple[str, str], np.ndarray]:
    """Weights moved by one level, biases by up to 300 accumulator LSBs, multipliers by up
    to 1/8 of their size, all within the IR's limits."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in layers:
        op = program.op(name)
        mult_limit = (1 << (program.mult_bits - 1)) - 1
        if WEIGHT in fields and isinstance(op, Conv2d):
            out[(name, WEIGHT)] = perturbed(op.weight, population, 1, (1 << (op.weight_bits - 1)) - 1, rng)
        if BIAS in fields and isinstance(op, Conv2d):
            out[(name, BIAS)] = perturbed(op.bias, population, 300, 1 << 40, rng)
        if MULT in fields:
            step = max(1, int(np.abs(op.requant.mult).max()) // 8)
            out[(name, MULT)] = perturbed(op.requant.mult, population, step, mult_limit, rng)
    return out


def population_logits(
    program: Program, images: torch.Tensor, candidates: dict, backend: str = "native"
) -> tuple[torch.Tensor | None, np.ndarray]:
    """The candidates' logits and their overflowed outputs over the whole network (the
    context's before the first changed op, the population's own from there)."""
    sim = FunctionalSim(program, conv_backend=backend)
    env = {program.input: sim.input_carrier(images)}
    context = sim.execute(env)
    start = min(sim.op_index[name] for name, _ in candidates)
    overflows = torch.zeros(len(next(iter(candidates.values()))), dtype=torch.int64)
    logits = sim.run_population(env, start, candidates, overflows)
    before = sum(context[op.name].overflows for op in program.ops[:start])
    return logits, overflows.numpy() + before


def total_overflows(result) -> int:
    return sum(layer.overflows for layer in result.layers.values())


def assert_equals_one_program_per_candidate(program, images, candidates, backend="native") -> np.ndarray:
    """Logits and overflow counts; returns the counts."""
    got, overflows = population_logits(program, images, candidates, backend)
    population = len(next(iter(candidates.values())))
    assert got is not None and got.shape == (
        population,
        len(images),
        program.tensors[program.output].channels,
    )
    for p in range(population):
        single = FunctionalSim(program.with_params({key: v[p] for key, v in candidates.items()})).run(images)
        assert torch.equal(got[p], single.logits), f"candidate {p}"
        assert overflows[p] == total_overflows(single), f"candidate {p}"
    return overflows


@pytest.mark.parametrize(
    "layers",
    [["conv1"], ["layer2.0.conv2"], ["fc"], ["layer1.1.conv1", "layer3.2.conv2"]],
    ids=lambda v: "+".join(v),
)
def test_weight_candidates_equal_one_program_per_candidate(layers):
    program = program_for(W4A8)
    candidates = candidates_for(program, layers, (WEIGHT,), 3)
    assert_equals_one_program_per_candidate(program, calibration_images()[:6], candidates)


@pytest.mark.parametrize(
    "acc,fields",
    [
        (Accumulator(32, "wrap"), (BIAS, MULT)),
        (Accumulator(12, "wrap"), (WEIGHT, BIAS, MULT)),
        (Accumulator(16, "saturate"), (WEIGHT, BIAS, MULT)),
    ],
    ids=str,
)
def test_bias_and_mult_candidates_equal_one_program_per_candidate(acc, fields):
    program = program_for(W4A8).with_accumulator(acc)
    candidates = candidates_for(program, ["layer2.1.conv1", "layer3.0.conv2", "avgpool", "fc"], fields, 3)
    overflows = assert_equals_one_program_per_candidate(program, calibration_images()[:4], candidates)
    if acc.bits == 12:  # 4 images overflow it in every candidate (16 bits: none clip here)
        assert (overflows > 0).all()


def test_gemm_population_equals_one_program_per_candidate():
    program = program_for(W4A8).with_accumulator(Accumulator(12, "wrap"))
    candidates = candidates_for(program, ["layer2.2.conv2", "fc"], (WEIGHT, BIAS, MULT), 3)
    assert_equals_one_program_per_candidate(program, calibration_images()[:4], candidates, backend="gemm")


@pytest.mark.parametrize(
    "acc", [Accumulator(10, "wrap"), Accumulator(10, "saturate"), Accumulator(11, "saturate")]
)
@pytest.mark.parametrize("backend", ["native", "gemm"])
def test_population_of_signed_programs_equals_the_reference(acc, backend):
    """Every parameter of every op a candidate, on signed inputs with zero points and a
    channel-padded residual, with most sums overflowing: each candidate's logits are the
    int64 reference's for its own program."""
    program = signed_program(acc)
    layers = [op.name for op in program.ops]
    candidates = candidates_for(program, layers, (WEIGHT, BIAS, MULT), 3, seed=4)
    x = signed_images(program, 5)
    got, overflows = population_logits(program, x, candidates, backend)
    for p in range(3):
        single = program.with_params({key: v[p] for key, v in candidates.items()})
        want = run_reference(single, x.numpy())[program.output].reshape(len(x), -1)
        np.testing.assert_array_equal(got[p].numpy(), want, err_msg=f"candidate {p}")
        assert overflows[p] == total_overflows(FunctionalSim(single).run(x)) > 0, f"candidate {p}"


def distill_evaluator(
    program: Program, images: torch.Tensor, overflow_penalty: int = 0, **kwargs
) -> SimEvaluator:
    """Scores are minus the L1 distance to the program's own logits: any change shows."""
    evaluator = SimEvaluator(program, IntegerFitness("distill", 1, overflow_penalty), **kwargs)
    teacher = FunctionalSim(program).run(images).logits
    evaluator.set_batch(images, Targets(teacher.argmax(1), teacher))
    return evaluator


def test_chunks_and_the_one_by_one_fallback_equal_the_batched_scores(monkeypatch):
    program = signed_program(Accumulator(11, "saturate"))
    images = signed_images(program, 6)
    candidates = candidates_for(program, ["c2", "pool", "fc"], (WEIGHT, BIAS, MULT), 5, seed=2)
    batched = distill_evaluator(program, images, max_elements=1 << 40).evaluate(candidates)
    assert len(set(batched.tolist())) > 1

    calls = []
    run_population = FunctionalSim.run_population
    monkeypatch.setattr(
        FunctionalSim,
        "run_population",
        lambda self, *a: calls.append(len(a[2][("fc", MULT)])) or run_population(self, *a),
    )
    per_candidate = len(images) * int(np.prod(program.tensors["y"].shape))
    chunked = distill_evaluator(program, images, max_elements=2 * per_candidate).evaluate(candidates)
    assert calls == [2, 2, 1]
    np.testing.assert_array_equal(chunked, batched)

    singles = []
    one_by_one = SimEvaluator.one_by_one
    monkeypatch.setattr(SimEvaluator, "one_by_one", lambda self, c: singles.append(1) or one_by_one(self, c))
    monkeypatch.setattr(functional, "FLOAT32_EXACT", 1)
    monkeypatch.setattr(functional, "FLOAT64_EXACT", 1)
    fallback = distill_evaluator(program, images, max_elements=1 << 40)
    assert {s.arithmetic for s in fallback.sim.layer_stats().values()} >= {"int64"}
    np.testing.assert_array_equal(fallback.evaluate(candidates), batched)
    assert singles == [1]


def test_the_overflow_penalty_takes_each_candidates_overflows_off_its_score(monkeypatch):
    """Batched, chunked and one by one; and the context's own score, once it is adopted,
    is the score the candidate had."""
    program = signed_program(Accumulator(11, "wrap"))
    images = signed_images(program, 6)
    candidates = candidates_for(program, ["c2", "pool", "fc"], (WEIGHT, BIAS, MULT), 5, seed=2)
    plain = distill_evaluator(program, images).evaluate(candidates)
    penalized = distill_evaluator(program, images, overflow_penalty=3)
    scores = penalized.evaluate(candidates)
    counts = population_logits(program, images, candidates)[1]
    assert len(set(counts.tolist())) > 1
    np.testing.assert_array_equal(scores, plain - 3 * counts)
    per_candidate = len(images) * int(np.prod(program.tensors["y"].shape))
    chunked = distill_evaluator(program, images, overflow_penalty=3, max_elements=2 * per_candidate)
    np.testing.assert_array_equal(chunked.evaluate(candidates), scores)
    best = int(np.argmax(scores))
    assert penalized.set_solution({key: v[best] for key, v in candidates.items()}) == scores[best]
    monkeypatch.setattr(functional, "FLOAT32_EXACT", 1)
    monkeypatch.setattr(functional, "FLOAT64_EXACT", 1)
    fallback = distill_evaluator(program, images, overflow_penalty=3)
    assert {s.arithmetic for s in fallback.sim.layer_stats().values()} >= {"int64"}  # one by one
    np.testing.assert_array_equal(fallback.evaluate(candidates), scores)


def test_an_overflow_penalty_is_refused_where_it_cannot_apply():
    with pytest.raises(HwqError, match="needs the distill or margin fitness"):
        IntegerFitness("accuracy", clip=4, overflow_penalty=1)
    with pytest.raises(HwqError, match="must be non-negative"):
        IntegerFitness("distill", clip=4, overflow_penalty=-1)
    program = program_for(W4A8)
    evaluator = BrevitasEvaluator(brevitas_model(W4A8), program, IntegerFitness("margin", 4, 1))
    evaluator.set_batch(calibration_images()[:2], Targets(torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(HwqError, match="needs the candidates' overflow counts"):
        evaluator.set_solution({("fc", WEIGHT): program.op("fc").weight})


def test_set_solution_with_new_biases_and_multipliers_reexecutes_from_the_first_change():
    program = program_for(W4A8)
    images = calibration_images()[:6]
    change = {
        key: v[0] for key, v in candidates_for(program, ["layer2.0.conv1"], (BIAS, MULT), 1, seed=3).items()
    }
    change[("layer1.0.conv1", WEIGHT)] = program.op("layer1.0.conv1").weight
    evaluator = distill_evaluator(program, images)
    fitness = evaluator.set_solution(change)
    assert fitness < 0
    assert evaluator.program.op("layer1.0.conv1") is program.op("layer1.0.conv1")
    fresh = SimEvaluator(program.with_params(change), evaluator.fitness)
    fresh.set_batch(images, evaluator.targets)
    assert fresh.set_solution({}) == fitness
    candidates = candidates_for(program, ["layer3.0.conv1"], (WEIGHT, MULT), 3)
    np.testing.assert_array_equal(evaluator.evaluate(candidates), fresh.evaluate(candidates))


def test_bad_parameter_keys_and_values_are_named():
    program = program_for(W4A8)
    conv, pool = program.op("layer1.0.conv1"), program.op("avgpool")
    with pytest.raises(IRError, match="no ops named"):
        program.with_params({("nope", WEIGHT): conv.weight})
    with pytest.raises(IRError, match="'avgpool' has no searchable parameter 'bias'"):
        program.with_params({("avgpool", BIAS): np.zeros(pool.requant.mult.shape)})
    with pytest.raises(IRError, match="bias must have shape"):
        program.with_params({("layer1.0.conv1", BIAS): conv.bias[:3]})
    with pytest.raises(IRError, match="mult exceeds 16 bits"):
        program.with_params({("layer1.0.conv1", MULT): conv.requant.mult * 0 + (1 << 15)})
    sim = FunctionalSim(program)
    env = {program.input: sim.input_carrier(calibration_images()[:2])}
    sim.execute(env)
    late = sim.op_index["layer1.0.conv1"] + 1
    with pytest.raises(IRError, match="runs before the start op"):
        sim.run_population(env, late, {("layer1.0.conv1", WEIGHT): conv.weight[None]})
    with pytest.raises(IRError, match="must have shape"):
        sim.run_population(env, 0, {("layer1.0.conv1", WEIGHT): conv.weight})


def test_brevitas_target_refuses_parameters_other_than_weights():
    program = program_for(W4A8)
    evaluator = BrevitasEvaluator(brevitas_model(W4A8), program, IntegerFitness("accuracy", clip=4))
    with pytest.raises(HwqError, match="weights only, not fc.bias"):
        evaluator.set_solution({("fc", BIAS): program.op("fc").bias})
