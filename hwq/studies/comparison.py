"""The method comparison of `hwq report`: accuracy on accel_sim by method at every point
of a `hwq sweep --methods` grid, with the wall time each took.

The numbers are the method rows of the results file, which the sweep copied from each
run's summary.json; nothing is recomputed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
    points = list(dict.fromkeys(line["point"] for line in table))
    methods = [m for m in SWEEP_METHODS if any(line["method"] == m for line in table)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(points) * len(methods) / 4 + 3), 4.6))
    for i, method in enumerate(methods):
        lines = {line["point"]: line for line in table if line["method"] == method}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(points))]
        ok = [
            (x, lines[p])
            for x, p in zip(xs, points, strict=True)
            if p in lines and lines[p]["status"] == "ok"
        ]
        bars = ax.bar(
            [x for x, _ in ok], [100 * line["accuracy"] for _, line in ok], width, label=LABELS[method]
        )
        failed = [x for x, p in zip(xs, points, strict=True) if p in lines and lines[p]["status"] != "ok"]
        ax.plot(
            failed, [1] * len(failed), "x", color=bars.patches[0].get_facecolor() if bars.patches else "k"
        )
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels(points, rotation=15, ha="right", fontsize=8)
    ax.set(ylabel="top-1 accuracy on accel_sim, val (%)", ylim=(0, 100), title=FIGURE_TITLE)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    return fig
