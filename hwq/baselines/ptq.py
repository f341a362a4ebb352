"""Post-training baselines: round-to-nearest, GPTQ, GPFQ and learned rounding (AdaRound).

Each starts from the calibrated round-to-nearest Brevitas model that `hwq train` starts
from, keeps its weight and activation scales (they are parameters frozen at calibration),
and changes only the integer weights, using Brevitas' own implementation:
`brevitas.graph.gptq.gptq_mode`, `brevitas.graph.gpfq.gpfq_mode`, and the learned-round
quantizer `brevitas.core.function_wrapper.learned_round.LearnedRoundSte` inserted, and its
losses defined, by `brevitas_examples.common.learned_round.learned_round_method`. Their
data are the calibration images (the first `--calibration-images` of the `train` split).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from ..quant.model import ResNetCifar
from .run import MethodContext

PTQ_BATCH = 64  # images per forward pass while collecting GPTQ/GPFQ statistics
LEARNED_ROUND_LR = 1e-3  # Adam, as brevitas_examples' ptq_evaluate
LEARNED_ROUND_BATCH = 32


def round_to_nearest(ctx: MethodContext) -> ResNetCifar:
    """The starting point of every other method, and of CC-EDA."""
    ctx.recipe.update(algorithm="round to nearest (Brevitas default weight quantizer)")
    return ctx.prepared.qmodel


def run_gpxq(ctx: MethodContext, mode: Callable, **options: object) -> ResNetCifar:
    """Brevitas' GPxQ protocol: one pass over the data per layer, then `update()`, which
    quantizes that layer and moves on to the next one."""
    model = ctx.prepared.qmodel
    images = ctx.calibration
    start = time.perf_counter()
    with torch.no_grad(), mode(model, use_quant_activations=True, act_order=False, **options) as gpxq:
        for index in range(gpxq.num_layers):
            for batch in images.split(PTQ_BATCH):
                gpxq.model(batch)
            names = sorted(gpxq.current_layer.layer_names)
            gpxq.update()
            ctx.log({"step": index + 1, "layers": names, "elapsed_s": round(time.perf_counter() - start, 3)})
    ctx.recipe.update(
        images=len(images),
        batch_size=PTQ_BATCH,
        act_order=False,
        use_quant_activations=True,
        layers=gpxq.num_layers,
        **options,
    )
    return model


def gptq(ctx: MethodContext) -> ResNetCifar:
    from brevitas.graph.gptq import gptq_mode

    ctx.recipe.update(algorithm="GPTQ (brevitas.graph.gptq.gptq_mode)")
    return run_gpxq(ctx, gptq_mode, num_blocks=100)


def gpfq(ctx: MethodContext) -> ResNetCifar:
    from brevitas.graph.gpfq import gpfq_mode

    ctx.recipe.update(algorithm="GPFQ (brevitas.graph.gpfq.gpfq_mode)")
    return run_gpxq(ctx, gpfq_mode)


# ----- learned round ---------------------------------------------------------------------


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)]


class Captured:
    """What enters and leaves one layer over a set of images; the inputs keep their
    quantization metadata, which the classifier's integer bias needs."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.input_meta: tuple | None = None

    def store(self, x: object, output: torch.Tensor) -> None:
        from brevitas.quant_tensor import QuantTensor

        if isinstance(x, QuantTensor):
            self.input_meta = (x.scale, x.zero_point, x.bit_width, x.signed)
            x = x.value
        self.inputs.append(x.detach())
        self.outputs.append(output.detach())

    def layer_input(self, x: torch.Tensor) -> object:
        from brevitas.quant_tensor import IntQuantTensor

        if self.input_meta is None:
            return x
        scale, zero_point, bit_width, signed = self.input_meta
        return IntQuantTensor(x, scale, zero_point, bit_width, signed, False)


def run_with_hooks(model: nn.Module, images: torch.Tensor, hooks: dict[nn.Module, Callable]) -> None:
    from brevitas.utils.torch_utils import StopFwdException

    handles = [layer.register_forward_hook(hook) for layer, hook in hooks.items()]
    try:
        with torch.no_grad():
            for batch in images.split(PTQ_BATCH):
                try:
                    model(batch)
                except StopFwdException:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def float_outputs(model: nn.Module, layers: list[nn.Module], images: torch.Tensor) -> list[Captured]:
    """Every layer's output in the float network (every quantizer off), in one pass."""
    from brevitas.graph.calibrate import quantization_status_manager

    captured = [Captured() for _ in layers]
    hooks = {
        layer: (lambda _m, args, out, c=c: c.store(args[0], out))
        for layer, c in zip(layers, captured, strict=True)
    }
    off = quantization_status_manager(
        model, disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True, is_training=False
    )
    with off:
        run_with_hooks(model, images, hooks)
    return captured


def quantized_inputs(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> Captured:
    """What enters `layer` in the quantized network (the layers before it already rounded)."""
    from brevitas.utils.torch_utils import StopFwdException

    captured = Captured()

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.store(args[0], output)
        raise StopFwdException

    run_with_hooks(model, images, {layer: hook})
    return captured


def optimize_rounding(
    layer: nn.Module,
    inputs: Captured,
    targets: Captured,
    iters: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
) -> dict[str, float]:
    """AdaRound on one layer: Adam on the learned-round parameters, loss = the layer's
    output MSE to the float network's plus Brevitas' annealed rounding regulariser.
    Returns the MSE of the first and last batch, and the last regulariser value."""
    from brevitas.core.function_wrapper.learned_round import LearnedRoundSte
    from brevitas_examples.common.learned_round.learned_round_method import MSELoss, RoundRegularisationLoss

    x, y = torch.cat(inputs.inputs), torch.cat(targets.outputs)
    rounding = [m for m in layer.modules() if isinstance(m, LearnedRoundSte)]
    optimizer = torch.optim.Adam([m.value for m in rounding], lr=lr)
    regulariser, mse = (
        RoundRegularisationLoss(layer, max_count=iters),
        MSELoss(layer, reduction="none", dim=1),
    )
    layer.eval()
    for m in rounding:
        m.train()
    record: dict[str, float] = {}
    with torch.enable_grad():
        for _ in range(iters):
            index = torch.randint(0, len(x), (batch,), generator=gen)
            out = layer(inputs.layer_input(x[index]))
            error, penalty = mse(out, y[index]), regulariser(out, y[index])
            (error + penalty).backward()
            optimizer.step()
            optimizer.zero_grad()
            record.setdefault("initial_mse", float(error))
            record |= {"final_mse": float(error), "final_regulariser": float(penalty)}
    layer.eval()
    return record


def learned_round(ctx: MethodContext) -> ResNetCifar:
    """Layer by layer, in network order, each layer's rounding learned on the inputs the
    already-rounded layers before it produce (Brevitas' layerwise mode)."""
    from brevitas.inject.enum import LearnedRoundImplType
    from brevitas_examples.common.learned_round.learned_round_method import insert_learned_round_quantizers

    cfg = ctx.cfg
    model = ctx.prepared.qmodel
    images = ctx.calibration
    iters, batch, lr = (
        cfg.learned_round_iters,
        cfg.batch_size or LEARNED_ROUND_BATCH,
        cfg.lr or LEARNED_ROUND_LR,
    )
    insert_learned_round_quantizers(model, LearnedRoundImplType.HARD_SIGMOID)
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    layers = quant_layers(model)
    targets = float_outputs(model, [layer for _, layer in layers], images)
    for index, ((name, layer), target) in enumerate(zip(layers, targets, strict=True), 1):
        losses = optimize_rounding(
            layer, quantized_inputs(model, layer, images), target, iters, batch, lr, gen
        )
        ctx.log(
            {
                "step": index,
                "layer": name,
                "iters": iters,
                **losses,
                "elapsed_s": round(time.perf_counter() - start, 3),
            }
        )
    ctx.recipe.update(
        algorithm="learned round, hard sigmoid (AdaRound), layerwise",
        brevitas=(
            "brevitas.core.function_wrapper.learned_round.LearnedRoundSte via brevitas_examples"
            ".common.learned_round.learned_round_method (insert_learned_round_quantizers, "
            "RoundRegularisationLoss, MSELoss)"
        ),
        images=len(images),
        iters_per_layer=iters,
        batch_size=batch,
        optimizer="Adam",
        lr=lr,
        loss="MSE to the float layer output (summed over channels) + rounding regulariser "
        "(b 20 -> 2, warmup 0.2)",
        layers=len(layers),
    )
    return model
