// Shared by the host compiler and nvcc: the per-element math in fck/*.h is written once and inlined into both the
// CPU loops (csrc/cpu) and the CUDA kernels (csrc/cuda), so CPU tests exercise the same arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define FCK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FCK_HOST_DEVICE inline __attribute__((always_inline))
#endif
