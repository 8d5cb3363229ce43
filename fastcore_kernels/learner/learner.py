"""Learner: the fastai training loop, kept small, on fastcore_kernels' optimizers.

`kernels="fused"` trains on fastcore_kernels: `fastcore_kernels.fuse(model)` swaps the fused batch-norm/conv
modules into the model, and FusedAdam steps it; `kernels="stock"` trains the model as given with torch.optim.AdamW,
so a lesson can run both and compare. Weight decay is decoupled (AdamW); norm-layer weights and biases get none unless `bn_wd=True`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from fastcore_kernels.learner.callbacks import (
    EVENTS, CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException,
    CancelValidException, Callback, NonFiniteLossError, ProgressCallback, Recorder, atomic_save,
)
from fastcore_kernels.learner.metrics import as_metric
from fastcore_kernels.learner.schedule import one_cycle, sched_exp
from fastcore_kernels.nn import fuse
from fastcore_kernels.optim import FusedAdam, FusedAdamW

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _to_device(b, device):
    if isinstance(b, torch.Tensor):
        return b.to(device, non_blocking=True)
    if isinstance(b, (list, tuple)):
        return type(b)(_to_device(x, device) for x in b)
    return b


def _no_decay_params(model: nn.Module) -> set[int]:
    """ids of norm-layer parameters and biases: fastai's default exclusions from weight decay."""
    ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or name.endswith("bias"):
                ids.add(id(p))
    return ids


@dataclass
class SuggestedLRs:
    valley: float
    minimum: float
    steep: float
    lrs: list
    losses: list
    plot: Path | None


class Learner:
    """Trains `model` on `dls` with `loss_func`.

    splitter(model) -> list of parameter lists (layer groups, body first) for freezing and discriminative lrs.
    nan_check: "batch" stops at the first non-finite training loss before its optimizer step runs (on CUDA the host
    waits for that batch's forward pass, not for the whole queue); None skips the check.
    """

    def __init__(self, dls, model: nn.Module, loss_func: Callable, opt_func=FusedAdam, lr: float = 1e-3,
                 wd: float = 1e-2, metrics: Sequence = (), cbs: Sequence[Callback] = (), splitter=None,
                 kernels: str = "fused", path: str | Path = ".", model_dir: str = "models", bn_wd: bool = False,
                 train_bn: bool = True, nan_check: str | None = "batch", progress: bool = True):
        if kernels not in ("fused", "stock"):
            raise ValueError(f"kernels must be 'fused' or 'stock', got {kernels!r}")
        if nan_check not in ("batch", None):
            raise ValueError(f"nan_check must be 'batch' or None, got {nan_check!r}")
        if not callable(loss_func):
            raise TypeError(f"loss_func must be callable, got {loss_func!r}")
        self.dls, self.loss_func, self.lr, self.wd = dls, loss_func, lr, wd
        self.kernels, self.bn_wd, self.train_bn, self.nan_check = kernels, bn_wd, train_bn, nan_check
        if kernels == "fused":
            # In place: the modules keep their parameters, so the caller's model is the one trained (use
            # learn.model: a module whose own forward was rewritten comes back as a torch.fx GraphModule).
            model = fuse(model, inplace=True)
        self.model = model.to(dls.device) if dls is not None else model
        if kernels == "stock" and opt_func in (FusedAdam, FusedAdamW):
            opt_func = torch.optim.AdamW
        self.opt_func = opt_func
        self.splitter = splitter or (lambda m: [list(m.parameters())])
        self.metrics = [as_metric(m) for m in metrics]
        self.path, self.model_dir = Path(path), model_dir
        self.opt = None
        self.scaler = None
        self.cbs: list[Callback] = []
        self.recorder = Recorder()
        self.add_cbs([self.recorder] + ([ProgressCallback()] if progress else []) + list(cbs))
        self.epoch = self.iter = 0
        self.n_epoch = 1
        self.training = False
        self._frozen_to: int | None = None

    # --- callbacks --------------------------------------------------------------------------------------------
    def add_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            if isinstance(cb, type):
                cb = cb()
            cb.learn = self
            self.cbs.append(cb)
        self.cbs.sort(key=lambda c: c.order)

    def remove_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            if cb in self.cbs:
                self.cbs.remove(cb)

    @contextlib.contextmanager
    def added_cbs(self, cbs: Sequence[Callback]):
        self.add_cbs(cbs)
        try:
            yield
        finally:
            self.remove_cbs(cbs)

    def __call__(self, event: str) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        for cb in list(self.cbs):
            cb(event)

    # --- optimizer, layer groups, hyper-parameters ------------------------------------------------------------
    def layer_groups(self) -> list[list[nn.Parameter]]:
        groups = [list(g) for g in self.splitter(self.model)]
        if not groups or any(not g for g in groups):
            raise ValueError("splitter must return a non-empty list of non-empty parameter lists")
        return groups

    def create_opt(self) -> None:
        no_decay = set() if self.bn_wd else _no_decay_params(self.model)
        param_groups = []
        layer_groups = self.layer_groups()
        for i, params in enumerate(layer_groups):
            decay = [p for p in params if id(p) not in no_decay]
            plain = [p for p in params if id(p) in no_decay]
            if decay:
                param_groups.append({"params": decay, "layer_group": i, "wd_mult": 1.0})
            if plain:
                param_groups.append({"params": plain, "layer_group": i, "wd_mult": 0.0})
        kwargs = {"lr": self.lr, "weight_decay": self.wd}
        if self.opt_func is FusedAdam:
            kwargs["decoupled_weight_decay"] = True
        self.opt = self.opt_func(param_groups, **kwargs)
        self.n_layer_groups = len(layer_groups)
        self.set_hypers(lr=self.lr, wd=self.wd)
        if self._frozen_to is not None:  # never touch requires_grad the user set unless freeze* was called
            self.freeze_to(self._frozen_to)

    def lrs_for(self, lr) -> list[float]:
        """One lr per layer group from a float, a slice (fastai semantics) or a list."""
        # The count is cached with the optimizer: the 1cycle scheduler calls this every batch.
        n = self.n_layer_groups if self.opt is not None else len(self.layer_groups())
        if isinstance(lr, slice):
            if lr.stop is None or lr.step is not None:
                raise ValueError(f"lr slice must be slice(hi) or slice(lo, hi), got {lr}")
            if lr.start is None:
                return [lr.stop / 10] * (n - 1) + [lr.stop]
            if not 0 < lr.start <= lr.stop:
                raise ValueError(f"lr slice needs 0 < lo <= hi, got {lr}")
            if n == 1:
                return [lr.stop]
            step = (lr.stop / lr.start) ** (1 / (n - 1))
            return [lr.start * step**i for i in range(n)]
        if isinstance(lr, (list, tuple)):
            if len(lr) != n:
                raise ValueError(f"{len(lr)} learning rates for {n} layer groups")
            return [float(x) for x in lr]
        return [float(lr)] * n

    def set_hypers(self, lr=None, mom: float | None = None, wd: float | None = None) -> None:
        if self.opt is None:
            self.create_opt()
        lrs = self.lrs_for(lr) if lr is not None else None
        for g in self.opt.param_groups:
            i = g.get("layer_group", 0)
            if lrs is not None:
                g["lr"] = lrs[i]
            if wd is not None:
                g["weight_decay"] = wd * g.get("wd_mult", 1.0)
            if mom is not None:
                if "betas" in g:
                    g["betas"] = (mom, g["betas"][1])
                elif "momentum" in g:
                    g["momentum"] = mom

    def current_mom(self) -> float:
        g = self.opt.param_groups[-1]
        return g["betas"][0] if "betas" in g else g.get("momentum", float("nan"))

    # --- freezing ---------------------------------------------------------------------------------------------
    def freeze_to(self, n: int) -> None:
        """Train only layer groups n, n+1, ... (negative n counts from the end); norm layers stay trainable when
        train_bn."""
        groups = self.layer_groups()
        n = n % len(groups) if n < 0 else n
        if n >= len(groups):
            raise ValueError(f"freeze_to({n}) would freeze all {len(groups)} layer groups")
        self._frozen_to = n
        norm_ids = {id(p) for m in self.model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters()}
        for i, params in enumerate(groups):
            for p in params:
                p.requires_grad_(i >= n or (self.train_bn and id(p) in norm_ids))

    def freeze(self) -> None:
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        self.freeze_to(0)

    # --- the loop ---------------------------------------------------------------------------------------------
    def _split(self, b):
        b = _to_device(b, self.dls.device)
        return (b[:-1], b[-1:]) if len(b) > 1 else (b, ())

    def _one_batch(self, i: int, b) -> None:
        self.iter = i
        self.xb, self.yb = self._split(b)
        self.pred = self.loss = None
        try:
            self("before_batch")
            self.pred = self.model(*self.xb)
            self("after_pred")
            if not self.yb:
                return
            if i == 0 and self.epoch == 0:
                _check_shapes(self.loss_func, self.pred, self.yb[0])
            self.loss = self.loss_func(self.pred, *self.yb)
            self.loss_grad = self.loss
            self("after_loss")
            if not self.training:
                return
            finite = self._finite_flag() if self.nan_check == "batch" else None
            self("before_backward")
            self.loss_grad.backward()
            self("after_backward")
            if finite is not None and not finite():
                raise NonFiniteLossError(
                    f"training loss is {self.loss.item()} at epoch {self.epoch}, batch {i}; stopped before the "
                    "optimizer step (lower the learning rate, check the data, or pass nan_check=None)"
                )
            self("before_step")
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self("after_step")
            self.opt.zero_grad()
        except CancelBatchException:
            self("after_cancel_batch")
        finally:
            self("after_batch")

    def _finite_flag(self) -> Callable[[], bool]:
        """Whether this batch's loss is finite, read just before the step. On CUDA the flag is copied to pinned
        memory behind an event, so the host waits for the forward pass only, while the backward is already queued,
        rather than for the whole stream."""
        flag = torch.isfinite(self.loss.detach()).all()
        if flag.device.type != "cuda":
            return lambda: bool(flag)
        if getattr(self, "_flag_host", None) is None:
            self._flag_host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._flag_host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def read() -> bool:
            done.synchronize()
            return bool(self._flag_host)

        return read

    def _epoch(self, train: bool) -> None:
        self.training = train
        self.model.train(train)
        dl = self.dls.train if train else self.dls.valid
        self.n_iter = len(dl) if hasattr(dl, "__len__") else 0
        name, cancel = ("train", CancelTrainException) if train else ("validate", CancelValidException)
        try:
            self(f"before_{name}")
            if not train:
                for m in self.metrics:
                    m.reset()
            with torch.set_grad_enabled(train):
                for i, b in enumerate(dl):
                    if train:
                        self.pct_train = (self.epoch + i / max(self.n_iter, 1)) / self.n_epoch
                    self._one_batch(i, b)
                    if not train and self.yb:
                        for m in self.metrics:
                            m.accumulate(self.pred, *self.yb)
            self(f"after_{name}")
        except cancel:
            self(f"after_cancel_{name}")

    def fit(self, n_epoch: int, lr=None, wd: float | None = None, cbs: Sequence[Callback] = ()) -> None:
        if n_epoch < 1:
            raise ValueError(f"n_epoch must be >= 1, got {n_epoch}")
        if self.dls is None:
            raise RuntimeError("this Learner has no data (made by load_learner): it can only predict")
        with self.added_cbs(list(cbs)):
            if self.opt is None:
                self.create_opt()
            self.set_hypers(lr=lr, wd=self.wd if wd is None else wd)
            self.n_epoch = n_epoch
            try:
                self("before_fit")
                for epoch in range(n_epoch):
                    self.epoch = epoch
                    try:
                        self("before_epoch")
                        self._epoch(train=True)
                        self._epoch(train=False)
                    except CancelEpochException:
                        self("after_cancel_epoch")
                    finally:
                        self("after_epoch")
            except CancelFitException:
                self("after_cancel_fit")
            finally:
                # Whatever stopped training, leave no half-made gradients and the model in eval mode.
                if self.opt is not None:
                    self.opt.zero_grad()
                self.training = False
                self.model.eval()
                self("after_fit")

    def fit_one_cycle(self, n_epoch: int, lr_max=None, div: float = 25.0, div_final: float = 1e5,
                      pct_start: float = 0.25, moms=(0.95, 0.85, 0.95), wd: float | None = None,
                      cbs: Sequence[Callback] = ()) -> None:
        """fastai's 1cycle policy: cosine warm-up of lr to lr_max and down to lr_max/div_final, momentum inverse."""
        lr_max = self.lr if lr_max is None else lr_max
        self.fit(n_epoch, wd=wd, cbs=[ParamScheduler(lr_max, div, div_final, pct_start, moms)] + list(cbs))

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
                  pct_start: float = 0.3, div: float = 5.0, **kwargs) -> None:
        """Train the head with the body frozen, then everything with discriminative lrs (fastai's recipe)."""
        self.freeze()
        self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, **kwargs)
        base_lr /= 2
        self.unfreeze()
        self.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div, **kwargs)

    # --- lr finder --------------------------------------------------------------------------------------------
    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, stop_div: bool = True,
                fname: str | Path | None = "lr_find.png") -> SuggestedLRs:
        """Trains with an exponentially growing lr until num_it batches or divergence, then restores the model and
        optimizer as they were; returns suggested lrs and saves the loss-vs-lr plot."""
        if self.opt is None:
            self.create_opt()
        saved_model = copy.deepcopy(self.model.state_dict())
        saved_opt = copy.deepcopy(self.opt.state_dict())
        finder = _LRFinder(start_lr, end_lr, num_it, stop_div)
        progress = [cb for cb in self.cbs if isinstance(cb, ProgressCallback)]
        self.remove_cbs(progress)
        n_epoch = max(1, math.ceil(num_it / max(len(self.dls.train), 1)))
        try:
            with contextlib.suppress(NonFiniteLossError):  # a NaN loss is divergence here
                self.fit(n_epoch, cbs=[finder])
        finally:
            self.model.load_state_dict(saved_model)
            self.opt.load_state_dict(saved_opt)
            self.add_cbs(progress)
        lrs, losses = finder.lrs, finder.smooth_losses
        if len(losses) < 3:
            raise RuntimeError("lr_find diverged at once; lower start_lr")
        plot = _plot_lr_find(lrs, losses, fname) if fname is not None else None
        return SuggestedLRs(*_suggestions(lrs, losses), lrs=lrs, losses=losses, plot=plot)

    # --- inference --------------------------------------------------------------------------------------------
    def _activation(self):
        kind = _loss_kind(self.loss_func)
        if kind == "ce":
            return lambda x: torch.softmax(x, dim=1)  # class dim 1, as cross_entropy (N,C) and (N,C,H,W) alike
        if kind == "bce":
            return torch.sigmoid
        return lambda x: x

    @torch.no_grad()
    def get_preds(self, ds_idx: int = 1, dl=None, with_loss: bool = False, act=None):
        """(activated predictions, targets[, per-item losses]) over a loader, on the CPU."""
        dl = dl if dl is not None else self.dls[ds_idx]
        act = act or self._activation()
        self.model.eval()
        preds, targs, losses = [], [], []
        for b in dl:
            xb, yb = self._split(b)
            out = self.model(*xb)
            preds.append(act(out.float()))
            if yb:
                targs.append(yb[0])
                if with_loss:
                    losses.append(_per_item_loss(self.loss_func, out, yb[0]))
        res = [torch.cat(preds).cpu(), torch.cat(targs).cpu() if targs else None]
        if with_loss:
            res.append(torch.cat(losses).cpu())
        return tuple(res)

    @torch.no_grad()
    def predict(self, item: torch.Tensor, batched: bool = False):
        """Prediction for one item (or a batch with batched=True): (decoded, activated output)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        x = item.to(device)
        out = self.model(x if batched else x.unsqueeze(0))
        probs = self._activation()(out.float())
        kind = _loss_kind(self.loss_func)
        decoded = probs > 0.5 if kind == "bce" else probs.argmax(1) if kind == "ce" else probs
        if not batched:
            decoded, probs = decoded[0], probs[0]
        return decoded.cpu(), probs.cpu()

    # --- persistence ------------------------------------------------------------------------------------------
    def save(self, name: str, with_opt: bool = True) -> Path:
        state = {"model": self.model.state_dict()}
        if with_opt and self.opt is not None:
            state["opt"] = self.opt.state_dict()
        return atomic_save(state, self.path / self.model_dir / f"{name}.pth")

    def load(self, name: str, with_opt: bool = True, strict: bool = True) -> "Learner":
        device = next(self.model.parameters()).device
        state = torch.load(self.path / self.model_dir / f"{name}.pth", map_location=device, weights_only=True)
        self.model.load_state_dict(state["model"], strict=strict)
        if with_opt and "opt" in state:
            if self.opt is None:
                self.create_opt()
            self.opt.load_state_dict(state["opt"])
        return self

    def export(self, fname: str | Path = "export.pkl") -> Path:
        """Model and loss function (and so the prediction decoding) without the data, for load_learner."""
        model = copy.deepcopy(self.model).cpu().eval()
        return atomic_save({"model": model, "loss_func": self.loss_func, "kernels": self.kernels},
                           self.path / fname)


def load_learner(fname: str | Path, device: str | torch.device = "cpu") -> Learner:
    """A Learner for inference from Learner.export. The file holds pickled code: load only files you trust."""
    state = torch.load(fname, map_location=device, weights_only=False)
    learn = Learner(None, state["model"].to(device), state["loss_func"], kernels=state["kernels"], progress=False)
    learn.model.eval()
    return learn


def _check_shapes(loss_func, pred: torch.Tensor, targ: torch.Tensor) -> None:
    """Model output vs target, checked on the first batch (no sync): torch's regression losses broadcast
    mismatched shapes with only a warning, which trains on a silently wrong objective."""
    if pred.shape[0] != targ.shape[0]:
        raise ValueError(f"the model returned {pred.shape[0]} predictions for a batch of {targ.shape[0]} targets "
                         f"(output {tuple(pred.shape)}, target {tuple(targ.shape)})")
    elementwise = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss, nn.BCELoss)
    if isinstance(loss_func, elementwise) and pred.shape != targ.shape:
        raise ValueError(f"{type(loss_func).__name__} needs the model output {tuple(pred.shape)} to match the target "
                         f"{tuple(targ.shape)}; reshape one of them")


def _loss_kind(loss_func) -> str | None:
    """'ce', 'bce' or 'mse' for torch's module and functional forms; decides activation, decoding, per-item loss."""
    kinds = {"ce": (nn.CrossEntropyLoss, "cross_entropy"), "bce": (nn.BCEWithLogitsLoss,
             "binary_cross_entropy_with_logits"), "mse": (nn.MSELoss, "mse_loss")}
    for kind, (cls, fname) in kinds.items():
        if isinstance(loss_func, cls) or getattr(loss_func, "__name__", "") == fname:
            return kind
    return None


def _per_item_loss(loss_func, out, targ):
    kind, n = _loss_kind(loss_func), len(targ)
    if kind == "ce":
        return nn.functional.cross_entropy(out.float(), targ, reduction="none").reshape(n, -1).mean(1)
    if kind == "bce":
        return nn.functional.binary_cross_entropy_with_logits(out.float(), targ.float(), reduction="none").reshape(
            n, -1).mean(1)
    if kind == "mse":
        return ((out.float().reshape(targ.shape) - targ.float()) ** 2).reshape(n, -1).mean(1)
    return torch.stack([loss_func(o[None], t[None]) for o, t in zip(out, targ)])


class ParamScheduler(Callback):
    """Sets lr (per layer group) and momentum every training batch from the 1cycle schedules."""

    order = 1

    def __init__(self, lr_max, div, div_final, pct_start, moms):
        self.lr_max, self.div, self.div_final, self.pct_start, self.moms = lr_max, div, div_final, pct_start, moms

    def before_fit(self):
        self.lr_maxes = self.learn.lrs_for(self.lr_max)
        self.lr_sched, self.mom_sched = one_cycle(1.0, self.div, self.div_final, self.pct_start, self.moms)
        self.hist = []

    def before_batch(self):
        if not self.learn.training:
            return
        f = self.lr_sched(self.learn.pct_train)
        mom = self.mom_sched(self.learn.pct_train)
        self.learn.set_hypers(lr=[m * f for m in self.lr_maxes], mom=mom)
        self.hist.append((self.learn.pct_train, f, mom))


class _LRFinder(Callback):
    order = 1

    def __init__(self, start_lr, end_lr, num_it, stop_div):
        self.start_lr, self.end_lr, self.num_it, self.stop_div = start_lr, end_lr, num_it, stop_div

    def before_fit(self):
        self.lrs, self.smooth_losses = [], []
        self.avg, self.best, self.it = 0.0, math.inf, 0

    def before_batch(self):
        if not self.learn.training:
            return
        lr = sched_exp(self.start_lr, self.end_lr, self.it / max(self.num_it - 1, 1))
        self.learn.set_hypers(lr=lr)
        self.lr = lr

    def after_step(self):
        loss = self.learn.loss.detach().item()  # lr_find needs every loss now: one sync per batch is the point
        self.it += 1
        self.avg = 0.98 * self.avg + 0.02 * loss
        smooth = self.avg / (1 - 0.98**self.it)
        self.lrs.append(self.lr)
        self.smooth_losses.append(smooth)
        self.best = min(self.best, smooth)
        if self.it >= self.num_it or (self.stop_div and (smooth > 4 * self.best or not math.isfinite(smooth))):
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()


def _suggestions(lrs: list, losses: list) -> tuple[float, float, float]:
    """fastai's three suggestions: the valley (longest descending stretch, 2/3 down it), the minimum / 10, and
    the steepest descent."""
    n = len(losses)
    logs = [math.log10(x) for x in lrs]
    grads = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, n - 1)]
    steep = lrs[1 + min(range(len(grads)), key=grads.__getitem__)]
    minimum = lrs[min(range(n), key=losses.__getitem__)] / 10
    # Longest strictly-decreasing run of the smoothed loss, as fastai's valley.
    best_len, best_start, start = 1, 0, 0
    for i in range(1, n):
        if losses[i] >= losses[i - 1]:
            start = i
        elif i - start + 1 > best_len:
            best_len, best_start = i - start + 1, start
    idx = best_start + int(2 * (best_len - 1) / 3)
    return lrs[idx], minimum, steep


def _plot_lr_find(lrs, losses, fname) -> Path:
    from fastcore_kernels.learner.callbacks import _pyplot, _save_fig

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    return _save_fig(fig, fname)
