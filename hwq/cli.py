"""The `hwq` command. Each subcommand parses its flags and calls the library; errors in the
user's input come out as one line naming the problem, never as a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="brevitas")

from accel_sim.ir import Accumulator, IRError, load_program, program_digest, save_program  # noqa: E402

from . import HwqError, __version__  # noqa: E402
from .data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, SPLITS, load_split  # noqa: E402
from .evaluate import (  # noqa: E402
    DEFAULT_BATCH,
    DEFAULT_CALIBRATION_IMAGES,
    ModeResult,
    evaluate_model,
    evaluate_program,
    layer_lsb_differences,
    prepare,
)
from .model import QuantConfig  # noqa: E402
from .results import percent, write_json  # noqa: E402

MODES = ("float", "brevitas", "accel_sim")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="CIFAR-10 directory (default: $HWQ_DATA, then ~/.cache/hwq/cifar10)")
    p.add_argument(
        "--split", choices=SPLITS, default="val", help="test = test_batch; train/val partition data_batch_*"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="share of training images held out as val",
    )
    p.add_argument(
        "--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the train/val permutation"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the split")


def add_model_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--checkpoint", help="float checkpoint path, or 'resnet20' to download the public one")
    p.add_argument("--wbits", type=int, required=required, help="weight bits (2-16)")
    p.add_argument("--abits", type=int, required=required, help="activation bits (2-16)")
    p.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    p.add_argument("--first-wbits", type=int, help="weight bits of the first conv (default: --wbits)")
    p.add_argument("--last-wbits", type=int, help="weight bits of the classifier (default: --wbits)")
    p.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help="training images used to calibrate activation scales",
    )
    p.add_argument("--mult-bits", type=int, default=16, help="requantization multiplier width")


def add_accumulator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--acc-bits", type=int, help="accumulator width (default: the program's, 32 when lowering)"
    )
    p.add_argument("--overflow", choices=("wrap", "saturate"), help="accumulator overflow mode")


def quant_config(args: argparse.Namespace) -> QuantConfig:
    if args.wbits is None or args.abits is None:
        raise HwqError("--wbits and --abits are required with --checkpoint")
    cfg = QuantConfig(args.wbits, args.abits, args.per_channel, args.first_wbits, args.last_wbits)
    cfg.validate()
    return cfg


def accumulator_override(args: argparse.Namespace, current: Accumulator) -> Accumulator:
    acc = Accumulator(args.acc_bits or current.bits, args.overflow or current.overflow)
    acc.validate()
    return acc


def cmd_eval(args: argparse.Namespace) -> None:
    if bool(args.checkpoint) == bool(args.ir):
        raise HwqError("give exactly one of --checkpoint or --ir")
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.ir and modes != ("accel_sim",):
        if args.mode != "all":
            raise HwqError(f"--mode {args.mode} needs --checkpoint (an IR file only runs on accel_sim)")
        modes = ("accel_sim",)
    ds = load_split(args.data, args.split, args.val_fraction, args.split_seed).head(args.limit)
    if len(ds) == 0:
        raise HwqError(f"split {args.split} is empty")
    prepared = None
    if args.ir:
        program = load_program(args.ir)
    else:
        prepared = prepare(
            args.checkpoint,
            quant_config(args),
            args.data,
            args.calibration_images,
            args.val_fraction,
            args.split_seed,
            mult_bits=args.mult_bits,
        )
        program = prepared.program
    program = program.with_accumulator(accumulator_override(args, program.accumulator))
    if args.save_ir:
        save_program(program, args.save_ir)
    results: dict[str, ModeResult] = {}
    if "float" in modes:
        results["float"] = evaluate_model(prepared.float_model, ds, args.batch_size, "float")
    if "brevitas" in modes:
        results["brevitas"] = evaluate_model(prepared.qmodel, ds, args.batch_size, "brevitas")
    if "accel_sim" in modes:
        results["accel_sim"] = evaluate_program(program, ds, args.batch_size, args.device)
    report = {
        "command": "eval",
        "hwq_version": __version__,
        "config": {
            "checkpoint": args.checkpoint,
            "ir": args.ir,
            "split": args.split,
            "n": len(ds),
            "val_fraction": args.val_fraction,
            "split_seed": args.split_seed,
            "accumulator": {"bits": program.accumulator.bits, "overflow": program.accumulator.overflow},
            "program": {
                k: program.meta.get(k)
                for k in ("model", "wbits", "abits", "per_channel", "first_wbits", "last_wbits")
            },
            "ir_sha256": program_digest(program),
        },
    }
    report.update({mode: r.to_json() for mode, r in results.items()})
    if "brevitas" in results and "accel_sim" in results:
        agree = float((results["brevitas"].predictions == results["accel_sim"].predictions).float().mean())
        lsb = layer_lsb_differences(prepared.qmodel, program, ds.images[: args.batch_size])
        report["agreement"] = {
            "top1_brevitas_vs_accel_sim": agree,
            "max_lsb_difference": lsb,
            "lsb_images": min(args.batch_size, len(ds)),
        }
    print_eval(report, results)
    if args.json:
        write_json(args.json, report)


def print_eval(report: dict, results: dict[str, ModeResult]) -> None:
    cfg = report["config"]
    prog = cfg["program"]
    per = "per-channel" if prog["per_channel"] else "per-tensor"
    print(
        f"{prog['model']} W{prog['wbits']}A{prog['abits']} ({per} weights), split {cfg['split']}, "
        f"{cfg['n']} images, accumulator {cfg['accumulator']['bits']}-bit {cfg['accumulator']['overflow']}"
    )
    for mode, r in results.items():
        print(f"  {mode:<10} {percent(r.accuracy)}  ({r.correct}/{r.n})")
    if "accel_sim" in results:
        layers = results["accel_sim"].layers.values()
        widest = max(layers, key=lambda s: s.worst_case_bits)
        total = sum(s.overflows for s in layers)
        print(
            f"  accumulator: worst case {widest.worst_case_bits} bits ({widest.name}); "
            f"overflowed outputs: {total}"
        )
        for s in layers:
            if s.overflows:
                print(f"    {s.name:<16} {s.overflows} of {s.outputs} outputs overflowed")
    if "agreement" in report:
        a = report["agreement"]
        print(f"  top-1 agreement brevitas vs accel_sim: {percent(a['top1_brevitas_vs_accel_sim'])}")
        print(f"  max |accel_sim - brevitas| in LSB ({a['lsb_images']} images; local = same inputs):")
        diffs = a["max_lsb_difference"]
        for name, local in diffs["local"].items():
            print(f"    {name:<16} local {local:>6g}   end-to-end {diffs['end_to_end'][name]:>6g}")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy as float, Brevitas fake-quant and on accel_sim")
    p.add_argument("--ir", help="an IR file (from hwq train or --save-ir) instead of a checkpoint")
    add_model_flags(p)
    add_data_flags(p)
    add_accumulator_flags(p)
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--device", default="cpu", help="torch device for accel_sim (cpu, cuda)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--save-ir", help="write the lowered integer program to this file")
    p.set_defaults(func=cmd_eval)


SUBCOMMANDS = [add_eval_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hwq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (HwqError, IRError) as exc:
        print(f"hwq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hwq {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
