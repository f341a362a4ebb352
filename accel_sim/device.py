"""Where the simulator runs: device resolution, and torch's float settings scoped to exactness.

The simulator's float GEMMs are exact only in true IEEE float32/float64: TF32 (cuBLAS and
cuDNN on NVIDIA GPUs), bf16 (oneDNN on CPUs under `set_float32_matmul_precision("medium")`)
and reduced-precision reductions all round. `exact_arithmetic()` switches every one of them
off while accel_sim computes and puts back what the user had on exit, so a simulator run
neither inherits nor leaks a global setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import DeviceError

# (backend, op) pairs of torch's per-backend float32 precision (torch >= 2.9) that accel_sim's
# convolutions and GEMMs can reach, each with the (backend, op) it inherits from when "none".
_PRECISIONS = {
    ("cuda", "matmul"): ("cuda", "all"),
    ("cuda", "conv"): ("cuda", "all"),
    ("mkldnn", "matmul"): ("mkldnn", "all"),
    ("mkldnn", "conv"): ("mkldnn", "all"),
}
_REDUCTIONS = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
_NEW_API = hasattr(torch._C, "_get_fp32_precision_getter")


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device named by `device`, checked to exist, or a one-line DeviceError."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown torch device {str(device)!r} (expected e.g. 'cpu' or 'cuda')") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda" and not torch.cuda.is_available():
        reason = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise DeviceError(f"device {str(device)!r} requested but {reason}")
    try:
        torch.empty(1, device=resolved)
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(f"device {str(device)!r} is not usable: {first}") from None
    return resolved


def _legacy_matmul_precision() -> str | None:
    """torch's legacy global precision; None when the user mixed it with the new per-backend
    API (torch then refuses to read it)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def precision_settings() -> dict[str, object]:
    """Every torch setting `exact_arithmetic` touches, as the user would read it."""
    settings: dict[str, object] = {
        "float32_matmul_precision": _legacy_matmul_precision(),
        **{name: getattr(torch.backends.cuda.matmul, name) for name in _REDUCTIONS},
    }
    if _NEW_API:
        getter = torch._C._get_fp32_precision_getter
        settings.update({f"{b}.{op}": getter(b, op) for b, op in _PRECISIONS})
    else:
        settings["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        settings["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    return settings


def _set_exact() -> None:
    torch.set_float32_matmul_precision("highest")
    for name in _REDUCTIONS:
        setattr(torch.backends.cuda.matmul, name, False)
    if _NEW_API:
        for backend, op in _PRECISIONS:
            torch._C._set_fp32_precision_setter(backend, op, "ieee")
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _restore(saved: dict[str, object]) -> None:
    """Put `saved` back. The legacy global precision goes first, since setting it also writes
    the per-backend matmul precisions; those are then restored one by one, as "none" (inherit)
    where they read the same as their parent (which accel_sim never changes)."""
    if saved["float32_matmul_precision"] is not None:
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
    for name in _REDUCTIONS:
        setattr(torch.backends.cuda.matmul, name, saved[name])
    if _NEW_API:
        getter, setter = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
        for (backend, op), parent in _PRECISIONS.items():
            value = saved[f"{backend}.{op}"]
            setter(backend, op, "none" if value == getter(*parent) else value)
    else:
        torch.backends.cuda.matmul.allow_tf32 = saved["cuda.matmul.allow_tf32"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]


@contextmanager
def exact_arithmetic() -> Iterator[None]:
    """IEEE float32/float64 for every matmul and convolution inside; the user's settings after."""
    saved = precision_settings()
    try:
        _set_exact()
        yield
    finally:
        _restore(saved)
