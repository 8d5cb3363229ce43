// The dense weight gradient of 'sum'/'mean' bags row by row, without atomics and the same bits every run (CUDA;
// the CPU tests run the same code emulated, FCK_BAG_ROWS_EMULATE=1, fck/block_launch.h).
//
// The bag-major CUDA backward adds each index's gradient row by atomics: on the H200 the text case (450k indices x
// 400 columns) spent 440 of its 638 us of GPU time in them, after a 96 MB zero fill. Here the occurrences are
// grouped by row first and each gradient row is written once, zeros included:
//  1. `Occurrences`, a thread per index: its key (its row; -1 for padding, a row outside the table, or a bag whose
//     offsets are unsound, which the forward would have refused), its bag and its factor (1/count for 'mean', times
//     the per-index weight). 'mean' first takes each bag's count (`BagScales`, a thread per bag).
//  2. at::sort(keys, stable): the keys in row order, equal rows in index order, and the permutation.
//  3. `Chunks`: the sorted occurrences cut into chunks of kChunk; a group of threads per chunk (a thread per V
//     adjacent columns) sums each run of one row in index order. A run that is its row's whole segment is written to
//     the gradient; a run that continues from the chunk before or into the chunk after (a row with many
//     occurrences: a frequent word) goes to the chunk's partial slot 0 (the run opens the chunk) or 1 (it closes it).
//     The chunks holding a row's first and last occurrences record where its segment starts and ends (`seg`).
//  4. `Rows`: a group per table row reads its segment: none (seg's fill), it writes zeros; a segment across chunks,
//     it adds its chunks' partials in chunk order and writes the sum. (Two binary searches over the sorted keys by
//     every thread would cost the text case's 6M threads ~38 dependent L2 loads each.)
// Chunks and orders are fixed, so the result does not depend on timing (this is also the path under
// torch.use_deterministic_algorithms(True)), and a frequent row's occurrences are summed by many groups at once
// rather than in one long loop, as a row-per-group kernel would on Zipfian text.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "fck/embedding_bag.h"
#include "fck/macros.h"

namespace fck {
namespace bag_rows {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 64;  // sorted occurrences a chunk: partial slots hold 2 rows per 64 occurrences

struct NoShared {
  float unused;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Groups of threads, one per item (a chunk or a row), a thread per V columns: tpg = ceil(dim / V) threads, at most
// kThreads, gpb groups a block (narrow rows fill blocks too); rows wider than kThreads * V take `tiles` blocks.
// Block index = item block * tiles + tile.
struct Groups {
  int64_t items, dim;
  int tpg, gpb;
  int64_t tiles;

  template <int V>
  static Groups make(int64_t items, int64_t dim) {
    const int tpg = int(std::min<int64_t>((dim + V - 1) / V, kThreads));
    return {items, dim, tpg, kThreads / tpg, (dim + int64_t(tpg) * V - 1) / (int64_t(tpg) * V)};
  }
  int64_t blocks() const { return (items + gpb - 1) / gpb * tiles; }
  // The thread's item and first column; false when it has none.
  template <int V, class Ctx>
  FCK_HOST_DEVICE bool at(const Ctx& ctx, int64_t& item, int64_t& col) const {
    const int64_t block = ctx.block, group = ctx.tid / tpg;
    item = block / tiles * gpb + group;
    col = (block % tiles * tpg + ctx.tid % tpg) * V;
    return group < gpb && item < items && col < dim;
  }
};

template <typename T, int V>
FCK_HOST_DEVICE Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, typename A, int V>
FCK_HOST_DEVICE void store_pack(T* p, const A (&v)[V]) {
  Pack<T, V> out;
  FCK_UNROLL
  for (int k = 0; k < V; ++k) out.v[k] = static_cast<T>(v[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = out;
}

// Bag b's offsets as the forward checks them (fck/embedding_bag_host.h: check_offsets).
template <typename I>
FCK_HOST_DEVICE bool sound_bag(const I* off, int64_t b, int64_t n_bags, int64_t n) {
  const int64_t start = off[b], end = off[b + 1];
  return start >= 0 && start <= end && end <= n && (b != 0 || start == 0) && (b != n_bags - 1 || end == n);
}

// 'mean': 1/count per bag, counting the indices inside the table other than padding.
template <typename A, typename I>
struct BagScales {
  static constexpr int kMaxThreads = kThreads;
  using Shared = NoShared;
  const I *idx, *off;
  A* scale;
  int64_t n_bags, n, rows, pad;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(const Ctx& ctx, Shared&) const {
    const int64_t b = int64_t(ctx.block) * ctx.threads + ctx.tid;
    if (b >= n_bags) return;
    int64_t count = 0;
    if (sound_bag(off, b, n_bags, n)) {
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        const int64_t r = idx[i];
        count += r >= 0 && r < rows && r != pad;
      }
    }
    scale[b] = bag_output_scale<A>(kBagMean, count);
  }
};

template <typename T, typename A, typename I, typename K>
struct Occurrences {
  static constexpr int kMaxThreads = kThreads;
  using Shared = NoShared;
  const I *idx, *off;
  const T* psw;        // per-index weights, or null
  const A* bag_scale;  // per bag ('mean'), or null
  K* key;
  int64_t* bag;
  A* factor;
  int64_t n, n_bags, rows, pad;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(const Ctx& ctx, Shared&) const {
    const int64_t i = int64_t(ctx.block) * ctx.threads + ctx.tid;
    if (i >= n) return;
    int64_t lo = 0, hi = n_bags;  // the last bag whose start is <= i (empty bags before it are passed over)
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (int64_t(off[mid]) <= i) lo = mid + 1; else hi = mid;
    }
    const int64_t b = lo - 1, r = idx[i];
    const bool valid = b >= 0 && sound_bag(off, b, n_bags, n) && i < int64_t(off[b + 1]) && r >= 0 && r < rows &&
                       r != pad;
    key[i] = valid ? K(r) : K(-1);
    bag[i] = valid ? b : 0;
    A f = valid ? A(1) : A(0);
    if (valid && bag_scale) f = bag_scale[b];
    if (valid && psw) f = f * static_cast<A>(psw[i]);
    factor[i] = f;
  }
};

// acc[k] += g[bag * dim + col + k] * factor over the occurrences [j0, j1) of the sorted order.
template <typename T, typename A, typename K, int V>
FCK_HOST_DEVICE void add_occurrences(A (&acc)[V], const int64_t* perm, const int64_t* bag, const A* factor,
                                     const T* g, int64_t dim, int64_t col, int64_t j0, int64_t j1) {
  FCK_UNROLL_4  // the loads of four occurrences in flight at once
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t k = perm[j];
    const A f = factor[k];
    const Pack<T, V> v = load_pack<T, V>(g + bag[k] * dim + col);
    FCK_UNROLL
    for (int q = 0; q < V; ++q) acc[q] += static_cast<A>(v.v[q]) * f;
  }
}

template <typename T, typename A, typename K, int V>
struct Chunks {
  static constexpr int kMaxThreads = kThreads;
  using Shared = NoShared;
  const K* key;  // sorted
  const int64_t *perm, *bag;
  const A* factor;
  const T* g;
  T* gw;
  A* part;       // [chunk][slot][dim]
  int64_t* seg;  // [row][first, end) of its sorted occurrences
  int64_t n;
  Groups grp;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(const Ctx& ctx, Shared&) const {
    int64_t c, col;
    if (!grp.at<V>(ctx, c, col)) return;
    const int64_t dim = grp.dim, j0 = c * kChunk, j1 = n < j0 + kChunk ? n : j0 + kChunk;
    int64_t j = j0;
    while (j < j1 && key[j] < 0) ++j;  // the invalid occurrences sort first
    while (j < j1) {
      const K r = key[j];
      int64_t e = j + 1;
      while (e < j1 && key[e] == r) ++e;
      A acc[V];
      FCK_UNROLL
      for (int q = 0; q < V; ++q) acc[q] = A(0);
      add_occurrences<T, A, K, V>(acc, perm, bag, factor, g, dim, col, j, e);
      const bool from_before = j == j0 && j0 > 0 && key[j0 - 1] == r;
      const bool into_next = e == j1 && j1 < n && key[j1] == r;
      if (col == 0) {  // the chunks holding the row's first and last occurrences mark its segment
        if (!from_before) seg[2 * int64_t(r)] = j;
        if (!into_next) seg[2 * int64_t(r) + 1] = e;
      }
      if (from_before || into_next) {
        A* p = part + (c * 2 + (j == j0 ? 0 : 1)) * dim + col;
        FCK_UNROLL
        for (int q = 0; q < V; ++q) p[q] = acc[q];
      } else {
        store_pack<T, A, V>(gw + int64_t(r) * dim + col, acc);
      }
      j = e;
    }
  }
};

template <typename T, typename A, int V>
struct Rows {
  static constexpr int kMaxThreads = kThreads;
  using Shared = NoShared;
  const int64_t* seg;  // Chunks' segments; -1 where a row has none
  const A* part;
  T* gw;
  Groups grp;

  template <class Ctx>
  FCK_HOST_DEVICE void operator()(const Ctx& ctx, Shared&) const {
    int64_t r, col;
    if (!grp.at<V>(ctx, r, col)) return;
    const int64_t dim = grp.dim, lo = seg[2 * r], hi = seg[2 * r + 1];
    A acc[V];
    FCK_UNROLL
    for (int q = 0; q < V; ++q) acc[q] = A(0);
    if (lo < hi) {
      const int64_t c0 = lo / kChunk, c1 = (hi - 1) / kChunk;
      if (c0 == c1) return;  // its chunk wrote it
      const A* first = part + (c0 * 2 + (lo == c0 * kChunk ? 0 : 1)) * dim + col;
      FCK_UNROLL
      for (int q = 0; q < V; ++q) acc[q] = first[q];
      for (int64_t c = c0 + 1; c <= c1; ++c) {
        const A* p = part + c * 2 * dim + col;
        FCK_UNROLL
        for (int q = 0; q < V; ++q) acc[q] += p[q];
      }
    }
    store_pack<T, A, V>(gw + r * dim + col, acc);
  }
};

// Whether every row of grad_output and of the gradient starts on a V-element boundary.
template <int V>
inline bool aligned(int64_t dim, const void* a, const void* b, size_t elem) {
  return dim % V == 0 && reinterpret_cast<uintptr_t>(a) % (V * elem) == 0 &&
         reinterpret_cast<uintptr_t>(b) % (V * elem) == 0;
}

// The gradient (num_weights, dim) of grad_output's dtype. launch(blocks, threads, body) runs a functor on CUDA or
// emulates it; the host emulation also fills the outputs with NaN first, so an element no thread wrote shows.
template <class Launch>
at::Tensor grad(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& offsets,
                int64_t num_weights, int64_t mode, const at::Tensor& psw, int64_t pad, const Launch& launch) {
  const int64_t n = indices.numel(), n_bags = offsets.numel() - 1, dim = grad_output.size(1);
  const bool emulated = grad_output.is_cpu();
  at::Tensor gw = at::empty({num_weights, dim}, grad_output.options());
  if (num_weights == 0 || dim == 0) return gw;
  if (emulated) gw.fill_(NAN);
  const auto acc = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto blocks = [](int64_t b) {
    TORCH_CHECK(b <= std::numeric_limits<int>::max(), "fck::embedding_bag_bwd: too many blocks for one launch");
    return int(b);
  };
  at::Tensor part;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "fck::bag_rows", [&] {
    using T = scalar_t;
    using A = std::conditional_t<std::is_same<T, double>::value, double, float>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fck::bag_rows", [&] {
      using I = index_t;
      const auto run = [&](auto key_tag) {
        using K = decltype(key_tag);
        const at::TensorOptions o = grad_output.options();
        at::Tensor key = at::empty({n}, o.dtype(c10::CppTypeToScalarType<K>::value));
        at::Tensor bag = at::empty({n}, o.dtype(at::kLong)), factor = at::empty({n}, o.dtype(acc));
        at::Tensor scale;
        if (mode == kBagMean && n_bags > 0) {
          scale = at::empty({n_bags}, o.dtype(acc));
          launch(blocks((n_bags + kThreads - 1) / kThreads), kThreads,
                 BagScales<A, I>{indices.data_ptr<I>(), offsets.data_ptr<I>(), scale.data_ptr<A>(), n_bags, n,
                                 num_weights, pad});
        }
        if (n > 0) {
          launch(blocks((n + kThreads - 1) / kThreads), kThreads,
                 Occurrences<T, A, I, K>{indices.data_ptr<I>(), offsets.data_ptr<I>(),
                                         psw.defined() ? psw.data_ptr<T>() : nullptr,
                                         scale.defined() ? scale.data_ptr<A>() : nullptr, key.data_ptr<K>(),
                                         bag.data_ptr<int64_t>(), factor.data_ptr<A>(), n, n_bags, num_weights,
                                         pad});
        }
        at::Tensor sorted, perm;
        std::tie(sorted, perm) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const int64_t chunks = (n + kChunk - 1) / kChunk;
        part = at::empty({chunks, 2, dim}, o.dtype(acc));
        if (emulated) part.fill_(NAN);
        const at::Tensor seg = at::full({num_weights, 2}, -1, o.dtype(at::kLong));
        const auto go = [&](auto v) {
          constexpr int V = decltype(v)::value;
          const Groups gc = Groups::make<V>(chunks, dim), gr = Groups::make<V>(num_weights, dim);
          if (chunks > 0) {
            launch(blocks(gc.blocks()), kThreads,
                   Chunks<T, A, K, V>{sorted.data_ptr<K>(), perm.data_ptr<int64_t>(), bag.data_ptr<int64_t>(),
                                      factor.data_ptr<A>(), grad_output.data_ptr<T>(), gw.data_ptr<T>(),
                                      part.data_ptr<A>(), seg.data_ptr<int64_t>(), n, gc});
          }
          launch(blocks(gr.blocks()), kThreads,
                 Rows<T, A, V>{seg.data_ptr<int64_t>(), part.data_ptr<A>(), gw.data_ptr<T>(), gr});
        };
        // 16-byte loads and stores of grad_output and the gradient where the rows allow (4 fp32 or 8 half values)
        constexpr int kVec = 16 / sizeof(T) > 8 ? 8 : 16 / sizeof(T);
        if (aligned<kVec>(dim, grad_output.data_ptr(), gw.data_ptr(), sizeof(T))) {
          go(std::integral_constant<int, kVec>{});
        } else {
          go(std::integral_constant<int, 1>{});
        }
      };
      // 32-bit keys sort in half the radix passes; -1 marks the occurrences left out
      if (num_weights <= std::numeric_limits<int32_t>::max()) {
        run(int32_t{});
      } else {
        run(int64_t{});
      }
    });
  });
  return gw;
}

}  // namespace bag_rows
}  // namespace fck
