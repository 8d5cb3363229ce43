// Batch norm (+ residual add, + ReLU) on CUDA, forward and backward; the math is csrc/include/fck/batch_norm.h.
//
// Training forward: `reduce_*` (per-block partial sums of x - pivot and its square, pivot = the channel's first
// element so the shifted sums stay exact when |mean| >> std) -> `finalize_forward` (one thread per channel: mean,
// 1/std, running statistics) -> `apply_*` (normalize, add, ReLU). Backward: `reduce_*` (partial sums of g and
// g * (x - mean)) -> `finalize_backward` (grad_weight, grad_bias, coefficients) -> `apply_*` (grad_input and
// grad_residual). Planar (NC(S) contiguous) kernels give a block one channel and walk its planes with threads along
// S; interleaved (channels-last, and (N, C)) kernels give 32 threads 32 adjacent channels, so every load is
// coalesced in both layouts.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "fck/acc.h"
#include "fck/batch_norm.h"
#include "fck/batch_norm_fused.h"
#include "fck/batch_norm_host.h"
#include "fck/block_launch.h"
#include "fck/ops.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kPlanarThreads = 256;
constexpr int kLanes = 32;  // interleaved: channels per block
constexpr int kRowsPerBlock = 8;

// V values of T at once: 16-byte loads and stores where a pass's planes allow them (S a multiple of V, every
// pointer 16-byte aligned; the host checks), so a thread has 4x (fp32) or 8x (fp16/bf16) the bytes in flight for
// the same instructions; V = 1 is the scalar path.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

// Whether V-wide accesses fit: runs of `run` values (a plane, or a channels-last row) and the pointers (null ones
// aside). FCK_BN_VECTOR_CUDA=0 (read per call): scalar accesses and the ReLU mask read from y, as before both came
// in, for an A/B on the GPU (gpu_check.sh's bench_bn_scalar).
template <typename T>
bool vector_ok(int64_t run, std::initializer_list<const void*> ptrs) {
  if (run % kVec<T> != 0 || env_off("FCK_BN_VECTOR_CUDA")) return false;
  for (const void* p : ptrs) {
    if (p && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// A channel's values for the element-wise passes, read once per plane (planar) or per channel (rows): Channel's
// pointers are not restrict, so the compiler re-read them after every store when the element read them. Forward:
// z = (x - mean) k + beta. Backward: grad_input's coefficients (k, mean_g, c) and, for a ReLU mask from x, the
// forward's own k_fwd and beta.
template <typename A>
struct ChannelValues {
  A mean, k, beta, mean_g, c, k_fwd;
};

// What a reduction sums per element: (x - pivot, (x - pivot)^2) for the statistics, (g, g * (x - mean)) for the
// backward. The ReLU's gradient mask comes from y, or (y null: mask_from_input) from the pre-activation recomputed
// with the forward's coefficients. NC: the channels among the V values, 1 (a plane's run) or V (a channels-last
// row's V adjacent channels, each with its own center, values and sums).
template <typename T, typename A, bool GRAD, int V, int NC>
__device__ __forceinline__ void accumulate(const T* x, const T* dy, const T* y, int64_t i, const A* center,
                                           bool relu, const ChannelValues<A>* cv, A* a, A* b) {
  static_assert(NC == 1 || NC == V, "a group holds one channel or one per value");
  const Pack<T, V> xs = load<T, V>(x + i);
  Pack<T, V> ds{}, ys{};
  if (GRAD) ds = load<T, V>(dy + i);
  if (GRAD && relu && y) ys = load<T, V>(y + i);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int q = NC == 1 ? 0 : k;
    const A xv = static_cast<A>(xs.v[k]);
    const A xc = xv - center[q];
    if (GRAD) {
      A g = static_cast<A>(ds.v[k]);
      if (relu) {
        g = bn_relu_grad<A>(g, y ? static_cast<A>(ys.v[k]) : bn_normalize<A>(xv, cv[q].mean, cv[q].k_fwd, cv[q].beta));
      }
      a[q] += g;
      b[q] += g * xc;
    } else {
      a[q] += xc;
      b[q] += xc * xc;
    }
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// The reduction center of channel c: its first element (statistics) or its mean (backward).
template <typename T, typename A, bool GRAD>
__device__ __forceinline__ A center_of(const T* x, const A* mean, int64_t c, int64_t pivot_stride) {
  return GRAD ? mean[c] : static_cast<A>(x[c * pivot_stride]);
}

// Per-channel inputs of the element-wise passes and of the backward's reduction.
template <typename A>
struct Channel {
  const A* mean;
  const A* invstd;  // forward; backward: for a ReLU mask from x
  const A* weight;  // forward (backward: mask from x), may be null
  const A* bias;    // forward (backward: mask from x), may be null
  const A* coef;    // backward: k[C], mean_g[C], c[C]
};

template <typename A, bool BWD>
__device__ __forceinline__ ChannelValues<A> values_of(const Channel<A>& ch, int64_t c, int64_t C) {
  ChannelValues<A> v{};
  v.mean = ch.mean[c];
  // The forward's scale, evaluated as the forward evaluates it, so that a mask from x sees the forward's values.
  const A k_fwd = ch.invstd ? ch.invstd[c] * (ch.weight ? ch.weight[c] : A(1)) : A(0);
  v.beta = ch.bias ? ch.bias[c] : A(0);
  if (BWD) {
    if (ch.coef) {  // none yet in the backward's reduction
      v.k = ch.coef[c];
      v.mean_g = ch.coef[C + c];
      v.c = ch.coef[2 * C + c];
    }
    v.k_fwd = k_fwd;
  } else {
    v.k = k_fwd;
  }
  return v;
}

// grid (C, splits): block (c, split) sums planes [split * per_split, ...) of channel c. V > 1 only where the host
// checked S % V == 0 and the pointers' alignment.
template <typename T, typename A, bool GRAD, int V>
__global__ void reduce_planar(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                              Channel<A> ch, bool relu, int64_t N, int64_t C, int64_t S, int64_t per_split,
                              A* __restrict__ part) {
  const int64_t c = blockIdx.x, split = blockIdx.y;
  const int64_t n0 = split * per_split, n1 = min(N, n0 + per_split);
  const A center = center_of<T, A, GRAD>(x, ch.mean, c, S);
  const ChannelValues<A> cv = GRAD ? values_of<A, true>(ch, c, C) : ChannelValues<A>{};
  A a = 0, b = 0;
  if (S >= kPlanarThreads * 4 || (n1 - n0) * S >= (int64_t(1) << 31)) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t base = (n * C + c) * S;
      for (int64_t s = int64_t(threadIdx.x) * V; s < S; s += int64_t(blockDim.x) * V) {
        accumulate<T, A, GRAD, V, 1>(x, dy, y, base + s, &center, relu, &cv, &a, &b);
      }
    }
  } else {
    // Small planes (7x7 = 49 values): threads walk the split's planes as one run of V-value groups (a group never
    // straddles two planes: S % V == 0), or most of them would idle.
    const uint32_t sv = uint32_t(S / V), len = uint32_t((n1 - n0) * (S / V));
    for (uint32_t j = threadIdx.x; j < len; j += blockDim.x) {
      const uint32_t n = j / sv;
      accumulate<T, A, GRAD, V, 1>(x, dy, y, ((n0 + n) * C + c) * S + int64_t(j - n * sv) * V, &center, relu, &cv, &a,
                                   &b);
    }
  }
  __shared__ A sa[kPlanarThreads / 32], sb[kPlanarThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kPlanarThreads / 32 ? sa[lane] : A(0);
    b = lane < kPlanarThreads / 32 ? sb[lane] : A(0);
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      part[split * C + c] = a;
      part[(gridDim.y + split) * C + c] = b;
    }
  }
}

// grid (ceil(C / 32), splits), block (32, 8): thread (tx, ty) sums rows ty, ty + 8, ... of its split, channel tx.
template <typename T, typename A, bool GRAD>
__global__ void reduce_rows(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                            Channel<A> ch, bool relu, int64_t R, int64_t C, int64_t per_split,
                            A* __restrict__ part) {
  const int64_t c = int64_t(blockIdx.x) * kLanes + threadIdx.x, split = blockIdx.y;
  const int64_t r0 = split * per_split, r1 = min(R, r0 + per_split);
  A a = 0, b = 0;
  if (c < C) {
    const A center = center_of<T, A, GRAD>(x, ch.mean, c, 1);
    const ChannelValues<A> cv = GRAD ? values_of<A, true>(ch, c, C) : ChannelValues<A>{};
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsPerBlock) {
      accumulate<T, A, GRAD, 1, 1>(x, dy, y, r * C + c, &center, relu, &cv, &a, &b);
    }
  }
  __shared__ A sa[kRowsPerBlock][kLanes + 1], sb[kRowsPerBlock][kLanes + 1];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kRowsPerBlock; ++k) {
      a += sa[k][threadIdx.x];
      b += sb[k][threadIdx.x];
    }
    part[split * C + c] = a;
    part[(gridDim.y + split) * C + c] = b;
  }
}

// Channels-last (and (N, C)) in groups of V adjacent channels, where C % V == 0, C / V <= kVecThreads and the
// pointers allow 16-byte accesses: thread t of a block owns channel group t % G (G = C / V) of rows t / G,
// t / G + RB, ... (RB = kVecThreads / G rows at once), so a warp reads whole rows' runs 16 bytes a thread and keeps
// its V channels' values or sums in registers (the scalar kernels above give a lane one channel and 4 bytes).
constexpr int kVecThreads = 256;

template <typename T>
bool rows_vector_ok(const BnLayout& L, std::initializer_list<const void*> ptrs) {
  return !L.planar && L.C / kVec<T> <= kVecThreads && vector_ok<T>(L.C, ptrs);
}

// grid (splits): block `split` sums rows [split * per_split, ...) of every channel.
template <typename T, typename A, bool GRAD, int V>
__global__ void __launch_bounds__(kVecThreads)
    reduce_rows_vec(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y, Channel<A> ch,
                    bool relu, int64_t R, int64_t C, int64_t per_split, A* __restrict__ part) {
  const int G = int(C / V), RB = kVecThreads / G, t = threadIdx.x, cg = t % G, lr = t / G;
  const int64_t split = blockIdx.x, r0 = split * per_split, r1 = min(R, r0 + per_split);
  __shared__ A sa[kVecThreads * V], sb[kVecThreads * V];  // [row lane][channel]: RB * C <= kVecThreads * V
  if (lr < RB) {
    A a[V], b[V], center[V];
    ChannelValues<A> cv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a[k] = b[k] = A(0);
      center[k] = center_of<T, A, GRAD>(x, ch.mean, cg * V + k, 1);
      cv[k] = GRAD ? values_of<A, true>(ch, cg * V + k, C) : ChannelValues<A>{};
    }
    for (int64_t r = r0 + lr; r < r1; r += RB) {
      accumulate<T, A, GRAD, V, V>(x, dy, y, r * C + cg * V, center, relu, cv, a, b);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      sa[lr * C + cg * V + k] = a[k];
      sb[lr * C + cg * V + k] = b[k];
    }
  }
  __syncthreads();
  for (int64_t c = t; c < C; c += kVecThreads) {
    A ta = 0, tb = 0;
    for (int l = 0; l < RB; ++l) {
      ta += sa[l * C + c];
      tb += sb[l * C + c];
    }
    part[split * C + c] = ta;
    part[(gridDim.x + split) * C + c] = tb;
  }
}

// One thread per channel: batch (or running) statistics -> save_mean, save_invstd; running statistics updated.
template <typename T, typename A>
__global__ void finalize_forward(const T* __restrict__ x, int64_t pivot_stride, const A* __restrict__ part,
                                 int64_t splits, int64_t C, double count, bool training, bool has_running,
                                 A* __restrict__ running_mean, A* __restrict__ running_var, double momentum,
                                 double eps, A* __restrict__ save_mean, A* __restrict__ save_invstd) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double mean, var;
  if (training) {
    double sa = 0, sb = 0;
    for (int64_t j = 0; j < splits; ++j) {
      sa += part[j * C + c];
      sb += part[(splits + j) * C + c];
    }
    const double m = sa / count;
    var = max(sb / count - m * m, 0.0);
    mean = double(static_cast<A>(x[c * pivot_stride])) + m;
    if (has_running) {
      running_mean[c] = A(bn_running<double>(running_mean[c], mean, momentum));
      running_var[c] = A(bn_running<double>(running_var[c], var * count / (count - 1), momentum));
    }
  } else {
    mean = running_mean[c];
    var = running_var[c];
  }
  save_mean[c] = A(mean);
  save_invstd[c] = A(bn_invstd<double>(var, eps));
}

template <typename A>
__global__ void finalize_backward(const A* __restrict__ part, int64_t splits, int64_t C, double count, bool training,
                                  const A* __restrict__ invstd, const A* __restrict__ weight, A* __restrict__ dweight,
                                  A* __restrict__ dbias, A* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0, sgx = 0;
  for (int64_t j = 0; j < splits; ++j) {
    sg += part[j * C + c];
    sgx += part[(splits + j) * C + c];
  }
  const BnBackwardCoef<double> k =
      bn_backward_coef<double>(training, count, sg, sgx, invstd[c], weight ? double(weight[c]) : 1.0);
  dweight[c] = A(k.dweight);
  dbias[c] = A(k.dbias);
  coef[c] = A(k.k);
  coef[C + c] = A(k.mean_g);
  coef[2 * C + c] = A(k.c);
}

// Forward: out = relu?(normalize(x) + other?). Backward: out = grad_input from g = dy (other) through the ReLU
// mask (of y, or y null: of the pre-activation from x), and out2 = g when the residual needs its gradient.
template <typename T, typename A, bool BWD, int V, int NC = 1>
__device__ __forceinline__ void elements(const T* __restrict__ x, const T* __restrict__ other,
                                         const T* __restrict__ y, T* __restrict__ out, T* __restrict__ out2,
                                         int64_t i, const ChannelValues<A>* cv, bool relu) {
  static_assert(NC == 1 || NC == V, "a group holds one channel or one per value");
  const Pack<T, V> xs = load<T, V>(x + i);
  Pack<T, V> os{}, ys{}, r, r2;
  if (other) os = load<T, V>(other + i);
  if (BWD && relu && y) ys = load<T, V>(y + i);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const ChannelValues<A>& v = cv[NC == 1 ? 0 : k];
    const A xv = static_cast<A>(xs.v[k]);
    if (BWD) {
      A g = static_cast<A>(os.v[k]);
      if (relu) g = bn_relu_grad<A>(g, y ? static_cast<A>(ys.v[k]) : bn_normalize<A>(xv, v.mean, v.k_fwd, v.beta));
      r.v[k] = static_cast<T>(bn_grad_input<A>(g, xv, v.mean, v.k, v.mean_g, v.c));
      r2.v[k] = static_cast<T>(g);
    } else {
      A z = bn_normalize<A>(xv, v.mean, v.k, v.beta);
      if (other) z += static_cast<A>(os.v[k]);
      if (relu) z = bn_relu<A>(z);
      r.v[k] = static_cast<T>(z);
    }
  }
  store<T, V>(out + i, r);
  if (BWD && out2) store<T, V>(out2 + i, r2);
}

// Small planes, fewer than 2^31 values: a flat grid-stride loop over V-value groups, the channel of value i being
// (i / S) % C (a group lies in one plane: S % V == 0).
template <typename T, typename A, bool BWD, int V>
__global__ void apply_flat(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                           T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, uint32_t total,
                           uint32_t C, uint32_t S) {
  for (uint32_t i = (blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += gridDim.x * blockDim.x * V) {
    const ChannelValues<A> cv = values_of<A, BWD>(ch, (i / S) % C, C);
    elements<T, A, BWD, V>(x, other, y, out, out2, i, &cv, relu);
  }
}

// grid (chunks along S, planes): planes strided by gridDim.y, so any N * C fits.
template <typename T, typename A, bool BWD, int V>
__global__ void apply_planar(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                             T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, int64_t planes,
                             int64_t C, int64_t S) {
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const ChannelValues<A> cv = values_of<A, BWD>(ch, p % C, C);
    const int64_t base = p * S;
    for (int64_t s = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; s < S;
         s += int64_t(gridDim.x) * blockDim.x * V) {
      elements<T, A, BWD, V>(x, other, y, out, out2, base + s, &cv, relu);
    }
  }
}

// block (32, 8): channels over the 32 lanes, rows strided over the grid.
template <typename T, typename A, bool BWD>
__global__ void apply_rows(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                           T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, int64_t R,
                           int64_t C) {
  for (int64_t c = threadIdx.x; c < C; c += kLanes) {
    const ChannelValues<A> cv = values_of<A, BWD>(ch, c, C);
    for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < R;
         r += int64_t(gridDim.x) * kRowsPerBlock) {
      elements<T, A, BWD, 1>(x, other, y, out, out2, r * C + c, &cv, relu);
    }
  }
}

// block kVecThreads: the channel groups as in reduce_rows_vec, rows strided over the grid.
template <typename T, typename A, bool BWD, int V>
__global__ void __launch_bounds__(kVecThreads)
    apply_rows_vec(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                   T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, int64_t R, int64_t C) {
  const int G = int(C / V), RB = kVecThreads / G, t = threadIdx.x, cg = t % G, lr = t / G;
  if (lr >= RB) return;
  ChannelValues<A> cv[V];
#pragma unroll
  for (int k = 0; k < V; ++k) cv[k] = values_of<A, BWD>(ch, cg * V + k, C);
  for (int64_t r = int64_t(blockIdx.x) * RB + lr; r < R; r += int64_t(gridDim.x) * RB) {
    elements<T, A, BWD, V, V>(x, other, y, out, out2, r * C + cg * V, cv, relu);
  }
}

struct Launch {
  int64_t splits, per_split;
};

int target_blocks() { return 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

Launch split_planar(const BnLayout& L) {
  int64_t splits = std::min<int64_t>(L.N, std::max<int64_t>(1, (target_blocks() + L.C - 1) / L.C));
  const int64_t per = (L.N + splits - 1) / splits;
  return {(L.N + per - 1) / per, per};
}

Launch split_rows(const BnLayout& L) {
  const int64_t tiles = (L.C + kLanes - 1) / kLanes;
  int64_t splits = std::min<int64_t>((L.rows() + kRowsPerBlock - 1) / kRowsPerBlock,
                                     std::max<int64_t>(1, (target_blocks() + tiles - 1) / tiles));
  const int64_t per = (L.rows() + splits - 1) / splits;
  return {(L.rows() + per - 1) / per, per};
}

// f(std::integral_constant<int, V>{}): V = kVec<T> where `vec`, else 1.
template <typename T, class F>
void with_width(bool vec, const F& f) {
  if (vec) {
    f(std::integral_constant<int, kVec<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

template <typename T, typename A, bool GRAD>
at::Tensor reduce(const BnLayout& L, const T* x, const T* dy, const T* y, const Channel<A>& ch, bool relu,
                  const at::TensorOptions& acc, cudaStream_t stream) {
  if (rows_vector_ok<T>(L, {x, dy, y})) {
    constexpr int V = kVec<T>;
    const int64_t R = L.rows(), rb = kVecThreads / (L.C / V);
    const int64_t want = std::min<int64_t>((R + rb - 1) / rb, target_blocks());
    const int64_t per = (R + want - 1) / want, splits = (R + per - 1) / per;
    at::Tensor part = at::empty({2, splits, L.C}, acc);
    reduce_rows_vec<T, A, GRAD, V><<<splits, kVecThreads, 0, stream>>>(x, dy, y, ch, relu, R, L.C, per,
                                                                       part.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return part;
  }
  const Launch s = L.planar ? split_planar(L) : split_rows(L);
  at::Tensor part = at::empty({2, s.splits, L.C}, acc);
  if (L.planar) {
    with_width<T>(vector_ok<T>(L.S, {x, dy, y}), [&](auto width) {
      constexpr int V = decltype(width)::value;
      reduce_planar<T, A, GRAD, V><<<dim3(L.C, s.splits), kPlanarThreads, 0, stream>>>(
          x, dy, y, ch, relu, L.N, L.C, L.S, s.per_split, part.data_ptr<A>());
    });
  } else {
    reduce_rows<T, A, GRAD><<<dim3((L.C + kLanes - 1) / kLanes, s.splits), dim3(kLanes, kRowsPerBlock), 0, stream>>>(
        x, dy, y, ch, relu, L.rows(), L.C, s.per_split, part.data_ptr<A>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

template <typename T, typename A, bool BWD>
void apply(const BnLayout& L, const T* x, const T* other, const T* y, T* out, T* out2, const Channel<A>& ch,
           bool relu, cudaStream_t stream) {
  const int64_t total = L.N * L.C * L.S;
  if (rows_vector_ok<T>(L, {x, other, y, out, out2})) {
    constexpr int V = kVec<T>;
    const int64_t rb = kVecThreads / (L.C / V);
    const int64_t blocks = std::min<int64_t>((L.rows() + rb - 1) / rb, target_blocks() * 8);
    apply_rows_vec<T, A, BWD, V><<<blocks, kVecThreads, 0, stream>>>(x, other, y, out, out2, ch, relu, L.rows(), L.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (!L.planar) {
    const int64_t blocks = std::min<int64_t>((L.rows() + kRowsPerBlock - 1) / kRowsPerBlock, target_blocks() * 8);
    apply_rows<T, A, BWD><<<blocks, dim3(kLanes, kRowsPerBlock), 0, stream>>>(x, other, y, out, out2, ch, relu,
                                                                              L.rows(), L.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  with_width<T>(vector_ok<T>(L.S, {x, other, y, out, out2}), [&](auto width) {
    constexpr int V = decltype(width)::value;
    if (L.S < kPlanarThreads * 4 && total < (int64_t(1) << 31)) {
      const int64_t groups = total / V;
      const int64_t blocks = std::min<int64_t>((groups + kPlanarThreads - 1) / kPlanarThreads, target_blocks() * 8);
      apply_flat<T, A, BWD, V><<<blocks, kPlanarThreads, 0, stream>>>(x, other, y, out, out2, ch, relu,
                                                                      uint32_t(total), uint32_t(L.C), uint32_t(L.S));
    } else {
      const int64_t planes = L.N * L.C, group_runs = (L.S / V + kPlanarThreads - 1) / kPlanarThreads;
      const int64_t chunks =
          std::min<int64_t>(group_runs, std::max<int64_t>(1, target_blocks() * 4 / std::max<int64_t>(planes, 1)));
      apply_planar<T, A, BWD, V><<<dim3(chunks, std::min<int64_t>(planes, 65535)), kPlanarThreads, 0, stream>>>(
          x, other, y, out, out2, ch, relu, planes, L.C, L.S);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A per-channel tensor in the accumulation dtype, or undefined. Already one (the usual case): the tensor itself, no
// new tensor a call (a small batch norm's wall time is host time), and the running statistics updated in place
// need no copy back.
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!has(t)) return at::Tensor();
  if (t->scalar_type() == acc && t->is_contiguous()) return *t;
  return t->detach().to(acc).contiguous();
}

template <typename A>
A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(FCK_BATCH_NORM_FWD_ARGS) {
  const std::optional<at::Tensor> residual = like_input(input, residual_in);
  const BnLayout L = check_batch_norm_fwd(input, residual, weight, bias, running_mean, running_var, training);
  TORCH_CHECK(input.is_cuda(), "fck::batch_norm_fwd (cuda): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = input.options().dtype(acc);
  // finalize_forward writes every channel's statistics: no fill kernels (a small batch norm's host time is its
  // launches).
  at::Tensor y = at::empty_like(input);
  if (input.numel() == 0) return {y, at::zeros({L.C}, acc_opts), at::zeros({L.C}, acc_opts)};
  at::Tensor save_mean = at::empty({L.C}, acc_opts), save_invstd = at::empty({L.C}, acc_opts);
  if (training && env_on("FCK_BN_FUSED_CUDA") && bn_fused::applies(input, L)) {  // opt-in until measured
    return bn_fused::forward(input, residual, weight, bias, running_mean, running_var, momentum, eps, relu, L, y,
                             [](int b, int t, const auto& body) { launch_blocks(b, t, body); });
  }
  at::Tensor rm = as_acc(running_mean, acc), rv = as_acc(running_var, acc), w = as_acc(weight, acc),
             b = as_acc(bias, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fck::batch_norm_fwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    const T* xp = input.data_ptr<T>();
    at::Tensor part = training ? reduce<T, A, false>(L, xp, nullptr, nullptr, Channel<A>{}, false, acc_opts, stream)
                               : at::empty({2, 1, L.C}, acc_opts);
    const int64_t splits = part.size(1);
    finalize_forward<T, A><<<(L.C + 127) / 128, 128, 0, stream>>>(
        xp, L.planar ? L.S : 1, part.data_ptr<A>(), splits, L.C, double(L.count()), training, rm.defined(),
        ptr_or_null<A>(rm), ptr_or_null<A>(rv), momentum, eps, save_mean.data_ptr<A>(), save_invstd.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Channel<A> ch{save_mean.data_ptr<A>(), save_invstd.data_ptr<A>(), ptr_or_null<A>(w), ptr_or_null<A>(b),
                        nullptr};
    apply<T, A, false>(L, xp, has(residual) ? residual->data_ptr<T>() : nullptr, nullptr, y.data_ptr<T>(), nullptr,
                       ch, relu, stream);
  });
  // Running statistics kept in another dtype (fp16 after model.half()) were updated in an fp32 copy.
  if (training && rm.defined() && !rm.is_same(*running_mean)) {
    at::Tensor(*running_mean).copy_(rm);
    at::Tensor(*running_var).copy_(rv);
  }
  return {y, save_mean, save_invstd};
}

// The ReLU mask comes from the output, or with mask_from_input (the forward had no residual) from x with the
// forward's coefficients where y holds the pre-activation's own values (fp32, fp64; a half-precision y is a rounded
// one, whose mask could differ in the last subnormal): y is then never read, one pass fewer over a full tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(FCK_BATCH_NORM_BWD_ARGS) {
  const at::Tensor grad_output = like_input(input, grad_output_in);
  const std::optional<at::Tensor> output = like_input(input, output_in);
  const BnLayout L = check_batch_norm_bwd(grad_output, input, output, weight, save_mean, save_invstd, relu);
  TORCH_CHECK(input.is_cuda(), "fck::batch_norm_bwd (cuda): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = save_mean.scalar_type();
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor dx = at::empty_like(input);
  at::Tensor dres = residual_grad ? at::empty_like(input) : at::empty({0}, input.options());
  if (input.numel() == 0) return {dx, dres, at::zeros({L.C}, acc_opts), at::zeros({L.C}, acc_opts)};
  at::Tensor dw = at::empty({L.C}, acc_opts), db = at::empty({L.C}, acc_opts);  // finalize_backward writes all
  if (env_on("FCK_BN_FUSED_CUDA") && bn_fused::applies(input, L)) {
    return bn_fused::backward(grad_output, input, relu ? output : std::nullopt, weight, save_mean, save_invstd,
                              training, L, dx, dres, [](int b, int t, const auto& body) { launch_blocks(b, t, body); });
  }
  at::Tensor w = as_acc(weight, acc), coef = at::empty({3, L.C}, acc_opts);
  const bool from_x = relu && mask_from_input && training && has(output) && input.scalar_type() == acc &&
                      !env_off("FCK_BN_VECTOR_CUDA");
  const at::Tensor b = from_x ? as_acc(bias, acc) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fck::batch_norm_bwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    const T *xp = input.data_ptr<T>(), *dyp = grad_output.data_ptr<T>();
    const T* yp = relu && !from_x ? output->data_ptr<T>() : nullptr;
    const Channel<A> ch{save_mean.data_ptr<A>(), from_x ? save_invstd.data_ptr<A>() : nullptr, ptr_or_null<A>(w),
                        ptr_or_null<A>(b), coef.data_ptr<A>()};
    Channel<A> stats = ch;
    stats.coef = nullptr;  // the reduction comes first: no coefficients yet
    at::Tensor part = reduce<T, A, true>(L, xp, dyp, yp, stats, relu, acc_opts, stream);
    finalize_backward<A><<<(L.C + 127) / 128, 128, 0, stream>>>(
        part.data_ptr<A>(), part.size(1), L.C, double(L.count()), training, save_invstd.data_ptr<A>(),
        ptr_or_null<A>(w), dw.data_ptr<A>(), db.data_ptr<A>(), coef.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    apply<T, A, true>(L, xp, dyp, yp, dx.data_ptr<T>(), residual_grad ? dres.data_ptr<T>() : nullptr, ch, relu,
                      stream);
  });
  return {dx, dres, dw, db};
}

}  // namespace cuda
}  // namespace fck
