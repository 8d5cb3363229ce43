"""max_pool2d (and nn.MaxPool2d, fuse's drop-in) on every backend against torch.nn.functional.max_pool2d: the same
values, the same indices (ties to the first maximum in row-major order, a NaN to the last NaN), the same gradients;
kernels, strides, padding, dilation, ceil_mode, odd sizes, unbatched input, dtypes; the paths that stay torch's
(channels_last, bad arguments, empty batches); double backward; torch.compile."""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels.functional import avg_pool2d, max_pool2d
from fastcore_kernels.ops.max_pool import IMPLEMENTED

from conftest import skip_unless_runnable

BACKENDS = IMPLEMENTED

# (kernel, stride, padding, dilation, ceil_mode): the stem's 3/2/1, non-overlapping 2x2, stride 1, rectangular
# windows, dilation, ceil_mode's partial last windows, strides above 2
CONFIGS = [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False), ((2, 3), (1, 2), (1, 1), 1, False),
           (3, 2, 1, 2, False), (3, 2, 0, 1, True), (2, 3, 1, 1, True), ((3, 2), 3, (1, 0), (1, 2), True),
           (1, 1, 0, 1, False), (5, 4, 2, 1, True)]
SHAPES = [(2, 3, 9, 11), (1, 1, 7, 7), (3, 2, 16, 5), (2, 5, 20, 33), (4, 6, 8)]


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    flat[::7] = flat[::7].round()  # ties between rounded values
    flat[3::11] = 0.0  # and zeros, as after a ReLU
    return x.to(dtype)


def _grad_truth(x, grad, cfg):
    """The input gradient in float64 (torch sums fp16/bf16 gradients in their own precision)."""
    k, s, p, d, c = cfg
    _, idx = F.max_pool2d(x, k, s, p, d, c, return_indices=True)
    planes = grad.shape[0] * grad.shape[1] if grad.dim() == 4 else grad.shape[0]
    flat = torch.zeros(planes, x.shape[-2] * x.shape[-1], dtype=torch.float64)
    flat.scatter_add_(1, idx.reshape(planes, -1), grad.double().reshape(planes, -1))
    return flat.view(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_against_torch(backend, dtype):
    skip_unless_runnable(backend, "cpu")
    for (shape, cfg), seed in zip(itertools.product(SHAPES, CONFIGS), itertools.count()):
        k, s, p, d, c = cfg
        case = f"{shape} k{k} s{s} p{p} d{d} ceil={c} {dtype}"
        x = _input(shape, dtype, seed)
        try:
            want, want_idx = F.max_pool2d(x, k, s, p, d, c, return_indices=True)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                with fck.use_backend(backend):
                    max_pool2d(x, k, s, p, d, c)
            continue
        xs = x.clone().requires_grad_()
        with fck.use_backend(backend):
            got, got_idx = max_pool2d(xs, k, s, p, d, c, return_indices=True)
            got_plain = max_pool2d(x, k, s, p, d, c)  # no gradient, no indices: the other kernel variant
        assert torch.equal(got.detach(), want) and torch.equal(got_plain, want), case
        if backend == "cpu" and x.dim() == 4:  # our kernel ran, not torch's op
            assert "max_pool2d_fwd" in got.grad_fn.name(), case
        assert got_idx.dtype == torch.int64 and torch.equal(got_idx, want_idx), case
        grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        got.backward(grad)
        if dtype in (torch.float64, torch.float32):  # each position's sum in output order, as torch adds them
            xr = x.clone().requires_grad_()
            F.max_pool2d(xr, k, s, p, d, c).backward(grad)
            assert torch.equal(xs.grad, xr.grad), case
        else:  # ours sums in fp32 and rounds once (half an ulp); torch's (the reference) rounds every add
            tol = {("cpu", torch.bfloat16): 4e-3, ("cpu", torch.float16): 5e-4,
                   ("reference", torch.bfloat16): 5e-2, ("reference", torch.float16): 5e-3}[backend, dtype]
            torch.testing.assert_close(xs.grad.double(), _grad_truth(x, grad, cfg), rtol=tol, atol=tol, msg=case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf(backend):
    """A NaN wins its windows (the last NaN of a window is its index); -inf everywhere reports the window's first
    valid position; +inf is an ordinary maximum."""
    skip_unless_runnable(backend, "cpu")
    x = torch.randn(2, 3, 10, 12)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = float("nan")
    x[0, 1, 4:8, 4:8] = float("nan")
    x[1, 0] = -float("inf")
    x[1, 1, 5, 5] = float("inf")
    for cfg in [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False)]:
        want, want_idx = F.max_pool2d(x, *cfg, return_indices=True)
        with fck.use_backend(backend):
            got, got_idx = max_pool2d(x, *cfg, return_indices=True)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(got_idx, want_idx)


def test_every_output_written():
    """Outputs come from the CPU pool's recycled blocks: fill one with NaN, free it, and the pool's next block of
    that size must come back fully overwritten."""
    skip_unless_runnable("cpu", "cpu")
    x = torch.rand(4, 16, 130, 130)
    want, want_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    for _ in range(2):
        poisoned = torch.ops.fck.contiguous_pooled(torch.full(want.shape, float("nan")))
        del poisoned
        with fck.use_backend("cpu"):
            got, idx = max_pool2d(x, 3, 2, 1, return_indices=True)
        assert torch.equal(got, want) and torch.equal(idx, want_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    skip_unless_runnable(backend, "cpu")
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    with fck.use_backend(backend):
        for cfg in [(3, 2, 1, 1, False), (2, 1, 0, 2, True)]:
            f = lambda t: max_pool2d(t, *cfg)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x,))
            assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("ours, theirs", [(max_pool2d, F.max_pool2d), (avg_pool2d, F.avg_pool2d)])
def test_layouts_and_views(ours, theirs):
    """Both pools: channels_last input runs torch's own vectorized kernel (its layout kept); a strided view is
    pooled as a contiguous copy."""
    skip_unless_runnable("cpu", "cpu")
    x = torch.randn(2, 8, 14, 15)
    cl = x.contiguous(memory_format=torch.channels_last)
    got = ours(cl, 3, 2, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, theirs(cl, 3, 2, 1))
    view = torch.randn(2, 8, 30, 31)[:, ::2, 1::2, ::2]
    torch.testing.assert_close(ours(view, 2, 2), theirs(view, 2, 2))  # max pooling's: exactly


@pytest.mark.parametrize("ours, theirs, bad", [
    (max_pool2d, F.max_pool2d, [dict(kernel_size=0), dict(kernel_size=2, padding=2), dict(kernel_size=3, stride=0),
                                dict(kernel_size=9), dict(kernel_size=2, dilation=0)]),
    (avg_pool2d, F.avg_pool2d, [dict(kernel_size=0), dict(kernel_size=2, padding=2), dict(kernel_size=3, stride=0),
                                dict(kernel_size=9), dict(kernel_size=2, divisor_override=0),
                                dict(kernel_size=3, padding=-1)])])
def test_bad_arguments_raise_as_torch(ours, theirs, bad):
    """Both pools: bad arguments and wrong ranks raise torch's errors (its own op refuses them); an empty batch
    gives torch's empty result."""
    x = torch.randn(2, 3, 8, 8)
    for kw in bad:
        with pytest.raises(RuntimeError) as want:
            theirs(x, **kw)
        with pytest.raises(RuntimeError) as got:
            ours(x, **kw)
        assert str(got.value) == str(want.value), kw
    for t in (torch.randn(8, 8), torch.randn(1, 2, 3, 8, 8)):  # wrong rank
        with pytest.raises(Exception) as want:
            theirs(t, 2)
        with pytest.raises(type(want.value), match=re.escape(str(want.value))):
            ours(t, 2)
    empty = torch.randn(0, 3, 8, 8)
    assert ours(empty, 2).shape == theirs(empty, 2).shape


def test_backward_op_never_writes_outside_the_plane():
    """The backward op trusts nothing it is given: a negative index is an error, one past the plane (an empty
    window's, see below) carries no gradient; neither is ever written."""
    skip_unless_runnable("cpu", "cpu")
    grad = torch.randn(1, 2, 3, 3)
    idx = torch.zeros(1, 2, 3, 3, dtype=torch.int32)
    idx[0, 1, 2, 2] = 36
    got = torch.ops.fck.max_pool2d_bwd(grad, idx, [1, 2, 6, 6])
    # (the sum's order differs from torch's: equal to rounding)
    torch.testing.assert_close(got[0, 1, 0, 0], grad[0, 1].view(-1)[:8].sum())
    assert (got.view(2, -1)[:, 1:] == 0).all()
    idx[0, 1, 2, 2] = -1
    with pytest.raises(RuntimeError, match="negative index"):
        torch.ops.fck.max_pool2d_bwd(grad, idx, [1, 2, 6, 6])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_windows_that_hold_no_input(dtype):
    """A dilated window over a one-row input (3 rows, dilation 2, padding 1: rows -1, 1, 3) holds nothing: torch
    gives -inf and an index past the plane, and its backward writes there (a crash); ours gives the same forward and
    sends that output's gradient nowhere."""
    skip_unless_runnable("cpu", "cpu")
    x = torch.randn(3, 5, 1, 21, dtype=dtype)
    args = ((3, 2), (4, 4), (1, 0), (2, 3), True)
    want, want_idx = F.max_pool2d(x, *args, return_indices=True)
    assert (want_idx >= 21).any()  # the empty windows' positions
    xs = x.clone().requires_grad_()
    with fck.use_backend("cpu"):
        got, idx = max_pool2d(xs, *args, return_indices=True)
    assert torch.equal(got.detach(), want) and torch.equal(idx, want_idx)
    got.backward(torch.ones_like(got))
    assert torch.equal(xs.grad, torch.zeros_like(x))  # every window here is empty


def test_module_and_fuse():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.ReLU(),
                          nn.MaxPool2d(2, return_indices=False))
    fused = fck.fuse(model)
    assert isinstance(fused[1], fck.nn.MaxPool2d) and isinstance(fused[3], fck.nn.MaxPool2d)
    x = torch.randn(2, 3, 21, 17, requires_grad=True)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    pool = fck.nn.MaxPool2d(2, return_indices=True)
    out, idx = pool(x)
    want, want_idx = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(out, want) and torch.equal(idx, want_idx)
    assert pool.state_dict() == {} and repr(pool) == repr(nn.MaxPool2d(2, return_indices=True))


def test_opcheck():
    skip_unless_runnable("cpu", "cpu")
    x = torch.randn(2, 3, 9, 8)
    torch.library.opcheck(torch.ops.fck.max_pool2d_fwd, (x, [3, 3], [2, 2], [1, 1], [1, 1], False, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, idx = torch.ops.fck.max_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], [1, 1], False, True)
    torch.library.opcheck(torch.ops.fck.max_pool2d_bwd, (torch.randn_like(out), idx, list(x.shape)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile():
    """torch.compile traces torch's op (Inductor generates its own pooling): the module compiles whole."""
    pool = fck.nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    got = torch.compile(pool, fullgraph=True)(x)
    assert torch.equal(got, F.max_pool2d(x, 3, 2, 1))
