"""UniMatch's OHEM labeled criterion (components/semisup/ohem.py) on hand-derived cases.

The rule (LiheYoung/UniMatch@0324f3d util/ohem.py L28-57): with N valid pixels and p_i the
probability of pixel i's true class, keep p_i <= max(thresh, p_(min_kept)) (p_(k): the k-th
smallest over the whole batch); min_kept > N or min_kept = 0: keep every valid pixel; the loss
is the mean CE over the kept pixels.
"""

from __future__ import annotations

import math

import pytest
import torch

from components.semisup.ohem import ohem_ce, ohem_keep

# One 2 x 3 image, 2 classes, true class 0 everywhere but the ignored last pixel. Logits
# (ln p, ln(1 - p)) make the softmax probability of the true class p exactly (to float32).
P = [[0.9, 0.6, 0.3], [0.8, 0.75, 0.5]]


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(P, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()]).unsqueeze(0).float()  # (1, 2, 2, 3)
    mask = torch.zeros(1, 2, 3, dtype=torch.long)
    mask[0, 1, 2] = 255  # ignored: never kept, never counted in N = 5
    return logits, mask


def _kept(min_kept: int, thresh: float = 0.7) -> list[list[bool]]:
    logits, mask = _case()
    return ohem_keep(logits, mask, thresh, min_kept)[0].tolist()


def test_threshold_wins_when_the_kth_hardest_is_below_it():
    # Valid p sorted: 0.3, 0.6, 0.75, 0.8, 0.9. min_kept 2 -> p_(2) = 0.6 <= 0.7: the cut is
    # 0.7, so 0.3 and 0.6 are kept (and would be even with min_kept 1).
    assert _kept(2) == [[False, True, True], [False, False, False]]
    assert _kept(1) == _kept(2)
    # Loss: the mean of -ln p over the kept pixels = (-ln 0.6 - ln 0.3) / 2 = 0.857399.
    logits, mask = _case()
    expected = (-math.log(0.6) - math.log(0.3)) / 2
    assert float(ohem_ce(logits, mask, 0.7, 2)) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.857399, abs=1e-6)


def test_min_kept_wins_when_the_kth_hardest_is_above_the_threshold():
    # min_kept 4 -> p_(4) = 0.8 > 0.7: the cut becomes 0.8 and 0.3, 0.6, 0.75, 0.8 are kept.
    assert _kept(4) == [[False, True, True], [True, True, False]]
    logits, mask = _case()
    expected = -sum(math.log(p) for p in (0.3, 0.6, 0.75, 0.8)) / 4  # 0.556406
    assert float(ohem_ce(logits, mask, 0.7, 4)) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.556406, abs=1e-6)
    # A lower threshold changes nothing here (the k-th hardest sets the cut); a threshold of
    # 0.85 keeps four as well (0.9 > 0.85); 0.95 keeps all five.
    assert _kept(4, thresh=0.1) == _kept(4)
    assert _kept(4, thresh=0.85) == _kept(4)
    assert _kept(4, thresh=0.95) == [[True, True, True], [True, True, False]]


def test_no_selection_when_min_kept_exceeds_the_valid_pixels_or_is_zero():
    every_valid = [[True, True, True], [True, True, False]]
    assert _kept(6) == every_valid  # 6 > N = 5: plain CE (ohem.py L38-39)
    assert _kept(5) == every_valid  # 5 = N: p_(5) = 0.9 is the cut, all kept
    assert _kept(0) == every_valid  # UniMatch skips the selection for min_kept 0 (L45)
    logits, mask = _case()
    plain = torch.nn.functional.cross_entropy(logits, mask, ignore_index=255)
    torch.testing.assert_close(ohem_ce(logits, mask, 0.7, 6), plain)
    expected = -sum(math.log(p) for p in (0.9, 0.6, 0.3, 0.8, 0.75)) / 5
    assert float(plain) == pytest.approx(expected, rel=1e-5)


def test_ties_at_the_cut_are_all_kept():
    # Two pixels share the 2nd-smallest p = 0.8 (> 0.7): min_kept 2 keeps three pixels.
    p = torch.tensor([[0.95, 0.8, 0.4, 0.8]])
    logits = torch.stack([p.log(), (1 - p).log()]).unsqueeze(0)  # (1, 2, 1, 4)
    mask = torch.zeros(1, 1, 4, dtype=torch.long)
    assert ohem_keep(logits, mask, 0.7, 2)[0].tolist() == [[False, True, True, True]]


def test_min_kept_counts_pixels_of_the_whole_batch():
    # Image 0: p = 0.9, 0.95; image 1: p = 0.2, 0.99. Over the batch (one worker's labeled batch,
    # as UniMatch's criterion sees one GPU's) the 2nd smallest is 0.9 > 0.5: cut 0.9 keeps one
    # pixel of each image, where a per-image rule would keep both pixels of image 0.
    p = torch.tensor([[[0.9, 0.95]], [[0.2, 0.99]]])  # (2, 1, 2)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)  # (2, 2, 1, 2)
    mask = torch.zeros(2, 1, 2, dtype=torch.long)
    keep = ohem_keep(logits, mask, 0.5, 2)
    assert keep.tolist() == [[[True, False]], [[True, False]]]


def test_gradient_only_from_kept_pixels_and_none_through_the_selection():
    logits, mask = _case()
    logits.requires_grad_(True)
    ohem_ce(logits, mask, 0.7, 2).backward()
    moved = logits.grad.abs().sum(dim=1)[0] > 0
    assert moved.tolist() == [[False, True, True], [False, False, False]]
    # d/dz of mean CE over 2 kept pixels: (softmax - onehot) / 2; class-0 entry (p - 1) / 2.
    assert float(logits.grad[0, 0, 0, 2]) == pytest.approx((0.3 - 1) / 2, rel=1e-5)


def test_logits_are_upsampled_to_the_mask_and_all_ignore_gives_zero():
    logits, _ = _case()
    small = logits[:, :, :1, :1]  # p = 0.9 everywhere after upsampling
    got = ohem_ce(small, torch.zeros(1, 4, 4, dtype=torch.long), 0.7, 3)
    assert float(got) == pytest.approx(-math.log(0.9), rel=1e-5)  # min_kept 3: cut 0.9, all 16
    ignored = torch.full((1, 2, 3), 255, dtype=torch.long)
    zero = ohem_ce(logits.requires_grad_(True), ignored, 0.7, 2)
    assert float(zero.detach()) == 0.0
    zero.backward()  # a gradient path, as segmentation_ce
