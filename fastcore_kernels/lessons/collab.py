"""Collaborative filtering (lessons 4 and 5): ratings in MovieLens' formats and the course's two models.

Formats read: MovieLens 100k's `u.data` (tab-separated user, item, rating, timestamp; no header) and the later
releases' `ratings.csv` (userId,movieId,rating,timestamp with a header). Users and items are renumbered 0..n-1 in
order of first appearance.

Models: `EmbeddingDotBias` (user and item factors and biases, prediction = dot + biases squashed into `y_range` by a
sigmoid) and the neural variant, `tabular.TabularModel` over the two embeddings. Both run on fastcore_kernels'
embedding kernels once fused.

Without a network, `write_movielens` writes a synthetic u.data: ratings from hidden user and item factors and biases
plus noise, rounded to 1..5 stars, with popular items and active users drawn more often (as in the real data).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from torch import nn


def write_movielens(path: str | Path, n_users: int = 943, n_items: int = 1682, n_ratings: int = 100_000,
                    n_factors: int = 6, seed: int = 0) -> Path:
    rng = random.Random(seed)
    users = [[rng.gauss(0, 1) for _ in range(n_factors)] for _ in range(n_users)]
    items = [[rng.gauss(0, 1) for _ in range(n_factors)] for _ in range(n_items)]
    user_bias = [rng.gauss(0, 0.4) for _ in range(n_users)]
    item_bias = [rng.gauss(0, 0.5) for _ in range(n_items)]
    user_w = [1 / (i + 10) ** 0.8 for i in range(n_users)]  # a few very active users, a long tail
    item_w = [1 / (i + 5) ** 1.0 for i in range(n_items)]
    user_ids = rng.choices(range(n_users), user_w, k=n_ratings * 2)
    item_ids = rng.choices(range(n_items), item_w, k=n_ratings * 2)
    seen, lines = set(), []
    for u, i in zip(user_ids, item_ids):
        if (u, i) in seen:
            continue
        seen.add((u, i))
        dot = sum(a * b for a, b in zip(users[u], items[i])) / math.sqrt(n_factors)
        r = 3.5 + user_bias[u] + item_bias[i] + 0.9 * dot + rng.gauss(0, 0.5)
        stars = min(5, max(1, round(r)))
        lines.append(f"{u + 1}\t{i + 1}\t{stars}\t{874724710 + len(lines) * 37}")
        if len(lines) == n_ratings:
            break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_ratings(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(x (n, 2) int64 user/item codes, y (n, 1) float32 ratings, user ids, item ids) from u.data or ratings.csv."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected MovieLens ratings (u.data or ratings.csv) at {path}")
    text = path.read_text().splitlines()
    sep = "\t" if "\t" in text[0] else ","
    if not text[0].split(sep)[0].strip().isdigit():  # ratings.csv's header
        text = text[1:]
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    codes, ratings = [], []
    for n, line in enumerate(text):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) < 3:
            raise ValueError(f"{path}:{n + 1}: expected user, item, rating[, timestamp], got {line!r}")
        u, i, r = (f.strip() for f in fields[:3])
        codes.append((user_ids.setdefault(u, len(user_ids)), item_ids.setdefault(i, len(item_ids))))
        ratings.append(float(r))
    if not codes:
        raise ValueError(f"{path} has no ratings")
    return (torch.tensor(codes, dtype=torch.long), torch.tensor(ratings, dtype=torch.float32)[:, None],
            list(user_ids), list(item_ids))


def sigmoid_range(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.sigmoid(x) * (hi - lo) + lo


class EmbeddingDotBias(nn.Module):
    """rating = sigmoid_range(u . i + b_u + b_i): the course's dot-product model with biases."""

    def __init__(self, n_users: int, n_items: int, n_factors: int = 50, y_range=(0.0, 5.5)):
        super().__init__()
        self.u_weight, self.i_weight = nn.Embedding(n_users, n_factors), nn.Embedding(n_items, n_factors)
        self.u_bias, self.i_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
        for e in (self.u_weight, self.i_weight, self.u_bias, self.i_bias):
            nn.init.trunc_normal_(e.weight, std=0.01)  # fastai's init: small, so training starts near the mean
        self.y_range = y_range

    def forward(self, x):
        users, items = x[:, 0], x[:, 1]
        dot = (self.u_weight(users) * self.i_weight(items)).sum(1, keepdim=True)
        return sigmoid_range(dot + self.u_bias(users) + self.i_bias(items), *self.y_range)


class CatOnly(nn.Module):
    """A TabularModel fed (user, item) codes alone: the course's neural collaborative filter (EmbeddingNN)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, x.new_empty(x.shape[0], 0, dtype=torch.float32))
