"""The simulator's building blocks against plain implementations: the vectorized saturate
replay, the convolution backends, the int64 GEMM of devices without int64 matmuls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_sim import saturate
from accel_sim.conv_backends import GemmConv, NativeConv, chunked_int64_matmul, int64_conv
from accel_sim.functional import wrap_to
from accel_sim.ir import Accumulator


def stepwise_definition(
    products: torch.Tensor, acc0: torch.Tensor, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/datapath.md literally: clamp the initial value, then clamp after every product."""
    acc = acc0.clamp(lo, hi)
    clipped = acc != acc0
    for t in range(products.shape[1]):
        unclamped = acc + products[:, t]
        acc = unclamped.clamp(lo, hi)
        clipped |= acc != unclamped
    return acc, clipped


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_saturating_replay_equals_the_stepwise_definition(dtype, monkeypatch):
    """Random walks with drifts of both signs, narrow ranges and out-of-range starts: most
    outputs clip, at one bound (the closed form) or at both (the composed steps)."""
    both_bounds = []
    composed = saturate.composed_clamps
    monkeypatch.setattr(
        saturate, "composed_clamps", lambda p, *a: both_bounds.append(p.shape[0]) or composed(p, *a)
    )
    g = torch.Generator().manual_seed(0)
    outputs = 0
    for trial in range(24):
        m, k = int(torch.randint(1, 200, (1,), generator=g)), int(torch.randint(1, 150, (1,), generator=g))
        spread, drift = (
            int(torch.randint(1, 400, (1,), generator=g)),
            int(torch.randint(-60, 60, (1,), generator=g)),
        )
        lo, hi = -int(torch.randint(1, 600, (1,), generator=g)), int(torch.randint(0, 600, (1,), generator=g))
        products = torch.randint(-spread, spread + 1, (m, k), generator=g) + drift
        acc0 = torch.randint(-1500, 1500, (m,), generator=g)
        got, got_clipped = saturate.saturating_replay(products.to(dtype), acc0.to(dtype), lo, hi)
        want, want_clipped = stepwise_definition(products, acc0, lo, hi)
        assert got.dtype == dtype and torch.equal(got.to(torch.int64), want), trial
        assert torch.equal(got_clipped, want_clipped), trial
        outputs += m
    assert 0.1 * outputs < sum(both_bounds) < 0.9 * outputs


def integers(shape, lo, hi, seed):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 3)])
def test_backends_equal_the_int64_convolution(stride, padding, kernel):
    x = integers((3, 5, 7, 7), -128, 127, 0)
    w = integers((2, 4, 5, kernel, kernel), -8, 7, 1)
    want = torch.stack([int64_conv(x, w[p], stride, padding) for p in range(2)])
    per_candidate = torch.cat([x, x + 1])
    want_per_candidate = torch.stack(
        [int64_conv(per_candidate[3 * p : 3 * p + 3], w[p], stride, padding) for p in range(2)]
    )
    assert torch.equal(want[0], F.conv2d(x.double(), w[0].double(), stride=stride, padding=padding).long())
    for backend in (NativeConv(), GemmConv()):
        assert torch.equal(backend.conv(x.float(), w[0].float(), stride, padding).long(), want[0])
        shared = backend.population_conv(x.float(), w.float(), stride, padding, shared_input=True)
        assert torch.equal(shared.long(), want.flatten(0, 1)), backend.name
        separate = backend.population_conv(
            per_candidate.float(), w.float(), stride, padding, shared_input=False
        )
        assert torch.equal(separate.long(), want_per_candidate.flatten(0, 1)), backend.name


def test_chunked_int64_matmul_equals_matmul_beyond_float64():
    w = integers((2, 3, 4, 50), -(1 << 30), 1 << 30, 2)
    cols = integers((2, 1, 50, 6), -(1 << 30), 1 << 30, 3)
    assert torch.equal(chunked_int64_matmul(w, cols, chunk_elements=100), w @ cols)


def test_float_wrap_equals_int64_wrap_at_the_range_edges():
    a = Accumulator(12, "wrap")
    values = torch.tensor([a.lo - 1, a.lo, -1, 0, a.hi, a.hi + 1, 3 * a.hi, -5 * a.hi, (1 << 20) + 7])
    want = ((values - a.lo) % (1 << a.bits)) + a.lo
    for dtype in (torch.float32, torch.float64, torch.int64):
        assert torch.equal(wrap_to(values.to(dtype), a).long(), want), dtype
