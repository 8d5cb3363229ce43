"""Embedding-bag fwd+bwd on the lessons' shapes: fastcore_kernels' backends vs torch.nn.functional.embedding_bag, in
the same run.

    python benchmarks/bench_embedding_bag.py [--device cpu|cuda] [--out results.json]

GB/s counts the rows touched: each index's weight row read in the forward and its gradient row written in the
backward, plus the output and its gradient.

The large-table case (5M x 64, 4096 bags of 20, sum) times a whole training step — forward, backward and an SGD step
of lr 0.01 — three ways: our fused update (the backward steps the touched rows, no gradient tensor), torch's dense
gradient + SGD (a 1.3 GB gradient zeroed, filled and applied), torch's sparse gradient + torch.optim.SGD; with each
step's peak memory beyond the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastcore_kernels as fck  # noqa: E402
import fastcore_kernels.functional as fckF  # noqa: E402
from benchmarks.common import Results, device_profile, interleaved_time_ms, step_peak_mib, time_ms  # noqa: E402
from fastcore_kernels.ops.embedding_bag import IMPLEMENTED, EmbeddingUpdate  # noqa: E402


def cases(device):
    """(name, [(num_embeddings, dim, indices, offsets, mode)]) per workload."""
    g = torch.Generator().manual_seed(0)

    def one_per_bag(rows, batch):
        return torch.randint(0, rows, (batch,), generator=g), torch.arange(batch)

    users, items = one_per_bag(100_000, 4096), one_per_bag(10_000, 4096)
    out = [("collab 100k+10k x50, 4096", [(100_000, 50, *users, "sum"), (10_000, 50, *items, "sum")])]
    tabular = []
    for t in range(10):
        rows, dim = [10, 30, 100, 300, 1000][t % 5], [4, 8, 16, 32, 50][t % 5]
        tabular.append((rows, dim, *one_per_bag(rows, 4096), "sum"))
    out.append(("tabular 10 tables, 4096", tabular))
    lengths = torch.randint(20, 201, (4096,), generator=g)
    text = torch.randint(0, 60_000, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    out.append(("text 60k x400, 4096 bags", [(60_000, 400, text, offsets, "mean")]))
    # The same bags over a Zipfian vocabulary (word k drawn with probability ~ 1/(k + 1), fastai's vocab order:
    # frequent words first): the most frequent row is named in ~9% of the positions, which a backward with
    # one writer per row, or atomics into one row, serializes.
    zipf = torch.multinomial(1.0 / torch.arange(1, 60_001, dtype=torch.float64), len(text), replacement=True,
                             generator=g)
    out.append(("text zipf 60k x400, 4096", [(60_000, 400, zipf, offsets, "mean")]))
    return [(name, [(n, d, i.to(device), o.to(device), m) for n, d, i, o, m in tables]) for name, tables in out]


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-large", action="store_true", help="skip the 5M-row table (1.3 GB, or 2.6 with its gradient)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    res = Results(device, args.out)
    status = fck.backends()
    # FCK_BAG_ROWS_CUDA=0 / 1 (read by the CUDA backward per call): atomics or the row-by-row backward for every case
    forced = {"0": "-atomics", "1": "-rows"}.get(os.environ.get("FCK_BAG_ROWS_CUDA", ""), "")
    providers = {f"fck-{b}" + (forced if b == "cuda" else ""): b for b in IMPLEMENTED
                 if b != "reference" and device.type in status[b].devices
                 and not (b == "triton" and device.type == "cpu")}
    providers["torch"] = None
    for name, tables in cases(device):
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(n, d, generator=g).to(device).requires_grad_() for n, d, *_ in tables]
        grads = [torch.randn(len(o), d, generator=g).to(device) for (n, d, i, o, m) in tables]

        def step(backend):
            def run():
                outs = []
                for w, (n, d, i, o, m) in zip(weights, tables):
                    outs.append(F.embedding_bag(i, w, o, mode=m) if backend is None
                                else fckF.embedding_bag(i, w, o, mode=m, backend=backend))
                torch.autograd.backward(outs, grads)
                for w in weights:
                    w.grad = None
            return run

        fns = {p: step(b) for p, b in providers.items()}
        timed = (interleaved_time_ms(fns, reps=args.reps) if device.type == "cpu"
                 else {p: time_ms(f, device) for p, f in fns.items()})
        nbytes = sum(4 * d * (2 * len(i) + 2 * len(o)) for n, d, i, o, m in tables)
        for p, times in timed.items():
            extra = device_profile(fns[p], f"{name[:12]} {p}") if device.type == "cuda" else {}
            res.add("embedding_bag", p, "fwd+bwd", name, times, nbytes, **extra)
            print(f"  {name:<28}{p:<12} p50 {times[1]:9.3f} ms", flush=True)
    if not args.no_large:
        large_table(res, device, args.reps)
    return res.finish("torch", args.out)


def large_table(res, device, reps, rows=5_000_000, dim=64, bags=4096, per_bag=20, lr=0.01):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(rows, dim, generator=g).to(device).requires_grad_()
    idx = torch.randint(0, rows, (bags * per_bag,), generator=g).to(device)
    off = torch.arange(0, bags * per_bag, per_bag).to(device)
    dy = torch.randn(bags, dim, generator=g).to(device)
    status = fck.backends()
    backend = "cuda" if device.type == "cuda" else "cpu"
    sgd_sparse = torch.optim.SGD([weight], lr=lr)

    update = EmbeddingUpdate("sgd", lr=lr)

    def fused():
        fckF.embedding_bag(idx, weight, off, mode="sum", update=update, backend=backend).backward(dy)

    def dense():
        F.embedding_bag(idx, weight, off, mode="sum").backward(dy)
        with torch.no_grad():
            weight.add_(weight.grad, alpha=-lr)
        weight.grad = None

    def sparse():
        F.embedding_bag(idx, weight, off, mode="sum", sparse=True).backward(dy)
        sgd_sparse.step()
        weight.grad = None

    fns = {"torch": dense, "torch-sparse": sparse}
    if device.type in status[backend].devices:
        fns[f"fck-{backend}"] = fused
    timed = (interleaved_time_ms(fns, reps=reps) if device.type == "cpu"
             else {p: time_ms(f, device) for p, f in fns.items()})
    name = f"large {rows // 10**6}M x{dim}, sgd step"
    nbytes = 4 * dim * (3 * len(idx) + 2 * bags)  # rows read, gradient rows, rows written back; output + grad
    for p, f in fns.items():
        peak = step_peak_mib(f, device)
        res.add("embedding_bag", p, "fwd+bwd+step", name, timed[p], nbytes, peak_mem_mb=peak)
        print(f"  {name:<28}{p:<14} p50 {timed[p][1]:9.3f} ms  peak {peak:8.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
