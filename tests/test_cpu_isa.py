"""The CPU kernels' AVX-512 and AVX2 variants agree bit for bit: the panel GEMM (an RNN's recurrent step, the
Winograd convolution's batched GEMMs) sums each output's terms in the same order on both. Run on an AVX-512 CPU,
this also covers the AVX2 kernels, which that CPU would otherwise never take. On a CPU with AMX, the bf16 recurrent
steps run both on AMX and on the fp32 panels (different sums: each checked against float64)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import skip_unless_runnable

_SCRIPT = r"""
import sys, torch
import fastcore_kernels as fck
from fastcore_kernels import nn as fnn
torch.manual_seed(0)
out = {}
lstm = fnn.LSTM(24, 40, num_layers=2, bidirectional=True)
x = torch.randn(9, 5, 24, requires_grad=True)
y, (h, c) = lstm(x)
(y.square().sum() + h.sum() + c.sum()).backward()
out["lstm"] = [y, h, c, x.grad] + [p.grad for p in lstm.parameters()]
if torch.ops.fck.winograd_available():  # the eval convolution, the training input and weight gradients
    conv, pack = torch.ops.fck.conv3x3_winograd, torch.ops.fck.winograd_weight
    w, b, x1, x2 = torch.randn(48, 20, 3, 3), torch.randn(48), torch.randn(3, 20, 13, 11), torch.randn(3, 48, 9, 14)
    out["winograd"] = ([conv(x1, pack(w, m), b, [1, 1], 48, True) for m in (2, 4)] +
                       [conv(x2, pack(w, m, True), None, [1, 1], 20, False) for m in (2, 4)] +
                       [torch.ops.fck.conv3x3_winograd_weight_grad(x1, torch.randn(3, 48, 13, 11), [1, 1], m)
                        for m in (2, 4)])
torch.save({k: [t.detach() for t in v] for k, v in out.items()}, sys.argv[1])
"""


def _fresh_runs(tmp_path, script, flag):
    """`script` run in a fresh process without, then with, the environment flag `flag`=1 (each kernel choice is made
    once per process); what each saved to the path it got as argv[1], if anything."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    runs = []
    for flagged in (False, True):
        path = tmp_path / f"{flag}-{flagged}.pt"
        run_env = dict(env, **{flag: "1"}) if flagged else {k: v for k, v in env.items() if k != flag}
        subprocess.run([sys.executable, "-c", script, str(path)], env=run_env, cwd=root, check=True, timeout=300)
        runs.append(torch.load(path, weights_only=True) if path.exists() else None)
    return runs


def test_avx512_and_avx2_kernels_agree_bit_for_bit(tmp_path):
    skip_unless_runnable("cpu", "cpu")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        pytest.skip("this CPU has no AVX-512: only the AVX2 kernels run here")
    runs = _fresh_runs(tmp_path, _SCRIPT, "FCK_NO_AVX512")
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        for a, b in zip(runs[0][key], runs[1][key]):
            assert torch.equal(a, b), key


def _skip_without_amx(why):
    skip_unless_runnable("cpu", "cpu")
    cpuinfo = Path("/proc/cpuinfo")
    if "amx_bf16" not in (cpuinfo.read_text() if cpuinfo.exists() else ""):
        pytest.skip(f"this CPU has no AMX: {why}")


def test_bf16_recurrent_steps_without_amx(tmp_path):
    """On a CPU with AMX, bf16 recurrent steps run on AMX tiles; FCK_NO_AMX=1 keeps them on the fp32 panels, which
    CPUs without AMX take. Both against torch's float64 result, in a fresh process each (the choice is made once)."""
    _skip_without_amx("the bf16 tests run the fp32 panels already")
    script = ("import sys, torch; sys.path.insert(0, 'tests'); import test_rnn as t\n"
              "for mode, hidden in (('lstm', 131), ('gru', 640)):\n"
              "    t.test_larger_shapes_half_precision(mode, hidden, torch.bfloat16)\n"
              "t._check_against_float64('cpu', 'cpu', 'lstm', torch.bfloat16,"
              " t.CONFIGS['2-layer bidirectional batch_first'])\n")
    _fresh_runs(tmp_path, script, "FCK_NO_AMX")


def test_medium_matmul_precision_takes_the_amx_tiles(tmp_path):
    """Under torch.set_float32_matmul_precision("medium"), fp32 recurrent steps run on the AMX tiles: the same run
    with FCK_NO_AMX=1 (steps on the fp32 panels; the input projections on torch's matmul in both) gives other bits.
    The accuracy of the bf16 steps is tested in test_rnn.py."""
    _skip_without_amx("fp32 steps stay fp32 under every matmul precision")
    script = ("import sys, torch\nfrom fastcore_kernels import nn as fnn\n"
              "torch.manual_seed(0)\ntorch.set_float32_matmul_precision('medium')\n"
              "m = fnn.LSTM(16, 48, num_layers=2)\nx = torch.randn(6, 5, 16)\n"
              "y, (h, c) = m(x)\ntorch.save([y.detach(), h.detach(), c.detach()], sys.argv[1])\n")
    runs = _fresh_runs(tmp_path, script, "FCK_NO_AMX")
    assert not any(torch.equal(a, b) for a, b in zip(*runs))
