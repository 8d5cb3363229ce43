"""Pooling on fastcore_kernels' CPU kernels: drop-ins for torch.nn.MaxPool2d and torch.nn.AvgPool2d (subclasses:
same constructors and attributes, no parameters)."""

from __future__ import annotations

from torch import nn

from fastcore_kernels.nn._script import NotScriptable
from fastcore_kernels.ops.avg_pool import avg_pool2d
from fastcore_kernels.ops.max_pool import max_pool2d


class MaxPool2d(NotScriptable, nn.MaxPool2d):
    """torch.nn.MaxPool2d; NCHW CPU input runs our kernel, everything else torch's (see ops/max_pool.py)."""

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode,
                          return_indices=self.return_indices)


class AvgPool2d(NotScriptable, nn.AvgPool2d):
    """torch.nn.AvgPool2d; NCHW CPU input runs our kernel, everything else torch's (see ops/avg_pool.py)."""

    def forward(self, input):
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                          self.divisor_override)
