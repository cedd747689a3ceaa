"""Full-resolution logits under the evaluation modes papers report: whole image, sliding window,
multi-scale and flip test-time augmentation.

    mode = EvalMode("slide", crop=(512, 1024), stride=(341, 683), scales=(0.75, 1.0), flip=True)
    logits = infer_logits(model, images, mode)      # (B, K, H, W) float32, H, W = the images'

`whole` runs the model once on the image and upsamples its logits (bilinear, align_corners=False,
as everywhere in this project). `slide` runs it on crop-sized windows of the image, upsamples each
window's logits to the window, sums them into place and divides by how many windows covered each
pixel (mmseg's `slide_inference`, see `slide_windows`). Each scale resizes the image (bilinear)
before the whole/slide pass and resizes the logits back to full size; `flip` adds the mirrored
image of every scale, its logits mirrored back.

Averaging: the passes' logits are averaged (not their softmax probabilities), as CIRKD's eval.py
does, so reported numbers follow the distillation papers' protocol and the result is still a logit
map. mmseg's aug_test averages softmax probabilities instead; the argmax can differ where passes
disagree. Overlapping windows are averaged as logits in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("whole", "slide")


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    """None, an int n (-> (n, n)) or two ints (h, w), each >= 1."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"eval {name} must be (height, width), got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"eval {name} must be two numbers (height, width), got {value!r}")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise ValueError(f"eval {name} must be positive whole pixels, got {value!r}")
        out.append(int(v))
    return out[0], out[1]


@dataclass(frozen=True)
class EvalMode:
    """How `infer_logits` predicts. `crop` and `stride` are (height, width) in pixels of the
    (scaled) image and only apply to `slide`; `scales` resize the image by each factor; `flip`
    adds the horizontally mirrored image. Lists are accepted and stored as tuples."""

    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"eval mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        crop, stride = _pair(self.crop, "crop"), _pair(self.stride, "stride")
        if self.mode == "slide":
            if crop is None or stride is None:
                raise ValueError("eval mode 'slide' needs a crop and a stride (height, width)")
            if stride[0] > crop[0] or stride[1] > crop[1]:
                raise ValueError(
                    f"eval stride {stride} must not exceed the crop {crop} in either dimension "
                    "(windows would leave pixels out)"
                )
        elif crop is not None or stride is not None:
            raise ValueError("eval crop and stride only apply to mode 'slide'")
        scales = self.scales
        if isinstance(scales, (int, float)):
            scales = (scales,)
        scales = tuple(scales)
        if not scales:
            raise ValueError("eval scales must list at least one factor")
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"eval scales must be numbers, got {self.scales!r}")
            if s <= 0:
                raise ValueError(f"eval scales must be > 0, got {s}")
        if self.flip not in (True, False):
            raise ValueError(f"eval flip must be true or false, got {self.flip!r}")
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))

    @classmethod
    def from_config(cls, cfg: Mapping | Any) -> EvalMode:
        """From a mapping or an object (a config section) with some of the fields; others keep
        their defaults. Extra keys (e.g. `boundary_width`) are ignored."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        kwargs = {}
        for key in ("mode", "crop", "stride", "scales", "flip"):
            value = get(key, None)
            if value is not None:
                kwargs[key] = value if isinstance(value, (str, bool, int, float)) else tuple(value)
        return cls(**kwargs)

    @property
    def plain(self) -> bool:
        """One whole-image pass: the behaviour before evaluation modes existed."""
        return self.mode == "whole" and self.scales == (1.0,) and not self.flip

    def describe(self) -> str:
        """E.g. `slide (crop 512x1024, stride 341x683), scales 0.75,1, flip`."""
        text = self.mode
        if self.mode == "slide":
            text += (
                f" (crop {self.crop[0]}x{self.crop[1]}, stride {self.stride[0]}x{self.stride[1]})"
            )
        if self.scales != (1.0,):
            text += ", scales " + ",".join(f"{s:g}" for s in self.scales)
        if self.flip:
            text += ", flip"
        return text


WHOLE = EvalMode()


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) windows of a sliding-window pass, row by row.

    Matches mmseg's `EncoderDecoder.slide_inference` (mmseg/models/segmentors/encoder_decoder.py,
    0.x and 1.x alike): ceil((H - crop) / stride) + 1 rows of windows (at least one), each window
    clipped to the image and then shifted back so it starts at max(end - crop, 0) — the last row
    and column end at the image border with a full crop. An image smaller than the crop in a
    dimension gets a single window of the image's own size there (no padding), as in mmseg.
    """
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for i in range(rows):
        y2 = min(i * sh + ch, height)
        y1 = max(y2 - ch, 0)
        for j in range(cols):
            x2 = min(j * sw + cw, width)
            x1 = max(x2 - cw, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The image size at `scale` (rounded, at least 1 pixel)."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _forward(model: nn.Module, images: Tensor, autocast_dtype: torch.dtype | None) -> Tensor:
    if autocast_dtype is not None:
        with torch.autocast(images.device.type, dtype=autocast_dtype):
            logits = model(images)["logits"]
    else:
        logits = model(images)["logits"]
    return logits.float()


def _upsample(logits: Tensor, size: Iterable[int]) -> Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _slide(
    model: nn.Module, images: Tensor, mode: EvalMode, autocast_dtype: torch.dtype | None
) -> Tensor:
    """(B, K, h, w) logits at the size of `images` from windows (see `slide_windows`)."""
    height, width = images.shape[-2:]
    total, count = None, images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(height, width, mode.crop, mode.stride):
        logits = _upsample(
            _forward(model, images[..., y1:y2, x1:x2], autocast_dtype), (y2 - y1, x2 - x1)
        )
        if total is None:
            total = logits.new_zeros((*logits.shape[:2], height, width))
        total[..., y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def infer_logits(
    model: nn.Module,
    images: Tensor,
    mode: EvalMode | None = None,
    size: Iterable[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """(B, K, H, W) float32 logits of `model` (in whatever train/eval state it is in) for
    `images` (B, 3, H, W), averaged over the passes of `mode` (None: one whole-image pass).

    `size` (default: the images' H, W) is the output size, e.g. the masks'. The model returns
    `{"logits": (B, K, h, w)}` at its own output stride; every pass is brought to `size` by
    bilinear interpolation before averaging. `autocast_dtype` runs the forward passes under
    autocast; resizing and averaging are in float32.
    """
    mode = WHOLE if mode is None else mode
    height, width = images.shape[-2:]
    out_size = (height, width) if size is None else tuple(int(s) for s in size)
    total, passes = None, 0
    for scale in mode.scales:
        scaled = images
        if scale != 1.0:
            scaled = F.interpolate(
                images, size=scaled_size(height, width, scale), mode="bilinear", align_corners=False
            )
        for flipped in (False, True) if mode.flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            if mode.mode == "slide":
                logits = _slide(model, x, mode, autocast_dtype)
                if tuple(logits.shape[-2:]) != out_size:
                    logits = _upsample(logits, out_size)
            else:
                logits = _upsample(_forward(model, x, autocast_dtype), out_size)
            if flipped:
                logits = logits.flip(-1)
            total = logits if total is None else total + logits
            passes += 1
    return total if passes == 1 else total / passes


__all__ = ["MODES", "WHOLE", "EvalMode", "infer_logits", "scaled_size", "slide_windows"]
