// The type the math runs in for a storage type: float for fp32/fp16/bf16, double for float64.
#pragma once

namespace fck {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

}  // namespace fck
