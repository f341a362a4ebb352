"""Accuracy of one network three ways: float, Brevitas fake-quant, and the integer program.

The three share the data pipeline (raw uint8 images), so any difference between them is
the quantization (float vs Brevitas) or the integer datapath (Brevitas vs accel_sim).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from accel_sim.functional import FunctionalSim, LayerStats
from accel_sim.ir import Accumulator, Program

from ..data import Dataset, load_split
from . import DEFAULT_BATCH, DEFAULT_CALIBRATION_IMAGES
from .accumulator_fit import AccumulatorFit, fit_accumulator
from .lower import lower
from .model import QuantConfig, ResNetCifar, calibrate, load_float_model, quantize_model


@dataclass
class ModeResult:
    predictions: torch.Tensor
    labels: torch.Tensor
    layers: dict[str, LayerStats] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> int:
        return int((self.predictions == self.labels).sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict:
        out = {"accuracy": self.accuracy, "n": self.n, "correct": self.correct}
        if self.layers:
            out["overflows"] = {name: s.overflows for name, s in self.layers.items()}
            out["layers"] = [
                {
                    "name": s.name,
                    "arithmetic": s.arithmetic,
                    "worst_case_acc_bits": s.worst_case_bits,
                    "overflows": s.overflows,
                    "accumulator_outputs": s.outputs,
                }
                for s in self.layers.values()
            ]
        return out


def batches(ds: Dataset, batch_size: int, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches with a progress bar (shown on a terminal only)."""
    starts = range(0, len(ds), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=None, leave=False):
        yield ds.images[s : s + batch_size], ds.labels[s : s + batch_size]


def predict(
    forward: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, batch_size: int, desc: str
) -> ModeResult:
    preds = []
    with torch.no_grad():
        for x, _ in batches(ds, batch_size, desc):
            preds.append(forward(x).argmax(1))
    return ModeResult(torch.cat(preds) if preds else torch.empty(0, dtype=torch.long), ds.labels)


def evaluate_model(
    model: nn.Module, ds: Dataset, batch_size: int = DEFAULT_BATCH, desc: str = "float"
) -> ModeResult:
    return predict(model, ds, batch_size, desc)


def add_layer_counts(total: dict[str, LayerStats], batch: dict[str, LayerStats]) -> None:
    for name, stats in batch.items():
        if name in total:
            total[name].overflows += stats.overflows
            total[name].outputs += stats.outputs
        else:
            total[name] = stats


def evaluate_program(
    program: Program, ds: Dataset, batch_size: int = DEFAULT_BATCH, device: str = "cpu"
) -> ModeResult:
    """Accuracy on accel_sim, with overflow counts summed over the whole set."""
    sim = FunctionalSim(program, device=device)
    preds: list[torch.Tensor] = []
    layers: dict[str, LayerStats] = {}
    for x, _ in batches(ds, batch_size, "accel_sim"):
        result = sim.run(x)
        preds.append(result.logits.argmax(1).cpu())
        add_layer_counts(layers, result.layers)
    if not layers:
        layers = sim.layer_stats()
    result = ModeResult(torch.cat(preds) if preds else torch.empty(0, dtype=torch.long), ds.labels, layers)
    return result


def brevitas_activations(
    qmodel: ResNetCifar, program: Program, images: torch.Tensor
) -> dict[str, np.ndarray]:
    """Brevitas' activations in integer units of the IR tensor they correspond to."""
    sources = program.meta.get("sources", {})
    captured: dict[str, torch.Tensor] = {}
    modules = dict(qmodel.named_modules())
    hooks = []
    for tensor, module in sources.items():

        def hook(_m, _inp, out, tensor=tensor):
            captured[tensor] = out.value if hasattr(out, "value") else out

        hooks.append(modules[module].register_forward_hook(hook))
    try:
        with torch.no_grad():
            captured[program.output] = qmodel(images)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, value in captured.items():
        spec = program.tensors[name]
        ints = value.double() / spec.scale
        out[name] = ints.reshape(len(images), *spec.shape).numpy()
    return out


def layer_lsb_differences(
    qmodel: ResNetCifar, program: Program, images: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Largest |accel_sim - Brevitas| per tensor, in LSBs of that tensor.

    `local`: each op run on Brevitas' own input activations, so only that op's datapath
    differs (rounding of multipliers and ties); `end_to_end`: from the image, so earlier
    differences propagate.
    """
    sim = FunctionalSim(program)
    end_to_end = sim.run(images, record=True).activations
    brevitas = brevitas_activations(qmodel, program, images)
    brevitas_ints = {name: torch.from_numpy(np.rint(v)).to(torch.int64) for name, v in brevitas.items()}
    brevitas_ints[program.input] = images.to(torch.int64)
    diffs: dict[str, dict[str, float]] = {"local": {}, "end_to_end": {}}
    for index, op in enumerate(program.ops):
        if op.output not in brevitas:
            continue
        want = np.rint(brevitas[op.output])
        inputs = [op.input] + ([op.requant.residual.input] if op.requant.residual else [])
        env = {name: sim.to_carrier(name, brevitas_ints[name]) for name in inputs}
        sim.execute(env, index, index + 1)
        local = env[op.output].double().reshape(want.shape).numpy()
        diffs["local"][op.output] = float(np.max(np.abs(local - want)))
        e2e = end_to_end[op.output].double().reshape(want.shape).numpy()
        diffs["end_to_end"][op.output] = float(np.max(np.abs(e2e - want)))
    return diffs


@dataclass
class Prepared:
    float_model: ResNetCifar
    qmodel: ResNetCifar
    program: Program


def prepare(
    checkpoint: str,
    cfg: QuantConfig,
    data: str | None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    accumulator: Accumulator | None = None,
    mult_bits: int = 16,
    fit: AccumulatorFit | None = None,
) -> Prepared:
    """Load a float checkpoint, quantize and calibrate it, and lower it to an IR program;
    with `fit`, calibrated for the measured sums to fit that accumulator (accumulator_fit)."""
    cfg.validate()
    float_model = load_float_model(checkpoint)
    calib = load_split(data, "train", val_fraction, split_seed).images[:calibration_images]
    qmodel = quantize_model(float_model, cfg)
    calibrate(qmodel, calib)
    ratios = None if fit is None else fit_accumulator(qmodel, cfg, calib, fit, mult_bits)
    program = lower(qmodel, cfg, accumulator=accumulator, mult_bits=mult_bits)
    if fit is not None:
        program.meta["accumulator_fit"] = {
            "bits": fit.accumulator.bits,
            "quantile": fit.quantile,
            "sums_divided_by": {name: round(r, 4) for name, r in ratios.items()},
        }
    program.meta["checkpoint_sha256"] = float_model.checkpoint_sha256
    program.meta["calibration"] = {
        "split": "train",
        "images": len(calib),
        "split_seed": split_seed,
        "val_fraction": val_fraction,
    }
    return Prepared(float_model, qmodel, program)
