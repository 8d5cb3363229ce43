// c (n x N) = a (n x K) @ B for the skinny GEMMs of a recurrent step (n = batch rows, B = W_hh or its transpose)
// and the Winograd convolution's batched GEMMs, with B packed into 16-column panels and a register-tiled kernel:
// AVX2+FMA (6 x 16 tiles) or AVX-512 (12 x 32), both summing each element's terms in the same order.
//
// Why not BLAS: on this library's AMD CPUs, MKL runs the AWD-LSTM step (32 x 1152 by 1152 x 4608) at ~41 GFLOP/s
// through its generic kernels, and its packed API gains only 7%; a small step (64 x 64 by 64 x 256) pays a BLAS
// call's fixed overhead, as much as its math. Here each 6-row x 16-column tile of c lives in 12 ymm registers for a
// whole K block while B's panel slice (kKC x 16 floats, 16 KB) stays in L1 across the row tiles.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fck/cpu_vec.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FCK_HAVE_PANEL_GEMM 1
#endif

namespace fck {
namespace cpu {
namespace panel {

constexpr int64_t kNR = 16;   // columns per panel: two ymm registers
constexpr int64_t kMR = 6;    // rows per register tile: 12 accumulators + 2 B vectors + 1 broadcast of 16 ymm
constexpr int64_t kKC = 256;  // K block: a panel slice of 16 KB
// The AVX-512 kernel's first row tile fetches each panel this many rows (of 64 bytes) ahead, running into the next
// K block and, at a panel's end, the next panel; the other row tiles find the rows in L1. A W_hh larger than the L2
// streams from L3 or memory on every recurrent step: the AWD-LSTM step's 32 x 1152 by 1152 x 4608 went from
// 264-277 to 286-311 GFLOP/s (2 threads, this library's Xeon; 128 rows ahead and T1 hints were no better).
constexpr int64_t kPrefetchRows = 64;

inline int64_t panels(int64_t N) { return (N + kNR - 1) / kNR; }
inline int64_t packed_floats(int64_t N, int64_t K) { return panels(N) * kNR * K; }

// B(k, j) = wt ? w[j * K + k] : w[k * N + j]. Panel p holds B(k, kNR * p + i) at (p * K + k) * kNR + i, zero past N,
// so every tile reads whole vectors.
inline void pack(const float* w, bool wt, int64_t N, int64_t K, float* dst) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kNR * K));
  at::parallel_for(0, panels(N), grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* d = dst + p * K * kNR;
      const int64_t j0 = p * kNR, cols = std::min(kNR, N - j0);
      if (wt) {  // column j of B is row j of w: read along it
        for (int64_t i = 0; i < kNR; ++i) {
          const float* src = w + (j0 + i) * K;
          for (int64_t k = 0; k < K; ++k) d[k * kNR + i] = i < cols ? src[k] : 0.f;  // (src unread past N)
        }
      } else {  // row k of B is 16 adjacent floats of w's row k: read them together (a column at a time re-read
                // each line 16 times, 4.6 KB apart: packing the AWD-LSTM's 4608 x 1152 W_hh took ~12 ms)
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t i = 0; i < kNR; ++i) d[k * kNR + i] = i < cols ? w[k * N + j0 + i] : 0.f;
        }
      }
    }
  });
}

#ifdef FCK_HAVE_PANEL_GEMM
// One MR x 16 tile of c over kc values of K: c (+)= a[:, :kc] @ bp, `cols` of the 16 columns stored. TA: a is
// stored transposed (element (r, k) at a[k * lda + r]; the Winograd weight gradient's tiles-by-channels operand).
template <int MR, bool TA = false>
__attribute__((target("avx2,fma"), always_inline)) inline void tile(const float* __restrict a, int64_t lda,
                                                                      const float* __restrict bp, int64_t kc,
                                                                      float* __restrict c, int64_t ldc, int64_t cols,
                                                                      bool accumulate, bool prefetch) {
  __m256 acc[MR][2];
  alignas(32) float buf[MR][kNR];
  if (accumulate) {
    for (int r = 0; r < MR; ++r) {
      if (cols == kNR) {
        acc[r][0] = _mm256_loadu_ps(c + r * ldc), acc[r][1] = _mm256_loadu_ps(c + r * ldc + 8);
      } else {
        std::memcpy(buf[r], c + r * ldc, cols * sizeof(float));
        acc[r][0] = _mm256_load_ps(buf[r]), acc[r][1] = _mm256_load_ps(buf[r] + 8);
      }
    }
  } else {
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(bp + k * kNR), b1 = _mm256_load_ps(bp + k * kNR + 8);
    // (past the buffer's end on the last block: a prefetch never faults; the address is formed as an integer)
    if (prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(uintptr_t(bp + k * kNR) + kc * kNR * sizeof(float)), _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(TA ? a + k * lda + r : a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (cols == kNR) {
      _mm256_storeu_ps(c + r * ldc, acc[r][0]), _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    } else {
      _mm256_store_ps(buf[r], acc[r][0]), _mm256_store_ps(buf[r] + 8, acc[r][1]);
      std::memcpy(c + r * ldc, buf[r], cols * sizeof(float));
    }
  }
}

// The AVX-512 kernel: an MR x 32 tile (two adjacent panels, NP = 2) or MR x 16 (the last, odd panel) in up to 24
// zmm accumulators. Columns past `cols` are masked, so no staging buffer. Each c element sums its k terms in the
// same order as tile(), one FMA each: the results are the AVX2 kernel's bit for bit.
template <int MR, int NP, bool TA>
__attribute__((target("avx512f"), always_inline)) inline void tile512(const float* __restrict a, int64_t lda,
                                                                       const float* __restrict bp, int64_t pstride,
                                                                       int64_t kc, float* __restrict c, int64_t ldc,
                                                                       int64_t cols, bool accumulate,
                                                                       bool prefetch) {
  __m512 acc[MR][NP];
  __mmask16 mask[NP];
  for (int j = 0; j < NP; ++j) {
    const int64_t n = std::min<int64_t>(kNR, std::max<int64_t>(0, cols - j * kNR));
    mask[j] = __mmask16((1u << n) - 1);
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j)
      acc[r][j] = accumulate ? _mm512_maskz_loadu_ps(mask[j], c + r * ldc + j * kNR) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[NP];
    for (int j = 0; j < NP; ++j) b[j] = _mm512_load_ps(bp + j * pstride + k * kNR);
    if (prefetch) {  // see kPrefetchRows
      for (int j = 0; j < NP; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(uintptr_t(bp + j * pstride + (k + kPrefetchRows) * kNR)),
                     _MM_HINT_T0);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(TA ? a[k * lda + r] : a[r * lda + k]);
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_fmadd_ps(av, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j) _mm512_mask_storeu_ps(c + r * ldc + j * kNR, mask[j], acc[r][j]);
}

template <int NP, bool TA>
__attribute__((target("avx512f"))) inline void rows512(int64_t n, const float* a, int64_t lda, const float* bp,
                                                        int64_t pstride, int64_t kc, float* c, int64_t ldc,
                                                        int64_t cols, bool acc) {
  constexpr int64_t kMR512 = 12;  // 24 accumulators + 2 panel vectors + 1 broadcast of 32 zmm
  const int64_t tiles = (n + kMR512 - 1) / kMR512;
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t mr = (n - r) / (tiles - t) + ((n - r) % (tiles - t) != 0);
    const float* ar = TA ? a + r : a + r * lda;
    float* cr = c + r * ldc;
    switch (mr) {
#define FCK_TILE512(R) \
  case R: tile512<R, NP, TA>(ar, lda, bp, pstride, kc, cr, ldc, cols, acc, t == 0); break;
      FCK_TILE512(12) FCK_TILE512(11) FCK_TILE512(10) FCK_TILE512(9) FCK_TILE512(8) FCK_TILE512(7)
      FCK_TILE512(6) FCK_TILE512(5) FCK_TILE512(4) FCK_TILE512(3) FCK_TILE512(2)
#undef FCK_TILE512
      default: tile512<1, NP, TA>(ar, lda, bp, pstride, kc, cr, ldc, cols, acc, t == 0); break;
    }
    r += mr;
  }
}

template <bool TA>
__attribute__((target("avx512f"))) inline void gemm_panels_avx512(int64_t n, const float* a, int64_t lda,
                                                                   const float* packed, int64_t N, int64_t K, float* c,
                                                                   int64_t ldc, int64_t p0, int64_t p1,
                                                                   bool accumulate) {
  for (int64_t p = p0; p < p1; p += 2) {
    const int64_t np = std::min<int64_t>(2, p1 - p), cols = std::min(np * kNR, N - p * kNR);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const float* bp = packed + (p * K + k0) * kNR;
      if (np == 2) {
        rows512<2, TA>(n, TA ? a + k0 * lda : a + k0, lda, bp, K * kNR, kc, c + p * kNR, ldc, cols,
                       accumulate || k0 > 0);
      } else {
        rows512<1, TA>(n, TA ? a + k0 * lda : a + k0, lda, bp, K * kNR, kc, c + p * kNR, ldc, cols,
                       accumulate || k0 > 0);
      }
    }
  }
}

template <bool TA>
__attribute__((target("avx2,fma"))) inline void gemm_panels_avx2(int64_t n, const float* a, int64_t lda,
                                                                const float* packed, int64_t N, int64_t K, float* c,
                                                                int64_t ldc, int64_t p0, int64_t p1, bool accumulate) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min(kNR, N - p * kNR);
    float* cp = c + p * kNR;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const float* bp = packed + (p * K + k0) * kNR;
      const bool acc = accumulate || k0 > 0;
      // The first row tile also fetches the next K block (one 64-byte row of the panel per k), which the other tiles
      // then find in L1: a large W_hh streams from memory once per step. Row tiles as even as possible (32 rows:
      // 6 6 5 5 5 5, not 6 6 6 6 6 2): a tile of 2 rows has 4 FMA chains, too few to hide the FMA latency.
      const int64_t tiles = (n + kMR - 1) / kMR;
      for (int64_t t = 0, r = 0; t < tiles; ++t) {
        const int64_t mr = (n - r) / (tiles - t) + ((n - r) % (tiles - t) != 0);
        const float* ar = TA ? a + r + k0 * lda : a + r * lda + k0;
        float* cr = cp + r * ldc;
        switch (mr) {
          case 6: tile<6, TA>(ar, lda, bp, kc, cr, ldc, cols, acc, t == 0); break;
          case 5: tile<5, TA>(ar, lda, bp, kc, cr, ldc, cols, acc, t == 0); break;
          case 4: tile<4, TA>(ar, lda, bp, kc, cr, ldc, cols, acc, t == 0); break;
          case 3: tile<3, TA>(ar, lda, bp, kc, cr, ldc, cols, acc, t == 0); break;
          case 2: tile<2, TA>(ar, lda, bp, kc, cr, ldc, cols, acc, t == 0); break;
          default: tile<1, TA>(ar, lda, bp, kc, cr, ldc, cols, acc, t == 0); break;
        }
        r += mr;
      }
    }
  }
}

// Panels [p0, p1) of c, all n rows: c (+ with `accumulate`) = a @ B, with a (n x K) row-major (stride lda), or
// stored transposed (a_transposed: element (r, k) at a[k * lda + r]). The packed buffer comes from at::empty
// (64-byte aligned), so aligned loads. CPUs with AVX-512 take the 16-wide kernel (twice the FMA width: this
// library's Xeon runs the Winograd convolution's GEMMs ~2x faster).
inline void gemm_panels(int64_t n, const float* a, int64_t lda, const float* packed, int64_t N, int64_t K, float* c,
                        int64_t ldc, int64_t p0, int64_t p1, bool accumulate = false, bool a_transposed = false) {
  if (cpu_runs_avx512()) {
    return (a_transposed ? gemm_panels_avx512<true> : gemm_panels_avx512<false>)(n, a, lda, packed, N, K, c, ldc, p0,
                                                                                   p1, accumulate);
  }
  (a_transposed ? gemm_panels_avx2<true> : gemm_panels_avx2<false>)(n, a, lda, packed, N, K, c, ldc, p0, p1,
                                                                     accumulate);
}

// c (n x N, row stride ldc) = a (n x K, row stride lda) @ B, B from `pack`. Panels split across threads (each
// streams only its share of B); run inside a parallel region (the RNN's row blocks), it stays on the caller's thread.
inline void gemm(int64_t n, const float* a, int64_t lda, const float* packed, int64_t N, int64_t K, float* c,
                 int64_t ldc) {
  if (n == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t r = 0; r < n; ++r) std::fill(c + r * ldc, c + r * ldc + N, 0.f);
    return;
  }
  const int64_t flops_per_panel = 2 * n * K * kNR;
  at::parallel_for(0, panels(N), std::max<int64_t>(1, (1 << 18) / flops_per_panel),
                   [&](int64_t p0, int64_t p1) { gemm_panels(n, a, lda, packed, N, K, c, ldc, p0, p1); });
}
#endif

}  // namespace panel
}  // namespace cpu
}  // namespace fck
