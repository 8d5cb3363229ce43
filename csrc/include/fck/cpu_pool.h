// A caching allocator for the large CPU tensors the kernels return.
//
// glibc serves allocations above its mmap threshold (32 MiB at most) with fresh mmap()s and unmaps them on free, so
// every large output is page-faulted and zeroed by the kernel on first touch: for a 51 MB activation on this 2-core
// machine that is ~30 ms, four times what writing it costs. Outputs taken from this pool reuse warm pages instead.
// Blocks are matched by size class (rounded up to 2 MiB, the huge-page size the pool asks the kernel for); at most
// FCK_CPU_POOL_MB (default 2048) is kept cached, beyond that freed blocks go back to the system.
#pragma once

#include <ATen/ATen.h>

namespace fck {
namespace cpu {

// An uninitialized tensor with x's sizes, strides (x must be dense) and options, from the pool when large.
at::Tensor pooled_empty_like(const at::Tensor& x);

// An uninitialized contiguous tensor, from the pool when large.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// A contiguous copy of x in a pooled block (a copy even when x is contiguous: the op's schema promises a new tensor).
at::Tensor contiguous_pooled(const at::Tensor& x);

// a @ b (2-D) into a pooled block.
at::Tensor mm_pooled(const at::Tensor& a, const at::Tensor& b);

// Returns every cached block to the system; the number of bytes released.
int64_t pool_release_cached();

}  // namespace cpu
}  // namespace fck
