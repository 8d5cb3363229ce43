"""The batch-norm modules as drop-ins for torch's, and fuse(model) on Sequential chains and ResNet blocks."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels import nn as fnn

from conftest import ALL_BACKENDS, devices, graph_node_names, skip_unless_runnable, winograd_for_small_shapes


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, line for line: one ReLU module used twice, the add written in place."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's Bottleneck, with the ReLUs called functionally."""

    def __init__(self, inplanes, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return F.relu(self.bn(x))
        return self.bn(x)


def small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        BasicBlock(8, 8),
        BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
        Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3),
    )


def _randomize_bn_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _compare(original, fused_model, x, device, atol=1e-4):
    original, fused_model = original.to(device), fused_model.to(device)
    for mode in ("train", "eval", "train"):
        getattr(original, mode)()
        getattr(fused_model, mode)()
        xa, xb = x.clone().to(device).requires_grad_(), x.clone().to(device).requires_grad_()
        ya, yb = original(xa), fused_model(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=atol, msg=lambda m: f"{mode} output: {m}")
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-3, atol=atol, msg=lambda m: f"{mode} input grad: {m}")
        for (name, p), q in zip(original.named_parameters(), fused_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=atol, msg=lambda m: f"{mode} {name}: {m}")
            p.grad = q.grad = None
    for (name, a), b in zip(original.state_dict().items(), fused_model.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_fuse_resnet_same_outputs_gradients_and_state_dict(device, backend):
    skip_unless_runnable(backend, device)
    torch.manual_seed(0)
    model = small_resnet()
    _randomize_bn_state(model)
    original = copy.deepcopy(model)
    fused_model = fck.fuse(model)
    assert list(fused_model.state_dict()) == list(original.state_dict())
    kinds = {type(m).__name__ for m in fused_model.modules()}
    assert {"FusedConv2d", "AbsorbedBatchNorm2d", "BatchNormReLU1d"} <= kinds
    # each block's tail, Conv2d -> BatchNorm2d -> add -> ReLU, is one FusedConv2d called with the residual
    assert sum(isinstance(m, fnn.FusedConv2d) and m._residual for m in fused_model.modules()) == 3
    # the downsample branch, Conv2d -> BatchNorm2d with no ReLU, is absorbed too
    downsample = [m for m in fused_model.modules() if isinstance(m, fnn.FusedConv2d) and not m._relu]
    assert len(downsample) == 1 and downsample[0].stride == (2, 2)
    assert all(type(m) is not nn.BatchNorm2d for m in fused_model.modules())
    # the original model is untouched by the default inplace=False
    assert all(type(m) in (nn.BatchNorm2d, nn.BatchNorm1d) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    with fck.use_backend(backend):
        _compare(original, fused_model, torch.randn(4, 3, 12, 12), device)
    # checkpoints move both ways
    original.load_state_dict(fused_model.state_dict())
    fused_model.load_state_dict(original.state_dict())


class ResidualFirst(nn.Module):
    """The add written into the identity: `identity += out` keeps the identity's dtype."""

    def __init__(self, planes):
        super().__init__()
        self.conv = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x):
        identity = x.clone()
        identity += self.bn(self.conv(x))
        return F.relu(identity)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fused_resnet_under_autocast(backend):
    """Under autocast a block's convolution output is bf16 and its identity may be fp32: the fused add meets them
    in the dtype the original add gave (`out + x` promoted, `identity += out` the identity's, `out += identity` the
    output's), so every block's output has the original's dtype, and values and gradients agree within bf16."""
    skip_unless_runnable(backend, "cpu")
    torch.manual_seed(1)
    blocks = nn.Sequential(Bottleneck(16, 4), ResidualFirst(16), BasicBlock(16, 16))
    model = nn.Sequential(blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _randomize_bn_state(model)
    original, fused_model = model, fck.fuse(copy.deepcopy(model))
    kept = [str(m.add_keeps) for m in fused_model.modules() if isinstance(m, fnn.FusedConv2d) and m._residual]
    assert kept == ["None", "residual", "input"]
    x = torch.randn(3, 16, 10, 10)
    weights = torch.linspace(-1, 1, 16)
    for mode in ("train", "eval"):
        runs = []
        for m, autocast in ((original, False), (original, True), (fused_model, True)):
            getattr(m, mode)()
            state = copy.deepcopy(m.state_dict())
            seen = []
            hooks = [b.register_forward_hook(lambda _, __, y: seen.append(y.dtype)) for b in m[0]]
            with fck.use_backend(backend), torch.autocast("cpu", enabled=autocast):
                y = m(x)
            for h in hooks:
                h.remove()
            (y.float() * weights).sum().backward()
            runs.append((seen, y, [p.grad.clone() for p in m.parameters()]))
            m.zero_grad()
            m.load_state_dict(state)  # the next run sees the same running statistics
        (_, y32, g32), (seen_a, ya, ga), (seen_b, yb, gb) = runs
        assert seen_a == seen_b == [torch.float32, torch.float32, torch.bfloat16], mode
        assert ya.dtype == yb.dtype == torch.bfloat16
        # against the fp32 run: the fused model's bf16 error is the stock model's, within a factor
        for what, ours, theirs, truth in [("output", [yb], [ya], [y32])] + [
                (f"grad {n}", [b], [a], [t]) for n, a, b, t in zip(
                    [n for n, _ in original.named_parameters()], ga, gb, g32)]:
            err_ours = (ours[0].float() - truth[0]).abs().max().item()
            err_theirs = (theirs[0].float() - truth[0]).abs().max().item()
            scale = truth[0].abs().max().item()
            assert err_ours <= 2 * err_theirs + 1e-2 * scale, f"{mode} {what}: {err_ours} vs stock {err_theirs}"


def test_fuse_channels_last_and_report(capsys):
    torch.manual_seed(0)
    model = small_resnet().to(memory_format=torch.channels_last)
    _randomize_bn_state(model)
    fused_model = fck.fuse(model, verbose=True)
    out = capsys.readouterr().out
    assert "Conv2d -> BatchNorm2d -> ReLU as FusedConv2d" in out
    assert "Conv2d -> BatchNorm2d -> add -> ReLU as FusedConv2d" in out
    assert "fused 4.downsample.0 + 4.downsample.1: Conv2d -> BatchNorm2d as FusedConv2d (no ReLU)" in out
    assert fused_model.fck_fuse_report == out.strip().splitlines()
    _compare(model, fused_model, torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last), "cpu")


def test_fuse_leaves_what_it_cannot_fuse_and_says_so():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Untraceable(), MyBN(4), nn.ReLU())
    fused_model = fck.fuse(model)
    report = "\n".join(fused_model.fck_fuse_report)
    assert "torch.fx cannot trace" in report
    assert "left 1: MyBN" in report
    assert type(fused_model[1]) is MyBN and isinstance(fused_model[2], nn.ReLU)
    assert type(fused_model[0].bn) is fnn.BatchNorm2d  # still swapped as a drop-in
    _compare(model, fused_model, torch.randn(3, 4, 5, 5) + 1, "cpu")


def test_fuse_inplace_and_idempotent():
    model = small_resnet()
    same = fck.fuse(model, inplace=True)
    assert same is model
    again = fck.fuse(model)
    assert again.fck_fuse_report == []


def test_fused_model_survives_deepcopy_and_pickle():
    torch.manual_seed(0)
    fused_model = fck.fuse(small_resnet()).eval()
    x = torch.randn(2, 3, 8, 8)
    buf = io.BytesIO()
    torch.save(fused_model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused_model), torch.load(buf, weights_only=False)):
        assert other[3].conv1.bn is other[3].bn1  # the absorbed BN is still the registered one
        torch.testing.assert_close(other(x), fused_model(x))


def _penalty_derivatives(f, leaves, dy):
    """A gradient penalty's derivatives: g = d <f(), dy> / d leaves with a graph, then d |g|^2 / d leaves."""
    first = torch.autograd.grad((f() * dy).sum(), leaves, create_graph=True)
    penalty = sum((g ** 2).sum() for g in first)
    second = torch.autograd.grad(penalty, leaves, allow_unused=True)  # a last bias only shifts a ReLU's mask
    return [g.detach() for g in first] + [torch.zeros_like(t) if g is None else g for g, t in zip(second, leaves)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_penalty_through_a_fused_model_matches_torch(mode):
    """create_graph=True (a gradient penalty) through a fused model — conv-BN-ReLU blocks, a ResNet block's
    BN-add-ReLU, BN-ReLU — gives the stock model's first and second derivatives (float64)."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    model = small_resnet()
    _randomize_bn_state(model)
    model = model.double()
    fused_model = fck.fuse(model)
    assert any(isinstance(m, fnn.FusedConv2d) for m in fused_model.modules())
    x, dy = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def derivatives(m):
        m = getattr(m, mode)()
        xx = x.clone().requires_grad_()
        leaves = [xx, *m.parameters()]
        return _penalty_derivatives(lambda: m(xx), leaves, dy)

    for got, want in zip(derivatives(fused_model), derivatives(model)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_winograd_training_convolution_double_backward():
    """The training convolution by Winograd (fp32) has a backward that builds no graph; under create_graph it re-runs
    as torch's convolution, so a penalty's derivatives match F.conv2d's."""
    from fastcore_kernels.ops.conv_bn_relu import _winograd_tile_for, training_conv2d
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 48, 32, 32), torch.randn(48, 48, 3, 3) * 0.05, torch.randn(48)
    assert _winograd_tile_for(x, w, 1, 1, 1, 1)  # this shape takes the Winograd kernels
    dy = torch.randn(8, 48, 32, 32)
    for need_x in (True, False):
        results = []
        for conv in (training_conv2d, F.conv2d):
            leaves = [t.clone().requires_grad_(need) for t, need in ((x, need_x), (w, True), (b, True))]
            results.append(_penalty_derivatives(lambda: conv(*leaves, 1, 1, 1, 1), [t for t in leaves
                                                                                     if t.requires_grad], dy))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_sync_batchnorm_conversion_refuses_fused_modules_and_works_before_fuse():
    """torch's SyncBatchNorm.convert_sync_batchnorm rebuilds every batch norm from its attributes: on a fused model it
    would drop the fused ReLU / residual add, and re-normalise the output of a convolution that absorbed its batch
    norm. Each fused module refuses with a clear error; the plain drop-ins convert; converting before fuse() works
    (fuse leaves SyncBatchNorm as it is) and computes what the model did."""
    torch.manual_seed(0)
    model = small_resnet()
    fused_model = fck.fuse(model)
    with pytest.raises(TypeError, match="Convert the model before fastcore_kernels.fuse"):
        nn.SyncBatchNorm.convert_sync_batchnorm(fused_model)
    for m in (fnn.BatchNormReLU1d(3), fnn.BatchNormReLU2d(3), fnn.BatchNormAddReLU2d(3)):
        with pytest.raises(TypeError, match="fused with a"):
            nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(m))
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(fnn.BatchNorm2d(3), fnn.BatchNorm1d(3)))
    assert all(type(m) is nn.SyncBatchNorm for m in plain)
    bn = fnn.BatchNorm2d(3)
    assert not hasattr(bn, "qconfig")
    bn.qconfig = "set"  # the attribute still works on the drop-ins
    assert bn.qconfig == "set"
    synced = fck.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))).eval()
    assert any(type(m) is nn.SyncBatchNorm for m in synced.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(synced(x), model.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (fnn.BatchNorm1d, nn.BatchNorm1d, (6, 5)),
    (fnn.BatchNorm1d, nn.BatchNorm1d, (6, 5, 7)),
    (fnn.BatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 6)),
    (fnn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 2, 4)),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_drop_in_modules_match_torch(cls, torch_cls, shape, momentum):
    torch.manual_seed(0)
    ours, theirs = cls(5, momentum=momentum), torch_cls(5, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs.load_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match="expected"):
        ours(torch.randn(5))


def test_track_running_stats_false_uses_batch_stats_in_eval():
    ours, theirs = fnn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3, track_running_stats=False)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_conv_bn_relu_block_is_sequential_compatible():
    torch.manual_seed(0)
    block = fnn.ConvBNReLU2d(3, 6, 3, stride=2, padding=1)
    seq = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    assert list(block.state_dict()) == list(seq.state_dict())
    seq.load_state_dict(block.state_dict())
    _randomize_bn_state(seq)
    block.load_state_dict(seq.state_dict())
    _compare(seq, block, torch.randn(2, 3, 9, 9), "cpu")


def test_fused_conv_with_reflect_padding_and_bias():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU())
    _randomize_bn_state(seq)
    _compare(seq, fck.fuse(seq), torch.randn(2, 3, 6, 6), "cpu")


def test_batch_norm_add_relu_module_needs_residual():
    m = fnn.BatchNormAddReLU2d(3)
    with pytest.raises(TypeError, match="residual"):
        m(torch.randn(2, 3, 4, 4))


def test_fused_module_compiles_fullgraph():
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 5), nn.BatchNorm1d(5))
    fused_model = fck.fuse(model)
    compiled = torch.compile(fused_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 6, 6, requires_grad=True)
    with fck.use_backend("cpu"):
        y = compiled(x)
        y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y_ref = model(x2)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_model[1].running_var, model[1].running_var)


def test_fused_eval_model_compiles_fullgraph():
    """Eval: the fused convolutions (conv-BN-ReLU, conv-BN-ReLU6 depthwise, conv-ReLU) under torch.compile run
    torch's convolution for Inductor to plan: the whole model compiles as one graph and gives eager's values."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AvgPool2d(2), nn.MaxPool2d(2))
    _randomize_bn_state(model)
    fused_model = fck.fuse(copy.deepcopy(model)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = torch.compile(fused_model, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, model.eval()(x), rtol=1e-4, atol=1e-5)


def test_fuse_leaves_bn_plus_constant_alone():
    class AddConst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return F.relu(self.bn(x) + 1.0)

    model = AddConst()
    fused_model = fck.fuse(model)
    assert type(fused_model.bn) is not fnn.BatchNormAddReLU2d
    _compare(model, fused_model, torch.randn(2, 3, 4, 4), "cpu")


def test_a_sequential_chain_passes_the_fused_output_on_without_a_copy():
    """In a fused (conv, bn, relu) Sequential the absorbed batch norm hands the fused output on as is (a copy of
    every activation cost the vision lessons ~3% of a step); called from outside such a chain it still copies, since
    the caller's own in-place ReLU would otherwise touch the tensor the fused backward saved."""
    seq = fck.fuse(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)))
    block = fck.nn.ConvBNReLU2d(3, 4, 3)
    t = torch.randn(2, 4, 5, 5, requires_grad=True)
    for bn in (seq[1], block[1]):
        assert type(bn) is fck.nn.AbsorbedBatchNorm2d and bn(t) is t
    outside = fck.fuse(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(4)))  # no chain
    assert type(outside[2]) is not fck.nn.AbsorbedBatchNorm2d
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    y = seq(x)
    y.sum().backward()  # the chain's gradient still flows through the fused op
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eval_fold_cache_sees_fused_adam_steps_and_running_statistics():
    """The in-place ops (FusedAdam's step, the batch-norm forward's running statistics) bump version counters as
    torch's in-place ops do, so an eval-mode fused conv-BN-ReLU folds again after a training step: its output
    must match the unfused ops on the updated parameters and statistics. (Without the bumps the fold cache kept
    the weights folded before the step, and validation ran on stale weights.)"""
    from fastcore_kernels.optim import FusedAdam

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
    fused = fck.fuse(seq)
    opt = FusedAdam(fused.parameters(), lr=0.1)
    x = torch.randn(9, 16, 17, 15)  # enough tiles for the CPU's Winograd path, which caches its transform too
    for _ in range(2):
        fused.eval()
        with torch.no_grad():
            fused(x)  # fills the fold cache
        fused.train()
        fused(x).square().mean().backward()
        conv, bn = fused[0], fused[1]  # fuse() copied seq: its batch norm stays registered at index 1
        versions = [p._version for p in fused.parameters()]
        opt.step()
        opt.zero_grad()
        assert all(p._version > v for p, v in zip(fused.parameters(), versions))
        fused.eval()
        with torch.no_grad():
            want = F.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), bn.running_mean,
                                       bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
            torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4)


def test_inplace_ops_bump_version_counters():
    import fastcore_kernels.functional as fckF

    x, rm, rv = torch.randn(8, 4, 5, 5), torch.zeros(4), torch.ones(4)
    fckF.batch_norm_relu(x, rm, rv, None, None, training=True, backend="cpu")
    assert rm._version == 1 and rv._version == 1
    p, g = torch.randn(10), torch.randn(10)
    m, v, s = torch.zeros(10), torch.zeros(10), torch.zeros(())
    torch.ops.fck.adam_([p], [g], [m], [v], [], [], [s], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 1.0)
    assert (p._version, m._version, v._version, s._version, g._version) == (1, 1, 1, 1, 0)


class _ConvBNNoReLU(nn.Module):
    """Conv -> BN chains followed by other activations or by an add, written in a forward (fx's path)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.hardswish(self.bn1(self.conv1(x))) + self.bn2(self.conv2(x))


def test_conv_bn_without_relu_is_absorbed_and_folded_in_eval():
    """Conv2d -> BatchNorm2d followed by anything but a ReLU (MobileNet's ReLU6, EfficientNet's SiLU, a ResNet's
    downsample, a projection before an add): absorbed without the ReLU; in eval the folded convolution does the
    batch norm's work, so no batch-norm op runs at all."""
    torch.manual_seed(0)
    for model in (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                                nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)), _ConvBNNoReLU()):
        _randomize_bn_state(model)
        model = model.double()  # the math, without float32's summation-order noise
        fused_model = fck.fuse(copy.deepcopy(model))
        convs = [m for m in fused_model.modules() if isinstance(m, fnn.FusedConv2d)]
        assert len(convs) == 2 and not any(m._relu for m in convs)
        _compare(model, fused_model, torch.randn(2, 3, 9, 9, dtype=torch.float64), "cpu", atol=1e-9)
        with torch.no_grad(), torch.profiler.profile() as prof:
            fused_model.eval()(torch.randn(2, 3, 9, 9, dtype=torch.float64))
        assert not any("batch_norm" in e.name for e in prof.events())


class _ConvReLUs(nn.Module):
    """Conv -> ReLU in a forward (fx's path), a convolution called twice (left as it is: fusing the ReLU into it
    would change its other call) and a batch norm called twice (the same)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        z = torch.relu(self.conv2(y)) + self.conv2(y)
        return F.relu(self.bn(z)) + self.bn(y)


def test_conv_relu_without_batch_norm(monkeypatch):
    """Conv2d -> ReLU (VGG's, AlexNet's layers) becomes ConvReLU2d: in eval the ReLU runs in the convolution's
    epilogue (by Winograd on the CPU: fp32 within its rounding of torch's), in training Winograd's three
    convolutions then torch's ReLU; float64 runs torch's convolution, so equal to rounding."""
    winograd_for_small_shapes(monkeypatch)
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 16, 1), nn.ReLU())
    model = nn.Sequential(seq, _ConvReLUs())
    model64 = copy.deepcopy(model).double()  # before the fp32 steps move the two models' running statistics apart
    fused_model = fck.fuse(copy.deepcopy(model))
    conv_relus = [n for n, m in fused_model.named_modules() if type(m) is fnn.ConvReLU2d]
    assert conv_relus == ["0.0", "0.2", "0.5", "1.conv1"], conv_relus
    # called twice: not fused with either call's ReLU, only the drop-in
    assert type(fused_model[1].conv2) is fnn.Conv2d and type(fused_model[1].bn) is fnn.BatchNorm2d
    assert fused_model.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(9, 16, 17, 15)  # enough tiles for the CPU's Winograd path
    for train in (True, False):
        if train:  # on a copy: this call's batch must not enter the running statistics
            probe = copy.deepcopy(fused_model)(x.clone().requires_grad_())
            assert any("Winograd" in n for n in graph_node_names(probe)) or not winograd_for_small_shapes(monkeypatch)
        model.train(train), fused_model.train(train)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = model(xs), fused_model(xf)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
        want.square().sum().backward()
        got.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), fused_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-4 * p.grad.abs().max().item(), msg=name)
        torch.testing.assert_close(xf.grad, xs.grad, rtol=0, atol=1e-4 * xs.grad.abs().max().item())
        with torch.no_grad():  # the inference path (epilogue ReLU, packed weights), twice: the cache's second use
            for _ in range(2):
                torch.testing.assert_close(fused_model(x), model(x), rtol=0, atol=1e-5 * scale)
    _compare(model64, fck.fuse(copy.deepcopy(model64)), torch.randn(2, 16, 9, 9, dtype=torch.float64), "cpu",
             atol=1e-9)


# (in, out, kernel, keyword arguments, input shape, the training graph's node): each path of the drop-in Conv2d.
# Winograd (3x3, stride 1, padding up to 2, NCHW and channels_last), our depthwise kernels (planes of 144 values and
# up, any stride), oneDNN (1x1, strided, dilated, grouped, string padding), torch's own (padding modes, unbatched).
_CONV_CASES = [
    (16, 32, 3, {"padding": 1}, (9, 16, 17, 15), "Winograd"),
    (16, 32, 3, {"padding": 1, "bias": False, "channels_last": True}, (9, 16, 17, 15), "Winograd"),
    (16, 24, 3, {"padding": (2, 0)}, (9, 16, 19, 13), "Winograd"),
    (24, 24, 3, {"padding": 1, "groups": 24}, (5, 24, 14, 13), "Depthwise"),
    (24, 24, 5, {"padding": 2, "stride": 2, "groups": 24, "bias": False}, (3, 24, 23, 17), "Depthwise"),
    (16, 8, 1, {}, (4, 16, 9, 7), "Convolution"),
    (16, 16, 3, {"stride": 2, "padding": 1}, (4, 16, 15, 16), "Convolution"),
    (16, 16, 3, {"dilation": 2, "padding": 2}, (4, 16, 11, 9), "Convolution"),
    (16, 32, 3, {"groups": 2, "padding": 1}, (4, 16, 10, 9), "Convolution"),
    (16, 16, 3, {"padding": "same"}, (4, 16, 9, 11), "Convolution"),
    (16, 16, 3, {"padding": 1, "padding_mode": "reflect"}, (4, 16, 9, 11), "Convolution"),
    (16, 16, 3, {"padding": 1}, (16, 13, 10), "Convolution"),  # unbatched
]


@pytest.mark.parametrize("case", range(len(_CONV_CASES)))
def test_conv2d_drop_in(monkeypatch, case):
    """fuse() makes every convolution nothing absorbed (DenseNet's after their BN-ReLU, one called twice) the
    Conv2d drop-in: against nn.Conv2d with the same weights, outputs and every gradient with grad (training's
    kernels, checked by the graph's node), and outputs without (eval's: packed weights, reused on the second call
    and remade after an in-place update); float64 to rounding, and gradcheck."""
    cin, cout, k, kw, shape, node = _CONV_CASES[case]
    kw = dict(kw)
    channels_last = kw.pop("channels_last", False)
    ours = winograd_for_small_shapes(monkeypatch)
    torch.manual_seed(case)
    conv = nn.Conv2d(cin, cout, k, **kw)
    fused = fck.fuse(copy.deepcopy(conv))
    assert type(fused) is fnn.Conv2d and fused.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = conv(xs), fused(xf)
    assert any(node in n for n in graph_node_names(got)) or not ours, graph_node_names(got)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(want)
    want.backward(gy)
    got.backward(gy)
    grads = [(xf.grad, xs.grad), (fused.weight.grad, conv.weight.grad)]
    grads += [(fused.bias.grad, conv.bias.grad)] if conv.bias is not None else []
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fused(x), conv(x), rtol=0, atol=1e-5 * scale)
        conv.weight.mul_(-1.5)
        fused.weight.mul_(-1.5)
        torch.testing.assert_close(fused(x), conv(x), rtol=0, atol=1.5e-5 * scale)
    conv64, fused64 = conv.double(), fused.double()
    torch.testing.assert_close(fused64(x.double()), conv64(x.double()), rtol=0, atol=1e-12 * scale)
    small = x.double()[..., :7, :7]
    small = (small[:1] if small.dim() == 4 else small).clone().requires_grad_()  # one image: gradcheck's cost
    assert torch.autograd.gradcheck(fused64, (small,))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv2d_drop_in_takes_gradients_of_any_layout(monkeypatch, channels_last):
    """DenseNet concatenates each convolution's output with its input: the gradient that comes back is a slice of
    the concatenation's (neither NCHW- nor channels_last-dense). The Winograd backward takes it."""
    ours = winograd_for_small_shapes(monkeypatch)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    fused = fck.fuse(copy.deepcopy(conv))
    x = torch.randn(9, 16, 17, 15)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    outs, grads = [], []
    for module in (conv, fused):
        xi = x.clone().requires_grad_()
        y = module(xi)
        assert "_WinogradConv2dBackward" in graph_node_names(y) or module is conv or not ours
        out = torch.cat([xi, y], 1)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad, module.weight.grad, module.bias.grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5 * outs[0].abs().max().item())
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


def test_resnet_block_tail_is_one_fused_convolution(monkeypatch):
    """In a BasicBlock the second convolution, its batch norm, the add and the ReLU become one FusedConv2d called
    with the residual (by Winograd + the fused batch norm + add + ReLU in fp32 training and NCHW eval), and the
    block still matches torch's."""
    torch.manual_seed(0)
    model = BasicBlock(32, 32)
    _randomize_bn_state(model)
    fused_model = fck.fuse(copy.deepcopy(model))
    assert type(fused_model.conv2) is fnn.FusedConv2d and fused_model.conv2._residual
    x = torch.randn(16, 32, 16, 16)  # 256 tiles: enough for two threads
    ours = winograd_for_small_shapes(monkeypatch)
    for train in (True, False, True):
        model.train(train), fused_model.train(train)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = model(xs), fused_model(xf)
        assert "_WinogradConv2dBackward" in graph_node_names(got) or not ours
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        want.square().sum().backward()
        got.square().sum().backward()
        pairs = [(xf.grad, xs.grad)] + [(q.grad, p.grad) for p, q in zip(model.parameters(), fused_model.parameters())]
        for a, b in pairs:  # fp32 sums over 4096 positions in other orders: within 1e-4 of the largest
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
        model.zero_grad(), fused_model.zero_grad()
    for (name, a), b in zip(model.state_dict().items(), fused_model.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_conv_relu_weights_updated_in_place_are_seen():
    """The eval path keeps the packed weight between calls: an in-place update (an optimizer step) must show."""
    torch.manual_seed(0)
    fused = fck.fuse(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())).eval()
    x = torch.randn(9, 16, 17, 15)
    with torch.no_grad():
        fused(x)
        fused[0].weight.mul_(-1.5)
        want = F.relu(F.conv2d(x, fused[0].weight, fused[0].bias, padding=1))
        torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_modules_in_more_than_one_place_keep_their_class():
    """A convolution or batch norm shared between two places (tied weights) is not fused with what follows one of
    them; a shared ReLU module is (its slot becomes an Identity, the other slot keeps it)."""
    torch.manual_seed(0)
    conv, bn, relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
    model = nn.Sequential(conv, relu, conv, nn.Sequential(bn, relu), bn, nn.Conv2d(4, 4, 1), relu)
    fused_model = fck.fuse(copy.deepcopy(model))
    assert type(fused_model[0]) is fnn.Conv2d and type(fused_model[3][0]) is fnn.BatchNorm2d
    assert type(fused_model[5]) is fnn.ConvReLU2d and type(fused_model[6]) is nn.Identity
    _compare(model.double(), fused_model.double(), torch.randn(2, 4, 6, 6, dtype=torch.float64), "cpu", atol=1e-9)


class _ConvBNActs(nn.Module):
    """Conv -> BN -> activation modules in a forward (fx's path), as EfficientNet-style blocks write them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardtanh(-1, 2)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.GELU()  # not absorbed

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act3(self.bn3(self.conv3(self.act2(self.bn2(self.conv2(y)))))) + y


def test_conv_bn_activation_is_absorbed():
    """Conv2d -> BatchNorm2d -> ReLU6 / SiLU / Hardswish / LeakyReLU / Hardtanh: the activation goes into the
    FusedConv2d (eval: oneDNN's epilogue or in place after Winograd; training: the module itself after our batch
    norm); others (GELU) follow the batch-norm-absorbing convolution. float64 train and eval: torch's values."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.3), nn.Conv2d(8, 3, 3, padding=1),
                        nn.BatchNorm2d(3), nn.Hardswish())
    for model, absorbed in ((seq, 3), (_ConvBNActs(), 2)):
        _randomize_bn_state(model)
        model = model.double()
        fused_model = fck.fuse(copy.deepcopy(model))
        convs = [m for m in fused_model.modules() if type(m) is fnn.FusedConv2d]
        assert len(convs) == 3 and sum(bool(m._act) for m in convs) == absorbed
        assert fused_model.state_dict().keys() == model.state_dict().keys()
        _compare(model, fused_model, torch.randn(2, 3, 9, 9, dtype=torch.float64), "cpu", atol=1e-9)


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU, nn.Hardswish, lambda: nn.LeakyReLU(0.2),
                                 lambda: nn.Hardtanh(-1.0, 2.0), nn.ReLU])
@pytest.mark.parametrize("cin,n,size,packed", [(64, 4, 32, True), (16, 1, 8, False)], ids=["packed", "small"])
def test_conv_bn_activation_eval_in_float32(act, cin, n, size, packed):
    """fp32 eval of conv-BN-activation: oneDNN's epilogue on the packed weight (64 input channels, enough work), or
    torch's convolution and the activation in place (a batch of one's small layer): torch's values either way."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(cin, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), act())
    _randomize_bn_state(seq)
    seq.eval()
    fused = fck.fuse(copy.deepcopy(seq)).eval()
    x = torch.randn(n, cin, size, size)
    with torch.no_grad():
        want = seq(x)
        for _ in range(2):
            torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert (fused[0]._fold_cache.pack is not None) == (packed and torch.backends.mkldnn.is_available())


class _MobileBlock(nn.Module):
    """MobileNet v2's inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, ReLU6s, an identity add."""

    def __init__(self, c=8, e=4):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e, bias=False),
                                nn.BatchNorm2d(c * e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


@pytest.mark.parametrize("kind", ["resnet", "mobile"])
def test_fuse_channels_last(kind):
    """fuse(..., channels_last=True) stores the convolution weights channels_last, so an NCHW input's activations
    run NHWC from the first convolution on: outputs, every gradient and the running statistics match the NCHW
    torch model's (float64, train and eval), fp32 within rounding, and the state_dicts move both ways."""
    torch.manual_seed(0)
    model = small_resnet() if kind == "resnet" else nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _MobileBlock(),
                                                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _randomize_bn_state(model)
    fused = fck.fuse(copy.deepcopy(model), channels_last=True)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert any("channels_last" in line for line in fused.fck_fuse_report)
    seen = []
    last = convs[-1]
    last.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].is_contiguous(
        memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    x = torch.randn(8, 3, 14, 14)
    with torch.no_grad():
        want = model.eval()(x)
        torch.testing.assert_close(fused.eval()(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert seen and all(seen)  # an inner layer's input is NHWC
    _compare(copy.deepcopy(model).double(), copy.deepcopy(fused).double(), x.double(), "cpu", atol=1e-9)
    model.load_state_dict(fused.state_dict())
    fused.load_state_dict(model.state_dict())


def _eval_twice_matches(fused, model, x):
    """The fused model's eval output without gradients, twice (the second call on the cached weights), against the
    model's; the last output."""
    with torch.no_grad():
        want = model(x)
        for _ in range(2):
            got = fused(x)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    return got


@pytest.mark.parametrize("conv", [lambda: nn.Conv2d(16, 64, 1), lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
                                  lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1)], ids=["1x1", "depthwise", "3x3"])
def test_channels_last_eval_packs_every_width(conv):
    """An NHWC input's oneDNN output needs no copy back to NCHW: eval packs the weight of 1x1, depthwise and narrow
    convolutions too (NCHW keeps them plain), with torch's values."""
    torch.manual_seed(0)
    seq = nn.Sequential(conv(), nn.BatchNorm2d(conv().out_channels), nn.ReLU6())
    _randomize_bn_state(seq)
    seq.eval()
    cin = seq[0].in_channels
    x = torch.randn(16, cin, 32, 32)
    for channels_last in (True, False):
        fused = fck.fuse(copy.deepcopy(seq), channels_last=channels_last).eval()
        got = _eval_twice_matches(fused, seq, x.to(memory_format=torch.channels_last) if channels_last else x)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if torch.backends.mkldnn.is_available():
            assert (fused[0]._fold_cache.pack_key is not None) == channels_last


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_resnet_tail_eval_in_one_onednn_call(channels_last):
    """Eval on NHWC: a bottleneck's last 1x1 convolution, its batch norm, the add and the ReLU are one oneDNN call on
    the folded, packed weight (the add and the ReLU in its epilogue); NCHW takes the convolution and the fused batch
    norm + add + ReLU pass. torch's values either way; a residual of the wrong shape is refused."""
    torch.manual_seed(0)
    model = Bottleneck(64, 16)
    _randomize_bn_state(model)
    model.eval()
    fused = fck.fuse(copy.deepcopy(model), channels_last=channels_last).eval()
    assert fused.conv3._residual
    x = torch.randn(16, 64, 20, 20)  # conv3: 6.6M multiply-adds, enough for the packed weight
    if channels_last:  # the residual too (the block's input): as every block's after a channels_last model's stem
        x = x.to(memory_format=torch.channels_last)
    got = _eval_twice_matches(fused, model, x)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if torch.backends.mkldnn.is_available():
        assert (fused.conv3._fold_cache.pack is not None) == channels_last
    with torch.no_grad():
        with pytest.raises(ValueError, match="residual has shape"):  # as BatchNormAddReLU2d's
            fused.conv3(x.to(memory_format=torch.channels_last)[:, :16], torch.randn(16, 64, 19, 20))
    with pytest.raises(TypeError, match="residual"):
        fused.conv3(x[:, :16])


class _ReflectTail(nn.Module):
    """A block tail whose convolution pads by reflection: conv -> BN -> add -> ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


def test_residual_tail_with_a_padding_mode():
    """The absorbed tail pads by the convolution's padding mode itself (the kernels pad with zeros): torch's
    outputs, gradients and running statistics, train and eval."""
    torch.manual_seed(0)
    model = _ReflectTail()
    _randomize_bn_state(model)
    fused = fck.fuse(copy.deepcopy(model))
    assert type(fused.conv) is fnn.FusedConv2d and fused.conv._residual
    _compare(model.double(), fused.double(), torch.randn(3, 4, 7, 6, dtype=torch.float64), "cpu", atol=1e-9)
