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

#include <cstdlib>
#include <string>
#include <type_traits>

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

// ---- persistent kernels (opt-in, FCK_RNN_PERSISTENT_CUDA=1; hidden <= 64, fp32/fp16/bf16) ----
//
// One launch runs a layer's whole sequence in one direction. The rows of a batch never meet in the recurrence, so a
// block owns R rows for all T steps, R the gate count: a block of G = R * H threads then has one thread per gate
// row in the GEMM phase and one per (row, unit) in the cell phase. The forward's thread n keeps row n of W_hh in
// registers (fp32, H <= MAXH values) and forms the R rows' pre-activations from h in shared memory (broadcast
// reads); the cell thread (r, j) keeps its cell state in a register. The backward's thread (q, k) keeps column k of
// gate block q of W_hh in registers and forms R partial sums of dh over that block; the cell thread adds the gate
// blocks' partials in order. Per step: two barriers, no launch, no GEMM call; the per-step path paid a cuBLAS call
// and a kernel (~35 us of host time) per step. Roundings follow the per-step path: the GEMM results and the values
// it reads (h, the gate gradients) are rounded to the storage type.
constexpr int kPersistentMaxH = 64;

// The gate row a thread owns: W[n, 0..H) widened, zeros past H.
template <typename T, int MAXH>
__device__ __forceinline__ void load_row(float (&w)[MAXH], const T* __restrict__ w_hh, int n, int H, bool valid) {
#pragma unroll
  for (int k = 0; k < MAXH; ++k) w[k] = valid && k < H ? float(w_hh[int64_t(n) * H + k]) : 0.f;
}

// Column k of gate block q: W[q H + i, k] for i < H, zeros past H.
template <typename T, int MAXH>
__device__ __forceinline__ void load_column(float (&w)[MAXH], const T* __restrict__ w_hh, int q, int k, int H,
                                            bool valid) {
#pragma unroll
  for (int i = 0; i < MAXH; ++i) w[i] = valid && i < H ? float(w_hh[(int64_t(q) * H + i) * H + k]) : 0.f;
}

// acc[r] = sum_k v[r][k] w[k] over k < H, for the block's R rows (v in shared memory, read as broadcasts).
template <int R, int MAXH, int STRIDE>
__device__ __forceinline__ void dot_rows(float (&acc)[R], const float (*v)[STRIDE], int offset,
                                         const float (&w)[MAXH], int H) {
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll
  for (int k = 0; k < MAXH; ++k) {
    if (k < H) {
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += v[r][offset + k] * w[k];
    }
  }
}

template <typename T, int MAXH>
__global__ void __launch_bounds__(4 * MAXH) lstm_fwd_persistent(
    const T* __restrict__ xg, const T* __restrict__ h0, const float* __restrict__ c0, const T* __restrict__ w_hh,
    const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ c_all, float* __restrict__ gates, int steps,
    int B, int H, bool reverse, bool save) {
  constexpr int R = 4;
  __shared__ float h_s[R][MAXH];
  __shared__ float pre_s[R][4 * MAXH];
  const int G = 4 * H, tid = threadIdx.x, b0 = blockIdx.x * R, r = tid / H, j = tid - r * H;
  const bool gate_row = tid < G, cell = tid < G && b0 + r < B;
  float w[MAXH];
  load_row<T, MAXH>(w, w_hh, tid, H, gate_row);
  const float bn = gate_row ? float(bias[tid]) : 0.f;
  float c = cell ? c0[int64_t(b0 + r) * H + j] : 0.f;
  for (int i = tid; i < R * MAXH; i += blockDim.x) {
    const int rr = i / MAXH, k = i - rr * MAXH;
    h_s[rr][k] = k < H && b0 + rr < B ? float(h0[int64_t(b0 + rr) * H + k]) : 0.f;
  }
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const int t = reverse ? steps - 1 - s : s;
    const int64_t row0 = int64_t(t) * B + b0;
    if (gate_row) {
      float xv[R], acc[R];
#pragma unroll
      for (int rr = 0; rr < R; ++rr) xv[rr] = b0 + rr < B ? float(xg[(row0 + rr) * G + tid]) : 0.f;
      dot_rows<R, MAXH, MAXH>(acc, h_s, 0, w, H);
#pragma unroll
      for (int rr = 0; rr < R; ++rr) pre_s[rr][tid] = xv[rr] + float(T(acc[rr])) + bn;
    }
    __syncthreads();
    if (cell) {
      const float* p = pre_s[r];
      float cc, hh;
      const LstmGates<float> a = lstm_forward<float>(p[j], p[H + j], p[2 * H + j], p[3 * H + j], c, cc, hh);
      c = cc;
      const int64_t row = row0 + r;
      const T ht = T(hh);
      out[row * H + j] = ht;
      if (save) {
        float* g = gates + row * G;
        g[j] = a.i, g[H + j] = a.f, g[2 * H + j] = a.g, g[3 * H + j] = a.o;
        c_all[row * H + j] = cc;
      } else {
        c_all[(int64_t(s % 2) * B + b0 + r) * H + j] = cc;
      }
      h_s[r][j] = float(ht);
    }
    __syncthreads();
  }
}

template <typename T, int MAXH>
__global__ void __launch_bounds__(4 * MAXH) lstm_bwd_persistent(
    const T* __restrict__ dout, const T* __restrict__ dhn, const float* __restrict__ gates,
    const float* __restrict__ c_all, const float* __restrict__ c0, const T* __restrict__ w_hh, float* __restrict__ dc_io,
    T* __restrict__ dxg, T* __restrict__ dh0, int steps, int B, int H, bool reverse) {
  constexpr int R = 4;
  __shared__ float dg_s[R][4 * MAXH];
  __shared__ float part_s[4][R][MAXH];
  const int G = 4 * H, tid = threadIdx.x, b0 = blockIdx.x * R, r = tid / H, j = tid - r * H;
  const bool column = tid < G, cell = tid < G && b0 + r < B;
  float w[MAXH];
  load_column<T, MAXH>(w, w_hh, r, j, H, column);  // as the GEMM thread, (r, j) is (gate block q, column k)
  const int64_t state = int64_t(b0 + r) * H + j;
  float dc = cell ? dc_io[state] : 0.f, dh_rec = cell ? float(dhn[state]) : 0.f;
  for (int i = tid; i < R * 4 * MAXH; i += blockDim.x) dg_s[i / (4 * MAXH)][i % (4 * MAXH)] = 0.f;
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const int t = reverse ? s : steps - 1 - s, first = reverse ? steps - 1 : 0, before = reverse ? t + 1 : t - 1;
    if (cell) {
      const int64_t row = int64_t(t) * B + b0 + r;
      const float* g = gates + row * G;
      const float c_prev = t == first ? c0[state] : c_all[(int64_t(before) * B + b0 + r) * H + j];
      const LstmGates<float> d = lstm_backward<float>(float(dout[row * H + j]) + dh_rec, dc,
                                                      {g[j], g[H + j], g[2 * H + j], g[3 * H + j]}, c_prev,
                                                      c_all[row * H + j]);
      const T di = T(d.i), df = T(d.f), dg = T(d.g), dov = T(d.o);
      T* dx = dxg + row * G;
      dx[j] = di, dx[H + j] = df, dx[2 * H + j] = dg, dx[3 * H + j] = dov;
      dg_s[r][j] = float(di), dg_s[r][H + j] = float(df), dg_s[r][2 * H + j] = float(dg), dg_s[r][3 * H + j] = float(dov);
    }
    __syncthreads();
    if (column) {
      float acc[R];
      dot_rows<R, MAXH, 4 * MAXH>(acc, dg_s, r * H, w, H);
#pragma unroll
      for (int rr = 0; rr < R; ++rr) part_s[r][rr][j] = acc[rr];
    }
    __syncthreads();
    if (cell) dh_rec = float(T(part_s[0][r][j] + part_s[1][r][j] + part_s[2][r][j] + part_s[3][r][j]));
  }
  if (cell) {
    dh0[state] = T(dh_rec);
    dc_io[state] = dc;
  }
}

template <typename T, int MAXH>
__global__ void __launch_bounds__(3 * MAXH) gru_fwd_persistent(
    const T* __restrict__ xg, const T* __restrict__ h0, const T* __restrict__ w_hh, const T* __restrict__ b_ih,
    const T* __restrict__ b_hh, T* __restrict__ out, float* __restrict__ saved, int steps, int B, int H,
    bool reverse, bool save) {
  constexpr int R = 3;
  __shared__ float h_s[R][MAXH];
  __shared__ float hpre_s[R][3 * MAXH];
  const int G = 3 * H, tid = threadIdx.x, b0 = blockIdx.x * R, r = tid / H, j = tid - r * H;
  const bool gate_row = tid < G, cell = tid < G && b0 + r < B;
  float w[MAXH];
  load_row<T, MAXH>(w, w_hh, tid, H, gate_row);
  const float bh = gate_row ? float(b_hh[tid]) : 0.f;
  float bi[3];
#pragma unroll
  for (int q = 0; q < 3; ++q) bi[q] = cell ? float(b_ih[q * H + j]) : 0.f;
  for (int i = tid; i < R * MAXH; i += blockDim.x) {
    const int rr = i / MAXH, k = i - rr * MAXH;
    h_s[rr][k] = k < H && b0 + rr < B ? float(h0[int64_t(b0 + rr) * H + k]) : 0.f;
  }
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const int t = reverse ? steps - 1 - s : s;
    const int64_t row0 = int64_t(t) * B + b0;
    if (gate_row) {
      float acc[R];
      dot_rows<R, MAXH, MAXH>(acc, h_s, 0, w, H);
#pragma unroll
      for (int rr = 0; rr < R; ++rr) hpre_s[rr][tid] = float(T(acc[rr])) + bh;
    }
    __syncthreads();
    if (cell) {
      const int64_t row = row0 + r;
      const T* x = xg + row * G;
      const float* hp = hpre_s[r];
      float hh;
      const GruSaved<float> sv = gru_forward<float>(float(x[j]) + bi[0], float(x[H + j]) + bi[1],
                                                    float(x[2 * H + j]) + bi[2], hp[j], hp[H + j], hp[2 * H + j],
                                                    h_s[r][j], hh);
      const T ht = T(hh);
      out[row * H + j] = ht;
      float* sp = saved + (save ? row : int64_t(b0 + r)) * 4 * H;
      sp[j] = sv.r, sp[H + j] = sv.z, sp[2 * H + j] = sv.n, sp[3 * H + j] = sv.bn;
      h_s[r][j] = float(ht);
    }
    __syncthreads();
  }
}

template <typename T, int MAXH>
__global__ void __launch_bounds__(3 * MAXH) gru_bwd_persistent(
    const T* __restrict__ dout, const T* __restrict__ dhn, const float* __restrict__ saved, const T* __restrict__ out,
    const T* __restrict__ h0, const T* __restrict__ w_hh, float* __restrict__ direct_io, T* __restrict__ dxg,
    T* __restrict__ dhg, T* __restrict__ dh0, int steps, int B, int H, bool reverse) {
  constexpr int R = 3;
  __shared__ float dg_s[R][3 * MAXH];
  __shared__ float part_s[3][R][MAXH];
  const int G = 3 * H, tid = threadIdx.x, b0 = blockIdx.x * R, r = tid / H, j = tid - r * H;
  const bool column = tid < G, cell = tid < G && b0 + r < B;
  float w[MAXH];
  load_column<T, MAXH>(w, w_hh, r, j, H, column);
  const int64_t state = int64_t(b0 + r) * H + j;
  float direct = cell ? direct_io[state] : 0.f, dh_rec = cell ? float(dhn[state]) : 0.f;
  for (int i = tid; i < R * 3 * MAXH; i += blockDim.x) dg_s[i / (3 * MAXH)][i % (3 * MAXH)] = 0.f;
  __syncthreads();
  for (int s = 0; s < steps; ++s) {
    const int t = reverse ? s : steps - 1 - s, first = reverse ? steps - 1 : 0, before = reverse ? t + 1 : t - 1;
    if (cell) {
      const int64_t row = int64_t(t) * B + b0 + r;
      const float* sp = saved + row * 4 * H;
      const float h_prev = float(t == first ? h0[state] : out[(int64_t(before) * B + b0 + r) * H + j]);
      const GruGrads<float> p = gru_backward<float>(float(dout[row * H + j]) + dh_rec + direct,
                                                    {sp[j], sp[H + j], sp[2 * H + j], sp[3 * H + j]}, h_prev);
      direct = p.h_prev;
      const T dr = T(p.r), dz = T(p.z), dan = T(p.an), dbn = T(p.bn);
      T *dx = dxg + row * G, *dh = dhg + row * G;
      dx[j] = dh[j] = dr;
      dx[H + j] = dh[H + j] = dz;
      dx[2 * H + j] = dan;
      dh[2 * H + j] = dbn;
      dg_s[r][j] = float(dr), dg_s[r][H + j] = float(dz), dg_s[r][2 * H + j] = float(dbn);
    }
    __syncthreads();
    if (column) {
      float acc[R];
      dot_rows<R, MAXH, 3 * MAXH>(acc, dg_s, r * H, w, H);
#pragma unroll
      for (int rr = 0; rr < R; ++rr) part_s[r][rr][j] = acc[rr];
    }
    __syncthreads();
    if (cell) dh_rec = float(T(part_s[0][r][j] + part_s[1][r][j] + part_s[2][r][j]));
  }
  if (cell) {
    dh0[state] = T(dh_rec);
    direct_io[state] = direct;
  }
}

// Whether the persistent kernels take this layer: opted in, hidden <= 64, a 16/32-bit float type.
bool use_persistent(int64_t H, int64_t B, int64_t steps, size_t elem) {
  const char* env = std::getenv("FCK_RNN_PERSISTENT_CUDA");
  return env && std::string(env) == "1" && H <= kPersistentMaxH && elem <= 4 && B <= INT32_MAX / 64 &&
         steps <= INT32_MAX;
}

// Launches kernel<T, MAXH> with MAXH the smallest of 32 or 64 that holds H, G = gates * H threads rounded up to a
// warp, one block per `gates` rows.
#define FCK_PERSISTENT_LAUNCH(kernel, gates, H, B, ...)                                                          \
  do {                                                                                                           \
    const int threads = int(((gates) * (H) + 31) / 32 * 32), blocks = int(((B) + (gates)-1) / (gates));        \
    const auto stream = at::cuda::getCurrentCUDAStream();                                                      \
    if ((H) <= 32) {                                                                                             \
      kernel<T, 32><<<blocks, threads, 0, stream>>>(__VA_ARGS__);                                               \
    } else {                                                                                                     \
      kernel<T, 64><<<blocks, threads, 0, stream>>>(__VA_ARGS__);                                               \
    }                                                                                                            \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                              \
  } while (0)

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

struct RnnSteps {
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
  // cuBLAS through at::mm_out on views of the buffers: c (n x N) = a (n x K) @ op(w).
  template <typename T>
  static void gemm(int64_t n, const T* a, const rnn::Weight<T>& W, T* c, const at::Tensor& like) {
    if (n == 0) return;
    at::Tensor out = view(c, {n, W.N}, like);
    at::mm_out(out, view(a, {n, W.K}, like), W.wt ? view(W.w, {W.N, W.K}, like).t() : view(W.w, {W.K, W.N}, like));
  }

  // The whole sequence in one persistent kernel (see lstm_fwd_persistent) when use_persistent says so; false:
  // the caller runs the per-step loop.
  template <typename T>
  static bool lstm_fwd_whole(const rnn::Dims& d, const rnn::Order& o, bool save, const rnn::Seq<const T>& x,
                             const rnn::Seq<const T>& h_init, const rnn::Seq<const Acc<T>>& c_init, const T* w,
                             const T* bias, const rnn::Seq<T>& y, const rnn::Seq<Acc<T>>& c,
                             const rnn::Seq<Acc<T>>& g) {
    if constexpr (std::is_same_v<T, double>) {
      return false;
    } else {
      if (!use_persistent(d.H, d.B, d.T, sizeof(T))) return false;
      FCK_PERSISTENT_LAUNCH(lstm_fwd_persistent, 4, d.H, d.B, x.p, h_init.p, c_init.p, w, bias, y.p, c.p, g.p,
                            int(d.T), int(d.B), int(d.H), o.reverse, save);
      return true;
    }
  }
  template <typename T>
  static bool lstm_bwd_whole(const rnn::Dims& d, const rnn::Order& o, const rnn::Seq<const T>& dy,
                             const rnn::Seq<const T>& dh_last, const rnn::Seq<const Acc<T>>& g,
                             const rnn::Seq<const Acc<T>>& c, const rnn::Seq<const Acc<T>>& c_init, const T* w,
                             const rnn::Seq<Acc<T>>& dc, const rnn::Seq<T>& dx, const rnn::Seq<T>& dh) {
    if constexpr (std::is_same_v<T, double>) {
      return false;
    } else {
      if (!use_persistent(d.H, d.B, d.T, sizeof(T))) return false;
      FCK_PERSISTENT_LAUNCH(lstm_bwd_persistent, 4, d.H, d.B, dy.p, dh_last.p, g.p, c.p, c_init.p, w, dc.p, dx.p,
                            dh.p, int(d.T), int(d.B), int(d.H), o.reverse);
      return true;
    }
  }
  template <typename T>
  static bool gru_fwd_whole(const rnn::Dims& d, const rnn::Order& o, bool save, const rnn::Seq<const T>& x,
                            const rnn::Seq<const T>& h_init, const T* w, const T* b_ih, const T* b_hh,
                            const rnn::Seq<T>& y, const rnn::Seq<Acc<T>>& sv) {
    if constexpr (std::is_same_v<T, double>) {
      return false;
    } else {
      if (!use_persistent(d.H, d.B, d.T, sizeof(T))) return false;
      FCK_PERSISTENT_LAUNCH(gru_fwd_persistent, 3, d.H, d.B, x.p, h_init.p, w, b_ih, b_hh, y.p, sv.p, int(d.T),
                            int(d.B), int(d.H), o.reverse, save);
      return true;
    }
  }
  template <typename T>
  static bool gru_bwd_whole(const rnn::Dims& d, const rnn::Order& o, const rnn::Seq<const T>& dy,
                            const rnn::Seq<const T>& dh_last, const rnn::Seq<const Acc<T>>& sv,
                            const rnn::Seq<const T>& y, const rnn::Seq<const T>& h_init, const T* w,
                            const rnn::Seq<Acc<T>>& direct, const rnn::Seq<T>& dx, const rnn::Seq<T>& dg,
                            const rnn::Seq<T>& dh) {
    if constexpr (std::is_same_v<T, double>) {
      return false;
    } else {
      if (!use_persistent(d.H, d.B, d.T, sizeof(T))) return false;
      FCK_PERSISTENT_LAUNCH(gru_bwd_persistent, 3, d.H, d.B, dy.p, dh_last.p, sv.p, y.p, h_init.p, w, direct.p,
                            dx.p, dg.p, dh.p, int(d.T), int(d.B), int(d.H), o.reverse);
      return true;
    }
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
