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
