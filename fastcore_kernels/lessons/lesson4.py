"""Lesson 4 parts. tabular: income >= 50k from an Adult-style census table (categorical embeddings + normalised
continuous columns + a [200, 100] MLP with batch norm). collab: movie ratings (see lesson 5 for weight decay)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy
from fastcore_kernels.lessons import RunResult, train_kernel_sets
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
