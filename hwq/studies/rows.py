"""A sweep's results file, `results.jsonl`: one JSON row per measured point, appended.

Reading it needs neither torch nor the simulator, so `hwq report` starts in a fraction of
a second; the sweep writes it, the report only reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

from accel_sim.ir import atomic_write_bytes

from .. import HwqError

RESULTS_FILE = "results.jsonl"


def read_results(path: str | os.PathLike) -> list[dict]:
    """Every complete row; a truncated last line (a write cut short by a kill) is ignored,
    and a later row with the same key replaces an earlier one."""
    path = Path(path)
    if not path.is_file():
        raise HwqError(f"no results file {path}")
    lines = path.read_bytes().split(b"\n")
    rows: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, without its newline: cut short
                break
            raise HwqError(f"{path} line {number} is not a JSON object") from None
        if not isinstance(row, dict) or "key" not in row:
            raise HwqError(f"{path} line {number} is not a result row")
        rows[row["key"]] = row
    return list(rows.values())


def drop_truncated_tail(path: Path) -> None:
    """Cut a partial last line, so that the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def append_rows(path: Path, rows: list[dict], unless: Callable[[dict], bool] | None = None) -> list[dict]:
    """One write of whole lines, under a lock (workers append concurrently), then fsync:
    once this returns, the rows survive a kill or a power cut. With `unless`, a row whose
    key already has a row in the file that `unless` accepts is left out (checked under the
    lock, so no two writers both add it). Returns the rows written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if unless is not None:
            present = {row["key"]: row for row in read_results(path)}
            rows = [row for row in rows if not (row["key"] in present and unless(present[row["key"]]))]
        os.write(fd, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return rows


def training_curve(run_dir: Path, summary: dict, max_points: int = 400) -> list[dict]:
    """Fitness and held-out accuracy against evaluations, from the run's log.jsonl; every
    held-out measurement is kept, fitness lines are thinned to about `max_points`, and the
    final network's held-out accuracy (summary.json) ends the curve."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = max(1, len(entries) // max_points)
    curve = []
    for i, e in enumerate(entries):
        if "val_accuracy" in e or i % step == 0 or i == len(entries) - 1:
            point = {"evaluations": e.get("evaluations"), "best_fitness": e.get("best_fitness")}
            if "val_accuracy" in e:
                point["val_accuracy"] = e["val_accuracy"]
            curve.append(point)
    if curve and "val_accuracy" not in curve[-1] and summary.get("final_val_accuracy") is not None:
        curve[-1]["val_accuracy"] = summary["final_val_accuracy"]
    return curve
