"""Lesson 4 parts. tabular: income >= 50k from an Adult-style census table (categorical embeddings + normalised
continuous columns + a [200, 100] MLP with batch norm). collab: movie ratings with the dot-product model and its neural
variant, against the MSE of predicting the mean (lesson 5 shows weight decay's effect)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy, mse
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import collab as cl
from fastcore_kernels.lessons import tabular as tb

ADULT_CATS = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "sex"]
ADULT_CONTS = ["age", "fnlwgt", "education-num", "hours-per-week", "capital-gain"]


def csv_path(data, out: Path, name: str, write) -> Path:
    """The user's CSV (a file, or a folder holding `name`), else the synthetic table written once under out/data."""
    if data is not None:
        path = Path(data)
        return path / name if path.is_dir() else path
    path = out / "data" / name
    if not path.is_file():
        write(path)
    return path


def split(n: int, valid_pct: float, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_valid = int(n * valid_pct)
    return perm[n_valid:], perm[:n_valid]


def run_tabular(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                out: Path = Path("lesson_out")) -> list[RunResult]:
    cols = tb.read_csv(csv_path(data, out, "adult.csv", tb.write_adult))
    n = len(cols["salary"]) if not quick else min(2000, len(cols["salary"]))
    train_idx, valid_idx = split(n, 0.2)
    train, valid = tb.take(cols, train_idx.tolist()), tb.take(cols, valid_idx.tolist())
    procs = tb.TabularProcs(ADULT_CATS, ADULT_CONTS, "salary").fit(train)
    dls = DataLoaders.from_tensors(procs(train), procs(valid), batch_size=128, device=device, seed=0)
    y_valid = procs(valid)[2]
    majority = float(torch.bincount(y_valid).max()) / len(y_valid)
    print(f"lesson 4 tabular: {len(train_idx)} training rows, {len(valid_idx)} validation rows, "
          f"majority class {majority:.3f}", flush=True)
    n_epoch = 1 if quick else (epochs or 4)
    return train_kernel_sets(
        4, "tabular", "tabular-mlp",
        lambda: tb.TabularModel(procs.cardinalities(), len(ADULT_CONTS), len(procs.y_classes), layers=(200, 100)),
        dls, F.cross_entropy, kernel_sets=kernel_sets, out=out, metrics=[accuracy],
        fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2), extra=lambda learn: {"majority_class": round(majority, 4)})


def collab_data(data, out: Path, device, quick: bool, bs: int = 256):
    """Ratings (u.data or ratings.csv; the synthetic u.data by default), 10% held out at random."""
    x, y, users, items = cl.read_ratings(csv_path(data, out, "u.data", cl.write_movielens))
    if quick:
        x, y = x[:10000], y[:10000]
    train_idx, valid_idx = split(len(y), 0.1)
    dls = DataLoaders.from_tensors((x[train_idx], y[train_idx]), (x[valid_idx], y[valid_idx]), batch_size=bs,
                                   device=device, seed=0)
    mean_mse = float(((y[valid_idx] - y[train_idx].mean()) ** 2).mean())
    print(f"collab: {len(users)} users, {len(items)} items, {len(train_idx)} training ratings; predicting the "
          f"training mean scores MSE {mean_mse:.3f}", flush=True)
    return dls, len(users), len(items), mean_mse


def run_collab(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
               out: Path = Path("lesson_out")) -> list[RunResult]:
    dls, n_users, n_items, mean_mse = collab_data(data, out, device, quick)
    n_epoch = 1 if quick else (epochs or 5)
    models = {
        "dot-bias": lambda: cl.EmbeddingDotBias(n_users, n_items, 50, y_range=(0.0, 5.5)),
        "collab-nn": lambda: tb.TabularModel([n_users, n_items], 0, 1, layers=(100,), y_range=(0.0, 5.5)),
    }
    results = []
    for name, make in models.items():
        forward = (lambda m: m) if name == "dot-bias" else cl.CatOnly
        results += train_kernel_sets(
            4, "collab", name, lambda: forward(make()), dls, F.mse_loss, kernel_sets=kernel_sets, out=out,
            metrics=[mse], fit=lambda learn: learn.fit_one_cycle(n_epoch, 5e-3, wd=0.1),
            extra=lambda learn: {"mean_baseline_mse": round(mean_mse, 4)})
    return results
