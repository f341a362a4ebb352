"""`hwq export --format qonnx`: the exported model, run by qonnx's own executor, computes
accel_sim's integers on every logit and every activation tensor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from accel_sim.functional import FunctionalSim
from accel_sim.ir import (
    Accumulator,
    Conv2d,
    GlobalAvgPool,
    Program,
    Requant,
    Residual,
    TensorSpec,
    save_program,
)
from hwq.cli import main
from hwq.quant.model import QuantConfig

from .helpers import DATA, HAVE_SHARED, calibration_images, program_for, write_cifar_batches

onnx = pytest.importorskip("onnx")
pytest.importorskip("qonnx")

from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402

from hwq.export.check import check_against_accel_sim  # noqa: E402
from hwq.export.qonnx_export import export_qonnx  # noqa: E402

WIDE = Accumulator(32, "wrap")


def small_program(accumulator: Accumulator = WIDE) -> Program:
    """Three ops and a classifier with everything the datapath has: input zero points,
    biases, per-channel multipliers (negative and zero ones too), a stride-3 residual with
    option-A channel padding and its own negative multipliers, a signed output with a zero
    point, a 3x3 average pool (not a power of two) and 32-bit per-channel logits."""
    rng = np.random.default_rng(7)
    tensors = {
        "input": TensorSpec("input", (3, 8, 8), 8, False, (10, 120, 250), 1.0),
        "a": TensorSpec("a", (4, 8, 8), 6, False, (0,), 0.1),
        "b": TensorSpec("b", (8, 3, 3), 8, True, (-3,), 0.05),
        "pool": TensorSpec("pool", (8, 1, 1), 7, False, (5,), 0.02),
        "logits": TensorSpec("logits", (5, 1, 1), 32, True, (0,), 0.01),
    }
    conv_a = Conv2d(
        "conv_a",
        "input",
        "a",
        rng.integers(-8, 8, (4, 3, 3, 3)),
        4,
        rng.integers(-500, 500, 4),
        1,
        1,
        Requant(np.array([330, -250, 0, 500]), np.array([14, 14, 12, 15]), rng.integers(-20, 20, 4) << 14),
    )
    residual = Residual(
        "a", rng.integers(500, 1500, 8) * rng.choice([-1, 1], 8), rng.integers(3, 6, 8), 3, (2, 2)
    )
    conv_b = Conv2d(
        "conv_b",
        "a",
        "b",
        rng.integers(-4, 4, (8, 4, 3, 3)),
        3,
        np.zeros(8, dtype=np.int64),
        3,
        1,
        Requant(
            rng.integers(400, 1200, 8) * np.array([1, -1] * 4),
            np.full(8, 14),
            rng.integers(-9, 9, 8) << 14,
            residual,
        ),
    )
    pool = GlobalAvgPool(
        "pool",
        "b",
        "pool",
        Requant(np.array([1000, -800, 900, 700] * 2), np.full(8, 12), np.zeros(8, dtype=np.int64)),
    )
    fc = Conv2d(
        "fc",
        "pool",
        "logits",
        rng.integers(-16, 16, (5, 8, 1, 1)),
        5,
        rng.integers(-1000, 1000, 5),
        1,
        0,
        Requant(np.array([16384, 12000, -9000, 20000, 3]), np.full(5, 14), np.zeros(5, dtype=np.int64)),
    )
    program = Program(tensors, [conv_a, conv_b, pool, fc], "input", "logits", accumulator)
    program.validate()
    return program


def wide_program(accumulator: Accumulator = WIDE) -> Program:
    """10-bit operands of nearly full magnitude: one float32 convolution could pass 2**24
    (8 channels x 9 x 511 x 512 > 2**24), so the export splits it over input channels; the
    12-bit output is too wide for thresholds and goes through the float64 Quant form."""
    rng = np.random.default_rng(3)
    weight = rng.integers(480, 512, (4, 8, 3, 3)) * np.array([1, -1, 1, -1]).reshape(4, 1, 1, 1)
    tensors = {
        "input": TensorSpec("input", (8, 6, 6), 10, False, (512,), 1.0),
        "y": TensorSpec("y", (4, 6, 6), 12, False, (0,), 1.0),
    }
    conv = Conv2d(
        "conv",
        "input",
        "y",
        weight,
        10,
        rng.integers(-99, 99, 4),
        1,
        1,
        Requant(np.array([800, -800, 600, 900]), np.full(4, 20), np.full(4, 2048 << 20)),
    )
    return Program(tensors, [conv], "input", "y", accumulator)


def every_value_program() -> Program:
    """16 channels that each see every accumulator value of their range exactly once: a
    1x1 convolution with weight 1 over an image holding 0..255, with random requantization."""
    rng = np.random.default_rng(11)
    channels = 16
    mult = rng.integers(-3000, 3000, channels)
    mult[:2] = (0, -1)
    tensors = {
        "input": TensorSpec("input", (1, 16, 16), 8, False, (77,), 1.0),
        "y": TensorSpec("y", (channels, 16, 16), 8, False, (0,), 1.0),
    }
    conv = Conv2d(
        "conv",
        "input",
        "y",
        np.ones((channels, 1, 1, 1), dtype=np.int64),
        2,
        rng.integers(-300, 300, channels),
        1,
        0,
        Requant(mult, rng.integers(6, 14, channels), rng.integers(-(1 << 20), 1 << 20, channels)),
    )
    return Program(tensors, [conv], "input", "y")


def random_images(program: Program, n: int, seed: int = 0) -> torch.Tensor:
    spec = program.tensors[program.input]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(spec.qmin, spec.qmax + 1, (n, *spec.shape), generator=gen).to(torch.int32)


def real_images(n: int) -> torch.Tensor:
    if HAVE_SHARED:
        from hwq.data import load_split

        return load_split(str(DATA), "val").images[:n]
    return calibration_images()[-n:]


def assert_same_integers(program: Program, images: torch.Tensor) -> None:
    model = export_qonnx(program)
    onnx.checker.check_model(model.model)
    result = check_against_accel_sim(model, program, images)
    differing = {k: v for k, v in result.max_difference.items() if v}
    assert result.mismatches == 0 and not differing, f"{result.summary()}; per tensor {differing}"
    assert set(result.max_difference) == set(program.tensors) - {program.input}
    assert result.logits_compared == images.shape[0] * program.tensors[program.output].channels * np.prod(
        program.tensors[program.output].shape[1:]
    )


def op_types(program: Program) -> set[str]:
    return {node.op_type for node in export_qonnx(program).graph.node}


def test_small_program_equals_accel_sim_on_every_tensor():
    program = small_program()
    assert_same_integers(program, random_images(program, 24))
    ops = op_types(program)
    assert {"Quant", "MultiThreshold", "Sub", "Pad", "Slice", "ReduceSum"} <= ops
    assert "Mod" not in ops  # a 32-bit accumulator cannot overflow here


def test_every_accumulator_value_requantizes_exactly():
    program = every_value_program()
    image = torch.arange(256, dtype=torch.int32).reshape(1, 1, 16, 16)
    assert_same_integers(program, image)


def test_wrapping_accumulator_is_exported_as_mod_of_the_exact_sum():
    program = small_program(Accumulator(10, "wrap"))
    images = random_images(program, 24, seed=1)
    assert sum(s.overflows for s in FunctionalSim(program).run(images).layers.values()) > 0
    assert "Mod" in op_types(program)
    assert_same_integers(program, images)


@pytest.mark.parametrize(
    "accumulator", [Accumulator(32, "wrap"), Accumulator(20, "wrap")], ids=["fits", "wraps"]
)
def test_wide_operands_split_the_convolution_and_stay_exact(accumulator):
    program = wide_program(accumulator)
    model = export_qonnx(program)
    assert sum(node.op_type == "Conv" for node in model.graph.node) == 2  # 7 channels fit, then 1
    assert_same_integers(program, random_images(program, 8, seed=2))


def test_saturating_accumulator_that_can_overflow_is_refused():
    from hwq import HwqError

    with pytest.raises(HwqError, match=r"op 'conv_a': .* can overflow the 12-bit saturating accumulator"):
        export_qonnx(small_program(Accumulator(12, "saturate")))


def test_products_beyond_float32_are_refused():
    from hwq import HwqError

    program = wide_program()
    spec = program.tensors["input"]
    wider = {**program.tensors, "input": TensorSpec("input", spec.shape, 16, False, spec.zero_point)}
    conv = program.ops[0]
    big = Conv2d(conv.name, conv.input, conv.output, conv.weight * 64, 16, conv.bias, 1, 1, conv.requant)
    with pytest.raises(HwqError, match="one input channel's products reaches .* beyond the integers float32"):
        export_qonnx(Program(wider, [big], "input", "y", Accumulator(40, "wrap")))


def test_names_that_collide_with_derived_ones_are_refused():
    from hwq import HwqError

    program = small_program()
    spec = program.tensors["a"]
    renamed = {**program.tensors, "a": TensorSpec("input.centered", spec.shape, spec.bits, False, scale=0.1)}
    renamed["input.centered"] = renamed.pop("a")
    ops = [replace(op, output="input.centered") if op.name == "conv_a" else op for op in program.ops]
    ops = [replace(op, input="input.centered") if op.name == "conv_b" else op for op in ops]
    conv_b = ops[1]
    residual = replace(conv_b.requant.residual, input="input.centered")
    ops[1] = replace(conv_b, requant=replace(conv_b.requant, residual=residual))
    with pytest.raises(HwqError, match="'input.centered' would be used twice"):
        export_qonnx(Program(renamed, ops, "input", "logits"))


@pytest.mark.parametrize(
    "cfg,accumulator,images",
    [
        (QuantConfig(4, 8), WIDE, 8),
        pytest.param(QuantConfig(3, 8, per_channel=True), WIDE, 32, marks=pytest.mark.slow),
        pytest.param(QuantConfig(4, 8), Accumulator(12, "wrap"), 32, marks=pytest.mark.slow),
        (QuantConfig(2, 8, per_channel=True, weight_range="full"), WIDE, 8),
    ],
    ids=["w4a8", "w3a8-per-channel", "w4a8-acc12-wrap", "w2a8-full-range"],
)
def test_resnet20_export_equals_accel_sim_on_real_images(cfg, accumulator, images):
    program = program_for(cfg).with_accumulator(accumulator)
    assert_same_integers(program, real_images(images))


def test_qonnx_cleanup_keeps_the_integers():
    """qonnx's cleanup (constant folding, renaming: the first step of FINN's
    step_qonnx_to_finn) leaves a model that still computes the same logits."""
    from qonnx.util.cleanup import cleanup_model

    program = small_program()
    images = random_images(program, 8, seed=4)
    cleaned = cleanup_model(export_qonnx(program))
    result = check_against_accel_sim(cleaned, program, images)
    assert result.mismatches == 0 and result.logits_compared == 8 * 5, result.summary()


def test_exported_file_loads_in_qonnx_with_datatypes_and_scales(tmp_path):
    import json

    program = program_for(QuantConfig(4, 8))
    path = tmp_path / "model.onnx"
    path.write_bytes(export_qonnx(program).model.SerializeToString())
    onnx.checker.check_model(str(path))
    model = ModelWrapper(str(path))
    assert model.get_tensor_datatype("input").name == "UINT8"
    assert model.get_tensor_datatype("layer1.0.conv1.weight_q").name == "INT4"
    assert model.get_tensor_datatype("layer1.0.conv1").name == "UINT8"
    assert model.get_tensor_datatype("logits").name == "INT32"
    tensors = json.loads(model.get_metadata_prop("hwq.tensors"))
    assert tensors["layer1.0.conv1"]["scale"] == program.tensors["layer1.0.conv1"].scale
    assert tensors["input"]["zero_point"] == list(program.tensors["input"].zero_point)
    assert model.get_tensor_shape("input") == [1, 3, 32, 32]


# -- the command ----------------------------------------------------------------------


def one_line_error(capsys, *args: str) -> str:
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return DATA if HAVE_SHARED else write_cifar_batches(tmp_path_factory.mktemp("cifar"))


def test_export_command_checks_and_writes(tmp_path, capsys, data_dir):
    ir = tmp_path / "w4a8.ir"
    save_program(program_for(QuantConfig(4, 8)), ir)
    out = tmp_path / "sub" / "model.onnx"
    assert (
        main(["export", "--ir", str(ir), "--out", str(out), "--data", str(data_dir), "--check-images", "4"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "4 images, 40 logits compared, 0 mismatches" in printed
    onnx.checker.check_model(str(out))
    assert ModelWrapper(str(out)).get_metadata_prop("hwq.ir_sha256")


def test_bad_export_inputs_give_one_line_errors(tmp_path, capsys):
    ir = tmp_path / "p.ir"
    save_program(small_program(), ir)
    garbage = tmp_path / "garbage.ir"
    garbage.write_bytes(b"not a zip")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = tmp_path / "m.onnx"
    assert "does not exist" in one_line_error(capsys, "--ir", str(tmp_path / "none.ir"), "--out", str(out))
    assert "not a readable IR file" in one_line_error(capsys, "--ir", str(garbage), "--out", str(out))
    assert "unknown export format 'onnx2'" in one_line_error(
        capsys, "--ir", str(ir), "--format", "onnx2", "--out", str(out)
    )
    assert "is not a directory" in one_line_error(capsys, "--ir", str(ir), "--out", str(a_file / "m.onnx"))
    assert "is a directory" in one_line_error(capsys, "--ir", str(ir), "--out", str(tmp_path))
    assert "needs --data" in one_line_error(capsys, "--ir", str(ir), "--out", str(out), "--check-images", "4")
    saturating = tmp_path / "sat.ir"
    save_program(small_program(Accumulator(12, "saturate")), saturating)
    assert "can overflow" in one_line_error(capsys, "--ir", str(saturating), "--out", str(out))
    assert not out.exists() and list(tmp_path.glob(".*.tmp")) == []


def test_missing_qonnx_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    import hwq.export

    for name in list(sys.modules):
        if name == "qonnx" or name.startswith("qonnx."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "hwq.export.qonnx_export", raising=False)
    monkeypatch.delattr(hwq.export, "qonnx_export", raising=False)
    ir = tmp_path / "p.ir"
    save_program(small_program(), ir)
    err = one_line_error(capsys, "--ir", str(ir), "--out", str(tmp_path / "m.onnx"))
    assert "pip install 'hwq[export]'" in err
