"""Functional forms of the fused ops, with torch.nn.functional's signatures where torch has the op.

Every function takes a keyword-only `backend` ("auto", "reference", "cpu", "cuda", "triton"); by default the
choice of `fastcore_kernels.set_backend`/`use_backend`/FCK_BACKEND applies.
"""

from __future__ import annotations

from fastcore_kernels.ops.batch_norm import batch_norm_act, residual_in_one_dtype
from fastcore_kernels.ops.conv_bn_relu import conv2d, conv2d_relu, conv_bn_relu
from fastcore_kernels.ops.embedding_bag import embedding, embedding_bag
from fastcore_kernels.ops.avg_pool import avg_pool2d
from fastcore_kernels.ops.max_pool import max_pool2d
from fastcore_kernels.ops import rnn as _rnn


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               backend=None):
    """torch.nn.functional.batch_norm: statistics in fp32 (float64 for float64 input); running statistics updated
    in place when training (unbiased variance)."""
    return batch_norm_act(input, None, running_mean, running_var, weight, bias, training, momentum, eps, False,
                          backend, "batch_norm")


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5, *, backend=None):
    """relu(batch_norm(input, ...)) in one pass; the backward recovers the ReLU mask from the output."""
    return batch_norm_act(input, None, running_mean, running_var, weight, bias, training, momentum, eps, True,
                          backend, "batch_norm_relu")


def batch_norm_add_relu(input, residual, running_mean, running_var, weight=None, bias=None, training=False,
                        momentum=0.1, eps=1e-5, *, backend=None):
    """relu(batch_norm(input, ...) + residual): the tail of a ResNet block in one pass. The add's dtype rule is
    torch's: an input and residual of different float dtypes (under autocast, say) promote."""
    input, residual = residual_in_one_dtype(input, residual)
    return batch_norm_act(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, True,
                          backend, "batch_norm_add_relu")


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One LSTM step, torch.nn.LSTMCell's math and gate order (i, f, g, o): returns (h', c'). The matmuls go to
    BLAS; bias adds, gate nonlinearities and the state update are one fused kernel each way."""
    return _rnn.lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One GRU step, torch.nn.GRUCell's math and gate order (r, z, n): returns h'."""
    return _rnn.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend)


def lstm(input, params, hx=None, *, has_biases=True, num_layers=1, dropout=0.0, training=False,
         bidirectional=False, batch_first=False, proj_size=0, backend=None):
    """torch.nn.LSTM's forward over a whole sequence: returns (output, (h_n, c_n)). `params` are the weights in
    torch's flat order (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction, as `module._flat_weights`; w_hr
    with proj_size > 0, whose h, output and h_n are proj_size wide). `input` may be a PackedSequence: the output is
    then packed like it and the states are in the caller's batch order, as the module returns them."""
    return _rnn.lstm(input, params, hx, has_biases, num_layers, dropout, training, bidirectional, batch_first,
                     backend, proj_size)


def gru(input, params, hx=None, *, has_biases=True, num_layers=1, dropout=0.0, training=False,
        bidirectional=False, batch_first=False, backend=None):
    """torch.nn.GRU's forward over a whole sequence: returns (output, h_n). `input` may be a PackedSequence."""
    return _rnn.gru(input, params, hx, has_biases, num_layers, dropout, training, bidirectional, batch_first,
                    backend)


__all__ = ["batch_norm", "batch_norm_relu", "batch_norm_add_relu", "conv_bn_relu", "conv2d", "conv2d_relu", "embedding",
           "embedding_bag", "lstm_cell", "gru_cell", "lstm", "gru", "max_pool2d", "avg_pool2d"]
