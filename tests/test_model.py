"""Checkpoint loading, quantized model structure, and lowering of every ResNet depth."""

from __future__ import annotations

import pytest
import torch

from accel_sim.functional import FunctionalSim
from hwq import HwqError
from hwq.quant.lower import lower
from hwq.quant.model import QuantConfig, ResNetCifar, calibrate, load_float_model, quantize_model

from .helpers import random_resnet, write_checkpoint


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


@pytest.mark.parametrize("depth", [32, 44, 56])
def test_deeper_resnets_lower_and_run(depth):
    torch.manual_seed(depth)
    cfg = QuantConfig(4, 8, per_channel=True, first_wbits=8, last_wbits=8)
    qmodel = quantize_model(ResNetCifar(depth).eval(), cfg)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    calibrate(qmodel, images)
    program = lower(qmodel, cfg)
    convs = program.conv_ops()
    assert len(convs) == depth  # stem, 2 per block (3 stages x (depth-2)/6 blocks), classifier
    assert convs[0].weight_bits == 8 and convs[-1].weight_bits == 8 and convs[1].weight_bits == 4
    logits = FunctionalSim(program).run(images).logits
    assert logits.shape == (16, 10)
