"""Checkpoint loading, quantized model structure, and lowering of every ResNet depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from hwq import HwqError
from hwq.quant.evaluate import layer_lsb_differences
from hwq.quant.lower import lower
from hwq.quant.model import (
    CIFAR_MEAN,
    QuantConfig,
    ResNetCifar,
    calibrate,
    input_zero_points,
    load_float_model,
    quantize_model,
)

from .helpers import SHARED, calibration_images, random_resnet, weight_levels, write_checkpoint
from .reference_datapath import run_reference


def test_checkpoint_with_module_prefix_and_plain_state_dict_load_the_same(tmp_path):
    model = random_resnet(3)
    wrapped = write_checkpoint(tmp_path / "wrapped.th", model)
    plain = tmp_path / "plain.th"
    torch.save(model.state_dict(), plain)
    a, b = load_float_model(str(wrapped)), load_float_model(str(plain))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a(x), model(x))


def test_depth_is_read_from_the_checkpoint(tmp_path):
    path = tmp_path / "r32.th"
    torch.save(ResNetCifar(32).state_dict(), path)
    assert load_float_model(str(path)).depth == 32


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    state = random_resnet().state_dict()
    state["linear.weight"] = torch.zeros(100, 64)
    state["linear.bias"] = torch.zeros(100)
    path = tmp_path / "cifar100.th"
    torch.save(state, path)
    with pytest.raises(HwqError, match=r"shape of linear.weight is \(100, 64\), expected \(10, 64\)"):
        load_float_model(str(path))


def test_checkpoint_of_another_network_is_named(tmp_path):
    path = tmp_path / "other.th"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(HwqError, match="not a CIFAR ResNet"):
        load_float_model(str(path))


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.th"
    path.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(HwqError, match="not a PyTorch checkpoint"):
        load_float_model(str(path))


def test_unknown_checkpoint_name_lists_known_ones():
    with pytest.raises(HwqError, match="known names to download: resnet20"):
        load_float_model("resnet1000")


@pytest.mark.parametrize("field,value", [("wbits", 1), ("abits", 17), ("first_wbits", 0), ("last_wbits", 40)])
def test_bit_widths_out_of_range_are_named(field, value):
    cfg = QuantConfig(**{"wbits": 4, "abits": 8, field: value})
    with pytest.raises(HwqError, match=f"--{field.replace('_', '-')} {value} is out of range"):
        cfg.validate()


def bn_statistics_from(model: ResNetCifar, images: torch.Tensor) -> ResNetCifar:
    """Random conv weights with the BatchNorm statistics of real activations (one batch),
    so every layer sees a realistic, per-channel scale and shift."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def deep_program(model: ResNetCifar, cfg: QuantConfig, images: torch.Tensor):
    """The calibrated Brevitas network and its integer program."""
    qmodel = quantize_model(model, cfg)
    calibrate(qmodel, images)
    return qmodel, lower(qmodel, cfg)


@pytest.mark.parametrize("depth", [32, pytest.param(56, marks=pytest.mark.slow)])
def test_deeper_resnet_runs_bit_exactly_against_the_reference(depth):
    """The whole lowered network, every element of every tensor, against the plain int64
    implementation of docs/datapath.md (the real checkpoints from ../shared when present)."""
    path = SHARED / "models" / {32: "resnet32-d509ac18.th", 56: "resnet56-4bfd9763.th"}[depth]
    if path.exists():
        model = load_float_model(str(path))
    else:
        torch.manual_seed(depth)
        model = bn_statistics_from(ResNetCifar(depth), calibration_images()[:64])
    cfg = QuantConfig(4, 8, per_channel=True, first_wbits=8, last_wbits=8)
    _, program = deep_program(model, cfg, calibration_images()[:32])
    convs = program.conv_ops()
    assert len(convs) == depth  # stem, 2 per block (3 stages x (depth-2)/6 blocks), classifier
    assert convs[0].weight_bits == 8 and convs[-1].weight_bits == 8 and convs[1].weight_bits == 4
    images = calibration_images()[-3:]
    got = FunctionalSim(program).run(images, record=True)
    want = run_reference(program, images.numpy())
    for name, ref in want.items():
        np.testing.assert_array_equal(got.activations[name].numpy(), ref, err_msg=f"tensor {name}")


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def quantized_errors(
    model: ResNetCifar, qmodel: ResNetCifar, program, images: torch.Tensor
) -> tuple[float, float]:
    """Relative L2 logit error of Brevitas and of accel_sim against the float network.

    The float network is fed the input the integer program sees: its per-channel mean
    rounded to the integer zero point (a shift of under half a pixel level), so what is
    left is the error of quantizing weights and activations alone.
    """
    shift = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255 - torch.tensor(input_zero_points()).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        reference = model(images.float() + shift)
        brevitas = qmodel(images)
    sim = FunctionalSim(program).run(images).logits * program.tensors[program.output].scale
    return relative_error(brevitas, reference), relative_error(sim, reference)


@pytest.mark.parametrize("depth", [pytest.param(44, marks=pytest.mark.slow), 56])
def test_deeper_resnets_compute_brevitas_per_op_and_the_float_network_within_its_error(depth):
    """At depth 44 and 56 (random weights): each integer op computes Brevitas' op to 1 LSB
    when both get the same input (rounding of fixed-point multipliers and ties; the 32-bit
    logits also carry the multiplier's relative precision), and the integer program's logits
    are as close to the float network as Brevitas' own: the quantization error, nothing more."""
    torch.manual_seed(depth)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    model = bn_statistics_from(ResNetCifar(depth), images)
    cfg = QuantConfig(8, 8, per_channel=True)
    qmodel, program = deep_program(model, cfg, images)
    assert len(program.conv_ops()) == depth
    local = layer_lsb_differences(qmodel, program, images[:2])["local"]
    logits = FunctionalSim(program).run(images[:2]).logits
    logit_tolerance = 1 + float(logits.abs().max()) * 2.0 ** -(program.mult_bits - 1)
    assert max(v for k, v in local.items() if k != program.output) <= 1, local
    assert local[program.output] <= logit_tolerance, (local[program.output], logit_tolerance)
    brevitas_error, sim_error = quantized_errors(model, qmodel, program, images)
    assert sim_error <= 1.5 * brevitas_error, (sim_error, brevitas_error)


@pytest.mark.slow
def test_quantization_error_of_resnet56_falls_with_the_step():
    """What makes the difference to the float network quantization error: it shrinks with
    the quantization step (first order: in proportion, 4x from 6 to 8 bits; at least 2x
    asked, for clipping at the calibrated ranges)."""
    torch.manual_seed(56)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    model = bn_statistics_from(ResNetCifar(56), images)
    coarse, fine = (
        quantized_errors(
            model, *deep_program(model, QuantConfig(bits, bits, per_channel=True), images), images
        )
        for bits in (6, 8)
    )
    for c, f in zip(coarse, fine, strict=True):
        assert f < c / 2, (coarse, fine)


def test_full_range_weights_take_four_levels_at_2_bits_and_lower_as_brevitas_computes():
    """Brevitas' narrow_range off: 2-bit weights take -2, -1, 0 and 1 (narrow: three levels),
    the IR says so, and each integer op still computes Brevitas' op to 1 LSB."""
    torch.manual_seed(20)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    model = bn_statistics_from(ResNetCifar(20), images)
    levels = {}
    for weight_range in ("narrow", "full"):
        cfg = QuantConfig(2, 8, per_channel=True, weight_range=weight_range)
        qmodel, program = deep_program(model, cfg, images)
        levels[weight_range] = weight_levels(program)
        local = layer_lsb_differences(qmodel, program, images[:2])["local"]
        assert max(v for k, v in local.items() if k != program.output) <= 1, (weight_range, local)
        assert program.meta.get("weight_range", "narrow") == weight_range
    assert levels == {"narrow": {-1, 0, 1}, "full": {-2, -1, 0, 1}}


def test_an_unknown_weight_range_is_named():
    with pytest.raises(HwqError, match="--weight-range 'wide' is not one of narrow, full"):
        QuantConfig(2, 8, weight_range="wide").validate()
