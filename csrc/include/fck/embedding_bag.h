// Embedding-bag math shared by the CPU loops and the CUDA kernels.
#pragma once

#include <cstdint>

#include "fck/macros.h"

namespace fck {

// `mode` of the ops, torch's numbering.
constexpr int64_t kBagSum = 0;
constexpr int64_t kBagMean = 1;
constexpr int64_t kBagMax = 2;

// `optimizer` of the fused update.
constexpr int64_t kSgd = 0;
constexpr int64_t kRowwiseAdagrad = 1;

// What a bag's reduced rows are multiplied by: 1/count for 'mean' (rows equal to padding_idx are not counted), 1
// otherwise. The backward scales each index's gradient by the same factor.
template <typename A>
FCK_HOST_DEVICE A bag_output_scale(int64_t mode, int64_t count) {
  return mode == kBagMean && count > 0 ? A(1) / A(count) : A(1);
}

}  // namespace fck
