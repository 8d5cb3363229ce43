"""LSTM/GRU fwd+bwd on the lessons' shapes: fastcore_kernels' modules vs torch.nn.LSTM/GRU (oneDNN on CPU, cuDNN on
CUDA) with the same weights, in the same run.

    python benchmarks/bench_rnn.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--out results.json]
                                   [--quick] [--backends cuda,triton] [--autocast]
    FCK_RNN_PERSISTENT_CUDA=0 python benchmarks/bench_rnn.py --device cuda   # CUDA's per-step loop, not the
                                                                              # persistent kernels (hidden <= 64)

Cases: the lesson-7 human-numbers RNN (embedding 64 -> hidden 64, 2 layers, batch 64, 70 steps), hidden 128 (LSTM and
GRU) and 256 (2 layers, batch 32, 70 steps), the AWD-LSTM shape (400 -> 1152, 3 layers, batch 32, 70 steps), the same
small LSTM with AWD-style weight dropout (a fresh W_hh every forward, which cuDNN must re-pack), PackedSequence
input (variable-length sequences: the lesson-7 shape and a text-classifier LSTM, lengths drawn from T/5 to T, as
pack_padded_sequence gives them), and the cells alone;
both libraries' modules in --dtype. Stock nn.LSTM/GRU on CUDA compute their fp32 GEMMs in TF32
(torch.backends.cudnn.allow_tf32 is on by default) while fastcore_kernels' follow torch's fp32 matmul precision (full
fp32 under "highest"): an fp32 CUDA run adds the like-for-like pairs, torch-fp32 (cuDNN with TF32 off) and
fck-cuda-tf32 (our GEMMs under set_float32_matmul_precision("high")). GB/s counts the activations each pass must move
at least: the input projection and saved gates written and read back, the outputs and their gradients. On a GPU each
row also records its costliest kernels. --autocast: fp32 modules, both libraries' steps inside torch.autocast (its
default dtype: bf16 on the CPU, fp16 on CUDA), as a mixed-precision training loop runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastcore_kernels as fck  # noqa: E402
from fastcore_kernels import nn as fnn  # noqa: E402
from benchmarks.common import Results, device_profile, interleaved_time_ms, time_ms  # noqa: E402


def cases(quick: bool):
    """(name, kind, input, hidden, layers, batch, steps, variant); kind "lstm/P": an LSTM with proj_size P; variant
    None, "weight drop" or "packed"."""
    out = [("lesson7 LSTM 64->64 x2, B64 T70", "lstm", 64, 64, 2, 64, 70, None),
           ("lesson7 GRU 64->64 x2, B64 T70", "gru", 64, 64, 2, 64, 70, None),
           ("lesson7 LSTM + weight drop", "lstm", 64, 64, 2, 64, 70, "weight drop"),
           ("LSTMCell 64->64, B64", "lstm_cell", 64, 64, 1, 64, 1, None),
           ("GRUCell 64->64, B64", "gru_cell", 64, 64, 1, 64, 1, None)]
    if not quick:
        # hidden 128 (CUDA: the persistent kernels, W_hh split between registers and shared memory) and 256 (the
        # per-step loop, its GEMM our own at 32 rows), then AWD's
        out.append(("LSTM 128->128 x2, B32 T70", "lstm", 128, 128, 2, 32, 70, None))
        out.append(("GRU 128->128 x2, B32 T70", "gru", 128, 128, 2, 32, 70, None))
        out.append(("LSTM 256->256 x2, B32 T70", "lstm", 256, 256, 2, 32, 70, None))
        # an LSTM with a projection (proj_size): torch's CPU path steps it natively, cuDNN has its own kernels
        out.append(("LSTM 256->512 proj 128 x2, B32 T70", "lstm/128", 256, 512, 2, 32, 70, None))
        out.append(("AWD LSTM 400->1152 x3, B32 T70", "lstm", 400, 1152, 3, 32, 70, None))
    # variable-length sequences last: on a GPU they are the newest path, and a stage cut off by its timeout keeps
    # the rows before them
    out.append(("lesson7 LSTM, packed T14-70", "lstm", 64, 64, 2, 64, 70, "packed"))
    if not quick:
        out.append(("LSTM 400->256 x2 bidir, B64 packed T20-100", "lstm/bidir", 400, 256, 2, 64, 100, "packed"))
        out.append(("LSTM 256->512 proj 128 x2, B32 packed T14-70", "lstm/128", 256, 512, 2, 32, 70, "packed"))
    return out


def _modules(kind, I, H, L, device, dtype=torch.float32):
    torch.manual_seed(0)
    pairs = {"lstm": (nn.LSTM, fnn.LSTM), "gru": (nn.GRU, fnn.GRU), "lstm_cell": (nn.LSTMCell, fnn.LSTMCell),
             "gru_cell": (nn.GRUCell, fnn.GRUCell)}
    kind, _, option = kind.partition("/")
    tcls, ocls = pairs[kind]
    kw = {} if kind.endswith("cell") else {"num_layers": L}
    if option == "bidir":
        kw["bidirectional"] = True
    elif option:
        kw["proj_size"] = int(option)
    theirs = tcls(I, H, **kw).to(device, dtype)
    ours = ocls(I, H, **kw).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _step(module, kind, x, weight_drop, raw):
    def run():
        if weight_drop:  # AWD-LSTM's WeightDropout: W_hh is a new tensor every forward
            module.weight_hh_l0 = F.dropout(raw, 0.5, True)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
        out.backward(torch.ones_like(out))
    return run


@contextlib.contextmanager
def _matmul_precision(precision):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _under(ctx, f):
    def run():
        with ctx():
            f()
    return run


def _min_bytes(kind, I, H, L, B, T, elem=4):
    G = 4 if "lstm" in kind else 3
    D = 2 if kind.endswith("bidir") else 1
    per_layer = T * B * (2 * G * H + 2 * G * H + 4 * H)  # xg + dxg, saved gates written + read, h/c and grads
    return int(elem * (L * D * per_layer + T * B * I * 2))


def main(argv=None) -> Results:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision for the run: under medium torch's fp32 CPU matmuls, "
                         "and fastcore_kernels' fp32 recurrent steps on AMX CPUs, compute in bf16")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="skip hidden 128, 256 and the AWD-LSTM shape (minutes on a "
                    "small CPU)")
    ap.add_argument("--backends", default="", help="comma-separated fastcore_kernels backends to time (default: all "
                    "that run on the device)")
    ap.add_argument("--autocast", action="store_true", help="fp32 modules stepped inside torch.autocast")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text (e.g. packed)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.autocast and args.dtype != "float32":
        ap.error("--autocast steps fp32 modules; leave --dtype at float32")
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    res = Results(device, args.out)
    backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    backends = [b for b in backends if device.type in fck.backends()[b].devices
                and (not args.backends or b in args.backends.split(","))]
    # CUDA runs hidden <= 64 as one persistent kernel per pass; FCK_RNN_PERSISTENT_CUDA=0 (read per call) the loop
    suffix = "-per-step" if os.environ.get("FCK_RNN_PERSISTENT_CUDA") == "0" else ""
    dtype = getattr(torch, args.dtype)
    like_for_like = (device.type == "cuda" and dtype == torch.float32 and args.matmul_precision == "highest"
                     and not args.autocast)
    elem, dtype_name = dtype.itemsize, str(dtype)
    if args.autocast:
        low = torch.get_autocast_dtype(device.type)
        elem, dtype_name = low.itemsize, f"autocast {low}"
    for name, kind, I, H, L, B, T, variant in cases(args.quick):
        if args.only and args.only not in name:
            continue
        weight_drop = variant == "weight drop"
        theirs, ours = _modules(kind, I, H, L, device, dtype)
        x = torch.randn((B, I) if kind.endswith("cell") else (T, B, I), device=device, dtype=dtype,
                        requires_grad=True)
        rows = T * B
        if variant == "packed":  # sequences of T/5 to T steps, the longest T, in a fixed random order
            lengths = torch.randint(T // 5, T + 1, (B,), generator=torch.Generator().manual_seed(0))
            lengths[0] = T
            packed = nn.utils.rnn.pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
            x = nn.utils.rnn.PackedSequence(packed.data.requires_grad_(), *packed[1:])
            rows = int(lengths.sum())
        fns = {}
        for module, provider in ((theirs, "torch"), (ours, None)):
            raw = None
            if weight_drop:
                raw = nn.Parameter(module.weight_hh_l0.detach().clone())
                del module._parameters["weight_hh_l0"]
            if provider:
                fns[provider] = _step(module, kind, x, weight_drop, raw)
                if like_for_like:
                    fns["torch-fp32"] = _under(lambda: torch.backends.cudnn.flags(enabled=True, allow_tf32=False),
                                               fns[provider])
            else:
                for b in backends:
                    def run(b=b, f=_step(module, kind, x, weight_drop, raw)):
                        with fck.use_backend(b):
                            f()
                    fns[f"fck-{b}" + (suffix if b == "cuda" else "")] = run
                    if like_for_like and b == "cuda":
                        fns[f"fck-cuda{suffix}-tf32"] = _under(lambda: _matmul_precision("high"), run)
        if args.autocast:
            fns = {p: _under(lambda: torch.autocast(device.type), f) for p, f in fns.items()}
        reps = 3 if I >= 400 and device.type == "cpu" else args.reps
        timed = (interleaved_time_ms(fns, reps=reps) if device.type == "cpu"
                 else {p: time_ms(f, device) for p, f in fns.items()})
        for p, times in timed.items():
            extra = device_profile(fns[p], p, show=6) if device.type == "cuda" else {}
            res.add("rnn", p, "fwd+bwd", name, times, _min_bytes(kind, I, H, L, rows / T, T, elem),
                    dtype=dtype_name, matmul_precision=args.matmul_precision, **extra)
            print(f"  {name:<34}{p:<12} p50 {times[1]:10.3f} ms", flush=True)
    return res.finish("torch", args.out)


if __name__ == "__main__":
    main()
