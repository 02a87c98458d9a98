// CUDA implementation of the anchor steering kernel (torch-free; see steer.h).
//
// One block per row, one launch per call. Phase 1 stages h0 and the set's anchor ids in shared
// memory and gathers the K anchor rows with 16-byte loads (a warp per anchor, shuffle
// reduction) into z0 = W_A h0 + b_A; phase 2 runs the T-step K-space loop in shared memory (the
// Gram of a set is staged in shared memory when it fits, read through L2 otherwise); phase 3
// writes h' = h0 + W_A^T c with 16-byte loads and stores, the edit summed before it meets h0.
// Limits (AK_ERROR_UNSUPPORTED past them, never a wrong result): K <= 1024, d <= 32768, and
// the row's shared memory within the device's opt-in limit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "anchor_kernels/steer.h"
#include "fp_range.h"
#include "loop_params.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxSetSize = 1024;
constexpr int64_t kMaxDim = 32768;
constexpr int64_t kGramInSharedMax = 64;  // K*K*4 = 16 KiB
constexpr int kMaxDevices = 64;
constexpr int64_t kLogitColumnsPerThread = 8;  // vocabulary entries per thread in the apply kernel
constexpr int kApplyRows = 8;                   // rows sharing each read of M in the apply kernel
constexpr int64_t kMaxLogitRows = int64_t(65535) * kApplyRows;

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 16-byte accesses through a may_alias vector type, not a plain uint4 lvalue over memory of
// another type (strict aliasing: g++ -O2 miscompiles that form, clang-CUDA and HIP may). The
// alignment is what the callers checked (vec_flags): one 16-byte load or store.
#if defined(__NVCC__)
typedef uint4 uint4_alias;  // nvcc has no may_alias, and no type-based alias analysis to need it
#else
// A type of its own: g++ ignores may_alias added to the already-defined uint4 by a typedef.
struct __attribute__((may_alias, aligned(16))) uint4_alias {
  unsigned x, y, z, w;
};
#endif
__device__ __forceinline__ uint4 load16(const void* p) {
  const uint4_alias v = *static_cast<const uint4_alias*>(__builtin_assume_aligned(p, 16));
  return make_uint4(v.x, v.y, v.z, v.w);
}
__device__ __forceinline__ void store16(void* p, const uint4& raw) {
  *static_cast<uint4_alias*>(__builtin_assume_aligned(p, 16)) = uint4_alias{raw.x, raw.y, raw.z, raw.w};
}

// 16 bytes of T as fp32 values.
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float (&out)[N]) {
    const uint4 raw = load16(p);
    T v[N];
    memcpy(v, &raw, 16);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = load_float(v + i);
  }
  __device__ __forceinline__ static void store(T* p, const float (&in)[N]) {
    T v[N];
#pragma unroll
    for (int i = 0; i < N; ++i) store_float(v + i, in[i]);
    uint4 raw;
    memcpy(&raw, v, 16);
    store16(p, raw);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction of two values at once (sum or max); every thread gets the results.
template <bool kMax>
__device__ __forceinline__ float2 block_reduce2(float a, float b, float2* scratch) {
  a = kMax ? warp_max(a) : warp_sum(a);
  b = kMax ? warp_max(b) : warp_sum(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  float2 r = scratch[0];
  for (int w = 1; w < kWarps; ++w) {
    r.x = kMax ? fmaxf(r.x, scratch[w].x) : r.x + scratch[w].x;
    r.y = kMax ? fmaxf(r.y, scratch[w].y) : r.y + scratch[w].y;
  }
  __syncthreads();  // scratch is reused by the next reduction
  return r;
}

// Untouched rows: 16 bytes at a time where both rows allow it.
template <typename T>
__device__ void copy_row(const T* in, T* out, int64_t d, bool vec) {
  if (vec) {
    constexpr int N = Vec<T>::N;
    for (int64_t j = threadIdx.x; j < d / N; j += blockDim.x) store16(out + j * N, load16(in + j * N));
    return;
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[j] = in[j];
}

// s = dG/dz at z = z0 + gc (padding gets 0); returns G on every thread. Thread i only writes
// s[i] for its own i, so callers sync before another thread reads s.
__device__ float gap_and_grad(const float* z0, const float* gc, const float* w,
                              const float* log_w, float* s, int64_t K, bool lse, float tau,
                              float2* scratch) {
  const int tid = threadIdx.x;
  if (!lse) {
    float part = 0.f;
    for (int64_t i = tid; i < K; i += blockDim.x) {
      part += w[i] * (z0[i] + gc[i]);
      s[i] = w[i];
    }
    return block_reduce2<false>(part, 0.f, scratch).x;
  }
  float m_pos = -INFINITY, m_neg = -INFINITY;
  for (int64_t i = tid; i < K; i += blockDim.x) {
    const float a = (z0[i] + gc[i]) / tau + log_w[i];
    if (w[i] > 0.f) m_pos = fmaxf(m_pos, a);
    if (w[i] < 0.f) m_neg = fmaxf(m_neg, a);
  }
  const float2 m = block_reduce2<true>(m_pos, m_neg, scratch);
  float s_pos = 0.f, s_neg = 0.f;
  for (int64_t i = tid; i < K; i += blockDim.x) {
    const float a = (z0[i] + gc[i]) / tau + log_w[i];
    const float e = w[i] == 0.f ? 0.f : expf(a - (w[i] > 0.f ? m.x : m.y));
    s[i] = e;
    if (w[i] > 0.f) s_pos += e;
    if (w[i] < 0.f) s_neg += e;
  }
  const float2 sums = block_reduce2<false>(s_pos, s_neg, scratch);
  for (int64_t i = tid; i < K; i += blockDim.x)
    s[i] = w[i] > 0.f ? s[i] / sums.x : (w[i] < 0.f ? -s[i] / sums.y : 0.f);
  return tau * ((m.x + logf(sums.x)) - (m.y + logf(sums.y)));
}

// gv = Gm v and returns v^T Gm v (every thread). Gm is symmetric, so thread i reads column i
// (gram[j*K + i]): consecutive threads read consecutive words, no bank conflicts, coalesced.
__device__ float gram_apply(const float* gram, const float* v, float* gv, int64_t K,
                            float2* scratch) {
  float q_part = 0.f;
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < K; ++j) acc += gram[j * K + i] * v[j];
    gv[i] = acc;
    q_part += v[i] * acc;
  }
  return block_reduce2<false>(q_part, 0.f, scratch).x;
}

// ||x|| of a row from its plain fp32 sum of squares (every thread has it), recomputed from
// x scaled by a power of two where that sum is out of range (fp_range.h): no work is added to
// ordinary rows. `load(j)` gives x_j for j in [0, n). Uniform across the block.
template <typename Load>
__device__ float robust_norm(float sum_sq, int64_t n, Load load, float2* scratch) {
  if (anchor_kernels::squares_in_range(sum_sq)) return sqrtf(sum_sq);
  const float f = anchor_kernels::squares_rescale(sum_sq);
  float part = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = load(j) * f;
    part += v * v;
  }
  return sqrtf(block_reduce2<false>(part, 0.f, scratch).x) / f;
}

// v *= 2^-x in place, x from the block's max |v_i| (fp_range.h: then no partial sum of Gm v or
// of v . Gm v overflows), gv = Gm v and returns v^T Gm v of the scaled v (every thread); *x gets
// the exponent. Thread i reads v[i] before the first barrier: callers need not sync after
// writing their own v[i].
__device__ float scaled_gram_apply(const float* gram, float* v, float* gv, int64_t K, int kb, int* x,
                                   float2* scratch) {
  float m = 0.f;
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) m = fmaxf(m, fabsf(v[i]));
  *x = anchor_kernels::quadratic_exponent(block_reduce2<true>(m, 0.f, scratch).x, kb);
  const float scale = anchor_kernels::pow2(-*x);
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) v[i] *= scale;
  __syncthreads();
  return gram_apply(gram, v, gv, K, scratch);
}

// The K-space loop's shared memory from `base`: z0, c, gc (Gm c, carried across steps), s, log_w
// and tmp ([K] each), then the set's Gram, staged here when it fits (K <= kGramInSharedMax; read
// through L2 otherwise). c and gc start at zero, log_w = log|w| (0 on padding). Callers fill z0
// and sync before the loop reads any of it.
struct LoopSmem {
  float *z0, *c, *gc, *s, *log_w, *tmp;
  const float* gram;
};

__device__ LoopSmem carve_loop_smem(float* base, int64_t K, const float* gram_global, const float* w) {
  LoopSmem m{base, base + K, base + 2 * K, base + 3 * K, base + 4 * K, base + 5 * K, gram_global};
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    m.c[i] = 0.f;
    m.gc[i] = 0.f;
    m.log_w[i] = w[i] != 0.f ? logf(fabsf(w[i])) : 0.f;
  }
  if (K <= kGramInSharedMax) {
    float* gram_shared = base + 6 * K;
    for (int64_t i = threadIdx.x; i < K * K; i += blockDim.x) gram_shared[i] = gram_global[i];
    m.gram = gram_shared;
  }
  return m;
}

// Phase 2 of both plans: the T-step K-space loop from z0 (shared), c and gc zeroed by the
// caller, s and tmp scratch [K]. Leaves c_T in c; returns whether the row moves (the same on
// every thread of the block).
__device__ bool kspace_loop(const ak_steer_params& p, const float* z0, const float* w, const float* log_w,
                            const float* gram, float* c, float* gc, float* s, float* tmp, int64_t K,
                            float eta, float h_norm, float2* scratch) {
  const int tid = threadIdx.x;
  const bool lse = p.objective == AK_OBJECTIVE_LSE;
  const bool trust = isfinite(p.max_norm);
  const float limit = p.max_norm * h_norm, tau = p.temperature;
  const int kb = anchor_kernels::size_bits(K);
  int x = 0;
  // As the CPU kernel: a row whose ||h0|| is unusable where it is needed, or whose set has a
  // non-finite anchor row of W or one whose squared norm fp32 cannot hold (its Gram diagonal
  // fails gram_diag_ok), is left untouched.
  int bad_set = 0;
  for (int64_t i = tid; i < K; i += blockDim.x) bad_set |= w[i] != 0.f && !anchor_kernels::gram_diag_ok(gram[i * K + i]);
  const bool needs_norm = trust || p.relative_step;
  if (__syncthreads_or(bad_set) || (needs_norm && !(h_norm >= 0.f && isfinite(h_norm)))) return false;
  if (p.relative_step) {
    // The first step moves h by eta ||h0||: divide by ||grad G(h0)|| = sqrt(s0^T Gm s0), the
    // quadratic form of s0 scaled by 2^-x (s is recomputed at every step: scaled in place).
    gap_and_grad(z0, gc, w, log_w, s, K, lse, tau, scratch);
    const float q = scaled_gram_apply(gram, s, tmp, K, kb, &x, scratch);
    eta = q > 0.f && isfinite(q) ? anchor_kernels::relative_eta(eta, h_norm, q, x) : 0.f;
    if (!(isfinite(eta) && eta > 0.f)) return false;
  }
  for (int64_t t = 0; t < p.steps; ++t) {
    const float gap = gap_and_grad(z0, gc, w, log_w, s, K, lse, tau, scratch);
    // A non-finite gap (non-finite hidden row) freezes the row: it comes out unchanged.
    if (!(isfinite(gap) && gap < p.margin)) continue;  // uniform across the block
    for (int64_t i = tid; i < K; i += blockDim.x) c[i] += eta * (s[i] - p.reg * c[i]);
    __syncthreads();
    if (trust) {
      // ||h - h0|| * 2^-x = sqrt of the quadratic form of c * 2^-x (c and gc scaled in place):
      // past the limit c becomes the scaled c times limit / ||.||, else it is scaled back.
      const float n = sqrtf(scaled_gram_apply(gram, c, gc, K, kb, &x, scratch));
      const float r = n > limit * anchor_kernels::pow2(-x) ? limit / n : anchor_kernels::pow2(x);
      for (int64_t i = tid; i < K; i += blockDim.x) {
        c[i] *= r;
        gc[i] *= r;
      }
    } else {
      gram_apply(gram, c, gc, K, scratch);  // gc = Gm c
    }
    __syncthreads();
  }
  // As the CPU kernel (representable_edit): c finite and sum_k |c_k| ||W_a_k|| within FLT_MAX,
  // else the row (whose step or edit fp32 cannot represent) is left untouched.
  int moved_part = 0;
  float bound_part = 0.f;
  for (int64_t i = tid; i < K; i += blockDim.x) {
    moved_part |= c[i] != 0.f;
    if (c[i] != 0.f) bound_part += fabsf(c[i]) * sqrtf(gram[i * K + i]);
  }
  const float bound = block_reduce2<false>(bound_part, 0.f, scratch).x;
  return __syncthreads_or(moved_part) && bound <= anchor_kernels::kFloatMax;
}

// A step that is not finite and > 0 would write NaN rows or steer backwards: such a row is left
// untouched (values on the device are not checked on the host).
__device__ __forceinline__ bool usable_step(float eta) { return eta > 0.f && isfinite(eta); }

// Whether a row can move at all: a set in range, steps and a usable step size (else it is copied).
__device__ __forceinline__ bool row_moves(const ak_steer_params& p, int64_t row) {
  const int64_t set = p.row_sets[row];
  return set >= 0 && set < p.num_sets && p.steps > 0 && usable_step(p.step_size[row]);
}

struct VecFlags {
  bool weight, hidden, out;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) steer_kernel(ak_steer_params p, VecFlags vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float2 scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t K = p.set_size, d = p.dim;
  const T* h_in = static_cast<const T*>(p.hidden) + row * p.hidden_row_stride;
  T* h_out = static_cast<T*>(p.out) + row * p.out_row_stride;
  const bool copy_vec = vec.hidden && vec.out;
  const int64_t set = p.row_sets[row];
  const float eta_in = p.step_size[row];
  if (!row_moves(p, row)) {
    copy_row(h_in, h_out, d, copy_vec);
    return;
  }
  const int64_t* ids_global = p.anchor_ids + set * K;
  const float* w = p.anchor_weights + set * K;
  const float* gram_global = p.gram + set * K * K;
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);

  int64_t* ids = reinterpret_cast<int64_t*>(smem_raw);  // [K]
  float* h = reinterpret_cast<float*>(ids + K);         // [d]
  auto [z0, c, gc, s, log_w, tmp, gram] = carve_loop_smem(h + d, K, gram_global, w);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  constexpr int N = Vec<T>::N;
  int bad_id = 0;
  for (int64_t i = tid; i < K; i += blockDim.x) {
    const int64_t id = ids_global[i];
    // Padding is never read; a live id outside the vocabulary leaves the row untouched (the
    // launcher's callers validate ids on the host: no sync here).
    const bool live = w[i] != 0.f;
    bad_id |= live && (id < 0 || id >= p.vocab);
    ids[i] = live ? id : 0;
  }
  float h_sq = 0.f;
  int64_t staged = 0;
  if (vec.hidden) {
    staged = d / N * N;
    for (int64_t j = int64_t(tid) * N; j < staged; j += int64_t(blockDim.x) * N) {
      float v[N];
      Vec<T>::load(h_in + j, v);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        h[j + e] = v[e];
        h_sq += v[e] * v[e];
      }
    }
  }
  for (int64_t j = staged + tid; j < d; j += blockDim.x) {
    const float v = load_float(h_in + j);
    h[j] = v;
    h_sq += v * v;
  }
  if (__syncthreads_or(bad_id)) {
    copy_row(h_in, h_out, d, copy_vec);
    return;
  }
  const float h_norm = robust_norm(block_reduce2<false>(h_sq, 0.f, scratch).x, d,
                                   [&](int64_t j) { return h[j]; }, scratch);

  // Phase 1: z0 = W_A h0 + b_A, a warp per anchor.
  for (int64_t k = warp; k < K; k += kWarps) {
    float acc = 0.f;
    if (w[k] != 0.f) {
      const T* wrow = weight + ids[k] * p.weight_row_stride;
      int64_t j0 = 0;
      if (vec.weight) {
        j0 = d / N * N;
        for (int64_t j = int64_t(lane) * N; j < j0; j += 32 * N) {
          float v[N];
          Vec<T>::load(wrow + j, v);
#pragma unroll
          for (int e = 0; e < N; ++e) acc += v[e] * h[j + e];
        }
      }
      for (int64_t j = j0 + lane; j < d; j += 32) acc += load_float(wrow + j) * h[j];
      acc = warp_sum(acc);
      if (bias) acc += load_float(bias + ids[k]);
    }
    if (lane == 0) z0[k] = acc;
  }
  __syncthreads();

  // Phase 2: the K-space loop.
  if (!kspace_loop(p, z0, w, log_w, gram, c, gc, s, tmp, K, eta_in, h_norm, scratch)) {
    copy_row(h_in, h_out, d, copy_vec);
    return;
  }

  // Phase 3: h' = h0 + W_A^T c, 16-byte loads along d; two anchors per iteration keep two
  // independent loads in flight (ids come from shared memory, not a dependent global load).
  // Anchors with c = 0 (padding among them) are skipped, so padding never reads a real row;
  // the branch is uniform across the block.
  int64_t j0 = 0;
  if (vec.weight && vec.out) {
    j0 = d / N * N;
    for (int64_t j = int64_t(tid) * N; j < j0; j += int64_t(blockDim.x) * N) {
      float acc[N] = {};
      for (int64_t k = 0; k < K; k += 2) {
        const float ca = c[k], cb = k + 1 < K ? c[k + 1] : 0.f;
        float a[N] = {}, b[N] = {};
        if (ca != 0.f) Vec<T>::load(weight + ids[k] * p.weight_row_stride + j, a);
        if (cb != 0.f) Vec<T>::load(weight + ids[k + 1] * p.weight_row_stride + j, b);
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += ca * a[e] + cb * b[e];
      }
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += h[j + e];
      Vec<T>::store(h_out + j, acc);
    }
  }
  for (int64_t j = j0 + tid; j < d; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k)
      if (c[k] != 0.f) acc += c[k] * load_float(weight + ids[k] * p.weight_row_stride + j);
    store_float(h_out + j, h[j] + acc);
  }
}

// objective MEAN, rank-one form (METHOD.md): s = w is constant, so c = a w with a scalar a.
// Without a prepared direction, launch 1, grid (S, d / kThreads): u[s] = W_A^T w into the
// workspace, one column per thread (coalesced along d). A live id outside the vocabulary is
// skipped here (never read); the row kernel finds it and leaves the set's rows untouched.
template <typename T>
__global__ void __launch_bounds__(kThreads) mean_direction_kernel(ak_steer_params p) {
  const int64_t set = blockIdx.x, K = p.set_size, d = p.dim;
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t* ids = p.anchor_ids + set * K;
  const float* w = p.anchor_weights + set * K;
  const T* weight = static_cast<const T*>(p.weight);
  float acc = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float wk = w[k];
    const int64_t id = ids[k];
    if (wk != 0.f && id >= 0 && id < p.vocab) acc += wk * load_float(weight + id * p.weight_row_stride + j);
  }
  p.workspace[set * d + j] = acc;
}

// One block per row (launch 2, or the only launch with a prepared direction): gap(a) = u.h0 +
// w.b_A + a gamma with gamma = ||u||^2 = w^T Gm w, the trust region a^2 gamma <= rho^2 ||h0||^2,
// then h' = h0 + a u. w.b_A is folded into the u.h0 reduction (K terms over the block's threads),
// and a live id outside the vocabulary makes it NaN, which leaves the row untouched. The loop is
// scalar and the same on every thread: no barrier per step.
template <typename T>
__global__ void __launch_bounds__(kThreads) steer_mean_kernel(ak_steer_params p, VecFlags vec) {
  __shared__ float2 scratch[kWarps];
  const int64_t row = blockIdx.x, d = p.dim;
  const T* h_in = static_cast<const T*>(p.hidden) + row * p.hidden_row_stride;
  T* h_out = static_cast<T*>(p.out) + row * p.out_row_stride;
  const bool copy_vec = vec.hidden && vec.out;
  const int64_t set = p.row_sets[row];
  const float eta_in = p.step_size[row];
  if (!row_moves(p, row)) {
    copy_row(h_in, h_out, d, copy_vec);
    return;
  }
  const float* u = (p.direction ? p.direction : p.workspace) + set * d;
  const int64_t* ids = p.anchor_ids + set * p.set_size;
  const float* w = p.anchor_weights + set * p.set_size;
  float z_part = 0.f, h_part = 0.f, u_part = 0.f;
  for (int64_t k = threadIdx.x; k < p.set_size; k += blockDim.x) {
    const int64_t id = ids[k];
    if (w[k] == 0.f) continue;
    if (id < 0 || id >= p.vocab) z_part = NAN;
    else if (p.bias) z_part += w[k] * load_float(static_cast<const T*>(p.bias) + id);
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float h = load_float(h_in + j), uj = u[j];
    z_part += h * uj;
    h_part += h * h;
    u_part += uj * uj;
  }
  const float2 zh = block_reduce2<false>(z_part, h_part, scratch);
  const float u_sq = block_reduce2<false>(u_part, 0.f, scratch).x;
  const float gap0 = zh.x;
  // ||h0|| and ||u|| (= sqrt(gamma)) without squaring past fp32's range; gamma itself is never
  // formed: the gap is gap0 + (a ||u||) ||u||, the trust region |a| ||u|| <= rho ||h0||.
  const float h_norm = robust_norm(zh.y, d, [&](int64_t j) { return load_float(h_in + j); }, scratch);
  const float unorm = robust_norm(u_sq, d, [&](int64_t j) { return u[j]; }, scratch);
  // As kspace_loop: a set with a non-finite anchor row or one fp32 cannot hold, or an unusable
  // ||h0|| where it is needed; beta = sum_k |w_k| ||W_a_k|| bounds the edit's terms per unit a.
  const float* gram = p.gram + set * p.set_size * p.set_size;
  bool bad_set = false;
  float beta = 0.f;
  for (int64_t i = 0; i < p.set_size; ++i) {
    if (w[i] == 0.f) continue;
    const float diag = gram[i * p.set_size + i];
    bad_set |= !anchor_kernels::gram_diag_ok(diag);
    beta += fabsf(w[i]) * sqrtf(diag);
  }
  if (bad_set || ((isfinite(p.max_norm) || p.relative_step) && !isfinite(h_norm))) {
    copy_row(h_in, h_out, d, copy_vec);
    return;
  }
  float eta = eta_in;
  if (p.relative_step) {
    eta = unorm > 0.f && isfinite(unorm) ? eta * h_norm / unorm : 0.f;
    if (!(isfinite(eta) && eta > 0.f)) {
      copy_row(h_in, h_out, d, copy_vec);
      return;
    }
  }
  const bool trust = isfinite(p.max_norm);
  const float limit = p.max_norm * h_norm;
  float a = 0.f;
  for (int64_t t = 0; t < p.steps; ++t) {
    const float gap = gap0 + a * unorm * unorm;
    if (!(isfinite(gap) && gap < p.margin)) continue;
    a += eta * (1.f - p.reg * a);
    if (trust && fabsf(a) * unorm > limit) a = copysignf(limit / unorm, a);
  }
  // As kspace_loop: an edit a u whose terms fp32 cannot hold leaves the row untouched.
  if (a == 0.f || !(fabsf(a) * beta <= anchor_kernels::kFloatMax)) {
    copy_row(h_in, h_out, d, copy_vec);
    return;
  }
  constexpr int N = Vec<T>::N;
  int64_t j0 = 0;
  if (copy_vec) {
    j0 = d / N * N;
    for (int64_t j = int64_t(threadIdx.x) * N; j < j0; j += int64_t(blockDim.x) * N) {
      float v[N];
      Vec<T>::load(h_in + j, v);
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] += a * u[j + e];
      Vec<T>::store(h_out + j, v);
    }
  }
  for (int64_t j = j0 + threadIdx.x; j < d; j += blockDim.x)
    store_float(h_out + j, load_float(h_in + j) + a * u[j]);
}

// Slice j of [0, d) in the split-d plan, for both of its launches: ceil(d / slices) columns
// rounded up to kSliceAlign, so that every slice starts on a 16-byte boundary of an aligned row
// (trailing slices may be empty).
constexpr int64_t kSliceAlign = 8;
__device__ __forceinline__ void split_bounds(int64_t d, int64_t slices, int64_t j, int64_t& begin, int64_t& end) {
  const int64_t len = ((d + slices - 1) / slices + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
  begin = min(d, j * len);
  end = min(d, begin + len);
}

// Split-d plan, launch 1, grid (rows, slices): block (row, j) writes the partial z0 = W_A h0 over
// d-slice j and the partial ||h0||^2 to workspace[j][row] (no atomics: the finish kernel sums the
// slices in a fixed order, so results are deterministic). A warp per anchor, two anchors in flight
// per warp, lanes along d with 16-byte loads where the rows are aligned (a scalar tail otherwise):
// at decode shapes a slice is a few hundred columns, one or two loads per lane per anchor.
template <typename T>
__global__ void __launch_bounds__(kThreads) split_partial_kernel(ak_steer_params p, VecFlags vec) {
  __shared__ float2 scratch[kWarps];
  const int64_t row = blockIdx.x, j = blockIdx.y, K = p.set_size, d = p.dim;
  const int64_t set = p.row_sets[row];
  if (!row_moves(p, row)) return;
  int64_t begin, end;
  split_bounds(d, gridDim.y, j, begin, end);
  const T* h_in = static_cast<const T*>(p.hidden) + row * p.hidden_row_stride;
  const T* weight = static_cast<const T*>(p.weight);
  const int64_t* ids = p.anchor_ids + set * K;
  const float* w = p.anchor_weights + set * K;
  float* part = p.workspace + (j * p.rows + row) * (K + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int N = Vec<T>::N;
  const int64_t vec_end = vec.weight && vec.hidden ? begin + (end - begin) / N * N : begin;
  auto anchor_row = [&](int64_t k) -> const T* {
    if (k >= K || w[k] == 0.f || ids[k] < 0 || ids[k] >= p.vocab) return nullptr;
    return weight + ids[k] * p.weight_row_stride;
  };
  for (int64_t k0 = warp; k0 < K; k0 += 2 * kWarps) {
    const int64_t k1 = k0 + kWarps;
    const T *r0 = anchor_row(k0), *r1 = anchor_row(k1);
    float a0 = 0.f, a1 = 0.f;
    if (r0 || r1) {  // uniform across the warp
      for (int64_t col = begin + lane * N; col < vec_end; col += 32 * N) {
        float h[N], x[N] = {}, y[N] = {};
        Vec<T>::load(h_in + col, h);
        if (r0) Vec<T>::load(r0 + col, x);
        if (r1) Vec<T>::load(r1 + col, y);
#pragma unroll
        for (int e = 0; e < N; ++e) {
          a0 += x[e] * h[e];
          a1 += y[e] * h[e];
        }
      }
      for (int64_t col = vec_end + lane; col < end; col += 32) {
        const float h = load_float(h_in + col);
        if (r0) a0 += load_float(r0 + col) * h;
        if (r1) a1 += load_float(r1 + col) * h;
      }
      a0 = warp_sum(a0);
      a1 = warp_sum(a1);
    }
    if (lane == 0) {
      part[k0] = a0;
      if (k1 < K) part[k1] = a1;
    }
  }
  float h_part = 0.f;
  for (int64_t col = begin + threadIdx.x; col < end; col += blockDim.x) {
    const float v = load_float(h_in + col);
    h_part += v * v;
  }
  const float h_sq = block_reduce2<false>(h_part, 0.f, scratch).x;
  if (threadIdx.x == 0) part[K] = h_sq;
}

// Split-d plan, launch 2, grid (rows, slices): block (row, j) sums the partials in slice order,
// runs the K-space loop (every slice of a row runs it on the same numbers, so they agree bit for
// bit) and writes h' = h0 + W_A^T c on slice j.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) split_finish_kernel(ak_steer_params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float2 scratch[kWarps];
  __shared__ float h_sq_shared;
  const int64_t row = blockIdx.x, j = blockIdx.y, K = p.set_size, d = p.dim;
  int64_t begin, end;
  split_bounds(d, gridDim.y, j, begin, end);
  const T* h_in = static_cast<const T*>(p.hidden) + row * p.hidden_row_stride;
  T* h_out = static_cast<T*>(p.out) + row * p.out_row_stride;
  const int tid = threadIdx.x;
  const int64_t set = p.row_sets[row];
  const float eta_in = p.step_size[row];
  if (!row_moves(p, row)) {
    for (int64_t col = begin + tid; col < end; col += blockDim.x) h_out[col] = h_in[col];
    return;
  }
  const int64_t* ids_global = p.anchor_ids + set * K;
  const float* w = p.anchor_weights + set * K;
  const float* gram_global = p.gram + set * K * K;
  const T* weight = static_cast<const T*>(p.weight);
  int64_t* ids = reinterpret_cast<int64_t*>(smem_raw);  // [K]
  auto [z0, c, gc, s, log_w, tmp, gram] = carve_loop_smem(reinterpret_cast<float*>(ids + K), K, gram_global, w);
  int bad_id = 0;
  for (int64_t i = tid; i < K; i += blockDim.x) {
    const int64_t id = ids_global[i];
    const bool live = w[i] != 0.f, ok = id >= 0 && id < p.vocab;
    bad_id |= live && !ok;
    ids[i] = live && ok ? id : 0;  // a bad id is never read: its set's rows are copied below
    float z = 0.f;
    for (int64_t jj = 0; jj < gridDim.y; ++jj) z += p.workspace[(jj * p.rows + row) * (K + 1) + i];
    if (live && ok && p.bias) z += load_float(static_cast<const T*>(p.bias) + ids[i]);
    z0[i] = z;
  }
  if (tid == 0) {
    float h_sq = 0.f;
    for (int64_t jj = 0; jj < gridDim.y; ++jj) h_sq += p.workspace[(jj * p.rows + row) * (K + 1) + K];
    h_sq_shared = h_sq;
  }
  bool moved = !__syncthreads_or(bad_id);
  if (moved) {  // uniform: h_sq_shared is read after the barrier
    const float h_norm = robust_norm(h_sq_shared, d, [&](int64_t col) { return load_float(h_in + col); }, scratch);
    moved = kspace_loop(p, z0, w, log_w, gram, c, gc, s, tmp, K, eta_in, h_norm, scratch);
  }
  if (!moved) {
    for (int64_t col = begin + tid; col < end; col += blockDim.x) h_out[col] = h_in[col];
    return;
  }
  for (int64_t col = begin + tid; col < end; col += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k)
      if (c[k] != 0.f) acc += c[k] * load_float(weight + ids[k] * p.weight_row_stride + col);
    store_float(h_out + col, load_float(h_in + col) + acc);
  }
}

// The logit form, launch 1: a block per row gathers its anchors' logits, runs the K-space loop
// and writes c (zeros for rows that do not move) to coef [B, K].
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) logits_solve_kernel(ak_logits_params q, ak_steer_params p,
                                                                   float* coef) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float2 scratch[kWarps];
  const int64_t row = blockIdx.x, K = q.set_size;
  const int tid = threadIdx.x;
  float* c_out = coef + row * K;
  const int64_t set = q.row_sets[row];
  const float eta = q.step_size[row];
  if (set < 0 || set >= q.num_sets || q.steps == 0 || !usable_step(eta)) {
    for (int64_t i = tid; i < K; i += blockDim.x) c_out[i] = 0.f;
    return;
  }
  const T* logits = static_cast<const T*>(q.logits) + row * q.logits_row_stride;
  const int64_t* ids_global = q.anchor_ids + set * K;
  const float* w = q.anchor_weights + set * K;
  const float* gram_global = q.gram + set * K * K;
  auto [z0, c, gc, s, log_w, tmp, gram] = carve_loop_smem(reinterpret_cast<float*>(smem_raw), K, gram_global, w);
  int bad_id = 0;
  for (int64_t i = tid; i < K; i += blockDim.x) {
    const int64_t id = ids_global[i];
    const bool live = w[i] != 0.f;
    const bool ok = id >= 0 && id < q.vocab;
    bad_id |= live && !ok;
    z0[i] = live && ok ? load_float(logits + id) : 0.f;
  }
  const float h_norm = q.hidden_norm ? q.hidden_norm[row] : 0.f;
  const bool moved = !__syncthreads_or(bad_id) && kspace_loop(p, z0, w, log_w, gram, c, gc, s, tmp, K, eta, h_norm,
                                                               scratch);
  for (int64_t i = tid; i < K; i += blockDim.x) c_out[i] = moved ? c[i] : 0.f;
}

// The logit form, launch 2, grid (vocabulary tiles, groups of kApplyRows consecutive rows):
// logits[row, v] += sum_k c_k M[s, k, v] in the logits' dtype with fp32 accumulation; consecutive
// threads take consecutive v (M and the rows are read coalesced). Where the moved rows of a group
// all use one set (one set serving a batch), each M[s, k, v] is read once for the group, a
// kApplyRows x 1 tile of the GEMM C M in registers, instead of once per row: M, the bulk of the
// traffic, is read rows / kApplyRows times rather than rows times. Other groups take each row on
// its own. Either way a row sums over k in the same order, skipping c_k = 0, so the two paths agree
// bit for bit. Rows with c = 0 are not written. M is read in its own dtype (TM: fp32, or 16-bit
// where the head allows, half the bytes) and widened to fp32 per element.
template <typename T, typename TM>
__global__ void __launch_bounds__(kThreads) logits_apply_kernel(ak_logits_params q, const float* coef) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* c = reinterpret_cast<float*>(smem_raw);  // [n][K]
  const int64_t K = q.set_size, V = q.vocab, row0 = int64_t(blockIdx.y) * kApplyRows;
  const int n = int(min(int64_t(kApplyRows), q.rows - row0));
  for (int64_t i = threadIdx.x; i < n * K; i += blockDim.x) {
    const int64_t set = q.row_sets[row0 + i / K];
    c[i] = set < 0 || set >= q.num_sets ? 0.f : coef[row0 * K + i];
  }
  __syncthreads();
  unsigned moved = 0;  // the same bits in every thread
  int64_t set0 = -1;
  bool uniform = true;
  for (int r = 0; r < n; ++r) {
    int part = 0;
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) part |= c[r * K + i] != 0.f;
    if (__syncthreads_or(part)) {
      moved |= 1u << r;
      const int64_t set = q.row_sets[row0 + r];
      uniform &= set0 < 0 || set == set0;
      set0 = set0 < 0 ? set : set0;
    }
  }
  if (!moved) return;
  const int64_t tile = int64_t(blockDim.x) * kLogitColumnsPerThread;
  const int64_t v_end = min(V, int64_t(blockIdx.x + 1) * tile);
  for (int64_t v = int64_t(blockIdx.x) * tile + threadIdx.x; v < v_end; v += blockDim.x) {
    if (uniform) {
      const TM* m = static_cast<const TM*>(q.mixing) + set0 * K * V + v;
      float acc[kApplyRows] = {};
      for (int64_t k = 0; k < K; ++k) {
        const float mk = load_float(m + k * V);
#pragma unroll
        for (int r = 0; r < kApplyRows; ++r)
          if (r < n && c[r * K + k] != 0.f) acc[r] += c[r * K + k] * mk;
      }
#pragma unroll
      for (int r = 0; r < kApplyRows; ++r)
        if (moved >> r & 1u) {
          T* logits = static_cast<T*>(q.logits) + (row0 + r) * q.logits_row_stride;
          store_float(logits + v, load_float(logits + v) + acc[r]);
        }
    } else {
      for (int r = 0; r < n; ++r) {
        if (!(moved >> r & 1u)) continue;
        const TM* m = static_cast<const TM*>(q.mixing) + q.row_sets[row0 + r] * K * V + v;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k)
          if (c[r * K + k] != 0.f) acc += c[r * K + k] * load_float(m + k * V);
        T* logits = static_cast<T*>(q.logits) + (row0 + r) * q.logits_row_stride;
        store_float(logits + v, load_float(logits + v) + acc);
      }
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

thread_local const char* last_error = "no error";

ak_status cuda_failed(cudaError_t err) {
  last_error = cudaGetErrorString(err);
  cudaGetLastError();  // reported here: do not leave it for the next caller
  return err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction
             ? AK_ERROR_NO_KERNEL_IMAGE
             : AK_ERROR_CUDA;
}

// Per device: the opt-in shared memory limit, and per kernel its static shared memory and
// whether its dynamic limit was raised. Queried once (not on every launch); the limit is raised
// once, to the maximum, so it is never lowered under a captured graph, and under a lock so that
// host threads do not race on it.
struct DeviceState {
  int smem_optin = -1;
  int sm_count = -1;
  int static_smem[3] = {-1, -1, -1};
  bool raised[3] = {false, false, false};
};
std::mutex device_mutex;
DeviceState device_state[kMaxDevices];

template <typename T>
ak_status prepare_device(int device, int dtype_index, size_t smem) {
  std::lock_guard<std::mutex> lock(device_mutex);
  DeviceState& st = device_state[device];
  if (st.smem_optin < 0) {
    const cudaError_t err =
        cudaDeviceGetAttribute(&st.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return cuda_failed(err);
  }
  if (st.static_smem[dtype_index] < 0) {
    cudaFuncAttributes attr;
    const cudaError_t err = cudaFuncGetAttributes(&attr, steer_kernel<T>);
    if (err != cudaSuccess) return cuda_failed(err);
    st.static_smem[dtype_index] = static_cast<int>(attr.sharedSizeBytes);
  }
  const int dynamic_max = st.smem_optin - st.static_smem[dtype_index];
  if (smem > static_cast<size_t>(dynamic_max)) return AK_ERROR_UNSUPPORTED;
  // The default limit (48 KiB) holds dynamic + static shared memory together.
  if (smem + st.static_smem[dtype_index] > 48 * 1024 && !st.raised[dtype_index]) {
    const cudaError_t err = cudaFuncSetAttribute(
        steer_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_max);
    if (err != cudaSuccess) return cuda_failed(err);
    st.raised[dtype_index] = true;
  }
  return AK_OK;
}

template <typename T>
VecFlags vec_flags(const ak_steer_params& p) {
  const int64_t N = 16 / sizeof(T);
  VecFlags vec;
  vec.weight = aligned16(p.weight) && (p.weight_row_stride % N) == 0;
  vec.hidden = aligned16(p.hidden) && (p.hidden_row_stride % N) == 0 && p.dim % N == 0;
  vec.out = aligned16(p.out) && (p.out_row_stride % N) == 0 && p.dim % N == 0;
  return vec;
}

template <typename T>
ak_status launch_mean(const ak_steer_params& p, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaError_t err = cudaSuccess;
  if (!p.direction) {
    config.gridDim = dim3(static_cast<unsigned>(p.num_sets), static_cast<unsigned>((p.dim + kThreads - 1) / kThreads));
    err = cudaLaunchKernelEx(&config, mean_direction_kernel<T>, p);
    if (err != cudaSuccess) return cuda_failed(err);
  }
  config.gridDim = dim3(static_cast<unsigned>(p.rows));
  err = cudaLaunchKernelEx(&config, steer_mean_kernel<T>, p, vec_flags<T>(p));
  return err == cudaSuccess ? AK_OK : cuda_failed(err);
}

// The finish kernel's dynamic shared memory: ids, six [K] vectors, the Gram when it fits.
size_t split_smem(int64_t K) {
  return sizeof(int64_t) * K + sizeof(float) * (6 * K + (K <= kGramInSharedMax ? K * K : 0));
}

template <typename T>
ak_status launch_split(const ak_steer_params& p, cudaStream_t stream) {
  const size_t smem = split_smem(p.set_size);
  // Within the 48 KiB default with the kernel's static shared memory (80 B): true for K <= 1024.
  if (smem + 1024 > 48 * 1024) return AK_ERROR_UNSUPPORTED;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.split_slices));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaError_t err = cudaLaunchKernelEx(&config, split_partial_kernel<T>, p, vec_flags<T>(p));
  if (err != cudaSuccess) return cuda_failed(err);
  config.dynamicSmemBytes = smem;
  err = cudaLaunchKernelEx(&config, split_finish_kernel<T>, p);
  return err == cudaSuccess ? AK_OK : cuda_failed(err);
}

template <typename T>
ak_status launch(const ak_steer_params& p, cudaStream_t stream, int dtype_index) {
  // The plan by the workspace's precedence (steer.h), after checking that it is large enough:
  // a kernel writes all of the size its plan needs.
  const bool split = p.split_slices > 1,
             rank_one = !split && p.objective == AK_OBJECTIVE_MEAN && (p.direction || p.workspace);
  if (split || (rank_one && !p.direction)) {
    const int64_t need = ak_cuda_workspace_size(&p);
    if (!p.workspace || need < 0 || p.workspace_size < need) return AK_ERROR_INVALID_ARGUMENT;
  }
  if (rank_one) return launch_mean<T>(p, stream);
  if (split) {
    if (p.split_slices > 65535 || p.split_slices > p.dim) return AK_ERROR_INVALID_ARGUMENT;
    return launch_split<T>(p, stream);
  }
  const VecFlags vec = vec_flags<T>(p);
  const int64_t K = p.set_size;
  const size_t smem = sizeof(int64_t) * K +
                      sizeof(float) * (p.dim + 6 * K + (K <= kGramInSharedMax ? K * K : 0));
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_failed(err);
  if (device >= kMaxDevices) return AK_ERROR_UNSUPPORTED;
  const ak_status st = prepare_device<T>(device, dtype_index, smem);
  if (st != AK_OK) return st;
  // cudaLaunchKernelEx reports this launch's own configuration error; <<<>>> plus
  // cudaPeekAtLastError would also blame it for earlier, unrelated errors.
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.rows));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  err = cudaLaunchKernelEx(&config, steer_kernel<T>, p, vec);
  return err == cudaSuccess ? AK_OK : cuda_failed(err);
}

}  // namespace

extern "C" int64_t ak_cuda_sm_count(void) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) {
    cudaGetLastError();
    return -1;
  }
  std::lock_guard<std::mutex> lock(device_mutex);
  int& count = device_state[device].sm_count;
  if (count < 0 && cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    count = -1;
  }
  return count;
}

extern "C" int64_t ak_cuda_max_set_size(void) { return kMaxSetSize; }
extern "C" int64_t ak_cuda_max_dim(void) { return kMaxDim; }
extern "C" int64_t ak_cuda_max_logit_rows(void) { return kMaxLogitRows; }
extern "C" const char* ak_cuda_last_error(void) { return last_error; }

extern "C" ak_status ak_cuda_check_device(int device) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return cuda_failed(err);
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_failed(err);
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, steer_kernel<float>);
  cudaSetDevice(current);
  return err == cudaSuccess ? AK_OK : cuda_failed(err);
}

template <typename T>
ak_status launch_logits(const ak_logits_params& q, float* coef, cudaStream_t stream) {
  const int64_t K = q.set_size;
  const size_t smem = sizeof(float) * (6 * K + (K <= kGramInSharedMax ? K * K : 0));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(q.rows));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaError_t err = cudaLaunchKernelEx(&config, logits_solve_kernel<T>, q, anchor_kernels::loop_params(q), coef);
  if (err != cudaSuccess) return cuda_failed(err);
  const int64_t tile = kThreads * kLogitColumnsPerThread;
  config.gridDim = dim3(static_cast<unsigned>((q.vocab + tile - 1) / tile),
                        static_cast<unsigned>((q.rows + kApplyRows - 1) / kApplyRows));
  config.dynamicSmemBytes = sizeof(float) * kApplyRows * K;  // 32 KiB at K = 1024
  switch (q.mixing_dtype) {
    case AK_FLOAT32: err = cudaLaunchKernelEx(&config, logits_apply_kernel<T, float>, q, static_cast<const float*>(coef)); break;
    case AK_FLOAT16: err = cudaLaunchKernelEx(&config, logits_apply_kernel<T, __half>, q, static_cast<const float*>(coef)); break;
    case AK_BFLOAT16:
      err = cudaLaunchKernelEx(&config, logits_apply_kernel<T, __nv_bfloat16>, q, static_cast<const float*>(coef));
      break;
  }
  return err == cudaSuccess ? AK_OK : cuda_failed(err);
}

extern "C" ak_status ak_steer_logits_cuda(const ak_logits_params* q, float* coef, void* stream) {
  const ak_status st = ak_steer_logits_check_params(q);
  if (st != AK_OK) return st;
  if (!coef && q->rows > 0) return AK_ERROR_INVALID_ARGUMENT;
  // 6K floats of shared memory (and the Gram up to K = 64) stay under the 48 KiB default, as do
  // the apply kernel's kApplyRows x K; its row groups are the grid's y (at most 65535).
  if (q->set_size > kMaxSetSize || q->rows > kMaxLogitRows ||
      (q->vocab + kThreads * kLogitColumnsPerThread - 1) / (kThreads * kLogitColumnsPerThread) > 0x7fffffff)
    return AK_ERROR_UNSUPPORTED;
  if (q->rows == 0) return AK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (q->dtype) {
    case AK_FLOAT32: return launch_logits<float>(*q, coef, s);
    case AK_FLOAT16: return launch_logits<__half>(*q, coef, s);
    case AK_BFLOAT16: return launch_logits<__nv_bfloat16>(*q, coef, s);
  }
  return AK_ERROR_INVALID_ARGUMENT;
}

extern "C" ak_status ak_steer_hidden_cuda(const ak_steer_params* p, void* stream) {
  const ak_status st = ak_steer_check_params(p);
  if (st != AK_OK) return st;
  if (p->set_size > kMaxSetSize || p->dim > kMaxDim || p->rows > 0x7fffffff || p->num_sets > 0x7fffffff)
    return AK_ERROR_UNSUPPORTED;
  if (p->rows == 0) return AK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case AK_FLOAT32: return launch<float>(*p, s, 0);
    case AK_FLOAT16: return launch<__half>(*p, s, 1);
    case AK_BFLOAT16: return launch<__nv_bfloat16>(*p, s, 2);
  }
  return AK_ERROR_INVALID_ARGUMENT;
}
