// Embedding bags on CUDA, forward and backward (the fck::embedding_bag_fwd/_bwd contract).
//
// Both passes are bag-major: a thread owns V adjacent columns (V = 4 where rows allow 16-byte loads) of one bag, a
// bag's threads are consecutive (a row read is coalesced) and a block holds as many bags as fit in 256 threads, so
// narrow tables (4 columns) fill blocks too. The forward walks the bag four indices at a time (four rows in flight
// per thread). The backward holds its bag's gradient in registers and adds it to every row the bag named
// (atomicAdd into an fp32/fp64 buffer; 16-byte vector atomics on sm_90): no per-index bag ids or scales are built,
// and one kernel does it all. 'max': block (bag, column chunk) adds each column to the row its maximum came from.
// Where the indices times the columns are many (text bags: 450k x 400), the atomics cost more than grouping the
// occurrences by row: the backward then sorts them and writes each gradient row once (fck/embedding_bag_rows.h:
// no atomics, no zero fill, the same bits every run, so also the path under torch.use_deterministic_algorithms).
//
// Validation costs one wait: the forward kernel checks every offset and index as it reads it (a bad one is never
// dereferenced) and records the first bad bag and index; the host reads those 16 bytes back and raises
// (raise_bag_status). The backward runs on indices its forward checked and skips anything outside the table.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "fck/acc.h"
#include "fck/block_launch.h"
#include "fck/embedding_bag.h"
#include "fck/embedding_bag_host.h"
#include "fck/embedding_bag_rows.h"
#include "fck/ops.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 128;  // columns per block of the 'max' backward
// Indices x columns from which the dense backward goes row by row: an estimate until the H200 measures both (the
// text case, 180M, spent 440 us in atomics; collab's 0.2M and tabular's less take one atomic launch and a fill).
constexpr int64_t kRowsWork = int64_t(1) << 23;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Thread -> (bag, first column) of the bag-major kernels.
struct BagLayout {
  int64_t n_bags, n_idx, dim, num_weights, pad;
  int tpb;  // threads per bag: ceil(dim / V), at most kThreads
  int bpb;  // bags per block
};

template <int V>
BagLayout layout(int64_t n_bags, int64_t n_idx, int64_t dim, int64_t num_weights, int64_t pad) {
  const int64_t per_bag = (dim + V - 1) / V;
  const int tpb = int(std::min<int64_t>(per_bag, kThreads));
  return {n_bags, n_idx, dim, num_weights, pad, tpb, kThreads / tpb};
}

template <int V>
dim3 bag_grid(const BagLayout& l) {
  return dim3(unsigned((l.n_bags + l.bpb - 1) / l.bpb), unsigned((l.dim + int64_t(l.tpb) * V - 1) / (int64_t(l.tpb) * V)));
}

// The bag's [start, end) if its offsets are sound, else false (nothing of it is read).
template <typename I>
__device__ bool bag_range(const I* off, int64_t b, const BagLayout& l, int64_t& start, int64_t& end) {
  start = off[b];
  end = off[b + 1];
  return start >= 0 && start <= end && end <= l.n_idx && (b != 0 || start == 0) && (b != l.n_bags - 1 || end == l.n_idx);
}

__device__ bool in_table(int64_t r, const BagLayout& l) { return r >= 0 && r < l.num_weights; }

template <typename T, typename A, typename I, int V>
__global__ void __launch_bounds__(kThreads) bag_forward(const T* __restrict__ w, const I* __restrict__ idx,
                                                        const I* __restrict__ off, const T* __restrict__ psw,
                                                        T* __restrict__ out, int64_t* __restrict__ arg, BagLayout l,
                                                        int64_t mode, unsigned long long* __restrict__ status) {
  const int lane = threadIdx.x % l.tpb;
  const int64_t b = int64_t(blockIdx.x) * l.bpb + threadIdx.x / l.tpb;
  const int64_t c = (int64_t(blockIdx.y) * l.tpb + lane) * V;
  if (b >= l.n_bags || threadIdx.x >= l.tpb * l.bpb) return;
  const bool lead = lane == 0 && blockIdx.y == 0;  // the thread that reports this bag's problems
  int64_t start, end;
  if (!bag_range(off, b, l, start, end)) {
    if (lead) atomicMin(status, static_cast<unsigned long long>(b));
    start = end = 0;
  }
  if (c >= l.dim && !lead) return;
  const bool active = c < l.dim;
  A acc[V];
  int64_t best[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    acc[k] = mode == kBagMax ? A(-INFINITY) : A(0);
    best[k] = -1;
  }
  int64_t count = 0;
  int64_t i = start;
  if (mode != kBagMax) {
    for (; i + 4 <= end; i += 4) {  // four rows in flight
      int64_t r[4];
      bool use[4];
      Pack<T, V> p[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        r[u] = idx[i + u];
        const bool ok = in_table(r[u], l);
        if (!ok && lead) atomicMin(status + 1, static_cast<unsigned long long>(i + u));
        use[u] = ok && r[u] != l.pad && active;
        if (use[u]) p[u] = *reinterpret_cast<const Pack<T, V>*>(w + r[u] * l.dim + c);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (!use[u]) continue;
        ++count;
        const A s = psw ? static_cast<A>(psw[i + u]) : A(1);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += static_cast<A>(p[u].v[k]) * s;
      }
    }
  }
  for (; i < end; ++i) {
    const int64_t r = idx[i];
    if (!in_table(r, l)) {
      if (lead) atomicMin(status + 1, static_cast<unsigned long long>(i));
      continue;
    }
    if (r == l.pad || !active) continue;
    ++count;
    const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(w + r * l.dim + c);
    if (mode == kBagMax) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A v = static_cast<A>(p.v[k]);
        if (best[k] < 0 || v > acc[k]) {  // the first maximum wins, as torch's
          acc[k] = v;
          best[k] = r;
        }
      }
    } else {
      const A s = psw ? static_cast<A>(psw[i]) : A(1);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += static_cast<A>(p.v[k]) * s;
    }
  }
  if (!active) return;
  const A scale = bag_output_scale<A>(mode, count);
  Pack<T, V> o;
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = static_cast<T>(count == 0 ? A(0) : acc[k] * scale);
  *reinterpret_cast<Pack<T, V>*>(out + b * l.dim + c) = o;
  if (mode == kBagMax) {
#pragma unroll
    for (int k = 0; k < V; ++k) arg[b * l.dim + c + k] = best[k];
  }
}

template <typename A, int V>
__device__ void add_row(A* dst, const A (&v)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = V == 4 && std::is_same<A, float>::value;  // sm_90's 16-byte atomics
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
#endif
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) atomicAdd(dst + k, v[k]);
  }
}

// Bag-major backward of 'sum'/'mean': each thread adds its bag's gradient (times alpha, the per-sample weight,
// 1/count) to the rows the bag named: into the gradient (alpha 1), or straight into an fp32 table (alpha -lr: the
// fused SGD step).
template <typename T, typename A, typename I, int V>
__global__ void __launch_bounds__(kThreads) bag_backward(const T* __restrict__ g, const I* __restrict__ idx,
                                                         const I* __restrict__ off, const T* __restrict__ psw,
                                                         A* __restrict__ gw, BagLayout l, int64_t mode, A alpha) {
  const int64_t b = int64_t(blockIdx.x) * l.bpb + threadIdx.x / l.tpb;
  const int64_t c = (int64_t(blockIdx.y) * l.tpb + threadIdx.x % l.tpb) * V;
  if (b >= l.n_bags || threadIdx.x >= l.tpb * l.bpb || c >= l.dim) return;
  int64_t start, end;
  if (!bag_range(off, b, l, start, end) || start == end) return;
  A scale = alpha;
  if (mode == kBagMean) {
    int64_t count = 0;
    for (int64_t i = start; i < end; ++i) {
      const int64_t r = idx[i];
      count += in_table(r, l) && r != l.pad;
    }
    scale *= bag_output_scale<A>(mode, count);
  }
  const Pack<T, V> gp = *reinterpret_cast<const Pack<T, V>*>(g + b * l.dim + c);
  A gv[V];
#pragma unroll
  for (int k = 0; k < V; ++k) gv[k] = static_cast<A>(gp.v[k]) * scale;
  for (int64_t i = start; i < end; ++i) {
    const int64_t r = idx[i];
    if (!in_table(r, l) || r == l.pad) continue;
    if (psw) {
      const A s = static_cast<A>(psw[i]);
      A sv[V];
#pragma unroll
      for (int k = 0; k < V; ++k) sv[k] = gv[k] * s;
      add_row<A, V>(gw + r * l.dim + c, sv);
    } else {
      add_row<A, V>(gw + r * l.dim + c, gv);
    }
  }
}

template <typename T, typename A>
__global__ void bag_backward_max(const T* __restrict__ g, const int64_t* __restrict__ arg, A* __restrict__ gw,
                                 int64_t dim, int64_t num_weights) {
  const int64_t b = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * kCols + threadIdx.x;
  if (d >= dim) return;
  const int64_t r = arg[b * dim + d];
  if (r >= 0 && r < num_weights) atomicAdd(gw + r * dim + d, static_cast<A>(g[b * dim + d]));
}

// The fused optimizer update: block i owns the row sorted[i] when i starts that row's run in the sorted indices,
// sums the row's gradient over its occurrences (in a fixed order: deterministic) and steps the row once. No dense
// gradient, no atomics; rows outside the table are skipped.
constexpr int kUpdateCols = 8;  // columns per thread: rows up to 8 * 256 values

template <typename T, typename A>
__global__ void fused_update_rows(const int64_t* __restrict__ sorted, const int64_t* __restrict__ perm,
                                  const int64_t* __restrict__ bag, const A* __restrict__ scale,
                                  const T* __restrict__ g, T* __restrict__ w, float* __restrict__ state, int64_t n,
                                  int64_t dim, int64_t num_weights, int64_t optimizer, A lr, A eps) {
  const int64_t i = blockIdx.x;
  const int64_t r = sorted[i];
  if ((i > 0 && sorted[i - 1] == r) || r < 0 || r >= num_weights) return;
  A acc[kUpdateCols];
#pragma unroll
  for (int u = 0; u < kUpdateCols; ++u) acc[u] = A(0);
  for (int64_t j = i; j < n && sorted[j] == r; ++j) {
    const int64_t k = perm[j];
    const A s = scale[k];
    const T* row = g + bag[k] * dim;
#pragma unroll
    for (int u = 0; u < kUpdateCols; ++u) {
      const int64_t d = threadIdx.x + int64_t(u) * blockDim.x;
      if (d < dim) acc[u] += static_cast<A>(row[d]) * s;
    }
  }
  A step = lr;
  if (optimizer == kRowwiseAdagrad) {
    A sq = 0;
#pragma unroll
    for (int u = 0; u < kUpdateCols; ++u) sq += acc[u] * acc[u];  // columns past dim hold 0
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
    __shared__ A warp_sq[32];
    if ((threadIdx.x & 31) == 0) warp_sq[threadIdx.x >> 5] = sq;
    __syncthreads();
    A total = 0;
    for (int k = 0; k < int(blockDim.x + 31) / 32; ++k) total += warp_sq[k];
    const A G = A(state[r]) + total / A(dim);
    __syncthreads();
    if (threadIdx.x == 0) state[r] = float(G);
    step = lr / (sqrt(G) + eps);
  }
  T* out = w + r * dim;
#pragma unroll
  for (int u = 0; u < kUpdateCols; ++u) {
    const int64_t d = threadIdx.x + int64_t(u) * blockDim.x;
    if (d < dim) out[d] = static_cast<T>(static_cast<A>(out[d]) - step * acc[u]);
  }
}

// V = 4 where every row, the output rows and the per-bag gradient rows start on a 4-element boundary.
bool vec4(int64_t dim, std::initializer_list<const void*> ptrs, size_t elem) {
  if (dim == 0 || dim % 4 != 0) return false;
  for (const void* p : ptrs) {
    if (p && reinterpret_cast<uintptr_t>(p) % (4 * elem) != 0) return false;
  }
  return true;
}

// Per-index factor and bag, as the reference computes them (reference/embedding_bag.py: per_index_scale).
std::pair<at::Tensor, at::Tensor> index_scale(const at::Tensor& indices, const at::Tensor& offsets, int64_t mode,
                                              const std::optional<at::Tensor>& psw, int64_t pad,
                                              at::ScalarType acc) {
  const int64_t n = indices.numel(), n_bags = offsets.numel() - 1;
  const at::Tensor counts = offsets.slice(0, 1).sub(offsets.slice(0, 0, n_bags)).to(at::kLong);
  const at::Tensor bag = at::repeat_interleave(at::arange(n_bags, indices.options().dtype(at::kLong)), counts,
                                               /*dim=*/0, /*output_size=*/n);
  at::Tensor keep = pad < 0 ? at::ones({n}, indices.options().dtype(acc)) : indices.ne(pad).to(acc);
  at::Tensor scale = has(psw) ? psw->to(acc).mul(keep) : keep;
  if (mode == kBagMean) {
    const at::Tensor per_bag = at::zeros({n_bags}, keep.options()).index_add_(0, bag, keep).clamp_min_(1);
    scale = scale.div(per_bag.index_select(0, bag));
  }
  return {scale.contiguous(), bag};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> embedding_bag_fwd(FCK_EMBEDDING_BAG_FWD_ARGS) {
  const char* op = "fck::embedding_bag_fwd";
  check_embedding_bag(weight, indices, offsets, mode, per_sample_weights, op);
  TORCH_CHECK(weight.is_cuda(), op, " (cuda): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n_bags = offsets.numel() - 1, dim = weight.size(1), n_idx = indices.numel();
  at::Tensor out = at::empty({n_bags, dim}, weight.options());
  at::Tensor arg = at::empty(mode == kBagMax ? at::IntArrayRef{n_bags, dim} : at::IntArrayRef{0},
                             weight.options().dtype(at::kLong));
  if (n_bags == 0) {  // no bag to check the offsets: the one offset must be 0 and there must be no index
    const at::Tensor off = offsets.to(at::kCPU);
    check_offsets(indices.to(at::kCPU), off, op);
    return {out, arg};
  }
  const at::Tensor psw = has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor status = at::empty({2}, weight.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(status.data_ptr(), 0xFF, 2 * sizeof(uint64_t), stream));
  auto* st = reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>());
  // With no columns the kernel still runs one thread per bag, to check the offsets and indices.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fck::embedding_bag_fwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fck::embedding_bag_fwd", [&] {
      const T* p = psw.defined() ? psw.data_ptr<T>() : nullptr;
      int64_t* a = mode == kBagMax ? arg.data_ptr<int64_t>() : nullptr;
      if (vec4(dim, {weight.data_ptr(), out.data_ptr()}, sizeof(T))) {
        const BagLayout l = layout<4>(n_bags, n_idx, dim, weight.size(0), padding_idx);
        bag_forward<T, A, index_t, 4><<<bag_grid<4>(l), l.tpb * l.bpb, 0, stream>>>(
            weight.data_ptr<T>(), indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), p, out.data_ptr<T>(), a,
            l, mode, st);
      } else {
        const BagLayout l = layout<1>(n_bags, n_idx, std::max<int64_t>(dim, 1), weight.size(0), padding_idx);
        bag_forward<T, A, index_t, 1><<<bag_grid<1>(l), l.tpb * l.bpb, 0, stream>>>(
            weight.data_ptr<T>(), indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), p, out.data_ptr<T>(), a,
            BagLayout{l.n_bags, l.n_idx, dim, l.num_weights, l.pad, l.tpb, l.bpb}, mode, st);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cudaStreamCaptureStatus capturing;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (capturing == cudaStreamCaptureStatusNone) {  // a graph being captured cannot wait; the kernel still guards
    uint64_t found[2];
    C10_CUDA_CHECK(cudaMemcpyAsync(found, status.data_ptr(), sizeof(found), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    raise_bag_status(found, indices, offsets, weight.size(0), op);
  }
  return {out, arg};
}

// dst (num_weights, dim) of the accumulation type += alpha * each bag's gradient at the rows it named, by atomics.
void add_bag_rows(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& offsets, int64_t mode,
                  const std::optional<at::Tensor>& per_sample_weights, int64_t padding_idx, const at::Tensor& dst,
                  double alpha) {
  const int64_t dim = grad_output.size(1), n_bags = offsets.numel() - 1, num_weights = dst.size(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor psw = has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fck::embedding_bag_bwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fck::embedding_bag_bwd", [&] {
      const T* p = psw.defined() ? psw.data_ptr<T>() : nullptr;
      if (vec4(dim, {grad_output.data_ptr(), dst.data_ptr()}, sizeof(T)) &&
          reinterpret_cast<uintptr_t>(dst.data_ptr()) % (4 * sizeof(A)) == 0) {
        const BagLayout l = layout<4>(n_bags, indices.numel(), dim, num_weights, padding_idx);
        bag_backward<T, A, index_t, 4><<<bag_grid<4>(l), l.tpb * l.bpb, 0, stream>>>(
            grad_output.data_ptr<T>(), indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), p,
            dst.data_ptr<A>(), l, mode, A(alpha));
      } else {
        const BagLayout l = layout<1>(n_bags, indices.numel(), dim, num_weights, padding_idx);
        bag_backward<T, A, index_t, 1><<<bag_grid<1>(l), l.tpb * l.bpb, 0, stream>>>(
            grad_output.data_ptr<T>(), indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(), p,
            dst.data_ptr<A>(), l, mode, A(alpha));
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor embedding_bag_bwd(FCK_EMBEDDING_BAG_BWD_ARGS) {
  const char* op = "fck::embedding_bag_bwd";
  check_embedding_bag_bwd(grad_output, indices, offsets, max_indices, num_weights, mode, per_sample_weights);
  TORCH_CHECK(grad_output.is_cuda(), op, " (cuda): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t dim = grad_output.size(1), n_bags = offsets.numel() - 1;
  // FCK_BAG_ROWS_CUDA=0 / 1 picks the atomics or the rows outside deterministic mode (the benchmark's A/B).
  if (mode != kBagMax && (at::globalContext().deterministicAlgorithms() || env_on("FCK_BAG_ROWS_CUDA") ||
                          (!env_off("FCK_BAG_ROWS_CUDA") && indices.numel() * dim >= kRowsWork))) {
    return bag_rows::grad(grad_output, indices, offsets, num_weights, mode,
                          has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor(), padding_idx,
                          [](int b, int t, const auto& body) { launch_blocks(b, t, body); });
  }
  const auto acc = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gw = at::zeros({num_weights, dim}, grad_output.options().dtype(acc));
  if (grad_output.numel() == 0 || (mode != kBagMax && indices.numel() == 0)) return gw.to(grad_output.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (mode == kBagMax) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fck::bag_bwd_max", [&] {
      using A = typename AccOf<scalar_t>::type;
      bag_backward_max<scalar_t, A><<<dim3(n_bags, (dim + kCols - 1) / kCols), kCols, 0, stream>>>(
          grad_output.data_ptr<scalar_t>(), max_indices.data_ptr<int64_t>(), gw.data_ptr<A>(), dim, num_weights);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return gw.to(grad_output.scalar_type());
  }
  add_bag_rows(grad_output, indices, offsets, mode, per_sample_weights, padding_idx, gw, 1.0);
  return gw.to(grad_output.scalar_type());
}

void embedding_bag_fused_update_(FCK_EMBEDDING_BAG_UPDATE_ARGS) {
  const char* op = "fck::embedding_bag_fused_update_";
  check_fused_update(weight, state, grad_output, indices, offsets, mode, per_sample_weights, optimizer, op);
  TORCH_CHECK(weight.is_cuda(), op, " (cuda): tensors must be CUDA tensors");
  const int64_t n = indices.numel(), dim = weight.size(1);
  TORCH_CHECK(dim <= int64_t(kUpdateCols) * kThreads, op, " (cuda): rows of at most ", kUpdateCols * kThreads,
              " values");
  const c10::cuda::CUDAGuard guard(weight.device());
  if (n == 0 || dim == 0) return;
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // SGD is linear in the gradient: an fp32/fp64 table takes -lr times each bag's gradient by atomics, one launch
  // and no sort (the order of a row's additions varies between runs: not under deterministic algorithms).
  if (optimizer == kSgd && weight.scalar_type() == acc && weight.is_contiguous() &&
      !at::globalContext().deterministicAlgorithms()) {
    add_bag_rows(grad_output, indices, offsets, mode, per_sample_weights, padding_idx, weight, -lr);
    return;
  }
  at::Tensor scale, bag;
  std::tie(scale, bag) = index_scale(indices, offsets, mode, per_sample_weights, padding_idx, acc);
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(indices.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int threads = int(std::min<int64_t>(kThreads, (dim + 31) / 32 * 32));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* st = optimizer == kRowwiseAdagrad ? state->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fck::embedding_bag_fused_update_",
                                  [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    fused_update_rows<T, A><<<n, threads, 0, stream>>>(
        sorted.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), bag.data_ptr<int64_t>(), scale.data_ptr<A>(),
        grad_output.data_ptr<T>(), weight.data_ptr<T>(), st, n, dim, weight.size(0), optimizer, A(lr), A(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fck
