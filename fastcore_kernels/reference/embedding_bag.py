"""Embedding bags in plain PyTorch: the specification every backend of `fck::embedding_bag_fwd`/`_bwd` is tested
against; autograd through it gives the reference gradients.

Inputs are normalised by ops/embedding_bag.py first: a 1-D index tensor, offsets with one entry per bag plus the
end (include_last_offset form), per-sample weights or None. Rows equal to padding_idx take no part: they add
nothing, are not counted by 'mean', cannot be the 'max', and get no gradient. Empty bags give zeros. Reduction runs
in fp32 (float64 for float64 weights) and rounds once to the weight's dtype.
"""

from __future__ import annotations

import torch

MODES = ("sum", "mean", "max")


def check_bags(indices: torch.Tensor, offsets: torch.Tensor, num_weights: int, op: str = "embedding_bag") -> None:
    """What every bag kernel may assume, raised in the C++ ops' words (csrc/cpu/embedding_bag.cpp, raise_bag_status)
    for the first bag that breaks it: offsets start at 0, never decrease and end at len(indices); every index is a
    row of the table. One host sync when all is well."""
    n = indices.numel()
    off = offsets.long()
    lo, hi = off[:-1], off[1:]
    bad = (hi > n) | (lo > n) | (lo > hi) | (lo < 0)
    if len(lo):
        bad[0] |= lo[0] != 0
    wrong_index = (indices < 0) | (indices >= num_weights)
    if not bool(torch.stack([bad.any(), off[-1] != n, off[0] != 0, wrong_index.any()]).any()):
        return
    if not len(lo):
        raise RuntimeError(f"{op}: with no bags the one offset must be 0 and the input empty, got offsets[0] = "
                           f"{int(off[0])} and {n} indices")
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        first, last = int(lo[b]), int(hi[b])
        if b == 0 and first != 0:
            msg = (f"offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start from position 0. "
                   f"However, got {first}")
        elif first > n or last > n:
            msg = (f"offsets[{b if first > n else b + 1}] can not be greater than input's length {n} but got "
                   f"{first if first > n else last}")
        else:
            msg = f"offsets must not decrease, but offsets[{b + 1}] = {last} < offsets[{b}] = {first}"
        raise RuntimeError(f"{op}: {msg}")
    if int(off[-1]) != n:
        raise RuntimeError(f"{op}: the last offset must be the number of indices, {n}, got {int(off[-1])}")
    i = int(wrong_index.nonzero()[0, 0])
    raise IndexError(f"embedding_bag: index {i} of input takes value {int(indices[i])} which is not in the valid "
                     f"range [0, {num_weights})")


def bag_ids(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """The bag of each of the n indices, from offsets with a trailing end entry."""
    counts = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts, output_size=n)


def per_index_scale(indices, offsets, mode: int, psw, pad: int, freq: bool, acc: torch.dtype):
    """Each index's factor in the weight gradient (mode 0 sum, 1 mean): its per-sample weight, 1/count of its bag
    for 'mean', 1/frequency in the batch for scale_grad_by_freq, 0 for padding. Also returns the bag of each."""
    n = indices.numel()
    bags = bag_ids(offsets, n)
    scale = torch.ones(n, device=indices.device, dtype=acc) if psw is None else psw.to(acc)
    keep = torch.ones(n, dtype=torch.bool, device=indices.device) if pad < 0 else indices != pad
    if mode == 1:
        counts = torch.zeros(len(offsets) - 1, device=indices.device, dtype=acc).index_add_(0, bags, keep.to(acc))
        scale = scale / counts.clamp(min=1)[bags]
    if freq:
        scale = scale / torch.bincount(indices.long())[indices.long()].to(acc)
    return scale * keep, bags


def rows_of(weight: torch.Tensor, indices: torch.Tensor, scale_grad_by_freq: bool, sparse: bool,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight's rows at `indices`, in `dtype` (as read from weight converted whole, so a dense gradient sums in
    `dtype` and rounds once); their gradient reaches weight as a sparse COO tensor when `sparse` (one value per
    index, in weight's dtype, as torch's), and divided by each index's count in the batch when `scale_grad_by_freq`
    (torch's definitions)."""
    source = weight if sparse or dtype is None else weight.to(dtype)
    rows = torch.nn.functional.embedding(indices.long(), source, sparse=sparse)
    if scale_grad_by_freq and rows.requires_grad:
        flat = indices.reshape(-1).long()
        inv = (1.0 / torch.bincount(flat)[flat].double()).reshape(*indices.shape, 1)
        rows.register_hook(lambda g: (g.double() * inv).to(g.dtype))
    return rows


def embedding_bag(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, mode: str,
                  per_sample_weights: torch.Tensor | None, padding_idx: int | None, scale_grad_by_freq: bool = False,
                  sparse: bool = False) -> torch.Tensor:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n_bags, dim = len(offsets) - 1, weight.shape[1]
    bags = bag_ids(offsets, len(indices))
    keep = torch.ones_like(indices, dtype=torch.bool) if padding_idx is None else indices != padding_idx
    rows = rows_of(weight, indices, scale_grad_by_freq, sparse, acc).to(acc)
    # Padding rows dropped by selection, before the per-sample weights: one holding inf or NaN adds nothing and
    # gives its per-sample weight a zero gradient (a product by 0 would give NaN).
    rows = torch.where(keep[:, None], rows, 0.0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.to(acc)[:, None]
    bag_index = bags[:, None].expand(-1, dim)
    if mode == "max":
        # torch's rule, row by row: the bag's first row is the maximum, replaced by each later row strictly greater.
        # So a NaN counts only as a bag's first row (then the result is NaN), and the gradient goes whole to the row
        # chosen, the first of tied rows (amax's own gradient would split it among them).
        n, dev = len(indices), weight.device
        values = rows.detach()
        number = keep[:, None] & ~torch.isnan(values)
        top = torch.full((n_bags, dim), float("-inf"), dtype=acc, device=dev).scatter_reduce(
            0, bag_index, torch.where(number, values, float("-inf")), reduce="amax", include_self=True)
        position = torch.arange(n, device=dev)[:, None]
        chosen = torch.where(number & (values == top[bags]), position, n)
        first_row = torch.full((n_bags,), n, device=dev).scatter_reduce(0, bags, torch.where(keep, position[:, 0], n),
                                                                        reduce="amin", include_self=True)
        nan_first = (position == first_row[bags][:, None]) & torch.isnan(values)
        chosen = torch.where(nan_first, position, chosen)
        first = torch.full((n_bags, dim), n, device=dev).scatter_reduce(0, bag_index, chosen, reduce="amin",
                                                                        include_self=True)
        # Bags without a chosen row (empty, or only padding) give 0; they point past the rows, to an extra row whose
        # gradient is dropped.
        picked = torch.cat([rows, rows.new_zeros(1, dim)]).gather(0, first)
        out = torch.where(first < n, picked, 0.0)
    else:
        out = torch.zeros((n_bags, dim), dtype=acc, device=weight.device).index_add(0, bags, rows)
        if mode == "mean":
            count = torch.zeros(n_bags, dtype=acc, device=weight.device).index_add(0, bags, keep.to(acc))
            out = out / count.clamp(min=1)[:, None]
    return out.to(weight.dtype)
