"""Batch norm + ReLU, batch norm + add + ReLU (training: fwd, bwd, fwd+bwd) and conv-BN-ReLU (eval) on ResNet-34
and tabular shapes: fastcore_kernels' backends vs stock PyTorch eager and torch.compile, in the same run.

    python benchmarks/bench_batch_norm.py [--device cpu|cuda] [--batch 64] [--compile] [--out results.json]

GB/s counts the bytes our kernels must move (fwd: read x twice, write y, + read the residual; bwd: read dy, x and
y twice, write dx, + write the residual's gradient), the same nominal bytes for every provider, so GB/s compares
speed and its fraction of the measured copy bandwidth says how close to the memory limit a kernel runs.
"saved MiB" is what autograd keeps between forward and backward; "peak MiB" is the memory a fwd+bwd step needs
beyond its inputs and the output gradient: the allocator's high-water mark on CUDA, and on the CPU the process's
peak resident set, measured in a fresh subprocess per provider (`--peak-rss`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastcore_kernels as fck  # noqa: E402
import fastcore_kernels.functional as fckF  # noqa: E402
from benchmarks.common import Results, device_profile, interleaved_time_ms, step_peak_mib, time_ms  # noqa: E402

RESNET34 = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (C, H=W) of the four stages
TABULAR = (4096, 200)


def stock(x, residual, rm, rv, w, b):
    y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return F.relu(y)


def ours(backend):
    def run(x, residual, rm, rv, w, b):
        if residual is None:
            return fckF.batch_norm_relu(x, rm, rv, w, b, True, backend=backend)
        return fckF.batch_norm_add_relu(x, residual, rm, rv, w, b, True, backend=backend)
    return run


def providers(device, with_compile):
    status = fck.backends()
    # FCK_BN_FUSED_CUDA=1 (read by the CUDA ops per call): planar channels of up to 16384 values in one kernel a pass
    fused = "-fused" if os.environ.get("FCK_BN_FUSED_CUDA") == "1" else ""
    # FCK_BN_VECTOR_CUDA=0: scalar accesses and the ReLU mask from y (the A/B of the 16-byte passes)
    fused += "-scalar" if os.environ.get("FCK_BN_VECTOR_CUDA") == "0" else ""
    out = {f"fck-{b}" + (fused if b == "cuda" else ""): ours(b) for b in ("cpu", "cuda", "triton")
           if device.type in status[b].devices and not (b == "triton" and device.type == "cpu")}
    out["torch"] = stock
    if with_compile:
        # The "bwd" mode replays one retained graph; a compiled backward that donates its buffers forbids that.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        out["torch-compile"] = torch.compile(stock)
    return out


def make_inputs(shape, device, dtype, residual, channels_last):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    res = (torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
           if residual else None)
    w = torch.rand(C, generator=g).add_(0.5).to(device).requires_grad_()
    b = torch.randn(C, generator=g).to(device).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    return x, res, torch.zeros(C, device=device), torch.ones(C, device=device), w, b, dy


def saved_mib(fn, args) -> float:
    """Bytes autograd saves for the backward (distinct storages), in MiB."""
    seen = {}

    def pack(t):
        if t.device.type != "meta" and t.numel():
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values()) / 2**20


def peak_rss_child(provider: str, shape: tuple, residual: bool) -> float:
    """Run in a fresh process: one fwd+bwd step; its peak resident set above the resident set before it, in MiB
    (the kernel's high-water mark is reset first, so import-time peaks do not hide the step's)."""
    x, r, rm, rv, w, b, dy = make_inputs(shape, torch.device("cpu"), torch.float32, residual, False)
    fn = ours(provider[4:]) if provider.startswith("fck-") else stock
    leaves = [t for t in (x, r, w, b) if t is not None]
    return step_peak_mib(lambda: torch.autograd.grad(fn(x, r, rm, rv, w, b), leaves, dy), torch.device("cpu"))


def peak_rss_mib(provider: str, shape: tuple, residual: bool) -> float | None:
    if provider == "torch-compile":
        return None
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
            f"from benchmarks.bench_batch_norm import peak_rss_child; "
            f"print(peak_rss_child({provider!r}, {tuple(shape)!r}, {residual!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_mib(step, device) -> float | None:
    return step_peak_mib(step, device) if device.type == "cuda" else None


def bench_bn(res, device, dtype, shape, residual, channels_last, makers, reps, peak_rss=False):
    op = "bn_add_relu" if residual else "bn_relu"
    label = "x".join(map(str, shape)) + (" cl" if channels_last else "")
    x, r, rm, rv, w, b, dy = make_inputs(shape, device, dtype, residual, channels_last)
    n, item = x.numel(), x.element_size()
    nbytes = {"fwd": (3 + residual) * n * item, "bwd": (7 + residual) * n * item}
    nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
    leaves = [t for t in (x, r, w, b) if t is not None]

    # Each provider updates its own running statistics: a compiled graph may save them for its backward, and a
    # retained graph must not see another provider's in-place update.
    def fwd_fn(fn):
        m, v = rm.clone(), rv.clone()
        return lambda: fn(x, r, m, v, w, b)

    def bwd_fn(fn):
        y = fn(x, r, rm.clone(), rv.clone(), w, b)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)

    def both_fn(fn):
        m, v = rm.clone(), rv.clone()
        return lambda: torch.autograd.grad(fn(x, r, m, v, w, b), leaves, dy)

    for mode, build in (("fwd", fwd_fn), ("bwd", bwd_fn), ("fwd+bwd", both_fn)):
        fns = {name: build(fn) for name, fn in makers.items()}
        if device.type == "cpu":
            timed = interleaved_time_ms(fns, reps=reps)
        else:
            timed = {name: time_ms(f, device) for name, f in fns.items()}
        for name, times in timed.items():
            extra = {}
            if mode == "fwd+bwd":
                extra["saved_mib"] = round(saved_mib(makers[name], (x, r, rm, rv, w, b)), 1)
                if device.type == "cuda":
                    extra.update(device_profile(fns[name], f"{label} {name}"))
            peak = None
            if mode == "fwd+bwd":
                peak = (peak_mib(fns[name], device) if device.type == "cuda" else
                        peak_rss_mib(name, shape, residual) if peak_rss and not channels_last else None)
            res.add(op, name, mode, label, times, nbytes[mode], peak_mem_mb=peak, dtype=str(dtype), **extra)
            shown = {k: v for k, v in extra.items() if k != "kernels"}
            print(f"  {op:<12}{label:<22}{mode:<8}{name:<14} p50 {times[1]:9.3f} ms {shown}", flush=True)
        del fns


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def bench_conv_eval(res, device, dtype, C, H, batch, channels_last, with_compile, reps):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, C, H, H, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to(device, dtype).to(memory_format=fmt)
    bn = torch.nn.BatchNorm2d(C).to(device, dtype)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    seq = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    fused = fck.fuse(seq).eval()
    fns = {"fck": lambda: fused(x), "torch": lambda: seq(x)}
    if device.type == "cpu":  # the same fused module with oneDNN's direct convolution instead of Winograd's
        direct = fck.fuse(seq).eval()
        fns["fck-direct"] = lambda: _with_env("FCK_CONV_WINOGRAD", "0", lambda: direct(x))
    if with_compile:
        compiled = torch.compile(seq)
        fns["torch-compile"] = lambda: compiled(x)
    label = f"{batch}x{C}x{H}x{H}" + (" cl" if channels_last else "")
    with torch.no_grad():
        timed = (interleaved_time_ms(fns, reps=reps) if device.type == "cpu"
                 else {name: time_ms(f, device) for name, f in fns.items()})
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y: the minimum of any conv
    for name, times in timed.items():
        res.add("conv_bn_relu", name, "eval", label, times, nbytes, dtype=str(dtype))
        print(f"  conv_bn_relu {label:<22}eval    {name:<14} p50 {times[1]:9.3f} ms", flush=True)


def bench_conv_train(res, device, dtype, C, H, batch, reps):
    """conv-BN-ReLU training, fwd+bwd (gradients of the input and every parameter)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, C, H, H, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(batch, C, H, H, generator=g).to(device, dtype)
    seq = torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, padding=1, bias=False), torch.nn.BatchNorm2d(C),
                              torch.nn.ReLU()).to(device, dtype).train()
    fused = fck.fuse(seq).train()

    def step(model, env=None):
        leaves = [x, *model.parameters()]
        run = lambda: torch.autograd.grad(model(x), leaves, dy)  # noqa: E731
        return (lambda: _with_env("FCK_CONV_WINOGRAD", env, run)) if env else run

    fns = {"fck": step(fused), "torch": step(seq)}
    if device.type == "cpu":
        fns["fck-direct"] = step(fused, "0")
    label = f"{batch}x{C}x{H}x{H}"
    timed = (interleaved_time_ms(fns, reps=reps) if device.type == "cpu"
             else {name: time_ms(f, device) for name, f in fns.items()})
    nbytes = 6 * x.numel() * x.element_size()  # fwd: read x, write y; bwd: read dy and x, write dx (+ y's mask)
    for name, times in timed.items():
        res.add("conv_bn_relu", name, "fwd+bwd", label, times, nbytes, dtype=str(dtype))
        print(f"  conv_bn_relu {label:<22}fwd+bwd {name:<14} p50 {times[1]:9.3f} ms", flush=True)


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--stages", default="0,1,2,3", help="which ResNet-34 stages (0: 64x56x56 ... 3: 512x7x7)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd stock BN ops")
    ap.add_argument("--compile-conv", action="store_true",
                    help="also time torch.compile'd conv-BN-ReLU (one compile per shape: slow)")
    ap.add_argument("--channels-last", action="store_true", help="also run channels_last layouts")
    ap.add_argument("--no-conv", action="store_true")
    ap.add_argument("--no-bn", action="store_true", help="conv-BN-ReLU only")
    ap.add_argument("--conv-train", action="store_true", help="also time conv-BN-ReLU training (fwd+bwd)")
    ap.add_argument("--peak-rss", action="store_true", help="CPU: measure each fwd+bwd's peak memory in a subprocess")
    ap.add_argument("--reps", type=int, default=7, help="CPU repetitions per provider (round-robin)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    res = Results(device, args.out)
    makers = providers(device, args.compile)
    stages = [RESNET34[int(s)] for s in args.stages.split(",") if s]
    layouts = [False, True] if args.channels_last else [False]
    for C, H in stages if not args.no_bn else ():
        for cl in layouts:
            for residual in (False, True):
                bench_bn(res, device, dtype, (args.batch, C, H, H), residual, cl, makers, args.reps, args.peak_rss)
    if not args.no_bn:
        bench_bn(res, device, dtype, TABULAR, False, False, makers, args.reps, args.peak_rss)
    if not args.no_conv:
        for C, H in stages:
            for cl in layouts:
                bench_conv_eval(res, device, dtype, C, H, args.batch, cl, args.compile_conv, args.reps)
            if args.conv_train:
                bench_conv_train(res, device, dtype, C, H, args.batch, args.reps)
    return res.finish("torch", args.out)


if __name__ == "__main__":
    main()
