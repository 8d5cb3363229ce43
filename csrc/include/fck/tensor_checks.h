// Guards every op's host code shares (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fck {

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_float(const at::Tensor& t, const char* what, const char* op) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op, ": ", what,
              " must be float64, float32, float16 or bfloat16, got ", d);
}

}  // namespace fck
