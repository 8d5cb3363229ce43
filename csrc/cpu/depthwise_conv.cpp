// Depthwise 2-D convolution (groups == channels, one filter a channel) on the CPU for contiguous NCHW fp32 input:
// the forward (+ bias, + an activation in the same pass) and, for training, the input and weight gradients.
//
// oneDNN runs NCHW depthwise layers far below memory speed here (MobileNet v2's 3x3 stride-2 layer over
// 16x96x112x112 took 35 ms, a fifth of the whole fused model's inference; the same layer channels-last, 0.8 ms). A
// depthwise convolution is a per-plane stencil, so it takes the average pool's layout (csrc/cpu/avg_pool.cpp): each
// plane copied into a zero-bordered PH x PW block, PW a multiple of the column stride, so that output m of the
// flattened output (rows of M = sH PW / sW values, the first OW of each an output) reads input m sW + i PW + j for
// filter tap (i, j). Each filter row is then one vector loop over the whole plane (stride-2 rows compute, and
// drop, the odd rows' values too: simpler than a loop per row, and the layer is memory-bound anyway).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "fck/cpu_pool.h"
#include "fck/cpu_vec.h"
#include "fck/macros.h"
#include "fck/ops.h"
#include "fck/pool2d.h"

namespace fck {
namespace cpu {
namespace {

// The activations the kernel applies itself (SiLU's exp is left to torch, in place on the output).
enum Act : int64_t { kNone = 0, kReLU = 1, kHardtanh = 2, kLeakyReLU = 3, kHardswish = 4 };

struct Depthwise {
  Pool2d q;   // the window geometry (kernel, stride, padding; dilation 1)
  int64_t C;  // channels: plane p uses filter p % C
  Act act;
  float lo, hi;  // hardtanh's bounds; leaky ReLU's slope in lo
  int64_t PH, PW, M;
};

// h[m] (+)= w[0] v[m S] + w[1] v[m S + 1] + ... + w[KW - 1] v[m S + KW - 1] for m < n: one filter row over the
// flattened plane. KW and S are template constants where they are common (3 and 5 taps, strides 1 and 2), so the
// taps unroll and the loads vectorize; 0: the runtime values.
template <int KW, int S, bool kFirst>
FCK_HOST_DEVICE void filter_row(const float* __restrict v, const float* __restrict w, int64_t n, int64_t kw,
                                int64_t s, float* __restrict h) {
  const int64_t taps = KW ? KW : kw, st = S ? S : s;
  for (int64_t m = 0; m < n; ++m) {
    float acc = kFirst ? 0.0f : h[m];
    for (int64_t j = 0; j < taps; ++j) acc += w[j] * v[m * st + j];
    h[m] = acc;
  }
}

template <int KW, int S>
FCK_HOST_DEVICE void filter_rows(const float* pad, const float* w, const Depthwise& d, float* h) {
  const int64_t n = d.q.OH * d.M;
  for (int64_t i = 0; i < d.q.kH; ++i) {
    const float* v = pad + i * d.PW;
    const float* wi = w + i * d.q.kW;
    if (i == 0) {
      filter_row<KW, S, true>(v, wi, n, d.q.kW, d.q.sW, h);
    } else {
      filter_row<KW, S, false>(v, wi, n, d.q.kW, d.q.sW, h);
    }
  }
}

template <int KW>
FCK_HOST_DEVICE void filter_rows_strided(const float* pad, const float* w, const Depthwise& d, float* h) {
  if (d.q.sW == 1) {
    filter_rows<KW, 1>(pad, w, d, h);
  } else if (d.q.sW == 2) {
    filter_rows<KW, 2>(pad, w, d, h);
  } else {
    filter_rows<KW, 0>(pad, w, d, h);
  }
}

// out[i] = act(h[i] + b) for a row.
FCK_HOST_DEVICE void finish_row(const float* __restrict h, float b, const Depthwise& d, int64_t n,
                                float* __restrict out) {
  switch (d.act) {
    case kReLU:
      for (int64_t i = 0; i < n; ++i) out[i] = std::max(h[i] + b, 0.0f);
      break;
    case kHardtanh:
      for (int64_t i = 0; i < n; ++i) out[i] = std::min(std::max(h[i] + b, d.lo), d.hi);
      break;
    case kLeakyReLU:
      for (int64_t i = 0; i < n; ++i) {
        const float y = h[i] + b;
        out[i] = y > 0.0f ? y : y * d.lo;
      }
      break;
    case kHardswish:  // torch's: x * min(max(x + 3, 0), 6) / 6
      for (int64_t i = 0; i < n; ++i) {
        const float y = h[i] + b;
        out[i] = y * std::min(std::max(y + 3.0f, 0.0f), 6.0f) / 6.0f;
      }
      break;
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = h[i] + b;
  }
}

// Planes [p0, p1); compiled twice (baseline x86-64 and AVX2) by the wrappers below.
FCK_HOST_DEVICE void depthwise_planes(const float* x, const float* w, const float* bias, float* y, int64_t p0,
                                      int64_t p1, const Depthwise& d) {
  const Pool2d& q = d.q;
  // The last virtual row's sums (the dropped ones past OW, and with sH > 1 the dropped rows') read up to sH - 1
  // rows and kW values past the copy: zeros, never written
  std::vector<float> pad((d.PH + q.sH) * d.PW + q.kW, 0.0f), h(q.OH * d.M);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % d.C;
    const float* plane = x + p * q.H * q.W;
    for (int64_t ih = 0; ih < q.H; ++ih) {
      std::copy(plane + ih * q.W, plane + (ih + 1) * q.W, pad.data() + (ih + q.pH) * d.PW + q.pW);
    }
    const float* wc = w + c * q.kH * q.kW;
    if (q.kW == 3) {
      filter_rows_strided<3>(pad.data(), wc, d, h.data());
    } else if (q.kW == 5) {
      filter_rows_strided<5>(pad.data(), wc, d, h.data());
    } else {
      filter_rows_strided<0>(pad.data(), wc, d, h.data());
    }
    const float b = bias ? bias[c] : 0.0f;
    for (int64_t oh = 0; oh < q.OH; ++oh) {
      finish_row(h.data() + oh * d.M, b, d, q.OW, y + (p * q.OH + oh) * q.OW);
    }
  }
}

// The weight gradient's taps of one filter row for one plane: acc[j] += sum over m of g[m] v[m S + j], j < KW, g
// the plane's output gradient in the flattened layout (zeros where no output is). Sums run in 8 lanes (a float sum
// the compiler may not reorder would not vectorize) and are added to acc once a plane.
template <int KW, int S>
FCK_HOST_DEVICE void tap_sums(const float* __restrict g, const float* __restrict v, int64_t n, int64_t kw,
                              int64_t s, double* acc) {
  const int64_t taps = KW ? KW : kw, st = S ? S : s;
  for (int64_t j = 0; j < taps; ++j) {
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t m = 0;
    for (; m + 8 <= n; m += 8) {
      for (int64_t l = 0; l < 8; ++l) lanes[l] += g[m + l] * v[(m + l) * st + j];
    }
    for (; m < n; ++m) lanes[m % 8] += g[m] * v[m * st + j];
    double total = 0;
    for (int64_t l = 0; l < 8; ++l) total += lanes[l];
    acc[j] += total;
  }
}

template <int KW>
FCK_HOST_DEVICE void tap_sums_strided(const float* g, const float* v, int64_t n, const Depthwise& d, double* acc) {
  if (d.q.sW == 1) {
    tap_sums<KW, 1>(g, v, n, d.q.kW, 1, acc);
  } else if (d.q.sW == 2) {
    tap_sums<KW, 2>(g, v, n, d.q.kW, 2, acc);
  } else {
    tap_sums<KW, 0>(g, v, n, d.q.kW, d.q.sW, acc);
  }
}

// The weight gradient of channels [c0, c1): for each channel, every image's plane and output-gradient plane in the
// flattened layout, each filter tap's sum of products, summed over the images in double. A thread owns whole
// channels, so nothing is reduced across threads and the bits do not depend on the thread count.
FCK_HOST_DEVICE void weight_grad_channels(const float* x, const float* gy, double* gw, int64_t N, int64_t c0,
                                          int64_t c1, const Depthwise& d) {
  const Pool2d& q = d.q;
  std::vector<float> pad((d.PH + q.sH) * d.PW + q.kW, 0.0f), g(q.OH * d.M, 0.0f);  // borders and junk stay 0
  const int64_t n = q.OH * d.M;
  for (int64_t c = c0; c < c1; ++c) {
    double* acc = gw + c * q.kH * q.kW;
    for (int64_t b = 0; b < N; ++b) {
      const int64_t p = b * d.C + c;
      const float* plane = x + p * q.H * q.W;
      for (int64_t ih = 0; ih < q.H; ++ih) {
        std::copy(plane + ih * q.W, plane + (ih + 1) * q.W, pad.data() + (ih + q.pH) * d.PW + q.pW);
      }
      const float* gp = gy + p * q.OH * q.OW;
      for (int64_t oh = 0; oh < q.OH; ++oh) std::copy(gp + oh * q.OW, gp + (oh + 1) * q.OW, g.data() + oh * d.M);
      for (int64_t i = 0; i < q.kH; ++i) {
        const float* v = pad.data() + i * d.PW;
        if (q.kW == 3) {
          tap_sums_strided<3>(g.data(), v, n, d, acc + i * q.kW);
        } else if (q.kW == 5) {
          tap_sums_strided<5>(g.data(), v, n, d, acc + i * q.kW);
        } else {
          tap_sums_strided<0>(g.data(), v, n, d, acc + i * q.kW);
        }
      }
    }
  }
}

// The input gradient of planes [p0, p1): the forward transposed. Output m's gradient times tap (i, j) goes to
// position m sW + i PW + j of the plane's layout; with the layout kept as sW interleaved phases (position q in
// phase q mod sW at q / sW; PW is a multiple of sW, so tap (i, j) always lands in phase j mod sW), every tap is one
// contiguous vector loop at any stride. The inside of the layout is the input's gradient.
FCK_HOST_DEVICE void input_grad_planes(const float* gy, const float* w, float* gx, int64_t p0, int64_t p1,
                                       const Depthwise& d) {
  const Pool2d& q = d.q;
  const int64_t S = q.sW, n = q.OH * d.M;
  const int64_t len = ((d.PH + q.sH) * d.PW + q.kW) / S + 1;  // a phase's length, with the forward's slack
  std::vector<float> g(n, 0.0f), phases(S * len);  // g's junk (past OW, the dropped rows) stays 0
  for (int64_t p = p0; p < p1; ++p) {
    const float* gp = gy + p * q.OH * q.OW;
    for (int64_t oh = 0; oh < q.OH; ++oh) std::copy(gp + oh * q.OW, gp + (oh + 1) * q.OW, g.data() + oh * d.M);
    std::fill(phases.begin(), phases.end(), 0.0f);
    const float* wc = w + (p % d.C) * q.kH * q.kW;
    for (int64_t i = 0; i < q.kH; ++i) {
      for (int64_t j = 0; j < q.kW; ++j) {
        const int64_t at = i * d.PW + j;
        float* dst = phases.data() + (at % S) * len + at / S;
        const float wij = wc[i * q.kW + j];
        for (int64_t m = 0; m < n; ++m) dst[m] += wij * g[m];
      }
    }
    float* plane = gx + p * q.H * q.W;
    for (int64_t ih = 0; ih < q.H; ++ih) {
      const int64_t row = (ih + q.pH) * d.PW + q.pW;
      float* dst = plane + ih * q.W;
      if (S == 1) {
        std::copy(phases.data() + row, phases.data() + row + q.W, dst);
      } else if (S == 2) {  // the two phases interleaved, pairs at a time (the compiler vectorizes the pairs)
        const float* even = phases.data() + (row + 1) / 2;
        const float* odd = phases.data() + len + row / 2;
        int64_t iw = 0;
        if (row % 2) dst[iw++] = *odd++;
        for (; iw + 2 <= q.W; iw += 2, ++even, ++odd) dst[iw] = *even, dst[iw + 1] = *odd;
        if (iw < q.W) dst[iw] = *even;
      } else {  // phase and index stepped along the row: no division per value
        int64_t ph = row % S, ix = row / S;
        for (int64_t iw = 0; iw < q.W; ++iw) {
          dst[iw] = phases[ph * len + ix];
          if (++ph == S) ph = 0, ++ix;
        }
      }
    }
  }
}

#ifdef FCK_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma,f16c"))) void input_grad_avx2(const float* gy, const float* w, float* gx, int64_t p0,
                                                              int64_t p1, const Depthwise& d) {
  input_grad_planes(gy, w, gx, p0, p1, d);
}
#endif
void input_grad_base(const float* gy, const float* w, float* gx, int64_t p0, int64_t p1, const Depthwise& d) {
  input_grad_planes(gy, w, gx, p0, p1, d);
}

#ifdef FCK_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma,f16c"))) void weight_grad_avx2(const float* x, const float* gy, double* gw, int64_t N,
                                                               int64_t c0, int64_t c1, const Depthwise& d) {
  weight_grad_channels(x, gy, gw, N, c0, c1, d);
}
#endif
void weight_grad_base(const float* x, const float* gy, double* gw, int64_t N, int64_t c0, int64_t c1,
                      const Depthwise& d) {
  weight_grad_channels(x, gy, gw, N, c0, c1, d);
}

#ifdef FCK_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma,f16c"))) void depthwise_avx2(const float* x, const float* w, const float* bias,
                                                             float* y, int64_t p0, int64_t p1, const Depthwise& d) {
  depthwise_planes(x, w, bias, y, p0, p1, d);
}
#endif
void depthwise_base(const float* x, const float* w, const float* bias, float* y, int64_t p0, int64_t p1,
                    const Depthwise& d) {
  depthwise_planes(x, w, bias, y, p0, p1, d);
}

// The layout of x's planes for a kH x kW filter (see the file's comment).
Depthwise geometry(at::IntArrayRef x, int64_t kH, int64_t kW, at::IntArrayRef stride, at::IntArrayRef padding,
                   const char* op) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              op, ": stride must be positive and padding non-negative, two values each");
  Pool2d q{kH, kW, stride[0], stride[1], padding[0], padding[1], 1, 1, x[2], x[3], 0, 0};
  TORCH_CHECK(q.kH > 0 && q.kW > 0, op, ": empty filter");
  q.OH = pooled_size(q.H, q.kH, q.sH, q.pH, 1, false);
  q.OW = pooled_size(q.W, q.kW, q.sW, q.pW, 1, false);
  TORCH_CHECK(q.OH > 0 && q.OW > 0, op, ": output size is too small for input ", x);
  Depthwise d{q, x[1], kNone, 0.0f, 0.0f, 0, 0, 0};
  d.PH = std::max(q.H + 2 * q.pH, (q.OH - 1) * q.sH + q.kH);
  d.PW = std::max(q.W + 2 * q.pW, (q.OW - 1) * q.sW + q.kW);
  d.PW = (d.PW + q.sW - 1) / q.sW * q.sW;
  d.M = q.sH * d.PW / q.sW;
  return d;
}

}  // namespace

at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t act,
                            at::ArrayRef<double> scalars) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "depthwise_conv2d: expected CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "depthwise_conv2d: expected float32 tensors");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "depthwise_conv2d: expected a contiguous (N, C, H, W) input, got ",
              x.sizes(), " and strides ", x.strides());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.is_contiguous(),
              "depthwise_conv2d: expected a contiguous (", C, ", 1, kH, kW) weight, got ", weight.sizes());
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == C &&
                        bias->is_contiguous() && bias->device().is_cpu()),
              "depthwise_conv2d: expected a contiguous float32 bias of ", C, " values");
  TORCH_CHECK(act >= kNone && act <= kHardswish, "depthwise_conv2d: unknown activation ", act);
  TORCH_CHECK((act != kHardtanh || scalars.size() == 2) && (act != kLeakyReLU || scalars.size() == 1),
              "depthwise_conv2d: hardtanh takes (min, max), leaky ReLU its slope");
  Depthwise d = geometry(x.sizes(), weight.size(2), weight.size(3), stride, padding, "depthwise_conv2d");
  d.act = Act(act);
  if (act == kHardtanh) d.lo = float(scalars[0]), d.hi = float(scalars[1]);
  if (act == kLeakyReLU) d.lo = float(scalars[0]);
  const Pool2d& q = d.q;
  at::Tensor y = pooled_empty({x.size(0), C, q.OH, q.OW}, x.options());
  const auto run = FCK_PICK_CLONE(&depthwise_base, &depthwise_avx2);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.size(0) * C, plane_grain(q), [&](int64_t p0, int64_t p1) { run(xp, wp, bp, yp, p0, p1, d); });
  return y;
}

at::Tensor depthwise_conv2d_weight_grad(const at::Tensor& x, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "depthwise_conv2d_weight_grad";
  TORCH_CHECK(x.device().is_cpu() && grad_output.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad_output.scalar_type() == at::kFloat, op,
              ": expected float32 tensors");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && grad_output.dim() == 4 && grad_output.is_contiguous(), op,
              ": expected contiguous (N, C, H, W) tensors");
  TORCH_CHECK(kernel_size.size() == 2, op, ": kernel_size must have two values");
  const Depthwise d = geometry(x.sizes(), kernel_size[0], kernel_size[1], stride, padding, op);
  TORCH_CHECK(grad_output.size(0) == x.size(0) && grad_output.size(1) == d.C && grad_output.size(2) == d.q.OH &&
                  grad_output.size(3) == d.q.OW,
              op, ": grad_output ", grad_output.sizes(), " does not match the forward's output (", x.size(0), ", ",
              d.C, ", ", d.q.OH, ", ", d.q.OW, ")");
  at::Tensor gw = at::zeros({d.C, 1, d.q.kH, d.q.kW}, x.options().dtype(at::kDouble));
  const auto run = FCK_PICK_CLONE(&weight_grad_base, &weight_grad_avx2);
  const float* xp = x.data_ptr<float>();
  const float* gp = grad_output.data_ptr<float>();
  double* wp = gw.data_ptr<double>();
  const int64_t N = x.size(0);
  const int64_t grain = std::max<int64_t>(1, plane_grain(d.q) / std::max<int64_t>(1, N));
  at::parallel_for(0, d.C, grain, [&](int64_t c0, int64_t c1) { run(xp, gp, wp, N, c0, c1, d); });
  return gw.to(at::kFloat);
}

at::Tensor depthwise_conv2d_input_grad(const at::Tensor& grad_output, const at::Tensor& weight,
                                      at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "depthwise_conv2d_input_grad";
  TORCH_CHECK(grad_output.device().is_cpu() && weight.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": expected float32 tensors");
  TORCH_CHECK(input_size.size() == 4 && grad_output.dim() == 4 && grad_output.is_contiguous(), op,
              ": expected a contiguous (N, C, OH, OW) grad_output and an (N, C, H, W) input_size");
  const int64_t C = input_size[1];
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.is_contiguous(), op,
              ": expected a contiguous (", C, ", 1, kH, kW) weight, got ", weight.sizes());
  const Depthwise d = geometry(input_size, weight.size(2), weight.size(3), stride, padding, op);
  TORCH_CHECK(grad_output.size(0) == input_size[0] && grad_output.size(1) == C && grad_output.size(2) == d.q.OH &&
                  grad_output.size(3) == d.q.OW,
              op, ": grad_output ", grad_output.sizes(), " does not match the forward's output for input ",
              input_size);
  at::Tensor gx = pooled_empty(input_size, grad_output.options());
  const auto run = FCK_PICK_CLONE(&input_grad_base, &input_grad_avx2);
  const float* gp = grad_output.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* xp = gx.data_ptr<float>();
  at::parallel_for(0, input_size[0] * C, plane_grain(d.q), [&](int64_t p0, int64_t p1) { run(gp, wp, xp, p0, p1, d); });
  return gx;
}

}  // namespace cpu
}  // namespace fck
