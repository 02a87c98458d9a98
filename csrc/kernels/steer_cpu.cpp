// CPU implementation of the anchor steering kernel (torch-free; see steer.h).
// Serves the torch CPU backend, the C API for engines, and the CUDA test program's oracle.
#include "anchor_kernels/steer.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dtype_convert.h"
#include "fp_range.h"
#include "loop_params.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using anchor_kernels::to_float;
using anchor_kernels::from_float;
using anchor_kernels::loop_params;
using anchor_kernels::kFloatMax;

float dot_portable(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

void axpy_portable(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

#if defined(__GNUC__) && defined(__x86_64__)
// The wheel targets baseline x86-64 (SSE2); these AVX2+FMA versions of the two hot loops are
// picked at run time where the CPU has them (2-3x on the decode shapes).
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), acc3);
  }
  for (; j + 8 <= n; j += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  float acc = _mm_cvtss_f32(half);
  for (; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  for (; j < n; ++j) y[j] += alpha * x[j];
}

bool have_avx2() {
  static const bool have = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  return have;
}
float dot(const float* a, const float* b, int64_t n) {
  return have_avx2() ? dot_avx2(a, b, n) : dot_portable(a, b, n);
}
void axpy(float alpha, const float* x, float* y, int64_t n) {
  have_avx2() ? axpy_avx2(alpha, x, y, n) : axpy_portable(alpha, x, y, n);
}
#else
float dot(const float* a, const float* b, int64_t n) { return dot_portable(a, b, n); }
void axpy(float alpha, const float* x, float* y, int64_t n) { axpy_portable(alpha, x, y, n); }
#endif

// G(z) and s = dG/dz for one set (METHOD.md "The value gap"). Padding (w == 0) gets s = 0.
float gap_and_grad(const float* z, const float* w, const float* log_w, int64_t K,
                   bool lse, float tau, float* s) {
  if (!lse) {
    float gap = 0.f;
    for (int64_t i = 0; i < K; ++i) {
      gap += w[i] * z[i];
      s[i] = w[i];
    }
    return gap;
  }
  const float inf = std::numeric_limits<float>::infinity();
  float max_pos = -inf, max_neg = -inf;
  for (int64_t i = 0; i < K; ++i) {
    if (w[i] == 0.f) continue;
    const float a = z[i] / tau + log_w[i];
    if (w[i] > 0.f) max_pos = std::fmax(max_pos, a);
    else max_neg = std::fmax(max_neg, a);
  }
  float sum_pos = 0.f, sum_neg = 0.f;
  for (int64_t i = 0; i < K; ++i) {
    if (w[i] == 0.f) { s[i] = 0.f; continue; }
    const float a = z[i] / tau + log_w[i];
    s[i] = std::exp(a - (w[i] > 0.f ? max_pos : max_neg));
    if (w[i] > 0.f) sum_pos += s[i];
    else sum_neg += s[i];
  }
  for (int64_t i = 0; i < K; ++i) {
    if (w[i] > 0.f) s[i] /= sum_pos;
    else if (w[i] < 0.f) s[i] = -s[i] / sum_neg;
  }
  return tau * ((max_pos + std::log(sum_pos)) - (max_neg + std::log(sum_neg)));
}

// Per-row values are not host-checked on every path (direct op calls, device tensors): a step
// that is not finite and > 0 would write NaN rows or steer backwards, and a norm that is not
// finite and >= 0 would flip or disable the trust region. Such a row is left untouched.
bool usable_step(float eta) { return eta > 0.f && std::isfinite(eta); }
bool usable_row(const ak_steer_params& p, float eta, float h0_norm) {
  const bool needs_norm = std::isfinite(p.max_norm) || p.relative_step;
  return usable_step(eta) && (!needs_norm || (h0_norm >= 0.f && std::isfinite(h0_norm)));
}

// A set with a non-finite anchor row of W (its Gram diagonal, ||W_a||^2, is not finite), or one
// whose squared norm fp32 cannot hold to its accuracy (nonzero below kGramDiagMin, or past
// FLT_MAX: fp_range.h), cannot steer: every backend leaves the rows using it untouched (the
// Python API refuses such a set where it can check without a device sync).
bool finite_set(const float* gram, const float* w, int64_t K) {
  for (int64_t i = 0; i < K; ++i)
    if (w[i] != 0.f && !anchor_kernels::gram_diag_ok(gram[i * K + i])) return false;
  return true;
}

// ||x|| without over- or underflow of the squares (fp_range.h): `sum_sq` is the plain fp32 sum
// of squares, recomputed from scaled values only where it is out of range.
float robust_norm(const float* x, int64_t n, float sum_sq) {
  if (anchor_kernels::squares_in_range(sum_sq)) return std::sqrt(sum_sq);
  const float f = anchor_kernels::squares_rescale(sum_sq);
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j] * f;
    acc += v * v;
  }
  return std::sqrt(acc) / f;
}

// v^T Gm v of v scaled by 2^-x (fp_range.h): writes the scaled v to `vs` and returns its
// quadratic form (its square root is ||W_A^T v|| * 2^-x); `x` gets the exponent.
float scaled_quadratic(const float* gram, const float* v, float* vs, int64_t K, int kb, int* x) {
  float m = 0.f;
  for (int64_t i = 0; i < K; ++i) m = std::fmax(m, std::fabs(v[i]));
  *x = anchor_kernels::quadratic_exponent(m, kb);
  const float scale = anchor_kernels::pow2(-*x);
  for (int64_t i = 0; i < K; ++i) vs[i] = v[i] * scale;
  float q = 0.f;
  for (int64_t i = 0; i < K; ++i) q += vs[i] * dot(gram + i * K, vs, K);
  return q;
}

// Whether h0 + W_A^T c can be formed in fp32 (issue 20, item 6): every coefficient finite and
// sum_k |c_k| ||W_a_k|| (which bounds every partial sum of the edit) within FLT_MAX. A row that
// fails, whose step or edit fp32 cannot represent (a huge eta without a trust region, or eta
// lambda c past FLT_MAX), is left untouched, never written as inf or NaN.
bool representable_edit(const float* c, const float* gram, int64_t K) {
  float bound = 0.f;
  for (int64_t i = 0; i < K; ++i)
    if (c[i] != 0.f) bound += std::fabs(c[i]) * std::sqrt(gram[i * K + i]);
  return bound <= kFloatMax;  // false for inf and NaN
}

// The T-step K-space loop. Returns whether c ended anywhere nonzero (and representable).
// `vs` is scratch [K]. The relative step's ||grad G(h0)|| and the trust region's ||h - h0|| are
// quadratic forms of vectors scaled by a power of two first (fp_range.h): a huge step (eta up to
// FLT_MAX) or a huge or tiny ||h0|| neither overflows them nor makes them 0.
bool solve_coefficients(const ak_steer_params& p, const float* z0, const float* w,
                        const float* log_w, const float* gram, float eta, float h0_norm,
                        float* c, float* z, float* s, float* vs) {
  const int64_t K = p.set_size;
  const bool lse = p.objective == AK_OBJECTIVE_LSE;
  const bool trust = std::isfinite(p.max_norm);
  const float limit = p.max_norm * h0_norm;
  const int kb = anchor_kernels::size_bits(K);
  int x = 0;
  std::fill(c, c + K, 0.f);
  if (!usable_row(p, eta, h0_norm) || !finite_set(gram, w, K)) return false;
  if (p.relative_step) {
    // ||grad G(h0)|| = sqrt(s0^T Gm s0): the step is scaled so the first one moves h by eta ||h0||.
    gap_and_grad(z0, w, log_w, K, lse, p.temperature, s);
    const float q = scaled_quadratic(gram, s, vs, K, kb, &x);  // ||grad G(h0)||^2 * 2^-2x
    eta = q > 0.f && std::isfinite(q) ? anchor_kernels::relative_eta(eta, h0_norm, q, x) : 0.f;
    if (!(std::isfinite(eta) && eta > 0.f)) return false;
  }
  for (int64_t t = 0; t < p.steps; ++t) {
    for (int64_t i = 0; i < K; ++i) z[i] = z0[i] + dot(gram + i * K, c, K);
    const float gap = gap_and_grad(z, w, log_w, K, lse, p.temperature, s);
    // A non-finite gap (non-finite hidden row) freezes the row: it comes out unchanged.
    if (!(std::isfinite(gap) && gap < p.margin)) continue;
    for (int64_t i = 0; i < K; ++i) c[i] += eta * (s[i] - p.reg * c[i]);
    if (trust) {
      // ||h - h0|| * 2^-x = sqrt(q) with q the quadratic form of c * 2^-x: past the limit c is
      // the scaled c times limit / sqrt(q), else it is scaled back (exactly), as in the CUDA and
      // Triton kernels. No product of huge or tiny numbers on the way.
      const float n = std::sqrt(scaled_quadratic(gram, c, vs, K, kb, &x));
      const float r = n > limit * anchor_kernels::pow2(-x) ? limit / n : anchor_kernels::pow2(x);
      for (int64_t i = 0; i < K; ++i) c[i] = vs[i] * r;
    }
  }
  bool moved = false;
  for (int64_t i = 0; i < K; ++i) moved |= c[i] != 0.f;
  return moved && representable_edit(c, gram, K);
}

template <typename T>
ak_status steer_rows(const ak_steer_params& p, int64_t row_begin, int64_t row_end) {
  const int64_t K = p.set_size, d = p.dim;
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  std::vector<float> h(d), acc(d), z0(K), z(K), s(K), c(K), log_w(K), vs(K);
  std::vector<const float*> rows(K);
  // 16-bit anchor rows as fp32, converted once per set per call (not per row); fp32 rows are
  // read in place.
  std::vector<std::vector<float>> rows_of_set(p.num_sets);
  auto anchor_rows = [&](int64_t set) {
    const int64_t* ids = p.anchor_ids + set * K;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < K; ++i) rows[i] = weight + ids[i] * p.weight_row_stride;
      return;
    }
    std::vector<float>& buf = rows_of_set[set];
    if (buf.empty()) {
      buf.resize(K * d);
      for (int64_t i = 0; i < K; ++i) {
        const T* src = weight + ids[i] * p.weight_row_stride;
        for (int64_t j = 0; j < d; ++j) buf[i * d + j] = to_float(src[j]);
      }
    }
    for (int64_t i = 0; i < K; ++i) rows[i] = buf.data() + i * d;
  };

  // objective = "mean" is rank one (METHOD.md): s = w is constant, so c_k = a_k w and the edit
  // is a_T u with u = W_A^T w (p.direction, or summed here once per set per call), ||u|| (=
  // sqrt(w^T Gm w), without squaring past fp32's range) and w.b_A once per set per call. A row
  // then costs one dot and one axpy over d instead of K of each, and a scalar loop in which
  // gamma = ||u||^2 is never formed: gap = gap0 + (a ||u||) ||u||, the trust region
  // |a| ||u|| <= rho ||h0||.
  std::vector<std::vector<float>> u_of_set(p.num_sets);
  std::vector<const float*> direction_of_set(p.num_sets, nullptr);
  std::vector<float> unorm_of_set(p.num_sets), beta_of_set(p.num_sets), wb_of_set(p.num_sets);
  auto mean_coefficient = [&](int64_t set, const float* w, const int64_t* ids, const float* h0,
                              float h0_norm, float eta) -> float {
    const float*& u = direction_of_set[set];
    const float* gram = p.gram + set * K * K;
    if (!u) {
      std::vector<float>& sum = u_of_set[set];
      if (!p.direction) sum.assign(d, 0.f);
      float wb = 0.f, beta = 0.f;
      for (int64_t i = 0; i < K; ++i) {
        if (w[i] == 0.f) continue;
        if (!p.direction) axpy(w[i], rows[i], sum.data(), d);
        beta += std::fabs(w[i]) * std::sqrt(gram[i * K + i]);
        if (bias) wb += w[i] * to_float(bias[ids[i]]);
      }
      u = p.direction ? p.direction + set * d : sum.data();
      unorm_of_set[set] = robust_norm(u, d, dot(u, u, d));
      beta_of_set[set] = beta;  // representable_edit's bound for c = a w is |a| beta
      wb_of_set[set] = wb;
    }
    if (!usable_row(p, eta, h0_norm) || !finite_set(gram, w, K)) return 0.f;
    const float unorm = unorm_of_set[set];
    const float gap0 = dot(u, h0, d) + wb_of_set[set];
    if (p.relative_step) {  // ||grad G|| = ||u||
      eta = unorm > 0.f && std::isfinite(unorm) ? eta * h0_norm / unorm : 0.f;
      if (!(std::isfinite(eta) && eta > 0.f)) return 0.f;
    }
    const bool trust = std::isfinite(p.max_norm);
    const float limit = p.max_norm * h0_norm;
    float a = 0.f;
    for (int64_t t = 0; t < p.steps; ++t) {
      const float gap = gap0 + a * unorm * unorm;
      if (!(std::isfinite(gap) && gap < p.margin)) continue;
      a += eta * (1.f - p.reg * a);
      if (trust && std::fabs(a) * unorm > limit) a = std::copysign(limit / unorm, a);
    }
    return std::fabs(a) * beta_of_set[set] <= kFloatMax ? a : 0.f;
  };

  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* h_in = static_cast<const T*>(p.hidden) + r * p.hidden_row_stride;
    T* h_out = static_cast<T*>(p.out) + r * p.out_row_stride;
    const int64_t set = p.row_sets[r];
    if (set < -1 || set >= p.num_sets) return AK_ERROR_ROW_SET;
    const float eta = p.step_size[r];
    if (set < 0 || p.steps == 0 || !usable_step(eta)) {
      std::memcpy(h_out, h_in, d * sizeof(T));
      continue;
    }
    const int64_t* ids = p.anchor_ids + set * K;
    const float* w = p.anchor_weights + set * K;
    for (int64_t i = 0; i < K; ++i)
      if (ids[i] < 0 || ids[i] >= p.vocab) return AK_ERROR_ANCHOR_ID;
    if (p.objective != AK_OBJECTIVE_MEAN || !p.direction) anchor_rows(set);  // u needs no rows

    for (int64_t j = 0; j < d; ++j) h[j] = to_float(h_in[j]);
    const float h0_norm = robust_norm(h.data(), d, dot(h.data(), h.data(), d));
    if (p.objective == AK_OBJECTIVE_MEAN) {
      const float a = mean_coefficient(set, w, ids, h.data(), h0_norm, eta);
      if (a == 0.f) {
        std::memcpy(h_out, h_in, d * sizeof(T));
        continue;
      }
      const float* u = direction_of_set[set];
      for (int64_t j = 0; j < d; ++j) h_out[j] = from_float<T>(h[j] + a * u[j]);
      continue;
    }
    for (int64_t i = 0; i < K; ++i) {
      log_w[i] = w[i] == 0.f ? 0.f : std::log(std::fabs(w[i]));
      z0[i] = w[i] == 0.f ? 0.f : dot(rows[i], h.data(), d);
      if (bias && w[i] != 0.f) z0[i] += to_float(bias[ids[i]]);
    }
    const bool moved = solve_coefficients(p, z0.data(), w, log_w.data(), p.gram + set * K * K,
                                          eta, h0_norm, c.data(), z.data(), s.data(), vs.data());
    if (!moved) {
      std::memcpy(h_out, h_in, d * sizeof(T));
      continue;
    }
    // The edit W_A^T c is summed on its own before it meets h0: adding K terms onto h0 one at
    // a time would round each against |h0|, which is far larger than the edit.
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t i = 0; i < K; ++i)
      if (c[i] != 0.f) axpy(c[i], rows[i], acc.data(), d);
    for (int64_t j = 0; j < d; ++j) h_out[j] = from_float<T>(h[j] + acc[j]);
  }
  return AK_OK;
}


template <typename T>
ak_status solve_logit_rows(const ak_logits_params& q, int64_t row_begin, int64_t row_end,
                           float* coef, uint8_t* moved) {
  const int64_t K = q.set_size, V = q.vocab;
  const ak_steer_params p = loop_params(q);
  std::vector<float> z0(K), z(K), s(K), log_w(K), vs(K);
  for (int64_t r = row_begin; r < row_end; ++r) {
    moved[r] = 0;
    const int64_t set = q.row_sets[r];
    if (set < -1 || set >= q.num_sets) return AK_ERROR_ROW_SET;
    const float eta = q.step_size[r];
    if (set < 0 || q.steps == 0 || !usable_step(eta)) continue;  // untouched and unread
    const T* row = static_cast<const T*>(q.logits) + r * q.logits_row_stride;
    const int64_t* ids = q.anchor_ids + set * K;
    const float* w = q.anchor_weights + set * K;
    for (int64_t i = 0; i < K; ++i) {
      if (w[i] != 0.f && (ids[i] < 0 || ids[i] >= V)) return AK_ERROR_ANCHOR_ID;
      log_w[i] = w[i] == 0.f ? 0.f : std::log(std::fabs(w[i]));
      z0[i] = w[i] == 0.f ? 0.f : to_float(row[ids[i]]);
    }
    const float norm = q.hidden_norm ? q.hidden_norm[r] : 0.f;
    moved[r] = solve_coefficients(p, z0.data(), w, log_w.data(), q.gram + set * K * K, eta, norm,
                                  coef + r * K, z.data(), s.data(), vs.data());
  }
  return AK_OK;
}

// Vocabulary entries [v_begin, v_end) of every moved row, in tiles of kLogitTile entries: M is
// [S, K, V], so the edit of a tile is K axpys into an fp32 accumulator per row (no horizontal
// sums), and each tile of M is read once, from cache, for all the rows of its set.
constexpr int64_t kLogitTile = 2048;

template <typename T, typename TM>
void apply_logit_rows(const ak_logits_params& q, const float* coef, const uint8_t* moved,
                      int64_t v_begin, int64_t v_end) {
  const int64_t K = q.set_size, V = q.vocab;
  std::vector<int64_t> rows;
  std::vector<float> acc, widened(std::is_same_v<TM, float> ? 0 : kLogitTile);
  for (int64_t set = 0; set < q.num_sets; ++set) {
    rows.clear();
    for (int64_t r = 0; r < q.rows; ++r)
      if (moved[r] && q.row_sets[r] == set) rows.push_back(r);
    if (rows.empty()) continue;
    acc.resize(rows.size() * kLogitTile);
    const TM* m = static_cast<const TM*>(q.mixing) + set * K * V;
    for (int64_t v0 = v_begin; v0 < v_end; v0 += kLogitTile) {
      const int64_t n = std::min(kLogitTile, v_end - v0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float* mk;
        if constexpr (std::is_same_v<TM, float>) {
          mk = m + k * V + v0;
        } else {  // a 16-bit M: widened once per tile for all the rows of its set
          for (int64_t v = 0; v < n; ++v) widened[v] = to_float(m[k * V + v0 + v]);
          mk = widened.data();
        }
        for (size_t i = 0; i < rows.size(); ++i) {
          const float ck = coef[rows[i] * K + k];
          if (ck != 0.f) axpy(ck, mk, acc.data() + i * kLogitTile, n);
        }
      }
      for (size_t i = 0; i < rows.size(); ++i) {
        T* row = static_cast<T*>(q.logits) + rows[i] * q.logits_row_stride + v0;
        const float* a = acc.data() + i * kLogitTile;
        for (int64_t v = 0; v < n; ++v) row[v] = from_float<T>(to_float(row[v]) + a[v]);
      }
    }
  }
}

template <typename T>
ak_status apply_logit_rows_in(const ak_logits_params& q, const float* coef, const uint8_t* moved,
                              int64_t v_begin, int64_t v_end) {
  switch (q.mixing_dtype) {
    case AK_FLOAT32: apply_logit_rows<T, float>(q, coef, moved, v_begin, v_end); return AK_OK;
    case AK_FLOAT16: apply_logit_rows<T, anchor_kernels::half_bits>(q, coef, moved, v_begin, v_end); return AK_OK;
    case AK_BFLOAT16: apply_logit_rows<T, anchor_kernels::bfloat16_bits>(q, coef, moved, v_begin, v_end); return AK_OK;
  }
  return AK_ERROR_INVALID_ARGUMENT;
}

}  // namespace

extern "C" ak_status ak_steer_logits_check_params(const ak_logits_params* q) {
  if (!q) return AK_ERROR_INVALID_ARGUMENT;
  ak_steer_params p = loop_params(*q);
  p.dtype = q->dtype;
  p.rows = 0;  // shapes and config through the hidden-state check; pointers below
  p.dim = 1;
  p.vocab = q->vocab;
  p.num_sets = q->num_sets;
  const bool needs_norm = std::isfinite(q->max_norm) || q->relative_step;
  const bool ok = ak_steer_check_params(&p) == AK_OK && q->rows >= 0 &&
                  (q->rows <= 1 || q->logits_row_stride >= q->vocab) &&
                  (!needs_norm || q->hidden_norm) &&
                  (q->mixing_dtype == AK_FLOAT32 || q->mixing_dtype == AK_FLOAT16 ||
                   q->mixing_dtype == AK_BFLOAT16) &&
                  (q->rows == 0 || (q->logits && q->mixing && q->anchor_ids && q->anchor_weights &&
                                    q->gram && q->row_sets && q->step_size));
  return ok ? AK_OK : AK_ERROR_INVALID_ARGUMENT;
}

extern "C" ak_status ak_steer_logits_solve_cpu(const ak_logits_params* q, int64_t row_begin,
                                               int64_t row_end, float* coef, uint8_t* moved) {
  const ak_status st = ak_steer_logits_check_params(q);
  if (st != AK_OK) return st;
  if (row_begin < 0 || row_end > q->rows || row_begin > row_end || !coef || !moved)
    return AK_ERROR_INVALID_ARGUMENT;
  switch (q->dtype) {
    case AK_FLOAT32: return solve_logit_rows<float>(*q, row_begin, row_end, coef, moved);
    case AK_FLOAT16: return solve_logit_rows<anchor_kernels::half_bits>(*q, row_begin, row_end, coef, moved);
    case AK_BFLOAT16: return solve_logit_rows<anchor_kernels::bfloat16_bits>(*q, row_begin, row_end, coef, moved);
  }
  return AK_ERROR_INVALID_ARGUMENT;
}

extern "C" ak_status ak_steer_logits_apply_cpu(const ak_logits_params* q, const float* coef,
                                               const uint8_t* moved, int64_t v_begin, int64_t v_end) {
  const ak_status st = ak_steer_logits_check_params(q);
  if (st != AK_OK) return st;
  if (v_begin < 0 || v_end > q->vocab || v_begin > v_end || !coef || !moved)
    return AK_ERROR_INVALID_ARGUMENT;
  switch (q->dtype) {
    case AK_FLOAT32: return apply_logit_rows_in<float>(*q, coef, moved, v_begin, v_end);
    case AK_FLOAT16: return apply_logit_rows_in<anchor_kernels::half_bits>(*q, coef, moved, v_begin, v_end);
    case AK_BFLOAT16: return apply_logit_rows_in<anchor_kernels::bfloat16_bits>(*q, coef, moved, v_begin, v_end);
  }
  return AK_ERROR_INVALID_ARGUMENT;
}

// Host-side plan logic of the CUDA launcher: here so that it builds (and is tested) without CUDA.
extern "C" int64_t ak_cuda_workspace_size(const ak_steer_params* p) {
  if (!p || p->rows < 0 || p->dim < 0 || p->set_size < 0 || p->num_sets < 0) return -1;
  constexpr int64_t kMax = INT64_MAX / 4;  // in floats, so the byte count fits too
  auto mul = [](int64_t a, int64_t b) { return a != 0 && b > kMax / a ? -1 : a * b; };
  if (p->split_slices > 1) {
    const int64_t per_slice = mul(p->rows, p->set_size + 1);
    return per_slice < 0 ? -1 : mul(p->split_slices, per_slice);
  }
  if (p->objective == AK_OBJECTIVE_MEAN && !p->direction) return mul(p->num_sets, p->dim);
  return 0;
}

// The CUDA plan by bench/plan_model.py's model (H100 constants; modelled, not yet measured):
// the tiled plan reads W_A twice per row through one SM's load path, blocks past the SMs queue;
// s slices read a slice of it per launch (two launches) on B s blocks, AK_SPLIT_OCCUPANCY per
// SM; both pay the T dependent K-space steps per wave, and every block's W_A reads go through L2.
namespace {
constexpr double kL2Bandwidth = 5.5e12, kSmLoad = 64 * 1.755e9, kLaunch = 2.5e-6;

double step_latency(int64_t K) { return 0.1e-6 + (K > 64 ? double(K - 64) * 1.04e-9 : 0.0); }

double tiled_seconds(double B, double d, double K, double T, double elem, double sms) {
  const double waves = std::ceil(B / sms);
  const double per_block = 2 * (K * d + d) * elem / kSmLoad, l2 = 2 * B * K * d * elem / kL2Bandwidth;
  return kLaunch + std::max(waves * per_block, l2) + waves * T * step_latency(int64_t(K));
}

double split_seconds(double B, double d, double K, double T, double elem, double sms, double s) {
  const double waves = std::ceil(B * s / (AK_SPLIT_OCCUPANCY * sms));
  const double per_block = (K * d / s + d / s) * elem / kSmLoad, l2 = B * K * d * elem / kL2Bandwidth;
  return 2 * kLaunch + 2 * std::max(waves * per_block, l2) + waves * T * step_latency(int64_t(K));
}
}  // namespace

extern "C" int64_t ak_cuda_split_slices(const ak_steer_params* p, int64_t sm_count) {
  if (!p || p->rows <= 0 || p->dim <= 0 || sm_count <= 0) return 1;
  const int64_t max_slices = (p->dim + AK_SPLIT_MIN_SLICE - 1) / AK_SPLIT_MIN_SLICE;
  const double B = double(p->rows), d = double(p->dim), K = double(p->set_size),
               T = double(p->steps), elem = p->dtype == AK_FLOAT32 ? 4 : 2, sms = double(sm_count);
  int64_t best = 1;
  double best_seconds = tiled_seconds(B, d, K, T, elem, sms);
  for (int64_t s = 2; s <= max_slices; ++s) {
    const double t = split_seconds(B, d, K, T, elem, sms, double(s));
    if (t < best_seconds) best = s, best_seconds = t;
  }
  return best;
}

extern "C" ak_status ak_steer_check_params(const ak_steer_params* p) {
  if (!p) return AK_ERROR_INVALID_ARGUMENT;
  const bool shapes_ok = p->rows >= 0 && p->dim >= 1 && p->vocab >= 1 && p->num_sets >= 1 &&
                         p->set_size >= 1 && p->steps >= 0 && p->steps <= AK_MAX_STEPS;
  // hidden is only read, so its rows may overlap (an expanded, stride-0 batch); out's may not.
  const bool strides_ok = p->rows <= 1 || (p->hidden_row_stride >= 0 &&
                                           p->out_row_stride >= p->dim);
  const bool config_ok = std::isfinite(p->reg) && p->reg >= 0.f &&
                         p->temperature >= AK_MIN_TEMPERATURE &&
                         p->temperature <= AK_MAX_TEMPERATURE && !std::isnan(p->margin) &&
                         (p->relative_step == 0 || p->relative_step == 1) &&
                         !std::isnan(p->max_norm) && p->max_norm >= 0.f &&
                         (p->objective == AK_OBJECTIVE_MEAN || p->objective == AK_OBJECTIVE_LSE) &&
                         (p->dtype == AK_FLOAT32 || p->dtype == AK_FLOAT16 ||
                          p->dtype == AK_BFLOAT16);
  const bool pointers_ok = p->rows == 0 || (p->hidden && p->weight && p->anchor_ids &&
                                            p->anchor_weights && p->gram && p->row_sets &&
                                            p->step_size && p->out);
  return shapes_ok && strides_ok && config_ok && pointers_ok ? AK_OK : AK_ERROR_INVALID_ARGUMENT;
}

extern "C" ak_status ak_steer_rows_cpu(const ak_steer_params* p, int64_t row_begin,
                                       int64_t row_end) {
  const ak_status st = ak_steer_check_params(p);
  if (st != AK_OK) return st;
  if (row_begin < 0 || row_end > p->rows || row_begin > row_end) return AK_ERROR_INVALID_ARGUMENT;
  switch (p->dtype) {
    case AK_FLOAT32: return steer_rows<float>(*p, row_begin, row_end);
    case AK_FLOAT16: return steer_rows<anchor_kernels::half_bits>(*p, row_begin, row_end);
    case AK_BFLOAT16: return steer_rows<anchor_kernels::bfloat16_bits>(*p, row_begin, row_end);
  }
  return AK_ERROR_INVALID_ARGUMENT;
}
