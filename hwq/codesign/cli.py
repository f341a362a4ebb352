"""`hwq codesign`: the Pareto front of accuracy against energy, area and cycles."""

from __future__ import annotations

import argparse

from .. import HwqError
from ..flags import positive_float, positive_int
from ..outdir import check_output_dir


def cmd_codesign(args: argparse.Namespace) -> None:
    from ..search.distributed import validate_settings
    from .run import CodesignConfig, codesign
    from .space import load_space

    load_space(args.space)  # a bad space file is refused before anything is loaded
    check_output_dir(args.out)
    validate_settings(args.workers, args.ray_address, args.cpus_per_worker, "accel_sim")
    if args.workers is not None:
        from ..search.distributed import require_ray

        require_ray()
    cfg = CodesignConfig(
        space=args.space,
        checkpoint=args.checkpoint,
        out=args.out,
        data=args.data,
        workers=args.workers,
        ray_address=args.ray_address,
        cpus_per_worker=args.cpus_per_worker,
        progress=not args.quiet,
        grid_seconds=args.grid_seconds or 0.0,
    )
    summary = codesign(cfg, resume=args.resume)
    if summary["front_points"] == 0:
        raise HwqError(f"no design of the space met its constraints; see {args.out}/candidates.jsonl")
    print(
        f"{summary['candidates']} designs, {summary['finetuned']} fine-tuned with CC-EDA; "
        f"{summary['front_points']} on the front: {summary['front']} (and front.csv)"
    )
    if "grid" in summary:
        print(f"uniform grid: {summary['grid_points']} of {summary['grid_size']} points in {summary['grid']}")
    print(f"draw it: hwq report --codesign {args.out} --out REPORT_DIR")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "codesign",
        help="search accelerators and per-layer widths with the weights: a Pareto front",
        description="NSGA-II (pymoo) over the accelerator and precision space of a TOML file, CC-EDA "
        "fine-tuning of each promising design's weights on accel_sim; writes front.json/front.csv "
        "(docs/codesign.md).",
    )
    p.add_argument("--space", required=True, help="the space TOML (examples/codesign/resnet20_space.toml)")
    p.add_argument("--checkpoint", required=True, help="float checkpoint path, or 'resnet20'")
    p.add_argument("--data", help="CIFAR-10 directory (default: $HWQ_DATA, then ~/.cache/hwq/cifar10)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--workers", type=positive_int, help="evaluate candidates on N Ray actors")
    p.add_argument("--ray-address", help="join this Ray cluster (default: a local Ray)")
    p.add_argument("--cpus-per-worker", type=positive_int, help="CPUs (torch threads) per actor (default 1)")
    p.add_argument(
        "--grid-seconds",
        type=positive_float,
        help="then measure the uniform grid over the same space for S seconds (grid.json), "
        "for hwq report to draw beside the front",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_codesign)
