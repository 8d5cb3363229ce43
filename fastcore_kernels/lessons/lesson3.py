"""Lesson 3 vision parts on fastcore_kernels.lessons.shapes' formats (`--data` a folder in that format; default the
synthetic scenes): multi-label (BCE with logits, accuracy_multi, F2), segmentation (a U-Net on a ResNet-18 encoder;
pixel accuracy and dice) and points (image regression of a point: MSE)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import DataLoaders, accuracy_multi, dice, fbeta, mse
from fastcore_kernels.learner.metrics import AvgMetric
from fastcore_kernels.lessons import RunResult, train_kernel_sets
from fastcore_kernels.lessons import shapes as sh
from fastcore_kernels.lessons import vision as vis


def _folder(data, out: Path, write, quick: bool) -> Path:
    if data is not None:
        return Path(data)
    folder = out / "data"
    if not folder.is_dir():
        write(folder, n=300 if quick else 1500 if write is not sh.write_segmentation else 800)
    return folder


def _split(*tensors, valid_pct: float = 0.2, seed: int = 42):
    n = len(tensors[0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * valid_pct)
    return tuple(t[perm[k:]] for t in tensors), tuple(t[perm[:k]] for t in tensors)


def _loaders(*tensors, batch_size: int, device):
    """(training size, loaders) over an 80/20 split of the tensors."""
    train, valid = _split(*tensors)
    return len(train[0]), DataLoaders.from_tensors(train, valid, batch_size=batch_size, device=device, seed=0)


def run_multilabel(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                   out: Path = Path("lesson_out")) -> list[RunResult]:
    x, y, tags = sh.read_multilabel(_folder(data, out, sh.write_multilabel, quick))
    n_train, dls = _loaders(x, y, batch_size=64, device=device)
    print(f"lesson 3 multi-label: {n_train} images, tags {tags}", flush=True)
    n_epoch = 1 if quick else (epochs or 6)
    return train_kernel_sets(3, "multi-label", "bn-cnn multi-label",
                             lambda: vis.simple_cnn(len(tags), augment=vis.Augment(pad=2, flip=True)), dls,
                             F.binary_cross_entropy_with_logits, kernel_sets=kernel_sets, out=out,
                             metrics=[accuracy_multi(), fbeta(2.0)],
                             fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2),
                             extra=lambda learn: {"fbeta2": round(float(learn.recorder.value("fbeta2")), 4)})


def run_segmentation(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
                     out: Path = Path("lesson_out")) -> list[RunResult]:
    x, masks, codes = sh.read_segmentation(_folder(data, out, sh.write_segmentation, quick))
    n_train, dls = _loaders(x, masks, batch_size=32, device=device)
    print(f"lesson 3 segmentation: {n_train} images, classes {codes}", flush=True)
    n_epoch = 1 if quick else (epochs or 6)

    def make():
        encoder = vis.resnet18(n_classes=len(codes), width=16, in_channels=x.shape[1], stem="small")
        return vis.UNet(encoder, len(codes), in_channels=x.shape[1])
    return train_kernel_sets(3, "segmentation", "resnet18 u-net", make, dls, F.cross_entropy, kernel_sets=kernel_sets,
                             out=out, metrics=[AvgMetric(vis.pixel_accuracy, "pixel_accuracy"), dice()],
                             fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2),
                             extra=lambda learn: {"dice": round(float(learn.recorder.value("dice")), 4)})


def run_points(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
               out: Path = Path("lesson_out")) -> list[RunResult]:
    x, pts = sh.read_points(_folder(data, out, sh.write_points, quick))
    n_train, dls = _loaders(x, pts, batch_size=64, device=device)
    size = x.shape[-1]
    print(f"lesson 3 points: {n_train} images of {size}x{size}", flush=True)
    n_epoch = 1 if quick else (epochs or 8)

    def extra(learn):  # root mean squared error back in pixels
        return {"rmse_pixels": round(float(learn.recorder.value("mse")) ** 0.5 * (size - 1) / 2, 3)}
    return train_kernel_sets(3, "points", "bn-cnn point regression", lambda: vis.simple_cnn(2), dls, F.mse_loss,
                             kernel_sets=kernel_sets, out=out, metrics=[mse], extra=extra,
                             fit=lambda learn: learn.fit_one_cycle(n_epoch, 1e-2))
