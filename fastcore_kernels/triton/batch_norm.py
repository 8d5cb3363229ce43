"""Batch norm (+ residual add, + ReLU) in Triton, forward and backward, for the math of csrc/include/fck/batch_norm.h.

Every kernel sees the input as (N, C, S) with element strides (sN, sC, sS), so one set of kernels serves contiguous
NC(S) and channels-last memory; rows r = n * S + s run over the N*S elements of a channel. A program owns BLOCK_C
channels and a range of rows, walked in [BLOCK_R, BLOCK_C] tiles.

Forward (training): `_stats` writes per-program partial (mean, M2) of x - x[row 0] — each tile's exactly, merged with
Chan's formula — then `_finalize_forward` merges the partials per channel, updates the running statistics and writes mean/invstd,
then `_forward` normalizes. Backward: `_backward_reduce` writes partial sums of g and g * (x - mean), then
`_finalize_backward` turns them into grad_weight, grad_bias and per-channel coefficients, then `_backward` writes
grad_input (and grad_residual). Accumulation is fp32, or fp64 for float64 inputs.
"""

import math
import struct

import torch
import triton
import triton.language as tl

from fastcore_kernels.triton._common import _TL_DTYPE, _cast


@triton.jit
def _tile_offsets(pid_c, r0, R, S, sN, sC, sS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, C):
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    n = rows // S
    s = rows - n * S
    offs = (n * sN + s * sS)[:, None] + cols.to(tl.int64)[None, :] * sC
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return offs, mask, rows < R


@triton.jit
def _chan_merge(cnt, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.'s merge of (count, mean, M2) statistics (fck::welford_merge)."""
    total = cnt + n_b
    delta = mean_b - mean
    w_b = n_b / total
    return total, mean + delta * w_b, m2 + m2_b + delta * delta * cnt * w_b


@triton.jit
def _stats(
    X,  # input, (N, C, S) with strides (sN, sC, sS)
    PART_MEAN,  # [programs along rows, C] partial means (ACC)
    PART_M2,  # [programs along rows, C] partial sums of squared deviations (ACC)
    R, C, S, sN, sC, sS,
    ROWS_PER_PROG,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    r_begin = pid_r * ROWS_PER_PROG
    r_end = tl.minimum(r_begin + ROWS_PER_PROG, R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    # Statistics of x - x[row 0]: small exact values, so fp32 sums and merges stay accurate when |mean| >> std
    # (near 1e4, fp32 cannot hold the mean to better than 5e-4, and that error would enter M2 squared).
    pivot = tl.load(X + cols.to(tl.int64) * sC, mask=cols < C, other=0).to(ACC)
    cnt = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs, mask, rmask = _tile_offsets(pid_c, r0, r_end, S, sN, sC, sS, BLOCK_R, BLOCK_C, C)
        x = tl.load(X + offs, mask=mask, other=0).to(ACC)
        x = tl.where(mask, x - pivot[None, :], 0)
        nb = tl.sum(rmask.to(ACC), axis=0)
        tile_mean = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - tile_mean[None, :], 0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, nb, tile_mean, tl.sum(d * d, axis=0))
    tl.store(PART_MEAN + pid_r * C + cols, mean, mask=cols < C)
    tl.store(PART_M2 + pid_r * C + cols, m2, mask=cols < C)


@triton.jit
def _finalize_forward(
    X, sC,  # the input, for each channel's pivot x[row 0]
    PART_MEAN, PART_M2, P, ROWS_PER_PROG, R,
    RUNNING_MEAN, RUNNING_VAR,  # [C], any float dtype, updated in place when training
    MEAN, INVSTD,  # [C] ACC outputs
    C, momentum_hi, momentum_lo, eps_hi, eps_lo,  # each the sum of two fp32 values: see _two_floats
    TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    momentum = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    if TRAINING:
        cnt = tl.zeros([BLOCK_C], ACC)
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
        for j in range(0, P):
            nb = tl.minimum(ROWS_PER_PROG, R - j * ROWS_PER_PROG).to(ACC)
            pm = tl.load(PART_MEAN + j * C + cols, mask=cmask, other=0)
            pq = tl.load(PART_M2 + j * C + cols, mask=cmask, other=0)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, nb, pm, pq)
        var = m2 / cnt
        mean += tl.load(X + cols.to(tl.int64) * sC, mask=cmask, other=0).to(ACC)
        if HAS_RUNNING:
            rm = tl.load(RUNNING_MEAN + cols, mask=cmask).to(ACC)
            rv = tl.load(RUNNING_VAR + cols, mask=cmask).to(ACC)
            rm = rm * (1 - momentum) + mean * momentum
            rv = rv * (1 - momentum) + var * (cnt / (cnt - 1)) * momentum
            tl.store(RUNNING_MEAN + cols, rm.to(RUNNING_MEAN.dtype.element_ty), mask=cmask)
            tl.store(RUNNING_VAR + cols, rv.to(RUNNING_VAR.dtype.element_ty), mask=cmask)
    else:
        mean = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0).to(ACC)
        var = tl.load(RUNNING_VAR + cols, mask=cmask, other=1).to(ACC)
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(INVSTD + cols, 1 / tl.sqrt(var + eps), mask=cmask)


@triton.jit
def _forward(
    X, RES, Y,  # input, residual, output: same shape and strides
    MEAN, INVSTD, W, B,  # [C]
    R, C, S, sN, sC, sS,
    ROWS_PER_PROG,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    r_begin = tl.program_id(1) * ROWS_PER_PROG
    r_end = tl.minimum(r_begin + ROWS_PER_PROG, R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(MEAN + cols, mask=cmask, other=0)
    k = tl.load(INVSTD + cols, mask=cmask, other=0)
    if HAS_W:
        k = k * tl.load(W + cols, mask=cmask, other=0).to(ACC)
    if HAS_B:
        beta = tl.load(B + cols, mask=cmask, other=0).to(ACC)
    else:
        beta = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs, mask, _ = _tile_offsets(pid_c, r0, r_end, S, sN, sC, sS, BLOCK_R, BLOCK_C, C)
        x = tl.load(X + offs, mask=mask, other=0).to(ACC)
        z = (x - mean[None, :]) * k[None, :] + beta[None, :]
        if HAS_RES:
            z += tl.load(RES + offs, mask=mask, other=0).to(ACC)
        if RELU:
            z = tl.where(z < 0, 0, z)
        tl.store(Y + offs, _cast(z, Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_through_relu(DY, Y, offs, mask, RELU: tl.constexpr, ACC: tl.constexpr):
    g = tl.load(DY + offs, mask=mask, other=0).to(ACC)
    if RELU:
        y = tl.load(Y + offs, mask=mask, other=0).to(ACC)
        g = tl.where(y <= 0, 0, g)
    return g


@triton.jit
def _backward_reduce(
    DY, X, Y, MEAN,
    PART_G, PART_GX,  # [programs along rows, C] partial sums of g and g * (x - mean)
    R, C, S, sN, sC, sS,
    ROWS_PER_PROG,
    RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    r_begin = pid_r * ROWS_PER_PROG
    r_end = tl.minimum(r_begin + ROWS_PER_PROG, R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(MEAN + cols, mask=cmask, other=0)
    sg = tl.zeros([BLOCK_C], ACC)
    sgx = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs, mask, _ = _tile_offsets(pid_c, r0, r_end, S, sN, sC, sS, BLOCK_R, BLOCK_C, C)
        g = _grad_through_relu(DY, Y, offs, mask, RELU, ACC)
        x = tl.load(X + offs, mask=mask, other=0).to(ACC)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * tl.where(mask, x - mean[None, :], 0), axis=0)
    tl.store(PART_G + pid_r * C + cols, sg, mask=cmask)
    tl.store(PART_GX + pid_r * C + cols, sgx, mask=cmask)


@triton.jit
def _finalize_backward(
    PART_G, PART_GX, P,
    INVSTD, W,  # [C]
    DW, DB, COEF,  # [C] grad_weight and grad_bias (ACC); COEF [3, C]: k, mean_g, c
    C, R,  # R: values per channel, an integer (as a Python float it would reach the kernel as fp32)
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    count = tl.cast(R, ACC)
    sg = tl.zeros([BLOCK_C], ACC)
    sgx = tl.zeros([BLOCK_C], ACC)
    for j in range(0, P):
        sg += tl.load(PART_G + j * C + cols, mask=cmask, other=0)
        sgx += tl.load(PART_GX + j * C + cols, mask=cmask, other=0)
    invstd = tl.load(INVSTD + cols, mask=cmask, other=0)
    k = invstd
    if HAS_W:
        k = k * tl.load(W + cols, mask=cmask, other=0).to(ACC)
    tl.store(DW + cols, sgx * invstd, mask=cmask)
    tl.store(DB + cols, sg, mask=cmask)
    tl.store(COEF + cols, k, mask=cmask)
    if TRAINING:
        tl.store(COEF + C + cols, sg / count, mask=cmask)
        tl.store(COEF + 2 * C + cols, sgx * invstd * invstd / count, mask=cmask)
    else:
        tl.store(COEF + C + cols, tl.zeros([BLOCK_C], ACC), mask=cmask)
        tl.store(COEF + 2 * C + cols, tl.zeros([BLOCK_C], ACC), mask=cmask)


@triton.jit
def _backward(
    DY, X, Y, DX, DRES, MEAN, COEF,
    R, C, S, sN, sC, sS,
    ROWS_PER_PROG,
    RELU: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    r_begin = tl.program_id(1) * ROWS_PER_PROG
    r_end = tl.minimum(r_begin + ROWS_PER_PROG, R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(MEAN + cols, mask=cmask, other=0)[None, :]
    k = tl.load(COEF + cols, mask=cmask, other=0)[None, :]
    mean_g = tl.load(COEF + C + cols, mask=cmask, other=0)[None, :]
    c = tl.load(COEF + 2 * C + cols, mask=cmask, other=0)[None, :]
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs, mask, _ = _tile_offsets(pid_c, r0, r_end, S, sN, sC, sS, BLOCK_R, BLOCK_C, C)
        g = _grad_through_relu(DY, Y, offs, mask, RELU, ACC)
        x = tl.load(X + offs, mask=mask, other=0).to(ACC)
        # c is 0 in eval mode, where dx does not depend on x (an inf or NaN x must not make it NaN)
        dx = tl.where(c == 0, (g - mean_g) * k, (g - mean_g - (x - mean) * c) * k)
        tl.store(DX + offs, _cast(dx, DX.dtype.element_ty), mask=mask)
        if HAS_DRES:
            tl.store(DRES + offs, _cast(g, DRES.dtype.element_ty), mask=mask)


def _laid_out(x: torch.Tensor, op: str) -> torch.Tensor:
    """x, which the kernels index as contiguous or channels-last: anything else is refused, as by the C++ ops."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or \
            (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return x
    raise RuntimeError(f"{op}: input must be contiguous or channels_last")


def _like(x, t):
    """An operand the kernels index with x's strides (residual, output, grad_output) laid out like x: itself when it
    is, else a copy. Eager callers pass them so; a compiled graph may not (torch 2.4's inductor lays a convolution's
    output out channels-last while the gradient from a flatten behind it stays NCHW), and reading one with x's
    strides would be a wrong answer, not an error."""
    if t is None or all(n == 1 or a == b for n, a, b in zip(x.shape, x.stride(), t.stride())):
        return t
    return torch.empty_like(x).copy_(t)


def _geometry(x: torch.Tensor):
    """(R, C, S, sN, sC, sS) of x viewed as (N, C, S); x is contiguous or channels-last (checked by the caller)."""
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // max(N * C, 1)
    if x.dim() == 2:
        return N, C, 1, x.stride(0), x.stride(1), 0
    # Spatial dims of a contiguous or channels-last tensor are contiguous among themselves: stride of the last one.
    return N * S, C, S, x.stride(0), x.stride(1), x.stride(-1)


def _blocks(x: torch.Tensor, C: int, R: int):
    """Tile shape and rows per program. Channels-last keeps channels contiguous in a tile, planar keeps rows."""
    channels_fast = x.dim() == 2 or x.stride(1) == 1
    block_c = min(triton.next_power_of_2(C), 64 if channels_fast else 4)
    block_r = max(16, min(triton.next_power_of_2(R), 4096 // block_c))
    n_cblocks = triton.cdiv(C, block_c)
    # Enough programs to fill a GPU (about 4 per SM on large parts), few on the CPU interpreter.
    target = 528 if x.is_cuda else 4
    progs_r = max(1, min(triton.cdiv(R, block_r), target // n_cblocks))
    rows_per_prog = triton.cdiv(triton.cdiv(R, progs_r), block_r) * block_r
    progs_r = triton.cdiv(R, rows_per_prog)
    return block_r, block_c, n_cblocks, progs_r, rows_per_prog


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _two_floats(v: float) -> tuple[float, float]:
    """v as hi + lo, both exact in fp32 (about 48 bits together): Triton passes a Python float to a kernel as fp32,
    which rounded a float64 batch norm's momentum and eps (running statistics off by up to ~1e-7 relative)."""
    v = float(v)
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond fp32's range (older Pythons raise; newer give inf)
        hi = math.inf
    if not math.isfinite(hi):  # inf or NaN, or beyond fp32's range: Triton's own conversion it is
        return v, 0.0
    return hi, v - hi


def batch_norm_fwd(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """The fck::batch_norm_fwd contract: (output, save_mean, save_invstd); shapes and dtypes checked by the caller."""
    x = _laid_out(x, "fck::batch_norm_fwd_triton")
    residual = _like(x, residual)
    acc = _acc(x)
    C = x.shape[1]
    y = torch.empty_like(x)
    mean = torch.empty(C, device=x.device, dtype=acc)
    invstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.zero_(), invstd.zero_()
    R, C, S, sN, sC, sS = _geometry(x)
    block_r, block_c, n_cblocks, progs_r, rpp = _blocks(x, C, R)
    ACC = _TL_DTYPE[acc]
    has_running = running_mean is not None
    dummy = mean  # stands in for absent optional tensors; never read
    if training:
        part_mean = torch.empty(progs_r, C, device=x.device, dtype=acc)
        part_m2 = torch.empty_like(part_mean)
        _stats[(n_cblocks, progs_r)](x, part_mean, part_m2, R, C, S, sN, sC, sS, rpp,
                                     BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC)
    else:
        part_mean = part_m2 = dummy
    _finalize_forward[(n_cblocks,)](
        x, sC, part_mean, part_m2, progs_r, rpp, R,
        running_mean if has_running else dummy, running_var if has_running else dummy,
        mean, invstd, C, *_two_floats(momentum), *_two_floats(eps),
        TRAINING=bool(training), HAS_RUNNING=has_running, BLOCK_C=block_c, ACC=ACC,
    )
    _forward[(n_cblocks, progs_r)](
        x, residual if residual is not None else x, y, mean, invstd,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        R, C, S, sN, sC, sS, rpp,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RELU=bool(relu),
        BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC,
    )
    return y, mean, invstd


def batch_norm_bwd(dy, x, y, weight, save_mean, save_invstd, training, relu, residual_grad):
    """The fck::batch_norm_bwd contract: (grad_input, grad_residual or empty, grad_weight, grad_bias)."""
    x = _laid_out(x, "fck::batch_norm_bwd_triton")
    dy, y = _like(x, dy), _like(x, y)
    acc = _acc(x)
    C = x.shape[1]
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if residual_grad else x.new_empty(0)
    dw = torch.empty(C, device=x.device, dtype=acc)
    db = torch.empty_like(dw)
    if x.numel() == 0:
        return dx, dres, dw.zero_(), db.zero_()
    R, C, S, sN, sC, sS = _geometry(x)
    block_r, block_c, n_cblocks, progs_r, rpp = _blocks(x, C, R)
    ACC = _TL_DTYPE[acc]
    part_g = torch.empty(progs_r, C, device=x.device, dtype=acc)
    part_gx = torch.empty_like(part_g)
    coef = torch.empty(3, C, device=x.device, dtype=acc)
    yy = y if relu else x
    _backward_reduce[(n_cblocks, progs_r)](dy, x, yy, save_mean, part_g, part_gx, R, C, S, sN, sC, sS, rpp,
                                           RELU=bool(relu), BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC)
    _finalize_backward[(n_cblocks,)](part_g, part_gx, progs_r, save_invstd, weight if weight is not None else dw,
                                     dw, db, coef, C, R,
                                     TRAINING=bool(training), HAS_W=weight is not None, BLOCK_C=block_c, ACC=ACC)
    _backward[(n_cblocks, progs_r)](dy, x, yy, dx, dres if residual_grad else dx, save_mean, coef,
                                    R, C, S, sN, sC, sS, rpp,
                                    RELU=bool(relu), HAS_DRES=bool(residual_grad), BLOCK_R=block_r, BLOCK_C=block_c,
                                    ACC=ACC)
    return dx, dres, dw, db
