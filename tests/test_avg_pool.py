"""avg_pool2d (and nn.AvgPool2d, fuse's drop-in and its swap of functional calls) on every backend against
torch.nn.functional.avg_pool2d computed in float64: values and gradients for kernels, strides, padding,
count_include_pad, divisor_override, ceil_mode's partial last windows, odd sizes, unbatched input, dtypes; NaN and
inf; the paths that stay torch's (bad arguments, empty batches, huge planes; channels_last: test_max_pool.py);
double backward; torch.compile."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels.functional import avg_pool2d
from fastcore_kernels.ops.avg_pool import IMPLEMENTED

from conftest import runnable, skip_unless_runnable

BACKENDS = IMPLEMENTED

# (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override): Inception's 3/1/1, DenseNet's 2/2,
# rectangular windows and strides, ceil_mode's partial last windows with and without the padding counted, strides
# above 2, a divisor override, a 1x1 window
CONFIGS = [(3, 1, 1, False, True, None), (2, 2, 0, False, True, None), (3, 2, 1, False, False, None),
           ((2, 3), (1, 2), (1, 1), False, True, None), (3, 2, 0, True, True, None), (2, 3, 1, True, False, None),
           ((3, 2), 3, (1, 0), True, True, None), (1, 1, 0, False, True, None), (5, 4, 2, True, False, None),
           (3, 1, 1, False, True, 5), ((4, 1), (3, 1), (2, 0), True, False, -3)]
SHAPES = [(2, 3, 9, 11), (1, 1, 7, 7), (3, 2, 16, 5), (2, 5, 20, 33), (4, 6, 8)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_against_torch(backend, dtype):
    skip_unless_runnable(backend, "cpu")
    for (shape, cfg), seed in zip(itertools.product(SHAPES, CONFIGS), itertools.count()):
        case = f"{shape} {cfg} {dtype}"
        x = _input(shape, dtype, seed)
        x64 = x.detach().double().clone().requires_grad_()
        try:
            want = F.avg_pool2d(x64, *cfg)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                with fck.use_backend(backend):
                    avg_pool2d(x, *cfg)
            continue
        grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        want.backward(grad.double())
        xs = x.detach().clone().requires_grad_()
        with fck.use_backend(backend):
            got = avg_pool2d(xs, *cfg)
        if backend == "cpu" and x.dim() == 4:  # our kernel ran, not torch's op
            assert "avg_pool2d_fwd" in got.grad_fn.name(), case
        assert got.dtype == dtype and got.shape == want.shape, case
        tol = TOL[dtype] if backend == "cpu" or dtype in (torch.float64, torch.float32) else 4 * TOL[dtype]
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol, msg=case)
        got.backward(grad)
        torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=tol, atol=tol, msg=case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf(backend):
    """A NaN reaches every output whose window holds it, an inf every window it is in (inf and -inf in one window:
    NaN), as in torch; the other outputs stay finite."""
    skip_unless_runnable(backend, "cpu")
    x = torch.randn(2, 3, 10, 12)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 4, 4] = float("inf")
    x[0, 1, 5, 6] = -float("inf")
    x[1, 2, 9, 11] = float("inf")
    for cfg in [(3, 1, 1), (2, 2, 0), (3, 2, 1)]:
        want = F.avg_pool2d(x, *cfg)
        with fck.use_backend(backend):
            got = avg_pool2d(x, *cfg)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        assert torch.equal(got[got.isinf()], want[want.isinf()])
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite])


def test_every_value_written():
    """Outputs and input gradients come from the CPU pool's recycled blocks: fill one with NaN, free it, and the
    pool's next block of that size must come back fully overwritten."""
    skip_unless_runnable("cpu", "cpu")
    x = torch.rand(4, 16, 130, 130, requires_grad=True)
    want = F.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    grad = torch.rand_like(want)
    (want_gx,) = torch.autograd.grad(want, x, grad)
    for _ in range(2):
        for shape in (want.shape, x.shape):
            poisoned = torch.ops.fck.contiguous_pooled(torch.full(shape, float("nan")))
            del poisoned
        with fck.use_backend("cpu"):
            got = avg_pool2d(x, 3, 2, 1, ceil_mode=True)
            (gx,) = torch.autograd.grad(got, x, grad)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(gx, want_gx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    """First and second derivatives (the backward op's own gradient is the forward op)."""
    skip_unless_runnable(backend, "cpu")
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    with fck.use_backend(backend):
        for cfg in [(3, 2, 1, False, True, None), (2, 1, 1, True, False, None), (3, 1, 0, False, True, 4)]:
            f = lambda t: avg_pool2d(t, *cfg)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x,))
            assert torch.autograd.gradgradcheck(f, (x,))


def test_huge_planes_run_torchs_op(monkeypatch):
    """Planes above the kernel's buffer limit go to torch's op (no plane-sized buffers per thread)."""
    from fastcore_kernels.ops import avg_pool

    x = torch.randn(1, 2, 40, 30, requires_grad=True)
    monkeypatch.setattr(avg_pool, "_MAX_PLANE", 40 * 30 - 1)
    got = avg_pool2d(x, 3, 2, 1)
    assert "avg_pool2d_fwd" not in got.grad_fn.name() and torch.equal(got, F.avg_pool2d(x, 3, 2, 1))


def test_integer_input_runs_torchs_op():
    x = torch.arange(16).view(1, 1, 4, 4)
    assert torch.equal(avg_pool2d(x, 2), F.avg_pool2d(x, 2))


def test_ops_check_their_arguments():
    """The C++ ops refuse what the Python routing never sends them: a clear error, not a read out of bounds."""
    skip_unless_runnable("cpu", "cpu")
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fck.avg_pool2d_fwd(x.transpose(2, 3), [2, 2], [2, 2], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match="half of kernel size"):
        torch.ops.fck.avg_pool2d_fwd(x, [2, 2], [2, 2], [2, 2], False, True, None)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.fck.avg_pool2d_bwd(torch.randn(1, 2, 4, 3), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match="divisor must be not zero"):
        torch.ops.fck.avg_pool2d_bwd(torch.randn(1, 2, 3, 3), [1, 2, 6, 6], [2, 2], [2, 2], [0, 0], False, True, 0)


class _FunctionalPools(nn.Module):
    """Pools in its forward as torchvision's Inception blocks do."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        a = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        b = F.max_pool2d(self.act(x), 3, 1, 1)
        return a + b + F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def test_module_and_fuse():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 2, 1, ceil_mode=True), nn.ReLU(),
                          nn.AvgPool2d(2, divisor_override=3), _FunctionalPools())
    fused = fck.fuse(model)
    assert isinstance(fused[1], fck.nn.AvgPool2d) and isinstance(fused[3], fck.nn.AvgPool2d)
    swapped = [line for line in fused.fck_fuse_report if line.endswith(" call")]
    assert len(swapped) == 3 and sum("F.max_pool2d" in line for line in swapped) == 1
    x = torch.randn(2, 3, 21, 17, requires_grad=True)
    want = model(x)
    got = fused(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    if runnable("cpu", "cpu"):  # the graph calls our functions (which run torch's op without the extension)
        names = {n.target.__module__ for n in fused[4].graph.nodes if n.op == "call_function"}
        assert {"fastcore_kernels.ops.avg_pool", "fastcore_kernels.ops.max_pool"} <= names
    pool = fck.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
    assert pool.state_dict() == {} and repr(pool) == repr(nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                                        count_include_pad=False))


def test_opcheck():
    skip_unless_runnable("cpu", "cpu")
    x = torch.randn(2, 3, 9, 8)
    args = ([3, 3], [2, 2], [1, 1], True, False, None)
    torch.library.opcheck(torch.ops.fck.avg_pool2d_fwd, (x,) + args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out = torch.ops.fck.avg_pool2d_fwd(x, *args)
    torch.library.opcheck(torch.ops.fck.avg_pool2d_bwd, (torch.randn_like(out), list(x.shape)) + args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile():
    """torch.compile traces torch's op (Inductor generates its own pooling): the module compiles whole."""
    pool = fck.nn.AvgPool2d(3, 2, 1)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    got = torch.compile(pool, fullgraph=True)(x)
    torch.testing.assert_close(got, F.avg_pool2d(x, 3, 2, 1))
