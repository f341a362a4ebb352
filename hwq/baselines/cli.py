"""`hwq baseline`: one Brevitas baseline method, lowered and measured on accel_sim."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .. import HwqError
from ..data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
from ..flags import add_accumulator_flags, add_fit_flag, add_model_flags, layer_wbits_settings
from ..results import percent
from . import DEFAULT_LEARNED_ROUND_ITERS, METHODS, OPTIMIZERS, QAT_STARTS

if TYPE_CHECKING:
    from .run import BaselineConfig


def target_settings(args: argparse.Namespace) -> dict:
    """Widths and accumulator from the flags, completed (and checked) by a --hw file the
    way `hwq train` does it."""
    from ..search.cli import hardware_settings

    given = {
        "wbits": args.wbits,
        **layer_wbits_settings(args),
        "abits": args.abits,
        "accumulator_bits": args.acc_bits,
        "overflow": args.overflow,
    }
    if args.hw:
        given |= hardware_settings(args.hw, {k: v for k, v in given.items() if v is not None})
    if not args.checkpoint or given["wbits"] is None or given["abits"] is None:
        raise HwqError("--checkpoint, --wbits and --abits (or a --hw file with [precision]) are required")
    return {k: v for k, v in given.items() if v is not None}


def baseline_config(args: argparse.Namespace) -> BaselineConfig:
    from .run import BaselineConfig

    return BaselineConfig(
        method=args.method,
        checkpoint=args.checkpoint,
        out=args.out,
        data=args.data,
        per_channel=args.per_channel,
        first_wbits=args.first_wbits,
        last_wbits=args.last_wbits,
        weight_range=args.weight_range,
        mult_bits=args.mult_bits,
        hw=args.hw,
        seed=args.seed,
        epochs=args.epochs,
        budget_minutes=args.budget_minutes,
        iters=args.iters,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        start=args.start,
        optimizer=args.optimizer,
        distill=args.distill,
        mixup=args.mixup,
        calibration_images=args.calibration_images,
        fit_accumulator=args.fit_accumulator,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        **target_settings(args),
    )


def cmd_baseline(args: argparse.Namespace) -> None:
    from .run import run_baseline

    summary = run_baseline(baseline_config(args))
    print(
        f"{summary['method']}: val accuracy on accel_sim {percent(summary['val_accuracy'])} "
        f"({summary['val_correct']}/{summary['val_images']}), Brevitas fake-quant "
        f"{percent(summary['brevitas_val_accuracy'])}, top-1 agreement {percent(summary['top1_agreement'])}; "
        f"{summary['overflows']} overflowed outputs; method time {summary['method_s']} s"
    )
    for note in summary["notes"]:
        print(f"  note: {note}")
    print(f"final IR: {summary['final_ir']}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline", help="a Brevitas baseline (RTN, GPTQ, GPFQ, learned round, QAT, A2Q) lowered to accel_sim"
    )
    p.add_argument("--method", required=True, choices=METHODS, help="the baseline (docs/baselines.md)")
    p.add_argument("--out", required=True, help="run directory (final.ir, summary.json, log.jsonl)")
    add_model_flags(p)
    p.add_argument("--data", help="CIFAR-10 directory (default: $HWQ_DATA, then ~/.cache/hwq/cifar10)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="held-out share")
    p.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the train/val split")
    p.add_argument(
        "--hw", help="accelerator TOML (examples/*.toml): its operand widths and accumulator are the target's"
    )
    add_accumulator_flags(p)
    add_fit_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and sampling")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="qat/a2q/a2q-plus: epochs over the train split")
    budget.add_argument("--budget-minutes", type=float, help="qat/a2q/a2q-plus: minutes of training")
    p.add_argument(
        "--iters",
        type=int,
        help=f"learned-round: iterations per layer (default {DEFAULT_LEARNED_ROUND_ITERS})",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: the method's, docs/baselines.md)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the method's)")
    p.add_argument("--weight-decay", type=float, help="qat/a2q: weight decay (default 1e-5)")
    p.add_argument(
        "--start",
        choices=QAT_STARTS,
        default="rtn",
        help="qat: fine-tune this post-training method's program (BatchNorm statistics then stay frozen)",
    )
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="sgd", help="qat/a2q: SGD with momentum (default) or Adam"
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="qat/a2q: learn the float network's logits (KL divergence, temperature 4), not the labels",
    )
    p.add_argument(
        "--mixup",
        type=float,
        metavar="ALPHA",
        help="qat/a2q: train on mixup pairs of augmented images, weight ~ Beta(ALPHA, ALPHA) per batch",
    )
    p.set_defaults(func=cmd_baseline)
