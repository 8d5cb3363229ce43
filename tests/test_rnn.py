"""LSTM/GRU cells and sequences: every backend against the reference and against torch's modules with the same
weights, forward and backward; dtypes, odd shapes, weight-dropped W_hh, fuse(), bad input."""

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fastcore_kernels as fck
import fastcore_kernels.functional as fckF
from fastcore_kernels import nn as fnn
from fastcore_kernels.ops import rnn as rnn_ops
from fastcore_kernels.reference import rnn as reference

from conftest import skip_unless_runnable

# (backend, device); the GPU pairs run where a GPU is
PAIRS = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
         pytest.param("triton", "cuda", marks=pytest.mark.gpu)]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (4e-2, 4e-2),
       torch.float16: (4e-3, 4e-3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


# ---- the layer ops: float64 gradcheck of every backend, both directions ----

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_layer_gradcheck(backend, device, mode, reverse):
    skip_unless_runnable(backend, device)
    g = _gen(0)
    T, B, H = 3, 2, 3
    G = 4 if mode == "lstm" else 3

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()

    xg, h0, w, b = rnd(T, B, G * H), rnd(B, H), rnd(G * H, H), rnd(G * H)
    if mode == "lstm":
        c0 = rnd(B, H)
        fn = lambda *a: rnn_ops.lstm_layer(*a, reverse, backend)  # noqa: E731
        args = (xg, h0, c0, w, b)
    else:
        fn = lambda *a: rnn_ops.gru_layer(*a, reverse, backend)  # noqa: E731
        args = (xg, h0, w, b, rnd(G * H))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_persistent_layer_matches_per_step_layer(device, mode, reverse, dtype, monkeypatch):
    """The opt-in one-launch kernels (hidden <= 128) against the Triton per-step loop, forward and backward, on a hidden
    size and batch that pad their tiles; outputs poisoned by the ops' own empty allocations."""
    skip_unless_runnable("triton", device)
    from fastcore_kernels.triton import rnn as triton_rnn

    g = _gen(5)
    T, B, H = 5, 19, 20
    G = 4 if mode == "lstm" else 3

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device, dtype)

    xg, h0, w = rnd(T, B, G * H), rnd(B, H), rnd(G * H, H, scale=0.3)
    grads = (rnd(T, B, H), rnd(B, H), rnd(B, H))

    def run():
        if mode == "lstm":
            c0, bias = rnd(B, H), rnd(G * H)
            fwd = triton_rnn.lstm_layer_fwd(xg, h0, c0, w, bias, reverse)
            bwd = triton_rnn.lstm_layer_bwd(*grads, h0, c0, w, fwd[0], fwd[3], fwd[4], reverse)
        else:
            b_ih, b_hh = rnd(G * H), rnd(G * H)
            fwd = triton_rnn.gru_layer_fwd(xg, h0, w, b_ih, b_hh, reverse)
            bwd = triton_rnn.gru_layer_bwd(grads[0], grads[1], h0, w, fwd[0], fwd[2], reverse)
        return fwd + bwd

    state = g.get_state()
    monkeypatch.setattr(rnn_ops, "PERSISTENT", True)  # the opt-in
    assert triton_rnn.persistent(xg, H)
    one_launch = run()
    g.set_state(state)
    monkeypatch.setattr(rnn_ops, "PERSISTENT", False)
    assert not triton_rnn.persistent(xg, H)
    per_step = run()
    for a, b in zip(one_launch, per_step):
        assert a.shape == b.shape and a.dtype == b.dtype
        # bf16: the per-step path rounds h @ W_hh^T to bf16 (a bf16 GEMM's output); the persistent one keeps it
        # in fp32, so the fp32 saved tensors differ by bf16 rounding too.
        _close(a, b, dtype, "persistent vs per-step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("B,H", [(19, 20), (5, 64), (4, 33), (64, 64), (0, 20), (140, 20), (3, 100), (2, 128),
                                 (9, 72), (2, 200), (1, 256)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_persistent_layer_matches_per_step_layer(device, B, H, mode, reverse, dtype, monkeypatch):
    """CUDA's persistent kernels (the default for hidden <= 256) against the per-step loop (FCK_RNN_PERSISTENT_CUDA=0):
    every output of both passes, saved tensors included; batches that leave a block's rows partly empty, all four widths
    (32, 64 in registers; 128, the first 64 in registers and the rest in shared memory, 72 and 100 with zero padding in
    both; 256, registers, shared and global memory, 200 with padding), both block shapes (one row a block while the
    batch fits the multiprocessors, 8 in the emulation, 132 on an H100/H200; else as many rows as gates: B = 140; past
    hidden 64 always one row, the batch in waves: B = 9). On CUDA the caching allocator's free blocks are filled with
    NaN before each run, so an element a kernel skipped shows up; on the CPU the same kernel code runs emulated
    (FCK_RNN_PERSISTENT_EMULATE=1, a thread per CUDA thread, shared memory filled with NaN) against the CPU's loop."""
    skip_unless_runnable(device, device)
    switch = "FCK_RNN_PERSISTENT_CUDA" if device == "cuda" else "FCK_RNN_PERSISTENT_EMULATE"
    g = _gen(7)
    T = 6
    G = 4 if mode == "lstm" else 3

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device, dtype)

    xg, h0, w = rnd(T, B, G * H), rnd(B, H), rnd(G * H, H, scale=0.3)
    grads = (rnd(T, B, H), rnd(B, H), rnd(B, H))
    extra = (rnd(B, H), rnd(G * H)) if mode == "lstm" else (rnd(G * H), rnd(G * H))

    def run():
        if device == "cuda":
            for n in (1 << 10, 1 << 14, 1 << 18, 1 << 21):
                torch.full((n,), float("nan"), device="cuda")
        if mode == "lstm":
            c0, bias = extra
            fwd = torch.ops.fck.lstm_layer_fwd(xg, h0, c0, w, bias, reverse)
            bwd = torch.ops.fck.lstm_layer_bwd(*grads, h0, c0, w, fwd[0], fwd[3], fwd[4], reverse)
        else:
            fwd = torch.ops.fck.gru_layer_fwd(xg, h0, w, *extra, reverse)
            bwd = torch.ops.fck.gru_layer_bwd(grads[0], grads[1], h0, w, fwd[0], fwd[2], reverse)
        return [t.cpu() for t in fwd + bwd]

    monkeypatch.setenv(switch, "1")
    persistent = run()
    monkeypatch.setenv(switch, "0")
    per_step = run()
    for k, (a, b) in enumerate(zip(persistent, per_step)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.isfinite(a).all(), f"output {k}: an element no kernel wrote"
        _close(a, b, dtype, f"persistent vs per-step, output {k}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_cell_gradcheck(backend, device, mode):
    skip_unless_runnable(backend, device)
    g = _gen(1)
    B, I, H = 3, 4, 5
    G = 4 if mode == "lstm" else 3

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()

    x, h, w_ih, w_hh, b_ih, b_hh = rnd(B, I), rnd(B, H), rnd(G * H, I), rnd(G * H, H), rnd(G * H), rnd(G * H)
    if mode == "lstm":
        c = rnd(B, H)
        fn = lambda x, h, c, *w: fckF.lstm_cell(x, (h, c), *w, backend=backend)  # noqa: E731
        args = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        fn = lambda x, h, *w: fckF.gru_cell(x, h, *w, backend=backend)  # noqa: E731
        args = (x, h, w_ih, w_hh, b_ih, b_hh)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


# ---- cells vs torch's modules ----

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_cell_matches_torch(backend, device, mode, batched, bias):
    skip_unless_runnable(backend, device)
    torch.manual_seed(2)
    ours_cls, torch_cls = (fnn.LSTMCell, nn.LSTMCell) if mode == "lstm" else (fnn.GRUCell, nn.GRUCell)
    theirs = torch_cls(7, 11, bias=bias).double().to(device)
    ours = ours_cls(7, 11, bias=bias).double().to(device)
    ours.load_state_dict(theirs.state_dict())
    shape = (5, 7) if batched else (7,)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    hshape = (5, 11) if batched else (11,)
    hx = (torch.randn(hshape, dtype=torch.float64, device=device),) * (2 if mode == "lstm" else 1)
    hx = hx if mode == "lstm" else hx[0]
    with fck.use_backend(backend):
        a = ours(x, hx)
        a0 = ours(x)  # zero state
    b, b0 = theirs(x, hx), theirs(x)
    a, b, a0, b0 = [list(v) if isinstance(v, tuple) else [v] for v in (a, b, a0, b0)]
    sum(v.sum() for v in a + a0).backward()
    sum(v.sum() for v in b + b0).backward()
    for u, v in zip(a + a0, b + b0):
        _close(u, v, torch.float64, "cell output")
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        _close(p.grad, q.grad, torch.float64, f"grad {n}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cell_gradients_for_what_requires_them(mode):
    """The CPU cell's one autograd node returns a gradient for exactly the tensors that require one (frozen weights,
    a state that requires grad, one bias of two), each as torch's LSTMCell/GRUCell gives it."""
    skip_unless_runnable("cpu", "cpu")
    g = _gen(4)
    B, I, H = 4, 6, 9
    G = 4 if mode == "lstm" else 3

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    for need in ((True, False, False, False, False, False), (False, True, True, False, True, False),
                 (False, False, False, True, False, True)):
        ours = [rnd(B, I), rnd(B, H), rnd(G * H, I), rnd(G * H, H), rnd(G * H), rnd(G * H)]
        theirs = [t.clone() for t in ours]
        for a, b, n in zip(ours, theirs, need):
            a.requires_grad_(n), b.requires_grad_(n)
        x, h, w_ih, w_hh, b_ih, b_hh = ours
        with fck.use_backend("cpu"):
            if mode == "lstm":
                c = h * 0.5
                out = sum(v.sum() for v in fckF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh))
            else:
                out = fckF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh).sum()
        x, h, w_ih, w_hh, b_ih, b_hh = theirs
        if mode == "lstm":
            ref = sum(v.sum() for v in torch.lstm_cell(x, (h, h * 0.5), w_ih, w_hh, b_ih, b_hh))
        else:
            ref = torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh).sum()
        wanted = [a for a, n in zip(ours, need) if n]
        got = torch.autograd.grad(out, wanted)
        expected = torch.autograd.grad(ref, [b for b, n in zip(theirs, need) if n])
        for u, v in zip(got, expected):
            _close(u, v, torch.float64, f"{mode} grad, need {need}")
        for a, n in zip(ours, need):
            assert a.grad is None


# ---- sequences vs torch's modules ----

CONFIGS = {  # name: (input, hidden, layers, bidirectional, batch_first, T, B, bias)
    "2-layer bidirectional batch_first": (5, 7, 2, True, True, 6, 3, True),
    "one step, batch 1": (4, 9, 1, False, False, 1, 1, True),
    "3 layers, odd hidden, no bias": (6, 13, 3, False, False, 5, 4, False),
    "unbatched bidirectional": (3, 5, 2, True, False, 4, None, True),
}
FAST = ("2-layer bidirectional batch_first", "unbatched bidirectional")  # what the interpreter runs
# fp32 shapes that reach every path of the CPU's packed-panel GEMM (csrc/cpu/panel_gemm.h): row tiles of 1 to 6
# rows (13 rows -> 5 4 4, 12 -> 6 6, 7 -> 4 3, 2, 1), more than one K block (K = 4H > 256 in the backward), last
# panels cut short (4H, 3H and H not multiples of 16), and a W_hh over 512 KB (one row block, its panels split
# across threads).
WIDE = {"13 rows, K blocks": (20, 70, 1, False, False, 3, 13, True),
        "12 rows, 2 layers bidirectional": (8, 40, 2, True, False, 2, 12, True),
        "W_hh over 512 KB, 7 rows": (16, 190, 1, False, True, 2, 7, True),
        "2 rows": (5, 20, 1, False, False, 2, 2, True),
        "unbatched": (5, 20, 1, False, False, 3, None, True)}


def _classes(mode, H):
    """(ours, torch's, constructor keywords) for a mode: "lstm", "gru", or "lstmp" (an LSTM with proj_size H // 2)."""
    if mode == "gru":
        return fnn.GRU, nn.GRU, {}
    return fnn.LSTM, nn.LSTM, ({"proj_size": H // 2} if mode == "lstmp" else {})


def _pair(mode, cfg, device, dtype=torch.float64):
    """Our module and torch's with the same weights, an input and initial states. mode "lstmp": an LSTM with
    proj_size H // 2 (h0 that wide, c0 H wide)."""
    I, H, L, bi, bf, T, B, bias = cfg
    torch.manual_seed(3)
    ocls, tcls, extra = _classes(mode, H)
    P = extra.get("proj_size", 0)
    kw = dict(num_layers=L, bidirectional=bi, batch_first=bf, bias=bias, **extra)
    theirs = tcls(I, H, **kw).to(device, torch.float64)
    ours = ocls(I, H, **kw).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    shape = ((B, T, I) if bf else (T, B, I)) if B is not None else (T, I)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    D = 2 if bi else 1
    hshape, cshape = [(L * D, B, n) if B is not None else (L * D, n) for n in (P or H, H)]
    h0 = torch.randn(hshape, dtype=torch.float64, device=device)
    c0 = torch.randn(cshape, dtype=torch.float64, device=device)
    return ours, theirs, x, h0, c0


def _run_seq(module, mode, x, h0, c0, dtype):
    x, h0, c0 = [t.detach().to(dtype).requires_grad_() for t in (x, h0, c0)]
    if mode != "gru":
        out, (h, c) = module(x, (h0, c0))
        outs = [out, h, c]
    else:
        out, h = module(x, h0)
        outs = [out, h]
    g = _gen(9)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    loss.backward()
    grads = [x.grad, h0.grad] + ([c0.grad] if mode != "gru" else [])
    return outs, grads, {n: p.grad for n, p in module.named_parameters()}


def _compare_runs(a, b, dtype=torch.float64):
    """Two (outputs, input/state gradients, parameter gradients) results, as _run_seq and _run_packed return them."""
    for what, u, v in zip(("output", "h_n", "c_n"), a[0], b[0]):
        assert u.shape == v.shape, what
        _close(u, v, dtype, what)
    for what, u, v in zip(("grad input", "grad h0", "grad c0"), a[1], b[1]):
        _close(u, v, dtype, what)
    assert a[2].keys() == b[2].keys()
    for n in b[2]:
        _close(a[2][n], b[2][n], dtype, f"grad {n}")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_sequence_matches_torch(backend, device, mode, config):
    skip_unless_runnable(backend, device)
    if backend == "triton" and device == "cpu" and config not in FAST:
        pytest.skip("the interpreter runs the two configurations that cover every path")
    ours, theirs, x, h0, c0 = _pair(mode, CONFIGS[config], device)
    with fck.use_backend(backend):
        a = _run_seq(ours, mode, x, h0, c0, torch.float64)
    b = _run_seq(theirs, mode, x, h0, c0, torch.float64)
    _compare_runs(a, b)


SEQ_CASES = {  # name: (I, H, layers, bidirectional, bias, T, B, states given, what requires grad)
    "2 layers bidirectional, states": (5, 7, 2, True, True, 4, 3, True, "all"),
    "3 layers, zeros, frozen weights": (6, 9, 3, False, True, 3, 2, False, "input"),
    "1 layer, no bias, weights only": (4, 6, 1, False, False, 5, 3, True, "weights"),
}


@pytest.mark.parametrize("dropout", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("case", list(SEQ_CASES))
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sequence_node_matches_the_layer_composition(device, mode, case, dropout):
    """The whole stack as one C++ node (fck::lstm_seq / gru_seq) against the same ops composed layer by layer in
    Python: on the CPU the same bits (outputs and every gradient), on CUDA within fp32 rounding (cuBLAS may order
    the weight gradient's sums differently); gradients only for what requires them. Dropout between layers is drawn
    as F.dropout draws it: the same seed, the same masks."""
    skip_unless_runnable(device, device)
    I, H, L, bi, bias, T, B, states, needs = SEQ_CASES[case]
    D = 2 if bi else 1
    g = _gen(11)
    G = 4 if mode == "lstm" else 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    params = []
    for layer in range(L):
        for _ in range(D):
            params += [rnd(G * H, I if layer == 0 else D * H) * 0.4, rnd(G * H, H) * 0.4]
            params += [rnd(G * H) * 0.1, rnd(G * H) * 0.1] if bias else []
    x = rnd(T, B, I)
    given = [rnd(L * D, B, H) for _ in range(2 if mode == "lstm" else 1)] if states else \
        [None] * (2 if mode == "lstm" else 1)
    dys = [rnd(T, B, D * H), rnd(L * D, B, H), rnd(L * D, B, H)]

    def run(fused):
        xs = x.clone().requires_grad_(needs in ("all", "input"))
        ps = [p.clone().requires_grad_(needs in ("all", "weights")) for p in params]
        st = [s if s is None else s.clone().requires_grad_(needs == "all") for s in given]
        torch.manual_seed(12)
        if fused:
            seq = torch.ops.fck.lstm_seq if mode == "lstm" else torch.ops.fck.gru_seq
            outs = list(seq(xs, ps, *st, bias, L, bi, dropout, True))
        else:
            per = 4 if bias else 2
            weights = [tuple(ps[k * per:(k + 1) * per]) + ((None, None) if not bias else ()) + (None,)
                       for k in range(L * D)]
            outs = list(rnn_ops._rnn_layers(mode == "lstm", xs, st, weights, L, D, dropout, True, device))
        outs = [o for o in outs if o is not None]
        leaves = [t for t in [xs, *ps, *st] if t is not None and t.requires_grad]
        grads = torch.autograd.grad(sum((o * dy).sum() for o, dy in zip(outs, dys)), leaves)
        return [o.detach() for o in outs], list(grads), [t is xs for t in leaves]

    fused, layered = run(True), run(False)
    assert fused[2] == layered[2]
    for k, (a, b) in enumerate(zip(fused[0] + fused[1], layered[0] + layered[1])):
        assert a.shape == b.shape, k
        if device == "cpu":
            assert torch.equal(a, b), f"tensor {k}: {(a - b).abs().max()}"
        else:
            _close(a, b, torch.float32, f"tensor {k}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_sequence_of_an_empty_batch(mode):
    """A batch of 0 rows through the stack's node: torch's shapes, forward and backward."""
    skip_unless_runnable("cpu", "cpu")
    tcls, ocls = (nn.LSTM, fnn.LSTM) if mode == "lstm" else (nn.GRU, fnn.GRU)
    theirs = tcls(4, 5, 2, bidirectional=True)
    ours = ocls(4, 5, 2, bidirectional=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 0, 4, requires_grad=True)
    a, b = ours(x), theirs(x)
    assert a[0].shape == b[0].shape == (3, 0, 10)
    a[0].sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in ours.parameters())


def test_sequence_node_checks_its_arguments():
    skip_unless_runnable("cpu", "cpu")
    x, w = torch.randn(3, 2, 4), [torch.randn(8, 4), torch.randn(8, 2)]
    with pytest.raises(RuntimeError, match="expected 4 weight tensors, got 2"):
        torch.ops.fck.lstm_seq(x, w, None, None, True, 1, False)
    with pytest.raises(RuntimeError, match="input must be"):
        torch.ops.fck.gru_seq(x[0], w, None, False, 1, False)
    out, h_n = torch.ops.fck.gru_seq(x, [torch.randn(6, 4), torch.randn(6, 2)], None, False, 1, False)
    assert out.shape == (3, 2, 2) and h_n.shape == (1, 2, 2)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    h = torch.randn(2, 2, 2)
    lstm_w = [torch.randn(8, 4), torch.randn(8, 2), torch.randn(8), torch.randn(8)] * 2
    torch.library.opcheck(torch.ops.fck.lstm_seq.default, (x, lstm_w, h, h, True, 1, True), test_utils=tests)
    gru_w = [torch.randn(6, 4), torch.randn(6, 2), torch.randn(6, 2), torch.randn(6, 2)]
    torch.library.opcheck(torch.ops.fck.gru_seq.default, (x, gru_w, h, False, 2, False), test_utils=tests)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_sequence_dtypes(backend, device, mode, dtype):
    """Low precision against torch's float64 result on the same (rounded) weights."""
    skip_unless_runnable(backend, device)
    _check_against_float64(backend, device, mode, dtype, CONFIGS["2-layer bidirectional batch_first"])


@pytest.mark.parametrize("config", list(WIDE))
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_sequence_float32_wide(backend, device, mode, config):
    skip_unless_runnable(backend, device)
    if backend == "triton" and device == "cpu":
        pytest.skip("a CPU GEMM path; the interpreter's Triton kernels have their own tests")
    _check_against_float64(backend, device, mode, torch.float32, WIDE[config])


def _check_against_float64(backend, device, mode, dtype, cfg):
    ours, theirs, x, h0, c0 = _pair(mode, cfg, device, dtype)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x, h0, c0 = [t.to(dtype).double() for t in (x, h0, c0)]
    with fck.use_backend(backend):
        a = _run_seq(ours, mode, x, h0, c0, dtype)
    b = _run_seq(theirs, mode, x, h0, c0, torch.float64)
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert u.dtype == dtype
        _close(u, v, dtype, "output/grad")
    for n in b[2]:
        assert a[2][n].dtype == dtype
        _close(a[2][n], b[2][n], dtype, f"grad {n}")


@pytest.mark.parametrize("config", ["3 layers, odd hidden, no bias", "13 rows, K blocks"])
@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
def test_kernels_write_every_output(mode, config):
    """Under deterministic mode torch fills every at::empty/torch.empty with NaN: an element a kernel forgot to
    write would surface."""
    skip_unless_runnable("cpu", "cpu")
    ours, theirs, x, h0, c0 = _pair(mode, {**CONFIGS, **WIDE}[config], "cpu", torch.float32)
    theirs.float()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with fck.use_backend("cpu"):
            a = _run_seq(ours, mode, x, h0, c0, torch.float32)
    finally:
        torch.use_deterministic_algorithms(prev)
    b = _run_seq(theirs, mode, x, h0, c0, torch.float32)
    for u, v in zip(a[0] + a[1] + list(a[2].values()), b[0] + b[1] + list(b[2].values())):
        assert torch.isfinite(u).all()
        _close(u, v, torch.float32, "output/grad")


@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
def test_cpu_kernels_write_every_element_of_a_poisoned_pooled_block(mode):
    """On the CPU the sequence-sized tensors (outputs, saved gates, the input projection and the gradients) come
    from a pool of reused blocks. Fill blocks of every size class the run takes with NaN and return them to the
    pool first: an element a kernel skipped would surface as NaN."""
    skip_unless_runnable("cpu", "cpu")
    ours, theirs, x, h0, c0 = _pair(mode, (24, 72, 2, True, False, 40, 33, True), "cpu", torch.float32)
    theirs.float()
    fck.ops.release_cpu_pool()
    one = torch.ones(1, 1)
    blocks = [torch.ops.fck.mm_pooled(one, torch.ones(1, (mb << 20) // 4)) for mb in range(1, 16) for _ in range(4)]
    for blk in blocks:
        blk.fill_(float("nan"))
    del blocks
    with fck.use_backend("cpu"):
        a = _run_seq(ours, mode, x, h0, c0, torch.float32)
    b = _run_seq(theirs, mode, x, h0, c0, torch.float32)
    for u, v in zip(a[0] + a[1] + list(a[2].values()), b[0] + b[1] + list(b[2].values())):
        assert torch.isfinite(u).all()
        _close(u, v, torch.float32, "output/grad")
    assert fck.ops.release_cpu_pool() > 0


SKINNY_CASES = {  # name: (rows, K, N, splits)
    "AWD forward step, 32 x 1152 by 1152 x 4608": (32, 1152, 4608, 0),
    "one row, K and N of one value": (1, 1, 1, 0),
    "partial tiles, K past a chunk": (5, 33, 70, 0),
    "3 K splits, the last one short": (7, 300, 31, 3),
    "more splits than K fills": (32, 40, 33, 4),
}


@pytest.mark.parametrize("wt", [True, False], ids=["w^T", "w"])
@pytest.mark.parametrize("case", list(SKINNY_CASES))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_skinny_step_gemm_matches_mm(device, case, wt):
    """CUDA's own GEMM for the recurrent step (fp32, up to 32 rows; emulated on the CPU, a thread per CUDA thread):
    a @ w^T and a @ w against the float64 product, for partial row and column tiles, K ranges that leave warps or
    whole splits empty, and K split across blocks. On CUDA the caching allocator's free blocks hold NaN first."""
    skip_unless_runnable(device, device)
    n, K, N, splits = SKINNY_CASES[case]
    if device == "cpu" and n * K * N > 1 << 22:
        pytest.skip("the emulation runs a thread per CUDA thread: the AWD shape runs on the GPU")
    g = _gen(11)
    a = torch.randn(n, K, generator=g)
    w = torch.randn((N, K) if wt else (K, N), generator=g)
    if device == "cuda":
        for size in (1 << 12, 1 << 16, 1 << 20, 1 << 23):
            torch.full((size,), float("nan"), device="cuda")
    c = torch.ops.fck.skinny_mm(a.to(device), w.to(device), wt, splits)
    ref = a.double() @ (w.double().t() if wt else w.double())
    assert c.shape == (n, N) and c.dtype == torch.float32
    torch.testing.assert_close(c.cpu().double(), ref, rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_skinny_step_gemm_checks_its_operands():
    skip_unless_runnable("cpu", "cpu")
    a, w = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(RuntimeError, match="1 to 32 rows"):
        torch.ops.fck.skinny_mm(torch.randn(33, 6), w, True)
    with pytest.raises(RuntimeError, match="but w"):
        torch.ops.fck.skinny_mm(a, w, False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fck.skinny_mm(a.double(), w.double(), True)
    with pytest.raises(RuntimeError, match="splits"):
        torch.ops.fck.skinny_mm(a, w, True, 65)


def test_mm_pooled_matches_mm_and_checks_its_operands():
    skip_unless_runnable("cpu", "cpu")
    g = _gen(4)
    a, b = torch.randn(700, 513, generator=g), torch.randn(513, 129, generator=g)
    torch.testing.assert_close(torch.ops.fck.mm_pooled(a, b), a @ b)
    torch.testing.assert_close(torch.ops.fck.mm_pooled(a.t().contiguous().t(), b[:, ::2]), a @ b[:, ::2])
    with pytest.raises(RuntimeError, match="cannot multiply"):
        torch.ops.fck.mm_pooled(a, a)
    with pytest.raises(RuntimeError, match="Float times Double"):
        torch.ops.fck.mm_pooled(a, b.double())
    # its C++ autograd: float64 gradcheck, b's gradient in b^T's layout (contiguous for the projection's w_ih)
    a64 = torch.randn(9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: torch.ops.fck.mm_pooled(x, w.t()), (a64, w64))
    gw = torch.autograd.grad(torch.ops.fck.mm_pooled(a64, w64.t()).sum(), w64)[0]
    assert gw.is_contiguous()
    torch.library.opcheck(torch.ops.fck.mm_pooled.default, (a64, w64.t()))


@pytest.mark.parametrize("mode,hidden", [("lstm", 131), ("gru", 131), ("lstm", 384), ("gru", 384)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_larger_shapes_fp32(backend, mode, hidden):
    """Past every threading grain and vector width (batch 37, hidden 131, 2 layers), and a W_hh past the CPU's
    row-block limit (hidden 384: 2.4 MB for the LSTM, 1.8 MB for the GRU, past 3/4 of a 2 MB L2: one block, its GEMM
    split across threads on a packed W_hh, row-split pointwise)."""
    skip_unless_runnable(backend, "cpu")
    ours, theirs, x, h0, c0 = _pair(mode, (17, hidden, 2, False, False, 9, 37, True), "cpu", torch.float32)
    theirs.float()
    with fck.use_backend(backend):
        a = _run_seq(ours, mode, x, h0, c0, torch.float32)
    b = _run_seq(theirs, mode, x, h0, c0, torch.float32)
    for u, v in zip(a[0] + a[1] + list(a[2].values()), b[0] + b[1] + list(b[2].values())):
        _close(u, v, torch.float32, "output/grad")


@pytest.mark.parametrize("mode,hidden", [("lstm", 20), ("lstm", 256), ("gru", 300), ("lstmp", 20), ("lstmp", 600)])
def test_weight_gradients_come_contiguous(mode, hidden):
    """The CPU path hands autograd every weight gradient in its parameter's layout (small weights and those past
    the 1 MB orientation rule), so AccumulateGrad keeps the tensor instead of copying it."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    ocls, _, extra = _classes(mode, hidden)
    m = ocls(24, hidden, 2, **extra)
    x = torch.randn(5, 3, 24, requires_grad=True)
    with fck.use_backend("cpu"):
        out, _ = m(x)
    params = list(m.parameters())
    grads = torch.autograd.grad(out.sum(), params)
    for p, g in zip(params, grads):
        assert g.shape == p.shape and g.is_contiguous(), (tuple(p.shape), g.stride())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode,hidden", [("lstm", 131), ("gru", 640)])
def test_larger_shapes_half_precision(mode, hidden, dtype):
    """fp16/bf16 steps on the CPU's fp32 panels or AMX tiles, in row blocks (hidden 131) and as one block whose GEMM
    splits across threads (hidden 640: a 2.5 MB W_hh, past 3/4 of a 2 MB L2), against torch's float64 result on the
    same rounded weights."""
    skip_unless_runnable("cpu", "cpu")
    _check_against_float64("cpu", "cpu", mode, dtype, (17, hidden, 2, False, False, 9, 37, True))


@pytest.mark.parametrize("mode,hidden", [("lstm", 131), ("gru", 640)])
def test_fp32_steps_in_bf16_under_medium_matmul_precision(mode, hidden):
    """torch.set_float32_matmul_precision("medium") lets fp32 matmuls compute in bf16 (torch's own CPU matmuls then
    run on oneDNN's bf16 kernels): on a CPU with AMX the fp32 recurrent steps do too. Within bf16's tolerance of the
    float64 result; "highest" afterwards gives the first run's fp32 bits back."""
    skip_unless_runnable("cpu", "cpu")
    cpuinfo = Path("/proc/cpuinfo")
    if "amx_bf16" not in (cpuinfo.read_text() if cpuinfo.exists() else "") or os.environ.get("FCK_NO_AMX"):
        pytest.skip("no AMX here: fp32 steps stay fp32 under every matmul precision")
    cfg = (17, hidden, 2, False, False, 9, 37, True)
    ours, theirs, x, h0, c0 = _pair(mode, cfg, "cpu", torch.float32)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    before = torch.get_float32_matmul_precision()
    try:
        runs = {}
        for precision in ("highest", "medium", "highest"):
            torch.set_float32_matmul_precision(precision)
            with fck.use_backend("cpu"):
                runs.setdefault(precision, []).append(_run_seq(ours, mode, x, h0, c0, torch.float32))
            for p in ours.parameters():
                p.grad = None
    finally:
        torch.set_float32_matmul_precision(before)
    ref = _run_seq(theirs, mode, x, h0, c0, torch.float64)
    medium, highest = runs["medium"][0], runs["highest"]  # (test_cpu_isa.py checks the tiles ran)
    for u, v in zip(medium[0] + medium[1], ref[0] + ref[1]):
        _close(u, v, torch.bfloat16, "output/grad under medium")
    for n in ref[2]:
        _close(medium[2][n], ref[2][n], torch.bfloat16, f"grad {n} under medium")
    for u, v in zip(highest[0][0] + highest[0][1], highest[1][0] + highest[1][1]):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,hidden", [("lstm", 20), ("gru", 20), ("lstm", 640), ("gru", 640)])
def test_cpu_forward_without_grad_gives_the_training_forward_bits(mode, hidden, dtype):
    """Under no_grad and inference_mode the CPU layers keep one step's gates and two steps' cell states instead of
    the whole sequence's (nothing is saved for a backward): outputs and final states must be the training
    forward's bit for bit, in row blocks (hidden 20) and as one block (hidden 640), both directions."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    m = (fnn.LSTM if mode == "lstm" else fnn.GRU)(24, hidden, 2, bidirectional=True).to(dtype)
    x = torch.randn(7, 5, 24, dtype=dtype, requires_grad=True)
    with fck.use_backend("cpu"):
        ref = m(x)
        with torch.no_grad():
            nograd = m(x)
        with torch.inference_mode():
            infer = m(x.detach())
    flat = lambda r: [r[0]] + (list(r[1]) if mode == "lstm" else [r[1]])  # noqa: E731
    assert flat(ref)[0].requires_grad and not flat(nograd)[0].requires_grad
    for a, b, c in zip(flat(ref), flat(nograd), flat(infer)):
        assert torch.equal(a.detach(), b) and torch.equal(a.detach(), c)


@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_nan_and_saturated_gates(backend, device, mode):
    """A NaN input makes its batch row NaN from its step on and nothing else; pre-activations far past exp's range
    (+-1e4, +-100: exp overflows, and on the GPU the reciprocal's argument is clamped to 2^126) give torch's
    float64 outputs. On CUDA these shapes run the persistent kernels (the projected LSTM, the per-step loop)."""
    skip_unless_runnable(backend, device)
    torch.manual_seed(4)
    ocls, tcls, extra = _classes(mode, 4)
    theirs = tcls(3, 4, **extra).double()
    ours = ocls(3, 4, **extra).to(device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, device=device)
    x[2, 1, 0] = float("nan")
    with fck.use_backend(backend):
        out = ours(x)[0]
    assert torch.isnan(out[2:, 1]).all() and torch.isfinite(out[:, 0]).all() and torch.isfinite(out[:2]).all()
    big = torch.tensor([1e4, -1e4, 100.0, -100.0, 30.0, -30.0]).repeat_interleave(6).reshape(6, 2, 3)
    big = big * torch.randn(6, 2, 3).sign()
    with fck.use_backend(backend):
        out = ours(big.to(device))[0]
    assert torch.isfinite(out).all()
    _close(out.cpu(), theirs(big.double())[0], torch.float32, "saturated gates")


# ---- dropout between layers, weight-dropped W_hh ----

@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
def test_dropout_between_layers(mode):
    torch.manual_seed(4)
    ocls, tcls, extra = _classes(mode, 6)
    m = ocls(4, 6, num_layers=2, dropout=1.0, **extra)  # every value dropped: layer 2 sees zeros
    ref = tcls(4, 6, num_layers=2, dropout=1.0, **extra)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)  # eval: no dropout
    m.train()
    m.dropout = 0.5
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(0)
    assert torch.equal(a, m(x)[0])
    assert not torch.allclose(a, m.eval()(x)[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_weight_dropped_hidden_weights(backend):
    """AWD-LSTM's WeightDropout: W_hh is replaced by a dropped copy of a raw parameter before every forward; the
    gradient reaches the raw parameter and nothing is re-packed."""
    skip_unless_runnable(backend, "cpu")
    torch.manual_seed(5)
    m = fnn.LSTM(4, 6)
    raw = nn.Parameter(m.weight_hh_l0.detach().clone())
    del m._parameters["weight_hh_l0"]
    mask = (torch.rand_like(raw) > 0.5).float() * 2
    x = torch.randn(7, 2, 4)
    with fck.use_backend(backend):
        m.weight_hh_l0 = raw * mask
        out, _ = m(x)
    out.sum().backward()
    ref = nn.LSTM(4, 6)
    with torch.no_grad():
        for n in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(ref, n).copy_(getattr(m, n))
        ref.weight_hh_l0.copy_(raw * mask)
    ref_out, _ = ref(x)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw.grad, ref.weight_hh_l0.grad * mask, rtol=1e-5, atol=1e-6)


# ---- modules: state_dict both ways, fuse ----

def test_fuse_swaps_rnns_and_keeps_state_dict():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.rnn = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
            self.gru = nn.GRU(16, 5)
            self.cell = nn.GRUCell(5, 5)
            self.proj = nn.LSTM(5, 6, proj_size=3)

        def forward(self, x):
            y, _ = self.rnn(self.emb(x))
            y, _ = self.gru(y)
            return self.cell(y[-1]), self.proj(y)[0]

    torch.manual_seed(6)
    model = Net()
    x = torch.randint(0, 10, (7, 3))
    fused = fck.fuse(model, verbose=False)
    assert type(fused.rnn) is fnn.LSTM and type(fused.gru) is fnn.GRU and type(fused.cell) is fnn.GRUCell
    assert type(fused.proj) is fnn.LSTM
    for a, b in zip(fused(x), model(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert list(fused.state_dict()) == list(model.state_dict())
    Net().load_state_dict(fused.state_dict())


# ---- PackedSequence input ----

PACKED_CASES = {  # name: (I, H, layers, bidirectional, bias, lengths, sorted, states given)
    "2 layers bidirectional, unsorted, states": (5, 7, 2, True, True, [6, 2, 6, 1, 4, 2], False, True),
    "1 layer, sorted, equal lengths": (4, 6, 1, False, True, [5, 5, 5], True, False),
    "3 layers, no bias, one sequence": (3, 5, 3, False, False, [4], True, True),
    "bidirectional, all lengths differ": (4, 9, 1, True, True, [1, 7, 3, 5, 2], False, False),
}
PACKED_FAST = ("2 layers bidirectional, unsorted, states",)  # what the interpreter runs


def _packed_pair(mode, case, device):
    I, H, L, bi, bias, lengths, enforce_sorted, given = PACKED_CASES[case]
    T, B, D = max(lengths), len(lengths), 2 if bi else 1
    ours, theirs, x, h0, c0 = _pair(mode, (I, H, L, bi, False, T, B, bias), device)
    return ours, theirs, x, (h0, c0) if given else None, torch.tensor(lengths), enforce_sorted


def _run_packed(module, mode, x, states, lengths, enforce_sorted, dtype):
    """Output data, final states, and the gradients of input, states and parameters of a loss on all of them."""
    x = x.detach().to(dtype).requires_grad_()
    states = None if states is None else [s.detach().to(dtype).requires_grad_() for s in states]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    hx = None if states is None else (tuple(states) if mode != "gru" else states[0])
    out, h = module(packed, hx)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    for a, b in ((out.sorted_indices, packed.sorted_indices), (out.unsorted_indices, packed.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    outs = [out.data] + (list(h) if mode != "gru" else [h])
    g = _gen(9)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    loss.backward()
    grads = [x.grad] + ([] if states is None else [s.grad for s in states[:1 if mode == "gru" else 2]])
    return outs, grads, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("case", list(PACKED_CASES))
@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_packed_sequence_matches_torch(backend, device, mode, case):
    """A PackedSequence runs on the fused layers (one call per run of equal batch size, the state carried between
    runs): output data, h_n, c_n (in the caller's batch order) and every gradient as torch's packed forward."""
    skip_unless_runnable(backend, device)
    if backend == "triton" and device == "cpu" and case not in PACKED_FAST:
        pytest.skip("the interpreter runs the case that covers every path")
    ours, theirs, x, states, lengths, enforce_sorted = _packed_pair(mode, case, device)
    with fck.use_backend(backend):
        a = _run_packed(ours, mode, x, states, lengths, enforce_sorted, torch.float64)
    b = _run_packed(theirs, mode, x, states, lengths, enforce_sorted, torch.float64)
    _compare_runs(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_packed_sequence_dtypes(mode, dtype):
    """fp32 and bf16 packed runs against torch's float64 packed run (outputs, states, every gradient), within the
    padded sequences' tolerances."""
    case = "2 layers bidirectional, unsorted, states"
    ours, theirs, x, states, lengths, enforce_sorted = _packed_pair(mode, case, "cpu")
    a = _run_packed(ours.to(dtype), mode, x, states, lengths, enforce_sorted, dtype)
    b = _run_packed(theirs, mode, x, states, lengths, enforce_sorted, torch.float64)
    _compare_runs(a, b, dtype)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("shape", ["row blocks in parallel", "one block, GEMM split"])
def test_packed_sequence_cpu_paths(mode, shape):
    """The CPU's packed layer on both of its paths: a small W_hh with the batch split into row blocks that run the
    whole sequence in parallel (sequences ending and, in reverse, joining inside a block and at block edges), and a
    W_hh past 3/4 of the L2, one block whose steps split across threads. fp32 against torch's float64 run."""
    skip_unless_runnable("cpu", "cpu")
    I, H, B, T = (6, 16, 40, 30) if shape == "row blocks in parallel" else (8, 320, 9, 5)
    g = _gen(11)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = T
    ours, theirs, x, h0, c0 = _pair(mode, (I, H, 1, True, False, T, B, True), "cpu")
    a = _run_packed(ours.float(), mode, x, (h0, c0), lengths, False, torch.float32)
    b = _run_packed(theirs, mode, x, (h0, c0), lengths, False, torch.float64)
    _compare_runs(a, b, torch.float32)


def test_packed_sequence_compiles():
    """A compiled module takes a PackedSequence (the packed ops have fake kernels; batch_sizes is read on the host,
    so the graph is specialised to it)."""
    skip_unless_runnable("cpu", "cpu")
    torch._dynamo.reset()
    torch.manual_seed(8)
    m = fnn.GRU(4, 6, num_layers=2, bidirectional=True)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([2, 5, 4]), enforce_sorted=False)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(m, backend="aot_eager")(packed)
    want = m(packed)
    torch.testing.assert_close(got[0].data, want[0].data)
    torch.testing.assert_close(got[1], want[1])


def test_packed_sequence_gradcheck():
    """float64 gradcheck through the runs: a bidirectional 2-layer LSTM, states given, unsorted lengths."""
    torch.manual_seed(4)
    m = fnn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fn(x, h0, c0):
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 5, 1]), enforce_sorted=False)
        out, (h, c) = m(packed, (h0, c0))
        return out.data, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0), eps=1e-6, atol=1e-7)


def test_packed_sequence_without_grad_and_in_the_functional_form():
    """Inference (no autograd) and fckF.lstm/gru on a PackedSequence give torch's results."""
    torch.manual_seed(5)
    x = torch.randn(6, 4, 5)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 6, 3, 3]), enforce_sorted=False)
    for ocls, tcls, fn in ((fnn.LSTM, nn.LSTM, fckF.lstm), (fnn.GRU, nn.GRU, fckF.gru)):
        theirs = tcls(5, 7, num_layers=2)
        ours = ocls(5, 7, num_layers=2)
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            want = theirs(packed)
            got = ours(packed)
            functional = fn(packed, theirs._flat_weights, num_layers=2)
        for out in (got, functional):
            torch.testing.assert_close(out[0].data, want[0].data)
            torch.testing.assert_close(out[1], want[1])


def test_packed_sequence_bad_input():
    m = fnn.LSTM(4, 6)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        m(packed, (torch.randn(1, 3, 6), torch.randn(1, 3, 6)))
    bad = nn.utils.rnn.PackedSequence(torch.randn(5, 4), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="non-increasing"):
        m(bad)
    short = nn.utils.rnn.PackedSequence(torch.randn(4, 4), torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="sum\\(batch_sizes\\)"):
        m(short)
    with pytest.raises(RuntimeError, match="input_size"):
        m(nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 5), [3, 2]))


# ---- torch.autocast ----

AUTOCAST_CASES = {  # name: (module class name, constructor arguments, keywords, input shape, states given)
    "lstm": ("LSTM", (5, 7), dict(num_layers=2), (4, 3, 5), False),
    "lstm bidirectional batch_first, states": ("LSTM", (5, 7), dict(bidirectional=True, batch_first=True),
                                               (3, 4, 5), True),
    "lstm proj_size, states": ("LSTM", (5, 8), dict(num_layers=2, proj_size=3), (4, 3, 5), True),
    "gru, states": ("GRU", (5, 7), dict(num_layers=2), (4, 3, 5), True),
    "lstm cell": ("LSTMCell", (5, 7), {}, (3, 5), False),
    "gru cell, state": ("GRUCell", (5, 7), {}, (3, 5), True),
}


def _autocast_case(name, device, dtype=torch.float32):
    """Our module and torch's with the same weights, the input and the states (or None) of an AUTOCAST_CASES case."""
    cls, args, kw, shape, given = AUTOCAST_CASES[name]
    torch.manual_seed(5)
    theirs = getattr(nn, cls)(*args, **kw).to(device, dtype)
    ours = getattr(fnn, cls)(*args, **kw).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, device=device, dtype=dtype)
    state = None
    if given:
        H, P = args[1], kw.get("proj_size", 0) or args[1]
        lead = () if "Cell" in cls else ((kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)),)
        B = shape[0] if "Cell" in cls or kw.get("batch_first") else shape[1]
        h = torch.randn(*lead, B, P, device=device, dtype=dtype)
        state = (h, torch.randn(*lead, B, H, device=device, dtype=dtype)) if cls.startswith("LSTM") else h
    return ours, theirs, x, state


def _flat(o):
    return [o] if isinstance(o, torch.Tensor) else [u for v in o for u in _flat(v)]


def _call(module, x, state, grad_seed=None):
    """The module's outputs, flat; with grad_seed, after a backward of a random weighting of them in fp32, the
    gradients of x and of the parameters (in the parameters' own dtypes)."""
    x = x.detach().requires_grad_()
    outs = _flat(module(x, state))
    if grad_seed is None:
        return outs
    g = _gen(grad_seed)
    sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs).backward()
    return outs, [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
@pytest.mark.parametrize("backend,device", PAIRS)
def test_autocast_computes_in_its_dtype(backend, device, case):
    """Inside torch.autocast the recurrent ops run in its dtype (bf16 on the CPU, fp16 on CUDA by default), as torch's
    LSTM/GRU/cells do: the values of the module run in that dtype explicitly, bit for bit; the result dtypes torch's
    modules give under the same autocast (on the CPU its GRU and cells hand back fp32, a projected LSTM's c_n too);
    gradients in the parameters' and input's dtype (fp32) equal to the explicit run's; values within the low dtype's
    tolerance of torch's."""
    skip_unless_runnable(backend, device)
    ours, theirs, x, state = _autocast_case(case, device)
    low = torch.get_autocast_dtype(device)
    explicit = copy.deepcopy(ours).to(low)
    low_state = state.to(low) if isinstance(state, torch.Tensor) else state and tuple(s.to(low) for s in state)
    with fck.use_backend(backend):
        with torch.autocast(device):
            outs, grads = _call(ours, x, state, grad_seed=4)
        want, want_grads = _call(explicit, x.to(low), low_state, grad_seed=4)
    with torch.autocast(device):
        theirs_outs = _call(theirs, x, state)
    assert [o.dtype for o in outs] == [o.dtype for o in theirs_outs]
    for o, w, t in zip(outs, want, theirs_outs):
        torch.testing.assert_close(o, w.to(o.dtype), rtol=0, atol=0)
        _close(o, t, low, "output against torch's")
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["lstm", "gru", "lstmp"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_packed_sequence_under_autocast(device, mode):
    """A PackedSequence under autocast: computed in its dtype (the explicit low-precision run's values, bit for bit),
    results in the dtypes torch's packed forward gives (on the CPU a plain LSTM and a GRU hand back fp32, unlike the
    padded LSTM)."""
    skip_unless_runnable("cpu" if device == "cpu" else "cuda", device)
    ours, theirs, x, states, lengths, _ = _packed_pair(mode, "2 layers bidirectional, unsorted, states", device)
    ours, theirs = ours.float(), theirs.float()
    low = torch.get_autocast_dtype(device)
    explicit = copy.deepcopy(ours).to(low)

    def run(module, dtype, autocast):
        packed = nn.utils.rnn.pack_padded_sequence(x.to(dtype), lengths, enforce_sorted=False)
        hx = [s.to(dtype) for s in states]
        with torch.autocast(device, enabled=autocast):
            out, h = module(packed, tuple(hx) if mode != "gru" else hx[0])
        return [out.data] + _flat(h)

    got, want, torch_got = run(ours, torch.float32, True), run(explicit, low, False), run(theirs, torch.float32, True)
    assert [t.dtype for t in got] == [t.dtype for t in torch_got]
    for a, b, t in zip(got, want, torch_got):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)
        _close(a, t, low, "against torch's")


def test_autocast_compiles_fullgraph():
    """The autocast query traces: a compiled LSTM under autocast gives the eager result, in the same dtypes, within
    bf16's rounding (the compiled graph's GEMMs and bias sums are inductor's, not the eager path's)."""
    skip_unless_runnable("cpu", "cpu")
    torch._dynamo.reset()
    ours, _, x, state = _autocast_case("lstm proj_size, states", "cpu")

    def run(x, *w):
        with torch.autocast("cpu"):
            out, (h, c) = fckF.lstm(x, w, state, num_layers=2, proj_size=3)
        return out, h, c

    got = torch.compile(run, fullgraph=True)(x, *ours._flat_weights)
    want = run(x, *ours._flat_weights)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for a, b in zip(got, want):
        _close(a, b, torch.bfloat16, "compiled against eager")


@pytest.mark.parametrize("case", ["lstm bidirectional batch_first, states", "gru cell, state"])
def test_autocast_leaves_float64_and_disabled_regions_alone(case):
    """float64 is never cast (torch's rule), and autocast(enabled=False) inside a region restores the input dtype."""
    skip_unless_runnable("cpu", "cpu")
    for dtype, enabled in ((torch.float64, True), (torch.float32, False)):
        ours, _, x, state = _autocast_case(case, "cpu", dtype)
        plain = _call(ours, x, state)
        with torch.autocast("cpu"), torch.autocast("cpu", enabled=enabled):
            under = _call(ours, x, state)
        for u, p in zip(under, plain):
            assert u.dtype == dtype
            torch.testing.assert_close(u, p, rtol=0, atol=0)


# ---- LSTM with a projection (proj_size) ----

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend,device", PAIRS)
def test_projected_layer_gradcheck(backend, device, reverse):
    """The projected layer (fck::lstm_proj_layer_fwd/_bwd through its autograd) in float64, every input."""
    skip_unless_runnable(backend, device)
    g = _gen(11)
    T, B, H, P = 4, 3, 5, 2

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()

    args = (rnd(T, B, 4 * H), rnd(B, P), rnd(B, H), rnd(4 * H, P), rnd(P, H), rnd(4 * H))
    fn = lambda *a: rnn_ops._lstm_projected_layer(*a, reverse, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_projected_sequence_without_grad_and_with_given_states(backend, device):
    """No autograd (the forward alone) and a user's h0 / c0: the same numbers as torch's projected LSTM."""
    skip_unless_runnable(backend, device)
    ours, theirs, x, h0, c0 = _pair("lstmp", CONFIGS["2-layer bidirectional batch_first"], device)
    with torch.no_grad(), fck.use_backend(backend):
        a = ours(x, (h0, c0))
    with torch.no_grad():
        b = theirs(x, (h0, c0))
    for u, v in zip((a[0], *a[1]), (b[0], *b[1])):
        _close(u, v, torch.float64, "output/state")


def test_projected_layer_checks_its_arguments():
    skip_unless_runnable("cpu", "cpu")
    T, B, H, P = 3, 2, 6, 2
    xg, h0, c0 = torch.randn(T, B, 4 * H), torch.randn(B, P), torch.randn(B, H)
    w_hh, w_hr = torch.randn(4 * H, P), torch.randn(P, H)
    op = torch.ops.fck.lstm_proj_layer_fwd
    with pytest.raises(RuntimeError, match="w_hr must be"):
        op(xg, h0, c0, w_hh, torch.randn(H, H), None, False)
    with pytest.raises(RuntimeError, match="w_hh must be"):
        op(xg, h0, c0, torch.randn(4 * H, H), w_hr, None, False)
    with pytest.raises(RuntimeError, match="h0 must be"):
        op(xg, c0, c0, w_hh, w_hr, None, False)
    with pytest.raises(RuntimeError, match="c0 must be"):
        op(xg, h0, h0, w_hh, w_hr, None, False)
    out, hn, cn, c_all, gates, u = op(xg, h0, c0, w_hh, w_hr, None, False)
    bwd = torch.ops.fck.lstm_proj_layer_bwd
    with pytest.raises(RuntimeError, match="out must be"):
        bwd(u, hn, cn, h0, c0, w_hh, w_hr, u, u, c_all, gates, False)
    with pytest.raises(RuntimeError, match="saved gates"):
        bwd(out, hn, cn, h0, c0, w_hh, w_hr, out, u, c_all, c_all, False)
    m = fnn.LSTM(4, 6, proj_size=2)
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size \\(1, 3, 2\\)"):
        m(torch.randn(5, 3, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 6)))
    with pytest.raises(RuntimeError, match="Expected hidden\\[1\\] size \\(1, 3, 6\\)"):
        m(torch.randn(5, 3, 4), (torch.randn(1, 3, 2), torch.randn(1, 3, 2)))
    with pytest.raises(ValueError, match="proj_size should be a positive integer"):
        fckF.lstm(torch.randn(5, 3, 4), [torch.randn(24, 4), torch.randn(24, 6)], has_biases=False, proj_size=-1)
    with pytest.raises(ValueError, match="weight_hr must be"):
        fckF.lstm(torch.randn(5, 3, 4), [torch.randn(24, 4), torch.randn(24, 2), torch.randn(6, 6)], has_biases=False,
                  proj_size=2)


# ---- bad input ----

def test_bad_input():
    skip_unless_runnable("cpu", "cpu")
    m = fnn.LSTM(4, 6, num_layers=2)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(3, 2, 5))
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        m(torch.randn(3, 2, 4), (torch.randn(2, 3, 6), torch.randn(2, 2, 6)))
    with pytest.raises(RuntimeError, match="Expected hidden\\[1\\] size"):
        m(torch.randn(3, 2, 4), (torch.randn(2, 2, 6), torch.randn(1, 2, 6)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        m(torch.randn(3, 2, 4), torch.randn(2, 2, 6))
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(3, 2, 4, 1))
    with pytest.raises(TypeError, match="float64"):
        m(torch.randint(0, 3, (3, 2, 4)))
    with pytest.raises(TypeError, match="float64 but input is torch.float32"):
        m.double()(torch.randn(3, 2, 4))
    with pytest.raises(RuntimeError, match="sequence length"):
        fnn.GRU(4, 6)(torch.randn(0, 2, 4))
    with pytest.raises(ValueError, match="is on meta"):
        fnn.GRU(4, 6)(torch.randn(3, 2, 4), torch.randn(1, 2, 6, device="meta"))
    cell = fnn.LSTMCell(4, 6)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\)"):
        cell(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="Expected hx to have shape"):
        cell(torch.randn(2, 4), (torch.randn(3, 6), torch.randn(2, 6)))
    with pytest.raises(ValueError, match="1D or 2D"):
        fnn.GRUCell(4, 6)(torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="weight_hh must be"):
        fckF.gru_cell(torch.randn(2, 4), None, torch.randn(18, 4), torch.randn(18, 5))
    # with a state given, a batched call goes straight to the C++ op; what it refuses gets the checked path's error
    x, h, w_ih, w_hh, b = torch.randn(2, 4), torch.randn(2, 6), torch.randn(24, 4), torch.randn(24, 6), torch.randn(24)
    with pytest.raises(TypeError, match="bias_hh is torch.float64 but input is torch.float32"):
        fckF.lstm_cell(x, (h, h), w_ih, w_hh, b, b.double())
    with pytest.raises(TypeError, match="bias_hh is torch.float32 but input is torch.float64"):
        fckF.lstm_cell(x.double(), (h.double(), h.double()), w_ih.double(), w_hh.double(), b.double(), b)
    with pytest.raises(ValueError, match="give both bias_ih and bias_hh"):
        fckF.gru_cell(x, h, w_ih[:18], w_hh[:18], b[:18], None)
    with pytest.raises(TypeError, match="cx is torch.float64"):
        fckF.lstm_cell(x, (h, h.double()), w_ih, w_hh)
    with pytest.raises(RuntimeError, match="Expected cx to have shape"):
        fckF.lstm_cell(x, (h, h[:1]), w_ih, w_hh)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\)"):
        fckF.gru_cell(torch.randn(2, 5), h, w_ih[:18], w_hh[:18])


def _penalty_grads(module, x, hx):
    """A gradient penalty's gradients: g = d loss / d (x, params, states) with a graph, then d |g|^2 / d (x, params,
    states). Each output gets its own weights, so a mix-up of outputs shows. Seeded, so dropout draws the same masks
    in torch's module and ours."""
    torch.manual_seed(8)
    out = module(x, hx) if hx is not None else module(x)
    outs = [t for t in (out if isinstance(out, tuple) else (out,)) for t in (t if isinstance(t, tuple) else (t,))]
    g = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() + (o ** 2).sum()
               for o in outs)
    states = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [x, *module.parameters(), *states]
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum((f ** 2).sum() for f in first)
    return [f.detach() for f in first] + list(torch.autograd.grad(penalty, leaves))


def _double_backward_cases(device):
    x3, x2 = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    h = torch.randn(2 * 2, 3, 6, dtype=torch.float64)
    return [
        ("LSTM 2 layers, bidirectional, states given", lambda m: m.LSTM(4, 6, num_layers=2, bidirectional=True), x3,
         (h, torch.randn_like(h))),
        ("GRU 2 layers, batch_first", lambda m: m.GRU(4, 6, num_layers=2, batch_first=True), x3.transpose(0, 1),
         None),
        ("LSTM 3 layers, dropout between them", lambda m: m.LSTM(4, 6, num_layers=3, dropout=0.5), x3, None),
        ("LSTM without biases", lambda m: m.LSTM(4, 6, bias=False), x3, None),
        ("LSTMCell", lambda m: m.LSTMCell(4, 6), x2, (torch.randn(3, 6, dtype=torch.float64),
                                                      torch.randn(3, 6, dtype=torch.float64))),
        ("GRUCell", lambda m: m.GRUCell(4, 6), x2, torch.randn(3, 6, dtype=torch.float64)),
        ("GRUCell without biases", lambda m: m.GRUCell(4, 6, bias=False), x2, None),
    ]


@pytest.mark.parametrize("backend,device", PAIRS)
def test_double_backward_matches_torch(backend, device):
    """A backward that builds a graph (create_graph=True: a gradient penalty, a Hessian-vector product) through the
    whole-stack and cell paths gives torch's first and second derivatives: the C++ nodes re-run their forward on
    differentiable ops from their inputs (ops/rnn.py: rnn_seq_grad_graph, rnn_cell_grad_graph). The Triton
    backend's per-layer path refuses (test below)."""
    skip_unless_runnable(backend, device)
    if backend == "triton":
        pytest.skip("the Triton backend's layers refuse double backward (test_double_backward_refusals)")
    torch.manual_seed(4)
    for name, make, x, hx in _double_backward_cases(device):
        theirs = make(nn).double().to(device)
        ours = make(fnn).double().to(device)
        ours.load_state_dict(theirs.state_dict())

        def inputs():
            states = None if hx is None else tuple(t.to(device).requires_grad_() for t in (
                hx if isinstance(hx, tuple) else (hx,)))
            return x.to(device).requires_grad_(), (states[0] if states and len(states) == 1 else states)
        with fck.use_backend(backend):
            got = _penalty_grads(ours, *inputs())
        want = _penalty_grads(theirs, *inputs())
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_double_backward_with_dropout_between_layers(mode, device):
    """A training stack with dropout between layers: the C++ node saves the dropout it drew and its graph-building
    backward re-runs the stack with it, so a gradient penalty's derivatives match the reference backend's (plain
    PyTorch, F.dropout drawing the same masks from the same seed)."""
    skip_unless_runnable(device, device)
    cls = fnn.LSTM if mode == "lstm" else fnn.GRU
    torch.manual_seed(6)
    module = cls(4, 5, num_layers=3, dropout=0.5, bidirectional=True).double().to(device).train()
    x = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    results = []
    for backend in (device, "reference"):
        torch.manual_seed(7)
        with fck.use_backend(backend):
            results.append(_penalty_grads(module, x.clone().requires_grad_(), None))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_double_backward_gradgradcheck_cpu():
    """gradgradcheck of the fused stack and cells on the C++ path (float64)."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(5)
    with fck.use_backend("cpu"):
        lstm = fnn.LSTM(3, 4, num_layers=2).double()
        x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
        h, c = (torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradgradcheck(lambda x, h, c: lstm(x, (h, c))[0], (x, h, c))
        gru_cell = fnn.GRUCell(3, 4).double()
        w = list(gru_cell.parameters())
        xs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        hs = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(
            lambda x, h, *w: rnn_ops.gru_cell(x, h, *w), (xs, hs, *w))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_double_backward_refusals(backend, device):
    """Where the fused backward cannot build a graph — the per-layer paths: proj_size, packed input, and every Triton
    path — a backward with create_graph=True raises a clear error, never a graph that silently drops the second
    derivative. The reference backend differentiates them all (plain PyTorch)."""
    skip_unless_runnable(backend, device)
    torch.manual_seed(2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]))
    cases = [(fnn.LSTM(3, 4, proj_size=2), x), (fnn.GRU(3, 4), packed), (fnn.LSTM(3, 4), packed)]
    if backend == "triton":
        cases += [(fnn.LSTM(3, 4, num_layers=2, dropout=0.3), x), (fnn.GRUCell(3, 4), x[0]),
                  (fnn.LSTMCell(3, 4), x[0])]
    with fck.use_backend(backend):
        for module, inp in cases:
            module = module.double().to(device).train()
            inp = inp.to(device)
            out = module(inp)[0] if not isinstance(module, nn.RNNCellBase) else module(inp)
            y = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out[0] if isinstance(out, tuple) \
                else out
            params = list(module.parameters())
            if backend == "reference":
                g = torch.autograd.grad((y ** 2).sum(), params, create_graph=True)
                assert all(t.requires_grad for t in g)
                continue
            with pytest.raises(NotImplementedError, match="not differentiable"):
                torch.autograd.grad((y ** 2).sum(), params, create_graph=True)


def test_cpp_guards():
    """The C++ ops check what Python would have checked, for callers that use torch.ops directly."""
    skip_unless_runnable("cpu", "cpu")
    xg, h0, w = torch.randn(3, 2, 8), torch.randn(2, 2), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="w_hh must be"):
        torch.ops.fck.lstm_layer_fwd(xg, h0, h0, torch.randn(6, 2), None, False)
    with pytest.raises(RuntimeError, match="h0 must be"):
        torch.ops.fck.lstm_layer_fwd(xg, torch.randn(3, 2), h0, w, None, False)
    with pytest.raises(RuntimeError, match="c0 is"):
        torch.ops.fck.lstm_layer_fwd(xg, h0, h0.double(), w, None, False)
    with pytest.raises(RuntimeError, match="bias must have 8 elements"):
        torch.ops.fck.lstm_layer_fwd(xg, h0, h0, w, torch.randn(7), False)
    with pytest.raises(RuntimeError, match="at least one step"):
        torch.ops.fck.gru_layer_fwd(torch.randn(0, 2, 6), h0, torch.randn(6, 2), None, None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fck.lstm_layer_fwd(torch.randn(2, 3, 8).transpose(0, 1), h0, h0, w, None, False)
    bs = torch.tensor([2, 1])
    with pytest.raises(RuntimeError, match="non-increasing"):
        torch.ops.fck.lstm_packed_fwd(torch.randn(3, 8), torch.tensor([1, 2]), h0[:1], h0[:1], w, None, None, False)
    with pytest.raises(RuntimeError, match="sum to 3 but the packed tensors have 4 rows"):
        torch.ops.fck.gru_packed_fwd(torch.randn(4, 6), bs, h0, torch.randn(6, 2), None, None, False)
    with pytest.raises(RuntimeError, match="1-D int64 CPU"):
        torch.ops.fck.lstm_packed_fwd(torch.randn(3, 8), bs.int(), h0, h0, w, None, None, True)
    with pytest.raises(RuntimeError, match="h0 must be \\(2, 2\\)"):
        torch.ops.fck.lstm_packed_fwd(torch.randn(3, 8), bs, h0[:1], h0, w, None, None, True)
    with pytest.raises(RuntimeError, match="w_hr must be"):
        torch.ops.fck.lstm_packed_fwd(torch.randn(3, 8), bs, h0, h0, w, torch.randn(2, 2), None, True)
    with pytest.raises(RuntimeError, match="saved tensors do not match"):
        out = torch.randn(3, 2)
        torch.ops.fck.lstm_packed_bwd(out, h0, h0, bs, h0, h0, w, None, out, out, out, torch.randn(2, 8), False)
    # the cells (the batched cell path calls them without Python's checks): a mixed bias pair would sum to a dtype
    # the layer accepts
    x64, h64, b = torch.randn(2, 3, dtype=torch.float64), h0.double(), torch.randn(8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="b_ih is Double but b_hh is Float"):
        torch.ops.fck.lstm_cell(x64, h64, h64, torch.randn(8, 3).double(), w.double(), b, b.float())
    with pytest.raises(RuntimeError):
        torch.ops.fck.gru_cell(x64, h64, torch.randn(6, 3).double(), torch.randn(6, 2).double(), b[:6],
                               b[:6].float())


# ---- library citizenship ----

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    skip_unless_runnable(backend, "cpu")
    suffix = "_triton" if backend == "triton" else ""
    g = _gen(7)
    T, B, H = 3, 2, 4
    xg4, xg3 = torch.randn(T, B, 4 * H, generator=g), torch.randn(T, B, 3 * H, generator=g)
    h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    w4, w3, b3 = torch.randn(4 * H, H, generator=g), torch.randn(3 * H, H, generator=g), torch.randn(3 * H, generator=g)
    tests = ("test_schema", "test_faketensor")
    op = lambda n: getattr(torch.ops.fck, n + suffix)  # noqa: E731
    b4 = torch.randn(4 * H, generator=g)
    out, hn, cn, c_all, gates = op("lstm_layer_fwd")(xg4, h0, c0, w4, b4, True)
    torch.library.opcheck(op("lstm_layer_fwd"), (xg4, h0, c0, w4, b4, True), test_utils=tests)
    torch.library.opcheck(op("lstm_layer_fwd"), (xg4, h0, c0, w4, None, False), test_utils=tests)
    dy = torch.randn_like(out)
    torch.library.opcheck(op("lstm_layer_bwd"), (dy, hn, cn, h0, c0, w4, out, c_all, gates, True), test_utils=tests)
    P = 2  # the layer with a projection
    hp, wp4, w_hr = torch.randn(B, P, generator=g), torch.randn(4 * H, P, generator=g), torch.randn(P, H, generator=g)
    fwd_p, bwd_p = op("lstm_proj_layer_fwd"), op("lstm_proj_layer_bwd")
    torch.library.opcheck(fwd_p, (xg4, hp, c0, wp4, w_hr, b4, True), test_utils=tests)
    torch.library.opcheck(fwd_p, (xg4, hp, c0, wp4, w_hr, None, False, False), test_utils=tests)
    outp, hnp, cnp, c_allp, gatesp, u = fwd_p(xg4, hp, c0, wp4, w_hr, None, False)
    torch.library.opcheck(bwd_p, (torch.randn_like(outp), hnp, cnp, hp, c0, wp4, w_hr, outp, u, c_allp, gatesp, False),
                          test_utils=tests)
    out, hn, saved = op("gru_layer_fwd")(xg3, h0, w3, b3, b3 * 2, False)
    torch.library.opcheck(op("gru_layer_fwd"), (xg3, h0, w3, b3, b3 * 2, False), test_utils=tests)
    torch.library.opcheck(op("gru_layer_fwd"), (xg3, h0, w3, None, None, True), test_utils=tests)
    torch.library.opcheck(op("gru_layer_bwd"), (dy, hn, h0, w3, out, saved, False), test_utils=tests)
    if backend == "cpu":  # the packed layers: 3 steps of 2, 2 and 1 rows
        bs = torch.tensor([2, 2, 1])
        x4, x3 = xg4.reshape(-1, 4 * H)[:5], xg3.reshape(-1, 3 * H)[:5]
        for reverse in (False, True):
            for w_hh, h, w_r in ((w4, h0, None), (wp4, hp, w_hr)):  # without and with a projection
                torch.library.opcheck(torch.ops.fck.lstm_packed_fwd, (x4, bs, h, c0, w_hh, w_r, b4, reverse),
                                      test_utils=tests)
                o, hn, cn, c_all, gates, u = torch.ops.fck.lstm_packed_fwd(x4, bs, h, c0, w_hh, w_r, None, reverse)
                torch.library.opcheck(torch.ops.fck.lstm_packed_bwd, (torch.randn_like(o), hn, cn, bs, h, c0, w_hh,
                                                                      w_r, o, u, c_all, gates, reverse),
                                      test_utils=tests)
            torch.library.opcheck(torch.ops.fck.gru_packed_fwd, (x3, bs, h0, w3, b3, None, reverse), test_utils=tests)
            o, hn, saved = torch.ops.fck.gru_packed_fwd(x3, bs, h0, w3, b3, b3, reverse)
            torch.library.opcheck(torch.ops.fck.gru_packed_bwd, (torch.randn_like(o), hn, bs, h0, w3, o, saved,
                                                                 reverse), test_utils=tests)


@pytest.mark.parametrize("how", ["functional", "module"])
def test_compiles_fullgraph(how):
    """The ops trace into one graph. Dynamo refuses to wrap any nn.RNNBase subclass unless allow_rnn is set, so the
    module form needs that flag (stock nn.LSTM graph-breaks there either way)."""
    skip_unless_runnable("cpu", "cpu")
    torch._dynamo.reset()
    torch.manual_seed(8)
    m = fnn.LSTM(4, 6, num_layers=2, bidirectional=True)
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4)
    if how == "functional":
        fn = torch.compile(lambda x, *w: fckF.lstm(x, w, num_layers=2, bidirectional=True)[0], fullgraph=True)
        out = fn(x, *m._flat_weights)
    else:
        with torch._dynamo.config.patch(allow_rnn=True):
            out = torch.compile(m, fullgraph=True)(x)[0]
    out.sum().backward()
    ref_out = ref(x)[0]
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.weight_hh_l1_reverse.grad, ref.weight_hh_l1_reverse.grad, rtol=1e-5, atol=1e-6)
    assert reference.acc_dtype(torch.float16) == torch.float32


def test_projected_lstm_compiles_fullgraph():
    skip_unless_runnable("cpu", "cpu")
    torch._dynamo.reset()
    torch.manual_seed(8)
    m = fnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4)
    fn = torch.compile(lambda x, *w: fckF.lstm(x, w, num_layers=2, bidirectional=True, proj_size=3)[0],
                       fullgraph=True)
    out = fn(x, *m._flat_weights)
    out.sum().backward()
    ref_out = ref(x)[0]
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.weight_hr_l1_reverse.grad, ref.weight_hr_l1_reverse.grad, rtol=1e-5, atol=1e-6)


def test_benchmark_script_runs(tmp_path):
    """benchmarks/bench_rnn.py in its quick form: every case, both providers, a JSON row each."""
    skip_unless_runnable("cpu", "cpu")
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_rnn

    out = tmp_path / "rnn.json"
    bench_rnn.main(["--device", "cpu", "--quick", "--reps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {r["provider"] for r in rows} == {"torch", "fck-cpu"}
    assert len(rows) == 2 * len(bench_rnn.cases(quick=True))
    bench_rnn.main(["--device", "cpu", "--quick", "--reps", "1", "--autocast", "--out", str(out)])
    assert {r["dtype"] for r in json.loads(out.read_text())} == {"autocast torch.bfloat16"}
