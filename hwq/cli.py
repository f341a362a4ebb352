"""The `hwq` command. Each subcommand parses its flags and calls the library; errors in the
user's input come out as one line naming the problem, never as a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="brevitas")

from accel_sim.hardware import load_accelerator, toml_key  # noqa: E402
from accel_sim.ir import Accumulator, IRError, Program, load_program, program_digest, save_program  # noqa: E402
from accel_sim.timing import ProgramTiming, program_timing  # noqa: E402

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
from .evaluator import FITNESS_MODES  # noqa: E402
from .model import QuantConfig  # noqa: E402
from .results import percent, write_csv, write_json  # noqa: E402
from .train import TrainConfig, train  # noqa: E402

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


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config: from the flags, or on --resume from the run directory, where
    flags given again must agree and only budget and execution flags may change."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "resume")}
    eda_given = {f: given.pop(f) for f in EDA_FLAGS if f in given}
    if "acc_bits" in given:
        given["accumulator_bits"] = given.pop("acc_bits")
    if "hw" in given:
        given |= hardware_settings(given["hw"], given)
    config_file = Path(args.out) / "config.json"
    if args.resume and config_file.exists():
        cfg = TrainConfig.from_json(json.loads(config_file.read_text()))
    else:
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
    summary = train(train_config(args), resume=args.resume)
    print(
        f"held-out accuracy on accel_sim: {percent(summary['initial_val_accuracy'])} (round-to-nearest) -> "
        f"{percent(summary['final_val_accuracy'])} after {summary['evaluations']} evaluations "
        f"({summary['evals_per_s']} evals/s, {summary['macs_per_eval'] / 1e6:.1f} MMAC/eval); "
        f"{summary['weights_changed']} of {summary['weights_searched']} weights changed"
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
)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--hw", help="accelerator TOML (examples/*.toml): its operand widths and accumulator are the target's"
    )
    p.add_argument("--acc-bits", type=int, help="accumulator width (default 32)")
    p.add_argument(
        "--overflow", choices=("wrap", "saturate"), help="accumulator overflow mode (default wrap)"
    )
    p.add_argument("--mult-bits", type=int, help="requantization multiplier width (default 16)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-evals", type=int, help="stop after this many fitness evaluations")
    budget.add_argument("--budget-minutes", type=float, help="stop after this much search time")
    p.add_argument("--seed", type=int, help="seed of the search (default 0)")
    p.add_argument("--layers", help="comma-separated layers to search (default: every conv and fc)")
    s = p.add_argument_group("search (docs/training.md)")
    s.add_argument("--radius", type=int, help="levels each side of the initial value (default 1)")
    s.add_argument("--population", type=int, help="candidates per generation (default 16)")
    s.add_argument("--selected", type=int, help="best candidates the distribution learns from (default 4)")
    s.add_argument("--learning-rate", type=float, help="step of the distribution toward them (default 0.3)")
    s.add_argument(
        "--init-sigma", type=float, help="width in levels of the initial distributions (default 0.4)"
    )
    s.add_argument("--min-prob", type=float, help="floor of every valid level's probability (default 0.02)")
    s.add_argument("--group-size", type=int, help="weights per cooperative-coevolution group (default 256)")
    s.add_argument("--generations-per-group", type=int, help="generations before regrouping (default 4)")
    s.add_argument("--group-scope", choices=("layer", "global"), help="group within one layer (default)")
    f = p.add_argument_group("fitness")
    f.add_argument("--fitness", choices=FITNESS_MODES, help="integer score of the logits (default distill)")
    f.add_argument("--margin-clip", type=float, help="margin clip in logit units (default 4.0)")
    f.add_argument("--fitness-images", type=int, help="training images per fitness batch (default 256)")
    f.add_argument("--new-batch-every", type=int, help="generations between fitness batches (default 16)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-every", type=int, help="generations between held-out evaluations (default 25)")
    r.add_argument("--checkpoint-every", type=int, help="generations between state checkpoints (default 10)")
    r.add_argument("--val-fraction", type=float, help="held-out share of the training batches (default 0.2)")
    r.add_argument("--split-seed", type=int, help="seed of the train/val split (default 0)")
    r.add_argument("--calibration-images", type=int, help="images to calibrate activations (default 512)")
    r.add_argument("--device", help="torch device of the evaluator (default cpu)")
    r.add_argument("--compile", action="store_true", default=None, help="fuse requant with torch.compile")
    p.set_defaults(func=cmd_train)


def cmd_verify(args: argparse.Namespace) -> None:
    # Imported here: the RTL tools (cocotb, a simulator) are needed by this command only.
    try:
        from rtl_models.cosim import verify_program
    except ImportError as exc:
        raise HwqError(f"hwq verify --rtl needs {exc.name}: pip install -e '.[dev]'") from None
    if args.rtl is None:
        raise HwqError("say what to verify against: --rtl [icarus|verilator]")
    program = load_program(args.ir)
    program = program.with_accumulator(accumulator_override(args, program.accumulator))
    layers = [op.name for op in program.conv_ops()] if args.layer in (None, ["all"]) else args.layer
    ds = load_split(args.data, args.split, args.val_fraction, args.split_seed).head(args.limit or 1)
    reports = verify_program(
        program, ds.images, layers, args.rows, args.cols, args.rtl, Path(args.build_dir), args.pixels
    )
    print_verify(args, len(ds), reports)
    if args.json:
        write_json(
            args.json,
            {
                "command": "verify",
                "hwq_version": __version__,
                "ir": args.ir,
                "ir_sha256": program_digest(program),
                "images": len(ds),
                "layers": [r.to_json() for r in reports],
            },
        )
    if not all(r.match and r.cycles_match for r in reports):
        raise SystemExit(1)


def print_verify(args: argparse.Namespace, images: int, reports: list) -> None:
    print(
        f"{args.ir} on a {args.rows}x{args.cols} mac_tile ({args.rtl}), {images} image(s), "
        f"accumulator {reports[0].config.acc_bits}-bit {reports[0].config.overflow}"
    )
    print(
        f"  {'layer':<16} {'outputs':>10} {'K':>5} {'tiles':>6}  {'values':<8} "
        f"{'cycles/tile RTL':>15} {'formula':>8} {'total cycles':>13}"
    )
    for r in reports:
        rtl = ",".join(str(c) for c in r.rtl_tile_cycles)
        values = "match" if r.match else "MISMATCH"
        print(
            f"  {r.name:<16} {f'{r.m}x{r.n}':>10} {r.k:>5} {r.tiles:>6}  {values:<8} "
            f"{rtl:>15} {r.formula_tile_cycles:>8} {r.total_cycles:>13,}"
        )
    for r in reports:
        if r.mismatch:
            print(f"  {r.mismatch}")
    values = "match accel_sim bit for bit" if all(r.match for r in reports) else "DO NOT match accel_sim"
    cycles = "equal" if all(r.cycles_match for r in reports) else "DIFFER FROM"
    print(
        f"{len(reports)} layer(s): outputs {values}; cycles per tile {cycles} accel_sim's formula "
        f"(requantized outputs leave {reports[0].requant_latency} cycles after the array's)"
    )


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="run lowered layers on the RTL and compare with accel_sim")
    p.add_argument(
        "--rtl",
        nargs="?",
        const="icarus",
        choices=("icarus", "verilator"),
        help="run on the Verilog MAC array with this simulator (default icarus)",
    )
    p.add_argument("--ir", required=True, help="the IR file whose layers run")
    p.add_argument("--layer", action="append", help="conv layer to run, repeatable (default or 'all': all)")
    p.add_argument("--rows", type=int, default=8, help="rows of the MAC array (output pixels per tile)")
    p.add_argument("--cols", type=int, default=8, help="columns of the MAC array (output channels per tile)")
    p.add_argument("--pixels", type=int, help="only the first N output pixels of each layer (a quick check)")
    add_data_flags(p)
    add_accumulator_flags(p)
    p.add_argument("--build-dir", default="sim_build", help="where simulator builds are kept and reused")
    p.add_argument("--json", help="write the per-layer results to this JSON file")
    p.set_defaults(func=cmd_verify)


def sim_program(args: argparse.Namespace) -> Program:
    if bool(args.checkpoint) == bool(args.ir):
        raise HwqError("give exactly one of --ir or --checkpoint")
    if args.ir:
        return load_program(args.ir)
    prepared = prepare(
        args.checkpoint, quant_config(args), args.data, args.calibration_images, mult_bits=args.mult_bits
    )
    return prepared.program


def cmd_sim(args: argparse.Namespace) -> None:
    accelerator = load_accelerator(args.hw)
    program = sim_program(args)
    timing = program_timing(program, accelerator, args.batch)
    print_sim(program, timing)
    layers = [layer.to_json() for layer in timing.layers]
    if args.json:
        write_json(
            args.json,
            {
                "command": "sim",
                "hwq_version": __version__,
                "hw": args.hw,
                "accelerator": dataclasses.asdict(accelerator),
                "ir": args.ir,
                "checkpoint": args.checkpoint,
                "ir_sha256": program_digest(program),
                "layers": layers,
                "total": timing.total_json(),
            },
        )
    if args.csv:
        write_csv(args.csv, layers)


SIM_COLUMNS = "  {:<16} {:>16} {:>6} {:>10} {:>9} {:>8} {:>9} {:>10}"


def sim_row(name: str, shape: str, tiles: object, row: dict) -> str:
    return SIM_COLUMNS.format(
        name,
        shape,
        tiles,
        f"{row['cycles']:,}",
        f"{row['stall_cycles']:,}",
        percent(row["utilization"]),
        f"{row['dram_bytes'] / 1e3:.1f}",
        f"{row['energy_pj'] / 1e6:.3f}",
    )


def print_sim(program: Program, timing: ProgramTiming) -> None:
    hw, acc = timing.accelerator, program.accumulator
    widths = f"W{hw.weight_bits}A{hw.act_bits}" if hw.weight_bits and hw.act_bits else "program widths"
    print(
        f"{hw.name}: {hw.rows}x{hw.cols} {hw.dataflow} array at {hw.clock_mhz:g} MHz, {widths}, "
        f"{hw.acc_bits}-bit {hw.overflow} accumulator, batch {timing.batch}"
    )
    if acc != hw.accumulator():
        print(
            f"  note: the program was lowered for a {acc.bits}-bit {acc.overflow} accumulator; "
            f"hwq eval --acc-bits {hw.acc_bits} --overflow {hw.overflow} gives its accuracy here"
        )
    print(SIM_COLUMNS.format("layer", "M x N x K", "tiles", "cycles", "stalls", "util", "DRAM kB", "uJ"))
    for layer in timing.layers:
        shape = f"{layer.gemm.m}x{layer.gemm.n}x{layer.gemm.k}" if layer.gemm else "-"
        print(sim_row(layer.name, shape, layer.mapping.tiles if layer.mapping else "-", layer.to_json()))
    total = timing.total_json()
    print(sim_row("total", "", "", total))
    print(
        f"latency {1e3 * timing.latency_s:.3f} ms, {timing.fps:,.0f} frames/s, "
        f"{total['energy_per_inference_pj'] / 1e6:.2f} uJ per inference"
    )


def add_sim_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="cycles, utilization, DRAM traffic and energy on an accelerator config")
    p.add_argument("--hw", required=True, help="accelerator description, a TOML file (examples/*.toml)")
    p.add_argument("--ir", help="an IR file (from hwq train or --save-ir) instead of a checkpoint")
    add_model_flags(p)
    p.add_argument("--data", help="CIFAR-10 directory for calibration with --checkpoint")
    p.add_argument("--batch", type=int, default=1, help="images per run; weights are fetched once per run")
    p.add_argument("--json", help="write per-layer results and totals to this JSON file")
    p.add_argument("--csv", help="write the per-layer table to this CSV file")
    p.set_defaults(func=cmd_sim)


def sweep_config(args: argparse.Namespace) -> SweepConfig:  # noqa: F821 (imported in cmd_sweep)
    """Flags given override the grid that --full selects (the small grid without it)."""
    from .sweep import FULL_GRID, SMALL_GRID, SweepConfig, parse_arrays, parse_int_list, parse_overflow

    grid = FULL_GRID if args.full else SMALL_GRID
    if args.jobs is not None and args.jobs < 1:
        raise HwqError("--jobs must be at least 1")
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
    )


def cmd_sweep(args: argparse.Namespace) -> None:
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
    p.add_argument("--train-budget", type=int, help="also train each point with CC-EDA for N evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed of the CC-EDA training (default 0)")
    p.add_argument("--jobs", type=int, help="lowered programs measured in parallel processes (default 1)")
    p.add_argument(
        "--limit", type=int, help="accuracy on the first N val images (default small grid: 500; 0: all)"
    )
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="held-out share")
    p.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the train/val split")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    p.add_argument("--mult-bits", type=int, default=16, help="requantization multiplier width")
    p.add_argument("--batch", type=int, default=1, help="images per run in the timing model")
    p.add_argument("--device", default="cpu", help="torch device for accel_sim (cpu, cuda)")
    p.set_defaults(func=cmd_sweep)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report, build_training_report

    if args.train_runs:
        report = build_training_report(args.train_runs, args.out)
    else:
        report = build_report(args.results, args.out)
    pages = "" if args.train_runs else "report.html, summary.md, "
    print(f"wrote {pages}{len(report.figures)} figures and {len(report.tables)} tables under {report.out}")
    for name, why in report.missing.items():
        print(f"  {name}: {why}")


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML report, Markdown summary, figures and CSV tables of a sweep")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", help="a sweep directory or its results.jsonl")
    source.add_argument(
        "--train-runs", nargs="+", help="hwq train run directories: their training curves only"
    )
    p.add_argument("--out", required=True, help="directory for report.html, summary.md, figures/, tables/")
    p.set_defaults(func=cmd_report)


SUBCOMMANDS = [add_eval_parser, add_train_parser, add_verify_parser, add_sim_parser]
SUBCOMMANDS += [add_sweep_parser, add_report_parser]


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
