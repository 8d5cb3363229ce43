// LSTM and GRU layers on CUDA: the loops of fck/rnn_host.h (cuBLAS for the hidden GEMM of each step) with one fused
// pointwise kernel per step, one thread per (row, hidden unit), all gates of a unit in the same thread so the
// cell update needs no exchange. Consecutive threads read consecutive units of each gate chunk: coalesced.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fck/acc.h"
#include "fck/block_launch.h"
#include "fck/ops.h"
#include "fck/rnn.h"
#include "fck/rnn_host.h"
#include "fck/rnn_persistent.h"
#include "fck/skinny_gemm.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename A>
__global__ void lstm_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias,
                                const A* __restrict__ c_prev,
                                A* __restrict__ gates, A* __restrict__ c, T* __restrict__ h, int64_t B, int64_t H) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B * H) return;
  const int64_t b = k / H, j = k - b * H, g0 = b * 4 * H + j;
  auto p = [&](int gate) { return A(xg[g0 + gate * H]) + A(hg[g0 + gate * H]) + A(bias[j + gate * H]); };
  A cc, hh;
  const LstmGates<A> a = lstm_forward<A>(p(0), p(1), p(2), p(3), c_prev[k], cc, hh);
  gates[g0] = a.i, gates[g0 + H] = a.f, gates[g0 + 2 * H] = a.g, gates[g0 + 3 * H] = a.o;
  c[k] = cc;
  h[k] = T(hh);
}

template <typename T, typename A>
__global__ void lstm_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ dh_rec,
                                const A* __restrict__ gates, const A* __restrict__ c_prev, const A* __restrict__ c,
                                A* __restrict__ dc, T* __restrict__ dxg, int64_t B, int64_t H) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B * H) return;
  const int64_t b = k / H, j = k - b * H, g0 = b * 4 * H + j;
  A dcj = dc[k];
  const LstmGates<A> d = lstm_backward<A>(A(dout[k]) + A(dh_rec[k]), dcj,
                                          {gates[g0], gates[g0 + H], gates[g0 + 2 * H], gates[g0 + 3 * H]},
                                          c_prev[k], c[k]);
  dc[k] = dcj;
  dxg[g0] = T(d.i), dxg[g0 + H] = T(d.f), dxg[g0 + 2 * H] = T(d.g), dxg[g0 + 3 * H] = T(d.o);
}

template <typename T, typename A>
__global__ void gru_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ b_ih,
                               const T* __restrict__ b_hh, const T* __restrict__ h_prev,
                               A* __restrict__ saved, T* __restrict__ h, int64_t B, int64_t H) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B * H) return;
  const int64_t b = k / H, j = k - b * H, g0 = b * 3 * H + j, s0 = b * 4 * H + j;
  A hh;
  auto xpart = [&](int gate) { return A(xg[g0 + gate * H]) + A(b_ih[j + gate * H]); };
  auto hpart = [&](int gate) { return A(hg[g0 + gate * H]) + A(b_hh[j + gate * H]); };
  const GruSaved<A> s = gru_forward<A>(xpart(0), xpart(1), xpart(2), hpart(0), hpart(1), hpart(2), A(h_prev[k]), hh);
  saved[s0] = s.r, saved[s0 + H] = s.z, saved[s0 + 2 * H] = s.n, saved[s0 + 3 * H] = s.bn;
  h[k] = T(hh);
}

template <typename T, typename A>
__global__ void gru_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ dh_rec, A* __restrict__ dh_direct,
                               const A* __restrict__ saved, const T* __restrict__ h_prev, T* __restrict__ dxg,
                               T* __restrict__ dhg, int64_t B, int64_t H) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B * H) return;
  const int64_t b = k / H, j = k - b * H, g0 = b * 3 * H + j, s0 = b * 4 * H + j;
  const GruGrads<A> p = gru_backward<A>(A(dout[k]) + A(dh_rec[k]) + dh_direct[k],
                                        {saved[s0], saved[s0 + H], saved[s0 + 2 * H], saved[s0 + 3 * H]},
                                        A(h_prev[k]));
  dh_direct[k] = p.h_prev;
  dxg[g0] = dhg[g0] = T(p.r);
  dxg[g0 + H] = dhg[g0 + H] = T(p.z);
  dxg[g0 + 2 * H] = T(p.an);
  dhg[g0 + 2 * H] = T(p.bn);
}

// The persistent kernels (fck/rnn_persistent.h): one launch per layer, direction and pass, for hidden <= 256. On by
// default since the H200 run of 2026-11-28 (lesson-7 LSTM fwd+bwd 1.66 ms wall / 0.62 GPU against the per-step
// loop's 8.1 / 1.62); FCK_RNN_PERSISTENT_CUDA=0 runs the per-step loop.
struct CudaLaunch {
  static bool enabled() { return !env_off("FCK_RNN_PERSISTENT_CUDA"); }
  static int64_t blocks_at_once() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
  static size_t shared_max() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
  static at::Tensor scratch(int64_t floats) {
    return at::empty({floats}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, at::cuda::current_device()));
  }
  template <class Body>
  static void launch(int blocks, int threads, const Body& body) {
    launch_blocks(blocks, threads, body);
  }
};

#define FCK_RNN_LAUNCH(kernel, n, H, ...)                                                                        \
  do {                                                                                                           \
    const int64_t count = (n) * (H);                                                                             \
    if (count == 0) break;                                                                                       \
    const auto kfn = kernel;                                                                                     \
    kfn<<<(count + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__, n, H); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                              \
  } while (0)

template <typename T>
at::Tensor view(const T* p, at::IntArrayRef sizes, const at::Tensor& like) {
  return at::from_blob(const_cast<T*>(p), sizes, like.options());
}

// A whole pass in one persistent kernel where eligible and not switched off (Passes, fck/rnn_persistent.h), else
// the loop.
struct RnnSteps : persistent::Passes<CudaLaunch> {
  template <typename T>
  using Acc = typename AccOf<T>::type;

  template <class F>
  static void dispatch(at::ScalarType t, F&& f) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "fck::rnn_layer", [&] { f(scalar_t{}); });
  }

  // Bias gradients by a sum over the whole gradient after the loop (rnn::BlockSums).
  static constexpr bool kSumsRows = false;

  // One block of rows: the GPU parallelizes each step across the whole batch.
  template <class F>
  static void row_blocks(int64_t B, int64_t, int64_t, int64_t, const F& f) {
    f(0, B);
  }

  template <typename T>
  static rnn::Weight<T> weight(const T* w, bool wt, int64_t N, int64_t K, int64_t m, int64_t, const at::Tensor&) {
    return {w, wt, N, K, m, at::Tensor()};
  }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);  // the caching allocator keeps blocks warm already
  }
  // c (n x N) = a (n x K) @ op(w) on views of the buffers: fp32 steps of up to 32 rows under full fp32 matmul
  // precision by fck/skinny_gemm.h (FCK_RNN_SKINNY_GEMM=0: cuBLAS), the rest by cuBLAS through at::mm_out.
  template <typename T>
  static void gemm(int64_t n, const T* a, const rnn::Weight<T>& W, T* c, const at::Tensor& like) {
    if (n == 0) return;
    at::Tensor out = view(c, {n, W.N}, like);
    const at::Tensor av = view(a, {n, W.K}, like);
    const at::Tensor wv = W.wt ? view(W.w, {W.N, W.K}, like) : view(W.w, {W.K, W.N}, like);
    if constexpr (std::is_same_v<T, float>) {
      if (skinny::takes(n, W.K, W.N) && !env_off("FCK_RNN_SKINNY_GEMM") &&
          at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST) {
        skinny::mm_out<CudaLaunch>(out, av, wv, W.wt);
        return;
      }
    }
    at::mm_out(out, av, W.wt ? wv.t() : wv);
  }

  template <typename T>
  static void lstm_fwd(const T* xg, const T* hg, const T* bias, const Acc<T>* c_prev, Acc<T>* gates, Acc<T>* c,
                       T* h, int64_t n, int64_t H) {
    FCK_RNN_LAUNCH((lstm_fwd_kernel<T, Acc<T>>), n, H, xg, hg, bias, c_prev, gates, c, h);
  }
  template <typename T>
  static void lstm_bwd(const T* dout, const T* dh_rec, const Acc<T>* gates, const Acc<T>* c_prev, const Acc<T>* c,
                       Acc<T>* dc, T* dxg, int64_t n, int64_t H) {
    FCK_RNN_LAUNCH((lstm_bwd_kernel<T, Acc<T>>), n, H, dout, dh_rec, gates, c_prev, c, dc, dxg);
  }
  template <typename T>
  static void gru_fwd(const T* xg, const T* hg, const T* b_ih, const T* b_hh, const T* h_prev, Acc<T>* saved, T* h,
                      int64_t n, int64_t H) {
    FCK_RNN_LAUNCH((gru_fwd_kernel<T, Acc<T>>), n, H, xg, hg, b_ih, b_hh, h_prev, saved, h);
  }
  template <typename T>
  static void gru_bwd(const T* dout, const T* dh_rec, Acc<T>* dh_direct, const Acc<T>* saved, const T* h_prev,
                      T* dxg, T* dhg, int64_t n, int64_t H) {
    FCK_RNN_LAUNCH((gru_bwd_kernel<T, Acc<T>>), n, H, dout, dh_rec, dh_direct, saved, h_prev, dxg, dhg);
  }
};

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got one on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(FCK_LSTM_FWD_ARGS) {
  check_cuda(xg, "lstm_layer_fwd");
  const c10::cuda::CUDAGuard guard(xg.device());
  return rnn::lstm_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, bias, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(FCK_LSTM_BWD_ARGS) {
  check_cuda(out, "lstm_layer_bwd");
  const c10::cuda::CUDAGuard guard(out.device());
  return rnn::lstm_layer_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, out, c_all, gates, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_fwd(
    FCK_LSTM_PROJ_FWD_ARGS) {
  check_cuda(xg, "lstm_proj_layer_fwd");
  const c10::cuda::CUDAGuard guard(xg.device());
  return rnn::lstm_proj_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, w_hr, bias, reverse, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_bwd(
    FCK_LSTM_PROJ_BWD_ARGS) {
  check_cuda(out, "lstm_proj_layer_bwd");
  const c10::cuda::CUDAGuard guard(out.device());
  return rnn::lstm_proj_layer_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, w_hr, out, u, c_all, gates,
                                            reverse);
}

at::Tensor skinny_mm(const at::Tensor& a, const at::Tensor& w, bool wt, int64_t splits) {
  check_cuda(a, "skinny_mm");
  const c10::cuda::CUDAGuard guard(a.device());
  return skinny::mm<CudaLaunch>(a, w, wt, splits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(FCK_GRU_FWD_ARGS) {
  check_cuda(xg, "gru_layer_fwd");
  const c10::cuda::CUDAGuard guard(xg.device());
  return rnn::gru_layer_fwd<RnnSteps>(xg, h0, w_hh, b_ih, b_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(FCK_GRU_BWD_ARGS) {
  check_cuda(out, "gru_layer_bwd");
  const c10::cuda::CUDAGuard guard(out.device());
  return rnn::gru_layer_bwd<RnnSteps>(grad_out, grad_hn, h0, w_hh, out, saved, reverse);
}

}  // namespace cuda
}  // namespace fck
