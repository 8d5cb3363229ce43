// Host-side parts of the adam_ op shared by the CPU and CUDA kernels: input guards (a direct torch.ops.fck.adam_
// call must never read or write out of bounds), step counting, and the dispatch from runtime options to kernels.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <vector>

namespace fck {

inline void check_same_layout(const at::Tensor& ref, const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device() == ref.device(), "fck::adam_: ", what, "[", i, "] is on ", t.device(), " but params[", i,
              "] is on ", ref.device());
  TORCH_CHECK(t.sizes().equals(ref.sizes()), "fck::adam_: ", what, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", ref.sizes());
  // A dimension of size 1 never moves the pointer, so its stride is free (a (8, 1, 3, 3) conv weight's gradient may
  // come back with stride 1 or 9 there): the flat element order is the same whenever the other strides agree.
  bool same = true;
  for (int64_t d = 0; d < t.dim(); ++d) same = same && (t.size(d) == 1 || t.stride(d) == ref.stride(d));
  TORCH_CHECK(same, "fck::adam_: ", what, "[", i, "] must have the same strides as params[", i, "]");
}

// Every list holds tensors that line up with params element for element, as dense memory with identical strides, so
// the kernels may treat each tensor as a flat array of numel() elements.
inline void check_adam_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList master_params, at::TensorList state_steps, bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              "fck::adam_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length");
  TORCH_CHECK(max_exp_avg_sqs.size() == (amsgrad ? n : 0),
              "fck::adam_: max_exp_avg_sqs must have one tensor per param when amsgrad=True, none otherwise");
  TORCH_CHECK(master_params.empty() || master_params.size() == n,
              "fck::adam_: master_params must be empty or have one tensor per param");
  if (n == 0) return;
  const auto pdtype = params[0].scalar_type();
  TORCH_CHECK(pdtype == at::kFloat || pdtype == at::kHalf || pdtype == at::kBFloat16,
              "fck::adam_: params must be float32, float16 or bfloat16, got ", pdtype);
  const bool master = !master_params.empty();
  TORCH_CHECK(!master || pdtype != at::kFloat, "fck::adam_: master_params are only for float16/bfloat16 params");
  const auto sdtype = master ? at::kFloat : pdtype;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.scalar_type() == pdtype, "fck::adam_: all params of one call must share a dtype; params[", i,
                "] is ", p.scalar_type(), ", params[0] is ", pdtype);
    TORCH_CHECK(p.device() == params[0].device(), "fck::adam_: all params of one call must be on one device");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fck::adam_: params[", i, "] must be dense (no gaps or overlaps)");
    TORCH_CHECK(!grads[i].is_sparse(), "fck::adam_: sparse gradients are not supported");
    TORCH_CHECK(grads[i].scalar_type() == pdtype, "fck::adam_: grads[", i, "] must have its param's dtype");
    check_same_layout(p, grads[i], "grads", i);
    TORCH_CHECK(exp_avgs[i].scalar_type() == sdtype && exp_avg_sqs[i].scalar_type() == sdtype,
                "fck::adam_: optimizer state of params[", i, "] must be ", sdtype);
    check_same_layout(p, exp_avgs[i], "exp_avgs", i);
    check_same_layout(p, exp_avg_sqs[i], "exp_avg_sqs", i);
    if (amsgrad) {
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == sdtype, "fck::adam_: max_exp_avg_sqs[", i, "] must be ",
                  sdtype);
      check_same_layout(p, max_exp_avg_sqs[i], "max_exp_avg_sqs", i);
    }
    if (master) {
      TORCH_CHECK(master_params[i].scalar_type() == at::kFloat, "fck::adam_: master_params must be float32");
      check_same_layout(p, master_params[i], "master_params", i);
    }
    const auto& s = state_steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1,
                "fck::adam_: state_steps must be one-element float32 CPU tensors (torch.optim.Adam's layout)");
  }
}

// Advances each param's step counter, as torch does before computing bias corrections, and returns the new values.
inline std::vector<double> advance_steps(at::TensorList state_steps) {
  std::vector<double> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    float* s = state_steps[i].data_ptr<float>();
    *s += 1.0f;
    steps[i] = *s;
  }
  return steps;
}

// The compile-time form of one call's options.
template <typename P, bool MASTER, bool AMSGRAD, bool L2>
struct AdamVariant {
  using param_t = P;
  static constexpr bool master = MASTER, amsgrad = AMSGRAD, l2 = L2;
};

// Calls f(AdamVariant<...>{}) for the runtime options: options that change the loop body become template flags, so
// the loops carry no branches. fp32 params never carry master weights, so that combination is not instantiated.
template <typename F>
void dispatch_adam(at::ScalarType dtype, bool master, bool amsgrad, bool l2, F&& f) {
  auto with_flags = [&](auto param_tag, auto master_tag) {
    using P = decltype(param_tag);
    constexpr bool M = decltype(master_tag)::value;
    if (amsgrad && l2) f(AdamVariant<P, M, true, true>{});
    else if (amsgrad) f(AdamVariant<P, M, true, false>{});
    else if (l2) f(AdamVariant<P, M, false, true>{});
    else f(AdamVariant<P, M, false, false>{});
  };
  using yes = std::true_type;
  using no = std::false_type;
  switch (dtype) {
    case at::kFloat: with_flags(float{}, no{}); break;
    case at::kHalf: master ? with_flags(c10::Half{}, yes{}) : with_flags(c10::Half{}, no{}); break;
    case at::kBFloat16: master ? with_flags(c10::BFloat16{}, yes{}) : with_flags(c10::BFloat16{}, no{}); break;
    default: TORCH_CHECK(false, "fck::adam_: unsupported dtype ", dtype);
  }
}

}  // namespace fck
