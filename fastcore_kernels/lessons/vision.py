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


def random_rotate(x: torch.Tensor, max_deg: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image rotated by a random angle in [-max_deg, max_deg] about its centre (reflection at the borders)."""
    b = x.shape[0]
    theta = (torch.rand(b, generator=generator) * 2 - 1).to(x.device) * (max_deg * torch.pi / 180)
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_lighting(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """fastai's brightness and contrast: each image's values scaled about 0.5 by a random contrast in
    [1 - amount, 1 + amount] and shifted by a random brightness in [-amount / 2, amount / 2]."""
    b = x.shape[0]
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * amount
    bright = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * amount
    return ((x - 0.5) * contrast.to(x) + 0.5 + bright.to(x)).clamp(0, 1)


class Augment(nn.Module):
    """Training-time augmentation of a batch as a module (identity in eval): random shifts (reflection-padded crops),
    and optionally rotations, lighting and horizontal flips (off for digits, where a flip changes the meaning)."""

    def __init__(self, pad: int = 2, rotate: float = 0.0, lighting: float = 0.0, flip: bool = False):
        super().__init__()
        self.pad, self.rotate, self.lighting, self.flip = pad, rotate, lighting, flip

    def forward(self, x):
        if not self.training:
            return x
        if self.flip:
            mask = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        if self.rotate:
            x = random_rotate(x, self.rotate)
        if self.pad:
            x = random_crop(x, self.pad)
        if self.lighting:
            x = random_lighting(x, self.lighting)
        return x


def simple_cnn(n_classes: int = 10, widths=(16, 32, 64, 64), augment: Augment | None = None) -> nn.Sequential:
    """Lesson 6's CNN with batch norm: stride-2 conv layers, then global pooling and a linear head."""
    layers = [augment or nn.Identity()]
    ni = 1
    for nf in widths:
        layers.append(conv_layer(ni, nf, 2))
        ni = nf
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ni, n_classes))


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
        Augment(pad=augment),
        conv_layer(1, 8, 2), ResBlock(8),
        conv_layer(8, 16, 2), ResBlock(16),
        conv_layer(16, 32, 2), ResBlock(32),
        conv_layer(32, 16, 2), ResBlock(16),
        nn.Conv2d(16, n_classes, 3, 2, 1), nn.Flatten())


# --- ResNet-18/34 in torchvision's layout (module names match, so its state_dicts load) -----------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ni: int, nf: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(nf)
        self.downsample = None
        if stride != 1 or ni != nf:
            self.downsample = nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet (BasicBlock) with a width knob and two stems: "imagenet" (7x7 stride-2 conv + max pool,
    for torchvision weights) and "small" (one 3x3 stride-2 conv, no pool: 28-32 pixel images). `fuse` fuses its
    conv1-bn1-relu and every block's BN-ReLU and BN-add-ReLU."""

    def __init__(self, layers=(2, 2, 2, 2), n_classes: int = 1000, width: int = 64, in_channels: int = 3,
                 stem: str = "imagenet"):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        big = stem == "imagenet"
        self.conv1 = nn.Conv2d(in_channels, width, 7 if big else 3, 2, 3 if big else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if big else nn.Identity()
        ni = width
        for i, n in enumerate(layers):
            nf = width * 2**i
            blocks = [BasicBlock(ni, nf, 1 if i == 0 else 2)] + [BasicBlock(nf, nf) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            ni = nf
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ni, n_classes)

    def body(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.body(x)), 1))


def resnet18(**kw) -> ResNet:
    return ResNet((2, 2, 2, 2), **kw)


def resnet34(**kw) -> ResNet:
    return ResNet((3, 4, 6, 3), **kw)


def resnet_splitter(model: ResNet) -> list[list[nn.Parameter]]:
    """Three layer groups for discriminative lrs: stem + layers 1-2, layers 3-4, the head."""
    stem = [*model.conv1.parameters(), *model.bn1.parameters(), *model.layer1.parameters(),
            *model.layer2.parameters()]
    return [stem, [*model.layer3.parameters(), *model.layer4.parameters()], list(model.fc.parameters())]


class UNet(nn.Module):
    """A U-Net on a ResNet encoder (fastai's DynamicUnet idea, written out): the encoder's four stages, then at
    each scale up-sampling, concatenation with the encoder's features there, and a conv-BN-ReLU layer; last the input
    itself joins and a 1x1 convolution gives per-pixel class scores."""

    def __init__(self, encoder: ResNet, n_classes: int, in_channels: int = 1):
        super().__init__()
        self.enc = encoder
        w = encoder.bn1.num_features
        chans = [w, 2 * w, 4 * w, 8 * w]  # layer1..layer4 outputs
        self.blocks = nn.ModuleList([conv_layer(chans[3] + chans[2], chans[2]), conv_layer(chans[2] + chans[1],
                                     chans[1]), conv_layer(chans[1] + chans[0], chans[0]),
                                     conv_layer(chans[0] + in_channels, chans[0])])
        self.head = nn.Conv2d(chans[0], n_classes, 1)

    def forward(self, x):
        e = self.enc
        f1 = e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x)))))
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        d = e.layer4(f3)
        for skip, block in zip((f3, f2, f1, x), self.blocks):
            d = block(torch.cat([F.interpolate(d, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(d)


def pixel_accuracy(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels whose argmax class (dim 1) is the target's."""
    return (pred.argmax(1) == targ).float().mean()
