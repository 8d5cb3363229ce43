"""`conv_bn_relu`: relu(batch_norm(conv2d(x))) as one op.

Training: the convolution runs on cuDNN/oneDNN through torch (on the CPU a 3x3 stride-1 convolution, its input
gradient and its weight gradient by our Winograd kernels), then the fused batch-norm-ReLU kernel of
ops/batch_norm.py; autograd through both is exact. Eval: batch norm is a per-channel affine map, so it is folded
into the convolution's weight and bias (w' = w * gamma/std, b' = (b - mean) * gamma/std + beta) and the ReLU is
fused into the convolution: one pass over the output instead of three. On the CPU a 3x3 stride-1 convolution runs as
our Winograd F(4x4, 3x3) kernel (csrc/cpu/conv_winograd.cpp; 4x fewer multiplies than a direct convolution), others
on oneDNN; on CUDA on cuDNN; conv2d + in-place ReLU elsewhere. Modules keep the folded (and packed) weights between
eval calls (FoldCache).

FCK_CONV_WINOGRAD picks the CPU Winograd tile: 4 (default; fp32 results within ~2e-5 of the largest output, as
cuDNN's and oneDNN's Winograd algorithms), 2 (F(2x2, 3x3): 2.25x fewer multiplies, rounding as a direct
convolution's) or 0 (never; oneDNN's direct convolution).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastcore_kernels import _backend
from fastcore_kernels._ext import extension
from fastcore_kernels.ops._autocast import autocast_dtype, lower
from fastcore_kernels.ops._graph import grads_with_graph
from fastcore_kernels.ops.batch_norm import batch_norm_act, residual_in_one_dtype


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


def epilogue(act):
    """For an activation module after a convolution (and its batch norm) that oneDNN can run in the convolution's
    epilogue: (oneDNN's name for it, its scalars, the same activation in place on a tensor); None for others."""
    t = type(act)
    if t is nn.ReLU6 or t is nn.Hardtanh:
        lo, hi = float(act.min_val), float(act.max_val)
        return "hardtanh", [lo, hi], lambda y: F.hardtanh_(y, lo, hi)
    if t is nn.SiLU:
        return "swish", [], lambda y: F.silu(y, inplace=True)
    if t is nn.Hardswish:
        return "hardswish", [], lambda y: F.hardswish(y, inplace=True)
    if t is nn.LeakyReLU:
        slope = float(act.negative_slope)
        return "leaky_relu", [slope], lambda y: F.leaky_relu_(y, slope)
    return None


def _onednn_conv_relu(x, w, b, stride, padding, dilation, groups, fold_cache=None, relu=True, act=None):
    """oneDNN's convolution on a weight kept reordered into its blocked layout for this input shape (repacked when
    either changes), with the ReLU in its epilogue (without one: relu=False; another activation: act, an
    epilogue() triple); None where that does not apply or would not win, and the caller runs torch's convolution
    and the activation in place. oneDNN's fused op on a plain weight ran at torch's convolution's speed plus ~45 us
    a call, which a batch of one's small layers feel (50 against 8 us for 1 -> 16 channels at 28x28).
    Prepacked, oneDNN runs in NHWC (the AMD host, N=64, 3x3 C->C: 212 -> 164 ms at 56x56, 166 -> 126 at 7x7) and
    returns a channels_last tensor, which is copied back to the input's NCHW order in a pooled block (14 ms at
    56x56; a fresh tensor page-faults: 41). Not for fewer than 64 input channels per group: on the Xeon the packed
    path lost there, the layout's copy back costing more than it gains (3x3, N=64: 16 channels at 14x14 283 against
    237 us plain, 32 at 28x28 3.1 against 2.4 ms; a stem's 1 -> 16 at 28x28 2.1 against 0.4 ms), while from 64
    channels up the two ran within 10% either way (a batch of one's 512 channels at 7x7: 0.61 against 1.0 ms).
    Not below _ONEDNN_PACK_MIN_WORK multiply-adds, where the packed path's own costs show (64 channels at 4x4,
    stride 2, batch 1: 41 against 17 us). Not for 1x1 convolutions, whose output copy costs more than the layout
    gains (the Xeon, 8x192x28x28 -> 64 channels: 0.69-0.77 ms plain against 1.3-1.9 prepacked; GoogLeNet's and
    ResNet-50's many 1x1 layers). Those rules are NCHW's: an NHWC input (a model fused with channels_last=True)
    needs no copy, and there the packed weight ran at par or ahead at every size measured (batch 16: 1x1
    1024 -> 256 at 14x14 3.6 against 4.3 ms, 16 -> 96 at 112x112 16.8 against 21.2; depthwise 144 channels at
    56x56 1.13 against 1.66; 3x3 64 -> 64 at 56x56 8.6 both)."""
    found = _onednn_packed(x, w, stride, padding, dilation, groups, fold_cache)
    if found is None:
        return None
    op, packed, args = found
    attr, scalars = act[:2] if act is not None else ("relu" if relu else "none", [])
    y = op(x, packed, b, *args, attr, scalars, "")
    if x.is_contiguous() and not y.is_contiguous():
        y = torch.ops.fck.contiguous_pooled(y) if extension().ok else y.contiguous()
    return y


def _onednn_packed(x, w, stride, padding, dilation, groups, fold_cache):
    """(oneDNN's fused convolution op, the weight packed for this input, its arguments) where the rules of
    _onednn_conv_relu take the packed path, else None."""
    if fold_cache is None or x.dim() != 4 or isinstance(padding, str):
        return None
    # An NHWC input gets its NHWC output back as it is: no copy, so every size rule but the work's is NCHW's
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not nhwc and (w.shape[1] < 64 or w.shape[2] * w.shape[3] == 1):
        return None
    args = (_pair(padding), _pair(stride), _pair(dilation), groups)
    if x.shape[0] * x.shape[2] * x.shape[3] // (args[1][0] * args[1][1]) * w.numel() < _ONEDNN_PACK_MIN_WORK:
        return None
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    reorder = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
    # Not while torch.compile traces: Inductor gets torch's convolution to fuse and plan (and dynamo refuses to
    # trace torch.backends.mkldnn.is_available).
    if (op is None or reorder is None or _backend.compiling() or x.device.type != "cpu" or x.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    key = (tuple(x.shape), *map(tuple, args[:3]), groups)
    return op, fold_cache.packed(w, key, lambda: reorder(w, *args, list(x.shape))), args


def _onednn_conv_add_relu(x, residual, folded, stride, padding, dilation, groups, fold_cache):
    """relu(conv2d(x, w, b) + residual) in one oneDNN call, (w, b) = folded(), the add and the ReLU in the epilogue
    of the convolution on its packed weight, or None where that does not apply: NHWC input and residual only (an
    NCHW input's packed output is NHWC, which an NCHW residual does not match), fp32, outside autocast. Those are
    tested before anything is folded. A ResNet bottleneck's 1x1 layer into 1024 channels at 14x14 (batch 16): 4.0 ms
    against 4.3 for the convolution alone with the ReLU; the batch norm + add + ReLU pass it replaces read two
    tensors of that size and wrote one."""
    if (residual.dtype != x.dtype or residual.dim() != 4 or residual.is_contiguous()
            or not residual.is_contiguous(memory_format=torch.channels_last) or autocast_dtype(x.device) is not None):
        return None
    w, b = folded()
    found = _onednn_packed(x, w, stride, padding, dilation, groups, fold_cache)
    if found is None or not hasattr(found[0], "binary"):
        return None
    op, packed, args = found
    out = [x.shape[0], w.shape[0]] + [(x.shape[i + 2] + 2 * args[0][i] - args[2][i] * (w.shape[i + 2] - 1) - 1)
                                      // args[1][i] + 1 for i in range(2)]
    if list(residual.shape) != out:
        return None  # the unfused path refuses it with its message
    return op.binary(x, residual, packed, b, *args, "add", None, "relu", [], "")


_ONEDNN_PACK_MIN_WORK = 4 << 20


_winograd_cpu: list[bool] = []


def _winograd_available() -> bool:
    """Whether this CPU runs the Winograd kernels (AVX2 + FMA), asked once, outside any torch.jit.trace: the trace
    cannot record an op that returns a bool."""
    if not _winograd_cpu:
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            _winograd_cpu.append(bool(torch.ops.fck.winograd_available()))
        finally:
            torch._C._set_tracing_state(tracing)
    return _winograd_cpu[0]


def _winograd_tile() -> int:
    m = os.environ.get("FCK_CONV_WINOGRAD", "4")
    if m not in ("0", "2", "4"):
        raise ValueError(f"FCK_CONV_WINOGRAD must be 0, 2 or 4, got {m!r}")
    return int(m)


def _dense_nchw_or_nhwc(x) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _winograd_tile_for(x, w, stride, padding, dilation, groups) -> int:
    """The Winograd tile (2 or 4) for this convolution, or 0 where it does not apply or would not win: it needs a
    3x3, stride-1, ungrouped convolution of a dense fp32 CPU input, NCHW or channels_last (the output follows), and
    enough work to pay for its fixed costs: tiles for every thread, _WINOGRAD_MIN_WORK multiply-adds, not both
    channel counts tiny (8 -> 16 lost to oneDNN). On ResNet-34's 3x3 layers at N = 64 it runs 1.2-2x oneDNN.
    The size rules come first: they turn down a batch of one's small layers in a few attribute reads, where the
    other checks cost more than such a convolution's ~10 us."""
    if (groups != 1 or x.dim() != 4 or w.dim() != 4 or w.shape[2] != 3 or w.shape[3] != 3
            or isinstance(padding, str) or not (w.shape[0] >= 32 or w.shape[1] >= 16)):
        return 0
    pad = _pair(padding)
    H, W = x.shape[2] + 2 * pad[0] - 2, x.shape[3] + 2 * pad[1] - 2
    # 2x2 tiles are the most tiles, and the most work, either tile size can give
    if min(H, W) < 1 or _winograd_work(x, w, 2, pad) < _WINOGRAD_MIN_WORK:
        return 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
            or _pair(stride) != [1, 1] or _pair(dilation) != [1, 1] or not _dense_nchw_or_nhwc(x)
            or not extension().ok):
        return 0
    m = _winograd_tile()
    if m == 0 or not _winograd_available():
        return 0
    tiles = x.shape[0] * -(-H // m) * -(-W // m)
    if tiles < 64 * torch.get_num_threads() or _winograd_work(x, w, m, pad) < _WINOGRAD_MIN_WORK:
        return 0
    return m


# Below these multiply-adds in the transformed domain (input channels x output channels x tiles), the Winograd
# kernels' fixed costs (the interleaved copies, the transforms, a weight gradient's per-thread sums) lose to oneDNN:
# measured on this library's Xeon at N = 64, a 64x32x7x7 convolution ran 0.63 ms against oneDNN's 0.43 and the
# weight gradient of a 64x16x14x14 one 0.79 against 0.42, while the weight gradient first wins near 12M (1.6x at
# 64x64x28x28, 0.84x at 64x64x14x14 = 4.2M).
_WINOGRAD_MIN_WORK = 1 << 20
_WINOGRAD_MIN_WEIGHT_GRAD_WORK = 8 << 20


def _winograd_work(x, w, m, pad) -> int:
    H, W = x.shape[2] + 2 * pad[0] - 2, x.shape[3] + 2 * pad[1] - 2
    return w.shape[0] * w.shape[1] * x.shape[0] * -(-H // m) * -(-W // m)


def _winograd_conv_relu(x, w, b, stride, padding, dilation, groups, fold_cache, relu=True):
    """Eval: relu(conv2d(x, w, b)) (without the ReLU: relu=False) by the Winograd kernel, or None where it does not
    apply. The transformed weight is kept in the fold cache (a module's); without one it is made per call (0.2 ms at
    64 x 64 channels, 2.3 ms at 512 x 512: still well ahead of a direct convolution). Not while torch.compile traces
    (the caller passes no cache then either): Inductor gets torch's convolution to fuse and plan."""
    if _backend.compiling():
        return None
    m = _winograd_tile_for(x, w, stride, padding, dilation, groups)
    if not m:
        return None
    make = lambda: torch.ops.fck.winograd_weight(w, m)  # noqa: E731
    u = make() if fold_cache is None else fold_cache.packed(w, ("winograd", m), make)
    return torch.ops.fck.conv3x3_winograd(x, u, b, _pair(padding), w.shape[0], relu)


class _WinogradConv2d(torch.autograd.Function):
    """conv2d for training, all three convolutions by Winograd: the forward, the input gradient (the same 3x3
    convolution of grad_output with the flipped, transposed filters and padding 2 - p) and, for large enough
    convolutions, the weight gradient (dU = V^T dM summed over the tiles in the transformed domain, then G^T dU G;
    oneDNN's below _WINOGRAD_MIN_WEIGHT_GRAD_WORK). The weight is transformed every call: it changes every step."""

    @staticmethod
    def forward(ctx, x, w, b, pad, m):
        ctx.save_for_backward(x, w)
        ctx.pad, ctx.m, ctx.has_bias = pad, m, b is not None
        ctx.winograd_weight_grad = _winograd_work(x, w, m, pad) >= _WINOGRAD_MIN_WEIGHT_GRAD_WORK
        return torch.ops.fck.conv3x3_winograd(x, torch.ops.fck.winograd_weight(w, m), b, pad, w.shape[0], False)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: torch's convolution re-run and differentiated, as a graph
            return _conv_grads_with_graph(ctx, gy, x, w)
        if not _dense_nchw_or_nhwc(gy):  # a slice of a larger gradient: torch.cat's backward (DenseNet's blocks)
            nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            gy = gy.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            ut = torch.ops.fck.winograd_weight(w, ctx.m, True)
            gx = torch.ops.fck.conv3x3_winograd(gy, ut, None, [2 - p for p in ctx.pad], w.shape[1], False)
        if ctx.needs_input_grad[1] and ctx.winograd_weight_grad:
            gw = torch.ops.fck.conv3x3_winograd_weight_grad(x, gy, ctx.pad, ctx.m)
        elif ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], ctx.pad, [1, 1], False, [0, 0], 1,
                                                     [False, True, False])[1]
        if ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None


def _conv_grads_with_graph(ctx, gy, x, w):
    """_WinogradConv2d's gradients as differentiable ops, for a backward that builds a graph (a gradient penalty):
    the Winograd kernels' results carry none. The bias adds nothing to the convolution's Jacobian, so only x and w
    take part in the re-run."""
    need = ctx.needs_input_grad
    gx, gw = grads_with_graph(F.conv2d(x, w, None, 1, ctx.pad), gy, (x, w), need[:2])
    return gx, gw, gy.sum((0, 2, 3)) if need[2] else None, None, None


def training_conv2d(x, w, b, stride, padding, dilation, groups):
    """F.conv2d for conv-BN-ReLU's training forward: by Winograd where it applies (see _WinogradConv2d), depthwise
    convolutions by our depthwise kernels (_DepthwiseConv2d). Inside
    torch.autocast in its dtype, as torch's convolution (oneDNN's bf16 AMX kernels on this CPU ran a 32-channel
    28x28 layer at twice our fp32 Winograd's speed)."""
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        x, w, b = lower((x, w, b), dtype)
    plain = _backend.compiling() or _backend.transformed()
    if not plain and _depthwise_applies(x, w, b, padding, dilation, groups):
        return _DepthwiseConv2d.apply(x, w, b, _pair(stride), _pair(padding))
    m = 0 if plain else _winograd_tile_for(x, w, stride, padding, dilation, groups)
    if m and max(_pair(padding)) <= 2:
        return _WinogradConv2d.apply(x, w, b, _pair(padding), m)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


_cudnn_conv_relu_works = True


def _cudnn_conv_relu(x, w, b, stride, padding, dilation, groups):
    """cuDNN's convolution with bias and ReLU in one kernel, or None where it does not apply."""
    global _cudnn_conv_relu_works
    if x.device.type != "cuda" or not _cudnn_conv_relu_works:
        return None
    op = getattr(torch, "cudnn_convolution_relu", None)
    if (op is None or not torch.backends.cudnn.enabled or x.dtype not in (torch.float32, torch.float16)
            or isinstance(padding, str) or x.dim() != 4):
        return None
    try:
        return op(x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups)
    except RuntimeError as e:  # a build without it: say so once, then take the unfused path
        _cudnn_conv_relu_works = False
        warnings.warn(f"conv_bn_relu: cuDNN's fused convolution-ReLU is unavailable ({e}); using conv2d + relu_")
        return None


class _FoldEntry:
    """What one set of source tensors gave: the folded (weight, bias), and one packed form of the folded weight for
    the last key a backend asked with."""

    __slots__ = ("sources", "eps", "folded", "pack")

    def __init__(self, tensors, eps, folded):
        self.sources = tuple((t, None if t is None else t.data_ptr(), None if t is None else t._version)
                             for t in tensors)
        self.eps, self.folded, self.pack = eps, folded, (None, None)

    def matches(self, tensors, eps):
        return eps == self.eps and len(tensors) == len(self.sources) and all(
            t is s and (t is None or (t.data_ptr() == p and t._version == v))
            for t, (s, p, v) in zip(tensors, self.sources))


class FoldCache:
    """The folded weight and bias of one module, reused while the tensors they came from are the same objects with
    the same storage and version counter (an in-place update, load_state_dict or `.data =` all show): eval-mode
    inference folds once instead of every call.

    Threads may share it (a model serving requests on several): a call works with the entry it read, a change of
    weights or of the packed form's key replaces an entry or its (key, pack) pair whole, and a packed form is kept
    only for the entry whose folded weight it was made from. Before, two requests of different image sizes could
    swap packed weights between the store and the read (oneDNN's packed weight for another input shape)."""

    def __init__(self):
        self._entry = None

    def get(self, tensors, eps, fold):
        entry = self._entry
        if entry is None or not entry.matches(tensors, eps):
            entry = _FoldEntry(tensors, eps, fold())
            self._entry = entry
        return entry.folded

    @property
    def folded(self):
        return None if self._entry is None else self._entry.folded

    @property
    def pack_key(self):
        return None if self._entry is None else self._entry.pack[0]

    @property
    def pack(self):
        return None if self._entry is None else self._entry.pack[1]

    # What it holds is derived from the module's tensors (and oneDNN's packed weight is an opaque tensor without
    # storage, which deepcopy and pickle refuse): a copied or unpickled module starts with an empty cache.
    def __deepcopy__(self, memo):
        return FoldCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def packed(self, weight, key, make):
        """A backend's packed form of the folded `weight` for `key` (the input shape and convolution arguments),
        made again when the key or the folded weights change; not kept when `weight` is not the cached one (the
        weights changed meanwhile, or autocast cast it)."""
        entry = self._entry
        if entry is None or entry.folded[0] is not weight:
            return make()
        pack_key, pack = entry.pack
        if pack_key != key:
            pack = make()
            entry.pack = (key, pack)
        return pack


def _recorded(*tensors) -> bool:
    """Whether an eval call must run as torch's differentiable ops: under torch.func transforms, under
    torch.jit.trace whatever the grad mode (a trace whose path hung on it would differ from its check's), or with
    gradients to record for any of these tensors."""
    return (_backend.transformed() or torch.jit.is_tracing()
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _folded(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, fold_cache):
    """The batch norm folded into the convolution's (weight, bias): from fold_cache while the tensors it came from
    are unchanged (none: folded now)."""
    def fold():
        return fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, float(eps))

    if fold_cache is None:
        return fold()
    return fold_cache.get((weight, bias, running_mean, running_var, bn_weight, bn_bias), float(eps), fold)


def conv_bn_relu(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training=False, momentum=0.1,
                 eps=1e-5, stride=1, padding=0, dilation=1, groups=1, *, backend=None, fold_cache=None, relu=True,
                 act=None):
    """relu(batch_norm(conv2d(input, weight, bias, stride, padding, dilation, groups), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps)), with torch's argument semantics for both ops; relu=False: the
    batch-normalized convolution alone (in eval, the folded convolution: no pass of its own for the batch norm);
    act: instead of the ReLU, an activation module (ReLU6, Hardtanh, SiLU, Hardswish, LeakyReLU: in eval run in the
    convolution's epilogue, see epilogue()).
    fold_cache (a FoldCache): where the folded weights are kept between eval calls without gradients."""
    relu = relu and act is None
    if training:
        y = training_conv2d(input, weight, bias, stride, padding, dilation, groups)
        y = batch_norm_act(y, None, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps, relu,
                           backend, name="conv_bn_relu")
        return y if act is None else act(y)
    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if running_mean.numel() != weight.shape[0] or running_var.numel() != weight.shape[0]:
        raise RuntimeError(f"running_mean should contain {weight.shape[0]} elements not {running_mean.numel()}")
    if _recorded(input, weight, bias, bn_weight, bn_bias):  # torch's ops on the folded weight
        w, b = fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, float(eps))
        y = F.conv2d(input, w, b, stride, padding, dilation, groups)
        return act(y) if act is not None else torch.relu(y) if relu else y
    cache = None if fold_cache is None or _backend.compiling() else fold_cache
    w, b = _folded(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, cache)
    spec = None if act is None else epilogue(act)
    y = _conv_act(input, w, b, stride, padding, dilation, groups, cache, relu, spec)
    return act(y) if act is not None and spec is None else y


def conv_bn_add_relu(input, residual, weight, bias, running_mean, running_var, bn_weight, bn_bias, training=False,
                     momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, groups=1, *, backend=None,
                     fold_cache=None, raw_cache=None, add_keeps=None):
    """relu(batch_norm(conv2d(input, weight, bias, ...), ...) + residual): a ResNet block's tail from its last
    convolution, torch's semantics for each op (add_keeps: the add's dtype rule, see BatchNormAddReLU2d). Training,
    and eval wherever the fused call below does not apply: the convolution (training_conv2d's kernels, or eval's
    with the weight kept in raw_cache), then the fused batch norm + add + ReLU pass. Eval without gradients on NHWC
    fp32: one oneDNN call on the folded, packed weight (kept in fold_cache) with the add and the ReLU in its
    epilogue, no pass of their own."""
    if (not training and fold_cache is not None and not _backend.compiling()
            and running_mean is not None and running_var is not None
            and running_mean.numel() == weight.shape[0] == running_var.numel()
            and not _recorded(input, residual, weight, bias, bn_weight, bn_bias)):
        y = _onednn_conv_add_relu(
            input, residual, lambda: _folded(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps,
                                             fold_cache), stride, padding, dilation, groups, fold_cache)
        if y is not None:
            return y
    y = (training_conv2d(input, weight, bias, stride, padding, dilation, groups) if training else
         conv2d(input, weight, bias, stride, padding, dilation, groups, fold_cache=raw_cache))
    y, residual = residual_in_one_dtype(y, residual, add_keeps)
    return batch_norm_act(y, residual, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, True,
                          backend, name="conv_bn_add_relu")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, fold_cache=None, relu=False):
    """conv2d(input, weight, bias, stride, padding, dilation, groups), torch's semantics; relu=True: relu(conv2d(...)).
    Recorded for a backward: the convolution of training_conv2d (Winograd or our depthwise kernels where they apply),
    then torch's ReLU. Otherwise the fastest kernel that applies (_conv_act), the ReLU in its epilogue, with the
    weight kept packed in fold_cache between calls."""
    if _backend.transformed() or torch.jit.is_tracing():
        y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        y = training_conv2d(input, weight, bias, stride, padding, dilation, groups)
    else:
        cache = None if fold_cache is None or _backend.compiling() else fold_cache
        if cache is not None:  # nothing to fold: the cache keys the packed weight on these tensors' versions
            cache.get((weight, bias), 0.0, lambda: (weight, bias))
        return _conv_act(input, weight, bias, stride, padding, dilation, groups, cache, relu)
    return torch.relu(y) if relu else y


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, fold_cache=None):
    """relu(conv2d(input, weight, bias, stride, padding, dilation, groups)), torch's semantics: conv2d(...,
    relu=True)."""
    return conv2d(input, weight, bias, stride, padding, dilation, groups, fold_cache=fold_cache, relu=True)


def _conv_act(input, w, b, stride, padding, dilation, groups, cache, relu, spec=None):
    """Eval: conv2d, + ReLU (relu) or + another activation (spec, an epilogue() triple), by the fastest kernel
    that applies: our depthwise kernel, Winograd (another activation then in place), oneDNN on a packed weight
    (with the activation in its epilogue), cuDNN (ReLU), torch's conv2d (the activation in place)."""
    dtype = autocast_dtype(input.device)
    if dtype is not None:  # torch's convolution would run in autocast's dtype: ours does too
        input, w, b = lower((input, w, b), dtype)
    y = _depthwise_conv(input, w, b, stride, padding, dilation, groups, relu, spec)
    if y is not None:
        return y
    y = _winograd_conv_relu(input, w, b, stride, padding, dilation, groups, cache, relu)
    if y is not None:
        return spec[2](y) if spec else y
    y = _onednn_conv_relu(input, w, b, stride, padding, dilation, groups, cache, relu, spec)
    if y is None and relu:
        y = _cudnn_conv_relu(input, w, b, stride, padding, dilation, groups)
    if y is None:
        y = F.conv2d(input, w, b, stride, padding, dilation, groups)
        y = spec[2](y) if spec else y.relu_() if relu else y
    return y


# Depthwise layers on planes smaller than this stay oneDNN's: at 7x7 (960 channels, N = 16) it ran at par with ours
# (0.50 against 0.54 ms), from 14x14 up ours won (1.1 against 0.73 ms) and by 8-9x at 56x56 and 112x112. Planes
# above _DEPTHWISE_MAX_PLANE too: the kernels keep a few plane-sized buffers per thread.
_DEPTHWISE_MIN_PLANE = 144
_DEPTHWISE_MAX_PLANE = 1 << 22
_DEPTHWISE_ACTS = {"none": 0, "relu": 1, "hardtanh": 2, "leaky_relu": 3, "hardswish": 4, "swish": 0}


def _depthwise_applies(x, w, b, padding, dilation, groups) -> bool:
    """Whether our depthwise kernels take this convolution: one filter a channel, fp32 NCHW on the CPU, planes of
    _DEPTHWISE_MIN_PLANE to _DEPTHWISE_MAX_PLANE values, not while torch.compile traces."""
    # groups first: every training convolution asks, and most are not depthwise
    return not (groups == 1 or _backend.compiling() or x.device.type != "cpu" or x.dtype != torch.float32
                or w.dtype != torch.float32 or (b is not None and b.dtype != torch.float32) or x.dim() != 4
                or not x.is_contiguous() or x.shape[1] != groups or w.shape[0] != groups
                or w.shape[1] != 1 or isinstance(padding, str) or _pair(dilation) != [1, 1]
                or not _DEPTHWISE_MIN_PLANE <= x.shape[2] * x.shape[3] <= _DEPTHWISE_MAX_PLANE
                or not extension().ok)


def _depthwise_conv(x, w, b, stride, padding, dilation, groups, relu, spec):
    """Eval: a depthwise convolution (one filter a channel) + its activation by our kernel
    (csrc/cpu/depthwise_conv.cpp), or None where it does not apply or would not win. SiLU's exp runs as torch's,
    in place on the output."""
    if not _depthwise_applies(x, w, b, padding, dilation, groups):
        return None
    name, scalars = spec[:2] if spec else ("relu" if relu else "none", [])
    y = torch.ops.fck.depthwise_conv2d(x, w.contiguous(), b, _pair(stride), _pair(padding), _DEPTHWISE_ACTS[name],
                                       scalars)
    return F.silu(y, inplace=True) if name == "swish" else y


class _DepthwiseConv2d(torch.autograd.Function):
    """A depthwise conv2d for training on our kernels (csrc/cpu/depthwise_conv.cpp): the forward, the input gradient
    (the forward transposed) and the weight gradient (each tap's sum of products over every image's plane). oneDNN's
    NCHW kernels took 58 ms for MobileNet v2's 96-channel 112x112 layer's backward."""

    @staticmethod
    def forward(ctx, x, w, b, stride, pad):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.pad = stride, pad
        return torch.ops.fck.depthwise_conv2d(x, w.contiguous(), b, stride, pad, 0, [])

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: torch's convolution re-run and differentiated, as a graph
            gx, gw = grads_with_graph(F.conv2d(x, w, None, ctx.stride, ctx.pad, 1, x.shape[1]), gy, (x, w), need[:2])
            return gx, gw, gy.sum((0, 2, 3)) if need[2] else None, None, None
        gy = gy.contiguous()
        gx = gw = gb = None
        k = list(w.shape[2:])
        if need[0]:
            gx = torch.ops.fck.depthwise_conv2d_input_grad(gy, w.contiguous(), list(x.shape), ctx.stride, ctx.pad)
        if need[1]:
            gw = torch.ops.fck.depthwise_conv2d_weight_grad(x, gy, k, ctx.stride, ctx.pad)
        if need[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None
