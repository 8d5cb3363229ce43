// LSTM and GRU layers on CUDA: the loops of fck/rnn_host.h (cuBLAS for the hidden GEMM of each step) with one fused
// pointwise kernel per step, one thread per (row, hidden unit), all gates of a unit in the same thread so the
// cell update needs no exchange. Consecutive threads read consecutive units of each gate chunk: coalesced.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fck/acc.h"
#include "fck/ops.h"
#include "fck/rnn.h"
#include "fck/rnn_host.h"

namespace fck {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename A>
__global__ void lstm_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ hg, const A* __restrict__ c_prev,
                                A* __restrict__ gates, A* __restrict__ c, T* __restrict__ h, int64_t B, int64_t H) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B * H) return;
  const int64_t b = k / H, j = k - b * H, g0 = b * 4 * H + j;
  auto p = [&](int gate) { return A(xg[g0 + gate * H]) + A(hg[g0 + gate * H]); };
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
__global__ void gru_fwd_kernel(const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ h_prev,
                               A* __restrict__ saved, T* __restrict__ h, int64_t B, int64_t H) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B * H) return;
  const int64_t b = k / H, j = k - b * H, g0 = b * 3 * H + j, s0 = b * 4 * H + j;
  A hh;
  const GruSaved<A> s = gru_forward<A>(A(xg[g0]), A(xg[g0 + H]), A(xg[g0 + 2 * H]), A(hg[g0]), A(hg[g0 + H]),
                                       A(hg[g0 + 2 * H]), A(h_prev[k]), hh);
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

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

#define FCK_RNN_LAUNCH(kernel, B, H, ...)                                                                      \
  do {                                                                                                         \
    const int64_t n = (B) * (H);                                                                               \
    if (n == 0) break;                                                                                         \
    kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__, B, H); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                            \
  } while (0)

struct RnnSteps {
  // One block of rows: the GPU parallelizes each step across the whole batch.
  template <class F>
  static void row_blocks(int64_t B, int64_t, const F& f) {
    f(0, B);
  }
  static void lstm_fwd_step(const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& c_prev,
                            const at::Tensor& gates, const at::Tensor& c, const at::Tensor& h) {
    const int64_t B = h.size(0), H = h.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xg.scalar_type(), "fck::lstm_layer_fwd", [&] {
      using A = typename AccOf<scalar_t>::type;
      const auto kernel = &lstm_fwd_kernel<scalar_t, A>;
      FCK_RNN_LAUNCH(kernel, B, H, ptr<const scalar_t>(xg), ptr<const scalar_t>(hg),
                     ptr<const A>(c_prev), ptr<A>(gates), ptr<A>(c), ptr<scalar_t>(h));
    });
  }
  static void lstm_bwd_step(const at::Tensor& dout, const at::Tensor& dh_rec, const at::Tensor& gates,
                            const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dc,
                            const at::Tensor& dxg) {
    const int64_t B = dc.size(0), H = dc.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dxg.scalar_type(), "fck::lstm_layer_bwd", [&] {
      using A = typename AccOf<scalar_t>::type;
      const auto kernel = &lstm_bwd_kernel<scalar_t, A>;
      FCK_RNN_LAUNCH(kernel, B, H, ptr<const scalar_t>(dout), ptr<const scalar_t>(dh_rec),
                     ptr<const A>(gates), ptr<const A>(c_prev), ptr<const A>(c), ptr<A>(dc), ptr<scalar_t>(dxg));
    });
  }
  static void gru_fwd_step(const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& h_prev,
                           const at::Tensor& saved, const at::Tensor& h) {
    const int64_t B = h.size(0), H = h.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xg.scalar_type(), "fck::gru_layer_fwd", [&] {
      using A = typename AccOf<scalar_t>::type;
      const auto kernel = &gru_fwd_kernel<scalar_t, A>;
      FCK_RNN_LAUNCH(kernel, B, H, ptr<const scalar_t>(xg), ptr<const scalar_t>(hg),
                     ptr<const scalar_t>(h_prev), ptr<A>(saved), ptr<scalar_t>(h));
    });
  }
  static void gru_bwd_step(const at::Tensor& dout, const at::Tensor& dh_rec, const at::Tensor& dh_direct,
                           const at::Tensor& saved, const at::Tensor& h_prev, const at::Tensor& dxg,
                           const at::Tensor& dhg) {
    const int64_t B = dh_direct.size(0), H = dh_direct.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dxg.scalar_type(), "fck::gru_layer_bwd", [&] {
      using A = typename AccOf<scalar_t>::type;
      const auto kernel = &gru_bwd_kernel<scalar_t, A>;
      FCK_RNN_LAUNCH(kernel, B, H, ptr<const scalar_t>(dout), ptr<const scalar_t>(dh_rec),
                     ptr<A>(dh_direct), ptr<const A>(saved), ptr<const scalar_t>(h_prev), ptr<scalar_t>(dxg),
                     ptr<scalar_t>(dhg));
    });
  }
};

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got one on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(FCK_LSTM_FWD_ARGS) {
  check_cuda(xg, "lstm_layer_fwd");
  const c10::cuda::CUDAGuard guard(xg.device());
  return rnn::lstm_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(FCK_LSTM_BWD_ARGS) {
  check_cuda(out, "lstm_layer_bwd");
  const c10::cuda::CUDAGuard guard(out.device());
  return rnn::lstm_layer_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, out, c_all, gates, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(FCK_GRU_FWD_ARGS) {
  check_cuda(xg, "gru_layer_fwd");
  const c10::cuda::CUDAGuard guard(xg.device());
  return rnn::gru_layer_fwd<RnnSteps>(xg, h0, w_hh, b_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(FCK_GRU_BWD_ARGS) {
  check_cuda(out, "gru_layer_bwd");
  const c10::cuda::CUDAGuard guard(out.device());
  return rnn::gru_layer_bwd<RnnSteps>(grad_out, grad_hn, h0, w_hh, out, saved, reverse);
}

}  // namespace cuda
}  // namespace fck
