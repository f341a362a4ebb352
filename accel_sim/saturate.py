"""Saturating accumulation replayed exactly, vectorized over outputs and over the K products.

docs/datapath.md defines `acc = clamp(acc0)`, then `acc = clamp(acc + p[t])` for t = 0..K-1.
With prefix sums `R[t] = p[0] + ... + p[t]` and `a = clamp(acc0)`, if only the upper bound
ever binds, the recursion has a closed form (a Lindley recursion):

    acc[t] = min(a + R[t], min over u <= t of (hi + R[t] - R[u]))

and only the lower bound can stop it from holding: once `a + min R >= lo` and the sums never
fall by more than the range width (`max R - min R <= hi - lo`), it holds to the end, so the
final value `R[K-1] + min(a, hi - max R)` needs one cumsum and two reductions over K. The
mirror image covers outputs that only clip at `lo`. The few outputs left (their sums sweep
the whole range) are replayed phase by phase: the one-bound form holds from any value until
the first step that crosses the other bound, where the true value is that bound; each phase
is one vectorized pass over all those outputs and steps, so the loop runs over crossings,
not over the K steps. Sums that keep crossing (an accumulator barely wider than one
product) finish with the step-by-step definition after MAX_PHASES passes, so no output
costs more than a few passes over its K products.
"""

from __future__ import annotations

import torch

from .ir import Accumulator

REPLAY_ELEMENTS = 1 << 20
MAX_PHASES = 4


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
        result[rows] = _crossings(prefix[rows], a[rows], lo, hi)
    return result, (a != acc0) | over | under


def _crossings(prefix: torch.Tensor, value: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Outputs whose sums sweep the whole range: one pass per phase between crossings, each
    the one-bound closed form (mirrored for the lower bound), from the bound just crossed."""
    m, k = prefix.shape
    dtype, device = prefix.dtype, prefix.device
    no_bound = torch.iinfo(dtype).max // 4 if not dtype.is_floating_point else 2 / torch.finfo(dtype).eps
    steps = torch.arange(k, device=device)
    start = torch.zeros(m, dtype=torch.int64, device=device)
    base = torch.zeros(m, dtype=dtype, device=device)
    rising = torch.ones(m, dtype=torch.bool, device=device)
    pending = torch.arange(m, device=device)
    phases = 0

    def pick(up: torch.Tensor, if_up: int, if_down: int) -> torch.Tensor:
        return torch.where(up, if_up, if_down).to(dtype)

    while len(pending):
        if phases == MAX_PHASES:
            value[pending] = _stepwise(prefix[pending], value[pending], start[pending], lo, hi)
            break
        phases += 1
        up = rising[pending]
        sign = pick(up, 1, -1)
        run = (prefix[pending] - base[pending, None]) * sign[:, None]
        before = steps < start[pending, None]
        room = torch.where(before, no_bound, pick(up, hi, -lo)[:, None] - run).cummin(1).values
        a = (value[pending] * sign)[:, None]
        level = run + torch.minimum(a, room)
        exits = (level < pick(up, lo, -hi)[:, None]) & ~before
        exited = exits.any(1)
        stay = ~exited
        value[pending[stay]] = level[stay, -1] * sign[stay]
        moved = pending[exited]
        first = exits[exited].to(torch.int8).argmax(1)
        value[moved] = pick(rising[moved], lo, hi)
        base[moved] = prefix[moved, first]
        start[moved] = first + 1
        rising[moved] = ~rising[moved]
        pending = moved
    return value


def _stepwise(
    prefix: torch.Tensor, value: torch.Tensor, start: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """The definition itself, from each row's step `start` on: for sums that keep sweeping
    the range (each phase then covers a few steps), a loop over K is the cheaper one."""
    products = torch.diff(prefix, dim=1, prepend=torch.zeros_like(prefix[:, :1]))
    for t in range(int(start.min()), prefix.shape[1]):
        value = torch.where(start <= t, (value + products[:, t]).clamp(lo, hi), value)
    return value


def patch_offsets(xp: torch.Tensor, kernel: int) -> torch.Tensor:
    """(K,) offsets into a contiguous (N, C, H, W) input of a patch's elements, in the
    product order t = (c*k + i)*k + j."""
    _, c, h, w = xp.shape
    channel, row, col = torch.meshgrid(
        *(torch.arange(s, device=xp.device) for s in (c, kernel, kernel)), indexing="ij"
    )
    return (channel * (h * w) + row * w + col).reshape(-1)


def patches(
    flat: torch.Tensor,
    shape: torch.Size,
    offsets: torch.Tensor,
    batch: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    stride: int,
) -> torch.Tensor:
    """(M, K) input patches of outputs (batch, y, x), gathered from the flattened input."""
    _, c, h, w = shape
    corner = batch * (c * h * w) + (y * stride) * w + x * stride
    return torch.take(flat, corner[:, None] + offsets)


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
) -> int:
    """Write the saturating sums of the outputs marked `at_risk` into `acc`; return how many clipped.

    `acc` and `at_risk` are (R*N, O, H, W): R candidates of N images each. `xp` is the input,
    padded, either shared (N, ...) or per candidate (R*N, ...); `weight_rows` (Rw, O, K) and
    `init` (Ri, O) hold one row per candidate or one for all (Rw, Ri = 1), in the dtype the
    replay runs in (see `saturating_replay`).
    """
    index = at_risk.nonzero()
    chunk = max(1, REPLAY_ELEMENTS // weight_rows.shape[-1])
    flat = xp.contiguous().view(-1)
    offsets = patch_offsets(xp, kernel)
    clipped_total = 0
    for part in index.split(chunk):
        row, o, y, x = part.unbind(1)
        candidate = row // images
        batch = row % images if xp.shape[0] == images else row
        w = weight_rows[candidate if len(weight_rows) > 1 else 0, o]
        start = init[candidate if len(init) > 1 else 0, o]
        products = patches(flat, xp.shape, offsets, batch, y, x, stride).to(w.dtype) * w
        values, clipped = saturating_replay(products, start, accumulator.lo, accumulator.hi)
        acc[row, o, y, x] = values.to(acc.dtype)
        clipped_total += int(clipped.sum())
    return clipped_total
