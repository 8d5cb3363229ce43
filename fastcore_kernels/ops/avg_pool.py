"""2-D average pooling (fastcore_kernels.functional.avg_pool2d, nn.AvgPool2d): checks, backend dispatch, autograd.

Backends: "cpu" (C++, csrc/cpu/avg_pool.cpp) for NCHW input, "reference" (torch's avg_pool2d, the specification).
torch's CPU kernel for NCHW sums each window element by element (Inception's 3x3 stride-1 pool over 16x192x35x35
takes ~15 ms on two cores, 33 times a copy of the tensor); ours sums the window's rows, then its columns. Where
torch's kernels are good already the op is torch's: channels_last input, CUDA tensors (cuDNN), integer dtypes, and
while torch.compile traces (Inductor generates its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fastcore_kernels import _backend
from fastcore_kernels.ops.max_pool import _planar_float, _pooled_size
from fastcore_kernels.reference import avg_pool as reference

IMPLEMENTED = ("reference", "cpu")


def register_fake() -> None:
    """The C++ ops' fake kernels, and autograd registered on the ops (so a torch.jit.trace of a model records the op
    and its gradient still works where the trace is loaded). The backward op is linear in the output's gradient
    and its own gradient is the forward: a double backward runs the same kernels."""
    def fwd(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        shape = F.avg_pool2d(torch.empty(x.shape, device="meta"), kernel_size, stride, padding, ceil_mode,
                             count_include_pad, divisor_override).shape
        return x.new_empty(shape)

    torch.library.register_fake("fck::avg_pool2d_fwd")(fwd)
    torch.library.register_fake("fck::avg_pool2d_bwd")(lambda grad, input_size, *args: grad.new_empty(input_size))
    torch.library.register_autograd("fck::avg_pool2d_fwd", _forward_backward, setup_context=_forward_setup)
    torch.library.register_autograd("fck::avg_pool2d_bwd", _backward_backward, setup_context=_backward_setup)


def _forward_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape)
    ctx.args = inputs[1:]


def _forward_backward(ctx, grad):
    gx = torch.ops.fck.avg_pool2d_bwd(grad.contiguous(), ctx.input_size, *ctx.args)
    return (gx,) + (None,) * 6


def _backward_setup(ctx, inputs, output):
    ctx.args = inputs[2:]


def _backward_backward(ctx, grad):
    return (torch.ops.fck.avg_pool2d_fwd(grad.contiguous(), *ctx.args),) + (None,) * 7


# The kernel keeps three plane-sized buffers per thread (the padded plane, its row sums, its window sums): planes
# above 4M values (16 MB each in fp32; 2048 x 2048) go to torch's op, which needs none.
_MAX_PLANE = 1 << 22


def _ours(x, k, s, p, ceil_mode, divisor_override) -> bool:
    """Whether our kernel serves this call: a float NCHW input (not channels_last) with a valid configuration and
    planes of at most _MAX_PLANE values. Anything else goes to torch's op, which raises torch's errors for bad
    arguments."""
    if not _planar_float(x) or divisor_override == 0 or x.shape[-2] * x.shape[-1] > _MAX_PLANE:
        return False
    if min(k) <= 0 or min(s) <= 0 or min(p) < 0 or 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        return False
    return all(_pooled_size(*dims, 1, ceil_mode) > 0 for dims in zip(x.shape[-2:], k, s, p))


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, backend=None):
    """torch.nn.functional.avg_pool2d: the same values and gradients (to rounding: the sums run in another
    order)."""
    impl = _backend.resolve(input.device, backend, IMPLEMENTED, "avg_pool2d")
    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride)
    p = _pair(padding)
    if impl == "reference" or _backend.compiling() or not _ours(input, k, s, p, ceil_mode, divisor_override):
        return reference.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override)
    x = input.unsqueeze(0) if input.dim() == 3 else input
    out = torch.ops.fck.avg_pool2d_fwd(x.contiguous(), list(k), list(s), list(p), bool(ceil_mode),
                                       bool(count_include_pad), None if divisor_override is None
                                       else int(divisor_override))
    return out.squeeze(0) if input.dim() == 3 else out
