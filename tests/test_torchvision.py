"""fuse() on the models users already have: torchvision's architectures (basic and bottleneck ResNet blocks, grouped
convolutions, DenseNet's pre-activation BN-ReLU-conv, MobileNet's ReLU6 and EfficientNet's SiLU, which stay torch's,
squeeze-excitation, channel shuffles, Inception branches, SqueezeNet's convolutions without batch norm). In float64,
in train and eval mode: the fused model's outputs, every parameter's gradient and the running statistics against
the torch model's; state_dicts both ways."""

import copy

import pytest
import torch
from torch import nn

import fastcore_kernels as fck

tvm = pytest.importorskip("torchvision.models")

MODELS = {
    "resnet18": {},
    "resnet50": {},
    "resnext50_32x4d": {},
    "densenet121": {},
    "mobilenet_v2": {},
    "efficientnet_b0": {},
    "regnet_y_400mf": {},
    "shufflenet_v2_x0_5": {},
    "mobilenet_v3_small": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},  # F.avg_pool2d / F.max_pool2d in its blocks
    "squeezenet1_1": {},  # convolutions followed by ReLUs, no batch norm
}
SIZE = {"inception_v3": 107}  # its stem needs at least 75 x 75; 107: 2 x 2 maps in its last blocks


def _fused_count(model):
    return sum(type(m).__module__.startswith("fastcore_kernels") for m in model.modules())


def _close(got, want, what):
    """Within 1e-9 of the tensor's largest value: float64 sums in another order (a 2048-channel layer's gradients
    reach 1e3 while some of their elements are 1e-6)."""
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= 1e-9 * max(want.double().abs().max().item() if want.numel() else 0.0, 1e-3), (what, err)


def _run(model, x, train):
    model.train(train)
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks on both sides
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_torchvision_model(name):
    torch.manual_seed(0)
    twin = getattr(tvm, name)(weights=None, num_classes=10, **MODELS[name]).double()
    for m in twin.modules():  # running statistics unlike the batch's, so eval mode shows them
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    fused = fck.fuse(copy.deepcopy(twin))
    assert _fused_count(fused) > 0
    if name == "squeezenet1_1":
        assert sum(type(m) is fck.nn.ConvReLU2d for m in fused.modules()) == 26  # every convolution
    if name in ("densenet121", "inception_v3"):  # their average pools (modules, functional calls) are ours
        assert any("AvgPool2d" in line or "F.avg_pool2d" in line for line in fused.fck_fuse_report)
    x = torch.randn(2, 3, SIZE.get(name, 64), SIZE.get(name, 64), dtype=torch.float64)
    for train in (True, False):
        want, want_grads = _run(twin, x, train)
        got, got_grads = _run(fused, x, train)
        _close(got, want, "output")
        assert got_grads.keys() == want_grads.keys()
        for k, g in want_grads.items():
            _close(got_grads[k], g, k)
    for k, b in twin.state_dict().items():  # running statistics after the training step; num_batches_tracked
        _close(fused.state_dict()[k], b, k)
    twin.load_state_dict(fused.state_dict())
    fused.load_state_dict(twin.state_dict())


def test_traced_and_exported_resnet():
    """What users ship: torch.jit.trace (with its check, which re-runs without grad) saved and loaded, and
    torch.export, of a fused ResNet-18 in eval mode give the eager outputs; the loaded trace still differentiates."""
    import io
    import warnings

    torch.manual_seed(0)
    fused = fck.fuse(tvm.resnet18(weights=None)).eval()
    x = torch.randn(2, 3, 64, 64)
    want = fused(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fused, x)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    xs = x.clone().requires_grad_()
    got = loaded(xs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    xr = x.clone().requires_grad_()
    fused(xr).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.export.export(fused, (x,)).module()(x), want, rtol=1e-5, atol=1e-5)
