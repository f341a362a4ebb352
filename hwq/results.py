"""Result files: written atomically, so an interrupted run never leaves half a file."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from accel_sim.ir import atomic_write_bytes


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def percent(x: float) -> str:
    return f"{100 * x:6.2f} %"
