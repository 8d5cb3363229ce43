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

// What a reduction sums per element: (x - pivot, (x - pivot)^2) for the statistics, (g, g * (x - mean)) for the
// backward.
template <typename T, typename A, bool GRAD>
__device__ __forceinline__ void accumulate(const T* x, const T* dy, const T* y, int64_t i, A center, bool relu, A& a,
                                           A& b) {
  const A xv = static_cast<A>(x[i]) - center;
  if (GRAD) {
    A g = static_cast<A>(dy[i]);
    if (relu) g = bn_relu_grad<A>(g, static_cast<A>(y[i]));
    a += g;
    b += g * xv;
  } else {
    a += xv;
    b += xv * xv;
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

// grid (C, splits): block (c, split) sums planes [split * per_split, ...) of channel c.
template <typename T, typename A, bool GRAD>
__global__ void reduce_planar(const T* __restrict__ x, const T* __restrict__ dy, const T* __restrict__ y,
                              const A* __restrict__ mean, bool relu, int64_t N, int64_t C, int64_t S,
                              int64_t per_split, A* __restrict__ part) {
  const int64_t c = blockIdx.x, split = blockIdx.y;
  const int64_t n0 = split * per_split, n1 = min(N, n0 + per_split);
  const A center = center_of<T, A, GRAD>(x, mean, c, S);
  A a = 0, b = 0;
  if (S >= kPlanarThreads * 4 || (n1 - n0) * S >= (int64_t(1) << 31)) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t base = (n * C + c) * S;
      for (int64_t s = threadIdx.x; s < S; s += blockDim.x) accumulate<T, A, GRAD>(x, dy, y, base + s, center, relu, a, b);
    }
  } else {
    // Small planes (7x7 = 49 values): threads walk the split's planes as one run, or most of them would idle.
    const uint32_t s32 = uint32_t(S), len = uint32_t((n1 - n0) * S);
    for (uint32_t j = threadIdx.x; j < len; j += blockDim.x) {
      const uint32_t n = j / s32;
      accumulate<T, A, GRAD>(x, dy, y, ((n0 + n) * C + c) * S + (j - n * s32), center, relu, a, b);
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
                            const A* __restrict__ mean, bool relu, int64_t R, int64_t C, int64_t per_split,
                            A* __restrict__ part) {
  const int64_t c = int64_t(blockIdx.x) * kLanes + threadIdx.x, split = blockIdx.y;
  const int64_t r0 = split * per_split, r1 = min(R, r0 + per_split);
  A a = 0, b = 0;
  if (c < C) {
    const A center = center_of<T, A, GRAD>(x, mean, c, 1);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowsPerBlock) {
      accumulate<T, A, GRAD>(x, dy, y, r * C + c, center, relu, a, b);
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

// Per-channel inputs of the element-wise passes.
template <typename A>
struct Channel {
  const A* mean;
  const A* invstd;  // forward
  const A* weight;  // forward, may be null
  const A* bias;    // forward, may be null
  const A* coef;    // backward: k[C], mean_g[C], c[C]
};

// Forward: out = relu?(normalize(x) + other?). Backward: out = grad_input from g = dy through the ReLU mask of y
// (other = dy), and out2 = g when the residual needs its gradient.
template <typename T, typename A, bool BWD>
__device__ __forceinline__ void element(const T* x, const T* other, const T* y, T* out, T* out2, int64_t i,
                                        int64_t c, int64_t C, const Channel<A>& ch, bool relu) {
  const A xv = static_cast<A>(x[i]);
  if (BWD) {
    A g = static_cast<A>(other[i]);
    if (relu) g = bn_relu_grad<A>(g, static_cast<A>(y[i]));
    out[i] = static_cast<T>(bn_grad_input<A>(g, xv, ch.mean[c], ch.coef[c], ch.coef[C + c], ch.coef[2 * C + c]));
    if (out2) out2[i] = static_cast<T>(g);
  } else {
    const A k = ch.invstd[c] * (ch.weight ? ch.weight[c] : A(1));
    A z = bn_normalize<A>(xv, ch.mean[c], k, ch.bias ? ch.bias[c] : A(0));
    if (other) z += static_cast<A>(other[i]);
    if (relu) z = bn_relu<A>(z);
    out[i] = static_cast<T>(z);
  }
}

// Small planes, fewer than 2^31 values: a flat grid-stride loop, the channel of value i being (i / S) % C.
template <typename T, typename A, bool BWD>
__global__ void apply_flat(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                           T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, uint32_t total,
                           uint32_t C, uint32_t S) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    element<T, A, BWD>(x, other, y, out, out2, i, (i / S) % C, C, ch, relu);
  }
}

// grid (chunks along S, planes): planes strided by gridDim.y, so any N * C fits.
template <typename T, typename A, bool BWD>
__global__ void apply_planar(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                             T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, int64_t planes,
                             int64_t C, int64_t S) {
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    const int64_t c = p % C, base = p * S;
    for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < S; s += int64_t(gridDim.x) * blockDim.x) {
      element<T, A, BWD>(x, other, y, out, out2, base + s, c, C, ch, relu);
    }
  }
}

// block (32, 8): rows strided over the grid, channels over the 32 lanes.
template <typename T, typename A, bool BWD>
__global__ void apply_rows(const T* __restrict__ x, const T* __restrict__ other, const T* __restrict__ y,
                           T* __restrict__ out, T* __restrict__ out2, Channel<A> ch, bool relu, int64_t R,
                           int64_t C) {
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < R;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    for (int64_t c = threadIdx.x; c < C; c += kLanes) element<T, A, BWD>(x, other, y, out, out2, r * C + c, c, C, ch, relu);
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

template <typename T, typename A, bool GRAD>
at::Tensor reduce(const BnLayout& L, const T* x, const T* dy, const T* y, const A* mean, bool relu,
                  const at::TensorOptions& acc, cudaStream_t stream) {
  const Launch s = L.planar ? split_planar(L) : split_rows(L);
  at::Tensor part = at::empty({2, s.splits, L.C}, acc);
  if (L.planar) {
    reduce_planar<T, A, GRAD><<<dim3(L.C, s.splits), kPlanarThreads, 0, stream>>>(
        x, dy, y, mean, relu, L.N, L.C, L.S, s.per_split, part.data_ptr<A>());
  } else {
    reduce_rows<T, A, GRAD><<<dim3((L.C + kLanes - 1) / kLanes, s.splits), dim3(kLanes, kRowsPerBlock), 0, stream>>>(
        x, dy, y, mean, relu, L.rows(), L.C, s.per_split, part.data_ptr<A>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

template <typename T, typename A, bool BWD>
void apply(const BnLayout& L, const T* x, const T* other, const T* y, T* out, T* out2, const Channel<A>& ch,
           bool relu, cudaStream_t stream) {
  const int64_t total = L.N * L.C * L.S;
  if (L.planar && L.S < kPlanarThreads * 4 && total < (int64_t(1) << 31)) {
    const int64_t blocks = std::min<int64_t>((total + kPlanarThreads - 1) / kPlanarThreads, target_blocks() * 8);
    apply_flat<T, A, BWD><<<blocks, kPlanarThreads, 0, stream>>>(x, other, y, out, out2, ch, relu, uint32_t(total),
                                                                 uint32_t(L.C), uint32_t(L.S));
  } else if (L.planar) {
    const int64_t planes = L.N * L.C;
    const int64_t chunks = std::min<int64_t>((L.S + kPlanarThreads - 1) / kPlanarThreads,
                                             std::max<int64_t>(1, target_blocks() * 4 / std::max<int64_t>(planes, 1)));
    apply_planar<T, A, BWD><<<dim3(chunks, std::min<int64_t>(planes, 65535)), kPlanarThreads, 0, stream>>>(
        x, other, y, out, out2, ch, relu, planes, L.C, L.S);
  } else {
    const int64_t blocks = std::min<int64_t>((L.rows() + kRowsPerBlock - 1) / kRowsPerBlock, target_blocks() * 8);
    apply_rows<T, A, BWD><<<blocks, dim3(kLanes, kRowsPerBlock), 0, stream>>>(x, other, y, out, out2, ch, relu,
                                                                              L.rows(), L.C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A per-channel tensor in the accumulation dtype (a no-op view when it already is one), or undefined.
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return has(t) ? t->detach().to(acc).contiguous() : at::Tensor();
}

template <typename A>
A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(FCK_BATCH_NORM_FWD_ARGS) {
  const BnLayout L = check_batch_norm_fwd(input, residual, weight, bias, running_mean, running_var, training);
  TORCH_CHECK(input.is_cuda(), "fck::batch_norm_fwd (cuda): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor save_mean = at::zeros({L.C}, acc_opts), save_invstd = at::zeros({L.C}, acc_opts);
  at::Tensor y = at::empty_like(input);
  if (input.numel() == 0) return {y, save_mean, save_invstd};
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
    at::Tensor part = training ? reduce<T, A, false>(L, xp, nullptr, nullptr, nullptr, false, acc_opts, stream)
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

// The ReLU mask comes from the output here (bias and mask_from_input are the CPU kernels' option).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(FCK_BATCH_NORM_BWD_ARGS) {
  const BnLayout L = check_batch_norm_bwd(grad_output, input, output, weight, save_mean, save_invstd, relu);
  TORCH_CHECK(input.is_cuda(), "fck::batch_norm_bwd (cuda): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = save_mean.scalar_type();
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor dx = at::empty_like(input);
  at::Tensor dres = residual_grad ? at::empty_like(input) : at::empty({0}, input.options());
  at::Tensor dw = at::zeros({L.C}, acc_opts), db = at::zeros({L.C}, acc_opts);
  if (input.numel() == 0) return {dx, dres, dw, db};
  if (env_on("FCK_BN_FUSED_CUDA") && bn_fused::applies(input, L)) {
    return bn_fused::backward(grad_output, input, relu ? output : std::nullopt, weight, save_mean, save_invstd,
                              training, L, dx, dres, [](int b, int t, const auto& body) { launch_blocks(b, t, body); });
  }
  at::Tensor w = as_acc(weight, acc), coef = at::empty({3, L.C}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fck::batch_norm_bwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    const T *xp = input.data_ptr<T>(), *dyp = grad_output.data_ptr<T>();
    const T* yp = relu ? output->data_ptr<T>() : nullptr;
    at::Tensor part = reduce<T, A, true>(L, xp, dyp, yp, save_mean.data_ptr<A>(), relu, acc_opts, stream);
    finalize_backward<A><<<(L.C + 127) / 128, 128, 0, stream>>>(
        part.data_ptr<A>(), part.size(1), L.C, double(L.count()), training, save_invstd.data_ptr<A>(),
        ptr_or_null<A>(w), dw.data_ptr<A>(), db.data_ptr<A>(), coef.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Channel<A> ch{save_mean.data_ptr<A>(), nullptr, nullptr, nullptr, coef.data_ptr<A>()};
    apply<T, A, true>(L, xp, dyp, yp, dx.data_ptr<T>(), residual_grad ? dres.data_ptr<T>() : nullptr, ch, relu,
                      stream);
  });
  return {dx, dres, dw, db};
}

}  // namespace cuda
}  // namespace fck
