// cuda-emu runtime: a launch runs its blocks on a few persistent host threads (workers), so that
// blocks overlap as on a GPU, and every CUDA thread of a block as a fiber on its worker. A fiber runs until it reaches a barrier or a warp shuffle, which wait for the whole
// block / warp; that a block or warp arrives whole, at one call site and with a full mask is
// checked, as are the launch rules of the emulated GPU (block and grid limits, registers, the
// 48 KiB default and the opt-in maximum of dynamic + static shared memory).
//
// Sanitizers: built with ASan, fiber stacks are announced on every switch and the unused tail of
// dynamic shared memory is poisoned; built with TSan (AK_EMU_TSAN), every fiber is a TSan fiber,
// switches do not synchronise, and only barriers and launch boundaries do, so a missing
// barrier is reported as a data race (between blocks: for blocks that overlap in time here).
// This file itself is built without TSan: its bookkeeping is not the kernel's memory.
#include "cuda_runtime.h"

#include <pthread.h>
#include <sys/mman.h>


#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define AK_EMU_ASAN 1
#endif
#if defined(AK_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#error "cuda-emu switches fibers with x86-64 assembly"
#endif

// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// resumes the fiber whose stack pointer is `to` (System V x86-64).
extern "C" void ak_emu_switch(void** from, void* to);
asm(R"(
.text
.globl ak_emu_switch
.type ak_emu_switch,@function
ak_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size ak_emu_switch,.-ak_emu_switch
)");

namespace ak_emu {
namespace {

[[noreturn]] void fatal(const std::string& what);

// The emulated GPU: sm_90 (H100/H200) unless AK_EMU_ARCH=80.
struct Gpu {
  int arch, sm_count, smem_optin;
};
const Gpu& gpu() {
  static const Gpu g = [] {
    const char* arch = std::getenv("AK_EMU_ARCH");
    if (arch && std::string(arch) == "80") return Gpu{80, 108, 166912};
    return Gpu{90, 132, 232448};
  }();
  return g;
}
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kRegistersPerBlock = 65536;

std::mutex registry_mutex;
std::map<const void*, KernelInfo>& registry() {
  static std::map<const void*, KernelInfo> kernels;
  return kernels;
}
KernelInfo* find_kernel(const void* kernel) {
  auto it = registry().find(kernel);
  return it == registry().end() ? nullptr : &it->second;
}

thread_local cudaError_t last_error = cudaSuccess;
cudaError_t record(cudaError_t err) {
  if (err != cudaSuccess) last_error = err;
  return err;
}

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  void* sp = nullptr;
  uint3 tid{};
  int linear = 0;
  Wait wait = Wait::kNone;
  int line = 0;
  void* tsan = nullptr;
  void* asan_fake_stack = nullptr;
};

struct Warp {
  int lanes = 0, arrived = 0, line = 0;
  unsigned generation = 0;
  float value[32], result[32];
  int source[32];
};

struct Block {
  uint3 index{};
  dim3 dim, grid;
  const char* kernel = "";
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  char* stacks = nullptr;
  size_t stack_size = 0, stacks_bytes = 0;
  int current = 0, live = 0;
  int arrived = 0, line = 0, or_accum = 0, or_result = 0;
  unsigned generation = 0;
  // TSan sync objects (the Block lives on the heap, so they die with it): the block barrier, one
  // per generation parity; setup (scheduler -> fibers) and exit (fibers -> scheduler).
  char token[2];
  char setup_token, exit_token;
  void* sched_sp = nullptr;
  void* sched_fake_stack = nullptr;
  void* sched_tsan = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};

thread_local Block* tl_block = nullptr;
// The running fiber's threadIdx, copied on every switch: the kernel reads this, not the Block.
thread_local uint3 tl_thread_index;
// Launch boundaries: the host releases `launch_begin` before the blocks start, every fiber
// releases `launch_end` when it finishes and the host acquires it after the last block.
char launch_begin, launch_end;

Fiber& current_fiber() { return tl_block->fibers[tl_block->current]; }

std::string where() {
  if (!tl_block) return "host";
  const Block& b = *tl_block;
  const Fiber& f = b.fibers[b.current];
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s, block (%u,%u,%u), thread (%u,%u,%u)", b.kernel, b.index.x,
                b.index.y, b.index.z, f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

[[noreturn]] void fatal(const std::string& what) {
  std::fprintf(stderr, "cuda-emu: %s [%s]\n", what.c_str(), where().c_str());
  std::fflush(stderr);
  std::abort();
}

void acquire(void* token) {
#if defined(AK_EMU_TSAN)
  __tsan_acquire(token);
#else
  (void)token;
#endif
}
void release(void* token) {
#if defined(AK_EMU_TSAN)
  __tsan_release(token);
#else
  (void)token;
#endif
}

const void* stack_bottom(const Block& b, int fiber) { return b.stacks + size_t(fiber) * b.stack_size; }

// Switches from fiber `from` (-1: the scheduler) to fiber `to` (-1: the scheduler); `exiting`
// when `from` never runs again.
void switch_fiber(Block& b, int from, int to, bool exiting) {
  void** save = from < 0 ? &b.sched_sp : &b.fibers[from].sp;
  void* target = to < 0 ? b.sched_sp : b.fibers[to].sp;
  b.current = to < 0 ? 0 : to;
  if (to >= 0) tl_thread_index = b.fibers[to].tid;
#if defined(AK_EMU_TSAN)
  __tsan_switch_to_fiber(to < 0 ? b.sched_tsan : b.fibers[to].tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(AK_EMU_ASAN)
  void** fake = exiting ? nullptr : (from < 0 ? &b.sched_fake_stack : &b.fibers[from].asan_fake_stack);
  __sanitizer_start_switch_fiber(fake, to < 0 ? b.sched_stack_bottom : stack_bottom(b, to),
                                 to < 0 ? b.sched_stack_size : b.stack_size);
#else
  (void)exiting;
#endif
  static void* discard;
  ak_emu_switch(exiting ? &discard : save, target);
  // Resumed (never reached by an exiting fiber).
#if defined(AK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(from < 0 ? b.sched_fake_stack : b.fibers[from].asan_fake_stack, nullptr, nullptr);
#endif
  b.current = from < 0 ? 0 : from;
  if (from >= 0) tl_thread_index = b.fibers[from].tid;
}

std::string waiting_report(const Block& b) {
  std::string out;
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.wait == Wait::kDone || shown >= 8) continue;
    char buf[128];
    std::snprintf(buf, sizeof buf, "; thread %d waits at %s line %d", f.linear,
                  f.wait == Wait::kBlock ? "__syncthreads" : "a warp shuffle", f.line);
    out += buf;
    ++shown;
  }
  return out;
}

// Runs the next fiber that can run, after the current one; back to the scheduler when every
// fiber has finished. No fiber can run while some are unfinished: a deadlock, reported.
void run_next(bool exiting) {
  Block& b = *tl_block;
  const int n = static_cast<int>(b.fibers.size()), self = b.current;
  for (int step = 1; step <= n; ++step) {
    const int next = (self + step) % n;
    if (b.fibers[next].wait == Wait::kNone) {
      if (next == self) return;
      switch_fiber(b, self, next, exiting);
      return;
    }
  }
  if (b.live == 0) {
    switch_fiber(b, self, -1, exiting);
    return;
  }
  fatal("deadlock: no thread of the block can go on (a barrier or shuffle that some threads never "
        "reach, or reach after exiting)" + waiting_report(b));
}

void fiber_main() {
  Block& b = *tl_block;
#if defined(AK_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  acquire(&launch_begin);
  acquire(&b.setup_token);
  (*b.body)();
  release(&launch_end);
  release(&b.exit_token);
  Fiber& f = current_fiber();
  f.wait = Wait::kDone;
  --b.live;
  run_next(/*exiting=*/true);
  fatal("a finished fiber was resumed");
}

extern "C" void ak_emu_fiber_entry() { fiber_main(); }

// Per worker, kept across blocks: fiber stacks (mapping them and their sanitizer shadow per block
// cost more than running the block) and, under TSan, fiber contexts; stack i is always used by
// fiber context i, so reuse orders nothing between workers.
struct WorkerState {
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  std::vector<void*> tsan_fibers;
};
thread_local WorkerState worker_state;

char* worker_stacks(size_t bytes) {
  WorkerState& w = worker_state;
  if (w.stacks_bytes < bytes) {
    if (w.stacks) munmap(w.stacks, w.stacks_bytes);
    void* region = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) fatal("cannot map fiber stacks");
    w.stacks = static_cast<char*>(region);
    w.stacks_bytes = bytes;
  }
  return w.stacks;
}

void run_block(const void* kernel, const dim3& grid, const dim3& dim, uint3 index,
               unsigned char* dynamic_smem, size_t dynamic_bytes, const char* name,
               const std::function<void()>& body) {
  (void)kernel;
  const std::unique_ptr<Block> block = std::make_unique<Block>();
  Block& b = *block;
  b.index = index;
  b.dim = dim;
  b.grid = grid;
  b.kernel = name;
  b.body = &body;
  const int n = static_cast<int>(dim.x * dim.y * dim.z);
#if defined(AK_EMU_ASAN)
  b.stack_size = 256 * 1024;  // ASan's redzones grow frames
#else
  b.stack_size = 64 * 1024;
#endif
  b.stacks_bytes = b.stack_size * n;
  b.stacks = worker_stacks(b.stacks_bytes);
  b.fibers.resize(n);
  b.warps.resize((n + 31) / 32);
  for (int w = 0; w < static_cast<int>(b.warps.size()); ++w) b.warps[w].lanes = std::min(32, n - 32 * w);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = {unsigned(i % dim.x), unsigned(i / dim.x % dim.y), unsigned(i / (dim.x * dim.y))};
    // A guard page at the bottom of every stack; the first switch "returns" into the entry.
    char* bottom = b.stacks + size_t(i) * b.stack_size;
    mprotect(bottom, 4096, PROT_NONE);
    void** top = reinterpret_cast<void**>(bottom + b.stack_size);
    *--top = nullptr;                                          // alignment slot
    *--top = reinterpret_cast<void*>(&ak_emu_fiber_entry);     // return address
    for (int r = 0; r < 6; ++r) *--top = nullptr;              // rbp rbx r12-r15
    f.sp = top;
#if defined(AK_EMU_TSAN)
    while (worker_state.tsan_fibers.size() <= size_t(i)) worker_state.tsan_fibers.push_back(__tsan_create_fiber(0));
    f.tsan = worker_state.tsan_fibers[i];
#endif
  }
  b.live = n;
  // Dynamic shared memory: poisoned values in the launch's bytes, no access past them.
  std::memset(dynamic_smem, 0xff, dynamic_bytes);
#if defined(AK_EMU_ASAN)
  ASAN_POISON_MEMORY_REGION(dynamic_smem + dynamic_bytes, kMaxSmem - dynamic_bytes);
#endif
#if defined(AK_EMU_TSAN)
  b.sched_tsan = __tsan_get_current_fiber();
#endif
#if defined(AK_EMU_ASAN)
  pthread_attr_t attr;
  void* stack_addr;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &stack_addr, &b.sched_stack_size);
  pthread_attr_destroy(&attr);
  b.sched_stack_bottom = stack_addr;
#endif
  release(&b.setup_token);
  tl_block = &b;
  switch_fiber(b, -1, 0, false);
  acquire(&b.exit_token);  // before dynamic shared memory is poisoned again for the next block
  tl_block = nullptr;
#if defined(AK_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(dynamic_smem, kMaxSmem);
  ASAN_UNPOISON_MEMORY_REGION(b.stacks, b.stacks_bytes);
#endif
}

// Persistent host threads that run the blocks of a launch, AK_EMU_WORKERS of them (default 2).
class Workers {
 public:
  Workers() {
    const char* env = std::getenv("AK_EMU_WORKERS");
    const int n = std::max(1, env ? std::atoi(env) : 2);
    for (int i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }
  // Runs job(i) for every i in [0, count) and returns when all have run.
  void run(size_t count, const std::function<void(size_t)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    next_ = 0;
    count_ = count;
    done_ = 0;
    work_.notify_all();
    finished_.wait(lock, [&] { return done_ == count_; });
    job_ = nullptr;
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_.wait(lock, [&] { return job_ && next_ < count_; });
      const size_t i = next_++;
      const std::function<void(size_t)>* job = job_;
      lock.unlock();
      (*job)(i);
      lock.lock();
      if (++done_ == count_) finished_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable work_, finished_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t next_ = 0, count_ = 0, done_ = 0;
};

Workers& workers() {
  static Workers* pool = new Workers();  // never destroyed: its threads live as long as the process
  return *pool;
}

std::mutex allocation_mutex;
std::map<const void*, size_t>& allocations() {
  static std::map<const void*, size_t> live;
  return live;
}

}  // namespace

const unsigned char* tls_anchor(const unsigned char* p) { return p; }

void register_kernel(const void* kernel, const char* name, int static_smem, int registers) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[kernel] = KernelInfo{kernel, name, static_smem, registers, kDefaultSmem - static_smem};
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  const KernelInfo* info = find_kernel(kernel);
  if (!info) return record(cudaErrorInvalidDeviceFunction);
  *attr = {};
  attr->sharedSizeBytes = size_t(info->static_smem);
  attr->maxThreadsPerBlock = 1024;
  attr->numRegs = info->registers;
  attr->maxDynamicSharedSizeBytes = info->max_dynamic_smem;
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  KernelInfo* info = find_kernel(kernel);
  if (!info) return record(cudaErrorInvalidDeviceFunction);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return record(cudaErrorInvalidValue);
  if (value < 0 || value > gpu().smem_optin - info->static_smem) return record(cudaErrorInvalidValue);
  info->max_dynamic_smem = value;
  return cudaSuccess;
}

cudaError_t launch(const void* kernel, const cudaLaunchConfig_t& config,
                   unsigned char* (*dynamic_smem)(), std::function<void()> body) {
  KernelInfo info;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    const KernelInfo* found = find_kernel(kernel);
    if (!found) fatal("launch of a kernel that is not in the ptxas table (scripts/cuda_emu.py)");
    info = *found;
  }
  const dim3 g = config.gridDim, t = config.blockDim;
  const uint64_t threads = uint64_t(t.x) * t.y * t.z;
  if (t.x == 0 || t.y == 0 || t.z == 0 || t.x > 1024 || t.y > 1024 || t.z > 64 || threads > 1024)
    return record(cudaErrorInvalidConfiguration);
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return record(cudaErrorInvalidConfiguration);
  if (threads * uint64_t(info.registers) > uint64_t(kRegistersPerBlock))
    return record(cudaErrorLaunchOutOfResources);
  // The dynamic size is bounded by the kernel's attribute (48 KiB - static unless raised), and
  // dynamic + static by the device's opt-in maximum.
  if (config.dynamicSmemBytes > size_t(info.max_dynamic_smem) ||
      config.dynamicSmemBytes + size_t(info.static_smem) > size_t(gpu().smem_optin))
    return record(cudaErrorInvalidValue);

  std::vector<uint3> blocks;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back({x, y, z});
  ::blockDim = t;
  ::gridDim = g;
  release(&launch_begin);
  workers().run(blocks.size(), [&](size_t i) {
    run_block(kernel, g, t, blocks[i], dynamic_smem(), config.dynamicSmemBytes, info.name, body);
  });
  acquire(&launch_end);
  return cudaSuccess;
}

const uint3& thread_index() {
  if (!tl_block) fatal("threadIdx read outside a kernel");
  return tl_thread_index;
}
const uint3& block_index() {
  if (!tl_block) fatal("blockIdx read outside a kernel");
  return tl_block->index;
}

int sync_block(int line, int pred) {
  if (!tl_block) fatal("__syncthreads outside a kernel");
  Block& b = *tl_block;
  Fiber& f = current_fiber();
  if (b.arrived == 0) {
    b.line = line;
  } else if (b.line != line) {
    fatal("divergent __syncthreads: this thread is at line " + std::to_string(line) +
          ", others of its block wait at line " + std::to_string(b.line));
  }
  const unsigned generation = b.generation;
  void* token = &b.token[generation & 1];
  release(token);
  b.or_accum |= pred != 0;
  f.line = line;
  if (++b.arrived == static_cast<int>(b.fibers.size())) {
    b.or_result = b.or_accum;
    b.or_accum = 0;
    b.arrived = 0;
    ++b.generation;
    for (Fiber& other : b.fibers)
      if (other.wait == Wait::kBlock) other.wait = Wait::kNone;
  } else {
    f.wait = Wait::kBlock;
    run_next(false);
  }
  acquire(token);
  return b.or_result;
}

float shuffle_xor(int line, unsigned mask, float value, int lane_mask) {
  if (!tl_block) fatal("warp shuffle outside a kernel");
  Block& b = *tl_block;
  Fiber& f = current_fiber();
  Warp& w = b.warps[f.linear / 32];
  const int lane = f.linear % 32;
  const unsigned full = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1u;
  if (mask != full) fatal("warp shuffle with mask that does not name every lane of the warp");
  if (w.arrived == 0) {
    w.line = line;
  } else if (w.line != line) {
    fatal("divergent warp shuffle: this lane is at line " + std::to_string(line) +
          ", others of its warp wait at line " + std::to_string(w.line));
  }
  // No TSan synchronisation here: a shuffle exchanges registers, it orders no memory (that is
  // __syncwarp's job), so shared memory passed between lanes without a barrier stays a race.
  w.value[lane] = value;
  w.source[lane] = lane ^ lane_mask;
  f.line = line;
  if (++w.arrived == w.lanes) {
    for (int i = 0; i < w.lanes; ++i)
      w.result[i] = w.source[i] < w.lanes ? w.value[w.source[i]] : w.value[i];
    w.arrived = 0;
    ++w.generation;
    for (int i = 0; i < w.lanes; ++i) {
      Fiber& other = b.fibers[f.linear / 32 * 32 + i];
      if (other.wait == Wait::kWarp) other.wait = Wait::kNone;
    }
  } else {
    f.wait = Wait::kWarp;
    run_next(false);
  }
  return w.result[lane];
}

const void* check_aligned(const void* ptr, size_t align, int line) {
  if (reinterpret_cast<uintptr_t>(ptr) % align != 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "misaligned %zu-byte access at address %p (steer_cuda.cu line %d)",
                  align, ptr, line);
    fatal(buf);
  }
  return ptr;
}
void* check_aligned(void* ptr, size_t align, int line) {
  return const_cast<void*>(check_aligned(static_cast<const void*>(ptr), align, line));
}

}  // namespace ak_emu

dim3 blockDim, gridDim;

using ak_emu::record;

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  void* p = nullptr;
  // 256-byte aligned as cudaMalloc; exactly `bytes` long, so ASan sees any access past the end.
  if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return record(cudaErrorMemoryAllocation);
  std::memset(p, 0xff, bytes);  // device memory starts as garbage: NaN in every float format
  std::lock_guard<std::mutex> lock(ak_emu::allocation_mutex);
  ak_emu::allocations()[p] = bytes;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(ak_emu::allocation_mutex);
  if (ak_emu::allocations().erase(ptr) == 0) return record(cudaErrorInvalidValue);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : record(cudaErrorInvalidDevice); }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return record(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ak_emu::gpu().smem_optin; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = ak_emu::gpu().sm_count; return cudaSuccess;
  }
  return record(cudaErrorInvalidValue);
}
cudaError_t cudaGetLastError() {
  const cudaError_t err = ak_emu::last_error;
  ak_emu::last_error = cudaSuccess;
  return err;
}
cudaError_t cudaPeekAtLastError() { return ak_emu::last_error; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}
