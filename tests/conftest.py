"""Test setup: without a GPU, Triton kernels run on the CPU interpreter (must be set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastcore_kernels as fck  # noqa: E402

ALL_BACKENDS = ("reference", "cpu", "triton", "cuda")


class ResNetBlock(torch.nn.Module):
    """A ResNet block written as users write one (functional ReLU, in-place add of the block's own activation):
    fuse() rewrites it with torch.fx."""

    def __init__(self, c_in=3, c=8):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        identity = out
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


def devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def runnable(backend: str, device: str) -> bool:
    return device in fck.backends()[backend].devices


def skip_unless_runnable(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not runnable(backend, device):
        pytest.skip(f"backend {backend} cannot run on {device} here: {fck.backends()[backend]}")


def graph_node_names(y) -> set[str]:
    """The class names of every node in y's autograd graph: which kernels' autograd nodes a forward recorded."""
    nodes, stack = set(), [y.grad_fn]
    while stack:
        n = stack.pop()
        if n is not None and n not in nodes:
            nodes.add(n)
            stack.extend(f for f, _ in n.next_functions)
    return {type(n).__name__ for n in nodes}


def winograd_for_small_shapes(monkeypatch, weight_grad=True) -> bool:
    """Let the small test shapes take the Winograd kernels (the size rules would send them to oneDNN), the weight
    gradient too unless weight_grad=False. Returns whether this machine runs them at all."""
    import importlib

    cbr = importlib.import_module("fastcore_kernels.ops.conv_bn_relu")  # the package exports the function's name
    monkeypatch.setattr(cbr, "_WINOGRAD_MIN_WORK", 0)
    monkeypatch.setattr(cbr, "_WINOGRAD_MIN_WEIGHT_GRAD_WORK", 0 if weight_grad else float("inf"))
    return cbr.extension().ok and cbr._winograd_available()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return [f"fastcore_kernels backends: {name}: {status}" for name, status in fck.backends().items()]


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """No test leaks a set_backend() choice into the next."""
    yield
    fck.set_backend(None)
