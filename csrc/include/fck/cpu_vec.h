// CPU-only helpers shared by the C++ kernels in csrc/cpu: fp32 views of fp16/bf16 storage that vectorize, and the
// run-time choice between the AVX2+FMA+F16C clone of a loop and its baseline x86-64 build.
#pragma once

#include <cstdlib>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "fck/cpu_float.h"

namespace fck {
namespace cpu {

// How the loops read and write each storage dtype as fp32: raw bits and branch-free conversions (fck/cpu_float.h),
// so that fp16/bf16 loops vectorize like fp32 ones.
// `acc` is the type the math runs in: fp32 for every storage dtype but float64.
template <typename T>
struct Storage {
  using raw = float;
  using acc = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <>
struct Storage<double> {
  using raw = double;
  using acc = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
template <>
struct Storage<c10::Half> {
  using raw = uint16_t;
  using acc = float;
  static float load(uint16_t x) { return cpu_float::fp16_to_float(x); }
  static uint16_t store(float x) { return cpu_float::float_to_fp16(x); }
};
template <>
struct Storage<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static float load(uint16_t x) { return cpu_float::bf16_to_float(x); }
  static uint16_t store(float x) { return cpu_float::float_to_bf16(x); }
};

template <typename T>
using raw_t = typename Storage<T>::raw;
template <typename T>
using acc_t = typename Storage<T>::acc;

// Whole-tile conversions. With F16C (every AVX2 CPU has it) fp16 uses the hardware conversion instructions, which
// round to nearest even exactly like the portable code.
template <typename T, bool F16C>
inline void widen(const raw_t<T>* __restrict src, acc_t<T>* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::load(src[i]);
}

template <typename T, bool F16C>
inline void narrow(const acc_t<T>* __restrict src, raw_t<T>* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::store(src[i]);
}

// The size of cpu0's cache of `level` as sysfs reports it (the one instance the core shares), 0 if unknown; level 0:
// the largest level listed.
inline int64_t sysfs_cache_bytes(int64_t want_level) {
  int64_t best_level = 0, best = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    int64_t level = 0, kib = 0;
    if (FILE* f = std::fopen((dir + "level").c_str(), "r")) {
      if (std::fscanf(f, "%ld", &level) != 1) level = 0;
      std::fclose(f);
    }
    if (FILE* f = std::fopen((dir + "size").c_str(), "r")) {
      if (std::fscanf(f, "%ldK", &kib) != 1) kib = 0;
      std::fclose(f);
    }
    if (kib > 0 && (want_level ? level == want_level : level > best_level)) best_level = level, best = kib << 10;
  }
  return best;
}

// The size of the largest cache this core sees (its L3 slice, else L2; at least 1 MiB): what a kernel may hope to
// keep cached. Read from sysfs: glibc's sysconf reports the whole package's L3 on AMD (256 MB for this VM's EPYC,
// whose core sees a 32 MB slice).
inline int64_t cpu_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = sysfs_cache_bytes(0);
    if (best == 0) best = std::max<long>(sysconf(_SC_LEVEL3_CACHE_SIZE), sysconf(_SC_LEVEL2_CACHE_SIZE));
    return std::max<int64_t>(best, int64_t(1) << 20);
  }();
  return bytes;
}

// A core's L2 (at least 256 KiB): 512 KiB on this library's AMD EPYC host, 2 MiB on its Xeon.
inline int64_t cpu_l2_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = sysfs_cache_bytes(2);
    if (l2 == 0) l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return std::max<int64_t>(l2, int64_t(256) << 10);
  }();
  return bytes;
}

// Writes `bytes` from src (nullptr: zeros) to dst without pulling dst's lines into the caches: for outputs far larger
// than the caches (above cpu_cache_bytes(): a smaller output reused call after call stays in L3, where ordinary
// stores are cheaper). An ordinary store first reads each line (twice the traffic), and the written lines push out
// of L3 what the kernel is still reading. Call stream_fence() before other threads read dst.
inline void stream_store(void* dst, const void* src, int64_t bytes) {
#if defined(__x86_64__) && defined(__GNUC__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - int64_t(reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  if (s) std::memcpy(d, s, head); else std::memset(d, 0, head);
  int64_t i = head;
  const __m128i zero = _mm_setzero_si128();
  for (; i + 16 <= bytes; i += 16) {
    const __m128i v = s ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)) : zero;
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), v);
  }
  if (s) std::memcpy(d + i, s + i, bytes - i); else std::memset(d + i, 0, bytes - i);
#else
  if (src) std::memcpy(dst, src, bytes); else std::memset(dst, 0, bytes);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  _mm_sfence();
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FCK_HAVE_AVX2_CLONE 1
// Inlined into a loop of constant width (a batch-norm channel chunk), GCC reasons about the tail loop's iteration
// count and warns of an overflow no call can reach (n <= the buffer's width).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"
template <>
__attribute__((target("avx2,fma,f16c"))) inline void widen<c10::Half, true>(const uint16_t* __restrict src,
                                                                             float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = cpu_float::fp16_to_float(src[i]);
}

template <>
__attribute__((target("avx2,fma,f16c"))) inline void narrow<c10::Half, true>(const float* __restrict src,
                                                                              uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = cpu_float::float_to_fp16(src[i]);
}
#pragma GCC diagnostic pop
#endif

// f(tag) with a value of the storage type of `t` (double, float, c10::Half or c10::BFloat16).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "fastcore_kernels: unsupported dtype ", t);
  }
}

inline bool cpu_runs_avx2_clone() {
#ifdef FCK_HAVE_AVX2_CLONE
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

// A kernel's AVX2 clone where this CPU runs it, else its baseline one (without the clones, the AVX2 name is never
// compiled).
#ifdef FCK_HAVE_AVX2_CLONE
#define FCK_PICK_CLONE(base, avx2) (::fck::cpu::cpu_runs_avx2_clone() ? (avx2) : (base))
#else
#define FCK_PICK_CLONE(base, avx2) (base)
#endif

// Whether to take the AVX-512 kernels (the panel GEMM, the RNN cells' clones). FCK_NO_AVX512=1 keeps the AVX2 ones
// on an AVX-512 CPU: the two give the same bits, which tests/test_cpu_isa.py checks by running both.
inline bool cpu_runs_avx512() {
#ifdef FCK_HAVE_AVX2_CLONE
  static const bool yes = cpu_runs_avx2_clone() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && std::getenv("FCK_NO_AVX512") == nullptr;
  return yes;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fck
