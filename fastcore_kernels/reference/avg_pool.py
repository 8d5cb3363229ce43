"""2-D average pooling, the specification: torch's own avg_pool2d. Each output is the sum of its window's input
values over the divisor: the window's rows times its columns, counted inside the padded input
(count_include_pad) or inside the input alone, or divisor_override; the backward gives each input the sum of the
gradients of the windows that hold it, each over its window's divisor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def avg_pool2d(x: torch.Tensor, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
               divisor_override):
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
