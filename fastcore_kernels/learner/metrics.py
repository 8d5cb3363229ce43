"""Metrics accumulated on the device: each batch adds to tensors where the data lives, and the value is read once per
epoch, so a metric never forces a host sync per batch."""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch


class Metric(abc.ABC):
    """What the Learner calls: reset() before validation, accumulate(pred, targ) per batch, value after."""

    name = "metric"

    def reset(self) -> None:
        self.total = None
        self.count = None

    @abc.abstractmethod
    def accumulate(self, pred: torch.Tensor, targ: torch.Tensor) -> None: ...

    @property
    @abc.abstractmethod
    def value(self) -> float: ...


class SumMetric(Metric):
    """Running total / count on the device; subclasses give `batch_total(pred, targ) -> (total, count)`."""

    def accumulate(self, pred: torch.Tensor, targ: torch.Tensor) -> None:
        total, count = self.batch_total(pred.detach(), targ.detach())
        total = total.detach().double()
        count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    @abc.abstractmethod
    def batch_total(self, pred: torch.Tensor, targ: torch.Tensor): ...

    @property
    def value(self) -> float:
        if self.total is None:
            return float("nan")
        return self.finalize(float(self.total), float(self.count))

    def finalize(self, total: float, count: float) -> float:
        return total / count if count else float("nan")


class AvgMetric(SumMetric):
    """Mean over samples of a per-batch mean `fn(pred, targ)`, weighted by batch size."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn, self.name = fn, name or fn.__name__
        self.reset()

    def batch_total(self, pred, targ):
        n = targ.shape[0]
        return self.fn(pred, targ) * n, n


def _accuracy(pred, targ, axis=-1):
    return (pred.argmax(dim=axis) == targ).float().mean()


def _error_rate(pred, targ, axis=-1):
    return 1 - _accuracy(pred, targ, axis)


def accuracy(pred=None, targ=None):
    """Fraction of argmax predictions equal to the target class."""
    return AvgMetric(_accuracy, "accuracy") if pred is None else _accuracy(pred, targ)


def error_rate(pred=None, targ=None):
    return AvgMetric(_error_rate, "error_rate") if pred is None else _error_rate(pred, targ)


class _AccuracyMulti(SumMetric):
    def __init__(self, thresh: float, sigmoid: bool):
        self.thresh, self.sigmoid, self.name = thresh, sigmoid, "accuracy_multi"
        self.reset()

    def batch_total(self, pred, targ):
        p = pred.sigmoid() if self.sigmoid else pred
        return ((p > self.thresh) == targ.bool()).float().sum(), targ.numel()


def accuracy_multi(thresh: float = 0.5, sigmoid: bool = True) -> Metric:
    """Multi-label accuracy: each (sample, label) decision counts once."""
    return _AccuracyMulti(thresh, sigmoid)


class _FBeta(Metric):
    """F-beta over the whole epoch from accumulated true/false positives (not an average of batch scores)."""

    def __init__(self, beta: float, thresh: float | None, sigmoid: bool, average: str):
        if average not in ("micro", "samples"):
            raise ValueError(f"fbeta: average must be 'micro' or 'samples', got {average!r}")
        self.beta, self.thresh, self.sigmoid, self.average = beta, thresh, sigmoid, average
        self.name = f"fbeta{beta:g}"
        self.reset()

    def _decisions(self, pred, targ):
        if self.thresh is None:  # single-label: one-hot of the argmax against one-hot targets
            n = pred.shape[-1]
            return (torch.nn.functional.one_hot(pred.argmax(-1), n).bool(),
                    torch.nn.functional.one_hot(targ.long(), n).bool())
        p = pred.sigmoid() if self.sigmoid else pred
        return p > self.thresh, targ.bool()

    def accumulate(self, pred, targ):
        p, t = self._decisions(pred.detach(), targ.detach())
        b2 = self.beta**2
        if self.average == "samples":
            tp = (p & t).sum(-1).double()
            denom = (1 + b2) * tp + b2 * (~p & t).sum(-1) + (p & ~t).sum(-1)
            score = torch.where(denom > 0, (1 + b2) * tp / denom.clamp_min(1), torch.ones_like(tp))
            stats = torch.stack([score.sum(), torch.tensor(float(score.numel()), device=score.device)])
        else:
            stats = torch.stack([(p & t).sum(), (~p & t).sum(), (p & ~t).sum()]).double()
        self.total = stats if self.total is None else self.total + stats

    @property
    def value(self) -> float:
        if self.total is None:
            return float("nan")
        s = self.total.tolist()
        if self.average == "samples":
            return s[0] / s[1] if s[1] else float("nan")
        tp, fn, fp = s
        b2 = self.beta**2
        denom = (1 + b2) * tp + b2 * fn + fp
        return (1 + b2) * tp / denom if denom else 1.0


def fbeta(beta: float = 2.0, thresh: float | None = 0.5, sigmoid: bool = True, average: str = "micro") -> Metric:
    """F-beta score. thresh=None: single-label (argmax) predictions; else multi-label with a threshold."""
    return _FBeta(beta, thresh, sigmoid, average)


class _Dice(Metric):
    """Dice coefficient over the epoch for segmentation: 2|A∩B| / (|A|+|B|), foreground = class != 0."""

    name = "dice"

    def __init__(self, axis: int = 1):
        self.axis = axis
        self.reset()

    def accumulate(self, pred, targ):
        p = pred.detach().argmax(dim=self.axis) > 0
        t = targ.detach() > 0
        stats = torch.stack([(p & t).sum(), p.sum() + t.sum()]).double()
        self.total = stats if self.total is None else self.total + stats

    @property
    def value(self) -> float:
        if self.total is None:
            return float("nan")
        inter, union = self.total.tolist()
        return 2 * inter / union if union else 1.0


def dice(axis: int = 1) -> Metric:
    return _Dice(axis)


def _mse(pred, targ):
    return torch.nn.functional.mse_loss(pred.reshape(targ.shape).float(), targ.float())


def mse(pred=None, targ=None):
    return AvgMetric(_mse, "mse") if pred is None else _mse(pred, targ)


class _RMSE(AvgMetric):
    def __init__(self):
        super().__init__(_mse, "rmse")

    def finalize(self, total, count):
        return math.sqrt(total / count) if count else float("nan")


def rmse() -> Metric:
    """Root of the epoch's mean squared error (not a mean of batch roots)."""
    return _RMSE()


class _ExpRMSPE(SumMetric):
    """Root mean squared percentage error of exp(pred) vs exp(targ): Rossmann's metric for log-sales targets."""

    name = "exp_rmspe"

    def __init__(self):
        self.reset()

    def batch_total(self, pred, targ):
        p, t = torch.exp(pred.reshape(targ.shape).float()), torch.exp(targ.float())
        return (((t - p) / t) ** 2).sum(), targ.numel()

    def finalize(self, total, count):
        return math.sqrt(total / count) if count else float("nan")


def exp_rmspe() -> Metric:
    return _ExpRMSPE()


def as_metric(m) -> Metric:
    """Accepts Metric objects, the factories above (called with no arguments) or plain fn(pred, targ) callables."""
    if isinstance(m, Metric):
        return m
    if m in (accuracy, error_rate, mse, rmse, exp_rmspe, accuracy_multi, fbeta, dice):
        return m()
    if callable(m):
        return AvgMetric(m)
    raise TypeError(f"unknown metric {m!r}: pass a Metric, a metric factory or a fn(pred, targ) -> tensor")
