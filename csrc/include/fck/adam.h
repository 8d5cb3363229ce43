// Adam / AdamW per-element update, shared by the CPU and CUDA kernels.
//
// The sequence of float operations mirrors torch.optim.Adam's single-tensor path (foreach=False) so that fp32 results
// agree to rounding: grad (+ L2 decay) -> exp_avg.lerp_ -> exp_avg_sq.mul_().addcmul_() -> [amsgrad max] ->
// denom = sqrt(v) / sqrt(bc2) + eps -> param.addcdiv_(exp_avg, denom, -step_size). Everything is computed in fp32,
// whatever the storage dtype. fmaf appears exactly where ATen's vectorized CPU kernels fuse (add with alpha, lerp,
// addcmul) and addcdiv is (value * m) / denom as there; the CPU build disables implicit contraction
// (-ffp-contract=off) so nothing else is fused. ATen's CPU sqrt is not always correctly rounded and ours is, so fp32
// results may still differ from torch by an ulp.
#pragma once

#include <cmath>
#include <cstdint>

#include "fck/macros.h"

namespace fck {

// Hyper-parameters shared by every tensor of one launch, pre-converted from the Python doubles exactly where torch
// converts them (a Python scalar becomes a float when it meets a float tensor).
struct AdamHyper {
  float lerp_weight;        // 1 - beta1
  float beta2;
  float one_minus_beta2;    // 1 - beta2
  float eps;
  float weight_decay;       // L2 term added to the gradient (Adam); 0 when decoupled or disabled
  float decay_factor;       // 1 - lr * weight_decay (AdamW); 1 when not decoupled
  float inv_grad_scale;     // 1 / GradScaler scale; 1 when no scaler
  bool maximize;
  bool decoupled;
};

// Depends on the tensor's own step count (params may have skipped steps).
struct AdamStepScalars {
  float neg_step_size;      // -lr / (1 - beta1^step)
  float bc2_sqrt;           // sqrt(1 - beta2^step)
};

inline AdamHyper make_adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                                 bool maximize, bool decoupled, double inv_grad_scale) {
  AdamHyper h;
  h.lerp_weight = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.weight_decay = decoupled ? 0.0f : static_cast<float>(weight_decay);
  h.decay_factor = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  h.inv_grad_scale = static_cast<float>(inv_grad_scale);
  h.maximize = maximize;
  h.decoupled = decoupled;
  return h;
}

// `step` is the count after this update (1 on the first step), as in torch.
inline AdamStepScalars make_adam_step_scalars(double lr, double beta1, double beta2, double step) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  return AdamStepScalars{static_cast<float>(-(lr / bc1)), static_cast<float>(std::sqrt(bc2))};
}

// One element. p is the fp32 value of the parameter (master weight when there is one); m, v, vmax are fp32 state.
template <bool AMSGRAD>
FCK_HOST_DEVICE void adam_element(float& p, float g, float& m, float& v, float& vmax, const AdamHyper& h,
                                  const AdamStepScalars& s) {
  g = g * h.inv_grad_scale;
  if (h.maximize) g = -g;
  if (h.decoupled) {
    p = p * h.decay_factor;
  } else {
    g = fmaf(h.weight_decay, p, g);
  }
  // torch's lerp picks the formula by weight so that weight=1 lands exactly on the end point.
  const float w = h.lerp_weight;
  m = (w < 0.5f) ? fmaf(w, g - m, m) : fmaf(w - 1.0f, g - m, g);
  v = v * h.beta2;
  v = fmaf(h.one_minus_beta2 * g, g, v);
  float vv = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;  // NaN in v propagates through the ternary like torch.maximum
    if (v != v) vmax = v;
    vv = vmax;
  }
  const float denom = sqrtf(vv) / s.bc2_sqrt + h.eps;
  p = p + (s.neg_step_size * m) / denom;
}

}  // namespace fck
