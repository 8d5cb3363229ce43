// conv2d(x, w, b, stride 1, padding p) for 3x3 kernels, ReLU optional, by Winograd's minimal filtering
// F(m x m, 3 x 3) (Lavin & Gray 2016): conv-BN-ReLU's CPU path, eval (the folded convolution with its ReLU) and
// training (the convolution; its input gradient, itself a 3x3 convolution with the flipped, transposed filters; and
// its weight gradient, a sum over the tiles in the transformed domain: wgrad_chunk below).
//
// Why: oneDNN's direct convolution already runs near this CPU's FMA peak (ResNet-34's 3x3 layers at N = 64), so
// beating it takes fewer multiplies, not a better schedule. Each m x m output tile costs (m + 2)^2 products per
// (input, output) channel pair instead of 9 m^2: 2.25x fewer for m = 2, 4x for m = 4.
//
// Layout of the work, per chunk of T tiles on one thread (everything a chunk touches stays in L2/L3):
//   1. input transform: V[xi][t][c] = (B^T d B)[xi], d the tile's (m+2)^2 window, 8 channels per vector;
//   2. (m+2)^2 GEMMs M[xi] (T x K) = V[xi] (T x C) @ U[xi] (C x K) on panel_gemm.h's register-tiled kernel, with
//      U = G g G^T packed once per folded weight (winograd_weight);
//   3. output transform Y = A^T M A, plus bias, ReLU, written straight into the output (NCHW or channels_last).
// The input is first copied into a zero-padded, 8-channel-interleaved layout (N, C/8, Hp, Wp, 8), so step 1 reads
// whole aligned vectors with no bounds checks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fck/cpu_pool.h"
#include "fck/cpu_vec.h"
#include "panel_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace fck {
namespace cpu {

#ifdef FCK_HAVE_PANEL_GEMM
namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// The transform matrices (points 0, +-1, +-2 and infinity for m = 4). d is the input window, g the 3x3 filter.
template <int M>
struct Wino;
template <>
struct Wino<2> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  static constexpr float Am[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};  // AT's transpose
};
template <>
struct Wino<4> {
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr double G[6][3] = {{1. / 4, 0, 0},           {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                                     {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
  static constexpr float Am[6][4] = {{1, 0, 0, 0}, {1, 1, 1, 1}, {1, -1, 1, -1},
                                     {1, 2, 4, 8}, {1, -2, 4, -8}, {0, 0, 0, 1}};  // AT's transpose
};

// sum_k mat[i][k] * in[k * stride], with the zero and unit coefficients skipped: once the callers' loops are
// unrolled, i and k are constants and so is every branch here.
template <int R, int K>
__attribute__((target("avx2,fma"), always_inline)) inline v8 row_dot(const float (&mat)[R][K], int i, const v8* in,
                                                                      int stride) {
  v8 acc = {};
  bool first = true;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const float c = mat[i][k];
    if (c == 0.f) continue;
    const v8 v = in[k * stride];
    const v8 term = c == 1.f ? v : c == -1.f ? -v : v * c;
    acc = first ? term : acc + term;
    first = false;
  }
  return acc;
}

// out (R x R) = mat in mat^T for in (K x K), one vector of 8 channels per element.
template <int R, int K>
__attribute__((target("avx2,fma"), always_inline)) inline void sandwich(const float (&mat)[R][K], const v8* in,
                                                                         v8* out) {
  v8 tmp[R][K];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) tmp[i][j] = row_dot(mat, i, in + j, K);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) out[i * R + j] = row_dot(mat, j, &tmp[i][0], 1);
}

struct Geometry {
  int64_t N, C, H, W, K, ph, pw, OH, OW, th, tw, Cp, Kp, Hp, Wp;
  bool nhwc;  // input and output channels_last (N, H, W, C in memory), else NCHW
};

// x (N, C, H, W), NCHW or channels_last in memory -> xb (N, Cp/8, Hp, Wp, 8), zero outside the image and for
// channels >= C. From channels_last a pixel's 8 channels are already contiguous.
void interleave_padded(const float* x, float* xb, const Geometry& g) {
  const int64_t CB = g.Cp / kLanes;
  at::parallel_for(0, g.N * CB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / CB, c0 = (b % CB) * kLanes, lanes = std::min<int64_t>(kLanes, g.C - c0);
      float* dst = xb + b * g.Hp * g.Wp * kLanes;
      if (lanes <= 0) {  // a block of padding channels only (the weight gradient pads its K to 16)
        std::fill(dst, dst + g.Hp * g.Wp * kLanes, 0.f);
        continue;
      }
      for (int64_t yp = 0; yp < g.Hp; ++yp) {
        float* row = dst + yp * g.Wp * kLanes;
        const int64_t y = yp - g.ph;
        if (y < 0 || y >= g.H) {
          std::fill(row, row + g.Wp * kLanes, 0.f);
          continue;
        }
        const int64_t x0 = std::min(g.pw, g.Wp), x1 = std::min(g.pw + g.W, g.Wp);
        std::fill(row, row + x0 * kLanes, 0.f);
        std::fill(row + x1 * kLanes, row + g.Wp * kLanes, 0.f);
        if (g.nhwc) {
          const float* src = x + ((n * g.H + y) * g.W + (x0 - g.pw)) * g.C + c0;
          for (int64_t xp = x0; xp < x1; ++xp, src += g.C) {
            std::copy(src, src + lanes, row + xp * kLanes);
            std::fill(row + xp * kLanes + lanes, row + (xp + 1) * kLanes, 0.f);
          }
          continue;
        }
        const float* src[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) src[l] = x + ((n * g.C + c0 + std::min(l, lanes - 1)) * g.H + y) * g.W;
        if (lanes == kLanes) {
          for (int64_t xp = x0; xp < x1; ++xp)
            for (int64_t l = 0; l < kLanes; ++l) row[xp * kLanes + l] = src[l][xp - g.pw];
        } else {
          for (int64_t xp = x0; xp < x1; ++xp)
            for (int64_t l = 0; l < kLanes; ++l) row[xp * kLanes + l] = l < lanes ? src[l][xp - g.pw] : 0.f;
        }
      }
    }
  });
}

// One output tile's m x m values (bias and ReLU applied) for 8 channels, res[e] holding position e = row * m + col:
// stored as m-float rows per channel. A full tile of 8 channels is transposed in registers (4x4 blocks within each
// 128-bit half, or pair interleaves for m = 2), so each row goes out as one 16- or 8-byte store instead of m scalars.
template <int M>
__attribute__((target("avx2,fma"), always_inline)) inline void store_tile(const v8* res, float* out, int64_t plane,
                                                                          int64_t OW, int64_t lanes, int64_t rows,
                                                                          int64_t cols) {
  if (lanes == kLanes && rows == M && cols == M) {
    for (int r = 0; r < M; ++r) {
      float* o = out + r * OW;
      if constexpr (M == 4) {
        const __m256 a = __m256(res[r * 4]), b = __m256(res[r * 4 + 1]), c = __m256(res[r * 4 + 2]),
                     d = __m256(res[r * 4 + 3]);
        const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b), t2 = _mm256_unpacklo_ps(c, d),
                     t3 = _mm256_unpackhi_ps(c, d);
        const __m256 q[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
        for (int l = 0; l < 4; ++l) {
          _mm_storeu_ps(o + l * plane, _mm256_castps256_ps128(q[l]));
          _mm_storeu_ps(o + (l + 4) * plane, _mm256_extractf128_ps(q[l], 1));
        }
      } else {
        const __m256 a = __m256(res[r * 2]), b = __m256(res[r * 2 + 1]);
        const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // (a0 b0 a1 b1 | a4 b4 a5 b5)
        const __m128 q[4] = {_mm256_castps256_ps128(lo), _mm256_castps256_ps128(hi), _mm256_extractf128_ps(lo, 1),
                             _mm256_extractf128_ps(hi, 1)};
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < 2; ++j) {
            _mm_storel_pi(reinterpret_cast<__m64*>(o + (4 * h + 2 * j) * plane), q[2 * h + j]);
            _mm_storeh_pi(reinterpret_cast<__m64*>(o + (4 * h + 2 * j + 1) * plane), q[2 * h + j]);
          }
      }
    }
    return;
  }
  alignas(32) float buf[M * M][kLanes];
  for (int e = 0; e < M * M; ++e) *reinterpret_cast<v8*>(buf[e]) = res[e];
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[l * plane + r * OW + c] = buf[r * M + c][l];
}

// V = B^T d B of one tile (image n, tile row ty, column tx) for every input channel, 8 to a vector: V[xi] at
// v + xi * xi_stride (the chunk's Vs[xi][t][c] layout, shared by the forward and the weight gradient).
template <int M>
__attribute__((target("avx2,fma"), always_inline)) inline void input_transform(const float* xb, const Geometry& g,
                                                                               int64_t n, int64_t ty, int64_t tx,
                                                                               float* v, int64_t xi_stride) {
  constexpr int A = Wino<M>::A, AA = A * A;
  const int64_t CB = g.Cp / kLanes;
  for (int64_t cb = 0; cb < CB; ++cb) {
    const v8* d = reinterpret_cast<const v8*>(xb + (((n * CB + cb) * g.Hp + ty * M) * g.Wp + tx * M) * kLanes);
    v8 win[AA], tv[AA];
#pragma GCC unroll 8
    for (int r = 0; r < A; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < A; ++c) win[r * A + c] = d[r * g.Wp + c];
    sandwich(Wino<M>::BT, win, tv);
#pragma GCC unroll 36
    for (int xi = 0; xi < AA; ++xi) *reinterpret_cast<v8*>(v + xi * xi_stride + cb * kLanes) = tv[xi];
  }
}

// Tiles [t0, t0 + nt) through the three steps; Vs and Ms are the thread's scratch (A^2 T Cp and A^2 T KB floats).
// relu: max(y, 0) after the bias (NaN stays NaN, as torch.relu's).
template <int M>
__attribute__((target("avx2,fma"))) void conv_chunk(const float* xb, const float* u, const float* bias, float* out,
                                                    const Geometry& g, int64_t T, int64_t KB, int64_t t0, int64_t nt,
                                                    float* Vs, float* Ms, bool relu) {
  constexpr int A = Wino<M>::A, AA = A * A;
  const int64_t panels = g.Kp / panel::kNR;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (g.th * g.tw), ty = t / g.tw % g.th, tx = t % g.tw;
    input_transform<M>(xb, g, n, ty, tx, Vs + i * g.Cp, T * g.Cp);
  }
  // Output channels in blocks of KB, so the GEMMs' results for a block (A^2 T KB floats) stay in cache until the
  // output transform reads them.
  for (int64_t kb0 = 0; kb0 < g.Kp; kb0 += KB) {
    const int64_t kbn = std::min(KB, g.Kp - kb0);
    for (int xi = 0; xi < AA; ++xi) {
      panel::gemm_panels(nt, Vs + xi * T * g.Cp, g.Cp, u + (xi * panels + kb0 / panel::kNR) * g.Cp * panel::kNR, kbn,
                         g.Cp, Ms + xi * T * KB, KB, 0, kbn / panel::kNR);
    }
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t t = t0 + i, n = t / (g.th * g.tw), ty = t / g.tw % g.th, tx = t % g.tw;
      const int64_t rows = std::min<int64_t>(M, g.OH - ty * M), cols = std::min<int64_t>(M, g.OW - tx * M);
      for (int64_t k0 = kb0; k0 < std::min(kb0 + kbn, g.K); k0 += kLanes) {
        v8 m[AA], y[M * M];
#pragma GCC unroll 36
        for (int xi = 0; xi < AA; ++xi) m[xi] = *reinterpret_cast<const v8*>(Ms + (xi * T + i) * KB + (k0 - kb0));
        sandwich(Wino<M>::AT, m, y);
        const v8 b = *reinterpret_cast<const v8*>(bias + k0), zero = {};
#pragma GCC unroll 16
        for (int e = 0; e < M * M; ++e) {
          const v8 r = y[e] + b;
          y[e] = relu ? (r < zero ? zero : r) : r;
        }
        const int64_t lanes = std::min<int64_t>(kLanes, g.K - k0);
        if (!g.nhwc) {
          store_tile<M>(y, out + ((n * g.K + k0) * g.OH + ty * M) * g.OW + tx * M, g.OH * g.OW, g.OW, lanes, rows,
                        cols);
          continue;
        }
        for (int64_t r = 0; r < rows; ++r) {  // channels_last: each output pixel's 8 channels are contiguous
          float* o = out + ((n * g.OH + ty * M + r) * g.OW + tx * M) * g.K + k0;
          for (int64_t c = 0; c < cols; ++c, o += g.K) {
            if (lanes == kLanes) {
              _mm256_storeu_ps(o, __m256(y[r * M + c]));
            } else {
              alignas(32) float buf[kLanes];
              *reinterpret_cast<v8*>(buf) = y[r * M + c];
              std::copy(buf, buf + lanes, o);
            }
          }
        }
      }
    }
  }
}

// The weight gradient, one chunk of T tiles: dU[xi] (Cp x Kp) += V[xi]^T dM[xi], with V = B^T d B the forward's
// input transform and dM = A dY A^T the output gradient's tile taken back through the output transform. V keeps the
// forward's layout (Vs[xi][t][c]), which the GEMM reads as its transposed left operand (rows: input channels,
// depth: tiles); dM goes straight into the panel layout the GEMM reads (dMs[xi][panel][t][16]).
template <int M>
__attribute__((target("avx2,fma"))) void wgrad_chunk(const float* xb, const float* gb, const Geometry& g,
                                                     const Geometry& gg, int64_t T, int64_t t0, int64_t nt,
                                                     float* Vs, float* dMs, float* dU, bool accumulate) {
  constexpr int A = Wino<M>::A, AA = A * A;
  const int64_t KB = g.Kp / kLanes, P = g.Kp / panel::kNR;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (g.th * g.tw), ty = t / g.tw % g.th, tx = t % g.tw;
    input_transform<M>(xb, g, n, ty, tx, Vs + i * g.Cp, T * g.Cp);
    for (int64_t kb = 0; kb < KB; ++kb) {
      const v8* d = reinterpret_cast<const v8*>(gb + (((n * KB + kb) * gg.Hp + ty * M) * gg.Wp + tx * M) * kLanes);
      v8 dy[M * M], dm[AA];
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < M; ++c) dy[r * M + c] = d[r * gg.Wp + c];
      sandwich(Wino<M>::Am, dy, dm);
      const int64_t k0 = kb * kLanes;
#pragma GCC unroll 36
      for (int xi = 0; xi < AA; ++xi) {
        *reinterpret_cast<v8*>(dMs + ((xi * P + k0 / panel::kNR) * T + i) * panel::kNR + k0 % panel::kNR) = dm[xi];
      }
    }
  }
  // The GEMMs' depth is the chunk's T tiles (the panel layout's stride): tiles past nt are zero on both sides.
  if (nt < T) {
    for (int64_t r = 0; r < AA; ++r) std::fill(Vs + (r * T + nt) * g.Cp, Vs + (r + 1) * T * g.Cp, 0.f);
    for (int64_t r = 0; r < AA * P; ++r) {
      std::fill(dMs + (r * T + nt) * panel::kNR, dMs + (r + 1) * T * panel::kNR, 0.f);
    }
  }
  for (int xi = 0; xi < AA; ++xi) {
    panel::gemm_panels(g.Cp, Vs + xi * T * g.Cp, g.Cp, dMs + xi * P * T * panel::kNR, g.Kp, T, dU + xi * g.Cp * g.Kp,
                       g.Kp, 0, P, accumulate, /*a_transposed=*/true);
  }
}

template <int M>
void conv_tiles(const float* xb, const float* u, const float* bias, float* out, const Geometry& g, int64_t T,
                int64_t KB, bool relu) {
  constexpr int AA = Wino<M>::A * Wino<M>::A;
  const int64_t tiles = g.N * g.th * g.tw, chunks = (tiles + T - 1) / T;
  at::parallel_for(0, chunks, 1, [&](int64_t ch0, int64_t ch1) {
    at::Tensor scratch = pooled_empty({AA * T * (g.Cp + KB)}, at::TensorOptions(at::kFloat));
    float* Vs = scratch.data_ptr<float>();
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      conv_chunk<M>(xb, u, bias, out, g, T, KB, ch * T, std::min(T, tiles - ch * T), Vs, Vs + AA * T * g.Cp, relu);
    }
  });
}

// U = G g G^T for the 16 filters of one output-channel panel and every input channel, 16 filters to a vector (float
// arithmetic: training transforms the weight every step, ~1 ms at 512 x 512 channels). `transposed`: the filters of
// the input gradient's convolution, g'[k][c] = flip(g[c][k]) of a (C, K, 3, 3) weight.
template <int M>
__attribute__((target("avx2,fma"))) void pack_panel(const float* w, int64_t K, int64_t C, bool transposed, int64_t Cp,
                                                    int64_t panels, int64_t p, float* dst) {
  constexpr int A = Wino<M>::A;
  constexpr int L = panel::kNR;
  float G[A][3];
  for (int i = 0; i < A; ++i)
    for (int j = 0; j < 3; ++j) G[i][j] = float(Wino<M>::G[i][j]);
  for (int64_t c = 0; c < Cp; ++c) {
    alignas(64) float f[9][L], gf[A][3][L];
    for (int l = 0; l < L; ++l) {
      const int64_t k = p * L + l;
      for (int e = 0; e < 9; ++e) {
        f[e][l] = k >= K || c >= C ? 0.f : transposed ? w[(c * K + k) * 9 + 8 - e] : w[(k * C + c) * 9 + e];
      }
    }
    for (int i = 0; i < A; ++i)
      for (int j = 0; j < 3; ++j)
        for (int l = 0; l < L; ++l) gf[i][j][l] = G[i][0] * f[j][l] + G[i][1] * f[3 + j][l] + G[i][2] * f[6 + j][l];
    for (int i = 0; i < A; ++i)
      for (int j = 0; j < A; ++j) {
        float* d = dst + (((i * A + j) * panels + p) * Cp + c) * L;
        for (int l = 0; l < L; ++l) d[l] = gf[i][0][l] * G[j][0] + gf[i][1][l] * G[j][1] + gf[i][2][l] * G[j][2];
      }
  }
}

template <int M>
at::Tensor pack_weight(const at::Tensor& w, bool transposed) {
  constexpr int AA = Wino<M>::A * Wino<M>::A;
  const at::Tensor wc = w.contiguous();
  const int64_t K = transposed ? w.size(1) : w.size(0), C = transposed ? w.size(0) : w.size(1);
  const int64_t Cp = (C + kLanes - 1) / kLanes * kLanes, panels = panel::panels(K);
  at::Tensor u = pooled_empty({AA, panels, Cp, panel::kNR}, w.options());  // 38 MB at 512 x 512: warm pages
  const float* src = wc.data_ptr<float>();
  float* dst = u.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel<M>(src, K, C, transposed, Cp, panels, p, dst);
  });
  return u;
}

}  // namespace
#endif

bool winograd_available() {
#ifdef FCK_HAVE_PANEL_GEMM
  return cpu_runs_avx2_clone();
#else
  return false;
#endif
}

at::Tensor winograd_weight(const at::Tensor& w, int64_t m, bool transposed) {
  TORCH_CHECK(winograd_available(), "fck::winograd_weight: needs a CPU with AVX2 and FMA");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat, "fck::winograd_weight: a float32 CPU weight is "
              "expected, got ", w.scalar_type(), " on ", w.device());
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, "fck::winograd_weight: a (K, C, 3, 3) weight is "
              "expected, got ", w.sizes());
  TORCH_CHECK(m == 2 || m == 4, "fck::winograd_weight: tile size m must be 2 or 4, got ", m);
#ifdef FCK_HAVE_PANEL_GEMM
  return m == 2 ? pack_weight<2>(w, transposed) : pack_weight<4>(w, transposed);
#else
  return at::Tensor();
#endif
}

namespace {

// The geometry of a convolution of x with K filters (its tiles for tile size m), after the checks both ops share.
Geometry geometry(const char* op, const at::Tensor& x, int64_t K, at::IntArrayRef padding, int64_t m) {
  TORCH_CHECK(winograd_available(), op, ": needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 4, op, ": a 4-D (N, C, H, W) input is expected, got ", x.sizes());
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative values, got ", padding);
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3), g.K = K;
  g.ph = padding[0], g.pw = padding[1];
  g.Cp = (g.C + kLanes - 1) / kLanes * kLanes, g.Kp = (K + panel::kNR - 1) / panel::kNR * panel::kNR;
  g.OH = g.H + 2 * g.ph - 2, g.OW = g.W + 2 * g.pw - 2;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": input (", x.sizes(), ") with padding ", padding,
              " is smaller than the 3x3 kernel");
  g.nhwc = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.th = (g.OH + m - 1) / m, g.tw = (g.OW + m - 1) / m;
  g.Hp = g.th * m + 2, g.Wp = g.tw * m + 2;
  return g;
}

// x in the interleaved, zero-padded layout (N, Cp/8, Hp, Wp, 8) of g, in a pooled block.
at::Tensor interleaved(const at::Tensor& x, const Geometry& g) {
  const at::Tensor xc = g.nhwc ? x : x.contiguous();
  at::Tensor xb = pooled_empty({g.N, g.Cp / kLanes, g.Hp, g.Wp, kLanes}, x.options());
  interleave_padded(xc.data_ptr<float>(), xb.data_ptr<float>(), g);
  return xb;
}

}  // namespace

at::Tensor conv3x3_winograd(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias_opt,
                            at::IntArrayRef padding, int64_t out_channels, bool relu) {
  const char* op = "fck::conv3x3_winograd";
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  TORCH_CHECK(x.device().is_cpu() && u.device().is_cpu() && (!has_bias || bias_opt->device().is_cpu()), op,
              ": CPU tensors are expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat &&
                  (!has_bias || bias_opt->scalar_type() == at::kFloat),
              op, ": float32 tensors are expected, got ", x.scalar_type(), " and ", u.scalar_type());
  TORCH_CHECK(u.dim() == 4 && (u.size(0) == 16 || u.size(0) == 36) && u.size(3) == 16 && u.is_contiguous(), op,
              ": u must come from fck::winograd_weight, got ", u.sizes());
  const int m = u.size(0) == 16 ? 2 : 4;
  const Geometry g = geometry(op, x, out_channels, padding, m);
  TORCH_CHECK(g.K > 0 && u.size(1) == g.Kp / panel::kNR && u.size(2) == g.Cp, op, ": the packed weight (", u.sizes(),
              ") does not match ", g.C, " input channels and ", g.K, " output channels");
  TORCH_CHECK(!has_bias || (bias_opt->dim() == 1 && bias_opt->numel() == g.K), op, ": a bias of ", g.K,
              " values is expected, got ", bias_opt->sizes());
  // The output in the input's memory format, as torch's convolution returns it.
  at::Tensor out = g.nhwc ? pooled_empty({g.N, g.OH, g.OW, g.K}, x.options()).permute({0, 3, 1, 2})
                          : pooled_empty({g.N, g.K, g.OH, g.OW}, x.options());
  if (out.numel() == 0) return out;
#ifdef FCK_HAVE_PANEL_GEMM
  const at::Tensor xb = interleaved(x, g);
  at::Tensor b = at::zeros({g.Kp}, x.options());
  if (has_bias) b.narrow(0, 0, g.K).copy_(*bias_opt);
  // Chunk and output-block sizes, from sweeps on this library's Xeon (2 MB L2 a core; N = 64, ResNet-34's 3x3
  // layers; the spread between the best and the worst pair was up to 1.4x): 48 tiles a chunk, 24 past 256 input
  // channels (the chunk's transformed input, 36 x 48 x 512 floats, would outgrow L2); GEMM results for 32 output
  // channels at a time up to 128 channels, else 128.
  const int64_t T = g.Cp <= 256 ? 48 : 24, KB = std::min<int64_t>(g.Kp, g.Kp <= 128 ? 32 : 128);
  (m == 2 ? conv_tiles<2> : conv_tiles<4>)(xb.data_ptr<float>(), u.data_ptr<float>(), b.data_ptr<float>(),
                                           out.data_ptr<float>(), g, T, KB, relu);
#endif
  return out;
}

at::Tensor conv3x3_winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef padding,
                                        int64_t m) {
  const char* op = "fck::conv3x3_winograd_weight_grad";
  TORCH_CHECK(x.device().is_cpu() && grad_out.device().is_cpu(), op, ": CPU tensors are expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad_out.scalar_type() == at::kFloat, op,
              ": float32 tensors are expected, got ", x.scalar_type(), " and ", grad_out.scalar_type());
  TORCH_CHECK(m == 2 || m == 4, op, ": tile size m must be 2 or 4, got ", m);
  TORCH_CHECK(grad_out.dim() == 4, op, ": a 4-D grad_out is expected, got ", grad_out.sizes());
  const Geometry g = geometry(op, x, grad_out.size(1), padding, m);
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(2) == g.OH && grad_out.size(3) == g.OW, op, ": grad_out ",
              grad_out.sizes(), " does not match the convolution of ", x.sizes(), " with padding ", padding);
  if (g.N == 0 || g.K == 0 || g.C == 0) return at::zeros({g.K, g.C, 3, 3}, x.options());
  at::Tensor dw = pooled_empty({g.K, g.C, 3, 3}, x.options());
#ifdef FCK_HAVE_PANEL_GEMM
  // The output gradient interleaved as an unpadded "input" of Kp channels on the output's tile grid.
  Geometry gg = g;
  gg.C = g.K, gg.H = g.OH, gg.W = g.OW, gg.ph = gg.pw = 0, gg.Cp = g.Kp, gg.Hp = g.th * m, gg.Wp = g.tw * m;
  gg.nhwc = !grad_out.is_contiguous() && grad_out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xb = interleaved(x, g), gb = interleaved(grad_out, gg);
  const int64_t A = m + 2, AA = A * A, P = g.Kp / panel::kNR;
  // The tiles are the GEMMs' reduction dimension: each worker sums its share of them into its own dU (AA x Cp x
  // Kp), added up at the end in worker order (the result does not depend on the scheduling). Workers: one a thread,
  // as many as 256 MB of dU allow (37 MB each at 512 x 512 channels: 16 threads would spend more adding the sums
  // than computing them). Every chunk adds into dU (in L3 when large), so chunks are long: each GEMM tile of dU is
  // loaded and stored once a chunk. Up to 384 tiles a chunk for 64 channels, 192 for 128 and 128 beyond (sweeps of
  // 64 to 768 on ResNet-34's layers at N = 64: 64x512x7x7 took 85 ms at 96, 48 at 128-384; 64x256x14x14 34 ms at
  // 96-128, 40 at 384), the same number on every worker (one extra long chunk on one thread doubles the time).
  const int64_t tiles = g.N * g.th * g.tw, dU_bytes = AA * g.Cp * g.Kp * int64_t(sizeof(float));
  const int64_t most = std::min<int64_t>(std::max(1, at::get_num_threads()),
                                         std::max<int64_t>(1, (int64_t(256) << 20) / dU_bytes));
  const int64_t per_worker = (tiles + most - 1) / most, workers = (tiles + per_worker - 1) / per_worker;  // >= 1 tile
  const int64_t cap = g.Cp <= 64 ? 384 : g.Cp <= 128 ? 192 : 128, per_worker_chunks = (per_worker + cap - 1) / cap;
  const int64_t T = (per_worker + per_worker_chunks - 1) / per_worker_chunks;
  std::vector<at::Tensor> parts(workers);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    at::Tensor scratch = pooled_empty({AA * T * (g.Cp + P * panel::kNR)}, x.options());
    float* Vs = scratch.data_ptr<float>();
    float* dMs = Vs + AA * g.Cp * T;
    for (int64_t w = w0; w < w1; ++w) {
      parts[w] = pooled_empty({AA * g.Cp * g.Kp}, x.options());
      const int64_t end = std::min(tiles, (w + 1) * per_worker);
      for (int64_t t0 = w * per_worker; t0 < end; t0 += T) {  // the first chunk writes dU, the others add to it
        (m == 2 ? wgrad_chunk<2> : wgrad_chunk<4>)(xb.data_ptr<float>(), gb.data_ptr<float>(), g, gg, T, t0,
                                                   std::min(T, end - t0), Vs, dMs, parts[w].data_ptr<float>(),
                                                   t0 > w * per_worker);
      }
    }
  });
  // dU = the workers' sum; dW[k][c] = G^T dU[.][c][k] G, 16 filters k at a time (contiguous in dU), in double.
  for (int64_t w = 1; w < workers; ++w) parts[0].add_(parts[w]);
  const float* dU = parts.at(0).data_ptr<float>();
  float* out = dw.data_ptr<float>();
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    constexpr int64_t L = 16;
    double Gd[6][3], U[36][L], GU[3][6][L];
    for (int64_t i = 0; i < A; ++i)
      for (int64_t j = 0; j < 3; ++j) Gd[i][j] = m == 2 ? Wino<2>::G[i][j] : Wino<4>::G[i][j];
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t k0 = 0; k0 < g.K; k0 += L) {
        const int64_t nk = std::min(L, g.K - k0);
        for (int64_t xi = 0; xi < AA; ++xi)
          for (int64_t l = 0; l < nk; ++l) U[xi][l] = dU[(xi * g.Cp + c) * g.Kp + k0 + l];
        for (int64_t i = 0; i < 3; ++i)
          for (int64_t b = 0; b < A; ++b)
            for (int64_t l = 0; l < nk; ++l) {
              double v = 0;
              for (int64_t a = 0; a < A; ++a) v += Gd[a][i] * U[a * A + b][l];
              GU[i][b][l] = v;
            }
        for (int64_t i = 0; i < 3; ++i)
          for (int64_t j = 0; j < 3; ++j)
            for (int64_t l = 0; l < nk; ++l) {
              double v = 0;
              for (int64_t b = 0; b < A; ++b) v += GU[i][b][l] * Gd[b][j];
              out[((k0 + l) * g.C + c) * 9 + i * 3 + j] = float(v);
            }
      }
  });
#endif
  return dw;
}

}  // namespace cpu
}  // namespace fck
