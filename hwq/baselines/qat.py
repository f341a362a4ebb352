"""Training baselines: quantization-aware training with straight-through estimators (QAT),
and accumulator-aware QAT (A2Q, A2Q+) for the target's accumulator.

QAT fine-tunes the calibrated round-to-nearest Brevitas model itself: its layers are
Brevitas QAT layers (round with a straight-through gradient, learned weight and
activation scales), so the loop below is plain PyTorch. A2Q and A2Q+ rebuild the Brevitas
model with Brevitas' accumulator-aware weight quantizers (as brevitas_examples'
`imagenet_classification/a2q` defines them), whose accumulator is the target's, and train
it with the same loop plus A2Q's regulariser. Every recipe value is in the summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from accel_sim.ir import Program

from ..quant.model import ResNetCifar, calibrate, quantize_model
from .run import MethodContext

QAT_LR = 1e-3
ADAM_LR = 1e-4
DISTILL_TEMPERATURE = 4.0  # Hinton et al.'s soft targets; the loss is scaled by T^2 as theirs
QAT_BATCH = 128
QAT_WEIGHT_DECAY = 1e-5  # brevitas_examples a2q_train_models' default
MOMENTUM = 0.9
A2Q_REG_WEIGHT = 1e-3  # brevitas_examples a2q utils.train_for_epoch's default
CROP_PADDING = 4


@dataclass(frozen=True)
class Recipe:
    lr: float
    batch_size: int
    weight_decay: float
    epochs: int | None
    budget_minutes: float | None
    optimizer: str
    distill: bool
    frozen_batchnorm: bool
    mixup: float | None

    def to_json(self) -> dict:
        budget = f"{self.epochs} epochs" if self.epochs else f"{self.budget_minutes} minutes of wall time"
        return {
            "optimizer": f"SGD, momentum {MOMENTUM}" if self.optimizer == "sgd" else "Adam",
            "lr": self.lr,
            "schedule": f"cosine from lr to 0 over the budget ({budget})",
            "batch_size": self.batch_size,
            "weight_decay": f"{self.weight_decay} (not on scales and biases: filter_params)",
            "epochs": self.epochs,
            "budget_minutes": self.budget_minutes,
            "augmentation": f"random crop with {CROP_PADDING}-pixel zero padding, horizontal flip"
            + (
                f"; mixup of pairs, one weight per batch ~ Beta({self.mixup:g}, {self.mixup:g}), "
                "pixels rounded to 8 bits"
                if self.mixup
                else ""
            ),
            "loss": (
                f"KL divergence to the float network's logits at temperature {DISTILL_TEMPERATURE:g}, x T^2"
                if self.distill
                else "cross-entropy on the train split's labels"
            ),
            "batchnorm": (
                "running statistics frozen (those the post-training start was computed with); affine trained"
                if self.frozen_batchnorm
                else "train mode (batch statistics)"
            )
            + "; folded into the requantization when lowered",
        }


def recipe_of(ctx: MethodContext) -> Recipe:
    cfg = ctx.cfg
    return Recipe(
        lr=cfg.lr or (QAT_LR if cfg.optimizer == "sgd" else ADAM_LR),
        batch_size=cfg.batch_size or QAT_BATCH,
        weight_decay=QAT_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay,
        epochs=cfg.epochs,
        budget_minutes=cfg.budget_minutes,
        optimizer=cfg.optimizer,
        distill=cfg.distill,
        frozen_batchnorm=cfg.start != "rtn",
        mixup=cfg.mixup,
    )


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD as brevitas_examples trains, or Adam. Adam's steps do not scale with the gradient:
    the first convolution sees raw pixels (0-255, its normalization folded into the weights),
    so its gradients are some 50 times the others' and SGD at a rate that moves the other
    layers destroys it (docs/baselines.md, "QAT from a post-training start")."""
    from brevitas_examples.imagenet_classification.a2q.utils import filter_params

    groups = filter_params(model.named_parameters(), recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=MOMENTUM)


@dataclass(frozen=True)
class Batch:
    """One step's images (uint8, augmented and perhaps mixed) and what they are labelled:
    an image mixed from two is `lam` parts its own label and 1 - `lam` its partner's."""

    images: torch.Tensor
    labels: torch.Tensor
    partners: torch.Tensor
    lam: float = 1.0


Loss = Callable[[Batch, torch.Tensor], torch.Tensor]


def label_loss(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labels; mixup's on both labels, weighted as the images were."""
    own = F.cross_entropy(logits, batch.labels)
    if batch.lam == 1:
        return own
    return batch.lam * own + (1 - batch.lam) * F.cross_entropy(logits, batch.partners)


def make_loss(ctx: MethodContext, recipe: Recipe) -> Loss:
    """Cross-entropy on the labels, or Hinton's distillation loss on the float network's logits
    for the same augmented images: at a few bits the labels say less than the float network's
    ranking of every class, which the integer program has to reproduce."""
    if not recipe.distill:
        return label_loss
    teacher = ctx.prepared.float_model.eval()
    t = DISTILL_TEMPERATURE

    def distill(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(batch.images) / t, dim=1)
        return F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t

    return distill


def set_train_mode(model: nn.Module, recipe: Recipe) -> None:
    model.train()
    if recipe.frozen_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded images and horizontal flips (uint8 in, uint8 out)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    dy, dx = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    crops = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return torch.where(flip.view(-1, 1, 1, 1), crops.flip(3), crops)


def mixup(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, alpha: float) -> Batch:
    """Zhang et al.'s mixup: each image blended with another of the batch, one weight per
    batch from Beta(alpha, alpha), rounded back to 8-bit pixels, since the integer program
    reads 8-bit images. With `--distill` the float network labels the blend itself (Beyer et
    al.'s function matching), meant to let a few thousand images teach a long run; at W2A8
    it lost (docs/baselines.md, "QAT from a post-training start")."""
    lam = float(rng.beta(alpha, alpha))
    partner = torch.from_numpy(rng.permutation(len(images)))
    blend = lam * images.float() + (1 - lam) * images[partner].float()
    return Batch(blend.round().to(torch.uint8), labels, labels[partner], lam)


def training_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    mix: tuple[np.random.Generator, float] | None,
) -> Batch:
    """Augmented images, mixed when `mix` = (rng, alpha): mixup draws from its own
    generator so that a run without it keeps the crops and flips it always had."""
    augmented = augment(images, gen)
    if mix is None:
        return Batch(augmented, labels, labels)
    return mixup(augmented, labels, *mix)


class Schedule:
    """Cosine decay of the learning rate over the budget: over the steps of `epochs`
    epochs, or over the wall time of `budget_minutes` (then the run stops at the first step
    that ends past the budget)."""

    def __init__(self, recipe: Recipe, steps_per_epoch: int) -> None:
        self.recipe = recipe
        self.total_steps = recipe.epochs * steps_per_epoch if recipe.epochs else None
        self.seconds = 60 * recipe.budget_minutes if recipe.budget_minutes else None

    def progress(self, step: int, elapsed: float) -> float:
        return step / self.total_steps if self.total_steps else elapsed / self.seconds

    def lr(self, step: int, elapsed: float) -> float:
        return 0.5 * self.recipe.lr * (1 + math.cos(math.pi * min(1.0, self.progress(step, elapsed))))

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1


Penalty = Callable[[], torch.Tensor | None]


def train_model(ctx: MethodContext, model: nn.Module, penalty: Penalty | None = None) -> dict:
    """Fine-tune every parameter of `model` on the train split; returns what was done."""
    recipe = recipe_of(ctx)
    train = ctx.train
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    schedule = Schedule(recipe, steps_per_epoch)
    optimizer = make_optimizer(model, recipe)
    objective = make_loss(ctx, recipe)
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    mix = (np.random.default_rng(ctx.cfg.seed), recipe.mixup) if recipe.mixup else None
    step, epoch, elapsed = 0, 0, 0.0
    start = time.perf_counter()
    set_train_mode(model, recipe)
    with torch.enable_grad():
        while not schedule.done(step, elapsed):
            epoch += 1
            totals = np.zeros(4)  # loss sum, correct, images, penalty sum
            for index in torch.randperm(len(train), generator=gen).split(recipe.batch_size):
                lr = schedule.lr(step, elapsed)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = training_batch(train.images[index], train.labels[index], gen, mix)
                logits = model(batch.images)
                loss = objective(batch, logits)
                extra = penalty() if penalty else None
                total = loss if extra is None else loss + A2Q_REG_WEIGHT * extra
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                step += 1
                elapsed = time.perf_counter() - start
                totals += (
                    float(loss) * len(index),
                    int((logits.argmax(1) == batch.labels).sum()),
                    len(index),
                    0.0 if extra is None else float(extra),
                )
                if schedule.done(step, elapsed):
                    break
            ctx.log(
                {
                    "epoch": epoch,
                    "step": step,
                    "train_loss": totals[0] / totals[2],
                    "train_accuracy": totals[1] / totals[2],
                    **({"a2q_penalty": totals[3] / (totals[2] / recipe.batch_size)} if penalty else {}),
                    "lr": lr,
                    "elapsed_s": round(elapsed, 3),
                }
            )
    model.eval()
    return {"steps": step, "epochs_run": round(step / steps_per_epoch, 3), "train_images": len(train)}


def post_training_start(ctx: MethodContext) -> ResNetCifar:
    """The calibrated round-to-nearest model, or the program of GPTQ/GPFQ on it, whose
    recipe and log go into this run's under "start"."""
    from .run import method_function

    if ctx.cfg.start == "rtn":
        return ctx.prepared.qmodel
    model = method_function(ctx.cfg.start)(ctx)
    ctx.recipe = {"start": {"method": ctx.cfg.start, **ctx.recipe}}
    return model


def qat(ctx: MethodContext) -> ResNetCifar:
    model = post_training_start(ctx)
    ran = train_model(ctx, model)
    ctx.recipe.update(
        algorithm="QAT with straight-through estimators (the Brevitas model's own QAT layers)",
        **recipe_of(ctx).to_json(),
        **ran,
    )
    return model


# ----- A2Q -------------------------------------------------------------------------------


def a2q_weight_quant(ctx: MethodContext, plus: bool) -> type:
    """brevitas_examples' A2Q (A2Q+) weight quantizer for the target's accumulator.

    It is per output channel, as Brevitas defines it (the L1 bound and the weight norm are
    per channel, and EP-init reshapes the scales per channel: with a per-tensor scale
    `apply_ep_init` fails, and without EP-init a pretrained network's layers of 576 weights
    round to all zeros under a 14-bit bound). The integer program requantizes per output
    channel whatever the weights' scales (docs/datapath.md), so per-channel scales cost the
    accelerator nothing; at a per-tensor point the run says so in a note."""
    from brevitas_examples.imagenet_classification.a2q.quant import (
        CommonIntAccumulatorAwareWeightQuant,
        CommonIntAccumulatorAwareZeroCenterWeightQuant,
    )

    if not ctx.cfg.per_channel:
        ctx.note(
            "A2Q's weight quantizers and EP-init are per output channel in Brevitas: this per-tensor "
            "point's A2Q program has per-channel weight scales (the requantization is per channel anyway)"
        )
    base = CommonIntAccumulatorAwareZeroCenterWeightQuant if plus else CommonIntAccumulatorAwareWeightQuant
    return base.let(accumulator_bit_width=ctx.cfg.accumulator_bits)


def declare_layer_inputs(model: nn.Module, program: Program) -> dict[str, tuple[int, bool]]:
    """Tell each A2Q weight quantizer the bit width and signedness of its layer's input, as
    the integer program runs it: the raw 8-bit unsigned image for the first convolution
    (its zero points are folded into the accumulator's initial value), and the unsigned
    activation of the QuantReLU / QuantIdentity before every other layer.

    A2Q reads them from the layer's input quant tensor; our layers receive plain tensors
    (their input quantizers are off, the activations being quantized by the layer before),
    so the metadata is given once the way Brevitas' proxy caches it for export (`_cached_act`,
    which the proxy uses whenever its input is not a quant tensor) and holds in training,
    evaluation and lowering alike."""
    from brevitas.quant_tensor import IntQuantTensor
    from brevitas.utils.quant_utils import _CachedIO

    modules = dict(model.named_modules())
    declared = {}
    for op in program.conv_ops():
        spec = program.tensors[op.input]
        metadata = IntQuantTensor(
            torch.zeros(1),
            torch.tensor(spec.scale),
            torch.tensor(0.0),
            torch.tensor(float(spec.bits)),
            spec.signed,
            False,
        )
        layer = modules[program.meta["weight_sources"][op.name]]
        layer.weight_quant._cached_act = _CachedIO(metadata, metadata_only=True)
        declared[op.name] = (spec.bits, spec.signed)
    return declared


def a2q_modules(model: nn.Module) -> dict[str, nn.Module]:
    from brevitas.core.scaling import AccumulatorAwareParameterPreScaling

    return {
        name.split(".weight_quant")[0]: m
        for name, m in model.named_modules()
        if isinstance(m, AccumulatorAwareParameterPreScaling)
    }


def l1_bounds(model: nn.Module, program: Program, declared: dict[str, tuple[int, bool]]) -> dict[str, float]:
    """A2Q's bound on each output channel's L1 norm of integer weights, from the quantizer."""
    pre = a2q_modules(model)
    sources = program.meta["weight_sources"]
    bounds = {}
    for name, (bits, signed) in declared.items():
        bound = pre[sources[name]].calc_max_l1_norm(torch.tensor(float(bits)), signed)
        bounds[name] = float(bound)
    return bounds


def note_when_inactive(ctx: MethodContext, bounds: dict[str, float], plus: bool) -> None:
    """Say whether the bound constrains anything: where the round-to-nearest weights already
    satisfy it in every layer, A2Q is QAT with weight-normalized quantizers."""
    binding = []
    for op in ctx.prepared.program.conv_ops():
        w = op.weight.reshape(op.out_channels, -1).astype(np.float64)
        if plus:
            w = w - w.mean(axis=1, keepdims=True)
        norm = float(np.abs(w).sum(axis=1).max())
        if norm > bounds[op.name]:
            binding.append(f"{op.name} ({norm:g} > {bounds[op.name]:g})")
    acc = ctx.cfg.accumulator_bits
    if not binding:
        ctx.note(
            f"A2Q's bound does not constrain this target: every layer's round-to-nearest weights already "
            f"satisfy the L1 bound of a {acc}-bit accumulator, so A2Q acts as QAT with "
            "weight-normalized quantizers"
        )
    else:
        ctx.note(
            f"A2Q's {acc}-bit bound constrains {len(binding)} of {len(bounds)} layers "
            f"(largest round-to-nearest L1 norm > bound): {', '.join(binding[:4])}"
            f"{' ...' if len(binding) > 4 else ''}"
        )


def a2q_penalty(model: nn.Module) -> tuple[Penalty, list]:
    """A2Q's regulariser, as brevitas_examples' a2q `train_for_epoch` accumulates it: the
    excess of each layer's learned norm g over its bound, summed, by a forward hook on the
    accumulator-aware pre-scaling modules."""
    from brevitas.function import abs_binary_sign_grad

    terms: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        weights, input_bit_width, input_is_signed = inputs
        s = module.scaling_impl(weights)
        g = abs_binary_sign_grad(module.restrict_clamp_scaling(module.value))
        bound = module.calc_max_l1_norm(input_bit_width, input_is_signed)
        terms.append(torch.relu(g - bound * s).sum())

    handles = [m.register_forward_hook(hook) for m in a2q_modules(model).values()]

    def penalty() -> torch.Tensor | None:
        total = sum(terms) if terms else None
        terms.clear()
        return total

    return penalty, handles


def run_a2q(ctx: MethodContext, plus: bool) -> ResNetCifar:
    from brevitas_examples.imagenet_classification.a2q.ep_init import apply_ep_init

    name = "A2Q+" if plus else "A2Q"
    program = ctx.prepared.program
    model = quantize_model(ctx.prepared.float_model, ctx.cfg.quant(), a2q_weight_quant(ctx, plus))
    declared = declare_layer_inputs(model, program)
    model.eval()
    with torch.no_grad():
        apply_ep_init(model, ctx.calibration[:QAT_BATCH].float())
    calibrate(model, ctx.calibration)
    bounds = l1_bounds(model, program, declared)
    note_when_inactive(ctx, bounds, plus)
    penalty, handles = a2q_penalty(model)
    try:
        ran = train_model(ctx, model, penalty)
    finally:
        for handle in handles:
            handle.remove()
    ctx.recipe.update(
        algorithm=f"{name} weight quantizers ({'zero-centered, ' if plus else ''}round to zero), QAT",
        brevitas=(
            "brevitas_examples.imagenet_classification.a2q.quant."
            + (
                "CommonIntAccumulatorAwareZeroCenterWeightQuant"
                if plus
                else "CommonIntAccumulatorAwareWeightQuant"
            )
            + f" (accumulator_bit_width={ctx.cfg.accumulator_bits})"
        ),
        init="EP-init (brevitas_examples a2q.ep_init.apply_ep_init): weights projected onto the L1 ball",
        regulariser=f"{A2Q_REG_WEIGHT} x sum relu(g - bound * s) (brevitas_examples a2q train_for_epoch)",
        layer_inputs={k: {"bits": b, "signed": s} for k, (b, s) in declared.items()},
        l1_bounds=bounds,
        **recipe_of(ctx).to_json(),
        **ran,
    )
    return model


def a2q(ctx: MethodContext) -> ResNetCifar:
    return run_a2q(ctx, plus=False)


def a2q_plus(ctx: MethodContext) -> ResNetCifar:
    return run_a2q(ctx, plus=True)
