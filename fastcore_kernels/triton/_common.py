"""Pieces every Triton kernel of the package shares."""

import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


@triton.jit
def _cast(x, DT: tl.constexpr):
    """fp32 -> DT with round-to-nearest-even. Done by hand for bf16: the CPU interpreter truncates that conversion
    while the GPU rounds, and the two must agree."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # keep NaN a NaN
    else:
        return x.to(DT)


@triton.jit
def _probe_kernel(out, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out + offs, offs + 1)


def interpreter_runs() -> bool:
    """Whether Triton's CPU interpreter really runs kernels here: Triton 3.0's does nothing at all under numpy 2
    (every load reads zeros, every store is dropped), which would leave outputs unwritten."""
    out = torch.zeros(4, dtype=torch.int32)
    _probe_kernel[(1,)](out, 4)
    return out.tolist() == [1, 2, 3, 4]
