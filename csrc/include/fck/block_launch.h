// Kernels written as functors, launched on CUDA or emulated on the CPU for the tests.
//
// A body is a functor (the kernel's arguments as fields, `Shared` its block's shared storage, `kMaxThreads` its
// largest block) called as body(ctx, shared) on every thread of every block; ctx has tid, block, threads and sync()
// (__syncthreads). On the CPU, emulate_blocks runs one std::thread per CUDA thread and a barrier for sync(), a
// block at a time, its shared storage filled with NaN first so that a read of a value no thread wrote shows in the
// results: slow, and only for checking a kernel's indexing and barriers where no GPU is. An environment switch
// read per call (tests flip it between calls) picks the emulation; env_on says whether one is "1", env_off whether
// it is "0" (a default-on kernel switched off).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#else
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#endif

namespace fck {

inline bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "1") == 0;
}

inline bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "0") == 0;
}

#if defined(__CUDACC__)

struct DeviceCtx {
  int tid, block, threads;
  __device__ void sync() const { __syncthreads(); }
};

// The block's Shared lives in dynamic shared memory (one untyped array for every instantiation), so a body may hold
// more than the 48 KB a static declaration allows: the persistent RNN kernels keep part of W_hh there.
template <class Body>
__global__ void __launch_bounds__(Body::kMaxThreads) block_kernel(const Body body) {
  extern __shared__ __align__(16) unsigned char block_shared[];
  DeviceCtx ctx{int(threadIdx.x), int(blockIdx.x), int(blockDim.x)};
  body(ctx, *reinterpret_cast<typename Body::Shared*>(block_shared));
}

template <class Body>
void launch_blocks(int blocks, int threads, const Body& body) {
  constexpr size_t bytes = sizeof(typename Body::Shared);
  if (bytes > 48 * 1024) {  // the opt-in above 48 KB, per device (a cheap driver call next to a persistent launch)
    C10_CUDA_CHECK(cudaFuncSetAttribute(block_kernel<Body>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
  block_kernel<Body><<<blocks, threads, bytes, at::cuda::getCurrentCUDAStream()>>>(body);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#else

// std::barrier is C++20, and older torch (2.11 on the GPU machine) builds extensions as C++17.
class BlockBarrier {
 public:
  explicit BlockBarrier(int threads) : threads_(threads) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
    } else {
      released_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int threads_;
  int arrived_ = 0;
  long generation_ = 0;
};

struct HostCtx {
  int tid, block, threads;
  BlockBarrier* bar;
  void sync() const { bar->arrive_and_wait(); }
};

template <class Body>
void emulate_blocks(int blocks, int threads, const Body& body) {
  using Shared = typename Body::Shared;
  static_assert(sizeof(Shared) % sizeof(float) == 0);
  for (int block = 0; block < blocks; ++block) {
    auto sh = std::make_unique<Shared>();
    std::fill_n(reinterpret_cast<float*>(sh.get()), sizeof(Shared) / sizeof(float), NAN);
    BlockBarrier bar(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int tid = 0; tid < threads; ++tid) {
      pool.emplace_back([&, tid] {
        HostCtx ctx{tid, block, threads, &bar};
        body(ctx, *sh);
      });
    }
    for (std::thread& t : pool) t.join();
  }
}

#endif

}  // namespace fck
