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
