"""LSTM and GRU cells and layers in plain PyTorch: the specification every backend of `fck::lstm_layer_*` and
`fck::gru_layer_*` is tested against. Autograd through these ops gives the reference gradients.

PyTorch's gate order and equations (torch.nn.LSTMCell / GRUCell). The matmuls run in the input's dtype, as the
kernels' BLAS calls do; the pointwise math and the LSTM cell state run in fp32 (float64 for float64), and h is
rounded to the input's dtype after every step, as the kernels store it.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steps(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def _bias(b, acc):
    return 0 if b is None else b.to(acc)


def lstm_layer(xg, h0, c0, w_hh, bias=None, reverse=False, w_hr=None):
    """One LSTM layer over a sequence, given the input projection xg = x W_ih^T of shape (T, B, 4H) and
    bias = b_ih + b_hh. Returns (output (T, B, H), h_n, c_n). With w_hr (P, H), torch's proj_size: h is projected,
    h_t = W_hr (o_t * tanh(c_t)), and output and h_n are P wide (h0 too; c stays H wide)."""
    acc = acc_dtype(xg.dtype)
    h, c = h0, c0.to(acc)
    b = _bias(bias, acc)
    outs = [None] * xg.shape[0]
    for t in _steps(xg.shape[0], reverse):
        p = xg[t].to(acc) + (h @ w_hh.t()).to(acc) + b
        i, f, g, o = p.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = (torch.sigmoid(o) * torch.tanh(c)).to(xg.dtype)
        if w_hr is not None:
            h = h @ w_hr.t()
        outs[t] = h
    return torch.stack(outs), h, c.to(xg.dtype)


def gru_layer(xg, h0, w_hh, b_ih=None, b_hh=None, reverse=False):
    """One GRU layer over a sequence, given xg = x W_ih^T of shape (T, B, 3H). Returns (output, h_n)."""
    acc = acc_dtype(xg.dtype)
    h = h0
    bi, bh = _bias(b_ih, acc), _bias(b_hh, acc)
    outs = [None] * xg.shape[0]
    for t in _steps(xg.shape[0], reverse):
        ar, az, an = (xg[t].to(acc) + bi).chunk(3, 1)
        br, bz, bn = ((h @ w_hh.t()).to(acc) + bh).chunk(3, 1)
        r, z = torch.sigmoid(ar + br), torch.sigmoid(az + bz)
        n = torch.tanh(an + r * bn)
        h = (n + z * (h.to(acc) - n)).to(xg.dtype)
        outs[t] = h
    return torch.stack(outs), h


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch.nn.functional-style LSTM cell: returns (h', c')."""
    h, c = hx
    b = None if b_ih is None else b_ih + b_hh
    out, h1, c1 = lstm_layer((input @ w_ih.t()).unsqueeze(0), h, c, w_hh, b)
    return h1, c1


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch.nn.functional-style GRU cell: returns h'."""
    return gru_layer((input @ w_ih.t()).unsqueeze(0), hx, w_hh, b_ih, b_hh)[1]
