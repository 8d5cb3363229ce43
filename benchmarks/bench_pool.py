"""2-D max and average pooling against torch's max_pool2d / avg_pool2d in the same run, NCHW (the layout torch's
CPU kernels are slow in): fwd (inference), fwd-train (recorded for a backward: max pooling saves its indices), bwd
and fwd+bwd.

Max: a ResNet stem's pool (3x3, stride 2, padding 1) at ImageNet and ResNet-34 batch shapes, a VGG-style 2x2 pool,
a stride-1 3x3 pool. Average: Inception v3's 3x3 stride-1 branch pools at their three sizes (35x35, 17x17, 8x8)
and DenseNet's 2x2 transitions. Whole models (ResNet-18's stem pool, Inception v3's functional pools):
benchmarks/bench_models.py.

Bytes counted: input read and output written (fwd); max pooling's indices (counted at 8 bytes, torch's int64; ours
are int32) written by the training forward and read by the backward; the input gradient written.

    python -m benchmarks.bench_pool [--device cpu] [--op max|avg|both] [--reps 9] [--out results.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import Results, interleaved_time_ms, time_ms
from fastcore_kernels.functional import avg_pool2d, max_pool2d

# (label, input shape, kernel, stride, padding)
MAX_SHAPES = [("stem 224", (16, 64, 112, 112), 3, 2, 1), ("stem 56 (N=64)", (64, 64, 56, 56), 3, 2, 1),
              ("2x2 VGG", (16, 128, 112, 112), 2, 2, 0), ("3x3 s1 inception", (32, 192, 28, 28), 3, 1, 1)]
AVG_SHAPES = [("inception 35", (16, 192, 35, 35), 3, 1, 1), ("inception 17", (16, 768, 17, 17), 3, 1, 1),
              ("inception 8", (16, 1280, 8, 8), 3, 1, 1), ("densenet 56", (16, 128, 56, 56), 2, 2, 0),
              ("densenet 28", (16, 256, 28, 28), 2, 2, 0)]
OPS = {"max_pool2d": (F.max_pool2d, max_pool2d, MAX_SHAPES), "avg_pool2d": (F.avg_pool2d, avg_pool2d, AVG_SHAPES)}


def bench_pool(res, device, op, label, shape, k, s, p, reps):
    theirs, ours, _ = OPS[op]
    x = torch.randn(shape, device=device)
    out_shape = theirs(x, k, s, p).shape
    dy = torch.randn(out_shape, device=device)
    n_in, n_out = x.numel() * 4, dy.numel() * 4
    n_saved = 2 * n_out if op == "max_pool2d" else 0  # the indices, written and read back
    providers = {"torch": lambda t: theirs(t, k, s, p), "fck-cpu": lambda t: ours(t, k, s, p, backend="cpu")}
    xg = x.clone().requires_grad_()
    modes = {
        "fwd": (lambda f: lambda: f(x), n_in + n_out),
        "fwd-train": (lambda f: lambda: f(xg), n_in + n_out + n_saved),
        "bwd": (lambda f: (lambda y: lambda: torch.autograd.grad(y, xg, dy, retain_graph=True))(f(xg)),
                n_out + n_in + n_saved // 2),
        "fwd+bwd": (lambda f: lambda: torch.autograd.grad(f(xg), xg, dy), 2 * (n_in + n_out) + 1.5 * n_saved),
    }
    for mode, (build, nbytes) in modes.items():
        fns = {name: build(f) for name, f in providers.items()}
        if device.type == "cpu":
            with torch.inference_mode(mode == "fwd"):
                timed = interleaved_time_ms(fns, reps=reps)
        else:
            timed = {name: time_ms(f, device) for name, f in fns.items()}
        for name, times in timed.items():
            res.add(op, name, mode, f"{label} {'x'.join(map(str, shape))}", times, nbytes)
            print(f"  {op:<11}{label:<18}{mode:<10}{name:<9} p50 {times[1]:9.3f} ms", flush=True)


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--op", choices=("max", "avg", "both"), default="both")
    ap.add_argument("--reps", type=int, default=9, help="repetitions per provider (round-robin)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cpu":
        raise SystemExit("the pooling kernels are the CPU's (CUDA tensors run torch's ops): nothing to compare")
    res = Results(device, args.out)
    ops = [op for op in OPS if args.op in ("both", op[:3])]
    for op in ops:
        for label, shape, k, s, p in OPS[op][2]:
            bench_pool(res, device, op, label, shape, k, s, p, args.reps)
    return res.finish("torch", args.out)


if __name__ == "__main__":
    main()
