// LSTM and GRU layers on the CPU: the loops of fck/rnn_host.h with one fused pointwise pass per time step.
//
// The pointwise pass is where stock PyTorch spends most of a small RNN's time (a dozen ATen ops per step, each a
// pass over the gates). Here it is one loop over the batch rows, split across threads when a step is big enough to
// pay for the fork, vectorized across the hidden units (the exp in fck/rnn.h is plain arithmetic), and compiled
// a second time for AVX2+FMA+F16C, picked at run time.
#include <ATen/Parallel.h>

#include <algorithm>

#include "fck/cpu_vec.h"
#include "fck/ops.h"
#include "fck/rnn.h"
#include "fck/rnn_host.h"

namespace fck {
namespace cpu {
namespace {

#define FCK_INLINE inline __attribute__((always_inline))

template <typename T>
FCK_INLINE acc_t<T> ld(raw_t<T> v) {
  return Storage<T>::load(v);
}

template <typename T>
const raw_t<T>* in(const at::Tensor& t) {
  return reinterpret_cast<const raw_t<T>*>(t.data_ptr());
}
template <typename T>
raw_t<T>* out(const at::Tensor& t) {
  return reinterpret_cast<raw_t<T>*>(t.data_ptr());
}
template <typename T>
const acc_t<T>* in_acc(const at::Tensor& t) {
  return t.data_ptr<acc_t<T>>();
}
template <typename T>
acc_t<T>* out_acc(const at::Tensor& t) {
  return t.data_ptr<acc_t<T>>();
}

// ---- the row loops: rows [b0, b1) of one step; G*H values per row for gate tensors, H for states ----

template <typename T>
struct LstmFwd {
  const raw_t<T>*xg, *hg;
  const acc_t<T>* c_prev;
  acc_t<T>*gates, *c;
  raw_t<T>* h;
  int64_t H;
  FCK_INLINE void operator()(int64_t b0, int64_t b1) const {
    using A = acc_t<T>;
    for (int64_t b = b0; b < b1; ++b) {
      const raw_t<T>*x = xg + b * 4 * H, *r = hg + b * 4 * H;
      A* g = gates + b * 4 * H;
      for (int64_t j = 0; j < H; ++j) {
        A cc, hh;
        const LstmGates<A> a =
            lstm_forward<A>(ld<T>(x[j]) + ld<T>(r[j]), ld<T>(x[H + j]) + ld<T>(r[H + j]),
                            ld<T>(x[2 * H + j]) + ld<T>(r[2 * H + j]), ld<T>(x[3 * H + j]) + ld<T>(r[3 * H + j]),
                            c_prev[b * H + j], cc, hh);
        g[j] = a.i, g[H + j] = a.f, g[2 * H + j] = a.g, g[3 * H + j] = a.o;
        c[b * H + j] = cc;
        h[b * H + j] = Storage<T>::store(hh);
      }
    }
  }
};

template <typename T>
struct LstmBwd {
  const raw_t<T>*dout, *dh_rec;
  const acc_t<T>*gates, *c_prev, *c;
  acc_t<T>* dc;
  raw_t<T>* dxg;
  int64_t H;
  FCK_INLINE void operator()(int64_t b0, int64_t b1) const {
    using A = acc_t<T>;
    for (int64_t b = b0; b < b1; ++b) {
      const A* g = gates + b * 4 * H;
      raw_t<T>* d = dxg + b * 4 * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = b * H + j;
        A dcj = dc[k];
        const LstmGates<A> p = lstm_backward<A>(ld<T>(dout[k]) + ld<T>(dh_rec[k]), dcj,
                                                {g[j], g[H + j], g[2 * H + j], g[3 * H + j]}, c_prev[k], c[k]);
        dc[k] = dcj;
        d[j] = Storage<T>::store(p.i), d[H + j] = Storage<T>::store(p.f);
        d[2 * H + j] = Storage<T>::store(p.g), d[3 * H + j] = Storage<T>::store(p.o);
      }
    }
  }
};

template <typename T>
struct GruFwd {
  const raw_t<T>*xg, *hg, *h_prev;
  acc_t<T>* saved;
  raw_t<T>* h;
  int64_t H;
  FCK_INLINE void operator()(int64_t b0, int64_t b1) const {
    using A = acc_t<T>;
    for (int64_t b = b0; b < b1; ++b) {
      const raw_t<T>*x = xg + b * 3 * H, *r = hg + b * 3 * H;
      A* s = saved + b * 4 * H;
      for (int64_t j = 0; j < H; ++j) {
        A hh;
        const GruSaved<A> v = gru_forward<A>(ld<T>(x[j]), ld<T>(x[H + j]), ld<T>(x[2 * H + j]), ld<T>(r[j]),
                                             ld<T>(r[H + j]), ld<T>(r[2 * H + j]), ld<T>(h_prev[b * H + j]), hh);
        s[j] = v.r, s[H + j] = v.z, s[2 * H + j] = v.n, s[3 * H + j] = v.bn;
        h[b * H + j] = Storage<T>::store(hh);
      }
    }
  }
};

template <typename T>
struct GruBwd {
  const raw_t<T>*dout, *dh_rec, *h_prev;
  acc_t<T>* dh_direct;
  const acc_t<T>* saved;
  raw_t<T>*dxg, *dhg;
  int64_t H;
  FCK_INLINE void operator()(int64_t b0, int64_t b1) const {
    using A = acc_t<T>;
    for (int64_t b = b0; b < b1; ++b) {
      const A* s = saved + b * 4 * H;
      raw_t<T>*dx = dxg + b * 3 * H, *dg = dhg + b * 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = b * H + j;
        const GruGrads<A> p = gru_backward<A>(ld<T>(dout[k]) + ld<T>(dh_rec[k]) + dh_direct[k],
                                              {s[j], s[H + j], s[2 * H + j], s[3 * H + j]}, ld<T>(h_prev[k]));
        dh_direct[k] = p.h_prev;
        dx[j] = dg[j] = Storage<T>::store(p.r);
        dx[H + j] = dg[H + j] = Storage<T>::store(p.z);
        dx[2 * H + j] = Storage<T>::store(p.an);
        dg[2 * H + j] = Storage<T>::store(p.bn);
      }
    }
  }
};

// The same row loop compiled for baseline x86-64 and for AVX2+FMA+F16C (the always-inline body takes on the
// caller's target).
template <class K>
void rows_base(const K& k, int64_t b0, int64_t b1) {
  k(b0, b1);
}
#ifdef FCK_HAVE_AVX2_CLONE
template <class K>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const K& k, int64_t b0, int64_t b1) {
  k(b0, b1);
}
#endif

// A step is split across threads only when each thread gets ~16k gate values: below that the fork costs more.
template <class K>
void run_rows(const K& k, int64_t B, int64_t values_per_row) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, values_per_row));
#ifdef FCK_HAVE_AVX2_CLONE
  if (cpu_runs_avx2_clone()) {
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { rows_avx2(k, b0, b1); });
    return;
  }
#endif
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { rows_base(k, b0, b1); });
}

struct RnnSteps {
  static void lstm_fwd_step(const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& c_prev,
                            const at::Tensor& gates, const at::Tensor& c, const at::Tensor& h) {
    const int64_t B = h.size(0), H = h.size(1);
    dispatch_float(xg.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      run_rows(LstmFwd<T>{in<T>(xg), in<T>(hg), in_acc<T>(c_prev), out_acc<T>(gates), out_acc<T>(c), out<T>(h), H},
               B, 4 * H);
    });
  }
  static void lstm_bwd_step(const at::Tensor& dout, const at::Tensor& dh_rec, const at::Tensor& gates,
                            const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dc,
                            const at::Tensor& dxg) {
    const int64_t B = dc.size(0), H = dc.size(1);
    dispatch_float(dxg.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      run_rows(LstmBwd<T>{in<T>(dout), in<T>(dh_rec), in_acc<T>(gates), in_acc<T>(c_prev), in_acc<T>(c),
                          out_acc<T>(dc), out<T>(dxg), H},
               B, 4 * H);
    });
  }
  static void gru_fwd_step(const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& h_prev,
                           const at::Tensor& saved, const at::Tensor& h) {
    const int64_t B = h.size(0), H = h.size(1);
    dispatch_float(xg.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      run_rows(GruFwd<T>{in<T>(xg), in<T>(hg), in<T>(h_prev), out_acc<T>(saved), out<T>(h), H}, B, 3 * H);
    });
  }
  static void gru_bwd_step(const at::Tensor& dout, const at::Tensor& dh_rec, const at::Tensor& dh_direct,
                           const at::Tensor& saved, const at::Tensor& h_prev, const at::Tensor& dxg,
                           const at::Tensor& dhg) {
    const int64_t B = dh_direct.size(0), H = dh_direct.size(1);
    dispatch_float(dxg.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      run_rows(GruBwd<T>{in<T>(dout), in<T>(dh_rec), in<T>(h_prev), out_acc<T>(dh_direct), in_acc<T>(saved),
                         out<T>(dxg), out<T>(dhg), H},
               B, 4 * H);
    });
  }
};

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got one on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(FCK_LSTM_FWD_ARGS) {
  check_cpu(xg, "lstm_layer_fwd");
  return rnn::lstm_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(FCK_LSTM_BWD_ARGS) {
  check_cpu(out, "lstm_layer_bwd");
  return rnn::lstm_layer_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, out, c_all, gates, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(FCK_GRU_FWD_ARGS) {
  check_cpu(xg, "gru_layer_fwd");
  return rnn::gru_layer_fwd<RnnSteps>(xg, h0, w_hh, b_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(FCK_GRU_BWD_ARGS) {
  check_cpu(out, "gru_layer_bwd");
  return rnn::gru_layer_bwd<RnnSteps>(grad_out, grad_hn, h0, w_hh, out, saved, reverse);
}

}  // namespace cpu
}  // namespace fck
