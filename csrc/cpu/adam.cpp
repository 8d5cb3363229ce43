// Multi-tensor Adam on the CPU: every element of every tensor in the call is read once and written once, in one
// parallel region over fixed-size chunks of the concatenated tensors (small tensors don't each pay a thread fork).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "fck/adam.h"
#include "fck/adam_checks.h"
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

// target_clones compiles the loop twice (AVX2+FMA and baseline x86-64) and picks one at load time, so one binary
// is fast on this machine and still runs on a CPU without AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FCK_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FCK_CPU_CLONES
#endif

template <typename P, bool AMSGRAD>
FCK_CPU_CLONES void adam_range(P* __restrict p, const P* __restrict g, P* __restrict m, P* __restrict v,
                               P* __restrict vmax, int64_t n, AdamHyper h, AdamStepScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = static_cast<float>(p[i]), mf = static_cast<float>(m[i]), vf = static_cast<float>(v[i]);
    float vmf = AMSGRAD ? static_cast<float>(vmax[i]) : 0.0f;
    adam_element<AMSGRAD>(pf, static_cast<float>(g[i]), mf, vf, vmf, h, s);
    p[i] = static_cast<P>(pf);
    m[i] = static_cast<P>(mf);
    v[i] = static_cast<P>(vf);
    if (AMSGRAD) vmax[i] = static_cast<P>(vmf);
  }
}

// Half params with fp32 master weights and fp32 state: the update runs on the master copy, the param gets its
// rounded value.
template <typename P, bool AMSGRAD>
FCK_CPU_CLONES void adam_range_master(P* __restrict p, const P* __restrict g, float* __restrict master,
                                      float* __restrict m, float* __restrict v, float* __restrict vmax, int64_t n,
                                      AdamHyper h, AdamStepScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = master[i], vmf = AMSGRAD ? vmax[i] : 0.0f;
    adam_element<AMSGRAD>(pf, static_cast<float>(g[i]), m[i], v[i], vmf, h, s);
    master[i] = pf;
    p[i] = static_cast<P>(pf);
    if (AMSGRAD) vmax[i] = vmf;
  }
}

template <typename P, bool AMSGRAD>
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
         at::TensorList max_exp_avg_sqs, at::TensorList master_params, const std::vector<AdamStepScalars>& scal,
         const AdamHyper& h) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int32_t>(t), b, std::min(n, b + kChunk)});
  }
  const bool master = !master_params.empty();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& k = chunks[c];
      const int64_t off = k.begin, n = k.end - k.begin;
      P* p = params[k.tensor].data_ptr<P>() + off;
      const P* g = grads[k.tensor].data_ptr<P>() + off;
      if (master) {
        float* vmax = AMSGRAD ? max_exp_avg_sqs[k.tensor].data_ptr<float>() + off : nullptr;
        adam_range_master<P, AMSGRAD>(p, g, master_params[k.tensor].data_ptr<float>() + off,
                                      exp_avgs[k.tensor].data_ptr<float>() + off,
                                      exp_avg_sqs[k.tensor].data_ptr<float>() + off, vmax, n, h, scal[k.tensor]);
      } else {
        P* vmax = AMSGRAD ? max_exp_avg_sqs[k.tensor].data_ptr<P>() + off : nullptr;
        adam_range<P, AMSGRAD>(p, g, exp_avgs[k.tensor].data_ptr<P>() + off,
                               exp_avg_sqs[k.tensor].data_ptr<P>() + off, vmax, n, h, scal[k.tensor]);
      }
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
  auto go = [&](auto tag) {
    using P = decltype(tag);
    if (amsgrad) {
      run<P, true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, scal, h);
    } else {
      run<P, false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, scal, h);
    }
  };
  switch (params[0].scalar_type()) {
    case at::kFloat: go(float{}); break;
    case at::kHalf: go(c10::Half{}); break;
    case at::kBFloat16: go(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fck::adam_ (cpu): unsupported dtype ", params[0].scalar_type());
  }
}

}  // namespace cpu
}  // namespace fck
