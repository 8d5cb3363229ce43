"""pytest-benchmark view of one Adam step (ResNet-34's parameter set) for the optimizers that run on this machine:
    python -m pytest benchmarks/test_bench_adam.py --benchmark-only
Not part of the test suite (tests/); the CLI in bench_adam.py adds bandwidth, the 100M set and JSON rows."""

import pytest
import torch

from benchmarks.bench_adam import make_params, providers, resnet34_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", list(providers(DEVICE)))
def test_adam_step_resnet34(benchmark, provider):
    params = make_params(resnet34_shapes(), DEVICE)
    opt = providers(DEVICE)[provider](params)
    opt.step()

    def step():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
