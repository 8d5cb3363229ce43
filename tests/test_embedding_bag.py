"""embedding_bag / embedding: the backends that have kernels (reference, cpu, triton) against
torch.nn.functional, forward and backward, plus the bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
import fastcore_kernels.functional as fckF
from fastcore_kernels import nn as fnn
from fastcore_kernels.ops.embedding_bag import IMPLEMENTED

from conftest import devices, skip_unless_runnable

BACKENDS = IMPLEMENTED
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}


def _bags(seed, n_bags=7, vocab=23, max_len=9, index_dtype=torch.int64):
    """Bags of size 0, 1 and more, with duplicates within and across bags."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len, (n_bags,), generator=g)
    lengths[0], lengths[1] = 0, 1
    indices = torch.randint(0, vocab, (int(lengths.sum()),), generator=g)
    if len(indices) > 3:
        indices[2] = indices[3]  # a duplicate inside a bag (or across two)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return indices.to(index_dtype), offsets.to(index_dtype)


def _run(fn, weight, psw, **kw):
    weight = weight.detach().clone().requires_grad_()
    psw = None if psw is None else psw.detach().clone().requires_grad_()
    out = fn(weight, psw, **kw)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return tuple(None if t is None else t.cpu() for t in (out, weight.grad, None if psw is None else psw.grad))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,use_psw", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("padding_idx", [None, 5])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_matches_torch(device, backend, padding_idx, mode, use_psw, dtype, index_dtype):
    skip_unless_runnable(backend, device)
    indices, offsets = _bags(0, index_dtype=index_dtype)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(23, 6, generator=g).to(dtype)
    psw = torch.rand(len(indices), generator=g).to(dtype) if use_psw else None
    _check_against_float64(backend, indices, offsets, weight, psw, mode, padding_idx, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("mode,use_psw", [("sum", True), ("mean", False), ("max", False)])
def test_wide_rows_and_long_bags_cpu(mode, use_psw, dtype):
    """Rows of 150 values (the forward's blocks of 64, a short last block and cache line) in bags longer than the
    prefetch distance, so every row is summed while a later one is fetched."""
    skip_unless_runnable("cpu", "cpu")
    indices, offsets = _bags(3, n_bags=40, vocab=200, max_len=30)
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(200, 150, generator=g).to(dtype)
    psw = torch.rand(len(indices), generator=g).to(dtype) if use_psw else None
    _check_against_float64("cpu", indices, offsets, weight, psw, mode, 7, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,use_psw", [("sum", True), ("mean", False)])
def test_table_streamed_in_row_order_cpu(mode, use_psw, dtype):
    """A table above 16 MB that the indices cover more than once is walked in row order by the CPU forward (each
    thread adding rows into its own bags): bags of size 0 and 1, padding, duplicates, against torch in float64."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(9)
    rows, dim = 9000, 1000  # 36 MB in fp32, 18 MB in fp16
    lengths = torch.randint(0, 15, (1500,), generator=g)
    lengths[:3] = torch.tensor([0, 1, 0])
    indices = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    assert len(indices) >= rows
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    weight = torch.randn(rows, dim, generator=g).to(dtype)
    psw = torch.rand(len(indices), generator=g).to(dtype) if use_psw else None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # uneven shares of the bags
        _check_against_float64("cpu", indices, offsets, weight, psw, mode, 5, dtype)
    finally:
        torch.set_num_threads(threads)


def _check_against_float64(backend, indices, offsets, weight, psw, mode, padding_idx, dtype, device="cpu"):
    kw = dict(mode=mode, padding_idx=padding_idx)
    on = (indices.to(device), offsets.to(device), weight.to(device), None if psw is None else psw.to(device))
    ours = _run(lambda w, p: fckF.embedding_bag(on[0], w, on[1], per_sample_weights=p, backend=backend, **kw),
                on[2], on[3])
    # torch's CPU kernels in half precision round differently; compare against its float64 result
    d = torch.float64
    theirs = _run(lambda w, p: F.embedding_bag(indices.long(), w, offsets.long(), per_sample_weights=p, **kw),
                  weight.to(d), None if psw is None else psw.to(d))
    rtol, atol = TOL[dtype]
    for name, a, b in zip(("output", "grad weight", "grad per_sample_weights"), ours, theirs):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_input_forms(device, backend):
    """2-D fixed-size bags, include_last_offset, bags longer than any tile, many bags."""
    skip_unless_runnable(backend, device)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 33, generator=g).to(device)
    x2d = torch.randint(0, 1000, (300, 17), generator=g).to(device)
    for mode in ("sum", "mean", "max"):
        torch.testing.assert_close(fckF.embedding_bag(x2d, weight, mode=mode, backend=backend),
                                   F.embedding_bag(x2d, weight, mode=mode))
    indices = torch.randint(0, 1000, (5000,), generator=g).to(device)
    offsets = torch.tensor([0, 1, 1, 4000, 4999, 5000], device=device)
    for last in (False, True):
        ours = fckF.embedding_bag(indices, weight, offsets, mode="sum", include_last_offset=last, backend=backend)
        torch.testing.assert_close(ours, F.embedding_bag(indices, weight, offsets, mode="sum",
                                                         include_last_offset=last), rtol=1e-5, atol=1e-4)
    # No offsets at all: no bags, whatever the indices (PyTorch ignores them), and no gradient.
    leaf = weight.clone().requires_grad_()
    no_offsets = torch.zeros(0, dtype=torch.long, device=device)
    for idx in (indices[:3], indices[:0]):
        for mode, psw in (("sum", torch.randn(idx.shape, device=device, requires_grad=True)), ("mean", None),
                          ("max", None)):
            out = fckF.embedding_bag(idx, leaf, no_offsets, mode=mode, per_sample_weights=psw, backend=backend)
            assert out.shape == (0, 33)  # PyTorch's shape (its CPU max mode crashes when idx is not empty)
            out.sum().backward()
            assert leaf.grad.count_nonzero() == 0 and (psw is None or psw.grad.count_nonzero() == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_max_ties_and_infinities_as_torch(device, backend):
    """mode='max' by torch's rule: the bag's first row is the maximum, replaced by each later row strictly greater.
    A column's gradient goes whole to the first of tied rows (not split among them), a bag whose maximum is -inf
    gives -inf (an empty bag gives 0), and a NaN counts only as a bag's first row."""
    skip_unless_runnable(backend, device)
    nan, inf = float("nan"), float("inf")
    weight = torch.tensor([[1.0, 2.0], [1.0, 5.0], [0.0, 5.0], [-inf, 1.0], [nan, 0.5]], device=device)
    indices = torch.tensor([0, 1, 2, 2, 1, 3, 3, 0, 4, 0, 0, 4], device=device)
    offsets = torch.tensor([0, 3, 5, 5, 6, 8, 10], device=device)
    results = []
    for fn in (F.embedding_bag, lambda *a, **k: fckF.embedding_bag(*a, **k, backend=backend)):
        w = weight.clone().requires_grad_()
        out = fn(indices, w, offsets, mode="max")
        out.backward(torch.arange(1.0, 1 + out.numel(), device=device).view(out.shape))
        results.append((out.detach(), w.grad))
    if device == "cpu":  # torch's CPU kernel, worked out by hand (its CUDA kernel is compared with, not asserted)
        expected_out = [[1, 5], [1, 5], [0, 0], [-inf, 1], [1, 2], [nan, 2], [1, 2]]
        torch.testing.assert_close(results[0][0], torch.tensor(expected_out, dtype=torch.float32), equal_nan=True)
        assert results[0][1].tolist() == [[23, 36], [3, 2], [0, 4], [7, 8], [11, 0]]
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_padding_rows_holding_inf_or_nan_add_nothing(device, backend):
    """A padding row is skipped, whatever it holds: it adds nothing to its bag (mean does not count it), and its
    weight and per-sample weight get zero gradients, as torch gives them (a product by 0 would give NaN)."""
    skip_unless_runnable(backend, device)
    weight = torch.randn(5, 3, device=device)
    weight[2] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    indices = torch.tensor([2, 0, 2, 1, 4, 2], device=device)
    offsets = torch.tensor([0, 2, 3], device=device)
    sample_weights = torch.randn(6, device=device)
    for mode in ("sum", "mean", "max"):
        results = []
        for fn in (F.embedding_bag, lambda *a, **k: fckF.embedding_bag(*a, **k, backend=backend)):
            w = weight.clone().requires_grad_()
            psw = sample_weights.clone().requires_grad_() if mode == "sum" else None
            out = fn(indices, w, offsets, mode=mode, per_sample_weights=psw, padding_idx=2)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device))
            results.append((out.detach(), w.grad) + ((psw.grad,) if psw is not None else ()))
        assert results[0][0].isfinite().all() and results[0][1].isfinite().all()
        for ours, theirs in zip(results[1], results[0]):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_strided_weight_views(device, backend, view):
    """A table that is a strided view (transposed, a slice of a wider table, expanded) gives torch's values and
    gradients, which reach the view's base (the Triton kernels read such a view as packed rows: wrong values). The
    fused update, which writes rows in place, refuses one."""
    skip_unless_runnable(backend, device)
    indices = torch.randint(0, 10, (6, 4), generator=torch.Generator().manual_seed(0)).to(device)
    psw = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)).to(device)

    def table():
        g = torch.Generator().manual_seed(2)
        if view == "transposed":
            base = torch.randn(4, 10, generator=g).to(device).requires_grad_()
            return base, base.t()
        if view == "sliced":
            base = torch.randn(10, 8, generator=g).to(device).requires_grad_()
            return base, base[:, :4]
        base = torch.randn(1, 4, generator=g).to(device).requires_grad_()
        return base, base.expand(10, 4)

    calls = [(fckF.embedding, F.embedding, {}), (fckF.embedding_bag, F.embedding_bag, {"mode": "max"}),
             (fckF.embedding_bag, F.embedding_bag, {"mode": "sum", "per_sample_weights": psw})]
    if view != "expanded":  # torch's renorm cannot write into an expanded view
        calls.append((fckF.embedding_bag, F.embedding_bag, {"mode": "mean", "max_norm": 1.0}))
    for ours_fn, torch_fn, kw in calls:
        results = []
        for fn in (torch_fn, lambda *a, **k: ours_fn(*a, **k, backend=backend)):
            base, weight = table()
            out = fn(indices, weight, **kw)
            out.backward(torch.arange(out.numel(), dtype=out.dtype, device=device).view(out.shape))
            results.append((out.detach(), base.grad, base.detach()))
        for ours, theirs in zip(results[1], results[0]):
            torch.testing.assert_close(ours, theirs, msg=lambda m: f"{ours_fn.__name__} {kw}: {m}")
    if backend == "cpu":
        with pytest.raises(ValueError, match="weight must be contiguous"):
            fckF.embedding_bag(indices, table()[1], mode="sum", update=fnn.EmbeddingUpdate("sgd", lr=0.1),
                               backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_gradcheck_float64(device, backend):
    skip_unless_runnable(backend, device)
    indices, offsets = (t.to(device) for t in _bags(3, n_bags=5, vocab=8, max_len=5))
    weight = torch.randn(8, 3, dtype=torch.float64, device=device, requires_grad=True)
    psw = torch.rand(len(indices), dtype=torch.float64, device=device, requires_grad=True)
    for mode in ("sum", "mean", "max"):
        assert torch.autograd.gradcheck(
            lambda w: fckF.embedding_bag(indices, w, offsets, mode=mode, padding_idx=2, backend=backend), (weight,))
    assert torch.autograd.gradcheck(
        lambda w, p: fckF.embedding_bag(indices, w, offsets, mode="sum", per_sample_weights=p, backend=backend),
        (weight, psw))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_sparse_gradient_matches_dense_and_trains_with_sparse_adam(backend):
    skip_unless_runnable(backend, "cpu")
    indices, offsets = _bags(4)
    weight = torch.randn(23, 6)
    for mode in ("sum", "mean"):
        for freq in (False, True):
            kw = dict(mode=mode, padding_idx=3, scale_grad_by_freq=freq, backend=backend)
            dense = _run(lambda w, p: fckF.embedding_bag(indices, w, offsets, **kw), weight, None)[1]
            sparse = _run(lambda w, p: fckF.embedding_bag(indices, w, offsets, sparse=True, **kw), weight, None)[1]
            assert sparse.is_sparse and not dense.is_sparse
            torch.testing.assert_close(sparse.to_dense(), dense)
    rows = _run(lambda w, p: fckF.embedding(indices, w, padding_idx=3, sparse=True, backend=backend), weight, None)[1]
    assert rows.is_sparse
    torch.testing.assert_close(rows.to_dense(), _run(lambda w, p: F.embedding(indices, w, padding_idx=3), weight,
                                                      None)[1])
    bag = fnn.EmbeddingBag(23, 6, mode="sum", sparse=True)
    opt = torch.optim.SparseAdam(bag.parameters(), lr=0.1)
    before = bag.weight.detach().clone()
    bag(indices, offsets).sum().backward()
    opt.step()
    touched = torch.zeros(23, dtype=torch.bool)
    touched[indices] = True
    assert not torch.equal(bag.weight[touched], before[touched]) and torch.equal(bag.weight[~touched],
                                                                                  before[~touched])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_scale_grad_by_freq_and_max_norm_match_torch(backend):
    skip_unless_runnable(backend, "cpu")
    indices, offsets = _bags(5)
    weight = torch.randn(23, 6) * 3
    psw = torch.rand(len(indices))
    # The definition, not torch's scale_grad_by_freq=True, which miscounts on the CPU in torch 2.4: the gradient
    # without scaling, each row's divided by its count in the batch.
    counts = torch.bincount(indices, minlength=weight.shape[0]).clamp(min=1)[:, None].float()
    for mode, p in (("sum", None), ("mean", None), ("sum", psw)):
        ours = _run(lambda w, p: fckF.embedding_bag(indices, w, offsets, mode=mode, scale_grad_by_freq=True,
                                                    per_sample_weights=p, backend=backend), weight, p)
        theirs = _run(lambda w, p: F.embedding_bag(indices, w, offsets, mode=mode, per_sample_weights=p), weight, p)
        torch.testing.assert_close(ours[1], theirs[1] / counts)
        if p is not None:
            torch.testing.assert_close(ours[2], theirs[2])  # the per-sample weights' gradient is not scaled
    ours = _run(lambda w, p: fckF.embedding(indices, w, scale_grad_by_freq=True, backend=backend), weight, None)
    theirs = _run(lambda w, p: F.embedding(indices, w), weight, None)
    torch.testing.assert_close(ours[1], theirs[1] / counts)
    w1, w2 = weight.clone(), weight.clone()
    torch.testing.assert_close(fckF.embedding_bag(indices, w1, offsets, max_norm=1.0, backend=backend),
                               F.embedding_bag(indices, w2, offsets, max_norm=1.0))
    torch.testing.assert_close(w1, w2)  # the looked-up rows were renormalised in place, as torch does


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_backward_writes_every_row_of_a_reused_gradient_cpu(dtype):
    """The CPU backward writes each gradient row once, zeros included, into a buffer that may come back from the
    CPU pool holding the last gradient: rows not touched this time must read zero. Skewed indices (half on one row)
    across two threads check the cost-balanced row split."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(10000, 64, generator=g).to(dtype)  # a gradient above 1 MiB: pooled
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # the second call leaves rows 300.. untouched; the third touches few rows (its occurrences are sorted
        # instead of counted over every row)
        for seed, vocab, n in ((1, 10000, 3000), (2, 300, 3000), (3, 10000, 600)):
            gi = torch.Generator().manual_seed(seed)
            indices = torch.randint(0, vocab, (n,), generator=gi)
            indices[::2] = 3
            offsets = torch.arange(0, n, 5)
            psw = torch.rand(n, generator=gi).to(dtype)
            kw = dict(mode="sum", padding_idx=7)
            ours = _run(lambda w, p: fckF.embedding_bag(indices, w, offsets, per_sample_weights=p, backend="cpu",
                                                         **kw), weight, psw)
            theirs = _run(lambda w, p: F.embedding_bag(indices, w, offsets, per_sample_weights=p, **kw),
                          weight.double(), psw.double())
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(ours[1].double(), theirs[1], rtol=rtol,
                                       atol=atol * theirs[1].abs().max().item())
            assert torch.count_nonzero(ours[1][vocab:]) == 0
            del ours  # its gradient goes back to the pool for the next call
    finally:
        torch.set_num_threads(threads)


def test_backward_is_deterministic_across_thread_counts():
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 50, (20000,), generator=g)  # heavy duplication: order of summation matters
    offsets = torch.arange(0, 20000, 7)
    weight = torch.randn(50, 16, generator=g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(_run(lambda w, p: fckF.embedding_bag(indices, w, offsets, backend="cpu"), weight, None)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_matches_torch(backend):
    skip_unless_runnable(backend, "cpu")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 5, generator=g)
    idx = torch.randint(0, 30, (4, 3, 2), generator=g)
    idx[0, 0, 0] = 7
    for padding_idx in (None, 7, -23):
        ours = _run(lambda w, p: fckF.embedding(idx, w, padding_idx, backend=backend), weight, None)
        theirs = _run(lambda w, p: F.embedding(idx, w, padding_idx), weight, None)
        assert ours[0].shape == (4, 3, 2, 5)
        torch.testing.assert_close(ours[0], theirs[0])
        torch.testing.assert_close(ours[1], theirs[1])


def test_embedding_cxx_autograd_path():
    """The cpu backend's plain lookups run fck::embedding with its autograd in C++: float64 gradcheck, padding,
    int32 and non-contiguous indices, an empty index tensor, and no-grad calls."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, 9, (5, 3), generator=g)
    idx[0, 0] = idx[2, 1] = 2
    # (padding_idx is left out here: its row's value is returned but, as torch's, gets no gradient by design)
    assert torch.autograd.gradcheck(lambda w: fckF.embedding(idx, w, backend="cpu"), (w,))
    for index in (idx.t(), idx.int(), idx[:, :0]):
        ours = _run(lambda w, p: fckF.embedding(index, w, 2, backend="cpu"), w, None)
        theirs = _run(lambda w, p: F.embedding(index, w, 2), w, None)
        assert ours[0].shape == theirs[0].shape
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        torch.testing.assert_close(ours[1], theirs[1])
    with torch.no_grad():
        torch.testing.assert_close(fckF.embedding(idx, w, backend="cpu"), F.embedding(idx, w), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,dim", [(64, 64), (3000, 24)], ids=["serial-sum", "row-owned"])
def test_embedding_direct_cpu_lookup(n, dim, dtype):
    """Plain CPU lookups skip the bag ops (fck::cpu::embedding_lookup and its backward): small fp32 gradients are
    summed serially in index order, larger ones and fp16/bf16 by the bag backward's walk. Duplicates, padding, int32
    indices; an index out of range raises an IndexError naming its value, before anything is read."""
    skip_unless_runnable("cpu", "cpu")
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(40, dim, generator=g).to(dtype)
    idx = torch.randint(0, 40, (n,), generator=g)
    idx[:7] = 3  # duplicates of the padding row and of others
    for index, pad in ((idx, None), (idx.int(), 3), (idx.view(-1, 2 if n % 2 == 0 else 1), 5)):
        ours = _run(lambda w, p: fckF.embedding(index, w, pad, backend="cpu"), weight, None)
        theirs = _run(lambda w, p: F.embedding(index, w.double(), pad).to(dtype), weight, None)  # float64 sums
        torch.testing.assert_close(ours[0], theirs[0].to(dtype), rtol=0, atol=0)
        # the gradient is summed in fp32 and rounded to the weight's dtype once: within a unit of its last place
        rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -7, 1e-4)}[dtype]
        torch.testing.assert_close(ours[1].double(), theirs[1].double(), rtol=rtol, atol=atol)
    bad = idx.clone()
    bad[n // 2] = 40
    with pytest.raises(IndexError, match="takes value 40"):
        fckF.embedding(bad, weight, backend="cpu")


def test_embedding_compiles_fullgraph():
    """Under torch.compile the lookup takes the Python autograd path (fck::embedding's C++ autograd is eager-only)."""
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    emb = fnn.Embedding(11, 4, padding_idx=3)
    idx = torch.randint(0, 11, (6, 2))
    idx[0, 0] = 3
    compiled = torch.compile(lambda i: emb(i).square().sum(), fullgraph=True, backend="aot_eager")
    with fck.use_backend("cpu"):
        compiled(idx).backward()
    ref = nn.Embedding(11, 4, padding_idx=3)
    ref.load_state_dict(emb.state_dict())
    ref(idx).square().sum().backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_double_backward(device, backend):
    """create_graph=True: a plain lookup's weight gradient is differentiable as torch's (gradgradcheck, padding row
    included where the op runs it through the C++ node); a bag's backward refuses with torch's kind of error, never a
    silently non-differentiable gradient."""
    skip_unless_runnable(backend, device)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    idx = torch.tensor([[1, 4, 1], [0, 5, 2]], device=device)
    if backend in ("cpu", "cuda"):
        for pad in (None, 1):
            def lookup(w):
                return fckF.embedding(idx, w, padding_idx=pad, backend=backend) ** 2
            assert torch.autograd.gradgradcheck(lookup, (weight,), eps=1e-6, atol=1e-7)
    bags = fckF.embedding_bag(idx, weight, mode="sum", backend=backend)
    if backend == "reference":
        assert torch.autograd.grad((bags ** 2).sum(), weight, create_graph=True)[0].requires_grad
        return
    with pytest.raises((NotImplementedError, RuntimeError), match="not differentiable|differentiate twice"):
        gw, = torch.autograd.grad((bags ** 2).sum(), weight, create_graph=True)
        (gw ** 2).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_bad_input_gets_a_clear_error(device, backend):
    skip_unless_runnable(backend, device)
    weight = torch.randn(10, 3, device=device)

    def bag(inp, off, **kw):
        return fckF.embedding_bag(torch.tensor(inp, device=device), weight,
                                  None if off is None else torch.tensor(off, device=device), backend=backend, **kw)

    with pytest.raises(IndexError, match="takes value 10"):
        bag([1, 10], [0])
    with pytest.raises(IndexError, match="takes value -1"):
        bag([1, -1], [0])
    with pytest.raises(IndexError, match="takes value 12"):
        fckF.embedding(torch.tensor([[1, 12]], device=device), weight, backend=backend)
    with pytest.raises(RuntimeError, match="can not be greater than input's length"):
        bag([1, 2], [0, 3])
    with pytest.raises(RuntimeError, match="has to be 0"):
        bag([1, 2], [1, 2])
    with pytest.raises(RuntimeError, match="must not decrease"):
        bag([1, 2, 3], [0, 2, 1])
    with pytest.raises(NotImplementedError, match="only supported for mode='sum'"):
        bag([1, 2], [0], mode="mean", per_sample_weights=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="same shape as the input"):
        bag([1, 2], [0], mode="sum", per_sample_weights=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="max mode does not support sparse weights"):  # torch's errors
        bag([1, 2], [0], mode="max", sparse=True)
    with pytest.raises(ValueError, match="max mode does not support scaling the gradient"):
        bag([1, 2], [0], mode="max", scale_grad_by_freq=True)
    with pytest.raises(RuntimeError, match="Long, Int"):
        fckF.embedding_bag(torch.tensor([1.0, 2.0], device=device), weight, torch.tensor([0], device=device),
                           backend=backend)
    with pytest.raises(ValueError, match="offsets has to be None"):
        bag([[1, 2]], [0])
    with pytest.raises(ValueError, match="padding_idx"):
        bag([1, 2], [0], padding_idx=10)


def test_cxx_op_guards_hold_alone():
    skip_unless_runnable("cpu", "cpu")
    w = torch.randn(10, 3)
    with pytest.raises(IndexError, match="valid range"):
        torch.ops.fck.embedding_bag_fwd(w, torch.tensor([3, 99]), torch.tensor([0, 2]), 0, None, -1)
    with pytest.raises(RuntimeError, match="can not be greater than input's length 2 but got 5"):
        torch.ops.fck.embedding_bag_fwd(w, torch.tensor([3, 4]), torch.tensor([0, 5]), 0, None, -1)
    with pytest.raises(RuntimeError, match="last offset must be the number of indices, 2, got 1"):
        torch.ops.fck.embedding_bag_fwd(w, torch.tensor([3, 4]), torch.tensor([0, 1]), 0, None, -1)
    with pytest.raises(RuntimeError, match="offsets\\[0\\] has to be 0"):
        torch.ops.fck.embedding_bag_fwd(w, torch.tensor([3, 4]), torch.tensor([1, 2]), 0, None, -1)
    with pytest.raises(RuntimeError, match="with no bags"):
        torch.ops.fck.embedding_bag_fwd(w, torch.tensor([3, 4]), torch.tensor([2]), 0, None, -1)
    with pytest.raises(RuntimeError, match="must not decrease"):
        torch.ops.fck.embedding_bag_fwd(w, torch.tensor([3, 4]), torch.tensor([0, 2, 1, 2]), 0, None, -1)
    with pytest.raises(IndexError, match="max_indices"):
        torch.ops.fck.embedding_bag_bwd(torch.randn(1, 3), torch.tensor([3]), torch.tensor([0, 1]),
                                        torch.full((1, 3), 50), 10, 2, None, -1)


def test_triton_op_guards_hold_alone():
    """The Triton ops check their offsets and indices themselves (in the C++ ops' words), so no caller — compiled
    code, a direct call — makes their kernels read out of bounds; the max backward skips rows outside the table."""
    skip_unless_runnable("triton", "cpu")
    w = torch.randn(10, 3)
    fwd, bwd = torch.ops.fck.embedding_bag_fwd_triton, torch.ops.fck.embedding_bag_bwd_triton
    for op, args in ((fwd, (w,)), (bwd, (torch.randn(1, 3),))):
        rest = (0, None, -1) if op is fwd else (torch.empty(0, dtype=torch.long), 10, 0, None, -1)
        with pytest.raises(IndexError, match="index 1 of input takes value 99 which is not in the valid range"):
            op(*args, torch.tensor([3, 99]), torch.tensor([0, 2]), *rest)
        with pytest.raises(RuntimeError, match="offsets\\[0\\] has to be 0"):
            op(*args, torch.tensor([3, 4]), torch.tensor([1, 2]), *rest)
        with pytest.raises(RuntimeError, match="can not be greater than input's length 2 but got 5"):
            op(*args, torch.tensor([3, 4]), torch.tensor([0, 5]), *rest)
        with pytest.raises(RuntimeError, match="last offset must be the number of indices, 2, got 1"):
            op(*args, torch.tensor([3, 4]), torch.tensor([0, 1]), *rest)
    with pytest.raises(RuntimeError, match="must not decrease"):
        fwd(w, torch.tensor([3, 4]), torch.tensor([0, 2, 1, 2]), 0, None, -1)
    with pytest.raises(RuntimeError, match="with no bags"):
        fwd(w, torch.tensor([3, 4]), torch.tensor([2]), 0, None, -1)
    grad = torch.randn(2, 3)
    max_rows = torch.tensor([[1, 50, -1], [-7, 2, 9]])
    got = bwd(grad, torch.tensor([1, 2]), torch.tensor([0, 1, 2]), max_rows, 10, 2, None, -1)
    want = torch.zeros(10, 3)
    want[1, 0], want[2, 1], want[9, 2] = grad[0, 0], grad[1, 1], grad[1, 2]
    torch.testing.assert_close(got, want)


def test_checked_indices_op():
    idx, off = torch.tensor([3, 4, 0]), torch.tensor([0, 2, 3])
    torch.library.opcheck(torch.ops.fck.embedding_bag_checked, (idx, off, 5))
    out = torch.ops.fck.embedding_bag_checked(idx, off, 5)
    assert out.data_ptr() != idx.data_ptr() and torch.equal(out, idx)
    with pytest.raises(IndexError, match="index 1 of input takes value 4"):
        torch.ops.fck.embedding_bag_checked(idx, off, 4)
    with pytest.raises(RuntimeError, match="must not decrease"):
        torch.ops.fck.embedding_bag_checked(idx, torch.tensor([0, 2, 1, 3]), 5)


@pytest.mark.parametrize("form", ["offsets", "include_last_offset", "2-D, per-sample weights", "max_norm",
                                  "embedding"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_form_compiles_fullgraph(backend, form):
    """No form reads a tensor's value on the host (the ops check their inputs), so each traces into one graph;
    include_last_offset's end offset stops short of the input here (the extra bag is dropped, as torch ignores those
    indices). Forward and backward against torch in eager mode, and an out-of-range index still raises."""
    skip_unless_runnable(backend, "cpu")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 5, generator=g)
    idx, off = torch.randint(0, 12, (9,), generator=g), torch.tensor([0, 2, 2, 7])
    psw = None
    kw = {}
    if form == "include_last_offset":
        off, kw = torch.tensor([0, 2, 2, 7]), dict(include_last_offset=True, mode="max")
    elif form.startswith("2-D"):
        idx, off, psw, kw = idx.view(3, 3), None, torch.randn(3, 3, generator=g), dict(mode="sum")
    elif form == "max_norm":
        kw = dict(max_norm=1.0)

    def run(fn, w, i, o, p):
        if form == "embedding":
            return fn(i.view(3, 3), w, padding_idx=2)
        return fn(i, w, o, per_sample_weights=p, **kw)

    def ours(w, i, o, p):
        return run(lambda *a, **k: fckF.embedding_bag(*a, **k, backend=backend) if form != "embedding"
                   else fckF.embedding(*a, **k, backend=backend), w, i, o, p)

    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, lambda w, i, o, p: run(F.embedding_bag if form != "embedding" else F.embedding, w, i, o,
                                                  p)):
        w = weight.clone().requires_grad_()
        p = None if psw is None else psw.clone().requires_grad_()
        out = fn(w, idx, off, p)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
        results.append((out, w.grad, None if p is None else p.grad, w.detach()))
    for a, b in zip(*results):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bad = idx.clone()
    bad.view(-1)[4] = 12
    with pytest.raises(IndexError, match="takes value 12"):
        compiled(weight, bad, off, psw)


def test_backends_an_op_lacks_are_refused_clearly():
    from fastcore_kernels import _backend

    with pytest.raises(NotImplementedError, match="no 'triton' kernels yet"):
        _backend.resolve(torch.device("cpu"), "triton", ("reference", "cpu"), "some_op")
    assert _backend.resolve(torch.device("cpu"), "auto", ("reference",), "some_op") == "reference"


def test_modules_are_drop_ins_and_fuse_swaps_them():
    torch.manual_seed(0)
    pre = torch.randn(12, 4)
    ours, theirs = fnn.EmbeddingBag.from_pretrained(pre, mode="max"), nn.EmbeddingBag.from_pretrained(pre,
                                                                                                       mode="max")
    idx, off = torch.tensor([1, 2, 3, 11]), torch.tensor([0, 2])
    torch.testing.assert_close(ours(idx, off), theirs(idx, off))
    emb = nn.Embedding(12, 4, padding_idx=0)
    mine = fnn.Embedding(12, 4, padding_idx=0)
    mine.load_state_dict(emb.state_dict())
    x = torch.tensor([[0, 3], [5, 11]])
    torch.testing.assert_close(mine(x), emb(x))
    model = nn.Sequential(nn.Embedding(12, 4), nn.Flatten(), nn.Linear(8, 2))
    fused = fck.fuse(model)
    assert type(fused[0]) is fnn.Embedding and list(fused.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(fused(x), model(x))


def _row_bags(seed, n_bags, vocab, max_len, hot, index_dtype):
    """Bags of 0..max_len indices over `vocab` rows with row 1 `hot` times over (a frequent word: its occurrences
    span several of the row-by-row backward's 64-occurrence chunks), rows past vocab // 2 never named, and a
    leading empty bag."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_bags,), generator=g)
    lengths[0] = 0
    indices = torch.randint(0, max(1, vocab // 2), (int(lengths.sum()),), generator=g)
    indices[torch.randperm(len(indices), generator=g)[:hot]] = 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return indices.to(index_dtype), offsets.to(index_dtype)


# CUDA's row-by-row backward (fck/embedding_bag_rows.h), its functors emulated on the CPU: a std::thread per CUDA
# thread, its outputs NaN-filled first. Widths: 16-byte vectors (8, 1100: two column tiles of 256 threads) and
# scalar columns (5).
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 8), (torch.float32, 5), (torch.float64, 6),
                                       (torch.bfloat16, 16), (torch.float16, 5), (torch.float32, 1100)])
@pytest.mark.parametrize("mode,use_psw,padding_idx", [("sum", False, None), ("sum", True, 3), ("mean", False, 3),
                                                      ("mean", True, None)])
def test_rows_backward_emulated_cpu(monkeypatch, mode, use_psw, padding_idx, dtype, dim):
    skip_unless_runnable("cpu", "cpu")
    monkeypatch.setenv("FCK_BAG_ROWS_EMULATE", "1")
    wide = dim > 64
    indices, offsets = _row_bags(dim, n_bags=6 if wide else 60, vocab=40, max_len=8 if wide else 12,
                                 hot=12 if wide else 200, index_dtype=torch.int32 if dim % 2 else torch.int64)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(40, dim, generator=g).to(dtype)
    psw = torch.rand(len(indices), generator=g).to(dtype) if use_psw else None
    if mode == "mean" and use_psw:  # the backward's per-index scales ('mean' with scale_grad_by_freq's folded in)
        grad = torch.randn(len(offsets), dim, generator=g).to(dtype)
        off = torch.cat([offsets, torch.tensor([len(indices)], dtype=offsets.dtype)])
        ours = torch.ops.fck.embedding_bag_bwd(grad, indices, off, torch.empty(0, dtype=torch.long), 40, 1, psw,
                                               padding_idx if padding_idx is not None else -1)
        rows = grad.double().repeat_interleave(off.diff().long(), 0)
        per_bag = torch.zeros(len(offsets), dtype=torch.float64).index_add_(
            0, torch.arange(len(offsets)).repeat_interleave(off.diff().long()), torch.ones(len(indices)).double())
        scale = psw.double() / per_bag.clamp_min(1).repeat_interleave(off.diff().long())
        theirs = torch.zeros(40, dim, dtype=torch.float64).index_add_(0, indices.long(), rows * scale[:, None])
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=atol * theirs.abs().max().item())
        return
    _check_against_float64("cpu", indices, offsets, weight, psw, mode, padding_idx, dtype)


def test_rows_backward_emulated_edges_cpu(monkeypatch):
    """No index at all, bags that are all padding, and a table whose rows are all untouched but one."""
    skip_unless_runnable("cpu", "cpu")
    monkeypatch.setenv("FCK_BAG_ROWS_EMULATE", "1")
    grad = torch.randn(3, 4)
    empty = torch.ops.fck.embedding_bag_bwd(grad, torch.empty(0, dtype=torch.long), torch.tensor([0, 0, 0, 0]),
                                            torch.empty(0, dtype=torch.long), 9, 0, None, -1)
    assert torch.equal(empty, torch.zeros(9, 4))
    indices, offsets = torch.tensor([2, 2, 7, 2]), torch.tensor([0, 2, 3, 4])
    out = torch.ops.fck.embedding_bag_bwd(grad, indices, offsets, torch.empty(0, dtype=torch.long), 9, 1, None, 2)
    want = torch.zeros(9, 4)
    want[7] = grad[1]
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,use_psw", [("sum", True), ("mean", False)])
def test_rows_backward_cuda(monkeypatch, mode, use_psw, dtype):
    """The row-by-row backward forced on (FCK_BAG_ROWS_CUDA=1) against float64 with a frequent row across many
    chunks, bitwise repeatable; and the atomics forced on (=0) against the same."""
    skip_unless_runnable("cuda", "cuda")
    indices, offsets = _row_bags(9, n_bags=500, vocab=3000, max_len=60, hot=5000, index_dtype=torch.int64)
    weight = torch.randn(3000, 72).to(dtype)
    psw = torch.rand(len(indices)).to(dtype) if use_psw else None
    for flag in ("1", "0"):
        monkeypatch.setenv("FCK_BAG_ROWS_CUDA", flag)
        _check_against_float64("cuda", indices, offsets, weight, psw, mode, 7, dtype, device="cuda")
    monkeypatch.setenv("FCK_BAG_ROWS_CUDA", "1")
    idx, off, w = indices.cuda(), offsets.cuda(), weight.cuda()
    p = None if psw is None else psw.cuda()
    runs = [_run(lambda w_, p_: fckF.embedding_bag(idx, w_, off, mode=mode, per_sample_weights=p_, padding_idx=7,
                                                   backend="cuda"), w, p)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_deterministic_mode(device, backend):
    skip_unless_runnable(backend, device)
    indices, offsets = (t.to(device) for t in _bags(6, n_bags=30, vocab=5))
    weight = torch.randn(5, 4, device=device)
    theirs = _run(lambda w, p: F.embedding_bag(indices, w, offsets, mode="mean"), weight, None)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(lambda w, p: fckF.embedding_bag(indices, w, offsets, mode="mean", backend=backend), weight,
                     None) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][1], theirs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_cuda_matches_torch(backend, mode):
    skip_unless_runnable(backend, "cuda")
    indices, offsets = _bags(7, n_bags=300, vocab=1000, max_len=40)
    weight = torch.randn(1000, 70).cuda()
    idx, off = indices.cuda(), offsets.cuda()
    psw = torch.rand(len(indices)).cuda() if mode == "sum" else None
    ours = _run(lambda w, p: fckF.embedding_bag(idx, w, off, mode=mode, per_sample_weights=p, padding_idx=3,
                                                backend=backend), weight, psw)
    theirs = _run(lambda w, p: F.embedding_bag(idx, w, off, mode=mode, per_sample_weights=p, padding_idx=3),
                  weight, psw)
    for a, b in zip(ours, theirs):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "sgd deterministic"])
@pytest.mark.parametrize("device", devices())
def test_fused_update_equals_unfused_step(device, optimizer, mode, request):
    """On CUDA an fp32 table's SGD step is atomics straight into the table; under deterministic algorithms it is
    the sorted path, one block per row, as row-wise Adagrad always is."""
    backend = "cpu" if device == "cpu" else "cuda"
    skip_unless_runnable(backend, device)
    if optimizer == "sgd deterministic":
        optimizer = "sgd"
        was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)
        request.addfinalizer(lambda: torch.use_deterministic_algorithms(was[0], warn_only=was[1]))
    indices, offsets = (t.to(device) for t in _bags(8, n_bags=40, vocab=30, max_len=12))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 8, generator=g).to(device)
    psw = torch.rand(len(indices), generator=g).to(device) if mode == "sum" else None
    lr, eps = 0.3, 1e-10
    fused_w = weight.clone().requires_grad_()
    update = fnn.EmbeddingUpdate(optimizer, lr=lr, eps=eps)
    ref_w, state = weight.clone(), torch.zeros(30, device=device)
    for step in range(2):
        dy = torch.randn(len(offsets), 8, generator=g).to(device)
        out = fckF.embedding_bag(indices, fused_w, offsets, mode=mode, per_sample_weights=psw, padding_idx=4,
                                 update=update, backend=backend)
        out.backward(dy)
        assert fused_w.grad is None  # the step was taken in the backward instead
        w = ref_w.clone().requires_grad_()
        F.embedding_bag(indices, w, offsets, mode=mode, per_sample_weights=psw, padding_idx=4).backward(dy)
        with torch.no_grad():
            touched = torch.zeros(30, dtype=torch.bool, device=device)
            touched[indices[indices != 4]] = True
            if optimizer == "sgd":
                ref_w -= lr * w.grad
            else:
                state[touched] += w.grad[touched].square().mean(1)
                ref_w[touched] -= lr * w.grad[touched] / (state[touched].sqrt() + eps)[:, None]
        torch.testing.assert_close(fused_w.detach(), ref_w, rtol=1e-5, atol=1e-6)
        if optimizer == "rowwise_adagrad":
            torch.testing.assert_close(update.state, state, rtol=1e-5, atol=1e-7)


def test_fused_update_module_and_refusals():
    skip_unless_runnable("cpu", "cpu")
    bag = fnn.EmbeddingBag(50, 4, mode="sum", update=fnn.EmbeddingUpdate("sgd", lr=1.0))
    before = bag.weight.detach().clone()
    idx, off = torch.tensor([3, 3, 7]), torch.tensor([0, 2])
    bag(idx, off).sum().backward()
    assert bag.weight.grad is None
    torch.testing.assert_close(bag.weight[3], before[3] - 2.0)
    torch.testing.assert_close(bag.weight[7], before[7] - 1.0)
    assert torch.equal(bag.weight[0], before[0])
    with pytest.raises(NotImplementedError, match="fused update"):
        fckF.embedding_bag(idx, bag.weight, off, mode="max", update=fnn.EmbeddingUpdate("sgd", lr=1.0))
    with pytest.raises(ValueError, match="optimizer"):
        fnn.EmbeddingUpdate("adam", lr=1.0)
