"""Looking inside a trained model: ClassificationInterpretation (confusion matrix, top losses), forward hooks, and
Grad-CAM heatmaps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastcore_kernels.learner.callbacks import _pyplot, _save_fig


class Hook:
    """Keeps the output of `module` from each forward (detached by default). Remove with .remove() or `with`."""

    def __init__(self, module: nn.Module, detach: bool = True):
        self.detach, self.stored = detach, None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.stored = output.detach() if self.detach else output

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Hooks(list):
    """One Hook per module; `.stored` lists their outputs."""

    def __init__(self, modules: Sequence[nn.Module], detach: bool = True):
        super().__init__(Hook(m, detach) for m in modules)

    @property
    def stored(self) -> list:
        return [h.stored for h in self]

    def remove(self) -> None:
        for h in self:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def hook_output(module: nn.Module, detach: bool = True) -> Hook:
    return Hook(module, detach)


def hook_outputs(modules: Sequence[nn.Module], detach: bool = True) -> Hooks:
    return Hooks(modules, detach)


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, class_idx: int | None = None,
             fname: str | os.PathLike | None = None) -> torch.Tensor:
    """Grad-CAM for one image x (C, H, W): the layer's activations weighted by the mean gradient of the class score
    per channel, ReLU'd, upsampled to H x W and scaled to [0, 1]. Saves image + heatmap overlay to fname if given."""
    if x.dim() != 3:
        raise ValueError(f"grad_cam takes one image (C, H, W), got shape {tuple(x.shape)}")
    model.eval()
    device = next(model.parameters()).device
    xb = x.unsqueeze(0).to(device)
    with Hook(layer, detach=False) as act:
        out = model(xb)
        cls = int(out.argmax(-1)) if class_idx is None else class_idx
        a = act.stored
        grad = torch.autograd.grad(out[0, cls], a)[0]
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * a).sum(1, keepdim=True)).detach()
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = (cam / cam.max() if cam.max() > 0 else cam).cpu()
    if fname is not None:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(4, 4))
        img = x.detach().float().cpu()
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        ax.imshow(cam.numpy(), cmap="magma", alpha=0.5, extent=(0, x.shape[-1], x.shape[-2], 0))
        ax.set_title(f"Grad-CAM, class {cls}")
        ax.axis("off")
        _save_fig(fig, fname)
    return cam


class ClassificationInterpretation:
    """Predictions, targets and per-item losses of a classifier on a dataset (validation by default)."""

    def __init__(self, learn, preds: torch.Tensor, targs: torch.Tensor, losses: torch.Tensor, inputs=None,
                 vocab: Sequence[str] | None = None):
        self.learn, self.preds, self.targs, self.losses, self.inputs = learn, preds, targs, losses, inputs
        self.vocab = list(vocab) if vocab is not None else [str(i) for i in range(preds.shape[-1])]

    @classmethod
    def from_learner(cls, learn, ds_idx: int = 1, vocab: Sequence[str] | None = None):
        preds, targs, losses = learn.get_preds(ds_idx, with_loss=True)
        dl = learn.dls[ds_idx]
        inputs = dl.dataset[0] if isinstance(getattr(dl, "dataset", None), tuple) else None
        return cls(learn, preds, targs, losses, inputs, vocab)

    def confusion_matrix(self) -> torch.Tensor:
        """Counts [actual, predicted]."""
        n = self.preds.shape[-1]
        idx = self.targs.long() * n + self.preds.argmax(-1)
        return torch.bincount(idx, minlength=n * n).reshape(n, n)

    def top_losses(self, k: int | None = None, largest: bool = True):
        k = len(self.losses) if k is None else min(k, len(self.losses))
        return self.losses.topk(k, largest=largest)

    def plot_confusion_matrix(self, fname: str | os.PathLike = "confusion_matrix.png") -> Path:
        plt = _pyplot()
        cm = self.confusion_matrix()
        n = cm.shape[0]
        fig, ax = plt.subplots(figsize=(max(4, n * 0.6), max(4, n * 0.6)))
        ax.imshow(cm.numpy(), cmap="Blues")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(n), self.vocab, rotation=90)
        ax.set_yticks(range(n), self.vocab)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        return _save_fig(fig, fname)

    def plot_top_losses(self, k: int = 9, fname: str | os.PathLike = "top_losses.png") -> Path:
        """The k worst items: images when the inputs are images (C, H, W), else a table."""
        plt = _pyplot()
        losses, idxs = self.top_losses(k)
        cols = min(3, len(idxs))
        rows = -(-len(idxs) // cols)
        fig, axs = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for ax, loss, i in zip(axs.flat, losses.tolist(), idxs.tolist()):
            pred = int(self.preds[i].argmax())
            title = (f"{self.vocab[pred]}/{self.vocab[int(self.targs[i])]}\n"
                     f"loss {loss:.2f} p {float(self.preds[i, pred]):.2f}")
            x = self.inputs[i].detach().float().cpu() if self.inputs is not None else None
            if x is not None and x.dim() == 3:
                x = (x - x.min()) / (x.max() - x.min() + 1e-12)
                ax.imshow(x.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if x.shape[0] == 1 else None)
            else:
                ax.text(0.5, 0.5, f"item {i}", ha="center", va="center")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        for ax in list(axs.flat)[len(idxs):]:
            ax.axis("off")
        return _save_fig(fig, fname)
