// See fck/cpu_pool.h.
#include "fck/cpu_pool.h"

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>
#include <algorithm>

namespace fck {
namespace cpu {
namespace {

constexpr size_t kClass = size_t(2) << 20;  // size classes and alignment: 2 MiB, one huge page
constexpr size_t kMinPooled = size_t(1) << 20;  // smaller tensors stay in malloc's arenas, which keep them warm

size_t cap_bytes() {
  static const size_t cap = [] {
    const char* env = std::getenv("FCK_CPU_POOL_MB");
    return size_t(env ? std::stoll(env) : 2048) << 20;
  }();
  return cap;
}

struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;
  size_t cached = 0;

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_blocks.find(bytes);
      if (it != free_blocks.end()) {
        void* p = it->second;
        free_blocks.erase(it);
        cached -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kClass, bytes) == 0 && p, "fastcore_kernels: out of memory allocating ", bytes,
                " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // fewer faults and TLB misses; a hint the kernel may ignore
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (cached + bytes <= cap_bytes()) {
        free_blocks.emplace(bytes, p);
        cached += bytes;
        return;
      }
    }
    std::free(p);
  }

  int64_t release() {
    std::multimap<size_t, void*> blocks;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mu);
      blocks.swap(free_blocks);
      bytes = cached;
      cached = 0;
    }
    for (auto& kv : blocks) std::free(kv.second);
    return int64_t(bytes);
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed during interpreter shutdown
  return *p;
}

}  // namespace

namespace {

at::Tensor from_pool(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options,
                     size_t bytes) {
  const size_t rounded = (bytes + kClass - 1) / kClass * kClass;
  void* p = pool().take(rounded);
  return at::from_blob(
      p, sizes, strides, [rounded](void* q) { pool().give(q, rounded); }, options);
}

}  // namespace

at::Tensor pooled_empty_like(const at::Tensor& x) {
  const size_t bytes = size_t(x.numel()) * x.element_size();
  if (bytes < kMinPooled) return at::empty_like(x);
  return from_pool(x.sizes(), x.strides(), x.options(), bytes);
}

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinPooled) return at::empty(sizes, options);
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  return from_pool(sizes, strides, options, bytes);
}

int64_t pool_release_cached() { return pool().release(); }

at::Tensor contiguous_pooled(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fck::contiguous_pooled: a CPU tensor is expected");
  return pooled_empty(x.sizes(), x.options()).copy_(x);
}

at::Tensor mm_pooled(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "fck::mm_pooled: CPU tensors are expected");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "fck::mm_pooled: cannot multiply ", a.sizes(),
              " by ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fck::mm_pooled: ", a.scalar_type(), " times ", b.scalar_type());
  at::Tensor out = pooled_empty({a.size(0), b.size(1)}, a.options());
  return at::mm_out(out, a, b);
}

}  // namespace cpu
}  // namespace fck
