"""One Adam step on realistic parameter sets: fastcore_kernels' FusedAdam backends vs torch.optim.Adam (for-loop,
foreach, fused) and torch.compile'd Adam, in the same run.

    python benchmarks/bench_adam.py [--device cpu|cuda] [--sets resnet34,100m] [--out results.json]

Bytes per step are 28 per fp32 parameter (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastcore_kernels as fck  # noqa: E402
from benchmarks.common import Results, device_time_ms, interleaved_time_ms, step_peak_mib, time_ms  # noqa: E402

BYTES_PER_PARAM = 28


def resnet34_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet34 (21,797,672 parameters), in module order."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if b == 0 and (s != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1000, 512), (1000,)]


def transformer_100m_shapes(layers: int = 8, d: int = 1024) -> list[tuple[int, ...]]:
    """8 pre-norm transformer blocks of width 1024 (~100.7M parameters): many large and many tiny tensors."""
    shapes = []
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


PARAM_SETS = {"resnet34": resnet34_shapes, "100m": transformer_100m_shapes}


def make_params(shapes, device):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def providers(device: torch.device) -> dict:
    make = {}
    status = fck.backends()
    for backend in ("cpu", "cuda", "triton"):
        if device.type in status[backend].devices and not (backend == "triton" and device.type == "cpu"):
            make[f"fck-{backend}"] = lambda ps, b=backend: fck.FusedAdam(ps, lr=1e-3, backend=b)
    make["torch-forloop"] = lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False)
    make["torch-foreach"] = lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)
    make["torch-fused"] = lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)
    return make


def compiled_torch_adam(params):
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    return opt, torch.compile(opt.step)


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", default="resnet34,100m")
    ap.add_argument("--providers", default="", help="comma-separated subset (default: all that run here)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd torch Adam (slow to build)")
    ap.add_argument("--reps", type=int, default=10, help="CPU repetitions per provider (run round-robin)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    res = Results(device)
    wanted = [p for p in args.providers.split(",") if p]
    for set_name in args.sets.split(","):
        shapes = PARAM_SETS[set_name]()
        nparams = sum(torch.Size(s).numel() for s in shapes)
        label = f"{set_name} ({nparams / 1e6:.1f}M)"
        makers = providers(device)
        if args.compile:
            makers["torch-compile"] = None
        if wanted:
            makers = {k: v for k, v in makers.items() if k in wanted}
        if device.type == "cpu":
            steps = {name: (compiled_torch_adam(make_params(shapes, device))[1] if make is None
                            else make(make_params(shapes, device)).step) for name, make in makers.items()}
            for name, times in interleaved_time_ms(steps, reps=args.reps).items():
                res.add("adam", name, "step", label, times, BYTES_PER_PARAM * nparams, tensors=len(shapes))
                print(f"  {label:<20} {name:<16} p50 {times[1]:9.3f} ms", flush=True)
            del steps
            continue
        for name, make in makers.items():
            params = make_params(shapes, device)
            if make is None:
                _, step = compiled_torch_adam(params)
            else:
                step = make(params).step
            step()  # lazy state allocation happens here, outside both measurements
            # Extra memory one step needs beyond params, grads and state (do_bench's own L2-flush buffer would swamp
            # it, so this is measured on a separate step).
            peak = step_peak_mib(step, device) if device.type == "cuda" else None
            times = time_ms(step, device, reps=args.reps)
            extra = dict(tensors=len(shapes))
            if device.type == "cuda":
                extra["device_ms"] = round(device_time_ms(step), 4)
            res.add("adam", name, "step", label, times, BYTES_PER_PARAM * nparams, peak_mem_mb=peak, **extra)
            print(f"  {label:<20} {name:<16} p50 {times[1]:9.3f} ms  {extra}", flush=True)
            del params, step
    return res.finish("torch-fused", args.out)


if __name__ == "__main__":
    main()
