"""A whole network on the RTL: one image through every layer, each layer fed the RTL's own outputs.

Every convolution (the classifier included: a 1x1 convolution on a 1x1 map) runs on the MAC
tile of the chosen dataflow, its operands built (docs/datapath.md, Conv2d: im2col rows
with zero-point padding, acc_init, the residual operand) from the tensors the RTL itself
produced for the layers before it. The global average pool is the one op that does not
run on the array (the timing model gives it to the output stage's adders, which the RTL
does not have): it runs in software, with accel_sim's own op, on the RTL's tensor.

Each layer's output tensor is compared with the one accel_sim computes for the same image
on its own, element by element; the run stops at the first layer that differs, since the
layers after it would be fed different inputs. The RTL's cycles per layer (its tiles back
to back, first operand to last accumulator) are compared with the timing model's compute
cycles for the same array; docs/timing.md explains the two things the RTL's count leaves
out (memory stalls, the requantization drain).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from accel_sim.functional import FunctionalSim
from accel_sim.ir import Conv2d, Op, Program
from accel_sim.timing import conv_gemm, map_gemm

from .cosim import first_mismatch, layer_gemm, run_gemm
from .sim import DEFAULT_BUILD_ROOT, ArrayConfig


@dataclass
class LayerRun:
    """One op of the network: where it ran, whether its output equals accel_sim's, and cycles."""

    name: str
    engine: str  # "rtl" or "software"
    shape: tuple[int, ...]
    mismatch: str | None
    config: ArrayConfig | None  # the RTL build (None in software)
    tiles: int = 0
    rtl_cycles: int = 0  # tiles back to back, first operand to the last accumulator leaving the array
    model_cycles: int = 0  # accel_sim.timing's compute cycles for the layer on the same array
    requant_latency: int = 0  # cycles from the last accumulator to its requantized output
    wall_s: float = 0.0

    @property
    def match(self) -> bool:
        return self.mismatch is None

    @property
    def cycles_match(self) -> bool:
        return self.rtl_cycles == self.model_cycles

    def to_json(self) -> dict:
        fields = ("name", "engine", "match", "mismatch", "tiles", "rtl_cycles", "model_cycles")
        extra = {"cycles_match": self.cycles_match, "requant_latency": self.requant_latency}
        build = {"build": self.config.name if self.config else None, "shape": list(self.shape)}
        return {f: getattr(self, f) for f in fields} | extra | build | {"wall_s": round(self.wall_s, 3)}


@dataclass
class NetworkRun:
    """The whole run: every layer that ran, and both sets of integer logits."""

    layers: list[LayerRun]
    skipped: list[str]  # ops after the first layer that differed
    rtl_logits: np.ndarray | None  # None when the run stopped before the last op
    sim_logits: np.ndarray

    @property
    def match(self) -> bool:
        return all(layer.match for layer in self.layers)  # the run stops at the first that differs

    @property
    def cycles_match(self) -> bool:
        return all(layer.cycles_match for layer in self.layers if layer.engine == "rtl")

    @property
    def rtl_cycles(self) -> int:
        return sum(layer.rtl_cycles for layer in self.layers)

    @property
    def model_cycles(self) -> int:
        return sum(layer.model_cycles for layer in self.layers)


def tensor_mismatch(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    """The first element where two (1, C, H, W) tensors differ: position and both values."""
    bad = np.argwhere(got != want)
    if not len(bad):
        return None
    image, channel, y, x = (int(i) for i in bad[0])
    return (
        f"{name}: output mismatch at (image {image}, channel {channel}, y {y}, x {x}): "
        f"RTL run {int(got[image, channel, y, x])}, accel_sim {int(want[image, channel, y, x])} "
        f"({len(bad)} of {got.size} elements differ)"
    )


def conv_on_rtl(
    program: Program,
    op: Conv2d,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    rows: int,
    cols: int,
    dataflow: str,
    simulator: str,
    build_root: Path,
) -> LayerRun:
    """Run conv `op` on the RTL from the RTL's own input tensors; store its output in `tensors`."""
    start = time.perf_counter()
    gemm = layer_gemm(program, op, tensors, expected)
    config = gemm.config(rows, cols, dataflow)
    result = run_gemm(gemm, rows, cols, simulator, build_root, dataflow)
    images, channels, h, w = gemm.out_shape
    tensors[op.output] = torch.as_tensor(result.y.reshape(images, h, w, channels).transpose(0, 3, 1, 2))
    mapping = map_gemm(conv_gemm(program, op, images), rows, cols, dataflow)
    return LayerRun(
        name=op.name,
        engine="rtl",
        shape=gemm.out_shape,
        mismatch=first_mismatch(gemm, result, config),
        config=config,
        tiles=len(result.acc_cycles),
        rtl_cycles=sum(result.acc_cycles),
        model_cycles=mapping.compute_cycles,
        requant_latency=result.y_cycles[-1] - result.acc_cycles[-1],
        wall_s=time.perf_counter() - start,
    )


def op_in_software(
    sim: FunctionalSim,
    index: int,
    op: Op,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
) -> LayerRun:
    """Run op `index` with accel_sim's own implementation, on the RTL's tensors."""
    start = time.perf_counter()
    env = {name: sim.to_carrier(name, t) for name, t in tensors.items()}
    sim.execute(env, index, index + 1)
    out = env[op.output].to(torch.int64).contiguous()
    tensors[op.output] = out
    return LayerRun(
        name=op.name,
        engine="software",
        shape=tuple(out.shape),
        mismatch=tensor_mismatch(op.name, out.numpy(), expected[op.output].numpy()),
        config=None,
        wall_s=time.perf_counter() - start,
    )


def layer_steps(program: Program, progress: bool) -> Iterable[tuple[int, Op]]:
    """The ops in order, with a progress bar (on a terminal) naming the layer that runs."""
    bar = tqdm(list(enumerate(program.ops)), unit="layer", disable=None if progress else True)
    for index, op in bar:
        bar.set_postfix_str(op.name)
        yield index, op


def run_network(
    program: Program,
    image: torch.Tensor,
    rows: int,
    cols: int,
    dataflow: str = "os",
    simulator: str = "verilator",
    build_root: Path = DEFAULT_BUILD_ROOT,
    progress: bool = True,
) -> NetworkRun:
    """Every op of `program` on one image (1, C, H, W), the RTL's outputs feeding the next layer."""
    sim = FunctionalSim(program)
    expected = sim.run(image, record=True).activations
    tensors = {program.input: expected[program.input]}
    layers: list[LayerRun] = []
    for index, op in layer_steps(program, progress):
        if isinstance(op, Conv2d):
            run = conv_on_rtl(program, op, tensors, expected, rows, cols, dataflow, simulator, build_root)
        else:
            run = op_in_software(sim, index, op, tensors, expected)
        layers.append(run)
        if not run.match:
            break
    skipped = [op.name for op in program.ops[len(layers) :]]
    rtl_logits = None if skipped else tensors[program.output].reshape(len(image), -1).numpy()
    return NetworkRun(layers, skipped, rtl_logits, expected[program.output].reshape(len(image), -1).numpy())
