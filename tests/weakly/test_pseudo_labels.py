"""Pseudo labels: the two thresholds, absent classes, the crop area, and the refinement hook."""

from __future__ import annotations

import functools

import pytest
import torch

from components.weakly import varm
from components.weakly.pseudo_labels import pseudo_labels

IGN = 255


def identity(image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return scores


def test_thresholds_split_foreground_ignore_background():
    cams = torch.full((1, 2, 2, 3), 0.1)  # class 1 and class 2 CAMs, 2×3 pixels
    cams[0, 0, 0, 0] = 0.6  # class 1 above high                -> 1
    cams[0, 0, 0, 1] = 0.45  # between low and high             -> ignore
    cams[0, 0, 0, 2] = 0.2  # below low                         -> 0
    cams[0, 0, 1, 0], cams[0, 1, 1, 0] = 0.7, 0.9  # two classes above high: the larger -> 2
    cams[0, 1, 1, 1] = 0.5  # class 2 between the thresholds   -> ignore
    cams[0, 0, 1, 2] = 0.55  # exactly at high: ties go to background; above low -> ignore
    out = pseudo_labels(cams, torch.ones(1, 2))
    assert out.dtype == torch.int64
    assert out[0].tolist() == [[1, IGN, 0], [2, IGN, IGN]]
    # Custom thresholds move the split: with high 0.4 the 0.45 pixel is class 1.
    assert pseudo_labels(cams, torch.ones(1, 2), high=0.4, low=0.3)[0, 0, 1] == 1


@pytest.mark.parametrize(
    "refine_fn", [None, identity, varm.refine, functools.partial(varm.refine, variation_weight=0)]
)
def test_constant_cams_per_image_with_and_without_refinement(refine_fn):
    # Constant maps survive resizing and refinement exactly (VARM scales all channels alike).
    cams = torch.zeros(3, 2, 4, 4)
    cams[:, 1] = torch.tensor([0.6, 0.45, 0.2]).view(3, 1, 1)  # class 2
    image = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pseudo_labels(cams, torch.ones(3, 2), image=image, refine_fn=refine_fn)
    assert out.shape == (3, 16, 16)
    assert (out[0] == 2).all() and (out[1] == IGN).all() and (out[2] == 0).all()


@pytest.mark.parametrize("refine_fn", [None, identity, varm.refine])
def test_absent_classes_never_win(refine_fn):
    cams = torch.zeros(2, 3, 4, 4)
    cams[:, 0] = 1.0  # class 1: a perfect CAM, but absent
    cams[:, 2] = 0.2  # class 3: present, weak
    labels = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = pseudo_labels(cams, labels, image=image, refine_fn=refine_fn)
    assert (out == 0).all()  # class 1 zeroed, class 3 below both thresholds -> background


def test_absent_classes_never_win_even_if_refine_fn_promotes_them():
    # An adversarial refinement that lifts class 1 far above everything: it is still masked.
    def promote_class_1(image, scores):
        return scores + torch.tensor([0.0, 10.0, 0.0]).view(1, 3, 1, 1)

    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 1, :, :2] = 0.9  # class 2 present on the left half
    out = pseudo_labels(
        cams, torch.tensor([[0.0, 1.0]]), image=torch.rand(1, 3, 4, 4), refine_fn=promote_class_1
    )
    assert not (out == 1).any()
    assert (out[0, :, 0] == 2).all() and (out[0, :, 3] == 0).all()


@pytest.mark.parametrize("refine_fn", [None, varm.refine])
def test_outside_the_area_is_ignored_and_background_only_images_are_background(refine_fn):
    cams = torch.full((2, 2, 4, 4), 0.9)  # strong CAMs everywhere
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # image 1 has no foreground class
    area = torch.zeros(2, 8, 8, dtype=torch.bool)
    area[:, 1:7, 2:8] = True
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = pseudo_labels(cams, labels, image=image, area=area, refine_fn=refine_fn)
    assert (out[~area] == IGN).all()
    assert (out[0][area[0]] == 1).all()
    assert (out[1][area[1]] == 0).all()


def test_refinement_snaps_a_blurry_cam_to_the_image_edge():
    # Black left half, white right half; low-res CAMs whose bilinear upsampling spills class 1
    # two columns past the edge. The refinement (on the half-size image) moves the boundary
    # onto the edge.
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0] = torch.tensor([1.0, 1.0, 0.8, 0.0])  # class 1, per column
    cams[0, 1] = torch.tensor([0.0, 0.0, 0.7, 1.0])  # class 2
    labels = torch.ones(1, 2)
    raw = pseudo_labels(cams, labels, image=image)
    assert (raw[0, :, 8:] == 1).any()  # the spill
    for refine_fn in (varm.refine, functools.partial(varm.refine, variation_weight=0.0)):
        out = pseudo_labels(cams, labels, image=image, refine_fn=refine_fn)
        assert (out[0, :, :8] == 1).all() and (out[0, :, 8:] == 2).all()


def test_output_size_comes_from_area_image_or_size():
    cams = torch.full((1, 1, 2, 2), 0.9)
    labels = torch.ones(1, 1)
    assert pseudo_labels(cams, labels).shape == (1, 2, 2)
    assert pseudo_labels(cams, labels, size=(6, 4)).shape == (1, 6, 4)
    assert pseudo_labels(cams, labels, image=torch.rand(1, 3, 5, 7)).shape == (1, 5, 7)
    area = torch.ones(1, 3, 3, dtype=torch.bool)
    assert pseudo_labels(cams, labels, area=area).shape == (1, 3, 3)
    with pytest.raises(ValueError, match="disagree"):
        pseudo_labels(cams, labels, image=torch.rand(1, 3, 5, 7), area=area)
    with pytest.raises(ValueError, match="needs the image"):
        pseudo_labels(cams, labels, refine_fn=identity)
