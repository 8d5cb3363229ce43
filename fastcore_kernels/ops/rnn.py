"""LSTM and GRU: cells and multi-layer, bidirectional sequence models on fused recurrent kernels.

One layer in one direction is one torch.library op per pass — `fck::lstm_layer_fwd`/`_bwd`, `fck::gru_layer_fwd`/
`_bwd` (C++ for CPU and CUDA, `..._triton` for Triton; `fck::lstm_proj_layer_fwd`/`_bwd` for an LSTM with
proj_size, a projection GEMM after each step's cell) — that runs the whole recurrence: per step one GEMM with
W_hh and one fused pointwise kernel, or, on the Triton backend for hidden sizes up to 128 and FCK_RNN_PERSISTENT=1,
one persistent kernel for all steps (experimental: see triton/rnn.py). Around it, plain PyTorch does what needs no
loop: the input projection of all steps in one GEMM without bias (its gradients too, by autograd; the kernels add
the biases and return their gradients), dropout between layers, and the direction concatenation. W_hh is read as
it is at every call, so a weight-dropped W_hh (AWD-LSTM) costs nothing extra: there is no packed weight
buffer to rebuild, unlike cuDNN's. The reference backend runs the same driver on the plain-PyTorch layers.

A PackedSequence's rows (step t: its batch_sizes[t] longest sequences) go through `fck::lstm_packed_fwd`/`_bwd`
(with or without a projection) and `fck::gru_packed_fwd`/`_bwd` on the CPU (one call per layer and direction); the
other backends run the padded layer ops once per run of steps with the same batch size (_packed_direction).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from fastcore_kernels import _backend
from fastcore_kernels.ops._autocast import autocast_dtype, lower
from fastcore_kernels.ops._graph import grads_with_graph
from fastcore_kernels.ops._triton_op import triton_op
from fastcore_kernels.reference import rnn as reference

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The Triton backend's persistent kernels (triton/rnn.py): hidden sizes they take, and whether they run. Opt-in
# (FCK_RNN_PERSISTENT=1): on an H100 their fp32 dots took the FMA path and ran slower than the per-step loop.
MAX_PERSISTENT_H = 128
PERSISTENT = os.environ.get("FCK_RNN_PERSISTENT", "0") == "1"

LSTM_FWD_SCHEMA = ("(Tensor xg, Tensor h0, Tensor c0, Tensor w_hh, Tensor? bias, bool reverse) -> "
                   "(Tensor, Tensor, Tensor, Tensor, Tensor)")
LSTM_BWD_SCHEMA = ("(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor h0, Tensor c0, Tensor w_hh, Tensor out, "
                   "Tensor c_all, Tensor gates, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
LSTM_PROJ_FWD_SCHEMA = ("(Tensor xg, Tensor h0, Tensor c0, Tensor w_hh, Tensor w_hr, Tensor? bias, bool reverse, "
                        "bool save=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
LSTM_PROJ_BWD_SCHEMA = ("(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor h0, Tensor c0, Tensor w_hh, "
                        "Tensor w_hr, Tensor out, Tensor u, Tensor c_all, Tensor gates, bool reverse) -> (Tensor, "
                        "Tensor, Tensor, Tensor, Tensor, Tensor)")
GRU_FWD_SCHEMA = ("(Tensor xg, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse) -> "
                  "(Tensor, Tensor, Tensor)")
GRU_BWD_SCHEMA = ("(Tensor grad_out, Tensor grad_hn, Tensor h0, Tensor w_hh, Tensor out, Tensor saved, "
                  "bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _acc_like(x, *shape):
    return x.new_empty(shape, dtype=reference.acc_dtype(x.dtype))


def _fake_lstm_fwd(xg, h0, c0, w_hh, bias, reverse):
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    return (xg.new_empty(T, B, H), h0.new_empty(B, H), c0.new_empty(B, H), _acc_like(xg, T, B, H),
            _acc_like(xg, T, B, 4 * H))


def _fake_lstm_bwd(grad_out, grad_hn, grad_cn, h0, c0, w_hh, out, c_all, gates, reverse):
    T, B, H = out.shape
    return (out.new_empty(T, B, 4 * H), out.new_empty(B, H), c0.new_empty(B, H), torch.empty_like(w_hh),
            out.new_empty(4 * H))


def _fake_gru_fwd(xg, h0, w_hh, b_ih, b_hh, reverse):
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    return xg.new_empty(T, B, H), h0.new_empty(B, H), _acc_like(xg, T, B, 4 * H)


def _fake_gru_bwd(grad_out, grad_hn, h0, w_hh, out, saved, reverse):
    T, B, H = out.shape
    return (out.new_empty(T, B, 3 * H), out.new_empty(B, H), torch.empty_like(w_hh), out.new_empty(3 * H),
            out.new_empty(3 * H))


def _fake_lstm_proj_fwd(xg, h0, c0, w_hh, w_hr, bias, reverse, save=True):
    T, B, P, H = xg.shape[0], xg.shape[1], w_hr.shape[0], w_hr.shape[1]
    return (xg.new_empty(T, B, P), h0.new_empty(B, P), c0.new_empty(B, H),
            _acc_like(xg, T if save else min(2, T), B, H), _acc_like(xg, T if save else 1, B, 4 * H),
            xg.new_empty(T if save else 1, B, H))


def _fake_lstm_proj_bwd(grad_out, grad_hn, grad_cn, h0, c0, w_hh, w_hr, out, u, c_all, gates, reverse):
    T, B, H = u.shape
    return (out.new_empty(T, B, 4 * H), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh),
            torch.empty_like(w_hr), out.new_empty(4 * H))


def _fake_lstm_packed_fwd(xg, batch_sizes, h0, c0, w_hh, w_hr, bias, reverse):
    N, H = xg.shape[0], xg.shape[1] // 4
    P = H if w_hr is None else w_hr.shape[0]
    return (xg.new_empty(N, P), torch.empty_like(h0), torch.empty_like(c0), _acc_like(xg, N, H),
            _acc_like(xg, N, 4 * H), xg.new_empty(0) if w_hr is None else xg.new_empty(N, H))


def _fake_lstm_packed_bwd(grad_out, grad_hn, grad_cn, batch_sizes, h0, c0, w_hh, w_hr, out, u, c_all, gates,
                          reverse):
    N, H = c_all.shape
    return (out.new_empty(N, 4 * H), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh),
            out.new_empty(0) if w_hr is None else torch.empty_like(w_hr), out.new_empty(4 * H))


def _fake_gru_packed_fwd(xg, batch_sizes, h0, w_hh, b_ih, b_hh, reverse):
    N, H = xg.shape[0], w_hh.shape[1]
    return xg.new_empty(N, H), torch.empty_like(h0), _acc_like(xg, N, 4 * H)


def _fake_gru_packed_bwd(grad_out, grad_hn, batch_sizes, h0, w_hh, out, saved, reverse):
    N, H = out.shape
    return (out.new_empty(N, 3 * H), torch.empty_like(h0), torch.empty_like(w_hh), out.new_empty(3 * H),
            out.new_empty(3 * H))


_FAKES = {"lstm_layer_fwd": _fake_lstm_fwd, "lstm_layer_bwd": _fake_lstm_bwd, "gru_layer_fwd": _fake_gru_fwd,
          "gru_layer_bwd": _fake_gru_bwd, "lstm_proj_layer_fwd": _fake_lstm_proj_fwd,
          "lstm_proj_layer_bwd": _fake_lstm_proj_bwd, "lstm_packed_fwd": _fake_lstm_packed_fwd,
          "lstm_packed_bwd": _fake_lstm_packed_bwd, "gru_packed_fwd": _fake_gru_packed_fwd,
          "gru_packed_bwd": _fake_gru_packed_bwd}


def register_fake() -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fck::{name}")(fake)


for _name, _schema in (("lstm_layer_fwd", LSTM_FWD_SCHEMA), ("lstm_layer_bwd", LSTM_BWD_SCHEMA),
                       ("gru_layer_fwd", GRU_FWD_SCHEMA), ("gru_layer_bwd", GRU_BWD_SCHEMA),
                       ("lstm_proj_layer_fwd", LSTM_PROJ_FWD_SCHEMA), ("lstm_proj_layer_bwd", LSTM_PROJ_BWD_SCHEMA)):
    triton_op(f"{_name}_triton", f"rnn.{_name}", _schema, _FAKES[_name])


# ---- backwards that build a graph (create_graph=True) ----
# A gradient penalty or a Hessian-vector product differentiates a backward again; the kernels' backward builds no
# graph. The C++ nodes of whole stacks and of cells (python/register_autograd.cpp) keep their inputs, so under
# create_graph they call these ops: the forward re-run from those inputs on the reference ops (plain PyTorch) and
# differentiated with a graph, exact to any order and costing nothing unless asked for. The per-layer nodes
# (proj_size, packed input, the Triton backend, compiled graphs) hold only what their own backward reads, not the
# input projection, so they refuse (_refuse_graph).
_LIB = torch.library.Library("fck", "FRAGMENT")
_LIB.define("rnn_seq_grad_graph(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor x, Tensor[] params, "
            "Tensor h0, Tensor c0, bool lstm, bool has_biases, int num_layers, bool bidirectional, "
            "Tensor?[] noise) -> Tensor[]")
_LIB.define("rnn_cell_grad_graph(Tensor grad_h, Tensor? grad_c, Tensor x, Tensor h, Tensor? c, Tensor w_ih, "
            "Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor[]")


def _grads_with_graph(outputs, grads, inputs):
    """grads_with_graph for the inputs that require a gradient, an empty tensor for the others (a Tensor[] result
    holds no None; the C++ node picks by needs_input_grad)."""
    got = grads_with_graph(outputs, grads, inputs, [t.requires_grad for t in inputs])
    return [t.new_empty(0) if g is None else g for g, t in zip(got, inputs)]


def _seq_grad_graph(grad_out, grad_hn, grad_cn, x, params, h0, c0, lstm, has_biases, num_layers, bidirectional,
                    noise):
    """[dx, *dparams, dh0, dc0] of a fck::lstm_seq / gru_seq stack (a GRU's c0 and grad_cn are empty); noise: each
    layer's dropout factor as the forward drew it, or None."""
    D = 2 if bidirectional else 1
    weights = _layer_params(list(params), has_biases, num_layers, D, False)
    with torch.enable_grad():
        out, h_n, c_n = _rnn_layers(lstm, x, [h0, c0] if lstm else [h0], weights, num_layers, D, 0.0, False,
                                    "reference", noise=noise)
    outputs, grads = ([out, h_n, c_n], [grad_out, grad_hn, grad_cn]) if lstm else ([out, h_n], [grad_out, grad_hn])
    return _grads_with_graph(outputs, grads, [x, *params, h0, c0])


def _cell_grad_graph(grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """[dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh] of a fck::lstm_cell, or of a gru_cell (c None, dc empty)."""
    present = [t for t in (b_ih, b_hh) if t is not None]
    with torch.enable_grad():
        if c is None:
            outputs, grads = [reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)], [grad_h]
        else:
            outputs, grads = list(reference.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)), [grad_h, grad_c]
    got = _grads_with_graph(outputs, grads, [x, h, w_ih, w_hh, *present] + ([] if c is None else [c]))
    dc = x.new_empty(0) if c is None else got.pop()
    db = got[4:] if present else [x.new_empty(0)] * 2
    return [got[0], got[1], dc, got[2], got[3], *db]


_LIB.impl("rnn_seq_grad_graph", _seq_grad_graph, "CompositeImplicitAutograd")
_LIB.impl("rnn_cell_grad_graph", _cell_grad_graph, "CompositeImplicitAutograd")


def _refuse_graph(name: str) -> None:
    """The per-layer autograd Functions' answer to a backward that builds a graph (see above)."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"fastcore_kernels {name}: this path's fused backward is not differentiable (double backward / "
            "create_graph=True). Stacks without proj_size on padded input, and the cells, support it on the cpu "
            "and cuda backends in eager mode; elsewhere use torch's module for this part.")


def _kernel(name: str, backend: str):
    return getattr(torch.ops.fck, f"{name}_triton" if backend == "triton" else name)


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, c0, w_hh, bias, reverse, backend):
        out, h_n, c_n, c_all, gates = _kernel("lstm_layer_fwd", backend)(xg, h0, c0, w_hh, bias, reverse)
        ctx.save_for_backward(h0, c0, w_hh, out, c_all, gates)
        ctx.reverse, ctx.backend = reverse, backend
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        _refuse_graph("lstm")
        h0, c0, w_hh, out, c_all, gates = ctx.saved_tensors
        grads = _kernel("lstm_layer_bwd", ctx.backend)(
            d_out.contiguous(), d_hn.contiguous(), d_cn.contiguous(), h0, c0, w_hh, out, c_all, gates, ctx.reverse)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)


class _GRULayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, w_hh, b_ih, b_hh, reverse, backend):
        out, h_n, saved = _kernel("gru_layer_fwd", backend)(xg, h0, w_hh, b_ih, b_hh, reverse)
        ctx.save_for_backward(h0, w_hh, out, saved)
        ctx.reverse, ctx.backend = reverse, backend
        return out, h_n

    @staticmethod
    def backward(ctx, d_out, d_hn):
        _refuse_graph("gru")
        h0, w_hh, out, saved = ctx.saved_tensors
        grads = _kernel("gru_layer_bwd", ctx.backend)(
            d_out.contiguous(), d_hn.contiguous(), h0, w_hh, out, saved, ctx.reverse)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)


class _LSTMProjLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, h0, c0, w_hh, w_hr, bias, reverse, backend):
        out, h_n, c_n, c_all, gates, u = _kernel("lstm_proj_layer_fwd", backend)(xg, h0, c0, w_hh, w_hr, bias,
                                                                                 reverse)
        ctx.save_for_backward(h0, c0, w_hh, w_hr, out, u, c_all, gates)
        ctx.reverse, ctx.backend = reverse, backend
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        _refuse_graph("lstm")
        h0, c0, w_hh, w_hr, out, u, c_all, gates = ctx.saved_tensors
        grads = _kernel("lstm_proj_layer_bwd", ctx.backend)(d_out.contiguous(), d_hn.contiguous(), d_cn.contiguous(),
                                                            h0, c0, w_hh, w_hr, out, u, c_all, gates, ctx.reverse)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)


class _LSTMPackedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, batch_sizes, h0, c0, w_hh, w_hr, bias, reverse):
        out, h_n, c_n, c_all, gates, u = torch.ops.fck.lstm_packed_fwd(xg, batch_sizes, h0, c0, w_hh, w_hr, bias,
                                                                       reverse)
        ctx.save_for_backward(batch_sizes, h0, c0, w_hh, w_hr, out, u, c_all, gates)
        ctx.reverse = reverse
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        _refuse_graph("lstm")
        batch_sizes, h0, c0, w_hh, w_hr, out, u, c_all, gates = ctx.saved_tensors
        grads = torch.ops.fck.lstm_packed_bwd(d_out.contiguous(), d_hn.contiguous(), d_cn.contiguous(), batch_sizes,
                                              h0, c0, w_hh, w_hr, out, u, c_all, gates, ctx.reverse)
        dxg, dh0, dc0, dw, dwr, db = grads
        need = ctx.needs_input_grad
        return (dxg if need[0] else None, None, dh0 if need[2] else None, dc0 if need[3] else None,
                dw if need[4] else None, dwr if need[5] else None, db if need[6] else None, None)


class _GRUPackedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, batch_sizes, h0, w_hh, b_ih, b_hh, reverse):
        out, h_n, saved = torch.ops.fck.gru_packed_fwd(xg, batch_sizes, h0, w_hh, b_ih, b_hh, reverse)
        ctx.save_for_backward(batch_sizes, h0, w_hh, out, saved)
        ctx.reverse = reverse
        return out, h_n

    @staticmethod
    def backward(ctx, d_out, d_hn):
        _refuse_graph("gru")
        batch_sizes, h0, w_hh, out, saved = ctx.saved_tensors
        dxg, dh0, dw, db_ih, db_hh = torch.ops.fck.gru_packed_bwd(d_out.contiguous(), d_hn.contiguous(),
                                                                  batch_sizes, h0, w_hh, out, saved, ctx.reverse)
        need = ctx.needs_input_grad
        return (dxg if need[0] else None, None, dh0 if need[2] else None, dw if need[3] else None,
                db_ih if need[4] else None, db_hh if need[5] else None, None)


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _project(x2d, w_ih, impl):
    """The input projection of every step, x2d @ w_ih^T. On the CPU backend its (T*B, G*H) result and its gradients
    go into pooled blocks (`fck::mm_pooled`, with C++ autograd): a fresh multi-MB tensor page-faults on every call,
    which made this GEMM ~2x slower inside a lesson-7 LSTM than alone."""
    if impl != "cpu" or _backend.compiling():
        return torch.mm(x2d, w_ih.t())
    return torch.ops.fck.mm_pooled(x2d, w_ih.t())


def lstm_layer(xg, h0, c0, w_hh, bias, reverse, backend):
    """One LSTM layer over a sequence from its input projection xg = x W_ih^T (T, B, 4H) and bias = b_ih + b_hh:
    (output, h_n, c_n)."""
    if backend == "reference":
        return reference.lstm_layer(xg, h0, c0, w_hh, bias, reverse)
    if backend in ("cpu", "cuda") and not _backend.compiling():  # autograd in C++: cells call this per step
        return torch.ops.fck.lstm_layer(xg, h0, c0, w_hh, bias, reverse)
    if _grad_needed(xg, h0, c0, w_hh, bias):
        return _LSTMLayer.apply(xg, h0, c0, w_hh, bias, reverse, backend)
    return _kernel("lstm_layer_fwd", backend)(xg, h0, c0, w_hh, bias, reverse)[:3]


def gru_layer(xg, h0, w_hh, b_ih, b_hh, reverse, backend):
    """One GRU layer over a sequence from xg = x W_ih^T (T, B, 3H): (output, h_n)."""
    if backend == "reference":
        return reference.gru_layer(xg, h0, w_hh, b_ih, b_hh, reverse)
    if backend in ("cpu", "cuda") and not _backend.compiling():
        return torch.ops.fck.gru_layer(xg, h0, w_hh, b_ih, b_hh, reverse)
    if _grad_needed(xg, h0, w_hh, b_ih, b_hh):
        return _GRULayer.apply(xg, h0, w_hh, b_ih, b_hh, reverse, backend)
    return _kernel("gru_layer_fwd", backend)(xg, h0, w_hh, b_ih, b_hh, reverse)[:2]


# ---- input checks (torch's messages where torch has one) ----

def _check_tensor(t, what, like, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
    if t.device != like.device:
        raise ValueError(f"{name}: {what} is on {t.device} but input is on {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: {what} is {t.dtype} but input is {like.dtype}; give every tensor the same dtype")


def _check_input(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: input must be float64, float32, float16 or bfloat16, got {x.dtype}")


def _check_weights(x, w_ih, w_hh, b_ih, b_hh, gates, name, w_hr=None):
    """The hidden size H, checking the weights against torch's shapes: w_ih (gates H, input), w_hh (gates H, H) — or,
    with an LSTM's projection w_hr (P, H), w_hh (gates H, P) — and biases (gates H,)."""
    for what, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh),
                    ("weight_hr", w_hr)):
        if t is not None:
            _check_tensor(t, what, x, name)
    if w_hr is not None:
        if w_hr.dim() != 2 or not 0 < w_hr.shape[0] < w_hr.shape[1]:
            raise ValueError(f"{name}: weight_hr must be (proj_size, hidden_size) with proj_size < hidden_size, "
                             f"got {tuple(w_hr.shape)}")
        P, H = w_hr.shape
        if w_hh.dim() != 2 or tuple(w_hh.shape) != (gates * H, P):
            raise ValueError(f"{name}: weight_hh must be ({gates}*hidden_size, proj_size) = {(gates * H, P)} with "
                             f"weight_hr {tuple(w_hr.shape)}, got {tuple(w_hh.shape)}")
    else:
        H = w_hh.shape[-1]
        if w_hh.dim() != 2 or w_hh.shape[0] != gates * H:
            raise ValueError(f"{name}: weight_hh must be ({gates}*hidden_size, hidden_size), got "
                             f"{tuple(w_hh.shape)}")
    if w_ih.dim() != 2 or w_ih.shape[0] != gates * H:
        raise ValueError(f"{name}: weight_ih must be ({gates * H}, input_size), got {tuple(w_ih.shape)}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{name}: give both bias_ih and bias_hh, or neither")
    for what, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if b is not None and tuple(b.shape) != (gates * H,):
            raise ValueError(f"{name}: {what} must have shape ({gates * H},), got {tuple(b.shape)}")
    if x.shape[-1] != w_ih.shape[1]:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {w_ih.shape[1]}, "
                           f"got {x.shape[-1]}")  # torch's message
    return H


# ---- torch.autocast ----
# Inside an autocast region torch runs its recurrent ops in the region's lower-precision dtype: on CUDA the cells
# and cuDNN's LSTM/GRU (outputs and states in that dtype), on the CPU the LSTM (oneDNN's). Ours do the same on every
# device and backend, so a mixed-precision model gets the half-precision kernels (fp32 cell state and accumulation
# inside) instead of fp32 ones. Where torch's CPU ops compute in the lower dtype but hand back another one (GRU and
# the cells: the input's dtype; a projected LSTM's c_n: the state's), the result is cast back to it, so a model
# sees the dtypes it saw with torch's modules. float64 is never cast, as in torch.


def _torch_cpu_dtype(t, like):
    """t cast to `like`'s dtype (torch's CPU result dtype for the GRU, the cells and a projected LSTM's c_n)."""
    return t if like is None or t.dtype == like.dtype else t.to(like.dtype)


# ---- cells ----

def _cell_input(input, hx, name, what):
    _check_input(input, name)
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")  # torch's message
    batched = input.dim() == 2
    for i, h in enumerate(hx):
        if h is not None and h.dim() != input.dim():
            raise ValueError(f"{name}: Expected {what[i]} to be {input.dim()}D for a {input.dim()}D input, "
                             f"got {h.dim()}D")
    return batched


def _cell_state(h, x, B, H, what, name):
    if h is None:
        return x.new_zeros(B, H)
    _check_tensor(h, what, x, name)
    if tuple(h.shape) != (B, H):
        raise RuntimeError(f"{name}: Expected {what} to have shape ({B}, {H}), got {tuple(h.shape)}")
    return h


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """torch.nn.LSTMCell's math: returns (h', c'). hx = (h, c) or None for zeros."""
    dtype = autocast_dtype(input.device) if isinstance(input, torch.Tensor) else None
    if dtype is None:
        return _lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend)
    out = _lstm_cell(*lower((input, hx, w_ih, w_hh, b_ih, b_hh), dtype), backend)
    return out if input.device.type != "cpu" else tuple(_torch_cpu_dtype(t, input) for t in out)


def _cell_op(op, backend, x, *args):
    """A batched cell call straight to its C++ op, whose own checks refuse every bad input (test_cpp_guards), or
    None to take the checked path. Python's checks cost a batch-1 LSTMCell a fifth of its time; on a failure the
    checked path runs them and raises torch's error."""
    if x.dim() != 2 or _backend.compiling() or _backend.resolve(x.device, backend, op=op) not in ("cpu", "cuda"):
        return None
    try:
        return getattr(torch.ops.fck, op)(x, *args)
    except Exception:
        return None


def _lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend):
    name = "lstm_cell"
    if hx is not None and isinstance(input, torch.Tensor):
        h, c = hx
        out = _cell_op(name, backend, input, h, c, w_ih, w_hh, b_ih, b_hh)
        if out is not None:
            return out
    h, c = (None, None) if hx is None else hx
    batched = _cell_input(input, (h, c), name, ("hx", "cx"))
    x = input if batched else input.unsqueeze(0)
    H = _check_weights(x, w_ih, w_hh, b_ih, b_hh, 4, name)
    B = x.shape[0]
    h = _cell_state(h if h is None or batched else h.unsqueeze(0), x, B, H, "hx", name)
    c = _cell_state(c if c is None or batched else c.unsqueeze(0), x, B, H, "cx", name)
    impl = _backend.resolve(x.device, backend, op=name)
    if impl in ("cpu", "cuda") and not _backend.compiling():  # one C++ autograd node (register_ops.cpp)
        h1, c1 = torch.ops.fck.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        b = None if b_ih is None else b_ih + b_hh
        _, h1, c1 = lstm_layer((x @ w_ih.t()).unsqueeze(0), h, c, w_hh, b, False, impl)
    return (h1, c1) if batched else (h1.squeeze(0), c1.squeeze(0))


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, backend=None):
    """torch.nn.GRUCell's math: returns h'. hx None means zeros."""
    dtype = autocast_dtype(input.device) if isinstance(input, torch.Tensor) else None
    if dtype is None:
        return _gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend)
    out = _gru_cell(*lower((input, hx, w_ih, w_hh, b_ih, b_hh), dtype), backend)
    return out if input.device.type != "cpu" else _torch_cpu_dtype(out, input)


def _gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend):
    name = "gru_cell"
    if hx is not None and isinstance(input, torch.Tensor) and (b_ih is None) == (b_hh is None):
        out = _cell_op(name, backend, input, hx, w_ih, w_hh, b_ih, b_hh)
        if out is not None:
            return out
    batched = _cell_input(input, (hx,), name, ("hx",))
    x = input if batched else input.unsqueeze(0)
    H = _check_weights(x, w_ih, w_hh, b_ih, b_hh, 3, name)
    h = _cell_state(hx if hx is None or batched else hx.unsqueeze(0), x, x.shape[0], H, "hx", name)
    impl = _backend.resolve(x.device, backend, op=name)
    if impl in ("cpu", "cuda") and not _backend.compiling():
        h1 = torch.ops.fck.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    else:
        _, h1 = gru_layer((x @ w_ih.t()).unsqueeze(0), h, w_hh, b_ih, b_hh, False, impl)
    return h1 if batched else h1.squeeze(0)


# ---- sequences ----

def _layer_params(params, has_biases, num_layers, num_directions, proj):
    """torch's flat weight order: per layer, per direction, w_ih, w_hh[, b_ih, b_hh][, w_hr] (w_hr: an LSTM with
    proj_size). Tuples (w_ih, w_hh, b_ih, b_hh, w_hr), None for what is not there."""
    per = (4 if has_biases else 2) + (1 if proj else 0)
    if len(params) != per * num_layers * num_directions:
        raise ValueError(f"expected {per * num_layers * num_directions} weight tensors "
                         f"({num_layers} layers x {num_directions} directions x {per}), got {len(params)}")
    out = []
    for k in range(num_layers * num_directions):
        p = list(params[k * per:(k + 1) * per])
        w_hr = p.pop() if proj else None
        out.append((*p, w_hr) if has_biases else (p[0], p[1], None, None, w_hr))
    return out


def _rnn(mode, input, hx, params, has_biases, num_layers, dropout, training, bidirectional, batch_first, backend,
         proj_size=0):
    if isinstance(input, PackedSequence):
        return _rnn_packed(mode, input, hx, params, has_biases, num_layers, dropout, training, bidirectional,
                           backend, proj_size)
    return _rnn_tensor(mode, input, hx, params, has_biases, num_layers, dropout, training, bidirectional,
                       batch_first, backend, proj_size)


def _rnn_tensor(mode, input, hx, params, has_biases, num_layers, dropout, training, bidirectional, batch_first,
                backend, proj_size, batch_sizes=None):
    dtype = autocast_dtype(input.device) if isinstance(input, torch.Tensor) else None
    args = (has_biases, num_layers, dropout, training, bidirectional, batch_first, backend, proj_size, batch_sizes)
    if dtype is None:
        return _rnn_in_dtype(mode, input, hx, params, *args)
    out, h = _rnn_in_dtype(mode, *lower((input, hx, params), dtype), *args)
    if input.device.type != "cpu" or (mode == "lstm" and proj_size == 0 and batch_sizes is None):
        return out, h
    if mode == "gru":
        return _torch_cpu_dtype(out, input), _torch_cpu_dtype(h, input)
    c_n = _torch_cpu_dtype(h[1], input if hx is None else hx[1])
    if proj_size == 0:  # a packed LSTM: torch's CPU op hands everything back in the input's dtype
        return _torch_cpu_dtype(out, input), (_torch_cpu_dtype(h[0], input if hx is None else hx[0]), c_n)
    return out, (h[0], c_n)


def _rnn_packed(mode, input, hx, params, has_biases, num_layers, dropout, training, bidirectional, backend,
                proj_size):
    """A PackedSequence through the stack, as torch's module takes it: states in the caller's batch order (permuted
    by sorted_indices in, unsorted_indices out), the output packed like the input."""
    data, batch_sizes, sorted_indices, unsorted_indices = input
    lstm = mode == "lstm"

    def permute(state, index):
        return state if state is None or index is None else state.index_select(1, index)

    if hx is not None and sorted_indices is not None:
        if lstm and isinstance(hx, (tuple, list)) and len(hx) == 2:
            hx = (permute(hx[0], sorted_indices), permute(hx[1], sorted_indices))
        elif not lstm and isinstance(hx, torch.Tensor):
            hx = permute(hx, sorted_indices)
    out, h = _rnn_tensor(mode, data, hx, params, has_biases, num_layers, dropout, training, bidirectional, False,
                         backend, proj_size, batch_sizes)
    h = (permute(h[0], unsorted_indices), permute(h[1], unsorted_indices)) if lstm else permute(h, unsorted_indices)
    return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h


def _rnn_in_dtype(mode, input, hx, params, has_biases, num_layers, dropout, training, bidirectional, batch_first,
                  backend, proj_size, batch_sizes=None):
    """The stack on a padded input (T, B, I), (B, T, I) or (T, I); or, with `batch_sizes`, on a PackedSequence's
    data (rows of all sequences' steps, step by step: batch_sizes[t] rows at step t, in non-increasing numbers)."""
    lstm = mode == "lstm"
    gates = 4 if lstm else 3
    name = mode
    _check_input(input, name)
    if batch_sizes is not None:
        runs = _packed_runs(input, batch_sizes, name)
        batched, x = True, input
        T, B = len(batch_sizes), runs[0][2]
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")  # torch's message
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
    if T == 0:
        raise RuntimeError(f"{name}: Expected sequence length to be larger than 0 in RNN")
    D = 2 if bidirectional else 1
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")  # torch's message
    proj = lstm and proj_size > 0
    weights = _layer_params(params, has_biases, num_layers, D, proj)
    H = weights[0][4].shape[1] if proj else weights[0][1].shape[-1]
    P = proj_size if proj else H  # the size of h: each layer's output and the next layer's input per direction
    for layer in range(num_layers):
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[layer * D + d]
            want = x.shape[-1] if layer == 0 else D * P
            probe = x if layer == 0 else x.new_empty(0, want)
            if _check_weights(probe, w_ih, w_hh, b_ih, b_hh, gates, name, w_hr) != H:
                raise ValueError(f"{name}: every layer must have hidden_size {H}")
            if proj and w_hr.shape[0] != P:
                raise ValueError(f"{name}: weight_hr must be ({P}, {H}) for proj_size {P}, got "
                                 f"{tuple(w_hr.shape)}")
    states = hx if lstm else (hx,)
    if hx is not None and lstm and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise TypeError(f"{name}: hx must be a tuple (h_0, c_0)")
    given = []
    for i, s in enumerate(states if hx is not None else (None,) * (2 if lstm else 1)):
        if s is not None:
            _check_tensor(s, "hx" if i == 0 else "cx", x, name)
            size = P if i == 0 else H  # h is proj_size wide with a projection, c always hidden_size
            want = (num_layers * D, B, size) if batched else (num_layers * D, size)
            if tuple(s.shape) != want:
                raise RuntimeError(f"Expected hidden[{i}] size {want}, got {list(s.shape)}")  # torch's message
            s = s if batched else s.unsqueeze(1)
        given.append(s)
    impl = _backend.resolve(x.device, backend, op=name)
    if batch_sizes is not None:
        out, h_n, c_n = _rnn_layers(lstm, x, given, weights, num_layers, D, dropout, training, impl,
                                    (runs, batch_sizes))
        return _rnn_result(out, h_n, c_n, lstm, True, False)
    if impl in ("cpu", "cuda") and not _backend.compiling() and not proj:
        # the whole stack as one C++ autograd node (register_autograd.cpp): the same ops and dropout draws, no
        # per-layer Python
        seq = torch.ops.fck.lstm_seq if lstm else torch.ops.fck.gru_seq
        r = seq(x, list(params), *given, has_biases, num_layers, bidirectional, float(dropout), bool(training))
        return _rnn_result(r[0], r[1], r[2] if lstm else None, lstm, batched, batch_first)
    out, h_n, c_n = _rnn_layers(lstm, x, given, weights, num_layers, D, dropout, training, impl)
    return _rnn_result(out, h_n, c_n, lstm, batched, batch_first)


def _rnn_layers(lstm, x, given, weights, num_layers, D, dropout, training, impl, packed=None, noise=None):
    """The stack composed in Python, layer by layer: x (T, B, I) — or, with `packed` = (runs, batch_sizes), a
    PackedSequence's rows (N, I) — `given` states (L*D, B, P) and (L*D, B, H) or None, weights per layer and
    direction. Runs dropout between layers, projections, packed input, the Triton and reference backends and
    torch.compile. The input projection of every step is one GEMM (biases go into the kernels). `noise`: each
    layer's dropout factor drawn before (a graph-building backward's re-run), instead of drawing it."""
    B = packed[0][0][2] if packed else x.shape[1]
    w_hr0 = weights[0][4]
    H = w_hr0.shape[1] if w_hr0 is not None else weights[0][1].shape[-1]
    P = w_hr0.shape[0] if w_hr0 is not None else H
    full = [x.new_zeros(num_layers * D, B, P if i == 0 else H) if s is None else s for i, s in enumerate(given)]
    h_n, c_n = [], []
    for layer in range(num_layers):
        if noise is not None and noise[layer] is not None:
            x = x * noise[layer]
        elif layer > 0 and dropout > 0 and training:
            x = F.dropout(x, dropout, True)
        outs = []
        for d in range(D):
            k = layer * D + d
            xg = _project(x.reshape(-1, x.shape[-1]), weights[k][0], impl)
            if not packed:
                xg = xg.view(x.shape[0], x.shape[1], xg.shape[1])
            out, h, c = _direction(lstm, xg, full[0][k], full[1][k] if lstm else None, weights[k], d == 1, impl,
                                   packed)
            if lstm:
                c_n.append(c)
            outs.append(out)
            h_n.append(h)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
    return x, torch.stack(h_n), torch.stack(c_n) if lstm else None


def _direction(lstm, xg, h0, c0, weights, reverse, impl, packed):
    """One layer in one direction from its input projection xg: (out, h_n, c_n), c_n None for a GRU. Packed rows go
    to the CPU's packed ops, or by runs of equal batch size (_packed_direction) to the padded layer ops."""
    _, w_hh, b_ih, b_hh, w_hr = weights
    if packed and impl == "cpu":
        return _packed_layer(lstm, xg, packed[1], h0, c0, w_hh, w_hr, b_ih, b_hh, reverse)
    if not lstm:
        def step(xg3, h, c, reverse):
            return (*gru_layer(xg3, h, w_hh, b_ih, b_hh, reverse, impl), None)
    else:
        b = None if b_ih is None else b_ih + b_hh

        def step(xg3, h, c, reverse):
            if w_hr is None:
                return lstm_layer(xg3, h, c, w_hh, b, reverse, impl)
            return _lstm_projected_layer(xg3, h, c, w_hh, w_hr, b, reverse, impl)
    if packed:
        return _packed_direction(step, xg, packed[0], h0, c0, reverse)
    return step(xg, h0, c0, reverse)


def _packed_runs(data, batch_sizes, name):
    """A PackedSequence's steps as runs of equal batch size: (first row, steps, rows a step), in time order. Each run
    is one layer call on a (steps, rows, *) view of the packed rows; between runs the batch shrinks (forward) or
    grows (reverse) at its end, where the sorted sequences that end (begin) are."""
    if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1 or batch_sizes.device.type != "cpu" \
            or batch_sizes.dtype != torch.int64:
        raise ValueError(f"{name}: batch_sizes must be a 1-D int64 CPU tensor (a PackedSequence's)")
    sizes = batch_sizes.tolist()
    if not sizes or sizes[-1] < 1 or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{name}: batch_sizes must be positive and non-increasing, got {sizes}")
    if data.dim() != 2 or data.shape[0] != sum(sizes):
        raise ValueError(f"{name}: packed data must be 2-D with sum(batch_sizes) = {sum(sizes)} rows, got "
                         f"{tuple(data.shape)}")
    runs, row, t = [], 0, 0
    while t < len(sizes):
        b, steps = sizes[t], 1
        while t + steps < len(sizes) and sizes[t + steps] == b:
            steps += 1
        runs.append((row, steps, b))
        row, t = row + steps * b, t + steps
    return runs


def _packed_direction(layer, xg, runs, h0, c0, reverse):
    """One layer and direction over packed rows xg (N, G*H): `layer(xg3, h, c, reverse) -> (out, h, c)` per run of
    equal batch size, the state carried from run to run. Forward in time, the sequences past a run's rows have ended:
    their state is final. In reverse, they have not begun: they join with their initial state. (out rows (N, P),
    h_n, c_n); c is None for a GRU."""
    # One split of xg and of the initial states, not a slice per run: a slice's backward writes its gradient into
    # a zero tensor of the whole input, per run (a lesson-7 LSTM on 42 runs spent 3/4 of its time filling zeros).
    parts = xg.split([steps * b for _, steps, b in runs])
    outs, done_h, done_c = [], [], []
    if reverse:
        bounds = [runs[-1][2]] + [b2 - b1 for (_, _, b1), (_, _, b2) in zip(runs[::-1], runs[-2::-1]) if b2 > b1]
        h_parts = list(h0.split(bounds)[::-1])
        c_parts = None if c0 is None else list(c0.split(bounds)[::-1])
        h, c = h_parts.pop(), None if c0 is None else c_parts.pop()
    else:
        h, c = h0, c0
    for (_, steps, b), xs in zip(reversed(runs), parts[::-1]) if reverse else zip(runs, parts):
        n = h.shape[0]
        if b < n:
            h, ended = h.split([b, n - b])
            done_h.append(ended)
            if c is not None:
                c, ended = c.split([b, n - b])
                done_c.append(ended)
        elif b > n:
            h = torch.cat([h, h_parts.pop()])
            c = None if c is None else torch.cat([c, c_parts.pop()])
        out, h, c = layer(xs.view(steps, b, xg.shape[1]), h, c, reverse)
        outs.append(out.reshape(steps * b, out.shape[-1]))
    if reverse:
        outs.reverse()
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    h_n = torch.cat([h] + done_h[::-1]) if done_h else h
    c_n = None if c is None else (torch.cat([c] + done_c[::-1]) if done_c else c)
    return out, h_n, c_n


def _packed_layer(lstm, xg, batch_sizes, h0, c0, w_hh, w_hr, b_ih, b_hh, reverse):
    """One layer and direction over packed rows in one op (the CPU's `fck::lstm_packed_fwd`/`gru_packed_fwd`,
    csrc/include/fck/rnn_packed.h): (out, h_n, c_n); c_n None for a GRU."""
    if lstm:
        bias = None if b_ih is None else b_ih + b_hh
        if _grad_needed(xg, h0, c0, w_hh, w_hr, bias):
            return _LSTMPackedLayer.apply(xg, batch_sizes, h0, c0, w_hh, w_hr, bias, reverse)
        return torch.ops.fck.lstm_packed_fwd(xg, batch_sizes, h0, c0, w_hh, w_hr, bias, reverse)[:3]
    if _grad_needed(xg, h0, w_hh, b_ih, b_hh):
        return (*_GRUPackedLayer.apply(xg, batch_sizes, h0, w_hh, b_ih, b_hh, reverse), None)
    return (*torch.ops.fck.gru_packed_fwd(xg, batch_sizes, h0, w_hh, b_ih, b_hh, reverse)[:2], None)


def _lstm_projected_layer(xg, h0, c0, w_hh, w_hr, bias, reverse, impl):
    """An LSTM layer with a projection (torch's proj_size): h_t = W_hr (o_t * tanh(c_t)), P values, is the output and
    the next step's recurrent input. `fck::lstm_proj_layer_fwd`/`_bwd` (C++ or Triton) step it: the recurrent GEMM,
    the fused cell, the projection GEMM; the reference steps it in plain PyTorch."""
    if impl == "reference":
        return reference.lstm_layer(xg, h0, c0, w_hh, bias, reverse, w_hr=w_hr)
    if _grad_needed(xg, h0, c0, w_hh, w_hr, bias):
        return _LSTMProjLayer.apply(xg, h0, c0, w_hh, w_hr, bias, reverse, impl)
    return _kernel("lstm_proj_layer_fwd", impl)(xg, h0, c0, w_hh, w_hr, bias, reverse, False)[:3]


def _rnn_result(out, h_n, c_n, lstm, batched, batch_first):
    """(T, B, D*H) output and (L*D, B, H) states in the caller's layout, as torch.nn.LSTM/GRU return them."""
    if batched and batch_first:
        out = out.transpose(0, 1)
    if not batched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(1)
    return (out, (h_n, c_n)) if lstm else (out, h_n)


def lstm(input, params, hx=None, has_biases=True, num_layers=1, dropout=0.0, training=False, bidirectional=False,
         batch_first=False, backend=None, proj_size=0):
    """torch.nn.LSTM's forward: (output, (h_n, c_n)). `params` in torch's flat order (module._flat_weights)."""
    return _rnn("lstm", input, hx, params, has_biases, num_layers, dropout, training, bidirectional, batch_first,
                backend, proj_size)


def gru(input, params, hx=None, has_biases=True, num_layers=1, dropout=0.0, training=False, bidirectional=False,
        batch_first=False, backend=None):
    """torch.nn.GRU's forward: (output, h_n). `params` in torch's flat order (module._flat_weights)."""
    return _rnn("gru", input, hx, params, has_biases, num_layers, dropout, training, bidirectional, batch_first,
                backend)
