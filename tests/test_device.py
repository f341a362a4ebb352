"""The device layer: torch's float settings scoped to accel_sim, devices resolved with
one-line errors, and the self-check that refuses a backend whose arithmetic is off by one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from accel_sim import self_check
from accel_sim.conv_backends import GemmConv
from accel_sim.device import exact_arithmetic
from accel_sim.errors import DeviceError, ExactnessError
from accel_sim.functional import FunctionalSim
from accel_sim.ir import Accumulator
from hwq.quant.model import QuantConfig
from hwq.search.evaluator import IntegerFitness, SimEvaluator

from .helpers import program_for
from .small_programs import signed_program

PAIRS = [("generic", "all")] + [
    (b, op) for b in ("cuda", "mkldnn") for op in ("all", "matmul", "conv", "rnn")
]
REDUCTIONS = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
needs_new_api = pytest.mark.skipif(
    not hasattr(torch._C, "_get_fp32_precision_getter"), reason="torch < 2.9 has no per-backend precision"
)


def legacy_precision() -> str | None:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def torch_settings() -> dict:
    """Everything a user could observe, read straight from torch."""
    state = {f"{b}.{op}": torch._C._get_fp32_precision_getter(b, op) for b, op in PAIRS}
    state.update({name: getattr(torch.backends.cuda.matmul, name) for name in REDUCTIONS})
    state["legacy"] = legacy_precision()
    return state


@pytest.fixture
def user_settings():
    """Put torch back to its defaults after each test that changes them."""
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    for pair in PAIRS:
        if pair not in (("cuda", "conv"), ("cuda", "rnn")):
            torch._C._set_fp32_precision_setter(*pair, "none")
    for name in REDUCTIONS:
        setattr(torch.backends.cuda.matmul, name, True)


def set_legacy_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False


def set_medium():
    torch.set_float32_matmul_precision("medium")


def set_new_api():
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.fp32_precision = "tf32"


def set_no_reductions():
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


@needs_new_api
@pytest.mark.parametrize("user", [None, set_legacy_tf32, set_medium, set_new_api, set_no_reductions])
def test_exact_arithmetic_is_strict_inside_and_restores_the_users_settings(user, user_settings):
    if user is not None:
        user()
    before = torch_settings()
    with pytest.raises(KeyError):
        with exact_arithmetic():
            inside = torch_settings()
            raise KeyError("an error inside must restore the settings too")
    assert torch_settings() == before
    assert inside["legacy"] == "highest"
    assert all(inside[p] == "ieee" for p in ("cuda.matmul", "cuda.conv", "mkldnn.matmul", "mkldnn.conv"))
    assert not any(inside[name] for name in REDUCTIONS)


@needs_new_api
def test_a_run_under_bf16_matmuls_stays_exact_and_leaves_them_on(user_settings):
    """`medium` lets oneDNN run float32 matmuls in bf16 on CPUs that have it; the GEMM
    backend must not be affected, and the user's setting must survive."""
    torch.set_float32_matmul_precision("medium")
    program = signed_program(Accumulator(11, "saturate"))
    FunctionalSim(program, conv_backend="gemm", self_check=True)
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


@pytest.mark.parametrize(
    "device,message",
    [
        ("bogus", "unknown torch device 'bogus'"),
        ("cuda", "device 'cuda' requested but"),
        ("meta", "cannot run on meta"),
    ],
)
def test_unusable_devices_are_one_line_errors(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    program = signed_program(Accumulator(32, "wrap"))
    with pytest.raises(DeviceError, match=message) as error:
        SimEvaluator(program, IntegerFitness("accuracy", clip=4), device=device)
    assert "\n" not in str(error.value)


def test_native_convolutions_are_refused_off_the_cpu():
    with pytest.raises(DeviceError, match="exact on the CPU only"):
        FunctionalSim(signed_program(Accumulator(32, "wrap")), "meta", conv_backend="native")


def test_errors_import_without_torch():
    code = "import sys, accel_sim.errors, accel_sim.ir; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def perturb_layer(monkeypatch, method: str, channels: int):
    """Make one GEMM-backend method add 1 to one element of outputs with `channels` channels."""
    original = getattr(GemmConv, method)

    def off_by_one(self, x, w, *args, **kwargs):
        out = original(self, x, w, *args, **kwargs)
        if out.shape[1] == channels:
            out = out.clone(memory_format=torch.contiguous_format)
            out.view(-1)[0] += 1
        return out

    monkeypatch.setattr(GemmConv, method, off_by_one)


def test_self_check_passes_an_exact_backend():
    FunctionalSim(program_for(QuantConfig(4, 8)), conv_backend="gemm", self_check=True)


def test_self_check_names_the_layer_of_a_backend_off_by_one_lsb(monkeypatch):
    program = program_for(QuantConfig(4, 8))
    perturb_layer(monkeypatch, "conv", channels=32)
    with pytest.raises(
        ExactnessError, match=r"layer 'layer2\.0\.conv1' \(accumulator element \(0, 0, 0, 0\)"
    ) as error:
        FunctionalSim(program, conv_backend="gemm", self_check=True)
    assert "\n" not in str(error.value)


def test_self_check_covers_the_population_path(monkeypatch):
    program = signed_program(Accumulator(11, "wrap"))
    perturb_layer(monkeypatch, "population_conv", channels=6)
    with pytest.raises(ExactnessError, match=r"population path, layer 'c2' \(candidate 0"):
        FunctionalSim(program, conv_backend="gemm", self_check=True)


def test_self_check_runs_once_per_arithmetic_and_device(monkeypatch):
    probes = []
    probe = self_check.probe_images
    monkeypatch.setattr(self_check, "probe_images", lambda p: probes.append(1) or probe(p))
    monkeypatch.setattr(self_check, "_verified", set())
    wrap = FunctionalSim(signed_program(Accumulator(11, "wrap")), conv_backend="gemm")
    self_check.check_exactness(wrap)
    self_check.check_exactness(
        FunctionalSim(signed_program(Accumulator(12, "wrap"), seed=5), conv_backend="gemm")
    )
    assert len(probes) == 1
    self_check.check_exactness(
        FunctionalSim(signed_program(Accumulator(11, "saturate")), conv_backend="gemm")
    )
    assert len(probes) == 2
    FunctionalSim(signed_program(Accumulator(11, "wrap")))
    assert len(probes) == 2, "no automatic check on the CPU"
