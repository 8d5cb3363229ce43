// The recurrent step's GEMM at small batches on CUDA: c (n x N) = a (n x K) @ op(w) in fp32, n <= 32, with op(w)
// = w^T for w (N x K) (the forward's h @ W_hh^T) or w for w (K x N) (the backward's dg @ W_hh). cuBLAS gives such a
// product (the AWD-LSTM's 32 x 1152 by 1152 x 4608) 128 x 32 tiles: 36 blocks for 132 multiprocessors, 28 us a
// step on the H200 (run 3), the loop's largest cost.
//
// A block computes a 32 x 32 tile of c over a range of K: its 4 warps split the range, each stages 32-value chunks
// of a and w in shared memory (transposed, rows padded to 36 floats so that the 16-byte stores and loads meet no
// bank conflict) and accumulates a 4 x 8 register tile per lane from 16-byte shared loads; the next chunk's global
// loads are issued before the current chunk's FMAs. The warps' tiles are then added in a fixed order. Where the
// column tiles do not fill the device, the blocks also split K (`splits`) and write partial tiles
// [split][n][N], which at::sum then adds: the result does not depend on timing.
//
// A functor launched by fck/block_launch.h, so the CPU emulation (the tests) runs the same indexing and barriers.
#pragma once

#include <cstdint>

#include "fck/macros.h"
#include "fck/rnn_persistent.h"  // vec4, load4

namespace fck {
namespace skinny {

using persistent::load4;
using persistent::vec4;

constexpr int kRows = 32, kCols = 32, kWarps = 4, kChunk = 32, kThreads = 32 * kWarps, kPad = 4;

struct Shared {
  union {
    struct {
      alignas(16) float a[kWarps][kChunk][kRows + kPad];  // a^T: [k][row]
      alignas(16) float w[kWarps][kChunk][kCols + kPad];  // op(w): [k][column]
    } stage;
    alignas(16) float part[kWarps][kRows][kCols];
  };
};

FCK_HOST_DEVICE void store4(float* p, float x, float y, float z, float w) {
  vec4 v;
  v.x = x, v.y = y, v.z = z, v.w = w;
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<vec4*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

// K per split, in whole chunks of every warp, so that all warps run the same number of chunks (uniform barriers).
inline int split_span(int K, int splits) {
  const int per = (K + splits - 1) / splits, unit = kWarps * kChunk;
  return (per + unit - 1) / unit * unit;
}

struct Gemm {
  static constexpr int kMaxThreads = kThreads;
  using Shared = skinny::Shared;
  const float *a, *w;
  float* c;  // splits == 1: c (n x N); else partial tiles [splits][n][N]
  int n, K, N, kspan;
  bool wt;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(Ctx& ctx, Shared& sh) const {
    const int tid = ctx.tid, warp = tid / 32, lane = tid % 32;
    const int tiles = (N + kCols - 1) / kCols, n0 = (ctx.block % tiles) * kCols, split = ctx.block / tiles;
    const int wspan = kspan / kWarps, chunks = wspan / kChunk;
    const int kw0 = split * kspan + warp * wspan;
    const int kw1 = kw0 + wspan < K ? kw0 + wspan : K;  // may be <= kw0: the warp adds zeros
    const int bi = lane / 4, nj = lane % 4;             // the lane's rows 4 bi.. and columns 8 nj..
    float acc[4][8];
    FCK_UNROLL
    for (int i = 0; i < 4; ++i) {
      FCK_UNROLL
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    // A chunk's values, lane = k for a and for w^T's rows (coalesced along K), lane = column for w (K x N).
    float pa[kRows], pw[kCols];
    const auto fetch = [&](int chunk) {
      const int k = kw0 + chunk * kChunk + lane;
      FCK_UNROLL
      for (int q = 0; q < kRows; ++q) pa[q] = q < n && k < kw1 ? a[int64_t(q) * K + k] : 0.f;
      if (wt) {
        FCK_UNROLL
        for (int q = 0; q < kCols; ++q) pw[q] = n0 + q < N && k < kw1 ? w[int64_t(n0 + q) * K + k] : 0.f;
      } else {
        const int k0 = kw0 + chunk * kChunk;
        FCK_UNROLL
        for (int q = 0; q < kChunk; ++q) {
          pw[q] = n0 + lane < N && k0 + q < kw1 ? w[int64_t(k0 + q) * N + n0 + lane] : 0.f;
        }
      }
    };
    fetch(0);
    for (int chunk = 0; chunk < chunks; ++chunk) {
      FCK_UNROLL
      for (int g = 0; g < kRows; g += 4) store4(&sh.stage.a[warp][lane][g], pa[g], pa[g + 1], pa[g + 2], pa[g + 3]);
      if (wt) {
        FCK_UNROLL
        for (int g = 0; g < kCols; g += 4) store4(&sh.stage.w[warp][lane][g], pw[g], pw[g + 1], pw[g + 2], pw[g + 3]);
      } else {
        FCK_UNROLL
        for (int q = 0; q < kChunk; ++q) sh.stage.w[warp][q][lane] = pw[q];
      }
      ctx.sync();
      if (chunk + 1 < chunks) fetch(chunk + 1);
      FCK_UNROLL
      for (int kk = 0; kk < kChunk; ++kk) {
        const vec4 x = load4(&sh.stage.a[warp][kk][4 * bi]);
        const vec4 y0 = load4(&sh.stage.w[warp][kk][8 * nj]), y1 = load4(&sh.stage.w[warp][kk][8 * nj + 4]);
        const float xs[4] = {x.x, x.y, x.z, x.w}, ys[8] = {y0.x, y0.y, y0.z, y0.w, y1.x, y1.y, y1.z, y1.w};
        FCK_UNROLL
        for (int i = 0; i < 4; ++i) {
          FCK_UNROLL
          for (int j = 0; j < 8; ++j) acc[i][j] += xs[i] * ys[j];
        }
      }
      ctx.sync();  // every warp is done with the stage before the next chunk (or the partial tiles) overwrite it
    }
    FCK_UNROLL
    for (int i = 0; i < 4; ++i) {
      FCK_UNROLL
      for (int j = 0; j < 8; ++j) sh.part[warp][4 * bi + i][8 * nj + j] = acc[i][j];
    }
    ctx.sync();
    for (int o = tid; o < kRows * kCols; o += kThreads) {
      const int r = o / kCols, col = o % kCols;
      if (r < n && n0 + col < N) {
        const float v = ((sh.part[0][r][col] + sh.part[1][r][col]) + sh.part[2][r][col]) + sh.part[3][r][col];
        c[(int64_t(split) * n + r) * N + n0 + col] = v;
      }
    }
  }
};

// Whether the kernel takes a product: fp32 rows of at most kRows, sizes within int.
inline bool takes(int64_t n, int64_t K, int64_t N) {
  return n > 0 && n <= kRows && K > 0 && N > 0 && K < (int64_t(1) << 30) && N < (int64_t(1) << 30);
}

// K splits: about 4 blocks a multiprocessor (fewer leave some with twice the work of others: the AWD step's 144
// column tiles on 132), at most 8 and at least two chunks a warp, none left empty.
inline int choose_splits(int64_t K, int64_t N, int64_t sms) {
  const int64_t tiles = (N + kCols - 1) / kCols, chunks = K / (2 * kWarps * kChunk);
  const int64_t most = chunks < 1 ? 1 : chunks > 8 ? 8 : chunks;
  int64_t s = (4 * sms + tiles / 2) / tiles;
  s = s < 1 ? 1 : s > most ? most : s;
  const int64_t span = split_span(int(K), int(s));
  return int((K + span - 1) / span);
}

// c = a @ op(w) (c, a, w contiguous fp32 tensors of the same device) by the kernel, launched by
// Launch::launch(blocks, threads, body); splits <= 0: chosen for Launch::blocks_at_once() multiprocessors.
template <class Launch>
void mm_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& w, bool wt, int splits = 0) {
  const int n = int(a.size(0)), K = int(a.size(1)), N = int(c.size(1));
  if (splits <= 0) splits = choose_splits(K, N, Launch::blocks_at_once());
  Gemm g;
  g.a = a.data_ptr<float>(), g.w = w.data_ptr<float>(), g.n = n, g.K = K, g.N = N, g.wt = wt;
  g.kspan = split_span(K, splits);
  at::Tensor part = splits > 1 ? at::empty({splits, n, N}, c.options()) : c;
  g.c = part.data_ptr<float>();
  Launch::launch((N + kCols - 1) / kCols * splits, kThreads, g);
  if (splits > 1) at::sum_out(c, part, 0);
}

// The fck::skinny_mm op: checks, then mm_out.
template <class Launch>
at::Tensor mm(const at::Tensor& a, const at::Tensor& w, bool wt, int64_t splits) {
  const char* op = "fck::skinny_mm";
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2, op, ": expected 2-D a and w, got ", a.dim(), "-D and ", w.dim(), "-D");
  TORCH_CHECK(a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, op, ": expected float32, got ",
              a.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(a.device() == w.device(), op, ": a is on ", a.device(), " but w is on ", w.device());
  const int64_t K = a.size(1), N = wt ? w.size(0) : w.size(1);
  TORCH_CHECK((wt ? w.size(1) : w.size(0)) == K, op, ": a is ", a.sizes(), " but w", wt ? "^T" : "", " is ",
              wt ? w.t().sizes() : w.sizes());
  TORCH_CHECK(takes(a.size(0), K, N), op, ": takes 1 to ", kRows, " rows and nonempty products, got a ", a.sizes(),
              " and w ", w.sizes());
  TORCH_CHECK(splits >= 0 && splits <= 64, op, ": splits must be 0 (chosen) to 64, got ", splits);
  at::Tensor c = at::empty({a.size(0), N}, a.options());
  mm_out<Launch>(c, a.contiguous(), w.contiguous(), wt, int(splits));
  return c;
}

}  // namespace skinny
}  // namespace fck
