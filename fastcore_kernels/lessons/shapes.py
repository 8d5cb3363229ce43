"""Lesson 3's image data: loaders for three real formats, and a deterministic generator that writes each of them.

Formats:
- multi-label (the planet competition's layout): `labels.csv` with `image_name,tags` (tags space-separated) and the
  images in `images/<image_name>.png`.
- segmentation (CamVid's layout): `images/<name>.png` and `labels/<name>.png` (pixel value = class code), class
  names one per line in `codes.txt`.
- point regression (the head-pose set's role): `points.csv` with `image_name,x,y` (pixels) and `images/`.

The generator (synthetic, documented as such) draws scenes of circles, squares and triangles on a noisy background:
the tags are the shape kinds present, the mask marks each shape's pixels with its kind, and for the point set each
image holds one circle among distractors, its centre the target.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

KINDS = ["circle", "square", "triangle"]


def _draw(img: torch.Tensor, mask: torch.Tensor, kind: int, cy: float, cx: float, r: float, shade: float) -> None:
    h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        inside = dy ** 2 + dx ** 2 <= r ** 2
    elif kind == 1:
        inside = (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
    else:  # an upward triangle
        inside = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    img[inside] = shade
    mask[inside] = kind + 1


def _scene(rng: random.Random, size: int, kinds: list[int]):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    img = 0.15 + 0.1 * torch.rand(size, size, generator=g)
    mask = torch.zeros(size, size, dtype=torch.uint8)
    centres = []
    for k in kinds:
        r = rng.uniform(size * 0.12, size * 0.2)
        cy, cx = rng.uniform(r, size - r), rng.uniform(r, size - r)
        _draw(img, mask, k, cy, cx, r, rng.uniform(0.6, 1.0))
        centres.append((cx, cy))
    return img.clamp(0, 1), mask, centres


def _save_png(t: torch.Tensor, path: Path) -> None:
    from PIL import Image
    arr = (t * 255).round().to(torch.uint8) if t.is_floating_point() else t
    Image.fromarray(arr.numpy()).save(path)


def write_multilabel(folder: str | Path, n: int = 1500, size: int = 32, seed: int = 0) -> Path:
    rng, folder = random.Random(seed), Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kinds = rng.sample(range(3), rng.randint(1, 3))
        img, _, _ = _scene(rng, size, kinds)
        _save_png(img, folder / "images" / f"img_{i}.png")
        rows.append((f"img_{i}", " ".join(KINDS[k] for k in sorted(kinds))))
    with (folder / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image_name", "tags"), *rows])
    return folder


def write_segmentation(folder: str | Path, n: int = 800, size: int = 32, seed: int = 1) -> Path:
    rng, folder = random.Random(seed), Path(folder)
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask, _ = _scene(rng, size, [rng.randrange(3) for _ in range(rng.randint(1, 3))])
        _save_png(img, folder / "images" / f"s_{i}.png")
        _save_png(mask, folder / "labels" / f"s_{i}.png")
    (folder / "codes.txt").write_text("\n".join(["background"] + KINDS) + "\n")
    return folder


def write_points(folder: str | Path, n: int = 1500, size: int = 32, seed: int = 2) -> Path:
    rng, folder = random.Random(seed), Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kinds = [0] + [rng.choice([1, 2]) for _ in range(rng.randint(0, 2))]
        img, _, centres = _scene(rng, size, kinds[::-1])  # the circle last: drawn on top, never hidden
        _save_png(img, folder / "images" / f"p_{i}.png")
        rows.append((f"p_{i}", f"{centres[-1][0]:.2f}", f"{centres[-1][1]:.2f}"))
    with (folder / "points.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image_name", "x", "y"), *rows])
    return folder


def _load_png(path: Path) -> torch.Tensor:
    from PIL import Image
    if not path.is_file():
        raise FileNotFoundError(f"missing image {path}")
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):  # a palette ("P") mask keeps its indices: they are the class codes
            im = im.convert("L")
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width)


def _rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"expected {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(c not in rows[0] for c in columns):
        raise ValueError(f"{path}: expected a header with columns {', '.join(columns)}")
    return rows


def read_multilabel(folder: str | Path):
    """(x (n, 1, H, W), y (n, k) float 0/1, tag names sorted)."""
    folder = Path(folder)
    rows = _rows(folder / "labels.csv", ("image_name", "tags"))
    tags = sorted({t for r in rows for t in r["tags"].split()})
    x = torch.stack([_load_png(folder / "images" / f"{r['image_name']}.png") for r in rows])[:, None].float() / 255
    y = torch.tensor([[float(t in r["tags"].split()) for t in tags] for r in rows])
    return x, y, tags


def read_segmentation(folder: str | Path):
    """(x (n, 1, H, W), masks (n, H, W) int64, class names)."""
    folder = Path(folder)
    codes = [c.strip() for c in (folder / "codes.txt").read_text().splitlines() if c.strip()]
    names = sorted(p.name for p in (folder / "images").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"{folder / 'images'} holds no .png images")
    x = torch.stack([_load_png(folder / "images" / n) for n in names])[:, None].float() / 255
    masks = torch.stack([_load_png(folder / "labels" / n) for n in names]).long()
    if int(masks.max()) >= len(codes):
        raise ValueError(f"{folder}: a mask holds class {int(masks.max())} but codes.txt names {len(codes)} classes")
    return x, masks, codes


def read_points(folder: str | Path):
    """(x (n, 1, H, W), points (n, 2) scaled to [-1, 1] as (x, y))."""
    folder = Path(folder)
    rows = _rows(folder / "points.csv", ("image_name", "x", "y"))
    imgs = torch.stack([_load_png(folder / "images" / f"{r['image_name']}.png") for r in rows])
    h, w = imgs.shape[-2:]
    pts = torch.tensor([[float(r["x"]), float(r["y"])] for r in rows])
    pts = torch.stack([pts[:, 0] / (w - 1), pts[:, 1] / (h - 1)], 1) * 2 - 1
    return imgs[:, None].float() / 255, pts
