"""Callbacks: objects whose methods are named after the training events and run when the Learner reaches them.

Events, in order: before_fit, before_epoch, before_train, before_batch, after_pred, after_loss, before_backward,
after_backward, before_step, after_step, after_batch, after_train, before_validate, (batches), after_validate,
after_epoch, after_fit. Raising CancelBatch/CancelTrain/CancelValid/CancelEpoch/CancelFit skips the rest of that
stage; the matching after_cancel_* event then runs.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

EVENTS = (
    "before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss", "before_backward",
    "after_backward", "before_step", "after_step", "after_batch", "after_train", "before_validate", "after_validate",
    "after_epoch", "after_fit", "after_cancel_batch", "after_cancel_train", "after_cancel_validate",
    "after_cancel_epoch", "after_cancel_fit",
)


class CancelBatchException(Exception):
    pass


class CancelTrainException(Exception):
    pass


class CancelValidException(Exception):
    pass


class CancelEpochException(Exception):
    pass


class CancelFitException(Exception):
    pass


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite; the step that would have used it did not run."""


class Callback:
    """Base class. `order` sorts callbacks (lower runs first); `learn` is set when added to a Learner."""

    order = 0
    learn = None

    def __call__(self, event: str) -> None:
        method = getattr(self, event, None)
        if method is not None:
            method()

    @property
    def name(self) -> str:
        return type(self).__name__


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write never leaves a corrupt
    file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class Recorder(Callback):
    """Keeps losses (per batch, on the device until the epoch ends), lrs and momentums (per batch), and per epoch
    the train/valid losses, metric values and times. Plots are saved as PNG."""

    order = 50

    def before_fit(self):
        self.lrs, self.moms, self.losses, self.values = [], [], [], []
        self.metric_names = ["epoch", "train_loss", "valid_loss"] + [m.name for m in self.learn.metrics] + ["time"]

    def before_epoch(self):
        self._start = time.perf_counter()
        self._epoch_losses = []
        self._valid_total = None
        self._valid_count = 0

    def after_batch(self):
        learn = self.learn
        if learn.loss is None:  # the batch stopped before its loss (cancelled, or an error is on its way up)
            return
        if learn.training:
            self._epoch_losses.append(learn.loss.detach().float())
            self.lrs.append(learn.opt.param_groups[-1]["lr"])
            self.moms.append(learn.current_mom())
        else:
            n = learn.yb[0].shape[0] if learn.yb else 1
            batch = learn.loss.detach().double() * n
            self._valid_total = batch if self._valid_total is None else self._valid_total + batch
            self._valid_count += n

    def after_epoch(self):
        # One host transfer per epoch for all the batch losses.
        batch_losses = torch.stack(self._epoch_losses).tolist() if self._epoch_losses else []
        self.losses.extend(batch_losses)
        train_loss = sum(batch_losses) / len(batch_losses) if batch_losses else float("nan")
        valid_loss = float(self._valid_total) / self._valid_count if self._valid_count else float("nan")
        metrics = [m.value for m in self.learn.metrics] if self._valid_count else [float("nan")] * len(self.learn.metrics)
        self.values.append([train_loss, valid_loss] + metrics)
        self.log = [self.learn.epoch, train_loss, valid_loss] + metrics + [time.perf_counter() - self._start]

    def value(self, name: str) -> float:
        """The last epoch's value of 'train_loss', 'valid_loss' or a metric name."""
        names = self.metric_names[1:-1]
        if name not in names:
            raise KeyError(f"unknown value {name!r}; recorded: {names}")
        return self.values[-1][names.index(name)]

    def plot_loss(self, fname: str | os.PathLike = "loss.png", skip_start: int = 5) -> Path:
        plt = _pyplot()

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(skip_start, len(self.losses)), self.losses[skip_start:], label="train")
        if self.values:
            per_epoch = len(self.losses) / len(self.values)
            xs = [per_epoch * (i + 1) for i in range(len(self.values))]
            ax.plot(xs, [v[1] for v in self.values], "o-", label="valid")
        ax.set_xlabel("batches")
        ax.set_ylabel("loss")
        ax.legend()
        return _save_fig(fig, fname)

    def plot_sched(self, fname: str | os.PathLike = "schedule.png") -> Path:
        plt = _pyplot()

        fig, axs = plt.subplots(1, 2, figsize=(10, 4))
        axs[0].plot(self.lrs)
        axs[0].set_ylabel("learning rate")
        axs[1].plot(self.moms)
        axs[1].set_ylabel("momentum")
        for a in axs:
            a.set_xlabel("batches")
        return _save_fig(fig, fname)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first plot (not at package import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, fname) -> Path:
    plt = _pyplot()
    path = Path(fname)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ProgressCallback(Callback):
    """Epoch and batch progress on stderr, and a table of each epoch's results on stdout."""

    order = 60

    def __init__(self, stream=None, show_batches: bool | None = None):
        self.stream = stream or sys.stdout
        self.show_batches = sys.stderr.isatty() if show_batches is None else show_batches

    def before_fit(self):
        self._header = False

    def before_train(self):
        self._n = len(self.learn.dls.train) if hasattr(self.learn.dls.train, "__len__") else 0

    def after_batch(self):
        if self.show_batches and self.learn.training and self._n:
            i = self.learn.iter + 1
            sys.stderr.write(f"\repoch {self.learn.epoch + 1}/{self.learn.n_epoch}  batch {i}/{self._n}")
            sys.stderr.flush()

    def after_epoch(self):
        rec = self.learn.recorder
        if self.show_batches:
            sys.stderr.write("\r" + " " * 60 + "\r")
        widths = [max(len(n), 10) for n in rec.metric_names]
        if not self._header:
            print("  ".join(n.rjust(w) for n, w in zip(rec.metric_names, widths)), file=self.stream)
            self._header = True
        cells = [str(rec.log[0])] + [f"{v:.6f}" for v in rec.log[1:-1]] + [f"{rec.log[-1]:.2f}s"]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)), file=self.stream, flush=True)


class _Monitor(Callback):
    """Shared by EarlyStopping and SaveModel: watches one recorded value, lower is better unless told otherwise."""

    order = Recorder.order + 1

    def __init__(self, monitor: str = "valid_loss", comp: str | None = None, min_delta: float = 0.0):
        if comp is None:
            comp = "max" if any(k in monitor for k in ("accuracy", "dice", "fbeta")) else "min"
        if comp not in ("min", "max"):
            raise ValueError(f"comp must be 'min' or 'max', got {comp!r}")
        self.monitor, self.comp, self.min_delta = monitor, comp, abs(min_delta)

    def before_fit(self):
        names = self.learn.recorder.metric_names[1:-1]
        if self.monitor not in names:
            raise ValueError(f"{self.name} monitors {self.monitor!r}, which is not recorded; recorded: {names}")
        self.best = math.inf if self.comp == "min" else -math.inf

    def _improved(self) -> bool:
        value = self.learn.recorder.value(self.monitor)
        better = (value < self.best - self.min_delta) if self.comp == "min" else (value > self.best + self.min_delta)
        if better:
            self.best = value
        return better


class EarlyStopping(_Monitor):
    """Stops training when `monitor` has not improved by `min_delta` for `patience` epochs."""

    def __init__(self, monitor: str = "valid_loss", comp: str | None = None, min_delta: float = 0.0,
                 patience: int = 1):
        super().__init__(monitor, comp, min_delta)
        self.patience = patience

    def before_fit(self):
        super().before_fit()
        self.wait = 0
        self.stopped_epoch = None

    def after_epoch(self):
        if self._improved():
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = self.learn.epoch
            raise CancelFitException()


class SaveModel(_Monitor):
    """Saves the model (and optimizer) whenever `monitor` improves, atomically, to learn.path/models/fname.pth;
    at the end of fit loads the best one back (load_best)."""

    def __init__(self, monitor: str = "valid_loss", comp: str | None = None, min_delta: float = 0.0,
                 fname: str = "model", every_epoch: bool = False, with_opt: bool = False, load_best: bool = True):
        super().__init__(monitor, comp, min_delta)
        self.fname, self.every_epoch, self.with_opt, self.load_best = fname, every_epoch, with_opt, load_best

    def before_fit(self):
        super().before_fit()
        self.saved = None

    def after_epoch(self):
        if self.every_epoch:
            self.saved = self.learn.save(f"{self.fname}_{self.learn.epoch}", with_opt=self.with_opt)
        elif self._improved():
            self.saved = self.learn.save(self.fname, with_opt=self.with_opt)

    def after_fit(self):
        if self.load_best and not self.every_epoch and self.saved is not None:
            self.learn.load(self.fname, with_opt=self.with_opt)


class GradientClip(Callback):
    """Clips the global gradient norm to `max_norm` before each step (unscaling first under MixedPrecision)."""

    order = 10

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        self.max_norm, self.norm_type = max_norm, norm_type

    def before_step(self):
        scaler = getattr(self.learn, "scaler", None)
        if scaler is not None:
            scaler.unscale_(self.learn.opt)
        params = [p for g in self.learn.opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)


class MixedPrecision(Callback):
    """Forward and loss under torch.autocast (fp16 with a GradScaler, or bf16 which needs none). Default dtype:
    fp16 on CUDA, bf16 on the CPU."""

    order = 5

    def __init__(self, dtype: torch.dtype | None = None, init_scale: float = 2.0**16):
        self.dtype, self.init_scale = dtype, init_scale

    def before_fit(self):
        device = self.learn.dls.device
        self.device_type = device.type
        self.amp_dtype = self.dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)
        use_scaler = self.amp_dtype == torch.float16
        self.learn.scaler = torch.amp.GradScaler(device.type, init_scale=self.init_scale) if use_scaler else None

    def before_batch(self):
        self._ctx = torch.autocast(self.device_type, dtype=self.amp_dtype)
        self._ctx.__enter__()

    def after_loss(self):
        self._exit()
        scaler = self.learn.scaler
        if scaler is not None and self.learn.training:
            self.learn.loss_grad = scaler.scale(self.learn.loss)

    def after_cancel_batch(self):
        self._exit()

    def _exit(self):
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def after_fit(self):
        self._exit()
        self.learn.scaler = None


class Timer(Callback):
    """Wall time of each epoch's training and validation, and training samples per second."""

    order = Recorder.order - 1

    def before_fit(self):
        self.epoch_times, self.samples_per_s = [], []

    def _sync(self):
        if self.learn.dls.device.type == "cuda":
            torch.cuda.synchronize(self.learn.dls.device)

    def before_train(self):
        self._sync()
        self._t0, self._n = time.perf_counter(), 0

    def after_batch(self):
        if self.learn.training:
            self._n += self.learn.yb[0].shape[0] if self.learn.yb else 0

    def after_train(self):
        self._sync()
        dt = time.perf_counter() - self._t0
        self.samples_per_s.append(self._n / dt if dt > 0 else float("nan"))

    def before_epoch(self):
        self._e0 = time.perf_counter()

    def after_epoch(self):
        self._sync()
        self.epoch_times.append(time.perf_counter() - self._e0)
