"""Multi-tensor Adam/AdamW in Triton: one launch updates every tensor of a (device, dtype) bucket.

The launcher packs one row per tensor (pointers, size, per-tensor bias-corrected scalars) plus a chunk -> tensor map
into a single int64 table, copied to the device once per step. Program `pid` updates chunk `pid`: BLOCK consecutive
elements of one tensor. Runs on the GPU, and on the CPU under TRITON_INTERPRET=1 (the pointers are then host
addresses, which the interpreter dereferences).

Table layout (int64), ROW = 8 columns per tensor, then one entry per chunk:
    [p, g, m, v, vmax, master, numel, chunk_begin] * ntensors  |  float64 bits of [neg_step_size, bc2_sqrt] *
    ntensors  |  tensor index of each chunk
"""

import ctypes
import itertools
import math
from array import array

import torch
import triton
import triton.language as tl

from fastcore_kernels.triton._common import _TL_DTYPE, _cast

ROW = 8
BLOCK = 4096

@triton.jit
def _adam_kernel(
    table,  # int64 table described in the module docstring
    ntensors,
    grad_sign,  # fp32 scalars, rounded from the Python doubles as in csrc/include/fck/adam.h (AdamHyper)
    weight_decay,
    decay_factor,
    lerp_coeff,
    beta2,
    one_minus_beta2,
    eps,
    inv_grad_scale,
    P: tl.constexpr,  # param / grad element type
    S: tl.constexpr,  # state element type (P, or fp32 with master weights)
    MASTER: tl.constexpr,
    AMSGRAD: tl.constexpr,
    L2: tl.constexpr,  # Adam's coupled weight decay
    LERP_SMALL: tl.constexpr,  # torch's lerp formula choice: 1 - beta1 < 0.5
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    t = tl.load(table + ntensors * (ROW + 2) + chunk)
    row = table + t * ROW
    numel = tl.load(row + 6)
    start = (chunk - tl.load(row + 7)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    scal = table + ntensors * ROW + t * 2
    neg_step_size = tl.load(scal).to(tl.float64, bitcast=True).to(tl.float32)
    bc2_sqrt = tl.load(scal + 1).to(tl.float64, bitcast=True).to(tl.float32)

    p_ptr = tl.load(row + 0).to(tl.pointer_type(P))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(S))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(S))

    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    if MASTER:
        w_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        p = tl.load(w_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)

    g = g * inv_grad_scale * grad_sign
    p = p * decay_factor
    if L2:
        g = tl.fma(weight_decay, p, g)
    if LERP_SMALL:
        m = tl.fma(lerp_coeff, g - m, m)
    else:
        m = tl.fma(lerp_coeff, g - m, g)
    v = v * beta2
    v = tl.fma(one_minus_beta2 * g, g, v)
    if AMSGRAD:
        vmax_ptr = tl.load(row + 4).to(tl.pointer_type(S))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(tl.float32), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, _cast(vmax, S), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, _cast(p, P), mask=mask)
    tl.store(m_ptr + offs, _cast(m, S), mask=mask)
    tl.store(v_ptr + offs, _cast(v, S), mask=mask)


def _advance_steps(state_steps: list[torch.Tensor]) -> list[float]:
    """Adds 1 to each one-element float32 CPU step counter and returns the new values.

    Writes through ctypes, as the C++ backends write through a pointer: a tensor op per counter costs 2-4 us of
    dispatch, which for a ResNet's ~100 tensors is more than the GPU needs for the whole update.
    """
    values = []
    for s in state_steps:
        counter = ctypes.c_float.from_address(s.data_ptr())
        counter.value += 1.0
        values.append(counter.value)
    return values


def _step_scalars(lr: float, beta1: float, beta2: float, steps: list[float]) -> array:
    """(-lr / (1 - beta1^step), sqrt(1 - beta2^step)) per tensor, in float64 as in csrc/include/fck/adam.h."""
    per_step = {}
    out = array("d")
    for step in steps:
        pair = per_step.get(step)
        if pair is None:
            pair = per_step[step] = (-(lr / (1 - beta1**step)), math.sqrt(1 - beta2**step))
        out.extend(pair)
    return out


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    master_params: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    inv_grad_scale: float,
) -> None:
    """Launcher with the signature of the `fck::adam_` op; all tensors share a device and a param dtype."""
    if not params:
        return
    n = len(params)
    steps = _advance_steps(state_steps)
    numels = [p.numel() for p in params]
    nchunks = [(x + BLOCK - 1) // BLOCK for x in numels]
    begins = list(itertools.accumulate(nchunks, initial=0))
    total = begins[-1]
    if total == 0:
        return

    def ptrs(ts):
        return [t.data_ptr() for t in ts] if ts else [0] * n

    columns = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(max_exp_avg_sqs),
               ptrs(master_params), numels, begins[:-1])
    rows = torch.stack([torch.frombuffer(array("q", c), dtype=torch.int64) for c in columns], dim=1)
    scal = torch.frombuffer(_step_scalars(lr, beta1, beta2, steps), dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(n), torch.frombuffer(array("q", nchunks), dtype=torch.int64))
    table = torch.cat([rows.view(-1), scal, chunk_tensor])
    device = params[0].device
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)

    p_dtype = _TL_DTYPE[params[0].dtype]
    lerp_weight = float(torch.tensor(1.0 - beta1, dtype=torch.float32))
    lerp_small = lerp_weight < 0.5
    _adam_kernel[(total,)](
        table,
        n,
        -1.0 if maximize else 1.0,
        weight_decay,
        1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
        lerp_weight if lerp_small else lerp_weight - 1.0,
        beta2,
        1.0 - beta2,
        eps,
        inv_grad_scale,
        P=p_dtype,
        S=tl.float32 if master_params else p_dtype,
        MASTER=bool(master_params),
        AMSGRAD=amsgrad,
        L2=weight_decay != 0.0 and not decoupled_weight_decay,
        LERP_SMALL=lerp_small,
        ROW=ROW,
        BLOCK=BLOCK,
        num_warps=8,
    )
