"""The searchable integer parameters beyond weights: biases and requantization multipliers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import BIAS, MULT, WEIGHT, IRError
from hwq import HwqError
from hwq.cli import main
from hwq.quant.model import QuantConfig
from hwq.search.cceda import CCEDA, EDAConfig
from hwq.search.evaluator import IntegerFitness, SimEvaluator, Targets
from hwq.search.space import (
    BIAS_RADIUS,
    MULT_STEP_DIVISOR,
    bias_block,
    check_extremes,
    mult_block,
    parse_search,
    program_space,
)
from hwq.search.train import train

from .helpers import program_for
from .test_cceda import linear_classifier
from .test_train import config, final_weights, log_lines
from .test_train import workspace as workspace  # noqa: F401 (a fixture)

ALL = ("weights", "bias", "mult")


def search_until(evaluator: SimEvaluator, space, solved, generations: int = 400) -> CCEDA:
    """CC-EDA over `space` on the evaluator until `solved(best fitness)`."""
    search = CCEDA(
        space, EDAConfig(population=16, selected=4, group_size=40, generations_per_group=1), seed=0
    )
    best = lambda: space.unflatten(search.best_values())  # noqa: E731
    search.best_fitness = evaluator.set_solution(best())
    for _ in range(generations):
        if solved(search.best_fitness):
            break
        if search.tell(evaluator.evaluate(search.candidate_values(search.ask()))):
            evaluator.set_solution(best())
    return search


@pytest.fixture(scope="module")
def bias_task():
    """A teacher classifier with per-class biases; the student has the teacher's weights
    but zero biases. Each image lights one feature at one of several intensities, so a
    logit w*x + b matches the teacher's at every x only with the teacher's w and b: the
    optimum (distill fitness 0) needs the bias change, which no weight change can make."""
    rng = np.random.default_rng(4)
    weight = rng.integers(-7, 8, size=(10, 16))
    bias = rng.choice([-1, 1], size=10)
    features = np.zeros((160, 16), dtype=np.int64)
    features[np.arange(160), np.arange(160) % 16] = rng.integers(1, 256, size=160)
    images = torch.from_numpy(features.reshape(-1, 16, 1, 1)).to(torch.uint8)
    teacher = linear_classifier(weight)
    teacher = teacher.with_params({("fc", BIAS): bias})
    logits = FunctionalSim(teacher).run(images).logits.to(torch.int64)
    return linear_classifier(weight), bias, images, Targets(logits.argmax(1), logits)


@pytest.mark.parametrize("search", [("weights",), ("weights", "bias")])
def test_a_bias_error_is_corrected_only_by_bias_search(bias_task, search):
    student, bias, images, targets = bias_task
    evaluator = SimEvaluator(student, IntegerFitness("distill", clip=64))
    evaluator.set_batch(images, targets)
    space = program_space(student, None, search, radius=1, max_radius=1, positions={})
    found = search_until(evaluator, space, lambda f: f == 0)
    if "bias" in search:
        assert found.best_fitness == 0
        np.testing.assert_array_equal(space.unflatten(found.best_values())[("fc", BIAS)], bias)
    else:
        assert found.best_fitness < 0


def test_bias_steps_are_an_output_lsb_and_multipliers_keep_their_sign():
    program = program_for(QuantConfig(4, 8))
    op = program.op("layer2.0.conv1")
    block = bias_block(op, BIAS_RADIUS)
    out_lsb = (1 << op.requant.shift) // np.abs(op.requant.mult)
    np.testing.assert_array_equal(block.steps, np.maximum(out_lsb, 1))
    assert np.all(block.hi - block.base == BIAS_RADIUS * block.steps)
    flipped = dataclasses.replace(op, requant=dataclasses.replace(op.requant, mult=-op.requant.mult))
    for o in (op, flipped):
        m = mult_block(o, program.mult_bits, 2)
        np.testing.assert_array_equal(m.steps, np.maximum(np.abs(o.requant.mult) // MULT_STEP_DIVISOR, 1))
        assert np.all(np.sign(m.lo) == np.sign(m.base)) and np.all(np.sign(m.hi) == np.sign(m.base))
        assert np.all(np.abs(m.hi) < 1 << (program.mult_bits - 1))


def test_every_candidate_of_the_bias_and_mult_ranges_passes_the_validator():
    """At W4A8, mult_bits 16: the extremes validate, and so do sampled candidates."""
    program = program_for(QuantConfig(4, 8))
    space = program_space(program, None, ALL, radius=1, max_radius=2, positions={})
    fields = {b.field for b in space.blocks}
    assert fields == {WEIGHT, BIAS, MULT}
    search = CCEDA(space, EDAConfig(population=8, group_size=64), seed=1)
    search.best_fitness = 0
    for _ in range(30):
        candidates = search.candidate_values(search.ask())
        for p in range(8):
            program.with_params({k: v[p] for k, v in candidates.items()})  # raises IRError if invalid
        search.tell(np.arange(8))


def test_a_range_beyond_the_ir_limits_is_refused_before_the_search():
    program = program_for(QuantConfig(4, 8))
    space = program_space(program, ("fc",), ("mult",), radius=1, max_radius=1, positions={})
    (block,) = space.blocks
    too_wide = dataclasses.replace(block, hi=np.full_like(block.hi, 1 << program.mult_bits))
    with pytest.raises(HwqError, match="the search ranges reach a program the IR rejects"):
        check_extremes(program, dataclasses.replace(space, blocks=(too_wide,)))
    with pytest.raises(IRError):
        program.with_params({("fc", MULT): too_wide.hi})


def test_search_flag_parses_and_rejects():
    assert parse_search("mult,weights") == ("weights", "mult")
    with pytest.raises(HwqError, match="choose from weights,bias,mult"):
        parse_search("weights,scales")


def test_a_run_with_bias_and_mult_search_changes_them_and_resumes_exactly(workspace):
    whole = train(config(workspace, "all_params", 60, search=ALL, radius=1))
    assert set(whole["params_searched"]) == {WEIGHT, BIAS, MULT}
    train(config(workspace, "all_params_split", 30, search=ALL))
    resumed = train(config(workspace, "all_params_split", 60, search=ALL), resume=True)
    assert log_lines(workspace, "all_params") == log_lines(workspace, "all_params_split")
    assert resumed["final_ir_sha256"] == whole["final_ir_sha256"]
    for a, b in zip(
        final_weights(workspace, "all_params").values(),
        final_weights(workspace, "all_params_split").values(),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_search_other_than_weights_needs_accel_sim(workspace, capsys):
    root, data, checkpoint = workspace
    argv = ["train", "--checkpoint", checkpoint, "--data", data, "--wbits", "4", "--abits", "8"]
    argv += [
        "--budget-evals",
        "8",
        "--target",
        "brevitas",
        "--search",
        "weights,bias",
        "--out",
        str(root / "brev"),
    ]
    assert main(argv) == 2
    assert "--target brevitas searches weights only" in capsys.readouterr().err
    assert main([*argv[:-4], "--search", "bogus", "--out", str(root / "bogus")]) == 2
    assert "choose from weights,bias,mult" in capsys.readouterr().err


def test_biases_and_multipliers_are_the_first_groups_visited():
    """Their flat prior is less confident than any weight's, even one halfway between levels."""
    program = program_for(QuantConfig(4, 8))
    halfway = {op.name: op.weight + 0.49 for op in program.conv_ops()}
    space = program_space(program, None, ALL, radius=1, max_radius=1, positions=halfway)
    search = CCEDA(space, EDAConfig(group_size=256), seed=0)
    search.regroup()
    assert {space.blocks[i].field for i in np.unique(space.block_index[search.group])} <= {BIAS, MULT}
