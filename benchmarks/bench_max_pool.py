"""2-D max pooling against torch's max_pool2d in the same run: fwd (inference), fwd-train (recorded for a backward,
so with indices), bwd and fwd+bwd, on a ResNet stem's pool (3x3, stride 2, padding 1) at ImageNet and ResNet-34
batch shapes, a VGG-style 2x2 pool and a stride-1 3x3 pool (Inception branches); plus a whole torchvision
ResNet-18's inference, stock against fuse()'d, when torchvision is installed. NCHW, the layout torch's CPU kernel is
slow in. Bytes counted: input read and output written (fwd), plus the indices (counted at 8 bytes, torch's int64;
ours are int32) written by the training forward and read by the backward, and the input gradient written.

    python -m benchmarks.bench_max_pool [--device cpu] [--reps 9] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import Results, interleaved_time_ms, time_ms
from fastcore_kernels.functional import max_pool2d

# (label, input shape, kernel, stride, padding)
SHAPES = [("stem 224", (16, 64, 112, 112), 3, 2, 1), ("stem 56 (N=64)", (64, 64, 56, 56), 3, 2, 1),
          ("2x2 VGG", (16, 128, 112, 112), 2, 2, 0), ("3x3 s1 inception", (32, 192, 28, 28), 3, 1, 1)]


def bench_pool(res, device, label, shape, k, s, p, reps):
    x = torch.randn(shape, device=device)
    out_shape = F.max_pool2d(x, k, s, p).shape
    dy = torch.randn(out_shape, device=device)
    n_in, n_out = x.numel() * 4, dy.numel() * 4
    providers = {"torch": lambda t, **kw: F.max_pool2d(t, k, s, p, **kw),
                 "fck-cpu": lambda t, **kw: max_pool2d(t, k, s, p, **kw, backend="cpu")}
    xg = x.clone().requires_grad_()
    modes = {
        "fwd": (lambda f: lambda: f(x), n_in + n_out),
        "fwd-train": (lambda f: lambda: f(xg), n_in + 3 * n_out),  # recorded for a backward: indices saved
        "bwd": (lambda f: (lambda y: lambda: torch.autograd.grad(y, xg, dy, retain_graph=True))(f(xg)),
                2 * n_out + n_in),
        "fwd+bwd": (lambda f: lambda: torch.autograd.grad(f(xg), xg, dy), n_in + 3 * n_out + 2 * n_out + n_in),
    }
    for mode, (build, nbytes) in modes.items():
        fns = {name: build(f) for name, f in providers.items()}
        if device.type == "cpu":
            with torch.inference_mode(mode == "fwd"):
                timed = interleaved_time_ms(fns, reps=reps)
        else:
            timed = {name: time_ms(f, device) for name, f in fns.items()}
        for name, times in timed.items():
            res.add("max_pool2d", name, mode, f"{label} {'x'.join(map(str, shape))}", times, nbytes)
            print(f"  {label:<18}{mode:<9}{name:<9} p50 {times[1]:9.3f} ms", flush=True)


def bench_resnet18(res, device, reps):
    try:
        import torchvision.models as tvm
    except ImportError:
        print("  (no torchvision: the whole-model row is skipped)")
        return
    import fastcore_kernels as fck

    torch.manual_seed(0)
    stock = tvm.resnet18(weights=None).to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fck.fuse(copy.deepcopy(stock)).eval()
    x = torch.randn(16, 3, 224, 224, device=device)

    def run(model):
        def step():
            with torch.inference_mode():
                return model(x)
        return step

    fns = {"torch": run(stock), "fck": run(fused)}
    timed = interleaved_time_ms(fns, reps=reps) if device.type == "cpu" else \
        {name: time_ms(f, device) for name, f in fns.items()}
    for name, times in timed.items():
        res.add("resnet18", name, "inference", "16x3x224x224", times, x.numel() * 4)
        print(f"  resnet18 inference {name:<6} p50 {times[1]:9.3f} ms", flush=True)


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=9, help="repetitions per provider (round-robin)")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-ResNet-18 row")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cpu":
        raise SystemExit("max_pool2d's own kernel is the CPU's (CUDA tensors run torch's op): nothing to compare")
    res = Results(device, args.out)
    for label, shape, k, s, p in SHAPES:
        bench_pool(res, device, label, shape, k, s, p, args.reps)
    if not args.no_model:
        bench_resnet18(res, device, max(3, args.reps // 2))
    return res.finish("torch", args.out)


if __name__ == "__main__":
    main()
