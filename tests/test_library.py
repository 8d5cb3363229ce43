"""The ops as torch.library citizens: schema/fake/autograd registration (opcheck) and torch.compile."""

import pytest
import torch

import fastcore_kernels as fck
from fastcore_kernels.ops.adam import COMPILE_TRACES_LIST_MUTATION

from conftest import devices, skip_unless_runnable


def _adam_args(device, dtype=torch.float32, master=False, amsgrad=True):
    g = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4)]

    def rnd(s, dt, pos=False):
        t = torch.randn(s, generator=g)
        return (t.abs() + 0.1 if pos else t).to(device, dt)

    sdt = torch.float32 if master else dtype
    params = [rnd(s, dtype) for s in shapes]
    return (
        params,
        [rnd(s, dtype) for s in shapes],
        [rnd(s, sdt) for s in shapes],
        [rnd(s, sdt, True) for s in shapes],
        [rnd(s, sdt, True) for s in shapes] if amsgrad else [],
        [p.float() for p in params] if master else [],
        [torch.tensor(2.0) for _ in shapes],
        1e-3, 0.9, 0.999, 1e-8, 0.01, amsgrad, False, True, 1.0,
    )


# test_aot_dispatch_dynamic is not meaningful for an op that returns nothing and only mutates.
_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op_name,backend", [("adam_", "cpu"), ("adam_triton_", "triton")])
def test_opcheck(device, op_name, backend):
    if backend == "cpu" and device == "cuda":
        backend = "cuda"
    skip_unless_runnable(backend, device)
    op = getattr(torch.ops.fck, op_name)
    for master, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        torch.library.opcheck(op, _adam_args(device, dtype, master), test_utils=_OPCHECK_TESTS)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_optimizer_step_compiles_fullgraph(backend):
    skip_unless_runnable(backend, "cpu")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ref_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ref_model.load_state_dict(model.state_dict())
    opt = fck.FusedAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    forward = torch.compile(model, fullgraph=True)
    # torch 2.4 compiles the step with the kernels behind a graph break (fastcore_kernels.ops.adam)
    step = torch.compile(opt.step, fullgraph=COMPILE_TRACES_LIST_MUTATION)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    for _ in range(5):
        torch.nn.functional.mse_loss(forward(x), y).backward()
        step()
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _bn_args(device, channels_last):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 4, 5, 2, generator=g).to(device).contiguous(memory_format=fmt)
    res = torch.randn(3, 4, 5, 2, generator=g).to(device).contiguous(memory_format=fmt)
    w, b = torch.rand(4, generator=g).to(device), torch.randn(4, generator=g).to(device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    return x, res, w, b, rm, rv


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("suffix,backend", [("", "cpu"), ("_triton", "triton")])
def test_opcheck_batch_norm(device, suffix, backend, channels_last):
    if backend == "cpu" and device == "cuda":
        backend = "cuda"
    skip_unless_runnable(backend, device)
    x, res, w, b, rm, rv = _bn_args(device, channels_last)
    fwd = getattr(torch.ops.fck, "batch_norm_fwd" + suffix)
    bwd = getattr(torch.ops.fck, "batch_norm_bwd" + suffix)
    for training in (True, False):
        torch.library.opcheck(fwd, (x, res, w, b, rm, rv, training, 0.1, 1e-5, True))
    y, mean, invstd = fwd(x, res, w, b, rm, rv, True, 0.1, 1e-5, True)
    torch.library.opcheck(bwd, (torch.randn_like(x), x, y, w, mean, invstd, True, True, True))
    torch.library.opcheck(bwd, (torch.randn_like(x), x, None, None, mean, invstd, False, False, False))


@pytest.mark.parametrize("suffix,backend", [("", "cpu"), ("_triton", "triton")])
def test_opcheck_embedding_bag(suffix, backend):
    skip_unless_runnable(backend, "cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 5, generator=g)
    idx, off = torch.tensor([1, 4, 4, 8, 0]), torch.tensor([0, 2, 2, 5])
    fwd = getattr(torch.ops.fck, "embedding_bag_fwd" + suffix)
    bwd = getattr(torch.ops.fck, "embedding_bag_bwd" + suffix)
    for mode in (0, 1, 2):
        torch.library.opcheck(fwd, (w, idx, off, mode, torch.rand(5, generator=g) if mode == 0 else None, 4))
        out, arg = fwd(w, idx, off, mode, None, -1)
        torch.library.opcheck(bwd, (torch.randn_like(out), idx, off, arg, 9, mode, None, -1))


def test_opcheck_embedding_and_its_cxx_autograd():
    """fck::embedding carries its autograd in C++ (python/register_autograd.cpp): schema, fake and autograd checks,
    and AOT dispatch with static shapes. Its C++ autograd reads concrete sizes, so under torch.compile
    fastcore_kernels.functional.embedding takes the Python autograd path instead (tested in test_compile_*)."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 5, generator=g, requires_grad=True)
    for idx, pad in ((torch.tensor([[1, 4], [4, 8]]), -1), (torch.tensor([3, 0, 3], dtype=torch.int32), 3),
                     (torch.zeros(0, 2, dtype=torch.long), -1)):
        torch.library.opcheck(torch.ops.fck.embedding.default, (w, idx, pad),
                              test_utils=_OPCHECK_TESTS + ("test_aot_dispatch_static",))


def test_opcheck_embedding_bag_and_its_cxx_autograd():
    """fck::embedding_bag (normalised inputs, no per-sample weights) carries its autograd in C++: schema, fake,
    autograd and AOT dispatch with static shapes, for the three modes with a padding row and an empty bag."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 5, generator=g, requires_grad=True)
    idx, off = torch.tensor([1, 4, 4, 8, 0]), torch.tensor([0, 2, 2, 5])
    for mode in (0, 1, 2):
        torch.library.opcheck(torch.ops.fck.embedding_bag.default, (w, idx, off, mode, 4 if mode != 2 else -1),
                              test_utils=_OPCHECK_TESTS + ("test_aot_dispatch_static",))


@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_rnn_layers_cells_and_their_cxx_autograd(reverse):
    """fck::lstm_layer / fck::gru_layer (the layer kernels with their autograd in C++) and fck::lstm_cell /
    fck::gru_cell (input GEMM, one-step layer and every gradient in one C++ autograd node): schema, fake, autograd
    and AOT dispatch with static shapes, with and without biases."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    T, B, H, I = 3, 2, 5, 4

    def rnd(*s):
        return torch.randn(*s, generator=g).requires_grad_()

    tests = _OPCHECK_TESTS + ("test_aot_dispatch_static",)
    for bias in (rnd(4 * H), None):
        torch.library.opcheck(torch.ops.fck.lstm_layer.default,
                              (rnd(T, B, 4 * H), rnd(B, H), rnd(B, H), rnd(4 * H, H), bias, reverse), test_utils=tests)
    for b_ih, b_hh in ((rnd(3 * H), rnd(3 * H)), (None, None)):
        torch.library.opcheck(torch.ops.fck.gru_layer.default, (rnd(T, B, 3 * H), rnd(B, H), rnd(3 * H, H), b_ih, b_hh,
                                                                 reverse), test_utils=tests)
    if reverse:  # (a cell has no direction: checked once)
        return
    for b_ih, b_hh in ((rnd(4 * H), rnd(4 * H)), (None, None)):
        torch.library.opcheck(torch.ops.fck.lstm_cell.default,
                              (rnd(B, I), rnd(B, H), rnd(B, H), rnd(4 * H, I), rnd(4 * H, H), b_ih, b_hh),
                              test_utils=tests)
    for b_ih, b_hh in ((rnd(3 * H), rnd(3 * H)), (None, None)):
        torch.library.opcheck(torch.ops.fck.gru_cell.default, (rnd(B, I), rnd(B, H), rnd(3 * H, I), rnd(3 * H, H),
                                                                b_ih, b_hh), test_utils=tests)


@pytest.mark.parametrize("relu,with_residual,affine,channels_last",
                         [(True, True, True, False), (False, False, False, False), (True, False, True, True)])
def test_opcheck_batch_norm_act_and_its_cxx_autograd(relu, with_residual, affine, channels_last):
    """fck::batch_norm_act (the fused forward with its autograd in C++): schema, fake, autograd registration and AOT
    dispatch with static shapes, training (running statistics updated in place) and eval."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    res = torch.randn(3, 4, 5, 6, generator=g, requires_grad=True) if with_residual else None
    w = torch.rand(4, generator=g, requires_grad=True) if affine else None
    b = torch.randn(4, generator=g, requires_grad=True) if affine else None
    for training in (True, False):
        rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
        torch.library.opcheck(torch.ops.fck.batch_norm_act.default, (x, res, w, b, rm, rv, training, 0.1, 1e-5, relu),
                              test_utils=_OPCHECK_TESTS + ("test_aot_dispatch_static",))


def test_opcheck_pooled_helpers():
    """The CPU helpers that write into pooled blocks (an RNN's input projection; a channels_last result made NCHW)."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(700, 513, generator=g), torch.randn(513, 129, generator=g)
    torch.library.opcheck(torch.ops.fck.mm_pooled.default, (a, b))
    x = torch.randn(2, 3, 5, 7, generator=g).to(memory_format=torch.channels_last)
    for t in (x, x.contiguous()):
        torch.library.opcheck(torch.ops.fck.contiguous_pooled.default, (t,))


def test_opcheck_winograd_conv():
    """The CPU Winograd convolution behind conv-BN-ReLU's eval path: its weight transform and the convolution."""
    skip_unless_runnable("cpu", "cpu")
    if not torch.ops.fck.winograd_available():
        pytest.skip("the Winograd convolution needs a CPU with AVX2 and FMA")
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(20, 9, 3, 3, generator=g), torch.randn(20, generator=g), torch.randn(2, 9, 7, 6, generator=g)
    for m in (2, 4):
        for transposed in (False, True):
            torch.library.opcheck(torch.ops.fck.winograd_weight.default, (w, m, transposed))
        for xf in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.library.opcheck(torch.ops.fck.conv3x3_winograd.default,
                                  (xf, torch.ops.fck.winograd_weight(w, m), b, [1, 0], 20, True))
        torch.library.opcheck(torch.ops.fck.conv3x3_winograd.default,
                              (torch.randn(2, 20, 5, 6, generator=g), torch.ops.fck.winograd_weight(w, m, True), None,
                               [2, 1], 9, False))
        torch.library.opcheck(torch.ops.fck.conv3x3_winograd_weight_grad.default,
                              (x, torch.randn(2, 20, 7, 4, generator=g), [1, 0], m))


def test_cpu_sources_compile_as_cxx17():
    """torch < 2.13 builds extensions as C++17 (the GPU machine's torch 2.11 does; this one builds C++20, whose
    standard library alone once let std::barrier through and broke that machine's build). Each C++ source is parsed
    as C++17; only errors located in this project's files count, because recent torch headers refuse C++17 outright.
    The CUDA sources' headers are parsed here too, through the CPU files that emulate their kernels."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    from torch.utils import cpp_extension

    from fastcore_kernels import _build

    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    kw = _build.build_kwargs(False)
    includes = [f"-I{d}" for d in kw["include_dirs"] + cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    flags = [f for f in kw["cxx"] if not f.startswith("-std=") and not f.startswith("-march")]
    ours = (str(_build.ROOT / "csrc"), str(_build.ROOT / "python"))
    failures = []
    for src in kw["sources"]:
        r = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", *flags, "-DTORCH_API_INCLUDE_EXTENSION_H",
                            "-DTORCH_EXTENSION_NAME=_C", *includes, src], capture_output=True, text=True)
        failures += [line for line in r.stderr.splitlines() if line.startswith(ours) and ": error:" in line]
    assert not failures, "\n".join(failures[:20])
