// cuda-emu: __half as its 16 bits, converted with the project's host conversions (round to
// nearest even, as __float2half_rn).
#pragma once

#include <cstdint>

#include "cuda_runtime.h"
#include "dtype_convert.h"

struct __half {
  uint16_t bits;
};
inline float __half2float(__half v) { return anchor_kernels::to_float(anchor_kernels::half_bits{v.bits}); }
inline __half __float2half_rn(float v) { return {anchor_kernels::from_float<anchor_kernels::half_bits>(v).x}; }
