"""The embedded synthetic benchmark: shapes whose *texture* carries the class.

    info = ensure_synthetic("data/synthetic", SyntheticConfig())   # makes it once, then reuses
    image, mask = make_sample(index=3, size=64, num_classes=5, seed=0)

Class 0 is background (smooth low-frequency noise). Each foreground class has its own texture
family and parameters: oriented gratings (class-specific angle and period), checkerboards
(class-specific cell size and rotation) and blob noise (class-specific grain). One to three shapes
(ellipse, polygon, rotated rectangle) per image, later ones on top, are filled with their class
texture. Every object and the background draw a random mean colour and colour contrast from one
shared distribution (the background with lower contrast), so colour says nothing about the
foreground class; small Gaussian noise goes on top.

Each image is a pure function of (seed, split offset + index) through
`np.random.default_rng([seed, index])`, so any subset can be made in any order or in parallel.
Cost: the default 480 images of 64x64 (train + val, shards and dataset.json included) take
4-7 s wall, 3-6 s CPU, on one core of the shared 2-core development machine (about half
drawing, half PNG encoding).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
from pyarrow.fs import FileType
from scipy.ndimage import gaussian_filter
from skimage.draw import ellipse, polygon

from components.data.shards import (
    MANIFEST,
    DatasetError,
    DatasetInfo,
    ShardWriter,
    encode_png,
    mask_labels,
    resolve_fs,
)
from components.schema import SyntheticConfig

log = logging.getLogger("segdistill.data")

# Far-apart index ranges keep the splits disjoint for any split size below 2**32, and make the
# val images independent of num_train.
SPLIT_OFFSETS = {"train": 0, "val": 1 << 32, "unlabeled": 2 << 32}
# Small shards so Ray Data gets several read tasks even for this tiny dataset.
SHARD_BYTES = 1 << 20


@dataclass(frozen=True)
class Texture:
    """A texture family with its class-specific parameters (angle in degrees, scale in px)."""

    family: str  # "grating" | "checker" | "blobs"
    angle: float
    scale: float

    @property
    def name(self) -> str:
        match self.family:
            case "grating":
                return f"grating_{self.angle:g}deg_{self.scale:g}px"
            case "checker":
                return f"checker_{self.angle:g}deg_{self.scale:g}px"
            case _:
                return f"blobs_{self.scale:g}px"


# The first classes are the most distinct textures; past the table, gratings step their angle by
# 137.5 degrees (mod 180) and cycle their period through 3..7 px.
_BASE_TEXTURES = (
    Texture("grating", 0, 4),
    Texture("grating", 90, 6),
    Texture("checker", 0, 3),
    Texture("blobs", 0, 1),
    Texture("grating", 45, 8),
    Texture("grating", 135, 5),
    Texture("checker", 45, 6),
    Texture("blobs", 0, 2.5),
)


def class_textures(num_classes: int) -> list[Texture]:
    """The texture of each foreground class 1..num_classes-1 (index 0 is class 1)."""
    textures = list(_BASE_TEXTURES[: num_classes - 1])
    for j in range(len(textures), num_classes - 1):
        textures.append(Texture("grating", round((j * 137.5) % 180, 1), 3 + j % 5))
    return textures


def class_names(num_classes: int) -> list[str]:
    """Class names: "background", then one descriptive name per foreground texture."""
    return ["background"] + [t.name for t in class_textures(num_classes)]


def palette(num_classes: int) -> list[list[int]]:
    """Distinct display colours: black background, then hues spread by the golden ratio."""
    colours = [[0, 0, 0]]
    for c in range(1, num_classes):
        h = (c * 0.618033988749895) % 1.0
        v = 1.0 if c % 2 else 0.7
        # HSV -> RGB with full saturation
        k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
        rgb = v - v * np.clip(np.minimum(k, 4 - k), 0, 1)
        colours.append(np.rint(rgb * 255).astype(int).tolist())
    return colours


# ----------------------------------------------------------------------------------------------
# Drawing


def _pattern(
    texture: Texture, rr: np.ndarray, cc: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean pattern values in [-1, 1] at pixels (rr, cc) of a size x size image.

    Random phase, plus a small jitter (+-5 degrees, +-10% scale) so that each class is a family
    of textures rather than one fixed image.
    """
    theta = np.deg2rad(texture.angle + rng.uniform(-5, 5))
    scale = texture.scale * rng.uniform(0.9, 1.1)
    u = cc * np.cos(theta) + rr * np.sin(theta)
    v = -cc * np.sin(theta) + rr * np.cos(theta)
    match texture.family:
        case "grating":
            return np.sin(2 * np.pi * u / scale + rng.uniform(0, 2 * np.pi))
        case "checker":
            u0, v0 = rng.uniform(0, 2 * scale, size=2)
            cells = np.floor((u + u0) / scale) + np.floor((v + v0) / scale)
            return (cells % 2) * 2.0 - 1.0
        case _:
            return _smooth_noise((size, size), scale, rng)[rr, cc]


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise squashed to [-1, 1] with a symmetric (zero-mean) law."""
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return np.tanh(1.5 * field / (field.std() + 1e-8))


def _colourize(
    pattern: np.ndarray, rng: np.random.Generator, contrast: tuple[float, float]
) -> np.ndarray:
    """Pattern (...) in [-1, 1] -> (..., 3) float colours between two random colours.

    Mean colour and colour difference come from the same law for every class.
    """
    mean = rng.uniform(40, 215, size=3)
    direction = rng.standard_normal(3)
    delta = direction / np.linalg.norm(direction) * rng.uniform(*contrast) / 2
    return mean + pattern[..., None] * delta


def _shape(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (rows, cols) of a random ellipse, convex-ish polygon or rotated rectangle."""
    cy, cx = rng.uniform(0.15 * size, 0.85 * size, size=2)
    r1, r2 = rng.uniform(0.12 * size, 0.35 * size, size=2)
    rot = rng.uniform(0, np.pi)
    kind = rng.integers(3)
    if kind == 0:
        return ellipse(cy, cx, r1, r2, shape=(size, size), rotation=rot)
    if kind == 1:
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = rng.uniform(0.5, 1.0, size=n) * max(r1, r2)
        return polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), (size, size))
    corners = np.array([[-r1, -r2], [-r1, r2], [r1, r2], [r1, -r2]])
    c, s = np.cos(rot), np.sin(rot)
    ys = cy + corners[:, 0] * c - corners[:, 1] * s
    xs = cx + corners[:, 0] * s + corners[:, 1] * c
    return polygon(ys, xs, (size, size))


def make_sample(
    index: int, size: int, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask: (size, size, 3) uint8 and (size, size) uint8 in [0, K-1]."""
    rng = np.random.default_rng([seed, index])
    textures = class_textures(num_classes)
    # background: its own low-frequency family, lower contrast so objects stand out
    image = _colourize(_smooth_noise((size, size), size / 10, rng), rng, (30, 90))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, num_classes))
        rr, cc = _shape(size, rng)
        image[rr, cc] = _colourize(_pattern(textures[cls - 1], rr, cc, size, rng), rng, (80, 180))
        mask[rr, cc] = cls
    image += rng.normal(0, 4, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------------
# Dataset


def make_synthetic(out: str, cfg: SyntheticConfig) -> DatasetInfo:
    """Write the train/val(/unlabeled) shards and dataset.json (last) under `out`.

    Unlabeled rows still carry masks, for diagnostics only; semi-supervised code must not read
    them as labels.
    """
    counts = {"train": cfg.num_train, "val": cfg.num_val, "unlabeled": cfg.num_unlabeled}
    info = DatasetInfo(
        name="synthetic",
        num_classes=cfg.num_classes,
        class_names=class_names(cfg.num_classes),
        palette=palette(cfg.num_classes),
    )
    for split, count in counts.items():
        if count <= 0:
            continue
        with ShardWriter(out, split, target_shard_bytes=SHARD_BYTES, row_group_rows=64) as w:
            for i in range(count):
                image, mask = make_sample(
                    SPLIT_OFFSETS[split] + i, cfg.size, cfg.num_classes, cfg.seed
                )
                w.add(
                    f"synthetic-{split}-{i:06d}",
                    encode_png(image),
                    encode_png(mask),
                    mask_labels(mask),
                    cfg.size,
                    cfg.size,
                )
        info.splits[split] = w.close()
    info.save(out)
    return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _differences(info: DatasetInfo, cfg: SyntheticConfig) -> list[str]:
    """How an existing dataset's class count and split sizes differ from `cfg`."""
    out = []
    if info.num_classes != cfg.num_classes:
        out.append(f"{info.num_classes} classes, num_classes={cfg.num_classes}")
    counts = {"train": cfg.num_train, "val": cfg.num_val, "unlabeled": cfg.num_unlabeled}
    for split, want in counts.items():
        have = info.splits[split].rows if split in info.splits else 0
        if have != want:
            out.append(f"{have} {split} rows, num_{split}={want}")
    return out


def ensure_synthetic(root: str, cfg: SyntheticConfig) -> DatasetInfo:
    """Return the dataset at `root`, generating it first when `<root>/dataset.json` is absent.

    Locally it is built in `<root>.tmp-<pid>` and renamed into place, so an interrupted run never
    leaves a half dataset at `root`; temp folders of dead processes are removed. For URI roots
    the shards are written in place: dataset.json, written last, marks completion.
    """
    fs, path = resolve_fs(root)
    if fs.get_file_info(f"{path}/{MANIFEST}").type == FileType.File:
        info = DatasetInfo.load(root)  # a corrupt manifest raises here rather than regenerating
        differs = _differences(info, cfg)
        if differs:
            log.warning(
                "%s differs from data.synthetic (%s); using the existing dataset (delete it to "
                "regenerate)",
                root,
                "; ".join(differs),
            )
        return info
    if "://" in root:
        return make_synthetic(root, cfg)

    if os.path.isdir(path) and os.listdir(path):
        raise DatasetError(
            f"{path}: exists without {MANIFEST}; remove it or point data.root elsewhere"
        )
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f"{base}.tmp-"
    for name in os.listdir(parent):
        pid = name.removeprefix(prefix)
        if (
            name.startswith(prefix)
            and pid.isdigit()
            and (int(pid) == os.getpid() or not _pid_alive(int(pid)))
        ):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    log.info("generating the synthetic dataset at %s", path)
    make_synthetic(tmp, cfg)
    try:
        os.replace(tmp, path)  # also replaces an empty folder at `path`
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise
        # another process finished first: use its copy
    return DatasetInfo.load(root)


__all__ = [
    "SPLIT_OFFSETS",
    "Texture",
    "class_names",
    "class_textures",
    "ensure_synthetic",
    "make_sample",
    "make_synthetic",
    "palette",
]
