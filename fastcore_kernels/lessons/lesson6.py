"""Lesson 6 parts. rossmann: daily store sales as tabular regression on the log of the target, with y_range, embedding
dropout and the competition's exp_rmspe metric; the last six weeks are the validation set (a time split)."""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, exp_rmspe
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import tabular as tb

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
