// Per-element math of the fused LSTM and GRU cells, shared by the CPU loops and the CUDA kernels. `A` is the
// accumulation type: float for fp32/fp16/bf16 storage, double for float64. PyTorch's gate order and equations:
//
// LSTM  (pre-activations p = x W_ih^T + b_ih + h W_hh^T + b_hh, chunks i f g o)
//       i,f,o = sigmoid(p_i,f,o)   g = tanh(p_g)   c' = f c + i g   h' = o tanh(c')
// GRU   (x-part a = x W_ih^T + b_ih, h-part b = h W_hh^T + b_hh, chunks r z n)
//       r = sigmoid(a_r + b_r)   z = sigmoid(a_z + b_z)   n = tanh(a_n + r b_n)   h' = (1 - z) n + z h
//
// The forward saves the activated gates (LSTM: i f g o; GRU: r z n b_n), so the backward evaluates no sigmoid and
// only the LSTM's one tanh(c'), which costs less than storing it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fck/macros.h"

namespace fck {

// exp for float on the host: Cephes' expf polynomial (about 1 ulp on [-87, 88]) in plain arithmetic, so that the
// compiler vectorizes the cell loops (libm's expf is a call it cannot vectorize without -ffast-math). NaN stays NaN:
// the clamps are written as comparisons that are false for NaN. On the GPU, the hardware-backed expf.
FCK_HOST_DEVICE float rnn_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365478515625f ? -87.3365478515625f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: exact IEEE arithmetic, no compare or conversion, so the loop
  // vectorizes on every target (a floor needs SSE4.1 or a select the compiler will not if-convert).
  const float fl = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - fl * 0.693359375f - fl * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fl) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
#endif
}
FCK_HOST_DEVICE double rnn_exp(double x) { return std::exp(x); }

// 1 / d for d >= 1 (here 1 + exp(.)). The CPU divides. On the GPU an IEEE division is its fast path, the
// reciprocal's approximation and one Newton step, behind a range check whose slow path is a call: the check made
// each activation a region of its own, so a thread's four gate activations ran one after another (SASS of the
// persistent LSTM forward: 5 regions in a row on the step's critical path). Here the fast path alone, the same
// correctly rounded result for d < 2^126; a larger d (an exp that overflowed) is clamped to 2^126, giving 2^-126
// where the division gives less (the sigmoid of x < -87). NaN stays NaN: the compare is false for it.
FCK_HOST_DEVICE float rnn_rcp(float d) {
#ifdef __CUDA_ARCH__
  d = d > 0x1p126f ? 0x1p126f : d;
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return fmaf(r, fmaf(-d, r, 1.0f), r);
#else
  return 1.0f / d;
#endif
}
FCK_HOST_DEVICE double rnn_rcp(double d) { return 1.0 / d; }

template <typename A>
FCK_HOST_DEVICE A rnn_sigmoid(A x) {
  return rnn_rcp(A(1) + rnn_exp(-x));
}

// tanh(x) = 2 sigmoid(2x) - 1: the same vectorizable exp; its absolute error stays ~1e-7 near 0. (On the GPU, 2 x
// the correctly rounded 1 / d, which is the correctly rounded 2 / d the CPU divides out.)
FCK_HOST_DEVICE float rnn_tanh(float x) {
#ifdef __CUDA_ARCH__
  return 2.0f * rnn_rcp(1.0f + rnn_exp(-2.0f * x)) - 1.0f;
#else
  return 2.0f / (1.0f + rnn_exp(-2.0f * x)) - 1.0f;
#endif
}
FCK_HOST_DEVICE double rnn_tanh(double x) { return std::tanh(x); }

// ---- LSTM ----

template <typename A>
struct LstmGates {
  A i, f, g, o;
};

// One element of the cell in two halves: the four activations of the pre-activations (independent of each other),
// then the state update, whose tanh(c') waits on three of them. The CPU runs the halves as two loops over a row:
// in one loop body the chain exp -> divide -> c' -> exp -> divide is too long for the out-of-order window to
// overlap iterations (fp32, a lesson-7 step standalone: 10.8 -> 6.5 ns a unit).
template <typename A>
FCK_HOST_DEVICE LstmGates<A> lstm_activate(A pi, A pf, A pg, A po) {
  return {rnn_sigmoid(pi), rnn_sigmoid(pf), rnn_tanh(pg), rnn_sigmoid(po)};
}

template <typename A>
FCK_HOST_DEVICE void lstm_state(const LstmGates<A>& a, A c_prev, A& c, A& h) {
  c = a.f * c_prev + a.i * a.g;
  h = a.o * rnn_tanh(c);
}

// One element of the cell: pre-activations and the previous cell state in; activated gates, c' and h' out.
template <typename A>
FCK_HOST_DEVICE LstmGates<A> lstm_forward(A pi, A pf, A pg, A po, A c_prev, A& c, A& h) {
  const LstmGates<A> a = lstm_activate(pi, pf, pg, po);
  lstm_state(a, c_prev, c, h);
  return a;
}

// Its backward: dh (the gradient reaching h' from the output and the next step) and dc (reaching c' from the next
// step) in; the pre-activation gradients out, and dc becomes the gradient of c_prev.
template <typename A>
FCK_HOST_DEVICE LstmGates<A> lstm_backward(A dh, A& dc, LstmGates<A> a, A c_prev, A c) {
  const A tc = rnn_tanh(c);
  const A dct = dc + dh * a.o * (A(1) - tc * tc);
  LstmGates<A> d{dct * a.g * a.i * (A(1) - a.i), dct * c_prev * a.f * (A(1) - a.f), dct * a.i * (A(1) - a.g * a.g),
                 dh * tc * a.o * (A(1) - a.o)};
  dc = dct * a.f;
  return d;
}

// ---- GRU ----

// The saved values of one element: r, z, n and b_n (the h-part of the n gate, before r scales it).
template <typename A>
struct GruSaved {
  A r, z, n, bn;
};

// In two halves, as the LSTM's: r and z, then n (which waits on r) and h'. The CPU runs them as two loops.
template <typename A>
FCK_HOST_DEVICE void gru_gates(A ar, A az, A br, A bz, A& r, A& z) {
  r = rnn_sigmoid(ar + br);
  z = rnn_sigmoid(az + bz);
}

// n and h' from r, z, the n gate's x-part and h-part (bn), and the previous state.
template <typename A>
FCK_HOST_DEVICE A gru_state(A r, A z, A an, A bn, A h_prev, A& h) {
  const A n = rnn_tanh(an + r * bn);
  h = n + z * (h_prev - n);
  return n;
}

template <typename A>
FCK_HOST_DEVICE GruSaved<A> gru_forward(A ar, A az, A an, A br, A bz, A bn, A h_prev, A& h) {
  GruSaved<A> s{A(0), A(0), A(0), bn};
  gru_gates(ar, az, br, bz, s.r, s.z);
  s.n = gru_state(s.r, s.z, an, bn, h_prev, h);
  return s;
}

// Gradients of one element's x-part and h-part pre-activations; the x-part and h-part gradients of r and z are the
// same value, of n they differ by the factor r.
template <typename A>
struct GruGrads {
  A r, z, an, bn, h_prev;  // h_prev: the direct path z * dh, without the W_hh term
};

template <typename A>
FCK_HOST_DEVICE GruGrads<A> gru_backward(A dh, GruSaved<A> s, A h_prev) {
  const A dn = dh * (A(1) - s.z) * (A(1) - s.n * s.n);
  const A dz = dh * (h_prev - s.n) * s.z * (A(1) - s.z);
  const A dr = dn * s.bn * s.r * (A(1) - s.r);
  return GruGrads<A>{dr, dz, dn, dn * s.r, dh * s.z};
}

}  // namespace fck
