// Host-side guards of the embedding-bag ops shared by the CPU and CUDA kernels: a direct torch.ops.fck call must
// never read or write out of bounds, whatever it is given.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "fck/tensor_checks.h"
#include "fck/embedding_bag.h"

namespace fck {

// What the CUDA forward found wrong while reading its inputs (status: the first bag whose offsets are wrong, the
// first index out of range; kBagStatusNone where none): a clear error in PyTorch's words; the CPU checks
// report through it too. Defined
// in csrc/cpu/embedding_bag.cpp; reads the offending values from the device (the error path only).
constexpr uint64_t kBagStatusNone = ~uint64_t(0);
void raise_bag_status(const uint64_t status[2], const at::Tensor& indices, const at::Tensor& offsets,
                      int64_t num_weights, const char* op);

inline void check_offsets(const at::Tensor& indices, const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous(), op, ": indices must be a contiguous 1-D tensor");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.is_contiguous() && offsets.scalar_type() == indices.scalar_type() &&
                  offsets.numel() >= 1,
              op, ": offsets must be a contiguous 1-D tensor of the indices' dtype, with the end offset last");
  TORCH_CHECK(offsets.device() == indices.device(), op, ": offsets and indices must be on one device");
  // CUDA offsets are checked by the forward kernel as it reads them (raise_bag_status reports what it found):
  // reading them here would cost the host a wait for the GPU on every call.
  if (!offsets.is_cpu()) return;
  // The Python wrapper leaves these checks to this loop (no tensor ops per call), so its messages are PyTorch's.
  const int64_t n = offsets.numel(), len = indices.numel();
  const auto first_bad_bag = [&](const auto* o) -> int64_t {
    if (n == 1) return o[0] == 0 && len == 0 ? -1 : 0;
    for (int64_t b = 0; b + 1 < n; ++b) {
      const int64_t lo = o[b], hi = o[b + 1];
      if ((b == 0 && lo != 0) || lo > hi || hi > len) return b;
    }
    return int64_t(o[n - 1]) == len ? -1 : n - 2;  // n - 2: the last bag, whose end is not the input's length
  };
  const int64_t b = offsets.scalar_type() == at::kInt ? first_bad_bag(offsets.data_ptr<int32_t>())
                                                      : first_bad_bag(offsets.data_ptr<int64_t>());
  if (b < 0) return;
  TORCH_CHECK(n > 1, op, ": with no bags the one offset must be 0 and the input empty, got offsets[0] = ",
              offsets[0].item<int64_t>(), " and ", len, " indices");
  const uint64_t status[2] = {uint64_t(b), kBagStatusNone};
  raise_bag_status(status, indices, offsets, -1, op);
}

inline void check_embedding_bag(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                                int64_t mode, const std::optional<at::Tensor>& psw, const char* op) {
  check_float(weight, "weight", op);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), op, ": weight must be a contiguous 2-D tensor");
  TORCH_CHECK(indices.device() == weight.device(), op, ": indices are on ", indices.device(), " but weight is on ",
              weight.device());
  TORCH_CHECK(mode == kBagSum || mode == kBagMean || mode == kBagMax, op, ": mode must be 0 (sum), 1 (mean) or 2 (max)");
  check_offsets(indices, offsets, op);
  if (has(psw)) {
    TORCH_CHECK(mode == kBagSum, op, ": per_sample_weights are only supported for mode='sum'");
    TORCH_CHECK(psw->dim() == 1 && psw->numel() == indices.numel() && psw->scalar_type() == weight.scalar_type() &&
                    psw->device() == weight.device(),
                op, ": per_sample_weights must be a 1-D tensor of the weight's dtype, one value per index");
  }
}

// Every index in [0, num_weights), or an IndexError naming the first bad one.
template <typename I>
int64_t first_out_of_range(const I* idx, int64_t n, int64_t num_weights) {
  // One branch-free pass (vectorizes); the position is searched for only when something is out of range.
  I lo = idx[0], hi = idx[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, idx[i]);
    hi = std::max(hi, idx[i]);
  }
  if (lo >= 0 && int64_t(hi) < num_weights) return -1;
  for (int64_t i = 0;; ++i) {
    if (idx[i] < 0 || int64_t(idx[i]) >= num_weights) return i;
  }
}

// CPU indices only: on CUDA the kernels check each index as they read it (see raise_bag_status).
inline void check_index_range(const at::Tensor& indices, int64_t num_weights) {
  if (indices.numel() == 0 || !indices.is_cpu()) return;
  const int64_t n = indices.numel();
  const int64_t i = indices.scalar_type() == at::kInt ? first_out_of_range(indices.data_ptr<int32_t>(), n, num_weights)
                                                      : first_out_of_range(indices.data_ptr<int64_t>(), n, num_weights);
  TORCH_CHECK_INDEX(i < 0, "embedding_bag: index ", i, " of input takes value ", indices[i].item<int64_t>(),
                    " which is not in the valid range [0, ", num_weights, ")");
}

inline void check_embedding_bag_bwd(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& offsets,
                                    const at::Tensor& max_indices, int64_t num_weights, int64_t mode,
                                    const std::optional<at::Tensor>& psw) {
  const char* op = "fck::embedding_bag_bwd";
  check_float(grad, "grad_output", op);
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.size(0) == offsets.numel() - 1, op,
              ": grad_output must be a contiguous (bags, dim) tensor");
  TORCH_CHECK(num_weights >= 0, op, ": num_weights must be >= 0");
  TORCH_CHECK(indices.device() == grad.device(), op, ": indices and grad_output must be on one device");
  TORCH_CHECK(mode == kBagSum || mode == kBagMean || mode == kBagMax, op, ": mode must be 0, 1 or 2");
  check_offsets(indices, offsets, op);
  if (mode == kBagMax) {
    TORCH_CHECK(max_indices.sizes().equals(grad.sizes()) && max_indices.scalar_type() == at::kLong &&
                    max_indices.is_contiguous() && max_indices.device() == grad.device(),
                op, ": max_indices must be the forward's (bags, dim) int64 tensor");
    if (max_indices.is_cpu()) {  // CUDA: the kernel skips any row outside the table
      const at::Tensor bad = (max_indices < -1).logical_or_(max_indices >= num_weights);
      TORCH_CHECK_INDEX(!bad.any().item<bool>(), op, ": max_indices out of range");
    }
  }
  if (has(psw)) {
    // The backward also takes them for 'mean': the caller folds scale_grad_by_freq's 1/frequency in here.
    TORCH_CHECK(mode != kBagMax && psw->dim() == 1 && psw->numel() == indices.numel() &&
                    psw->scalar_type() == grad.scalar_type() && psw->device() == grad.device(),
                op, ": per-index scales must be one value per index, of the gradient's dtype, not for mode='max'");
  }
}

// The fused update's arguments (both devices).
inline void check_fused_update(const at::Tensor& weight, const std::optional<at::Tensor>& state,
                               const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& offsets,
                               int64_t mode, const std::optional<at::Tensor>& psw, int64_t optimizer,
                               const char* op) {
  TORCH_CHECK(mode != kBagMax, op, ": the fused update supports mode='sum' and 'mean'");
  TORCH_CHECK(optimizer == kSgd || optimizer == kRowwiseAdagrad, op,
              ": optimizer must be 0 (SGD) or 1 (row-wise Adagrad)");
  check_embedding_bag(weight, indices, offsets, mode, psw, op);
  check_float(grad_output, "grad_output", op);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.is_contiguous() && grad_output.size(0) == offsets.numel() - 1 &&
                  grad_output.size(1) == weight.size(1) && grad_output.scalar_type() == weight.scalar_type() &&
                  grad_output.device() == weight.device(),
              op, ": grad_output must be a contiguous (bags, dim) tensor of the weight's dtype and device");
  if (optimizer == kRowwiseAdagrad) {
    TORCH_CHECK(has(state) && state->scalar_type() == at::kFloat && state->is_contiguous() &&
                    state->numel() == weight.size(0) && state->device() == weight.device(),
                op, ": row-wise Adagrad needs a contiguous float32 state of one value per row");
  }
}

}  // namespace fck

