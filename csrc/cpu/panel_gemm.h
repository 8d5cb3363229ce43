// c (n x N) = a (n x K) @ B for the skinny GEMMs of a recurrent step (n = batch rows, B = W_hh or its transpose)
// and the Winograd convolution's batched GEMMs, with B packed into 16-column panels and a register-tiled kernel:
// AVX2+FMA (6 x 16 tiles) or AVX-512 (12 x 32), both summing each element's terms in the same order. bf16 steps
// have a third kernel on AMX tiles (at the end).
//
// Why not BLAS: on this library's AMD CPUs, MKL runs the AWD-LSTM step (32 x 1152 by 1152 x 4608) at ~41 GFLOP/s
// through its generic kernels, and its packed API gains only 7%; a small step (64 x 64 by 64 x 256) pays a BLAS
// call's fixed overhead, as much as its math. Here each 6-row x 16-column tile of c lives in 12 ymm registers for a
// whole K block while B's panel slice (kKC x 16 floats, 16 KB) stays in L1 across the row tiles.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "fck/cpu_vec.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FCK_HAVE_PANEL_GEMM 1
#if defined(__linux__) && !defined(__clang__) && __GNUC__ >= 11  // AMX intrinsics and arch_prctl's tile permission
#define FCK_HAVE_AMX 1
#endif
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
          for (int64_t k = 0; k < K; ++k) d[k * kNR + i] = i < cols ? w[(j0 + i) * K + k] : 0.f;
        }
      } else {  // row k of B is 16 adjacent floats of w's row k: read them together (a column at a time re-read
                // each line 16 times, 4.6 KB apart: the AWD-LSTM's 4608 x 1152 W_hh took 26 ms, now 5.5)
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

#ifdef FCK_HAVE_AMX
// ---- bf16 on AMX (Intel Sapphire Rapids and later): fp32 results ----
// Why: a bf16 step on the fp32 panels runs at the fp32 FMA rate (and AVX512-BF16's pair dot products measured no
// faster here: 190 against 250-300 GFLOP/s), while AMX's tile multiply does 16 x 16 x 32 products an instruction;
// torch's own bf16 LSTM reaches AMX through oneDNN. Products are exact and sums fp32, as at::mm's bf16 GEMM.
// Layout: B in K-row pairs, 16 columns a panel: B(2q, j) and B(2q + 1, j) side by side in one 32-bit slot at
// (p * amx_pairs(K) + q) * 16 + (j - 16 p), zero past N and past K, so a 32 x 16 block of B (16 pairs) is one
// 1 KB tile. a (bf16, raw uint16_t) and c (fp32) are padded to whole 16-row, 32-value tiles by the caller.

constexpr int64_t kAmxRows = 16, kAmxK = 32;
inline int64_t amx_pairs(int64_t K) { return (K + kAmxK - 1) / kAmxK * (kAmxK / 2); }
inline int64_t amx_packed_pairs(int64_t N, int64_t K) { return panels(N) * kNR * amx_pairs(K); }
inline int64_t amx_padded_rows(int64_t n) { return (n + kAmxRows - 1) / kAmxRows * kAmxRows; }
inline int64_t amx_padded_k(int64_t K) { return amx_pairs(K) * 2; }

inline void pack_amx(const uint16_t* w, bool wt, int64_t N, int64_t K, uint32_t* dst) {
  const int64_t P = amx_pairs(K), grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kNR * P));
  const auto value = [&](int64_t k, int64_t j) -> uint32_t {  // B(k, j), zero outside the matrix
    return k < K && j < N ? (wt ? w[j * K + k] : w[k * N + j]) : 0;
  };
  at::parallel_for(0, panels(N), grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t* d = dst + p * P * kNR;
      for (int64_t q = 0; q < P; ++q) {
        for (int64_t i = 0; i < kNR; ++i) {
          d[q * kNR + i] = value(2 * q, p * kNR + i) | (value(2 * q + 1, p * kNR + i) << 16);
        }
      }
    }
  });
}

// Whether this process may use AMX: the CPU has it and Linux granted the tile state (arch_prctl, once).
// FCK_NO_AMX=1 keeps bf16 on the fp32 panels.
inline bool amx_ready() {
  static const bool yes = [] {
    if (!cpu_runs_avx512() || !__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile") ||
        std::getenv("FCK_NO_AMX") != nullptr) {
      return false;
    }
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return yes;
}

// Rows [r, r + 16 R) x panels [p, p + C) of c, over all of K: tiles 0-3 the accumulators (row block i, panel j at
// 2 i + j), 4-5 a's row blocks, 6-7 B's panels.
template <int R, int C>
__attribute__((target("amx-tile,amx-bf16"), always_inline)) inline void amx_block(const uint16_t* a, int64_t lda,
                                                                                const uint32_t* bp, int64_t pstride,
                                                                                int64_t K, float* c, int64_t ldc) {
  _tile_zero(0);
  if constexpr (C == 2) _tile_zero(1);
  if constexpr (R == 2) _tile_zero(2);
  if constexpr (R == 2 && C == 2) _tile_zero(3);
  const int64_t abytes = lda * 2;
  for (int64_t k = 0, q = 0; k < K; k += kAmxK, q += kAmxK / 2) {
    _tile_loadd(4, a + k, abytes);
    if constexpr (R == 2) _tile_loadd(5, a + kAmxRows * lda + k, abytes);
    _tile_loadd(6, bp + q * kNR, kNR * 4);
    if constexpr (C == 2) _tile_loadd(7, bp + pstride + q * kNR, kNR * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (C == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (R == 2 && C == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  if constexpr (C == 2) _tile_stored(1, c + kNR, ldc * 4);
  if constexpr (R == 2) _tile_stored(2, c + kAmxRows * ldc, ldc * 4);
  if constexpr (R == 2 && C == 2) _tile_stored(3, c + kAmxRows * ldc + kNR, ldc * 4);
}

__attribute__((target("amx-tile,amx-bf16"))) inline void gemm_panels_amx(int64_t n, const uint16_t* a, int64_t lda,
                                                                         const uint32_t* packed, int64_t K, float* c,
                                                                         int64_t ldc, int64_t p0, int64_t p1) {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1; every tile 16 rows of 64 bytes
  for (int t = 0; t < 8; ++t) cfg[16 + 2 * t] = 64, cfg[48 + t] = kAmxRows;
  _tile_loadconfig(cfg);
  const int64_t P = amx_pairs(K), Kp = amx_padded_k(K);
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two = p + 1 < p1;
    const uint32_t* bp = packed + p * P * kNR;
    for (int64_t r = 0; r < n; r += 2 * kAmxRows) {
      const uint16_t* ar = a + r * lda;
      float* cr = c + r * ldc + p * kNR;
      if (r + kAmxRows < n) {
        two ? amx_block<2, 2>(ar, lda, bp, P * kNR, Kp, cr, ldc) : amx_block<2, 1>(ar, lda, bp, P * kNR, Kp, cr, ldc);
      } else {
        two ? amx_block<1, 2>(ar, lda, bp, P * kNR, Kp, cr, ldc) : amx_block<1, 1>(ar, lda, bp, P * kNR, Kp, cr, ldc);
      }
    }
  }
  _tile_release();
}

// c (amx_padded_rows(n) x 16 panels(N), fp32, row stride ldc) = a @ B, a (amx_padded_rows(n) x amx_padded_k(K),
// bf16, row stride lda, zero-padded) and B from pack_amx; threads split the panels, as gemm().
inline void gemm_amx(int64_t n, const uint16_t* a, int64_t lda, const uint32_t* packed, int64_t N, int64_t K,
                     float* c, int64_t ldc) {
  if (n == 0 || N == 0) return;
  const int64_t flops_per_panel = 2 * amx_padded_rows(n) * amx_padded_k(K) * kNR;
  at::parallel_for(0, panels(N), std::max<int64_t>(2, (1 << 21) / flops_per_panel), [&](int64_t p0, int64_t p1) {
    gemm_panels_amx(amx_padded_rows(n), a, lda, packed, K, c, ldc, p0, p1);
  });
}
#endif  // FCK_HAVE_AMX
#endif

}  // namespace panel
}  // namespace cpu
}  // namespace fck
