"""Batch-norm modules on the fused kernels: drop-ins for torch's (same constructor, parameters, buffers and
state_dict keys, so checkpoints move both ways), plus the fused BN-ReLU, BN-add-ReLU and conv-BN-ReLU blocks.

They subclass torch's classes, so code that checks `isinstance(m, nn.BatchNorm2d)` (weight-decay exclusions,
freezing) keeps working.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from fastcore_kernels import _backend
from fastcore_kernels.nn._script import NotScriptable
from fastcore_kernels.ops.batch_norm import batch_norm_act, residual_in_one_dtype
from fastcore_kernels.ops.conv_bn_relu import FoldCache, conv2d, conv_bn_add_relu, conv_bn_relu, training_conv2d


class _FusedBatchNormMixin(NotScriptable):
    """torch's _BatchNorm.forward bookkeeping (batch counter, momentum=None cumulative average, which statistics
    to use), leading to one fused kernel call."""

    _relu = False
    # What a fused module adds to its batch norm (a ReLU, a residual add, the convolution that absorbed it), or None.
    # torch's SyncBatchNorm.convert_sync_batchnorm rebuilds batch norms from their attributes and would silently
    # drop it. It asks `hasattr(module, "qconfig")` right after the rebuild, so a fused module refuses that one
    # caller there. Only that caller: code that walks every attribute (torch.jit.trace's `dir()` scan,
    # inspect.getmembers) must see a plain missing attribute.
    _fused_extra = None

    @property
    def qconfig(self):
        if self._fused_extra and sys._getframe(1).f_code.co_name == "convert_sync_batchnorm":
            raise TypeError(
                f"{type(self).__name__} is a batch norm fused with {self._fused_extra}: "
                "SyncBatchNorm.convert_sync_batchnorm rebuilds batch norms from their attributes and would drop it "
                "and compute something else. Convert the model before fastcore_kernels.fuse(), which leaves "
                "SyncBatchNorm as it is.")
        try:
            return self.__dict__["_fck_qconfig"]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'qconfig'") from None

    @qconfig.setter
    def qconfig(self, value):
        self.__dict__["_fck_qconfig"] = value

    def _bn_args(self):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        return running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        return batch_norm_act(input, residual, *self._bn_args(), relu=self._relu or residual is not None,
                              name=type(self).__name__)


class BatchNorm1d(_FusedBatchNormMixin, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on the fused kernels: (N, C) or (N, C, L) input."""

    def forward(self, input):
        return super().forward(input)


class BatchNorm2d(_FusedBatchNormMixin, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on the fused kernels: (N, C, H, W), contiguous or channels_last."""

    def forward(self, input):
        return super().forward(input)


class BatchNorm3d(_FusedBatchNormMixin, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on the fused kernels: (N, C, D, H, W)."""

    def forward(self, input):
        return super().forward(input)


class BatchNormReLU1d(BatchNorm1d):
    """relu(BatchNorm1d(x)) in one pass, with BatchNorm1d's parameters and state_dict (the tabular MLP block)."""

    _relu = True
    _fused_extra = "a ReLU"


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x)) in one pass, with BatchNorm2d's parameters and state_dict."""

    _relu = True
    _fused_extra = "a ReLU"


class BatchNormAddReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) in one pass: the tail of a ResNet block. `forward(x, residual)`. Operands of
    different dtypes (autocast's bf16 convolution output, an fp32 identity) meet in the dtype the fused add gave:
    `add_keeps` None promotes (`out + identity`), "input" keeps the batch norm's (`out += identity`), "residual"
    the residual's (`identity += out`); fuse() sets it from the add it replaces."""

    _relu = True
    _fused_extra = "a residual add and a ReLU"
    add_keeps = None

    def forward(self, input, residual=None):
        if residual is None:
            raise TypeError("BatchNormAddReLU2d.forward needs the residual: forward(input, residual)")
        input, residual = residual_in_one_dtype(input, residual, self.add_keeps)
        return _FusedBatchNormMixin.forward(self, input, residual)


class AbsorbedBatchNorm2d(BatchNorm2d):
    """A BatchNorm2d whose work is done by the fused convolution before it (FusedConv2d): it keeps its parameters,
    buffers and state_dict keys where the model had them, and passes its input through."""

    # True where it directly follows its FusedConv2d in a Sequential ((FusedConv2d, this, Identity) when the fusion
    # removed a ReLU): what follows sees the fused output as it would see a stock ReLU's or BN's.
    chained = False
    _fused_extra = "the convolution before it, which does its work"

    def forward(self, input):
        if self.chained:
            return input
        # Otherwise only code that bypasses the fused forward calls this (a U-Net reading a fused encoder's modules:
        # relu(bn1(conv1(x)))). Its next step is often the model's own in-place ReLU, which must not touch the
        # convolution's output: the fused backward saved it for its ReLU mask. A copy when gradients flow.
        return input.clone() if torch.is_grad_enabled() and input.requires_grad else input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", absorbed by the preceding FusedConv2d"


class FusedConv2d(NotScriptable, nn.Conv2d):
    """A Conv2d followed by the batch norm it absorbed and a ReLU: relu(bn(conv(x))) in training (the convolution,
    by Winograd on the CPU where it applies, + the fused BN-ReLU kernel) and a BN-folded convolution with the ReLU
    fused in eval. Absorbed without the ReLU (relu=False: a batch norm followed by something else, or nothing),
    bn(conv(x)): in eval the folded convolution alone, no pass for the batch norm.

    The batch norm module stays registered where it was (as an AbsorbedBatchNorm2d), so state_dict keys do not move;
    this module refers to it without owning it.

    Absorbed with a residual add (residual=True, a ResNet block's tail), it is called as `forward(x, residual)` and
    gives relu(bn(conv(x)) + residual): in training the convolution + the fused batch norm + add + ReLU; in eval on
    NHWC input one oneDNN call with the add and the ReLU in the folded convolution's epilogue. `add_keeps` as
    BatchNormAddReLU2d's.
    """

    _relu = True
    _act = ()  # the absorbed activation module, when not a ReLU (a tuple: not registered as a child)
    _residual = False
    add_keeps = None

    @classmethod
    def absorb(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True, act: nn.Module | None = None,
               residual: bool = False) -> "FusedConv2d":
        """Turn `conv` (an exact nn.Conv2d) into a FusedConv2d and `bn` into its AbsorbedBatchNorm2d, in place; the
        ReLU after them included unless relu=False; or another activation module after them, act (ReLU6, SiLU,
        Hardswish, LeakyReLU, Hardtanh: in eval oneDNN runs it in the convolution's epilogue); or a residual add
        and then the ReLU (residual=True)."""
        if bn.num_features != conv.out_channels:
            raise ValueError(f"cannot fuse: {bn.num_features} batch-norm features after {conv.out_channels} "
                             "convolution channels")
        if residual and act is not None:
            raise ValueError("cannot fuse: a residual add is absorbed with a ReLU only")
        conv.__class__ = cls
        bn.__class__ = AbsorbedBatchNorm2d
        conv._absorbed = [bn]  # a list: not registered as a child, so it is not saved twice
        conv._relu = (relu and act is None) or residual
        conv._act = () if act is None else (act,)
        conv._residual = residual
        return conv

    @property
    def bn(self) -> AbsorbedBatchNorm2d:
        return self._absorbed[0]

    def forward(self, input, residual=None):
        if self._residual != (residual is not None):
            raise TypeError("FusedConv2d.forward: " + ("this module absorbed a residual add: forward(input, residual)"
                                                       if self._residual else "takes no residual"))
        bn = self.bn
        running_mean, running_var, weight, bias, use_batch_stats, factor, eps = bn._bn_args()
        if residual is not None:
            padding = self.padding
            if self.padding_mode != "zeros":  # padded here, so the convolution pads nothing
                input, padding = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
            compiling = _backend.compiling()
            fold_cache = None if compiling else self.__dict__.setdefault("_fold_cache", FoldCache())
            raw_cache = None if compiling else self.__dict__.setdefault("_raw_cache", FoldCache())
            return conv_bn_add_relu(input, residual, self.weight, self.bias, running_mean, running_var, weight, bias,
                                    use_batch_stats, factor, eps, self.stride, padding, self.dilation, self.groups,
                                    fold_cache=fold_cache, raw_cache=raw_cache, add_keeps=self.add_keeps)
        if use_batch_stats:
            y = (training_conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
                 if self.padding_mode == "zeros" else self._conv_forward(input, self.weight, self.bias))
            y = batch_norm_act(y, None, running_mean, running_var, weight, bias, True, factor, eps, self._relu,
                               name="FusedConv2d")
            return self._act[0](y) if self._act else y
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        # absorb() swaps the class, so no __init__ made the cache. A compiled graph folds inline and keeps none
        # (torch 2.4's export cannot trace the dict call).
        cache = None if _backend.compiling() else self.__dict__.setdefault("_fold_cache", FoldCache())
        return conv_bn_relu(input, self.weight, self.bias, running_mean, running_var, weight, bias, False, factor,
                            eps, self.stride, padding, self.dilation, self.groups, fold_cache=cache, relu=self._relu,
                            act=self._act[0] if self._act else None)


class Conv2d(NotScriptable, nn.Conv2d):
    """nn.Conv2d's drop-in: what fuse() makes of a convolution nothing absorbed (DenseNet's after their BN-ReLU, one
    called twice). Winograd (3x3, stride 1) or our depthwise kernels where they apply, in training and in eval; in
    eval otherwise oneDNN with the packed weight kept between calls. The state_dict of nn.Conv2d."""

    _relu = False

    def forward(self, input):
        if self.padding_mode != "zeros":
            y = self._conv_forward(input, self.weight, self.bias)
            return torch.relu(y) if self._relu else y
        cache = None if _backend.compiling() else self.__dict__.setdefault("_fold_cache", FoldCache())
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                      fold_cache=cache, relu=self._relu)


class ConvReLU2d(Conv2d):
    """A Conv2d followed by the ReLU fuse() removed (VGG's and AlexNet's layers, any convolution without a batch
    norm): relu(conv(x)), the convolution as Conv2d's, in eval with the ReLU in the convolution's epilogue. The
    state_dict of nn.Conv2d."""

    _relu = True


class ConvBNReLU2d(NotScriptable, nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU as one fused block, with the state_dict of `nn.Sequential(Conv2d, BatchNorm2d,
    ReLU)` (keys `0.weight`, `1.weight`, `1.running_mean`, ...), the layout of fastai's ConvLayer and torchvision's
    Conv2dNormActivation. Children: 0 a FusedConv2d, 1 its AbsorbedBatchNorm2d, 2 an Identity."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        kw = {"device": device, "dtype": dtype}
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, **kw)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **kw)
        super().__init__(FusedConv2d.absorb(conv, bn), bn, nn.Identity())
        bn.chained = True

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "ConvBNReLU2d":
        """A block around existing modules (they are converted in place and shared)."""
        block = cls.__new__(cls)
        nn.Sequential.__init__(block, FusedConv2d.absorb(conv, bn), bn, nn.Identity())
        bn.chained = True
        return block
