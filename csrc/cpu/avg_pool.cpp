// 2-D average pooling on the CPU for contiguous NCHW input, forward and backward.
//
// torch's NCHW kernel sums each output's window element by element, testing the edges as it goes: Inception's 3x3
// stride-1 pool over 16x192x35x35 takes ~15 ms on two cores, 33 times a copy of the tensor. A window's sum is
// separable: first the window's rows are added (whole rows, so vector adds whatever the stride), then its columns
// (vector loads at stride 1 and 2). Each plane is copied into a zero-bordered layout (Layout below) in which both
// sums are single loops over the whole plane, so no loop tests an edge and short rows cost no per-row loop. The
// backward is the same two steps transposed: each output's gradient, over its divisor, spread over its window's
// columns, then over its window's rows.
//
// Divisors are torch's: the window's rows times its columns, each counted inside the padded input
// (count_include_pad) or inside the input, or divisor_override. Sums run in fp32 for fp16/bf16, in another order
// than torch's, and are multiplied by the divisor's reciprocal (torch divides): values agree to rounding, not to
// the bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "fck/cpu_pool.h"
#include "fck/cpu_vec.h"
#include "fck/macros.h"
#include "fck/ops.h"
#include "fck/pool2d.h"

namespace fck {
namespace cpu {
namespace {

struct AvgPool2d {
  Pool2d q;
  bool count_include_pad;
  int64_t divisor;  // divisor_override, 0 for none
};

// The input rows (or columns) [lo, hi) output o's window covers, and its count for the divisor.
struct Span {
  int64_t lo, hi, count;
};

inline Span span(int64_t o, int64_t s, int64_t p, int64_t k, int64_t in, bool count_include_pad) {
  const int64_t start = o * s - p, end = std::min(start + k, in + p);
  const int64_t lo = std::max<int64_t>(start, 0), hi = std::min(end, in);
  return {lo, hi, count_include_pad ? end - start : std::max<int64_t>(hi - lo, 0)};
}

// A plane as both passes see it: input (ih, iw) at (ih + pH, iw + pW) of a zero-bordered PH x PW copy, every window
// inside it (ceil_mode's last ones may overhang the padding), PW a multiple of the column stride so that a window's
// columns start at (oh PW + ow sW) = m sW of the flattened copy, m = oh PW / sW + ow. With that, each pass is one
// loop over a whole plane rather than a loop per row: short rows (Inception's 17x17, 8x8) paid more for the loop
// than for the values.
struct Layout {
  int64_t PH, PW, M;  // M = PW / sW: window sums per row, the first OW of them outputs
};

inline Layout layout(const Pool2d& q) {
  const int64_t PH = std::max(q.H + 2 * q.pH, (q.OH - 1) * q.sH + q.kH);
  int64_t PW = std::max(q.W + 2 * q.pW, (q.OW - 1) * q.sW + q.kW);
  PW = (PW + q.sW - 1) / q.sW * q.sW;
  return {PH, PW, PW / q.sW};
}

// A row of fp32 values with AVX2 and a masked tail. The compiler makes a plain copy loop a call to memmove, which
// costs more than the copy itself for rows of a few dozen values (Inception's 35, 17, 8).
#ifdef FCK_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma,f16c"))) inline void copy_row_avx2(const float* __restrict src, float* __restrict dst,
                                                                   int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  if (i < n) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(dst + i, m, _mm256_maskload_ps(src + i, m));
  }
}
#endif

// out[i] = a[i] * b[i] for a row: the same, with AVX2 and a masked tail for fp32 (a scalar tail cost as much as the
// row's vectors at 35 values).
#ifdef FCK_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma,f16c"))) inline void scale_row_avx2(const float* a, const float* b, float* out,
                                                                    int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  if (i < n) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m)));
  }
}
#endif

template <typename A, bool kAvx2>
FCK_HOST_DEVICE void scale_row(const A* a, const A* b, A* out, int64_t n) {
#ifdef FCK_HAVE_AVX2_CLONE
  if constexpr (kAvx2 && std::is_same<A, float>::value) return scale_row_avx2(a, b, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

// n values from storage to the accumulation type (fp32 with AVX2: copy_row_avx2).
template <typename T, bool kAvx2>
FCK_HOST_DEVICE void load_row(const raw_t<T>* src, acc_t<T>* dst, int64_t n) {
#ifdef FCK_HAVE_AVX2_CLONE
  if constexpr (kAvx2 && std::is_same<raw_t<T>, float>::value) return copy_row_avx2(src, dst, n);
#endif
  widen<T, kAvx2>(src, dst, n);
}

template <typename T, bool kAvx2>
FCK_HOST_DEVICE void store_row(const acc_t<T>* src, raw_t<T>* dst, int64_t n) {
#ifdef FCK_HAVE_AVX2_CLONE
  if constexpr (kAvx2 && std::is_same<raw_t<T>, float>::value) return copy_row_avx2(src, dst, n);
#endif
  narrow<T, kAvx2>(src, dst, n);
}

// v[j] = p[j] + p[j + PW] + ... (kH rows) for j < n: the window's rows summed, for consecutive output rows at once
// when the row stride is 1. Up to three rows a pass (each pass loads and stores v once: the passes, not the adds,
// were the cost).
template <typename A>
FCK_HOST_DEVICE void sum_rows(const A* __restrict p, int64_t n, int64_t kH, int64_t PW, A* __restrict v) {
  if (kH == 1) {
    std::copy(p, p + n, v);
  } else if (kH == 2) {
    for (int64_t j = 0; j < n; ++j) v[j] = p[j] + p[PW + j];
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = p[j] + p[PW + j] + p[2 * PW + j];
  }
  for (int64_t i = 3; i < kH; i += 2) {
    if (i + 1 < kH) {
      for (int64_t j = 0; j < n; ++j) v[j] += p[i * PW + j] + p[(i + 1) * PW + j];
    } else {
      for (int64_t j = 0; j < n; ++j) v[j] += p[i * PW + j];
    }
  }
}

// The transpose: p[j + i PW] += v[j] for each of the kH rows.
template <typename A>
FCK_HOST_DEVICE void add_rows(const A* __restrict v, int64_t n, int64_t kH, int64_t PW, A* __restrict p) {
  for (int64_t i = 0; i < kH; ++i) {
    for (int64_t j = 0; j < n; ++j) p[i * PW + j] += v[j];
  }
}

// h[m] = v[m S] + v[m S + 1] + ... (kW columns) for m < n, S the column stride (a template constant for 1 and 2, so
// the compiler vectorizes the strided loads; 0: the runtime stride s). Up to three columns a pass, as sum_rows.
template <int S, typename A>
FCK_HOST_DEVICE void sum_columns(const A* __restrict v, int64_t n, int64_t kW, int64_t s, A* __restrict h) {
  const int64_t st = S ? S : s;
  if (kW == 1) {
    for (int64_t m = 0; m < n; ++m) h[m] = v[m * st];
  } else if (kW == 2) {
    for (int64_t m = 0; m < n; ++m) h[m] = v[m * st] + v[m * st + 1];
  } else {
    for (int64_t m = 0; m < n; ++m) h[m] = v[m * st] + v[m * st + 1] + v[m * st + 2];
  }
  for (int64_t j = 3; j < kW; j += 2) {
    if (j + 1 < kW) {
      for (int64_t m = 0; m < n; ++m) h[m] += v[m * st + j] + v[m * st + j + 1];
    } else {
      for (int64_t m = 0; m < n; ++m) h[m] += v[m * st + j];
    }
  }
}

// The transpose: v[m S + j] += h[m] for each of the kW columns (v's len values zeroed first).
template <int S, typename A>
FCK_HOST_DEVICE void spread_columns(const A* __restrict h, int64_t n, int64_t kW, int64_t s, int64_t len,
                                    A* __restrict v) {
  const int64_t st = S ? S : s;
  std::fill(v, v + len, A(0));
  for (int64_t j = 0; j < kW; ++j) {
    for (int64_t m = 0; m < n; ++m) v[m * st + j] += h[m];
  }
}

template <typename A>
FCK_HOST_DEVICE void columns_pass(const A* v, int64_t n, const Pool2d& q, A* h) {
  if (q.sW == 1) {
    sum_columns<1>(v, n, q.kW, 1, h);
  } else if (q.sW == 2) {
    sum_columns<2>(v, n, q.kW, 2, h);
  } else {
    sum_columns<0>(v, n, q.kW, q.sW, h);
  }
}

template <typename A>
FCK_HOST_DEVICE void columns_transpose(const A* h, int64_t n, const Pool2d& q, int64_t len, A* v) {
  if (q.sW == 1) {
    spread_columns<1>(h, n, q.kW, 1, len, v);
  } else if (q.sW == 2) {
    spread_columns<2>(h, n, q.kW, 2, len, v);
  } else {
    spread_columns<0>(h, n, q.kW, q.sW, len, v);
  }
}

// The reciprocal of each output's divisor (OH x OW, the same for every plane). A window that holds no input (not
// possible for valid arguments) gets 0: its output is 0, as torch gives.
template <typename A>
std::vector<A> reciprocal_divisors(const AvgPool2d& a) {
  const Pool2d& q = a.q;
  std::vector<A> d(q.OH * q.OW);
  for (int64_t oh = 0; oh < q.OH; ++oh) {
    const int64_t rows = span(oh, q.sH, q.pH, q.kH, q.H, a.count_include_pad).count;
    for (int64_t ow = 0; ow < q.OW; ++ow) {
      const int64_t n = a.divisor ? a.divisor : rows * span(ow, q.sW, q.pW, q.kW, q.W, a.count_include_pad).count;
      d[oh * q.OW + ow] = n ? A(1) / A(n) : A(0);
    }
  }
  return d;
}

// The forward for a range of planes; compiled twice (baseline x86-64 and AVX2) by the wrappers below: the plane
// copied (as the accumulation type) into its padded layout, its window rows summed, then its window columns, then
// each sum divided and stored.
template <typename T, bool kAvx2>
FCK_HOST_DEVICE void forward_planes(const raw_t<T>* x, raw_t<T>* y, int64_t p0, int64_t p1, const AvgPool2d& a) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same<raw_t<T>, A>::value;
  const Pool2d& q = a.q;
  const Layout l = layout(q);
  // v has kW values of slack: the last row's unused sums read past its end (zeros, never an output)
  std::vector<A> pad(l.PH * l.PW, A(0)), v(q.OH * l.PW + q.kW, A(0)), h(q.OH * l.M), out(kDirect ? 0 : q.OW);
  const std::vector<A> div = reciprocal_divisors<A>(a);
  for (int64_t p = p0; p < p1; ++p) {
    const raw_t<T>* plane = x + p * q.H * q.W;
    for (int64_t ih = 0; ih < q.H; ++ih) {
      load_row<T, kAvx2>(plane + ih * q.W, pad.data() + (ih + q.pH) * l.PW + q.pW, q.W);
    }
    if (q.sH == 1) {
      sum_rows(pad.data(), q.OH * l.PW, q.kH, l.PW, v.data());
    } else {
      for (int64_t oh = 0; oh < q.OH; ++oh) {
        sum_rows(pad.data() + oh * q.sH * l.PW, l.PW, q.kH, l.PW, v.data() + oh * l.PW);
      }
    }
    columns_pass(v.data(), q.OH * l.M, q, h.data());
    for (int64_t oh = 0; oh < q.OH; ++oh) {
      const A* sums = h.data() + oh * l.M;
      const A* d = div.data() + oh * q.OW;
      raw_t<T>* dst = y + (p * q.OH + oh) * q.OW;
      A* o = kDirect ? reinterpret_cast<A*>(dst) : out.data();
      scale_row<A, kAvx2>(sums, d, o, q.OW);
      if (!kDirect) narrow<T, kAvx2>(out.data(), dst, q.OW);
    }
  }
}

// The backward for a range of planes, the forward's passes transposed in reverse order: each output's gradient
// over its divisor, spread over its window's columns, then over its window's rows, into a zeroed padded plane whose
// inside is the input's gradient. The same additions in the same order every run; fp16/bf16 accumulate in fp32
// and round once.
template <typename T, bool kAvx2>
FCK_HOST_DEVICE void backward_planes(const raw_t<T>* gy, raw_t<T>* gx, int64_t p0, int64_t p1, const AvgPool2d& a) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same<raw_t<T>, A>::value;
  const Pool2d& q = a.q;
  const Layout l = layout(q);
  // h's columns past OW stay zero, so the spread adds nothing from them (and nothing past v's slack)
  std::vector<A> pad(l.PH * l.PW), v(q.OH * l.PW + q.kW), h(q.OH * l.M, A(0)), g(kDirect ? 0 : q.OW);
  const std::vector<A> div = reciprocal_divisors<A>(a);
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t oh = 0; oh < q.OH; ++oh) {
      const raw_t<T>* src = gy + (p * q.OH + oh) * q.OW;
      if (!kDirect) widen<T, kAvx2>(src, g.data(), q.OW);
      const A* gr = kDirect ? reinterpret_cast<const A*>(src) : g.data();
      A* scaled = h.data() + oh * l.M;
      const A* d = div.data() + oh * q.OW;
      scale_row<A, kAvx2>(gr, d, scaled, q.OW);
    }
    columns_transpose(h.data(), q.OH * l.M, q, v.size(), v.data());
    std::fill(pad.begin(), pad.end(), A(0));
    if (q.sH == 1) {
      add_rows(v.data(), q.OH * l.PW, q.kH, l.PW, pad.data());
    } else {
      for (int64_t oh = 0; oh < q.OH; ++oh) {
        add_rows(v.data() + oh * l.PW, l.PW, q.kH, l.PW, pad.data() + oh * q.sH * l.PW);
      }
    }
    raw_t<T>* plane = gx + p * q.H * q.W;
    for (int64_t ih = 0; ih < q.H; ++ih) {
      store_row<T, kAvx2>(pad.data() + (ih + q.pH) * l.PW + q.pW, plane + ih * q.W, q.W);
    }
  }
}

#ifdef FCK_HAVE_AVX2_CLONE
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void forward_avx2(const raw_t<T>* x, raw_t<T>* y, int64_t p0, int64_t p1,
                                                           const AvgPool2d& a) {
  forward_planes<T, true>(x, y, p0, p1, a);
}
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void backward_avx2(const raw_t<T>* gy, raw_t<T>* gx, int64_t p0, int64_t p1,
                                                            const AvgPool2d& a) {
  backward_planes<T, true>(gy, gx, p0, p1, a);
}
#endif
template <typename T>
void forward_base(const raw_t<T>* x, raw_t<T>* y, int64_t p0, int64_t p1, const AvgPool2d& a) {
  forward_planes<T, false>(x, y, p0, p1, a);
}
template <typename T>
void backward_base(const raw_t<T>* gy, raw_t<T>* gx, int64_t p0, int64_t p1, const AvgPool2d& a) {
  backward_planes<T, false>(gy, gx, p0, p1, a);
}

AvgPool2d check(at::IntArrayRef input_size, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                bool ceil_mode, bool count_include_pad, c10::optional<int64_t> divisor_override, const char* op) {
  TORCH_CHECK(input_size.size() == 4, op, ": expected a contiguous (N, C, H, W) tensor, got sizes ", input_size);
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have two values each");
  Pool2d q{kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], 1, 1, input_size[2], input_size[3], 0,
           0};
  TORCH_CHECK(q.kH > 0 && q.kW > 0 && q.sH > 0 && q.sW > 0 && q.pH >= 0 && q.pW >= 0, op,
              ": kernel_size and stride must be positive and padding non-negative");
  TORCH_CHECK(2 * q.pH <= q.kH && 2 * q.pW <= q.kW, op, ": pad should be smaller than or equal to half of kernel size");
  TORCH_CHECK(!divisor_override || *divisor_override != 0, op, ": divisor must be not zero");
  q.OH = pooled_size(q.H, q.kH, q.sH, q.pH, 1, ceil_mode);
  q.OW = pooled_size(q.W, q.kW, q.sW, q.pW, 1, ceil_mode);
  TORCH_CHECK(q.OH > 0 && q.OW > 0, op, ": output size is too small for input ", input_size);
  return {q, count_include_pad, divisor_override ? *divisor_override : 0};
}

}  // namespace

at::Tensor avg_pool2d_fwd(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                          c10::optional<int64_t> divisor_override) {
  TORCH_CHECK(x.device().is_cpu(), "avg_pool2d: expected a CPU tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "avg_pool2d: expected a contiguous (N, C, H, W) tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  const AvgPool2d a =
      check(x.sizes(), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, "avg_pool2d");
  at::Tensor y = pooled_empty({x.size(0), x.size(1), a.q.OH, a.q.OW}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto run = FCK_PICK_CLONE(&forward_base<T>, &forward_avx2<T>);
    const auto* src = reinterpret_cast<const raw_t<T>*>(x.data_ptr());
    auto* dst = reinterpret_cast<raw_t<T>*>(y.data_ptr());
    at::parallel_for(0, x.size(0) * x.size(1), plane_grain(a.q),
                     [&](int64_t p0, int64_t p1) { run(src, dst, p0, p1, a); });
  });
  return y;
}

at::Tensor avg_pool2d_bwd(const at::Tensor& grad_output, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                          c10::optional<int64_t> divisor_override) {
  TORCH_CHECK(grad_output.device().is_cpu(), "avg_pool2d backward: expected a CPU tensor");
  const AvgPool2d a = check(input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
                            "avg_pool2d backward");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == input_size[0] && grad_output.size(1) == input_size[1] &&
                  grad_output.size(2) == a.q.OH && grad_output.size(3) == a.q.OW,
              "avg_pool2d backward: grad_output ", grad_output.sizes(), " does not match the forward's output (",
              input_size[0], ", ", input_size[1], ", ", a.q.OH, ", ", a.q.OW, ") for input ", input_size);
  const at::Tensor gy = grad_output.contiguous();
  at::Tensor gx = pooled_empty(input_size, grad_output.options());
  dispatch_float(gy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto run = FCK_PICK_CLONE(&backward_base<T>, &backward_avx2<T>);
    const auto* g = reinterpret_cast<const raw_t<T>*>(gy.data_ptr());
    auto* dst = reinterpret_cast<raw_t<T>*>(gx.data_ptr());
    at::parallel_for(0, input_size[0] * input_size[1], plane_grain(a.q),
                     [&](int64_t p0, int64_t p1) { run(g, dst, p0, p1, a); });
  });
  return gx;
}

}  // namespace cpu
}  // namespace fck
