"""`hwq sweep --methods`: the baselines and CC-EDA, side by side at every point of a grid.

At each point, every baseline runs as `hwq baseline` would (run directory under
`OUT/baselines/`), then CC-EDA from round-to-nearest with QAT's wall time at that point
(or `--method-minutes`), then CC-EDA from the most accurate baseline of the point
(`hwq train --init-ir`, run directories under `OUT/train/`). Each finished method
appends one row to `results.jsonl` whose numbers are copied from its run's summary (the
whole `val` split, on accel_sim); a method that fails gets a row saying so. A rerun skips
finished rows, reuses finished run directories and resumes interrupted CC-EDA runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from accel_sim.ir import IRError

from .. import HwqError
from ..baselines import CCEDA_METHODS, QAT_METHODS, SWEEP_METHODS
from .rows import append_rows, read_results

if TYPE_CHECKING:
    from .sweep import Context, Point, SweepConfig


def parse_methods(text: str) -> tuple[str, ...]:
    """'rtn,gptq,cc-eda' -> the methods in the order they must run (baselines first)."""
    names = {m.strip() for m in text.split(",") if m.strip()}
    unknown = sorted(names - set(SWEEP_METHODS))
    if unknown or not names:
        raise HwqError(f"--methods {text!r}: methods are {', '.join(SWEEP_METHODS)} (comma-separated)")
    return tuple(m for m in SWEEP_METHODS if m in names)


def validate_methods(cfg: SweepConfig) -> None:
    if not cfg.methods:
        return
    trains = [m for m in cfg.methods if m in QAT_METHODS]
    if trains and (cfg.method_epochs is None) == (cfg.method_minutes is None):
        raise HwqError(
            f"--methods {','.join(trains)} needs exactly one of --method-epochs or --method-minutes"
        )
    cceda = [m for m in cfg.methods if m in CCEDA_METHODS]
    if cceda and "qat" not in cfg.methods and cfg.method_minutes is None:
        raise HwqError(
            f"--methods {','.join(cceda)} needs qat in --methods (its wall time) or --method-minutes"
        )
    if "cc-eda-best" in cfg.methods and not set(cfg.methods) - set(CCEDA_METHODS):
        raise HwqError("--methods cc-eda-best needs at least one baseline to start from")
    for name in ("method_epochs", "method_minutes"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise HwqError(f"--{name.replace('_', '-')} must be positive")


def budget_tag(cfg: SweepConfig, method: str) -> str:
    """What a method's run depends on beyond the point and seed (names its run directory)."""
    if method in QAT_METHODS:
        return f"e{cfg.method_epochs}" if cfg.method_epochs else f"m{cfg.method_minutes:g}"
    if method == "learned-round":
        from ..baselines import DEFAULT_LEARNED_ROUND_ITERS

        return f"i{cfg.baseline_overrides.get(method, {}).get('iters', DEFAULT_LEARNED_ROUND_ITERS)}"
    if method in CCEDA_METHODS:
        return f"as-qat-{budget_tag(cfg, 'qat')}" if "qat" in cfg.methods else f"m{cfg.method_minutes:g}"
    return "ptq"


def method_key(point: Point, method: str) -> str:
    return f"{point.name}-{method}"


def finished_rows(cfg: SweepConfig) -> dict[str, dict]:
    return {r["key"]: r for r in read_results(cfg.results_path)} if cfg.results_path.exists() else {}


def method_done(cfg: SweepConfig, row: dict | None, method: str) -> bool:
    if row is None or row.get("status") != "ok":
        return False  # a failed method is tried again
    return (row.get("seed"), row.get("budget")) == (cfg.seed, budget_tag(cfg, method))


def methods_pending(cfg: SweepConfig, point: Point, done: dict[str, dict]) -> bool:
    return any(not method_done(cfg, done.get(method_key(point, m)), m) for m in cfg.methods)


# ----- running one method ----------------------------------------------------------------


def baseline_summary(ctx: Context, point: Point, method: str) -> dict:
    """The method's run at the point: its summary, from an earlier finished run or now."""
    from ..baselines.run import SUMMARY_FILE, BaselineConfig, run_baseline

    cfg = ctx.cfg
    run_dir = Path(cfg.out) / "baselines" / f"{point.name}-{method}-{budget_tag(cfg, method)}-s{cfg.seed}"
    if (run_dir / SUMMARY_FILE).exists():
        return json.loads((run_dir / SUMMARY_FILE).read_text())
    trains = method in QAT_METHODS
    return run_baseline(
        BaselineConfig(
            method=method,
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
            epochs=cfg.method_epochs if trains else None,
            budget_minutes=cfg.method_minutes if trains and not cfg.method_epochs else None,
            calibration_images=cfg.calibration_images,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            **cfg.baseline_overrides.get(method, {}),
        )
    )


def baseline_fields(summary: dict) -> dict:
    return {
        "accuracy": summary["val_accuracy"],
        "correct": summary["val_correct"],
        "n": summary["val_images"],
        "brevitas_accuracy": summary["brevitas_val_accuracy"],
        "top1_agreement": summary["top1_agreement"],
        "overflows": summary["overflows"],
        "worst_case_acc_bits": max(summary["worst_case_acc_bits"].values()),
        "wall_s": summary["method_s"],
        "notes": summary["notes"],
        "run_dir": str(Path(summary["final_ir"]).parent),
        "ir_sha256": summary["final_ir_sha256"],
    }


def cceda_minutes(cfg: SweepConfig, point: Point, done: dict[str, dict]) -> float:
    """QAT's wall time at this point (when QAT ran there), else --method-minutes."""
    if "qat" in cfg.methods:
        qat = done.get(method_key(point, "qat"))
        if not qat or qat.get("accuracy") is None:
            raise HwqError("QAT did not finish at this point, so CC-EDA has no wall time to match")
        return qat["wall_s"] / 60
    return cfg.method_minutes


def best_baseline(point: Point, done: dict[str, dict], methods: tuple[str, ...]) -> dict:
    """The baseline of the point with the highest val accuracy (model selection on val)."""
    finished = [
        done[k] for k in (method_key(point, m) for m in methods if m not in CCEDA_METHODS) if k in done
    ]
    finished = [r for r in finished if r.get("accuracy") is not None]
    if not finished:
        raise HwqError("no baseline finished at this point to start CC-EDA from")
    return max(finished, key=lambda r: (r["accuracy"], -r["wall_s"]))


def cceda_fields(ctx: Context, point: Point, method: str, done: dict[str, dict]) -> dict:
    from ..search.rundir import STATE_FILE
    from ..search.train import train
    from .sweep import point_train_config

    cfg = ctx.cfg
    minutes = cceda_minutes(cfg, point, done)
    start = best_baseline(point, done, cfg.methods) if method == "cc-eda-best" else None
    origin = f"-from-{start['method']}" if start else ""
    run_dir = Path(cfg.out) / "train" / f"{point.name}-{method}{origin}-{budget_tag(cfg, method)}-s{cfg.seed}"
    init = {"init_ir": str(Path(start["run_dir"]) / "final.ir")} if start else {}
    tcfg = point_train_config(cfg, point, run_dir, budget_minutes=minutes, **init)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"complete": False}
    if not summary.get("complete", True):
        summary = train(tcfg, resume=(run_dir / STATE_FILE).exists())  # Ctrl-C: the next sweep resumes it
    fields = {
        "accuracy": summary["final_val_accuracy"],
        "correct": round(summary["final_val_accuracy"] * summary["val_images"]),
        "n": summary["val_images"],
        "initial_accuracy": summary["initial_val_accuracy"],
        "evaluations": summary["evaluations"],
        "wall_s": summary["elapsed_s"],
        "budget_minutes": minutes,
        "notes": [],
        "run_dir": str(run_dir),
        "ir_sha256": summary["final_ir_sha256"],
    }
    if start:
        fields |= {
            "init_method": start["method"],
            "init_wall_s": start["wall_s"],
            "init_accuracy": start["accuracy"],
        }
    return fields


def method_row(ctx: Context, point: Point, method: str, done: dict[str, dict]) -> dict:
    """One method's row at one point; a method that fails says why instead of its numbers."""
    start = time.perf_counter()
    try:
        if method in CCEDA_METHODS:
            fields = cceda_fields(ctx, point, method, done)
        else:
            fields = baseline_fields(baseline_summary(ctx, point, method))
        status, error = "ok", None
    except (HwqError, IRError) as exc:
        fields, status, error = {"accuracy": None, "wall_s": None, "notes": []}, "failed", str(exc)
    return {
        "key": method_key(point, method),
        "method": method,
        "wbits": point.wbits,
        "abits": point.abits,
        "per_channel": point.per_channel,
        "acc_bits": point.acc_bits,
        "overflow": point.overflow,
        "status": status,
        "error": error,
        **fields,
        "budget": budget_tag(ctx.cfg, method),
        "seed": ctx.cfg.seed,
        "config": ctx.fixed,
        "versions": ctx.versions,
        "seconds": round(time.perf_counter() - start, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_methods(ctx: Context, point: Point) -> int:
    """Every method of the sweep not yet finished at `point`, in order; rows appended as
    each finishes. Returns how many ran."""
    cfg = ctx.cfg
    done = finished_rows(cfg)
    ran = 0
    for method in cfg.methods:
        if method_done(cfg, done.get(method_key(point, method)), method):
            continue
        row = method_row(ctx, point, method, done)
        append_rows(cfg.results_path, [row])
        done[row["key"]] = row
        ran += 1
        if cfg.progress:
            shown = (
                f"{100 * row['accuracy']:.2f} %" if row["accuracy"] is not None else f"failed: {row['error']}"
            )
            print(f"  {point.name} {method:<13} {shown}", flush=True)
    return ran
