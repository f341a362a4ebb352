"""`hwq report --codesign DIR`: the front of a co-design run, drawn against its grid.

Three figures (accuracy against energy, area and cycles per image) show every network
measured on its best hardware variants (grey, points.json), the front's points (the run's
front.json: non-dominated in all objectives at once) and, within each figure, the
staircase of the designs no other beats on that figure's two axes alone; the uniform
grid's points (grid.json: `hwq codesign --grid-seconds`, or --grid) are marked beside
them. Tables: the front with its hardware, and the weight width of every layer of every
front point. Every number is read from the run's files and formatted, never recomputed.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from .. import HwqError
from ..outdir import check_output_dir
from ..results import write_csv
from ..studies.report import STYLE, Report, escape, html_table, md_table, pct, plt, save_figure
from .front import OBJECTIVE_FIELDS, flat, non_dominated
from .grid import GRID_FILE
from .run import POINTS_FILE, SETTINGS_FILE

AXES = {  # figure name: (objective, axis label)
    "codesign_accuracy_vs_energy": ("energy", "energy per image (uJ)"),
    "codesign_accuracy_vs_area": ("area", "area (um^2, 45 nm: MAC array + SRAM)"),
    "codesign_accuracy_vs_cycles": ("cycles", "cycles per image"),
}
TITLES = {
    "codesign_accuracy_vs_energy": "Accuracy vs energy per image",
    "codesign_accuracy_vs_area": "Accuracy vs area",
    "codesign_accuracy_vs_cycles": "Accuracy vs cycles per image",
}
FRONT_VIEW = (
    ("design", lambda p: p["name"]),
    ("accuracy", lambda p: pct(p["accuracy"])),
    ("correct", lambda p: f"{p['correct']}/{p['images']}"),
    ("CC-EDA", lambda p: "yes" if p["finetuned"] else "no"),
    ("energy uJ", lambda p: f"{p['energy_uj']:.3f}"),
    ("area mm^2", lambda p: f"{p['area_um2'] / 1e6:.3f}"),
    ("cycles", lambda p: f"{p['cycles']:,}"),
    ("acc", lambda p: f"{p['acc_bits']} {p['overflow']}"),
    ("array", lambda p: f"{p['rows']}x{p['cols']} {p['dataflow']}"),
)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HwqError(f"{path} does not exist: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HwqError(f"{path} is not a readable JSON file ({exc})") from None


def points_of(doc: dict, path: Path) -> list[dict]:
    points = doc.get("points")
    if not isinstance(points, list):
        raise HwqError(f"{path} has no list of points")
    return points


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """The run's settings, its front and every feasible point measured."""
    settings = read_json(run_dir / SETTINGS_FILE, "not a hwq codesign run directory")
    front_doc = read_json(run_dir / "front.json", "the run has not finished a generation yet")
    front = points_of(front_doc, run_dir / "front.json")
    points_path = run_dir / POINTS_FILE
    evaluated = (
        points_of(read_json(points_path, "not written"), points_path) if points_path.exists() else front
    )
    return {**settings, "objectives": front_doc["objectives"]}, front, evaluated


def load_grid(run_dir: Path, grid: str | os.PathLike | None) -> list[dict]:
    path = Path(grid) if grid is not None else run_dir / GRID_FILE
    if grid is None and not path.exists():
        return []
    points = points_of(read_json(path, "no grid measured (hwq codesign --grid-seconds S)"), path)
    return [p for p in points if p.get("feasible", True)]  # as on the front: the constraints met


def plot_front(name: str, front: list[dict], evaluated: list[dict], grid: list[dict]) -> plt.Figure:
    objective, label = AXES[name]
    field = OBJECTIVE_FIELDS[objective]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))

    def scatter(points: list[dict], **style) -> None:
        if points:
            ax.scatter([p[field] for p in points], [100 * p["accuracy"] for p in points], **style)

    scatter(evaluated, s=12, color="tab:gray", alpha=0.35, label="networks measured, on their best hardware")
    scatter(grid, s=22, marker="x", color="tab:orange", label="uniform grid")
    scatter(front, s=26, color="tab:blue", label="front (all objectives)")
    stairs = sorted(non_dominated(front, ("accuracy", objective)), key=lambda p: p[field])
    ax.step(
        [p[field] for p in stairs],
        [100 * p["accuracy"] for p in stairs],
        where="post",
        color="tab:blue",
        alpha=0.8,
        label=f"front on these two axes ({len(stairs)} points)",
    )
    for p in stairs:
        wbits = "/".join(str(b) for b in sorted(set(p["layer_wbits"])))
        ax.annotate(
            f"w{wbits}a{p['act_bits']}",
            (p[field], 100 * p["accuracy"]),
            fontsize=6,
            xytext=(3, -8),
            textcoords="offset points",
        )
    values = [p[field] for p in evaluated + grid + front]
    if max(values) > 10 * min(values):
        ax.set_xscale("log")
    ax.set(xlabel=label, ylabel="val accuracy on accel_sim (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def layer_table(front: list[dict], layers: list[str]) -> list[dict]:
    return [{"design": p["name"], **dict(zip(layers, p["layer_wbits"], strict=True))} for p in front]


def short_layer(name: str) -> str:
    return name.replace("layer", "L").replace(".conv", ".c").replace("downsample", "ds")


def context_line(settings: dict, front: list[dict], evaluated: list[dict], grid: list[dict]) -> str:
    images = front[0]["images"] if front else 0
    grid_part = (
        f"; {len(grid)} uniform-grid points beside it (those meeting the constraints)"
        if grid
        else "; no grid measured"
    )
    return (
        f"{len(front)} designs on the front of {len(evaluated)} feasible designs (each network measured, "
        "on its best hardware variants) "
        f"(objectives: {', '.join(settings['objectives'])}), accuracy bit-exact on accel_sim on {images} "
        f"val images of {settings.get('data') or 'the default CIFAR-10'}, checkpoint {settings['checkpoint']}"
        f"{grid_part}."
    )


def build_codesign_report(
    run_dir: str | os.PathLike, out: str | os.PathLike, grid: str | os.PathLike | None = None
) -> Report:
    """report.html, summary.md, figures/codesign_*.png|svg, tables/front.csv and
    tables/layer_widths.csv under `out`."""
    run_dir = Path(run_dir)
    settings, front, evaluated = load_run(run_dir)
    grid_points = load_grid(run_dir, grid)
    if not front:
        raise HwqError(f"{run_dir}/front.json holds no design: nothing met the space's constraints")
    check_output_dir(out)
    report = Report(Path(out))
    figures, tables = report.out / "figures", report.out / "tables"
    figures.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    for name in AXES:
        save_figure(plot_front(name, front, evaluated, grid_points), figures, name)
        report.figures.append(name)
    layers = settings["layers"]
    write_csv(tables / "front.csv", [flat(p) for p in front])
    write_csv(tables / "layer_widths.csv", layer_table(front, layers))
    report.tables += ["front", "layer_widths"]
    context = context_line(settings, front, evaluated, grid_points)
    views = {
        "front": ([h for h, _ in FRONT_VIEW], [[fmt(p) for _, fmt in FRONT_VIEW] for p in front]),
        "layer_widths": (
            ["design", *map(short_layer, layers)],
            [[p["name"], *map(str, p["layer_wbits"])] for p in front],
        ),
    }
    (report.out / "report.html").write_text(html_page(context, views, report))
    (report.out / "summary.md").write_text(markdown_page(context, views))
    return report


VIEW_TITLES = {"front": "The front", "layer_widths": "Weight bits per layer of each front design"}


def html_page(context: str, views: dict, report: Report) -> str:
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>hwq codesign report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>Co-design: accuracy against energy, area and cycles</h1>",
        f"<p>{escape(context)}</p>",
    ]
    for name in report.figures:
        data = base64.b64encode((report.out / "figures" / f"{name}.png").read_bytes()).decode()
        parts.append(f'<section id="section-{name}"><h2>{escape(TITLES[name])}</h2>')
        parts.append(
            f'<img id="{name}" alt="{escape(TITLES[name])}" src="data:image/png;base64,{data}"></section>'
        )
    for name, (header, body) in views.items():
        parts.append(f'<section id="section-table-{name}"><h2>{escape(VIEW_TITLES[name])}</h2>')
        parts.append(html_table(header, body, name))
        parts.append(f"<p>CSV: tables/{name}.csv</p></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def markdown_page(context: str, views: dict) -> str:
    page = ["# Co-design: accuracy against energy, area and cycles", "", context, ""]
    for name, (header, body) in views.items():
        page += [f"## {VIEW_TITLES[name]}", "", md_table(header, body), "", f"CSV: tables/{name}.csv", ""]
    page += ["## Figures", ""]
    for name, title in TITLES.items():
        page += [f"![{title}](figures/{name}.png)", "", f"{title} ([SVG](figures/{name}.svg))", ""]
    return "\n".join(page) + "\n"
