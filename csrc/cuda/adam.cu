// Multi-tensor Adam on CUDA: one launch per call covers every tensor. A small table (one row per tensor: pointers,
// size, bias-corrected scalars) goes to the device in one async copy; a persistent grid walks fixed-size chunks of the
// concatenated tensors, so the GPU stays full even when the parameter set is many small tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>
#include <vector>

#include "fck/adam.h"
#include "fck/adam_checks.h"
#include "fck/ops.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;                        // elements per thread per access: 16-byte fp32 loads
constexpr int64_t kChunk = kThreads * kVec * 4;  // 4096 elements per chunk: fine-grained enough to balance the tail

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

// S is the state dtype: P without master weights, float with them.
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

template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
__device__ __forceinline__ void update_vec(const TensorRow& r, int64_t i, const AdamHyper& h) {
  Vec<P, kVec> p = *reinterpret_cast<const Vec<P, kVec>*>(static_cast<P*>(r.p) + i);
  const Vec<P, kVec> g = *reinterpret_cast<const Vec<P, kVec>*>(static_cast<const P*>(r.g) + i);
  Vec<S, kVec> m = *reinterpret_cast<const Vec<S, kVec>*>(static_cast<S*>(r.m) + i);
  Vec<S, kVec> v = *reinterpret_cast<const Vec<S, kVec>*>(static_cast<S*>(r.v) + i);
  Vec<S, kVec> vm;
  Vec<float, kVec> w;
  if (AMSGRAD) vm = *reinterpret_cast<const Vec<S, kVec>*>(static_cast<S*>(r.vmax) + i);
  if (MASTER) w = *reinterpret_cast<const Vec<float, kVec>*>(r.master + i);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    float pf = MASTER ? w.x[k] : static_cast<float>(p.x[k]);
    float mf = static_cast<float>(m.x[k]), vf = static_cast<float>(v.x[k]);
    float vmf = AMSGRAD ? static_cast<float>(vm.x[k]) : 0.f;
    adam_element<AMSGRAD, L2>(pf, static_cast<float>(g.x[k]), mf, vf, vmf, h, r.s);
    if (MASTER) w.x[k] = pf;
    p.x[k] = static_cast<P>(pf);
    m.x[k] = static_cast<S>(mf);
    v.x[k] = static_cast<S>(vf);
    if (AMSGRAD) vm.x[k] = static_cast<S>(vmf);
  }
  *reinterpret_cast<Vec<P, kVec>*>(static_cast<P*>(r.p) + i) = p;
  *reinterpret_cast<Vec<S, kVec>*>(static_cast<S*>(r.m) + i) = m;
  *reinterpret_cast<Vec<S, kVec>*>(static_cast<S*>(r.v) + i) = v;
  if (AMSGRAD) *reinterpret_cast<Vec<S, kVec>*>(static_cast<S*>(r.vmax) + i) = vm;
  if (MASTER) *reinterpret_cast<Vec<float, kVec>*>(r.master + i) = w;
}

template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
__global__ void __launch_bounds__(kThreads) adam_kernel(const TensorRow* __restrict__ rows, int ntensors,
                                                        int64_t nchunks, AdamHyper h) {
  __shared__ int row_of_chunk;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    if (threadIdx.x == 0) {  // last row whose chunk_begin <= chunk
      int lo = 0, hi = ntensors - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (rows[mid].chunk_begin <= chunk) lo = mid; else hi = mid - 1;
      }
      row_of_chunk = lo;
    }
    __syncthreads();
    const TensorRow r = rows[row_of_chunk];
    __syncthreads();  // row_of_chunk is rewritten by the next iteration
    const int64_t begin = (chunk - r.chunk_begin) * kChunk;
    const int64_t end = min(begin + kChunk, r.numel);
    if (r.aligned && end - begin == kChunk) {
#pragma unroll
      for (int64_t i = begin + threadIdx.x * kVec; i < end; i += kThreads * kVec) update_vec<P, S, MASTER, AMSGRAD, L2>(r, i, h);
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) update<P, S, MASTER, AMSGRAD, L2>(r, i, h);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename P, typename S, bool MASTER, bool AMSGRAD, bool L2>
void launch(const at::Tensor& rows_dev, int ntensors, int64_t nchunks, const AdamHyper& h) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks_per_sm = at::cuda::getCurrentDeviceProperties()->maxThreadsPerMultiProcessor / kThreads;
  const int64_t grid = std::min<int64_t>(nchunks, static_cast<int64_t>(sms) * blocks_per_sm);
  adam_kernel<P, S, MASTER, AMSGRAD, L2><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const TensorRow*>(rows_dev.data_ptr()), ntensors, nchunks, h);
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

  // The table is built in pinned memory so the copy is asynchronous; torch's caching host allocator keeps the buffer
  // alive until the copy has run.
  const int ntensors = static_cast<int>(params.size());
  at::Tensor rows_host = at::empty({static_cast<int64_t>(ntensors * sizeof(TensorRow))},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* rows = reinterpret_cast<TensorRow*>(rows_host.data_ptr());
  int64_t nchunks = 0;
  int used = 0;
  for (int t = 0; t < ntensors; ++t) {
    const int64_t n = params[t].numel();
    if (n == 0) continue;
    TensorRow& r = rows[used++];
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
    nchunks += (n + kChunk - 1) / kChunk;
  }
  if (used == 0) return;
  const at::Tensor rows_dev = rows_host.to(params[0].device(), /*non_blocking=*/true);
  const AdamHyper h =
      make_adam_hyper(lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, inv_grad_scale);

  const bool l2 = adam_uses_l2(weight_decay, decoupled_weight_decay);
  // Runtime options that change the loop body become template flags; fp32 params never carry master weights.
  auto go = [&](auto tag, auto master_tag) {
    using P = decltype(tag);
    constexpr bool M = decltype(master_tag)::value;
    using S = std::conditional_t<M, float, P>;
    if (amsgrad && l2) launch<P, S, M, true, true>(rows_dev, used, nchunks, h);
    else if (amsgrad) launch<P, S, M, true, false>(rows_dev, used, nchunks, h);
    else if (l2) launch<P, S, M, false, true>(rows_dev, used, nchunks, h);
    else launch<P, S, M, false, false>(rows_dev, used, nchunks, h);
  };
  using yes = std::true_type;
  using no = std::false_type;
  switch (params[0].scalar_type()) {
    case at::kFloat: go(float{}, no{}); break;
    case at::kHalf: master ? go(c10::Half{}, yes{}) : go(c10::Half{}, no{}); break;
    case at::kBFloat16: master ? go(c10::BFloat16{}, yes{}) : go(c10::BFloat16{}, no{}); break;
    default: TORCH_CHECK(false, "fck::adam_ (cuda): unsupported dtype ", params[0].scalar_type());
  }
}

}  // namespace cuda
}  // namespace fck
