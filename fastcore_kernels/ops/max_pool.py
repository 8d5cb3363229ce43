"""2-D max pooling (fastcore_kernels.functional.max_pool2d, nn.MaxPool2d): checks, backend dispatch, autograd.

Backends: "cpu" (C++, csrc/cpu/max_pool.cpp) for NCHW input, "reference" (torch's max_pool2d, the specification).
torch's CPU kernel for NCHW walks each window element by element (a ResNet stem's pool, 16 x 64 x 112 x 112, takes
~45 ms on two cores); ours takes ~3 ms and returns the same values and indices, so the same gradients. Where
torch's kernels are good already the op is torch's: channels_last input (torch has a vectorized kernel for it),
CUDA tensors (cuDNN), integer dtypes, and while torch.compile traces (Inductor generates its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fastcore_kernels import _backend
from fastcore_kernels.reference import max_pool as reference

IMPLEMENTED = ("reference", "cpu")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def register_fake() -> None:
    """The C++ ops' fake kernels, and the forward's autograd (registered on the op, so a torch.jit.trace of a model
    records the op and its gradient still works where the trace is loaded)."""
    def fwd(x, kernel_size, stride, padding, dilation, ceil_mode, save_indices):
        shape = F.max_pool2d(torch.empty(x.shape, device="meta"), kernel_size, stride, padding, dilation,
                             ceil_mode).shape
        return x.new_empty(shape), x.new_empty(shape if save_indices else (0,), dtype=torch.int32)

    torch.library.register_fake("fck::max_pool2d_fwd")(fwd)
    torch.library.register_fake("fck::max_pool2d_bwd")(lambda grad, indices, input_size: grad.new_empty(input_size))
    torch.library.register_autograd("fck::max_pool2d_fwd", _backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.input_shape = inputs[0].shape
    ctx.set_materialize_grads(False)  # else the indices' absent gradient arrives as a zero int32 tensor


def _backward(ctx, grad, _):
    if grad is None:
        return (None,) * 7
    (indices,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # a backward that builds a graph (double backward): the same sums, as ops
        gx = reference.max_pool2d_backward(grad, indices, ctx.input_shape)
    else:
        gx = torch.ops.fck.max_pool2d_bwd(grad.contiguous(), indices, list(ctx.input_shape))
    return gx, None, None, None, None, None, None


def _pooled_size(n, k, s, p, d, ceil_mode) -> int:
    """torch's pooling output size (csrc/include/fck/pool2d.h's pooled_size)."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= n + p else out


def _planar_float(x) -> bool:
    """A non-empty float (C, H, W) or (N, C, H, W) input that is not channels_last: what the pooling kernels take
    (torch has vectorized kernels for channels_last)."""
    if x.dtype not in _DTYPES or x.dim() not in (3, 4) or x.numel() == 0:
        return False
    return not (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))


def _ours(x, k, s, p, d, ceil_mode) -> bool:
    """Whether our kernel serves this call: a float NCHW input (not channels_last, which torch runs well) with a
    valid configuration. Anything else goes to torch's op, which raises torch's errors for bad arguments. (Valid
    configurations whose windows can hold no input at all, a dilated window over a one-row input say, are ours:
    torch's backward writes outside the input for them.)"""
    if not _planar_float(x):
        return False
    if min(k) <= 0 or min(s) <= 0 or min(d) <= 0 or min(p) < 0 or 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        return False
    return all(_pooled_size(*dims, ceil_mode) > 0 for dims in zip(x.shape[-2:], k, s, p, d))


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False, *,
               backend=None):
    """torch.nn.functional.max_pool2d: the same values and indices (int64 positions in each input plane), the same
    gradients."""
    impl = _backend.resolve(input.device, backend, IMPLEMENTED, "max_pool2d")
    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride)
    p, d = _pair(padding), _pair(dilation)
    if impl == "reference" or _backend.compiling() or not _ours(input, k, s, p, d, ceil_mode):
        return reference.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    x = input.unsqueeze(0) if input.dim() == 3 else input
    x = x.contiguous()
    # The indices, when asked for or when a backward will read them; always under torch.jit.trace, whose graph must
    # not depend on the grad mode (its check re-runs without grad) and may be differentiated where it is loaded.
    save = bool(return_indices) or torch.jit.is_tracing() or (torch.is_grad_enabled() and x.requires_grad)
    out, indices = torch.ops.fck.max_pool2d_fwd(x, list(k), list(s), list(p), list(d), bool(ceil_mode), save)
    if input.dim() == 3:
        out, indices = out.squeeze(0), indices.squeeze(0) if return_indices else indices
    return (out, indices.long()) if return_indices else out
