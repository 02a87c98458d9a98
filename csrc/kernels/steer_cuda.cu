// CUDA implementation of the anchor steering kernel (torch-free; see steer.h).
//
// One block per row, one launch per call. Phase 1 gathers the K anchor rows with 16-byte
// loads (a warp per anchor, shuffle reduction) into z0 = W_A h0 + b_A; phase 2 runs the
// T-step K-space loop in shared memory (the Gram of a set is staged in shared memory when it
// fits, read through L2 otherwise); phase 3 writes h' = h0 + W_A^T c with 16-byte loads.
// Limits (AK_ERROR_UNSUPPORTED past them, never a wrong result): K <= 1024, d <= 32768.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "anchor_kernels/steer.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxSetSize = 1024;
constexpr int64_t kMaxDim = 32768;
constexpr int64_t kGramInSharedMax = 64;  // K*K*4 = 16 KiB

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 16 bytes of T as fp32 values.
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float (&out)[N]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = load_float(v + i);
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

template <typename T>
__device__ void copy_row(const T* in, T* out, int64_t d) {
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[j] = in[j];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) steer_kernel(ak_steer_params p, bool vec_ok) {
  extern __shared__ float smem[];
  __shared__ float2 scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t K = p.set_size, d = p.dim;
  const T* h_in = static_cast<const T*>(p.hidden) + row * p.hidden_row_stride;
  T* h_out = static_cast<T*>(p.out) + row * p.out_row_stride;
  const int64_t set = p.row_sets[row];
  const float eta = p.step_size[row];
  if (set < 0 || set >= p.num_sets || p.steps == 0 || eta == 0.f) {
    copy_row(h_in, h_out, d);
    return;
  }
  const int64_t* ids = p.anchor_ids + set * K;
  const float* w = p.anchor_weights + set * K;
  const float* gram_global = p.gram + set * K * K;
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);

  float* h = smem;      // [d]
  float* z0 = h + d;    // [K]
  float* c = z0 + K;    // [K]
  float* gc = c + K;    // [K]  Gm c, carried across steps
  float* s = gc + K;    // [K]
  float* log_w = s + K; // [K]
  float* gram_shared = log_w + K;  // [K*K] when K <= kGramInSharedMax
  const bool gram_in_shared = K <= kGramInSharedMax;
  const float* gram = gram_in_shared ? gram_shared : gram_global;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float h_sq = 0.f;
  for (int64_t j = tid; j < d; j += blockDim.x) {
    const float v = load_float(h_in + j);
    h[j] = v;
    h_sq += v * v;
  }
  for (int64_t i = tid; i < K; i += blockDim.x) {
    c[i] = 0.f;
    gc[i] = 0.f;
    log_w[i] = w[i] == 0.f ? 0.f : logf(fabsf(w[i]));
  }
  if (gram_in_shared)
    for (int64_t i = tid; i < K * K; i += blockDim.x) gram_shared[i] = gram_global[i];
  const float h_norm = sqrtf(block_reduce2<false>(h_sq, 0.f, scratch).x);  // also syncs h

  // Phase 1: z0 = W_A h0 + b_A, a warp per anchor.
  constexpr int N = Vec<T>::N;
  for (int64_t k = warp; k < K; k += kWarps) {
    float acc = 0.f;
    if (w[k] != 0.f) {
      const T* wrow = weight + ids[k] * p.weight_row_stride;
      int64_t j0 = 0;
      if (vec_ok) {
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
  const bool lse = p.objective == AK_OBJECTIVE_LSE;
  const bool trust = isfinite(p.max_norm);
  const float limit = p.max_norm * h_norm, tau = p.temperature;
  for (int64_t t = 0; t < p.steps; ++t) {
    float gap;
    if (lse) {
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
      gap = tau * ((m.x + logf(sums.x)) - (m.y + logf(sums.y)));
    } else {
      float part = 0.f;
      for (int64_t i = tid; i < K; i += blockDim.x) {
        part += w[i] * (z0[i] + gc[i]);
        s[i] = w[i];
      }
      gap = block_reduce2<false>(part, 0.f, scratch).x;
    }
    // A non-finite gap (non-finite hidden row) freezes the row: it comes out unchanged.
    if (!(isfinite(gap) && gap < p.margin)) continue;  // uniform across the block
    for (int64_t i = tid; i < K; i += blockDim.x) c[i] += eta * (s[i] - p.reg * c[i]);
    __syncthreads();
    float q_part = 0.f;
    for (int64_t i = tid; i < K; i += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j < K; ++j) acc += gram[i * K + j] * c[j];
      gc[i] = acc;
      q_part += c[i] * acc;
    }
    if (trust) {
      const float q = block_reduce2<false>(q_part, 0.f, scratch).x;  // ||h - h0||^2
      if (q > limit * limit) {
        const float scale = limit / sqrtf(q);
        for (int64_t i = tid; i < K; i += blockDim.x) {
          c[i] *= scale;
          gc[i] *= scale;
        }
      }
    }
    __syncthreads();
  }

  int moved_part = 0;
  for (int64_t i = tid; i < K; i += blockDim.x) moved_part |= c[i] != 0.f;
  if (!__syncthreads_or(moved_part)) {
    copy_row(h_in, h_out, d);
    return;
  }

  // Phase 3: h' = h0 + W_A^T c, 16-byte loads along d.
  int64_t j0 = 0;
  if (vec_ok) {
    j0 = d / N * N;
    for (int64_t j = int64_t(tid) * N; j < j0; j += int64_t(blockDim.x) * N) {
      float acc[N];
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = h[j + e];
      for (int64_t k = 0; k < K; ++k) {
        if (c[k] == 0.f) continue;
        float v[N];
        Vec<T>::load(weight + ids[k] * p.weight_row_stride + j, v);
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += c[k] * v[e];
      }
#pragma unroll
      for (int e = 0; e < N; ++e) store_float(h_out + j + e, acc[e]);
    }
  }
  for (int64_t j = j0 + tid; j < d; j += blockDim.x) {
    float acc = h[j];
    for (int64_t k = 0; k < K; ++k)
      if (c[k] != 0.f) acc += c[k] * load_float(weight + ids[k] * p.weight_row_stride + j);
    store_float(h_out + j, acc);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
ak_status launch(const ak_steer_params& p, cudaStream_t stream) {
  const int64_t N = 16 / sizeof(T);
  const bool vec_ok = aligned16(p.weight) && (p.weight_row_stride % N) == 0;
  const int64_t K = p.set_size;
  const size_t smem = sizeof(float) * (p.dim + 5 * K + (K <= kGramInSharedMax ? K * K : 0));
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        steer_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return AK_ERROR_CUDA;
  }
  steer_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, smem, stream>>>(p, vec_ok);
  // Peek, not get: the caller may still read the error message.
  return cudaPeekAtLastError() == cudaSuccess ? AK_OK : AK_ERROR_CUDA;
}

}  // namespace

extern "C" int64_t ak_cuda_max_set_size(void) { return kMaxSetSize; }

extern "C" ak_status ak_steer_hidden_cuda(const ak_steer_params* p, void* stream) {
  const ak_status st = ak_steer_check_params(p);
  if (st != AK_OK) return st;
  if (p->set_size > kMaxSetSize || p->dim > kMaxDim || p->rows > 0x7fffffff)
    return AK_ERROR_UNSUPPORTED;
  if (p->rows == 0) return AK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case AK_FLOAT32: return launch<float>(*p, s);
    case AK_FLOAT16: return launch<__half>(*p, s);
    case AK_BFLOAT16: return launch<__nv_bfloat16>(*p, s);
  }
  return AK_ERROR_INVALID_ARGUMENT;
}
