// Embedding bags on the CPU, forward and backward.
//
// Forward: bags are split across threads; each bag reduces its rows into an fp32 (fp64) accumulator of `dim` values
// and writes its output row once. Backward (dense, sum/mean): the occurrences are grouped by row with a counting
// sort (O(indices + rows), no comparison sort), then each gradient row is written once. No atomics, and each row's
// sum is taken in index order whatever the thread count, so the gradient is deterministic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <cstring>
#include <limits>
#include <cmath>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fck/block_launch.h"
#include "fck/cpu_pool.h"
#include "fck/cpu_vec.h"
#include "fck/embedding_bag.h"
#include "fck/embedding_bag_rows.h"
#include "fck/embedding_bag_host.h"
#include "fck/ops.h"

namespace fck {
namespace cpu {
namespace {

template <typename T>
const raw_t<T>* rows_of(const at::Tensor& t) {
  return reinterpret_cast<const raw_t<T>*>(t.data_ptr());
}

// Row `r` of a [*, dim] storage as accumulation-type values (widened into `buf` for fp16/bf16).
template <typename T>
const acc_t<T>* row_acc(const raw_t<T>* base, int64_t r, int64_t dim, acc_t<T>* buf) {
  const raw_t<T>* row = base + r * dim;
  if constexpr (std::is_same_v<raw_t<T>, acc_t<T>>) {
    return row;
  } else {
    widen<T, false>(row, buf, dim);
    return buf;
  }
}

// Rows are gathered at random from a table far larger than the caches: the hardware prefetcher cannot guess the
// next row, so each loop asks for the row kPrefetch indices ahead (every cache line of it) while summing this one.
// Without it the forward ran 3.4x slower than torch's FBGEMM-backed kernel on a 60k x 400 table.
constexpr int64_t kPrefetch = 8;
// A plain lookup copies each row in a few ns, so it asks further ahead to cover a memory access.
constexpr int64_t kPrefetchCopy = 24;

template <typename T, typename I>
inline void prefetch_row(const raw_t<T>* w, const I* idx, int64_t i, int64_t end, int64_t dim,
                         int64_t ahead = kPrefetch) {
  if (i + ahead >= end) return;
  const char* row = reinterpret_cast<const char*>(w + int64_t(idx[i + ahead]) * dim);
  for (int64_t byte = 0; byte < dim * int64_t(sizeof(raw_t<T>)); byte += 64) __builtin_prefetch(row + byte);
}

// acc += row * s over a row: the inner loop of every sum. With `next` (a row of `next_bytes` bytes, `elem` bytes a
// value), its lines are prefetched a few at a time as the loop goes: a burst of a whole row's prefetches (25 lines
// for 400 floats) overflowed the core's miss buffers and many were lost (a standalone 60k x 400 gather: 8.9 GB/s
// with bursts, 12.2 spread out; torch's 14.8). Compiled for AVX2 as well, picked at run time.
inline __attribute__((always_inline)) void prefetch_lines(const char* next, int64_t from, int64_t to) {
  if (next) {
    for (int64_t byte = from; byte < to; byte += 64) __builtin_prefetch(next + byte);
  }
}

// The lines of `next` that pair with values [d, e) of an n-value row.
inline int64_t lines_to(int64_t e, int64_t n, int64_t next_bytes, int64_t elem) {
  return e == n ? next_bytes : std::min(next_bytes, e * elem);
}

constexpr int64_t kBlock = 64;  // values per block: a few prefetches, then a loop GCC vectorizes (with a constant
                                // 16-value trip count it unrolled the loop first and left it scalar)

template <typename A>
inline __attribute__((always_inline)) void axpy_body(A* __restrict acc, const A* __restrict row, A s, int64_t n,
                                                     const char* next, int64_t next_bytes, int64_t elem) {
  for (int64_t d = 0; d < n; d += kBlock) {
    const int64_t e = std::min(n, d + kBlock);
    prefetch_lines(next, d * elem, lines_to(e, n, next_bytes, elem));
    for (int64_t j = d; j < e; ++j) acc[j] += row[j] * s;
  }
}

// Two rows per pass over the accumulator: twice the loads in flight per instruction stream and half the
// accumulator traffic (a standalone gather: 12.2 -> 12.7 GB/s in a quiet run, 8.9 -> 11.1 in a busy one).
template <typename A>
inline __attribute__((always_inline)) void axpy2_body(A* __restrict acc, const A* __restrict r1, A s1,
                                                      const A* __restrict r2, A s2, int64_t n, const char* next1,
                                                      const char* next2, int64_t next_bytes, int64_t elem) {
  for (int64_t d = 0; d < n; d += kBlock) {
    const int64_t e = std::min(n, d + kBlock), stop = lines_to(e, n, next_bytes, elem);
    prefetch_lines(next1, d * elem, stop);
    prefetch_lines(next2, d * elem, stop);
    for (int64_t j = d; j < e; ++j) acc[j] += r1[j] * s1 + r2[j] * s2;
  }
}

template <typename A>
void axpy_base(A* __restrict acc, const A* __restrict row, A s, int64_t n, const char* next, int64_t next_bytes,
               int64_t elem) {
  axpy_body(acc, row, s, n, next, next_bytes, elem);
}
template <typename A>
void axpy2_base(A* __restrict acc, const A* __restrict r1, A s1, const A* __restrict r2, A s2, int64_t n,
                const char* next1, const char* next2, int64_t next_bytes, int64_t elem) {
  axpy2_body(acc, r1, s1, r2, s2, n, next1, next2, next_bytes, elem);
}
#ifdef FCK_HAVE_AVX2_CLONE
template <typename A>
__attribute__((target("avx2,fma"))) void axpy_avx2(A* __restrict acc, const A* __restrict row, A s, int64_t n,
                                                   const char* next, int64_t next_bytes, int64_t elem) {
  axpy_body(acc, row, s, n, next, next_bytes, elem);
}
template <typename A>
__attribute__((target("avx2,fma"))) void axpy2_avx2(A* __restrict acc, const A* __restrict r1, A s1,
                                                    const A* __restrict r2, A s2, int64_t n, const char* next1,
                                                    const char* next2, int64_t next_bytes, int64_t elem) {
  axpy2_body(acc, r1, s1, r2, s2, n, next1, next2, next_bytes, elem);
}
#endif

template <typename A>
using Axpy = void (*)(A*, const A*, A, int64_t, const char*, int64_t, int64_t);
template <typename A>
using Axpy2 = void (*)(A*, const A*, A, const A*, A, int64_t, const char*, const char*, int64_t, int64_t);

template <typename A>
Axpy<A> pick_axpy() {
#ifdef FCK_HAVE_AVX2_CLONE
  if (cpu_runs_avx2_clone()) return &axpy_avx2<A>;
#endif
  return &axpy_base<A>;
}
template <typename A>
Axpy2<A> pick_axpy2() {
#ifdef FCK_HAVE_AVX2_CLONE
  if (cpu_runs_avx2_clone()) return &axpy2_avx2<A>;
#endif
  return &axpy2_base<A>;
}

// Below this many values a call runs on one thread: waking the pool costs more than the work.
constexpr int64_t kSerialWork = 1 << 15;

template <typename T, typename I>
void forward(const at::Tensor& weight, const I* idx, const I* off, int64_t n_bags, int64_t mode,
             const raw_t<T>* psw, int64_t pad, at::Tensor& out, at::Tensor& max_idx) {
  using A = acc_t<T>;
  const int64_t dim = weight.size(1);
  const raw_t<T>* w = rows_of<T>(weight);
  raw_t<T>* o = reinterpret_cast<raw_t<T>*>(out.data_ptr());
  int64_t* arg = mode == kBagMax ? max_idx.data_ptr<int64_t>() : nullptr;
  const Axpy<A> axpy = pick_axpy<A>();
  const Axpy2<A> axpy2 = pick_axpy2<A>();
  const int64_t elem = sizeof(raw_t<T>), row_bytes = dim * elem;
  const int64_t work = std::max<int64_t>(off[n_bags], n_bags) * dim;
  const int64_t grain = work < kSerialWork ? std::max<int64_t>(n_bags, 1) : 64;
  at::parallel_for(0, n_bags, grain, [&](int64_t b0, int64_t b1) {
    std::vector<A> acc(dim), buf(dim), buf2(dim);
    for (int64_t b = b0; b < b1; ++b) {
      if (off[b + 1] - off[b] == 1 && mode != kBagMax && !psw) {
        // A plain lookup (nn.Embedding, one index per bag): the sum or mean of one row is that row, bit for bit,
        // in every dtype, so copy it; the accumulate-and-scale path cost 4x torch's index_select here.
        prefetch_row<T, I>(w, idx, off[b], off[n_bags], dim, kPrefetchCopy);
        const int64_t r = idx[off[b]];
        if (r == pad) {
          std::memset(o + b * dim, 0, dim * sizeof(raw_t<T>));
        } else {
          std::memcpy(o + b * dim, w + r * dim, dim * sizeof(raw_t<T>));
        }
        continue;
      }
      std::fill(acc.begin(), acc.end(), mode == kBagMax ? -std::numeric_limits<A>::infinity() : A(0));
      int64_t* ab = arg ? arg + b * dim : nullptr;
      if (ab) std::fill(ab, ab + dim, int64_t(-1));
      int64_t count = 0;
      // sum/mean: a row waits here for the next one, and the two are added in one pass (axpy2)
      const A* held = nullptr;
      A held_s = 0;
      const char* held_next = nullptr;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        const int64_t r = idx[i];
        const bool ahead = i + kPrefetch < off[n_bags];
        if (mode == kBagMax || r == pad) prefetch_row<T, I>(w, idx, i, off[n_bags], dim);  // no axpy to spread them
        if (r == pad) continue;
        ++count;
        const A* row = row_acc<T>(w, r, dim, held ? buf2.data() : buf.data());
        if (mode == kBagMax) {
          for (int64_t d = 0; d < dim; ++d) {
            if (ab[d] < 0 || row[d] > acc[d]) {  // the first maximum wins, as torch's
              acc[d] = row[d];
              ab[d] = r;
            }
          }
        } else {
          const char* next = ahead ? reinterpret_cast<const char*>(w + int64_t(idx[i + kPrefetch]) * dim) : nullptr;
          const A s = psw ? Storage<T>::load(psw[i]) : A(1);
          if (!held) {
            held = row, held_s = s, held_next = next;
          } else {
            axpy2(acc.data(), held, held_s, row, s, dim, held_next, next, row_bytes, elem);
            held = nullptr;
          }
        }
      }
      if (held) axpy(acc.data(), held, held_s, dim, held_next, row_bytes, elem);
      const A scale = bag_output_scale<A>(mode, count);
      for (int64_t d = 0; d < dim; ++d) acc[d] = count == 0 ? A(0) : acc[d] * scale;
      if constexpr (std::is_same_v<raw_t<T>, A>) {
        std::memcpy(o + b * dim, acc.data(), dim * sizeof(A));
      } else {
        narrow<T, false>(acc.data(), o + b * dim, dim);
      }
    }
  });
}

// 1/count per bag for 'mean' (1 otherwise).
template <typename A, typename I>
std::vector<A> bag_scales(const I* idx, const I* off, int64_t n_bags, int64_t mode, int64_t pad) {
  std::vector<A> scale(n_bags, A(1));
  if (mode != kBagMean) return scale;
  for (int64_t b = 0; b < n_bags; ++b) {
    int64_t count = 0;
    for (int64_t i = off[b]; i < off[b + 1]; ++i) count += idx[i] != pad;
    scale[b] = bag_output_scale<A>(mode, count);
  }
  return scale;
}

// Rows per thread for a backward that touches `work` gradient values: one share per thread, or all rows on one
// thread when the work is small. A tiny table (an RNN's 31-token embedding: 64 indices x 64) otherwise paid a
// thread wake-up per call, 6x torch's whole backward.
inline int64_t row_grain(int64_t rows, int64_t work) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return work < kSerialWork ? std::max<int64_t>(rows, 1) : std::max<int64_t>(1, (rows + threads - 1) / threads);
}

// Splits the table's rows across threads; each thread walks every index in order and calls
// visit(row, grad_row, factor) for the ones whose row it owns (sum/mean; padding skipped). The order of the calls
// for a row never depends on the thread count, so whatever `visit` accumulates is deterministic.
template <typename T, typename I, typename Visit>
void walk_owned_rows(const at::Tensor& grad_out, const I* idx, const I* off, int64_t n_bags, int64_t rows,
                     int64_t mode, const raw_t<T>* psw, int64_t pad, Visit&& visit_factory) {
  using A = acc_t<T>;
  const int64_t dim = grad_out.size(1);
  const raw_t<T>* g = rows_of<T>(grad_out);
  const std::vector<A> bag_scale = bag_scales<A>(idx, off, n_bags, mode, pad);
  at::parallel_for(0, rows, row_grain(rows, off[n_bags] * dim), [&](int64_t r0, int64_t r1) {
    auto visit = visit_factory(r0, r1);
    std::vector<A> buf(dim);
    for (int64_t b = 0; b < n_bags; ++b) {
      const A* gb = nullptr;
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        if (i + kPrefetch < off[n_bags]) visit.ahead(idx[i + kPrefetch]);
        const int64_t r = idx[i];
        if (r < r0 || r >= r1 || r == pad) continue;
        if (!gb) gb = row_acc<T>(g, b, dim, buf.data());
        visit.add(r, gb, psw ? bag_scale[b] * Storage<T>::load(psw[i]) : bag_scale[b]);
      }
    }
    visit.finish();
  });
}

// The occurrences of bags [b0, b1) grouped by row: row[k] (ascending) are the rows they touch, and
// start[k] .. start[k + 1] index row[k]'s (bag, factor) pairs, in index order. factor = psw[i] (or 1), times
// bag_scale[b] when given. Padding is left out. Where the indices cover the table densely, a stable counting sort
// over the rows (O(indices + rows)); where they touch few of its rows (a collab batch: 4096 of 100k users), a sort
// of the occurrences themselves, so the cost does not grow with the table (the counting sort cost ~0.3 ms of a
// 100k-row backward whose useful work is writing the gradient).
template <typename A>
struct ByRow {
  std::vector<int64_t> row, start, bag;
  std::vector<A> factor;
};

constexpr int kRadixBits = 11;

template <typename T, typename A, typename I>
ByRow<A> group_by_row(const I* idx, const I* off, int64_t b0, int64_t b1, int64_t rows, int64_t pad,
                      const raw_t<T>* psw, const A* bag_scale) {
  ByRow<A> g;
  const auto factor_of = [&](int64_t b, int64_t i) {
    const A scale = bag_scale ? bag_scale[b] : A(1);
    return psw ? scale * Storage<T>::load(psw[i]) : scale;
  };
  const int64_t n = off[b1] - off[b0];
  if (n * 8 < rows) {
    struct Occ {
      int64_t row, i, bag;
    };
    std::vector<Occ> occ;
    occ.reserve(n);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        if (idx[i] != pad) occ.push_back({int64_t(idx[i]), i, b});
      }
    }
    // In index order already, so a stable sort by row gives (row, index) order: an LSD radix sort, 11 bits a pass
    // (two passes for 100k rows; std::sort of a collab batch's 4096 occurrences took ~0.15 ms).
    std::vector<Occ> tmp(occ.size());
    std::vector<int64_t> count(size_t(1) << kRadixBits);
    for (int shift = 0; shift < 64 && (int64_t(rows - 1) >> shift) > 0; shift += kRadixBits) {
      std::fill(count.begin(), count.end(), 0);
      const auto digit = [&](const Occ& o) { return size_t(uint64_t(o.row) >> shift) & (count.size() - 1); };
      for (const Occ& o : occ) ++count[digit(o)];
      int64_t sum = 0;
      for (int64_t& c : count) sum += std::exchange(c, sum);
      for (const Occ& o : occ) tmp[count[digit(o)]++] = o;
      occ.swap(tmp);
    }
    g.row.reserve(occ.size()), g.start.reserve(occ.size() + 1), g.bag.reserve(occ.size()), g.factor.reserve(occ.size());
    for (size_t k = 0; k < occ.size(); ++k) {
      if (k == 0 || occ[k].row != occ[k - 1].row) {
        g.row.push_back(occ[k].row);
        g.start.push_back(int64_t(k));
      }
      g.bag.push_back(occ[k].bag);
      g.factor.push_back(factor_of(occ[k].bag, occ[k].i));
    }
    g.start.push_back(int64_t(occ.size()));
    return g;
  }
  std::vector<int64_t> at(rows + 1, 0);  // per row: its first slot, then (during the fill) its next one
  for (int64_t i = off[b0]; i < off[b1]; ++i) {
    if (idx[i] != pad) ++at[int64_t(idx[i]) + 1];
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (at[r + 1] > 0) {
      g.row.push_back(r);
      g.start.push_back(at[r]);
    }
    at[r + 1] += at[r];
  }
  g.start.push_back(at[rows]);
  g.bag.resize(at[rows]);
  g.factor.resize(at[rows]);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = off[b]; i < off[b + 1]; ++i) {
      if (idx[i] == pad) continue;
      const int64_t slot = at[idx[i]]++;
      g.bag[slot] = b;
      g.factor[slot] = factor_of(b, i);
    }
  }
  return g;
}

// forward_by_row's case: the indices cover the table at least once over, and the table is more than half the
// largest cache (16 MB here; a table that stays in L3 is gathered fast enough row by row).
bool stream_the_table(int64_t mode, int64_t n, int64_t rows, int64_t row_bytes) {
  return mode != kBagMax && n >= rows && rows * row_bytes > cpu_cache_bytes() / 2;
}

// Forward of sum/mean when the indices cover the table several times over and it is far larger than the caches
// (a text batch: 450k indices into a 96 MB, 60k-row table). The bag-major gather reads a random 1.6 KB row per
// index from memory (720 MB, latency-bound: ~9 GB/s here, FBGEMM's JIT kernel ~13). Here each thread takes a
// share of the bags, groups their occurrences by row, and walks the table in row order, adding each row into the
// bags that hold it: the table streams from memory about once, and the random accesses are read-modify-writes of
// the thread's output rows, which stay in L3. Each bag's rows are summed in (row, index) order.
template <typename T, typename I>
void forward_by_row(const at::Tensor& weight, const I* idx, const I* off, int64_t n_bags, int64_t mode,
                    const raw_t<T>* psw, int64_t pad, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t dim = weight.size(1), rows = weight.size(0), n = off[n_bags];
  const raw_t<T>* w = rows_of<T>(weight);
  raw_t<T>* o = reinterpret_cast<raw_t<T>*>(out.data_ptr());
  const Axpy<A> axpy = pick_axpy<A>();
  const std::vector<A> bag_scale = bag_scales<A>(idx, off, n_bags, mode, pad);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const auto bag_at = [&](int64_t t) {  // threads split the bags by index count
    return int64_t(std::lower_bound(off, off + n_bags, I(n * t / threads)) - off);
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    const int64_t b0 = t0 == 0 ? 0 : bag_at(t0), b1 = t1 == threads ? n_bags : bag_at(t1);
    if (b0 >= b1) return;
    const ByRow<A> occ = group_by_row<T, A, I>(idx, off, b0, b1, rows, pad, psw, nullptr);
    std::vector<A> wide, buf(dim);  // fp16/bf16 bags are summed in fp32 and rounded once
    if (!std::is_same_v<raw_t<T>, A>) wide.resize((b1 - b0) * dim);
    A* acc = std::is_same_v<raw_t<T>, A> ? reinterpret_cast<A*>(o + b0 * dim) : wide.data();
    std::fill(acc, acc + (b1 - b0) * dim, A(0));
    const int64_t total = occ.start.back();
    for (size_t t = 0; t < occ.row.size(); ++t) {
      const A* row = row_acc<T>(w, occ.row[t], dim, buf.data());
      for (int64_t k = occ.start[t]; k < occ.start[t + 1]; ++k) {
        // the bag row an occurrence kPrefetch later adds to (in L3, at random)
        const char* next = k + kPrefetch < total
                               ? reinterpret_cast<const char*>(acc + (occ.bag[k + kPrefetch] - b0) * dim)
                               : nullptr;
        axpy(acc + (occ.bag[k] - b0) * dim, row, occ.factor[k], dim, next, dim * int64_t(sizeof(A)),
             int64_t(sizeof(A)));
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      A* bag = acc + (b - b0) * dim;
      if (bag_scale[b] != A(1)) {
        for (int64_t d = 0; d < dim; ++d) bag[d] *= bag_scale[b];
      }
      if constexpr (!std::is_same_v<raw_t<T>, A>) narrow<T, false>(bag, o + b * dim, dim);
    }
  });
}

// Dense backward of sum/mean. Row r's gradient is the scaled sum of the output gradients of the bags its
// occurrences fall in, so the occurrences are first grouped by row (a stable counting sort: O(indices + rows)), and
// then each thread writes its share of gradient rows once each, in order — untouched rows as zeros, so there is no
// separate zeroing pass — with streaming stores when the gradient is larger than L3: they neither read its lines
// first nor evict grad_output from L3. The random accesses are reads of grad_output (n_bags x dim: a text batch's
// 6.5 MB against its 96 MB table) instead of read-modify-writes scattered over a table-sized gradient, which is
// what the first version (each thread walking every index for the rows it owned) spent ~100 ms on for 450k
// occurrences.
// Each row's sum is taken in index order whatever the thread count: deterministic.
template <typename T, typename I>
void backward_by_row(const at::Tensor& grad_out, const I* idx, const I* off, int64_t n_bags, int64_t mode,
                     const raw_t<T>* psw, int64_t pad, at::Tensor& grad_w) {
  using A = acc_t<T>;
  const int64_t dim = grad_out.size(1), rows = grad_w.size(0), n = off[n_bags];
  const std::vector<A> bag_scale = bag_scales<A>(idx, off, n_bags, mode, pad);
  const ByRow<A> occ = group_by_row<T, A, I>(idx, off, 0, n_bags, rows, pad, psw, bag_scale.data());
  const std::vector<int64_t>&touched = occ.row, &start = occ.start, &bag_of = occ.bag;
  const std::vector<A>& factor = occ.factor;
  const int64_t n_touched = int64_t(touched.size()), n_occ = start.back();

  const raw_t<T>* g = rows_of<T>(grad_out);
  raw_t<T>* gw = reinterpret_cast<raw_t<T>*>(grad_w.data_ptr());
  const Axpy<A> axpy = pick_axpy<A>();
  const Axpy2<A> axpy2 = pick_axpy2<A>();
  const int64_t elem = sizeof(raw_t<T>), row_bytes = dim * elem;
  const auto rank = [&](int64_t r) {  // the number of touched rows before row r
    return int64_t(std::lower_bound(touched.begin(), touched.end(), r) - touched.begin());
  };
  // Threads split the rows by cost (a row written + its occurrences added), so a skewed (Zipfian) vocabulary
  // does not leave one thread with the frequent rows.
  const int64_t threads = (n + rows) * dim < kSerialWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t total = n_occ + rows;
  const auto row_at_cost = [&](int64_t t) {  // first row whose cumulative cost reaches total * t / threads
    const int64_t target = total * t / threads;
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (start[rank(mid)] + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  const bool stream = rows * row_bytes > cpu_cache_bytes();  // see stream_store
  const auto zero_rows = [&](int64_t r0, int64_t r1) {  // the untouched rows in between: one write each run
    if (r1 <= r0) return;
    if (stream) {
      stream_store(gw + r0 * dim, nullptr, (r1 - r0) * row_bytes);
    } else {
      std::memset(gw + r0 * dim, 0, (r1 - r0) * row_bytes);
    }
  };
  const auto ahead = [&](int64_t k) {  // the grad_output row an occurrence kPrefetch later will read
    return k < n_occ ? reinterpret_cast<const char*>(g + bag_of[k] * dim) : nullptr;
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(dim), buf(dim), buf2(dim);
    const int64_t r_begin = row_at_cost(t0), r_end = row_at_cost(t1);
    int64_t next_row = r_begin;
    for (int64_t t = rank(r_begin); t < n_touched && touched[t] < r_end; ++t) {
      const int64_t r = touched[t], a = start[t], e = start[t + 1];
      zero_rows(next_row, r);
      next_row = r + 1;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t k = a; k < e; k += 2) {
        const char* next1 = ahead(k + kPrefetch);
        const A* g1 = row_acc<T>(g, bag_of[k], dim, buf.data());
        if (k + 1 < e) {
          const A* g2 = row_acc<T>(g, bag_of[k + 1], dim, buf2.data());
          axpy2(acc.data(), g1, factor[k], g2, factor[k + 1], dim, next1, ahead(k + 1 + kPrefetch), row_bytes,
                elem);
        } else {
          axpy(acc.data(), g1, factor[k], dim, next1, row_bytes, elem);
        }
      }
      raw_t<T>* dst = gw + r * dim;
      const raw_t<T>* src = reinterpret_cast<const raw_t<T>*>(acc.data());
      if constexpr (!std::is_same_v<raw_t<T>, A>) {
        raw_t<T>* narrowed = reinterpret_cast<raw_t<T>*>(buf.data());  // buf is free again and large enough
        narrow<T, false>(acc.data(), narrowed, dim);
        src = narrowed;
      }
      if (stream) {
        stream_store(dst, src, row_bytes);
      } else {
        std::memcpy(dst, src, row_bytes);
      }
    }
    zero_rows(next_row, r_end);
    stream_fence();
  });
}

// Dense backward of max: each column's gradient goes to the row its maximum came from (grad_w zeroed by the caller).
template <typename T>
void backward_max(const at::Tensor& grad_out, int64_t n_bags, const int64_t* max_idx, at::Tensor& grad_w) {
  using A = acc_t<T>;
  const int64_t dim = grad_out.size(1), rows = grad_w.size(0);
  // fp16/bf16 gradients are summed in fp32 and rounded once.
  at::Tensor sums =
      std::is_same_v<raw_t<T>, A> ? grad_w : at::zeros(grad_w.sizes(), grad_w.options().dtype(at::kFloat));
  A* gw = reinterpret_cast<A*>(sums.data_ptr());
  const raw_t<T>* g = rows_of<T>(grad_out);
  at::parallel_for(0, rows, row_grain(rows, n_bags * dim), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(dim);
    for (int64_t b = 0; b < n_bags; ++b) {
      const A* gb = row_acc<T>(g, b, dim, buf.data());
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t r = max_idx[b * dim + d];
        if (r >= r0 && r < r1) gw[r * dim + d] += gb[d];
      }
    }
  });
  if (!sums.is_same(grad_w)) grad_w.copy_(sums);
}

// The optimizer step of the rows a backward touches, without a dense gradient: each thread walks the indices and
// handles the rows it owns (sums them in a map of touched rows, then updates them).
//   SGD:                w -= lr * g
//   row-wise Adagrad:   G += mean(g^2);  w -= lr * g / (sqrt(G) + eps)     (one state value per row)
template <typename T, typename I>
void fused_update(at::Tensor& weight, float* state, const at::Tensor& grad_out, const I* idx, const I* off,
                  int64_t n_bags, int64_t mode, const raw_t<T>* psw, int64_t pad, int64_t optimizer, double lr,
                  double eps) {
  using A = acc_t<T>;
  const int64_t dim = weight.size(1);
  raw_t<T>* w = reinterpret_cast<raw_t<T>*>(weight.data_ptr());
  // SGD on fp32/fp64 rows is linear: each occurrence is applied as it comes (no map of touched rows; the same
  // step up to summation order). fp16/bf16 rows and Adagrad sum first, to round once and to square the sum.
  const bool direct = optimizer == kSgd && std::is_same_v<raw_t<T>, A>;
  struct Update {
    raw_t<T>* w;
    float* state;
    int64_t dim, optimizer, r0, r1;
    A lr, eps;
    bool direct;
    std::unordered_map<int64_t, int64_t> slot;
    std::vector<int64_t> order;
    std::vector<A> sums;
    void ahead(int64_t r) {
      if (direct && r >= r0 && r < r1) __builtin_prefetch(w + r * dim, 1);
    }
    void add(int64_t r, const A* g, A s) {
      if (direct) {
        raw_t<T>* row = w + r * dim;
        const A k = lr * s;
        for (int64_t d = 0; d < dim; ++d) row[d] -= k * g[d];
        return;
      }
      const auto [it, inserted] = slot.try_emplace(r, int64_t(order.size()));
      if (inserted) {
        order.push_back(r);
        sums.resize(sums.size() + dim, A(0));
      }
      A* dst = sums.data() + it->second * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += g[d] * s;
    }
    void finish() {
      for (size_t k = 0; k < order.size(); ++k) {
        const int64_t r = order[k];
        const A* g = sums.data() + k * dim;
        A step = lr;
        if (optimizer == kRowwiseAdagrad) {
          A sq = 0;
          for (int64_t d = 0; d < dim; ++d) sq += g[d] * g[d];
          const A G = A(state[r]) + sq / A(dim);
          state[r] = float(G);
          step = lr / (std::sqrt(G) + eps);
        }
        raw_t<T>* row = w + r * dim;
        for (int64_t d = 0; d < dim; ++d) row[d] = Storage<T>::store(Storage<T>::load(row[d]) - step * g[d]);
      }
    }
  };
  walk_owned_rows<T, I>(grad_out, idx, off, n_bags, weight.size(0), mode, psw, pad, [&](int64_t r0, int64_t r1) {
    return Update{w, state, dim, optimizer, r0, r1, A(lr), A(eps), direct, {}, {}, {}};
  });
}

// f(weight tag, index tag).
template <typename F>
void dispatch(at::ScalarType w, at::ScalarType i, F&& f) {
  dispatch_float(w, [&](auto wtag) {
    if (i == at::kLong) return f(wtag, int64_t{});
    return f(wtag, int32_t{});
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> embedding_bag_fwd(FCK_EMBEDDING_BAG_FWD_ARGS) {
  check_embedding_bag(weight, indices, offsets, mode, per_sample_weights, "fck::embedding_bag_fwd");
  TORCH_CHECK(weight.device().is_cpu(), "fck::embedding_bag_fwd (cpu): tensors must be on the CPU");
  check_index_range(indices, weight.size(0));
  const int64_t n_bags = offsets.numel() - 1, dim = weight.size(1);
  at::Tensor out = at::empty({n_bags, dim}, weight.options());
  at::Tensor max_idx = mode == kBagMax ? at::empty({n_bags, dim}, weight.options().dtype(at::kLong))
                                       : at::empty({0}, weight.options().dtype(at::kLong));
  const at::Tensor psw = has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor();
  dispatch(weight.scalar_type(), indices.scalar_type(), [&](auto wtag, auto itag) {
    using T = decltype(wtag);
    using I = decltype(itag);
    const raw_t<T>* psw_p = psw.defined() ? rows_of<T>(psw) : nullptr;
    if (stream_the_table(mode, indices.numel(), weight.size(0), dim * int64_t(sizeof(raw_t<T>)))) {
      forward_by_row<T, I>(weight, indices.data_ptr<I>(), offsets.data_ptr<I>(), n_bags, mode, psw_p, padding_idx,
                           out);
    } else {
      forward<T, I>(weight, indices.data_ptr<I>(), offsets.data_ptr<I>(), n_bags, mode, psw_p, padding_idx, out,
                    max_idx);
    }
  });
  return {out, max_idx};
}

at::Tensor embedding_bag_bwd(FCK_EMBEDDING_BAG_BWD_ARGS) {
  check_embedding_bag_bwd(grad_output, indices, offsets, max_indices, num_weights, mode, per_sample_weights);
  TORCH_CHECK(grad_output.device().is_cpu(), "fck::embedding_bag_bwd (cpu): tensors must be on the CPU");
  check_index_range(indices, num_weights);
  if (mode != kBagMax && env_on("FCK_BAG_ROWS_EMULATE")) {  // CUDA's row-by-row backward, emulated for the tests
    return bag_rows::grad(grad_output, indices, offsets, num_weights, mode,
                          has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor(), padding_idx,
                          [](int b, int t, const auto& body) { emulate_blocks(b, t, body); });
  }
  // A large table's gradient comes from the CPU pool (warm pages; see fck/cpu_pool.h) and is zeroed in parallel.
  // sum/mean write every row; max only the rows its maxima came from.
  at::Tensor grad_w = pooled_empty({num_weights, grad_output.size(1)}, grad_output.options());
  if (mode == kBagMax) grad_w.zero_();
  const at::Tensor psw = has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor();
  dispatch(grad_output.scalar_type(), indices.scalar_type(), [&](auto wtag, auto itag) {
    using T = decltype(wtag);
    using I = decltype(itag);
    if (mode == kBagMax) {
      backward_max<T>(grad_output, offsets.numel() - 1, max_indices.data_ptr<int64_t>(), grad_w);
    } else {
      backward_by_row<T, I>(grad_output, indices.data_ptr<I>(), offsets.data_ptr<I>(), offsets.numel() - 1, mode,
                            psw.defined() ? rows_of<T>(psw) : nullptr, padding_idx, grad_w);
    }
  });
  return grad_w;
}

// Rows copied as they are: per call no offsets, no per-bag loop, no max-index tensor. Lesson 7's hand-written RNNs
// look 64 indices up 20 times a batch, where the bag path cost 7.7 us a call against ATen's 3.1.
at::Tensor embedding_lookup(const at::Tensor& weight, const at::Tensor& flat) {
  const char* op = "fck::embedding";
  check_float(weight, "weight", op);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.is_cpu(), op,
              ": weight must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous() && flat.is_cpu() &&
                  (flat.scalar_type() == at::kLong || flat.scalar_type() == at::kInt),
              op, ": indices must be a contiguous 1-D int64 or int32 CPU tensor");
  check_index_range(flat, weight.size(0));
  const int64_t n = flat.numel(), row_bytes = weight.size(1) * weight.element_size();
  at::Tensor out = at::empty({n, weight.size(1)}, weight.options());
  const char* w = static_cast<const char*>(weight.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const auto copy = [&](const auto* idx) {
    at::parallel_for(0, n, std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(row_bytes, 1)),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i) {
                         std::memcpy(o + i * row_bytes, w + int64_t(idx[i]) * row_bytes, row_bytes);
                       }
                     });
  };
  if (flat.scalar_type() == at::kInt) copy(flat.data_ptr<int32_t>());
  else copy(flat.data_ptr<int64_t>());
  return out;
}

// Small fp32/fp64 gradients are summed in place, serially (in index order, so deterministic): a 64-index lookup's
// backward gave a thread pool more to synchronise than to add. Larger ones, and fp16/bf16 (summed in fp32 there),
// take the bag backward's row-owned walk.
at::Tensor embedding_lookup_bwd(const at::Tensor& grad, const at::Tensor& flat, int64_t num_weights,
                                int64_t padding_idx) {
  const int64_t n = flat.numel(), dim = grad.size(-1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.is_contiguous() && grad.is_cpu(),
              "fck::embedding backward: grad must be a contiguous (indices, dim) CPU tensor");
  const bool small = n * dim <= 32768 && num_weights * dim <= (int64_t(1) << 20);
  if (!small || (grad.scalar_type() != at::kFloat && grad.scalar_type() != at::kDouble)) {
    const at::Tensor offsets = at::arange(n + 1, flat.options());
    return embedding_bag_bwd(grad, flat, offsets, at::empty({0}, flat.options().dtype(at::kLong)), num_weights,
                             kBagSum, std::nullopt, padding_idx);
  }
  check_index_range(flat, num_weights);
  at::Tensor grad_w = at::zeros({num_weights, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "embedding_lookup_bwd", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    const auto add = [&](const auto* idx) {
      for (int64_t i = 0; i < n; ++i) {
        if (int64_t(idx[i]) == padding_idx) continue;
        scalar_t* __restrict dst = gw + int64_t(idx[i]) * dim;
        const scalar_t* __restrict src = g + i * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] += src[d];
      }
    };
    if (flat.scalar_type() == at::kInt) add(flat.data_ptr<int32_t>());
    else add(flat.data_ptr<int64_t>());
  });
  return grad_w;
}

void embedding_bag_fused_update_(FCK_EMBEDDING_BAG_UPDATE_ARGS) {
  const char* op = "fck::embedding_bag_fused_update_";
  check_fused_update(weight, state, grad_output, indices, offsets, mode, per_sample_weights, optimizer, op);
  TORCH_CHECK(weight.device().is_cpu(), op, " (cpu): tensors must be on the CPU");
  check_index_range(indices, weight.size(0));
  const at::Tensor psw = has(per_sample_weights) ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor w = weight;
  dispatch(weight.scalar_type(), indices.scalar_type(), [&](auto wtag, auto itag) {
    using T = decltype(wtag);
    using I = decltype(itag);
    fused_update<T, I>(w, optimizer == kRowwiseAdagrad ? state->data_ptr<float>() : nullptr, grad_output,
                       indices.data_ptr<I>(), offsets.data_ptr<I>(), offsets.numel() - 1, mode,
                       psw.defined() ? rows_of<T>(psw) : nullptr, padding_idx, optimizer, lr, eps);
  });
}

}  // namespace cpu

// Numbers are formatted with std::to_string, not by streaming them through c10::str: on an H100 machine, an
// ostream << int64 inside this library crashed (segfault in std::ostream::_M_insert<long>) when raised from the CUDA
// op, while torch's own messages and our CPU op's worked; strings stream safely.
void raise_bag_status(const uint64_t status[2], const at::Tensor& indices, const at::Tensor& offsets,
                      int64_t num_weights, const char* op) {
  using std::to_string;
  const std::string where = std::string(op) + ": ";
  if (status[0] != kBagStatusNone) {
    const int64_t b = int64_t(status[0]), n = indices.numel(), last = offsets.numel() - 1;
    const int64_t lo = offsets[b].item<int64_t>(), hi = offsets[b + 1].item<int64_t>();
    std::string msg;
    if (b == 0 && lo != 0) {
      msg = "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start from position 0. "
            "However, got " + to_string(lo);
    } else if (hi > n || lo > n) {
      msg = "offsets[" + to_string(lo > n ? b : b + 1) + "] can not be greater than input's length " + to_string(n) +
            " but got " + to_string(lo > n ? lo : hi);
    } else if (lo > hi || lo < 0) {
      msg = "offsets must not decrease, but offsets[" + to_string(b + 1) + "] = " + to_string(hi) + " < offsets[" +
            to_string(b) + "] = " + to_string(lo);
    } else {
      msg = "the last offset must be the number of indices, " + to_string(n) + ", got " +
            to_string(offsets[last].item<int64_t>());
    }
    TORCH_CHECK(false, where + msg);
  }
  if (status[1] != kBagStatusNone) {
    const int64_t i = int64_t(status[1]);
    TORCH_CHECK_INDEX(false, std::string("embedding_bag: index ") + to_string(i) + " of input takes value " +
                                 to_string(indices[i].item<int64_t>()) + " which is not in the valid range [0, " +
                                 to_string(num_weights) + ")");
  }
}

}  // namespace fck
