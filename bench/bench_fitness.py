"""Fitness evaluations/s of the CC-EDA trainer, with and without incremental evaluation.

One run, one fitness batch, one population of candidates per layer: the naive evaluator
runs every candidate's whole network from the image; the incremental ones start at the
changed layer from cached activations, with the whole population in one batched call or
in batches bounded by the activation size (SimEvaluator's default). The
MACs column is what one evaluation actually computes.

    python bench/bench_fitness.py --data ../shared/data/cifar10-subset \
        --checkpoint ../shared/models/resnet20-12fca82f.th
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")

from accel_sim.ir import WEIGHT, ParamKey  # noqa: E402
from hwq.data import load_split  # noqa: E402
from hwq.quant.evaluate import prepare  # noqa: E402
from hwq.quant.model import QuantConfig  # noqa: E402
from hwq.search.cceda import EDAConfig, SearchSpace  # noqa: E402
from hwq.search.evaluator import IntegerFitness, SimEvaluator, Targets  # noqa: E402
from hwq.search.train import logit_lsbs  # noqa: E402

LAYERS = ("conv1", "layer2.0.conv2", "layer3.2.conv2", "fc")


def candidates(program, layer: str, population: int, seed: int) -> dict[ParamKey, np.ndarray]:
    """A population that moves a CC group of the layer's weights by one level."""
    op = program.op(layer)
    space = SearchSpace.from_weights({layer: op.weight}, {layer: op.weight_bits}, radius=1)
    rng = np.random.default_rng(seed)
    group = rng.choice(space.size, size=min(EDAConfig().group_size, space.size), replace=False)
    values = np.tile(space.base, (population, 1))
    values[:, group] += rng.integers(-1, 2, size=(population, len(group)))
    values = np.clip(values, space.lo, space.hi)
    return {(layer, WEIGHT): values.reshape(population, *op.weight.shape)}


def rate(evaluator: SimEvaluator, cands: dict[ParamKey, np.ndarray], repeats: int) -> tuple[float, int]:
    evaluator.evaluate(cands)
    before_evals, before_macs = evaluator.evaluations, evaluator.macs
    start = time.perf_counter()
    for _ in range(repeats):
        evaluator.evaluate(cands)
    seconds = time.perf_counter() - start
    evals = evaluator.evaluations - before_evals
    return evals / seconds, (evaluator.macs - before_macs) // evals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data")
    parser.add_argument("--checkpoint", default="resnet20")
    parser.add_argument("--fitness-images", type=int, default=256)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    program = prepare(args.checkpoint, QuantConfig(4, 8), args.data).program
    train = load_split(args.data, "train")
    images, labels = train.images[: args.fitness_images], train.labels[: args.fitness_images]
    fitness = IntegerFitness("accuracy", logit_lsbs(program, 4.0))
    evaluators = {
        "naive (whole network per candidate)": SimEvaluator(program, fitness, incremental=False),
        "incremental, whole population per call": SimEvaluator(program, fitness, max_elements=1 << 40),
        "incremental, cache-sized batches (default)": SimEvaluator(program, fitness),
        "incremental, cache-sized, compiled requant": SimEvaluator(program, fitness, compile=True),
    }
    for e in evaluators.values():
        e.set_batch(images, Targets(labels))
    print(f"fitness batch {args.fitness_images} images, population {args.population}")
    print(f"{'changed layer':<16} {'evaluator':<42} {'evals/s':>8} {'MMAC/eval':>10} {'speedup':>8}")
    for layer in LAYERS:
        cands = candidates(program, layer, args.population, seed=0)
        base = None
        for name, evaluator in evaluators.items():
            evals_per_s, macs = rate(evaluator, cands, args.repeats)
            base = base or evals_per_s
            print(
                f"{layer:<16} {name:<42} {evals_per_s:>8.2f} {macs / 1e6:>10.1f} {evals_per_s / base:>7.2f}x"
            )


if __name__ == "__main__":
    main()
