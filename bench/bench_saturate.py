"""Saturating accumulators on accel_sim: the replay of outputs that clip at both bounds.

Two measurements in one process on the same images:
1. the replay alone: `composed_clamps` (pairwise composition, log2 K rounds) against the
   K-step loop of the definition, on the products of the real ResNet-20 W8A8 outputs
   that clip at both bounds of a 14-bit saturating accumulator (the first layer with
   such outputs); both must give the same integers;
2. whole-network images/s at W8A8 with a 14-bit accumulator, saturate against wrap (wrap
   needs no replay: the peer that shows what saturation still costs).

    python bench/bench_saturate.py --data ../shared/data/cifar10-subset \
        --checkpoint ../shared/models/resnet20-12fca82f.th
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from accel_sim import saturate  # noqa: E402
from accel_sim.functional import FunctionalSim  # noqa: E402
from accel_sim.ir import Accumulator  # noqa: E402
from hwq.data import load_split  # noqa: E402
from hwq.quant.evaluate import prepare  # noqa: E402
from hwq.quant.model import QuantConfig  # noqa: E402


def k_steps(products: torch.Tensor, value: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The definition: one clamped addition per product, vectorized over outputs."""
    value = value.clone()
    for step in products.t().contiguous():
        value.add_(step).clamp_(lo, hi)
    return value


def best_seconds(run, repeats: int = 3) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def captured_replays(sim: FunctionalSim, images: torch.Tensor) -> list[tuple]:
    """The arguments of every composed_clamps call of one forward pass."""
    calls, original = [], saturate.composed_clamps

    def capture(products, value, lo, hi):  # noqa: ANN001, ANN202
        calls.append((products.clone(), value.clone(), lo, hi))
        return original(products, value, lo, hi)

    saturate.composed_clamps = capture
    try:
        sim.run(images)
    finally:
        saturate.composed_clamps = original
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data")
    p.add_argument("--checkpoint", default="resnet20")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--acc-bits", type=int, default=14)
    args = p.parse_args()
    program = prepare(args.checkpoint, QuantConfig(8, 8, True), args.data).program
    images = load_split(args.data, "val").images[: args.images]
    saturating = program.with_accumulator(Accumulator(args.acc_bits, "saturate"))
    wrapping = program.with_accumulator(Accumulator(args.acc_bits, "wrap"))
    calls = captured_replays(FunctionalSim(saturating), images)
    if not calls:
        raise SystemExit("no output clips at both bounds: pick a narrower --acc-bits")
    products, value, lo, hi = max(calls, key=lambda c: c[0].numel())
    assert torch.equal(saturate.composed_clamps(products, value, lo, hi), k_steps(products, value, lo, hi))
    composed = best_seconds(lambda: saturate.composed_clamps(products, value, lo, hi))
    stepped = best_seconds(lambda: k_steps(products, value, lo, hi))
    m, k = products.shape
    print(
        f"replay of {m} outputs x {k} products clipping at both bounds of a {args.acc_bits}-bit accumulator:"
    )
    print(
        f"  K-step definition {stepped * 1e3:9.1f} ms   composed {composed * 1e3:9.1f} ms"
        f"   x{stepped / composed:.1f}"
    )
    rates = {}
    for name, prog in (("wrap", wrapping), ("saturate", saturating)):
        sim = FunctionalSim(prog)
        sim.run(images[:8])
        rates[name] = len(images) / best_seconds(lambda sim=sim: sim.run(images), repeats=2)
    print(
        f"W8A8 ResNet-20, {args.acc_bits}-bit accumulator, {len(images)} images: wrap {rates['wrap']:.1f} "
        f"images/s, saturate {rates['saturate']:.1f} images/s "
        f"(saturate / wrap {rates['saturate'] / rates['wrap']:.2f})"
    )


if __name__ == "__main__":
    main()
