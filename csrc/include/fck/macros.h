// Shared by the host compiler and nvcc: the per-element math in fck/*.h is written once and inlined into both the
// CPU loops (csrc/cpu) and the CUDA kernels (csrc/cuda), so CPU tests exercise the same arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define FCK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FCK_HOST_DEVICE inline __attribute__((always_inline))
#endif

// Unrolls a loop on the GPU (register arrays indexed by its counter stay in registers); nothing on the host.
#if defined(__CUDA_ARCH__)
#define FCK_UNROLL _Pragma("unroll")
#define FCK_UNROLL_4 _Pragma("unroll 4")
#else
#define FCK_UNROLL
#define FCK_UNROLL_4
#endif
