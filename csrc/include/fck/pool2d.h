// What the 2-D pooling kernels (csrc/cpu/max_pool.cpp, avg_pool.cpp) share: the window geometry, torch's output
// size, and how many planes one task takes.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fck {
namespace cpu {

struct Pool2d {
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t H, W, OH, OW;
};

// torch's pooling output size (pooling_output_shape): the strided count rounded down (up with ceil_mode; a negative
// span rounds toward minus infinity, so an input too small gives no output), and with ceil_mode the last window
// must start inside the input or its left padding.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Planes per task: at least ~64k input values, so a small pool stays on the calling thread.
inline int64_t plane_grain(const Pool2d& q) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, q.H * q.W));
}

}  // namespace cpu
}  // namespace fck
