"""Whole torchvision models, stock against `fastcore_kernels.fuse()`'d, in the same run: inference (eval,
inference_mode) and optionally a training step (forward, backward of the sum, no optimizer), fp32, the weights
stored NCHW and/or channels_last (`--layouts`; the input is NCHW). The copies hold the same weights; their calls
alternate (round-robin), so the machine's drift falls on all alike. "vs torch" is against stock NCHW.
Bytes: the input batch (a model's time is not bandwidth-bound; the column is there for the common table).

    python -m benchmarks.bench_models [--device cpu] [--models resnet18,vgg11,...] [--batch 16] [--train]
                                      [--layouts nchw,channels_last] [--compile] [--reps 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import unittest.mock
import warnings

import torch

from benchmarks.common import Results, interleaved_time_ms, time_ms

# name -> (constructor keywords, image size)
MODELS = {
    "resnet18": ({}, 224), "resnet34": ({}, 224), "resnet50": ({}, 224), "densenet121": ({}, 224),
    "mobilenet_v2": ({}, 224),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 224),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 299),
    "vgg11": ({}, 224), "vgg16": ({}, 224), "squeezenet1_1": ({}, 224), "alexnet": ({}, 224),
    "mobilenet_v3_large": ({}, 224), "efficientnet_b0": ({}, 224), "mnasnet1_0": ({}, 224),
}
DEFAULT = ("resnet18,resnet50,densenet121,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,googlenet,inception_v3,"
           "vgg11,squeezenet1_1,alexnet")


def bench_model(res, device, name, batch, train, reps, layouts=("nchw",), compile_stock=False):
    import torchvision.models as tvm

    import fastcore_kernels as fck

    kw, size = MODELS[name]
    torch.manual_seed(0)
    stock = getattr(tvm, name)(weights=None, **kw).to(device)
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "nchw" in layouts:
            models["torch"], models["fck"] = stock, fck.fuse(copy.deepcopy(stock))
        if "channels_last" in layouts:  # the same weights stored channels_last: NHWC activations on both sides
            models["torch-cl"] = copy.deepcopy(stock).to(memory_format=torch.channels_last)
            models["fck-cl"] = fck.fuse(copy.deepcopy(stock), channels_last=True)
        if compile_stock:  # Inductor compiles on the first (warm-up) call
            for suffix in [s for s, layout in (("", "nchw"), ("-cl", "channels_last")) if layout in layouts]:
                models["torch.compile" + suffix] = torch.compile(copy.deepcopy(models["torch" + suffix]))
    x = torch.randn(batch, 3, size, size, device=device)

    def run(model):
        model.train(train)
        if train:
            return lambda: model(x).sum().backward()

        def step():
            with torch.inference_mode():
                return model(x)
        return step

    fns = {provider: run(model) for provider, model in models.items()}
    settings = contextlib.nullcontext()
    if compile_stock:  # inference compiled as Inductor is told to for it (freezing: weights folded, prepacked)
        import torch._inductor.config as inductor_config

        settings = unittest.mock.patch.object(inductor_config, "freezing", not train)
    with settings:
        timed = interleaved_time_ms(fns, reps=reps) if device.type == "cpu" else \
            {provider: time_ms(f, device, reps) for provider, f in fns.items()}
    mode = "train step" if train else "inference"
    for provider, times in timed.items():
        res.add(name, provider, mode, f"{batch}x3x{size}x{size}", times, x.numel() * 4)
    for suffix in ("", "-cl"):
        if "torch" + suffix in timed:
            stock_ms, fused_ms = timed["torch" + suffix][1], timed["fck" + suffix][1]
            compiled = timed.get("torch.compile" + suffix)
            print(f"  {name:<19}{mode:<11}{suffix or '   ':<4}torch p50 {stock_ms:9.1f} ms   fck p50 {fused_ms:9.1f} ms"
                  f"   {stock_ms / fused_ms:5.2f}x" + (f"   torch.compile p50 {compiled[1]:9.1f} ms   fck "
                                                      f"{compiled[1] / fused_ms:5.2f}x it" if compiled else ""),
                  flush=True)


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=DEFAULT, help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", action="store_true", help="time a training step instead of inference")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per provider (round-robin)")
    ap.add_argument("--layouts", default="nchw", help="comma-separated, of: nchw, channels_last (the weights stored "
                    "channels_last on both sides: fuse(..., channels_last=True) and model.to(memory_format=...))")
    ap.add_argument("--compile", action="store_true", help="also stock torch.compile'd (for inference with "
                    "Inductor's freezing), in each layout")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"nchw", "channels_last"}:
        raise SystemExit(f"--layouts takes nchw and/or channels_last, got {args.layouts!r}")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise SystemExit("bench_models needs torchvision")
    device = torch.device(args.device)
    res = Results(device, args.out)
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        bench_model(res, device, name, args.batch, args.train, args.reps, layouts, args.compile)
    return res.finish("torch", args.out)


if __name__ == "__main__":
    main()
