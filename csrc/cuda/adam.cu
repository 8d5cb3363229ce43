// Multi-tensor Adam on CUDA: one launch per call covers every tensor. A small table goes to the device in one async
// copy: one row per tensor (pointers, size, bias-corrected scalars), then the tensor index of every chunk. A
// persistent grid walks fixed-size chunks of the concatenated tensors, so the GPU stays full even when the parameter
// set is many small tensors, and no block ever searches for its tensor or waits at a barrier.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fck/adam.h"
#include "fck/adam_host.h"
#include "fck/ops.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;    // elements per thread per access: 16-byte fp32 loads
constexpr int kIters = 4;  // accesses per thread per chunk, all loads issued before the first store
constexpr int64_t kChunk = kThreads * kVec * kIters;  // 4096 elements: fine-grained enough to balance the tail

struct TensorRow {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;
  float* master;
  int64_t numel;
  int64_t chunk_begin;  // first global chunk of this tensor
  AdamStepScalars s;
  int aligned;          // every pointer 16-byte aligned: vector loads allowed
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T x[N];
};

template <typename T>
__device__ __forceinline__ Vec<T, kVec> load_vec(const void* base, int64_t i) {
  return *reinterpret_cast<const Vec<T, kVec>*>(static_cast<const T*>(base) + i);
}

template <typename T>
__device__ __forceinline__ void store_vec(void* base, int64_t i, const Vec<T, kVec>& x) {
  *reinterpret_cast<Vec<T, kVec>*>(static_cast<T*>(base) + i) = x;
}

// Element-wise path for tail chunks and unaligned tensors. S is the state dtype: P, or float with master weights.
template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
__device__ __forceinline__ void update(const TensorRow& r, int64_t i, const AdamHyper& h) {
  P* p = static_cast<P*>(r.p);
  S* m = static_cast<S*>(r.m);
  S* v = static_cast<S*>(r.v);
  S* vmax = static_cast<S*>(r.vmax);
  float pf = MASTER ? r.master[i] : static_cast<float>(p[i]);
  float mf = static_cast<float>(m[i]), vf = static_cast<float>(v[i]);
  float vmf = AMSGRAD ? static_cast<float>(vmax[i]) : 0.f;
  adam_element<AMSGRAD, L2>(pf, static_cast<float>(static_cast<const P*>(r.g)[i]), mf, vf, vmf, h, r.s);
  if (MASTER) r.master[i] = pf;
  p[i] = static_cast<P>(pf);
  m[i] = static_cast<S>(mf);
  v[i] = static_cast<S>(vf);
  if (AMSGRAD) vmax[i] = static_cast<S>(vmf);
}

// A full, aligned chunk: every load of the thread's kIters vectors is in flight before any arithmetic or store.
template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
__device__ __forceinline__ void update_chunk_vec(const TensorRow& r, int64_t begin, const AdamHyper& h) {
  Vec<P, kVec> p[kIters], g[kIters];
  Vec<S, kVec> m[kIters], v[kIters], vm[kIters];
  Vec<float, kVec> w[kIters];
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    const int64_t i = begin + (k * kThreads + threadIdx.x) * kVec;
    g[k] = load_vec<P>(r.g, i);
    m[k] = load_vec<S>(r.m, i);
    v[k] = load_vec<S>(r.v, i);
    if (MASTER) w[k] = load_vec<float>(r.master, i);
    else p[k] = load_vec<P>(r.p, i);
    if (AMSGRAD) vm[k] = load_vec<S>(r.vmax, i);
  }
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float pf = MASTER ? w[k].x[e] : static_cast<float>(p[k].x[e]);
      float mf = static_cast<float>(m[k].x[e]), vf = static_cast<float>(v[k].x[e]);
      float vmf = AMSGRAD ? static_cast<float>(vm[k].x[e]) : 0.f;
      adam_element<AMSGRAD, L2>(pf, static_cast<float>(g[k].x[e]), mf, vf, vmf, h, r.s);
      if (MASTER) w[k].x[e] = pf;
      p[k].x[e] = static_cast<P>(pf);
      m[k].x[e] = static_cast<S>(mf);
      v[k].x[e] = static_cast<S>(vf);
      if (AMSGRAD) vm[k].x[e] = static_cast<S>(vmf);
    }
    const int64_t i = begin + (k * kThreads + threadIdx.x) * kVec;
    store_vec<P>(r.p, i, p[k]);
    store_vec<S>(r.m, i, m[k]);
    store_vec<S>(r.v, i, v[k]);
    if (MASTER) store_vec<float>(r.master, i, w[k]);
    if (AMSGRAD) store_vec<S>(r.vmax, i, vm[k]);
  }
}

template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
__global__ void __launch_bounds__(kThreads) adam_kernel(const TensorRow* __restrict__ rows,
                                                        const int* __restrict__ chunk_tensor, int64_t nchunks,
                                                        AdamHyper h) {
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const TensorRow r = rows[chunk_tensor[chunk]];
    const int64_t begin = (chunk - r.chunk_begin) * kChunk;
    const int64_t end = min(begin + kChunk, r.numel);
    if (r.aligned && end - begin == kChunk) {
      update_chunk_vec<P, S, MASTER, AMSGRAD, L2>(r, begin, h);
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) update<P, S, MASTER, AMSGRAD, L2>(r, i, h);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
void launch(const at::Tensor& table_dev, int ntensors, int64_t nchunks, const AdamHyper& h) {
  // As many blocks as can be resident at once (a persistent grid), measured for this instantiation's registers.
  static const int blocks_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, adam_kernel<P, S, MASTER, AMSGRAD, L2>,
                                                                 kThreads, 0));
    return std::max(n, 1);
  }();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::min<int64_t>(nchunks, static_cast<int64_t>(sms) * blocks_per_sm);
  const auto* base = static_cast<const char*>(table_dev.data_ptr());
  adam_kernel<P, S, MASTER, AMSGRAD, L2><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const TensorRow*>(base), reinterpret_cast<const int*>(base + ntensors * sizeof(TensorRow)),
      nchunks, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void adam_(FCK_ADAM_ARGS) {
  check_adam_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad);
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cuda(), "fck::adam_ (cuda): params must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const std::vector<double> steps = advance_steps(state_steps);
  const bool master = !master_params.empty();

  // The table (rows, then the tensor index of every chunk) is built in pinned memory so the copy is asynchronous;
  // torch's caching host allocator keeps the buffer alive until the copy has run.
  std::vector<TensorRow> rows;
  rows.reserve(params.size());
  int64_t nchunks = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    if (n == 0) continue;
    TensorRow r;
    r.p = params[t].data_ptr();
    r.g = grads[t].data_ptr();
    r.m = exp_avgs[t].data_ptr();
    r.v = exp_avg_sqs[t].data_ptr();
    r.vmax = amsgrad ? max_exp_avg_sqs[t].data_ptr() : nullptr;
    r.master = master ? master_params[t].data_ptr<float>() : nullptr;
    r.numel = n;
    r.chunk_begin = nchunks;
    r.s = make_adam_step_scalars(lr, beta1, beta2, steps[t]);
    r.aligned = aligned16(r.p) && aligned16(r.g) && aligned16(r.m) && aligned16(r.v) &&
                (!amsgrad || aligned16(r.vmax)) && (!master || aligned16(r.master));
    rows.push_back(r);
    nchunks += (n + kChunk - 1) / kChunk;
  }
  if (rows.empty()) return;
  TORCH_CHECK(rows.size() < (1u << 31), "fck::adam_ (cuda): too many tensors in one call");
  const int used = static_cast<int>(rows.size());
  const size_t rows_bytes = rows.size() * sizeof(TensorRow);
  at::Tensor table_host = at::empty({static_cast<int64_t>(rows_bytes + nchunks * sizeof(int))},
                                    at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* host = static_cast<char*>(table_host.data_ptr());
  std::memcpy(host, rows.data(), rows_bytes);
  int* chunk_tensor = reinterpret_cast<int*>(host + rows_bytes);
  for (int t = 0; t < used; ++t) {
    const int64_t end = t + 1 < used ? rows[t + 1].chunk_begin : nchunks;
    std::fill(chunk_tensor + rows[t].chunk_begin, chunk_tensor + end, t);
  }
  const at::Tensor table_dev = table_host.to(params[0].device(), /*non_blocking=*/true);
  const AdamHyper h =
      make_adam_hyper(lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, inv_grad_scale);

  dispatch_adam(params[0].scalar_type(), master, amsgrad, adam_uses_l2(weight_decay, decoupled_weight_decay),
                [&](auto variant) {
                  using V = decltype(variant);
                  using P = typename V::param_t;
                  using S = std::conditional_t<V::master, float, P>;
                  launch<P, S, V::master, V::amsgrad, V::l2>(table_dev, used, nchunks, h);
                });
}

}  // namespace cuda
}  // namespace fck
