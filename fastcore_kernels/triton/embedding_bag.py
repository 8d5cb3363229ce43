"""Embedding bags in Triton, forward and backward (the fck::embedding_bag_fwd/_bwd contract).

Forward: program (bag, block of BLOCK_D columns) walks its bag's indices and reduces the rows in fp32 (fp64 for
float64 weights). Backward: program (index, column block) adds its index's scaled gradient row into an fp32 grad
buffer with atomic adds ('max': program (bag, column block) adds each column to the row it came from). Atomic
adds make the summation order vary from run to run; under `torch.use_deterministic_algorithms(True)` the backward
instead gathers the per-index rows and lets torch's deterministic index_add_ sum them.
"""

import torch
import triton
import triton.language as tl

from fastcore_kernels.reference.embedding_bag import check_bags, per_index_scale
from fastcore_kernels.triton._common import _TL_DTYPE, _cast


@triton.jit
def _forward(
    W,  # [num_weights, D] weight
    IDX,  # [n] indices (int32/int64)
    OFF,  # [bags + 1] offsets, ending with n
    PSW,  # [n] per-sample weights (HAS_PSW)
    OUT,  # [bags, D] output
    ARG,  # [bags, D] int64: row of each maximum, -1 for an empty bag (MODE 2)
    D, pad,
    MODE: tl.constexpr, HAS_PSW: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(OFF + b).to(tl.int64)
    end = tl.load(OFF + b + 1).to(tl.int64)
    if MODE == 2:
        acc = tl.full([BLOCK_D], float("-inf"), ACC)
    else:
        acc = tl.zeros([BLOCK_D], ACC)
    arg = tl.full([BLOCK_D], -1, tl.int64)
    count = tl.zeros([BLOCK_D], ACC)
    for i in range(start, end):
        r = tl.load(IDX + i).to(tl.int64)
        keep = r != pad
        row = tl.load(W + r * D + cols, mask=cmask & keep, other=0).to(ACC)
        if MODE == 2:
            better = keep & ((arg < 0) | (row > acc))  # the first maximum wins, as torch's
            acc = tl.where(better, row, acc)
            arg = tl.where(better, r, arg)
        else:
            if HAS_PSW:
                row = row * tl.load(PSW + i).to(ACC)
            acc += row
        count += keep.to(ACC)
    if MODE == 1:
        acc = acc / tl.maximum(count, 1)
    if MODE == 2:
        acc = tl.where(arg < 0, 0, acc)
        tl.store(ARG + b * D + cols, arg, mask=cmask)
    tl.store(OUT + b * D + cols, _cast(acc, OUT.dtype.element_ty), mask=cmask)


@triton.jit
def _backward(
    G,  # [bags, D] grad_output
    IDX, BAG,  # [n] indices and the bag of each
    SCALE,  # [n] per-index factor (ACC): per-sample weight, 1/count for mean, 0 for padding
    GW,  # [num_weights, D] fp32/fp64 grad accumulator
    D,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    s = tl.load(SCALE + i)
    if s != 0:
        r = tl.load(IDX + i).to(tl.int64)
        b = tl.load(BAG + i).to(tl.int64)
        g = tl.load(G + b * D + cols, mask=cmask, other=0).to(ACC)
        tl.atomic_add(GW + r * D + cols, g * s, mask=cmask)


@triton.jit
def _backward_max(G, ARG, GW, D, NW, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    arg = tl.load(ARG + b * D + cols, mask=cols < D, other=-1)
    mask = (cols < D) & (arg >= 0) & (arg < NW)  # an empty bag's -1; any other row outside the table is skipped
    g = tl.load(G + b * D + cols, mask=mask, other=0).to(ACC)
    tl.atomic_add(GW + arg * D + cols, g, mask=mask)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 256)


def embedding_bag_fwd(weight, indices, offsets, mode, per_sample_weights, padding_idx):
    # The kernels index packed rows: a strided view (a transposed or sliced table) is read as a copy, here too, as a
    # direct call of the op skips ops/embedding_bag.py.
    weight, indices, offsets = weight.contiguous(), indices.contiguous(), offsets.contiguous()
    per_sample_weights = None if per_sample_weights is None else per_sample_weights.contiguous()
    # The kernels read rows and indices where offsets and indices point; checked here, as the C++ ops check theirs,
    # so that no caller (torch.compile'd code, a direct call of the op) can make them read out of bounds.
    check_bags(indices, offsets, weight.shape[0], "fck::embedding_bag_fwd_triton")
    n_bags, D = offsets.numel() - 1, weight.shape[1]
    out = torch.empty(n_bags, D, device=weight.device, dtype=weight.dtype)
    arg = torch.empty((n_bags, D) if mode == 2 else (0,), device=weight.device, dtype=torch.long)
    if n_bags == 0 or D == 0:
        return out, arg
    acc = _TL_DTYPE[torch.float64 if weight.dtype == torch.float64 else torch.float32]
    block = _block_d(D)
    psw = per_sample_weights
    _forward[(n_bags, triton.cdiv(D, block))](
        weight, indices, offsets, psw if psw is not None else weight, out, arg if mode == 2 else out, D,
        int(padding_idx), MODE=int(mode), HAS_PSW=psw is not None, BLOCK_D=block, ACC=acc)
    return out, arg


def embedding_bag_bwd(grad, indices, offsets, max_indices, num_weights, mode, per_sample_weights, padding_idx):
    grad, indices, offsets, max_indices = (t.contiguous() for t in (grad, indices, offsets, max_indices))
    if grad.dim() != 2 or grad.shape[0] != offsets.numel() - 1:
        raise RuntimeError("fck::embedding_bag_bwd_triton: grad_output must be a (bags, dim) tensor")
    if mode == 2 and max_indices.shape != grad.shape:
        raise RuntimeError("fck::embedding_bag_bwd_triton: max_indices must be the forward's (bags, dim) tensor")
    if mode != 2:  # 'max' reads only max_indices, bounded in the kernel
        check_bags(indices, offsets, num_weights, "fck::embedding_bag_bwd_triton")
    D = grad.shape[1]
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    gw = torch.zeros(num_weights, D, device=grad.device, dtype=acc_dtype)
    if grad.numel() == 0 or indices.numel() == 0:
        return gw.to(grad.dtype)
    acc, block = _TL_DTYPE[acc_dtype], _block_d(D)
    if mode == 2:
        _backward_max[(grad.shape[0], triton.cdiv(D, block))](grad, max_indices, gw, D, num_weights, BLOCK_D=block,
                                                               ACC=acc)
        return gw.to(grad.dtype)
    scale, bags = per_index_scale(indices, offsets, int(mode), per_sample_weights, int(padding_idx), False, acc_dtype)
    if torch.are_deterministic_algorithms_enabled():
        return gw.index_add_(0, indices.long(), grad.to(acc_dtype)[bags] * scale[:, None]).to(grad.dtype)
    _backward[(indices.numel(), triton.cdiv(D, block))](grad, indices, bags, scale, gw, D, BLOCK_D=block, ACC=acc)
    return gw.to(grad.dtype)
