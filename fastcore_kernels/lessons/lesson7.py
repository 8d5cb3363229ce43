"""Lesson 7 parts. human-numbers: the four language models of fastcore_kernels.lessons.human_numbers, each trained
with the fused kernels and with stock PyTorch on the same data and seed. mnist-resnet: a ResNet for MNIST digits
from scratch (fastcore_kernels.lessons.vision), its conv-BN-ReLU layers fused."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy
from fastcore_kernels.learner.metrics import AvgMetric
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons import human_numbers as hn
from fastcore_kernels.lessons import vision as vis

# model: (bptt, epochs, lr) -- the course's settings (bptt 20 for the hand-written loops, 70 for GRU/LSTM)
SETTINGS = {"scratch": (20, 10, 3e-3), "stateful": (20, 10, 3e-3), "gru": (70, 20, 1e-2), "lstm": (70, 20, 1e-2)}


def make_data(data_dir, bs: int, bptt: int, device, quick: bool):
    train, valid = hn.read_lines(data_dir, "train"), hn.read_lines(data_dir, "valid")
    if quick:
        train, valid = train[:1500], valid[:1000]
    train_tok, valid_tok = hn.tokens(train), hn.tokens(valid)
    vocab = hn.Vocab(train_tok)
    dls = DataLoaders(hn.StreamLoader(vocab.encode(train_tok), bs, bptt, device),
                      hn.StreamLoader(vocab.encode(valid_tok), bs, bptt, device), device=device)
    return dls, vocab


def run_human_numbers(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                      out: Path = Path("lesson_out")) -> list[RunResult]:
    results = []
    for name, (bptt, n_epoch, lr) in SETTINGS.items():
        n_epoch = 1 if quick else (epochs or n_epoch)
        dls, vocab = make_data(data, 64, bptt, device, quick)
        results += train_kernel_sets(
            7, "human-numbers", name, lambda: hn.MODELS[name](len(vocab)), dls, hn.flat_cross_entropy,
            kernel_sets=kernel_sets, out=out, metrics=[AvgMetric(hn.flat_accuracy, "accuracy")], cbs=lambda: [hn.ResetState()],
            fit=lambda learn: learn.fit_one_cycle(n_epoch, lr), learner_kwargs={"lr": lr})
    return results


def run_mnist_resnet(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                     out: Path = Path("lesson_out")) -> list[RunResult]:
    """A ResNet for MNIST trained from scratch (random-shift augmentation, 1cycle), fused vs stock."""
    (xt, yt), (xv, yv) = fd.load_mnist(data)
    xt, xv = xt.view(-1, 1, 28, 28), xv.view(-1, 1, 28, 28)
    if quick:
        xt, yt, xv, yv = xt[:1000], yt[:1000], xv[:500], yv[:500]
    print(f"lesson 7 mnist-resnet: {len(yt)} training digits, {len(yv)} held out", flush=True)
    dls = DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=64, device=device, seed=0)
    n_epoch = 1 if quick else (epochs or 8)
    return train_kernel_sets(7, "mnist-resnet", "resnet", vis.mnist_resnet, dls, F.cross_entropy,
                             kernel_sets=kernel_sets, out=out, metrics=[accuracy],
                             fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2))
