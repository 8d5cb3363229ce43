"""Functional forms of the fused ops, with torch.nn.functional's signatures where torch has the op.

Every function takes a keyword-only `backend` ("auto", "reference", "cpu", "cuda", "triton"); by default the
choice of `fastcore_kernels.set_backend`/`use_backend`/FCK_BACKEND applies.
"""

from __future__ import annotations

from fastcore_kernels.ops.batch_norm import batch_norm_act
from fastcore_kernels.ops.conv_bn_relu import conv_bn_relu
from fastcore_kernels.ops.embedding_bag import embedding, embedding_bag


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               backend=None):
    """torch.nn.functional.batch_norm: statistics in fp32 (float64 for float64 input); running statistics updated
    in place when training (unbiased variance)."""
    return batch_norm_act(input, None, running_mean, running_var, weight, bias, training, momentum, eps, False,
                          backend, "batch_norm")


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5, *, backend=None):
    """relu(batch_norm(input, ...)) in one pass; the backward recovers the ReLU mask from the output."""
    return batch_norm_act(input, None, running_mean, running_var, weight, bias, training, momentum, eps, True,
                          backend, "batch_norm_relu")


def batch_norm_add_relu(input, residual, running_mean, running_var, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-5, *, backend=None):
    """relu(batch_norm(input, ...) + residual): the tail of a ResNet block in one pass."""
    return batch_norm_act(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, True,
                          backend, "batch_norm_add_relu")


__all__ = ["batch_norm", "batch_norm_relu", "batch_norm_add_relu", "conv_bn_relu", "embedding", "embedding_bag"]
