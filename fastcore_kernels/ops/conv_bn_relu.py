"""`conv_bn_relu`: relu(batch_norm(conv2d(x))) as one op.

Training: the convolution runs on cuDNN/oneDNN through torch, then the fused batch-norm-ReLU kernel of
ops/batch_norm.py; autograd through both is exact. Eval: batch norm is a per-channel affine map, so it is folded
into the convolution's weight and bias (w' = w * gamma/std, b' = (b - mean) * gamma/std + beta) and the ReLU is
fused into the convolution by oneDNN on the CPU, or applied in place after it elsewhere: one pass over the output
instead of three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcore_kernels.ops.batch_norm import batch_norm_act


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(u) for u in v]


def fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """The convolution weight and bias with an eval-mode batch norm folded in (differentiable)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    w = (weight.to(acc) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    return w, shift.to(weight.dtype)


def _onednn_conv_relu(x, w, b, stride, padding, dilation, groups):
    """oneDNN's convolution with the ReLU in its epilogue, or None where it does not apply."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if (op is None or not torch.backends.mkldnn.is_available() or x.device.type != "cpu"
            or x.dtype != torch.float32 or isinstance(padding, str) or x.dim() != 4):
        return None
    return op(x, w, b, _pair(padding), _pair(stride), _pair(dilation), groups, "relu", [], "")


def conv_bn_relu(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training=False, momentum=0.1,
                 eps=1e-5, stride=1, padding=0, dilation=1, groups=1, *, backend=None):
    """relu(batch_norm(conv2d(input, weight, bias, stride, padding, dilation, groups), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps)), with torch's argument semantics for both ops."""
    if training:
        y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return batch_norm_act(y, None, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps, True,
                              backend, name="conv_bn_relu")
    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if running_mean.numel() != weight.shape[0] or running_var.numel() != weight.shape[0]:
        raise RuntimeError(f"running_mean should contain {weight.shape[0]} elements not {running_mean.numel()}")
    w, b = fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, float(eps))
    tensors = (input, weight, bias, bn_weight, bn_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return torch.relu(F.conv2d(input, w, b, stride, padding, dilation, groups))
    y = _onednn_conv_relu(input, w, b, stride, padding, dilation, groups)
    if y is None:
        y = F.conv2d(input, w, b, stride, padding, dilation, groups).relu_()
    return y
