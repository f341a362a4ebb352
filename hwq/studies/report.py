"""`hwq report`: figures, tables and a self-contained HTML page from a sweep's results file.

Every number shown is read from the results file and formatted, never recomputed, so the
report and the file cannot disagree (tests/test_report.py checks it). Figures are written
as PNG and SVG; the HTML embeds the PNGs (base64) so it can be mailed as one file, and the
Markdown summary links the files beside it. matplotlib runs on the Agg backend: no display.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import HwqError  # noqa: E402
from ..outdir import check_output_dir  # noqa: E402
from ..results import write_csv  # noqa: E402
from . import comparison  # noqa: E402
from .rows import RESULTS_FILE, read_results, training_curve  # noqa: E402

FIGURES = {
    "accuracy_vs_weight_bits": "Accuracy vs weight bits, one line per activation width",
    "accuracy_vs_acc_bits": "Accuracy vs accumulator bits: where overflow starts to bite",
    "accuracy_vs_energy": "Accuracy vs energy per inference, Pareto front marked",
    "accuracy_vs_area": "Accuracy vs MAC-array area, Pareto front marked",
    "layer_cycles": "Cycles and PE utilization per layer",
    "training_curve": "CC-EDA training: fitness and held-out accuracy vs evaluations",
}
TABLES = ("points", "accumulator", "accumulator_breaks", "pareto_energy", "pareto_area", "layers", "training")
NO_AREA = "no area data (run python -m rtl_models.area and pass its CSV to hwq sweep --area)"
BREAK_TOLERANCE = 0.01  # an accumulator "holds" while accuracy is within 1 point of the widest's
POINT_COLUMNS = (
    "key",
    "model",
    "wbits",
    "abits",
    "per_channel",
    "acc_bits",
    "overflow",
    "array",
    "accuracy",
    "correct",
    "n",
    "overflows",
    "overflowed_layers",
    "worst_case_acc_bits",
    "trained_accuracy",
    "train_budget",
    "cycles",
    "latency_s",
    "fps",
    "utilization",
    "energy_per_inference_pj",
    "dram_bytes",
    "area_cells",
    "area_luts",
    "area_source",
    "ir_sha256",
    "seed",
)


# ----- reading ---------------------------------------------------------------------------


def load_rows(results: str | os.PathLike) -> list[dict]:
    """Rows of a results file, or of the results.jsonl in a sweep directory."""
    path = Path(results)
    if path.is_dir():
        path = path / RESULTS_FILE
    rows = read_results(path)
    if not rows:
        raise HwqError(f"{path} holds no finished points")
    return rows


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f} %"


def config_label(row: dict) -> str:
    scales = " per-ch" if row["per_channel"] else ""
    return f"W{row['wbits']}A{row['abits']}{scales}"


def point_label(row: dict) -> str:
    return f"{config_label(row)} acc{row['acc_bits']} {row['overflow']} {row['array']}"


def trained_accuracy(row: dict) -> float | None:
    return row["trained"]["accuracy"] if row.get("trained") else None


def reference_array(rows: list[dict]) -> str:
    """Accuracy does not depend on the array, so accuracy plots use one: the smallest."""
    sizes = {row["array"]: row["rows"] * row["cols"] for row in rows}
    return min(sizes, key=lambda a: (sizes[a], a))


def one_array(rows: list[dict]) -> list[dict]:
    ref = reference_array(rows)
    return [row for row in rows if row["array"] == ref]


def widest_accumulator(rows: list[dict]) -> dict[tuple, dict]:
    """Per (W, A, per-channel): the row of the widest accumulator (wrap preferred), the
    network as quantized, with the least overflow the grid has."""
    best: dict[tuple, dict] = {}
    for row in one_array(rows):
        key = (row["wbits"], row["abits"], row["per_channel"])
        rank = (row["acc_bits"], row["overflow"] == "wrap")
        if key not in best or rank > (best[key]["acc_bits"], best[key]["overflow"] == "wrap"):
            best[key] = row
    return best


def reference_point(rows: list[dict]) -> tuple:
    """The configuration whose per-layer timing is shown: W4A8 when swept (the README's
    running example), otherwise the most accurate one."""
    best = widest_accumulator(rows)
    for key in best:
        if key[:2] == (4, 8):
            return key
    return max(best, key=lambda k: best[k]["accuracy"])


# ----- tables ----------------------------------------------------------------------------


def points_table(rows: list[dict]) -> list[dict]:
    table = []
    for row in rows:
        flat = {c: row.get(c) for c in POINT_COLUMNS}
        flat["trained_accuracy"] = trained_accuracy(row)
        flat["train_budget"] = row["trained"]["budget_evals"] if row.get("trained") else None
        table.append(flat)
    return table


def accumulator_table(rows: list[dict]) -> list[dict]:
    ordered = sorted(
        one_array(rows),
        key=lambda r: (r["wbits"], r["abits"], r["per_channel"], r["overflow"], r["acc_bits"]),
    )
    return [
        {
            "config": config_label(r),
            "wbits": r["wbits"],
            "abits": r["abits"],
            "per_channel": r["per_channel"],
            "overflow": r["overflow"],
            "acc_bits": r["acc_bits"],
            "accuracy": r["accuracy"],
            "trained_accuracy": trained_accuracy(r),
            "overflows": r["overflows"],
            "worst_case_acc_bits": r["worst_case_acc_bits"],
        }
        for r in ordered
    ]


def accumulator_breaks(rows: list[dict]) -> list[dict]:
    """Per configuration and overflow mode: the narrowest accumulator from which every wider
    one in the grid stays within BREAK_TOLERANCE of the widest's accuracy, beside the
    data-independent worst case (the width that can never overflow)."""
    table = []
    by_mode = series(accumulator_table(rows), lambda r: (r["config"], r["overflow"]))
    for (label, mode), group in by_mode.items():
        group.sort(key=lambda r: r["acc_bits"])
        widest = group[-1]
        holds = len(group)
        while holds > 0 and group[holds - 1]["accuracy"] >= widest["accuracy"] - BREAK_TOLERANCE:
            holds -= 1
        narrowest = group[holds]
        below = group[holds - 1] if holds > 0 else None
        table.append(
            {
                "config": label,
                "overflow": mode,
                "worst_case_acc_bits": widest["worst_case_acc_bits"],
                "widest_acc_bits": widest["acc_bits"],
                "widest_accuracy": widest["accuracy"],
                "narrowest_holding_acc_bits": narrowest["acc_bits"],
                "narrowest_holding_accuracy": narrowest["accuracy"],
                "next_narrower_acc_bits": below["acc_bits"] if below else None,
                "next_narrower_accuracy": below["accuracy"] if below else None,
            }
        )
    return table


def design_points(rows: list[dict], cost: str) -> list[dict]:
    """Every (row, variant) with a cost: round-to-nearest, and CC-EDA where trained."""
    points = []
    for row in rows:
        if row.get(cost) is None:
            continue
        points.append(
            {
                "key": row["key"],
                "label": point_label(row),
                "variant": "rtn",
                cost: row[cost],
                "accuracy": row["accuracy"],
            }
        )
        if row.get("trained"):
            points.append(
                {
                    "key": row["key"],
                    "label": point_label(row) + " +CC-EDA",
                    "variant": "cc-eda",
                    cost: row[cost],
                    "accuracy": row["trained"]["accuracy"],
                }
            )
    return points


def pareto_front(points: list[dict], cost: str) -> list[dict]:
    """Points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    front: list[dict] = []
    for p in sorted(points, key=lambda p: (p[cost], -p["accuracy"])):
        if not front or p["accuracy"] > front[-1]["accuracy"]:
            front.append(p)
    return front


def layers_table(rows: list[dict]) -> list[dict]:
    ref = reference_point(rows)
    chosen = widest_for_each_array(rows, ref)
    return [{"key": row["key"], "array": row["array"], **layer} for row in chosen for layer in row["layers"]]


def widest_for_each_array(rows: list[dict], config: tuple) -> list[dict]:
    best: dict[str, dict] = {}
    for row in rows:
        if (row["wbits"], row["abits"], row["per_channel"]) != config:
            continue
        rank = (row["acc_bits"], row["overflow"] == "wrap")
        current = best.get(row["array"])
        if current is None or rank > (current["acc_bits"], current["overflow"] == "wrap"):
            best[row["array"]] = row
    return sorted(best.values(), key=lambda r: r["rows"] * r["cols"])


Curve = tuple[str, list[dict]]  # a training run's label and its points


def training_runs(rows: list[dict]) -> list[Curve]:
    """One curve per training run of a sweep (rows of several arrays share one)."""
    runs: dict[str, Curve] = {}
    for row in rows:
        if row.get("trained") and row["trained"].get("curve"):
            label = point_label(row).rsplit(" ", 1)[0]
            runs.setdefault(row["trained"]["run_dir"], (label, row["trained"]["curve"]))
    return list(runs.values())


def run_directory_curves(run_dirs: Iterable[str | os.PathLike]) -> list[Curve]:
    """Curves of `hwq train` run directories, labelled by their bit widths and folder."""
    curves = []
    for run_dir in map(Path, run_dirs):
        config, summary = run_dir / "config.json", run_dir / "summary.json"
        if not config.exists():
            raise HwqError(f"{run_dir} is not an hwq train run directory (no config.json)")
        cfg = json.loads(config.read_text())
        scales = "per-channel" if cfg.get("per_channel") else "per-tensor"
        label = f"W{cfg['wbits']}A{cfg['abits']} {scales} ({run_dir.name})"
        curves.append(
            (label, training_curve(run_dir, json.loads(summary.read_text()) if summary.exists() else {}))
        )
    return curves


def training_table(runs: list[Curve]) -> list[dict]:
    return [
        {
            "run": label,
            "evaluations": p["evaluations"],
            "best_fitness": p["best_fitness"],
            "val_accuracy": p.get("val_accuracy"),
        }
        for label, curve in runs
        for p in curve
    ]


# ----- figures ---------------------------------------------------------------------------


def save_figure(fig: plt.Figure, figures: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(figures / f"{name}.png", dpi=120)
    fig.savefig(figures / f"{name}.svg")
    plt.close(fig)


def series(rows: Iterable[dict], key: Callable[[dict], object]) -> dict[object, list[dict]]:
    groups: dict[object, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def plot_weight_bits(rows: list[dict]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    best = list(widest_accumulator(rows).values())
    for (ab, pc), group in sorted(series(best, lambda r: (r["abits"], r["per_channel"])).items()):
        group.sort(key=lambda r: r["wbits"])
        label = f"A{ab}" + (" per-ch" if pc else "")
        line = ax.plot([r["wbits"] for r in group], [100 * r["accuracy"] for r in group], "o-", label=label)
        trained = [r for r in group if r.get("trained")]
        if trained:
            ax.plot(
                [r["wbits"] for r in trained],
                [100 * trained_accuracy(r) for r in trained],
                "^--",
                color=line[0].get_color(),
                label=f"{label} +CC-EDA",
            )
    accs = sorted({r["acc_bits"] for r in best})
    ax.set(
        xlabel="weight bits",
        ylabel="top-1 accuracy on accel_sim (%)",
        title=f"Accuracy vs weight bits (accumulator {'/'.join(map(str, accs))} bits)",
    )
    ax.set_xticks(sorted({r["wbits"] for r in best}))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_acc_bits(rows: list[dict]) -> plt.Figure:
    modes = sorted({r["overflow"] for r in rows}, key=lambda m: m != "wrap")
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        subset = [r for r in one_array(rows) if r["overflow"] == mode]
        for label, group in sorted(series(subset, config_label).items()):
            group.sort(key=lambda r: r["acc_bits"])
            line = ax.plot(
                [r["acc_bits"] for r in group],
                [100 * r["accuracy"] for r in group],
                "o-",
                label=label,
                markersize=4,
            )
            trained = [r for r in group if r.get("trained")]
            if trained:
                ax.plot(
                    [r["acc_bits"] for r in trained],
                    [100 * trained_accuracy(r) for r in trained],
                    "^",
                    color=line[0].get_color(),
                    label=f"{label} +CC-EDA",
                )
        ax.set(xlabel="accumulator bits", title=f"{mode} on overflow")
        ax.set_xticks(sorted({r["acc_bits"] for r in subset}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy on accel_sim (%)")
    axes[0][-1].legend(fontsize=8, loc="center right")
    return fig


def plot_pareto(rows: list[dict], cost: str, xlabel: str, scale: float) -> plt.Figure:
    points = design_points(rows, cost)
    front = pareto_front(points, cost)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for variant, marker in (("rtn", "o"), ("cc-eda", "^")):
        chosen = [p for p in points if p["variant"] == variant]
        if chosen:
            xs, ys = [p[cost] / scale for p in chosen], [100 * p["accuracy"] for p in chosen]
            rtn = variant == "rtn"
            color, label = ("tab:gray", "round-to-nearest") if rtn else ("tab:green", "CC-EDA")
            ax.scatter(xs, ys, marker=marker, s=18, alpha=0.5, color=color, label=label)
    ax.plot(
        [p[cost] / scale for p in front],
        [100 * p["accuracy"] for p in front],
        "-o",
        color="tab:red",
        markersize=5,
        label="Pareto front",
    )
    for p in front:
        ax.annotate(
            p["label"].replace(" +CC-EDA", "+"),
            (p[cost] / scale, 100 * p["accuracy"]),
            fontsize=6,
            xytext=(3, -8),
            textcoords="offset points",
        )
    costs = [p[cost] for p in points]
    if max(costs) > 10 * min(costs):  # a log axis only where the costs span a decade
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="top-1 accuracy on accel_sim (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return fig


def plot_layers(rows: list[dict]) -> plt.Figure:
    chosen = widest_for_each_array(rows, reference_point(rows))
    names = [layer["name"] for layer in chosen[0]["layers"]]
    width = 0.8 / len(chosen)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for i, row in enumerate(chosen):
        xs = [j + (i - (len(chosen) - 1) / 2) * width for j in range(len(names))]
        top.bar(xs, [layer["cycles"] for layer in row["layers"]], width, label=row["array"])
        bottom.bar(xs, [100 * layer["utilization"] for layer in row["layers"]], width, label=row["array"])
    top.set(ylabel="cycles", title=f"Per-layer timing, {point_label(chosen[0]).rsplit(' ', 1)[0]}")
    bottom.set(ylabel="PE utilization (%)")
    bottom.set_xticks(range(len(names)))
    bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    top.legend(title="array")
    return fig


def plot_training(runs: list[Curve]) -> plt.Figure:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, curve in runs:
        start = abs(curve[0]["best_fitness"]) or 1
        gain = [100 * (p["best_fitness"] - curve[0]["best_fitness"]) / start for p in curve]
        top.plot([p["evaluations"] for p in curve], gain, label=label)
        held = [p for p in curve if p.get("val_accuracy") is not None]
        accuracy = [100 * p["val_accuracy"] for p in held]
        bottom.plot([p["evaluations"] for p in held], accuracy, "o-", label=label)
    # Fitness scales with the batch size and margin clip, and distill's is negative (minus a
    # distance), so runs compare by their gain relative to the starting fitness's size.
    top.set(ylabel="best fitness gain vs |start| (%)", title="CC-EDA on accel_sim")
    bottom.set(xlabel="fitness evaluations", ylabel="held-out (val) accuracy (%)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    return fig


# ----- the report ------------------------------------------------------------------------


@dataclass
class Report:
    """What was written; `missing` says, per figure or table, why it is absent."""

    out: Path
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def build_figures(rows: list[dict], figures: Path, report: Report) -> None:
    has_area = any(r.get("area_cells") is not None for r in rows)
    has_training = bool(training_runs(rows))
    makers: dict[str, Callable[[], plt.Figure] | str] = {
        "accuracy_vs_weight_bits": lambda: plot_weight_bits(rows),
        "accuracy_vs_acc_bits": lambda: plot_acc_bits(rows),
        "accuracy_vs_energy": lambda: plot_pareto(
            rows, "energy_per_inference_pj", "energy per inference (uJ, timing model)", 1e6
        ),
        "accuracy_vs_area": (lambda: plot_pareto(rows, "area_cells", "MAC-array area (Yosys cells)", 1))
        if has_area
        else NO_AREA,
        "layer_cycles": lambda: plot_layers(rows),
        "training_curve": (lambda: plot_training(training_runs(rows)))
        if has_training
        else "no CC-EDA training in these results (hwq sweep --train-budget N)",
    }
    for name, make in makers.items():
        if isinstance(make, str):
            report.missing[name] = make
        else:
            save_figure(make(), figures, name)
            report.figures.append(name)


def build_tables(rows: list[dict], tables: Path, report: Report) -> dict[str, list[dict]]:
    energy = pareto_front(design_points(rows, "energy_per_inference_pj"), "energy_per_inference_pj")
    area = pareto_front(design_points(rows, "area_cells"), "area_cells")
    built = {
        "points": points_table(rows),
        "accumulator": accumulator_table(rows),
        "accumulator_breaks": accumulator_breaks(rows),
        "pareto_energy": energy,
        "pareto_area": area,
        "layers": layers_table(rows),
        "training": training_table(training_runs(rows)),
    }
    for name, table in built.items():
        if table:
            write_csv(tables / f"{name}.csv", table)
            report.tables.append(name)
        elif name not in report.missing:
            report.missing[name] = NO_AREA if name == "pareto_area" else "no data"
    return built


def build_comparison(
    rows: list[dict], figures: Path, tables: Path, report: Report, built: dict[str, list[dict]]
) -> None:
    """The method comparison, when the sweep ran --methods (otherwise nothing is said)."""
    table = comparison.comparison_table(rows)
    if not table:
        return
    save_figure(comparison.plot(table), figures, comparison.FIGURE)
    report.figures.append(comparison.FIGURE)
    write_csv(tables / f"{comparison.TABLE}.csv", table)
    report.tables.append(comparison.TABLE)
    built[comparison.TABLE] = table


def comparison_html(built: dict[str, list[dict]], report: Report) -> list[str]:
    if comparison.TABLE not in built:
        return []
    table = built[comparison.TABLE]
    data = base64.b64encode((report.out / "figures" / f"{comparison.FIGURE}.png").read_bytes()).decode()
    header, body = comparison.pivot(table)
    parts = [
        f'<section id="section-{comparison.FIGURE}"><h2>{escape(comparison.TABLE_TITLE)}</h2>',
        html_table(header, body, comparison.TABLE),
        *(f"<p>{escape(note)}</p>" for note in comparison.notes(table)),
        f'<img id="{comparison.FIGURE}" alt="{escape(comparison.FIGURE_TITLE)}" '
        f'src="data:image/png;base64,{data}">',
        f"<p>CSV: tables/{comparison.TABLE}.csv</p></section>",
    ]
    return parts


def comparison_markdown(built: dict[str, list[dict]]) -> list[str]:
    if comparison.TABLE not in built:
        return []
    table = built[comparison.TABLE]
    page = [f"## {comparison.TABLE_TITLE}", "", md_table(*comparison.pivot(table)), ""]
    page += [f"- {note}" for note in comparison.notes(table)]
    name, title = comparison.FIGURE, comparison.FIGURE_TITLE
    page += ["", f"![{title}](figures/{name}.png)", "", f"{title} ([SVG](figures/{name}.svg))", ""]
    return page


def build_report(results: str | os.PathLike, out: str | os.PathLike) -> Report:
    """Write report.html, summary.md, figures/*.png|svg and tables/*.csv under `out`."""
    check_output_dir(out)
    everything = load_rows(results)
    rows = [r for r in everything if "method" not in r]  # the grid; method rows: the comparison
    if not rows:
        raise HwqError(f"{results} holds method rows only, no measured grid points")
    report = Report(Path(out))
    figures, tables = report.out / "figures", report.out / "tables"
    figures.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    build_figures(rows, figures, report)
    built = build_tables(rows, tables, report)
    build_comparison(everything, figures, tables, report, built)
    (report.out / "report.html").write_text(html_page(rows, built, report))
    (report.out / "summary.md").write_text(markdown_page(rows, built, report))
    return report


def build_training_report(run_dirs: list[str], out: str | os.PathLike) -> Report:
    """The training curve alone (figures/training_curve.*, tables/training.csv) of one or
    more `hwq train` run directories, for runs made outside a sweep."""
    check_output_dir(out)
    curves = run_directory_curves(run_dirs)
    report = Report(Path(out))
    (report.out / "figures").mkdir(parents=True, exist_ok=True)
    save_figure(plot_training(curves), report.out / "figures", "training_curve")
    report.figures.append("training_curve")
    write_csv(report.out / "tables" / "training.csv", training_table(curves))
    report.tables.append("training")
    return report


# ----- pages -----------------------------------------------------------------------------


def escape(value: object) -> str:
    return html.escape("" if value is None else str(value))


def uj(pj: float | None) -> str:
    return "" if pj is None else f"{pj / 1e6:.3f}"


def count(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.3f}"


# The points table as shown: (heading, how a row's value is formatted).
POINT_VIEW: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("key", lambda r: r["key"]),
    ("config", config_label),
    ("acc bits", lambda r: str(r["acc_bits"])),
    ("overflow", lambda r: r["overflow"]),
    ("array", lambda r: r["array"]),
    ("accuracy", lambda r: pct(r["accuracy"])),
    ("CC-EDA", lambda r: pct(trained_accuracy(r))),
    ("overflowed outputs", lambda r: count(r["overflows"])),
    ("worst-case acc bits", lambda r: str(r["worst_case_acc_bits"])),
    ("cycles", lambda r: count(r["cycles"])),
    ("latency ms", lambda r: ms(r["latency_s"])),
    ("energy uJ", lambda r: uj(r["energy_per_inference_pj"])),
    ("area cells", lambda r: count(r.get("area_cells"))),
)


def accumulator_pivot(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Accuracy by (configuration, overflow mode) x accumulator bits, as text cells."""
    table = accumulator_table(rows)
    widths = sorted({r["acc_bits"] for r in table})
    cells: dict[tuple, dict[int, dict]] = {}
    for r in table:
        cells.setdefault((r["config"], r["overflow"]), {})[r["acc_bits"]] = r
    header = ["config", "overflow", *(f"{b}" for b in widths)]
    body = [
        [label, mode, *(pct(by_bits[b]["accuracy"]) if b in by_bits else "-" for b in widths)]
        for (label, mode), by_bits in cells.items()
    ]
    return header, body


def breaks_view(built: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "config",
        "overflow",
        "worst case (never overflows)",
        "widest in grid",
        "narrowest within 1 pt",
        "next narrower",
    ]
    body = [
        [
            b["config"],
            b["overflow"],
            f"{b['worst_case_acc_bits']} bits",
            f"{b['widest_acc_bits']} bits: {pct(b['widest_accuracy'])}",
            f"{b['narrowest_holding_acc_bits']} bits: {pct(b['narrowest_holding_accuracy'])}",
            f"{b['next_narrower_acc_bits']} bits: {pct(b['next_narrower_accuracy'])}"
            if b["next_narrower_acc_bits"] is not None
            else "-",
        ]
        for b in built["accumulator_breaks"]
    ]
    return header, body


def pareto_view(
    front: list[dict], cost: str, heading: str, fmt: Callable
) -> tuple[list[str], list[list[str]]]:
    body = [[p["label"], fmt(p[cost]), pct(p["accuracy"])] for p in front]
    return ["design point", heading, "accuracy"], body


def html_table(header: list[str], body: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = "\n".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{lines}\n</tbody>\n</table>'


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def context_line(rows: list[dict]) -> str:
    """What was measured: the shared settings of the rows (the first row's)."""
    first = rows[0]
    cfg = first["config"]
    hw = cfg["accelerator"]
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    arrays = ", ".join(sorted({r["array"] for r in rows}, key=lambda a: int(a.split("x")[0])))
    return (
        f"{len(rows)} result rows of {first['model']} ({cfg['checkpoint']}, sha256 "
        f"{str(cfg.get('checkpoint_sha256'))[:12]}), accuracy on {first['n']} {cfg['split']} images of "
        f"{cfg['data'] or 'the default CIFAR-10'} on accel_sim; timing: {hw['name']} "
        f"({hw['dataflow']}, {hw['clock_mhz']:g} MHz, batch {cfg['batch']}) at array sizes {arrays}, "
        f"operand widths from each point's program. Versions: {versions}."
    )


def views(rows: list[dict], built: dict[str, list[dict]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    energy = pareto_view(built["pareto_energy"], "energy_per_inference_pj", "energy uJ", uj)
    return {
        "accumulator": accumulator_pivot(rows),
        "accumulator_breaks": breaks_view(built),
        "pareto_energy": energy,
        "pareto_area": pareto_view(built["pareto_area"], "area_cells", "area cells", count),
        "points": (
            [h for h, _ in POINT_VIEW],
            [[fmt(r) for _, fmt in POINT_VIEW] for r in sorted(rows, key=lambda r: r["key"])],
        ),
    }


VIEW_TITLES = {
    "accumulator": "Accuracy (%) by accumulator bits",
    "accumulator_breaks": "Where the accumulator starts to bite",
    "pareto_energy": "Pareto front: accuracy vs energy per inference",
    "pareto_area": "Pareto front: accuracy vs MAC-array area",
    "points": "Every result row",
}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; }
img { max-width: 100%; } .missing { color: #a33; font-style: italic; }
"""


def html_page(rows: list[dict], built: dict[str, list[dict]], report: Report) -> str:
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>hwq sweep report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>Accuracy versus accelerator bit width</h1>",
        f"<p>{escape(context_line(rows))}</p>",
        *comparison_html(built, report),
    ]
    for name, title in FIGURES.items():
        parts.append(f'<section id="section-{name}"><h2>{escape(title)}</h2>')
        if name in report.figures:
            data = base64.b64encode((report.out / "figures" / f"{name}.png").read_bytes()).decode()
            parts.append(f'<img id="{name}" alt="{escape(title)}" src="data:image/png;base64,{data}">')
        else:
            parts.append(f'<p class="missing">{escape(report.missing[name])}</p>')
        parts.append("</section>")
    for name, (header, body) in views(rows, built).items():
        parts.append(f'<section id="section-table-{name}"><h2>{escape(VIEW_TITLES[name])}</h2>')
        if body:
            parts.append(html_table(header, body, name))
        else:
            parts.append(f'<p class="missing">{escape(report.missing.get(name, "no data"))}</p>')
        parts.append(f"<p>CSV: tables/{name}.csv</p></section>" if body else "</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def markdown_page(rows: list[dict], built: dict[str, list[dict]], report: Report) -> str:
    page = ["# Accuracy versus accelerator bit width", "", context_line(rows), ""]
    page += comparison_markdown(built)
    shown = views(rows, built)
    for name in ("accumulator", "accumulator_breaks", "pareto_energy", "pareto_area"):
        header, body = shown[name]
        page += [f"## {VIEW_TITLES[name]}", ""]
        page += [md_table(header, body) if body else f"*{report.missing.get(name, 'no data')}*", ""]
    page += ["## Figures", ""]
    for name, title in FIGURES.items():
        if name in report.figures:
            page += [f"![{title}](figures/{name}.png)", "", f"{title} ([SVG](figures/{name}.svg))", ""]
        else:
            page += [f"*{title}: {report.missing[name]}*", ""]
    page += ["## Tables (CSV)", ""]
    page += [f"- [tables/{name}.csv](tables/{name}.csv)" for name in report.tables]
    page += ["", "Every row, with its configuration, seed, versions and IR sha256: the results file."]
    return "\n".join(page) + "\n"
