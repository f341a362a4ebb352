"""`hwq train`: its flags, and how they become a run's configuration (new or resumed)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from accel_sim.hardware import load_accelerator, toml_key

from .. import HwqError
from ..flags import (
    MULT_BITS,
    add_fit_flag,
    add_layer_wbits_flag,
    add_weight_range_flag,
    layer_wbits_settings,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    torch_device,
)
from ..outdir import check_output_dir
from ..results import percent
from . import FITNESS_MODES
from .rundir import CONFIG_FILE, read_run_config

if TYPE_CHECKING:
    from .train import TrainConfig


def search_fields(text: str) -> tuple[str, ...]:
    """--search as the canonical tuple (argparse turns the HwqError's text into its message)."""
    from .space import parse_search

    try:
        return parse_search(text)
    except HwqError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--search {text!r}: ")) from None


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config: from the flags, or on --resume from the run directory, where
    flags given again must agree and only budget and execution flags may change."""
    from .train import TrainConfig

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "resume")}
    given |= layer_wbits_settings(args)
    eda_given = {f: given.pop(f) for f in EDA_FLAGS if f in given}
    if "acc_bits" in given:
        given["accumulator_bits"] = given.pop("acc_bits")
    if "hw" in given:
        given |= hardware_settings(given["hw"], given)
    if args.resume:
        saved = read_run_config(args.out)
        try:
            cfg = TrainConfig.from_json(saved)
        except HwqError as exc:
            raise HwqError(f"{args.out}/{CONFIG_FILE}: {exc}") from None
    else:
        check_output_dir(args.out)
        if not args.checkpoint or given.get("wbits") is None or given.get("abits") is None:
            raise HwqError("--checkpoint, --wbits and --abits (or a --hw file with [precision]) are required")
        cfg = TrainConfig(
            checkpoint=args.checkpoint, out=args.out, wbits=given["wbits"], abits=given["abits"]
        )
    if "layers" in given:
        given["layers"] = tuple(given["layers"].split(","))
    if given.get("budget_evals") is not None:
        given["budget_minutes"] = None
    elif given.get("budget_minutes") is not None:
        given["budget_evals"] = None
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if hasattr(cfg, k)})
    if eda_given:
        cfg = dataclasses.replace(cfg, eda=dataclasses.replace(cfg.eda, **eda_given))
    return cfg


HW_SETTINGS = {  # TrainConfig field: (flag, the Accelerator's attribute)
    "wbits": ("--wbits", "weight_bits"),
    "abits": ("--abits", "act_bits"),
    "accumulator_bits": ("--acc-bits", "acc_bits"),
    "overflow": ("--overflow", "overflow"),
}


def hardware_settings(path: str, given: dict) -> dict:
    """The operand widths and accumulator a --hw file fixes, checked against the flags.

    Training for an accelerator means training for its arithmetic: the accumulator must be
    the hardware's, and operands may be narrower than its PEs (they are extended) but never
    wider. A [precision]-less file leaves the widths to --wbits/--abits.
    """
    accelerator = load_accelerator(path)
    settings = {}
    for field_name, (flag, attr) in HW_SETTINGS.items():
        value = getattr(accelerator, attr)
        if value is None:
            continue
        flag_value = given.get(field_name)
        if flag_value is None:
            settings[field_name] = value
            continue
        must_equal = attr in ("acc_bits", "overflow")
        if flag_value != value if must_equal else flag_value > value:
            raise HwqError(f"{flag} {flag_value} does not fit {path}, whose {toml_key(attr)} is {value}")
    return settings


def cmd_train(args: argparse.Namespace) -> None:
    cfg = train_config(args)
    torch_device(cfg.device)
    from .train import train

    summary = train(cfg, resume=args.resume)
    plural = {"weight": "weights", "bias": "biases", "mult": "multipliers"}
    changed = ", ".join(
        f"{summary['params_changed'][f]} of {n} {plural[f]}" for f, n in summary["params_searched"].items()
    )
    start = "round-to-nearest" if cfg.init_ir is None else "--init-ir"
    print(
        f"held-out accuracy on accel_sim: {percent(summary['initial_val_accuracy'])} ({start}) -> "
        f"{percent(summary['final_val_accuracy'])} after {summary['evaluations']} evaluations "
        f"({summary['evals_per_s']} evals/s, {summary['macs_per_eval'] / 1e6:.1f} MMAC/eval); "
        f"changed: {changed}; "
        f"top-1 agreement with the float network {percent(summary['final_val_agreement'])}; "
        f"stopped by {summary['stopped']}"
    )
    print(f"final IR: {summary['final_ir']}")


EDA_FLAGS = (
    "min_prob",
    "population",
    "selected",
    "learning_rate",
    "init_sigma",
    "group_size",
    "generations_per_group",
    "group_scope",
    "widen_after",
    "widen_below",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="CC-EDA search of low-bit weights scored on accel_sim")
    p.add_argument("--out", required=True, help="run directory (config, log.jsonl, state, final.ir)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--target", choices=("accel_sim", "brevitas"), help="fitness from (default accel_sim)")
    p.add_argument("--checkpoint", help="float checkpoint path, or 'resnet20' to download the public one")
    p.add_argument("--data", help="CIFAR-10 directory (default: $HWQ_DATA, then ~/.cache/hwq/cifar10)")
    p.add_argument("--wbits", type=int, help="weight bits (2-16)")
    p.add_argument("--abits", type=int, help="activation bits (2-16)")
    p.add_argument(
        "--per-channel", action="store_true", default=None, help="per-output-channel weight scales"
    )
    p.add_argument("--first-wbits", type=int, help="weight bits of the first conv (default: --wbits)")
    p.add_argument("--last-wbits", type=int, help="weight bits of the classifier (default: --wbits)")
    add_layer_wbits_flag(p)
    add_weight_range_flag(p, default=None)
    p.add_argument(
        "--hw", help="accelerator TOML (examples/*.toml): its operand widths and accumulator are the target's"
    )
    p.add_argument("--acc-bits", type=int, help="accumulator width (default 32)")
    p.add_argument(
        "--overflow", choices=("wrap", "saturate"), help="accumulator overflow mode (default wrap)"
    )
    p.add_argument("--mult-bits", type=MULT_BITS, help="requantization multiplier width (default 16)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-evals", type=positive_int, help="stop after this many fitness evaluations")
    budget.add_argument("--budget-minutes", type=positive_float, help="stop after this much search time")
    p.add_argument("--seed", type=nonnegative_int, help="seed of the search (default 0)")
    p.add_argument("--layers", help="comma-separated layers to search (default: every conv and fc)")
    p.add_argument(
        "--search",
        type=search_fields,
        help="integer parameters to search: weights, bias, mult, comma-separated (default weights)",
    )
    p.add_argument(
        "--patience-evals",
        type=positive_int,
        help="also stop when the held-out accuracy has not improved for this many evaluations",
    )
    p.add_argument(
        "--init-ir",
        help="start from this integer program (e.g. a baseline's final.ir) instead of round-to-nearest",
    )
    s = p.add_argument_group("search (docs/training.md)")
    s.add_argument("--radius", type=positive_int, help="levels each side of the initial value (default 1)")
    s.add_argument(
        "--widen-after",
        type=nonnegative_int,
        help="widen a weight's radius by a level when still flat after every N visits (default 0: off)",
    )
    s.add_argument(
        "--widen-below",
        type=open_fraction,
        help="flat: confidence below this after the visits (default 0.75)",
    )
    s.add_argument(
        "--max-radius", type=positive_int, help="the widest radius --widen-after may reach (default 2)"
    )
    s.add_argument("--population", type=positive_int, help="candidates per generation (default 16)")
    s.add_argument(
        "--selected", type=positive_int, help="best candidates the distribution learns from (default 4)"
    )
    s.add_argument("--learning-rate", type=float, help="step of the distribution toward them (default 0.3)")
    s.add_argument(
        "--init-sigma", type=float, help="width in levels of the initial distributions (default 0.4)"
    )
    s.add_argument("--min-prob", type=float, help="floor of every valid level's probability (default 0.02)")
    s.add_argument(
        "--group-size", type=positive_int, help="weights per cooperative-coevolution group (default 256)"
    )
    s.add_argument(
        "--generations-per-group", type=positive_int, help="generations before regrouping (default 4)"
    )
    s.add_argument("--group-scope", choices=("layer", "global"), help="group within one layer (default)")
    f = p.add_argument_group("fitness")
    f.add_argument("--fitness", choices=FITNESS_MODES, help="integer score of the logits (default distill)")
    f.add_argument("--margin-clip", type=positive_float, help="margin clip in logit units (default 4.0)")
    f.add_argument(
        "--overflow-penalty",
        type=nonnegative_int,
        help="fitness points subtracted per accumulator output that overflows on the batch "
        "(distill: logit LSBs; default 0: off)",
    )
    f.add_argument(
        "--fitness-images", type=positive_int, help="training images per fitness batch (default 256)"
    )
    f.add_argument(
        "--new-batch-every", type=positive_int, help="generations between fitness batches (default 16)"
    )
    f.add_argument(
        "--grow-batch",
        action="store_true",
        default=None,
        help="double the fitness batch when the best's gains stop holding on new batches (below)",
    )
    f.add_argument(
        "--grow-window", type=positive_int, help="batches the carry-over is measured over (default 4)"
    )
    f.add_argument(
        "--grow-below",
        type=open_fraction,
        help="grow when less than this share of their gains held on the next batch (default 0.5)",
    )
    f.add_argument(
        "--max-fitness-images",
        type=positive_int,
        help="the largest grown batch (default: the whole training split)",
    )
    f.add_argument(
        "--confirm-images",
        type=nonnegative_int,
        help="a winner replaces the best only if it also wins on this many fresh images "
        "(default: 1024 with --init-ir, else 0: off)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--eval-every", type=positive_int, help="generations between held-out evaluations (default 25)"
    )
    r.add_argument(
        "--checkpoint-every", type=positive_int, help="generations between state checkpoints (default 10)"
    )
    r.add_argument(
        "--val-fraction", type=open_fraction, help="held-out share of the training batches (default 0.2)"
    )
    r.add_argument("--split-seed", type=nonnegative_int, help="seed of the train/val split (default 0)")
    r.add_argument(
        "--calibration-images", type=positive_int, help="images to calibrate activations (default 512)"
    )
    add_fit_flag(r)
    r.add_argument("--device", help="torch device of the evaluator (default cpu)")
    r.add_argument("--compile", action="store_true", default=None, help="fuse requant with torch.compile")
    d = p.add_argument_group("distributed (docs/distributed.md; pip install 'hwq[distributed]')")
    d.add_argument("--workers", type=int, help="spread each generation's fitness over N Ray workers")
    d.add_argument(
        "--ray-address",
        help="join the Ray cluster at auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray)",
    )
    d.add_argument(
        "--cpus-per-worker", type=int, help="CPUs per worker (default: local cores / N; on a cluster 1)"
    )
    p.set_defaults(func=cmd_train)
