"""Fitness at scale: in process against Ray workers, and the accumulator modes, in one run.

Part 1 (Ray). The same CC-EDA generations (ResNet-20 W4A8, a population that moves a
256-weight group of one layer, for several layers in turn; the distill fitness on 256
training images) are scored in process and by `RayEvaluator` with 1 and 2 local workers.
It prints evaluations/s, the bytes sent to the workers per generation, and each run's
overhead: its time per generation minus the in-process time of its largest image shard on
the same threads. From these it fits and prints a model of a generation's time on N
machines like this one (stated below the table; it assumes what it says).

Part 2 (accumulators). The one-layer search of issue 10 (`layer2.1.conv1`, W4A8,
population 16, 256 images, candidates as bench/bench_fitness.py builds them) at a 32-bit
wrap, 16-bit wrap and 16-bit saturate accumulator, as ratios to the 32-bit rate.

Every Ray score is checked against the in-process score of the same candidate.

    python bench/bench_scale.py --data ../shared/data/cifar10-subset \
        --checkpoint ../shared/models/resnet20-12fca82f.th
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch

warnings.filterwarnings("ignore")

from bench_fitness import candidates  # noqa: E402

from accel_sim.ir import WEIGHT, Accumulator, ParamKey, Program  # noqa: E402
from hwq.data import load_split  # noqa: E402
from hwq.quant.evaluate import evaluate_program, prepare  # noqa: E402
from hwq.quant.model import QuantConfig  # noqa: E402
from hwq.search.distributed import MIN_SHARD_IMAGES, RayEvaluator, connect  # noqa: E402
from hwq.search.evaluator import Evaluator, IntegerFitness, SimEvaluator, Targets, integer_logits  # noqa: E402
from hwq.search.train import logit_lsbs  # noqa: E402

SCALE_LAYERS = ("layer1.2.conv2", "layer2.1.conv1", "layer3.0.conv2", "fc")
ACCUMULATOR_LAYER = "layer2.1.conv1"
ACCUMULATORS = {
    "32-bit wrap": (Accumulator(32, "wrap"), None),
    "16-bit wrap": (Accumulator(16, "wrap"), 0.7),
    "16-bit saturate": (Accumulator(16, "saturate"), 0.3),
}
NEW_BATCH_EVERY, EVAL_EVERY = 16, 25  # the trainer's defaults, for the amortized terms


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def solution(program: Program) -> dict[ParamKey, np.ndarray]:
    return {(op.name, WEIGHT): op.weight for op in program.conv_ops()}


def ready(evaluator: Evaluator, program: Program, images: torch.Tensor, targets: Targets) -> float:
    """Give the evaluator the batch and the context, as the trainer does on a new batch; seconds."""
    start = time.perf_counter()
    evaluator.set_batch(images, targets)
    evaluator.set_solution(solution(program))
    return time.perf_counter() - start


def seconds_per_generation(
    evaluator: Evaluator, generations: list[dict[ParamKey, np.ndarray]], repeats: int
) -> tuple[float, list[np.ndarray]]:
    """Mean seconds per generation over `repeats` passes, after one warm-up pass (its scores)."""
    scores = [evaluator.evaluate(g) for g in generations]
    start = time.perf_counter()
    for _ in range(repeats):
        for g in generations:
            evaluator.evaluate(g)
    return (time.perf_counter() - start) / (repeats * len(generations)), scores


def in_process_time(program, fitness, images, targets, generations, repeats, n_threads) -> float:
    with threads(n_threads):
        evaluator = SimEvaluator(program, fitness)
        ready(evaluator, program, images, targets)
        return seconds_per_generation(evaluator, generations, repeats)[0]


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def ray_part(args, prepared, images, targets) -> None:
    program, fitness, population = prepared.program, args.fitness, args.population
    n = len(images)
    generations = [candidates(program, layer, population, seed=i) for i, layer in enumerate(args.layers)]
    cores = torch.get_num_threads()
    print(
        f"\n== Ray: {len(generations)} generations (one per layer: {', '.join(args.layers)}), population "
        f"{population}, {n} images, distill fitness, {cores} threads in process =="
    )
    reference = SimEvaluator(program, fitness)
    t_batch = ready(reference, program, images, targets)
    t_in, expected = seconds_per_generation(reference, generations, args.repeats)
    sizes = [n, n // 2, n // 4]
    t_sizes = [t_in] + [
        in_process_time(
            program,
            fitness,
            images[:s],
            Targets(targets.labels[:s], targets.teacher[:s]),
            generations,
            args.repeats,
            cores,
        )
        for s in sizes[1:]
    ]
    val = load_split(args.data, "val")
    start = time.perf_counter()
    evaluate_program(program, val)
    t_val = time.perf_counter() - start

    started = connect(None, cores)
    rows = [("in process", t_in, 0.0, 0, t_batch)]
    overhead_one = 0.0
    bytes_one = 0
    try:
        for workers in args.workers:
            cpus = max(1, cores // workers)
            make = functools.partial(SimEvaluator, program, fitness)
            with RayEvaluator(make, fitness, workers, cpus_per_worker=cpus) as remote:
                t_ray_batch = ready(remote, program, images, targets)
                remote.sent.clear()
                t_ray, scores = seconds_per_generation(remote, generations, args.repeats)
                for got, want in zip(scores, expected, strict=True):
                    np.testing.assert_array_equal(got, want)
                calls = (args.repeats + 1) * len(generations)
                sent = remote.sent["evaluate"] // calls
                shard = max(remote.shard_sizes)
                shard_targets = Targets(targets.labels[:shard], targets.teacher[:shard])
            t_shard = in_process_time(
                program, fitness, images[:shard], shard_targets, generations, args.repeats, cpus
            )
            overhead = t_ray - t_shard
            rows.append(
                (f"Ray, {workers} local worker(s) x {cpus} thread(s)", t_ray, overhead, sent, t_ray_batch)
            )
            if workers == 1:
                overhead_one, bytes_one = overhead, sent
    finally:
        if started:
            import ray

            ray.shutdown()

    print(
        f"{'evaluator':<36} {'evals/s':>8} {'vs in process':>14} {'ms/gen':>8} {'overhead ms/gen':>16} "
        f"{'bytes sent/gen':>15} {'new batch s':>12}"
    )
    for name, t, overhead, sent, batch_s in rows:
        print(
            f"{name:<36} {population / t:>8.1f} {t_in / t:>13.2f}x {1e3 * t:>8.1f} {1e3 * overhead:>16.1f} "
            f"{sent:>15,} {batch_s:>12.2f}"
        )
    print(
        "(scores identical to in process for every candidate; overhead = ms/gen minus the in-process time "
        "of the largest image shard on the worker's threads)"
    )
    model(args, n, population, sizes, t_sizes, overhead_one, bytes_one, t_batch, t_val, t_in)


def model(args, n, population, sizes, t_sizes, overhead, bytes_per_worker, t_batch, t_val, t_in) -> None:
    a, b = fit_line(sizes, t_sizes)
    print(
        "\nModel of a generation on N machines like this one, one worker each with all "
        f"{torch.get_num_threads()} threads, image shards only:\n"
        f"  t_gen(N) = a + b*n/N + o + rtt + N*B/bw + t_batch/N/{NEW_BATCH_EVERY} + t_val/{EVAL_EVERY}\n"
        f"  a = {1e3 * a:.1f} ms (per-call cost that does not shrink with the shard), "
        f"b = {1e3 * b:.3f} ms/image (fitted on {', '.join(map(str, sizes))} images in process: "
        f"{', '.join(f'{1e3 * t:.1f}' for t in t_sizes)} ms)\n"
        f"  o = {1e3 * overhead:.1f} ms (1 local worker's measured overhead), rtt = {args.rtt_ms} ms, "
        f"B = {bytes_per_worker:,} bytes per worker, bw = {args.bandwidth_mbit} Mbit/s\n"
        f"  t_batch = {t_batch:.2f} s (new batch: images + activations, per-image work, divided by N), "
        f"t_val = {t_val:.2f} s (held-out accuracy, in the driver, not distributed)\n"
        f"  assumes: identical machines, shards of at least {MIN_SHARD_IMAGES} images "
        f"(N <= {n // MIN_SHARD_IMAGES}), no other load, the driver's sends serialized on its link, "
        "the layer mix above"
    )
    print(f"{'N':>4} {'t_gen ms':>9} {'evals/s':>8} {'vs 1 machine in process':>24}")
    n_max = max(1, n // MIN_SHARD_IMAGES)
    for machines in [m for m in (1, 2, 4, 8, 16) if m <= n_max]:
        t = (
            a
            + b * n / machines
            + overhead
            + args.rtt_ms / 1e3
            + machines * bytes_per_worker * 8 / (args.bandwidth_mbit * 1e6)
            + t_batch / machines / NEW_BATCH_EVERY
            + t_val / EVAL_EVERY
        )
        t_local = t_in + t_batch / NEW_BATCH_EVERY + t_val / EVAL_EVERY
        print(f"{machines:>4} {1e3 * t:>9.1f} {population / t:>8.1f} {t_local / t:>23.2f}x")


def accumulator_part(args, prepared, images, targets) -> None:
    population = args.population
    print(
        f"\n== Accumulators: {ACCUMULATOR_LAYER}, W4A8, population {population}, {len(images)} images, "
        f"{args.accumulator_generations} generations =="
    )
    generations = [
        candidates(prepared.program, ACCUMULATOR_LAYER, population, seed=s)
        for s in range(args.accumulator_generations)
    ]
    rates = {}
    for label, (accumulator, _) in ACCUMULATORS.items():
        program = prepared.program.with_accumulator(accumulator)
        evaluator = SimEvaluator(program, args.fitness)
        ready(evaluator, program, images, targets)
        rates[label] = population / seconds_per_generation(evaluator, generations, args.repeats)[0]
    base = rates["32-bit wrap"]
    print(f"{'accumulator':<18} {'evals/s':>8} {'vs 32-bit':>10} {'target':>8}")
    for label, (_, target) in ACCUMULATORS.items():
        goal = f">= {target}x" if target else ""
        print(f"{label:<18} {rates[label]:>8.2f} {rates[label] / base:>9.2f}x {goal:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data")
    parser.add_argument("--checkpoint", default="resnet20")
    parser.add_argument("--fitness-images", type=int, default=256)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=lambda s: tuple(s.split(",")), default=SCALE_LAYERS)
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--accumulator-generations", type=int, default=2)
    parser.add_argument("--rtt-ms", type=float, default=0.5, help="network round trip the model assumes")
    parser.add_argument("--bandwidth-mbit", type=float, default=1000, help="driver link the model assumes")
    parser.add_argument("--parts", default="ray,accumulators", help="which parts to run")
    args = parser.parse_args()

    prepared = prepare(args.checkpoint, QuantConfig(4, 8), args.data)
    train = load_split(args.data, "train")
    images, labels = train.images[: args.fitness_images], train.labels[: args.fitness_images]
    scale = prepared.program.tensors[prepared.program.output].scale
    targets = Targets(labels, integer_logits(prepared.float_model, images, scale))
    args.fitness = IntegerFitness("distill", logit_lsbs(prepared.program, 4.0))
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        if "ray" in args.parts and importlib.util.find_spec("ray") is None:
            print("\n== Ray: skipped, Ray is not installed (pip install 'hwq[distributed]') ==")
        elif "ray" in args.parts:
            ray_part(args, prepared, images, targets)
        if "accumulators" in args.parts:
            accumulator_part(args, prepared, images, targets)


if __name__ == "__main__":
    main()
