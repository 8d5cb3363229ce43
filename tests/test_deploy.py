"""What users do to ship a fused model: torch.jit.trace and torch.export give what the eager model gives, in train
and eval mode; torch.jit.script refuses with a clear error and leaves the model as it was."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels import nn as fnn

from conftest import ResNetBlock


def _cases():
    g = torch.Generator().manual_seed(0)
    return {
        "BatchNorm1d": (lambda: fnn.BatchNorm1d(4), (torch.randn(5, 4, generator=g),)),
        "BatchNormReLU2d": (lambda: fnn.BatchNormReLU2d(4), (torch.randn(2, 4, 5, 5, generator=g),)),
        "ConvBNReLU2d": (lambda: fnn.ConvBNReLU2d(3, 4, 3), (torch.randn(2, 3, 8, 8, generator=g),)),
        "fused block": (lambda: fck.fuse(ResNetBlock()), (torch.randn(2, 3, 8, 8, generator=g),)),
        "Embedding": (lambda: fnn.Embedding(10, 3, padding_idx=0), (torch.randint(0, 10, (4, 5), generator=g),)),
        "EmbeddingBag": (lambda: fnn.EmbeddingBag(10, 3, mode="max"), (torch.randint(0, 10, (4, 5), generator=g),)),
        "LSTM": (lambda: fnn.LSTM(3, 4, 2, batch_first=True), (torch.randn(2, 6, 3, generator=g),)),
        "GRU": (lambda: fnn.GRU(3, 4, bidirectional=True), (torch.randn(6, 2, 3, generator=g),)),
        "LSTMCell": (lambda: fnn.LSTMCell(3, 4), (torch.randn(2, 3, generator=g),)),
        "GRUCell": (lambda: fnn.GRUCell(3, 4), (torch.randn(2, 3, generator=g),)),
        "MaxPool2d": (lambda: fnn.MaxPool2d(3, 2, 1), (torch.randn(2, 3, 9, 8, generator=g),)),
        "AvgPool2d": (lambda: fnn.AvgPool2d(3, 2, 1), (torch.randn(2, 3, 9, 8, generator=g),)),
        # enough tiles for the CPU's Winograd path in eval
        "conv + ReLU": (lambda: fck.fuse(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())),
                        (torch.randn(9, 16, 17, 15, generator=g),)),
    }


CASES = _cases()


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]


def _randomized(make):
    torch.manual_seed(1)
    model = make()
    for m in model.modules():  # running statistics that differ from the batch's, so eval mode shows
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("how", ["trace", "export"])
@pytest.mark.parametrize("name", list(CASES))
def test_traced_and_exported_models_match_eager(name, how, mode):
    make, args = CASES[name]
    base = _randomized(make).train(mode == "train")
    expected = _flat(copy.deepcopy(base)(*args))
    model = copy.deepcopy(base)
    if how == "trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            deployed = torch.jit.trace(model, args, check_trace=False)
    else:
        deployed = torch.export.export(model, args).module()
    got = _flat(deployed(*args))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_script_refuses_clearly_and_leaves_the_model_alone(name):
    make, args = CASES[name]
    model = nn.Sequential(make())
    before = [type(m) for m in model.modules()]
    expected = _flat(copy.deepcopy(model).eval()(*args))
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile fastcore_kernels' \w+"):
        torch.jit.script(model)
    assert [type(m) for m in model.modules()] == before
    for g, e in zip(_flat(model.eval()(*args)), expected):
        torch.testing.assert_close(g, e)
