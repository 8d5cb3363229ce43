// The persistent LSTM/GRU kernels' bodies (CUDA's default for hidden <= 256; FCK_RNN_PERSISTENT_CUDA=0 runs the
// per-step loop), written once for the GPU and for a CPU emulation the tests run (FCK_RNN_PERSISTENT_EMULATE=1:
// one std::thread per CUDA thread, a barrier for __syncthreads), so the CPU covers their indexing and barriers as
// well as the cell math.
//
// One launch runs a layer's whole sequence in one direction. The rows of a batch never meet in the recurrence, so a
// block owns R rows for all T steps (R 1, or the gate count for large batches; see run): a block of G = gates * H
// threads has one thread per gate row in the GEMM phase and one per (row, unit), R * H of them, in the cell phase.
// The forward's thread n keeps row n of W_hh (fp32, MAXH values: in registers up to hidden 64, past that split
// between registers, shared and global memory, see reg_h) and forms the R rows' W_hh h from h in shared memory
// (broadcast reads); the cell thread (r, j) adds its x-parts and biases and keeps its cell state in a register. The
// backward's thread (q, k) keeps column k of gate block q of W_hh the same way and forms R partial sums of dh over
// that block; the cell thread adds the gate blocks' partials in order. Per step: two barriers, no launch, no GEMM
// call (the per-step path pays a cuBLAS call and a kernel, ~35 us of host time, per step). Roundings follow the
// per-step path: the GEMM results and the values it reads (h, the gate gradients) are rounded to the storage type T.
//
// Each body is a functor launched by fck/block_launch.h (CUDA, or emulated on the CPU).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fck/macros.h"
#include "fck/rnn.h"
#include "fck/rnn_host.h"

namespace fck {
namespace persistent {

constexpr int kMaxH = 256;
// Where a thread's W_hh values live (its row in the forward, its column in the backward; MAXH of them, zeros past
// H): up to hidden 64 all in registers. Past that, fp32 W_hh (4 x 128 x 128 is 256 KB) outgrows a multiprocessor's
// register file: at MAXH 128 the first 64 in registers and the rest in shared memory (SharedW: 128 KB for the LSTM,
// above the 48 KB of a static declaration, hence block_launch.h's dynamic shared memory); at MAXH 256 (1024 threads
// for the LSTM, 64 registers each: 32 W values there spilled 104-128 bytes) 16 in registers, 52 in shared memory
// (208 KB) and the last 188 in global memory, one fp32 copy packed for the launch (PackGlobal) that every block
// reads from L2.
template <int MAXH>
constexpr int reg_h() {
  return MAXH <= 64 ? MAXH : MAXH == 128 ? 64 : 16;
}
template <int MAXH>
constexpr int shared_h() {
  return MAXH <= 64 ? 0 : MAXH == 128 ? 64 : 52;
}
template <int MAXH>
constexpr int global_h() {
  return MAXH - reg_h<MAXH>() - shared_h<MAXH>();
}

// W_hh values reg_h.. of each thread's row or column, [k / 4][thread][4]: a warp's 16-byte loads of one k group are
// consecutive, so they meet no bank conflict. Empty up to hidden 64.
template <int GATES, int MAXH, bool = (shared_h<MAXH>() > 0)>
struct SharedW {};
template <int GATES, int MAXH>
struct SharedW<GATES, MAXH, true> {
  static constexpr int kStride = GATES * MAXH * 4;  // floats from one k group of a thread to the next
  alignas(16) float w[shared_h<MAXH>() / 4][GATES * MAXH][4];
};

// Shared memory of a block. The backward's gate gradients are laid out per gate block, [row][block][unit], so that
// a gate block starts on a 16-byte boundary for dot_rows' 4-value loads.
template <int MAXH, int R>
struct LstmFwdShared : SharedW<4, MAXH> {
  alignas(16) float h[R][MAXH];
  alignas(16) float pre[R][4 * MAXH];
};
template <int MAXH, int R>
struct LstmBwdShared : SharedW<4, MAXH> {
  alignas(16) float dg[R][4][MAXH];
  alignas(16) float part[4][R][MAXH];
};
template <int MAXH, int R>
struct GruFwdShared : SharedW<3, MAXH> {
  alignas(16) float h[R][MAXH];
  alignas(16) float pre[R][3 * MAXH];
};
template <int MAXH, int R>
struct GruBwdShared : SharedW<3, MAXH> {
  alignas(16) float dg[R][3][MAXH];
  alignas(16) float part[3][R][MAXH];
};

#if defined(__CUDACC__)
using vec4 = float4;
#else
struct alignas(16) vec4 {
  float x, y, z, w;
};
#endif

FCK_HOST_DEVICE vec4 load4(const float* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const vec4*>(p);
#else
  vec4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// The gate row a thread owns: W[n, 0..H) widened, zeros past H. A warp's threads read rows H values apart, so each
// scalar load touches 32 cache lines: 64 of them a thread cost the fp32 forward ~8 us a launch of L1 wavefronts.
// Where the rows allow, 16-byte loads (4 fp32 or 8 half values) cut the loads by 4x or 8x.
template <typename T, int MAXH>
FCK_HOST_DEVICE void load_row(float (&w)[MAXH], const T* w_hh, int n, int H, bool valid) {
  constexpr int V = 16 / sizeof(T);
  static_assert(MAXH % V == 0, "a row holds whole 16-byte vectors");
  const T* row = w_hh + int64_t(n) * H;
  if (valid && H % V == 0 && reinterpret_cast<std::uintptr_t>(row) % 16 == 0) {
    FCK_UNROLL
    for (int k = 0; k < MAXH; k += V) {
      T t[V];
      if (k < H) {
        const vec4 v = load4(reinterpret_cast<const float*>(row + k));
        memcpy(t, &v, sizeof(v));
      }
      FCK_UNROLL
      for (int i = 0; i < V; ++i) w[k + i] = k < H ? float(t[i]) : 0.f;
    }
    return;
  }
  FCK_UNROLL
  for (int k = 0; k < MAXH; ++k) w[k] = valid && k < H ? float(row[k]) : 0.f;
}

// Column k of gate block q: W[q H + i, k] for i < H, zeros past H.
template <typename T, int MAXH>
FCK_HOST_DEVICE void load_column(float (&w)[MAXH], const T* w_hh, int q, int k, int H, bool valid) {
  FCK_UNROLL
  for (int i = 0; i < MAXH; ++i) w[i] = valid && i < H ? float(w_hh[(int64_t(q) * H + i) * H + k]) : 0.f;
}

// Value k of a thread's row n (forward) or of column j of gate block q (backward, n = q H + j), zero past H.
template <typename T>
FCK_HOST_DEVICE float w_value(const T* w_hh, bool columns, int n, int k, int H, bool valid) {
  if (!valid || k >= H) return 0.f;
  if (!columns) return float(w_hh[int64_t(n) * H + k]);
  const int q = n / H, j = n - q * H;
  return float(w_hh[(int64_t(q) * H + k) * H + j]);
}

// The shared part (values reg_h .. reg_h + shared_h) into the thread's slots of s.
template <typename T, int GATES, int MAXH>
FCK_HOST_DEVICE void load_shared(SharedW<GATES, MAXH, true>& s, const T* w_hh, bool columns, int n, int H,
                                 bool valid, int tid) {
  constexpr int lo = reg_h<MAXH>(), hi = lo + shared_h<MAXH>();
  for (int k = lo; k < hi; ++k) s.w[(k - lo) / 4][tid][k % 4] = w_value(w_hh, columns, n, k, H, valid);
}

// The global part (values reg_h + shared_h .. MAXH) of every thread's row or column, fp32, [k / 4][slot][4] for the
// `slots` threads of the kernel's blocks: one copy that all blocks read (L2-resident: 752 KB for the LSTM at 256).
template <typename T, int MAXH>
struct PackGlobal {
  static constexpr int kMaxThreads = 256;
  struct Shared {
    float unused;
  };
  const T* w_hh;
  float* out;
  int H, G, slots;
  bool columns;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(const Ctx& ctx, Shared&) const {
    constexpr int lo = reg_h<MAXH>() + shared_h<MAXH>();
    const int64_t e = int64_t(ctx.block) * ctx.threads + ctx.tid;
    if (e >= int64_t(global_h<MAXH>() / 4) * slots) return;
    const int g = int(e / slots), n = int(e - int64_t(g) * slots);
    for (int c = 0; c < 4; ++c) out[e * 4 + c] = w_value(w_hh, columns, n, lo + 4 * g + c, H, n < G);
  }
};

// acc[r] = sum_{k < H} v[r * stride + k] w[k] for the block's R rows: four partial sums (k mod 4), added pairwise
// at the end, so a row's chain of dependent adds is H / 4 long (one row a block leaves no other row's chain to
// interleave), and a row's value never depends on R. v is shared memory every thread of the block reads at the
// same address (a broadcast), 4 values a load: with one value a load the GEMM phase was bound by shared-memory
// instructions (~2k a step for a block of 256 threads). v and stride are multiples of 4 floats; past H both v and
// w hold zeros, so the loop runs to MAXH without a test of H: the terms past H add +0 (the same sums), and the
// body is straight-line code whose 4-value loads the compiler can issue together. (With a runtime `k < H` test per
// group of 4, the LSTM/GRU forwards compiled it as 16 branches a step, each group's load waited on alone: ncu on the
// H200 showed 24 branches per warp and step against the backwards' 6, shared-load scoreboard stalls first, and the
// forwards at 2x the backwards' time.) Past reg_h the weights come from the thread's shared slots ws (k group g
// at ws[g * ws_stride]) and past reg_h + shared_h from its global slots wg (the same), into the same four partial
// sums.
template <int R>
FCK_HOST_DEVICE void add_products(float (&part)[R][4], const float* v, int stride, int k, const vec4& y) {
  FCK_UNROLL
  for (int r = 0; r < R; ++r) {
    const vec4 x = load4(v + r * stride + k);
    part[r][0] += x.x * y.x;
    part[r][1] += x.y * y.y;
    part[r][2] += x.z * y.z;
    part[r][3] += x.w * y.w;
  }
}

template <int R, int MAXH>
FCK_HOST_DEVICE void dot_rows(float (&acc)[R], const float* v, int stride, const float (&w)[reg_h<MAXH>()],
                              const float* ws = nullptr, int ws_stride = 0, const float* wg = nullptr,
                              int wg_stride = 0) {
  constexpr int RH = reg_h<MAXH>(), SH = RH + shared_h<MAXH>();
  float part[R][4];
  FCK_UNROLL
  for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = part[r][2] = part[r][3] = 0.f;
  FCK_UNROLL
  for (int k = SH; k < MAXH; k += 4) add_products<R>(part, v, stride, k, load4(wg + (k - SH) / 4 * wg_stride));
  FCK_UNROLL
  for (int k = RH; k < SH; k += 4) add_products<R>(part, v, stride, k, load4(ws + (k - RH) / 4 * ws_stride));
  FCK_UNROLL
  for (int k = 0; k < RH; k += 4) {
    vec4 y;
    y.x = w[k], y.y = w[k + 1], y.z = w[k + 2], y.w = w[k + 3];
    add_products<R>(part, v, stride, k, y);
  }
  FCK_UNROLL
  for (int r = 0; r < R; ++r) acc[r] = (part[r][0] + part[r][1]) + (part[r][2] + part[r][3]);
}

// A thread's W_hh values (its row n, or with `columns` the column of gate block n / H): reg_h of them in
// registers, the shared part loaded into sh, the global part in the launch's packed copy wg (see reg_h).
template <typename T, int MAXH>
struct ThreadW {
  float w[reg_h<MAXH>()];
  const float *ws = nullptr, *wg = nullptr;
  int ws_stride = 0, wg_stride = 0;

  template <class Ctx, class Sh>
  FCK_HOST_DEVICE ThreadW(const Ctx& ctx, Sh& sh, const T* w_hh, const float* packed, bool columns, int H,
                          bool valid) {
    const int n = ctx.tid;
    if (columns) {
      load_column<T, reg_h<MAXH>()>(w, w_hh, n / H, n % H, H, valid);
    } else {
      load_row<T, reg_h<MAXH>()>(w, w_hh, n, H, valid);
    }
    if constexpr (shared_h<MAXH>() > 0) {
      load_shared<T>(sh, w_hh, columns, n, H, valid, n);
      ws = &sh.w[0][n][0], ws_stride = Sh::kStride;
    }
    if (packed) wg = packed + 4 * n, wg_stride = 4 * ctx.threads;
  }

  // acc[r] = sum_k v[r * stride + k] W(k), dot_rows' sums
  template <int R>
  FCK_HOST_DEVICE void dot(float (&acc)[R], const float* v, int stride) const {
    dot_rows<R, MAXH>(acc, v, stride, w, ws, ws_stride, wg, wg_stride);
  }
};

// h_s[r][k] = h0 of the block's rows, zeros past H and past the batch.
template <int R, int MAXH, typename T, class Ctx>
FCK_HOST_DEVICE void load_state(const Ctx& ctx, float (&h_s)[R][MAXH], const T* h0, int b0, int B, int H) {
  for (int i = ctx.tid; i < R * MAXH; i += ctx.threads) {
    const int r = i / MAXH, k = i - r * MAXH;
    h_s[r][k] = k < H && b0 + r < B ? float(h0[int64_t(b0 + r) * H + k]) : 0.f;
  }
}

template <int N, class Ctx>
FCK_HOST_DEVICE void zero_shared(const Ctx& ctx, float* s) {
  for (int i = ctx.tid; i < N; i += ctx.threads) s[i] = 0.f;
}

// The loads a step needs that do not depend on the recurrence are issued a step ahead (`next`), so their latency
// overlaps the step before.

template <typename T, int MAXH, int R>
struct LstmFwd {
  static constexpr int kGates = 4, kRows = R, kMaxThreads = 4 * MAXH;
  static constexpr bool kColumns = false;
  using Shared = LstmFwdShared<MAXH, R>;
  const float* wg = nullptr;  // PackGlobal's copy (MAXH 256)
  const T *xg, *h0;
  const float* c0;
  const T *w_hh, *bias;
  T* out;
  float *c_all, *gates;
  int steps, B, H;
  bool reverse, save;

  // The cell thread adds its x-parts and biases to the GEMM's results, (x + W h) + b as the per-step path rounds:
  // it loads the next step's x-parts after its own math, a whole step before it needs them. (Added by the GEMM
  // threads, the prefetched value was moved into place right after their dot: a stall on the load each step.)
  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int G = 4 * H, tid = ctx.tid, b0 = ctx.block * R, r = tid / H, j = tid - r * H;
    const bool gate_row = tid < G, cell = tid < R * H && b0 + r < B;
    const ThreadW<T, MAXH> w(ctx, sh, w_hh, wg, false, H, gate_row);
    float bn[4];
    FCK_UNROLL
    for (int q = 0; q < 4; ++q) bn[q] = cell ? float(bias[q * H + j]) : 0.f;
    float c = cell ? c0[int64_t(b0 + r) * H + j] : 0.f;
    const auto step_row = [&](int s) { return int64_t(reverse ? steps - 1 - s : s) * B + b0; };
    const auto load_x = [&](int s, float (&xv)[4]) {
      const T* x = xg + (step_row(s) + r) * G;
      FCK_UNROLL
      for (int q = 0; q < 4; ++q) xv[q] = float(x[q * H + j]);
    };
    float xv[4] = {0.f, 0.f, 0.f, 0.f};
    if (cell) load_x(0, xv);
    load_state<R, MAXH>(ctx, sh.h, h0, b0, B, H);
    ctx.sync();
    for (int s = 0; s < steps; ++s) {
      if (gate_row) {
        float acc[R];
        w.dot(acc, &sh.h[0][0], MAXH);
        FCK_UNROLL
        for (int rr = 0; rr < R; ++rr) sh.pre[rr][tid] = float(T(acc[rr]));
      }
      ctx.sync();
      if (cell) {
        const float* p = sh.pre[r];
        float pre[4];
        FCK_UNROLL
        for (int q = 0; q < 4; ++q) pre[q] = xv[q] + p[q * H + j] + bn[q];
        if (s + 1 < steps) load_x(s + 1, xv);
        float cc, hh;
        const LstmGates<float> a = lstm_forward<float>(pre[0], pre[1], pre[2], pre[3], c, cc, hh);
        c = cc;
        const int64_t row = step_row(s) + r;
        const T ht = T(hh);
        out[row * H + j] = ht;
        if (save) {
          float* g = gates + row * G;
          g[j] = a.i, g[H + j] = a.f, g[2 * H + j] = a.g, g[3 * H + j] = a.o;
          c_all[row * H + j] = cc;
        } else {  // inference: two slots of cell states, no gates
          c_all[(int64_t(s % 2) * B + b0 + r) * H + j] = cc;
        }
        sh.h[r][j] = float(ht);
      }
      ctx.sync();
    }
  }
};

// What the LSTM backward's cell thread reads at a step besides the recurrence.
struct LstmBwdIn {
  float dout, i, f, g, o, c_prev, c;
};

template <typename T, int MAXH, int R>
struct LstmBwd {
  static constexpr int kGates = 4, kRows = R, kMaxThreads = 4 * MAXH;
  static constexpr bool kColumns = true;
  using Shared = LstmBwdShared<MAXH, R>;
  const float* wg = nullptr;
  const T *dout, *dhn;
  const float *gates, *c_all, *c0;
  const T* w_hh;
  float* dc_io;
  T *dxg, *dh0;
  int steps, B, H;
  bool reverse;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int G = 4 * H, tid = ctx.tid, b0 = ctx.block * R, r = tid / H, j = tid - r * H;
    const bool column = tid < G, cell = tid < R * H && b0 + r < B;
    const ThreadW<T, MAXH> w(ctx, sh, w_hh, wg, true, H, column);  // (r, j) is (gate block q, column k)
    const int64_t state = int64_t(b0 + r) * H + j;
    const int first = reverse ? steps - 1 : 0;
    const auto load_in = [&](int s) {
      const int t = reverse ? s : steps - 1 - s, before = reverse ? t + 1 : t - 1;
      const int64_t row = int64_t(t) * B + b0 + r;
      const float* g = gates + row * G;
      return LstmBwdIn{float(dout[row * H + j]), g[j], g[H + j], g[2 * H + j], g[3 * H + j],
                       t == first ? c0[state] : c_all[(int64_t(before) * B + b0 + r) * H + j], c_all[row * H + j]};
    };
    float dc = cell ? dc_io[state] : 0.f, dh_rec = cell ? float(dhn[state]) : 0.f;
    LstmBwdIn in{};
    if (cell) in = load_in(0);
    zero_shared<R * 4 * MAXH>(ctx, &sh.dg[0][0][0]);  // rows past the batch and units past H are read, never written
    ctx.sync();
    for (int s = 0; s < steps; ++s) {
      if (cell) {
        const int64_t row = int64_t(reverse ? s : steps - 1 - s) * B + b0 + r;
        const LstmGates<float> d = lstm_backward<float>(in.dout + dh_rec, dc, {in.i, in.f, in.g, in.o}, in.c_prev, in.c);
        if (s + 1 < steps) in = load_in(s + 1);
        const T gi = T(d.i), gf = T(d.f), gg = T(d.g), go = T(d.o);
        T* dx = dxg + row * G;
        dx[j] = gi, dx[H + j] = gf, dx[2 * H + j] = gg, dx[3 * H + j] = go;
        sh.dg[r][0][j] = float(gi), sh.dg[r][1][j] = float(gf), sh.dg[r][2][j] = float(gg), sh.dg[r][3][j] = float(go);
      }
      ctx.sync();
      if (column) {
        float acc[R];
        w.dot(acc, &sh.dg[0][r][0], 4 * MAXH);
        FCK_UNROLL
        for (int rr = 0; rr < R; ++rr) sh.part[r][rr][j] = acc[rr];
      }
      ctx.sync();
      if (cell) dh_rec = float(T(sh.part[0][r][j] + sh.part[1][r][j] + sh.part[2][r][j] + sh.part[3][r][j]));
    }
    if (cell) {
      dh0[state] = T(dh_rec);
      dc_io[state] = dc;
    }
  }
};

template <typename T, int MAXH, int R>
struct GruFwd {
  static constexpr int kGates = 3, kRows = R, kMaxThreads = 3 * MAXH;
  static constexpr bool kColumns = false;
  using Shared = GruFwdShared<MAXH, R>;
  const float* wg = nullptr;
  const T *xg, *h0, *w_hh, *b_ih, *b_hh;
  T* out;
  float* saved;
  int steps, B, H;
  bool reverse, save;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int G = 3 * H, tid = ctx.tid, b0 = ctx.block * R, r = tid / H, j = tid - r * H;
    const bool gate_row = tid < G, cell = tid < R * H && b0 + r < B;
    const ThreadW<T, MAXH> w(ctx, sh, w_hh, wg, false, H, gate_row);
    const float bh = gate_row ? float(b_hh[tid]) : 0.f;
    float bi[3];
    FCK_UNROLL
    for (int q = 0; q < 3; ++q) bi[q] = cell ? float(b_ih[q * H + j]) : 0.f;
    const auto step_row = [&](int s) { return int64_t(reverse ? steps - 1 - s : s) * B + b0; };
    const auto load_x = [&](int s, float (&xv)[3]) {  // the cell's x-parts, biased
      const T* x = xg + (step_row(s) + r) * G;
      FCK_UNROLL
      for (int q = 0; q < 3; ++q) xv[q] = float(x[q * H + j]) + bi[q];
    };
    float xv[3] = {0.f, 0.f, 0.f};
    if (cell) load_x(0, xv);
    load_state<R, MAXH>(ctx, sh.h, h0, b0, B, H);
    ctx.sync();
    for (int s = 0; s < steps; ++s) {
      if (gate_row) {
        float acc[R];
        w.dot(acc, &sh.h[0][0], MAXH);
        FCK_UNROLL
        for (int rr = 0; rr < R; ++rr) sh.pre[rr][tid] = float(T(acc[rr])) + bh;
      }
      ctx.sync();
      if (cell) {
        const int64_t row = step_row(s) + r;
        const float* hp = sh.pre[r];
        float hh;
        const GruSaved<float> sv = gru_forward<float>(xv[0], xv[1], xv[2], hp[j], hp[H + j], hp[2 * H + j],
                                                      sh.h[r][j], hh);
        if (s + 1 < steps) load_x(s + 1, xv);
        const T ht = T(hh);
        out[row * H + j] = ht;
        float* sp = saved + (save ? row : int64_t(b0 + r)) * 4 * H;  // inference: one slot
        sp[j] = sv.r, sp[H + j] = sv.z, sp[2 * H + j] = sv.n, sp[3 * H + j] = sv.bn;
        sh.h[r][j] = float(ht);
      }
      ctx.sync();
    }
  }
};

// What the GRU backward's cell thread reads at a step besides the recurrence.
struct GruBwdIn {
  float dout, r, z, n, bn, h_prev;
};

template <typename T, int MAXH, int R>
struct GruBwd {
  static constexpr int kGates = 3, kRows = R, kMaxThreads = 3 * MAXH;
  static constexpr bool kColumns = true;
  using Shared = GruBwdShared<MAXH, R>;
  const float* wg = nullptr;
  const T *dout, *dhn;
  const float* saved;
  const T *out, *h0, *w_hh;
  float* direct_io;
  T *dxg, *dhg, *dh0;
  int steps, B, H;
  bool reverse;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int G = 3 * H, tid = ctx.tid, b0 = ctx.block * R, r = tid / H, j = tid - r * H;
    const bool column = tid < G, cell = tid < R * H && b0 + r < B;
    const ThreadW<T, MAXH> w(ctx, sh, w_hh, wg, true, H, column);  // (r, j) is (gate block q, column k)
    const int64_t state = int64_t(b0 + r) * H + j;
    const int first = reverse ? steps - 1 : 0;
    const auto load_in = [&](int s) {
      const int t = reverse ? s : steps - 1 - s, before = reverse ? t + 1 : t - 1;
      const int64_t row = int64_t(t) * B + b0 + r;
      const float* sp = saved + row * 4 * H;
      return GruBwdIn{float(dout[row * H + j]), sp[j], sp[H + j], sp[2 * H + j], sp[3 * H + j],
                      float(t == first ? h0[state] : out[(int64_t(before) * B + b0 + r) * H + j])};
    };
    float direct = cell ? direct_io[state] : 0.f, dh_rec = cell ? float(dhn[state]) : 0.f;
    GruBwdIn in{};
    if (cell) in = load_in(0);
    zero_shared<R * 3 * MAXH>(ctx, &sh.dg[0][0][0]);
    ctx.sync();
    for (int s = 0; s < steps; ++s) {
      if (cell) {
        const int64_t row = int64_t(reverse ? s : steps - 1 - s) * B + b0 + r;
        const GruGrads<float> p = gru_backward<float>(in.dout + dh_rec + direct, {in.r, in.z, in.n, in.bn}, in.h_prev);
        if (s + 1 < steps) in = load_in(s + 1);
        direct = p.h_prev;
        const T dr = T(p.r), dz = T(p.z), dan = T(p.an), dbn = T(p.bn);
        T *dx = dxg + row * G, *dh = dhg + row * G;
        dx[j] = dh[j] = dr;
        dx[H + j] = dh[H + j] = dz;
        dx[2 * H + j] = dan;
        dh[2 * H + j] = dbn;
        sh.dg[r][0][j] = float(dr), sh.dg[r][1][j] = float(dz), sh.dg[r][2][j] = float(dbn);
      }
      ctx.sync();
      if (column) {
        float acc[R];
        w.dot(acc, &sh.dg[0][r][0], 3 * MAXH);
        FCK_UNROLL
        for (int rr = 0; rr < R; ++rr) sh.part[r][rr][j] = acc[rr];
      }
      ctx.sync();
      if (cell) dh_rec = float(T(sh.part[0][r][j] + sh.part[1][r][j] + sh.part[2][r][j]));
    }
    if (cell) {
      dh0[state] = T(dh_rec);
      direct_io[state] = direct;
    }
  }
};

// Whether a layer can take the persistent path: hidden <= kMaxH, a 16/32-bit float type (fp32 states), sizes that
// fit the kernels' int indices.
template <typename T>
bool eligible(const rnn::Dims& d) {
  return !std::is_same_v<T, double> && d.H > 0 && d.H <= kMaxH && d.B > 0 && d.B <= (int64_t(1) << 30) &&
         d.T <= (int64_t(1) << 30);  // an empty batch or state: no block to launch
}

// Runs Body<T, MAXH, R> (MAXH 32, 64, 128 or 256, the smallest that holds H) over the batch: G = gates * H threads
// rounded up to a warp, one block per R rows. R = 1 while the batch's blocks fit the device at once
// (Launch::blocks_at_once: the multiprocessors), else R = gates. A block's GEMM phase issues R times a row's FMAs on
// one multiprocessor: lesson 7's batch of 64 as 16 blocks of 4 rows kept 16 of 132 SMs busy, at 4x the work each.
// Past hidden 64, R = 1: a block of up to 512 threads takes a multiprocessor's registers (128 a thread under the
// launch bounds) and its W_hh part 96-128 KB of shared memory (up to 1024 threads, 64 registers and 156-208 KB past
// hidden 128); batches of up to two waves.
// False, launching nothing, where the device cannot give a block the shared memory it needs (Launch::shared_max:
// 227 KB on an H100/H200, 163 KB on an A100, where hidden > 128 falls back to the loop; 99 KB on consumer parts,
// where hidden > 64 does).
template <class Launch, template <typename, int, int> class Body, typename T, class Make>
bool run(const rnn::Dims& d, const Make& make) {
  // Past hidden 64 a block holds one batch row and fills a multiprocessor: a batch of many waves of blocks runs each
  // wave's T steps in turn, where the per-step loop's GEMMs grow more efficient with the batch. Two waves at most.
  if (d.H > 64 && d.B > 2 * Launch::blocks_at_once()) return false;
  bool ran = true;
  const auto go = [&](auto maxh, auto rows) {
    using B = Body<T, decltype(maxh)::value, decltype(rows)::value>;
    const int threads = int((B::kGates * d.H + 31) / 32 * 32), blocks = int((d.B + B::kRows - 1) / B::kRows);
    ran = sizeof(typename B::Shared) <= Launch::shared_max();
    if (!ran) return;
    B body = make(B{});
    at::Tensor wg;
    constexpr int MAXH = decltype(maxh)::value;
    if constexpr (global_h<MAXH>() > 0) {  // the W_hh values past shared memory, packed once for all blocks
      const int64_t floats = int64_t(global_h<MAXH>()) * threads;
      wg = Launch::scratch(floats);
      Launch::launch(int((floats / 4 + 255) / 256), 256,
                     PackGlobal<T, MAXH>{body.w_hh, wg.template data_ptr<float>(), int(d.H), int(B::kGates * d.H),
                                         threads, B::kColumns});
      body.wg = wg.template data_ptr<float>();
    }
    Launch::launch(blocks, threads, body);
  };
  constexpr int kGates = Body<T, 32, 1>::kGates;
  const bool one = d.B <= Launch::blocks_at_once();
  if (d.H <= 32) {
    one ? go(std::integral_constant<int, 32>{}, std::integral_constant<int, 1>{})
        : go(std::integral_constant<int, 32>{}, std::integral_constant<int, kGates>{});
  } else if (d.H <= 64) {
    one ? go(std::integral_constant<int, 64>{}, std::integral_constant<int, 1>{})
        : go(std::integral_constant<int, 64>{}, std::integral_constant<int, kGates>{});
  } else if (d.H <= 128) {
    go(std::integral_constant<int, 128>{}, std::integral_constant<int, 1>{});
  } else {
    go(std::integral_constant<int, 256>{}, std::integral_constant<int, 1>{});
  }
  return ran;
}

// The layer passes as Dev::*_whole hooks (see rnn_host.h; a Dev derives from Passes<its Launch>): true when the
// persistent kernel ran the pass.
template <class Launch>
struct Passes {
  template <typename T, typename A>
  static bool lstm_fwd_whole(const rnn::Dims& d, const rnn::Order& o, bool save, const rnn::Seq<const T>& x,
                       const rnn::Seq<const T>& h_init, const rnn::Seq<const A>& c_init, const T* w, const T* bias,
                       const rnn::Seq<T>& y, const rnn::Seq<A>& c, const rnn::Seq<A>& g) {
    if constexpr (!std::is_same_v<A, float>) {
      return false;
    } else {
      if (!eligible<T>(d) || !Launch::enabled()) return false;
      return run<Launch, LstmFwd, T>(d, [&](auto b) {
        b.xg = x.p, b.h0 = h_init.p, b.c0 = c_init.p, b.w_hh = w, b.bias = bias, b.out = y.p, b.c_all = c.p;
        b.gates = g.p, b.steps = int(d.T), b.B = int(d.B), b.H = int(d.H), b.reverse = o.reverse, b.save = save;
        return b;
      });
    }
  }
  template <typename T, typename A>
  static bool lstm_bwd_whole(const rnn::Dims& d, const rnn::Order& o, const rnn::Seq<const T>& dy,
                       const rnn::Seq<const T>& dh_last, const rnn::Seq<const A>& g, const rnn::Seq<const A>& c,
                       const rnn::Seq<const A>& c_init, const T* w, const rnn::Seq<A>& dc, const rnn::Seq<T>& dx,
                       const rnn::Seq<T>& dh) {
    if constexpr (!std::is_same_v<A, float>) {
      return false;
    } else {
      if (!eligible<T>(d) || !Launch::enabled()) return false;
      return run<Launch, LstmBwd, T>(d, [&](auto b) {
        b.dout = dy.p, b.dhn = dh_last.p, b.gates = g.p, b.c_all = c.p, b.c0 = c_init.p, b.w_hh = w, b.dc_io = dc.p;
        b.dxg = dx.p, b.dh0 = dh.p, b.steps = int(d.T), b.B = int(d.B), b.H = int(d.H), b.reverse = o.reverse;
        return b;
      });
    }
  }
  template <typename T, typename A>
  static bool gru_fwd_whole(const rnn::Dims& d, const rnn::Order& o, bool save, const rnn::Seq<const T>& x,
                      const rnn::Seq<const T>& h_init, const T* w, const T* b_ih, const T* b_hh,
                      const rnn::Seq<T>& y, const rnn::Seq<A>& sv) {
    if constexpr (!std::is_same_v<A, float>) {
      return false;
    } else {
      if (!eligible<T>(d) || !Launch::enabled()) return false;
      return run<Launch, GruFwd, T>(d, [&](auto b) {
        b.xg = x.p, b.h0 = h_init.p, b.w_hh = w, b.b_ih = b_ih, b.b_hh = b_hh, b.out = y.p, b.saved = sv.p;
        b.steps = int(d.T), b.B = int(d.B), b.H = int(d.H), b.reverse = o.reverse, b.save = save;
        return b;
      });
    }
  }
  template <typename T, typename A>
  static bool gru_bwd_whole(const rnn::Dims& d, const rnn::Order& o, const rnn::Seq<const T>& dy,
                      const rnn::Seq<const T>& dh_last, const rnn::Seq<const A>& sv, const rnn::Seq<const T>& y,
                      const rnn::Seq<const T>& h_init, const T* w, const rnn::Seq<A>& direct,
                      const rnn::Seq<T>& dx, const rnn::Seq<T>& dg, const rnn::Seq<T>& dh) {
    if constexpr (!std::is_same_v<A, float>) {
      return false;
    } else {
      if (!eligible<T>(d) || !Launch::enabled()) return false;
      return run<Launch, GruBwd, T>(d, [&](auto b) {
        b.dout = dy.p, b.dhn = dh_last.p, b.saved = sv.p, b.out = y.p, b.h0 = h_init.p, b.w_hh = w;
        b.direct_io = direct.p, b.dxg = dx.p, b.dhg = dg.p, b.dh0 = dh.p, b.steps = int(d.T), b.B = int(d.B);
        b.H = int(d.H), b.reverse = o.reverse;
        return b;
      });
    }
  }
};

}  // namespace persistent
}  // namespace fck
