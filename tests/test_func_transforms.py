"""torch.func transforms (grad, vjp, jacrev, jvp, vmap, per-sample gradients) and forward-mode AD through fused
models. Our kernels carry no batching or forward-mode rules, so under a transform every op runs its reference
implementation (`_backend.transformed`); these tests hold a fused model (fastcore_kernels.fuse of a torch model) to
its torch twin under each transform, in float64, and check that eager calls afterwards take the kernels again."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, replace_all_batch_norm_modules_, vmap

import fastcore_kernels as fck
from fastcore_kernels import _backend

from conftest import ResNetBlock, skip_unless_runnable


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _index(high, *shape):
    return torch.randint(0, high, shape)


# name -> (torch model, per-sample input); a batch of samples is stacked along a new first dimension.
# "train": batch statistics, no running ones (what replace_all_batch_norm_modules_ leaves).
def _models():
    def seq_bn():
        return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())

    def conv_bn():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    return {
        "linear-bn-relu eval": (lambda: seq_bn().eval(), lambda: _randn(7, 5)),
        "linear-bn-relu train": (lambda: replace_all_batch_norm_modules_(seq_bn()), lambda: _randn(7, 5)),
        "conv-bn-relu eval": (lambda: conv_bn().eval(), lambda: _randn(2, 3, 6, 5)),
        "conv-bn-relu train": (lambda: replace_all_batch_norm_modules_(conv_bn()), lambda: _randn(2, 3, 6, 5)),
        "resnet block eval": (lambda: ResNetBlock(3, 4).eval(), lambda: _randn(2, 3, 5, 5)),
        "resnet block train": (lambda: replace_all_batch_norm_modules_(ResNetBlock(3, 4)),
                               lambda: _randn(2, 3, 5, 5)),
        "embedding": (lambda: nn.Embedding(10, 3, padding_idx=2), lambda: _index(10, 4, 3)),
        "embedding-bag mean": (lambda: nn.EmbeddingBag(10, 3), lambda: _index(10, 4, 3)),
        "embedding-bag max": (lambda: nn.EmbeddingBag(10, 3, mode="max"), lambda: _index(10, 4, 3)),
        "lstm": (lambda: nn.LSTM(3, 4, 2, batch_first=True, bidirectional=True), lambda: _randn(2, 5, 3)),
        "lstm proj": (lambda: nn.LSTM(3, 5, proj_size=2), lambda: _randn(4, 2, 3)),
        "gru": (lambda: nn.GRU(3, 4, 2), lambda: _randn(4, 2, 3)),
        "lstm cell": (lambda: nn.LSTMCell(3, 4), lambda: _randn(2, 3)),
        "gru cell": (lambda: nn.GRUCell(3, 4), lambda: _randn(2, 3)),
        "conv-relu pools": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                                  nn.MaxPool2d(2, 1)), lambda: _randn(3, 6, 5)),
    }


MODELS = _models()


def _pair(name):
    """(torch model, fused copy, per-sample input), float64, with random running statistics (eval mode uses them)."""
    make, sample = MODELS[name]
    torch.manual_seed(0)
    twin = make().double()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    fused = fck.fuse(copy.deepcopy(twin))
    assert any(type(m).__module__.startswith("fastcore_kernels") for m in fused.modules()), name
    return twin, fused, sample()


def _flat(out):
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return torch.cat([_flat(o) for o in out])


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _tangents(params):
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, dtype=v.dtype, generator=g) for k, v in params.items()}


def _assert_close(got, want):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-10, msg=k)
    else:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _loss(model):
    w = None

    def f(params, x):
        nonlocal w
        out = _flat(functional_call(model, params, (x,)))
        if w is None:
            w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)  # a loss whose gradient differs per output
        return (out * w).sum()

    return f


@pytest.mark.parametrize("name", list(MODELS))
def test_grad(name):
    twin, fused, x = _pair(name)
    params = _params(twin)
    want = grad(_loss(twin))(params, x)  # torch's own ops under the transform
    eager = dict(zip(params, torch.autograd.grad(_loss(fused)(dict(fused.named_parameters()), x),
                                                 list(fused.parameters()))))
    _assert_close(grad(_loss(fused))(_params(fused), x), want)
    _assert_close(eager, want)  # the kernels, outside the transform


@pytest.mark.parametrize("name", list(MODELS))
def test_jvp(name):
    """The forward-mode derivative along random tangents of every parameter (and of a float input), against torch's
    jvp of the torch model, or where torch has no forward-mode rule (its CPU LSTM kernel, embedding_bag) against
    jacrev's Jacobian applied to the tangents."""
    twin, fused, x = _pair(name)
    tangents = _tangents(_params(twin))
    floating = x.is_floating_point()
    xt = torch.randn_like(x) if floating else None

    def run(model):  # of (params, x), or of params alone for index inputs
        f = lambda p, xx: _flat(functional_call(model, p, (xx,)))  # noqa: E731
        return f if floating else (lambda p: f(p, x))

    primals = lambda model: (_params(model), x) if floating else (_params(model),)  # noqa: E731
    tangent = (tangents, xt) if floating else (tangents,)
    try:
        want = jvp(run(twin), primals(twin), tangent)[1]
    except (RuntimeError, NotImplementedError):  # "Trying to use forward AD with ... that does not support it"
        jac = jacrev(run(twin), argnums=tuple(range(len(tangent))))(*primals(twin))
        want = sum(jac[0][k].reshape(jac[0][k].shape[0], -1) @ v.reshape(-1) for k, v in tangents.items())
        if floating:
            want = want + jac[1].reshape(jac[1].shape[0], -1) @ xt.reshape(-1)
    out, got = jvp(run(fused), primals(fused), tangent)
    _assert_close(out, _flat(twin(x)))
    _assert_close(got, want)


@pytest.mark.parametrize("name", list(MODELS))
def test_vmap(name):
    """vmap over a batch of samples against a loop of the torch model's calls (torch's own LSTM, GRU and LSTMCell
    have no batching rule)."""
    twin, fused, x = _pair(name)
    xs = torch.stack([x, *(MODELS[name][1]() for _ in range(2))])
    with torch.no_grad():
        want = torch.stack([_flat(twin(xx)) for xx in xs])
        _assert_close(vmap(lambda xx: _flat(fused(xx)))(xs), want)


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("embedding")])
def test_forward_ad(name):
    """torch.autograd.forward_ad without torch.func: a dual input's tangent through the model."""
    twin, fused, x = _pair(name)
    xt = torch.randn_like(x)
    _, want = jvp(lambda xx: _flat(twin(xx)), (x,), (xt,))
    with fwAD.dual_level():
        out = fused(fwAD.make_dual(x, xt))
        got = torch.cat([fwAD.unpack_dual(t).tangent.reshape(-1) for t in _flat_list(out)])
    _assert_close(got, want)


def _flat_list(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat_list(o)]


def test_per_sample_gradients():
    """vmap(grad(...)) over samples, as differential-privacy training computes them, through a fused text model
    (embedding, LSTM, linear head) against one torch backward per sample."""

    class TextModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 4)
            self.rnn = nn.LSTM(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, tokens):
            return self.head(self.rnn(self.emb(tokens))[0][:, -1])

    torch.manual_seed(0)
    twin = TextModel().double()
    fused = fck.fuse(copy.deepcopy(twin))
    tokens, labels = _index(20, 6, 7), _index(3, 6)

    def loss(model):
        def f(params, t, y):
            logits = functional_call(model, params, (t[None],))
            return nn.functional.cross_entropy(logits, y[None])
        return f

    got = vmap(grad(loss(fused)), in_dims=(None, 0, 0))(_params(fused), tokens, labels)
    for i in range(len(tokens)):
        twin.zero_grad()
        loss(twin)(dict(twin.named_parameters()), tokens[i], labels[i]).backward()
        _assert_close({k: v[i] for k, v in got.items()}, {k: p.grad for k, p in twin.named_parameters()})


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_an_explicit_backend_gives_way(backend):
    """A backend chosen by the user (our kernels) still gives way to the reference ops under a transform."""
    skip_unless_runnable(backend, "cpu")
    twin, fused, x = _pair("gru")
    params = _params(twin)
    with fck.use_backend(backend):
        got = grad(_loss(fused))(_params(fused), x)
    _assert_close(got, grad(_loss(twin))(params, x))


def test_eager_calls_take_the_kernels_again():
    skip_unless_runnable("cpu", "cpu")
    twin, fused, x = _pair("gru")
    grad(_loss(fused))(_params(fused), x)
    with fwAD.dual_level():
        fused(fwAD.make_dual(x, torch.randn_like(x)))
    assert not _backend.transformed()
    out = fused(x.requires_grad_())[0]
    assert type(out.grad_fn).__name__ == "CppFunction"  # the C++ whole-stack node, not the reference's ops


def test_training_batch_norm_with_running_statistics():
    """As torch's: a transform cannot update running statistics shared by its calls. vmap says so with torch's
    message, grad refuses the in-place update of a captured buffer."""
    for make in (lambda: nn.BatchNorm2d(3), lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())):
        fused = fck.fuse(make())
        xs = torch.randn(2, 4, 3, 5, 5)
        with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated in place"):
            vmap(fused)(xs)
        with pytest.raises(RuntimeError, match="in-place operation"):
            grad(lambda p: functional_call(fused, p, (xs[0],)).sum())(_params(fused))


@pytest.mark.parametrize("make", [lambda: fck.nn.EmbeddingBag(10, 3), lambda: fck.nn.Embedding(10, 3)])
def test_vmap_checks_every_sample(make):
    """An index out of range in any one vmapped sample raises, naming it; never a read outside the table."""
    xs = torch.randint(0, 10, (3, 4, 2))
    xs[2, 1, 0] = 10
    with pytest.raises(IndexError, match="takes value 10 which is not in the valid range"):
        vmap(make())(xs)


@pytest.mark.parametrize("name", ["linear-bn-relu train", "conv-bn-relu eval", "lstm", "gru", "lstm cell"])
def test_hessian(name):
    """torch.func.hessian (jacfwd over jacrev) of a loss in the input, against reverse-over-reverse of the torch
    model."""
    twin, fused, x = _pair(name)
    want = jacrev(jacrev(lambda xx: _loss(twin)(_params(twin), xx)))(x)
    torch.testing.assert_close(torch.func.hessian(lambda xx: _loss(fused)(_params(fused), xx))(x), want,
                               rtol=1e-9, atol=1e-10)
