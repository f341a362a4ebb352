"""The method comparison of `hwq report`: accuracy on accel_sim by method at every point
of a `hwq sweep --methods` grid, with the wall time each took.

The numbers are the method rows of the results file, which the sweep copied from each
run's summary.json; nothing is recomputed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..baselines import SWEEP_METHODS  # noqa: E402

FIGURE = "method_comparison"
FIGURE_TITLE = "Accuracy on accel_sim by method, at each bit-width point"
TABLE = "comparison"
TABLE_TITLE = "Methods compared on the same integer datapath (val split, accel_sim)"
LABELS = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "gpfq": "GPFQ",
    "learned-round": "learned round",
    "qat": "QAT (STE)",
    "a2q": "A2Q",
    "a2q-plus": "A2Q+",
    "cc-eda": "CC-EDA from RTN",
    "cc-eda-best": "CC-EDA from the best baseline",
}


def method_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "method" in r]


def point_label(row: dict) -> str:
    scales = "per-channel" if row["per_channel"] else "per-tensor"
    return f"W{row['wbits']}A{row['abits']} {scales}, {row['acc_bits']}-bit {row['overflow']}"


def point_order(row: dict) -> tuple:
    return (row["per_channel"], -row["wbits"], -row["abits"], -row["acc_bits"], row["overflow"])


def comparison_table(rows: list[dict]) -> list[dict]:
    """One line per (point, method), points as the grid orders them, methods in run order."""
    ordered = sorted(method_rows(rows), key=lambda r: (point_order(r), SWEEP_METHODS.index(r["method"])))
    return [
        {
            "point": point_label(r),
            "wbits": r["wbits"],
            "abits": r["abits"],
            "per_channel": r["per_channel"],
            "acc_bits": r["acc_bits"],
            "overflow": r["overflow"],
            "method": r["method"],
            "status": r["status"],
            "accuracy": r["accuracy"],
            "correct": r.get("correct"),
            "n": r.get("n"),
            "wall_s": r["wall_s"],
            "init_method": r.get("init_method"),
            "init_wall_s": r.get("init_wall_s"),
            "brevitas_accuracy": r.get("brevitas_accuracy"),
            "top1_agreement": r.get("top1_agreement"),
            "overflows": r.get("overflows"),
            "notes": " | ".join(r.get("notes") or []),
            "error": r.get("error"),
            "run_dir": r.get("run_dir"),
            "seed": r["seed"],
            "budget": r["budget"],
        }
        for r in ordered
    ]


def minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f} min"


def cell(line: dict) -> str:
    if line["status"] != "ok":
        return f"failed: {line['error']}"
    text = f"{100 * line['accuracy']:.2f} % ({minutes(line['wall_s'])}"
    if line["init_method"]:
        text += f" after {LABELS[line['init_method']]}, {minutes(line['init_wall_s'])}"
    return text + ")"


def pivot(table: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Points x methods; a method not run at a point says so."""
    methods = [m for m in SWEEP_METHODS if any(line["method"] == m for line in table)]
    by_point: dict[str, dict[str, dict]] = {}
    for line in table:
        by_point.setdefault(line["point"], {})[line["method"]] = line
    header = ["point", *(LABELS[m] for m in methods)]
    body = [
        [point, *(cell(lines[m]) if m in lines else "not run" for m in methods)]
        for point, lines in by_point.items()
    ]
    return header, body


def notes(table: list[dict]) -> list[str]:
    return [f"{line['point']}, {LABELS[line['method']]}: {line['notes']}" for line in table if line["notes"]]


def plot(table: list[dict]) -> plt.Figure:
    """Grouped bars, one colour per method (the same in every report); a cross at the
    bottom marks a method that failed at that point."""
    points = list(dict.fromkeys(line["point"] for line in table))
    methods = [m for m in SWEEP_METHODS if any(line["method"] == m for line in table)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(points) * len(methods) / 3 + 3), 5.0))
    for i, method in enumerate(methods):
        color = f"C{SWEEP_METHODS.index(method)}"
        lines = {line["point"]: line for line in table if line["method"] == method}
        xs = {p: j + (i - (len(methods) - 1) / 2) * width for j, p in enumerate(points) if p in lines}
        ok = [p for p in xs if lines[p]["status"] == "ok"]
        failed = [p for p in xs if lines[p]["status"] != "ok"]
        ax.bar(
            [xs[p] for p in ok],
            [100 * lines[p]["accuracy"] for p in ok],
            width,
            color=color,
            label=LABELS[method],
        )
        ax.plot([xs[p] for p in failed], [2] * len(failed), "x", color=color, markersize=8)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels(points, fontsize=8)
    ax.set(ylabel="top-1 accuracy on accel_sim, val (%)", ylim=(0, 100), title=FIGURE_TITLE)
    ax.grid(alpha=0.3, axis="y")
    handles = [Patch(color=f"C{SWEEP_METHODS.index(m)}", label=LABELS[m]) for m in methods]
    ax.legend(
        handles=handles,
        fontsize=7,
        ncol=min(5, len(methods)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
    )
    return fig
