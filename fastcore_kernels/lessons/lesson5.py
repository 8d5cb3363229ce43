"""Lesson 5 parts. collab-wd: the dot-product model trained long and hard (10 epochs at lr 1e-2) without and with
weight decay: without it the validation MSE turns up after the second epoch (overfitting), wd = 0.1 keeps the factors
small and the MSE down; then what the item biases learned. mnist-sgd: the foundations (see `foundations`): logistic
regression and an MLP by hand-written SGD, the MLP by the Learner, and Adam by hand beside FusedAdam."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy, mse
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import collab as cl
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons.lesson4 import collab_data
from fastcore_kernels.optim import FusedAdam


def item_bias_report(learn, n_items: int) -> dict:
    """How the learned item biases line up with the items' mean training rating (a sanity check of what they mean)."""
    x, y = learn.dls.train.tensors
    model = learn.model
    bias = model.i_bias.weight.detach().float().cpu().squeeze(1)
    counts = torch.bincount(x[:, 1].cpu(), minlength=n_items).float()
    sums = torch.zeros(n_items).index_add_(0, x[:, 1].cpu(), y.cpu().squeeze(1))
    rated = counts >= 20
    means = sums[rated] / counts[rated]
    corr = float(torch.corrcoef(torch.stack([bias[rated], means]))[0, 1])
    factor_norm = float(model.i_weight.weight.detach().float().norm(dim=1).mean())
    return {"item_bias_vs_mean_rating_corr": round(corr, 3), "mean_item_factor_norm": round(factor_norm, 3)}


def run_collab_wd(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                  out: Path = Path("lesson_out")) -> list[RunResult]:
    dls, n_users, n_items, mean_mse = collab_data(data, out, device, quick)
    n_epoch = 1 if quick else (epochs or 10)
    results = []
    for wd in (0.0, 0.1):
        results += train_kernel_sets(
            5, "collab-wd", f"dot-bias wd={wd:g}", lambda: cl.EmbeddingDotBias(n_users, n_items, 50), dls,
            F.mse_loss, kernel_sets=kernel_sets, out=out, metrics=[mse],
            fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2, wd=wd),
            extra=lambda learn: {"mean_baseline_mse": round(mean_mse, 4), **item_bias_report(learn, n_items),
                                 "valid_mse_by_epoch": [round(v[1], 4) for v in learn.recorder.values]})
    return results


def _batches(x, y, epochs: int, bs: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(perm), bs):
            yield x[perm[i: i + bs]], y[perm[i: i + bs]]


def run_mnist_sgd(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                  out: Path = Path("lesson_out")) -> list[RunResult]:
    (xt, yt), (xv, yv) = fd.load_mnist(data)
    if quick:
        xt, yt, xv, yv = xt[:1000], yt[:1000], xv[:500], yv[:500]
    xt, yt, xv, yv = (t.to(device) for t in (xt, yt, xv, yv))
    print(f"lesson 5 mnist-sgd: {len(yt)} training digits, {len(yv)} held out", flush=True)
    n_epoch = 1 if quick else (epochs or 5)
    results = []

    # The hand-written loops are plain PyTorch: one run each, listed as stock.
    for name, make in (("logreg hand-SGD", fd.LogReg), ("mlp hand-SGD", fd.mlp)):
        torch.manual_seed(0)
        model = make().to(device)
        t0 = time.perf_counter()
        losses = fd.sgd_loop(model, _batches(xt, yt, n_epoch), lr=0.5, wd=1e-5)
        sec = (time.perf_counter() - t0) / n_epoch
        acc = fd.accuracy_of(model, xv, yv)
        results.append(RunResult(5, "mnist-sgd", name, "stock", "accuracy", round(acc, 4), n_epoch, round(sec, 4),
                                 {"final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)}))
        print(f"lesson 5 mnist-sgd: {name}: accuracy {acc:.4f}", flush=True)

    dls = DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=64, device=device, seed=0)
    results += train_kernel_sets(5, "mnist-sgd", "mlp Learner", lambda: fd.mlp(), dls, F.cross_entropy,
                                 kernel_sets=kernel_sets, out=out, metrics=[accuracy],
                                 fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2))

    # Adam by hand (stock) and FusedAdam (fused) from the same weights on the same batches: the same trajectory.
    runs = {}
    for kernels in ("stock", "fused"):
        torch.manual_seed(0)
        model = fd.mlp().to(device)
        opt = FusedAdam(model.parameters(), lr=1e-3) if kernels == "fused" else fd.HandAdam(model.parameters(), 1e-3)
        t0 = time.perf_counter()
        losses = fd.opt_loop(model, opt, _batches(xt, yt, n_epoch))
        runs[kernels] = (model, losses, (time.perf_counter() - t0) / n_epoch)
    (m_hand, l_hand, _), (m_fused, l_fused, _) = runs["stock"], runs["fused"]
    same = {"max_loss_diff": max(abs(a - b) for a, b in zip(l_hand, l_fused)),
            "max_param_diff": max(float((p - q).detach().abs().max()) for p, q in zip(m_hand.parameters(),
                                                                              m_fused.parameters())),
            "steps": len(l_hand)}
    print(f"lesson 5 mnist-sgd: hand-written Adam vs FusedAdam over {same['steps']} steps: losses differ by at most "
          f"{same['max_loss_diff']:.2e}, weights by {same['max_param_diff']:.2e}", flush=True)
    for kernels, (model, _, sec) in runs.items():
        if kernels in kernel_sets:
            results.append(RunResult(5, "mnist-sgd", "mlp Adam", kernels, "accuracy",
                                     round(fd.accuracy_of(model, xv, yv), 4), n_epoch, round(sec, 4), same))
    return results
