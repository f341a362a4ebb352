"""`hwq sweep` and `hwq report`: the bit-width grid and the report drawn from its results."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .. import HwqError
from ..data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
from ..flags import MULT_BITS, nonnegative_int, open_fraction, positive_float, positive_int, torch_device
from ..outdir import check_output_dir
from ..quant import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MULT_BITS

if TYPE_CHECKING:
    from .sweep import SweepConfig


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """Flags given override the grid that --full selects (the small grid without it)."""
    from .methods import parse_methods
    from .sweep import FULL_GRID, SMALL_GRID, SweepConfig, parse_arrays, parse_int_list, parse_overflow

    grid = FULL_GRID if args.full else SMALL_GRID
    return SweepConfig(
        checkpoint=args.checkpoint,
        out=args.out,
        data=args.data,
        wbits=parse_int_list(args.wbits, "--wbits") if args.wbits else grid["wbits"],
        abits=parse_int_list(args.abits, "--abits") if args.abits else grid["abits"],
        acc_bits=parse_int_list(args.acc_bits, "--acc-bits") if args.acc_bits else grid["acc_bits"],
        overflow=parse_overflow(args.overflow) if args.overflow else grid["overflow"],
        per_channel=args.per_channel,
        hw=args.hw or SweepConfig.hw,
        arrays=parse_arrays(args.arrays) if args.arrays else grid["arrays"],
        area=tuple(args.area or ()),
        train_budget=args.train_budget,
        seed=args.seed,
        jobs=args.jobs or 1,
        limit=(args.limit or None) if args.limit is not None else grid["limit"],
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        calibration_images=args.calibration_images,
        mult_bits=args.mult_bits,
        batch=args.batch,
        device=args.device,
        methods=parse_methods(args.methods) if args.methods else (),
        method_epochs=args.method_epochs,
        method_minutes=args.method_minutes,
    )


def cmd_sweep(args: argparse.Namespace) -> None:
    check_output_dir(args.out)
    torch_device(args.device)
    from .sweep import sweep

    summary = sweep(sweep_config(args))
    if summary.skipped:
        names = ", ".join(p.name for p in summary.skipped[:4]) + (" ..." if len(summary.skipped) > 4 else "")
        print(f"skipped {len(summary.skipped)} point(s) whose accumulator cannot hold one product: {names}")
    print(
        f"{summary.points} points: {summary.already_done} already done, {summary.measured} measured; "
        f"results in {summary.results} (hwq report --results {Path(summary.results).parent} --out DIR)"
    )


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="accuracy, overflows, cycles, energy and area over a grid of bit widths (resumable)"
    )
    p.add_argument("--checkpoint", required=True, help="float checkpoint path, or 'resnet20'")
    p.add_argument("--data", help="CIFAR-10 directory (default: $HWQ_DATA, then ~/.cache/hwq/cifar10)")
    p.add_argument("--out", required=True, help="sweep directory: results.jsonl, sweep.json, ir/, train/")
    p.add_argument("--full", action="store_true", help="the full grid (default: a small grid of minutes)")
    p.add_argument("--wbits", help="weight bits, e.g. 2,3,4,8 or 2-8 (default small grid: 2,3,4,8)")
    p.add_argument("--abits", help="activation bits (default small grid: 4,8)")
    p.add_argument("--acc-bits", help="accumulator bits (default small grid: 10,12,14,16,18,20,24,32)")
    p.add_argument("--overflow", help="overflow modes, e.g. wrap,saturate (default both)")
    p.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    p.add_argument("--hw", help="accelerator TOML for timing and energy (default examples/rtl_8x8.toml)")
    p.add_argument("--arrays", help="array sizes, e.g. 8x8,16x16 (default: the --hw file's)")
    p.add_argument(
        "--area", action="append", help="CSV of python -m rtl_models.area (repeatable: one per overflow mode)"
    )
    p.add_argument(
        "--methods",
        help="also run these methods at every point: rtn,gptq,gpfq,learned-round,qat,a2q,a2q-plus,"
        "cc-eda,cc-eda-best (docs/baselines.md; run directories under OUT/baselines/ and OUT/train/)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--method-epochs", type=positive_int, help="--methods: epochs of qat, a2q and a2q-plus"
    )
    budget.add_argument(
        "--method-minutes",
        type=positive_float,
        help="--methods: minutes of qat, a2q, a2q-plus (and of CC-EDA without qat)",
    )
    p.add_argument(
        "--train-budget", type=positive_int, help="also train each point with CC-EDA for N evaluations"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the CC-EDA training (default 0)")
    p.add_argument(
        "--jobs", type=positive_int, help="lowered programs measured in parallel processes (default 1)"
    )
    p.add_argument(
        "--limit",
        type=nonnegative_int,
        help="accuracy on the first N val images (default small grid: 500; 0: all)",
    )
    p.add_argument("--val-fraction", type=open_fraction, default=DEFAULT_VAL_FRACTION, help="held-out share")
    p.add_argument(
        "--split-seed", type=nonnegative_int, default=DEFAULT_SPLIT_SEED, help="seed of the train/val split"
    )
    p.add_argument("--calibration-images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES)
    p.add_argument(
        "--mult-bits", type=MULT_BITS, default=DEFAULT_MULT_BITS, help="requantization multiplier width"
    )
    p.add_argument("--batch", type=positive_int, default=1, help="images per run in the timing model")
    p.add_argument("--device", default="cpu", help="torch device for accel_sim (cpu, cuda)")
    p.set_defaults(func=cmd_sweep)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report, build_training_report

    if args.grid is not None and args.codesign is None:
        raise HwqError("--grid goes with --codesign: the uniform grid drawn beside a co-design front")
    if args.train_runs:
        report = build_training_report(args.train_runs, args.out)
    elif args.codesign:
        from ..codesign.report import build_codesign_report

        report = build_codesign_report(args.codesign, args.out, args.grid)
    else:
        report = build_report(args.results, args.out)
    pages = "" if args.train_runs else "report.html, summary.md, "
    print(f"wrote {pages}{len(report.figures)} figures and {len(report.tables)} tables under {report.out}")
    for name, why in report.missing.items():
        print(f"  {name}: {why}")


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="HTML report, Markdown summary, figures and CSV tables of a sweep or a co-design run"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="a sweep directory or its results.jsonl")
    source.add_argument(
        "--train-runs", nargs="+", help="hwq train run directories: their training curves only"
    )
    source.add_argument("--codesign", help="a hwq codesign run directory: its front against its grid")
    p.add_argument("--grid", help="with --codesign: the grid.json to draw beside it (default: the run's own)")
    p.add_argument("--out", required=True, help="directory for report.html, summary.md, figures/, tables/")
    p.set_defaults(func=cmd_report)


def register(sub: argparse._SubParsersAction) -> None:
    add_sweep_parser(sub)
    add_report_parser(sub)
