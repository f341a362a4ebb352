"""Integer convolutions computed exactly in float32, float64 or int64, one program or a population.

Every function here takes integer-valued tensors and a dtype the caller has proved exact:
in float32 (float64) every partial sum of the products is an integer below 2**24 (2**53),
so any summation order, blocking or split-K gives the same integers. Two float backends:

- `native`: torch's convolution (oneDNN on the CPU). Fast there; on a GPU cuDNN may choose
  Winograd or FFT algorithms, whose transforms round whatever the bound, so the simulator
  allows it on the CPU only.
- `gemm`: the convolution as an explicit GEMM (unfold, then matmul), the form of the
  accelerator itself. Only multiplications and additions of integers, so it is exact on
  any device whose matmul is IEEE (the caller runs it under `device.exact_arithmetic()`).

int64 (bounds beyond 2**53, and the self-check's reference) is one function for both,
`int64_conv`: unfold, then torch's int64 matmul on the CPU, or a chunked multiply-and-sum on
other devices, whose matmuls have no int64 kernels.

Shapes: a single weight set is (O, C, k, k) and applies to a batch of any size; a
population's is (P, O, C, k, k) and applies either to one batch (N, ...) shared by all
candidates or to one batch per candidate (P*N, ...). Outputs are (P*N, O, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT64_CHUNK_ELEMENTS = 1 << 24


def output_size(x: torch.Tensor, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in x.shape[2:])


def unfolded(x: torch.Tensor, kernel: int, stride: int, padding: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, C*k*k, L) patches in the datapath's product order t = (c*k + i)*k + j (int64 ones
    through float64, which holds every activation of up to 16 bits exactly)."""
    if dtype == torch.int64:
        return F.unfold(x.to(torch.float64), kernel, padding=padding, stride=stride).to(torch.int64)
    return F.unfold(x.to(dtype), kernel, padding=padding, stride=stride)


def int64_matmul(w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(..., O, K) @ (..., K, L) in int64, broadcasting the leading dims."""
    return w @ cols if w.device.type == "cpu" else chunked_int64_matmul(w, cols)


def chunked_int64_matmul(
    w: torch.Tensor, cols: torch.Tensor, chunk_elements: int = INT64_CHUNK_ELEMENTS
) -> torch.Tensor:
    """int64_matmul by elementwise products summed over slices of K, for devices whose
    matmul has no int64 kernel; each slice's products stay under `chunk_elements`."""
    batch = torch.Size(torch.broadcast_shapes(w.shape[:-2], cols.shape[:-2])).numel()
    step = max(1, chunk_elements // (batch * w.shape[-2] * cols.shape[-1]))
    out = None
    for s in range(0, w.shape[-1], step):
        part = (w[..., :, s : s + step, None] * cols[..., None, s : s + step, :]).sum(-2)
        out = part if out is None else out + part
    return out


def _to_population_layout(y: torch.Tensor, n: int, p: int, o: int) -> torch.Tensor:
    """(N, P*O, H, W) -> (P*N, O, H, W)."""
    y = y.reshape(n, p, o, *y.shape[2:]).transpose(0, 1)
    return y.reshape(p * n, o, *y.shape[3:]).contiguous(memory_format=torch.channels_last)


def int64_conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """The int64 convolution of either backend (and of the self-check's reference)."""
    o, _, k, _ = w.shape
    cols = unfolded(x, k, stride, padding, torch.int64)
    return int64_matmul(w.reshape(o, -1), cols).reshape(x.shape[0], o, *output_size(x, k, stride, padding))


class NativeConv:
    """torch's convolution (CPU only: see the module docstring). Float dtypes only."""

    name = "native"

    def conv(self, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        return F.conv2d(x.to(w.dtype), w, stride=stride, padding=padding)

    def population_conv(
        self, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, shared_input: bool
    ) -> torch.Tensor:
        p, o = w.shape[:2]
        flat = w.reshape(p * o, *w.shape[2:])
        if shared_input:
            y = F.conv2d(x.to(w.dtype), flat, stride=stride, padding=padding)
        else:
            n = x.shape[0] // p
            grouped = x.reshape(p, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
            y = F.conv2d(grouped.to(w.dtype), flat, stride=stride, padding=padding, groups=p)
        return _to_population_layout(y, y.shape[0], p, o)


class GemmConv:
    """Convolution as unfold + matmul: exact on any device with IEEE matmuls. Float dtypes only."""

    name = "gemm"

    def conv(self, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        o, _, k, _ = w.shape
        cols = unfolded(x, k, stride, padding, w.dtype)
        return (w.reshape(o, -1) @ cols).reshape(x.shape[0], o, *output_size(x, k, stride, padding))

    def population_conv(
        self, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, shared_input: bool
    ) -> torch.Tensor:
        p, o, _, k, _ = w.shape
        cols = unfolded(x, k, stride, padding, w.dtype)
        rows = w.reshape(p, o, -1)
        if shared_input:
            n, kk, length = cols.shape
            flat = rows.reshape(p * o, kk) @ cols.transpose(0, 1).reshape(kk, n * length)
            y = flat.reshape(p, o, n, length).transpose(1, 2)
        else:
            n = x.shape[0] // p
            y = rows[:, None] @ cols.reshape(p, n, *cols.shape[1:])
        return y.reshape(p * n, o, *output_size(x, k, stride, padding))


BACKENDS = {backend.name: backend for backend in (NativeConv(), GemmConv())}
