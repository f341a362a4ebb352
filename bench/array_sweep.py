"""ResNet-20 on square arrays from 8x8 to 64x64: cycles, utilization, latency and energy.

Every array keeps the rest of the accelerator of --hw (buffers, bandwidth, clock, energy),
so only the array size changes. Bigger arrays must take fewer cycles, while the layers
too small to fill them (conv1 with K = 27, layer3 with 8x8 maps, the classifier) use a
shrinking share of the PEs; the script prints both and checks them.

    python bench/array_sweep.py --checkpoint ../shared/models/resnet20-12fca82f.th \
        --data ../shared/data/cifar10-subset --wbits 4 --abits 8 [--hw examples/edge_16x16.toml]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

from accel_sim.hardware import DATAFLOWS, load_accelerator
from accel_sim.timing import ProgramTiming, program_timing
from hwq.flags import add_model_flags, program_from_args

EDGE = Path(__file__).resolve().parents[1] / "examples" / "edge_16x16.toml"
SIZES = (8, 16, 32, 64)
SMALL_LAYERS = ("conv1", "layer3.2.conv2", "fc")


def falling(values: list[float]) -> bool:
    return all(a > b for a, b in itertools.pairwise(values))


def print_sweep(sweep: dict[int, ProgramTiming]) -> None:
    header = "".join(f"{name + ' util':>20}" for name in SMALL_LAYERS)
    print(f"{'array':>7} {'cycles':>10} {'stalls':>9} {'util':>7} {'latency ms':>11} {'uJ/inf':>8}{header}")
    for size, timing in sweep.items():
        total = timing.total_json()
        layers = {layer.name: layer for layer in timing.layers}
        small = "".join(f"{100 * layers[name].utilization:>19.2f}%" for name in SMALL_LAYERS)
        print(
            f"{size:>3}x{size:<3} {total['cycles']:>10,} {total['stall_cycles']:>9,} "
            f"{100 * total['utilization']:>6.2f}% {1e3 * total['latency_s']:>11.4f} "
            f"{total['energy_per_inference_pj'] / 1e6:>8.2f}{small}"
        )


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--hw", default=str(EDGE), help="accelerator whose array size is swept")
    parser.add_argument("--dataflow", choices=DATAFLOWS, help="override the config's dataflow")
    parser.add_argument("--ir", help="an IR file instead of a checkpoint")
    add_model_flags(parser)
    parser.add_argument("--data", help="CIFAR-10 directory for calibration with --checkpoint")
    args = parser.parse_args()
    base = load_accelerator(args.hw)
    base = dataclasses.replace(base, dataflow=args.dataflow or base.dataflow)
    program = program_from_args(args)
    start = time.perf_counter()
    sweep = {n: program_timing(program, dataclasses.replace(base, rows=n, cols=n)) for n in SIZES}
    seconds = time.perf_counter() - start
    print(
        f"{base.name} ({base.dataflow}, {base.clock_mhz:g} MHz), array swept; "
        f"{len(SIZES)} configurations modelled in {1e3 * seconds:.1f} ms"
    )
    print_sweep(sweep)
    checks = {
        "cycles fall as the array grows": falling([t.cycles for t in sweep.values()]),
        **{
            f"{name} utilization falls": falling(
                [next(x for x in t.layers if x.name == name).utilization for t in sweep.values()]
            )
            for name in SMALL_LAYERS
        },
    }
    for what, ok in checks.items():
        print(f"  {what}: {'yes' if ok else 'NO'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
