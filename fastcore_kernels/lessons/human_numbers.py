"""Lesson 7, human numbers: language models over the numbers 1..9999 written in English words, from an RNN written
from scratch to stacked GRU and LSTM layers on fastcore_kernels' recurrent kernels.

The dataset is exact by construction (the course's HUMAN_NUMBERS: train.txt holds one .. eight thousand, valid.txt
eight thousand one .. nine thousand nine hundred ninety nine, one number per line); the text stream joins the
numbers with " . " as the course does. `--data PATH` reads a folder with those two files instead.

Models, as in the course: `ScratchRNN` predicts the next word after each of `bptt` words with one shared hidden
layer written by hand (nn.Linear + ReLU in a Python loop); `StatefulRNN` is the same, keeping its hidden state
across batches (detached: truncated backprop through time); `StackedRNN` replaces the hand-written cell with a
2-layer nn.GRU or nn.LSTM (hidden 64) plus batch norm, and is what `fuse` puts fastcore_kernels' LSTM/GRU into.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastcore_kernels.learner import Callback

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """1 <= n <= 9999 in the course's words: 'nine thousand nine hundred ninety nine' (no 'and', no hyphens)."""
    if not 1 <= n <= 9999:
        raise ValueError(f"human numbers go from 1 to 9999, got {n}")
    words = []
    if n >= 1000:
        words += [_ONES[n // 1000], "thousand"]
        n %= 1000
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
    if n:
        words.append(_ONES[n])
    return " ".join(words)


def lines(split: str) -> list[str]:
    """The course's files, generated: 'train' is 1..8000, 'valid' 8001..9999."""
    span = range(1, 8001) if split == "train" else range(8001, 10000)
    return [number_words(n) for n in span]


def read_lines(data: str | Path | None, split: str) -> list[str]:
    if data is None:
        return lines(split)
    path = Path(data) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"human numbers: expected {path} (one number in words per line)")
    out = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError(f"human numbers: {path} has no lines")
    return out


class Vocab:
    """Tokens by first appearance in the training text; 'xxunk' for anything the training text lacks."""

    def __init__(self, tokens: list[str]):
        self.itos = ["xxunk"] + sorted(set(tokens), key=tokens.index)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        return torch.tensor([self.stoi.get(t, 0) for t in tokens], dtype=torch.long)


def tokens(numbers: list[str]) -> list[str]:
    return " . ".join(numbers).split()


class StreamLoader:
    """A language-model loader: the token stream cut into `bs` contiguous rows, read `bptt` tokens at a time, so that
    batch i+1 continues batch i row by row (what a stateful model needs). Yields (x, y), y = x shifted by one."""

    def __init__(self, ids: torch.Tensor, bs: int, bptt: int, device: torch.device | str = "cpu"):
        n = (len(ids) - 1) // bs
        if n < bptt:
            raise ValueError(f"a stream of {len(ids)} tokens is too short for {bs} rows of {bptt}")
        self.x = ids[: bs * n].view(bs, n).to(device)
        self.y = ids[1: bs * n + 1].view(bs, n).to(device)
        self.bptt, self.bs = bptt, bs
        self.device = torch.device(device)
        self.dataset = (self.x, self.y)

    def __len__(self) -> int:
        return self.x.shape[1] // self.bptt

    def __iter__(self):
        for i in range(len(self)):
            s = slice(i * self.bptt, (i + 1) * self.bptt)
            yield self.x[:, s], self.y[:, s]


def flat_cross_entropy(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Cross entropy of (B, T, V) predictions against (B, T) targets."""
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targ.reshape(-1))


def flat_accuracy(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(-1) == targ).float().mean()


class ScratchRNN(nn.Module):
    """The course's Model3: h = relu(W_hh (h + embed(x_t))), an output at every step, hidden state from zeros."""

    stateful = False

    def __init__(self, vocab: int, hidden: int = 64):
        super().__init__()
        self.i_h = nn.Embedding(vocab, hidden)
        self.h_h = nn.Linear(hidden, hidden)
        self.h_o = nn.Linear(hidden, vocab)
        self.bn = nn.BatchNorm1d(hidden)
        self.hidden = hidden
        self.h = None

    def reset(self) -> None:
        self.h = None

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.hidden, dtype=torch.float32) if self.h is None else self.h
        outs = []
        for t in range(x.shape[1]):
            h = F.relu(self.h_h(h + self.i_h(x[:, t])))
            outs.append(self.h_o(self.bn(h)))
        if self.stateful:
            self.h = h.detach()
        return torch.stack(outs, dim=1)


class StatefulRNN(ScratchRNN):
    """The course's Model4: the hidden state carries over to the next batch (detached)."""

    stateful = True


class StackedRNN(nn.Module):
    """The course's Model5/6: embedding -> 2-layer GRU or LSTM (stateful) -> batch norm -> linear."""

    def __init__(self, vocab: int, hidden: int = 64, cell: str = "gru", layers: int = 2):
        super().__init__()
        self.i_h = nn.Embedding(vocab, hidden)
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(hidden, hidden, layers, batch_first=True)
        self.bn = nn.BatchNorm1d(hidden)
        self.h_o = nn.Linear(hidden, vocab)
        self.h = None

    def reset(self) -> None:
        self.h = None

    def forward(self, x):
        out, h = self.rnn(self.i_h(x), self.h)
        self.h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
        out = self.bn(out.transpose(1, 2)).transpose(1, 2)
        return self.h_o(out)


class ResetState(Callback):
    """Zero the model's carried hidden state at the start of training and of validation (the streams restart)."""

    def before_train(self):
        self.learn.model.reset()

    def before_validate(self):
        self.learn.model.reset()


MODELS = {"scratch": lambda v: ScratchRNN(v), "stateful": lambda v: StatefulRNN(v),
          "gru": lambda v: StackedRNN(v, cell="gru"), "lstm": lambda v: StackedRNN(v, cell="lstm")}
