"""Max pooling on fastcore_kernels' CPU kernel: a drop-in for torch.nn.MaxPool2d (a subclass: same constructor and
attributes, no parameters)."""

from __future__ import annotations

from torch import nn

from fastcore_kernels.nn._script import NotScriptable
from fastcore_kernels.ops.max_pool import max_pool2d


class MaxPool2d(NotScriptable, nn.MaxPool2d):
    """torch.nn.MaxPool2d; NCHW CPU input runs our kernel, everything else torch's (see ops/max_pool.py)."""

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode,
                          return_indices=self.return_indices)
