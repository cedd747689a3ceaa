"""Augmentation primitives on single decoded images: geometry, photometry, padding, scaling.

    image, mask = random_scale_crop_flip(image, mask, 64, (0.75, 1.5), True, rng)
    strong = strong_photometric(image, ("colour_jitter", "grayscale", "blur"), rng)
    batch = normalize(np.stack(images))  # (B, H, W, 3) uint8 -> (B, 3, H, W) float32

Images are (H, W, 3) uint8 and masks (H, W) uint8 class ids; every random choice is drawn from
the `rng` passed in, so the caller decides how augmentation is seeded. The batch decoders that
use these are in decode.py; both are re-exported by transforms.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from scipy import ndimage as ndi

# The torchvision ImageNet statistics, on the 0-255 scale of uint8 images.
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def crop_hw(crop_size) -> tuple[int, int]:
    """`data.crop_size` as (height, width): an int is a square, a pair is (height, width)."""
    if isinstance(crop_size, (int, np.integer)):
        return int(crop_size), int(crop_size)
    h, w = crop_size
    return int(h), int(w)


def random_scale_crop_flip(
    image: np.ndarray,
    mask: np.ndarray,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    rng: np.random.Generator,
    ignore_index: int = 255,
    with_area: bool = False,
) -> tuple[np.ndarray, ...]:
    """Rescale by s ~ U(scale_range), pad, crop ch x cw (`crop_size`: an int for a square, or
    (height, width), e.g. CIRKD's 512x1024 Cityscapes crops), maybe flip horizontally.

    image (H, W, 3) uint8, mask (H, W) uint8 -> (ch, cw, 3) uint8, (ch, cw) uint8.
    The image is resampled bilinearly and the mask by nearest neighbour; both share the crop
    offset and the flip (p = 0.5). Padding (bottom/right, when the scaled image is smaller than
    the crop) is 0 in the image and `ignore_index` in the mask. `with_area` also returns a
    (crop, crop) bool map that is False on the padding (unlabeled images have no mask to mark it).

    Only the crop is resampled (`resample_window`), not the whole rescaled image: the result is
    that of skimage's `resize` of the whole image followed by the crop (the mapping of its
    `ndi.zoom(grid_mode=True, mode="mirror")`), to within one grey level where float rounding
    lands on .5, and the mask's nearest neighbour may pick the other of two equidistant source
    pixels; the cost scales with the crop, not the source image (tests/data/test_transforms.py).
    """
    h, w = mask.shape
    s = rng.uniform(*scale_range)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    ch, cw = crop_hw(crop_size)
    y = int(rng.integers(0, max(nh, ch) - ch + 1))
    x = int(rng.integers(0, max(nw, cw) - cw + 1))
    oh, ow = min(ch, nh - y), min(cw, nw - x)  # the part of the crop inside the scaled image
    if (nh, nw) == (h, w):
        part_image, part_mask = image[y : y + oh, x : x + ow], mask[y : y + oh, x : x + ow]
    else:
        part_image, part_mask = resample_window(image, mask, (nh, nw), (y, x), (oh, ow))
    image, mask = pad_to(part_image, part_mask, ch, cw, ignore_index)
    area = np.zeros((ch, cw), bool)
    area[:oh, :ow] = True
    if flip and rng.random() < 0.5:
        image, mask, area = image[:, ::-1], mask[:, ::-1], area[:, ::-1]
    out = (np.ascontiguousarray(image), np.ascontiguousarray(mask))
    return (*out, np.ascontiguousarray(area)) if with_area else out


def resample_window(
    image: np.ndarray,
    mask: np.ndarray,
    scaled: tuple[int, int],
    origin: tuple[int, int],
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The `size` window at `origin` of the image and mask resized to `scaled` (bilinear /
    nearest, skimage's `resize` mapping: output pixel o reads source (o + 0.5) * in / out - 0.5,
    mirrored at the edges), computed for the window's pixels only.

    image (H, W, 3) uint8, mask (H, W) uint8 -> (oh, ow, 3) uint8, (oh, ow) uint8."""
    (h, w), (nh, nw), (y, x), (oh, ow) = mask.shape, scaled, origin, size
    fy, fx = h / nh, w / nw
    first = ((y + 0.5) * fy - 0.5, (x + 0.5) * fx - 0.5)
    # The source rows/columns the window reads (+1 for the bilinear neighbour, +1 for safety);
    # slicing them first keeps the float copy small. Coordinates outside the image (the
    # mirrored edges) only occur where the slice reaches the image's own edge.
    y0 = max(0, int(np.floor(first[0])) - 1)
    x0 = max(0, int(np.floor(first[1])) - 1)
    y1 = min(h, int(np.ceil(first[0] + (oh - 1) * fy)) + 3)
    x1 = min(w, int(np.ceil(first[1] + (ow - 1) * fx)) + 3)
    offset = (first[0] - y0, first[1] - x0)
    src_image, src_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    out_image = np.empty((oh, ow, 3), np.uint8)
    for c in range(3):
        plane = ndi.affine_transform(
            src_image[..., c].astype(np.float64), (fy, fx), offset=offset,
            output_shape=(oh, ow), order=1, mode="mirror", prefilter=False,
        )  # fmt: skip
        out_image[..., c] = np.clip(np.rint(plane), 0, 255)
    out_mask = ndi.affine_transform(
        src_mask, (fy, fx), offset=offset, output_shape=(oh, ow), order=0, mode="mirror",
        prefilter=False,
    )  # fmt: skip
    return out_image, out_mask


def strong_photometric(
    image: np.ndarray, ops: tuple[str, ...] | list[str], rng: np.random.Generator
) -> np.ndarray:
    """The photometric part of the strong view of an unlabeled image, (H, W, 3) uint8 -> same.

    UniMatch's set (LiheYoung/UniMatch `dataset/semi.py` L51-54, `dataset/transform.py` L58-63),
    applied in this order when listed in `ops`, with the same PIL operations torchvision runs on
    a PIL image (each op's result stored as uint8 before the next):
    - `colour_jitter` (p 0.8): torchvision's `ColorJitter(0.5, 0.5, 0.5, 0.25)` (`colour_jitter`);
    - `grayscale` (p 0.2): `RandomGrayscale`: PIL's "L" conversion (ITU-R 601 luma, integer
      rounding) in all three channels;
    - `blur` (p 0.5): PIL `GaussianBlur(radius=σ)`, σ ~ U(0.1, 2.0).
    Geometry is untouched, so the strong view stays pixel-aligned with the weak one. (`cutmix`
    mixes two images and is applied on the worker: components/semisup/fixmatch.py.) Every random
    draw is from `rng` (torchvision draws from torch's generator: the laws are the same).
    """
    if not any(op in ops for op in ("colour_jitter", "grayscale", "blur")):
        return image
    img = Image.fromarray(np.ascontiguousarray(image))
    if "colour_jitter" in ops and rng.random() < 0.8:
        img = colour_jitter(img, rng)
    if "grayscale" in ops and rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if "blur" in ops and rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return np.asarray(img, dtype=np.uint8).copy()


def colour_jitter(
    img: Image.Image,
    rng: np.random.Generator,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
) -> Image.Image:
    """torchvision's `ColorJitter(brightness, contrast, saturation, hue)` on a PIL RGB image: the
    four ops in a random order, factors U(1 - x, 1 + x) and a hue shift U(-hue, hue), each op
    the PIL call torchvision's functional API makes for PIL input (ImageEnhance.Brightness /
    Contrast / Color, and `adjust_hue`)."""
    order = rng.permutation(4)
    b, c, s = rng.uniform([1 - brightness, 1 - contrast, 1 - saturation],
                          [1 + brightness, 1 + contrast, 1 + saturation])  # fmt: skip
    h = rng.uniform(-hue, hue)
    for op in order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(s)
        else:
            img = adjust_hue(img, h)
    return img


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue of a PIL RGB image by `factor` of a turn (|factor| <= 0.5), as
    torchvision's PIL `adjust_hue`: PIL's HSV, the 8-bit hue channel shifted by
    int(factor * 255), wrapping around."""
    hue_channel, sat, val = img.convert("HSV").split()
    shifted = (np.asarray(hue_channel, np.int16) + int(factor * 255)) % 256
    hue_channel = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (hue_channel, sat, val)).convert("RGB")


def pad_to(
    image: np.ndarray, mask: np.ndarray, height: int, width: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Pad (H, W, 3) image with 0 and (H, W) mask with ignore_index at the bottom/right."""
    h, w = mask.shape
    if h > height or w > width:
        raise ValueError(f"image {h}x{w} is larger than the pad size {height}x{width}")
    if (h, w) == (height, width):
        return image, mask
    pad = ((0, height - h), (0, width - w))
    return (
        np.pad(image, (*pad, (0, 0)), constant_values=0),
        np.pad(mask, pad, constant_values=ignore_index),
    )


def normalize(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, (x - IMAGENET_MEAN) / IMAGENET_STD."""
    out = (images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "crop_hw",
    "normalize",
    "pad_to",
    "random_scale_crop_flip",
    "strong_photometric",
]
