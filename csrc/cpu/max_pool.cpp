// 2-D max pooling on the CPU for contiguous NCHW input, forward (values and each maximum's position in its plane)
// and backward (each output's gradient added to the input position it came from).
//
// torch's NCHW kernel walks each output's window element by element, testing every position against the edges (a
// ResNet stem's 16x64x112x112 pool takes ~45 ms on two cores, ~1 GB/s). Here each output row is built 8 columns at
// a time: for every window element (kh, kw) one vector load (two and a deinterleave at stride 2) of the input row,
// the running maxima and their indices kept in AVX2 registers across the whole window. Padding, and the overhang of
// ceil_mode's last windows, are -inf borders of a per-plane copy, so no loop tests an edge: -inf never replaces a
// maximum, as torch never visits those positions. The window elements are visited in torch's order (kh, then kw)
// with torch's test (larger, or NaN), so ties go to the first maximum in row-major order and a NaN to the last NaN:
// the same values and the same indices, hence the same gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
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

constexpr int64_t kBlock = 8;  // output columns a block keeps in registers (one AVX2 vector of fp32)

// The first window position torch records for output (oh, ow) before it has seen a value (its first valid row and
// column): the index a window of only -inf reports.
inline int32_t first_index(const Pool2d& q, int64_t oh, int64_t ow) {
  int64_t ih = oh * q.sH - q.pH, iw = ow * q.sW - q.pW;
  while (ih < 0) ih += q.dH;
  while (iw < 0) iw += q.dW;
  return int32_t(ih * q.W + iw);
}

// A plane as the pooling loops read it: `data` (PW values a row) holds input (ih, iw) at (ih + pH, iw + pW), and
// every window of the output lies inside it: padding, and the overhang of ceil_mode's last windows, are -inf,
// which never replaces a maximum (torch skips those positions), so no loop tests an edge.
template <typename A>
struct Padded {
  const A* data;
  int64_t PW;
};

// n <= kBlock output columns from ow0 of output row oh: torch's loop (rows, then columns; a larger value or a NaN
// replaces the maximum), n columns at a time. at: the maximum's position in the input plane, -1 while it has seen
// only -inf (fixed up by the caller). Portable version (fp64, strides above 2, CPUs without AVX2, rows under
// kBlock columns).
template <typename A, bool kIdx>
FCK_HOST_DEVICE void pool_block(Padded<A> in, const Pool2d& q, int64_t oh, int64_t ow0, int64_t n, A* best,
                                int32_t* at) {
  A b[kBlock];
  int32_t a[kBlock];
  for (int64_t j = 0; j < n; ++j) b[j] = -std::numeric_limits<A>::infinity(), a[j] = -1;
  for (int64_t kh = 0; kh < q.kH; ++kh) {
    const int64_t ih = oh * q.sH + kh * q.dH;  // in the padded plane
    for (int64_t kw = 0; kw < q.kW; ++kw) {
      const int64_t iw = ow0 * q.sW + kw * q.dW;
      const A* v = in.data + ih * in.PW + iw;
      const int32_t c = int32_t((ih - q.pH) * q.W + iw - q.pW);
      for (int64_t j = 0; j < n; ++j) {
        const bool take = v[j * q.sW] > b[j] || v[j * q.sW] != v[j * q.sW];
        b[j] = take ? v[j * q.sW] : b[j];
        if (kIdx) a[j] = take ? c + int32_t(j * q.sW) : a[j];
      }
    }
  }
  std::copy(b, b + n, best);
  if (kIdx) std::copy(a, a + n, at);
}

#ifdef FCK_HAVE_AVX2_CLONE
// The fp32 blocks of an output row with AVX2 (OW >= kBlock; the last block overlaps the one before), column stride
// S = 1 or 2 (a stride-2 row is two loads and a deinterleave): each block's maxima and indices stay in registers
// across the window.
template <int S, bool kIdx>
__attribute__((target("avx2,fma,f16c"))) void pool_row_avx2(Padded<float> in, const Pool2d& q, int64_t oh,
                                                             float* best, int32_t* at) {
  const __m256i lanes = _mm256_setr_epi32(0, S, 2 * S, 3 * S, 4 * S, 5 * S, 6 * S, 7 * S);
  for (int64_t ow0 = 0;; ow0 += kBlock) {
    ow0 = std::min(ow0, q.OW - kBlock);
    __m256 b = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256i a = _mm256_set1_epi32(-1);
    for (int64_t kh = 0; kh < q.kH; ++kh) {
      const int64_t ih = oh * q.sH + kh * q.dH;
      for (int64_t kw = 0; kw < q.kW; ++kw) {
        const int64_t iw = ow0 * S + kw * q.dW;
        const float* v = in.data + ih * in.PW + iw;
        __m256 x;
        if (S == 1) {
          x = _mm256_loadu_ps(v);
        } else {  // values 0, 2, ..., 14 from loads at 0 and 7 (never past the last one used)
          const __m256 mixed = _mm256_shuffle_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 7), 0xD8);
          x = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(mixed), 0xD8));
        }
        const __m256 take = _mm256_or_ps(_mm256_cmp_ps(x, b, _CMP_GT_OQ), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        b = _mm256_blendv_ps(b, x, take);
        if (kIdx) {
          const __m256i c = _mm256_add_epi32(_mm256_set1_epi32(int32_t((ih - q.pH) * q.W + iw - q.pW)), lanes);
          a = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c), take));
        }
      }
    }
    _mm256_storeu_ps(best + ow0, b);
    if (kIdx) _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + ow0), a);
    if (ow0 + kBlock >= q.OW) break;
  }
}
#endif

// The body of the forward, for a range of planes; compiled twice (baseline x86-64 and AVX2) by the wrappers below
// (inlined into each, so the AVX2 one vectorizes with AVX2). A plane with padding (or ceil_mode's overhang), and any
// fp16/bf16 plane, is first copied as the accumulation type into a buffer with -inf borders; fp32/fp64 maxima are
// written straight into the output, fp16/bf16 ones through an fp32 row.
template <typename T, bool kIdx, bool kAvx2>
FCK_HOST_DEVICE void forward_planes(const raw_t<T>* x, raw_t<T>* y, int32_t* ind, int64_t p0, int64_t p1,
                                    const Pool2d& q) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same<raw_t<T>, A>::value;
  const int64_t PH = std::max(q.H + 2 * q.pH, (q.OH - 1) * q.sH + (q.kH - 1) * q.dH + 1);
  const int64_t PW = std::max(q.W + 2 * q.pW, (q.OW - 1) * q.sW + (q.kW - 1) * q.dW + 1);
  const bool copy = !kDirect || PH != q.H || PW != q.W;
  std::vector<A> plane_buf(copy ? PH * PW : 0, -std::numeric_limits<A>::infinity());
  std::vector<A> row_buf(kDirect ? 0 : q.OW);
  for (int64_t p = p0; p < p1; ++p) {
    const raw_t<T>* src = x + p * q.H * q.W;
    Padded<A> in{reinterpret_cast<const A*>(src), q.W};
    if (copy) {
      for (int64_t ih = 0; ih < q.H; ++ih) {
        widen<T, kAvx2>(src + ih * q.W, plane_buf.data() + (ih + q.pH) * PW + q.pW, q.W);
      }
      in = {plane_buf.data(), PW};
    }
    for (int64_t oh = 0; oh < q.OH; ++oh) {
      const int64_t o = (p * q.OH + oh) * q.OW;
      A* best = kDirect ? reinterpret_cast<A*>(y + o) : row_buf.data();
      int32_t* at = kIdx ? ind + o : nullptr;
      bool done = false;
#ifdef FCK_HAVE_AVX2_CLONE
      if constexpr (kAvx2 && std::is_same<A, float>::value) {
        if (q.OW >= kBlock && q.sW <= 2) {
          (q.sW == 1 ? &pool_row_avx2<1, kIdx> : &pool_row_avx2<2, kIdx>)(in, q, oh, best, at);
          done = true;
        }
      }
#endif
      for (int64_t ow = 0; !done && ow < q.OW; ow += kBlock) {
        pool_block<A, kIdx>(in, q, oh, ow, std::min(kBlock, q.OW - ow), best + ow, kIdx ? at + ow : nullptr);
      }
      if (kIdx) {
        for (int64_t ow = 0; ow < q.OW; ++ow) {
          if (at[ow] < 0) at[ow] = first_index(q, oh, ow);  // a window of only -inf, or of no input at all
        }
      }
      if (!kDirect) narrow<T, kAvx2>(best, y + o, q.OW);
    }
  }
}

// The backward for a range of planes: the plane's gradient zeroed, then each output's gradient added at its index,
// in output order (the same sums every run). fp16/bf16 add in fp32 and round once. An index at or past the plane's
// end is a window that holds no input (torch's forward reports its first position as if the input went on: a
// dilated window over a one-row input, say): its gradient goes nowhere. A negative index (only a caller of the op
// itself can pass one) is skipped and reported: returns false.
template <typename T>
FCK_HOST_DEVICE bool backward_planes(const raw_t<T>* gy, const int32_t* ind, raw_t<T>* gx, int64_t p0, int64_t p1,
                                     const Pool2d& q) {
  using A = acc_t<T>;
  const int64_t plane = q.H * q.W, outs = q.OH * q.OW;
  std::vector<A> buf(std::is_same<raw_t<T>, A>::value ? 0 : plane);
  bool ok = true;
  for (int64_t p = p0; p < p1; ++p) {
    A* acc = buf.empty() ? reinterpret_cast<A*>(gx + p * plane) : buf.data();
    std::fill(acc, acc + plane, A(0));
    const raw_t<T>* g = gy + p * outs;
    const int32_t* i = ind + p * outs;
    for (int64_t o = 0; o < outs; ++o) {
      if (i[o] < 0) {
        ok = false;
      } else if (i[o] < plane) {
        acc[i[o]] += Storage<T>::load(g[o]);
      }
    }
    if (!buf.empty()) {
      raw_t<T>* dst = gx + p * plane;
      for (int64_t k = 0; k < plane; ++k) dst[k] = Storage<T>::store(acc[k]);
    }
  }
  return ok;
}

#ifdef FCK_HAVE_AVX2_CLONE
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void forward_avx2(const raw_t<T>* x, raw_t<T>* y, int32_t* ind, int64_t p0,
                                                           int64_t p1, const Pool2d& q) {
  if (ind) {
    forward_planes<T, true, true>(x, y, ind, p0, p1, q);
  } else {
    forward_planes<T, false, true>(x, y, ind, p0, p1, q);
  }
}
template <typename T>
__attribute__((target("avx2,fma,f16c"))) bool backward_avx2(const raw_t<T>* gy, const int32_t* ind, raw_t<T>* gx,
                                                            int64_t p0, int64_t p1, const Pool2d& q) {
  return backward_planes<T>(gy, ind, gx, p0, p1, q);
}
#endif
template <typename T>
void forward_base(const raw_t<T>* x, raw_t<T>* y, int32_t* ind, int64_t p0, int64_t p1, const Pool2d& q) {
  if (ind) {
    forward_planes<T, true, false>(x, y, ind, p0, p1, q);
  } else {
    forward_planes<T, false, false>(x, y, ind, p0, p1, q);
  }
}
template <typename T>
bool backward_base(const raw_t<T>* gy, const int32_t* ind, raw_t<T>* gx, int64_t p0, int64_t p1, const Pool2d& q) {
  return backward_planes<T>(gy, ind, gx, p0, p1, q);
}

Pool2d check(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
             at::IntArrayRef dilation, bool ceil_mode, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), op, ": expected a contiguous (N, C, H, W) tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have two values each");
  Pool2d q{kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
           x.size(2), x.size(3), 0, 0};
  TORCH_CHECK(q.kH > 0 && q.kW > 0 && q.sH > 0 && q.sW > 0 && q.dH > 0 && q.dW > 0 && q.pH >= 0 && q.pW >= 0, op,
              ": kernel_size, stride and dilation must be positive and padding non-negative");
  TORCH_CHECK(2 * q.pH <= q.kH && 2 * q.pW <= q.kW, op, ": pad should be at most half of effective kernel size");
  q.OH = pooled_size(q.H, q.kH, q.sH, q.pH, q.dH, ceil_mode);
  q.OW = pooled_size(q.W, q.kW, q.sW, q.pW, q.dW, ceil_mode);
  TORCH_CHECK(q.OH > 0 && q.OW > 0, op, ": output size is too small for input ", x.sizes());
  TORCH_CHECK(q.H * q.W <= std::numeric_limits<int32_t>::max(), op, ": a plane of more than 2^31 values");
  return q;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode, bool save_indices) {
  const Pool2d q = check(x, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d");
  const int64_t planes = x.size(0) * x.size(1);
  at::Tensor y = pooled_empty({x.size(0), x.size(1), q.OH, q.OW}, x.options());
  at::Tensor ind = save_indices ? pooled_empty({x.size(0), x.size(1), q.OH, q.OW}, x.options().dtype(at::kInt))
                                : at::empty({0}, x.options().dtype(at::kInt));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto run = FCK_PICK_CLONE(&forward_base<T>, &forward_avx2<T>);
    const auto* src = reinterpret_cast<const raw_t<T>*>(x.data_ptr());
    auto* dst = reinterpret_cast<raw_t<T>*>(y.data_ptr());
    int32_t* idx = save_indices ? ind.data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, planes, plane_grain(q), [&](int64_t p0, int64_t p1) { run(src, dst, idx, p0, p1, q); });
  });
  return {y, ind};
}

at::Tensor max_pool2d_bwd(const at::Tensor& grad_output, const at::Tensor& indices, at::IntArrayRef input_size) {
  TORCH_CHECK(grad_output.device().is_cpu() && indices.device().is_cpu(), "max_pool2d backward: expected CPU tensors");
  TORCH_CHECK(input_size.size() == 4, "max_pool2d backward: input_size must be (N, C, H, W)");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.sizes() == indices.sizes() && indices.scalar_type() == at::kInt &&
                  grad_output.size(0) == input_size[0] && grad_output.size(1) == input_size[1],
              "max_pool2d backward: grad_output ", grad_output.sizes(), " and int32 indices ", indices.sizes(),
              " must match the forward's output for input ", input_size);
  Pool2d q{};
  q.H = input_size[2], q.W = input_size[3], q.OH = grad_output.size(2), q.OW = grad_output.size(3);
  const at::Tensor gy = grad_output.contiguous(), ind = indices.contiguous();
  at::Tensor gx = pooled_empty(input_size, grad_output.options());
  const int64_t planes = input_size[0] * input_size[1];
  dispatch_float(gy.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto run = FCK_PICK_CLONE(&backward_base<T>, &backward_avx2<T>);
    const auto* g = reinterpret_cast<const raw_t<T>*>(gy.data_ptr());
    auto* dst = reinterpret_cast<raw_t<T>*>(gx.data_ptr());
    const int32_t* idx = ind.data_ptr<int32_t>();
    std::atomic<bool> ok{true};
    at::parallel_for(0, planes, plane_grain(q), [&](int64_t p0, int64_t p1) {
      if (!run(g, idx, dst, p0, p1, q)) ok = false;
    });
    TORCH_CHECK(ok, "max_pool2d backward: negative index (positions in an input plane of ", q.H, " x ", q.W,
                " start at 0)");
  });
  return gx;
}

}  // namespace cpu
}  // namespace fck
