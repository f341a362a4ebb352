"""One baseline run: its configuration, its run directory, and what it records.

A run quantizes the float checkpoint exactly as `hwq train` and `hwq eval` do (Brevitas,
activations calibrated on the first `calibration_images` training images), applies one
method to the Brevitas model, lowers the result with `hwq.quant.lower.lower` and measures
it on the `val` split twice: on accel_sim (the number reported) and as Brevitas
fake-quant, with their top-1 agreement. The directory holds `final.ir`, `summary.json`
and `log.jsonl` (one line per layer for the post-training methods, per epoch for the
training ones). A run killed before `summary.json` is written starts again from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from accel_sim.ir import Accumulator, Program, save_program

from .. import HwqError, __version__
from ..data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, Dataset, load_split
from ..flags import accumulator_fit
from ..quant import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MULT_BITS
from ..quant.evaluate import ModeResult, Prepared, evaluate_model, evaluate_program, prepare
from ..quant.lower import lower
from ..quant.model import QuantConfig, ResNetCifar
from ..results import write_json
from . import A2Q_METHODS, DEFAULT_LEARNED_ROUND_ITERS, METHODS, OPTIMIZERS, QAT_METHODS, QAT_STARTS

SUMMARY_FILE = "summary.json"
LOG_FILE = "log.jsonl"


@dataclass
class BaselineConfig:
    """Everything that defines a baseline run; unset recipe values take the method's
    defaults (docs/baselines.md), and the summary records the values used."""

    method: str
    checkpoint: str
    out: str
    wbits: int
    abits: int
    data: str | None = None
    per_channel: bool = False
    first_wbits: int | None = None
    last_wbits: int | None = None
    layer_wbits: tuple[int, ...] | None = None  # every weight layer's width (hwq codesign)
    weight_range: str = "narrow"
    accumulator_bits: int = 32
    overflow: str = "wrap"
    mult_bits: int = DEFAULT_MULT_BITS
    hw: str | None = None  # the accelerator TOML the widths and accumulator came from
    seed: int = 0
    epochs: int | None = None
    budget_minutes: float | None = None
    iters: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    start: str = "rtn"  # qat: the post-training method whose program it fine-tunes
    optimizer: str = "sgd"
    distill: bool = False  # train on the float network's logits instead of the labels
    mixup: float | None = None  # alpha of the Beta(alpha, alpha) mixing weight of image pairs
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    fit_accumulator: float | None = None  # quantile of measured sums fitted to the accumulator
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED

    def quant(self) -> QuantConfig:
        return QuantConfig.of(self)

    def accumulator(self) -> Accumulator:
        return Accumulator(self.accumulator_bits, self.overflow)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise HwqError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        self.quant().validate()
        self.accumulator().validate()
        trains = self.method in QAT_METHODS
        if trains and (self.epochs is None) == (self.budget_minutes is None):
            raise HwqError(f"--method {self.method} needs exactly one of --epochs or --budget-minutes")
        if not trains and (self.epochs is not None or self.budget_minutes is not None):
            hint = " (its budget is --iters per layer)" if self.method == "learned-round" else ""
            raise HwqError(
                f"--epochs and --budget-minutes apply to {', '.join(QAT_METHODS)}, not {self.method}{hint}"
            )
        self.validate_training_options(trains)
        if self.iters is not None and self.method != "learned-round":
            raise HwqError("--iters applies to --method learned-round only")
        tunes = trains or self.method == "learned-round"
        for name in ("lr", "batch_size", "weight_decay"):
            if getattr(self, name) is not None and not tunes:
                raise HwqError(f"--{name.replace('_', '-')} does not apply to --method {self.method}")
        for name in ("epochs", "iters", "batch_size", "calibration_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HwqError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("budget_minutes", "lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise HwqError(f"--{name.replace('_', '-')} must be positive")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise HwqError("--weight-decay must not be negative")

    def validate_training_options(self, trains: bool) -> None:
        if self.start not in QAT_STARTS:
            raise HwqError(f"--start {self.start!r} is not one of {', '.join(QAT_STARTS)}")
        if self.optimizer not in OPTIMIZERS:
            raise HwqError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.weight_range != "narrow" and self.method in A2Q_METHODS:
            raise HwqError(
                f"--weight-range full does not apply to --method {self.method}: "
                "A2Q's weight quantizers are narrow-range"
            )
        if self.start != "rtn" and self.method != "qat":
            raise HwqError(f"--start applies to --method qat, not {self.method} (A2Q starts from EP-init)")
        if not trains and (self.distill or self.optimizer != "sgd" or self.mixup is not None):
            raise HwqError(
                f"--distill, --mixup and --optimizer apply to {', '.join(QAT_METHODS)}, not {self.method}"
            )
        if self.mixup is not None and not (math.isfinite(self.mixup) and self.mixup > 0):
            raise HwqError(f"--mixup must be a positive alpha (got {self.mixup})")

    @property
    def learned_round_iters(self) -> int:
        return self.iters or DEFAULT_LEARNED_ROUND_ITERS

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class MethodContext:
    """What a method works with: the calibrated round-to-nearest Brevitas model, the float
    model, the training split, and where it writes its log, recipe and notes."""

    cfg: BaselineConfig
    prepared: Prepared
    train: Dataset
    log_path: Path
    recipe: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def calibration(self) -> torch.Tensor:
        """The images activation scales were calibrated on: the PTQ methods' data too."""
        return self.train.images[: self.cfg.calibration_images]

    def log(self, entry: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


Method = Callable[[MethodContext], ResNetCifar]


def method_function(name: str) -> Method:
    from . import ptq, qat

    functions: dict[str, Method] = {
        "rtn": ptq.round_to_nearest,
        "gptq": ptq.gptq,
        "gpfq": ptq.gpfq,
        "learned-round": ptq.learned_round,
        "qat": qat.qat,
        "a2q": qat.a2q,
        "a2q-plus": qat.a2q_plus,
    }
    return functions[name]


def check_run_dir(out: Path) -> None:
    if (out / SUMMARY_FILE).exists():
        raise HwqError(f"{out} already holds a finished baseline run; choose another --out")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_method(ctx: MethodContext) -> tuple[ResNetCifar, float]:
    """The method's final Brevitas model and the seconds it took. Library warnings (e.g.
    GPTQ skipping a layer whose Hessian it cannot invert) become notes of the run."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = method_function(ctx.cfg.method)(ctx)
    seconds = time.perf_counter() - start
    for w in caught:
        if "brevitas" in str(w.filename) and "fast_hadamard" not in str(w.message):
            ctx.note(f"brevitas warned: {w.message}")
    model.eval()
    return model, seconds


def lower_model(model: ResNetCifar, cfg: BaselineConfig) -> Program:
    with torch.no_grad():
        return lower(model, cfg.quant(), cfg.accumulator(), cfg.mult_bits)


def with_provenance(program: Program, ctx: MethodContext) -> Program:
    """The program with where it came from in its metadata (as hwq train records "training");
    no timing, so that the same run on another machine gives the same digest."""
    reference = ctx.prepared.program.meta
    training = {"method": ctx.cfg.method, "seed": ctx.cfg.seed, "recipe": ctx.recipe, "notes": ctx.notes}
    meta = {
        **program.meta,
        "checkpoint_sha256": reference["checkpoint_sha256"],
        "calibration": reference["calibration"],
        "training": training,
    }
    return dataclasses.replace(program, meta=meta)


def layer_report(result: ModeResult, accumulator: Accumulator) -> dict:
    layers = list(result.layers.values())
    return {
        "overflows": sum(s.overflows for s in layers),
        "overflows_by_layer": {s.name: s.overflows for s in layers},
        "worst_case_acc_bits": {s.name: s.worst_case_bits for s in layers},
        "layers_beyond_accumulator": [s.name for s in layers if s.worst_case_bits > accumulator.bits],
    }


def run_baseline(cfg: BaselineConfig) -> dict:
    """Run one baseline method; returns the summary written to summary.json."""
    cfg.validate()
    out = Path(cfg.out)
    check_run_dir(out)
    wall_start = time.perf_counter()
    seed_everything(cfg.seed)
    prepared = prepare(
        cfg.checkpoint,
        cfg.quant(),
        cfg.data,
        cfg.calibration_images,
        cfg.val_fraction,
        cfg.split_seed,
        cfg.accumulator(),
        cfg.mult_bits,
        accumulator_fit(cfg.fit_accumulator, cfg.accumulator()),
    )
    train = load_split(cfg.data, "train", cfg.val_fraction, cfg.split_seed)
    val = load_split(cfg.data, "val", cfg.val_fraction, cfg.split_seed)
    if len(val) == 0:
        raise HwqError("the val split is empty")
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).write_bytes(b"")  # a killed earlier attempt starts again
    ctx = MethodContext(cfg, prepared, train, out / LOG_FILE)
    model, seconds = run_method(ctx)
    program = lower_model(model, cfg)
    on_sim = evaluate_program(program, val)
    with torch.no_grad():
        on_brevitas = evaluate_model(model, val, desc="brevitas")
    report = layer_report(on_sim, program.accumulator)
    beyond = report["layers_beyond_accumulator"]
    if beyond:
        widths = report["worst_case_acc_bits"]
        widest = max(beyond, key=widths.get)
        ctx.note(
            f"{len(beyond)} of {len(widths)} layers can overflow the {program.accumulator.bits}-bit "
            f"accumulator (worst case up to {widths[widest]} bits, {widest}); "
            f"{report['overflows']} val outputs overflowed"
        )
    digest = save_program(with_provenance(program, ctx), out / "final.ir")
    summary = {
        "method": cfg.method,
        "hwq_version": __version__,
        "settings": cfg.to_json(),
        "recipe": ctx.recipe,
        "notes": ctx.notes,
        "val_accuracy": on_sim.accuracy,
        "val_correct": on_sim.correct,
        "val_images": on_sim.n,
        "brevitas_val_accuracy": on_brevitas.accuracy,
        "top1_agreement": float((on_brevitas.predictions == on_sim.predictions).float().mean()),
        "accumulator": {"bits": program.accumulator.bits, "overflow": program.accumulator.overflow},
        **report,
        "method_s": round(seconds, 1),
        "wall_s": round(time.perf_counter() - wall_start, 1),
        "final_ir": str(out / "final.ir"),
        "final_ir_sha256": digest,
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary
