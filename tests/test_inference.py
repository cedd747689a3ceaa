"""components/inference.py: whole / slide / multi-scale / flip evaluation passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.inference import EvalMode, infer_logits, scaled_size, slide_windows


class Conv(nn.Module):
    """Logits from one convolution at full resolution: a 1x1 kernel is translation-equivariant
    (each output pixel depends on its own input pixel only)."""

    def __init__(self, k: int = 4, size: int = 1, symmetric: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, size, padding=size // 2)
        if symmetric:  # mirror-symmetric kernels: f(flip(x)) == flip(f(x))
            with torch.no_grad():
                self.conv.weight.copy_(self.conv.weight + self.conv.weight.flip(-1))

    def forward(self, x):
        return {"logits": self.conv(x)}


class Strided(nn.Module):
    """Logits at 1/4 resolution (like the real networks' output stride), not equivariant."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x):
        return {"logits": self.conv(F.avg_pool2d(x, 4, ceil_mode=True))}


class HeightLogits(nn.Module):
    """Spatially constant logits: class 0 scores the input height, class 1 scores 10."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, _, h, w = x.shape
        logits = torch.empty(b, 2, max(1, h // 2), max(1, w // 2))
        logits[:, 0], logits[:, 1] = float(h), 10.0
        return {"logits": logits}


def _images(b=2, h=13, w=17, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _old_whole(model, images, size):
    """predict_confusion's code before evaluation modes: one pass, one bilinear upsample."""
    return F.interpolate(
        model(images)["logits"].float(), size=size, mode="bilinear", align_corners=False
    )


def test_slide_windows_follow_mmseg_grid():
    # H=11, crop 4, stride 3: rows = max(11 - 4 + 3 - 1, 0) // 3 + 1 = 9 // 3 + 1 = 4, starting
    # at 0, 3, 6, 9; the last (9..13) is clipped to 11 and shifted back to start at 11 - 4 = 7.
    # W=3 < crop 5: rows = max(3 - 5 + 2 - 1, 0) // 2 + 1 = 1, one window of the image's width.
    windows = slide_windows(11, 3, crop=(4, 5), stride=(3, 2))
    assert windows == [(0, 4, 0, 3), (3, 7, 0, 3), (6, 10, 0, 3), (7, 11, 0, 3)]
    # An exact fit: (8 - 4 + 2 - 1) // 2 + 1 = 3 windows at 0, 2, 4.
    assert [w[:2] for w in slide_windows(8, 4, (4, 4), (2, 4))] == [(0, 4), (2, 6), (4, 8)]


@pytest.mark.parametrize("crop", [(13, 17), (20, 32)])
def test_slide_with_one_window_covering_the_image_equals_whole(crop):
    # (20, 32) is larger than the 13x17 image: one window of the image's own size, as in mmseg.
    model, images = Strided(), _images()
    assert slide_windows(13, 17, crop, crop) == [(0, 13, 0, 17)]
    whole = infer_logits(model, images)
    slide = infer_logits(model, images, EvalMode("slide", crop=crop, stride=crop))
    assert whole.shape == (2, 3, 13, 17)
    assert torch.equal(slide, whole)


def test_overlapping_windows_on_an_equivariant_model_equal_whole():
    model, images = Conv(size=1), _images()
    mode = EvalMode("slide", crop=(5, 6), stride=(3, 4))
    windows = slide_windows(13, 17, mode.crop, mode.stride)
    count = torch.zeros(13, 17)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    # rows (13 - 5 + 3 - 1) // 3 + 1 = 4, columns (17 - 6 + 4 - 1) // 4 + 1 = 4; pixels overlap.
    assert len(windows) == 16 and count.min() == 1 and count.max() == 4
    whole = infer_logits(model, images)
    torch.testing.assert_close(infer_logits(model, images, mode), whole, rtol=0, atol=1e-5)
    # The model that is not equivariant sees borders inside the windows: results differ, so
    # the test above is not passing trivially.
    strided = Strided()
    assert not torch.allclose(infer_logits(strided, images, mode), infer_logits(strided, images))


def test_flip_on_symmetric_input_with_symmetric_model_equals_single():
    model = Conv(size=3, symmetric=True)
    half = _images(w=8)
    images = torch.cat([half, half.flip(-1)], dim=-1)  # left-right symmetric
    assert torch.equal(images, images.flip(-1))
    single = infer_logits(model, images)
    flipped = infer_logits(model, images, EvalMode(flip=True))
    torch.testing.assert_close(flipped, single, rtol=0, atol=1e-5)


def test_flip_logits_are_flipped_back():
    # A mirror-symmetric kernel on an asymmetric image: the flipped pass equals the plain one
    # only once its logits are mirrored back.
    model, images = Conv(size=3, symmetric=True), _images()
    single = infer_logits(model, images)
    torch.testing.assert_close(infer_logits(model, images, EvalMode(flip=True)), single)
    mirrored_pass = infer_logits(model, images.flip(-1))
    assert not torch.allclose(mirrored_pass, single, atol=1e-3)


def test_scale_one_alone_equals_whole_and_the_old_code():
    model, images = Strided(), _images()
    old = _old_whole(model, images, (13, 17))
    assert torch.equal(infer_logits(model, images), old)
    assert torch.equal(infer_logits(model, images, EvalMode(scales=(1.0,))), old)
    assert torch.equal(infer_logits(model, images, EvalMode(scales=[1])), old)
    # To another output size (the masks'), still one upsample.
    assert torch.equal(
        infer_logits(model, images, size=(26, 34)), _old_whole(model, images, (26, 34))
    )


def test_scales_and_flip_average_logits_not_probabilities():
    model, images = HeightLogits(), _images(b=1, h=8, w=8)
    out = infer_logits(model, images, EvalMode(scales=(0.5, 1.0), flip=True))
    # Passes at height 4 (twice: plain and flipped) and 8 (twice): class 0 logit (4+4+8+8)/4 = 6.
    assert out.shape == (1, 2, 8, 8)
    assert torch.equal(out[0, 0], torch.full((8, 8), 6.0))
    assert torch.equal(out[0, 1], torch.full((8, 8), 10.0))
    # Averaging probabilities would give another map (p0 = mean(softmax) != softmax(mean)).
    probs = (F.softmax(torch.tensor([4.0, 10.0]), 0) + F.softmax(torch.tensor([8.0, 10.0]), 0)) / 2
    assert not torch.allclose(F.softmax(out[0, :, 0, 0], 0), probs)


def test_scaled_image_size_and_slide_at_a_scale():
    assert scaled_size(13, 17, 0.5) == (7, 9) and scaled_size(3, 3, 0.1) == (1, 1)
    # Slide on the half-size image with a 1x1 conv equals a whole pass at that scale.
    model, images = Conv(size=1), _images(h=24, w=30)
    at_half = infer_logits(model, images, EvalMode(scales=(0.5,)))
    slide = infer_logits(
        model, images, EvalMode("slide", crop=(6, 8), stride=(4, 5), scales=(0.5,))
    )
    assert slide.shape == (2, 4, 24, 30)
    torch.testing.assert_close(slide, at_half, rtol=0, atol=1e-5)
    assert not torch.allclose(at_half, infer_logits(model, images), atol=1e-3)


def test_autocast_pass_is_float32_and_close():
    model, images = Strided(), _images()
    out = infer_logits(model, images, autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, infer_logits(model, images), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "tiles"}, "eval mode must be one of whole, slide"),
        ({"mode": "slide"}, "needs a crop and a stride"),
        ({"mode": "slide", "crop": (0, 8), "stride": (1, 1)}, "crop must be positive"),
        ({"mode": "slide", "crop": (8, -2), "stride": (1, 1)}, "crop must be positive"),
        ({"mode": "slide", "crop": (8, 8), "stride": (4, 9)}, "must not exceed the crop"),
        ({"mode": "slide", "crop": (8, 8, 8), "stride": (4, 4)}, "two numbers"),
        ({"mode": "slide", "crop": (8, 8), "stride": (0, 4)}, "stride must be positive"),
        ({"crop": (8, 8)}, "only apply to mode 'slide'"),
        ({"scales": ()}, "at least one"),
        ({"scales": (1.0, 0.0)}, "scales must be > 0"),
        ({"scales": (-0.5,)}, "scales must be > 0"),
        ({"flip": "yes"}, "flip must be true or false"),
    ],
)
def test_eval_mode_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalMode(**kwargs)


def test_eval_mode_from_config_and_describe():
    mode = EvalMode.from_config(
        {
            "mode": "slide",
            "crop": [512, 1024],
            "stride": 341,
            "scales": [0.75, 1, 1.25],
            "flip": True,
            "boundary_width": 3,
        }
    )
    assert mode == EvalMode("slide", (512, 1024), (341, 341), (0.75, 1.0, 1.25), True)
    assert mode.describe() == "slide (crop 512x1024, stride 341x341), scales 0.75,1,1.25, flip"
    assert EvalMode.from_config({}).plain and EvalMode().describe() == "whole"
    assert not EvalMode(flip=True).plain
