"""The exported model, run by qonnx's own executor, against accel_sim on the same images.

Equality is checked on every logit and on every activation tensor of the program (the
exported graph names them after the IR's tensors), so a difference is located to its
first layer, not just seen at the output.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.change_batchsize import ChangeBatchSize
from qonnx.transformation.infer_shapes import InferShapes

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Program

CHECK_BATCH = 16


@dataclass
class ExportCheck:
    """Result of running both sides on the same images."""

    images: int = 0
    logits_compared: int = 0
    mismatches: int = 0
    top1_agreement: int = 0
    max_difference: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.images} images, {self.logits_compared:,} logits compared, {self.mismatches} mismatches"

    def to_json(self) -> dict:
        return {
            "images": self.images,
            "logits_compared": self.logits_compared,
            "mismatches": self.mismatches,
            "top1_agreement": self.top1_agreement / max(self.images, 1),
            "max_difference": self.max_difference,
        }


def with_batch(model: ModelWrapper, batch: int) -> ModelWrapper:
    """A copy of the (batch-1) model for `batch` images at once."""
    resized = ModelWrapper(copy.deepcopy(model.model))
    return resized.transform(ChangeBatchSize(batch)).transform(InferShapes())


@contextmanager
def unsanitized() -> Iterator[None]:
    """qonnx's executor by default rounds every tensor annotated as integer after each
    node, which would hide a float op that is not exact; the check runs without it, so
    every value compared is what the graph's ops computed."""
    old = os.environ.get("SANITIZE_QUANT_TENSORS")
    os.environ["SANITIZE_QUANT_TENSORS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SANITIZE_QUANT_TENSORS"]
        else:
            os.environ["SANITIZE_QUANT_TENSORS"] = old


def run_qonnx(model: ModelWrapper, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the exported graph for a batch of uint8 images (qonnx's executor)."""
    inp = model.graph.input[0].name
    with unsanitized():
        return execute_onnx(model, {inp: images.astype(np.float32)}, return_full_exec_context=True)


def check_against_accel_sim(
    model: ModelWrapper, program: Program, images: torch.Tensor, batch_size: int = CHECK_BATCH
) -> ExportCheck:
    """Run `model` with qonnx and `program` on accel_sim; compare the logits, and every
    activation the graph still names after the program's tensors (all of them as exported;
    none after a renaming pass such as qonnx's cleanup)."""
    sim = FunctionalSim(program)
    out_name = model.graph.output[0].name
    named = set(model.get_all_tensor_names())
    resized: dict[int, ModelWrapper] = {}
    compared = [
        name for name in program.tensors if name in named and name not in (program.input, program.output)
    ]
    result = ExportCheck(max_difference={name: 0 for name in [*compared, program.output]})
    for batch in torch.as_tensor(images).split(batch_size):
        n = len(batch)
        if n not in resized:
            resized[n] = with_batch(model, n)
        tensors = run_qonnx(resized[n], batch.numpy())
        ref = sim.run(batch, record=True)
        theirs = tensors[out_name].reshape(n, -1).astype(np.int64)
        ours = ref.logits.numpy()
        result.images += n
        result.logits_compared += ours.size
        result.mismatches += int((theirs != ours).sum())
        result.top1_agreement += int((theirs.argmax(1) == ours.argmax(1)).sum())
        for name in result.max_difference:
            exported = tensors[name if name != program.output else out_name].astype(np.int64)
            diff = np.abs(exported.reshape(n, -1) - ref.activations[name].numpy().reshape(n, -1))
            result.max_difference[name] = max(result.max_difference[name], int(diff.max()))
    return result
