// Multi-tensor Adam on the CPU: every element of every tensor in the call is read once and written once, in one
// parallel region over fixed-size chunks of the concatenated tensors (small tensors don't each pay a thread fork).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "fck/adam.h"
#include "fck/adam_host.h"
#include "fck/cpu_float.h"
#include "fck/ops.h"

namespace fck {
namespace cpu {
namespace {

// 16K elements: 64 KiB per fp32 stream, large enough to amortise scheduling, small enough to balance two to
// hundreds of threads.
constexpr int64_t kChunk = 16384;

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

// How the loops read and write each storage dtype as fp32: raw bits and branch-free conversions (fck/cpu_float.h),
// so that fp16/bf16 loops vectorize like fp32 ones.
template <typename T>
struct Storage {
  using raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <>
struct Storage<c10::Half> {
  using raw = uint16_t;
  static float load(uint16_t x) { return cpu_float::fp16_to_float(x); }
  static uint16_t store(float x) { return cpu_float::float_to_fp16(x); }
};
template <>
struct Storage<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t x) { return cpu_float::bf16_to_float(x); }
  static uint16_t store(float x) { return cpu_float::float_to_bf16(x); }
};

template <typename T>
using raw_t = typename Storage<T>::raw;

// Whole-tile conversions. With F16C (every AVX2 CPU has it) fp16 uses the hardware conversion instructions, which
// round to nearest even exactly like the portable code.
template <typename T, bool F16C>
inline void widen(const raw_t<T>* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::load(src[i]);
}

template <typename T, bool F16C>
inline void narrow(const float* __restrict src, raw_t<T>* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::store(src[i]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FCK_HAVE_AVX2_CLONE 1
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
#endif

// The loops are compiled twice: for AVX2+FMA+F16C (picked at run time when the CPU has them) and for baseline
// x86-64, so one binary is fast here and still runs anywhere. `State` is P without master weights, float with them.
template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2, bool F16C>
FCK_HOST_DEVICE void adam_loop(raw_t<P>* __restrict p, const raw_t<P>* __restrict g, float* __restrict master,
                               raw_t<State>* __restrict m, raw_t<State>* __restrict v,
                               raw_t<State>* __restrict vmax, int64_t n, const AdamHyper& h,
                               const AdamStepScalars& s) {
  using SP = Storage<P>;
  using SS = Storage<State>;
  const AdamHyper hv = h;  // local copies: provably loop-invariant, whatever the stores below may alias
  const AdamStepScalars sv = s;
  if constexpr (std::is_same_v<P, float>) {
    for (int64_t i = 0; i < n; ++i) {
      float vmf = AMSGRAD ? vmax[i] : 0.0f;
      adam_element<AMSGRAD, L2>(p[i], g[i], m[i], v[i], vmf, hv, sv);
      if (AMSGRAD) vmax[i] = vmf;
    }
  } else {
    // GCC does not vectorize the update and the 16-bit conversions in one loop (mixed 16/32-bit lanes), so a tile
    // is widened to fp32 in L1-resident buffers, updated, and narrowed back: three loops that each vectorize.
    // 64 measured fastest here (fp16 step 14.3 ms at 64, 22 at 32, 26.6 at 256, 27.7 at 1024).
    constexpr int64_t kTile = 64;
    alignas(64) float pf[kTile], gf[kTile], mf[kTile], vf[kTile], vmf[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t len = n - t < kTile ? n - t : kTile;
      if (MASTER) {
        for (int64_t i = 0; i < len; ++i) pf[i] = master[t + i];
      } else {
        widen<P, F16C>(p + t, pf, len);
      }
      widen<P, F16C>(g + t, gf, len);
      widen<State, F16C>(m + t, mf, len);
      widen<State, F16C>(v + t, vf, len);
      if (AMSGRAD) widen<State, F16C>(vmax + t, vmf, len);
      for (int64_t i = 0; i < len; ++i) adam_element<AMSGRAD, L2>(pf[i], gf[i], mf[i], vf[i], vmf[i], hv, sv);
      if (MASTER) {
        for (int64_t i = 0; i < len; ++i) master[t + i] = pf[i];
      }
      narrow<P, F16C>(pf, p + t, len);
      narrow<State, F16C>(mf, m + t, len);
      narrow<State, F16C>(vf, v + t, len);
      if (AMSGRAD) narrow<State, F16C>(vmf, vmax + t, len);
    }
  }
}

#define FCK_ADAM_LOOP_ARGS                                                                                   \
  raw_t<P>*p, const raw_t<P>*g, float *master, raw_t<State>*m, raw_t<State>*v, raw_t<State>*vmax, int64_t n, \
      const AdamHyper &h, const AdamStepScalars &s

#ifdef FCK_HAVE_AVX2_CLONE
template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2>
__attribute__((target("avx2,fma,f16c"))) void adam_loop_avx2(FCK_ADAM_LOOP_ARGS) {
  adam_loop<P, State, MASTER, AMSGRAD, L2, true>(p, g, master, m, v, vmax, n, h, s);
}
#endif

template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2>
void adam_loop_baseline(FCK_ADAM_LOOP_ARGS) {
  adam_loop<P, State, MASTER, AMSGRAD, L2, false>(p, g, master, m, v, vmax, n, h, s);
}

bool cpu_runs_avx2_clone() {
#ifdef FCK_HAVE_AVX2_CLONE
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

template <typename P, bool MASTER, bool AMSGRAD, bool L2>
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
         at::TensorList max_exp_avg_sqs, at::TensorList master_params, const std::vector<AdamStepScalars>& scal,
         const AdamHyper& h) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int32_t>(t), b, std::min(n, b + kChunk)});
  }
  using State = std::conditional_t<MASTER, float, P>;
  auto loop = adam_loop_baseline<P, State, MASTER, AMSGRAD, L2>;
#ifdef FCK_HAVE_AVX2_CLONE
  if (cpu_runs_avx2_clone()) loop = adam_loop_avx2<P, State, MASTER, AMSGRAD, L2>;
#endif
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& k = chunks[c];
      const int64_t off = k.begin;
      auto raw = [&](const at::Tensor& t, auto tag) {
        using T = decltype(tag);
        return reinterpret_cast<raw_t<T>*>(t.data_ptr<T>()) + off;
      };
      loop(raw(params[k.tensor], P{}), raw(grads[k.tensor], P{}),
           MASTER ? master_params[k.tensor].data_ptr<float>() + off : nullptr, raw(exp_avgs[k.tensor], State{}),
           raw(exp_avg_sqs[k.tensor], State{}), AMSGRAD ? raw(max_exp_avg_sqs[k.tensor], State{}) : nullptr,
           k.end - k.begin, h, scal[k.tensor]);
    }
  });
}

}  // namespace

void adam_(FCK_ADAM_ARGS) {
  check_adam_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, amsgrad);
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fck::adam_ (cpu): params must be CPU tensors");
  const std::vector<double> steps = advance_steps(state_steps);
  std::vector<AdamStepScalars> scal(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) scal[i] = make_adam_step_scalars(lr, beta1, beta2, steps[i]);
  const AdamHyper h =
      make_adam_hyper(lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, inv_grad_scale);
  dispatch_adam(params[0].scalar_type(), !master_params.empty(), amsgrad,
                adam_uses_l2(weight_decay, decoupled_weight_decay), [&](auto variant) {
                  using V = decltype(variant);
                  run<typename V::param_t, V::master, V::amsgrad, V::l2>(params, grads, exp_avgs, exp_avg_sqs,
                                                                         max_exp_avg_sqs, master_params, scal, h);
                });
}

}  // namespace cpu
}  // namespace fck
