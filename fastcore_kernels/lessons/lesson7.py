"""Lesson 7 parts. human-numbers: the four language models of fastcore_kernels.lessons.human_numbers, each trained
with the fused kernels and with stock PyTorch on the same data and seed."""

from __future__ import annotations

from pathlib import Path

import torch

from fastcore_kernels.learner import DataLoaders, Learner, Timer
from fastcore_kernels.lessons import RunResult, epoch_seconds
from fastcore_kernels.lessons import human_numbers as hn

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
    out.mkdir(parents=True, exist_ok=True)
    for name, (bptt, n_epoch, lr) in SETTINGS.items():
        n_epoch = 1 if quick else (epochs or n_epoch)
        dls, vocab = make_data(data, 64, bptt, device, quick)
        for kernels in kernel_sets:
            torch.manual_seed(0)
            model = hn.MODELS[name](len(vocab))
            timer = Timer()
            learn = Learner(dls, model, hn.flat_cross_entropy, lr=lr, metrics=[hn.flat_accuracy],
                            cbs=[hn.ResetState(), timer], kernels=kernels, progress=False)
            print(f"lesson 7 human-numbers: {name} ({kernels}), {n_epoch} epochs, vocab {len(vocab)}", flush=True)
            learn.fit_one_cycle(n_epoch, lr)
            acc = learn.recorder.values[-1][2]
            learn.recorder.plot_loss(out / f"loss_{name}_{kernels}.png", skip_start=0)
            results.append(RunResult(7, "human-numbers", name, kernels, "accuracy", round(float(acc), 4), n_epoch,
                                     round(epoch_seconds(timer), 4),
                                     {"valid_loss": round(float(learn.recorder.values[-1][1]), 4)}))
            print(f"  accuracy {acc:.4f}, {results[-1].sec_per_epoch:.3f} s/epoch", flush=True)
    return results
