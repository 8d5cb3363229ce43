"""ULMFiT on the text of fastcore_kernels.lessons.text: pretrain the AWD-LSTM language model on all the training
text (labelled and unlabelled), then fine-tune a classifier from its encoder with gradual unfreezing and
discriminative learning rates. Lesson 3's `imdb-lm` part runs the first stage, lesson 4's `imdb` both."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, Learner, accuracy
from fastcore_kernels.learner.metrics import AvgMetric
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import human_numbers as hn
from fastcore_kernels.lessons import text as tx

# The model is scaled to this 2-core CPU (the paper's AWD-LSTM is 400/1152/3 layers); --data runs use it too.
SIZES = {"emb_sz": 96, "n_hid": 192, "n_layers": 3}
LM_EPOCHS, CLAS_EPOCHS, DISC = 4, 4, 1.5


def load_texts(data, out: Path, quick: bool):
    if data is not None and Path(data).suffix == ".csv":
        texts = tx.read_text_csv(data)
    else:
        folder = Path(data) if data is not None else out / "data"
        if data is None and not (folder / "train").is_dir():
            sizes = (300, 300, 100) if quick else (2000, 1000, 1000)
            tx.write_sentiment_corpus(folder, *sizes)
        texts = tx.read_imdb(folder)
    if quick:  # a random slice: the folder order puts every positive review first
        g = torch.Generator().manual_seed(0)
        texts = {k: [v[i] for i in torch.randperm(len(v), generator=g)[:300].tolist()] for k, v in texts.items()}
    return texts


class Corpus:
    """Tokens, vocabulary and ids of every split; the vocabulary comes from the training texts (labelled and not)."""

    def __init__(self, texts):
        self.tokens = {k: [tx.tokenize(t) for t, _ in v] for k, v in texts.items()}
        self.labels = {k: [y for _, y in v] for k, v in texts.items()}
        self.vocab = tx.Vocab(self.tokens["train"] + self.tokens["unsup"], min_freq=2)
        self.ids = {k: [self.vocab.numericalize(t) for t in v] for k, v in self.tokens.items()}
        self.n_classes = max(self.labels["train"]) + 1


def lm_data(corpus: Corpus, device, bs: int = 32, bptt: int = 70) -> DataLoaders:
    texts = corpus.ids["train"] + corpus.ids["unsup"]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    n_valid = max(1, len(texts) // 10)

    def loader(idx):  # fewer rows when a (quick, small) stream cannot fill bs rows of bptt tokens
        ids = torch.tensor([t for i in idx for t in texts[i]], dtype=torch.long)
        return hn.StreamLoader(ids, max(1, min(bs, (len(ids) - 1) // bptt)), bptt, device)
    return DataLoaders(loader(order[n_valid:]), loader(order[:n_valid]), device=device)


def fit_language_model(corpus: Corpus, device, kernel_sets, out: Path, epochs: int, lesson: int, part: str):
    """Trains the language model once per kernel set; returns its results and {kernels: encoder state_dict}."""
    dls = lm_data(corpus, device)
    encoders = {}

    def fit(learn):
        learn.fit_one_cycle(epochs, 1e-2, moms=(0.8, 0.7, 0.8))
        encoders[learn.kernels] = {k: v.detach().clone() for k, v in learn.model.body.state_dict().items()}

    def extra(learn):
        return {"perplexity": round(math.exp(learn.recorder.value("valid_loss")), 3), "vocab": len(corpus.vocab)}
    results = train_kernel_sets(
        lesson, part, "awd-lstm LM", lambda: tx.LanguageModel(len(corpus.vocab), **SIZES), dls,
        hn.flat_cross_entropy, kernel_sets=kernel_sets, out=out, fit=fit, extra=extra,
        metrics=[AvgMetric(hn.flat_accuracy, "accuracy")], cbs=lambda: [hn.ResetState()],
        learner_kwargs={"splitter": tx.lm_splitter, "wd": 0.1})
    return results, encoders


def fit_classifier(corpus: Corpus, encoders: dict, device, kernel_sets, out: Path, epochs: int):
    """Gradual unfreezing: the head, then one more LSTM at a time, then everything, each stage a 1cycle fit with
    discriminative learning rates (each layer group DISC times the lr of the one below it, the head highest).
    fastai's factor is 2.6; this small model, pretrained on a small corpus, needs its lower layers to move more."""
    dls = DataLoaders(tx.SortedBatches(corpus.ids["train"], corpus.labels["train"], 32, True, device),
                      tx.SortedBatches(corpus.ids["test"], corpus.labels["test"], 64, False, device), device=device)
    moms = (0.8, 0.7, 0.8)

    def fit(learn):
        learn.model.body.load_state_dict(encoders[learn.kernels])
        learn.freeze()
        learn.fit_one_cycle(1, 1e-2, moms=moms)
        for n in (-2, -3):
            learn.freeze_to(n)
            learn.fit_one_cycle(1, slice(5e-3 / DISC**3, 5e-3), moms=moms)
        learn.unfreeze()
        learn.fit_one_cycle(epochs, slice(3e-3 / DISC**3, 3e-3), moms=moms)
    majority = max(corpus.labels["test"].count(c) for c in range(corpus.n_classes)) / len(corpus.labels["test"])
    return train_kernel_sets(
        4, "imdb", "awd-lstm classifier", lambda: tx.Classifier(len(corpus.vocab), corpus.n_classes, **SIZES), dls,
        F.cross_entropy, kernel_sets=kernel_sets, out=out, fit=fit, metrics=[accuracy], learner_kwargs={"splitter": tx.lm_splitter, "wd": 0.1},
        extra=lambda learn: {"majority_class": round(majority, 4)})


def run_imdb_lm(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                out: Path = Path("lesson_out")) -> list[RunResult]:
    corpus = Corpus(load_texts(data, out, quick))
    print(f"lesson 3 imdb-lm: {len(corpus.ids['train']) + len(corpus.ids['unsup'])} texts, vocab "
          f"{len(corpus.vocab)}", flush=True)
    return fit_language_model(corpus, device, kernel_sets, out, 1 if quick else (epochs or LM_EPOCHS), 3,
                              "imdb-lm")[0]


def run_imdb(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
             out: Path = Path("lesson_out")) -> list[RunResult]:
    corpus = Corpus(load_texts(data, out, quick))
    print(f"lesson 4 imdb: {len(corpus.ids['train'])} labelled reviews, {len(corpus.ids['unsup'])} unlabelled, "
          f"{len(corpus.ids['test'])} test; vocab {len(corpus.vocab)}", flush=True)
    results, encoders = fit_language_model(corpus, device, kernel_sets, out, 1 if quick else (epochs or LM_EPOCHS),
                                           4, "imdb")
    return results + fit_classifier(corpus, encoders, device, kernel_sets, out, 1 if quick else (epochs or CLAS_EPOCHS))
