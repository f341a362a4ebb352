"""Flags shared by several `hwq` commands, and their conversion into library objects.

Only light modules are imported here: every command builds its parser from this file,
and `hwq --help`, `hwq sim --ir` or `hwq report` must not pay for importing torch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from accel_sim.ir import MAX_MULT_BITS, Accumulator, Program, load_program

from . import HwqError
from .data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, SPLITS
from .outdir import output_file_problem
from .quant import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MULT_BITS, WEIGHT_RANGES

if TYPE_CHECKING:
    from .quant.accumulator_fit import AccumulatorFit
    from .quant.model import QuantConfig

# ----- argparse types: a bad value is refused while parsing, naming the flag and the value


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not positive")
    return value


def open_fraction(text: str) -> float:
    """A share strictly between 0 and 1 (a held-out fraction)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 1")
    return value


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{lo}, {hi}]")
        return value

    return parse


def bit_widths(text: str) -> tuple[int, ...]:
    """Comma-separated bit widths, one per weight layer (--layer-wbits)."""
    widths = tuple(_number(part.strip(), int) for part in text.split(","))
    bad = [w for w in widths if w < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]} is not a positive width")
    return widths


def output_file(text: str) -> str:
    """A file a command will write (--json, --save-ir, --csv): refused now if it cannot be."""
    problem = output_file_problem(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def torch_device(name: str, flag: str = "--device") -> str:
    """The evaluator's torch device, refused before any work when it does not parse or this
    machine cannot use it (torch is imported here, by the commands that run on it)."""
    from accel_sim.device import resolve_device
    from accel_sim.errors import DeviceError

    try:
        resolve_device(name)
    except DeviceError as exc:
        raise HwqError(f"{flag}: {exc}") from None
    return name


# ----- shared flags


MULT_BITS = int_in(2, MAX_MULT_BITS)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="CIFAR-10 directory (default: $HWQ_DATA, then ~/.cache/hwq/cifar10)")
    p.add_argument(
        "--split", choices=SPLITS, default="val", help="test = test_batch; train/val partition data_batch_*"
    )
    p.add_argument(
        "--val-fraction",
        type=open_fraction,
        default=DEFAULT_VAL_FRACTION,
        help="share of training images held out as val",
    )
    p.add_argument(
        "--split-seed",
        type=nonnegative_int,
        default=DEFAULT_SPLIT_SEED,
        help="seed of the train/val permutation",
    )
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images of the split")


def add_model_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--checkpoint", help="float checkpoint path, or 'resnet20' to download the public one")
    p.add_argument("--wbits", type=int, required=required, help="weight bits (2-16)")
    p.add_argument("--abits", type=int, required=required, help="activation bits (2-16)")
    p.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    p.add_argument("--first-wbits", type=int, help="weight bits of the first conv (default: --wbits)")
    p.add_argument("--last-wbits", type=int, help="weight bits of the classifier (default: --wbits)")
    add_layer_wbits_flag(p)
    add_weight_range_flag(p)
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help="training images used to calibrate activation scales",
    )
    p.add_argument(
        "--mult-bits", type=MULT_BITS, default=DEFAULT_MULT_BITS, help="requantization multiplier width"
    )


def add_layer_wbits_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layer-wbits",
        type=bit_widths,
        metavar="B,B,...",
        help="every weight layer's bits in network order (the stem, each block's conv1 and conv2, "
        "the classifier: hwq codesign's layer_wbits); --wbits is then the widest",
    )


def layer_wbits_settings(args: argparse.Namespace) -> dict:
    """--layer-wbits and the --wbits it implies (the widest layer's, the width the
    accelerator's PEs must hold), refused beside flags that set some layers' widths too."""
    widths = getattr(args, "layer_wbits", None)
    if widths is None:
        return {}
    if args.first_wbits is not None or args.last_wbits is not None:
        raise HwqError("--layer-wbits sets every layer's width: drop --first-wbits and --last-wbits")
    if args.wbits is not None and args.wbits != max(widths):
        raise HwqError(f"--wbits {args.wbits} is not the widest of --layer-wbits ({max(widths)})")
    return {"wbits": max(widths), "layer_wbits": widths}


def add_weight_range_flag(p: argparse.ArgumentParser, default: str | None = "narrow") -> None:
    p.add_argument(
        "--weight-range",
        choices=WEIGHT_RANGES,
        default=default,
        help="narrow: symmetric weights, [-(2^(b-1)-1), 2^(b-1)-1] (Brevitas' narrow_range, the "
        "default); full: also -2^(b-1), four levels at 2 bits instead of three",
    )


def add_accumulator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--acc-bits", type=int, help="accumulator width (default: the program's, 32 when lowering)"
    )
    p.add_argument("--overflow", choices=("wrap", "saturate"), help="accumulator overflow mode")


def fit_quantile(text: str) -> float:
    """A quantile in [0.5, 1] of the measured accumulator magnitudes (--fit-accumulator)."""
    value = _number(text, float)
    if not 0.5 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0.5 and 1")
    return value


def add_fit_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fit-accumulator",
        type=fit_quantile,
        nargs="?",
        const=1.0,
        metavar="QUANTILE",
        help="calibrate so that each layer's measured sums on the calibration images (their "
        "QUANTILE, default the largest) fit --acc-bits (docs/training.md, narrow accumulators)",
    )


def accumulator_fit(quantile: float | None, accumulator: Accumulator | None) -> AccumulatorFit | None:
    """The fit a command asked for; it needs a narrow accumulator to aim at."""
    if quantile is None:
        return None
    if accumulator is None:
        raise HwqError("--fit-accumulator needs the target accumulator (--acc-bits, or a --hw file)")
    from .quant.accumulator_fit import AccumulatorFit

    return AccumulatorFit(accumulator, quantile)


def quant_config(args: argparse.Namespace) -> QuantConfig:
    from .quant.model import QuantConfig

    layers = layer_wbits_settings(args)
    wbits = layers.get("wbits", args.wbits)
    if wbits is None or args.abits is None:
        raise HwqError("--wbits and --abits are required with --checkpoint")
    widths = (wbits, args.abits, args.per_channel, args.first_wbits, args.last_wbits)
    cfg = QuantConfig(*widths, layers.get("layer_wbits"), args.weight_range)
    cfg.validate()
    return cfg


def accumulator_override(args: argparse.Namespace, current: Accumulator) -> Accumulator:
    bits = current.bits if args.acc_bits is None else args.acc_bits
    acc = Accumulator(bits, args.overflow or current.overflow)
    acc.validate()
    return acc


def program_from_args(args: argparse.Namespace) -> Program:
    """The program a command runs: an IR file (--ir), or a checkpoint lowered here."""
    if bool(args.checkpoint) == bool(args.ir):
        raise HwqError("give exactly one of --ir or --checkpoint")
    if args.ir:
        return load_program(args.ir)
    from .quant.evaluate import prepare

    prepared = prepare(
        args.checkpoint, quant_config(args), args.data, args.calibration_images, mult_bits=args.mult_bits
    )
    return prepared.program
