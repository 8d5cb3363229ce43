"""The CPU depthwise convolution (csrc/cpu/depthwise_conv.cpp; conv-BN-act and conv-ReLU layers with one filter a
channel: MobileNet's, EfficientNet's) against torch's convolution and activation in float64: kernels, strides,
padding beyond half the kernel, planes from 1x1 up, every activation; its input and weight gradients (training);
outputs written into a poisoned pooled block; its argument checks; and fused models that take it, in eval and in
training, against the stock ones."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels import nn as fnn

from conftest import runnable, skip_unless_runnable

ACTS = [(0, [], lambda y: y), (1, [], F.relu), (2, [0.0, 6.0], F.relu6), (2, [-1.0, 0.5], lambda y: y.clamp(-1, 0.5)),
        (3, [0.2], lambda y: F.leaky_relu(y, 0.2)), (4, [], F.hardswish)]


def test_against_torch():
    skip_unless_runnable("cpu", "cpu")
    r = random.Random(0)
    compared = 0
    for seed in range(300):
        k = r.choice([(3, 3), (5, 5), (3, 5), (1, 1), (7, 7), (2, 4)])
        s = r.choice([(1, 1), (2, 2), (1, 2), (3, 1)])
        p = (r.randint(0, k[0] // 2 + 1), r.randint(0, k[1] // 2 + 1))
        shape = (r.randint(1, 3), r.randint(1, 9), r.randint(1, 30), r.randint(1, 30))
        g = torch.Generator().manual_seed(seed)
        x, w = torch.randn(shape, generator=g), torch.randn(shape[1], 1, *k, generator=g)
        b = torch.randn(shape[1], generator=g) if r.random() < 0.7 else None
        act, scalars, f = r.choice(ACTS)
        case = dict(seed=seed, shape=shape, k=k, s=s, p=p, act=act)
        try:
            want = f(F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p, 1, shape[1]))
        except RuntimeError:  # an output too small: refused too
            with pytest.raises(RuntimeError, match="too small"):
                torch.ops.fck.depthwise_conv2d(x, w, b, list(s), list(p), act, scalars)
            continue
        got = torch.ops.fck.depthwise_conv2d(x, w, b, list(s), list(p), act, scalars)
        assert got.shape == want.shape, case
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
        compared += 1
    assert compared > 200


def test_gradients_against_torch():
    """Training: the autograd Function on the three kernels against float64 torch, outputs and all gradients;
    strides 1 to 3 (the input gradient's phases), odd and even paddings."""
    skip_unless_runnable("cpu", "cpu")
    from fastcore_kernels.ops.conv_bn_relu import _DepthwiseConv2d

    r = random.Random(1)
    for seed in range(200):
        k = r.choice([(3, 3), (5, 5), (3, 5), (1, 1), (7, 7)])
        s = r.choice([[1, 1], [2, 2], [1, 2], [3, 3]])
        p = [r.randint(0, k[0] // 2 + 1), r.randint(0, k[1] // 2 + 1)]
        shape = (r.randint(1, 3), r.randint(1, 6), r.randint(1, 25), r.randint(1, 25))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g).requires_grad_()
        w = torch.randn(shape[1], 1, *k, generator=g).requires_grad_()
        b = torch.randn(shape[1], generator=g).requires_grad_()
        case = dict(seed=seed, shape=shape, k=k, s=s, p=p)
        try:
            want = F.conv2d(x.double(), w.double(), b.double(), s, p, 1, shape[1])
        except RuntimeError:
            continue
        dy = torch.randn(want.shape, generator=g)
        wants = torch.autograd.grad(want, (x, w, b), dy.double())
        got = _DepthwiseConv2d.apply(x, w, b, s, p)
        gots = torch.autograd.grad(got, (x, w, b), dy)
        for what, a, c in zip(("output", "grad input", "grad weight", "grad bias"), (got,) + gots, (want,) + wants):
            torch.testing.assert_close(a.double(), c.double(), rtol=1e-5, atol=1e-5 * max(1.0, c.abs().max().item()),
                                       msg=lambda m: f"{case} {what}: {m}")


def test_gradient_penalty_matches_torch():
    """create_graph=True through the training Function: its backward re-runs torch's convolution as a graph, so
    second derivatives match torch's."""
    skip_unless_runnable("cpu", "cpu")
    from fastcore_kernels.ops.conv_bn_relu import _DepthwiseConv2d

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, 13, 12, generator=g), torch.randn(3, 1, 3, 3, generator=g)
    results = []
    for conv in (lambda a, b: F.conv2d(a, b, None, 2, 1, 1, 3), lambda a, b: _DepthwiseConv2d.apply(a, b, None,
                                                                                                     [2, 2], [1, 1])):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        ga, gb = torch.autograd.grad(conv(a, b).square().sum(), (a, b), create_graph=True)
        results.append(torch.autograd.grad(ga.square().sum() + gb.square().sum(), (a, b)))
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_every_output_written():
    skip_unless_runnable("cpu", "cpu")
    x, w, b = torch.randn(4, 32, 64, 64), torch.randn(32, 1, 3, 3), torch.randn(32)
    want = F.conv2d(x, w, b, 2, 1, 1, 32)
    for _ in range(2):
        poisoned = torch.ops.fck.contiguous_pooled(torch.full(want.shape, float("nan")))
        del poisoned
        torch.testing.assert_close(torch.ops.fck.depthwise_conv2d(x, w, b, [2, 2], [1, 1], 0, []), want)


def test_arguments_are_checked():
    skip_unless_runnable("cpu", "cpu")
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    bad = [((x.double(), w.double(), None, [1, 1], [1, 1], 0, []), "float32"),
           ((x.transpose(2, 3), w, None, [1, 1], [1, 1], 0, []), "contiguous"),
           ((x, torch.randn(4, 2, 3, 3), None, [1, 1], [1, 1], 0, []), "weight"),
           ((x, w, torch.randn(3), [1, 1], [1, 1], 0, []), "bias"),
           ((x, w, None, [0, 1], [1, 1], 0, []), "stride"),
           ((x, w, None, [1, 1], [1, 1], 7, []), "activation"),
           ((x, w, None, [1, 1], [1, 1], 2, [0.0]), "hardtanh"),
           ((x, torch.randn(4, 1, 11, 11), None, [1, 1], [0, 0], 0, []), "too small")]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fck.depthwise_conv2d(*args)


def test_gradient_ops_check_their_arguments():
    skip_unless_runnable("cpu", "cpu")
    x, w, gy = torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.fck.depthwise_conv2d_input_grad(gy[:, :, :7].contiguous(), w, [2, 4, 8, 8], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.fck.depthwise_conv2d_weight_grad(x, gy, [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fck.depthwise_conv2d_input_grad(gy, torch.randn(3, 1, 3, 3), [2, 4, 8, 8], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fck.depthwise_conv2d_weight_grad(x.double(), gy.double(), [3, 3], [1, 1], [1, 1])


def test_opcheck():
    skip_unless_runnable("cpu", "cpu")
    x, w = torch.randn(2, 4, 13, 12), torch.randn(4, 1, 3, 3)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fck.depthwise_conv2d, (x, w, torch.randn(4), [2, 1], [1, 1], 2, [0.0, 6.0]),
                          test_utils=utils)
    gy = torch.randn(2, 4, 7, 12)
    torch.library.opcheck(torch.ops.fck.depthwise_conv2d_input_grad, (gy, w, list(x.shape), [2, 1], [1, 1]),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fck.depthwise_conv2d_weight_grad, (x, gy, [3, 3], [2, 1], [1, 1]),
                          test_utils=utils)


def _inverted_residual(act):
    """MobileNet v2's block: 1x1 expansion, 3x3 depthwise, 1x1 projection, each with its batch norm."""
    return nn.Sequential(nn.Conv2d(8, 48, 1, bias=False), nn.BatchNorm2d(48), act(),
                         nn.Conv2d(48, 48, 3, 2, 1, groups=48, bias=False), nn.BatchNorm2d(48), act(),
                         nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16),
                         nn.Conv2d(16, 16, 5, 1, 2, groups=16), nn.ReLU())


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU, nn.Hardswish, nn.ReLU, lambda: nn.LeakyReLU(0.1)])
def test_fused_blocks_in_eval(act):
    """Eval fused blocks whose depthwise layers take our kernel (fp32, planes of 12x12 and up), with the
    activation after their batch norm absorbed: torch's outputs to fp32 rounding; training mode too."""
    torch.manual_seed(0)
    model = _inverted_residual(act)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    fused = fck.fuse(copy.deepcopy(model))
    assert sum(type(m) is fnn.FusedConv2d for m in fused.modules()) == 3
    x = torch.randn(4, 8, 40, 36)
    for train in (False, True):
        model.train(train), fused.train(train)
        with torch.no_grad():
            want, got = model(x), fused(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # Training gradients against a float64 twin: as close as the stock fp32 model's (small gradients such as a
    # batch norm's weight's are sums that cancel: both fp32 models miss them by ~1e-5 where they reach 3e-3).
    twin = copy.deepcopy(model).double()
    xs, xf, xd = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    for m, inp in ((model, xs), (fused, xf), (twin, xd)):
        m(inp).square().sum().backward()
    grads = zip(["input"] + [n for n, _ in model.named_parameters()], [xs.grad] + [p.grad for p in model.parameters()],
                [xf.grad] + [p.grad for p in fused.parameters()], [xd.grad] + [p.grad for p in twin.parameters()])
    for name, stock, ours, truth in grads:
        budget = 3 * (stock.double() - truth).abs().max().item() + 1e-6 * truth.abs().max().item()
        assert (ours.double() - truth).abs().max().item() <= budget, name
    if runnable("cpu", "cpu"):  # without the extension the depthwise layers run torch's convolution
        with torch.no_grad(), torch.profiler.profile() as prof:
            fused.eval()(x)
        assert [e.name for e in prof.events()].count("fck::depthwise_conv2d") == 2
