"""batch_norm / batch_norm_relu / batch_norm_add_relu / conv_bn_relu: every backend against the float64 reference
and torch.nn.functional, forward and backward, plus the bad inputs."""

import copy
import importlib
import io
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
import fastcore_kernels.functional as fckF
from fastcore_kernels.reference.batch_norm import batch_norm_act as reference_bn

from conftest import ALL_BACKENDS, devices, graph_node_names, skip_unless_runnable, winograd_for_small_shapes

VARIANTS = ("plain", "relu", "add_relu")

# Rank 2 to 5; C = 1; N = 1 with spatial size > 1; sizes that are not multiples of any block; channels_last.
SHAPES = [
    ((7, 5), False),
    ((3, 4, 11), False),
    ((2, 3, 5, 7), False),
    ((2, 3, 5, 7), True),
    ((1, 3, 4, 5), False),
    ((4, 1, 3, 5), True),
    ((2, 3, 2, 3, 4), False),
    ((2, 3, 2, 3, 4), True),
    ((37, 150), False),  # rows of more than one chunk of channels, and a narrower last chunk
    ((37, 152), False),  # CUDA: rows in 16-byte channel groups (38 of 4 fp32, 19 of 8 half)
    ((3, 8, 5, 7), True),  # CUDA: channels-last rows of one or two channel groups
]

# (rtol, atol) per dtype, against a float64 computation from the same (rounded) inputs.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (4e-3, 4e-3)}


def _fmt(shape, channels_last):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


def _inputs(shape, dtype, device, channels_last=False, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    fmt = _fmt(shape, channels_last)

    def full():
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + mean).to(device, dtype).contiguous(
            memory_format=fmt)

    x, residual, dy = full(), full(), full()
    weight = (torch.rand(C, generator=g) + 0.5).to(device)
    bias = torch.randn(C, generator=g).to(device)
    running_mean = torch.randn(C, generator=g).to(device)
    running_var = (torch.rand(C, generator=g) + 0.5).to(device)
    return x, residual, dy, weight, bias, running_mean, running_var


def _call(variant, backend, x, residual, rm, rv, w, b, training, momentum=0.1, eps=1e-5):
    if variant == "plain":
        return fckF.batch_norm(x, rm, rv, w, b, training, momentum, eps, backend=backend)
    if variant == "relu":
        return fckF.batch_norm_relu(x, rm, rv, w, b, training, momentum, eps, backend=backend)
    return fckF.batch_norm_add_relu(x, residual, rm, rv, w, b, training, momentum, eps, backend=backend)


def _run(variant, backend, x, residual, dy, w, b, rm, rv, training):
    """Output, running stats and gradients (x, residual, weight, bias) of one call with autograd."""
    x = x.detach().clone().requires_grad_()
    residual = residual.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    rm, rv = rm.clone(), rv.clone()
    y = _call(variant, backend, x, residual, rm, rv, w, b, training)
    y.backward(dy)
    grads = [x.grad, residual.grad if variant == "add_relu" else None, w.grad, b.grad]
    return y, rm, rv, grads


def _run_torch(variant, x, residual, dy, w, b, rm, rv, training):
    """_run's results from torch.nn.functional's batch_norm (+ residual, + relu)."""
    x, residual, w, b = (t.detach().clone().requires_grad_() for t in (x, residual, w, b))
    rm, rv = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    y = y + residual if variant == "add_relu" else y
    y = y if variant == "plain" else F.relu(y)
    y.backward(dy)
    return y, rm, rv, [x.grad, residual.grad if variant == "add_relu" else None, w.grad, b.grad]


def _truth(variant, x, residual, dy, w, b, rm, rv, training):
    """The reference run in float64 on the same (already rounded) values."""
    d = torch.float64
    return _run(variant, "reference", x.to(d), residual.to(d), dy.to(d), w.to(d), b.to(d), rm.to(d), rv.to(d),
                training)


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,channels_last", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_matches_float64_reference(device, backend, shape, channels_last, variant, training):
    skip_unless_runnable(backend, device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, res, dy, w, b, rm, rv = _inputs(shape, dtype, device, channels_last)
        y = _check_against_truth(variant, backend, x, res, dy, w, b, rm, rv, training)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=_fmt(shape, channels_last))


def _check_against_truth(variant, backend, x, res, dy, w, b, rm, rv, training):
    """One call with autograd against the float64 reference: output, running statistics, every gradient. Returns
    the output."""
    dtype = x.dtype
    y, rm1, rv1, grads = _run(variant, backend, x, res, dy, w, b, rm, rv, training)
    ty, trm, trv, tgrads = _truth(variant, x, res, dy, w, b, rm, rv, training)
    _close(y, ty, dtype, f"{dtype} {variant} output")
    _close(rm1, trm, torch.float32, "running_mean")
    _close(rv1, trv, torch.float32, "running_var")
    for name, g, tg in zip(("input", "residual", "weight", "bias"), grads, tgrads):
        if tg is None:
            assert g is None
            continue
        # weight/bias grads are sums over N*S values, rounded once: compare at the input dtype's tolerance
        _close(g, tg, dtype if name in ("input", "residual") else torch.float32, f"{dtype} {variant} grad {name}")
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(5, 3, 5, 7), (64, 3, 7, 7), (3, 2, 1, 5000), (2, 3, 4)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_small_channel_kernels(device, shape, dtype, monkeypatch):
    """CUDA's one-kernel forward and backward for planar channels of up to 16384 values (opt-in
    FCK_BN_FUSED_CUDA=1; on the CPU the same kernel code runs emulated, FCK_BN_FUSED_EMULATE=1) against the float64
    reference: every variant, training and eval, running statistics, every gradient, inputs whose mean is 3 std."""
    skip_unless_runnable(device, device)
    monkeypatch.setenv("FCK_BN_FUSED_CUDA" if device == "cuda" else "FCK_BN_FUSED_EMULATE", "1")
    for variant in VARIANTS:
        for training in (True, False):
            x, res, dy, w, b, rm, rv = _inputs(shape, dtype, device, mean=3.0)
            _check_against_truth(variant, device, x, res, dy, w, b, rm, rv, training)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_against_torch_functional(device, backend, variant):
    skip_unless_runnable(backend, device)
    x, res, dy, w, b, rm, rv = _inputs((6, 5, 4, 3), torch.float32, device)
    for training in (True, False):
        y, rm1, rv1, grads = _run(variant, backend, x, res, dy, w, b, rm, rv, training)
        ys, rm2, rv2, torch_grads = _run_torch(variant, x, res, dy, w, b, rm, rv, training)
        torch.testing.assert_close(y, ys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm1, rm2)
        torch.testing.assert_close(rv1, rv2)
        for g, gs in zip(grads, torch_grads):
            if gs is not None:
                torch.testing.assert_close(g, gs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_gradcheck_float64(device, backend, channels_last, variant):
    skip_unless_runnable(backend, device)
    x, res, _, w, b, rm, rv = _inputs((3, 4, 3, 2), torch.float64, device, channels_last)
    w, b = w.double(), b.double()
    for training in (True, False):
        def f(x, res, w, b):
            return _call(variant, backend, x, res, rm.double().clone(), rv.double().clone(), w, b, training)

        args = [t.clone().requires_grad_() for t in (x, res, w, b)]
        # The Triton interpreter runs each kernel in Python: random-projection gradcheck keeps that to seconds.
        fast = backend == "triton" and device == "cpu"
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_double_backward_float64(device, backend, variant):
    """A backward that builds a graph (create_graph=True: gradient penalties) gets differentiable gradients: float64
    gradgradcheck in training and eval, and a gradient penalty's parameter gradients equal torch's. (The kernels'
    own backward is not differentiable; under create_graph the op takes reference.batch_norm_act_backward.)"""
    skip_unless_runnable(backend, device)
    x, res, dy, w, b, rm, rv = _inputs((3, 4, 3, 2), torch.float64, device, seed=4)
    w, b = w.double(), b.double()
    fast = backend == "triton" and device == "cpu"
    for training in (True, False):
        def f(x, res, w, b):
            return _call(variant, backend, x, res, rm.double().clone(), rv.double().clone(), w, b, training)

        args = [t.clone().requires_grad_() for t in (x, res, w, b)]
        assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-6, fast_mode=fast)
        penalties = []
        for fn in (f, lambda x, res, w, b: _run_torch_graph(variant, x, res, w, b, rm, rv, training)):
            args = [t.clone().requires_grad_() for t in (x, res, w, b)]
            g, = torch.autograd.grad((fn(*args) * dy).sum(), args[0], create_graph=True)
            (g ** 2).sum().backward()
            penalties.append([a.grad for a in args])
        for what, u, v, t in zip(("x", "residual", "weight", "bias"), *penalties, args):
            # None where the penalty does not depend on the tensor (the bias; x in eval)
            u, v = (torch.zeros_like(t) if a is None else a for a in (u, v))
            _close(u, v, torch.float64, f"penalty gradient of {what}, training={training}")


def _run_torch_graph(variant, x, residual, w, b, rm, rv, training):
    y = F.batch_norm(x, rm.double().clone(), rv.double().clone(), w, b, training, 0.1, 1e-5)
    y = y + residual if variant == "add_relu" else y
    return y if variant == "plain" else F.relu(y)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_odd_and_large_shapes(device, backend):
    """Large C, long planes and many rows, past every kernel's tile and work-unit size."""
    skip_unless_runnable(backend, device)
    interp = backend == "triton" and device == "cpu"
    shapes = [((33, 300), False), ((2, 3, 5000), False), ((3, 70, 3, 5), True)] if interp else [
        ((4099, 300), False), ((2, 3, 40001), False), ((3, 70, 33, 17), True), ((17, 2053), False),
        ((150, 70, 6, 5), False), ((9, 1024), False), ((5, 1028), False)]  # CUDA: 256 fp32 channel groups, 257
    for shape, cl in shapes:
        x, res, dy, w, b, rm, rv = _inputs(shape, torch.float32, device, cl, seed=3)
        y, rm1, rv1, grads = _run("add_relu", backend, x, res, dy, w, b, rm, rv, True)
        ty, trm, trv, tgrads = _truth("add_relu", x, res, dy, w, b, rm, rv, True)
        _close(y, ty, torch.float32, f"{shape} output")
        _close(rv1, trv, torch.float32, f"{shape} running_var")
        for g, tg in zip(grads, tgrads):
            _close(g, tg, torch.float32, f"{shape} grads")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(16, 3, 32, 33), (2000, 130)], ids=["planar", "rows"])
def test_statistics_stable_for_large_means(device, backend, shape):
    """|mean| / std = 1e6: a sum-of-squares variance would be pure rounding noise in fp32."""
    skip_unless_runnable(backend, device)
    g = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)
    x = x64.float().to(device)
    C = shape[1]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    fckF.batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
    exact = x.double().cpu().var(dim=[d for d in range(len(shape)) if d != 1])
    torch.testing.assert_close(rv.double().cpu(), exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_running_stats_over_steps_then_eval(device, backend):
    skip_unless_runnable(backend, device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(5):
        x, *_ = _inputs((8, 4, 3, 3), torch.float32, device, seed=step, mean=step)
        y = fckF.batch_norm_relu(x, rm, rv, training=True, momentum=0.3, backend=backend)
        yt = F.relu(F.batch_norm(x, rm_t, rv_t, training=True, momentum=0.3))
        torch.testing.assert_close(y, yt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    x, *_ = _inputs((5, 4, 2, 3), torch.float32, device, seed=9)
    torch.testing.assert_close(fckF.batch_norm_relu(x, rm, rv, backend=backend),
                               F.relu(F.batch_norm(x, rm_t, rv_t)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_no_affine_no_running_stats_half_running_stats(device, backend):
    skip_unless_runnable(backend, device)
    x, res, dy, w, b, rm, rv = _inputs((5, 3, 4), torch.float16, device)
    ours = fckF.batch_norm_relu(x, None, None, None, None, True, backend=backend)
    torch.testing.assert_close(ours, F.relu(F.batch_norm(x.float(), None, None, training=True)).half(),
                               rtol=4e-3, atol=4e-3)
    # fp16 running statistics (a model.half() network) are read and written in their own dtype
    rmh, rvh = rm.half(), rv.half()
    fckF.batch_norm(x, rmh, rvh, w, b, training=True, backend=backend)
    rm_t, rv_t = rm.clone(), rv.clone()
    F.batch_norm(x.float(), rm_t, rv_t, w, b, training=True)
    assert rmh.dtype == torch.float16
    torch.testing.assert_close(rmh.float(), rm_t, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rvh.float(), rv_t, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_nan_propagates_per_channel(device, backend):
    skip_unless_runnable(backend, device)
    x, *_ = _inputs((4, 3, 5), torch.float32, device)
    x[1, 2, 3] = float("nan")
    y = fckF.batch_norm(x, None, None, training=True, backend=backend)
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, :2]).any()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,channels_last", [((4, 3, 5), False), ((3, 5, 2, 3), True), ((6, 4), False)],
                         ids=["planar", "channels_last", "rows"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_non_finite_inputs_as_torch(device, backend, shape, channels_last, variant):
    """inf, -inf and NaN inputs give torch's values: in eval mode an input's gradient does not depend on x, so it
    stays finite at a non-finite x; in training the channel holding one turns NaN; the running mean of a channel
    whose first value is inf is inf, as torch's sum gives it (the reference; see test_fuzz for the kernels)."""
    skip_unless_runnable(backend, device)
    x, res, dy, w, b, rm, rv = _inputs(shape, torch.float32, device, channels_last)
    x[0, 0].view(-1)[0] = float("inf")
    x[1, 1].view(-1)[-1] = -float("inf")
    x[-1, -1].view(-1)[0] = float("nan")
    for training in (False, True):
        y, rm1, rv1, grads = _run(variant, backend, x, res, dy, w, b, rm, rv, training)
        ys, rm2, rv2, torch_grads = _run_torch(variant, x, res, dy, w, b, rm, rv, training)
        if backend != "reference":
            rm1, rm2 = (torch.where(t.isinf(), float("nan"), t) for t in (rm1, rm2))
        for what, a, e in zip(("output", "running_mean", "running_var", "grad input", "grad residual", "grad weight",
                               "grad bias"), (y, rm1, rv1, *grads), (ys, rm2, rv2, *torch_grads)):
            if e is not None:
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, equal_nan=True,
                                           msg=lambda m: f"{what} (training={training}): {m}")
        if not training:
            assert grads[0].isfinite().all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_empty_batch(device, backend):
    skip_unless_runnable(backend, device)
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    w = torch.rand(3, device=device, requires_grad=True)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    y = fckF.batch_norm_relu(x, rm, rv, w, None, training=True, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(w.grad, torch.zeros(3, device=device))


def test_triton_writes_every_output_element(monkeypatch):
    """Outputs allocated by the Triton launchers start as NaN: an element a kernel skipped would stay NaN."""
    skip_unless_runnable("triton", "cpu")
    from fastcore_kernels.triton import batch_norm as kernels

    real = torch.empty_like

    def poisoned(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(kernels.torch, "empty_like", poisoned)
    for shape, cl in [((5, 3, 7, 3), True), ((3, 37), False), ((2, 5, 19), False)]:
        x, res, dy, w, b, rm, rv = _inputs(shape, torch.float32, "cpu", cl)
        y, _, _, grads = _run("add_relu", "triton", x, res, dy, w, b, rm, rv, True)
        assert not torch.isnan(y).any()
        assert not any(torch.isnan(g).any() for g in grads)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_non_contiguous_input_is_handled(device, backend):
    skip_unless_runnable(backend, device)
    base = torch.randn(6, 8, 5, device=device)
    x = base[:, ::2].transpose(0, 2).transpose(0, 2)  # strided view, neither contiguous nor channels_last
    assert not x.is_contiguous()
    torch.testing.assert_close(fckF.batch_norm(x, None, None, training=True, backend=backend),
                               F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_add_relu_of_mixed_dtypes_promotes_as_torch(backend):
    """relu(batch_norm(x) + residual) for a bf16 x and an fp32 residual (autocast's convolution output and
    identity): torch's promotion, an fp32 result, and each gradient in its operand's dtype."""
    skip_unless_runnable(backend, "cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, 5, generator=g).bfloat16().requires_grad_()
    res = torch.randn(3, 4, 5, 5, generator=g).requires_grad_()
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    out = fckF.batch_norm_add_relu(x, res, None, None, w, b, training=True, backend=backend)
    want = F.relu(F.batch_norm(x.float(), None, None, w, b, training=True) + res)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and res.grad.dtype == torch.float32


@pytest.mark.parametrize("x_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), ("triton", "cpu"),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_ops_take_operands_laid_out_unlike_the_input(backend, device, x_layout):
    """A compiled graph may hand the ops a residual, output or gradient laid out unlike the input (torch 2.4's
    inductor: a channels-last convolution output, the NCHW gradient of a flatten behind it): the same values as with
    every operand laid out alike, never a misread. An input in neither layout is refused."""
    skip_unless_runnable(backend, device)
    suffix = "_triton" if backend == "triton" else ""
    fwd, bwd = getattr(torch.ops.fck, "batch_norm_fwd" + suffix), getattr(torch.ops.fck, "batch_norm_bwd" + suffix)
    g = torch.Generator().manual_seed(4)
    x, res, dy = (torch.randn(3, 4, 5, 6, generator=g).to(device) for _ in range(3))
    w, b = torch.rand(4, generator=g).to(device) + 0.5, torch.randn(4, generator=g).to(device)
    def stats():
        return torch.zeros(4, device=device), torch.ones(4, device=device)

    permuted = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # (N, H, C, W) storage: neither layout
    with pytest.raises(RuntimeError, match="input must be contiguous or channels_last"):
        fwd(permuted, None, w, b, *stats(), True, 0.1, 1e-5, True)
    if x_layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        other = torch.Tensor.contiguous
    else:
        def other(t):
            return t.to(memory_format=torch.channels_last)

    def same(t):
        return torch.empty_like(x).copy_(t)

    y, mean, invstd = fwd(x, other(res), w, b, *stats(), True, 0.1, 1e-5, True)
    want_y, want_mean, want_invstd = fwd(x, same(res), w, b, *stats(), True, 0.1, 1e-5, True)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(mean, want_mean, rtol=0, atol=0)
    got = bwd(other(dy), x, other(y), w, mean, invstd, True, True, True)
    want = bwd(same(dy), x, same(want_y), w, want_mean, want_invstd, True, True, True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input_gets_a_clear_error(backend):
    skip_unless_runnable(backend, "cpu")
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)

    def call(*args, **kw):
        kw.setdefault("backend", backend)
        return fckF.batch_norm(*args, **kw)

    with pytest.raises(ValueError, match="2 to 5 dimensions"):
        call(torch.randn(5), None, None, training=True)
    with pytest.raises(RuntimeError, match="should contain 3 elements not 4"):
        call(x, torch.zeros(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="should contain 3 elements not 2"):
        call(x, rm, rv, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"weight must be 1-D \(4 elements\), got shape \(2, 2\)"):
        call(torch.randn(2, 4), None, None, torch.ones(2, 2), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        call(x, None, None, training=False)
    with pytest.raises(TypeError, match="float64, float32, float16 or bfloat16"):
        call(torch.ones(4, 3, dtype=torch.int64), rm, rv)
    with pytest.raises(TypeError, match="residual"):  # (another float dtype promotes, as torch's add)
        fckF.batch_norm_add_relu(x, torch.ones_like(x, dtype=torch.int64), rm, rv, backend=backend)
    with pytest.raises(ValueError, match="residual has shape"):
        fckF.batch_norm_add_relu(x, x[:, :, :4], rm, rv, backend=backend)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        call(x, rm, None, training=True)


def test_triton_scalars_keep_float64_precision():
    """Triton passes a Python float to a kernel as fp32: momentum and eps go as two fp32 values whose sum keeps
    ~48 bits, so a float64 batch norm's running statistics are not rounded to fp32's precision."""
    from fastcore_kernels.triton.batch_norm import _two_floats

    def fp32(v):
        return struct.unpack("f", struct.pack("f", v))[0]

    for v in (0.1, 0.3, 1e-5, 1 / 3, 0.0):
        hi, lo = _two_floats(v)
        assert fp32(hi) == hi and abs((hi + fp32(lo)) - v) <= abs(v) * 2.0 ** -46  # what the kernel adds up
        assert abs(fp32(v) - v) > abs(v) * 2.0 ** -30 or v in (0.0,)  # fp32 alone loses these (0 aside)
    assert _two_floats(1e39) == (1e39, 0.0)  # beyond fp32: left to Triton's conversion


def test_cxx_op_rejects_what_would_read_out_of_bounds():
    """Direct torch.ops.fck calls skip the Python checks; the C++ guards must hold on their own."""
    skip_unless_runnable("cpu", "cpu")
    x = torch.randn(4, 3, 5)
    res = torch.randn(4, 5, 3).transpose(1, 2)  # strides unlike x's: read as laid out (a copy), not refused
    torch.testing.assert_close(
        torch.ops.fck.batch_norm_fwd(x, res, None, None, None, None, True, 0.1, 1e-5, True)[0],
        torch.ops.fck.batch_norm_fwd(x, res.contiguous(), None, None, None, None, True, 0.1, 1e-5, True)[0])
    with pytest.raises(RuntimeError, match="has shape"):
        torch.ops.fck.batch_norm_fwd(x, res[:, :2], None, None, None, None, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="should contain 3 elements"):
        torch.ops.fck.batch_norm_fwd(x, None, torch.ones(2), None, None, None, True, 0.1, 1e-5, False)
    with pytest.raises(RuntimeError, match="must be 1-D"):
        torch.ops.fck.batch_norm_fwd(x, None, torch.ones(3, 1), None, None, None, True, 0.1, 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        torch.ops.fck.batch_norm_fwd(x.transpose(0, 2).contiguous().transpose(0, 2)[:, :, ::2], None, None, None,
                                     None, None, True, 0.1, 1e-5, False)
    y, mean, invstd = torch.ops.fck.batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="ReLU mask"):
        torch.ops.fck.batch_norm_bwd(x, x, None, None, mean, invstd, True, True, False)
    with pytest.raises(RuntimeError, match="save_mean and save_invstd"):
        torch.ops.fck.batch_norm_bwd(x, x, y, None, mean[:2], invstd, True, True, False)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_conv_bn_relu_train_and_eval(device, backend, channels_last):
    skip_unless_runnable(backend, device)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convolutions would blur an fp32 check
        _conv_bn_relu_train_and_eval(device, backend, channels_last)


def _conv_bn_relu_train_and_eval(device, backend, channels_last):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 4, 9, 7, generator=g).to(device).contiguous(memory_format=fmt)
    conv_w = (torch.randn(6, 4, 3, 3, generator=g) * 0.2).to(device)
    conv_b = torch.randn(6, generator=g).to(device)
    w, b = (torch.rand(6, generator=g) + 0.5).to(device), torch.randn(6, generator=g).to(device)
    rm, rv = torch.randn(6, generator=g).to(device), (torch.rand(6, generator=g) + 0.5).to(device)
    for training in (True, False):
        args = [t.clone().requires_grad_() for t in (x, conv_w, conv_b, w, b)]
        ref = [t.clone().requires_grad_() for t in (x, conv_w, conv_b, w, b)]
        rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        y = fckF.conv_bn_relu(args[0], args[1], args[2], rm1, rv1, args[3], args[4], training, 0.1, 1e-5,
                              stride=2, padding=1, backend=backend)
        yt = F.relu(F.batch_norm(F.conv2d(ref[0], ref[1], ref[2], 2, 1), rm2, rv2, ref[3], ref[4], training))
        torch.testing.assert_close(y, yt, rtol=1e-4, atol=1e-4)
        dy = torch.randn(y.shape, generator=g).to(device)
        y.backward(dy)
        yt.backward(dy)
        for a, r in zip(args, ref):
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(rm1, rm2)
        with torch.no_grad():  # the inference path: folded weights, ReLU fused into the convolution
            y = fckF.conv_bn_relu(x, conv_w, conv_b, rm, rv, w, b, False, padding=1, backend=backend)
            yt = F.relu(F.batch_norm(F.conv2d(x, conv_w, conv_b, 1, 1), rm, rv, w, b, False))
            torch.testing.assert_close(y, yt, rtol=1e-4, atol=1e-4)


def test_fold_cache_shared_by_threads_serving_different_shapes():
    """A fused model in eval shared by request threads (a web app): inputs of several shapes at once each get their
    own result. The cache's packed weight is per input shape; before, a thread switch between storing a packed
    weight and reading it back could hand one thread another's (a narrow window: this test did not catch it in
    1600 calls, the rewrite closes it by construction)."""
    import threading
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    for m in (seq[1], seq[4]):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2)
    fused = fck.fuse(seq).eval()
    inputs = [torch.randn(n, 8, h, w) for n, h, w in ((2, 9, 9), (3, 12, 7), (1, 16, 16), (4, 5, 11))]
    with torch.no_grad():
        want = [seq(x) for x in inputs]
    errors = []

    def serve(k):
        with torch.no_grad():
            for i in range(40):
                j = (i + k) % len(inputs)
                y = fused(inputs[j])
                if y.shape != want[j].shape or not torch.allclose(y, want[j], rtol=1e-4, atol=1e-4):
                    errors.append((k, i, j))

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"wrong results (thread, iteration, input): {errors[:5]}"


@pytest.mark.parametrize("device", devices())
def test_fused_conv_keeps_folded_weights_until_a_source_changes(device):
    """Eval-mode FusedConv2d folds once and reuses it; an in-place update, a `.data =` swap and load_state_dict
    must each be seen (compared with the unfused module given the same change)."""
    skip_unless_runnable("cpu" if device == "cpu" else "cuda", device)
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()).to(device).eval()
    seq[1].running_mean.normal_()
    seq[1].running_var.uniform_(0.5, 2)
    fused = fck.fuse(seq).eval()
    # 64 input channels and 75M multiply-adds (too few tiles for Winograd): oneDNN's packed weight on the CPU
    x = torch.randn(8, 64, 16, 16, device=device)
    tol = dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.testing.assert_close(fused(x), seq(x), **tol)
        cache = fused[0]._fold_cache.folded
        y = fused(x)
        torch.testing.assert_close(y, seq(x), **tol)
        assert fused[0]._fold_cache.folded is cache  # nothing changed: not folded again
        assert y.is_contiguous()  # the input's memory format, whatever layout the convolution ran in
        if device == "cpu" and torch.backends.mkldnn.is_available():
            assert fused[0]._fold_cache.pack is not None  # oneDNN's prepacked weight
        for x2 in (torch.randn(5, 64, 11, 7, device=device),  # a new input shape: packed again
                   torch.randn(5, 64, 11, 7, device=device).contiguous(memory_format=torch.channels_last)):
            y2, t2 = fused(x2), seq(x2)
            torch.testing.assert_close(y2, t2, **tol)
            assert y2.stride() == t2.stride()
        for m in (seq, fused):
            m[1].running_mean.add_(1.0)
        torch.testing.assert_close(fused(x), seq(x), **tol)
        w = torch.randn_like(seq[0].weight)
        for m in (seq, fused):
            m[0].weight.data = w.clone()
        torch.testing.assert_close(fused(x), seq(x), **tol)
        seq[1].bias.mul_(-2.0)
        fused.load_state_dict(seq.state_dict())
        torch.testing.assert_close(fused(x), seq(x), **tol)
        # a module with a filled cache (on the CPU an opaque oneDNN tensor) deep-copies and pickles
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        for other in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(other(x), seq(x), **tol)


def test_cpu_kernels_write_every_output_element_of_a_poisoned_pooled_block():
    """Large CPU outputs come from a pool of reused blocks: fill returned blocks with NaN, then check that the next
    outputs, which reuse them, hold no NaN (an element a kernel skipped would)."""
    skip_unless_runnable("cpu", "cpu")
    fck.ops.release_cpu_pool()
    for shape, cl in [((3, 7, 111, 131), False), ((3, 7, 111, 131), True), ((9001, 37), False)]:
        x, res, dy, w, b, rm, rv = _inputs(shape, torch.float32, "cpu", cl)
        for _ in range(2):
            y, grads = _run("add_relu", "cpu", x, res, dy, w, b, rm, rv, True)[::3]
            assert not torch.isnan(y).any() and not any(torch.isnan(g).any() for g in grads)
            y.fill_(float("nan"))
            for g in grads[:2]:
                g.fill_(float("nan"))
            del y, grads
        ty, _, _, tgrads = _truth("add_relu", x, res, dy, w, b, rm, rv, True)
        y, grads = _run("add_relu", "cpu", x, res, dy, w, b, rm, rv, True)[::3]
        _close(y, ty, torch.float32, "output")
        for g, tg in zip(grads, tgrads):
            _close(g, tg, torch.float32, "grads")
    assert fck.ops.release_cpu_pool() > 0
    assert fck.ops.release_cpu_pool() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# planes of 117; of 30 in two tiles (150 x 30 values a channel, tiles of 4096), with 70 channels or with 2 (too
# few for groups on four threads: the whole-tensor passes, tiles in parallel); of two runs (> 16384)
@pytest.mark.parametrize("shape", [(5, 6, 9, 13), (150, 70, 6, 5), (150, 2, 6, 5), (2, 5, 131, 131)])
def test_cpu_channel_groups_give_the_whole_tensor_passes_bits(shape, dtype):
    """Planar training inputs whose channels fit in cache are walked a group of channels at a time (C >= 2 x
    threads; on one thread, groups of C // 2: 3 + 3, or 2 + 2 + 1); the same call on four threads takes the
    whole-tensor passes. Both merge the same partial sums in the same order: outputs, running statistics and every
    gradient must agree bit for bit."""
    skip_unless_runnable("cpu", "cpu")
    x, res, dy, w, b, rm, rv = _inputs(shape, dtype, "cpu", mean=3.0)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            for variant in ("relu", "add_relu"):
                y, rm_out, rv_out, grads = _run(variant, "cpu", x, res, dy, w, b, rm, rv, True)
                runs.append([y, rm_out, rv_out] + [g for g in grads if g is not None])
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(runs[:2], runs[2:]):
        for t, u in zip(a, b_):
            assert torch.equal(t, u)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", ["relu", "add_relu"])
def test_cuda_vector_passes_match_the_scalar_ones(variant, dtype, monkeypatch):
    """The CUDA kernels' 16-byte passes and ReLU mask from x against FCK_BN_VECTOR_CUDA=0 (scalar accesses, mask from
    y) and the float64 truth: planes of whole groups, channels-last and (N, C) rows of whole channel groups."""
    skip_unless_runnable("cuda", "cuda")
    for shape, cl in [((4, 8, 16, 16), False), ((4, 8, 16, 16), True), ((37, 152), False), ((3, 16, 7, 9), False)]:
        x, res, dy, w, b, rm, rv = _inputs(shape, dtype, "cuda", cl, seed=4)
        runs = []
        for flag in ("1", "0"):
            monkeypatch.setenv("FCK_BN_VECTOR_CUDA", flag)
            runs.append(_run(variant, "cuda", x, res, dy, w, b, rm, rv, True))
        truth = _truth(variant, x, res, dy, w, b, rm, rv, True)
        for run in runs:
            _close(run[0], truth[0], dtype, f"{shape} output")
            for g, t in zip(run[3], truth[3]):
                if t is not None:
                    _close(g, t, dtype, f"{shape} gradient")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channels_last", [((64, 7), False), ((4096, 200), False), ((4, 3, 40, 40), False),
                                                 ((8, 16, 7, 7), False), ((2, 5, 33, 35), False),
                                                 ((3, 2, 16, 16), False), ((4, 6, 9, 9), True),
                                                 ((2, 3, 4, 4, 4), False)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_relu_mask_from_the_input_is_the_outputs(device, shape, channels_last, dtype, affine):
    """The C++ backward of BN+ReLU without a residual recomputes the forward's pre-activation from x with the
    forward's coefficients (mask_from_input) instead of reading y: every layout's kernels (CPU: rows, large and
    small planes, grouped or whole-tensor; CUDA: rows, planes in 16-byte groups or one value at a time, flat small
    planes) must give the bits of the mask read from y, pre-activations exactly 0 included (channel 0 holds -1, 0, 1
    repeated: mean 0, so x = 0 gives 0 with a zero bias)."""
    skip_unless_runnable(device, device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x[:, 0] = (torch.arange(x[:, 0].numel()) % 3 - 1).to(dtype).view(x[:, 0].shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    C = shape[1]
    w, b = (torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)) if affine else \
        (None, None)
    if b is not None:
        b[0] = 0
    x, dy, w, b = [None if t is None else t.to(device) for t in (x, dy, w, b)]
    y, mean, invstd = torch.ops.fck.batch_norm_fwd(x, None, w, b, None, None, True, 0.1, 1e-5, True)
    assert (y[:, 0] == 0).any() and (y[:, 0] > 0).any()
    from_y = torch.ops.fck.batch_norm_bwd(dy, x, y, w, mean, invstd, True, True, False)
    from_x = torch.ops.fck.batch_norm_bwd(dy, x, y, w, mean, invstd, True, True, False, b, True)
    for a, c in zip(from_y, from_x):
        assert torch.equal(a, c)


def _ran_winograd(y) -> bool:
    """Whether y's autograd graph holds the Winograd convolution's node."""
    return any("WinogradConv2d" in name for name in graph_node_names(y))


def _winograd_or_skip():
    skip_unless_runnable("cpu", "cpu")
    if not torch.ops.fck.winograd_available():
        pytest.skip("the Winograd convolution needs a CPU with AVX2 and FMA")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("N,C,K,H,W,pad", [
    (2, 3, 5, 9, 7, 1),      # C and K below one vector, every tile partial at an edge
    (3, 13, 17, 11, 5, 0),   # no padding: output 9x3
    (1, 8, 16, 3, 3, 1),     # one 3x3 output, smaller than a tile
    (2, 16, 33, 6, 13, 2),   # padding 2; K one past two 16-column panels
    (4, 40, 24, 8, 12, 1),   # whole tiles for both m, whole 8-channel groups
    (1, 1, 1, 4, 4, 1),      # single channels
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_winograd_conv_matches_conv2d_in_float64(m, N, C, K, H, W, pad, channels_last):
    """The kernel against F.conv2d in float64 (with bias and ReLU, then without either), its transposed weight (the
    input gradient's convolution) against conv_transpose2d and its weight gradient against convolution_backward,
    on outputs poisoned through the pool (every element must be written), NCHW and channels_last (the output in
    the input's format). Tolerances: F(2x2) rounds like a direct convolution; F(4x4)'s transforms multiply by up
    to 8."""
    _winograd_or_skip()
    g = torch.Generator().manual_seed(N * 1000 + C * 10 + K)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(K, generator=g, dtype=torch.float64)
    conv, pack = torch.ops.fck.conv3x3_winograd, torch.ops.fck.winograd_weight
    ref = F.conv2d(x, w, b, padding=pad)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    xf, dyf = (t.float().contiguous(memory_format=fmt) for t in (x, dy))
    tol = 1e-5 if m == 2 else 1e-4
    cases = [(lambda: conv(xf, pack(w.float(), m), b.float(), [pad, pad], K, True), F.relu(ref), fmt),
             (lambda: conv(xf, pack(w.float(), m), None, [pad, pad], K, False), ref - b.view(-1, 1, 1), fmt),
             (lambda: conv(dyf, pack(w.float(), m, True), None, [2 - pad] * 2, C, False),
              F.conv_transpose2d(dy, w, padding=pad), fmt),
             (lambda: torch.ops.fck.conv3x3_winograd_weight_grad(xf, dyf, [pad, pad], m),
              torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                                                  [False, True, False])[1], torch.contiguous_format)]
    for run, want, out_fmt in cases:
        for _ in range(2):  # the second call reuses the first's pooled output block, filled with NaN
            y = run()
            assert y.shape == want.shape and y.is_contiguous(memory_format=out_fmt) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())
            y.fill_(float("nan"))
            del y


def test_winograd_conv_relu_keeps_nan():
    _winograd_or_skip()
    x = torch.randn(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    y = torch.ops.fck.conv3x3_winograd(x, torch.ops.fck.winograd_weight(torch.randn(5, 4, 3, 3), 4), None, [1, 1], 5,
                                       True)
    assert torch.isnan(y[0, :, 1:4, 2:5]).all() and not torch.isnan(y[0, :, 5]).any()


def test_winograd_conv_rejects_bad_input():
    _winograd_or_skip()
    w, b, x = torch.randn(6, 4, 3, 3), torch.randn(6), torch.randn(2, 4, 5, 5)
    u = torch.ops.fck.winograd_weight(w, 4)
    op = torch.ops.fck.conv3x3_winograd
    with pytest.raises(RuntimeError, match="tile size m must be 2 or 4"):
        torch.ops.fck.winograd_weight(w, 3)
    with pytest.raises(RuntimeError, match=r"\(K, C, 3, 3\) weight"):
        torch.ops.fck.winograd_weight(torch.randn(6, 4, 5, 5), 4)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fck.winograd_weight(w.double(), 4)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), u, b, [1, 1], 6, True)
    with pytest.raises(RuntimeError, match="does not match 13 input channels"):
        op(torch.randn(2, 5 + 8, 5, 5), u, b, [1, 1], 6, True)
    with pytest.raises(RuntimeError, match="does not match 4 input channels and 17 output channels"):
        op(x, u, None, [1, 1], 17, True)
    with pytest.raises(RuntimeError, match="a bias of 6 values"):
        op(x, u, torch.randn(5), [1, 1], 6, True)
    with pytest.raises(RuntimeError, match="4-D"):
        op(x[0], u, b, [1, 1], 6, True)
    with pytest.raises(RuntimeError, match="smaller than the 3x3 kernel"):
        op(torch.randn(2, 4, 2, 5), u, b, [0, 0], 6, True)
    with pytest.raises(RuntimeError, match="non-negative"):
        op(x, u, b, [-1, 1], 6, True)
    with pytest.raises(RuntimeError, match="winograd_weight"):
        op(x, u[:, :, :, :8].contiguous(), b, [1, 1], 6, True)
    assert op(torch.randn(0, 4, 5, 5), u, b, [1, 1], 6, True).shape == (0, 6, 5, 5)
    wgrad = torch.ops.fck.conv3x3_winograd_weight_grad
    with pytest.raises(RuntimeError, match="does not match the convolution"):
        wgrad(x, torch.randn(2, 6, 4, 5), [1, 1], 4)
    with pytest.raises(RuntimeError, match="tile size m must be 2 or 4"):
        wgrad(x, torch.randn(2, 6, 5, 5), [1, 1], 6)
    with pytest.raises(RuntimeError, match="float32"):
        wgrad(x, torch.randn(2, 6, 5, 5, dtype=torch.float64), [1, 1], 4)
    assert torch.equal(wgrad(torch.randn(0, 4, 5, 5), torch.randn(0, 6, 5, 5), [1, 1], 4), torch.zeros(6, 4, 3, 3))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_conv_follows_autocast(monkeypatch, channels_last):
    """Inside torch.autocast a convolution runs in its dtype: the fused one too, in training (not the fp32 Winograd
    kernel, which the size rules would pick here) and eval (the folded weights cast): the stock block's output dtype,
    and its bf16 error against the fp32 run within 2x the stock block's, outputs and gradients."""
    _winograd_or_skip()
    winograd_for_small_shapes(monkeypatch)
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
    with torch.no_grad():
        stock[1].running_mean.uniform_(-0.5, 0.5), stock[1].running_var.uniform_(0.5, 2)
    fused = fck.fuse(copy.deepcopy(stock))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(6, 16, 11, 13).contiguous(memory_format=fmt)  # 72 tiles: Winograd's, on one thread
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    weights = torch.randn(24, 1, 1)
    for mode in ("train", "eval"):  # eval without gradients: the folded path
        runs = []
        for m, autocast in ((stock, False), (stock, True), (fused, True)):
            getattr(m, mode)()
            state = copy.deepcopy(m.state_dict())
            xi = x.clone().requires_grad_(mode == "train")
            with torch.autocast("cpu", enabled=autocast), torch.set_grad_enabled(mode == "train"):
                y = m(xi)
            grads = []
            if mode == "train":
                (y.float() * weights).sum().backward()
                grads = [xi.grad] + [p.grad.clone() for p in m.parameters()]
            runs.append((y, grads))
            m.zero_grad()
            m.load_state_dict(state)
        (y32, g32), (ya, ga), (yb, gb) = runs
        assert ya.dtype == yb.dtype == torch.bfloat16, mode
        for what, ours, theirs, truth in [("output", yb, ya, y32)] + [
                (f"grad {i}", b, a, t) for i, (a, b, t) in enumerate(zip(ga, gb, g32))]:
            err_ours, err_theirs = ((u.float() - truth).abs().max().item() for u in (ours, theirs))
            assert err_ours <= 2 * err_theirs + 1e-2 * truth.abs().max().item(), f"{mode} {what}"


@pytest.mark.parametrize("weight_grad", ["winograd", "onednn"])
def test_conv_bn_relu_training_by_winograd_matches_torch(monkeypatch, weight_grad):
    """Training: the convolution, its input gradient and (large enough, or forced here) its weight gradient by
    Winograd, else the weight gradient by oneDNN; outputs, running statistics and every gradient against the
    unfused torch ops, for both tiles and with the direct path (0)."""
    _winograd_or_skip()
    winograd_for_small_shapes(monkeypatch, weight_grad == "winograd")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 16, 17, 15, generator=g)
    conv_w, conv_b = torch.randn(32, 16, 3, 3, generator=g) * 0.1, torch.randn(32, generator=g)
    w, b = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    dy = torch.randn(9, 32, 17, 15, generator=g)
    for setting in ("4", "2", "0"):
        monkeypatch.setenv("FCK_CONV_WINOGRAD", setting)
        for bias in (conv_b, None):
            args = [t.clone().requires_grad_() if t is not None else None for t in (x, conv_w, bias, w, b)]
            ref = [t.clone().requires_grad_() if t is not None else None for t in (x, conv_w, bias, w, b)]
            rm1, rv1, rm2, rv2 = torch.zeros(32), torch.ones(32), torch.zeros(32), torch.ones(32)
            y = fckF.conv_bn_relu(args[0], args[1], args[2], rm1, rv1, args[3], args[4], True, 0.1, 1e-5, padding=1)
            yt = F.relu(F.batch_norm(F.conv2d(ref[0], ref[1], ref[2], 1, 1), rm2, rv2, ref[3], ref[4], True))
            torch.testing.assert_close(y, yt, rtol=1e-4, atol=1e-4)
            y.backward(dy)
            yt.backward(dy)
            for a, r in zip(args, ref):
                if a is not None:
                    torch.testing.assert_close(a.grad, r.grad, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(rm1, rm2)
            torch.testing.assert_close(rv1, rv2)
    monkeypatch.setenv("FCK_CONV_WINOGRAD", "4")
    y = fckF.conv_bn_relu(x.requires_grad_(), conv_w, conv_b, torch.zeros(32), torch.ones(32), w, b, True, padding=1)
    assert _ran_winograd(y)
    # eval through the functional op, without a module's fold cache: the weight is transformed for the call
    cbr = importlib.import_module("fastcore_kernels.ops.conv_bn_relu")
    ran = []
    real = cbr._winograd_conv_relu
    monkeypatch.setattr(cbr, "_winograd_conv_relu", lambda *a: ran.append(real(*a)) or ran[-1])
    rm, rv = torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.5
    with torch.no_grad():
        y = fckF.conv_bn_relu(x, conv_w, conv_b, rm, rv, w, b, False, padding=1)
    torch.testing.assert_close(y, F.relu(F.batch_norm(F.conv2d(x, conv_w, conv_b, 1, 1), rm, rv, w, b, False)),
                               rtol=1e-4, atol=1e-4)
    assert len(ran) == 1 and ran[0] is not None


@pytest.mark.parametrize("setting", ["4", "2", "0"])
def test_fused_conv_takes_the_winograd_kernel_as_configured(monkeypatch, setting):
    """A fused conv-BN-ReLU module in eval mode runs its 3x3 stride-1 convolution by Winograd (FCK_CONV_WINOGRAD:
    the tile, 0 for oneDNN), NCHW or channels_last, keeps the transformed weight in its fold cache, and matches the
    unfused module; a stride of 2 and a 1x1 kernel keep the direct convolution. Training takes the same path."""
    _winograd_or_skip()
    winograd_for_small_shapes(monkeypatch)
    monkeypatch.setenv("FCK_CONV_WINOGRAD", setting)
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()).eval()
    seq[1].running_mean.normal_()
    seq[1].running_var.uniform_(0.5, 2)
    fused = fck.fuse(seq).eval()
    x = torch.randn(9, 16, 17, 15)  # 9 x 9 x 8 = 648 tiles of 2x2, 9 x 5 x 4 = 180 of 4x4: enough for two threads
    with torch.no_grad():
        y = fused(x)
        torch.testing.assert_close(y, seq(x), rtol=1e-4, atol=1e-4)
        key = fused[0]._fold_cache.pack_key
        # without Winograd, oneDNN on the plain weight: 16 input channels are too few for its packed layout
        assert key == (("winograd", int(setting)) if setting != "0" else None)
        xc = x.contiguous(memory_format=torch.channels_last)
        y, yt = fused(xc), seq(xc)
        torch.testing.assert_close(y, yt, rtol=1e-4, atol=1e-4)
        assert y.stride() == yt.stride()  # channels_last in, channels_last out, as torch's
        # the same path for channels_last, but that oneDNN's packed weight serves an NHWC input at any width (its
        # NHWC output needs no copy back)
        assert fused[0]._fold_cache.pack_key == (key if setting != "0" else (tuple(x.shape), (1, 1), (1, 1), (1, 1), 1))
        for conv in (nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(16, 32, 1)):
            other = fck.fuse(nn.Sequential(conv, seq[1], nn.ReLU())).eval()
            torch.testing.assert_close(other(x), nn.Sequential(conv, seq[1], nn.ReLU())(x), rtol=1e-4, atol=1e-4)
            # oneDNN's on the plain weight: 16 input channels (and a 1x1 convolution, whose output's copy back to
            # NCHW would cost more than the prepacked layout gains)
            assert other[0]._fold_cache.pack_key is None
    # training mode: the module's convolution takes the same path (a Winograd node in the graph unless disabled)
    fused.train(), seq.train()
    for inp in (x, xc):
        xs = [inp.clone().requires_grad_() for _ in range(2)]
        y, yt = fused(xs[0]), seq(xs[1])
        torch.testing.assert_close(y, yt, rtol=1e-4, atol=1e-4)
        assert y.stride() == yt.stride()
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [xs[0], *fused.parameters()], dy)
        tgrads = torch.autograd.grad(yt, [xs[1], *seq.parameters()], dy)
        for a, b in zip(grads, tgrads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        assert grads[0].stride() == tgrads[0].stride()
        assert _ran_winograd(y) == (setting != "0")
    monkeypatch.setenv("FCK_CONV_WINOGRAD", "3")
    with torch.no_grad(), pytest.raises(ValueError, match="FCK_CONV_WINOGRAD must be 0, 2 or 4"):
        fck.fuse(seq).eval()(x)


def test_winograd_size_rules():
    """Which convolutions take the Winograd kernels by default (on two threads, this library's CPU; the tile rule
    scales with the threads): ResNet-34's 3x3 layers at N = 64 all three (forward, input and weight gradients); a
    mid-size one the forward and input gradient only; the small layers of the lesson-1 digit ResNet (16 channels at
    14x14) and batch 8's 7x7 layer none (oneDNN is faster there: see _WINOGRAD_MIN_WORK)."""
    _winograd_or_skip()
    cbr = importlib.import_module("fastcore_kernels.ops.conv_bn_relu")
    meta = lambda *shape: torch.empty(shape)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for (N, C, H), fwd, wgrad in [((64, 64, 56), True, True), ((64, 512, 7), True, True),
                                      ((64, 64, 14), True, False), ((64, 16, 14), False, False),
                                      ((8, 512, 7), False, False)]:
            x, w = meta(N, C, H, H), meta(C, C, 3, 3)
            m = cbr._winograd_tile_for(x, w, 1, 1, 1, 1)
            assert bool(m) == fwd, (N, C, H)
            if m:
                assert (cbr._winograd_work(x, w, m, [1, 1]) >= cbr._WINOGRAD_MIN_WEIGHT_GRAD_WORK) == wgrad, (N, C, H)
    finally:
        torch.set_num_threads(threads)


def test_winograd_weight_grad_on_any_thread_count():
    """The weight gradient splits the tiles over workers (one a thread, fewer than tiles when there are few) and
    adds their sums in worker order: right for every thread count, deterministic for each."""
    _winograd_or_skip()
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(3, 5, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 7, 6, 6, generator=g,
                                                                                    dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(dy, x, torch.zeros(7, 5, 3, 3, dtype=torch.float64), None, [1, 1],
                                               [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 8, 40):  # 40 threads: more than the 12 tiles of 4x4
            torch.set_num_threads(n)
            for m in (2, 4):
                runs = [torch.ops.fck.conv3x3_winograd_weight_grad(x.float(), dy.float(), [1, 1], m) for _ in range(2)]
                assert torch.equal(runs[0], runs[1])
                torch.testing.assert_close(runs[0].double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    finally:
        torch.set_num_threads(threads)


def test_fused_conv_stem_is_not_prepacked():
    """A convolution with fewer than 64 input channels (a network's stem, a narrow layer) runs oneDNN on its plain
    weight: the blocked layout pads a stem's channels (5x slower for 1 -> 16 at 28x28 on this library's Xeon), and
    at 16-32 channels its copy back to NCHW costs more than it gains. Results match either way; from 64 input
    channels the weight is packed."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    fused = fck.fuse(seq).eval()
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
    assert fused[0]._fold_cache.pack is None
    # packed from 64 input channels and _ONEDNN_PACK_MIN_WORK multiply-adds (4M; 4 x 16 x 16 x 64 x 64 x 9 =
    # 38M, 1 x 8 x 8 x 64 x 64 x 9 = 2.4M)
    for cin, n, size, packed in ((32, 4, 32, False), (64, 4, 32, True), (64, 1, 16, False)):
        seq = nn.Sequential(nn.Conv2d(cin, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()).eval()
        fused = fck.fuse(copy.deepcopy(seq)).eval()
        x = torch.randn(n, cin, size, size)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
        assert (fused[0]._fold_cache.pack is not None) == (packed and torch.backends.mkldnn.is_available())
