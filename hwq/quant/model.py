"""ResNet for CIFAR-10 (He et al. 2016, "option A" shortcuts), as float and as Brevitas.

Both variants take raw uint8 images (N, 3, 32, 32), so every evaluation mode sees the same
data. The float model normalizes like the public checkpoints were trained. The quantized
model instead subtracts an integer per-channel zero point and folds 1/(255*std) into the
first convolution, so that the integer program's input is the raw image itself.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import brevitas.nn as qnn
import torch
import torch.nn as nn
import torch.nn.functional as F
from brevitas.inject.enum import ScalingImplType
from brevitas.quant import (
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Int32Bias,
    Uint8ActPerTensorFloat,
)

from .. import HwqError, cache_dir
from . import WEIGHT_RANGES

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
DEPTHS = (20, 32, 44, 56)
MIN_BITS, MAX_BITS = 2, 16
STAGE_WIDTHS = (16, 32, 64)

KNOWN_CHECKPOINTS = {
    "resnet20": (
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
        "pretrained_models/resnet20-12fca82f.th",
        "12fca82f",
    ),
}


def input_zero_points() -> tuple[int, ...]:
    """The per-channel mean of the normalization, in raw pixel units, rounded to integers."""
    return tuple(round(255 * m) for m in CIFAR_MEAN)


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of the quantized network; first/last layer weights default to `wbits`.

    `layer_wbits`, when given, is every weight layer's width in network order (the stem
    conv, each block's conv1 and conv2, the fc: the order of the IR's conv ops) and
    overrides the three above, so a mixed-precision network is one config (hwq codesign).

    `weight_range` is Brevitas' `narrow_range`: "narrow" weights are symmetric,
    [-(2^(b-1)-1), 2^(b-1)-1], "full" ones also take -2^(b-1), which at 2 bits is the
    difference between three levels and four."""

    wbits: int
    abits: int
    per_channel: bool = False
    first_wbits: int | None = None
    last_wbits: int | None = None
    layer_wbits: tuple[int, ...] | None = None
    weight_range: str = "narrow"

    @classmethod
    def of(cls, settings: object) -> QuantConfig:
        """The widths a run's settings (hwq train's, hwq baseline's) hold under the same names."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    @property
    def narrow_weights(self) -> bool:
        return self.weight_range == "narrow"

    @property
    def stem_wbits(self) -> int:
        return self.first_wbits or self.wbits

    @property
    def head_wbits(self) -> int:
        return self.last_wbits or self.wbits

    def validate(self) -> None:
        for name in ("wbits", "abits", "first_wbits", "last_wbits"):
            value = getattr(self, name)
            if value is not None and not MIN_BITS <= value <= MAX_BITS:
                raise HwqError(f"--{name.replace('_', '-')} {value} is out of range [{MIN_BITS}, {MAX_BITS}]")
        for i, value in enumerate(self.layer_wbits or ()):
            if not MIN_BITS <= value <= MAX_BITS:
                raise HwqError(
                    f"weight bits {value} of weight layer {i} are out of range [{MIN_BITS}, {MAX_BITS}]"
                )
        if self.weight_range not in WEIGHT_RANGES:
            raise HwqError(f"--weight-range {self.weight_range!r} is not one of {', '.join(WEIGHT_RANGES)}")

    def check_layers(self, weight_layers: int) -> None:
        """`layer_wbits` must name every weight layer of the network, no more."""
        if self.layer_wbits is not None and len(self.layer_wbits) != weight_layers:
            raise HwqError(
                f"{len(self.layer_wbits)} per-layer weight widths given for a network of "
                f"{weight_layers} weight layers"
            )


class Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.dtype) - self.mean) / self.std


class SubtractZeroPoint(nn.Module):
    """Integer-valued input (pixel - zero point): padding with 0 here pads with the mean."""

    def __init__(self) -> None:
        super().__init__()
        zp = torch.tensor(input_zero_points(), dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("zero_point", zp, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.zero_point.dtype) - self.zero_point


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by the stride, zero-pad the new channels on both sides."""

    def __init__(self, stride: int, pad_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class FloatLayers:
    """Layer factory for the float reference network."""

    def input_transform(self) -> nn.Module:
        return Normalize()

    def conv(self, cin: int, cout: int, stride: int, first: bool = False) -> nn.Module:
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def relu(self) -> nn.Module:
        return nn.ReLU()

    def head_act(self) -> nn.Module:
        return nn.Identity()

    def linear(self, cin: int, cout: int) -> nn.Module:
        return nn.Linear(cin, cout)


class QuantLayers:
    """Layer factory for the Brevitas network at the bit widths of a QuantConfig.

    Weight scales come from the weights' statistics once (max |w|, as Brevitas' default)
    and are then parameters: editing the weights later (the trainer's candidates) keeps
    the scale, so integer weights written back come out as the same integers. A baseline
    may pass another Brevitas weight quantizer (A2Q's accumulator-aware ones).
    """

    def __init__(self, cfg: QuantConfig, weight_quant: type | None = None) -> None:
        self.cfg = cfg
        if weight_quant is None:
            base = Int8WeightPerChannelFloat if cfg.per_channel else Int8WeightPerTensorFloat
            weight_quant = base.let(
                scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS, narrow_range=cfg.narrow_weights
            )
        self.weight_quant = weight_quant
        self.weight_layers = 0  # weight layers made so far: the index into cfg.layer_wbits

    def next_weight_bits(self, default: int) -> int:
        """The width of the next weight layer made (the network makes them in IR order);
        beyond the given widths the default, and `QuantConfig.check_layers` then refuses
        the count, naming the network's."""
        index, self.weight_layers = self.weight_layers, self.weight_layers + 1
        if self.cfg.layer_wbits is None or index >= len(self.cfg.layer_wbits):
            return default
        return self.cfg.layer_wbits[index]

    def input_transform(self) -> nn.Module:
        return SubtractZeroPoint()

    def conv(self, cin: int, cout: int, stride: int, first: bool = False) -> nn.Module:
        bits = self.next_weight_bits(self.cfg.stem_wbits if first else self.cfg.wbits)
        return qnn.QuantConv2d(
            cin,
            cout,
            3,
            stride=stride,
            padding=1,
            bias=False,
            weight_quant=self.weight_quant,
            weight_bit_width=bits,
        )

    def relu(self) -> nn.Module:
        return qnn.QuantReLU(bit_width=self.cfg.abits)

    def head_act(self) -> nn.Module:
        return qnn.QuantIdentity(
            act_quant=Uint8ActPerTensorFloat, bit_width=self.cfg.abits, return_quant_tensor=True
        )

    def linear(self, cin: int, cout: int) -> nn.Module:
        return qnn.QuantLinear(
            cin,
            cout,
            bias=True,
            weight_quant=self.weight_quant,
            weight_bit_width=self.next_weight_bits(self.cfg.head_wbits),
            bias_quant=Int32Bias,
        )


class BasicBlock(nn.Module):
    def __init__(self, layers: FloatLayers | QuantLayers, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = layers.conv(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = layers.relu()
        self.conv2 = layers.conv(cout, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = ShortcutA(stride, (cout - cin) // 2)
        self.relu2 = layers.relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu2(out)


class ResNetCifar(nn.Module):
    """Module names follow akamaster/pytorch_resnet_cifar10, so its checkpoints load as-is."""

    def __init__(
        self, depth: int = 20, num_classes: int = 10, layers: FloatLayers | QuantLayers | None = None
    ):
        super().__init__()
        if depth not in DEPTHS:
            raise HwqError(f"ResNet depth {depth} is not one of {DEPTHS}")
        layers = layers or FloatLayers()
        self.depth = depth
        blocks = (depth - 2) // 6
        self.input = layers.input_transform()
        self.conv1 = layers.conv(3, STAGE_WIDTHS[0], 1, first=True)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = layers.relu()
        cin = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS, start=1):
            stride = 1 if stage == 1 else 2
            seq = [
                BasicBlock(layers, cin if i == 0 else width, width, stride if i == 0 else 1)
                for i in range(blocks)
            ]
            setattr(self, f"layer{stage}", nn.Sequential(*seq))
            cin = width
        self.head_act = layers.head_act()
        self.linear = layers.linear(cin, num_classes)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(self.input(x))))
        for stage in self.stages():
            out = stage(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(self.head_act(out))


# ---------------------------------------------------------------------------------------
# Checkpoints


def resolve_checkpoint(spec: str) -> Path:
    """A local path, or the name of a known public checkpoint (downloaded once, hash-checked)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec not in KNOWN_CHECKPOINTS:
        known = ", ".join(KNOWN_CHECKPOINTS)
        raise HwqError(f"checkpoint {spec} does not exist (known names to download: {known})")
    url, sha_prefix = KNOWN_CHECKPOINTS[spec]
    target = cache_dir() / "checkpoints" / Path(url).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=sha_prefix, progress=True)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
            raise HwqError(
                f"cannot download checkpoint {spec} from {url} ({exc}); pass a local path"
            ) from None
    return target


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint: {"state_dict": ...} or a plain one, `module.` stripped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise HwqError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint ({type(exc).__name__})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HwqError(f"checkpoint {path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise HwqError(f"checkpoint {path} has NaN or Inf values in {broken[0]}{more}")
    return state


def infer_depth(state: dict[str, torch.Tensor], path: Path) -> int:
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    depth = 6 * len(blocks) + 2
    if depth not in DEPTHS:
        raise HwqError(f"checkpoint {path} is not a CIFAR ResNet (found {len(blocks)} blocks per stage)")
    return depth


def load_float_model(spec: str, depth: int | None = None) -> ResNetCifar:
    """Load a float CIFAR ResNet checkpoint, naming what does not fit if it does not match."""
    path = resolve_checkpoint(spec)
    state = read_state_dict(path)
    depth = depth or infer_depth(state, path)
    model = ResNetCifar(depth)
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
    if wrong:
        k = wrong[0]
        problems.append(f"shape of {k} is {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}")
    if problems:
        raise HwqError(f"checkpoint {path} does not match ResNet-{depth}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
    model.checkpoint_sha256 = file_sha256(path)
    return model.eval()


def quantize_model(
    float_model: ResNetCifar, cfg: QuantConfig, weight_quant: type | None = None
) -> ResNetCifar:
    """The Brevitas network with the float weights; 1/(255*std) folded into the first conv.
    `weight_quant` replaces the default weight quantizer (see QuantLayers)."""
    cfg.validate()
    layers = QuantLayers(cfg, weight_quant)
    qmodel = ResNetCifar(float_model.depth, float_model.linear.out_features, layers)
    cfg.check_layers(layers.weight_layers)
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255
    state["conv1.weight"] = state["conv1.weight"] / std
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    leftovers = [k for k in missing if "quant" not in k]
    if leftovers or unexpected:
        raise HwqError(f"internal: float and quantized networks differ ({leftovers or unexpected})")
    return qmodel.eval()


def float64_copy(model: ResNetCifar) -> ResNetCifar:
    """The network in float64, for floats that become integers (distillation targets).

    float32 convolutions round differently on different CPUs (oneDNN picks AVX2 or AVX-512
    kernels, summing in another order), and a logit or a scale that rounds to another
    integer sends a seeded search down another path. float64's error is some 2**29 times
    smaller, so the integers are the same on any machine.
    """
    return copy.deepcopy(model).double().eval()


def calibrate(qmodel: ResNetCifar, images: torch.Tensor, batch_size: int = 256) -> None:
    """Set every activation scale from statistics on `images` (Brevitas calibration mode).

    The statistics are taken in float64 (see `float64_copy`) and the model returns to
    float32: each scale is then the float32 rounding of a float64 value, the same on any
    machine, where float32 statistics differed in the last bit between CPUs and moved
    requantization offsets by up to 12 LSB."""
    from brevitas.graph.calibrate import calibration_mode

    qmodel.double()
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in images.split(batch_size):
            qmodel(batch)
    qmodel.float().eval()
