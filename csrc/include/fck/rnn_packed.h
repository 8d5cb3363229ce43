// One LSTM/GRU layer in one direction over a PackedSequence's rows, in one call: the loops of rnn_host.h with
// batch_sizes[t] rows at step t. Layer calls per run of equal batch size (ops/rnn.py's _packed_direction, which
// the other backends take) cost a call, a W_hh pack and a weight-gradient GEMM per run: a lesson-7 LSTM on 64
// sequences of 14-70 steps (~40 runs) took 2x its padded fwd+bwd, for 0.6x the work.
//
// The layout: xg (N, G) holds step t's rows at off[t] = sum of the earlier batch sizes, rows in the sorted
// sequences' order (longest first), so the rows active at a step are a prefix [0, batch_sizes[t]) and shrink with t.
// Each row keeps its own state: forward in time, every row active at t was active at t - 1, so its previous state
// is the previous step's output; in reverse, the rows that join at t (those past the batch of t + 1) start from h0
// and c0, the rest from step t + 1: a step is at most two pieces of contiguous rows. Without a projection the
// backward needs no pieces for the recurrent gradient: its buffer starts as grad_hn (grad_cn), and a row's entry is
// first read at the row's last step in time order and last written at its first, so it ends as that row's gradient
// of h0 (c0). With one, the gradient reaching h is kept per packed row (for W_hr's gradient; see lstm_packed_bwd).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "fck/rnn_host.h"

namespace fck {
namespace rnn {

struct Packed {
  std::vector<int64_t> sizes, off;  // rows per step, first row of each step
  int64_t N = 0, B = 0;
  int64_t T() const { return static_cast<int64_t>(sizes.size()); }
  // Rows of step t whose previous state (in the pass's time order) is a step's, not the initial one.
  int64_t with_prev(const Order& o, int64_t t) const { return t == o.first() ? 0 : sizes[o.before(t)]; }
  // Where row b's state ends up: its last active step in time order.
  int64_t last_step(const Order& o, int64_t b) const {
    if (o.reverse) return 0;
    const auto it = std::lower_bound(sizes.begin(), sizes.end(), b, [](int64_t s, int64_t v) { return s > v; });
    return (it - sizes.begin()) - 1;
  }
};

inline Packed check_packed(const at::Tensor& batch_sizes, int64_t N, const char* op) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong, op,
              ": batch_sizes must be a 1-D int64 CPU tensor");
  const at::Tensor bs = batch_sizes.contiguous();
  Packed p;
  const int64_t* s = bs.data_ptr<int64_t>();
  p.sizes.assign(s, s + bs.numel());
  TORCH_CHECK(!p.sizes.empty(), op, ": the sequence must have at least one step");
  int64_t row = 0;
  for (int64_t t = 0; t < p.T(); ++t) {
    TORCH_CHECK(p.sizes[t] > 0 && (t == 0 || p.sizes[t] <= p.sizes[t - 1]), op,
                ": batch_sizes must be positive and non-increasing");
    p.off.push_back(row);
    row += p.sizes[t];
  }
  TORCH_CHECK(row == N, op, ": batch_sizes sum to ", row, " but the packed tensors have ", N, " rows");
  p.N = N;
  p.B = p.sizes[0];
  return p;
}

// Rows [b0, b0 + n) of step t of a packed (N, W) tensor.
template <typename P>
struct PSeq {
  P* p;
  const Packed* pk;
  int64_t W;
  P* at(int64_t t, int64_t b0) const { return p + (pk->off[t] + b0) * W; }
};

template <typename P>
PSeq<P> pseq(const at::Tensor& t, const Packed& pk, int64_t W) {
  return {reinterpret_cast<P*>(t.data_ptr()), &pk, W};
}

// Calls f(r0, r1, has_prev) for the pieces of rows [b0, e), b0 < e, of step t: those with a previous step's state, then
// those starting from the initial one.
template <class F>
void pieces(int64_t b0, int64_t e, int64_t with_prev, const F& f) {
  const int64_t mid = std::clamp(with_prev, b0, e);
  if (mid > b0) f(b0, mid, true);
  if (e > mid) f(mid, e, false);
}

// Calls step(t, p, e) for the steps of a pass over rows [b0, b1), in the pass's order (backward: the backward
// pass's), skipping steps with none of those rows: t the time step, p = the step before it in time order, e the end
// of the rows active at t.
template <class F>
void walk(const Packed& pk, const Order& o, bool backward, int64_t b0, int64_t b1, const F& step) {
  for (int64_t s = 0; s < pk.T(); ++s) {
    const int64_t t = backward ? o.bwd(s) : o.fwd(s), e = std::min(b1, pk.sizes[t]);
    if (e > b0) step(t, o.before(t), e);
  }
}

// An index tensor of the given row numbers (a CPU tensor, as the packed tensors are).
inline at::Tensor row_index(std::vector<int64_t>&& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  return at::from_blob(rows.data(), {n}, at::TensorOptions().dtype(at::kLong)).clone();
}

// The packed row where each sequence's state ends up (its last active step in time order), by sequence.
inline at::Tensor last_rows(const Packed& pk, const Order& o) {
  std::vector<int64_t> rows(pk.B);
  for (int64_t b = 0; b < pk.B; ++b) rows[b] = pk.off[pk.last_step(o, b)] + b;
  return row_index(std::move(rows));
}

// Each packed row's previous hidden state (a step's output, or for a sequence's first step its h0 row), stacked:
// W_hh's gradient is then one GEMM. Gathered from out, then the B first rows overwritten from h0 (concatenating
// out and h0 to gather from both would copy out once more).
inline at::Tensor previous_states(const at::Tensor& out, const at::Tensor& h0, const Packed& pk, const Order& o) {
  std::vector<int64_t> index(pk.N), first(pk.B);
  for (int64_t t = 0; t < pk.T(); ++t) {
    const int64_t prev = pk.with_prev(o, t);
    for (int64_t b = 0; b < pk.sizes[t]; ++b) {
      const int64_t row = pk.off[t] + b;
      if (b < prev) {
        index[row] = pk.off[o.before(t)] + b;
      } else {
        index[row] = row;  // overwritten below
        first[b] = row;
      }
    }
  }
  return out.index_select(0, row_index(std::move(index))).index_copy_(0, row_index(std::move(first)), h0);
}

// Final states: row b of `all` (N, W) at its last step.
inline at::Tensor final_states(const at::Tensor& all, const Packed& pk, const Order& o) {
  return all.index_select(0, last_rows(pk, o));
}

inline void check_packed_state(const at::Tensor& s, const Packed& pk, int64_t W, const at::Tensor& x,
                               const char* what, const char* op) {
  check_like(s, x, what, op);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == pk.B && s.size(1) == W, op, ": ", what, " must be (", pk.B, ", ", W,
              "), got ", s.sizes());
}

inline Packed check_packed_layer(const at::Tensor& xg, const at::Tensor& batch_sizes, const at::Tensor& h0,
                                 const at::Tensor& w_hh, int64_t gates, const char* op) {
  check_float(xg, "xg", op);
  TORCH_CHECK(xg.dim() == 2 && xg.is_contiguous(), op, ": xg must be contiguous (N, ", gates, "*H), got ",
              xg.sizes());
  check_like(w_hh, xg, "w_hh", op);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1) && xg.size(1) == w_hh.size(0), op,
              ": w_hh must be (", gates, "*H, H) with xg's ", xg.size(1), " features, got ", w_hh.sizes());
  const Packed pk = check_packed(batch_sizes, xg.size(0), op);
  check_packed_state(h0, pk, w_hh.size(1), xg, "h0", op);
  return pk;
}

// What the GRU's backward checks: out (N, H) and its gradient, w_hh (gates H, H), the saved (N, saved_width)
// tensor; returns the packing.
inline Packed check_packed_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& w_hh,
                                    const at::Tensor& saved, int64_t gates, int64_t saved_width,
                                    const at::Tensor& batch_sizes, const char* op) {
  check_float(out, "out", op);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), op, ": out must be contiguous (N, H), got ", out.sizes());
  const Packed pk = check_packed(batch_sizes, out.size(0), op);
  const int64_t H = out.size(1);
  check_like(w_hh, out, "w_hh", op);
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({gates * H, H}), op, ": w_hh must be (", gates * H, ", ", H,
              "), got ", w_hh.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous(), op, ": grad_out must be contiguous ",
              out.sizes());
  check_like(grad_out, out, "grad_out", op);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({pk.N, saved_width}), op, ": saved tensors do not match the output");
  return pk;
}

// The LSTM's output width P for cell width H: proj_size with a projection w_hr (P, H), else H; w_hh (4H, P), both
// like `x`.
inline int64_t packed_lstm_width(int64_t H, const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& x,
                                 const char* op) {
  if (w_hr.defined()) return check_proj_weights(w_hh, w_hr, H, x, op);
  check_like(w_hh, x, "w_hh", op);
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({4 * H, H}), op, ": w_hh must be (", 4 * H, ", ", H, "), got ",
              w_hh.sizes());
  return H;
}

// Returns (out (N, P), h_n, c_n, c_all (N, H), gates (N, 4H), u (N, H) with a projection, else empty):
// lstm_pass_fwd's, packed. With a projection each step's cell writes u = o * tanh(c) and a second GEMM projects it
// into the output, h = u W_hr^T.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_fwd(
    const at::Tensor& xg, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr_opt, const std::optional<at::Tensor>& bias,
    bool reverse) {
  constexpr const char* op = "lstm_packed_fwd";
  check_float(xg, "xg", op);
  TORCH_CHECK(xg.dim() == 2 && xg.is_contiguous(), op, ": xg must be contiguous (N, 4*H), got ", xg.sizes());
  const at::Tensor w_hr = w_hr_opt.value_or(at::Tensor());
  const bool proj = w_hr.defined();
  TORCH_CHECK(xg.size(1) % 4 == 0, op, ": xg must have 4*H features, got ", xg.size(1));
  const int64_t H = xg.size(1) / 4, G = 4 * H, P = packed_lstm_width(H, w_hh, w_hr, xg, op);
  const Packed pk = check_packed(batch_sizes, xg.size(0), op);
  const int64_t B = pk.B;
  check_packed_state(h0, pk, P, xg, "h0", op);
  check_packed_state(c0, pk, H, xg, "c0", op);
  const at::Tensor b = bias_or_zeros(bias, xg, G, "bias", op);
  const auto acc = xg.options().dtype(acc_type(xg.scalar_type()));
  at::Tensor out = Dev::empty({pk.N, P}, xg.options());
  at::Tensor c_all = Dev::empty({pk.N, H}, acc);
  at::Tensor gates = Dev::empty({pk.N, G}, acc);
  at::Tensor u_all = proj ? Dev::empty({pk.N, H}, xg.options()) : at::empty({0}, xg.options());
  const at::Tensor h0c = h0.contiguous(), c0a = c0.to(acc).contiguous(), w = w_hh.contiguous();
  const at::Tensor wr = proj ? w_hr.contiguous() : at::Tensor();
  const Order o{pk.T(), reverse};
  Dev::dispatch(xg.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto x = pseq<const T>(xg, pk, G);
    const auto y = pseq<T>(out, pk, P);
    const auto u = proj ? pseq<T>(u_all, pk, H) : y;  // the cell's output: the layer's own without a projection
    const auto c = pseq<A>(c_all, pk, H);
    const auto g = pseq<A>(gates, pk, G);
    const T* h_init = reinterpret_cast<const T*>(h0c.data_ptr());
    const A* c_init = reinterpret_cast<const A*>(c0a.data_ptr());
    const T* bp = reinterpret_cast<const T*>(b.data_ptr());
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const Weight<T> W = Dev::template weight<T>(wp, true, G, P, B, pk.T(), w);
    const Weight<T> Wr = proj ? Dev::template weight<T>(reinterpret_cast<const T*>(wr.data_ptr()), true, P, H, B,
                                                         pk.T(), wr)
                              : Weight<T>{};
    Dev::row_blocks(B, G, pk.T(), w.nbytes() + (proj ? wr.nbytes() : 0), [&](int64_t b0, int64_t b1) {
      const at::Tensor hg_buf = at::empty({b1 - b0, G}, xg.options());
      T* hg = reinterpret_cast<T*>(hg_buf.data_ptr());
      walk(pk, o, false, b0, b1, [&](int64_t t, int64_t p, int64_t e) {
        pieces(b0, e, pk.with_prev(o, t), [&](int64_t r0, int64_t r1, bool has_prev) {
          Dev::gemm(r1 - r0, has_prev ? y.at(p, r0) : h_init + r0 * P, W, hg, xg);
          Dev::lstm_fwd(x.at(t, r0), hg, bp, has_prev ? c.at(p, r0) : c_init + r0 * H, g.at(t, r0), c.at(t, r0),
                        u.at(t, r0), r1 - r0, H);
        });
        if (proj) Dev::gemm(e - b0, u.at(t, b0), Wr, y.at(t, b0), xg);
      });
    });
  });
  return {out, final_states(out, pk, o), final_states(c_all, pk, o).to(xg.scalar_type()), c_all, gates, u_all};
}

// Returns (grad xg, grad h0, grad c0, grad w_hh, grad w_hr (empty without a projection), grad bias). Without a
// projection the recurrent gradient lives in one (B, H) buffer (see the top). With one, the gradient reaching h_t is
// r_t (+ grad_out's part, which enters through du = grad_out W_hr, one GEMM before the loop), kept per packed row
// for W_hr's gradient: r starts as grad_hn at each row's last step, and each step's GEMM writes the r of the step
// before it, or, for the rows that began there, h0's gradient.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& grad_cn, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr_opt,
    const at::Tensor& out, const at::Tensor& u_all, const at::Tensor& c_all, const at::Tensor& gates,
    bool reverse) {
  constexpr const char* op = "lstm_packed_bwd";
  check_float(out, "out", op);
  TORCH_CHECK(gates.dim() == 2 && gates.size(1) % 4 == 0, op, ": saved gates must be (N, 4*H), got ", gates.sizes());
  const at::Tensor w_hr = w_hr_opt.value_or(at::Tensor());
  const bool proj = w_hr.defined();
  const int64_t H = gates.size(1) / 4, G = 4 * H, P = packed_lstm_width(H, w_hh, w_hr, out, op);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(1) == P, op, ": out must be contiguous (N, ", P,
              "), got ", out.sizes());
  const Packed pk = check_packed(batch_sizes, out.size(0), op);
  const int64_t B = pk.B;
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.is_contiguous(), op, ": grad_out must be contiguous ",
              out.sizes());
  check_like(grad_out, out, "grad_out", op);
  TORCH_CHECK(gates.size(0) == pk.N && c_all.sizes() == at::IntArrayRef({pk.N, H}) &&
                  (!proj || u_all.sizes() == c_all.sizes()),
              op, ": saved tensors do not match the output");
  for (const auto& [s, what, width] : {std::tuple{&h0, "h0", P}, {&c0, "c0", H}, {&grad_hn, "grad_hn", P},
                                       {&grad_cn, "grad_cn", H}}) {
    check_packed_state(*s, pk, width, out, what, op);
  }
  const auto acc = out.options().dtype(acc_type(out.scalar_type()));
  at::Tensor dxg = Dev::empty({pk.N, G}, out.options());
  BlockSums db(G);
  at::Tensor dc = grad_cn.to(acc, false, /*copy=*/true).contiguous();
  at::Tensor dh = proj ? at::empty({B, P}, out.options()) : grad_hn.clone(at::MemoryFormat::Contiguous);
  const at::Tensor wr = proj ? w_hr.contiguous() : at::Tensor();
  const at::Tensor du_all = proj ? at::mm(grad_out, wr) : grad_out;
  at::Tensor r_all = proj ? Dev::empty({pk.N, P}, out.options()) : at::Tensor();
  const Order o{pk.T(), reverse};
  if (proj) r_all.index_copy_(0, last_rows(pk, o), grad_hn);
  const at::Tensor c0a = c0.to(acc).contiguous(), w = w_hh.contiguous();
  Dev::dispatch(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto dy = pseq<const T>(du_all, pk, H);
    const auto dx = pseq<T>(dxg, pk, G);
    const auto g = pseq<const A>(gates, pk, G);
    const auto c = pseq<const A>(c_all, pk, H);
    const auto r = proj ? pseq<T>(r_all, pk, P) : PSeq<T>{nullptr, &pk, P};  // r_t, with a projection
    const A* c_init = reinterpret_cast<const A*>(c0a.data_ptr());
    T* dhp = reinterpret_cast<T*>(dh.data_ptr());
    A* dcp = reinterpret_cast<A*>(dc.data_ptr());
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const Weight<T> W = Dev::template weight<T>(wp, false, P, G, B, pk.T(), w);
    const Weight<T> Wr = proj ? Dev::template weight<T>(reinterpret_cast<const T*>(wr.data_ptr()), false, H, P, B,
                                                         pk.T(), wr)
                              : Weight<T>{};
    Dev::row_blocks(B, G, pk.T(), w.nbytes() + (proj ? wr.nbytes() : 0), [&](int64_t b0, int64_t b1) {
      BlockPart<Dev> part(b0, G, 1);
      const at::Tensor rh_buf = proj ? at::empty({b1 - b0, H}, out.options()) : at::Tensor();
      T* rh = proj ? reinterpret_cast<T*>(rh_buf.data_ptr()) : nullptr;
      walk(pk, o, true, b0, b1, [&](int64_t t, int64_t p, int64_t e) {
        if (proj) Dev::gemm(e - b0, r.at(t, b0), Wr, rh, out);
        const int64_t with_prev = pk.with_prev(o, t);
        pieces(b0, e, with_prev, [&](int64_t r0, int64_t r1, bool has_prev) {
          Dev::lstm_bwd(dy.at(t, r0), proj ? rh + (r0 - b0) * H : dhp + r0 * H, g.at(t, r0),
                        has_prev ? c.at(p, r0) : c_init + r0 * H, c.at(t, r0), dcp + r0 * H, dx.at(t, r0), r1 - r0,
                        H);
        });
        part.add(0, dx.at(t, b0), e - b0);
        if (!proj) return Dev::gemm(e - b0, dx.at(t, b0), W, dhp + b0 * P, out);
        pieces(b0, e, with_prev, [&](int64_t r0, int64_t r1, bool has_prev) {
          Dev::gemm(r1 - r0, dx.at(t, r0), W, has_prev ? r.at(p, r0) : dhp + r0 * P, out);
        });
      });
      part.finish({&db});
    });
  });
  const at::Tensor dw = at::mm(dxg.t(), previous_states(out, h0, pk, o));
  const at::Tensor dwr = proj ? at::mm(r_all.add_(grad_out).t(), u_all) : at::empty({0}, out.options());
  return {dxg, dh, dc.to(c0.scalar_type()), dw, dwr, db.result(dxg.unsqueeze(0))};
}

// Returns (out (N, H), h_n, saved (N, 4H)).
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_packed_fwd(const at::Tensor& xg, const at::Tensor& batch_sizes,
                                                              const at::Tensor& h0, const at::Tensor& w_hh,
                                                              const std::optional<at::Tensor>& b_ih,
                                                              const std::optional<at::Tensor>& b_hh, bool reverse) {
  constexpr const char* op = "gru_packed_fwd";
  const Packed pk = check_packed_layer(xg, batch_sizes, h0, w_hh, 3, op);
  const int64_t B = pk.B, H = w_hh.size(1), G = 3 * H;
  const at::Tensor bi = bias_or_zeros(b_ih, xg, G, "b_ih", op), bh = bias_or_zeros(b_hh, xg, G, "b_hh", op);
  const auto acc = xg.options().dtype(acc_type(xg.scalar_type()));
  at::Tensor out = Dev::empty({pk.N, H}, xg.options());
  at::Tensor saved = Dev::empty({pk.N, 4 * H}, acc);
  const at::Tensor h0c = h0.contiguous(), w = w_hh.contiguous();
  const Order o{pk.T(), reverse};
  Dev::dispatch(xg.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto x = pseq<const T>(xg, pk, G);
    const auto y = pseq<T>(out, pk, H);
    const auto sv = pseq<A>(saved, pk, 4 * H);
    const T* h_init = reinterpret_cast<const T*>(h0c.data_ptr());
    const T *bip = reinterpret_cast<const T*>(bi.data_ptr()), *bhp = reinterpret_cast<const T*>(bh.data_ptr());
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const Weight<T> W = Dev::template weight<T>(wp, true, G, H, B, pk.T(), w);
    Dev::row_blocks(B, G, pk.T(), w.nbytes(), [&](int64_t b0, int64_t b1) {
      const at::Tensor hg_buf = at::empty({b1 - b0, G}, xg.options());
      T* hg = reinterpret_cast<T*>(hg_buf.data_ptr());
      walk(pk, o, false, b0, b1, [&](int64_t t, int64_t p, int64_t e) {
        pieces(b0, e, pk.with_prev(o, t), [&](int64_t r0, int64_t r1, bool has_prev) {
          const T* h_prev = has_prev ? y.at(p, r0) : h_init + r0 * H;
          Dev::gemm(r1 - r0, h_prev, W, hg, xg);
          Dev::gru_fwd(x.at(t, r0), hg, bip, bhp, h_prev, sv.at(t, r0), y.at(t, r0), r1 - r0, H);
        });
      });
    });
  });
  return {out, final_states(out, pk, o), saved};
}

// Returns (grad xg, grad h0, grad w_hh, grad b_ih, grad b_hh).
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_packed_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& w_hh, const at::Tensor& out, const at::Tensor& saved, bool reverse) {
  constexpr const char* op = "gru_packed_bwd";
  const Packed pk = check_packed_backward(grad_out, out, w_hh, saved, 3, 4 * out.size(-1), batch_sizes, op);
  const int64_t B = pk.B, H = out.size(1), G = 3 * H;
  check_packed_state(h0, pk, H, out, "h0", op);
  check_packed_state(grad_hn, pk, H, out, "grad_hn", op);
  const auto acc = out.options().dtype(acc_type(out.scalar_type()));
  at::Tensor dxg = Dev::empty({pk.N, G}, out.options());
  at::Tensor dhg = Dev::empty({pk.N, G}, out.options());
  BlockSums db_ih(G), db_hh(G);
  at::Tensor dh_direct = at::zeros({B, H}, acc);
  at::Tensor dh = grad_hn.clone(at::MemoryFormat::Contiguous);
  const at::Tensor h0c = h0.contiguous(), w = w_hh.contiguous();
  const Order o{pk.T(), reverse};
  Dev::dispatch(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename Dev::template Acc<T>;
    const auto dy = pseq<const T>(grad_out, pk, H);
    const auto y = pseq<const T>(out, pk, H);
    const auto dx = pseq<T>(dxg, pk, G);
    const auto dg = pseq<T>(dhg, pk, G);
    const auto sv = pseq<const A>(saved, pk, 4 * H);
    const T* h_init = reinterpret_cast<const T*>(h0c.data_ptr());
    T* dhp = reinterpret_cast<T*>(dh.data_ptr());
    A* direct = reinterpret_cast<A*>(dh_direct.data_ptr());
    const T* wp = reinterpret_cast<const T*>(w.data_ptr());
    const Weight<T> W = Dev::template weight<T>(wp, false, H, G, B, pk.T(), w);
    Dev::row_blocks(B, G, pk.T(), w.nbytes(), [&](int64_t b0, int64_t b1) {
      BlockPart<Dev> part(b0, G, 2);
      walk(pk, o, true, b0, b1, [&](int64_t t, int64_t p, int64_t e) {
        pieces(b0, e, pk.with_prev(o, t), [&](int64_t r0, int64_t r1, bool has_prev) {
          Dev::gru_bwd(dy.at(t, r0), dhp + r0 * H, direct + r0 * H, sv.at(t, r0),
                       has_prev ? y.at(p, r0) : h_init + r0 * H, dx.at(t, r0), dg.at(t, r0), r1 - r0, H);
        });
        part.add(0, dx.at(t, b0), e - b0);
        part.add(1, dg.at(t, b0), e - b0);
        Dev::gemm(e - b0, dg.at(t, b0), W, dhp + b0 * H, out);
      });
      part.finish({&db_ih, &db_hh});
    });
  });
  dh.add_(dh_direct);
  const at::Tensor dw = at::mm(dhg.t(), previous_states(out, h0c, pk, o));
  return {dxg, dh, dw, db_ih.result(dxg.unsqueeze(0)), db_hh.result(dhg.unsqueeze(0))};
}

}  // namespace rnn
}  // namespace fck
