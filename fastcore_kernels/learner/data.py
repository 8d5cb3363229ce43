"""Data for the Learner: `DataLoaders` pairs a training and a validation loader; `TensorLoader` batches in-memory
tensors by slicing (no per-item Python collation), for tabular, collaborative-filtering and digit data."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


class TensorLoader:
    """Batches of `tensors` (same first dimension) cut by slicing. Shuffling draws one permutation per epoch and
    gathers each batch with one index_select per tensor. Yields (x1, ..., y): the last tensor is the target.

    The tensors are moved to `device` once, at construction, so batches need no host-to-device copy."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 64, shuffle: bool = False, drop_last: bool = False,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None):
        if not tensors:
            raise ValueError("TensorLoader needs at least one tensor")
        n = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if t.shape[0] != n:
                raise ValueError(f"TensorLoader: tensor {i} has {t.shape[0]} rows, tensor 0 has {n}")
        if batch_size < 1:
            raise ValueError(f"TensorLoader: batch_size must be >= 1, got {batch_size}")
        self.tensors = tuple(t.to(device) if device is not None else t for t in tensors)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = generator
        self.dataset = self.tensors  # what Learner.get_preds / interpretation read back

    @property
    def n(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        idx = torch.randperm(self.n, generator=self.generator).to(self.device) if self.shuffle else None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
            if idx is None:
                yield tuple(t[lo:hi] for t in self.tensors)
            else:
                sel = idx[lo:hi]
                yield tuple(t.index_select(0, sel) for t in self.tensors)


class DataLoaders:
    """A training and a validation loader (torch DataLoaders or TensorLoaders) and the device batches go to."""

    def __init__(self, train, valid, device: torch.device | str | None = None):
        self.train, self.valid = train, valid
        if device is None:
            device = getattr(train, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)

    @classmethod
    def from_tensors(cls, train: Sequence[torch.Tensor], valid: Sequence[torch.Tensor], batch_size: int = 64,
                     device: torch.device | str | None = None, seed: int | None = None) -> "DataLoaders":
        """In-memory data: `train` and `valid` are (x..., y) tuples of tensors."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return cls(TensorLoader(*train, batch_size=batch_size, shuffle=True, drop_last=False, device=device,
                                generator=gen),
                   TensorLoader(*valid, batch_size=batch_size * 2, device=device), device)

    def __getitem__(self, i: int):
        return (self.train, self.valid)[i]
