// Batch norm (+ residual add, + ReLU) on the CPU, forward and backward.
//
// Training forward reads the input twice (statistics, then normalize) and writes the output once; backward reads
// grad_output, input and (for the ReLU mask) output twice and writes grad_input (and grad_residual) once. Work is
// split into units that each stream through memory once in L1-sized tiles: planar inputs into runs of one (n, c)
// plane, channels-last inputs into blocks of whole rows. Per-unit partial statistics are merged in double. Planar
// inputs whose channels fit in cache are walked a group of channels at a time, so the second read comes from
// cache (channel_group).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fck/batch_norm.h"
#include "fck/batch_norm_fused.h"
#include "fck/batch_norm_host.h"
#include "fck/block_launch.h"
#include "fck/cpu_pool.h"
#include "fck/cpu_vec.h"
#include "fck/ops.h"

namespace fck {
namespace cpu {
namespace {

constexpr int64_t kRun = 16384;          // elements of one planar work unit
constexpr int64_t kTile = 256;           // elements converted to the accumulation type at a time
constexpr int64_t kBlockElems = 65536;   // elements of one interleaved work unit (whole rows)
constexpr int64_t kRowTileElems = 8192;  // interleaved: rows per tile of the two-pass statistics
constexpr int64_t kCols = 64;            // interleaved: channels a row loop reduces at a time
constexpr int64_t kSmallPlane = 1024;    // planar: planes below this size are reduced by small_planes_*
constexpr int64_t kLanes = 16;           // small planes: partial sums a channel keeps, one per value index mod 16
constexpr int64_t kSub = 64;             // small planes: channels reduced together
constexpr int64_t kPlaneTile = 4096;     // small planes: values of a channel per tile (whole planes)

// The tile as accumulation-type values: the storage itself for fp32/fp64, a widened copy for fp16/bf16.
template <typename T, bool F16C>
FCK_HOST_DEVICE const acc_t<T>* as_acc(const raw_t<T>* src, acc_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<raw_t<T>, acc_t<T>>) {
    return src;
  } else {
    widen<T, F16C>(src, buf, n);
    return buf;
  }
}

// Where a tile's results go before `store`: straight into the output for fp32/fp64.
template <typename T>
FCK_HOST_DEVICE acc_t<T>* out_buf(raw_t<T>* dst, acc_t<T>* buf) {
  if constexpr (std::is_same_v<raw_t<T>, acc_t<T>>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T, bool F16C>
FCK_HOST_DEVICE void store(const acc_t<T>* buf, raw_t<T>* dst, int64_t n) {
  if constexpr (!std::is_same_v<raw_t<T>, acc_t<T>>) narrow<T, F16C>(buf, dst, n);
}

// ---- workers: one unit each; compiled for baseline x86-64 and for AVX2+FMA+F16C (see FCK_BN_CLONES) ----

// Statistics are taken of x - pivot, pivot a value of the channel (its first): the shifted values are small and
// exact, so fp32 tile sums and merges keep full precision even when |mean| >> std (at mean 1e4, fp32 cannot even
// represent the mean to better than 5e-4, and that error enters M2 squared).

// (count, shifted mean, M2) of a run: per tile an exact two-pass mean and M2 over L1-resident data, merged across
// tiles with Chan's formula.
template <typename T, bool F16C>
FCK_HOST_DEVICE void stats_run(const raw_t<T>* x, int64_t n, acc_t<T> pivot, double* out) {
  using A = acc_t<T>;
  alignas(64) A buf[kTile];
  A cnt = 0, mean = 0, m2 = 0;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const A* xs = as_acc<T, F16C>(x + t, buf, len);
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) s += xs[i] - pivot;
    const A tm = s / A(len);
    A q = 0;
#pragma omp simd reduction(+ : q)
    for (int64_t i = 0; i < len; ++i) q += (xs[i] - pivot - tm) * (xs[i] - pivot - tm);
    welford_merge<A>(cnt, mean, m2, A(len), tm, q);
  }
  out[0] = cnt;
  out[1] = mean;
  out[2] = m2;
}

// Interleaved rows are reduced kCols channels at a time, so a chunk's sums stay in registers while the loop walks
// the rows (a loop over whole rows loads and stores every channel's sum once a row: L1-bound, half the speed of
// the stream at the tabular shape). for_chunks hands full chunks their width as a compile-time constant.
template <class F>
void for_chunks(int64_t C, F&& body) {
  int64_t c0 = 0;
  for (; c0 + kCols <= C; c0 += kCols) body(c0, std::integral_constant<int64_t, kCols>{});
  if (c0 < C) body(c0, C - c0);
}

// Per-channel (shifted mean, M2) of `rows` rows of C elements (the count is `rows`), written as mean[C], m2[C]: per
// tile of rows an exact two-pass mean and M2 (the tile is L1-resident), merged across tiles with Chan's formula.
template <typename T, bool F16C>
FCK_HOST_DEVICE void stats_rows(const raw_t<T>* x, int64_t rows, int64_t C, const acc_t<T>* pivot,
                                double* mean_out, double* m2_out) {
  using A = acc_t<T>;
  std::vector<A> scratch(2 * C, A(0));
  A *mean = scratch.data(), *m2 = mean + C;
  const int64_t tile_rows = std::max<int64_t>(1, kRowTileElems / C);
  A cnt = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t r1 = std::min(rows, r0 + tile_rows);
    const A nr = A(r1 - r0), inv = A(1) / nr;
    for_chunks(C, [&](int64_t c0, auto width) {
      const int64_t w = width;
      alignas(64) A buf[kCols], p[kCols], s[kCols], q[kCols];
      for (int64_t c = 0; c < w; ++c) p[c] = pivot[c0 + c], s[c] = q[c] = A(0);
      for (int64_t r = r0; r < r1; ++r) {
        const A* xs = as_acc<T, F16C>(x + r * C + c0, buf, w);
        for (int64_t c = 0; c < w; ++c) s[c] += xs[c] - p[c];
      }
      for (int64_t c = 0; c < w; ++c) s[c] *= inv;  // the tile's shifted mean
      for (int64_t r = r0; r < r1; ++r) {
        const A* xs = as_acc<T, F16C>(x + r * C + c0, buf, w);
        for (int64_t c = 0; c < w; ++c) q[c] += (xs[c] - p[c] - s[c]) * (xs[c] - p[c] - s[c]);
      }
      for (int64_t c = 0; c < w; ++c) {
        A n = cnt;
        welford_merge<A>(n, mean[c0 + c], m2[c0 + c], nr, s[c], q[c]);
      }
    });
    cnt += nr;
  }
  for (int64_t c = 0; c < C; ++c) {
    mean_out[c] = mean[c];
    m2_out[c] = m2[c];
  }
}

template <typename T, bool F16C>
FCK_HOST_DEVICE void forward_run(const raw_t<T>* x, const raw_t<T>* res, raw_t<T>* y, int64_t n, acc_t<T> mean,
                                 acc_t<T> k, acc_t<T> beta, bool relu) {
  using A = acc_t<T>;
  alignas(64) A xb[kTile], rb[kTile], yb[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const A* xs = as_acc<T, F16C>(x + t, xb, len);
    A* z = out_buf<T>(y + t, yb);
    for (int64_t i = 0; i < len; ++i) z[i] = bn_normalize<A>(xs[i], mean, k, beta);
    if (res) {
      const A* rs = as_acc<T, F16C>(res + t, rb, len);
      for (int64_t i = 0; i < len; ++i) z[i] += rs[i];
    }
    if (relu) {
      for (int64_t i = 0; i < len; ++i) z[i] = bn_relu<A>(z[i]);
    }
    store<T, F16C>(z, y + t, len);
  }
}

// `coef` holds mean[C], k[C], beta[C].
template <typename T, bool F16C>
FCK_HOST_DEVICE void forward_rows(const raw_t<T>* x, const raw_t<T>* res, raw_t<T>* y, int64_t rows, int64_t C,
                                  const acc_t<T>* coef, bool relu) {
  using A = acc_t<T>;
  std::vector<A> scratch(3 * C);
  A *xb = scratch.data(), *rb = xb + C, *yb = rb + C;
  const A *mean = coef, *k = coef + C, *beta = coef + 2 * C;
  for (int64_t r = 0; r < rows; ++r) {
    const A* xs = as_acc<T, F16C>(x + r * C, xb, C);
    A* z = out_buf<T>(y + r * C, yb);
    for (int64_t c = 0; c < C; ++c) z[c] = bn_normalize<A>(xs[c], mean[c], k[c], beta[c]);
    if (res) {
      const A* rs = as_acc<T, F16C>(res + r * C, rb, C);
      for (int64_t c = 0; c < C; ++c) z[c] += rs[c];
    }
    if (relu) {
      for (int64_t c = 0; c < C; ++c) z[c] = bn_relu<A>(z[c]);
    }
    store<T, F16C>(z, y + r * C, C);
  }
}

// Where the backward's ReLU mask comes from. y: the forward's output, zero gradient where y <= 0. Else mean/k/beta:
// the forward's own coefficients (per channel, from the call's first channel), with which the pre-activation
// (x - mean) k + beta is recomputed from x: the expression the forward evaluated, so the same mask, and one tensor
// fewer to read (the backward of BN+ReLU without a residual). Neither: no ReLU.
template <typename T>
struct Mask {
  const raw_t<T>* y = nullptr;
  const acc_t<T>*mean = nullptr, *k = nullptr, *beta = nullptr;
  Mask at(int64_t offset) const { return {y ? y + offset : nullptr, mean, k, beta}; }
  Mask channel(int64_t c) const { return k ? Mask{y, mean + c, k + c, beta + c} : *this; }
};

// g = dy through the ReLU, into `gb`; xs is x's run (as the accumulation type). kRow: element i is channel i (a
// chunk of a channels-last row); else every element is the mask's first channel (a planar run).
template <typename T, bool F16C, bool kRow>
FCK_HOST_DEVICE const acc_t<T>* relu_masked(const raw_t<T>* dy, const Mask<T>& m, const acc_t<T>* xs, int64_t n,
                                            acc_t<T>* db, acc_t<T>* yb, acc_t<T>* gb) {
  using A = acc_t<T>;
  const A* ds = as_acc<T, F16C>(dy, db, n);
  if (m.y) {
    const A* ys = as_acc<T, F16C>(m.y, yb, n);
    for (int64_t i = 0; i < n; ++i) gb[i] = bn_relu_grad<A>(ds[i], ys[i]);
  } else if (!m.k) {
    return ds;
  } else if constexpr (kRow) {
    for (int64_t i = 0; i < n; ++i) {
      gb[i] = bn_relu_grad<A>(ds[i], bn_normalize<A>(xs[i], m.mean[i], m.k[i], m.beta[i]));
    }
  } else {
    const A mean = m.mean[0], k = m.k[0], beta = m.beta[0];
    for (int64_t i = 0; i < n; ++i) gb[i] = bn_relu_grad<A>(ds[i], bn_normalize<A>(xs[i], mean, k, beta));
  }
  return gb;
}

// Planes of fewer than kSmallPlane values (ResNet's 28x28 and below) are reduced a sub-group of kSub channels and a
// tile of whole planes at a time: each channel sums into kLanes partial sums (value index mod kLanes) across all
// of the tile's planes, and reduces them once a tile. Reducing each plane on its own paid two horizontal sums and
// a double merge per plane, more than the plane's 49 (7x7) values cost to read. The tile (kSub channels, up to
// kPlaneTile values each, 1 MB in fp32) is read twice, the second time from L2. The bits depend only on the
// tiles, never on how channels are grouped or which thread runs them.
template <typename A>
FCK_HOST_DEVICE A lanes_total(const A* v) {
  A s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// The small planes' lane sums over whole blocks of kLanes values (the caller adds the tail); each returns the first
// index not done. The AVX2 versions hold the 16 lanes in two registers (the auto-vectorizer shuffled them); both
// do the same additions in the same order, so they give the same bits.
template <typename A, bool F16C>
struct LaneOps {
  // v[l] += x[i + l] - p
  static int64_t shift(A* v, const A* x, int64_t n, A p) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) v[l] += x[i + l] - p;
    }
    return i;
  }
  // v[l] += (x[i + l] - p - m)^2
  static int64_t square(A* v, const A* x, int64_t n, A p, A m) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) v[l] += (x[i + l] - p - m) * (x[i + l] - p - m);
    }
    return i;
  }
  // a[l] += g[i + l], b[l] += g[i + l] (x[i + l] - m)
  static int64_t grad(A* a, A* b, const A* g, const A* x, int64_t n, A m) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        a[l] += g[i + l];
        b[l] += g[i + l] * (x[i + l] - m);
      }
    }
    return i;
  }
};

#ifdef FCK_HAVE_AVX2_CLONE
template <>
struct LaneOps<float, true> {
  __attribute__((target("avx2,fma,f16c"))) static int64_t shift(float* v, const float* x, int64_t n, float p) {
    __m256 lo = _mm256_loadu_ps(v), hi = _mm256_loadu_ps(v + 8);
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      lo = _mm256_add_ps(lo, _mm256_sub_ps(_mm256_loadu_ps(x + i), pv));
      hi = _mm256_add_ps(hi, _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), pv));
    }
    _mm256_storeu_ps(v, lo);
    _mm256_storeu_ps(v + 8, hi);
    return i;
  }
  __attribute__((target("avx2,fma,f16c"))) static int64_t square(float* v, const float* x, int64_t n, float p,
                                                                 float m) {
    __m256 lo = _mm256_loadu_ps(v), hi = _mm256_loadu_ps(v + 8);
    const __m256 pv = _mm256_set1_ps(p), mv = _mm256_set1_ps(m);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const __m256 d0 = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), pv), mv);
      const __m256 d1 = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), pv), mv);
      lo = _mm256_add_ps(lo, _mm256_mul_ps(d0, d0));
      hi = _mm256_add_ps(hi, _mm256_mul_ps(d1, d1));
    }
    _mm256_storeu_ps(v, lo);
    _mm256_storeu_ps(v + 8, hi);
    return i;
  }
  __attribute__((target("avx2,fma,f16c"))) static int64_t grad(float* a, float* b, const float* g, const float* x,
                                                               int64_t n, float m) {
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8), b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    const __m256 mv = _mm256_set1_ps(m);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const __m256 g0 = _mm256_loadu_ps(g + i), g1 = _mm256_loadu_ps(g + i + 8);
      a0 = _mm256_add_ps(a0, g0);
      a1 = _mm256_add_ps(a1, g1);
      b0 = _mm256_add_ps(b0, _mm256_mul_ps(g0, _mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
      b1 = _mm256_add_ps(b1, _mm256_mul_ps(g1, _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mv)));
    }
    _mm256_storeu_ps(a, a0);
    _mm256_storeu_ps(a + 8, a1);
    _mm256_storeu_ps(b, b0);
    _mm256_storeu_ps(b + 8, b1);
    return i;
  }
};
#endif

inline int64_t planes_per_tile(int64_t S) { return std::max<int64_t>(1, kPlaneTile / S); }

// Statistics of channels [c0, c0 + nc) (nc <= kSub) over planes [n0, n1): per channel an exact two-pass mean and
// M2 of x - pivot over the tile, merged into st (count, mean, M2 per channel).
template <typename T, bool F16C>
FCK_HOST_DEVICE void small_planes_stats(const raw_t<T>* x, int64_t n0, int64_t n1, int64_t C, int64_t S,
                                        int64_t c0, int64_t nc, const acc_t<T>* pivot, double* st) {
  using A = acc_t<T>;
  alignas(64) A buf[kSmallPlane], acc[kSub][kLanes], mean[kSub];
  const A count = A((n1 - n0) * S);
  for (int pass = 0; pass < 2; ++pass) {  // the sum of x - pivot, then of (x - pivot - tile mean)^2
    std::fill(&acc[0][0], &acc[0][0] + kSub * kLanes, A(0));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < nc; ++j) {
        const A* xs = as_acc<T, F16C>(x + ((n * C) + c0 + j) * S, buf, S);
        const A p = pivot[j], m = pass ? mean[j] : A(0);
        A* v = acc[j];
        if (pass == 0) {
          for (int64_t i = LaneOps<A, F16C>::shift(v, xs, S, p), l = 0; i < S; ++i, ++l) v[l] += xs[i] - p;
        } else {
          for (int64_t i = LaneOps<A, F16C>::square(v, xs, S, p, m), l = 0; i < S; ++i, ++l) {
            v[l] += (xs[i] - p - m) * (xs[i] - p - m);
          }
        }
      }
    }
    if (pass == 0) {
      for (int64_t j = 0; j < nc; ++j) mean[j] = lanes_total(acc[j]) / count;
    }
  }
  for (int64_t j = 0; j < nc; ++j) {
    double* t = st + 3 * j;
    welford_merge<double>(t[0], t[1], t[2], double(count), double(mean[j]), double(lanes_total(acc[j])));
  }
}

// The backward's sums (g, g (x - mean)) of channels [c0, c0 + nc) over planes [n0, n1), added into sums (two per
// channel) once a tile.
template <typename T, bool F16C>
FCK_HOST_DEVICE void small_planes_reduce(const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, int64_t n0,
                                         int64_t n1, int64_t C, int64_t S, int64_t c0, int64_t nc,
                                         const acc_t<T>* mean, double* sums) {
  using A = acc_t<T>;
  alignas(64) A db[kSmallPlane], yb[kSmallPlane], gb[kSmallPlane], xb[kSmallPlane], a[kSub][kLanes],
      b[kSub][kLanes];
  std::fill(&a[0][0], &a[0][0] + kSub * kLanes, A(0));
  std::fill(&b[0][0], &b[0][0] + kSub * kLanes, A(0));
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t o = ((n * C) + c0 + j) * S;
      const A* xs = as_acc<T, F16C>(x + o, xb, S);
      const A* g = relu_masked<T, F16C, false>(dy + o, y.at(o).channel(j), xs, S, db, yb, gb);
      const A m = mean[j];
      for (int64_t i = LaneOps<A, F16C>::grad(a[j], b[j], g, xs, S, m), l = 0; i < S; ++i, ++l) {
        a[j][l] += g[i];
        b[j][l] += g[i] * (xs[i] - m);
      }
    }
  }
  for (int64_t j = 0; j < nc; ++j) {
    sums[2 * j] += lanes_total(a[j]);
    sums[2 * j + 1] += lanes_total(b[j]);
  }
}

// (sum g, sum g (x - mean)) of a run.
template <typename T, bool F16C>
FCK_HOST_DEVICE void backward_reduce_run(const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, int64_t n,
                                         acc_t<T> mean, double* out) {
  using A = acc_t<T>;
  alignas(64) A db[kTile], yb[kTile], gb[kTile], xb[kTile];
  double sg = 0, sgx = 0;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const A* xs = as_acc<T, F16C>(x + t, xb, len);
    const A* g = relu_masked<T, F16C, false>(dy + t, y.at(t), xs, len, db, yb, gb);
    A a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < len; ++i) {
      a += g[i];
      b += g[i] * (xs[i] - mean);
    }
    sg += a;
    sgx += b;
  }
  out[0] = sg;
  out[1] = sgx;
}

// Per-channel sums over `rows` rows, written as sum_g[C], sum_gxm[C]; `mean` has C entries. Chunked as stats_rows.
template <typename T, bool F16C>
FCK_HOST_DEVICE void backward_reduce_rows(const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, int64_t rows,
                                          int64_t C, const acc_t<T>* mean, double* sg_out, double* sgx_out) {
  using A = acc_t<T>;
  std::fill(sg_out, sg_out + C, 0.0);
  std::fill(sgx_out, sgx_out + C, 0.0);
  const int64_t tile_rows = std::max<int64_t>(1, kRowTileElems / C);
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t r1 = std::min(rows, r0 + tile_rows);
    for_chunks(C, [&](int64_t c0, auto width) {
      const int64_t w = width;
      alignas(64) A db[kCols], yb[kCols], gb[kCols], xb[kCols], m[kCols], a[kCols], b[kCols];
      for (int64_t c = 0; c < w; ++c) m[c] = mean[c0 + c], a[c] = b[c] = A(0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * C + c0;
        const A* xs = as_acc<T, F16C>(x + o, xb, w);
        const A* g = relu_masked<T, F16C, true>(dy + o, y.at(o).channel(c0), xs, w, db, yb, gb);
        for (int64_t c = 0; c < w; ++c) {
          a[c] += g[c];
          b[c] += g[c] * (xs[c] - m[c]);
        }
      }
      for (int64_t c = 0; c < w; ++c) {
        sg_out[c0 + c] += a[c];
        sgx_out[c0 + c] += b[c];
      }
    });
  }
}

template <typename T, bool F16C>
FCK_HOST_DEVICE void backward_run(const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, raw_t<T>* dx,
                                  raw_t<T>* dres, int64_t n, acc_t<T> mean, acc_t<T> k, acc_t<T> mean_g,
                                  acc_t<T> c) {
  using A = acc_t<T>;
  alignas(64) A db[kTile], yb[kTile], gb[kTile], xb[kTile], ob[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const A* xs = as_acc<T, F16C>(x + t, xb, len);
    const A* g = relu_masked<T, F16C, false>(dy + t, y.at(t), xs, len, db, yb, gb);
    A* o = out_buf<T>(dx + t, ob);
    for (int64_t i = 0; i < len; ++i) o[i] = bn_grad_input<A>(g[i], xs[i], mean, k, mean_g, c);
    store<T, F16C>(o, dx + t, len);
    if (dres) {
      if constexpr (std::is_same_v<raw_t<T>, acc_t<T>>) {
        std::memcpy(dres + t, g, len * sizeof(A));
      } else {
        narrow<T, F16C>(g, dres + t, len);
      }
    }
  }
}

// `coef` holds mean[C], k[C], mean_g[C], c[C].
template <typename T, bool F16C>
FCK_HOST_DEVICE void backward_rows(const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, raw_t<T>* dx,
                                   raw_t<T>* dres, int64_t rows, int64_t C, const acc_t<T>* coef) {
  using A = acc_t<T>;
  std::vector<A> scratch(5 * C);
  A *db = scratch.data(), *yb = db + C, *gb = yb + C, *xb = gb + C, *ob = xb + C;
  const A *mean = coef, *k = coef + C, *mean_g = coef + 2 * C, *cc = coef + 3 * C;
  for (int64_t r = 0; r < rows; ++r) {
    const A* xs = as_acc<T, F16C>(x + r * C, xb, C);
    const A* g = relu_masked<T, F16C, true>(dy + r * C, y.at(r * C), xs, C, db, yb, gb);
    A* o = out_buf<T>(dx + r * C, ob);
    for (int64_t c = 0; c < C; ++c) o[c] = bn_grad_input<A>(g[c], xs[c], mean[c], k[c], mean_g[c], cc[c]);
    store<T, F16C>(o, dx + r * C, C);
    if (dres) {
      if constexpr (std::is_same_v<raw_t<T>, acc_t<T>>) {
        std::memcpy(dres + r * C, g, C * sizeof(A));
      } else {
        narrow<T, F16C>(g, dres + r * C, C);
      }
    }
  }
}

// Planes [p0, p1) (plane p = n C + c) of fewer than kSmallPlane values each: the forward's and the backward's
// elementwise pass, a whole range per call. One call per 49-value plane (7x7) spent as much on the call, its tile
// loop and the unit arithmetic as on the values. `coef` as forward_rows's (3 C) and backward_rows's (4 C).
template <typename T, bool F16C>
FCK_HOST_DEVICE void forward_planes(const raw_t<T>* x, const raw_t<T>* res, raw_t<T>* y, int64_t p0, int64_t p1,
                                    int64_t C, int64_t S, const acc_t<T>* coef, bool relu) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % C, o = p * S;
    forward_run<T, F16C>(x + o, res ? res + o : nullptr, y + o, S, coef[c], coef[C + c], coef[2 * C + c], relu);
  }
}

template <typename T, bool F16C>
FCK_HOST_DEVICE void backward_planes(const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, raw_t<T>* dx, raw_t<T>* dres,
                                     int64_t p0, int64_t p1, int64_t C, int64_t S, const acc_t<T>* coef) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % C, o = p * S;
    backward_run<T, F16C>(dy + o, x + o, y.at(o).channel(c), dx + o, dres ? dres + o : nullptr, S, coef[c],
                          coef[C + c], coef[2 * C + c], coef[3 * C + c]);
  }
}

// Every worker compiled twice; `Workers<T>::get()` hands out the AVX2 set when the CPU runs it.
#define FCK_BN_WORKERS(X)                                                                                           \
  X(stats_run, (const raw_t<T>* x, int64_t n, acc_t<T> pivot, double* out), (x, n, pivot, out))                  \
  X(stats_rows, (const raw_t<T>* x, int64_t rows, int64_t C, const acc_t<T>* pivot, double* m, double* q),       \
    (x, rows, C, pivot, m, q))                                                                                     \
  X(small_planes_stats,                                                                                            \
    (const raw_t<T>* x, int64_t n0, int64_t n1, int64_t C, int64_t S, int64_t c0, int64_t nc,                     \
     const acc_t<T>* pivot, double* st),                                                                           \
    (x, n0, n1, C, S, c0, nc, pivot, st))                                                                          \
  X(small_planes_reduce,                                                                                           \
    (const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, int64_t n0, int64_t n1, int64_t C, int64_t S,             \
     int64_t c0, int64_t nc, const acc_t<T>* mean, double* sums),                                                  \
    (dy, x, y, n0, n1, C, S, c0, nc, mean, sums))                                                                  \
  X(forward_run,                                                                                                   \
    (const raw_t<T>* x, const raw_t<T>* res, raw_t<T>* y, int64_t n, acc_t<T> mean, acc_t<T> k, acc_t<T> beta,  \
     bool relu),                                                                                                   \
    (x, res, y, n, mean, k, beta, relu))                                                                           \
  X(forward_rows,                                                                                                  \
    (const raw_t<T>* x, const raw_t<T>* res, raw_t<T>* y, int64_t rows, int64_t C, const acc_t<T>* coef,         \
     bool relu),                                                                                                   \
    (x, res, y, rows, C, coef, relu))                                                                              \
  X(backward_reduce_run,                                                                                           \
    (const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, int64_t n, acc_t<T> mean, double* out),                   \
    (dy, x, y, n, mean, out))                                                                                      \
  X(backward_reduce_rows,                                                                                          \
    (const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, int64_t rows, int64_t C, const acc_t<T>* mean,            \
     double* a, double* b),                                                                                        \
    (dy, x, y, rows, C, mean, a, b))                                                                               \
  X(backward_run,                                                                                                  \
    (const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, raw_t<T>* dx, raw_t<T>* dres, int64_t n,                  \
     acc_t<T> mean, acc_t<T> k, acc_t<T> mean_g, acc_t<T> c),                                                      \
    (dy, x, y, dx, dres, n, mean, k, mean_g, c))                                                                   \
  X(backward_rows,                                                                                                 \
    (const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, raw_t<T>* dx, raw_t<T>* dres, int64_t rows,               \
     int64_t C, const acc_t<T>* coef),                                                                             \
    (dy, x, y, dx, dres, rows, C, coef))                                                                           \
  X(forward_planes,                                                                                                \
    (const raw_t<T>* x, const raw_t<T>* res, raw_t<T>* y, int64_t p0, int64_t p1, int64_t C, int64_t S,          \
     const acc_t<T>* coef, bool relu),                                                                             \
    (x, res, y, p0, p1, C, S, coef, relu))                                                                         \
  X(backward_planes,                                                                                               \
    (const raw_t<T>* dy, const raw_t<T>* x, Mask<T> y, raw_t<T>* dx, raw_t<T>* dres, int64_t p0, int64_t p1,     \
     int64_t C, int64_t S, const acc_t<T>* coef),                                                                  \
    (dy, x, y, dx, dres, p0, p1, C, S, coef))

#ifdef FCK_HAVE_AVX2_CLONE
#define FCK_BN_AVX2(name, params, args) \
  template <typename T>                 \
  __attribute__((target("avx2,fma,f16c"))) void name##_avx2 params { name<T, true> args; }
FCK_BN_WORKERS(FCK_BN_AVX2)
#endif
#define FCK_BN_BASE(name, params, args) \
  template <typename T>                 \
  void name##_base params { name<T, false> args; }
FCK_BN_WORKERS(FCK_BN_BASE)

template <typename T>
struct Workers {
#define FCK_BN_FIELD(name, params, args) decltype(&name##_base<T>) name;
  FCK_BN_WORKERS(FCK_BN_FIELD)
  static Workers get() {
#ifdef FCK_HAVE_AVX2_CLONE
#define FCK_BN_PICK_AVX2(name, params, args) &name##_avx2<T>,
    if (cpu_runs_avx2_clone()) return {FCK_BN_WORKERS(FCK_BN_PICK_AVX2)};
#endif
#define FCK_BN_PICK_BASE(name, params, args) &name##_base<T>,
    return {FCK_BN_WORKERS(FCK_BN_PICK_BASE)};
  }
};

template <typename T>
const raw_t<T>* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const raw_t<T>*>(t.data_ptr()) : nullptr;
}
template <typename T>
raw_t<T>* mptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<raw_t<T>*>(t.data_ptr()) : nullptr;
}

// Per-channel values as a double vector (missing -> `fill`).
// Per-channel parameters and running statistics are read and written with plain loops for fp32/fp64 (their usual
// dtypes): the tensor-op round trip (to(kDouble), copy_) cost ~25 us per call, more than a small batch's whole
// normalization.
std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!has(t)) return v;
  const at::Tensor& s = *t;
  if (s.is_contiguous() && s.scalar_type() == at::kFloat) {
    const float* p = s.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) v[c] = p[c];
  } else if (s.is_contiguous() && s.scalar_type() == at::kDouble) {
    std::copy(s.data_ptr<double>(), s.data_ptr<double>() + C, v.begin());
  } else {
    const at::Tensor d = s.detach().to(at::kDouble).contiguous();
    std::copy(d.data_ptr<double>(), d.data_ptr<double>() + C, v.begin());
  }
  return v;
}

void write_channels(at::Tensor& dst, const std::vector<double>& v) {
  const int64_t C = static_cast<int64_t>(v.size());
  if (dst.is_contiguous() && dst.scalar_type() == at::kFloat) {
    float* p = dst.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<float>(v[c]);
  } else if (dst.is_contiguous() && dst.scalar_type() == at::kDouble) {
    std::copy(v.begin(), v.end(), dst.data_ptr<double>());
  } else {
    dst.copy_(at::from_blob(const_cast<double*>(v.data()), {C}, at::kDouble));
  }
}

// Number of units a planar plane is cut into, and the unit -> (plane, offset, length) map.
struct PlanarUnits {
  int64_t S, per_plane, total;
  PlanarUnits(const BnLayout& L) : S(L.S), per_plane((L.S + kRun - 1) / kRun), total(L.N * L.C * per_plane) {}
  int64_t plane(int64_t u) const { return u / per_plane; }
  int64_t offset(int64_t u) const { return plane(u) * S + (u % per_plane) * kRun; }
  int64_t length(int64_t u) const { return std::min(kRun, S - (u % per_plane) * kRun); }
};

// Blocks of about kBlockElems, their count rounded up to a multiple of 8 so 1, 2, 4 or 8 threads get the same rows
// each (the tabular 4096 x 200 came out as 13 blocks: one of two threads took 7, and every pass waited on it). Not
// from the thread count: the blocks fix the order of the sums, and the bits must not depend on the machine. An
// input of one block stays one (a single block runs on the calling thread; waking the pool for a 64 x 64 batch
// norm cost ~10 us a pass).
struct RowBlocks {
  int64_t rows, per_block, total;
  RowBlocks(const BnLayout& L) : rows(L.rows()) {
    int64_t blocks = (L.rows() * std::max<int64_t>(L.C, 1) + kBlockElems - 1) / kBlockElems;
    if (blocks > 1) blocks = std::min(rows, (blocks + 7) / 8 * 8);
    per_block = std::max<int64_t>(1, (rows + blocks - 1) / blocks);
    total = (rows + per_block - 1) / per_block;
  }
  int64_t first(int64_t b) const { return b * per_block; }
  int64_t count(int64_t b) const { return std::min(per_block, rows - b * per_block); }
};

// A training step's planar tensors are read twice (statistics, then normalize; the backward's two sums, then its
// gradient). When a few channels' planes fit in cache, the work is taken a group of channels at a time and the
// second pass reads them from cache, not memory. A group is several channels where they are small, so each plane
// row read is G * S contiguous values. Its size counts every tensor its passes touch (`tensors`): half the core's L2
// when one channel fits there, else a quarter of the thread's share of the largest cache. The L3 rule was found on
// a host with a 32 MB L3 slice (fwd+bwd, N = 64, 2 threads, against the whole-tensor passes: 56x56 -16%, 28x28
// -14%, 14x14 -3%, 7x7 even). The L2 rule on a Xeon whose sysfs L3 (480 MB) behaves like ~32-64 MB, once small
// planes no longer paid per-plane reductions (separate processes, two rounds, us, L3 rule -> L2 rule): 7x7 fwd
// 677/584 -> 686/609, bwd 934/845 -> 814/784; 14x14 fwd 955/857 -> 798/835, bwd 1611/1715 -> 1228/1312; 28x28 fwd
// 1738/1752 -> 1389/1385, bwd 3824/3888 -> 3477/3612. A quarter of the L2 was no better at 14x14 and 28x28.
// Returns the group's channel count, or 0 to take the whole-tensor passes.
int64_t channel_group(const BnLayout& L, int64_t tensors, int64_t elem) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t channel_bytes = tensors * L.N * L.S * elem, l2 = cpu_l2_bytes() / 2;
  const int64_t budget = channel_bytes <= l2 ? l2 : cpu_cache_bytes() / threads / 4;
  if (!L.planar || L.C < 2 * threads || channel_bytes > budget) return 0;
  return std::max<int64_t>(1, std::min(budget / channel_bytes, L.C / (2 * threads)));
}

// Calls f(u, c) for the planar units of channels [c0, c1): plane n = 0, 1, ..., then channel, then the plane's
// runs. Each channel's units come in the order in which the whole-tensor passes merge them, so either path gives
// the same bits.
template <typename F>
void for_group_units(const PlanarUnits& U, const BnLayout& L, int64_t c0, int64_t c1, F&& f) {
  for (int64_t n = 0; n < L.N; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t k = 0; k < U.per_plane; ++k) f((n * L.C + c) * U.per_plane + k, c);
    }
  }
}

// Small planes (L.S < kSmallPlane): the statistics of channels [c0, c1) into st (count, mean, M2 per channel from
// c0, zeroed by the caller), pivot indexed from c0; and the backward's sums into sums (two per channel from c0).
template <typename T>
void small_stats_channels(const Workers<T>& w, const raw_t<T>* xp, const BnLayout& L, int64_t c0, int64_t c1,
                          const acc_t<T>* pivot, double* st) {
  const int64_t tile = planes_per_tile(L.S);
  for (int64_t s0 = c0; s0 < c1; s0 += kSub) {
    for (int64_t n0 = 0; n0 < L.N; n0 += tile) {
      w.small_planes_stats(xp, n0, std::min(L.N, n0 + tile), L.C, L.S, s0, std::min(kSub, c1 - s0),
                           pivot + (s0 - c0), st + 3 * (s0 - c0));
    }
  }
}

template <typename T>
void small_reduce_channels(const Workers<T>& w, const raw_t<T>* dyp, const raw_t<T>* xp, const Mask<T>& yp,
                           const BnLayout& L, int64_t c0, int64_t c1, const acc_t<T>* mean, double* sums) {
  const int64_t tile = planes_per_tile(L.S);
  for (int64_t s0 = c0; s0 < c1; s0 += kSub) {
    for (int64_t n0 = 0; n0 < L.N; n0 += tile) {
      w.small_planes_reduce(dyp, xp, yp.channel(s0), n0, std::min(L.N, n0 + tile), L.C, L.S, s0,
                            std::min(kSub, c1 - s0), mean + (s0 - c0), sums + 2 * (s0 - c0));
    }
  }
}

// The whole-tensor small-plane passes (few channels, or channels too large for groups): every (sub-group, tile) is
// a unit of its own, run in parallel into its own slots; then each channel takes its tiles in order. Merging a
// tile into an empty state gives the tile's own values, so these are the operations of one sub-group walking its
// tiles, in the same order: the grouped passes' bits. (Units of whole sub-groups left channels that fit one
// sub-group, two or three at a batch norm's start, on one thread.)
template <typename T>
void small_stats_all(const Workers<T>& w, const raw_t<T>* xp, const BnLayout& L, const acc_t<T>* pivot, double* st) {
  const int64_t tile = planes_per_tile(L.S), tiles = (L.N + tile - 1) / tile, subs = (L.C + kSub - 1) / kSub;
  std::vector<double> part(3 * L.C * tiles, 0.0);  // [tile][channel][count, mean, M2]
  at::parallel_for(0, subs * tiles, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t s0 = u / tiles * kSub, n0 = u % tiles * tile;
      w.small_planes_stats(xp, n0, std::min(L.N, n0 + tile), L.C, L.S, s0, std::min(kSub, L.C - s0), pivot + s0,
                           &part[3 * (u % tiles * L.C + s0)]);
    }
  });
  for (int64_t c = 0; c < L.C; ++c) {
    for (int64_t k = 0; k < tiles; ++k) {
      const double* p = &part[3 * (k * L.C + c)];
      welford_merge<double>(st[3 * c], st[3 * c + 1], st[3 * c + 2], p[0], p[1], p[2]);
    }
  }
}

template <typename T>
void small_reduce_all(const Workers<T>& w, const raw_t<T>* dyp, const raw_t<T>* xp, const Mask<T>& yp,
                      const BnLayout& L, const acc_t<T>* mean, double* sums) {
  const int64_t tile = planes_per_tile(L.S), tiles = (L.N + tile - 1) / tile, subs = (L.C + kSub - 1) / kSub;
  std::vector<double> part(2 * L.C * tiles, 0.0);  // [tile][channel][sum g, sum g (x - mean)]
  at::parallel_for(0, subs * tiles, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t s0 = u / tiles * kSub, n0 = u % tiles * tile;
      w.small_planes_reduce(dyp, xp, yp.channel(s0), n0, std::min(L.N, n0 + tile), L.C, L.S, s0,
                            std::min(kSub, L.C - s0), mean + s0, &part[2 * (u % tiles * L.C + s0)]);
    }
  });
  for (int64_t c = 0; c < L.C; ++c) {
    for (int64_t k = 0; k < tiles; ++k) {
      sums[2 * c] += part[2 * (k * L.C + c)];
      sums[2 * c + 1] += part[2 * (k * L.C + c) + 1];
    }
  }
}

// Batch mean and biased variance per channel.
template <typename T>
void batch_stats(const at::Tensor& x, const BnLayout& L, const Workers<T>& w, std::vector<double>& mean,
                 std::vector<double>& var) {
  using A = acc_t<T>;
  const int64_t C = L.C;
  const raw_t<T>* xp = cptr<T>(x);
  std::vector<A> pivot(C);  // each channel's first element (n = 0, s = 0)
  for (int64_t c = 0; c < C; ++c) pivot[c] = Storage<T>::load(xp[L.planar ? c * L.S : c]);
  std::vector<double> n(C, 0.0), m(C, 0.0), q(C, 0.0);
  if (L.planar && L.S < kSmallPlane) {
    std::vector<double> st(3 * C, 0.0);
    small_stats_all<T>(w, xp, L, pivot.data(), st.data());
    for (int64_t c = 0; c < C; ++c) n[c] = st[3 * c], m[c] = st[3 * c + 1], q[c] = st[3 * c + 2];
  } else if (L.planar) {
    const PlanarUnits U(L);
    std::vector<double> part(3 * U.total);
    at::parallel_for(0, U.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        w.stats_run(xp + U.offset(u), U.length(u), pivot[U.plane(u) % C], &part[3 * u]);
      }
    });
    for (int64_t u = 0; u < U.total; ++u) {
      const int64_t c = U.plane(u) % C;
      welford_merge<double>(n[c], m[c], q[c], part[3 * u], part[3 * u + 1], part[3 * u + 2]);
    }
  } else {
    const RowBlocks B(L);
    std::vector<double> pm(B.total * C), pq(B.total * C);
    at::parallel_for(0, B.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        w.stats_rows(xp + B.first(b) * C, B.count(b), C, pivot.data(), &pm[b * C], &pq[b * C]);
      }
    });
    for (int64_t b = 0; b < B.total; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        welford_merge<double>(n[c], m[c], q[c], double(B.count(b)), pm[b * C + c], pq[b * C + c]);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = double(pivot[c]) + m[c];
    var[c] = q[c] / n[c];
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& res,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const std::optional<at::Tensor>& running_mean,
                                                       const std::optional<at::Tensor>& running_var, bool training,
                                                       double momentum, double eps, bool relu, const BnLayout& L) {
  using A = acc_t<T>;
  const int64_t C = L.C;
  const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  at::Tensor y = pooled_empty_like(x);
  const Workers<T> w = Workers<T>::get();
  std::vector<double> mean(C), var(C);
  const std::vector<double> gamma = channel_values(weight, C, 1), beta = channel_values(bias, C, 0);
  std::vector<A> coef(3 * C);
  std::vector<double> invstd(C);
  const auto set_coef = [&](int64_t c) {
    invstd[c] = bn_invstd<double>(var[c], eps);
    coef[c] = A(mean[c]);
    coef[C + c] = forward_k<A>(gamma[c], invstd[c]);
    coef[2 * C + c] = A(beta[c]);
  };
  const raw_t<T>*xp = cptr<T>(x), *rp = cptr<T>(res);
  raw_t<T>* yp = mptr<T>(y);
  const int64_t group = training ? channel_group(L, rp ? 3 : 2, sizeof(raw_t<T>)) : 0;
  const bool grouped = group > 0;
  if (grouped) {
    const PlanarUnits U(L);
    at::parallel_for(0, (C + group - 1) / group, 1, [&](int64_t g0, int64_t g1) {
      std::vector<double> st(3 * group);
      std::vector<A> pivot(group);
      for (int64_t c0 = g0 * group; c0 < std::min(C, g1 * group); c0 += group) {
        const int64_t c1 = std::min(C, c0 + group);
        std::fill(st.begin(), st.end(), 0.0);
        for (int64_t c = c0; c < c1; ++c) pivot[c - c0] = Storage<T>::load(xp[c * L.S]);
        if (L.S < kSmallPlane) {
          small_stats_channels<T>(w, xp, L, c0, c1, pivot.data(), st.data());
        } else {
          for_group_units(U, L, c0, c1, [&](int64_t u, int64_t c) {
            double part[3];
            w.stats_run(xp + U.offset(u), U.length(u), pivot[c - c0], part);
            double* t = &st[3 * (c - c0)];
            welford_merge<double>(t[0], t[1], t[2], part[0], part[1], part[2]);
          });
        }
        for (int64_t c = c0; c < c1; ++c) {
          const double* t = &st[3 * (c - c0)];
          mean[c] = double(pivot[c - c0]) + t[1];
          var[c] = t[2] / t[0];
          set_coef(c);
        }
        if (L.S < kSmallPlane) {
          for (int64_t n = 0; n < L.N; ++n) {
            w.forward_planes(xp, rp, yp, n * C + c0, n * C + c1, C, L.S, coef.data(), relu);
          }
        } else {
          for_group_units(U, L, c0, c1, [&](int64_t u, int64_t c) {
            const int64_t o = U.offset(u);
            w.forward_run(xp + o, rp ? rp + o : nullptr, yp + o, U.length(u), coef[c], coef[C + c],
                          coef[2 * C + c], relu);
          });
        }
      }
    });
  } else if (training) {
    batch_stats<T>(x, L, w, mean, var);
  } else {
    mean = channel_values(running_mean, C, 0);
    var = channel_values(running_var, C, 1);
  }
  if (training) {
    if (has(running_mean)) {
      std::vector<double> rm = channel_values(running_mean, C, 0), rv = channel_values(running_var, C, 1);
      const double unbias = double(L.count()) / double(L.count() - 1);
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = bn_running<double>(rm[c], mean[c], momentum);
        rv[c] = bn_running<double>(rv[c], var[c] * unbias, momentum);
      }
      at::Tensor rmt = *running_mean, rvt = *running_var;
      write_channels(rmt, rm);
      write_channels(rvt, rv);
    }
  }
  if (!grouped && L.planar && L.S < kSmallPlane) {
    for (int64_t c = 0; c < C; ++c) set_coef(c);
    at::parallel_for(0, L.N * C, 1, [&](int64_t lo, int64_t hi) {
      w.forward_planes(xp, rp, yp, lo, hi, C, L.S, coef.data(), relu);
    });
  } else if (!grouped && L.planar) {
    for (int64_t c = 0; c < C; ++c) set_coef(c);
    const PlanarUnits U(L);
    at::parallel_for(0, U.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t c = U.plane(u) % C, o = U.offset(u);
        w.forward_run(xp + o, rp ? rp + o : nullptr, yp + o, U.length(u), coef[c], coef[C + c], coef[2 * C + c],
                      relu);
      }
    });
  } else if (!grouped) {
    for (int64_t c = 0; c < C; ++c) set_coef(c);
    const RowBlocks B(L);
    // Each thread walks its blocks last to first, so the rows the statistics read last are still in its L2 (the
    // same static split of B.total gives each thread the same blocks in both passes). The backward's gradient pass
    // too: at 4096 x 200 a thread's dy, x and y are 4.8 MB against a 2 MB L2, and its op went 440-472 -> 389-411 us.
    at::parallel_for(0, B.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = hi - 1; b >= lo; --b) {
        const int64_t o = B.first(b) * C;
        w.forward_rows(xp + o, rp ? rp + o : nullptr, yp + o, B.count(b), C, coef.data(), relu);
      }
    });
  }
  at::Tensor save_mean = at::empty({C}, x.options().dtype(acc)), save_invstd = at::empty_like(save_mean);
  write_channels(save_mean, mean);
  write_channels(save_invstd, invstd);
  return {y, save_mean, save_invstd};
}

// The ReLU mask's source for the backward: the output y, or, when the caller says the forward had no residual
// (mask_from_input), the forward's coefficients (forward_coef's k, from the saved invstd) for x. Only where the
// output is stored in the accumulation type: a half-precision y is a rounded pre-activation, whose mask could
// differ from the unrounded one's in the last subnormal.
template <typename T>
struct MaskSource {
  std::vector<acc_t<T>> mean, k, beta;
  Mask<T> mask;
  MaskSource(const at::Tensor& y, bool from_input, bool training, const std::vector<double>& m,
             const std::vector<double>& invstd, const std::vector<double>& gamma,
             const std::optional<at::Tensor>& bias) {
    if (from_input && training && y.defined() && std::is_same_v<raw_t<T>, acc_t<T>>) {
      const int64_t C = int64_t(m.size());
      const std::vector<double> b = channel_values(bias, C, 0);
      for (int64_t c = 0; c < C; ++c) {
        mean.push_back(acc_t<T>(m[c]));
        k.push_back(forward_k<acc_t<T>>(gamma[c], invstd[c]));
        beta.push_back(acc_t<T>(b[c]));
      }
      mask = Mask<T>{nullptr, mean.data(), k.data(), beta.data()};
    } else {
      mask = Mask<T>{cptr<T>(y)};
    }
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, bool residual_grad, bool mask_from_input, const BnLayout& L) {
  using A = acc_t<T>;
  const int64_t C = L.C;
  const Workers<T> w = Workers<T>::get();
  const std::vector<double> mean = channel_values(save_mean, C, 0), invstd = channel_values(save_invstd, C, 1),
                            gamma = channel_values(weight, C, 1);
  std::vector<A> mean_a(mean.begin(), mean.end());
  const MaskSource<T> source(y, mask_from_input, training, mean, invstd, gamma, bias);
  const Mask<T>& mask = source.mask;
  const raw_t<T>*dyp = cptr<T>(dy), *xp = cptr<T>(x), *yp = mask.y;
  at::Tensor dx = pooled_empty_like(x);
  at::Tensor dres = residual_grad ? pooled_empty_like(x) : at::empty({0}, x.options());
  raw_t<T>*dxp = mptr<T>(dx), *drp = residual_grad ? mptr<T>(dres) : nullptr;
  std::vector<double> sg(C, 0.0), sgx(C, 0.0), sums(L.planar && L.S < kSmallPlane ? 2 * C : 0, 0.0);
  std::vector<A> coef(4 * C);
  std::vector<double> dweight(C), dbias(C);
  const auto set_coef = [&](int64_t c) {
    const BnBackwardCoef<double> k =
        bn_backward_coef<double>(training, double(L.count()), sg[c], sgx[c], invstd[c], gamma[c]);
    coef[c] = A(mean[c]);
    coef[C + c] = A(k.k);
    coef[2 * C + c] = A(k.mean_g);
    coef[3 * C + c] = A(k.c);
    dweight[c] = k.dweight;
    dbias[c] = k.dbias;
  };
  const auto apply_unit = [&](const PlanarUnits& U, int64_t u, int64_t c) {
    const int64_t o = U.offset(u);
    w.backward_run(dyp + o, xp + o, mask.at(o).channel(c), dxp + o, drp ? drp + o : nullptr, U.length(u), coef[c],
                   coef[C + c], coef[2 * C + c], coef[3 * C + c]);
  };
  if (const int64_t group = channel_group(L, (yp ? 4 : 3) + (drp ? 1 : 0), sizeof(raw_t<T>))) {
    const PlanarUnits U(L);
    at::parallel_for(0, (C + group - 1) / group, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t c0 = g0 * group; c0 < std::min(C, g1 * group); c0 += group) {
        const int64_t c1 = std::min(C, c0 + group);
        if (L.S < kSmallPlane) {
          small_reduce_channels<T>(w, dyp, xp, mask, L, c0, c1, mean_a.data() + c0, &sums[2 * c0]);
          for (int64_t c = c0; c < c1; ++c) sg[c] = sums[2 * c], sgx[c] = sums[2 * c + 1];
        } else {
          for_group_units(U, L, c0, c1, [&](int64_t u, int64_t c) {
            const int64_t o = U.offset(u);
            double part[2];
            w.backward_reduce_run(dyp + o, xp + o, mask.at(o).channel(c), U.length(u), mean_a[c], part);
            sg[c] += part[0];
            sgx[c] += part[1];
          });
        }
        for (int64_t c = c0; c < c1; ++c) set_coef(c);
        if (L.S < kSmallPlane) {
          for (int64_t n = 0; n < L.N; ++n) {
            w.backward_planes(dyp, xp, mask, dxp, drp, n * C + c0, n * C + c1, C, L.S, coef.data());
          }
        } else {
          for_group_units(U, L, c0, c1, [&](int64_t u, int64_t c) { apply_unit(U, u, c); });
        }
      }
    });
  } else if (L.planar && L.S < kSmallPlane) {
    small_reduce_all<T>(w, dyp, xp, mask, L, mean_a.data(), sums.data());
    for (int64_t c = 0; c < C; ++c) sg[c] = sums[2 * c], sgx[c] = sums[2 * c + 1];
    for (int64_t c = 0; c < C; ++c) set_coef(c);
    at::parallel_for(0, L.N * C, 1, [&](int64_t lo, int64_t hi) {
      w.backward_planes(dyp, xp, mask, dxp, drp, lo, hi, C, L.S, coef.data());
    });
  } else if (L.planar) {
    const PlanarUnits U(L);
    std::vector<double> part(2 * U.total);
    at::parallel_for(0, U.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t o = U.offset(u);
        const int64_t c = U.plane(u) % C;
        w.backward_reduce_run(dyp + o, xp + o, mask.at(o).channel(c), U.length(u), mean_a[c], &part[2 * u]);
      }
    });
    for (int64_t u = 0; u < U.total; ++u) {
      const int64_t c = U.plane(u) % C;
      sg[c] += part[2 * u];
      sgx[c] += part[2 * u + 1];
    }
    for (int64_t c = 0; c < C; ++c) set_coef(c);
    at::parallel_for(0, U.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) apply_unit(U, u, U.plane(u) % C);
    });
  } else {
    const RowBlocks B(L);
    std::vector<double> pa(B.total * C), pb(B.total * C);
    at::parallel_for(0, B.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t o = B.first(b) * C;
        w.backward_reduce_rows(dyp + o, xp + o, mask.at(o), B.count(b), C, mean_a.data(), &pa[b * C],
                               &pb[b * C]);
      }
    });
    for (int64_t b = 0; b < B.total; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        sg[c] += pa[b * C + c];
        sgx[c] += pb[b * C + c];
      }
    }
    for (int64_t c = 0; c < C; ++c) set_coef(c);
    at::parallel_for(0, B.total, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = hi - 1; b >= lo; --b) {  // last to first, as the forward's second pass
        const int64_t o = B.first(b) * C;
        w.backward_rows(dyp + o, xp + o, mask.at(o), dxp + o, drp ? drp + o : nullptr, B.count(b), C,
                        coef.data());
      }
    });
  }
  const auto acc = save_mean.scalar_type();
  at::Tensor dw = at::empty({C}, x.options().dtype(acc)), db = at::empty_like(dw);
  write_channels(dw, dweight);
  write_channels(db, dbias);
  return {dx, dres, dw, db};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(FCK_BATCH_NORM_FWD_ARGS) {
  const std::optional<at::Tensor> residual = like_input(input, residual_in);
  const BnLayout L = check_batch_norm_fwd(input, residual, weight, bias, running_mean, running_var, training);
  TORCH_CHECK(input.device().is_cpu(), "fck::batch_norm_fwd (cpu): input must be a CPU tensor");
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (input.numel() == 0) {  // torch's behaviour: empty output, running statistics untouched
    at::Tensor zeros = at::zeros({L.C}, input.options().dtype(acc));
    return {at::empty_like(input), zeros, zeros.clone()};
  }
  if (training && env_on("FCK_BN_FUSED_EMULATE") && bn_fused::applies(input, L)) {  // CUDA's kernel, for the tests
    return bn_fused::forward(input, residual, weight, bias, running_mean, running_var, momentum, eps, relu, L,
                             pooled_empty_like(input), [](int b, int t, const auto& body) { emulate_blocks(b, t, body); });
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    out = forward<T>(input, has(residual) ? *residual : at::Tensor(), weight, bias, running_mean, running_var,
                     training, momentum, eps, relu, L);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(FCK_BATCH_NORM_BWD_ARGS) {
  const at::Tensor grad_output = like_input(input, grad_output_in);
  const std::optional<at::Tensor> output = like_input(input, output_in);
  const BnLayout L = check_batch_norm_bwd(grad_output, input, output, weight, save_mean, save_invstd, relu);
  TORCH_CHECK(input.device().is_cpu(), "fck::batch_norm_bwd (cpu): input must be a CPU tensor");
  if (input.numel() == 0) {
    at::Tensor zeros = at::zeros({L.C}, save_mean.options());
    return {at::empty_like(input), residual_grad ? at::empty_like(input) : at::empty({0}, input.options()), zeros,
            zeros.clone()};
  }
  if (env_on("FCK_BN_FUSED_EMULATE") && bn_fused::applies(input, L)) {
    return bn_fused::backward(grad_output, input, relu ? output : std::nullopt, weight, save_mean, save_invstd,
                              training, L, pooled_empty_like(input),
                              residual_grad ? pooled_empty_like(input) : at::empty({0}, input.options()),
                              [](int b, int t, const auto& body) { emulate_blocks(b, t, body); });
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    out = backward<T>(grad_output, input, relu ? *output : at::Tensor(), weight, bias, save_mean, save_invstd,
                      training, residual_grad, mask_from_input, L);
  });
  return out;
}

}  // namespace cpu
}  // namespace fck
