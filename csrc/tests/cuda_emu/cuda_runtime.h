// cuda-emu: enough of the CUDA runtime and device language for the host compiler to build and
// run csrc/kernels/steer_cuda.cu unmodified (see emu.cpp for how a launch runs).
//
// Each CUDA thread is a fiber; the fibers of a block run on one host thread (a worker that runs
// one block at a time), so `__shared__` is `thread_local`: per block. Static shared memory keeps
// what the worker's previous block left there, as on a GPU. Dynamic shared memory is a per-host-thread array whose bytes past
// the launch's dynamic size are poisoned for AddressSanitizer. Fibers switch only at barriers and
// warp shuffles, which check that the whole block / warp arrives at the same call site.
#pragma once

#include <math.h>  // the CUDA math functions are global: expf, logf, isfinite, ...

// Every standard header the kernel file or the emulator uses, before the macros below (libstdc++
// uses __builtin_assume_aligned itself).
#include <algorithm>
#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __shared__ thread_local
#define __syncthreads() ::ak_emu::sync_block(__LINE__, 0)
#define __syncthreads_or(pred) ::ak_emu::sync_block(__LINE__, (pred))
#define __shfl_xor_sync(mask, value, lane_mask, ...) \
  ::ak_emu::shuffle_xor(__LINE__, (mask), (value), (lane_mask))
// A 16-byte access that the kernel asserts is aligned must be: on a GPU it faults.
#define __builtin_assume_aligned(ptr, align) ::ak_emu::check_aligned((ptr), (align), __LINE__)
#define warpSize 32
#define threadIdx (::ak_emu::thread_index())
#define blockIdx (::ak_emu::block_index())

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
// The same for every block of a launch (launches run one at a time).
extern dim3 blockDim, gridDim;

inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
} cudaError_t;

typedef struct CUstream_st* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
                      cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int maxDynamicSharedSizeBytes;
};

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned numAttrs;
};

cudaError_t cudaMalloc(void** ptr, size_t bytes);
template <typename T>
cudaError_t cudaMalloc(T** ptr, size_t bytes) { return cudaMalloc(reinterpret_cast<void**>(ptr), bytes); }
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace ak_emu {

// What a launch needs to know of a kernel: from ptxas (scripts/cuda_emu.py writes the table).
struct KernelInfo {
  const void* kernel;
  const char* name;
  int static_smem;
  int registers;
  int max_dynamic_smem;  // the cudaFuncAttributeMaxDynamicSharedMemorySize attribute
};
void register_kernel(const void* kernel, const char* name, int static_smem, int registers);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
// Runs every block of the grid to completion (launches are synchronous here).
cudaError_t launch(const void* kernel, const cudaLaunchConfig_t& config,
                   unsigned char* (*dynamic_smem)(), std::function<void()> body);

const uint3& thread_index();
const uint3& block_index();
int sync_block(int line, int pred);
float shuffle_xor(int line, unsigned mask, float value, int lane_mask);
const void* check_aligned(const void* ptr, size_t align, int line);
void* check_aligned(void* ptr, size_t align, int line);

// Per host thread, i.e. per block: `extern __shared__` arrays in the kernel file redeclare this.
constexpr size_t kMaxSmem = 232448;  // sm_90's opt-in limit per block (227 KiB)
const unsigned char* tls_anchor(const unsigned char* p);

}  // namespace ak_emu

namespace {
// The kernel file's `extern __shared__ unsigned char smem_raw[]` redeclares this array (same
// unnamed namespace, same translation unit).
alignas(16) thread_local unsigned char smem_raw[ak_emu::kMaxSmem];
// g++ calls the translation unit's TLS initialiser before a block-scope `extern thread_local`
// access, and emits that initialiser only if some thread_local needs dynamic initialisation.
thread_local const unsigned char* const ak_emu_tls_init_anchor = ak_emu::tls_anchor(smem_raw);
// Called on the block's host thread before its fibers start: reading the anchor runs that
// initialiser there, not lazily (and racily) in the first fiber that touches shared memory.
unsigned char* ak_emu_dynamic_smem() { return const_cast<unsigned char*>(ak_emu_tls_init_anchor); }
}  // namespace

template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* kernel) {
  return ak_emu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ak_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...),
                               Args&&... args) {
  // Arguments are copied at launch, as the driver copies them into the parameter buffer.
  std::tuple<Params...> params(std::forward<Args>(args)...);
  return ak_emu::launch(reinterpret_cast<const void*>(kernel), *config, &ak_emu_dynamic_smem,
                        [kernel, params]() { std::apply(kernel, params); });
}
