"""CC-EDA: its operators, its state, and that it finds known optima."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import WEIGHT, Accumulator, Conv2d, Program, Requant, TensorSpec
from hwq import HwqError
from hwq.search.cceda import (
    CCEDA,
    EDAConfig,
    ParamBlock,
    SearchSpace,
    confidence,
    initial_probabilities,
    least_confident_group,
    sample_categories,
    select_best,
    updated_probabilities,
    weight_block,
)
from hwq.search.evaluator import IntegerFitness, SimEvaluator, Targets


def space(sizes=(40, 30, 30), bits=4, seed=0) -> SearchSpace:
    rng = np.random.default_rng(seed)
    weights = {f"l{i}": rng.integers(-7, 8, size=(n,)) for i, n in enumerate(sizes)}
    return SearchSpace.from_weights(weights, {n: bits for n in weights}, radius=1)


def test_initial_probabilities_follow_the_float_position_and_respect_the_range():
    weights = np.array([7, 0, -7, 2])
    positions = np.array([6.9, 0.0, -6.6, 2.49])
    s = SearchSpace.from_weights({"w": weights}, {"w": 4}, radius=1, positions={"w": positions})
    probs = initial_probabilities(s, 0.5)
    np.testing.assert_allclose(probs.sum(1), 1)
    assert probs[0, 2] == 0 and probs[2, 0] == 0  # +-8 is outside the 4-bit narrow range
    np.testing.assert_allclose(probs[1], np.array([np.exp(-2), 1, np.exp(-2)]) / (1 + 2 * np.exp(-2)))
    assert np.all(probs.argmax(1) == 1), "round-to-nearest is always the most likely level"
    confidence = probs.max(1)
    assert confidence[3] < confidence[2] < confidence[0] < 1 and confidence[3] < 0.55


def test_positions_must_round_to_the_weights():
    from hwq import HwqError

    with pytest.raises(HwqError, match="do not round"):
        SearchSpace.from_weights({"w": np.array([1])}, {"w": 4}, 1, positions={"w": np.array([1.7])})


def test_sampling_follows_the_distribution_and_never_draws_impossible_levels():
    probs = np.array([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.0, 0.25, 0.75]])
    draws = sample_categories(probs, 20000, np.random.default_rng(1))
    freq = np.stack([(draws == k).mean(0) for k in range(3)], axis=1)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert np.all(draws[:, 1] == 1) and not np.any(draws[:, 2] == 0)


def test_selection_takes_the_best_and_keeps_order_on_ties():
    assert select_best(np.array([3, 9, 9, 1, 5]), 3).tolist() == [1, 2, 4]


def test_update_moves_each_distribution_toward_the_selected_levels():
    probs = np.array([[0.1, 0.8, 0.1]])
    chosen = np.array([[0], [0], [1], [2]])  # frequencies 0.5, 0.25, 0.25
    valid = np.ones_like(probs, dtype=bool)
    np.testing.assert_allclose(updated_probabilities(probs, chosen, 0.4, valid), [[0.26, 0.58, 0.16]])


def test_probability_floor_keeps_every_valid_level_alive():
    probs = np.array([[0.0, 0.9, 0.1]])
    valid = np.array([[False, True, True]])
    chosen = np.array([[1], [1]])
    moved = updated_probabilities(probs, chosen, 1.0, valid, floor=0.05)
    np.testing.assert_allclose(moved, [[0.0, 0.95, 0.05]])


def test_converged_weights_are_equally_confident_whatever_their_levels():
    """A weight at the edge of its range has two levels, the others three; once converged
    they must tie, or regrouping never comes back to the edge weights (it did not, before)."""
    valid = np.array([[False, True, True], [True, True, True]])
    probs = np.array([[0.0, 0.6, 0.4], [0.3, 0.4, 0.3]])
    assert confidence(probs, valid).tolist() == [0.6, 0.7]
    for _ in range(60):
        probs = updated_probabilities(probs, np.array([[1, 1]]), 0.3, valid, floor=0.02)
    np.testing.assert_allclose(probs, [[0.0, 0.98, 0.02], [0.02, 0.96, 0.02]])
    assert confidence(probs, valid).tolist() == [0.98, 0.98]


def test_grouping_takes_the_least_confident_weights():
    confidence = np.array([0.9, 0.5, 0.9, 0.4, 0.6, 0.9])
    layer = np.array([0, 0, 0, 1, 1, 1])
    rng = np.random.default_rng(0)
    assert least_confident_group(confidence, layer, 2, "global", rng).tolist() == [1, 3]
    # layer 1's two least confident (0.4, 0.6) average 0.5 < layer 0's (0.5, 0.9)
    assert least_confident_group(confidence, layer, 2, "layer", rng).tolist() == [3, 4]


def test_tell_keeps_the_best_unless_beaten_and_updates_only_the_group():
    search = CCEDA(space(), EDAConfig(population=4, selected=2, group_size=10), seed=3)
    search.best_fitness = 100
    before = search.probs.copy()
    samples = search.ask()
    assert not search.tell(np.array([10, 50, 99, 100]))
    assert search.best_fitness == 100 and np.all(search.best == 1)
    outside = np.setdiff1d(np.arange(search.space.size), search.group)
    np.testing.assert_array_equal(search.probs[outside], before[outside])
    assert samples.shape == (4, 10)
    samples = search.ask()
    assert search.tell(np.array([10, 150, 99, 100]))
    assert search.best_fitness == 150
    np.testing.assert_array_equal(search.best[search.group], samples[1])


def test_a_winner_the_confirmation_rejects_leaves_the_best_but_still_teaches_the_distribution():
    search = CCEDA(space(), EDAConfig(population=4, selected=2, group_size=10), seed=3)
    search.best_fitness = 100
    before = search.probs.copy()
    search.ask()
    asked = []
    assert not search.tell(np.array([10, 150, 99, 100]), lambda i: asked.append(i) or False)
    assert asked == [1] and search.best_fitness == 100 and np.all(search.best == 1)
    assert not np.array_equal(search.probs[search.group], before[search.group])
    search.ask()
    assert not search.tell(np.array([10, 50, 99, 100]), lambda i: asked.append(i) or True)
    assert asked == [1], "a winner that does not beat the best is not sent to be confirmed"
    samples = search.ask()
    assert search.tell(np.array([10, 50, 199, 100]), lambda i: True)
    assert search.best_fitness == 199
    np.testing.assert_array_equal(search.best[search.group], samples[2])


def test_state_round_trip_continues_identically():
    a = CCEDA(space(), EDAConfig(population=4, selected=2, group_size=8), seed=5)
    a.best_fitness = 0
    for f in ([1, 2, 3, 4], [0, 0, 9, 1]):
        a.ask()
        a.tell(np.array(f))
    b = CCEDA(space(), EDAConfig(population=4, selected=2, group_size=8), seed=99)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.ask(), b.ask())


def toy_fitness(search: CCEDA, target: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """-(distance to target) of each candidate: a separable problem with a known optimum."""
    values = np.tile(search.best_values(), (len(samples), 1))
    values[:, search.group] = search.space.values(samples, search.group)
    return -np.abs(values - target).sum(1)


def test_finds_the_known_optimum_of_a_separable_problem():
    s = space(sizes=(30, 30, 30))
    rng = np.random.default_rng(7)
    target = np.clip(s.base + rng.integers(-1, 2, s.size), s.lo, s.hi)
    cfg = EDAConfig(
        population=12, selected=3, learning_rate=0.1, init_sigma=0.6, group_size=15, generations_per_group=1
    )
    search = CCEDA(s, cfg, seed=1)
    search.best_fitness = int(-np.abs(search.best_values() - target).sum())
    start = search.best_fitness
    for _ in range(2000):
        samples = search.ask()
        search.tell(toy_fitness(search, target, samples))
        if search.best_fitness == 0:
            break
    assert start < -40 and search.best_fitness == 0
    np.testing.assert_array_equal(search.best_values(), target)


def linear_classifier(weight: np.ndarray) -> Program:
    """A one-layer integer network: 16 uint8 features -> 10 int32 logits."""
    tensors = {
        "input": TensorSpec("input", (16, 1, 1), 8, False),
        "logits": TensorSpec("logits", (10, 1, 1), 32, True),
    }
    op = Conv2d(
        "fc",
        "input",
        "logits",
        weight[:, :, None, None],
        4,
        np.zeros(10, dtype=np.int64),
        1,
        0,
        Requant(np.ones(10, dtype=np.int64), np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64)),
    )
    return Program(tensors, [op], "input", "logits", Accumulator(32, "wrap"))


@pytest.fixture(scope="module")
def toy_task():
    """A teacher's weights label 200 well-separated points; the search starts from the
    teacher with every weight moved by one level."""
    rng = np.random.default_rng(0)
    teacher = rng.integers(-7, 8, size=(10, 16))
    features = rng.integers(0, 256, size=(2000, 16))
    logits = features @ teacher.T
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > 300)[:200]
    images = torch.from_numpy(features[keep].reshape(-1, 16, 1, 1)).to(torch.uint8)
    labels = torch.from_numpy(logits[keep].argmax(1))
    start = np.clip(teacher + rng.choice([-1, 1], size=teacher.shape), -7, 7)
    return teacher, start, images, labels


def search_toy(evaluator: SimEvaluator, solved) -> tuple[int, int, np.ndarray]:
    """CC-EDA on the toy classifier until `solved(best fitness)`: (start fitness, end
    fitness, weights found)."""
    s = SearchSpace.from_weights({"fc": evaluator.program.op("fc").weight}, {"fc": 4}, radius=1)
    search = CCEDA(s, EDAConfig(population=16, selected=4, group_size=40, generations_per_group=1), seed=0)
    best = lambda: s.unflatten(search.best_values())  # noqa: E731
    search.best_fitness = first = evaluator.set_solution(best())
    for _ in range(600):
        if solved(search.best_fitness):
            break
        if search.tell(evaluator.evaluate(search.candidate_values(search.ask()))):
            evaluator.set_solution(best())
    return first, search.best_fitness, best()[("fc", WEIGHT)]


def test_search_on_accel_sim_recovers_a_perfect_classifier(toy_task):
    _, start, images, labels = toy_task
    program = linear_classifier(start)
    evaluator = SimEvaluator(program, IntegerFitness("accuracy", clip=64))
    evaluator.set_batch(images, Targets(labels))
    correct = lambda f: f // (2 * 64 * 200 + 1)  # noqa: E731
    first, best, weights = search_toy(evaluator, lambda f: correct(f) == 200)
    assert correct(first) < 197 and correct(best) == 200
    found = FunctionalSim(program.with_weights({"fc": weights})).run(images).logits
    assert torch.equal(found.argmax(1), labels)


def test_distillation_recovers_the_teachers_weights(toy_task):
    """With the teacher's integer logits as the target, the unique optimum (L1 distance 0)
    is the teacher itself, all 160 weights. Each image lights one feature, so every weight
    can be corrected on its own (with dense unsigned features, corrections of two weights
    of one row with opposite signs only pay together, and the EDA rarely samples both)."""
    teacher, start, _, _ = toy_task
    rng = np.random.default_rng(1)
    features = np.zeros((200, 16), dtype=np.int64)
    features[np.arange(200), np.arange(200) % 16] = rng.integers(1, 256, size=200)
    images = torch.from_numpy(features.reshape(-1, 16, 1, 1)).to(torch.uint8)
    teacher_logits = FunctionalSim(linear_classifier(teacher)).run(images).logits.to(torch.int64)
    evaluator = SimEvaluator(linear_classifier(start), IntegerFitness("distill", clip=64))
    evaluator.set_batch(images, Targets(teacher_logits.argmax(1), teacher_logits))
    first, best, weights = search_toy(evaluator, lambda f: f == 0)
    assert first < 0 and best == 0
    np.testing.assert_array_equal(weights[:, :, 0, 0], teacher)


def test_fitness_scores_are_the_documented_integers():
    logits = torch.tensor([[[5, 1, 0], [2, 2, 9]], [[0, 3, 0], [1, 0, 1]]])
    targets = Targets(torch.tensor([0, 2]), torch.tensor([[4, 1, 1], [2, 0, 9]]))
    np.testing.assert_array_equal(IntegerFitness("margin", clip=3).score(logits, targets), [3 + 3, -3 + 0])
    accuracy = IntegerFitness("accuracy", clip=3).score(logits, targets)
    np.testing.assert_array_equal(accuracy, [2 * 13 + 6 + 6, 0 * 13 - 3 + 6])
    np.testing.assert_array_equal(IntegerFitness("distill", clip=3).score(logits, targets), [-4, -16])
    with pytest.raises(HwqError, match="distill fitness needs"):
        IntegerFitness("distill", clip=3).score(logits, Targets(targets.labels))


def test_a_floor_the_levels_cannot_hold_is_refused():
    wide = SearchSpace.from_weights({"w": np.zeros(4, dtype=np.int64)}, {"w": 4}, radius=3)
    with pytest.raises(HwqError, match="min-prob 0.15 on each of 7 levels"):
        CCEDA(wide, EDAConfig(min_prob=0.15), seed=0)
    CCEDA(wide, EDAConfig(min_prob=0.14), seed=0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("population", 1),
        ("selected", 0),
        ("learning_rate", 0),
        ("init_sigma", 0.0),
        ("min_prob", 0.5),
        ("group_scope", "random"),
    ],
)
def test_bad_settings_are_named(field, value):
    with pytest.raises(HwqError, match=field.replace("_", "-")):
        EDAConfig(**{field: value}).validate()


def widening_search(widen_after: int) -> CCEDA:
    """Four 4-bit weights: flat at 0, flat at 6 (one step from the top of the range), flat at
    7 (at the top), and peaked at 0; all in one group."""
    s = SearchSpace.from_weights({"w": np.array([0, 6, 7, 0])}, {"w": 4}, radius=1, max_radius=2)
    search = CCEDA(s, EDAConfig(group_size=4, widen_after=widen_after, widen_below=0.9), seed=0)
    search.probs = np.array(
        [
            [0, 0.3, 0.4, 0.3, 0],
            [0, 0.4, 0.3, 0.3, 0],
            [0, 0.5, 0.5, 0, 0],
            [0, 0.02, 0.96, 0.02, 0],
        ]
    )
    search.group = np.arange(4)
    return search


def test_only_flat_weights_widen_and_only_within_their_range():
    search = widening_search(widen_after=1)
    assert search.valid.sum(1).tolist() == [3, 3, 2, 3]
    search.leave_group()
    assert search.radius.tolist() == [2, 2, 2, 1], "the peaked weight keeps its radius"
    assert search.valid.tolist() == [
        [True] * 5,
        [True, True, True, True, False],  # 8 is outside [-7, 7]
        [True, True, True, False, False],
        [False, True, True, True, False],
    ]
    np.testing.assert_allclose(search.probs.sum(1), 1)
    assert np.all(search.probs[~search.valid] == 0) and np.all(search.probs[search.valid] >= 0.02)
    # a new level starts at half its inner neighbour: [0.15, 0.3, 0.4, 0.3, 0.15] / 1.3
    np.testing.assert_allclose(search.probs[0], np.array([0.15, 0.3, 0.4, 0.3, 0.15]) / 1.3)
    np.testing.assert_array_equal(search.probs[3], [0, 0.02, 0.96, 0.02, 0])
    values = search.space.values(sample_categories(search.probs, 2000, np.random.default_rng(0)))
    assert values.min(0).tolist() == [-2, 4, 5, -1] and values.max(0).tolist() == [2, 7, 7, 1]
    search.leave_group()
    assert search.radius.tolist() == [2, 2, 2, 1], "never beyond --max-radius"


def test_weights_widen_only_after_the_given_number_of_visits():
    search = widening_search(widen_after=2)
    search.leave_group()
    assert search.radius.tolist() == [1, 1, 1, 1] and search.visits.tolist() == [1, 1, 1, 1]
    search.leave_group()
    assert search.radius.tolist() == [2, 2, 2, 1]


def test_a_widened_run_round_trips_its_radii():
    s = space()
    cfg = EDAConfig(population=4, selected=2, group_size=8, widen_after=1, widen_below=0.99)
    s = SearchSpace(tuple(dataclasses.replace(b, max_radius=2) for b in s.blocks))
    a = CCEDA(s, cfg, seed=5)
    a.best_fitness = 0
    for f in ([1, 2, 3, 4], [0, 0, 9, 1], [3, 1, 2, 0]):
        for _ in range(cfg.generations_per_group):
            a.ask()
            a.tell(np.array(f))
    assert (a.radius == 2).any()
    b = CCEDA(s, cfg, seed=99)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.valid, a.valid)
    np.testing.assert_array_equal(a.ask(), b.ask())


def test_blocks_keep_their_own_ranges_and_radii():
    """A later block (a per-channel bias, say) brings its own range and radius; categories
    are shared, each parameter's valid levels are its own."""
    w = weight_block("conv", np.array([[3, -7]]), 4, radius=1)
    bias = ParamBlock(
        "conv",
        "bias",
        (2,),
        np.array([0, 90]),
        np.array([-100, -100]),
        np.array([100, 100]),
        np.array([0.0, 90.0]),
        radius=3,
        max_radius=3,
    )
    s = SearchSpace((w, bias))
    assert s.width == 3 and s.keys == (("conv", "weight"), ("conv", "bias"))
    assert s.valid().sum(1).tolist() == [3, 2, 7, 7]
    out = s.unflatten(s.values(np.full(4, 3 + 1)))
    np.testing.assert_array_equal(out["conv", "weight"], [[4, -6]])
    np.testing.assert_array_equal(out["conv", "bias"], [1, 91])
    with pytest.raises(HwqError, match="listed twice"):
        SearchSpace((w, w))
