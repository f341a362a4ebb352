"""`hwq report` from a synthetic results file: every figure and table is there, the numbers
shown are the numbers in the file, and bad input is one line of error."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from hwq import HwqError
from hwq.cli import main
from hwq.studies.report import FIGURES, TABLES, build_report, pareto_front
from hwq.studies.rows import read_results

ARRAYS = ((8, 8), (16, 16))


def synthetic_row(wb: int, ab: int, acc: int, mode: str, rows: int, cols: int, area: bool) -> dict:
    """A row shaped like hwq.sweep's, with numbers that vary the way real ones do."""
    worst = wb + ab + 10
    short = max(0, worst - acc)
    accuracy = round(max(0.1, 0.3 + 0.08 * wb + 0.02 * ab - short * (0.2 if mode == "wrap" else 0.05)), 4)
    cycles = 700_000 * 64 // (rows * cols) + 17 * wb
    layers = [
        {
            "name": f"layer{i}",
            "kind": "conv2d",
            "macs": 1000 * i,
            "cycles": cycles // 4 + i,
            "stall_cycles": 0,
            "utilization": 0.5 + 0.1 * i,
            "dram_bytes": 100 * i,
            "energy_pj": 1e5 * i,
            "overflows": short * i,
            "worst_case_acc_bits": worst,
        }
        for i in range(4)
    ]
    name = f"w{wb}a{ab}-pt-acc{acc}-{mode}"
    return {
        "key": f"{name}-{rows}x{cols}",
        "wbits": wb, "abits": ab, "per_channel": False, "acc_bits": acc, "overflow": mode,
        "model": "resnet20",
        "accuracy": accuracy, "correct": int(accuracy * 1000), "n": 1000,
        "overflows": 1234 * short, "overflowed_layers": min(short, 4), "accumulator_outputs": 10**6,
        "worst_case_acc_bits": worst,
        "trained": None,
        "ir_sha256": f"{wb}{ab}{acc}".ljust(64, "0"), "ir_file": f"ir/w{wb}a{ab}-pt.ir",
        "rerun": "hwq eval ...",
        "seed": 0,
        "config": {"checkpoint": "ckpt.th", "checkpoint_sha256": "ab" * 32, "data": "data", "split": "val",
                   "limit": None, "val_fraction": 0.2, "split_seed": 0, "calibration_images": 512,
                   "mult_bits": 16, "batch": 1,
                   "accelerator": {"name": "test", "dataflow": "os", "clock_mhz": 200.0}},
        "versions": {"hwq": "0.1.0", "torch": "x", "brevitas": "y", "numpy": "z", "python": "3"},
        "rows": rows, "cols": cols, "array": f"{rows}x{cols}",
        "cycles": cycles, "latency_s": cycles / 200e6, "fps": 200e6 / cycles, "utilization": 0.8,
        "macs": 41_000_000, "dram_bytes": 600_000,
        "energy_per_inference_pj": 1e6 * (50 + wb * ab / 4 + acc / 8 + rows / 8),
        "clock_mhz": 200.0, "dataflow": "os", "layers": layers,
        "area_cells": 100 * wb * ab * rows * cols // 16 + 10 * acc if area else None,
        "area_luts": None, "area_flip_flops": None, "area_source": "synthetic" if area else None,
        "seconds": 1.0, "finished": "2024-01-01T00:00:00",
    }  # fmt: skip


def synthetic_rows(area: bool = True, training: bool = True) -> list[dict]:
    rows = [
        synthetic_row(wb, ab, acc, mode, r, c, area)
        for wb in (2, 4, 8)
        for ab in (4, 8)
        for acc in (12, 16, 20, 32)
        for mode in ("wrap", "saturate")
        for r, c in ARRAYS
        if acc >= wb + ab
    ]
    if training:
        for row in rows:
            if (row["wbits"], row["abits"], row["acc_bits"], row["overflow"]) == (4, 8, 16, "wrap"):
                curve = [{"evaluations": 16 * g, "best_fitness": 1000 + 7 * g} for g in range(10)]
                for g in (0, 5, 9):
                    curve[g]["val_accuracy"] = 0.8 + 0.01 * g
                row["trained"] = {
                    "budget_evals": 160, "seed": 0, "accuracy": row["accuracy"] + 0.0123, "correct": 1,
                    "n": 1000, "overflows": 5, "initial_val_accuracy": 0.8, "final_val_accuracy": 0.89,
                    "evaluations": 160, "ir_sha256": "f" * 64, "run_dir": "train/w4a8-pt-acc16-wrap-e160-s0",
                    "curve": curve,
                }  # fmt: skip
    return rows


def write_results(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rows = synthetic_rows()
    results = write_results(root / "results.jsonl", rows)
    report = build_report(results, root / "out")
    return rows, report


class Tables(HTMLParser):
    """The text of every <table id=...> cell, and the id and src of every <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.current: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.current = a.get("id")
            self.tables[self.current] = []
        elif tag == "tr" and self.current:
            self.tables[self.current].append([])
        elif tag in ("td", "th") and self.current:
            self.cell = []
        elif tag == "img":
            self.images[a["id"]] = a["src"]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.current][-1].append("".join(self.cell))
            self.cell = None
        elif tag == "table":
            self.current = None


def parse_html(path: Path) -> Tables:
    parser = Tables()
    parser.feed(path.read_text())
    return parser


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_figure_and_table_is_written_and_embedded(rendered):
    _, report = rendered
    out = report.out
    assert report.figures == list(FIGURES) and not report.missing
    assert sorted(report.tables) == sorted(TABLES)
    html = parse_html(out / "report.html")
    summary = (out / "summary.md").read_text()
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert html.images[name].startswith("data:image/png;base64,iVBOR")  # embedded, self-contained
        assert f"(figures/{name}.png)" in summary and f"(figures/{name}.svg)" in summary
    for name in TABLES:
        assert read_csv(out / "tables" / f"{name}.csv"), name
    for table in ("points", "accumulator", "accumulator_breaks", "pareto_energy", "pareto_area"):
        assert html.tables[table], table
    assert 'src="figures/' not in (out / "report.html").read_text()  # no external images


def same(csv_value: str, value: object) -> bool:
    if value is None:
        return csv_value == ""
    if isinstance(value, bool):
        return csv_value == str(value)
    if isinstance(value, int | float):
        return float(csv_value) == value
    return csv_value == str(value)


def test_report_numbers_equal_the_results_file(rendered):
    rows, report = rendered
    by_key = {row["key"]: row for row in rows}
    points = read_csv(report.out / "tables" / "points.csv")
    assert sorted(p["key"] for p in points) == sorted(by_key)
    for p in points:
        row = by_key[p["key"]]
        for column, value in p.items():
            expected = row.get(column)
            if column == "trained_accuracy":
                expected = row["trained"]["accuracy"] if row["trained"] else None
            elif column == "train_budget":
                expected = row["trained"]["budget_evals"] if row["trained"] else None
            assert same(value, expected), (p["key"], column, value, expected)
    html = parse_html(report.out / "report.html").tables["points"]
    header, body = html[0], html[1:]
    assert len(body) == len(rows)
    col = {name: header.index(name) for name in header}
    for cells in body:
        row = by_key[cells[col["key"]]]
        assert cells[col["accuracy"]] == f"{100 * row['accuracy']:.2f} %"
        assert cells[col["cycles"]].replace(",", "") == str(row["cycles"])
        assert cells[col["overflowed outputs"]].replace(",", "") == str(row["overflows"])
        assert abs(float(cells[col["energy uJ"]]) - row["energy_per_inference_pj"] / 1e6) <= 5e-4
        assert cells[col["area cells"]].replace(",", "") == str(row["area_cells"])
        trained = f"{100 * row['trained']['accuracy']:.2f} %" if row["trained"] else ""
        assert cells[col["CC-EDA"]] == trained
    ref = [r for r in rows if r["array"] == "8x8"]
    for a in read_csv(report.out / "tables" / "accumulator.csv"):
        match = [
            r for r in ref
            if (r["wbits"], r["abits"], r["acc_bits"], r["overflow"])
            == (int(a["wbits"]), int(a["abits"]), int(a["acc_bits"]), a["overflow"])
        ]  # fmt: skip
        assert len(match) == 1 and float(a["accuracy"]) == match[0]["accuracy"]
        assert int(a["overflows"]) == match[0]["overflows"]
    summary = (report.out / "summary.md").read_text()
    for row in ref:
        assert f"{100 * row['accuracy']:.2f} %" in summary
    curve = read_csv(report.out / "tables" / "training.csv")
    trained = next(r for r in rows if r["trained"])["trained"]["curve"]
    assert [int(c["best_fitness"]) for c in curve] == [p["best_fitness"] for p in trained]


def test_pareto_front_is_exactly_the_non_dominated_points(rendered):
    rows, report = rendered
    cost = "energy_per_inference_pj"
    candidates = [(r[cost], r["accuracy"]) for r in rows]
    candidates += [(r[cost], r["trained"]["accuracy"]) for r in rows if r["trained"]]
    front = {
        (float(p[cost]), float(p["accuracy"])) for p in read_csv(report.out / "tables" / "pareto_energy.csv")
    }
    dominated = {
        (c, a) for c, a in candidates
        if any((c2 <= c and a2 >= a) and (c2, a2) != (c, a) for c2, a2 in candidates)
    }  # fmt: skip
    assert front == set(candidates) - dominated
    assert pareto_front([], cost) == []


def test_report_without_area_or_training_says_so(tmp_path):
    results = write_results(tmp_path / "results.jsonl", synthetic_rows(area=False, training=False))
    report = build_report(tmp_path, tmp_path / "out")  # a sweep directory works as well as the file
    assert set(report.missing) >= {"accuracy_vs_area", "training_curve", "pareto_area", "training"}
    assert "accuracy_vs_area" not in report.figures and results.exists()
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("no area data") >= 2 and "no CC-EDA training" in page
    assert "no area data" in (tmp_path / "out" / "summary.md").read_text()


def test_truncated_last_line_is_ignored_and_a_bad_middle_line_is_refused(tmp_path):
    rows = synthetic_rows(training=False)[:3]
    path = write_results(tmp_path / "results.jsonl", rows)
    with open(path, "a") as f:
        f.write(json.dumps(rows[0])[:40])  # a write cut short by a kill
    assert [r["key"] for r in read_results(path)] == [r["key"] for r in rows]
    path.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(HwqError, match="line 2"):
        read_results(path)


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bad_input_is_one_line(tmp_path, capsys):
    one_line_error(
        capsys, ["report", "--results", str(tmp_path / "none"), "--out", str(tmp_path)], "no results"
    )
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(
        capsys, ["report", "--results", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path)], "no fin"
    )
    sweep = ["sweep", "--checkpoint", "x.th", "--out", str(tmp_path / "s")]
    one_line_error(capsys, [*sweep, "--wbits", "4,x"], "--wbits '4,x' is not a list of integers")
    one_line_error(capsys, [*sweep, "--acc-bits", "12-x"], "--acc-bits")
    one_line_error(capsys, [*sweep, "--acc-bits", "4"], "out of range")
    one_line_error(capsys, [*sweep, "--overflow", "clip"], "--overflow 'clip'")
    one_line_error(capsys, [*sweep, "--arrays", "8by8"], "--arrays '8by8'")
    one_line_error(capsys, [*sweep, "--area", str(tmp_path / "none.csv")], "cannot read area file")
    one_line_error(capsys, sweep, "checkpoint x.th does not exist")
    assert not (tmp_path / "s" / "results.jsonl").exists()


def test_training_curves_of_run_directories(tmp_path, capsys):
    run = tmp_path / "w3"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"wbits": 3, "abits": 8, "per_channel": True}))
    log = [{"generation": g, "evaluations": 16 * g, "best_fitness": 100 + g} for g in range(6)]
    for g, accuracy in ((0, 0.75), (5, 0.8125)):
        log[g]["val_accuracy"] = accuracy
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    out = tmp_path / "curves"
    assert main(["report", "--train-runs", str(run), "--out", str(out)]) == 0
    assert (out / "figures" / "training_curve.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "tables" / "training.csv") as f:
        table = list(csv.DictReader(f))
    assert {row["run"] for row in table} == {"W3A8 per-channel (w3)"}
    assert [int(row["evaluations"]) for row in table] == [e["evaluations"] for e in log]
    assert [row["val_accuracy"] for row in table if row["val_accuracy"]] == ["0.75", "0.8125"]
    assert main(["report", "--train-runs", str(tmp_path), "--out", str(out)]) == 2
    assert "not an hwq train run directory" in capsys.readouterr().err


def method_row(wb: int, acc: int, method: str, accuracy: float | None, wall_s: float | None, **kw) -> dict:
    """A row shaped like hwq.studies.methods', for one method at one point."""
    return {
        "key": f"w{wb}a8-pt-acc{acc}-wrap-{method}", "method": method, "wbits": wb, "abits": 8,
        "per_channel": False, "acc_bits": acc, "overflow": "wrap",
        "status": "failed" if accuracy is None else "ok", "error": "boom" if accuracy is None else None,
        "accuracy": accuracy, "correct": None, "n": 932, "wall_s": wall_s, "notes": kw.pop("notes", []),
        "budget": "ptq", "seed": 0, "run_dir": f"baselines/{method}", **kw,
    }  # fmt: skip


def test_method_comparison_shows_every_methods_number_time_and_failure(tmp_path):
    methods = [
        method_row(4, 12, "rtn", 0.102, 0.1),
        method_row(4, 12, "gptq", 0.4521, 290.0),
        method_row(4, 12, "a2q", None, None),
        method_row(4, 12, "qat", 0.8811, 600.0, notes=["brevitas warned: something"]),
        method_row(4, 12, "cc-eda", 0.9034, 600.0),
        method_row(4, 12, "cc-eda-best", 0.9212, 600.0, init_method="qat", init_wall_s=600.0),
        method_row(4, 32, "rtn", 0.9099, 0.1),
    ]
    write_results(tmp_path / "results.jsonl", synthetic_rows(training=False) + methods)
    report = build_report(tmp_path, tmp_path / "out")
    assert "method_comparison" in report.figures and "comparison" in report.tables
    assert (tmp_path / "out" / "figures" / "method_comparison.png").read_bytes().startswith(b"\x89PNG")
    table = read_csv(tmp_path / "out" / "tables" / "comparison.csv")
    assert [(t["point"], t["method"]) for t in table] == [
        ("W4A8 per-tensor, 32-bit wrap", "rtn"),
        *(
            ("W4A8 per-tensor, 12-bit wrap", m)
            for m in ("rtn", "gptq", "qat", "a2q", "cc-eda", "cc-eda-best")
        ),
    ]
    by_key = {(r["acc_bits"], r["method"]): r for r in methods}
    for t in table:
        assert same(t["accuracy"], by_key[(int(t["acc_bits"]), t["method"])]["accuracy"])
    html = parse_html(tmp_path / "out" / "report.html")
    header, *body = html.tables["comparison"]
    assert header == [
        "point",
        "RTN",
        "GPTQ",
        "QAT (STE)",
        "A2Q",
        "CC-EDA from RTN",
        "CC-EDA from the best baseline",
    ]
    narrow = dict(zip(header, next(b for b in body if b[0].startswith("W4A8 per-tensor, 12")), strict=True))
    assert narrow["GPTQ"] == "45.21 % (4.8 min)" and narrow["A2Q"] == "failed: boom"
    assert narrow["CC-EDA from the best baseline"] == "92.12 % (10.0 min after QAT (STE), 10.0 min)"
    wide = dict(zip(header, next(b for b in body if b[0].startswith("W4A8 per-tensor, 32")), strict=True))
    assert wide["RTN"] == "90.99 % (0.0 min)" and wide["GPTQ"] == "not run"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "QAT (STE): brevitas warned: something" in summary and "(figures/method_comparison.png)" in summary
    points = read_csv(tmp_path / "out" / "tables" / "points.csv")
    assert len(points) == len(synthetic_rows(training=False))  # method rows stay out of the grid's tables
