// fp16/bf16 <-> fp32 conversions for CPU loops, written as branch-free integer and float arithmetic so that the
// compiler vectorizes them (c10::Half's and c10::BFloat16's own conversions keep a loop scalar: 6-20x slower).
// Both round to nearest even, as torch does, and keep NaN a NaN.
#pragma once

#include <cstdint>
#include <cstring>

#include "fck/macros.h"

namespace fck {
namespace cpu_float {

FCK_HOST_DEVICE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FCK_HOST_DEVICE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// cond ? a : b, as arithmetic: the vectorizer treats a ternary on integers as control flow.
FCK_HOST_DEVICE uint32_t select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

FCK_HOST_DEVICE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

FCK_HOST_DEVICE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select(f != f, 0x7FC0u, rounded));
}

// IEEE half -> float, exact for every input (normals, subnormals, zeros, infinities, NaNs).
FCK_HOST_DEVICE float fp16_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;  // exponent and mantissa in float position
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;                                   // rebias the exponent
  const uint32_t inf_nan = o + ((128u - 16u) << 23);         // exponent all ones stays all ones
  // Subnormal or zero: renormalize through a float subtraction (exact).
  const float sub = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
  const uint32_t r = select(exp == shifted_exp, inf_nan, select(exp == 0, float_to_bits(sub), o));
  return bits_to_float(r | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

// float -> IEEE half, round to nearest even; overflow to infinity; NaN -> quiet NaN.
FCK_HOST_DEVICE uint16_t float_to_fp16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u & 0x80000000u) >> 16;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Subnormal result: adding a magic float aligns the 10 mantissa bits at the bottom, rounding to nearest even.
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sub = float_to_bits(bits_to_float(a) + bits_to_float(denorm_magic)) - denorm_magic;
  // Normal result: rebias, and round to nearest even on the 13 dropped bits.
  const uint32_t norm = (a + ((15u - 127u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t big = select(a > (255u << 23), 0x7E00u, 0x7C00u);  // NaN or infinity
  const uint32_t r = select(a >= ((127u + 16u) << 23), big, select(a < (113u << 23), sub, norm));
  return static_cast<uint16_t>(r | sign);
}

}  // namespace cpu_float
}  // namespace fck
