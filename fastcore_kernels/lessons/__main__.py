"""`fastcore-kernels lesson N [--part NAME] [--data PATH] [--epochs E] [--kernels fused|stock|both]
[--device cpu|cuda] [--quick] [--out DIR] [--weights PATH] [--mixed-precision]`"""

from __future__ import annotations

import argparse

from fastcore_kernels.lessons import run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastcore-kernels", description="Run a lesson of the course, fused vs stock.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lesson", help="run a lesson (all its parts, or one)")
    p.add_argument("n", type=int, help="lesson number")
    p.add_argument("--part", default=None, help="one part of the lesson (default: all)")
    p.add_argument("--data", default=None, help="a folder in the real format (default: the embedded data)")
    p.add_argument("--epochs", type=int, default=None, help="override each model's default epoch count")
    p.add_argument("--kernels", choices=("fused", "stock", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--quick", action="store_true", help="a short smoke run: one epoch on a slice of the data")
    p.add_argument("--out", default="lesson_out", help="folder for plots and results.json")
    p.add_argument("--weights", default=None, help="lesson 1: a torchvision-format ResNet-18 state_dict to start from")
    p.add_argument("--mixed-precision", action="store_true", help="train under torch.autocast (bf16 on the CPU, "
                   "fp16 with a GradScaler on CUDA): the Learner's MixedPrecision callback, fused and stock alike")
    args = ap.parse_args(argv)
    run(args.n, args.part, data=args.data, epochs=args.epochs, kernels=args.kernels, device=args.device,
        quick=args.quick, out=args.out, weights=args.weights, mixed_precision=args.mixed_precision)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
