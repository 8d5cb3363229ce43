// Per-element and per-channel math of batch norm (+ residual add, + ReLU), shared by the CPU loops and the CUDA
// kernels. `A` is the accumulation type: float for fp32/fp16/bf16 storage, double for float64.
//
// Forward:  z = (x - mean) * k + beta [+ residual],  y = relu ? max(z, 0) : z,   k = gamma * invstd
// Backward: g = relu ? (y > 0 ? dy : 0) : dy        (the ReLU mask comes from the saved output, no pre-activation)
//           dx = (g - mean_g - (x - mean) * c) * k   with mean_g = sum(g)/M, c = invstd^2 * sum(g (x - mean))/M
//           (mean_g = c = 0 in eval mode, where the statistics are constants), dgamma = invstd * sum(g (x - mean)),
//           dbeta = sum(g), dresidual = g.
#pragma once

#include <cmath>

#include "fck/macros.h"

namespace fck {

// Chan et al.'s merge of partial (count, mean, M2) statistics: exact for any split of the data and free of the
// cancellation that sum/sum-of-squares suffers when |mean| >> std.
template <typename A>
FCK_HOST_DEVICE void welford_merge(A& n, A& mean, A& m2, A n_b, A mean_b, A m2_b) {
  const A total = n + n_b;
  if (total == A(0)) return;
  const A delta = mean_b - mean;
  const A w_b = n_b / total;
  mean += delta * w_b;
  m2 += m2_b + delta * delta * n * w_b;
  n = total;
}

template <typename A>
FCK_HOST_DEVICE A bn_invstd(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// Exponential moving average of a running statistic, torch's formula.
template <typename A>
FCK_HOST_DEVICE A bn_running(A old, A batch, A momentum) {
  return old * (A(1) - momentum) + batch * momentum;
}

// The forward's scale gamma * invstd, from invstd as the saved statistics hold it (rounded to A), so that a
// backward recomputing the pre-activation from the saved statistics gets the forward's very value.
template <typename A>
FCK_HOST_DEVICE A forward_k(double gamma, double invstd) {
  return A(gamma * double(A(invstd)));
}

template <typename A>
FCK_HOST_DEVICE A bn_normalize(A x, A mean, A k, A beta) {
  return (x - mean) * k + beta;
}

// NaN stays NaN, as torch.relu does.
template <typename A>
FCK_HOST_DEVICE A bn_relu(A z) {
  return z < A(0) ? A(0) : z;
}

// The gradient through the ReLU, recovered from its output y (torch's threshold_backward: zero where y <= 0).
template <typename A>
FCK_HOST_DEVICE A bn_relu_grad(A dy, A y) {
  return y <= A(0) ? A(0) : dy;
}

// c is 0 in eval mode, where dx does not depend on x: an inf or NaN x must not make it NaN (as (x - mean) * 0
// would). In training c is 0 only with finite statistics and then the term is 0 anyway, so the select changes no
// value torch's formula gives.
template <typename A>
FCK_HOST_DEVICE A bn_grad_input(A g, A x, A mean, A k, A mean_g, A c) {
  return c == A(0) ? (g - mean_g) * k : (g - mean_g - (x - mean) * c) * k;
}

// Per-channel coefficients of the backward from the two reductions sum(g) and sum(g (x - mean)).
template <typename A>
struct BnBackwardCoef {
  A k, mean_g, c, dweight, dbias;
};

template <typename A>
FCK_HOST_DEVICE BnBackwardCoef<A> bn_backward_coef(bool training, A count, A sum_g, A sum_gxm, A invstd,
                                                   A gamma) {
  BnBackwardCoef<A> r;
  r.k = gamma * invstd;
  r.dbias = sum_g;
  r.dweight = sum_gxm * invstd;
  r.mean_g = training ? sum_g / count : A(0);
  r.c = training ? sum_gxm * invstd * invstd / count : A(0);
  return r;
}

}  // namespace fck
