// Multi-tensor Adam on the CPU: every element of every tensor in the call is read once and written once, in one
// parallel region over fixed-size chunks of the concatenated tensors (small tensors don't each pay a thread fork).
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <vector>

#include "fck/adam.h"
#include "fck/adam_host.h"
#include "fck/cpu_vec.h"
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

// The loops are compiled twice: for AVX2+FMA+F16C (picked at run time when the CPU has them) and for baseline
// x86-64, so one binary is fast here and still runs anywhere. `State` is P without master weights, float with them.
template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2, bool F16C>
FCK_HOST_DEVICE void adam_loop(raw_t<P>* __restrict p, const raw_t<P>* __restrict g, float* __restrict master,
                               raw_t<State>* __restrict m, raw_t<State>* __restrict v,
                               raw_t<State>* __restrict vmax, int64_t n, const AdamHyper& h,
                               const AdamStepScalars& s) {
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
