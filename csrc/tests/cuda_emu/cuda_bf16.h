// cuda-emu: __nv_bfloat16 as its 16 bits (round to nearest even, as __float2bfloat16_rn).
#pragma once

#include <cstdint>

#include "cuda_runtime.h"
#include "dtype_convert.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  return anchor_kernels::to_float(anchor_kernels::bfloat16_bits{v.bits});
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  return {anchor_kernels::from_float<anchor_kernels::bfloat16_bits>(v).x};
}
