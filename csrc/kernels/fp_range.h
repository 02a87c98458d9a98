// Norms and quadratic forms that stay in fp32's range (issue 20, items 6 and 9), shared by the
// CPU and CUDA kernels (host and device). The scaling is by powers of two, so wherever nothing
// under- or overflows it changes no bit of the result; it only decides what happens where the
// plain fp32 form would have over- or underflowed.
//
// - ||x|| of a d-vector (hidden rows, u = W_A^T w): the plain fp32 sum of squares, and only where
//   it fell outside [kSquaresMin, FLT_MAX] a second pass over x * 2^k (2^64 for a sum that
//   underflowed, 2^-80 for one that overflowed): no work is added to the d-loops of ordinary rows.
// - v^T Gm v of a K-vector (the trust region's c, the relative step's s): v is first scaled by
//   2^-x so that max|v| < 2^-kb with 2^kb >= K; then no partial sum of Gm v or of v . Gm v can
//   overflow for any finite Gram, and the result keeps fp32 accuracy for Gram diagonals down to
//   kGramDiagMin (the smallest nonzero ||W_a||^2 a set may have).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__host__)  // nvcc, or the CUDA emulator's headers
#define AK_HOST_DEVICE __host__ __device__ inline
#else
#define AK_HOST_DEVICE inline
#endif

namespace anchor_kernels {

constexpr float kFloatMax = 3.40282347e38f;
// A sum of squares below this is recomputed scaled: squares below 2^-126 flush or lose bits.
constexpr float kSquaresMin = 0x1p-64f;
// A live anchor row's squared norm (its Gram diagonal) must be 0 or in [kGramDiagMin, FLT_MAX]:
// below it the fp32 Gram and its quadratic forms lose their accuracy, above it the Gram is not
// finite. A set with another diagonal cannot steer: its rows are left untouched.
constexpr float kGramDiagMin = 0x1p-80f;

AK_HOST_DEVICE bool gram_diag_ok(float diag) {
  return diag == 0.f || (diag >= kGramDiagMin && diag <= kFloatMax);
}

AK_HOST_DEVICE bool squares_in_range(float sum_sq) { return sum_sq >= kSquaresMin && sum_sq <= kFloatMax; }

// The factor by which x is scaled for the second pass when its sum of squares was out of range.
AK_HOST_DEVICE float squares_rescale(float sum_sq) { return sum_sq < kSquaresMin ? 0x1p64f : 0x1p-80f; }

// 2^e, exactly, for e in [-126, 127].
AK_HOST_DEVICE float pow2(int e) {
  const uint32_t bits = uint32_t(e + 127) << 23;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// The smallest kb <= 26 with 2^kb >= K.
AK_HOST_DEVICE int size_bits(int64_t K) {
  int kb = 0;
  while (kb < 26 && (int64_t(1) << kb) < K) ++kb;
  return kb;
}

// x such that max_abs * 2^-x < 2^-kb: x = E + kb for max_abs in [2^(E-1), 2^E), E clamped to
// [-100, 100] (so 2^-x and 2^x are normal floats; 0, inf and NaN give finite x).
AK_HOST_DEVICE int quadratic_exponent(float max_abs, int kb) {
  uint32_t bits;
  memcpy(&bits, &max_abs, 4);
  int e = int((bits >> 23) & 0xffu) - 126;
  e = e < -100 ? -100 : (e > 100 ? 100 : e);
  return e + kb;
}

// The relative step eta ||h0|| / ||grad G(h0)|| from q = ||grad G(h0)||^2 2^-2x. ||h0|| is scaled
// by 2^-x before the division where that loses no bits (||h0|| >= 1, x >= 0), so that no
// intermediate overflows where the step itself is representable (hidden rows near 2^88 with
// anchor rows near 2^-35 had: eta ||h0|| / sqrt(q) passed 2^128 before its 2^-x); after it
// elsewhere, so that a tiny ||h0|| does not go subnormal first. triton_steer.py and kspace.py
// hold the same rule.
AK_HOST_DEVICE float relative_eta(float eta, float h_norm, float q, int x) {
  const float root = sqrtf(q);
  if (h_norm >= 1.f && x >= 0) return eta * (h_norm * pow2(-x)) / root;
  return eta * h_norm / root * pow2(-x);
}

}  // namespace anchor_kernels
