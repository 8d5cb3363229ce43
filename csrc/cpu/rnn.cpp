// LSTM and GRU layers on the CPU: the loops of fck/rnn_host.h with one fused pointwise pass per time step.
//
// The pointwise pass is where stock PyTorch spends most of a small RNN's time (a dozen ATen ops per step, each a
// pass over the gates). Here it is one loop over the batch rows, split across threads when a step is big enough to
// pay for the fork, vectorized across the hidden units (the exp in fck/rnn.h is plain arithmetic), and compiled
// a second time for AVX2+FMA+F16C, picked at run time.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "fck/block_launch.h"
#include "fck/cpu_pool.h"
#include "fck/cpu_vec.h"
#include "fck/ops.h"
#include "fck/rnn.h"
#include "fck/rnn_host.h"
#include "fck/rnn_packed.h"
#include "fck/rnn_persistent.h"
#include "fck/skinny_gemm.h"
#include "panel_gemm.h"

namespace fck {
namespace cpu {
namespace {

#define FCK_INLINE inline __attribute__((always_inline))

template <typename T>
FCK_INLINE acc_t<T> ld(raw_t<T> v) {
  return Storage<T>::load(v);
}

// ---- the row loops: rows [b0, b1) of one step; G*H values per row for gate tensors, H for states ----
// Free functions with __restrict pointer parameters: the form GCC vectorizes (read through a functor's members,
// the same loops stayed scalar). Gate chunk k of row b starts at b*G*H + k*H.

template <typename T>
FCK_INLINE void lstm_fwd_rows(const raw_t<T>* __restrict xg, const raw_t<T>* __restrict hg,
                              const raw_t<T>* __restrict bias, const acc_t<T>* __restrict c_prev,
                              acc_t<T>* __restrict gates, acc_t<T>* __restrict c,
                              raw_t<T>* __restrict h, int64_t H, int64_t b0, int64_t b1) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    // (no lambdas here: reading the pointers through a closure stops GCC from vectorizing)
    for (int64_t j = 0; j < H; ++j) {
      const int64_t g = b * 4 * H + j;
      const LstmGates<A> a = lstm_activate<A>(ld<T>(xg[g]) + ld<T>(hg[g]) + ld<T>(bias[j]),
                                              ld<T>(xg[g + H]) + ld<T>(hg[g + H]) + ld<T>(bias[j + H]),
                                              ld<T>(xg[g + 2 * H]) + ld<T>(hg[g + 2 * H]) + ld<T>(bias[j + 2 * H]),
                                              ld<T>(xg[g + 3 * H]) + ld<T>(hg[g + 3 * H]) + ld<T>(bias[j + 3 * H]));
      gates[g] = a.i, gates[g + H] = a.f, gates[g + 2 * H] = a.g, gates[g + 3 * H] = a.o;
    }
    for (int64_t j = 0; j < H; ++j) {
      const int64_t k = b * H + j, g = b * 4 * H + j;
      A cc, hh;
      lstm_state<A>({gates[g], gates[g + H], gates[g + 2 * H], gates[g + 3 * H]}, c_prev[k], cc, hh);
      c[k] = cc;
      h[k] = Storage<T>::store(hh);
    }
  }
}

template <typename T>
FCK_INLINE void lstm_bwd_rows(const raw_t<T>* __restrict dout, const raw_t<T>* __restrict dh_rec,
                              const acc_t<T>* __restrict gates, const acc_t<T>* __restrict c_prev,
                              const acc_t<T>* __restrict c, acc_t<T>* __restrict dc, raw_t<T>* __restrict dxg,
                              int64_t H, int64_t b0, int64_t b1) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      const int64_t k = b * H + j, g = b * 4 * H + j;
      A dcj = dc[k];
      const LstmGates<A> d = lstm_backward<A>(ld<T>(dout[k]) + ld<T>(dh_rec[k]), dcj,
                                              {gates[g], gates[g + H], gates[g + 2 * H], gates[g + 3 * H]},
                                              c_prev[k], c[k]);
      dc[k] = dcj;
      dxg[g] = Storage<T>::store(d.i), dxg[g + H] = Storage<T>::store(d.f);
      dxg[g + 2 * H] = Storage<T>::store(d.g), dxg[g + 3 * H] = Storage<T>::store(d.o);
    }
  }
}

template <typename T>
FCK_INLINE void gru_fwd_rows(const raw_t<T>* __restrict xg, const raw_t<T>* __restrict hg,
                             const raw_t<T>* __restrict b_ih, const raw_t<T>* __restrict b_hh,
                             const raw_t<T>* __restrict h_prev, acc_t<T>* __restrict saved, raw_t<T>* __restrict h,
                             int64_t H, int64_t b0, int64_t b1) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    // two loops, as lstm_fwd_rows (GRU forward cell 5.6 -> 2.5 ns a unit in a microbenchmark)
    for (int64_t j = 0; j < H; ++j) {
      const int64_t g = b * 3 * H + j, s = b * 4 * H + j;
      gru_gates<A>(ld<T>(xg[g]) + ld<T>(b_ih[j]), ld<T>(xg[g + H]) + ld<T>(b_ih[j + H]), ld<T>(hg[g]) + ld<T>(b_hh[j]),
                   ld<T>(hg[g + H]) + ld<T>(b_hh[j + H]), saved[s], saved[s + H]);
    }
    for (int64_t j = 0; j < H; ++j) {
      const int64_t k = b * H + j, g = b * 3 * H + j, s = b * 4 * H + j;
      const A bn = ld<T>(hg[g + 2 * H]) + ld<T>(b_hh[j + 2 * H]);
      A hh;
      saved[s + 2 * H] = gru_state<A>(saved[s], saved[s + H], ld<T>(xg[g + 2 * H]) + ld<T>(b_ih[j + 2 * H]), bn,
                                      ld<T>(h_prev[k]), hh);
      saved[s + 3 * H] = bn;
      h[k] = Storage<T>::store(hh);
    }
  }
}

template <typename T>
FCK_INLINE void gru_bwd_rows(const raw_t<T>* __restrict dout, const raw_t<T>* __restrict dh_rec,
                             acc_t<T>* __restrict dh_direct, const acc_t<T>* __restrict saved,
                             const raw_t<T>* __restrict h_prev, raw_t<T>* __restrict dxg, raw_t<T>* __restrict dhg,
                             int64_t H, int64_t b0, int64_t b1) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      const int64_t k = b * H + j, g = b * 3 * H + j, s = b * 4 * H + j;
      const GruGrads<A> p = gru_backward<A>(ld<T>(dout[k]) + ld<T>(dh_rec[k]) + dh_direct[k],
                                            {saved[s], saved[s + H], saved[s + 2 * H], saved[s + 3 * H]},
                                            ld<T>(h_prev[k]));
      dh_direct[k] = p.h_prev;
      dxg[g] = dhg[g] = Storage<T>::store(p.r);
      dxg[g + H] = dhg[g + H] = Storage<T>::store(p.z);
      dxg[g + 2 * H] = Storage<T>::store(p.an);
      dhg[g + 2 * H] = Storage<T>::store(p.bn);
    }
  }
}

// Every row loop compiled for baseline x86-64, for AVX2+FMA+F16C and for AVX-512 (16 lanes a vector): the
// always-inline body takes on the target of the wrapper it is inlined into. The vector clones also contract
// a * b + c into FMAs (the library builds with -ffp-contract=off), both the same way, so they give the same bits:
// the exp polynomial is a chain of six of them, and its latency is what the cell waits on (lesson-7 forward cell
// 6.5 -> 4.8 ns a unit; the result moves by at most an ulp or two of the exp).
#define FCK_RNN_CLONES(name)                                                            \
  template <typename T, typename... P>                                                  \
  void name##_base(P... p) {                                                            \
    name<T>(p...);                                                                      \
  }                                                                                     \
  FCK_RNN_AVX2_CLONE(name)
#ifdef FCK_HAVE_AVX2_CLONE
#define FCK_RNN_AVX2_CLONE(name)                                                        \
  template <typename T, typename... P>                                                  \
  __attribute__((target("avx2,fma,f16c"), optimize("fp-contract=fast"))) void name##_avx2(P... p) { \
    name<T>(p...);                                                                      \
  }                                                                                     \
  template <typename T, typename... P>                                                  \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"), optimize("fp-contract=fast"))) \
  void name##_avx512(P... p) {                                                          \
    name<T>(p...);                                                                      \
  }
#define FCK_RNN_PICK(name, T, ...)                                                                   \
  (cpu_runs_avx512()       ? name##_avx512<T>(__VA_ARGS__)                                          \
   : cpu_runs_avx2_clone() ? name##_avx2<T>(__VA_ARGS__)                                            \
                           : name##_base<T>(__VA_ARGS__))
#else
#define FCK_RNN_AVX2_CLONE(name)
#define FCK_RNN_PICK(name, T, ...) name##_base<T>(__VA_ARGS__)
#endif
FCK_RNN_CLONES(lstm_fwd_rows)
FCK_RNN_CLONES(lstm_bwd_rows)
FCK_RNN_CLONES(gru_fwd_rows)
FCK_RNN_CLONES(gru_bwd_rows)

// Each step's GEMM: fp32 (fp16/bf16 widened) on an AVX2+FMA CPU runs panel_gemm.h on W_hh packed once per call
// (3.6 vs 6.2 ms per AWD-LSTM step here). Otherwise the Fortran BLAS of the library torch links (MKL or OpenBLAS),
// called directly: at::mm_out costs a dispatch and two tensor views per call, as much as the math of a small step;
// MKL's packed-GEMM API, where torch links MKL, packs a large W_hh once per call. All weak, so a torch without them
// still loads; that case, and fp16/bf16 without AVX2, go through at::mm_out.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
enum PackedKind { kMklPacked = 1, kPanels = 2, kAmx = 3 };

template <typename T>
at::Tensor view(const T* p, at::IntArrayRef sizes, const at::Tensor& like) {
  return at::from_blob(const_cast<T*>(p), sizes, like.options());
}

bool fits_int(std::initializer_list<int64_t> v) {
  return std::max(v) < (int64_t(1) << 31);
}

template <typename T>
const raw_t<T>* raw(const T* p) {
  return reinterpret_cast<const raw_t<T>*>(p);
}
template <typename T>
raw_t<T>* raw(T* p) {
  return reinterpret_cast<raw_t<T>*>(p);
}

template <typename T>
FCK_INLINE void widen_rows(const raw_t<T>* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::load(src[i]);
}
template <typename T>
FCK_INLINE void narrow_rows(const float* __restrict src, raw_t<T>* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::store(src[i]);
}
FCK_RNN_CLONES(widen_rows)
FCK_RNN_CLONES(narrow_rows)

// acc[j] += sum over the n rows of x[r][j] (rows of G values): each chunk of a row's values summed over the rows in
// the accumulation type, then added into the double sums (rnn::BlockSums).
template <typename T>
FCK_INLINE void sum_rows(const raw_t<T>* __restrict x, int64_t n, int64_t G, double* __restrict acc) {
  using A = acc_t<T>;
  constexpr int64_t kChunk = 256;
  alignas(64) A tmp[kChunk];
  for (int64_t j0 = 0; j0 < G; j0 += kChunk) {
    const int64_t m = std::min(kChunk, G - j0);
    for (int64_t j = 0; j < m; ++j) tmp[j] = A(0);
    for (int64_t r = 0; r < n; ++r) {
      const raw_t<T>* __restrict row = x + r * G + j0;
      for (int64_t j = 0; j < m; ++j) tmp[j] += ld<T>(row[j]);
    }
    for (int64_t j = 0; j < m; ++j) acc[j0 + j] += double(tmp[j]);
  }
}
FCK_RNN_CLONES(sum_rows)

#ifdef FCK_HAVE_PANEL_GEMM
#ifdef FCK_HAVE_AMX
// A bf16 step on AMX (W_hh packed by pack_amx once per call; a padded to whole tiles where it is not): the lesson-7
// LSTM's bf16 fwd+bwd 11.0 -> 8.1 ms (torch's 9.5), the AWD-LSTM's 884 -> 416 ms (torch's 809) on this library's
// Xeon, against the fp32 panels below. An fp32 step takes it where the user lets fp32 matmuls compute in bf16
// (fp32_steps_in_bf16): a rounded to bf16 (nearest even, as torch's conversion), exact products, fp32 sums written
// straight back.
template <typename T>
void amx_gemm(int64_t n, const T* a, const rnn::Weight<T>& W, T* c) {
  const int64_t K = W.K, N = W.N, n16 = panel::amx_padded_rows(n), Kp = panel::amx_padded_k(K);
  const int64_t N16 = panel::panels(N) * panel::kNR;
  thread_local std::vector<uint16_t> apad;
  thread_local std::vector<float> cpad;
  const uint16_t* ap = nullptr;
  int64_t lda = K;
  if constexpr (std::is_same_v<T, float>) {
    apad.assign(n16 * Kp, 0);
    for (int64_t r = 0; r < n; ++r) FCK_RNN_PICK(narrow_rows, c10::BFloat16, a + r * K, &apad[r * Kp], K);
    ap = apad.data(), lda = Kp;
  } else {
    ap = raw(a);
    if (n16 != n || Kp != K) {  // whole tiles: zero rows and columns past a's (never a read past its end)
      apad.assign(n16 * Kp, 0);
      for (int64_t r = 0; r < n; ++r) std::memcpy(&apad[r * Kp], ap + r * K, K * sizeof(uint16_t));
      ap = apad.data(), lda = Kp;
    }
  }
  cpad.resize(n16 * N16);
  panel::gemm_amx(n, ap, lda, reinterpret_cast<const uint32_t*>(W.packed.data_ptr()), N, K, cpad.data(), N16);
  for (int64_t r = 0; r < n; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(c + r * N, &cpad[r * N16], N * sizeof(float));
    } else {
      FCK_RNN_PICK(narrow_rows, T, static_cast<const float*>(&cpad[r * N16]), raw(c) + r * N, N);
    }
  }
}

// Whether fp32 recurrent steps may run in bf16: torch.set_float32_matmul_precision("medium"), the setting under
// which torch's own fp32 CPU matmuls run on oneDNN's bf16 kernels (AMX here: a 32 x 1152 by 1152 x 4608 GEMM 1.57
// -> 0.74 ms). Read per call, as torch reads it per matmul.
bool fp32_steps_in_bf16() {
  return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
}
#endif  // FCK_HAVE_AMX
#endif  // FCK_HAVE_PANEL_GEMM

#ifdef FCK_HAVE_PANEL_GEMM
// An fp16/bf16 step on fp32 panels (see weight()): the left operand widened exactly, fp32 products and sums, the
// result rounded once, as at::mm's fp32 accumulation rounds it. at::mm_out per step was a dispatch, views and a
// oneDNN call of ~35 us for the lesson-7 LSTM's 32 x 64 by 64 x 256 (bf16 fwd+bwd 16.4 ms, torch's 10.0).
template <typename T>
void half_panel_gemm(int64_t n, const T* a, const rnn::Weight<T>& W, T* c) {
#ifdef FCK_HAVE_AMX
  if (W.kind == kAmx) return amx_gemm(n, a, W, c);
#endif
  thread_local std::vector<float> buf;
  buf.resize(n * (W.K + W.N));
  float *a32 = buf.data(), *c32 = a32 + n * W.K;
  FCK_RNN_PICK(widen_rows, T, raw(a), a32, n * W.K);
  panel::gemm(n, a32, W.K, W.packed.template data_ptr<float>(), W.N, W.K, c32, W.N);
  FCK_RNN_PICK(narrow_rows, T, static_cast<const float*>(c32), raw(c), n * W.N);
}
#endif

// c (n x N) = a (n x K) @ op(w), row-major.
template <typename T>
void gemm(int64_t n, const T* a, const rnn::Weight<T>& W, T* c, const at::Tensor& like) {
  if (n == 0) return;
  const int64_t N = W.N, K = W.K;
#ifdef FCK_HAVE_PANEL_GEMM
  if constexpr (std::is_same_v<raw_t<T>, uint16_t>) {
    if (W.kind == kPanels || W.kind == kAmx) return half_panel_gemm(n, a, W, c);
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
#ifdef FCK_HAVE_PANEL_GEMM
    if (W.kind == kPanels) return panel::gemm(n, a, K, W.packed.template data_ptr<float>(), N, K, c, N);
#ifdef FCK_HAVE_AMX
    if (W.kind == kAmx) return amx_gemm(n, a, W, c);
#endif
#endif
    if (W.kind == kMklPacked && n == W.m) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(n), int(N), int(K), a, int(K),
                          W.packed.template data_ptr<float>(), int(N), 0.f, c, int(N));
      return;
    }
  }
  constexpr bool blas_type = std::is_same_v<T, float> || std::is_same_v<T, double>;
  if constexpr (blas_type) {
    const bool have = std::is_same_v<T, double> ? &dgemm_ != nullptr : &sgemm_ != nullptr;
    if (have && fits_int({n, N, K})) {
      // column-major BLAS sees each row-major matrix transposed: c^T = op(w)^T a^T
      const int m_ = int(N), n_ = int(n), k_ = int(K), lda = int(W.wt ? K : N), ldb = int(K), ldc = int(N);
      const T one = 1, zero = 0;
      const char ta = W.wt ? 'T' : 'N', tb = 'N';
      if constexpr (std::is_same_v<T, double>) {
        dgemm_(&ta, &tb, &m_, &n_, &k_, &one, W.w, &lda, a, &ldb, &zero, c, &ldc);
      } else {
        sgemm_(&ta, &tb, &m_, &n_, &k_, &one, W.w, &lda, a, &ldb, &zero, c, &ldc);
      }
      return;
    }
  }
  at::Tensor out = view(c, {n, N}, like);
  at::mm_out(out, view(a, {n, K}, like), W.wt ? view(W.w, {N, K}, like).t() : view(W.w, {K, N}, like));
}

// CUDA's persistent kernels emulated (fck/block_launch.h), for the tests.
struct EmulatedLaunch {
  static bool enabled() { return env_on("FCK_RNN_PERSISTENT_EMULATE"); }
  // a device of 8 multiprocessors: the tests' batches of 4 and 5 take one row a block, 19 and 64 the gate count
  static int64_t blocks_at_once() { return 8; }
  static size_t shared_max() { return size_t(227) << 10; }  // an H100's
  static at::Tensor scratch(int64_t floats) { return at::full({floats}, NAN, at::kFloat); }  // unwritten: NaN
  template <class Body>
  static void launch(int blocks, int threads, const Body& body) {
    emulate_blocks(blocks, threads, body);
  }
};

// The whole-pass hooks (Passes): the CPU runs the per-step loop below, or, with FCK_RNN_PERSISTENT_EMULATE=1, CUDA's
// persistent kernels' code emulated, for the tests.
struct RnnSteps : persistent::Passes<EmulatedLaunch> {
  template <typename T>
  using Acc = acc_t<T>;

  template <class F>
  static void dispatch(at::ScalarType t, F&& f) {
    dispatch_float(t, f);
  }

  // Small W_hh (up to 3/4 of a core's L2): one block of rows per thread for the whole sequence, each with its own
  // single-threaded GEMM, and no fork/join per step; no block under ~2k gate values per step. Large W_hh: one block,
  // whose GEMM (panel_gemm.h, or BLAS) splits across threads by columns (each thread streams only its share of
  // W_hh from memory; with row blocks every thread would stream all of it) and whose pointwise pass is split by
  // rows. A call of under
  // ~64k gate values in all (a cell: one step) runs on the calling thread: waking the pool costs more than it
  // saves. The workers take on the caller's thread-local state: its dispatch keys say the ops below run under the
  // autograd layer. The limit was a fixed 512 KB (the AMD host's L2): the 590 KB W_hh of lesson 3's AWD-LSTM (hidden
  // 192) then took two fork/joins a step on the Xeon's 2 MB L2, and its LM training step ran 57.7 / 60.4 ms against
  // 51.7 / 55.1 in row blocks (two interleaved runs of 16).
  template <class F>
  static void row_blocks(int64_t B, int64_t values_per_row, int64_t steps, int64_t weight_bytes, const F& f) {
    if (weight_bytes > block_weight_bytes() || B * values_per_row * steps < kSerialValues) return f(0, B);
    const at::ThreadLocalState state;
    at::parallel_for(0, B, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, values_per_row)),
                     [&](int64_t b0, int64_t b1) {
                       const at::ThreadLocalStateGuard guard(state);
                       f(b0, b1);
                     });
  }
  static int64_t block_weight_bytes() { return cpu_l2_bytes() * 3 / 4; }

  // Bias gradients summed by each row block as it goes (rnn::BlockSums): inside the row blocks' parallel region,
  // where a block's thread owns its rows; the one-block path splits each step across threads and sums afterwards.
  static constexpr bool kSumsRows = true;
  static bool sums_rows_here() { return at::in_parallel_region(); }
  template <typename T>
  static void add_rows(const T* x, int64_t n, int64_t G, double* acc) {
    FCK_RNN_PICK(sum_rows, T, raw(x), n, G, acc);
  }
  static constexpr int64_t kSerialValues = 64 * 1024;

  // The pointwise pass of a step over rows [0, n): split across threads when the step is big enough (serial inside
  // a row block, where the threads are already busy, and under kSerialValues).
  template <class F>
  static void rows(int64_t n, int64_t H, const F& f) {
    if (n * 4 * H < kSerialValues) return f(0, n);
    at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, 4 * H)), f);
  }

  // The right operand of every step's GEMM, packed once per call: bf16 into AMX tiles where the CPU grants them;
  // fp32, fp16 and bf16 (widened) into panel_gemm.h's panels where the CPU runs AVX2+FMA; else fp32 for MKL's
  // packed API when it is large enough to run as one block. A single step (a cell) goes to BLAS unpacked: packing
  // costs it as much as the GEMM (LSTMCell fwd+bwd 0.94 -> 0.88 ms).
  template <typename T>
  static rnn::Weight<T> weight(const T* w, bool wt, int64_t N, int64_t K, int64_t m, int64_t steps,
                               const at::Tensor& tensor) {
    rnn::Weight<T> W{w, wt, N, K, m, at::Tensor()};
    if (steps < 2) return W;
#ifdef FCK_HAVE_PANEL_GEMM
#ifdef FCK_HAVE_AMX
    // bf16 on AMX where the CPU grants it; fp32 too where the user lets fp32 matmuls compute in bf16, from W_hh
    // rounded to bf16 (a bf16 W_hh is taken as it is)
    constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>, fp32 = std::is_same_v<T, float>;
    if constexpr (bf16 || fp32) {
      if (panel::amx_ready() && (bf16 || fp32_steps_in_bf16())) {
        const at::Tensor w16 = tensor.to(at::kBFloat16).contiguous();
        W.packed = pooled_empty({panel::amx_packed_pairs(N, K)}, tensor.options().dtype(at::kInt));
        panel::pack_amx(reinterpret_cast<const uint16_t*>(w16.data_ptr()), wt, N, K,
                        reinterpret_cast<uint32_t*>(W.packed.data_ptr()));
        W.kind = kAmx;
        return W;
      }
    }
#endif
    if constexpr (std::is_same_v<raw_t<T>, uint16_t>) {  // fp16/bf16: fp32 panels of the widened weight
      if (cpu_runs_avx2_clone()) {
        const at::Tensor w32 = tensor.to(at::kFloat).contiguous();
        W.packed = pooled_empty({panel::packed_floats(N, K)}, w32.options());
        panel::pack(w32.data_ptr<float>(), wt, N, K, W.packed.template data_ptr<float>());
        W.kind = kPanels;
        return W;
      }
    }
#endif
    if constexpr (std::is_same_v<T, float>) {
#ifdef FCK_HAVE_PANEL_GEMM
      if (cpu_runs_avx2_clone()) {
        W.packed = pooled_empty({panel::packed_floats(N, K)}, tensor.options());
        panel::pack(w, wt, N, K, W.packed.template data_ptr<float>());
        W.kind = kPanels;
        return W;
      }
#endif
      const bool have = &cblas_sgemm_pack_get_size != nullptr && &cblas_sgemm_pack != nullptr &&
                        &cblas_sgemm_compute != nullptr;
      if (have && m > 0 && static_cast<int64_t>(tensor.nbytes()) > block_weight_bytes() && fits_int({m, N, K})) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(m), int(N), int(K));
        W.packed = at::empty({int64_t((bytes + sizeof(float) - 1) / sizeof(float))}, tensor.options());
        cblas_sgemm_pack(kRowMajor, kBMatrix, wt ? kTrans : kNoTrans, int(m), int(N), int(K), 1.f, w,
                         int(wt ? K : N), W.packed.template data_ptr<float>());
        W.kind = kMklPacked;
      }
    }
    return W;
  }
  template <typename T>
  static void gemm(int64_t n, const T* a, const rnn::Weight<T>& W, T* c, const at::Tensor& like) {
    cpu::gemm(n, a, W, c, like);
  }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return pooled_empty(sizes, options);
  }

  template <typename T>
  static void lstm_fwd(const T* xg, const T* hg, const T* bias, const acc_t<T>* c_prev, acc_t<T>* gates,
                       acc_t<T>* c, T* h, int64_t n, int64_t H) {
    rows(n, H, [&](int64_t b0, int64_t b1) {
      FCK_RNN_PICK(lstm_fwd_rows, T, raw(xg), raw(hg), raw(bias), c_prev, gates, c, raw(h), H, b0, b1);
    });
  }
  template <typename T>
  static void lstm_bwd(const T* dout, const T* dh_rec, const acc_t<T>* gates, const acc_t<T>* c_prev,
                       const acc_t<T>* c, acc_t<T>* dc, T* dxg, int64_t n, int64_t H) {
    rows(n, H, [&](int64_t b0, int64_t b1) {
      FCK_RNN_PICK(lstm_bwd_rows, T, raw(dout), raw(dh_rec), gates, c_prev, c, dc, raw(dxg), H, b0, b1);
    });
  }
  template <typename T>
  static void gru_fwd(const T* xg, const T* hg, const T* b_ih, const T* b_hh, const T* h_prev, acc_t<T>* saved,
                      T* h, int64_t n, int64_t H) {
    rows(n, H, [&](int64_t b0, int64_t b1) {
      FCK_RNN_PICK(gru_fwd_rows, T, raw(xg), raw(hg), raw(b_ih), raw(b_hh), raw(h_prev), saved, raw(h), H, b0, b1);
    });
  }
  template <typename T>
  static void gru_bwd(const T* dout, const T* dh_rec, acc_t<T>* dh_direct, const acc_t<T>* saved, const T* h_prev,
                      T* dxg, T* dhg, int64_t n, int64_t H) {
    rows(n, H, [&](int64_t b0, int64_t b1) {
      FCK_RNN_PICK(gru_bwd_rows, T, raw(dout), raw(dh_rec), dh_direct, saved, raw(h_prev), raw(dxg), raw(dhg), H, b0,
                   b1);
    });
  }
};

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got one on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(FCK_LSTM_FWD_ARGS) {
  check_cpu(xg, "lstm_layer_fwd");
  return rnn::lstm_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, bias, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(FCK_LSTM_BWD_ARGS) {
  check_cpu(out, "lstm_layer_bwd");
  return rnn::lstm_layer_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, out, c_all, gates, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_fwd(
    FCK_LSTM_PROJ_FWD_ARGS) {
  check_cpu(xg, "lstm_proj_layer_fwd");
  return rnn::lstm_proj_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, w_hr, bias, reverse, save);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_bwd(
    FCK_LSTM_PROJ_BWD_ARGS) {
  check_cpu(out, "lstm_proj_layer_bwd");
  return rnn::lstm_proj_layer_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, h0, c0, w_hh, w_hr, out, u, c_all, gates,
                                            reverse);
}

// CUDA's step GEMM emulated (a device of EmulatedLaunch's 8 multiprocessors), for the tests.
at::Tensor skinny_mm(const at::Tensor& a, const at::Tensor& w, bool wt, int64_t splits) {
  TORCH_CHECK(a.is_cpu() && w.is_cpu(), "fck::skinny_mm (cpu): expected CPU tensors");
  return skinny::mm<EmulatedLaunch>(a, w, wt, splits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_infer(FCK_LSTM_FWD_ARGS) {
  check_cpu(xg, "lstm_layer");
  const auto r = rnn::lstm_layer_fwd<RnnSteps>(xg, h0, c0, w_hh, bias, reverse, false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor> gru_layer_infer(FCK_GRU_FWD_ARGS) {
  check_cpu(xg, "gru_layer");
  const auto r = rnn::gru_layer_fwd<RnnSteps>(xg, h0, w_hh, b_ih, b_hh, reverse, false);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(FCK_GRU_FWD_ARGS) {
  check_cpu(xg, "gru_layer_fwd");
  return rnn::gru_layer_fwd<RnnSteps>(xg, h0, w_hh, b_ih, b_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(FCK_GRU_BWD_ARGS) {
  check_cpu(out, "gru_layer_bwd");
  return rnn::gru_layer_bwd<RnnSteps>(grad_out, grad_hn, h0, w_hh, out, saved, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_fwd(
    FCK_LSTM_PACKED_FWD_ARGS) {
  check_cpu(xg, "lstm_packed_fwd");
  return rnn::lstm_packed_fwd<RnnSteps>(xg, batch_sizes, h0, c0, w_hh, w_hr, bias, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_bwd(
    FCK_LSTM_PACKED_BWD_ARGS) {
  check_cpu(out, "lstm_packed_bwd");
  return rnn::lstm_packed_bwd<RnnSteps>(grad_out, grad_hn, grad_cn, batch_sizes, h0, c0, w_hh, w_hr, out, u, c_all,
                                        gates, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_packed_fwd(FCK_GRU_PACKED_FWD_ARGS) {
  check_cpu(xg, "gru_packed_fwd");
  return rnn::gru_packed_fwd<RnnSteps>(xg, batch_sizes, h0, w_hh, b_ih, b_hh, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_packed_bwd(FCK_GRU_PACKED_BWD_ARGS) {
  check_cpu(out, "gru_packed_bwd");
  return rnn::gru_packed_bwd<RnnSteps>(grad_out, grad_hn, batch_sizes, h0, w_hh, out, saved, reverse);
}

}  // namespace cpu
}  // namespace fck
