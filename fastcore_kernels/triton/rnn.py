"""LSTM and GRU layers with Triton kernels (the fck::lstm_layer_*/gru_layer_* contract).

The loops mirror csrc/include/fck/rnn_host.h: per time step one torch.mm of the hidden state with W_hh (cuBLAS)
into a reused buffer, then one fused pointwise kernel that also adds the biases, where a program handles BLOCK
(row, hidden unit) pairs and all gates of each, so the cell update needs no exchange. W_hh's gradient is one GEMM
over all steps after the loop.

Experimental, opt-in (FCK_RNN_PERSISTENT=1; hidden sizes up to 128, fp32/fp16/bf16): one persistent kernel per pass
walks the whole sequence ("Persistent RNNs", Diamos et al. 2016). A program owns a tile of batch rows — their
recurrences are independent, so programs never wait for each other — and keeps its hidden and cell state in
registers across steps; each step is four (three) small dots with the gate blocks of W_hh, the gate math and the
stores of what the backward needs: one launch per layer, direction and pass. Correct (tested against the per-step
loop and torch), but not yet fast: on an H100 its fp32 dots ran on the FMA path ("ieee") and the lesson-7 LSTM took
23-38 ms of GPU time against the per-step loop's 1.7 (benchmarks/results/NOTES.md). fp32 now asks for "tf32x3"
(three tensor-core passes, fp32-accurate) and bf16 for a native dot on the GPU; neither was measured yet.
"""

import os

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


# ---- persistent kernels (hidden <= ops.rnn.MAX_PERSISTENT_H) ----

def persistent(x: torch.Tensor, H: int) -> bool:
    """Whether the one-launch kernels run this layer (x: a (T, B, ...) tensor of the layer): opted in, hidden size
    up to 128 (a 256 x 256 fp32 gate block as a dot operand overflows shared memory), fp32/fp16/bf16."""
    from fastcore_kernels.ops import rnn as ops_rnn

    return (ops_rnn.PERSISTENT and H <= ops_rnn.MAX_PERSISTENT_H
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.shape[0] * x.shape[1] * 4 * H < 2**31)  # the kernels' offsets are 32-bit


def _tiles(B, H):
    """(batch rows per program, padded hidden size, warps). W_hh's gate blocks are re-read every step (from L1/L2):
    held in registers across steps, four 64x64 fp32 blocks spilled and ran 50x slower on an H100."""
    HP = max(16, triton.next_power_of_2(H))  # tl.dot needs every dimension >= 16
    return 16, HP, (4 if HP <= 64 else 8)


@triton.jit
def _wt(W, q, H, HP: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Gate block q of W_hh (gates*H, H) as a (HP, HP) dot operand: [k, j] = W[q*H + j, k] (h @ W_q^T) when
    TRANSPOSE, else [j, k] = W[q*H + j, k] (d @ W_q)."""
    a = tl.arange(0, HP)
    m = (a[:, None] < H) & (a[None, :] < H)
    if TRANSPOSE:
        return tl.load(W + (q * H + a[None, :]) * H + a[:, None], mask=m, other=0.0)
    else:
        return tl.load(W + (q * H + a[:, None]) * H + a[None, :], mask=m, other=0.0)


@triton.jit
def _vec(V, q, H, HP: tl.constexpr, HAS: tl.constexpr):
    """Chunk q of a per-gate vector as a (1, HP) fp32 row (zeros without one)."""
    a = tl.arange(0, HP)
    if HAS:
        return tl.load(V + q * H + a, mask=a < H, other=0.0).to(tl.float32)[None, :]
    else:
        return tl.zeros((1, HP), dtype=tl.float32)


@triton.jit
def _mm(a, w, PREC: tl.constexpr):
    """a @ w with a rounded to W's dtype first, accumulated in fp32. PREC "fp32": the operands widened to fp32 (the
    CPU interpreter's bf16 dot: it has none of its own; products of bf16 values are exact in fp32, so this is the
    same bf16 dot with fp32 accumulation)."""
    if a.dtype != w.dtype:
        a = _cast(a, w.dtype)
    if PREC == "fp32":
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, w, input_precision=PREC)


@triton.jit
def _tile(B, H, G: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr):
    """This program's (batch row, hidden unit) tile: its mask, its offsets in a (B, H) step, in a (B, G*H) step of
    gates (gate 0) and in a (B, 4H) saved step."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    cols = tl.arange(0, HP)
    m = (rows[:, None] < B) & (cols[None, :] < H)
    return (m, rows[:, None] * H + cols[None, :], rows[:, None] * G * H + cols[None, :],
            rows[:, None] * 4 * H + cols[None, :])


@triton.jit
def _store4(P, H, a, b, c, d, m):
    """Four (B, H) values of a step into the four H-wide chunks of a (B, 4H) saved step."""
    tl.store(P, a, mask=m)
    tl.store(P + H, b, mask=m)
    tl.store(P + 2 * H, c, mask=m)
    tl.store(P + 3 * H, d, mask=m)


@triton.jit
def _step_back(s, T, REVERSE: tl.constexpr):
    """Iteration s of a backward loop, which visits the forward's steps last to first: (its step, the step before
    it in the forward's order; out of [0, T) for the first)."""
    t = T - 1 - s
    tp = t - 1
    if REVERSE:
        t = s
        tp = s + 1
    return t, tp


@triton.jit
def _lstm_seq_fwd(XG, H0, C0, W, BIAS, OUT, C_ALL, GATES, T, B, H,
                  HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr,
                  PREC: tl.constexpr):
    m, hc, gc, _ = _tile(B, H, 4, BB, HP)
    ODT = OUT.dtype.element_ty
    b_i, b_f = _vec(BIAS, 0, H, HP, HAS_BIAS), _vec(BIAS, 1, H, HP, HAS_BIAS)
    b_g, b_o = _vec(BIAS, 2, H, HP, HAS_BIAS), _vec(BIAS, 3, H, HP, HAS_BIAS)
    h = tl.load(H0 + hc, mask=m, other=0.0).to(tl.float32)
    c = tl.load(C0 + hc, mask=m, other=0.0).to(tl.float32)
    for s in range(T):
        t = T - 1 - s if REVERSE else s
        w_i, w_f = _wt(W, 0, H, HP, True), _wt(W, 1, H, HP, True)
        w_g, w_o = _wt(W, 2, H, HP, True), _wt(W, 3, H, HP, True)
        xg = XG + t * B * 4 * H + gc
        i = _sigmoid(tl.load(xg, mask=m, other=0.0).to(tl.float32) + _mm(h, w_i, PREC) + b_i)
        f = _sigmoid(tl.load(xg + H, mask=m, other=0.0).to(tl.float32) + _mm(h, w_f, PREC) + b_f)
        g = _tanh(tl.load(xg + 2 * H, mask=m, other=0.0).to(tl.float32) + _mm(h, w_g, PREC) + b_g)
        o = _sigmoid(tl.load(xg + 3 * H, mask=m, other=0.0).to(tl.float32) + _mm(h, w_o, PREC) + b_o)
        c = f * c + i * g
        hq = _cast(o * _tanh(c), ODT)
        _store4(GATES + t * B * 4 * H + gc, H, i, f, g, o, m)
        tl.store(C_ALL + t * B * H + hc, c, mask=m)
        tl.store(OUT + t * B * H + hc, hq, mask=m)
        h = hq.to(tl.float32)  # the next step sees the stored (rounded) output, as the per-step path does


@triton.jit
def _lstm_seq_bwd(DOUT, DHN, DCN, C0, W, C_ALL, GATES, DXG, DH0, DC0, T, B, H,
                  REVERSE: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
    m, hc, gc, _ = _tile(B, H, 4, BB, HP)
    DT = DXG.dtype.element_ty
    dh_rec = tl.load(DHN + hc, mask=m, other=0.0).to(tl.float32)
    dc = tl.load(DCN + hc, mask=m, other=0.0).to(tl.float32)
    c0 = tl.load(C0 + hc, mask=m, other=0.0).to(tl.float32)
    for s in range(T):
        t, tp = _step_back(s, T, REVERSE)
        has_prev = (tp >= 0) & (tp < T)
        w_i, w_f = _wt(W, 0, H, HP, False), _wt(W, 1, H, HP, False)
        w_g, w_o = _wt(W, 2, H, HP, False), _wt(W, 3, H, HP, False)
        gates = GATES + t * B * 4 * H + gc
        i = tl.load(gates, mask=m, other=0.0)
        f = tl.load(gates + H, mask=m, other=0.0)
        g = tl.load(gates + 2 * H, mask=m, other=0.0)
        o = tl.load(gates + 3 * H, mask=m, other=0.0)
        tc = _tanh(tl.load(C_ALL + t * B * H + hc, mask=m, other=0.0))
        c_prev = tl.where(has_prev, tl.load(C_ALL + tp * B * H + hc, mask=m & has_prev, other=0.0), c0)
        dh = tl.load(DOUT + t * B * H + hc, mask=m, other=0.0).to(tl.float32) + dh_rec
        dc = dc + dh * o * (1.0 - tc * tc)
        d_i = _cast(dc * g * i * (1.0 - i), DT)
        d_f = _cast(dc * c_prev * f * (1.0 - f), DT)
        d_g = _cast(dc * i * (1.0 - g * g), DT)
        d_o = _cast(dh * tc * o * (1.0 - o), DT)
        dxg = DXG + t * B * 4 * H + gc
        tl.store(dxg, d_i, mask=m)
        tl.store(dxg + H, d_f, mask=m)
        tl.store(dxg + 2 * H, d_g, mask=m)
        tl.store(dxg + 3 * H, d_o, mask=m)
        dc = dc * f
        dh_rec = (_mm(d_i, w_i, PREC) + _mm(d_f, w_f, PREC) + _mm(d_g, w_g, PREC)
                  + _mm(d_o, w_o, PREC))
        dh_rec = _cast(dh_rec, DT).to(tl.float32)  # as the per-step path's GEMM output in the gradient's dtype
    tl.store(DH0 + hc, _cast(dh_rec, DH0.dtype.element_ty), mask=m)
    tl.store(DC0 + hc, _cast(dc, DC0.dtype.element_ty), mask=m)


@triton.jit
def _gru_seq_fwd(XG, H0, W, B_IH, B_HH, OUT, SAVED, T, B, H,
                 HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr,
                 PREC: tl.constexpr):
    m, hc, gc, sc = _tile(B, H, 3, BB, HP)
    ODT = OUT.dtype.element_ty
    bi_r, bi_z, bi_n = _vec(B_IH, 0, H, HP, HAS_BIAS), _vec(B_IH, 1, H, HP, HAS_BIAS), _vec(B_IH, 2, H, HP, HAS_BIAS)
    bh_r, bh_z, bh_n = _vec(B_HH, 0, H, HP, HAS_BIAS), _vec(B_HH, 1, H, HP, HAS_BIAS), _vec(B_HH, 2, H, HP, HAS_BIAS)
    h = tl.load(H0 + hc, mask=m, other=0.0).to(tl.float32)
    for s in range(T):
        t = T - 1 - s if REVERSE else s
        w_r, w_z, w_n = _wt(W, 0, H, HP, True), _wt(W, 1, H, HP, True), _wt(W, 2, H, HP, True)
        xg = XG + t * B * 3 * H + gc
        r = _sigmoid(tl.load(xg, mask=m, other=0.0).to(tl.float32) + bi_r + _mm(h, w_r, PREC) + bh_r)
        z = _sigmoid(tl.load(xg + H, mask=m, other=0.0).to(tl.float32) + bi_z + _mm(h, w_z, PREC) + bh_z)
        bn = _mm(h, w_n, PREC) + bh_n
        nn = _tanh(tl.load(xg + 2 * H, mask=m, other=0.0).to(tl.float32) + bi_n + r * bn)
        hq = _cast(nn + z * (h - nn), ODT)
        _store4(SAVED + t * B * 4 * H + sc, H, r, z, nn, bn, m)
        tl.store(OUT + t * B * H + hc, hq, mask=m)
        h = hq.to(tl.float32)


@triton.jit
def _gru_seq_bwd(DOUT, DHN, H0, W, OUT, SAVED, DXG, DHG, DH0, T, B, H,
                 REVERSE: tl.constexpr, BB: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
    m, hc, gc, sc = _tile(B, H, 3, BB, HP)
    DT = DXG.dtype.element_ty
    dh_rec = tl.load(DHN + hc, mask=m, other=0.0).to(tl.float32)
    dh_direct = tl.zeros((BB, HP), dtype=tl.float32)
    h0 = tl.load(H0 + hc, mask=m, other=0.0).to(tl.float32)
    for s in range(T):
        t, tp = _step_back(s, T, REVERSE)
        has_prev = (tp >= 0) & (tp < T)
        w_r, w_z, w_n = _wt(W, 0, H, HP, False), _wt(W, 1, H, HP, False), _wt(W, 2, H, HP, False)
        saved = SAVED + t * B * 4 * H + sc
        r = tl.load(saved, mask=m, other=0.0)
        z = tl.load(saved + H, mask=m, other=0.0)
        nn = tl.load(saved + 2 * H, mask=m, other=0.0)
        bn = tl.load(saved + 3 * H, mask=m, other=0.0)
        h_prev = tl.where(has_prev, tl.load(OUT + tp * B * H + hc, mask=m & has_prev, other=0.0).to(tl.float32), h0)
        dh = tl.load(DOUT + t * B * H + hc, mask=m, other=0.0).to(tl.float32) + dh_rec + dh_direct
        dn = dh * (1.0 - z) * (1.0 - nn * nn)
        dz = dh * (h_prev - nn) * z * (1.0 - z)
        dr = dn * bn * r * (1.0 - r)
        d_r, d_z, d_n, d_hn = _cast(dr, DT), _cast(dz, DT), _cast(dn, DT), _cast(dn * r, DT)
        dxg = DXG + t * B * 3 * H + gc
        dhg = DHG + t * B * 3 * H + gc
        tl.store(dxg, d_r, mask=m)
        tl.store(dhg, d_r, mask=m)
        tl.store(dxg + H, d_z, mask=m)
        tl.store(dhg + H, d_z, mask=m)
        tl.store(dxg + 2 * H, d_n, mask=m)
        tl.store(dhg + 2 * H, d_hn, mask=m)
        dh_direct = dh * z
        dh_rec = _mm(d_r, w_r, PREC) + _mm(d_z, w_z, PREC) + _mm(d_hn, w_n, PREC)
        dh_rec = _cast(dh_rec, DT).to(tl.float32)
    tl.store(DH0 + hc, _cast(dh_rec + dh_direct, DH0.dtype.element_ty), mask=m)


def _persistent_launch(kernel, B, H, T, *args, **meta):
    BB, HP, warps = _tiles(B, H)
    # fp32: three tensor-core passes (fp32-accurate) — "ieee" took the FMA path; half types ignore it.
    dtype = args[0].dtype
    prec = "tf32x3" if dtype == torch.float32 else "tf32"
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        prec = "fp32"
    kernel[(triton.cdiv(B, BB),)](*args, T, B, H, **meta, BB=BB, HP=HP, PREC=prec, num_warps=warps)


def lstm_layer_fwd(xg, h0, c0, w_hh, bias, reverse):
    T, B, _ = xg.shape
    H = w_hh.shape[1]
    acc = _acc(xg.dtype)
    out = torch.empty(T, B, H, dtype=xg.dtype, device=xg.device)
    c_all = torch.empty(T, B, H, dtype=acc, device=xg.device)
    gates = torch.empty(T, B, 4 * H, dtype=acc, device=xg.device)
    if persistent(xg, H):
        h0, c0 = h0.contiguous(), c0.contiguous()
        if B * H:
            _persistent_launch(_lstm_seq_fwd, B, H, T, xg.contiguous(), h0, c0, w_hh.contiguous(),
                               xg if bias is None else bias.contiguous(), out, c_all, gates,
                               HAS_BIAS=bias is not None, REVERSE=bool(reverse))
        last = 0 if reverse else T - 1
        return out, out[last].clone(), c_all[last].to(xg.dtype, copy=True), c_all, gates
    bias = _bias(bias, 4 * H, xg)
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
    if persistent(out, H):
        dh0, dc0 = torch.empty_like(h0), torch.empty_like(c0)
        if B * H:
            _persistent_launch(_lstm_seq_bwd, B, H, T, grad_out.contiguous(), grad_hn.contiguous(),
                               grad_cn.contiguous(), c0.contiguous(), w_hh.contiguous(), c_all, gates, dxg, dh0, dc0,
                               REVERSE=bool(reverse))
        return dxg, dh0, dc0, _weight_grad(dxg, h0.contiguous(), out, reverse), dxg.sum((0, 1))
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


def lstm_proj_layer_fwd(xg, h0, c0, w_hh, w_hr, bias, reverse, save=True):
    """The layer with a projection (fck::lstm_proj_layer_fwd, rnn_host.h: lstm_pass_fwd): per step the recurrent
    torch.mm (K = P), the cell kernel writing u_t = o_t * tanh(c_t), and the projection torch.mm into the output."""
    T, B, _ = xg.shape
    P, H = w_hr.shape
    acc = _acc(xg.dtype)
    slots = T if save else 1
    out = torch.empty(T, B, P, dtype=xg.dtype, device=xg.device)
    u = torch.empty(slots, B, H, dtype=xg.dtype, device=xg.device)
    c_all = torch.empty(T if save else min(2, T), B, H, dtype=acc, device=xg.device)
    gates = torch.empty(slots, B, 4 * H, dtype=acc, device=xg.device)
    bias = _bias(bias, 4 * H, xg)
    hg = torch.empty(B, 4 * H, dtype=xg.dtype, device=xg.device)
    h0, c0, wt, wrt = h0.contiguous(), c0.to(acc).contiguous(), w_hh.t(), w_hr.t()
    steps, _, before, first, last = _order(T, reverse)
    for s, t in enumerate(steps):
        ct, cp, k = (t, before(t), t) if save else (s % 2, (s + 1) % 2, 0)
        torch.mm(h0 if t == first else out[before(t)], wt, out=hg)
        _launch(_lstm_fwd, B, H, xg[t], hg, bias, c0 if t == first else c_all[cp], gates[k], c_all[ct], u[k])
        torch.mm(u[k], wrt, out=out[t])
    c_last = c_all[last if save else (T - 1) % 2]
    return out, out[last].clone(), c_last.to(xg.dtype, copy=True), c_all, gates, u


def lstm_proj_layer_bwd(grad_out, grad_hn, grad_cn, h0, c0, w_hh, w_hr, out, u, c_all, gates, reverse):
    """Its backward (rnn_host.h: lstm_proj_layer_bwd): u_t's gradient is grad_out[t] W_hr, for all steps in one GEMM,
    plus r_t W_hr a step, r_t the recurrent part of h_t's; W_hr's gradient sum_t (grad_out[t] + r_t)^T u_t."""
    T, B, H = u.shape
    P = w_hr.shape[0]
    acc = _acc(out.dtype)
    grad_out = grad_out.contiguous()
    du = (grad_out.reshape(T * B, P) @ w_hr).view(T, B, H)
    r = torch.empty(T, B, P, dtype=out.dtype, device=out.device)
    dxg = torch.empty(T, B, 4 * H, dtype=out.dtype, device=out.device)
    dh0 = torch.empty(B, P, dtype=out.dtype, device=out.device)
    rh = torch.empty(B, H, dtype=out.dtype, device=out.device)
    dc, c0a = grad_cn.to(acc, copy=True).contiguous(), c0.to(acc).contiguous()
    _, steps, before, first, last = _order(T, reverse)
    r[last] = grad_hn
    for t in steps:
        torch.mm(r[t], w_hr, out=rh)
        _launch(_lstm_bwd, B, H, du[t], rh, gates[t], c0a if t == first else c_all[before(t)], c_all[t], dc, dxg[t])
        torch.mm(dxg[t], w_hh, out=dh0 if t == first else r[before(t)])
    dwr = (r + grad_out).reshape(T * B, P).t() @ u.reshape(T * B, H)
    return dxg, dh0, dc.to(c0.dtype), _weight_grad(dxg, h0.contiguous(), out, reverse), dwr, dxg.sum((0, 1))


def gru_layer_fwd(xg, h0, w_hh, b_ih, b_hh, reverse):
    T, B, _ = xg.shape
    H = w_hh.shape[1]
    out = torch.empty(T, B, H, dtype=xg.dtype, device=xg.device)
    saved = torch.empty(T, B, 4 * H, dtype=_acc(xg.dtype), device=xg.device)
    if persistent(xg, H):
        h0 = h0.contiguous()
        if B * H:
            has = b_ih is not None
            _persistent_launch(_gru_seq_fwd, B, H, T, xg.contiguous(), h0, w_hh.contiguous(),
                               b_ih.contiguous() if has else xg, b_hh.contiguous() if has else xg, out, saved,
                               HAS_BIAS=has, REVERSE=bool(reverse))
        return out, out[0 if reverse else T - 1].clone(), saved
    b_ih, b_hh = _bias(b_ih, 3 * H, xg), _bias(b_hh, 3 * H, xg)
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
    if persistent(out, H):
        dh0 = torch.empty_like(h0)
        if B * H:
            _persistent_launch(_gru_seq_bwd, B, H, T, grad_out.contiguous(), grad_hn.contiguous(), h0.contiguous(),
                               w_hh.contiguous(), out, saved, dxg, dhg, dh0, REVERSE=bool(reverse))
        return dxg, dh0, _weight_grad(dhg, h0.contiguous(), out, reverse), dxg.sum((0, 1)), dhg.sum((0, 1))
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
