// Multi-tensor Adam on the CPU: every element of every tensor in the call is read once and written once, in one
// parallel region over fixed-size chunks of the concatenated tensors (small tensors don't each pay a thread fork).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fck/adam.h"
#include "fck/adam_host.h"
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

// The loops are compiled twice: for AVX2+FMA (picked at run time when the CPU has them) and for baseline x86-64, so
// one binary is fast here and still runs anywhere. `State` is P without master weights, float with them.
template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2>
FCK_HOST_DEVICE void adam_loop(P* __restrict p, const P* __restrict g, float* __restrict master,
                               State* __restrict m, State* __restrict v, State* __restrict vmax, int64_t n,
                               const AdamHyper& h, const AdamStepScalars& s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = MASTER ? master[i] : static_cast<float>(p[i]);
    float mf = static_cast<float>(m[i]), vf = static_cast<float>(v[i]);
    float vmf = AMSGRAD ? static_cast<float>(vmax[i]) : 0.0f;
    adam_element<AMSGRAD, L2>(pf, static_cast<float>(g[i]), mf, vf, vmf, h, s);
    if (MASTER) master[i] = pf;
    p[i] = static_cast<P>(pf);
    m[i] = static_cast<State>(mf);
    v[i] = static_cast<State>(vf);
    if (AMSGRAD) vmax[i] = static_cast<State>(vmf);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FCK_HAVE_AVX2_CLONE 1
template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2>
__attribute__((target("avx2,fma"))) void adam_loop_avx2(P* p, const P* g, float* master, State* m, State* v,
                                                        State* vmax, int64_t n, const AdamHyper& h,
                                                        const AdamStepScalars& s) {
  adam_loop<P, State, MASTER, AMSGRAD, L2>(p, g, master, m, v, vmax, n, h, s);
}
#endif

template <typename P, typename State, bool MASTER, bool AMSGRAD, bool L2>
void adam_loop_baseline(P* p, const P* g, float* master, State* m, State* v, State* vmax, int64_t n,
                        const AdamHyper& h, const AdamStepScalars& s) {
  adam_loop<P, State, MASTER, AMSGRAD, L2>(p, g, master, m, v, vmax, n, h, s);
}

bool cpu_has_avx2_fma() {
#ifdef FCK_HAVE_AVX2_CLONE
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
  if (cpu_has_avx2_fma()) loop = adam_loop_avx2<P, State, MASTER, AMSGRAD, L2>;
#endif
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& k = chunks[c];
      const int64_t off = k.begin;
      loop(params[k.tensor].data_ptr<P>() + off, grads[k.tensor].data_ptr<P>() + off,
           MASTER ? master_params[k.tensor].data_ptr<float>() + off : nullptr,
           exp_avgs[k.tensor].data_ptr<State>() + off, exp_avg_sqs[k.tensor].data_ptr<State>() + off,
           AMSGRAD ? max_exp_avg_sqs[k.tensor].data_ptr<State>() + off : nullptr, k.end - k.begin, h,
           scal[k.tensor]);
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
