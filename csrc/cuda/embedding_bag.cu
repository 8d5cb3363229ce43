// Embedding bags on CUDA, forward and backward (the fck::embedding_bag_fwd/_bwd contract).
//
// Forward: block (bag, column chunk), one thread per column, walking the bag's indices: every row read is
// coalesced across the block. Backward: block (index, column chunk) adds its index's scaled gradient row into an
// fp32/fp64 buffer with atomicAdd ('max': block (bag, column chunk) adds each column to the row its maximum came
// from). Under torch.use_deterministic_algorithms(True) the backward gathers the per-index rows instead and lets
// ATen's deterministic index_add_ sum them.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "fck/acc.h"
#include "fck/embedding_bag.h"
#include "fck/embedding_bag_host.h"
#include "fck/ops.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kCols = 128;  // columns per block

template <typename T, typename A, typename I>
__global__ void bag_forward(const T* __restrict__ w, const I* __restrict__ idx, const I* __restrict__ off,
                            const T* __restrict__ psw, T* __restrict__ out, int64_t* __restrict__ arg, int64_t dim,
                            int64_t mode, int64_t pad) {
  const int64_t b = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * kCols + threadIdx.x;
  if (d >= dim) return;
  const int64_t start = off[b], end = off[b + 1];
  A acc = mode == kBagMax ? -INFINITY : A(0);
  int64_t best = -1, count = 0;
  for (int64_t i = start; i < end; ++i) {
    const int64_t r = idx[i];
    if (r == pad) continue;
    ++count;
    const A v = static_cast<A>(w[r * dim + d]);
    if (mode == kBagMax) {
      if (best < 0 || v > acc) {  // the first maximum wins, as torch's
        acc = v;
        best = r;
      }
    } else {
      acc += psw ? v * static_cast<A>(psw[i]) : v;
    }
  }
  acc = count == 0 ? A(0) : acc * bag_output_scale<A>(mode, count);
  out[b * dim + d] = static_cast<T>(acc);
  if (mode == kBagMax) arg[b * dim + d] = best;
}

// grid (indices, column chunks): scale[i] already holds per-sample weight, 1/count and 0 for padding.
template <typename T, typename A, typename I>
__global__ void bag_backward(const T* __restrict__ g, const I* __restrict__ idx, const int64_t* __restrict__ bag,
                             const A* __restrict__ scale, A* __restrict__ gw, int64_t dim) {
  const int64_t i = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * kCols + threadIdx.x;
  const A s = scale[i];
  if (d >= dim || s == A(0)) return;
  atomicAdd(gw + int64_t(idx[i]) * dim + d, static_cast<A>(g[bag[i] * dim + d]) * s);
}

template <typename T, typename A>
__global__ void bag_backward_max(const T* __restrict__ g, const int64_t* __restrict__ arg, A* __restrict__ gw,
                                 int64_t dim) {
  const int64_t b = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * kCols + threadIdx.x;
  if (d >= dim) return;
  const int64_t r = arg[b * dim + d];
  if (r >= 0) atomicAdd(gw + r * dim + d, static_cast<A>(g[b * dim + d]));
}

dim3 grid_for(int64_t blocks, int64_t dim) { return dim3(blocks, (dim + kCols - 1) / kCols); }

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
  check_embedding_bag(weight, indices, offsets, mode, per_sample_weights, "fck::embedding_bag_fwd");
  TORCH_CHECK(weight.is_cuda(), "fck::embedding_bag_fwd (cuda): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(weight.device());
  check_index_range(indices, weight.size(0));
  const int64_t n_bags = offsets.numel() - 1, dim = weight.size(1);
  at::Tensor out = at::empty({n_bags, dim}, weight.options());
  at::Tensor arg = at::empty(mode == kBagMax ? at::IntArrayRef{n_bags, dim} : at::IntArrayRef{0},
                             weight.options().dtype(at::kLong));
  if (n_bags == 0 || dim == 0) return {out, arg};
  const at::Tensor psw = has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fck::embedding_bag_fwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fck::embedding_bag_fwd", [&] {
      bag_forward<T, A, index_t><<<grid_for(n_bags, dim), kCols, 0, stream>>>(
          weight.data_ptr<T>(), indices.data_ptr<index_t>(), offsets.data_ptr<index_t>(),
          psw.defined() ? psw.data_ptr<T>() : nullptr, out.data_ptr<T>(),
          mode == kBagMax ? arg.data_ptr<int64_t>() : nullptr, dim, mode, padding_idx);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, arg};
}

at::Tensor embedding_bag_bwd(FCK_EMBEDDING_BAG_BWD_ARGS) {
  check_embedding_bag_bwd(grad_output, indices, offsets, max_indices, num_weights, mode, per_sample_weights);
  TORCH_CHECK(grad_output.is_cuda(), "fck::embedding_bag_bwd (cuda): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  check_index_range(indices, num_weights);
  const int64_t dim = grad_output.size(1), n_bags = offsets.numel() - 1;
  const auto acc = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gw = at::zeros({num_weights, dim}, grad_output.options().dtype(acc));
  if (grad_output.numel() == 0 || (mode != kBagMax && indices.numel() == 0)) return gw.to(grad_output.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (mode == kBagMax) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fck::bag_bwd_max", [&] {
      using A = typename AccOf<scalar_t>::type;
      bag_backward_max<scalar_t, A><<<grid_for(n_bags, dim), kCols, 0, stream>>>(
          grad_output.data_ptr<scalar_t>(), max_indices.data_ptr<int64_t>(), gw.data_ptr<A>(), dim);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return gw.to(grad_output.scalar_type());
  }
  at::Tensor scale, bag;
  std::tie(scale, bag) = index_scale(indices, offsets, mode, per_sample_weights, padding_idx, acc);
  if (at::globalContext().deterministicAlgorithms()) {
    const at::Tensor rows = grad_output.to(acc).index_select(0, bag).mul_(scale.unsqueeze(1));
    return gw.index_add_(0, indices, rows).to(grad_output.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fck::embedding_bag_bwd", [&] {
    using T = scalar_t;
    using A = typename AccOf<T>::type;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fck::embedding_bag_bwd", [&] {
      bag_backward<T, A, index_t><<<grid_for(indices.numel(), dim), kCols, 0, stream>>>(
          grad_output.data_ptr<T>(), indices.data_ptr<index_t>(), bag.data_ptr<int64_t>(), scale.data_ptr<A>(),
          gw.data_ptr<A>(), dim);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gw.to(grad_output.scalar_type());
}

}  // namespace cuda
}  // namespace fck
