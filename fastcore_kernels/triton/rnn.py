"""LSTM and GRU layers with Triton cell kernels (the fck::lstm_layer_*/gru_layer_* contract).

The loops mirror csrc/include/fck/rnn_host.h: per time step one torch.mm of the hidden state with W_hh (cuBLAS)
into a reused buffer, then one fused pointwise kernel that also adds the biases; W_hh's gradient is one GEMM over all steps after the loop.
A program handles BLOCK (row, hidden unit) pairs and all gates of each, so the cell update needs no exchange.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcore_kernels.triton._common import _cast

BLOCK = 256


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _pre(XG, HG, BIAS, g0, j, q, H, m, ACC: tl.constexpr):
    """Pre-activation of gate chunk q: x part + h part + bias."""
    return (tl.load(XG + g0 + q * H, mask=m).to(ACC) + tl.load(HG + g0 + q * H, mask=m).to(ACC)
            + tl.load(BIAS + j + q * H, mask=m).to(ACC))


@triton.jit
def _lstm_fwd(
    XG,  # [B, 4H] input projection of this step
    HG,  # [B, 4H] h_prev W_hh^T
    BIAS,  # [4H] b_ih + b_hh
    C_PREV,  # [B, H] acc dtype
    GATES,  # [B, 4H] acc dtype out: activated i, f, g, o
    C,  # [B, H] acc dtype out
    Hout,  # [B, H] out
    n, H,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    j = k % H
    g0 = (k // H) * 4 * H + j
    ACC = C.dtype.element_ty
    i = _sigmoid(_pre(XG, HG, BIAS, g0, j, 0, H, m, ACC))
    f = _sigmoid(_pre(XG, HG, BIAS, g0, j, 1, H, m, ACC))
    g = _tanh(_pre(XG, HG, BIAS, g0, j, 2, H, m, ACC))
    o = _sigmoid(_pre(XG, HG, BIAS, g0, j, 3, H, m, ACC))
    c = f * tl.load(C_PREV + k, mask=m) + i * g
    tl.store(GATES + g0, i, mask=m)
    tl.store(GATES + g0 + H, f, mask=m)
    tl.store(GATES + g0 + 2 * H, g, mask=m)
    tl.store(GATES + g0 + 3 * H, o, mask=m)
    tl.store(C + k, c, mask=m)
    tl.store(Hout + k, _cast(o * _tanh(c), Hout.dtype.element_ty), mask=m)


@triton.jit
def _lstm_bwd(
    DOUT, DH_REC,  # [B, H] gradient reaching h' from the output and from the next step's GEMM
    GATES, C_PREV, C,  # saved (acc dtype)
    DC,  # [B, H] acc dtype, in: gradient of c', out: gradient of c_prev
    DXG,  # [B, 4H] out: pre-activation gradients
    n, H,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    g0 = (k // H) * 4 * H + k % H
    ACC = DC.dtype.element_ty
    i = tl.load(GATES + g0, mask=m)
    f = tl.load(GATES + g0 + H, mask=m)
    g = tl.load(GATES + g0 + 2 * H, mask=m)
    o = tl.load(GATES + g0 + 3 * H, mask=m)
    dh = tl.load(DOUT + k, mask=m).to(ACC) + tl.load(DH_REC + k, mask=m).to(ACC)
    tc = _tanh(tl.load(C + k, mask=m))
    dc = tl.load(DC + k, mask=m) + dh * o * (1.0 - tc * tc)
    DT = DXG.dtype.element_ty
    tl.store(DXG + g0, _cast(dc * g * i * (1.0 - i), DT), mask=m)
    tl.store(DXG + g0 + H, _cast(dc * tl.load(C_PREV + k, mask=m) * f * (1.0 - f), DT), mask=m)
    tl.store(DXG + g0 + 2 * H, _cast(dc * i * (1.0 - g * g), DT), mask=m)
    tl.store(DXG + g0 + 3 * H, _cast(dh * tc * o * (1.0 - o), DT), mask=m)
    tl.store(DC + k, dc * f, mask=m)


@triton.jit
def _gru_fwd(
    XG,  # [B, 3H] x W_ih^T
    HG,  # [B, 3H] h_prev W_hh^T
    B_IH, B_HH,  # [3H]
    H_PREV,  # [B, H]
    SAVED,  # [B, 4H] acc dtype out: r, z, n, b_n
    Hout,  # [B, H] out
    n, H,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    row = k // H
    j = k % H
    g0 = row * 3 * H + j
    s0 = row * 4 * H + j
    ACC = SAVED.dtype.element_ty
    a_r = tl.load(XG + g0, mask=m).to(ACC) + tl.load(B_IH + j, mask=m).to(ACC)
    a_z = tl.load(XG + g0 + H, mask=m).to(ACC) + tl.load(B_IH + j + H, mask=m).to(ACC)
    a_n = tl.load(XG + g0 + 2 * H, mask=m).to(ACC) + tl.load(B_IH + j + 2 * H, mask=m).to(ACC)
    r = _sigmoid(a_r + tl.load(HG + g0, mask=m).to(ACC) + tl.load(B_HH + j, mask=m).to(ACC))
    z = _sigmoid(a_z + tl.load(HG + g0 + H, mask=m).to(ACC) + tl.load(B_HH + j + H, mask=m).to(ACC))
    bn = tl.load(HG + g0 + 2 * H, mask=m).to(ACC) + tl.load(B_HH + j + 2 * H, mask=m).to(ACC)
    nn = _tanh(a_n + r * bn)
    h = nn + z * (tl.load(H_PREV + k, mask=m).to(ACC) - nn)
    tl.store(SAVED + s0, r, mask=m)
    tl.store(SAVED + s0 + H, z, mask=m)
    tl.store(SAVED + s0 + 2 * H, nn, mask=m)
    tl.store(SAVED + s0 + 3 * H, bn, mask=m)
    tl.store(Hout + k, _cast(h, Hout.dtype.element_ty), mask=m)


@triton.jit
def _gru_bwd(
    DOUT, DH_REC,  # [B, H]
    DH_DIRECT,  # [B, H] acc dtype, in: z-path gradient from the next step, out: this step's
    SAVED,  # [B, 4H] acc dtype: r, z, n, b_n
    H_PREV,  # [B, H]
    DXG, DHG,  # [B, 3H] out: gradients of the x-part and h-part pre-activations
    n, H,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    row = k // H
    g0 = row * 3 * H + k % H
    s0 = row * 4 * H + k % H
    ACC = DH_DIRECT.dtype.element_ty
    r = tl.load(SAVED + s0, mask=m)
    z = tl.load(SAVED + s0 + H, mask=m)
    nn = tl.load(SAVED + s0 + 2 * H, mask=m)
    bn = tl.load(SAVED + s0 + 3 * H, mask=m)
    dh = tl.load(DOUT + k, mask=m).to(ACC) + tl.load(DH_REC + k, mask=m).to(ACC) + tl.load(DH_DIRECT + k, mask=m)
    dn = dh * (1.0 - z) * (1.0 - nn * nn)
    dz = dh * (tl.load(H_PREV + k, mask=m).to(ACC) - nn) * z * (1.0 - z)
    dr = dn * bn * r * (1.0 - r)
    DT = DXG.dtype.element_ty
    tl.store(DXG + g0, _cast(dr, DT), mask=m)
    tl.store(DHG + g0, _cast(dr, DT), mask=m)
    tl.store(DXG + g0 + H, _cast(dz, DT), mask=m)
    tl.store(DHG + g0 + H, _cast(dz, DT), mask=m)
    tl.store(DXG + g0 + 2 * H, _cast(dn, DT), mask=m)
    tl.store(DHG + g0 + 2 * H, _cast(dn * r, DT), mask=m)
    tl.store(DH_DIRECT + k, dh * z, mask=m)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(kernel, B, H, *args):
    n = B * H
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](*args, n, H, BLOCK=BLOCK)


def _order(T, reverse):
    """(steps of the forward loop, steps of the backward loop, the step that fed t, first step, last step)."""
    fwd = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    return fwd, fwd[::-1], (lambda t: t + 1) if reverse else (lambda t: t - 1), fwd[0], fwd[-1]


def _weight_grad(dg, h0, out, reverse):
    """sum_t dg[t]^T h_prev[t], as one GEMM over all steps (csrc/include/fck/rnn_host.h: weight_grad)."""
    T, GH, H = dg.shape[0], dg.shape[2], out.shape[2]
    first = T - 1 if reverse else 0
    dw = dg[first].t() @ h0
    if T > 1:
        g, h = (dg[:-1], out[1:]) if reverse else (dg[1:], out[:-1])
        dw.addmm_(g.reshape(-1, GH).t(), h.reshape(-1, H))
    return dw


def _bias(b, n, like):
    return like.new_zeros(n) if b is None else b.contiguous()


def lstm_layer_fwd(xg, h0, c0, w_hh, bias, reverse):
    T, B, _ = xg.shape
    H = w_hh.shape[1]
    bias = _bias(bias, 4 * H, xg)
    acc = _acc(xg.dtype)
    out = torch.empty(T, B, H, dtype=xg.dtype, device=xg.device)
    c_all = torch.empty(T, B, H, dtype=acc, device=xg.device)
    gates = torch.empty(T, B, 4 * H, dtype=acc, device=xg.device)
    hg = torch.empty(B, 4 * H, dtype=xg.dtype, device=xg.device)
    h0, c0, wt = h0.contiguous(), c0.to(acc).contiguous(), w_hh.t()
    steps, _, before, first, last = _order(T, reverse)
    for t in steps:
        torch.mm(h0 if t == first else out[before(t)], wt, out=hg)
        _launch(_lstm_fwd, B, H, xg[t], hg, bias, c0 if t == first else c_all[before(t)], gates[t], c_all[t], out[t])
    return out, out[last].clone(), c_all[last].to(xg.dtype, copy=True), c_all, gates


def lstm_layer_bwd(grad_out, grad_hn, grad_cn, h0, c0, w_hh, out, c_all, gates, reverse):
    T, B, H = out.shape
    acc = _acc(out.dtype)
    dxg = torch.empty(T, B, 4 * H, dtype=out.dtype, device=out.device)
    dc = grad_cn.to(acc, copy=True).contiguous()
    dh_buf = torch.empty(B, H, dtype=out.dtype, device=out.device)
    dh_rec, c0a = grad_hn.contiguous(), c0.to(acc).contiguous()
    grad_out = grad_out.contiguous()
    _, steps, before, first, _ = _order(T, reverse)
    for t in steps:
        _launch(_lstm_bwd, B, H, grad_out[t], dh_rec, gates[t], c0a if t == first else c_all[before(t)], c_all[t],
                dc, dxg[t])
        torch.mm(dxg[t], w_hh, out=dh_buf)
        dh_rec = dh_buf
    return dxg, dh_buf, dc.to(c0.dtype), _weight_grad(dxg, h0.contiguous(), out, reverse), dxg.sum((0, 1))


def gru_layer_fwd(xg, h0, w_hh, b_ih, b_hh, reverse):
    T, B, _ = xg.shape
    H = w_hh.shape[1]
    b_ih, b_hh = _bias(b_ih, 3 * H, xg), _bias(b_hh, 3 * H, xg)
    out = torch.empty(T, B, H, dtype=xg.dtype, device=xg.device)
    saved = torch.empty(T, B, 4 * H, dtype=_acc(xg.dtype), device=xg.device)
    hg = torch.empty(B, 3 * H, dtype=xg.dtype, device=xg.device)
    h0, wt = h0.contiguous(), w_hh.t()
    steps, _, before, first, last = _order(T, reverse)
    for t in steps:
        h_prev = h0 if t == first else out[before(t)]
        torch.mm(h_prev, wt, out=hg)
        _launch(_gru_fwd, B, H, xg[t], hg, b_ih, b_hh, h_prev, saved[t], out[t])
    return out, out[last].clone(), saved


def gru_layer_bwd(grad_out, grad_hn, h0, w_hh, out, saved, reverse):
    T, B, H = out.shape
    dxg = torch.empty(T, B, 3 * H, dtype=out.dtype, device=out.device)
    dhg = torch.empty_like(dxg)
    dh_direct = torch.zeros(B, H, dtype=_acc(out.dtype), device=out.device)
    dh_buf = torch.empty(B, H, dtype=out.dtype, device=out.device)
    dh_rec, h0 = grad_hn.contiguous(), h0.contiguous()
    grad_out = grad_out.contiguous()
    _, steps, before, first, _ = _order(T, reverse)
    for t in steps:
        _launch(_gru_bwd, B, H, grad_out[t], dh_rec, dh_direct, saved[t], h0 if t == first else out[before(t)],
                dxg[t], dhg[t])
        torch.mm(dhg[t], w_hh, out=dh_buf)
        dh_rec = dh_buf
    dh_buf.add_(dh_direct)
    return dxg, dh_buf, _weight_grad(dhg, h0, out, reverse), dxg.sum((0, 1)), dhg.sum((0, 1))
