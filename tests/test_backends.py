"""Backend selection, the extension loader and its fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastcore_kernels as fck
from fastcore_kernels._backend import resolve


def test_backends_reports_every_backend_with_a_reason():
    report = fck.backends()
    assert set(report) == {"reference", "cpu", "cuda", "triton"}
    assert report["reference"].available
    for status in report.values():
        assert status.reason
    if not torch.cuda.is_available():
        assert not report["cuda"].available


def test_set_and_use_backend_nest():
    cpu = torch.device("cpu")
    auto = resolve(cpu)
    assert auto in ("cpu", "reference")
    fck.set_backend("reference")
    assert resolve(cpu) == "reference"
    with fck.use_backend("auto"):
        assert resolve(cpu) == auto
        with fck.use_backend("reference"):
            assert resolve(cpu) == "reference"
        assert resolve(cpu) == auto
    assert fck.get_backend() == "reference"
    fck.set_backend(None)
    assert fck.get_backend() == os.environ.get("FCK_BACKEND", "auto")


def test_set_backend_none_reads_the_environment_again(monkeypatch):
    """FCK_BACKEND is read once, not per call; set_backend(None) reads it again, and a bad value raises there."""
    cpu = torch.device("cpu")
    try:
        monkeypatch.setenv("FCK_BACKEND", "reference")
        fck.set_backend(None)
        assert fck.get_backend() == "reference" and resolve(cpu) == "reference"
        monkeypatch.setenv("FCK_BACKEND", "auto")
        assert fck.get_backend() == "reference"  # not read again per call
        fck.set_backend(None)
        assert fck.get_backend() == "auto" and resolve(cpu) == ("cpu" if fck.backends()["cpu"].available else
                                                               "reference")
        monkeypatch.setenv("FCK_BACKEND", "nonsense")
        fck.set_backend(None)
        with pytest.raises(ValueError, match="unknown fastcore_kernels backend 'nonsense'"):
            fck.get_backend()
    finally:
        monkeypatch.undo()
        fck.set_backend(None)


def test_compiled_code_follows_the_backend_choice():
    """Code compiled under one choice recompiles under another (use_backend's block and set_backend), on torch 2.4
    too, whose compiler cannot read use_backend's ContextVar."""
    torch._dynamo.reset()

    def f(x):
        return x + 1 if fck.get_backend() == "reference" else x * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.full((3,), 5.0)
    outside = 6.0 if fck.get_backend() == "reference" else 10.0
    assert compiled(x)[0] == outside
    with fck.use_backend("reference"):
        assert compiled(x)[0] == 6.0
        with fck.use_backend("cpu"):
            assert compiled(x)[0] == 10.0
        assert compiled(x)[0] == 6.0
    assert compiled(x)[0] == outside
    try:
        fck.set_backend("reference")
        assert compiled(x)[0] == 6.0
    finally:
        fck.set_backend(None)


def test_an_interpreter_that_does_not_run_kernels_makes_triton_unavailable(monkeypatch):
    """Triton 3.0's interpreter under numpy 2 drops every store: Triton must then say so, not leave outputs
    unwritten."""
    pytest.importorskip("triton")
    from fastcore_kernels import _backend
    from fastcore_kernels.triton import _common

    if _backend.triton_interpreting():
        assert _common.interpreter_runs()  # this environment's interpreter writes what a kernel stores
    monkeypatch.setattr(_common, "interpreter_runs", lambda: False)
    status = _backend._probe("triton", True)
    assert not status.available and not status.devices and "numpy" in status.reason

    def fails():
        raise RuntimeError("no interpreter")

    monkeypatch.setattr(_common, "interpreter_runs", fails)
    status = _backend._probe("triton", True)
    assert not status.available and "no interpreter" in status.reason


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown fastcore_kernels backend"):
        fck.set_backend("fastest")


def test_explicit_backend_that_cannot_serve_the_device_raises():
    with fck.use_backend("cuda"):
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="cannot run on cpu"):
                resolve(torch.device("cpu"))


def test_optimizer_uses_the_selected_backend(monkeypatch):
    from fastcore_kernels.ops import adam as adam_op

    seen = []
    monkeypatch.setitem(adam_op._IMPLS, "reference", lambda *a: seen.append("reference"))
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    with fck.use_backend("reference"):
        fck.FusedAdam([p]).step()
    assert seen == ["reference"]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=600)


def test_environment_variable_selects_backend():
    out = _run(
        """
        import torch, fastcore_kernels as fck
        from fastcore_kernels._backend import resolve
        print(fck.get_backend(), resolve(torch.device("cpu")))
        """,
        FCK_BACKEND="reference",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "reference"]


def test_import_never_builds_or_warns():
    out = _run(
        """
        import warnings
        warnings.simplefilter("error")
        import fastcore_kernels, fastcore_kernels._ext as ext
        assert ext._loaded is None, "the extension must load on first use, not at import"
        """
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_model_compiles_before_any_eager_call(backend):
    """The first op of a process may run inside torch.compile(fullgraph=True): probing the backends (which loads the
    extension under a lock) must not be traced."""
    out = _run(
        f"""
        import torch, fastcore_kernels as fck, fastcore_kernels._ext as ext
        from torch import nn
        torch.manual_seed(0)
        model = fck.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(64, 5)))
        emb = fck.nn.EmbeddingBag(10, 6)
        fck.set_backend({backend!r})
        assert ext._loaded is None
        x, idx = torch.randn(2, 3, 6, 6), torch.tensor([[1, 2], [3, 9]])
        out = torch.compile(model, fullgraph=True)(x)
        bags = torch.compile(emb, fullgraph=True)(idx)
        (out.sum() + bags.sum()).backward()
        g = model[0].weight.grad.clone()
        model.zero_grad()
        model(x).sum().backward()
        torch.testing.assert_close(model[0].weight.grad, g)
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]


def test_missing_extension_falls_back_with_one_warning():
    """No prebuilt library and no way to build one: import works, one warning, reference/triton serve."""
    out = _run(
        """
        import sys, warnings
        sys.modules["fastcore_kernels._C"] = None          # as if setup.py never built it
        import fastcore_kernels as fck, fastcore_kernels._build as build
        build.sources_present = lambda: False              # and no sources to build from
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = fck.backends()
            p = torch.nn.Parameter(torch.randn(5)); p.grad = torch.randn(5)
            fck.FusedAdam([p]).step()
            fck.backends()
        msgs = [str(w.message) for w in caught if "fastcore_kernels" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "'cpu' and 'cuda' backends are disabled" in msgs[0], msgs[0]
        assert not report["cpu"].available and "C++ extension unavailable" in report["cpu"].reason
        from fastcore_kernels._backend import resolve
        assert resolve(torch.device("cpu")) == "reference"
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.slow
def test_builds_on_first_use_from_a_source_tree(tmp_path):
    """Without a prebuilt fastcore_kernels._C, the first use compiles the sources with cpp_extension.load into the
    cache, and a second process finds the cached build."""
    code = """
        import sys, warnings
        sys.modules["fastcore_kernels._C"] = None          # as if setup.py never built it
        warnings.simplefilter("error")                      # building must not warn
        import torch, fastcore_kernels as fck
        from fastcore_kernels._ext import extension
        assert fck.backends()["cpu"].available, fck.backends()["cpu"]
        print(extension().how)
        p = torch.nn.Parameter(torch.randn(5)); p.grad = torch.randn(5)
        assert fck.ops.adam_([p], [p.grad], [torch.zeros(5)], [torch.zeros(5)], [], [], [torch.tensor(0.0)],
                             lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, backend="cpu") == "cpu"
        """
    env = dict(FCK_CACHE_DIR=str(tmp_path), FCK_NO_CUDA_BUILD="1")
    first = _run(code, **env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "built on first use" in first.stdout
    second = _run(code, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert list(tmp_path.rglob("fastcore_kernels_C*.so")), "the build is cached under FCK_CACHE_DIR"
