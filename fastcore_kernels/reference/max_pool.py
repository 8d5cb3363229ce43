"""2-D max pooling, the specification: torch's own max_pool2d. Its choices are the contract every backend keeps —
each output is the first maximum of its window in row-major order (a NaN, the last NaN), its index the position
ih * W + iw in its input plane, and the backward adds each output's gradient at that position."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def max_pool2d(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, return_indices: bool):
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                        return_indices=return_indices)


def max_pool2d_backward(grad: torch.Tensor, indices: torch.Tensor, input_shape) -> torch.Tensor:
    """The input's gradient from the output's and the forward's plane indices, as differentiable ops (linear in
    grad): what the kernels' backward computes, for a backward that builds a graph."""
    planes, plane = grad.shape[0] * grad.shape[1], input_shape[-2] * input_shape[-1]
    # A window that holds no input reports an index at or past the plane's end: its gradient goes to a sink column
    # that is dropped, as the kernels send it nowhere.
    flat = grad.new_zeros(planes, plane + 1)
    flat = flat.scatter_add(1, indices.reshape(planes, -1).long().clamp(max=plane), grad.reshape(planes, -1))
    return flat[:, :plane].reshape(input_shape)
