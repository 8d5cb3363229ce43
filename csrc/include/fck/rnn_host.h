// The recurrent loops of one LSTM/GRU layer in one direction, written once for every device. Per time step: one
// GEMM of the hidden state with W_hh (BLAS/cuBLAS through at::mm_out, into a reused buffer) and one fused pointwise
// kernel, which `Dev` supplies (fck::cpu::RnnSteps, fck::cuda::RnnSteps):
//
//   Dev::lstm_fwd_step(xg_t, hg, c_prev, gates_t, c_t, h_t)
//   Dev::lstm_bwd_step(dout_t, dh_rec, gates_t, c_prev, c_t, dc /*in: dc', out: dc_prev*/, dxg_t)
//   Dev::gru_fwd_step(xg_t, hg, h_prev, saved_t, h_t)
//   Dev::gru_bwd_step(dout_t, dh_rec, dh_direct /*in/out*/, saved_t, h_prev, dxg_t, dhg_t)
//
// The input projection of every step (xg = x W_ih^T + b_ih [+ b_hh for the LSTM]) is one GEMM done by the caller,
// and so are its gradients. W_hh's gradient is taken here after the loop as one GEMM over all steps (K = T*B) rather
// than T thin ones. Cell states and saved gates are fp32 (float64 for float64); h, the GEMM operands and the
// gradients of xg, h0 and W_hh have the input's dtype.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "fck/tensor_checks.h"

namespace fck {
namespace rnn {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The shapes of one layer: xg (T, B, G*H), w_hh (G*H, H), a state (B, H); G gates (4 LSTM, 3 GRU).
struct Dims {
  int64_t T, B, H;
};

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* what, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", what, " is on ", t.device(), " but xg is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", what, " is ", t.scalar_type(), " but xg is ",
              x.scalar_type());
}

inline void check_state(const at::Tensor& s, const Dims& d, const at::Tensor& xg, const char* what, const char* op) {
  check_like(s, xg, what, op);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == d.B && s.size(1) == d.H, op, ": ", what, " must be (", d.B, ", ", d.H,
              "), got ", s.sizes());
}

inline Dims check_layer(const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& w_hh, int64_t gates,
                        const char* op) {
  check_float(xg, "xg", op);
  TORCH_CHECK(xg.dim() == 3, op, ": xg must be (T, B, ", gates, "*H), got ", xg.sizes());
  TORCH_CHECK(xg.is_contiguous(), op, ": xg must be contiguous");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), op, ": w_hh must be (", gates,
              "*H, H), got ", w_hh.sizes());
  check_like(w_hh, xg, "w_hh", op);
  const Dims d{xg.size(0), xg.size(1), w_hh.size(1)};
  TORCH_CHECK(d.T > 0, op, ": the sequence must have at least one step");
  TORCH_CHECK(xg.size(2) == gates * d.H, op, ": xg has ", xg.size(2), " features per step, w_hh wants ",
              gates * d.H);
  check_state(h0, d, xg, "h0", op);
  return d;
}

// Step s of the loop visits time step t; the step before it in time order is `prev` (valid when s > 0).
struct Order {
  int64_t T;
  bool reverse;
  int64_t fwd(int64_t s) const { return reverse ? T - 1 - s : s; }   // forward pass: step s -> t
  int64_t bwd(int64_t s) const { return reverse ? s : T - 1 - s; }   // backward pass: step s -> t
  int64_t before(int64_t t) const { return reverse ? t + 1 : t - 1; }  // the time step that fed t
  int64_t first() const { return reverse ? T - 1 : 0; }
  int64_t last() const { return reverse ? 0 : T - 1; }
};

// sum_t dg[t]^T h_prev[t]: the states that fed the steps are h0, then the outputs shifted by one step.
inline at::Tensor weight_grad(const at::Tensor& dg, const at::Tensor& h0, const at::Tensor& out, const Order& o) {
  const int64_t T = dg.size(0), GH = dg.size(2), H = out.size(2);
  at::Tensor dw = at::mm(dg.select(0, o.first()).t(), h0);
  if (T > 1) {
    const int64_t g0 = o.reverse ? 0 : 1, h_start = o.reverse ? 1 : 0;
    dw.addmm_(dg.narrow(0, g0, T - 1).reshape({-1, GH}).t(), out.narrow(0, h_start, T - 1).reshape({-1, H}));
  }
  return dw;
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(
    const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, bool reverse) {
  constexpr const char* op = "lstm_layer_fwd";
  const Dims d = check_layer(xg, h0, w_hh, 4, op);
  check_state(c0, d, xg, "c0", op);
  const auto acc = xg.options().dtype(acc_type(xg.scalar_type()));
  at::Tensor out = at::empty({d.T, d.B, d.H}, xg.options());
  at::Tensor c_all = at::empty({d.T, d.B, d.H}, acc);
  at::Tensor gates = at::empty({d.T, d.B, 4 * d.H}, acc);
  at::Tensor hg = at::empty({d.B, 4 * d.H}, xg.options());
  const at::Tensor h0c = h0.contiguous(), c0a = c0.to(acc).contiguous(), wt = w_hh.t();
  const Order o{d.T, reverse};
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = o.fwd(s);
    at::mm_out(hg, s == 0 ? h0c : out.select(0, o.before(t)), wt);
    Dev::lstm_fwd_step(xg.select(0, t), hg, s == 0 ? c0a : c_all.select(0, o.before(t)), gates.select(0, t),
                       c_all.select(0, t), out.select(0, t));
  }
  at::Tensor h_n = out.select(0, o.last()).clone();
  at::Tensor c_n = c_all.select(0, o.last()).to(xg.scalar_type(), false, /*copy=*/true);
  return {out, h_n, c_n, c_all, gates};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& grad_cn, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& out, const at::Tensor& c_all,
    const at::Tensor& gates, bool reverse) {
  constexpr const char* op = "lstm_layer_bwd";
  const Dims d{out.size(0), out.size(1), out.size(2)};
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous(), op, ": grad_out must be contiguous ",
              out.sizes());
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({d.T, d.B, 4 * d.H}) && c_all.sizes() == out.sizes(), op,
              ": saved tensors do not match the output");
  check_state(grad_hn, d, out, "grad_hn", op);
  check_state(grad_cn, d, out, "grad_cn", op);
  check_state(c0, d, out, "c0", op);
  const auto acc = out.options().dtype(acc_type(out.scalar_type()));
  at::Tensor dxg = at::empty({d.T, d.B, 4 * d.H}, out.options());
  at::Tensor dc = grad_cn.to(acc, false, /*copy=*/true).contiguous();
  at::Tensor dh_buf = at::empty({d.B, d.H}, out.options());
  at::Tensor dh_rec = grad_hn.contiguous();
  const at::Tensor c0a = c0.to(acc).contiguous();
  const Order o{d.T, reverse};
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = o.bwd(s);
    const bool first = t == o.first();
    Dev::lstm_bwd_step(grad_out.select(0, t), dh_rec, gates.select(0, t), first ? c0a : c_all.select(0, o.before(t)),
                       c_all.select(0, t), dc, dxg.select(0, t));
    at::mm_out(dh_buf, dxg.select(0, t), w_hh);
    dh_rec = dh_buf;
  }
  return {dxg, dh_buf, dc.to(c0.scalar_type()), weight_grad(dxg, h0.contiguous(), out, o)};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(const at::Tensor& xg, const at::Tensor& h0,
                                                             const at::Tensor& w_hh,
                                                             const std::optional<at::Tensor>& b_hh, bool reverse) {
  constexpr const char* op = "gru_layer_fwd";
  const Dims d = check_layer(xg, h0, w_hh, 3, op);
  if (has(b_hh)) {
    check_like(*b_hh, xg, "b_hh", op);
    TORCH_CHECK(b_hh->dim() == 1 && b_hh->size(0) == 3 * d.H, op, ": b_hh must have ", 3 * d.H, " elements");
  }
  const auto acc = xg.options().dtype(acc_type(xg.scalar_type()));
  at::Tensor out = at::empty({d.T, d.B, d.H}, xg.options());
  at::Tensor saved = at::empty({d.T, d.B, 4 * d.H}, acc);
  at::Tensor hg = at::empty({d.B, 3 * d.H}, xg.options());
  const at::Tensor h0c = h0.contiguous(), wt = w_hh.t();
  const Order o{d.T, reverse};
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = o.fwd(s);
    const at::Tensor& h_prev = s == 0 ? h0c : out.select(0, o.before(t));
    if (has(b_hh)) {
      at::addmm_out(hg, *b_hh, h_prev, wt);
    } else {
      at::mm_out(hg, h_prev, wt);
    }
    Dev::gru_fwd_step(xg.select(0, t), hg, h_prev, saved.select(0, t), out.select(0, t));
  }
  return {out, out.select(0, o.last()).clone(), saved};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& h0, const at::Tensor& w_hh,
    const at::Tensor& out, const at::Tensor& saved, bool reverse) {
  constexpr const char* op = "gru_layer_bwd";
  const Dims d{out.size(0), out.size(1), out.size(2)};
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous(), op, ": grad_out must be contiguous ",
              out.sizes());
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({d.T, d.B, 4 * d.H}), op, ": saved tensor does not match the output");
  check_state(grad_hn, d, out, "grad_hn", op);
  const auto acc = out.options().dtype(acc_type(out.scalar_type()));
  at::Tensor dxg = at::empty({d.T, d.B, 3 * d.H}, out.options());
  at::Tensor dhg = at::empty({d.T, d.B, 3 * d.H}, out.options());
  at::Tensor dh_direct = at::zeros({d.B, d.H}, acc);
  at::Tensor dh_buf = at::empty({d.B, d.H}, out.options());
  at::Tensor dh_rec = grad_hn.contiguous();
  const at::Tensor h0c = h0.contiguous();
  const Order o{d.T, reverse};
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = o.bwd(s);
    const at::Tensor& h_prev = t == o.first() ? h0c : out.select(0, o.before(t));
    Dev::gru_bwd_step(grad_out.select(0, t), dh_rec, dh_direct, saved.select(0, t), h_prev, dxg.select(0, t),
                      dhg.select(0, t));
    at::mm_out(dh_buf, dhg.select(0, t), w_hh);
    dh_rec = dh_buf;
  }
  dh_buf.add_(dh_direct);
  return {dxg, dh_buf, weight_grad(dhg, h0c, out, o), dhg.sum(at::IntArrayRef{0, 1})};
}

}  // namespace rnn
}  // namespace fck
