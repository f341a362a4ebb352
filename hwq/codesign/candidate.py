"""The accuracy of one design on accel_sim: a cheap screen, then CC-EDA for the promising.

`screen` lowers the network at the design's widths (round-to-nearest, or GPTQ/GPFQ with
`search.start`), gives it the design's accumulator and measures it on the val split, bit
for bit as the accelerator computes it. `finetune` runs `hwq train` on it for the
per-candidate budget, starting from the nearest design already trained: its integer
weights are copied into every layer whose width matches (same width, same scales: the
same integers mean the same weights), the rest come from the design's own start. Both
write their program into the candidate's directory, and both can be repeated after a
kill: a finished step is read back, an interrupted training run resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from accel_sim.ir import Accumulator, Conv2d, Program, load_program, save_program

from ..data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, load_split
from ..flags import accumulator_fit
from ..quant import DEFAULT_CALIBRATION_IMAGES
from ..quant.evaluate import evaluate_program, prepare
from ..quant.model import QuantConfig
from .space import Design

if TYPE_CHECKING:
    from ..search.train import TrainConfig

START_IR = "start.ir"
FINAL_IR = "final.ir"


@dataclass(frozen=True)
class Settings:
    """What every candidate of a run shares; a worker is built from this alone."""

    checkpoint: str
    data: str | None
    out: str
    per_channel: bool
    start: str
    finetune_evals: int
    fitness_images: int
    seed: int
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    fit_accumulator: float | None = None  # quantile of measured sums fitted to each design's accumulator
    overflow_penalty: int = 0  # the fine-tune's fitness points per overflowed output (hwq train's)
    weight_range: str = "narrow"  # Brevitas' narrow_range for every design (--weight-range)

    def start_key(self, design: Design) -> str:
        """Designs with one key share one start: one per precision, or, with the fit, one per
        precision and accumulator width (the fit sets the activation scales for that width)."""
        if self.fit_accumulator is None:
            return design.precision_key
        return f"{design.precision_key}-fit{self.fit_accumulator:g}-acc{design.acc_bits}"

    def start_accumulator(self, design: Design) -> Accumulator | None:
        """The accumulator a start is made for: the design's under the fit; otherwise none
        (the lowering's 32 bits: one start serves every width, `screen` sets the design's)."""
        return None if self.fit_accumulator is None else Accumulator(design.acc_bits, design.overflow)


def quant_config(design: Design, per_channel: bool, weight_range: str) -> QuantConfig:
    return QuantConfig(
        max(design.layer_wbits),
        design.act_bits,
        per_channel,
        layer_wbits=design.layer_wbits,
        weight_range=weight_range,
    )


def start_dir(out: Path, key: str) -> Path:
    """Where a PTQ start is kept (shared by every design of its `Settings.start_key`)."""
    return out / "ptq" / hashlib.sha256(key.encode()).hexdigest()[:12]


def accumulator_settings(accumulator: Accumulator | None) -> dict:
    if accumulator is None:
        return {}
    return {"accumulator_bits": accumulator.bits, "overflow": accumulator.overflow}


def weight_scale_growth(program: Program, op: Conv2d) -> float:
    """How much `--fit-accumulator` grew the op's weight scale: it grows the stem's weight
    scale (its input, the image, has no scale to grow) and every other layer's input scale."""
    if op.input != program.input:
        return 1.0
    return program.meta.get("accumulator_fit", {}).get("sums_divided_by", {}).get(op.name, 1.0)


def copy_matching_weights(own: Program, donor: Program) -> tuple[Program, int]:
    """`own` with the donor's integer weights in every layer of the same width and weight
    scale; returns the program and how many weights were copied."""
    theirs = {op.name: op for op in donor.conv_ops()}
    taken = {
        op.name: theirs[op.name].weight
        for op in own.conv_ops()
        if op.name in theirs
        and theirs[op.name].weight_bits == op.weight_bits
        and theirs[op.name].weight.shape == op.weight.shape
        and weight_scale_growth(donor, theirs[op.name]) == weight_scale_growth(own, op)
    }
    return (own.with_weights(taken) if taken else own), int(sum(w.size for w in taken.values()))


class CandidateEvaluator:
    """Scores designs; holds the val split and the lowered networks of recent precisions."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.val = load_split(settings.data, "val", settings.val_fraction, settings.split_seed)
        self.lowered: dict[str, Program] = {}

    def start_program(self, design: Design) -> Program:
        """The design's network before any search (its accumulator is set by `screen`)."""
        key = self.settings.start_key(design)
        if key not in self.lowered:
            self.lowered = {key: self.lower(design)}  # one precision at a time: they are large
        return self.lowered[key]

    def lower(self, design: Design) -> Program:
        s = self.settings
        if s.start == "rtn":
            return prepare(
                s.checkpoint,
                quant_config(design, s.per_channel, s.weight_range),
                s.data,
                s.calibration_images,
                s.val_fraction,
                s.split_seed,
                s.start_accumulator(design),
                fit=accumulator_fit(s.fit_accumulator, s.start_accumulator(design)),
            ).program
        return self.ptq_program(design)

    def ptq_program(self, design: Design) -> Program:
        from ..baselines.run import BaselineConfig, run_baseline

        s = self.settings
        out = start_dir(Path(s.out), s.start_key(design))
        final = out / "final.ir"
        if not (out / "summary.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            run_baseline(
                BaselineConfig(
                    method=s.start,
                    checkpoint=s.checkpoint,
                    out=str(out),
                    wbits=max(design.layer_wbits),
                    abits=design.act_bits,
                    data=s.data,
                    per_channel=s.per_channel,
                    layer_wbits=design.layer_wbits,
                    weight_range=s.weight_range,
                    **accumulator_settings(s.start_accumulator(design)),
                    seed=s.seed,
                    calibration_images=s.calibration_images,
                    fit_accumulator=s.fit_accumulator,
                    val_fraction=s.val_fraction,
                    split_seed=s.split_seed,
                )
            )
        return load_program(final)

    def accuracy(self, program: Program) -> dict:
        result = evaluate_program(program, self.val)
        return {
            "accuracy": result.accuracy,
            "correct": result.correct,
            "images": result.n,
            "overflows": int(sum(s.overflows for s in result.layers.values())),
        }

    def screen(self, design: Design, directory: str) -> dict:
        """Val accuracy of the design's start on its accumulator."""
        where = Path(directory)
        where.mkdir(parents=True, exist_ok=True)
        program = self.start_program(design).with_accumulator(Accumulator(design.acc_bits, design.overflow))
        save_program(program, where / START_IR)
        return {**self.accuracy(program), "ir": str(where / START_IR)}

    def finetune(self, design: Design, directory: str, start_ir: str, donor_ir: str | None) -> dict:
        """CC-EDA for the per-candidate budget from the warm start (the screened `start_ir`,
        which may be a twin's, with the donor's weights where they fit); the val split picks
        the better of the start and the trained program (model selection, as `hwq train`'s
        best_val.ir)."""
        from ..search.train import TrainConfig

        s, where = self.settings, Path(directory)
        where.mkdir(parents=True, exist_ok=True)
        start = load_program(start_ir)
        copied = 0
        if donor_ir is not None:
            start, copied = copy_matching_weights(start, load_program(donor_ir))
        warm = where / "warm.ir"
        save_program(start, warm)
        run_dir = where / "train"
        cfg = TrainConfig(
            checkpoint=s.checkpoint,
            out=str(run_dir),
            wbits=max(design.layer_wbits),
            abits=design.act_bits,
            data=s.data,
            per_channel=s.per_channel,
            layer_wbits=design.layer_wbits,
            weight_range=s.weight_range,
            accumulator_bits=design.acc_bits,
            overflow=design.overflow,
            seed=s.seed,
            budget_evals=s.finetune_evals,
            fitness_images=s.fitness_images,
            confirm_images=0,
            eval_every=1 << 30,  # the val split is read twice: at the start and the end
            init_ir=str(warm),
            fit_accumulator=s.fit_accumulator,
            overflow_penalty=s.overflow_penalty,
            val_fraction=s.val_fraction,
            split_seed=s.split_seed,
            calibration_images=s.calibration_images,
            progress=False,
        )
        summary = train_summary(cfg)
        trained = summary["final_val_accuracy"] >= summary["initial_val_accuracy"]
        chosen = load_program(run_dir / "final.ir") if trained else start
        save_program(chosen, where / FINAL_IR)
        figures = self.accuracy(chosen)
        return {
            **figures,
            "ir": str(where / FINAL_IR),
            "warm_start": donor_ir,
            "weights_copied": copied,
            "warm_accuracy": summary["initial_val_accuracy"],
            "trained_accuracy": summary["final_val_accuracy"],
            "evaluations": summary["evaluations"],
        }


def train_summary(cfg: TrainConfig) -> dict:
    """Run, resume or read back a candidate's training run."""
    from ..search.train import train

    run_dir = Path(cfg.out)
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("complete"):
            return summary
    if (run_dir / "state.npz").exists():
        return train(cfg, resume=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return train(cfg)


def nearest_trained(design: Design, trained: list[tuple[Design, str, float]]) -> str | None:
    """The IR of the trained design that shares the most weight-layer widths with `design`
    (then the closest accumulator, then the more accurate, then the earlier): the one whose
    weights transfer most. None when nothing was trained or nothing matches."""
    best, best_key = None, None
    for order, (other, ir, accuracy) in enumerate(trained):
        shared = int(np.sum(np.array(other.layer_wbits) == np.array(design.layer_wbits)))
        if shared == 0:
            continue
        key = (-shared, abs(other.acc_bits - design.acc_bits), -accuracy, order)
        if best_key is None or key < best_key:
            best, best_key = ir, key
    return best
