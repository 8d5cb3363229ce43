// Training batch norm (+ add, + ReLU) of planar inputs with small channels in one kernel per pass (CUDA; the CPU
// tests run the same code emulated, FCK_BN_FUSED_EMULATE=1, fck/block_launch.h).
//
// The three-launch path (reduce, finalize, apply) reads x twice in the forward and dy, x, y twice in the backward;
// at 14x14 and 7x7 an H100 ran it 20% slower than cuDNN (0.060 / 0.034 ms against 0.049 / 0.028). Here a block
// owns one channel and holds all of its values in registers (up to kPerThread a thread, kMaxThreads threads: a
// channel of at most 16384 values, ResNet's 14x14 and 7x7 at batch 64): the forward reads x once (exact two-pass
// statistics over the registers, block sums as fixed trees, so every run gives the same bits), updates the running
// statistics, and writes y; the backward reads dy, y and x once and writes dx (and the residual's gradient).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "fck/batch_norm.h"
#include "fck/batch_norm_host.h"
#include "fck/macros.h"

namespace fck {
namespace bn_fused {

constexpr int kPerThread = 16;
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxCount = int64_t(kPerThread) * kMaxThreads;

// Threads for a channel of `count` values: a power of two (the tree sums), at least two warps.
inline int threads_for(int64_t count) {
  int t = 64;
  while (int64_t(t) * kPerThread < count) t *= 2;
  return t;
}

template <typename A>
struct Shared {
  A red[2][kMaxThreads];
};

// The sums over the block of each thread's (a, b): trees over shared memory, the same order every run.
template <typename A, class Ctx>
FCK_HOST_DEVICE void block_sums(Ctx& ctx, Shared<A>& sh, A& a, A& b) {
  sh.red[0][ctx.tid] = a;
  sh.red[1][ctx.tid] = b;
  ctx.sync();
  for (int stride = ctx.threads / 2; stride > 0; stride /= 2) {
    if (ctx.tid < stride) {
      sh.red[0][ctx.tid] += sh.red[0][ctx.tid + stride];
      sh.red[1][ctx.tid] += sh.red[1][ctx.tid + stride];
    }
    ctx.sync();
  }
  a = sh.red[0][0];
  b = sh.red[1][0];
  ctx.sync();  // before the next block_sums overwrites red
}

// Value k of thread tid in channel c: index e = tid + k * threads of the channel's N planes of S values (e <
// kMaxCount, so the division is 32-bit).
struct Walk {
  int64_t C;
  int S, count;
  FCK_HOST_DEVICE int64_t offset(int64_t c, int e) const {
    const int n = e / S;
    return (int64_t(n) * C + c) * S + (e - n * S);
  }
};

// Forward (training): y = relu?(normalize(x) + residual?); batch statistics into save_mean / save_invstd and the
// running statistics (in the accumulation type A).
template <typename T, typename A>
struct Forward {
  static constexpr int kMaxThreads = bn_fused::kMaxThreads;
  using Shared = bn_fused::Shared<A>;
  const T *x, *res;
  T* y;
  const A *weight, *bias;
  A *running_mean, *running_var, *save_mean, *save_invstd;
  Walk walk;
  double momentum, eps;
  bool relu;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int64_t c = ctx.block;
    const A pivot = A(x[walk.offset(c, 0)]);  // statistics of x - pivot stay exact when |mean| >> std
    A v[kPerThread];
    A s1 = 0, unused = 0;
    FCK_UNROLL
    for (int k = 0; k < kPerThread; ++k) {
      const int e = ctx.tid + k * ctx.threads;
      v[k] = e < walk.count ? A(x[walk.offset(c, e)]) : A(0);
      if (e < walk.count) s1 += v[k] - pivot;
    }
    block_sums(ctx, sh, s1, unused);
    const A m = s1 / A(walk.count);
    A s2 = 0;
    FCK_UNROLL
    for (int k = 0; k < kPerThread; ++k) {
      const int e = ctx.tid + k * ctx.threads;
      if (e < walk.count) s2 += (v[k] - pivot - m) * (v[k] - pivot - m);
    }
    unused = 0;
    block_sums(ctx, sh, s2, unused);
    const double count = double(walk.count), mean = double(pivot) + double(m), var = double(s2) / count;
    const double invstd = bn_invstd<double>(var, eps);
    if (ctx.tid == 0) {
      save_mean[c] = A(mean);
      save_invstd[c] = A(invstd);
      if (running_mean) {
        running_mean[c] = A(bn_running<double>(running_mean[c], mean, momentum));
        running_var[c] = A(bn_running<double>(running_var[c], var * count / (count - 1), momentum));
      }
    }
    const A mean_a = A(mean), kk = A((weight ? double(weight[c]) : 1.0) * invstd), beta = bias ? bias[c] : A(0);
    FCK_UNROLL
    for (int k = 0; k < kPerThread; ++k) {
      const int e = ctx.tid + k * ctx.threads;
      if (e >= walk.count) continue;
      const int64_t o = walk.offset(c, e);
      A z = bn_normalize<A>(v[k], mean_a, kk, beta);
      if (res) z += A(res[o]);
      if (relu) z = bn_relu<A>(z);
      y[o] = T(z);
    }
  }
};

// Backward: g = dy through the ReLU mask of y; dx from the two channel sums; dweight, dbias; dres = g when asked.
template <typename T, typename A>
struct Backward {
  static constexpr int kMaxThreads = bn_fused::kMaxThreads;
  using Shared = bn_fused::Shared<A>;
  const T *dy, *x, *y;
  T *dx, *dres;
  const A *save_mean, *save_invstd, *weight;
  A *dweight, *dbias;
  Walk walk;
  bool training;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int64_t c = ctx.block;
    const A mean = save_mean[c];
    A g[kPerThread], xv[kPerThread];
    A sg = 0, sgx = 0;
    FCK_UNROLL
    for (int k = 0; k < kPerThread; ++k) {
      const int e = ctx.tid + k * ctx.threads;
      g[k] = xv[k] = A(0);
      if (e >= walk.count) continue;
      const int64_t o = walk.offset(c, e);
      g[k] = y ? bn_relu_grad<A>(A(dy[o]), A(y[o])) : A(dy[o]);
      xv[k] = A(x[o]);
      sg += g[k];
      sgx += g[k] * (xv[k] - mean);
    }
    block_sums(ctx, sh, sg, sgx);
    const BnBackwardCoef<double> co = bn_backward_coef<double>(training, double(walk.count), sg, sgx,
                                                               save_invstd[c], weight ? double(weight[c]) : 1.0);
    if (ctx.tid == 0) {
      dweight[c] = A(co.dweight);
      dbias[c] = A(co.dbias);
    }
    const A kk = A(co.k), mean_g = A(co.mean_g), cc = A(co.c);
    FCK_UNROLL
    for (int k = 0; k < kPerThread; ++k) {
      const int e = ctx.tid + k * ctx.threads;
      if (e >= walk.count) continue;
      const int64_t o = walk.offset(c, e);
      dx[o] = T(bn_grad_input<A>(g[k], xv[k], mean, kk, mean_g, cc));
      if (dres) dres[o] = T(g[k]);
    }
  }
};

// Whether a training call takes these kernels: planar, a channel of at most kMaxCount values, a 16/32-bit float
// type (fp32 accumulation).
inline bool applies(const at::Tensor& x, const BnLayout& L) {
  const auto t = x.scalar_type();
  return L.planar && L.N * L.S > 0 && L.N * L.S <= kMaxCount &&
         (t == at::kFloat || t == at::kHalf || t == at::kBFloat16);
}

template <class F>
void dispatch(at::ScalarType t, const F& f) {
  if (t == at::kFloat) f(float{});
  else if (t == at::kHalf) f(c10::Half{});
  else f(c10::BFloat16{});
}

// A per-channel tensor as fp32 (itself when it is one), or undefined.
inline at::Tensor f32(const std::optional<at::Tensor>& t) {
  return has(t) ? t->detach().to(at::kFloat).contiguous() : at::Tensor();
}

inline float* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The host side, shared by the CUDA launch and the CPU emulation: launch(blocks, threads, body); y and the
// backward's outputs come allocated by the caller (the CPU takes them from its pool).
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& res,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const std::optional<at::Tensor>& running_mean,
                                                       const std::optional<at::Tensor>& running_var, double momentum,
                                                       double eps, bool relu, const BnLayout& L, at::Tensor y,
                                                       const Launch& launch) {
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor save_mean = at::empty({L.C}, opts), save_invstd = at::empty({L.C}, opts);
  at::Tensor rm = f32(running_mean), rv = f32(running_var), w = f32(weight), b = f32(bias);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Forward<T, float> body{reinterpret_cast<const T*>(x.data_ptr()),
                                 has(res) ? reinterpret_cast<const T*>(res->data_ptr()) : nullptr,
                                 reinterpret_cast<T*>(y.data_ptr()), ptr(w), ptr(b), ptr(rm), ptr(rv),
                                 ptr(save_mean), ptr(save_invstd), Walk{L.C, int(L.S), int(L.N * L.S)}, momentum, eps, relu};
    launch(int(L.C), threads_for(L.N * L.S), body);
  });
  // Running statistics kept in another dtype were updated in an fp32 copy.
  if (rm.defined() && !rm.is_same(*running_mean)) {
    at::Tensor(*running_mean).copy_(rm);
    at::Tensor(*running_var).copy_(rv);
  }
  return {y, save_mean, save_invstd};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, const BnLayout& L, at::Tensor dx,
    at::Tensor dres, const Launch& launch) {
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({L.C}, opts), db = at::empty({L.C}, opts), w = f32(weight);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Backward<T, float> body{reinterpret_cast<const T*>(dy.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()),
                                  has(y) ? reinterpret_cast<const T*>(y->data_ptr()) : nullptr,
                                  reinterpret_cast<T*>(dx.data_ptr()),
                                  dres.numel() ? reinterpret_cast<T*>(dres.data_ptr()) : nullptr,
                                  save_mean.data_ptr<float>(), save_invstd.data_ptr<float>(), ptr(w), ptr(dw), ptr(db),
                                  Walk{L.C, int(L.S), int(L.N * L.S)}, training};
    launch(int(L.C), threads_for(L.N * L.S), body);
  });
  return {dx, dres, dw, db};
}

}  // namespace bn_fused
}  // namespace fck
