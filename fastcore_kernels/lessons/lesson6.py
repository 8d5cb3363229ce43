"""Lesson 6 parts. rossmann: daily store sales as tabular regression on the log of the target, with y_range, embedding
dropout and the competition's exp_rmspe metric; the last six weeks are the validation set (a time split).
cnn-gradcam: a CNN with batch norm and data augmentation on digits, and Grad-CAM heatmaps."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy, exp_rmspe, grad_cam
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons import tabular as tb
from fastcore_kernels.lessons import vision as vis

CATS = ["Store", "DayOfWeek", "Year", "Month", "Week", "Day", "StateHoliday", "StoreType", "Assortment", "Promo",
        "SchoolHoliday"]
CONTS = ["CompetitionDistance"]


def run_rossmann(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                 out: Path = Path("lesson_out")) -> list[RunResult]:
    folder = Path(data) if data is not None else out / "data"
    if data is None and not (folder / "train.csv").is_file():
        tb.write_rossmann(folder, n_stores=30 if quick else 120, days=200 if quick else 700)
    cols = tb.read_rossmann(folder)
    dates = sorted(set(cols["Date"]))
    cut = dates[-42] if len(dates) > 84 else dates[len(dates) * 3 // 4]  # six weeks, or the last quarter
    train_idx = [i for i, d in enumerate(cols["Date"]) if d < cut]
    valid_idx = [i for i, d in enumerate(cols["Date"]) if d >= cut]
    train, valid = tb.take(cols, train_idx), tb.take(cols, valid_idx)
    procs = tb.TabularProcs([c for c in CATS if c in cols], [c for c in CONTS if c in cols], "Sales", "float",
                            log_y=True).fit(train)
    dls = DataLoaders.from_tensors(procs(train), procs(valid), batch_size=256, device=device, seed=0)
    y_range = (0.0, math.log(max(float(s) for s in train["Sales"])) * 1.2)
    print(f"lesson 6 rossmann: {len(train_idx)} training rows, {len(valid_idx)} validation rows from {cut}",
          flush=True)
    n_epoch = 1 if quick else (epochs or 5)
    return train_kernel_sets(
        6, "rossmann", "rossmann-mlp",
        lambda: tb.TabularModel(procs.cardinalities(), len(procs.cont_names), 1, layers=(1000, 500),
                                ps=(0.001, 0.01), embed_p=0.04, y_range=y_range),
        dls, F.mse_loss, kernel_sets=kernel_sets, out=out, metrics=[exp_rmspe],
        fit=lambda learn: learn.fit_one_cycle(n_epoch, 3e-3, wd=0.2))


def run_cnn_gradcam(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                    out: Path = Path("lesson_out")) -> list[RunResult]:
    """A CNN with batch norm on MNIST digits with data augmentation (rotations up to 10 degrees, shifts by
    reflection-padded crops, lighting; no flips for digits), then Grad-CAM heatmaps of the last conv layer for a
    few held-out digits, saved as PNGs."""
    (xt, yt), (xv, yv) = fd.load_mnist_images(data, quick)
    print(f"lesson 6 cnn-gradcam: {len(yt)} training digits, {len(yv)} held out", flush=True)
    dls = DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=64, device=device, seed=0)
    n_epoch = 1 if quick else (epochs or 6)

    def fit(learn):
        learn.fit_one_cycle(n_epoch, 1e-2)
        if learn.kernels == "fused":
            model = learn.model
            last_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            for i in range(4):
                grad_cam(model, xv[i].to(learn.dls.device), last_conv,
                         fname=out / f"grad_cam_{i}_label{int(yv[i])}.png")

    return train_kernel_sets(
        6, "cnn-gradcam", "bn-cnn-augmented",
        lambda: vis.simple_cnn(10, augment=vis.Augment(pad=2, rotate=10.0, lighting=0.2)), dls, F.cross_entropy,
        kernel_sets=kernel_sets, out=out, fit=fit, metrics=[accuracy])
