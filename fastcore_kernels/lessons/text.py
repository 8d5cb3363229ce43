"""Text (lessons 3 and 4): ULMFiT on an AWD-LSTM-style model over fastcore_kernels' LSTM and embedding kernels.

Formats read: the IMDB folder layout (`train/pos`, `train/neg`, `test/pos`, `test/neg`, one review per .txt file,
plus optional unlabelled `train/unsup` for the language model) and a CSV with a header holding `text` and `label`
columns (`--data file.csv`; 20% of its rows are held out).

Tokenizer (`tokenize`): words of letters/digits (with an apostrophe part, "don't") and single punctuation marks;
text is lower-cased, a capitalised word is preceded by `xxmaj`, and every text starts with `xxbos`. Vocabulary
(`Vocab`): the special tokens `xxunk xxpad xxbos xxmaj` first, then every token seen at least `min_freq` times in
the training texts (most frequent first, at most `max_vocab`); anything else reads as `xxunk`.

Without a network, `write_sentiment_corpus` writes a templated review corpus in the IMDB layout (synthetic,
documented as such): each review has a verdict (its label) and mixes neutral sentences with sentiment sentences, three
in four of which agree with the verdict; polarity comes from adjectives, verbs, negations ("not great") and contrast
("..., but ..."), so single words mislead and word order matters; 3% of labels are flipped.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SPECIALS = ["xxunk", "xxpad", "xxbos", "xxmaj"]
UNK, PAD, BOS, MAJ = range(4)
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")


def tokenize(text: str) -> list[str]:
    out = ["xxbos"]
    for tok in _TOKEN.findall(text):
        if tok[0].isupper() and not tok.isupper() or (len(tok) == 1 and tok.isupper()):
            out.append("xxmaj")
        out.append(tok.lower())
    return out


class Vocab:
    def __init__(self, texts_tokens: list[list[str]], min_freq: int = 2, max_vocab: int = 60000):
        counts = Counter(t for toks in texts_tokens for t in toks if t not in SPECIALS)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        self.itos = SPECIALS + kept[: max_vocab - len(SPECIALS)]
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def numericalize(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokens]


# --- data --------------------------------------------------------------------------------------------------------
def read_imdb(folder: str | Path) -> dict[str, list[tuple[str, int]]]:
    """{'train': [(text, label)], 'test': [...], 'unsup': [(text, -1)]}; label 1 = pos, 0 = neg."""
    folder = Path(folder)
    out = {"train": [], "test": [], "unsup": []}
    for split in ("train", "test"):
        for label, name in ((1, "pos"), (0, "neg")):
            d = folder / split / name
            if d.is_dir():
                out[split] += [(p.read_text(errors="replace"), label) for p in sorted(d.glob("*.txt"))]
    unsup = folder / "train" / "unsup"
    if unsup.is_dir():
        out["unsup"] = [(p.read_text(errors="replace"), -1) for p in sorted(unsup.glob("*.txt"))]
    if not out["train"]:
        raise FileNotFoundError(f"{folder}: expected the IMDB layout (train/pos, train/neg, test/pos, test/neg with "
                                f".txt files)")
    if not out["test"]:
        raise FileNotFoundError(f"{folder}: no test/pos or test/neg reviews")
    return out


def read_text_csv(path: str | Path, valid_pct: float = 0.2, seed: int = 42) -> dict[str, list[tuple[str, int]]]:
    """A CSV with `text` and `label` columns (labels: any strings; sorted, numbered 0..k-1)."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "text" not in rows[0] or "label" not in rows[0]:
        raise ValueError(f"{path}: expected a header with 'text' and 'label' columns")
    classes = sorted({r["label"] for r in rows})
    items = [(r["text"], classes.index(r["label"])) for r in rows]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = int(len(items) * valid_pct)
    return {"train": [items[i] for i in order[n_valid:]], "test": [items[i] for i in order[:n_valid]], "unsup": []}


_MOVIES = ["The Long Night", "Paper Moons", "River of Glass", "Iron Harvest", "The Quiet Room", "Blue Meridian",
           "Cold Harbor", "Northern Lights", "The Last Orchard", "Silver Static", "Dust and Echo", "Glass Garden"]
_GENRES = ["drama", "thriller", "comedy", "western", "mystery", "romance", "war film", "documentary"]
_NAMES = ["Ann Price", "Tom Hale", "Mia Stone", "Leo Grant", "Eva Lund", "Sam Reyes", "Ida Moss", "Max Cole"]
_ASPECTS = ["acting", "script", "plot", "dialogue", "music", "camera work", "ending", "pacing", "cast", "story"]
_POS = ["great", "wonderful", "brilliant", "moving", "superb", "excellent", "delightful", "gripping", "clever"]
_NEG = ["awful", "boring", "terrible", "dull", "clumsy", "weak", "tedious", "painful", "lazy"]
_POS_VERB = ["loved", "enjoyed", "adored", "admired", "recommend"]
_NEG_VERB = ["hated", "disliked", "regretted", "resented"]
_NEUTRAL = ["I saw {movie} with a friend last {day}.", "{movie} is a {genre} directed by {name}.",
            "It runs about {n} minutes.", "The film stars {name} and {name2}.", "It came out in {year}.",
            "I watched it at home on a {day}.", "The {aspect} features {name}.", "It is set in a small town."]


def _review(rng: random.Random) -> tuple[str, int]:
    fill = dict(movie=rng.choice(_MOVIES), genre=rng.choice(_GENRES), name=rng.choice(_NAMES),
                name2=rng.choice(_NAMES), n=rng.randrange(80, 180), year=rng.randrange(1970, 2019),
                day=rng.choice(["Monday", "Friday", "Sunday", "weekend"]))
    # The reviewer's verdict comes first and colours most sentiment sentences (as in real reviews, so a language
    # model gains by tracking it); some sentences disagree with it.
    label = int(rng.random() < 0.5)
    sentences = []
    for _ in range(rng.randrange(3, 7)):
        kind = rng.random()
        a, b = rng.choice(_ASPECTS), rng.choice(_ASPECTS)
        if kind < 0.35:
            sentences.append(rng.choice(_NEUTRAL).format(aspect=a, **fill))
            continue
        good = bool(label) if rng.random() < 0.75 else not label
        adj, other = (rng.choice(_POS), rng.choice(_NEG)) if good else (rng.choice(_NEG), rng.choice(_POS))
        if kind < 0.55:
            sentences.append(f"The {a} was {adj}.")
        elif kind < 0.7:  # negation flips the adjective
            sentences.append(f"The {a} was not {other}.")
        elif kind < 0.85:  # contrast: the clause after "but" is the one that agrees
            sentences.append(f"The {a} was {other}, but the {b} was {adj}.")
        else:
            verb = rng.choice(_POS_VERB if good else _NEG_VERB)
            sentences.append(f"I {verb} this {fill['genre']}." if rng.random() < 0.5 else f"I really {verb} it.")
    if rng.random() < 0.03:
        label = 1 - label
    return " ".join(sentences), label


def write_sentiment_corpus(folder: str | Path, n_train: int = 3000, n_test: int = 1000, n_unsup: int = 3000,
                           seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = Path(folder)
    for split, n in (("train", n_train), ("test", n_test), ("unsup", n_unsup)):
        for i in range(n):
            text, label = _review(rng)
            sub = folder / "train" / "unsup" if split == "unsup" else folder / split / ("pos" if label else "neg")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i}_{label}.txt").write_text(text + "\n")
    return folder


class SortedBatches:
    """Classifier batches: texts sorted by length (random order inside chunks when shuffling) and padded at the
    start with xxpad, so each row's last position is its last token. Yields (ids (B, T), lengths (B,), labels)."""

    def __init__(self, ids: list[list[int]], labels: list[int], bs: int, shuffle: bool, device, seed: int = 0):
        self.ids, self.labels, self.bs, self.shuffle = ids, torch.tensor(labels), bs, shuffle
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.dataset = (self.ids, self.labels)

    def __len__(self) -> int:
        return -(-len(self.ids) // self.bs)

    def __iter__(self):
        n = len(self.ids)
        if self.shuffle:  # fastai's SortedDL: sort chunks of 50 batches by length, shuffle the batches
            order = torch.randperm(n, generator=self.gen).tolist()
            chunk = self.bs * 50
            order = [i for c in range(0, n, chunk)
                     for i in sorted(order[c: c + chunk], key=lambda i: -len(self.ids[i]))]
            batches = [order[i: i + self.bs] for i in range(0, n, self.bs)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.gen).tolist()]
        else:
            order = sorted(range(n), key=lambda i: -len(self.ids[i]))
            batches = [order[i: i + self.bs] for i in range(0, n, self.bs)]
        for b in batches:
            t = max(len(self.ids[i]) for i in b)
            x = torch.full((len(b), t), PAD, dtype=torch.long)
            for r, i in enumerate(b):
                x[r, t - len(self.ids[i]):] = torch.tensor(self.ids[i])
            lengths = torch.tensor([len(self.ids[i]) for i in b])
            yield x.to(self.device), lengths.to(self.device), self.labels[b].to(self.device)


# --- AWD-LSTM ----------------------------------------------------------------------------------------------------
class RNNDropout(nn.Module):
    """Dropout with one mask per sequence, the same at every time step (variational dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):  # x (B, T, C)
        if not self.training or not self.p:
            return x
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class WeightDropout(nn.Module):
    """AWD-LSTM's DropConnect on an LSTM's hidden-to-hidden weights: the module's `weight_hh_l0` is replaced every
    forward by a dropped copy of the raw parameter (fastcore_kernels' LSTM reads it by name, no re-packing)."""

    def __init__(self, module: nn.Module, p: float):
        super().__init__()
        self.module, self.p = module, p
        raw = module.weight_hh_l0
        del module._parameters["weight_hh_l0"]
        self.weight_hh_l0_raw = nn.Parameter(raw.detach().clone())
        module.weight_hh_l0 = raw.detach().clone()  # a plain tensor until the first forward

    def forward(self, *args):
        raw = self.weight_hh_l0_raw
        # A plain tensor either way: assigning the Parameter itself (what eval-mode dropout returns) would register
        # it on the LSTM as a second parameter.
        w = F.dropout(raw, self.p, True) if self.training and self.p else raw.view_as(raw)
        self.module.weight_hh_l0 = w
        out = self.module(*args)
        self.module.weight_hh_l0 = w.detach()  # keep no graph between calls (and the model deep-copyable)
        return out


class AWDLSTM(nn.Module):
    """Embedding (with embedding dropout: whole words dropped) -> input dropout -> `n_layers` LSTMs, each with weight
    dropout on its hidden weights and dropout between layers; the last layer's width is `emb_sz` (for weight tying).
    Keeps its hidden state across calls when `stateful` (language modelling), detached (truncated BPTT)."""

    def __init__(self, vocab_sz: int, emb_sz: int = 200, n_hid: int = 400, n_layers: int = 3, embed_p: float = 0.02,
                 input_p: float = 0.2, hidden_p: float = 0.15, weight_p: float = 0.2):
        super().__init__()
        # torch's N(0, 1) init: AWD-LSTM's uniform(-0.1, 0.1) left this smaller model stuck at the unigram loss.
        self.encoder = nn.Embedding(vocab_sz, emb_sz, padding_idx=PAD)
        self.embed_p = embed_p
        self.input_dp = RNNDropout(input_p)
        sizes = [emb_sz] + [n_hid] * (n_layers - 1) + [emb_sz]
        self.rnns = nn.ModuleList(WeightDropout(nn.LSTM(sizes[i], sizes[i + 1], batch_first=True), weight_p)
                                  for i in range(n_layers))
        self.hidden_dps = nn.ModuleList(RNNDropout(hidden_p) for _ in range(n_layers))
        self.stateful = False
        self.hidden = None

    def reset(self) -> None:
        self.hidden = None

    def forward(self, x):
        emb = self.encoder(x)
        if self.training and self.embed_p:  # == looking up in a weight with dropped rows, scaled
            keep = emb.new_empty(self.encoder.num_embeddings, 1).bernoulli_(1 - self.embed_p) / (1 - self.embed_p)
            emb = emb * keep[x]
        out = self.input_dp(emb)
        hidden = self.hidden if self.stateful and self.hidden is not None else [None] * len(self.rnns)
        new_hidden, outputs = [], []
        for rnn, dp, h in zip(self.rnns, self.hidden_dps, hidden):
            out, h = rnn(out, h)
            new_hidden.append(tuple(t.detach() for t in h))
            outputs.append(out)
            out = dp(out)
        if self.stateful:
            self.hidden = new_hidden
        return outputs[-1], out


class LanguageModel(nn.Module):
    """AWD-LSTM + a linear decoder whose weight is the embedding's (tied), with output dropout."""

    def __init__(self, vocab_sz: int, emb_sz: int = 200, n_hid: int = 400, n_layers: int = 3, output_p: float = 0.1,
                 **dropouts):
        super().__init__()
        self.body = AWDLSTM(vocab_sz, emb_sz, n_hid, n_layers, **dropouts)
        self.body.stateful = True
        self.output_dp = RNNDropout(output_p)
        self.decoder = nn.Linear(emb_sz, vocab_sz)
        self.decoder.weight = self.body.encoder.weight

    def reset(self) -> None:
        self.body.reset()

    def forward(self, x):
        _, out = self.body(x)
        return self.decoder(self.output_dp(out))


class Classifier(nn.Module):
    """The AWD-LSTM over the whole padded review, then concat pooling (last step, max and mean over the real tokens)
    and fastai's head: [BatchNorm, Dropout, Linear, ReLU] x 2 (the last without ReLU)."""

    def __init__(self, vocab_sz: int, n_classes: int, emb_sz: int = 200, n_hid: int = 400, n_layers: int = 3,
                 head: int = 50, head_p: float = 0.1, **dropouts):
        super().__init__()
        self.body = AWDLSTM(vocab_sz, emb_sz, n_hid, n_layers, **dropouts)
        self.head = nn.Sequential(nn.BatchNorm1d(3 * emb_sz), nn.Dropout(head_p), nn.Linear(3 * emb_sz, head),
                                  nn.ReLU(inplace=True), nn.BatchNorm1d(head), nn.Dropout(head_p * 2),
                                  nn.Linear(head, n_classes))

    def forward(self, x, lengths):
        raw, _ = self.body(x)  # (B, T, emb), padding first
        t = x.shape[1]
        real = torch.arange(t, device=x.device)[None, :] >= (t - lengths)[:, None]  # (B, T)
        masked = raw.masked_fill(~real[..., None], float("-inf"))
        mean = (raw * real[..., None]).sum(1) / lengths[:, None]
        return self.head(torch.cat([raw[:, -1], masked.max(1).values, mean], 1))


def lm_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Layer groups for discriminative learning rates and gradual unfreezing: each LSTM, the embedding, the head."""
    body = model.body
    groups = [list(rnn.parameters()) for rnn in body.rnns]
    groups[0] = list(body.encoder.parameters()) + groups[0]
    if isinstance(model, Classifier):
        groups.append(list(model.head.parameters()))
    else:
        groups[-1] += [model.decoder.bias]
    return groups
