// fp16 / bf16 <-> fp32 on the host without torch or compiler extensions.
// Round-to-nearest-even, matching torch's own conversions bit for bit on finite values.
#pragma once

#include <cstdint>
#include <cstring>

namespace anchor_kernels {

struct half_bits { uint16_t x; };
struct bfloat16_bits { uint16_t x; };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_float(float v) { return v; }

inline float to_float(bfloat16_bits v) { return bits_float(uint32_t(v.x) << 16); }

inline float to_float(half_bits v) {
  const uint32_t sign = uint32_t(v.x & 0x8000u) << 16;
  const uint32_t exp = (v.x >> 10) & 0x1fu;
  const uint32_t mant = v.x & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float mag = float(mant) * bits_float(0x33800000u);
    return bits_float(float_bits(mag) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename T> T from_float(float f);

template <> inline float from_float<float>(float f) { return f; }

template <> inline bfloat16_bits from_float<bfloat16_bits>(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// F. Giesen's float_to_half_fast3_rtne.
template <> inline half_bits from_float<half_bits>(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t out;
  if (u >= 0x47800000u) {  // >= 65536: inf, or NaN
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // below the smallest normal: let the FPU round the subnormal
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = uint16_t(float_bits(bits_float(u) + bits_float(magic)) - magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    out = uint16_t(u >> 13);
  }
  return {uint16_t(out | sign)};
}

}  // namespace anchor_kernels
