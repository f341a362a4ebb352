"""`hwq sweep`: accuracy, overflow, cycles, energy and area over a grid of bit widths.

A point of the grid is (weight bits, activation bits, per-channel, accumulator bits,
overflow mode); each point is measured on every array size asked for, one result row per
(point, array). Its accuracy is that of the round-to-nearest integer program on accel_sim
(and, with a training budget, of the CC-EDA-trained program), so every number is what the
accelerator computes; its cycles, latency and energy come from accel_sim's timing model
of the same program, and its area from Yosys results of the MAC array when given.

The results file (`results.jsonl`, one JSON object per row) is the sweep's only state:
rows are appended and fsynced as each point finishes, so a killed sweep loses at most the
points in flight, and a rerun skips every point whose rows are present. One sweep at a
time owns its directory, its worker processes die with it, and a row is never appended
for a key that already has a finished one, so the file holds each point once. Points that share
(weight bits, activation bits, per-channel) share one lowered program: the accumulator
only changes `Program.with_accumulator`, which needs no re-lowering.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from accel_sim.hardware import Accelerator, load_accelerator
from accel_sim.ir import (
    MAX_ACC_BITS,
    MIN_ACC_BITS,
    OVERFLOW_MODES,
    Accumulator,
    IRError,
    Program,
    load_program,
    program_digest,
    save_program,
)
from accel_sim.timing import program_timing

from .. import HwqError, __version__
from ..data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, Dataset, load_split
from ..outdir import DirectoryLock, check_output_dir, remove_stale_temp_files
from ..quant import DEFAULT_BATCH, DEFAULT_CALIBRATION_IMAGES
from ..quant.evaluate import ModeResult, evaluate_program, prepare
from ..quant.model import QuantConfig, resolve_checkpoint
from ..results import percent, write_json
from .methods import methods_pending, run_methods, validate_methods
from .rows import RESULTS_FILE, append_rows, drop_truncated_tail, read_results, training_curve

if TYPE_CHECKING:
    from ..search.train import TrainConfig

SETTINGS_FILE = "sweep.json"
DEFAULT_HW = Path(__file__).resolve().parents[2] / "examples" / "rtl_8x8.toml"

# Small: minutes on 2 cores (accuracy on the first 500 val images: a saturating accumulator
# that overflows is replayed product by product, the slowest thing accel_sim does).
# Full: every width a low-bit accelerator would consider, on the whole val split.
SMALL_GRID = {
    "wbits": (2, 4, 8),
    "abits": (4, 8),
    "acc_bits": (12, 14, 16, 18, 20, 24, 32),
    "overflow": ("wrap", "saturate"),
    "arrays": None,  # the --hw file's own array
    "limit": 500,
}
FULL_GRID = {
    "wbits": (2, 3, 4, 5, 6, 8),
    "abits": (2, 3, 4, 6, 8),
    "acc_bits": (*range(10, 25), 28, 32),
    "overflow": ("wrap", "saturate"),
    "arrays": ((8, 8), (16, 16), (32, 32)),
    "limit": None,
}


# ----- parsing ---------------------------------------------------------------------------


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'2,4,8' or '12-16' or a mix -> sorted distinct ints; anything else is a user error."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise HwqError(f"{flag} {text!r} is not a list of integers like 2,4,8 or 12-16") from None
    if not values:
        raise HwqError(f"{flag} {text!r} names no values")
    return tuple(sorted(values))


def parse_arrays(text: str) -> tuple[tuple[int, int], ...]:
    """'8x8,16x16' -> ((8, 8), (16, 16))."""
    arrays = []
    for part in text.split(","):
        rows, sep, cols = part.strip().lower().partition("x")
        if not (sep and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
            raise HwqError(f"--arrays {text!r} is not a list of array sizes like 8x8,16x16")
        arrays.append((int(rows), int(cols)))
    return tuple(dict.fromkeys(arrays))


def parse_overflow(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",")))
    bad = [m for m in modes if m not in OVERFLOW_MODES]
    if bad or not modes:
        raise HwqError(f"--overflow {text!r}: modes are {', '.join(OVERFLOW_MODES)} (comma-separated)")
    return modes


# ----- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One quantization of the network: what its accuracy depends on."""

    wbits: int
    abits: int
    per_channel: bool
    acc_bits: int
    overflow: str

    @property
    def group(self) -> tuple[int, int, bool]:
        """Points of one group share one lowered program."""
        return (self.wbits, self.abits, self.per_channel)

    @property
    def name(self) -> str:
        scales = "pc" if self.per_channel else "pt"
        return f"w{self.wbits}a{self.abits}-{scales}-acc{self.acc_bits}-{self.overflow}"

    def key(self, rows: int, cols: int) -> str:
        return f"{self.name}-{rows}x{cols}"


@dataclass
class SweepConfig:
    """A sweep: the grid, and the settings every row of its results file shares."""

    checkpoint: str
    out: str
    data: str | None = None
    wbits: tuple[int, ...] = SMALL_GRID["wbits"]
    abits: tuple[int, ...] = SMALL_GRID["abits"]
    acc_bits: tuple[int, ...] = SMALL_GRID["acc_bits"]
    overflow: tuple[str, ...] = SMALL_GRID["overflow"]
    per_channel: bool = False
    hw: str = str(DEFAULT_HW)
    arrays: tuple[tuple[int, int], ...] | None = None
    area: tuple[str, ...] = ()
    train_budget: int | None = None
    seed: int = 0
    jobs: int = 1
    limit: int | None = SMALL_GRID["limit"]
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    mult_bits: int = 16
    batch: int = 1
    batch_size: int = DEFAULT_BATCH
    device: str = "cpu"
    progress: bool = True
    train_overrides: dict = field(default_factory=dict)  # more TrainConfig fields (tests, tuning)
    methods: tuple[str, ...] = ()  # baselines and CC-EDA variants (hwq.studies.methods)
    method_epochs: int | None = None  # qat / a2q / a2q-plus budget ...
    method_minutes: float | None = None  # ... or theirs in minutes (and CC-EDA's without qat)
    baseline_overrides: dict = field(default_factory=dict)  # method -> more BaselineConfig fields

    @property
    def results_path(self) -> Path:
        return Path(self.out) / RESULTS_FILE

    def validate(self) -> None:
        for wb in self.wbits:
            for ab in self.abits:
                QuantConfig(wb, ab, self.per_channel).validate()
        for bits in self.acc_bits:
            if not MIN_ACC_BITS <= bits <= MAX_ACC_BITS:
                raise HwqError(f"--acc-bits {bits} is out of range [{MIN_ACC_BITS}, {MAX_ACC_BITS}]")
        if self.train_budget is not None and self.train_budget < 1:
            raise HwqError("--train-budget must be a positive number of evaluations")
        if self.jobs < 1:
            raise HwqError("--jobs must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise HwqError("--limit must be at least 1")
        validate_methods(self)

    def fixed(self, hw: Accelerator) -> dict:
        """What every row of one results file must share; a rerun that differs here would
        mix incomparable numbers, so it is refused."""
        base = dataclasses.asdict(dataclasses.replace(hw, rows=0, cols=0))
        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "split": "val",
            "limit": self.limit,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "calibration_images": self.calibration_images,
            "mult_bits": self.mult_bits,
            "batch": self.batch,
            "accelerator": base,
        }


def grid(cfg: SweepConfig) -> tuple[list[Point], list[Point]]:
    """The points to measure, and those skipped because their accumulator cannot hold one
    weight x activation product (the rule accel_sim.hardware applies to an accelerator)."""
    points, skipped = [], []
    for wb in cfg.wbits:
        for ab in cfg.abits:
            for acc in cfg.acc_bits:
                for mode in cfg.overflow:
                    point = Point(wb, ab, cfg.per_channel, acc, mode)
                    (points if acc >= wb + ab else skipped).append(point)
    return points, skipped


def accelerator_for(base: Accelerator, point: Point, rows: int, cols: int) -> Accelerator:
    """The base accelerator resized and given the point's accumulator. Operand widths are
    left to the program (no [precision]), so energy follows each layer's own widths, and
    the 8-bit image input of an A4 network does not exceed a 4-bit array."""
    hw = dataclasses.replace(
        base,
        rows=rows,
        cols=cols,
        acc_bits=point.acc_bits,
        overflow=point.overflow,
        weight_bits=None,
        act_bits=None,
    )
    hw.validate()
    return hw


def array_sizes(cfg: SweepConfig, base: Accelerator) -> tuple[tuple[int, int], ...]:
    arrays = cfg.arrays or ((base.rows, base.cols),)
    for rows, cols in arrays:
        accelerator_for(base, Point(8, 8, False, 32, "wrap"), rows, cols)  # refuse bad sizes now
    return arrays


def versions() -> dict[str, str]:
    """Package versions a row was measured with, so a point can be rerun exactly."""
    found = {"hwq": __version__, "python": platform.python_version()}
    for package in ("torch", "brevitas", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# ----- the results file ------------------------------------------------------------------


def check_settings(out: Path, fixed: dict) -> None:
    """The first run that leaves rows records the directory's fixed settings; later runs
    must match them (a run that failed before its first row binds nothing)."""
    path = out / SETTINGS_FILE
    results = out / RESULTS_FILE
    if path.exists() and results.exists() and results.stat().st_size > 0:
        saved = json.loads(path.read_text())
        differ = [k for k in fixed if saved.get(k) != json.loads(json.dumps(fixed[k]))]
        if differ:
            raise HwqError(f"{out} holds a sweep with different {', '.join(differ)}; choose another --out")
    else:
        write_json(path, fixed)


def is_done(row: dict | None, cfg: SweepConfig) -> bool:
    """A row is finished unless this run asks for training the row does not have."""
    if row is None:
        return False
    if cfg.train_budget is None:
        return True
    trained = row.get("trained") or {}
    return trained.get("budget_evals") == cfg.train_budget and trained.get("seed") == cfg.seed


# ----- area ------------------------------------------------------------------------------


def load_area(paths: Iterable[str]) -> list[dict]:
    """Rows of `python -m rtl_models.area` CSV files (several may be given, e.g. one per
    overflow mode)."""
    rows: list[dict] = []
    need = {"flavour", "rows", "cols", "weight_bits", "act_bits", "acc_bits", "cells"}
    for p in paths:
        try:
            with open(p, newline="", encoding="utf-8") as f:
                found = list(csv.DictReader(f))
        except OSError as exc:
            raise HwqError(f"cannot read area file {p} ({exc.strerror})") from None
        except (UnicodeDecodeError, csv.Error):
            raise HwqError(f"area file {p} is not a CSV text file") from None
        if found and not need <= set(found[0]):
            raise HwqError(f"area file {p} lacks the columns of rtl_models.area: {sorted(need)}")
        for number, row in enumerate(found, 2):
            try:
                [_int(row[k]) for k in ("rows", "cols", "weight_bits", "act_bits", "acc_bits")]
            except (TypeError, ValueError):
                raise HwqError(
                    f"area file {p} line {number} has a width or size that is not an integer"
                ) from None
        rows.extend(found)
    return rows


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def built_for(row: dict, dataflow: str) -> bool:
    """Whether an area row synthesized the array of `dataflow` (files without a `top`
    column come from the output-stationary array, the only one they could hold)."""
    top = row.get("top") or "mac_array"
    return top.startswith("ws_") == (dataflow == "ws")


def area_for(area: list[dict], point: Point, rows: int, cols: int, dataflow: str = "os") -> dict:
    """Area of the point's MAC array: Yosys generic cells (ASIC proxy) and iCE40 LUTs.

    Matched on the dataflow's array and (weight, act, acc bits); the overflow mode and
    array size are matched when the files have them. An array synthesized at another size
    is scaled by the PE count (the array is PEs plus O(R + C) skew registers), and
    `area_source` says so."""
    widths = [
        r
        for r in area
        if built_for(r, dataflow)
        and (int(r["weight_bits"]), int(r["act_bits"]), int(r["acc_bits"]))
        == (point.wbits, point.abits, point.acc_bits)
    ]
    same_mode = [r for r in widths if r.get("overflow", point.overflow) == point.overflow]
    candidates = same_mode or widths
    if not candidates:
        return {"area_cells": None, "area_luts": None, "area_flip_flops": None, "area_source": None}
    sizes = {(int(r["rows"]), int(r["cols"])) for r in candidates}
    size = (rows, cols) if (rows, cols) in sizes else max(sizes, key=lambda s: s[0] * s[1])
    chosen = [r for r in candidates if (int(r["rows"]), int(r["cols"])) == size]
    scale = rows * cols / (size[0] * size[1])
    by_flavour = {r["flavour"]: r for r in chosen}
    generic, ice40 = by_flavour.get("generic"), by_flavour.get("ice40")
    source = f"yosys {size[0]}x{size[1]} {chosen[0].get('top') or 'mac_array'}"
    if scale != 1:
        source += f", scaled x{scale:g} by PE count"
    if not same_mode:
        source += f", {candidates[0].get('overflow')} accumulator"

    def scaled(row: dict | None, column: str) -> int | None:
        value = _int(row.get(column)) if row else None
        return round(value * scale) if value is not None else None

    return {
        "area_cells": scaled(generic, "cells"),
        "area_luts": scaled(ice40, "luts"),
        "area_flip_flops": scaled(generic or ice40, "flip_flops"),
        "area_source": source,
    }


# ----- one group of points ---------------------------------------------------------------


@dataclass
class Context:
    """What a worker needs to measure the points of one group."""

    cfg: SweepConfig
    base: Accelerator
    arrays: tuple[tuple[int, int], ...]
    area: list[dict]
    fixed: dict
    versions: dict = field(default_factory=versions)


def ir_path(cfg: SweepConfig, group: tuple[int, int, bool]) -> Path:
    wb, ab, per_channel = group
    return Path(cfg.out) / "ir" / f"w{wb}a{ab}-{'pc' if per_channel else 'pt'}.ir"


def rerun_command(cfg: SweepConfig, ir: Path, point: Point) -> str:
    """The `hwq eval` that reproduces a row's accuracy and overflow counts exactly."""
    parts = ["hwq eval --ir", str(ir)]
    if cfg.data:
        parts += ["--data", cfg.data]
    parts += ["--split val", f"--acc-bits {point.acc_bits}", f"--overflow {point.overflow}"]
    if cfg.val_fraction != DEFAULT_VAL_FRACTION:
        parts.append(f"--val-fraction {cfg.val_fraction}")
    if cfg.split_seed != DEFAULT_SPLIT_SEED:
        parts.append(f"--split-seed {cfg.split_seed}")
    if cfg.limit:
        parts.append(f"--limit {cfg.limit}")
    return " ".join(parts)


def accuracy_fields(result: ModeResult) -> dict:
    layers = list(result.layers.values())
    return {
        "accuracy": result.accuracy,
        "correct": result.correct,
        "n": result.n,
        "overflows": sum(s.overflows for s in layers),
        "overflowed_layers": sum(1 for s in layers if s.overflows),
        "accumulator_outputs": sum(s.outputs for s in layers),
        "worst_case_acc_bits": max((s.worst_case_bits for s in layers), default=None),
    }


def timing_fields(program: Program, hw: Accelerator, batch: int, result: ModeResult) -> dict:
    """Totals and per-layer numbers of the timing model, with each layer's overflow count."""
    timing = program_timing(program, hw, batch)
    total = timing.total_json()
    layers = []
    for layer in timing.layers:
        t = layer.to_json()
        stats = result.layers.get(layer.name)
        layers.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "macs": t["macs"],
                "cycles": t["cycles"],
                "stall_cycles": t["stall_cycles"],
                "utilization": t["utilization"],
                "dram_bytes": t["dram_bytes"],
                "energy_pj": t["energy_pj"] / batch,
                "overflows": stats.overflows if stats else 0,
                "worst_case_acc_bits": stats.worst_case_bits if stats else None,
            }
        )
    return {
        "cycles": total["cycles"],
        "latency_s": total["latency_s"],
        "fps": total["fps"],
        "utilization": total["utilization"],
        "macs": total["macs"],
        "dram_bytes": total["dram_bytes"],
        "energy_per_inference_pj": total["energy_per_inference_pj"],
        "clock_mhz": hw.clock_mhz,
        "dataflow": hw.dataflow,
        "layers": layers,
    }


def point_train_config(cfg: SweepConfig, point: Point, run_dir: Path, **budget: object) -> TrainConfig:
    """The CC-EDA run of a point: its arithmetic, the sweep's data settings, `budget`."""
    from ..search.train import TrainConfig

    return TrainConfig(
        checkpoint=cfg.checkpoint,
        out=str(run_dir),
        wbits=point.wbits,
        abits=point.abits,
        data=cfg.data,
        per_channel=point.per_channel,
        accumulator_bits=point.acc_bits,
        overflow=point.overflow,
        mult_bits=cfg.mult_bits,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        calibration_images=cfg.calibration_images,
        progress=False,
        **budget,
        **cfg.train_overrides,
    )


def train_point(ctx: Context, point: Point, ds: Dataset) -> dict:
    """CC-EDA on the point's arithmetic; resumes the run directory an earlier, interrupted
    sweep left, and re-measures the final program on the sweep's own images."""
    from ..search.rundir import STATE_FILE  # the trainer is needed only with --train-budget
    from ..search.train import train

    cfg = ctx.cfg
    run_dir = Path(cfg.out) / "train" / f"{point.name}-e{cfg.train_budget}-s{cfg.seed}"
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"complete": False}
    if not summary.get("complete", True):
        tcfg = point_train_config(cfg, point, run_dir, budget_evals=cfg.train_budget)
        summary = train(tcfg, resume=(run_dir / STATE_FILE).exists())  # Ctrl-C: the next sweep resumes it
    final = load_program(summary["final_ir"])
    result = evaluate_program(final, ds, cfg.batch_size, cfg.device)
    return {
        "budget_evals": cfg.train_budget,
        "seed": cfg.seed,
        **accuracy_fields(result),
        "initial_val_accuracy": summary.get("initial_val_accuracy"),
        "final_val_accuracy": summary.get("final_val_accuracy"),
        "evaluations": summary.get("evaluations"),
        "ir_sha256": program_digest(final),
        "run_dir": str(run_dir),
        "curve": training_curve(run_dir, summary),
    }


def point_rows(ctx: Context, program: Program, ir: Path, ds: Dataset, point: Point) -> list[dict]:
    """Every array's row for one point: accuracy once, timing and area per array."""
    start = time.perf_counter()
    cfg = ctx.cfg
    program = program.with_accumulator(Accumulator(point.acc_bits, point.overflow))
    result = evaluate_program(program, ds, cfg.batch_size, cfg.device)
    trained = train_point(ctx, point, ds) if cfg.train_budget else None
    common = {
        **dataclasses.asdict(point),
        "model": program.meta.get("model"),
        **accuracy_fields(result),
        "trained": trained,
        "ir_sha256": program_digest(program),
        "ir_file": str(ir),
        "rerun": rerun_command(cfg, ir, point),
        "seed": cfg.seed,
        "config": {**ctx.fixed, "checkpoint_sha256": program.meta.get("checkpoint_sha256")},
        "versions": ctx.versions,
    }
    rows = []
    for r, c in ctx.arrays:
        hw = accelerator_for(ctx.base, point, r, c)
        rows.append(
            {
                "key": point.key(r, c),
                **common,
                "rows": r,
                "cols": c,
                "array": f"{r}x{c}",
                **timing_fields(program, hw, cfg.batch, result),
                **area_for(ctx.area, point, r, c, hw.dataflow),
                "seconds": round(time.perf_counter() - start, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
    return rows


def describe(row: dict) -> str:
    trained = f" -> {percent(row['trained']['accuracy']).strip()} CC-EDA" if row["trained"] else ""
    return (
        f"W{row['wbits']}A{row['abits']} acc {row['acc_bits']:>2} {row['overflow']:<8} "
        f"{percent(row['accuracy'])}{trained}  overflows {row['overflows']:>9,}  "
        f"{row['array']} {row['cycles']:>10,} cycles {row['energy_per_inference_pj'] / 1e6:8.3f} uJ"
    )


def run_group(ctx: Context, group: tuple[int, int, bool], points: list[Point]) -> int:
    """Lower the group's program once, then measure and append each point as it finishes."""
    cfg = ctx.cfg
    wb, ab, per_channel = group
    prepared = prepare(
        cfg.checkpoint,
        QuantConfig(wb, ab, per_channel),
        cfg.data,
        cfg.calibration_images,
        cfg.val_fraction,
        cfg.split_seed,
        mult_bits=cfg.mult_bits,
    )
    ir = ir_path(cfg, group)
    save_program(prepared.program, ir)
    ds = load_split(cfg.data, "val", cfg.val_fraction, cfg.split_seed).head(cfg.limit)
    if len(ds) == 0:
        raise HwqError("the val split is empty")
    for point in points:
        if not (cfg.methods and point_measured(cfg, point, ctx.arrays)):
            rows = point_rows(ctx, prepared.program, ir, ds, point)
            rows = append_rows(cfg.results_path, rows, unless=lambda row: is_done(row, cfg))
            if cfg.progress:
                for row in rows:
                    print(f"  {describe(row)}", flush=True)
        if cfg.methods:
            run_methods(ctx, point)
    return len(points)


def point_measured(cfg: SweepConfig, point: Point, arrays: tuple[tuple[int, int], ...]) -> bool:
    """Whether every array's row of the point is in the results file (a sweep with
    --methods reruns a group for its methods, not for the rows it already has)."""
    done = {row["key"]: row for row in read_results(cfg.results_path)} if cfg.results_path.exists() else {}
    return all(is_done(done.get(point.key(r, c)), cfg) for r, c in arrays)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """A worker must not outlive its sweep (it would go on appending rows, then wait forever
    for work): on Linux the kernel kills it when the parent dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG); elsewhere a thread watches the parent's PID."""
    armed = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    die_with_parent(parent)
    torch.set_num_threads(threads)


def _run_group_in_worker(ctx: Context, group: tuple[int, int, bool], points: list[Point]) -> int:
    """Worker entry point: errors cross the process boundary as HwqError with their text."""
    try:
        return run_group(ctx, group, points)
    except (HwqError, IRError) as exc:
        raise HwqError(str(exc)) from None


# ----- the sweep -------------------------------------------------------------------------


@dataclass
class SweepSummary:
    points: int
    skipped: list[Point]
    already_done: int
    measured: int
    results: Path


def pending_groups(
    points: list[Point], arrays: tuple[tuple[int, int], ...], done: dict[str, dict], cfg: SweepConfig
) -> dict[tuple[int, int, bool], list[Point]]:
    """Points with any array's row missing (or lacking the training asked for), by group."""
    groups: dict[tuple[int, int, bool], list[Point]] = {}
    for point in points:
        if not all(is_done(done.get(point.key(r, c)), cfg) for r, c in arrays) or methods_pending(
            cfg, point, done
        ):
            groups.setdefault(point.group, []).append(point)
    return groups


def sweep(cfg: SweepConfig) -> SweepSummary:
    """Measure every pending point of the grid; returns what was done and skipped. The
    directory is owned by this call: a second sweep there is refused."""
    cfg.validate()
    check_output_dir(cfg.out)
    base = load_accelerator(cfg.hw)
    arrays = array_sizes(cfg, base)
    fixed = cfg.fixed(base)
    area = load_area(cfg.area)
    points, skipped = grid(cfg)
    resolve_checkpoint(cfg.checkpoint)  # fail now on a mistyped path, not in a worker
    if len(load_split(cfg.data, "val", cfg.val_fraction, cfg.split_seed)) == 0:
        raise HwqError("the val split is empty")
    ctx = Context(cfg, base, arrays, area, fixed)
    with DirectoryLock(cfg.out):
        return measure_pending(ctx, points, skipped)


def measure_pending(ctx: Context, points: list[Point], skipped: list[Point]) -> SweepSummary:
    """The sweep proper, in the directory this process owns."""
    cfg, arrays = ctx.cfg, ctx.arrays
    out = Path(cfg.out)
    remove_stale_temp_files(out / "ir")
    check_settings(out, ctx.fixed)
    drop_truncated_tail(cfg.results_path)
    done = {row["key"]: row for row in read_results(cfg.results_path)} if cfg.results_path.exists() else {}
    groups = pending_groups(points, arrays, done, cfg)
    todo = sum(len(p) for p in groups.values())
    if cfg.progress:
        print(
            f"sweep: {len(points)} points x {len(arrays)} array(s); {len(points) - todo} already done, "
            f"{todo} to measure in {len(groups)} lowered program(s); results in {cfg.results_path}",
            flush=True,
        )
    if cfg.jobs == 1 or len(groups) <= 1:
        measured = sum(run_group(ctx, g, p) for g, p in groups.items())
    else:
        measured = run_parallel(ctx, groups)
    return SweepSummary(len(points), skipped, len(points) - todo, measured, cfg.results_path)


def run_parallel(ctx: Context, groups: dict[tuple[int, int, bool], list[Point]]) -> int:
    """One group per task in fresh (spawned) processes, each with its share of the cores,
    so that torch's thread pools do not oversubscribe them."""
    jobs = min(ctx.cfg.jobs, len(groups))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, get_context("spawn"), _init_worker, (threads, os.getpid())) as pool:
        futures = [pool.submit(_run_group_in_worker, ctx, g, p) for g, p in groups.items()]
        return sum(f.result() for f in futures)
