"""A second, deliberately plain implementation of docs/datapath.md: int64 numpy, no float.

It shares nothing with accel_sim.functional but the IR data classes. Each accumulation is
replayed product by product in the documented order, so it is slow: use a few images.
"""

from __future__ import annotations

import numpy as np

from accel_sim.ir import Accumulator, Conv2d, GlobalAvgPool, Program, Requant


def overflow(v: np.ndarray, acc: Accumulator) -> np.ndarray:
    lo, hi = -(1 << (acc.bits - 1)), (1 << (acc.bits - 1)) - 1
    if acc.overflow == "wrap":
        return ((v - lo) % (1 << acc.bits)) + lo
    return np.minimum(np.maximum(v, lo), hi)


def pad_with_zero_points(x: np.ndarray, zp: np.ndarray, p: int) -> np.ndarray:
    n, c, h, w = x.shape
    out = np.empty((n, c, h + 2 * p, w + 2 * p), dtype=np.int64)
    for ch in range(c):
        out[:, ch] = zp[ch]
    out[:, :, p : p + h, p : p + w] = x
    return out


def conv_accumulate(op: Conv2d, x: np.ndarray, zp: np.ndarray, acc: Accumulator) -> tuple[np.ndarray, int]:
    """The accumulators, and how many overflowed as docs/datapath.md counts them: in wrap
    mode those whose exact sum leaves [lo, hi]; in saturate mode those where at least one
    step clipped (the initial clamp included)."""
    xp = pad_with_zero_points(x, zp, op.padding)
    n = x.shape[0]
    o_ch, c_ch, k, _ = op.weight.shape
    h_out = (x.shape[2] + 2 * op.padding - k) // op.stride + 1
    w_out = (x.shape[3] + 2 * op.padding - k) // op.stride + 1
    init = op.bias.copy()
    for o in range(o_ch):
        for c in range(c_ch):
            for i in range(k):
                for j in range(k):
                    init[o] -= op.weight[o, c, i, j] * zp[c]
    exact = np.broadcast_to(init[None, :, None, None], (n, o_ch, h_out, w_out)).copy()
    result = overflow(exact, acc)
    clipped = result != exact
    for c in range(c_ch):
        for i in range(k):
            for j in range(k):
                window = xp[
                    :, c, i : i + op.stride * h_out : op.stride, j : j + op.stride * w_out : op.stride
                ]
                for o in range(o_ch):
                    product = op.weight[o, c, i, j] * window
                    exact[:, o] += product
                    unclamped = result[:, o] + product
                    result[:, o] = overflow(unclamped, acc)
                    clipped[:, o] |= result[:, o] != unclamped
    lo, hi = -(1 << (acc.bits - 1)), (1 << (acc.bits - 1)) - 1
    outside = (exact < lo) | (exact > hi)
    return result, int((outside if acc.overflow == "wrap" else clipped).sum())


def requantize(
    rq: Requant,
    acc: np.ndarray,
    out_zp: np.ndarray,
    qmin: int,
    qmax: int,
    program: Program,
    tensors: dict[str, np.ndarray],
) -> np.ndarray:
    o_ch = acc.shape[1]
    v = acc * rq.mult.reshape(1, o_ch, 1, 1) + rq.offset.reshape(1, o_ch, 1, 1)
    if rq.residual is not None:
        res = rq.residual
        r_spec = program.tensors[res.input]
        r_zp = r_spec.zero_points()
        r_in = tensors[res.input][:, :, :: res.stride, :: res.stride]
        a = res.channel_pad[0]
        r = np.zeros_like(v)
        for ch in range(r_in.shape[1]):
            r[:, a + ch] = r_in[:, ch] - r_zp[ch]
        v = v + r * (rq.residual.mult << rq.residual.shift).reshape(1, o_ch, 1, 1)
    out = np.empty_like(v)
    for o in range(o_ch):
        s = int(rq.shift[o])
        u = (v[:, o] + (1 << (s - 1))) >> s if s > 0 else v[:, o]
        out[:, o] = np.minimum(np.maximum(u + out_zp[o], qmin), qmax)
    return out


def run_reference(
    program: Program,
    images: np.ndarray,
    accumulator: Accumulator | None = None,
    overflows: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Every tensor of the program for `images` (N x C x H x W integers), as int64 arrays;
    each conv's overflow count goes into `overflows` when given."""
    acc = accumulator or program.accumulator
    tensors = {program.input: np.asarray(images, dtype=np.int64)}
    for op in program.ops:
        x = tensors[op.input]
        x_spec, y_spec = program.tensors[op.input], program.tensors[op.output]
        if isinstance(op, Conv2d):
            a, count = conv_accumulate(op, x, x_spec.zero_points(), acc)
            if overflows is not None:
                overflows[op.name] = count
        elif isinstance(op, GlobalAvgPool):
            a = (x - x_spec.zero_points().reshape(1, -1, 1, 1)).sum(axis=(2, 3), keepdims=True)
        else:
            raise TypeError(op)
        tensors[op.output] = requantize(
            op.requant, a, y_spec.zero_points(), y_spec.qmin, y_spec.qmax, program, tensors
        )
    return tensors
