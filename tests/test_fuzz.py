"""Seeded random configurations of the ops against torch: the option combinations the other tests do not enumerate
one by one (bag modes x padding x per-sample weights x index dtypes x offset forms; ranks x layouts x affine x
momentum x running statistics; layers x directions x projections x given states; ...), forward and backward.

Each case draws its configuration and its inputs from its seed alone, so a failure names a case that reproduces:
`pytest tests/test_fuzz.py -k "embedding_bag and cpu"` and the seed in the message. float64 where the backend takes
it (the math), fp32 otherwise. A configuration torch refuses must be refused too (any exception); one torch accepts
must give its values.
"""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore_kernels as fck
import fastcore_kernels.functional as fckF
from fastcore_kernels import nn as fnn
from fastcore_kernels.ops.conv_bn_relu import FoldCache, conv_bn_relu
from fastcore_kernels.optim import FusedAdam, FusedAdamW

from conftest import skip_unless_runnable

# Cases per test and backend: the interpreter runs Triton kernels ~100x slower than the C++ ones.
CASES = {"reference": 300, "cpu": 300, "triton": 30}
BACKENDS = tuple(CASES)


def _seeds(backend, salt):
    return [salt * 1000 + i for i in range(CASES[backend])]


def _randn(g, *shape, dtype=torch.float64, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64).mul_(scale).add_(shift).to(dtype)


def _close(ours, theirs, what, case, atol, rtol=None):
    assert (ours is None) == (theirs is None), f"{case}: {what}: one side has no value"
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{case}: {what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours.double(), theirs.double(), atol=atol, rtol=atol if rtol is None else rtol,
                               equal_nan=True, msg=lambda m: f"{case}: {what}: {m}")


def _poison_some(r, t):
    """t with, in some cases, a NaN, +inf or -inf at a random place: they must travel as they do through torch."""
    if t.numel() and r.random() < 0.15:
        t.view(-1)[r.randrange(t.numel())] = r.choice([float("nan"), float("inf"), -float("inf")])
    return t


def _penalty_grads(loss, leaves):
    """A gradient penalty's derivatives: g = d loss / d leaves with a graph, then d |g|^2 / d leaves (zeros where
    |g|^2 does not depend on a leaf, or on none: a constant gradient)."""
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum((f * f).sum() for f in first)
    again = torch.autograd.grad(penalty, leaves, allow_unused=True) if penalty.requires_grad else [None] * len(leaves)
    return [f.detach() for f in first] + [torch.zeros_like(t) if a is None else a for a, t in zip(again, leaves)]


def _both(run_theirs, run_ours, case):
    """Both sides' results, or both sides' refusal."""
    try:
        theirs = run_theirs()
    except Exception as e:  # torch refuses this configuration: so must we
        try:
            run_ours()
        except Exception:
            return None, None, e
        pytest.fail(f"{case}: torch refuses this ({type(e).__name__}: {e}), ours ran")
    return theirs, run_ours(), None


# ---- embedding bags and lookups ----

def _bag_case(seed):
    r = random.Random(seed)
    V, D = r.choice([1, 7, 33, 300]), r.choice([1, 4, 17, 64])
    mode = r.choice(["sum", "mean", "max"])
    itype = r.choice([torch.int32, torch.int64])
    two_d = r.random() < 0.3
    pad = r.choice([None, None, r.randrange(-V, V)])
    psw = mode == "sum" and r.random() < 0.4
    last = not two_d and r.random() < 0.3
    g = torch.Generator().manual_seed(seed)
    if two_d:
        inp = torch.randint(0, V, (r.randrange(1, 9), r.randrange(1, 6)), generator=g, dtype=itype)
        offsets = None
    else:
        sizes = [r.choice([0, 1, 2, 5, 30]) for _ in range(r.randrange(0, 10))]
        inp = torch.randint(0, V, (sum(sizes),), generator=g, dtype=itype)
        starts = [sum(sizes[:i]) for i in range(len(sizes))] + ([sum(sizes)] if last else [])
        offsets = torch.tensor(starts, dtype=itype)
    if pad is not None and inp.numel() and r.random() < 0.5:
        inp.view(-1)[0] = pad % V
    kw = dict(mode=mode, include_last_offset=last, padding_idx=pad)
    case = dict(seed=seed, V=V, D=D, shape=tuple(inp.shape), itype=itype, psw=psw, **kw)
    return case, inp, offsets, kw, _poison_some(r, _randn(g, V, D)), _randn(g, *inp.shape) if psw else None, g


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_bag_fuzz(backend):
    skip_unless_runnable(backend, "cpu")
    for seed in _seeds(backend, 1):
        case, inp, offsets, kw, weight, psw, g = _bag_case(seed)

        def run(fn):
            w = weight.clone().requires_grad_()
            p = None if psw is None else psw.clone().requires_grad_()
            out = fn(inp, w, offsets, per_sample_weights=p, **kw)
            out.backward(_randn(torch.Generator().manual_seed(seed), *out.shape))
            return out.detach(), w.grad, None if p is None else p.grad

        theirs, ours, _ = _both(lambda: run(F.embedding_bag), lambda: run(
            lambda *a, **k: fckF.embedding_bag(*a, **k, backend=backend)), case)
        for what, a, b in zip(("output", "grad weight", "grad per_sample_weights"), ours or (), theirs or ()):
            _close(a, b, what, case, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_fuzz(backend):
    """Lookups and bags with the options the lookup path handles apart: sparse, scale_grad_by_freq, max_norm, half
    weights. sparse with scale_grad_by_freq, which torch refuses, is left out (we support it: test_embedding_bag)."""
    skip_unless_runnable(backend, "cpu")
    for seed in _seeds(backend, 2):
        r = random.Random(seed)
        V, D = r.choice([1, 5, 40, 300]), r.choice([1, 4, 17, 64])
        dtype = r.choice([torch.float64, torch.float32, torch.float16, torch.bfloat16])
        sparse = r.random() < 0.3
        freq = not sparse and r.random() < 0.3
        pad = r.choice([None, r.randrange(-V, V)])
        bag = r.random() < 0.5
        g = torch.Generator().manual_seed(seed)
        shape = tuple(r.choice([1, 3, 8]) for _ in range(2 if bag else r.randrange(1, 4)))
        inp = torch.randint(0, V, shape, generator=g)
        if pad is not None:
            inp.view(-1)[-1] = pad % V
        kw = dict(sparse=sparse, scale_grad_by_freq=freq, max_norm=r.choice([None, None, 1.0]), padding_idx=pad)
        if bag:
            kw["mode"] = r.choice(["sum", "mean"] + ([] if sparse or freq else ["max"]))
        case = dict(seed=seed, V=V, D=D, dtype=dtype, bag=bag, shape=shape, **kw)
        weight = _poison_some(r, _randn(g, V, D, dtype=dtype, scale=2.0))
        grad = _randn(g, *shape[: 1 if bag else None], D, dtype=dtype)

        def run(fn):
            w = weight.clone().requires_grad_()
            out = fn(inp, w, **kw)
            out.backward(grad)
            gw = w.grad.to_dense() if w.grad.is_sparse else w.grad
            return out.detach(), gw, w.detach(), w.grad.is_sparse

        torch_fn = F.embedding_bag if bag else F.embedding
        ours_fn = fckF.embedding_bag if bag else fckF.embedding
        # scale_grad_by_freq by its definition (each row's gradient over its index's count in the batch): torch
        # 2.4's CPU embedding_bag miscounts.
        theirs = run(lambda *a, **k: torch_fn(*a, **dict(k, scale_grad_by_freq=False)))
        if freq:
            counts = torch.bincount(inp.reshape(-1), minlength=V).clamp(min=1)
            theirs = (theirs[0], (theirs[1].double() / counts[:, None]).to(dtype), *theirs[2:])
        ours = run(lambda *a, **k: ours_fn(*a, **k, backend=backend))
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        for what, a, b in zip(("output", "grad weight", "renormed weight"), ours[:3], theirs[:3]):
            _close(a, b, what, case, tol * 4, tol)
        assert ours[3] == theirs[3], f"{case}: the gradient's layout differs"


def test_fused_update_fuzz():
    """embedding_bag's fused SGD / row-wise Adagrad step against the unfused one (torch's gradient, then the step on
    the touched rows), over bag forms, modes, per-sample weights, padding and a few steps."""
    skip_unless_runnable("cpu", "cpu")
    for seed in range(9000, 9150):
        case, inp, offsets, kw, weight, psw, g = _bag_case(seed)
        r = random.Random(-seed)
        if kw["mode"] == "max" or not weight.isfinite().all():
            continue
        optimizer, lr, eps = r.choice(["sgd", "rowwise_adagrad"]), r.choice([0.01, 0.5]), r.choice([1e-10, 1e-3])
        case.update(optimizer=optimizer, lr=lr, eps=eps)
        update = fnn.EmbeddingUpdate(optimizer, lr=lr, eps=eps)
        fused, ref = weight.clone().requires_grad_(), weight.clone()
        state = torch.zeros(weight.shape[0], dtype=torch.float32)
        pad = kw["padding_idx"]
        for step in range(r.randrange(1, 4)):
            out = fckF.embedding_bag(inp, fused, offsets, per_sample_weights=psw, update=update, backend="cpu", **kw)
            dy = _randn(g, *out.shape)
            out.backward(dy)
            w = ref.clone().requires_grad_()
            F.embedding_bag(inp, w, offsets, per_sample_weights=psw, **kw).backward(dy)
            touched = torch.zeros(weight.shape[0], dtype=torch.bool)
            used = inp.reshape(-1)[: int(offsets[-1]) if kw["include_last_offset"] and offsets.numel() else None]
            touched[used[used != pad % weight.shape[0]] if pad is not None else used] = True
            with torch.no_grad():
                if optimizer == "sgd":
                    ref -= lr * w.grad
                else:
                    state[touched] += w.grad[touched].square().mean(1).float()
                    ref[touched] -= lr * w.grad[touched] / (state[touched].double().sqrt() + eps)[:, None]
            _close(fused.detach(), ref, f"weight after step {step}", case, 1e-6)
            if optimizer == "rowwise_adagrad":
                _close(update.state, state, f"state after step {step}", case, 1e-6)


# ---- batch norm, its fused forms, conv-BN-ReLU ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_fuzz(backend):
    skip_unless_runnable(backend, "cpu")
    for seed in _seeds(backend, 3):
        r = random.Random(seed)
        rank = r.choice([2, 3, 4, 4, 5])
        shape = [r.choice([1, 2, 3, 8, 33]), r.choice([1, 3, 8, 17, 64])] + [r.choice([1, 2, 5, 7])
                                                                              for _ in range(rank - 2)]
        C = shape[1]
        training, affine = r.random() < 0.7, r.random() < 0.7
        stats = not training or r.random() < 0.8
        momentum = r.choice([0.1, 0.3, None])
        kind = r.choice(["bn", "relu", "add"])
        channels_last = rank == 4 and r.random() < 0.3
        second = r.random() < 0.3  # a gradient penalty's second derivatives (finite inputs only)
        case = dict(seed=seed, shape=shape, kind=kind, training=training, affine=affine, stats=stats,
                    momentum=momentum, channels_last=channels_last)
        g = torch.Generator().manual_seed(seed)
        x = _poison_some(r, _randn(g, *shape, scale=r.choice([1, 5]), shift=r.choice([0, 3, 100])))
        second = second and bool(x.isfinite().all())
        case["second_order"] = second
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        res = _randn(g, *shape) if kind == "add" else None
        w, b = (_randn(g, C), _randn(g, C)) if affine else (None, None)
        rm, rv = (_randn(g, C), torch.rand(C, generator=g, dtype=torch.float64) + 0.5) if stats else (None, None)
        dy = _randn(g, *shape)

        def run(fn):
            leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, res, w, b)]
            rm_, rv_ = (rm.clone(), rv.clone()) if stats else (None, None)
            out = fn(leaves[0], leaves[1], rm_, rv_, leaves[2], leaves[3])
            if not second:
                out.backward(dy)
                return [out.detach(), rm_, rv_] + [None if t is None else t.grad for t in leaves]
            return [out.detach(), rm_, rv_] + _penalty_grads((out * dy).sum(), [t for t in leaves if t is not None])

        def theirs_fn(x_, res_, rm_, rv_, w_, b_):
            y = F.batch_norm(x_, rm_, rv_, w_, b_, training, momentum, 1e-5)
            y = y + res_ if kind == "add" else y
            return y if kind == "bn" else F.relu(y)

        def ours_fn(x_, res_, rm_, rv_, w_, b_):
            args = (rm_, rv_, w_, b_, training, momentum, 1e-5)
            if kind == "bn":
                return fckF.batch_norm(x_, *args, backend=backend)
            if kind == "relu":
                return fckF.batch_norm_relu(x_, *args, backend=backend)
            return fckF.batch_norm_add_relu(x_, res_, *args, backend=backend)

        theirs, ours, _ = _both(lambda: run(theirs_fn), lambda: run(ours_fn), case)
        names = ("output", "running_mean", "running_var", "grad input", "grad residual", "grad weight", "grad bias")
        if second:
            n = len(theirs or ()) - 3
            names = names[:3] + tuple(f"gradient {i}" for i in range(n // 2)) + tuple(
                f"penalty's gradient {i}" for i in range(n // 2))
        for what, a, c in zip(names, ours or (), theirs or ()):
            if what == "running_mean" and a is not None:
                # A batch holding inf: torch's mean is inf (a sum), the kernels' may be NaN (their merges of shifted
                # partial statistics compute inf - inf); the variance and the outputs are NaN on both sides.
                a, c = (torch.where(t.isinf(), float("nan"), t) for t in (a, c))
            _close(a, c, what, case, 1e-9)


def test_conv_bn_relu_fuzz():
    """Training and eval (folded, with and without a fold cache, with and without gradients), groups, strides,
    dilations, "same" padding, channels-last, fp32 and float64: against conv2d -> batch_norm -> relu."""
    for seed in range(4000, 4150):
        r = random.Random(seed)
        groups = r.choice([1, 1, 2, 4])
        cin, cout = groups * r.choice([1, 3, 8]), groups * r.choice([1, 4, 9])
        k, stride, dil = r.choice([1, 3, 3, 5]), r.choice([1, 1, 2]), r.choice([1, 1, 2])
        pad = r.choice([0, 1, 2, "same"] if stride == 1 else [0, 1, 2])
        training, with_grad, cached = r.random() < 0.4, r.random() < 0.5, r.random() < 0.5
        dtype = r.choice([torch.float32, torch.float64])
        case = dict(seed=seed, groups=groups, cin=cin, cout=cout, k=k, stride=stride, pad=pad, dil=dil,
                    training=training, with_grad=with_grad, cached=cached, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        x = _poison_some(r, _randn(g, r.choice([1, 2, 5]), cin, r.choice([5, 8, 13]), r.choice([5, 9, 16]),
                                   dtype=dtype))
        if r.random() < 0.3:
            x = x.to(memory_format=torch.channels_last)
        w = _randn(g, cout, cin // groups, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5)
        b = _randn(g, cout, dtype=dtype) if r.random() < 0.5 else None
        bn_w, bn_b = (_randn(g, cout, dtype=dtype), _randn(g, cout, dtype=dtype)) if r.random() < 0.7 else (None, None)
        rm, rv = _randn(g, cout, dtype=dtype, scale=0.1), torch.rand(cout, generator=g).to(dtype) + 0.5
        cache = FoldCache() if cached else None

        def run(fn):
            xs, ws = x.clone().requires_grad_(with_grad), w.clone().requires_grad_(with_grad)
            rm_, rv_ = rm.clone(), rv.clone()
            with torch.set_grad_enabled(with_grad or training):
                out = fn(xs, ws, rm_, rv_)
            res = [out.detach(), rm_, rv_]
            if with_grad:
                out.backward(_randn(torch.Generator().manual_seed(seed), *out.shape, dtype=dtype))
                res += [xs.grad, ws.grad]
            return res

        def ours_fn(xs, ws, rm_, rv_):
            return conv_bn_relu(xs, ws, b, rm_, rv_, bn_w, bn_b, training, 0.1, 1e-5, stride, pad, dil, groups,
                                fold_cache=cache)

        theirs, ours, refused = _both(lambda: run(lambda xs, ws, rm_, rv_: F.relu(F.batch_norm(
            F.conv2d(xs, ws, b, stride, pad, dil, groups), rm_, rv_, bn_w, bn_b, training, 0.1, 1e-5))),
            lambda: run(ours_fn), case)
        for call in range(2 if cached and not training and not refused else 1):
            if call:  # the second call reads the fold cache
                ours = run(ours_fn)
            tol = 1e-4 if dtype == torch.float32 else 1e-9
            for what, a, c in zip(("output", "running_mean", "running_var", "grad input", "grad weight"), ours or (),
                                  theirs or ()):
                _close(a, c, what, case, tol * max(1.0, c.abs().max().item()), tol)


# ---- pooling ----

class _AddAtIndices(torch.autograd.Function):
    """torch's max_pool2d output, whose gradient is added at torch's indices (its contract), without torch's own
    backward: that writes outside the input for windows that hold no input (their index lies past the plane),
    which get no gradient here. The backward is linear ops, so it differentiates again."""

    @staticmethod
    def forward(ctx, t, out, idx):
        ctx.save_for_backward(idx)
        ctx.shape = t.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        plane = ctx.shape[-1] * ctx.shape[-2]
        flat = grad.new_zeros(grad.shape[:-2] + (plane + 1,))
        flat = flat.scatter_add(-1, idx.flatten(-2).clamp(max=plane), grad.flatten(-2))
        return flat[..., :plane].reshape(ctx.shape), None, None


def _max_pool_truth(t, args):
    out, idx = F.max_pool2d(t.detach(), *args, return_indices=True)
    return _AddAtIndices.apply(t, out, idx), idx


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("op", ("max", "avg"))
def test_pool_fuzz(op, backend):
    """max_pool2d and avg_pool2d: kernels, strides, padding (up to torch's limit and past it), dilation (max),
    ceil_mode, count_include_pad and divisor_override (avg), unbatched input, planes from 1x1 up, NaN/inf; outputs,
    max's indices, gradients, and in some cases a gradient penalty's second derivatives, in float64."""
    skip_unless_runnable(backend, "cpu")
    compared = 0
    for seed in _seeds(backend, 9 if op == "max" else 10):
        r = random.Random(seed)
        shape = [r.choice([1, 2, 3]), r.choice([1, 4, 9])][r.random() < 0.2:] + [r.randint(1, 24), r.randint(1, 24)]
        k = (r.randint(1, 6), r.randint(1, 6))
        s = None if r.random() < 0.2 else (r.randint(1, 4), r.randint(1, 4))
        p = (r.randint(0, k[0] // 2 + (r.random() < 0.1)), r.randint(0, k[1] // 2))
        ceil = r.random() < 0.5
        if op == "max":
            d = (r.randint(1, 3), r.randint(1, 3))
            args = (k, s, p, d, ceil)
            theirs_fn, ours_fn = (lambda t: _max_pool_truth(t, args),
                                  lambda t: fckF.max_pool2d(t, *args, return_indices=True, backend=backend))
        else:
            args = (k, s, p, ceil, r.random() < 0.5, r.choice([None, None, None, 3, -2]))
            theirs_fn, ours_fn = (lambda t: (F.avg_pool2d(t, *args),),
                                  lambda t: (fckF.avg_pool2d(t, *args, backend=backend),))
        second = r.random() < 0.3
        case = dict(seed=seed, op=op, shape=shape, args=args, second_order=second)
        g = torch.Generator().manual_seed(seed)
        x = _poison_some(r, _randn(g, *shape))
        second = second and bool(x.isfinite().all())

        def run(fn):
            leaf = x.clone().requires_grad_()
            out = fn(leaf)
            dy = _randn(torch.Generator().manual_seed(seed), *out[0].shape)
            if second:
                grads = _penalty_grads((out[0] * dy).sum(), [leaf])
            else:
                grads = list(torch.autograd.grad(out[0], leaf, dy))
            return [o.detach() for o in out] + grads

        theirs, ours, _ = _both(lambda: run(theirs_fn), lambda: run(ours_fn), case)
        if backend == "reference" and theirs and op == "max" and (theirs[1] >= shape[-1] * shape[-2]).any():
            theirs, ours = theirs[:2], ours[:2]  # the reference is torch's op, whose backward misplaces these
        names = ("output", "indices", "grad input", "penalty's gradient") if op == "max" else (
            "output", "grad input", "penalty's gradient")
        for what, a, c in zip(names, ours or (), theirs or ()):
            if what == "indices" or (op == "max" and what == "output"):
                assert torch.equal(a, c) or (a.isnan() == c.isnan()).all() and torch.equal(
                    a.nan_to_num(), c.nan_to_num()), f"{case}: {what}"
            else:
                _close(a, c, what, case, 1e-9)
        compared += theirs is not None
    assert compared >= len(_seeds(backend, 0)) // 2, f"only {compared} configurations torch accepts"


# ---- recurrent modules ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_fuzz(backend):
    """LSTM (with and without proj_size) and GRU modules: layers, directions, batch_first, unbatched inputs,
    PackedSequence inputs (random lengths, sorted or not), biases, given or zero initial states, dropout between
    layers (the same seed draws torch's masks); outputs, final states and every gradient, in float64; in some cases
    a gradient penalty's second derivatives (create_graph=True) where the path supports them (padded input, no
    proj_size, not Triton), and its clear refusal where it does not."""
    skip_unless_runnable(backend, "cpu")
    for seed in _seeds(backend, 5):
        r = random.Random(seed)
        kind = r.choice(["LSTM", "GRU"])
        I, H = r.choice([1, 3, 16]), r.choice([1, 5, 16, 33])
        kw = dict(num_layers=r.choice([1, 2, 3]), bidirectional=r.random() < 0.4, batch_first=r.random() < 0.5,
                  bias=r.random() < 0.8, dtype=torch.float64)
        if kw["num_layers"] > 1 and r.random() < 0.3:
            kw["dropout"] = r.choice([0.3, 0.5])
        if kind == "LSTM" and H > 1 and r.random() < 0.25:
            kw["proj_size"] = r.randrange(1, H)
        B, T, batched, give = r.choice([1, 2, 7]), r.choice([1, 2, 9]), r.random() < 0.85, r.random() < 0.5
        packed = batched and r.random() < 0.3
        lengths = torch.tensor([r.randint(1, T) for _ in range(B)])
        lengths[r.randrange(B)] = T
        enforce_sorted = r.random() < 0.3
        if enforce_sorted:
            lengths = lengths.sort(descending=True).values
        second = r.random() < 0.3
        case = dict(seed=seed, kind=kind, I=I, H=H, B=B, T=T, batched=batched, given_state=give, **kw,
                    packed=lengths.tolist() if packed else False, second_order=second)
        torch.manual_seed(seed)  # the module's initial weights
        theirs_m = getattr(nn, kind)(I, H, **kw)
        ours_m = getattr(fnn, kind)(I, H, **kw)
        ours_m.load_state_dict(theirs_m.state_dict())
        g = torch.Generator().manual_seed(seed)
        L = kw["num_layers"] * (2 if kw["bidirectional"] else 1)
        x = _poison_some(r, _randn(g, *((B, T, I) if kw["batch_first"] else (T, B, I)) if batched else (T, I)))
        batch = (B,) if batched else ()
        h0 = _randn(g, L, *batch, kw.get("proj_size") or H) if give else None
        c0 = _randn(g, L, *batch, H) if give and kind == "LSTM" else None

        def run(m):
            torch.manual_seed(seed)  # dropout's draws
            xs = x.clone().requires_grad_()
            states = [t.clone().requires_grad_() for t in (h0, c0) if t is not None]
            hx = None if not give else (tuple(states) if kind == "LSTM" else states[0])
            inp = xs
            if packed:
                inp = nn.utils.rnn.pack_padded_sequence(xs, lengths, kw["batch_first"], enforce_sorted)
            out, st = m(inp, hx)
            out = out.data if packed else out
            finals = list(st) if kind == "LSTM" else [st]
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()
            loss = loss + sum((s * s).sum() for s in finals)
            leaves = [xs, *states, *m.parameters()]
            if not second:
                loss.backward()
                return [out.detach()] + [s.detach() for s in finals] + [t.grad for t in leaves]
            return [out.detach()] + [s.detach() for s in finals] + _penalty_grads(loss, leaves)

        theirs = run(theirs_m)
        with fck.use_backend(backend):
            if second and backend != "reference" and (backend == "triton" or packed or kw.get("proj_size")):
                with pytest.raises(NotImplementedError, match="not differentiable"):
                    run(ours_m)
                continue
            ours = run(ours_m)
        assert len(ours) == len(theirs)
        for i, (a, c) in enumerate(zip(ours, theirs)):
            _close(a, c, f"result {i} (output, final states, grads of input, states, params[, their "
                   "penalty's])", case, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_fuzz(backend):
    skip_unless_runnable(backend, "cpu")
    for seed in _seeds(backend, 6):
        r = random.Random(seed)
        kind = r.choice(["LSTMCell", "GRUCell"])
        I, H, bias = r.choice([1, 4, 17]), r.choice([1, 3, 32, 65]), r.random() < 0.7
        batched, give, B = r.random() < 0.8, r.random() < 0.6, r.choice([1, 2, 9])
        second = r.random() < 0.3  # a gradient penalty's second derivatives too
        case = dict(seed=seed, kind=kind, I=I, H=H, bias=bias, batched=batched, given_state=give, B=B,
                    second_order=second)
        torch.manual_seed(seed)
        theirs_m = getattr(nn, kind)(I, H, bias=bias, dtype=torch.float64)
        ours_m = getattr(fnn, kind)(I, H, bias=bias, dtype=torch.float64)
        ours_m.load_state_dict(theirs_m.state_dict())
        g = torch.Generator().manual_seed(seed)
        x = _poison_some(r, _randn(g, *((B, I) if batched else (I,))))
        states = [_randn(g, *((B, H) if batched else (H,))) for _ in range(2 if kind == "LSTMCell" else 1)]

        def run(m):
            xs = x.clone().requires_grad_()
            hs = [s.clone().requires_grad_() for s in states] if give else []
            hx = None if not give else (tuple(hs) if kind == "LSTMCell" else hs[0])
            out = m(xs, hx)
            outs = list(out) if isinstance(out, tuple) else [out]
            loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
            leaves = [xs, *hs, *m.parameters()]
            if not second:
                loss.backward()
                return [o.detach() for o in outs] + [t.grad for t in leaves]
            return [o.detach() for o in outs] + _penalty_grads(loss, leaves)

        theirs = run(theirs_m)
        with fck.use_backend(backend):
            if second and backend == "triton":
                with pytest.raises(NotImplementedError, match="not differentiable"):
                    run(ours_m)
                continue
            ours = run(ours_m)
        for i, (a, c) in enumerate(zip(ours, theirs)):
            _close(a, c, f"result {i}", case, 1e-10)


# ---- the optimizer ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_fuzz(backend):
    """Adam and AdamW: betas, eps, weight decay, amsgrad, maximize, tensor lr, two param groups, non-contiguous
    params, params that skip steps (no grad): params and every state entry against torch's optimizers."""
    skip_unless_runnable(backend, "cpu")
    for seed in _seeds(backend, 7):
        r = random.Random(seed)
        decoupled = r.random() < 0.5
        kw = dict(lr=r.choice([1e-3, 0.1]), betas=(r.choice([0.9, 0.5, 0.0]), r.choice([0.999, 0.9])),
                  eps=r.choice([1e-8, 1e-3]), weight_decay=r.choice([0.0, 0.1]), amsgrad=r.random() < 0.4,
                  maximize=r.random() < 0.3)
        tensor_lr = r.random() < 0.2
        shapes = [tuple(r.choice([1, 3, 17, 64]) for _ in range(r.randrange(0, 3))) for _ in range(r.randrange(1, 5))]
        strided, two_groups, steps = r.random() < 0.3, r.random() < 0.4, r.randrange(1, 6)
        case = dict(seed=seed, decoupled=decoupled, tensor_lr=tensor_lr, shapes=shapes, strided=strided,
                    two_groups=two_groups, steps=steps, **kw)
        g = torch.Generator().manual_seed(seed)
        start = [_randn(g, *s) for s in shapes]
        grads = [[_poison_some(r, _randn(g, *s)) for s in shapes] for _ in range(steps)]
        skip = [[r.random() < 0.15 for _ in shapes] for _ in range(steps)]

        def run(cls, **extra):
            params = [nn.Parameter(p.t().clone().t() if strided and p.dim() == 2 else p.clone()) for p in start]
            half = len(params) // 2 + 1
            groups = ([{"params": params[:half]}, {"params": params[half:], "lr": 0.05}]
                      if two_groups and len(params) > 1 else [{"params": params}])
            opt_kw = dict(kw, lr=torch.tensor(kw["lr"], dtype=torch.float64) if tensor_lr else kw["lr"])
            opt = cls(groups, **opt_kw, **extra)
            for s in range(steps):
                for p, grad, skipped in zip(params, grads[s], skip[s]):
                    p.grad = None if skipped else grad.clone()
                opt.step()
            return [p.detach() for p in params], opt.state_dict()["state"]

        theirs, theirs_state = run(torch.optim.AdamW if decoupled else torch.optim.Adam)
        ours, ours_state = run(FusedAdamW if decoupled else FusedAdam, backend=backend)
        for i, (a, c) in enumerate(zip(ours, theirs)):
            _close(a, c, f"param {i}", case, 1e-12)
        assert set(ours_state) == set(theirs_state), case
        for pid, entries in theirs_state.items():
            for key, value in entries.items():
                _close(ours_state[pid].get(key), value, f"state {pid} {key}", case, 1e-12)


# ---- fuse(model) ----

class _Block(nn.Module):
    """A torchvision-style BasicBlock: ReLU as a module or a function, the residual added on either side."""

    def __init__(self, c, down, relu_module, inplace, residual_first):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=inplace) if relu_module else None
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if down else None
        self.residual_first = residual_first

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn1(self.conv1(x))
        out = self.relu(out) if self.relu is not None else F.relu(out)
        out = self.bn2(self.conv2(out))
        out = identity + out if self.residual_first else out + identity
        return self.relu(out) if self.relu is not None else torch.relu(out)


def _random_model(r):
    c = r.choice([3, 8])
    layers = [nn.Conv2d(3, c, 3, padding=1, bias=r.random() < 0.5)]
    for _ in range(r.randrange(1, 5)):
        k = r.random()
        if k < 0.25:
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=r.random() < 0.5)]
        elif k < 0.45:
            layers += [nn.Conv2d(c, c, 3, padding=1, bias=r.random() < 0.5), nn.BatchNorm2d(c), nn.ReLU()]
        elif k < 0.6:
            layers += [_Block(c, r.random() < 0.5, r.random() < 0.5, r.random() < 0.5, r.random() < 0.5)]
        elif k < 0.7:
            layers += [nn.BatchNorm2d(c)]
        elif k < 0.8:
            layers += [nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())]
        elif k < 0.9:
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
        else:
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def test_fuse_fuzz():
    """Random stacks of the patterns fuse() rewrites (and some it must leave): the fused model gives the original's
    outputs, input gradients, parameter gradients and running statistics in train, eval and train mode again, and
    the state_dicts match key for key and load into the original architecture."""
    for seed in range(8000, 8080):
        r = random.Random(seed)
        torch.manual_seed(seed)
        model = _random_model(r)
        fused = fck.fuse(copy.deepcopy(model))
        x = _randn(torch.Generator().manual_seed(seed), 4, 3, 7, 7)
        second = r.random() < 0.3  # a gradient penalty's second derivatives instead of a plain backward
        for mode in ("train", "eval", "train"):
            results = []
            for m in (model, fused):
                getattr(m, mode)()
                xs = x.clone().requires_grad_()
                y = m(xs)
                loss = (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum()
                leaves = [xs, *m.parameters()]
                if second:
                    results.append([y.detach()] + _penalty_grads(loss, leaves))
                    continue
                loss.backward()
                results.append([y.detach(), xs.grad] + [p.grad.clone() for p in m.parameters()])
                m.zero_grad(set_to_none=True)
            assert len(results[0]) == len(results[1]), seed
            # second derivatives: one scale for all, as a bias before a batch norm has a zero gradient whose rounding
            # noise is relative to the model's other gradients
            scale = max(1.0, max(c.abs().max().item() for c in results[0])) if second else 1.0
            for i, (a, c) in enumerate(zip(*results)):
                _close(a, c, f"{mode}: result {i} (output, grad input, grad params[, their penalty's])",
                       dict(seed=seed, second_order=second), 1e-9 * scale, 1e-7 if second else None)
        ours_sd, theirs_sd = fused.state_dict(), model.state_dict()
        assert list(ours_sd) == list(theirs_sd), seed
        for key in theirs_sd:
            _close(ours_sd[key], theirs_sd[key], key, dict(seed=seed), 1e-12)
        copy.deepcopy(model).load_state_dict(ours_sd)
