"""The Learner's own cost: one epoch of the same model and data through a hand-written PyTorch loop, the Learner on
stock PyTorch (kernels="stock": torch.optim.AdamW, the model as given) and the Learner on fastcore_kernels
(kernels="fused": fuse(model), so BatchNormReLU1d, and FusedAdam), in one run. Loop vs stock Learner is the
Learner's overhead; stock vs fused Learner is what the kernels buy.

    python benchmarks/bench_learner.py [--device cpu|cuda] [--out results.json]

Model: a 784-256-256-10 MLP with batch norm on 60,000 random 28x28 "images" (in memory), batch size 256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Results, interleaved_time_ms  # noqa: E402
from fastcore_kernels.learner import DataLoaders, Learner  # noqa: E402


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256),
                         nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))


def plain_loop(dls, device):
    model = make_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    loss_func = nn.CrossEntropyLoss()

    def epoch():
        model.train()
        for xb, yb in dls.train:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            total = torch.zeros((), device=device)
            for xb, yb in dls.valid:
                total += loss_func(model(xb), yb) * len(yb)
        return float(total)

    return epoch


def learner_loop(dls, kernels):
    learn = Learner(dls, make_model(), nn.CrossEntropyLoss(), kernels=kernels, progress=False)

    def epoch():
        learn.fit(1, lr=1e-3)

    return epoch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70_000, 784, generator=g), torch.randint(0, 10, (70_000,), generator=g)
    dls = DataLoaders.from_tensors((x[:60_000], y[:60_000]), (x[60_000:], y[60_000:]), batch_size=256,
                                   device=device, seed=0)
    res = Results(device)
    runs = {"plain-torch-loop": plain_loop(dls, device), "learner-stock": learner_loop(dls, "stock"),
            "learner-fused": learner_loop(dls, "fused")}
    def timed(epoch):
        def run():
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    # Round-robin, epoch by epoch, so drift in the machine's speed falls on every provider alike (warm-up included).
    for name, times in interleaved_time_ms({n: timed(e) for n, e in runs.items()}, reps=args.epochs).items():
        row = res.add("learner", name, "epoch", "mlp784 bs256", times, nbytes=0,
                      samples_per_s=round(60_000 / (times[1] / 1e3)))
        print(f"  {name:<18} epoch p50 {row['p50_ms']:9.1f} ms  {row['samples_per_s']} samples/s", flush=True)
    return res.finish("plain-torch-loop", args.out)


if __name__ == "__main__":
    main()
