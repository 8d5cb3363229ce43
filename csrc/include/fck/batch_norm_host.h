// Host-side parts of the batch-norm ops shared by the CPU and CUDA kernels: input guards (a direct
// torch.ops.fck.batch_norm_* call must never read or write out of bounds) and the memory layouts the kernels handle.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "fck/tensor_checks.h"

namespace fck {

// The kernels see an (N, C, S) tensor, S the product of the spatial sizes, in one of two dense layouts:
//   planar       NC(S) contiguous: for each (n, c) a run of S elements
//   interleaved  channels-last (N, S, C), and every (N, C) input: rows of C elements
struct BnLayout {
  int64_t N, C, S;
  bool planar;
  int64_t rows() const { return N * S; }    // interleaved rows
  int64_t count() const { return N * S; }   // elements per channel
};

inline BnLayout bn_layout(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of 2 to 5 dimensions (N, C, ...), got ", x.dim(), "-D");
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = N * C == 0 ? 0 : x.numel() / (N * C);
  if (x.is_contiguous()) return {N, C, S, S > 1};
  const bool cl = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(cl, op, ": input must be contiguous or channels_last");
  return {N, C, S, false};
}

inline void check_like(const at::Tensor& x, const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", what, " is on ", t.device(), " but input is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", what, " is ", t.scalar_type(), " but input is ",
              x.scalar_type());
  TORCH_CHECK(t.sizes().equals(x.sizes()), op, ": ", what, " has shape ", t.sizes(), " but input has shape ",
              x.sizes());
  bool same = true;  // strides of size-1 dims never matter, nor any of an empty tensor
  for (int64_t d = 0; d < x.dim(); ++d) same = same && (x.size(d) == 1 || t.stride(d) == x.stride(d));
  TORCH_CHECK(same || x.numel() == 0, op, ": ", what, " must have the input's strides (memory format)");
}

// An operand the kernels index with the input's strides (residual, output, grad_output) laid out like the input:
// itself when it is, else a copy. Eager callers pass them so; a compiled graph may not (torch 2.4's inductor lays a
// convolution's output out channels-last while the gradient from a flatten behind it stays NCHW). Anything that is
// not the input's shape, dtype and device is left for check_like to refuse.
inline at::Tensor like_input(const at::Tensor& x, const at::Tensor& t) {
  if (!t.defined() || !t.sizes().equals(x.sizes()) || t.scalar_type() != x.scalar_type() ||
      t.device() != x.device() || x.numel() == 0) {
    return t;
  }
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) != 1 && t.stride(d) != x.stride(d)) return at::empty_like(x).copy_(t);
  }
  return t;
}

inline std::optional<at::Tensor> like_input(const at::Tensor& x, const std::optional<at::Tensor>& t) {
  return has(t) ? std::optional<at::Tensor>(like_input(x, *t)) : t;
}

inline void check_per_channel(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* what,
                              const char* op) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == x.device(), op, ": ", what, " is on ", t->device(), " but input is on ", x.device());
  TORCH_CHECK(t->numel() == x.size(1), op, ": ", what, " should contain ", x.size(1), " elements not ", t->numel());
  TORCH_CHECK(t->dim() == 1, op, ": ", what, " must be 1-D (", x.size(1), " elements), got shape ", t->sizes());
  check_float(*t, what, op);
}

inline BnLayout check_batch_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var, bool training) {
  const char* op = "fck::batch_norm_fwd";
  check_float(x, "input", op);
  const BnLayout L = bn_layout(x, op);
  if (has(residual)) check_like(x, *residual, "residual", op);
  check_per_channel(weight, x, "weight", op);
  check_per_channel(bias, x, "bias", op);
  check_per_channel(running_mean, x, "running_mean", op);
  check_per_channel(running_var, x, "running_var", op);
  TORCH_CHECK(has(running_mean) == has(running_var), op, ": give both running_mean and running_var, or neither");
  TORCH_CHECK(training || has(running_mean), op, ": running_mean must be defined in evaluation mode");
  TORCH_CHECK(!training || x.numel() == 0 || L.count() > 1,
              "Expected more than 1 value per channel when training, got input size ", x.sizes());
  return L;
}

inline BnLayout check_batch_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& y,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                     const at::Tensor& save_invstd, bool relu) {
  const char* op = "fck::batch_norm_bwd";
  check_float(x, "input", op);
  const BnLayout L = bn_layout(x, op);
  check_like(x, dy, "grad_output", op);
  TORCH_CHECK(!relu || has(y), op, ": the output is needed to recover the ReLU mask");
  if (has(y)) check_like(x, *y, "output", op);
  check_per_channel(weight, x, "weight", op);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&save_mean, &save_invstd}) {
    TORCH_CHECK(t->device() == x.device() && t->dim() == 1 && t->size(0) == x.size(1) && t->scalar_type() == acc &&
                    t->is_contiguous(),
                op, ": save_mean and save_invstd must be contiguous ", acc, " tensors of ", x.size(1),
                " elements on the input's device");
  }
  return L;
}

}  // namespace fck
