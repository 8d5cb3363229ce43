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
// converts them (a Python scalar becomes a float when it meets a float tensor). Options are folded into values
// (a sign, a factor of 1, a select) rather than branches, so the CPU loops vectorize.
struct AdamHyper {
  float grad_sign;          // -1 when maximizing, else 1 (exact)
  float weight_decay;       // L2 term of Adam, used when the L2 template flag is set
  float decay_factor;       // 1 - lr * weight_decay for AdamW; exactly 1 otherwise
  bool lerp_small;          // torch's lerp formula choice: weight = 1 - beta1 < 0.5
  float lerp_coeff;         // weight, or weight - 1 for the other formula
  float beta2;
  float one_minus_beta2;    // 1 - beta2
  float eps;
  float inv_grad_scale;     // 1 / GradScaler scale; 1 when no scaler
};

// Depends on the tensor's own step count (params may have skipped steps).
struct AdamStepScalars {
  float neg_step_size;      // -lr / (1 - beta1^step)
  float bc2_sqrt;           // sqrt(1 - beta2^step)
};

inline bool adam_uses_l2(double weight_decay, bool decoupled) { return weight_decay != 0.0 && !decoupled; }

inline AdamHyper make_adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                                 bool maximize, bool decoupled, double inv_grad_scale) {
  AdamHyper h;
  h.grad_sign = maximize ? -1.0f : 1.0f;
  h.weight_decay = static_cast<float>(weight_decay);
  h.decay_factor = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  const float w = static_cast<float>(1.0 - beta1);
  h.lerp_small = w < 0.5f;
  h.lerp_coeff = h.lerp_small ? w : w - 1.0f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.inv_grad_scale = static_cast<float>(inv_grad_scale);
  return h;
}

// `step` is the count after this update (1 on the first step), as in torch.
inline AdamStepScalars make_adam_step_scalars(double lr, double beta1, double beta2, double step) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  return AdamStepScalars{static_cast<float>(-(lr / bc1)), static_cast<float>(std::sqrt(bc2))};
}

// One element. p is the fp32 value of the parameter (master weight when there is one); m, v, vmax are fp32 state.
// L2: Adam's coupled weight decay is on (a template flag so that weight_decay=0 leaves non-finite params alone, as
// torch does, without a branch in the loop).
template <bool AMSGRAD, bool L2>
FCK_HOST_DEVICE void adam_element(float& p, float g, float& m, float& v, float& vmax, const AdamHyper& h,
                                  const AdamStepScalars& s) {
  g = g * h.inv_grad_scale * h.grad_sign;
  p = p * h.decay_factor;
  if (L2) g = fmaf(h.weight_decay, p, g);
  m = fmaf(h.lerp_coeff, g - m, h.lerp_small ? m : g);
  v = v * h.beta2;
  v = fmaf(h.one_minus_beta2 * g, g, v);
  float vv = v;
  if (AMSGRAD) {
    vmax = ((vmax != vmax) | (vmax > v)) ? vmax : v;  // NaN-propagating max, like torch.maximum; `|`, not `||`,
                                                       // so the CPU loop stays free of branches
    vv = vmax;
  }
  const float denom = sqrtf(vv) / s.bc2_sqrt + h.eps;
  p = p + (s.neg_step_size * m) / denom;
}

}  // namespace fck
