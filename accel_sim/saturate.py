"""Saturating accumulation replayed exactly, vectorized over outputs (and mostly over steps).

docs/datapath.md defines `acc = clamp(acc0)`, then `acc = clamp(acc + p[t])` for t = 0..K-1.
With prefix sums `R[t] = p[0] + ... + p[t]` and `a = clamp(acc0)`, if only the upper bound
ever binds, the recursion has a closed form (a Lindley recursion):

    acc[t] = min(a + R[t], min over u <= t of (hi + R[t] - R[u]))

and only the lower bound can stop it from holding: once `a + min R >= lo` and the sums never
fall by more than the range width (`max R - min R <= hi - lo`), it holds to the end, so the
final value `R[K-1] + min(a, hi - max R)` needs one cumsum and two reductions over K, for
all outputs at once. The mirror image covers outputs that only clip at `lo`, and outputs
that never leave the range keep `a + R[K-1]`. Only outputs whose sums reach both bounds
are replayed by composing the K clamped steps pairwise (`composed_clamps`: log2 K rounds,
vectorized over all of them, in place of K sequential steps).
"""

from __future__ import annotations

import torch

from .ir import Accumulator

REPLAY_ELEMENTS = 1 << 22


def saturating_replay(
    products: torch.Tensor, acc0: torch.Tensor, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final accumulators (M,) of the saturating sums of `products` (M, K) from `acc0` (M,),
    and which outputs clipped at some step (the initial clamp included). Any dtype that
    holds every integer up to twice the largest |prefix sum| + |acc0| + 2**bits exactly
    (float32 below 2**24, as for the GEMMs): then every value computed here is exact."""
    a = acc0.clamp(lo, hi)
    prefix = products.cumsum(1, dtype=products.dtype)
    peak, trough, last = prefix.amax(1), prefix.amin(1), prefix[:, -1]
    over, under = a + peak > hi, a + trough < lo
    narrow = peak - trough <= hi - lo
    result = torch.where(over, last + torch.minimum(a, hi - peak), last + torch.maximum(a, lo - trough))
    result = torch.where(over | under, result, a + last)
    rows = ((over & under) | ((over | under) & ~narrow)).nonzero().squeeze(1)
    if len(rows):
        result[rows] = composed_clamps(products[rows], a[rows], lo, hi)
    return result, (a != acc0) | over | under


def composed_clamps(products: torch.Tensor, value: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The definition, for outputs that clip at both bounds, from a clamped start `value`.

    Step t is the map v -> clamp(v + p[t], lo, hi), and the composition of two maps of the
    form v -> clamp(v + s, L, H) (L <= H) is one again: first (s1, L1, H1), then
    (s2, L2, H2) gives (s1 + s2, clamp(L1 + s2, L2, H2), clamp(H1 + s2, L2, H2)), because
    clamping into [L2, H2] a value clamped into [A, B] clamps it into [clamp(A), clamp(B)].
    Composing neighbours pairwise takes log2(K) rounds over all outputs at once instead of
    K sequential steps; every value stays a sum of contiguous products plus a bound, within
    the exactness limit of `saturating_replay`."""
    s = products
    low, high = torch.full_like(s, lo), torch.full_like(s, hi)
    while s.shape[1] > 1:
        if s.shape[1] % 2:  # an identity step: values entering it are already in [lo, hi]
            s, low, high = (
                torch.nn.functional.pad(t, (0, 1), value=v) for t, v in ((s, 0), (low, lo), (high, hi))
            )
        s1, s2 = s[:, 0::2], s[:, 1::2]
        low2, high2 = low[:, 1::2], high[:, 1::2]
        low, high = (low[:, 0::2] + s2).clamp(low2, high2), (high[:, 0::2] + s2).clamp(low2, high2)
        s = s1 + s2
    return (value + s[:, 0]).clamp(low[:, 0], high[:, 0])


def patch_offsets(xp: torch.Tensor, kernel: int) -> torch.Tensor:
    """(K,) offsets into a contiguous (N, C, H, W) input of a patch's elements, in the
    product order t = (c*k + i)*k + j."""
    _, c, h, w = xp.shape
    channel, row, col = torch.meshgrid(
        *(torch.arange(s, device=xp.device) for s in (c, kernel, kernel)), indexing="ij"
    )
    return (channel * (h * w) + row * w + col).reshape(-1)


def replay_at_risk(
    acc: torch.Tensor,
    at_risk: torch.Tensor,
    xp: torch.Tensor,
    weight_rows: torch.Tensor,
    init: torch.Tensor,
    accumulator: Accumulator,
    kernel: int,
    stride: int,
    images: int,
) -> torch.Tensor:
    """Write the saturating sums of the outputs marked `at_risk` into `acc`; return how many
    clipped, per candidate (R,).

    `acc` and `at_risk` are (R*N, O, H, W): R candidates of N images each. `xp` is the input,
    padded, either shared (N, ...) or per candidate (R*N, ...); `weight_rows` (Rw, O, K) and
    `init` (Ri, O) hold one row per candidate or one for all (Rw, Ri = 1), in the dtype the
    replay runs in (see `saturating_replay`). Products are formed for a chunk of outputs
    at a time, REPLAY_ELEMENTS products at most.
    """
    rw, o_ch, k = weight_rows.shape
    weight_table = weight_rows.reshape(rw * o_ch, k)
    flat = xp.contiguous().view(-1)
    offsets = patch_offsets(xp, kernel)
    _, c, h, w = xp.shape
    clipped_by_candidate = torch.zeros(acc.shape[0] // images, dtype=torch.int64, device=acc.device)
    for part in at_risk.nonzero().split(max(1, REPLAY_ELEMENTS // k)):
        row, o, y, x = part.unbind(1)
        candidate = row // images
        batch = row % images if xp.shape[0] == images else row
        corner = batch * (c * h * w) + (y * stride) * w + x * stride
        products = torch.take(flat, corner[:, None] + offsets).to(weight_rows.dtype)
        products.mul_(weight_table.index_select(0, (candidate if rw > 1 else 0) * o_ch + o))
        start = init[candidate if len(init) > 1 else 0, o]
        values, clipped = saturating_replay(products, start, accumulator.lo, accumulator.hi)
        acc[row, o, y, x] = values.to(acc.dtype)
        clipped_by_candidate.index_add_(0, candidate, clipped.to(torch.int64))
    return clipped_by_candidate
