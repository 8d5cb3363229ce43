// The recurrent loops of one LSTM/GRU layer in one direction, written once for every device. Per time step: one
// GEMM of the hidden state with W_hh (BLAS/cuBLAS through at::mm_out, into a reused buffer) and one fused pointwise
// kernel, which `Dev` supplies (fck::cpu::RnnSteps, fck::cuda::RnnSteps), with the batch split into row blocks:
//
//   Dev::row_blocks(B, values_per_row, steps, w_bytes, f)   calls f(b0, b1) over blocks covering [0, B), maybe
//                                                          in parallel
//
//   Dev::lstm_fwd(xg_t, hg, bias, c_prev, gates_t, c_t, h_t, n, H)
//   Dev::lstm_bwd(dout_t, dh_rec, gates_t, c_prev, c_t, dc /*in: dc', out: dc_prev*/, dxg_t, n, H)
//   Dev::gru_fwd(xg_t, hg, b_ih, b_hh, h_prev, saved_t, h_t, n, H)
//   Dev::gru_bwd(dout_t, dh_rec, dh_direct /*in/out*/, saved_t, h_prev, dxg_t, dhg_t, n, H)
//
// each over n rows of one step (typed pointers; see below), plus Dev::dispatch, Dev::Acc<T>, the two GEMMs and
// Dev::empty(sizes, options) for the sequence-sized tensors (the CPU takes them from its pool of warm blocks: fresh
// multi-MB mallocs page-faulted on every call and made a lesson-7 LSTM layer's forward 1.7x slower). Dev may take a
// whole pass itself instead (Dev::lstm_fwd_whole and the like: CUDA's persistent kernels), returning true.
//
// The rows of a batch never meet in the recurrence, so with a small W_hh the CPU gives each thread its own block of
// rows for the whole sequence: no fork/join per step, and each thread's small GEMM runs single-threaded (nested
// parallelism is off). CUDA, and the CPU with a large W_hh, run one block and parallelize inside each step.
//
// The input projection of every step (xg = x W_ih^T, without bias) is one GEMM done by the caller, and so are its
// gradients. The biases are added inside the pointwise kernels (a bias GEMM (addmm) first copies the broadcast
// bias into its whole (T*B, G) output: 10% of a small LSTM's time), and their gradients are sums the ops return.
// W_hh's gradient is taken here after the loop as one GEMM over all steps (K = T*B) rather than T thin ones. Cell
// states and saved gates are fp32 (float64 for float64); h, the GEMM operands and the gradients of xg, h0 and W_hh
// have the input's dtype.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "fck/tensor_checks.h"

namespace fck {
namespace rnn {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The shapes of one layer: xg (T, B, G*H), w_hh (G*H, H), a state (B, H); G gates (4 LSTM, 3 GRU).
struct Dims {
  int64_t T, B, H;
};

// t must share x's device and dtype; x is the op's first tensor (xg forward, out backward).
inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* what, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", what, " is on ", t.device(), " but the op's first tensor is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", what, " is ", t.scalar_type(),
              " but the op's first tensor is ", x.scalar_type());
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

// What both backward passes check: the output's gradients against the output, and the (T, B, 4H) saved gates.
inline Dims check_backward(const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& out,
                           const at::Tensor& saved, const char* op) {
  TORCH_CHECK(out.dim() == 3, op, ": out must be (T, B, H), got ", out.sizes());
  const Dims d{out.size(0), out.size(1), out.size(2)};
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous(), op, ": grad_out must be contiguous ",
              out.sizes());
  check_like(grad_out, out, "grad_out", op);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({d.T, d.B, 4 * d.H}), op, ": saved gates do not match the output");
  check_state(grad_hn, d, out, "grad_hn", op);
  return d;
}

// A bias vector, or zeros where there is none: the kernels have one form, and the add costs nothing in them.
inline at::Tensor bias_or_zeros(const std::optional<at::Tensor>& b, const at::Tensor& xg, int64_t n, const char* what,
                                const char* op) {
  if (!has(b)) return at::zeros({n}, xg.options());
  check_like(*b, xg, what, op);
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", what, " must have ", n, " elements, got ", b->sizes());
  return b->contiguous();
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

// sum_t dg[t]^T h_prev[t]: the states that fed the steps are h0, then the outputs shifted by one step. A small
// weight is computed as its transpose, sum_t h_prev[t]^T dg[t] (H x GH), then transposed back: MKL runs that
// orientation faster (lesson 7's 4416 x 256 by 4416 x 64: 0.57-0.59 ms against 0.68 for dg^T h on this library's
// Xeon). From 1 MB on the copy costs more than the orientation saves (the AWD-LSTM's 4608 x 1152: 65.5 ms direct
// against 72.7 with the copy), and the result goes straight into a block of Dev's. Up to 1024 rows (T * B) the
// copy costs more than the GEMM saves as well (a cell's 64 rows, 256 x 64: 16.7 us direct against 38.6).
template <class Dev>
at::Tensor weight_grad(const at::Tensor& dg, const at::Tensor& h0, const at::Tensor& out, const Order& o) {
  const int64_t T = dg.size(0), GH = dg.size(2), H = out.size(2);
  const bool direct = GH * H >= (int64_t(1) << 18) || T * dg.size(1) <= 1024;
  const int64_t g0 = o.reverse ? 0 : 1, h_start = o.reverse ? 1 : 0;
  const auto dg_rest = [&] { return dg.narrow(0, g0, T - 1).reshape({-1, GH}); };
  const auto h_rest = [&] { return out.narrow(0, h_start, T - 1).reshape({-1, H}); };
  if (direct) {
    at::Tensor dw = Dev::empty({GH, H}, dg.options());
    at::mm_out(dw, dg.select(0, o.first()).t(), h0);
    if (T > 1) dw.addmm_(dg_rest().t(), h_rest());
    return dw;
  }
  at::Tensor dwt = at::mm(h0.t(), dg.select(0, o.first()));
  if (T > 1) dwt.addmm_(h_rest().t(), dg_rest());
  return dwt.t().contiguous();
}

// A bias gradient: the sum of a (T, B, G) gradient over steps and rows. Where Dev sums rows (Dev::kSumsRows, the
// CPU), each row block adds its rows right after a step writes them (still in L1) into the block's double sums,
// merged in row order, so every run gives the same bits: a sum afterwards re-read the whole tensor (0.19 ms a
// lesson-7 layer, ~2.5% of its fwd+bwd; a GRU has two). A block that runs where Dev cannot sum (the CPU's one
// block of a large W_hh, whose steps are split across threads) leaves the whole sum to `result`.
class BlockSums {
 public:
  explicit BlockSums(int64_t G) : G_(G) {}
  void add(int64_t b0, std::vector<double>&& part) {
    const std::lock_guard<std::mutex> lock(m_);
    parts_.emplace(b0, std::move(part));
  }
  void missing() {
    const std::lock_guard<std::mutex> lock(m_);
    complete_ = false;
  }
  at::Tensor result(const at::Tensor& grad) const {
    if (!complete_) return grad.sum(at::IntArrayRef{0, 1});
    std::vector<double> total(G_, 0.0);
    for (const auto& [b0, part] : parts_) {
      for (int64_t j = 0; j < G_; ++j) total[j] += part[j];
    }
    return at::from_blob(total.data(), {G_}, at::TensorOptions().dtype(at::kDouble)).to(grad.options(), false, true);
  }

 private:
  int64_t G_;
  std::mutex m_;
  std::map<int64_t, std::vector<double>> parts_;
  bool complete_ = true;
};

// A row block's share of one or more BlockSums: `add(k, rows, n)` adds a step's rows to the k-th after the step,
// `finish` hands the shares over at the block's end.
template <class Dev>
struct BlockPart {
  bool here;
  int64_t b0, G;
  std::vector<std::vector<double>> parts;
  BlockPart(int64_t b0_, int64_t G_, int count) : here(sums_here()), b0(b0_), G(G_) {
    if (here) parts.assign(count, std::vector<double>(G, 0.0));
  }
  static bool sums_here() {
    if constexpr (Dev::kSumsRows) return Dev::sums_rows_here();
    return false;
  }
  template <typename T>
  void add(int k, const T* rows, int64_t n) {
    if constexpr (Dev::kSumsRows) {
      if (here) Dev::add_rows(rows, n, G, parts[k].data());
    }
  }
  void finish(std::initializer_list<BlockSums*> sums) {
    int k = 0;
    for (BlockSums* s : sums) {
      if (here) s->add(b0, std::move(parts[k++]));
      else s->missing();
    }
  }
};

// A (T, B, W) sequence or a (B, W) state seen as a base pointer: rows [b0, b0 + n) of step t are contiguous.
template <typename P>
struct Seq {
  P* p;
  int64_t B, W;
  P* at(int64_t t, int64_t b0) const { return p + (t * B + b0) * W; }
  P* at(int64_t b0) const { return p + b0 * W; }
};

template <typename P>
Seq<P> seq(const at::Tensor& t, int64_t B, int64_t W) {
  return {reinterpret_cast<P*>(t.data_ptr()), B, W};
}

// The loops below run on typed pointers, dispatched once per call: per step they create no tensors, so the
// framework's per-op overhead (a few microseconds a view) stays out of a step that itself takes tens.
// Dev::weight<T>(w, wt, N, K, m, steps, tensor) describes the right operand once per call (the CPU may pack it
// there when `steps` GEMMs will use it: one pass over W_hh instead of a re-blocking on every step);
// Dev::gemm(n, a, W, c, like) then computes c (n x N) = a (n x K) @ op(w), op(w) = w^T for w (N x K) when wt, else
// w (K x N).

template <typename T>
struct Weight {
  const T* w;
  bool wt;
  int64_t N, K;
  int64_t m;          // the row count the packed form was made for
  at::Tensor packed;  // empty unless Dev packed it
  int kind = 0;       // which packed form (Dev's own tags)
};

// The LSTM passes below serve the plain layer and, with w_hr defined, the layer with a projection (torch's
// proj_size): h_t = W_hr u_t, u_t = o_t * tanh(c_t), h (P < H values) the output and the next step's recurrent
// input, u the cell's own output, kept for the backward. A projected step adds the projection GEMM (u_t W_hr^T into
// the output) to the recurrent GEMM (K = P) and the same fused cell (writing u). Shapes: xg (T, B, 4H), h0 (B, P),
// c0 (B, H), w_hh (4H, P), w_hr (P, H); P = H without a projection.
//
// `save`: keep every step's activated gates and cell state (and u) for the backward. Without it (inference) one
// step's gates and two steps' cell states are kept, reused step after step; the returned c_all and gates are those
// slots. Returns (output (T, B, P), h_n, c_n, c_all, gates, u (undefined without a projection)).
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_pass_fwd(
    const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& w_hr,
    const at::Tensor& b, const Dims& d, bool reverse, bool save) {
  const bool proj = w_hr.defined();
  const auto acc = xg.options().dtype(acc_type(xg.scalar_type()));
  const int64_t B = d.B, H = d.H, G = 4 * H, P = proj ? w_hr.size(0) : H;
  at::Tensor out = Dev::empty({d.T, B, P}, xg.options());
  at::Tensor c_all = Dev::empty({save ? d.T : std::min<int64_t>(2, d.T), B, H}, acc);
  at::Tensor gates = Dev::empty({save ? d.T : 1, B, G}, acc);
  at::Tensor u_all = proj ? Dev::empty({save ? d.T : 1, B, H}, xg.options()) : at::Tensor();
  const at::Tensor h0c = h0.contiguous(), c0a = c0.to(acc).contiguous(), w = w_hh.contiguous();
  const at::Tensor wr = proj ? w_hr.contiguous() : at::Tensor();
  const Order o{d.T, reverse};
  Dev::dispatch(xg.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto x = seq<const T>(xg, B, G);
    const auto y = seq<T>(out, B, P);
    const auto u = proj ? seq<T>(u_all, B, H) : y;  // the cell's output: the layer's own without a projection
    const auto h_init = seq<const T>(h0c, B, P);
    const auto c = seq<A>(c_all, B, H);
    const auto c_init = seq<const A>(c0a, B, H);
    const auto g = seq<A>(gates, B, G);
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const T* bp = reinterpret_cast<const T*>(b.data_ptr());
    if (!proj && Dev::lstm_fwd_whole(d, o, save, x, h_init, c_init, wp, bp, y, c, g)) return;
    const Weight<T> W = Dev::template weight<T>(wp, true, G, P, B, d.T, w);
    const Weight<T> Wr = proj ? Dev::template weight<T>(reinterpret_cast<const T*>(wr.data_ptr()), true, P, H, B,
                                                         d.T, wr)
                              : Weight<T>{};
    Dev::row_blocks(B, G, d.T, w.nbytes() + (proj ? wr.nbytes() : 0), [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      const at::Tensor hg_buf = at::empty({n, G}, xg.options());
      T* hg = reinterpret_cast<T*>(hg_buf.data_ptr());
      for (int64_t s = 0; s < d.T; ++s) {
        const int64_t t = o.fwd(s), p = o.before(t);
        const int64_t ct = save ? t : s % 2, cp = save ? p : (s + 1) % 2, gt = save ? t : 0;
        T* ut = proj ? u.at(save ? t : 0, b0) : y.at(t, b0);
        Dev::gemm(n, s == 0 ? h_init.at(b0) : y.at(p, b0), W, hg, xg);
        Dev::lstm_fwd(x.at(t, b0), hg, bp, s == 0 ? c_init.at(b0) : c.at(cp, b0), g.at(gt, b0), c.at(ct, b0), ut,
                      n, H);
        if (proj) Dev::gemm(n, ut, Wr, y.at(t, b0), xg);
      }
    });
  });
  at::Tensor h_n = out.select(0, o.last()).clone();
  at::Tensor c_n = c_all.select(0, save ? o.last() : (d.T - 1) % 2).to(xg.scalar_type(), false, /*copy=*/true);
  return {out, h_n, c_n, c_all, gates, u_all};
}

// The backward of lstm_pass_fwd: (grad xg, grad h0, grad c0, grad w_hh, grad bias). The gradient reaching u_t is
// dy_t (the cell kernel's first input) plus the recurrent part (its second); without a projection those are
// grad_out[t] and the step before's dh. With one, the gradient reaching h_t is grad_out[t] + r_t (grad_hn at the
// last step), u_t's (grad_out[t] + r_t) W_hr: dy = grad_out W_hr for every step at once (one GEMM before the loop,
// by the caller), r_t W_hr a step. `r` (T, B, P, grad_hn in the last step's slot) receives every r_t, for W_hr's
// gradient.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_pass_bwd(
    const at::Tensor& dy_in, const at::Tensor& grad_hn, const at::Tensor& grad_cn, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& r_all,
    const at::Tensor& out, const at::Tensor& c_all, const at::Tensor& gates, const Dims& d, bool reverse) {
  const bool proj = w_hr.defined();
  const auto acc = out.options().dtype(acc_type(out.scalar_type()));
  const int64_t B = d.B, H = d.H, G = 4 * H, P = proj ? w_hr.size(0) : H;
  at::Tensor dxg = Dev::empty({d.T, B, G}, out.options());
  BlockSums db(G);
  at::Tensor dc = grad_cn.to(acc, false, /*copy=*/true).contiguous();
  at::Tensor dh0 = at::empty({B, P}, out.options());
  const at::Tensor c0a = c0.to(acc).contiguous(), dhn = grad_hn.contiguous(), w = w_hh.contiguous();
  const at::Tensor wr = proj ? w_hr.contiguous() : at::Tensor();
  const Order o{d.T, reverse};
  Dev::dispatch(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto dy = seq<const T>(dy_in, B, H);
    const auto dx = seq<T>(dxg, B, G);
    const auto dh = seq<T>(dh0, B, P);
    const auto dh_last = seq<const T>(dhn, B, P);
    const auto r = proj ? seq<T>(r_all, B, P) : dh;
    const auto g = seq<const A>(gates, B, G);
    const auto c = seq<const A>(c_all, B, H);
    const auto c_init = seq<const A>(c0a, B, H);
    const auto dcs = seq<A>(dc, B, H);
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    if (!proj && Dev::lstm_bwd_whole(d, o, dy, dh_last, g, c, c_init, wp, dcs, dx, dh)) return db.missing();
    const Weight<T> W = Dev::template weight<T>(wp, false, P, G, B, d.T, w);
    const Weight<T> Wr = proj ? Dev::template weight<T>(reinterpret_cast<const T*>(wr.data_ptr()), false, H, P, B,
                                                         d.T, wr)
                              : Weight<T>{};
    Dev::row_blocks(B, G, d.T, w.nbytes() + (proj ? wr.nbytes() : 0), [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      BlockPart<Dev> part(b0, G, 1);
      const at::Tensor rh_buf = proj ? at::empty({n, H}, out.options()) : at::Tensor();
      T* rh = proj ? reinterpret_cast<T*>(rh_buf.data_ptr()) : nullptr;
      for (int64_t s = 0; s < d.T; ++s) {
        const int64_t t = o.bwd(s);
        if (proj) Dev::gemm(n, r.at(t, b0), Wr, rh, out);
        const T* rec = proj ? rh : s == 0 ? dh_last.at(b0) : dh.at(b0);
        Dev::lstm_bwd(dy.at(t, b0), rec, g.at(t, b0), t == o.first() ? c_init.at(b0) : c.at(o.before(t), b0),
                      c.at(t, b0), dcs.at(b0), dx.at(t, b0), n, H);
        part.add(0, dx.at(t, b0), n);
        Dev::gemm(n, dx.at(t, b0), W, proj && t != o.first() ? r.at(o.before(t), b0) : dh.at(b0), out);
      }
      part.finish({&db});
    });
  });
  return {dxg, dh0, dc.to(c0.scalar_type()), weight_grad<Dev>(dxg, h0.contiguous(), out, o), db.result(dxg)};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(
    const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& bias, bool reverse, bool save = true) {
  constexpr const char* op = "lstm_layer_fwd";
  const Dims d = check_layer(xg, h0, w_hh, 4, op);
  check_state(c0, d, xg, "c0", op);
  const at::Tensor b = bias_or_zeros(bias, xg, 4 * d.H, "bias", op);
  auto [out, h_n, c_n, c_all, gates, u] = lstm_pass_fwd<Dev>(xg, h0, c0, w_hh, at::Tensor(), b, d, reverse, save);
  return {out, h_n, c_n, c_all, gates};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& grad_cn, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& out, const at::Tensor& c_all,
    const at::Tensor& gates, bool reverse) {
  constexpr const char* op = "lstm_layer_bwd";
  const Dims d = check_backward(grad_out, grad_hn, out, gates, op);
  TORCH_CHECK(c_all.sizes() == out.sizes(), op, ": saved tensors do not match the output");
  check_state(grad_cn, d, out, "grad_cn", op);
  check_state(c0, d, out, "c0", op);
  return lstm_pass_bwd<Dev>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, at::Tensor(), at::Tensor(), out, c_all, gates,
                            d, reverse);
}

// ---- the layer with a projection ----
struct ProjDims {
  Dims d;
  int64_t P;
};

// w_hh (4H, P) and w_hr (P, H), 0 < P < H, like x: returns P.
inline int64_t check_proj_weights(const at::Tensor& w_hh, const at::Tensor& w_hr, int64_t H, const at::Tensor& x,
                                  const char* op) {
  check_like(w_hr, x, "w_hr", op);
  TORCH_CHECK(w_hr.dim() == 2 && w_hr.size(1) == H && w_hr.size(0) > 0 && w_hr.size(0) < H, op,
              ": w_hr must be (P, ", H, ") with 0 < P < ", H, ", got ", w_hr.sizes());
  const int64_t P = w_hr.size(0);
  check_like(w_hh, x, "w_hh", op);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == P, op, ": w_hh must be (", 4 * H, ", ",
              P, "), got ", w_hh.sizes());
  return P;
}

inline ProjDims check_proj_layer(const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& c0,
                                 const at::Tensor& w_hh, const at::Tensor& w_hr, const char* op) {
  check_float(xg, "xg", op);
  TORCH_CHECK(xg.dim() == 3 && xg.size(2) % 4 == 0 && xg.size(2) > 0, op, ": xg must be (T, B, 4*H), got ",
              xg.sizes());
  TORCH_CHECK(xg.is_contiguous(), op, ": xg must be contiguous");
  TORCH_CHECK(xg.size(0) > 0, op, ": the sequence must have at least one step");
  const Dims d{xg.size(0), xg.size(1), xg.size(2) / 4};
  const int64_t P = check_proj_weights(w_hh, w_hr, d.H, xg, op);
  check_state(h0, Dims{d.T, d.B, P}, xg, "h0", op);
  check_state(c0, d, xg, "c0", op);
  return {d, P};
}

// Returns (output (T, B, P), h_n, c_n, c_all, gates, u (T, B, H)).
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_fwd(
    const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& w_hr,
    const std::optional<at::Tensor>& bias, bool reverse, bool save = true) {
  constexpr const char* op = "lstm_proj_layer_fwd";
  const ProjDims pd = check_proj_layer(xg, h0, c0, w_hh, w_hr, op);
  const at::Tensor b = bias_or_zeros(bias, xg, 4 * pd.d.H, "bias", op);
  return lstm_pass_fwd<Dev>(xg, h0, c0, w_hh, w_hr, b, pd.d, reverse, save);
}

// Returns (grad xg, grad h0, grad c0, grad w_hh, grad w_hr, grad bias). W_hr's gradient is
// sum_t (grad_out[t] + r_t)^T u_t, one GEMM after the loop.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& grad_cn, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& out,
    const at::Tensor& u_all, const at::Tensor& c_all, const at::Tensor& gates, bool reverse) {
  constexpr const char* op = "lstm_proj_layer_bwd";
  check_float(out, "out", op);
  TORCH_CHECK(u_all.dim() == 3 && u_all.size(0) > 0 && u_all.size(2) > 0, op, ": u must be (T, B, H), got ",
              u_all.sizes());
  const Dims d{u_all.size(0), u_all.size(1), u_all.size(2)};
  const int64_t P = check_proj_weights(w_hh, w_hr, d.H, out, op);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({d.T, d.B, P}), op, ": out must be (", d.T, ", ", d.B, ", ", P,
              "), got ", out.sizes());
  check_state(h0, Dims{d.T, d.B, P}, out, "h0", op);
  check_state(c0, d, out, "c0", op);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous(), op, ": grad_out must be contiguous ",
              out.sizes());
  check_like(grad_out, out, "grad_out", op);
  check_like(out, u_all, "out", op);
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({d.T, d.B, 4 * d.H}), op, ": saved gates do not match the output");
  TORCH_CHECK(c_all.sizes() == u_all.sizes(), op, ": saved cell states do not match the output");
  check_state(grad_hn, Dims{d.T, d.B, P}, out, "grad_hn", op);
  check_state(grad_cn, d, out, "grad_cn", op);
  const int64_t rows = d.T * d.B;
  const at::Tensor wr = w_hr.contiguous();
  at::Tensor du_out = Dev::empty({d.T, d.B, d.H}, out.options());
  at::Tensor du_rows = du_out.view({rows, d.H});
  at::mm_out(du_rows, grad_out.view({rows, P}), wr);
  at::Tensor r = Dev::empty({d.T, d.B, P}, out.options());
  r.select(0, reverse ? 0 : d.T - 1).copy_(grad_hn);
  auto [dxg, dh0, dc0, dw, db] = lstm_pass_bwd<Dev>(du_out, grad_hn, grad_cn, h0, c0, w_hh, wr, r, out, c_all,
                                                    gates, d, reverse);
  at::Tensor dwr = at::mm(r.add_(grad_out).view({rows, P}).t(), u_all.contiguous().view({rows, d.H}));
  return {dxg, dh0, dc0, dw, dwr, db};
}

// `save` as lstm_layer_fwd's: without it one step's saved values are kept, reused step after step.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(const at::Tensor& xg, const at::Tensor& h0,
                                                             const at::Tensor& w_hh,
                                                             const std::optional<at::Tensor>& b_ih,
                                                             const std::optional<at::Tensor>& b_hh, bool reverse,
                                                             bool save = true) {
  constexpr const char* op = "gru_layer_fwd";
  const Dims d = check_layer(xg, h0, w_hh, 3, op);
  const at::Tensor bi = bias_or_zeros(b_ih, xg, 3 * d.H, "b_ih", op), bh = bias_or_zeros(b_hh, xg, 3 * d.H, "b_hh", op);
  const auto acc = xg.options().dtype(acc_type(xg.scalar_type()));
  const int64_t B = d.B, H = d.H, G = 3 * H;
  at::Tensor out = Dev::empty({d.T, B, H}, xg.options());
  at::Tensor saved = Dev::empty({save ? d.T : 1, B, 4 * H}, acc);
  const at::Tensor h0c = h0.contiguous(), w = w_hh.contiguous();
  const Order o{d.T, reverse};
  Dev::dispatch(xg.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto x = seq<const T>(xg, B, G);
    const auto y = seq<T>(out, B, H);
    const auto h_init = seq<const T>(h0c, B, H);
    const auto sv = seq<A>(saved, B, 4 * H);
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const T *bip = reinterpret_cast<const T*>(bi.data_ptr()), *bhp = reinterpret_cast<const T*>(bh.data_ptr());
    if (Dev::gru_fwd_whole(d, o, save, x, h_init, wp, bip, bhp, y, sv)) return;
    const Weight<T> W = Dev::template weight<T>(wp, true, G, H, B, d.T, w);
    Dev::row_blocks(B, G, d.T, w.nbytes(), [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      const at::Tensor hg_buf = at::empty({n, G}, xg.options());
      T* hg = reinterpret_cast<T*>(hg_buf.data_ptr());
      for (int64_t s = 0; s < d.T; ++s) {
        const int64_t t = o.fwd(s);
        const T* h_prev = s == 0 ? h_init.at(b0) : y.at(o.before(t), b0);
        Dev::gemm(n, h_prev, W, hg, xg);
        Dev::gru_fwd(x.at(t, b0), hg, bip, bhp, h_prev, sv.at(save ? t : 0, b0), y.at(t, b0), n, H);
      }
    });
  });
  return {out, out.select(0, o.last()).clone(), saved};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& h0, const at::Tensor& w_hh,
    const at::Tensor& out, const at::Tensor& saved, bool reverse) {
  constexpr const char* op = "gru_layer_bwd";
  const Dims d = check_backward(grad_out, grad_hn, out, saved, op);
  const auto acc = out.options().dtype(acc_type(out.scalar_type()));
  const int64_t B = d.B, H = d.H, G = 3 * H;
  at::Tensor dxg = Dev::empty({d.T, B, G}, out.options());
  at::Tensor dhg = Dev::empty({d.T, B, G}, out.options());
  BlockSums db_ih(G), db_hh(G);
  at::Tensor dh_direct = at::zeros({B, H}, acc);
  at::Tensor dh0 = at::empty({B, H}, out.options());
  const at::Tensor h0c = h0.contiguous(), dhn = grad_hn.contiguous(), w = w_hh.contiguous();
  const Order o{d.T, reverse};
  Dev::dispatch(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto dy = seq<const T>(grad_out, B, H);
    const auto y = seq<const T>(out, B, H);
    const auto h_init = seq<const T>(h0c, B, H);
    const auto dx = seq<T>(dxg, B, G);
    const auto dg = seq<T>(dhg, B, G);
    const auto dh = seq<T>(dh0, B, H);
    const auto dh_last = seq<const T>(dhn, B, H);
    const auto sv = seq<const A>(saved, B, 4 * H);
    const auto direct = seq<A>(dh_direct, B, H);
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    if (Dev::gru_bwd_whole(d, o, dy, dh_last, sv, y, h_init, wp, direct, dx, dg, dh)) {
      db_ih.missing();
      return db_hh.missing();
    }
    const Weight<T> W = Dev::template weight<T>(wp, false, H, G, B, d.T, w);
    Dev::row_blocks(B, G, d.T, w.nbytes(), [&](int64_t b0, int64_t b1) {
      const int64_t n = b1 - b0;
      BlockPart<Dev> part(b0, G, 2);
      for (int64_t s = 0; s < d.T; ++s) {
        const int64_t t = o.bwd(s);
        Dev::gru_bwd(dy.at(t, b0), s == 0 ? dh_last.at(b0) : dh.at(b0), direct.at(b0), sv.at(t, b0),
                     t == o.first() ? h_init.at(b0) : y.at(o.before(t), b0), dx.at(t, b0), dg.at(t, b0), n, H);
        part.add(0, dx.at(t, b0), n);
        part.add(1, dg.at(t, b0), n);
        Dev::gemm(n, dg.at(t, b0), W, dh.at(b0), out);
      }
      part.finish({&db_ih, &db_hh});
    });
  });
  dh0.add_(dh_direct);
  return {dxg, dh0, weight_grad<Dev>(dhg, h0c, out, o), db_ih.result(dxg), db_hh.result(dhg)};
}

}  // namespace rnn
}  // namespace fck
