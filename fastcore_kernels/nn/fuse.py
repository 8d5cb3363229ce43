"""`fuse(model)`: swap the fused modules into a model the user already has.

Patterns, found in `nn.Sequential` containers by position and in any other module's forward with torch.fx (one
module at a time, its children kept as leaves, so the user's classes survive everywhere the patterns are absent):

    Conv2d -> BatchNorm2d -> ReLU          conv becomes FusedConv2d, the BN its AbsorbedBatchNorm2d
    Conv2d -> BatchNorm2d -> ReLU6, SiLU,  FusedConv2d with that activation (in eval oneDNN runs it in the
      Hardswish, LeakyReLU, Hardtanh     folded convolution's epilogue: MobileNet's, EfficientNet's blocks)
    Conv2d -> BatchNorm2d (anything else)  the same without the ReLU (in eval, the folded convolution alone)
    Conv2d -> ReLU                         ConvReLU2d (Winograd where it applies, the ReLU in the epilogue)
    any other Conv2d                       the fastcore_kernels drop-in (Winograd, our depthwise kernels)
    Conv2d -> BatchNorm2d -> + -> ReLU     FusedConv2d with the residual add, called as conv(x, residual)
    BatchNorm2d -> (+ residual) -> ReLU    BatchNormAddReLU2d, called as bn(x, residual)
    BatchNorm1d/2d -> ReLU                 BatchNormReLU1d/2d
    any other BatchNorm1d/2d/3d            the fastcore_kernels drop-in
    Embedding, EmbeddingBag                the fastcore_kernels drop-ins
    LSTM, GRU, LSTMCell, GRUCell           the fastcore_kernels drop-ins
    MaxPool2d, AvgPool2d                   the fastcore_kernels drop-ins (a ResNet stem's pool, DenseNet's)
    F.max_pool2d, F.avg_pool2d calls       fastcore_kernels' functions (Inception's blocks pool functionally)

Modules are converted in place (their class changes; parameters, buffers and hooks stay), and fused-away ReLUs
disappear from the graph or become nn.Identity, so every parameter and buffer keeps its state_dict key: the fused
model's state_dict loads into the original architecture and back. Only exact torch classes are converted; a user's
subclass of them is left alone and reported.
"""

from __future__ import annotations

import collections
import copy
import operator
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastcore_kernels.nn import batch_norm as fused
from fastcore_kernels.nn import embedding, pool, rnn
from fastcore_kernels.ops.avg_pool import avg_pool2d
from fastcore_kernels.ops.conv_bn_relu import epilogue
from fastcore_kernels.ops.max_pool import max_pool2d

_DROP_IN = {nn.BatchNorm1d: fused.BatchNorm1d, nn.BatchNorm2d: fused.BatchNorm2d, nn.BatchNorm3d: fused.BatchNorm3d,
            nn.Embedding: embedding.Embedding, nn.EmbeddingBag: embedding.EmbeddingBag, nn.LSTM: rnn.LSTM,
            nn.GRU: rnn.GRU, nn.LSTMCell: rnn.LSTMCell, nn.GRUCell: rnn.GRUCell, nn.MaxPool2d: pool.MaxPool2d,
            nn.AvgPool2d: pool.AvgPool2d, nn.Conv2d: fused.Conv2d}
_BN_RELU = {nn.BatchNorm1d: fused.BatchNormReLU1d, nn.BatchNorm2d: fused.BatchNormReLU2d}
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_POOL_FUNCTIONS = {F.max_pool2d: max_pool2d, F.avg_pool2d: avg_pool2d}  # the same signatures


def _is_relu_module(m) -> bool:
    return type(m) is nn.ReLU


class _Fuser:
    def __init__(self, model: nn.Module):
        self.report: list[str] = []
        # Modules that sit in more than one place (shared weights) keep their class: a successor fused into one
        # place would run in the others too.
        seen = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.shared = {i for i, n in seen.items() if n > 1}

    def free(self, *modules) -> bool:
        """None of these sits in more than one place (a shared ReLU does no harm: its slot is what is replaced)."""
        return not any(id(m) in self.shared for m in modules if not _is_relu_module(m))

    # ---- nn.Sequential: patterns by position ----
    def sequential(self, seq: nn.Sequential, prefix: str) -> set[int]:
        mods = list(seq._modules.items())
        done: set[int] = set()
        i = 0
        while i < len(mods):
            name, m = mods[i]
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            nxt2 = mods[i + 2][1] if i + 2 < len(mods) else None
            if not self.free(m, nxt):
                i += 1
            elif type(m) is nn.Conv2d and type(nxt) is nn.BatchNorm2d and _is_relu_module(nxt2):
                fused.FusedConv2d.absorb(m, nxt)
                seq._modules[mods[i + 2][0]] = nn.Identity()
                nxt.chained = True
                self.report.append(f"fused {prefix}{name} + {prefix}{mods[i + 1][0]} + {prefix}{mods[i + 2][0]}: "
                                   "Conv2d -> BatchNorm2d -> ReLU as FusedConv2d")
                done.update((id(m), id(nxt)))
                i += 3
            elif type(m) is nn.Conv2d and type(nxt) is nn.BatchNorm2d and epilogue(nxt2) is not None:
                fused.FusedConv2d.absorb(m, nxt, act=nxt2)
                seq._modules[mods[i + 2][0]] = nn.Identity()
                nxt.chained = True
                self.report.append(f"fused {prefix}{name} + {prefix}{mods[i + 1][0]} + {prefix}{mods[i + 2][0]}: "
                                   f"Conv2d -> BatchNorm2d -> {type(nxt2).__name__} as FusedConv2d")
                done.update((id(m), id(nxt)))
                i += 3
            elif type(m) is nn.Conv2d and type(nxt) is nn.BatchNorm2d:
                fused.FusedConv2d.absorb(m, nxt, relu=False)
                nxt.chained = True
                self.report.append(f"fused {prefix}{name} + {prefix}{mods[i + 1][0]}: Conv2d -> BatchNorm2d as "
                                   "FusedConv2d (no ReLU)")
                done.update((id(m), id(nxt)))
                i += 2
            elif type(m) is nn.Conv2d and _is_relu_module(nxt):
                m.__class__ = fused.ConvReLU2d
                seq._modules[mods[i + 1][0]] = nn.Identity()
                self.report.append(f"fused {prefix}{name} + {prefix}{mods[i + 1][0]}: Conv2d -> ReLU as ConvReLU2d")
                done.add(id(m))
                i += 2
            elif type(m) in _BN_RELU and _is_relu_module(nxt):
                m.__class__ = _BN_RELU[type(m)]
                seq._modules[mods[i + 1][0]] = nn.Identity()
                self.report.append(f"fused {prefix}{name} + {prefix}{mods[i + 1][0]}: BatchNorm -> ReLU as "
                                   f"{type(m).__name__}")
                done.add(id(m))
                i += 2
            else:
                i += 1
        return done

    # ---- any other module: patterns in its own forward, traced with torch.fx ----
    def traced(self, module: nn.Module, prefix: str) -> nn.Module:
        kinds = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
        if not any(type(c) in kinds for c in module.children()) and not _pools_functionally(type(module)):
            return module

        class LeafTracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):  # only this module's own forward goes into the graph
                return True

            def proxy(self, node):
                return _InPlaceProxy(node, self)

        try:
            graph = LeafTracer().trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "leave the module as it is"
            self.report.append(f"left {prefix or type(module).__name__}: torch.fx cannot trace its forward "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            return module
        mods = dict(module.named_children())
        # A module called more than once keeps its class: fusing one call's successor into it would change the
        # others.
        calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
        calls.update(name for name, m in mods.items() if not self.free(m))
        changed = False
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
                self.report.append(f"swapped {prefix}{node.name}: F.{node.target.__name__} call")
                node.target = _POOL_FUNCTIONS[node.target]
                changed = True
                continue
            if (node.op != "call_module" or type(mods.get(node.target)) not in (nn.BatchNorm1d, nn.BatchNorm2d)
                    or calls[node.target] > 1):
                continue
            bn = mods[node.target]
            user = _only_user(node)
            prev = node.args[0] if node.args else None
            conv_before = (isinstance(prev, fx.Node) and prev.op == "call_module" and calls[prev.target] == 1
                           and type(mods.get(prev.target)) is nn.Conv2d and _only_user(prev) is node)
            if type(bn) is nn.BatchNorm2d and conv_before and user is not None and _is_relu_node(user, mods):
                fused.FusedConv2d.absorb(mods[prev.target], bn)
                user.replace_all_uses_with(prev)
                graph.erase_node(user)
                graph.erase_node(node)
                self.report.append(f"fused {prefix}{prev.target} + {prefix}{node.target} + ReLU: Conv2d -> "
                                   "BatchNorm2d -> ReLU as FusedConv2d")
                changed = True
            elif (type(bn) is nn.BatchNorm2d and user is not None and _is_add_node(user)
                  and all(isinstance(a, fx.Node) for a in user.args)  # a tensor residual, not a constant
                  and _only_user(user) is not None and _is_relu_node(_only_user(user), mods)):
                relu = _only_user(user)
                other = user.args[1] if user.args[0] is node else user.args[0]
                # in place: the mutated operand's dtype stays
                keeps = ("input" if user.args[0] is node else "residual") if user.target in (
                    operator.iadd, "add_") else None
                if conv_before:  # the block's last convolution absorbs it all, called as conv(x, residual)
                    target, args = prev.target, (prev.args[0], other)
                    fused.FusedConv2d.absorb(mods[prev.target], bn, residual=True).add_keeps = keeps
                else:
                    target, args = node.target, (node.args[0], other)
                    bn.__class__ = fused.BatchNormAddReLU2d
                    bn.add_keeps = keeps
                with graph.inserting_before(user):  # where both the BN input and the residual exist
                    fused_node = graph.call_module(target, args)
                relu.replace_all_uses_with(fused_node)
                graph.erase_node(relu)
                graph.erase_node(user)
                graph.erase_node(node)
                if conv_before:
                    graph.erase_node(prev)
                    self.report.append(f"fused {prefix}{prev.target} + {prefix}{node.target} + add + ReLU: Conv2d -> "
                                       "BatchNorm2d -> add -> ReLU as FusedConv2d")
                else:
                    self.report.append(f"fused {prefix}{node.target} + add + ReLU as BatchNormAddReLU2d")
                changed = True
            elif user is not None and _is_relu_node(user, mods):
                bn.__class__ = _BN_RELU[type(bn)]
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                self.report.append(f"fused {prefix}{node.target} + ReLU as {type(bn).__name__}")
                changed = True
            elif (type(bn) is nn.BatchNorm2d and conv_before and user is not None and user.op == "call_module"
                  and epilogue(mods.get(user.target)) is not None):
                act = mods[user.target]
                fused.FusedConv2d.absorb(mods[prev.target], bn, act=act)
                user.replace_all_uses_with(prev)
                graph.erase_node(user)
                graph.erase_node(node)
                self.report.append(f"fused {prefix}{prev.target} + {prefix}{node.target} + {prefix}{user.target}: "
                                   f"Conv2d -> BatchNorm2d -> {type(act).__name__} as FusedConv2d")
                changed = True
            elif type(bn) is nn.BatchNorm2d and conv_before:
                fused.FusedConv2d.absorb(mods[prev.target], bn, relu=False)
                node.replace_all_uses_with(prev)
                graph.erase_node(node)
                self.report.append(f"fused {prefix}{prev.target} + {prefix}{node.target}: Conv2d -> BatchNorm2d as "
                                   "FusedConv2d (no ReLU)")
                changed = True
        for node in list(graph.nodes):  # the convolutions no batch norm absorbed
            user = _only_user(node)
            if (node.op == "call_module" and type(mods.get(node.target)) is nn.Conv2d and calls[node.target] == 1
                    and user is not None and _is_relu_node(user, mods)):
                mods[node.target].__class__ = fused.ConvReLU2d
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                self.report.append(f"fused {prefix}{node.target} + ReLU: Conv2d -> ReLU as ConvReLU2d")
                changed = True
        if not changed:
            return module
        graph.lint()
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        # Every child and direct parameter/buffer stays registered under its name and in its order, used by the
        # graph or not (an absorbed batch norm is not called): state_dict keys and parameters() order are unchanged.
        gm._modules = OrderedDict(module._modules)
        gm._parameters = OrderedDict(module._parameters)
        gm._buffers = OrderedDict(module._buffers)
        gm.train(module.training)
        return gm

    def walk(self, module: nn.Module, prefix: str = "") -> nn.Module:
        done = self.sequential(module, prefix) if type(module) is nn.Sequential else set()
        if type(module) is not nn.Sequential and not isinstance(module, (fused.FusedConv2d, fx.GraphModule)):
            module = self.traced(module, prefix)
        for name, child in list(module.named_children()):
            if id(child) in done:
                continue
            new = self.leaf(child, prefix + name) if not list(child.children()) else self.walk(child,
                                                                                              prefix + name + ".")
            if new is not child:
                setattr(module, name, new)
        return module

    def leaf(self, m: nn.Module, name: str) -> nn.Module:
        if type(m) in _DROP_IN:
            m.__class__ = _DROP_IN[type(m)]
            self.report.append(f"swapped {name}: {type(m).__name__} drop-in")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, fused._FusedBatchNormMixin):
            self.report.append(f"left {name}: {type(m).__name__} is not a torch class fuse() converts")
        return m


def _pools_functionally(cls) -> bool:
    """Whether a method of the module's class names max_pool2d or avg_pool2d (torchvision's Inception blocks call
    F.avg_pool2d in their forward): such a module is traced even without convolution or batch-norm children."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn."):
            continue
        for f in vars(klass).values():
            names = getattr(getattr(f, "__code__", None), "co_names", ())
            if "max_pool2d" in names or "avg_pool2d" in names:
                return True
    return False


def _only_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu_node(node: fx.Node, mods: dict) -> bool:
    if node.op == "call_module":
        return _is_relu_module(mods.get(node.target))
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


class _InPlaceProxy(fx.Proxy):
    """torch.fx traces `out += x` as `out = out + x` (its Proxy has no __iadd__), and the regenerated forward then
    computes out of place: under autocast `bf16 + fp32` becomes fp32 where the in-place add kept bf16. Traced as
    operator.iadd, which fx writes back as `out += x`, the semantics stay the module's, and fuse() knows which
    operand's dtype a fused add must keep."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


def _is_add_node(node: fx.Node) -> bool:
    plain = len(node.args) == 2 and not node.kwargs
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and plain
    return node.op == "call_method" and node.target in ("add", "add_") and plain


def fuse(model: nn.Module, inplace: bool = False, verbose: bool = False, channels_last: bool = False) -> nn.Module:
    """The model with fastcore_kernels' fused modules swapped in (see the module docstring for what is fused).

    Outputs and gradients match the original within dtype tolerance in train and eval mode; state_dict keys are
    unchanged. With `inplace=False` the original is left untouched. `verbose=True` prints what was fused, swapped
    and left alone; the same lines are kept in `model.fck_fuse_report`.

    `channels_last=True` also stores the 4-D parameters (convolution weights) channels_last, as
    `model.to(memory_format=torch.channels_last)` does: from the first convolution on, whatever the input's
    layout, activations are NHWC, the layout in which the CPU's oneDNN kernels (depthwise ones above all) and our
    Winograd, batch-norm and pooling kernels run fastest. Values are unchanged; 4-D outputs come back
    channels_last (a `.view` of one that needs NCHW strides raises, `.reshape` works).
    """
    if not inplace:
        model = copy.deepcopy(model)
    fuser = _Fuser(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        fuser.report.append("stored the 4-D parameters channels_last: convolutions run NHWC from the first on")
    if not list(model.children()):
        model = fuser.leaf(model, type(model).__name__)
    else:
        model = fuser.walk(model)
    model.fck_fuse_report = fuser.report
    if verbose:
        print("\n".join(fuser.report) if fuser.report else "fuse: nothing to fuse")
    return model
