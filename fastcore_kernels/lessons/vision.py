"""Vision pieces of the lessons: an ImageFolder-style loader, batch augmentation on tensors, and the course's CNNs
written with plain torch modules (Conv2d -> BatchNorm2d -> ReLU blocks that `fuse` turns into fused conv-BN-ReLU).

`image_folder(root)` reads one folder per class (pets/bears style: `root/<class>/<image>`; PNG, JPEG, anything
Pillow opens), resized to a square, as float tensors in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_folder(root: str | Path, size: int = 28, channels: int = 1):
    """(x (n, channels, size, size) float32 in [0, 1], y int64, class names sorted)."""
    from PIL import Image

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root}: expected one folder of images per class")
    mode = "L" if channels == 1 else "RGB"
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert(mode).resize((size, size), Image.BILINEAR)
                    xs.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, -1))
            except OSError as e:
                raise ValueError(f"{path}: not an image Pillow can read ({e})") from e
            ys.append(label)
    if not xs:
        raise ValueError(f"{root}: no images found in {', '.join(classes)}")
    x = torch.stack(xs).permute(0, 3, 1, 2).float() / 255
    return x.contiguous(), torch.tensor(ys), classes


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image shifted by up to `pad` pixels (reflection padding, then a random crop back to size): fastai's
    rand_pad, done for the whole batch with one gather."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (b, h, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (b, 1, w)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (b, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


class Augment(nn.Module):
    """Training-time augmentation as a module (identity in eval): random shifts by reflection-padded crops."""

    def __init__(self, pad: int = 2):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return random_crop(x, self.pad) if self.training and self.pad else x


def conv_layer(ni: int, nf: int, stride: int = 1) -> nn.Sequential:
    """fastai's conv_layer: 3x3 Conv2d (no bias) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """The course's res_block: x + conv_layer(conv_layer(x))."""

    def __init__(self, nf: int):
        super().__init__()
        self.convs = nn.Sequential(conv_layer(nf, nf), conv_layer(nf, nf))

    def forward(self, x):
        return x + self.convs(x)


def mnist_resnet(n_classes: int = 10, augment: int = 2) -> nn.Sequential:
    """Lesson 7's ResNet for MNIST from scratch: stride-2 conv layers each followed by a residual block."""
    return nn.Sequential(
        Augment(augment),
        conv_layer(1, 8, 2), ResBlock(8),
        conv_layer(8, 16, 2), ResBlock(16),
        conv_layer(16, 32, 2), ResBlock(32),
        conv_layer(32, 16, 2), ResBlock(16),
        nn.Conv2d(16, n_classes, 3, 2, 1), nn.Flatten())
