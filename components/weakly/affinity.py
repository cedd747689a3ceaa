"""Affinity from attention (AFA): pairwise labels from pseudo labels, and the affinity loss.

AFA turns the transformer's multi-head self-attention into a semantic affinity A (B, N, N)
between the N = h·w feature positions (an MLP over heads, symmetrised, sigmoid) and supervises it
with pairwise labels derived from the pseudo labels: same class -> 1, different classes -> 0,
uncertain pixel or too far apart -> ignored. The learned affinity later propagates the CAMs
(`propagate_with_background`, AFA's random walk; `method.weakly.propagate_after`).

Usage:

    seeds = downsample_labels(pseudo, size=(h, w))            # (B, h, w) at the feature size
    targets = affinity_labels(seeds, radius=8)                # (B, N, N) in {0, 1, ignore}
    loss = affinity_loss(torch.sigmoid(aff_logits), targets, seeds)   # bg/fg positives split
    loss = affinity_loss(torch.sigmoid(aff_logits), targets)          # AFA's released code

Faithful (Ru et al., "Learning Affinity from Attention", CVPR 2022):
    * Pair labels from the (downsampled, nearest) pseudo labels; pairs with an ignored pixel
      and pairs outside a local radius are ignored.
    * The loss pulls positive pairs to 1 and pushes negative pairs to 0, each term a sum
      normalised by its pair count + 1, with positives split into background–background and
      foreground–foreground pairs: 0.25·pos_bg + 0.25·pos_fg + 0.5·neg (our reading of the
      paper; AFA's released code uses 0.5·pos + 0.5·neg without the split).
Reconstructed (our choices):
    * "Within the radius" is |Δy| < radius and |Δx| < radius (a (2r−1)² box, the pair i = i
      included). AFA's released code uses |Δ| <= radius, a (2r+1)² box: pass radius + 1 to get it.
    * The split needs the class of a positive pair, which {0, 1, ignore} pair labels no longer
      carry, so `affinity_loss` takes the (B, h, w) seeds as well: a positive pair is background
      when its pixels are 0, foreground otherwise. Without seeds it falls back to the released
      code's unsplit 0.5·pos + 0.5·neg.
    * Counts and sums run over the whole batch (one normaliser per term, as AFA), not per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def radius_mask(h: int, w: int, radius: int, device: torch.device | None = None) -> Tensor:
    """(N, N) bool, N = h·w (row-major): True where |Δy| < radius and |Δx| < radius.

    Symmetric, with a True diagonal (for radius >= 1). Our reading of AFA's "within radius"
    (see the module docstring for the released code's <=)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return (dy < radius) & (dx < radius)


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Full-resolution pseudo labels (B, H, W) -> (B, h, w) int64 by nearest sampling.

    Nearest, never bilinear: an interpolated class id (or 255) would be a different class."""
    small = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return small[:, 0].long()


def affinity_labels(labels: Tensor, radius: int = 8, ignore_index: int = 255) -> Tensor:
    """(B, h, w) int64 labels at the feature size -> (B, N, N) int64 pair labels (AFA §3.2).

    1 where both pixels have the same class (background included), 0 where the classes differ,
    ignore_index where either pixel is ignore_index or the pair is outside `radius_mask`.
    """
    b, h, w = labels.shape
    flat = labels.reshape(b, h * w)
    out = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = (flat == ignore_index)[:, :, None] | (flat == ignore_index)[:, None, :]
    ignored = ignored | ~radius_mask(h, w, radius, device=labels.device)[None]
    return out.masked_fill(ignored, ignore_index)


def affinity_loss(pred: Tensor, labels: Tensor, seeds: Tensor | None = None) -> Tensor:
    """Scalar affinity loss of a sigmoid affinity against pair labels (AFA Eq. 7).

    pred (B, N, N) in (0, 1); labels (B, N, N) from `affinity_labels`; seeds (B, h, w) or (B, N)
    the pixel labels they came from. With seeds: 0.25·pos_bg + 0.25·pos_fg + 0.5·neg, where
    pos_bg = Σ(1 − pred) / (count + 1) over pairs labelled 1 whose pixels are background (seed
    0), pos_fg the same over pairs labelled 1 of a foreground class, neg = Σ pred / (count + 1)
    over pairs labelled 0. Without seeds the positives cannot be split and the loss is AFA's
    released form 0.5·pos + 0.5·neg. Ignored pairs never count; the +1 keeps a term finite (and
    0) when there are no such pairs. Gradients reach pred only.
    """
    if labels.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} differ")

    def term(mask: Tensor, values: Tensor) -> Tensor:
        return (values * mask).sum() / (mask.sum() + 1)

    pos, neg = labels == 1, labels == 0
    if seeds is None:
        return 0.5 * term(pos, 1 - pred) + 0.5 * term(neg, pred)
    b, n, _ = pred.shape
    seeds = seeds.reshape(b, -1)
    if seeds.shape[1] != n:
        raise ValueError(f"seeds {tuple(seeds.shape)} do not match pred {tuple(pred.shape)}")
    # Both pixels of a positive pair share a class, so the first one's seed decides.
    bg = (seeds == 0)[:, :, None]
    return (
        0.25 * term(pos & bg, 1 - pred) + 0.25 * term(pos & ~bg, 1 - pred) + 0.5 * term(neg, pred)
    )


def propagate_with_background(
    cams: Tensor,
    aff: Tensor,
    labels: Tensor,
    background: float,
    radius: int = 8,
    power: int = 2,
    eps: float = 0.1,
) -> Tensor:
    """AFA's random-walk propagation of CAMs by the learned affinity (propagte_aff_cam_with_bkg).

    cams (B, K−1, h, w) in [0, 1] at the affinity's feature size; aff (B, N, N), N = h·w, the
    predicted affinity in (0, 1); labels (B, K−1) multi-hot. Returns (B, K, h, w): channel 0 the
    background, then the classes; absent classes are exactly 0.

    Steps (rulixiang/afa utils/camutils.py, propagte_aff_cam_with_bkg, with n_pow = 2 and
    n_log_iter = 0): pairs outside the radius box |Δy| <= radius and |Δx| <= radius (AFA's
    get_mask_by_radius in scripts/dist_train_voc.py, an inclusive box) are set to 0; T = aff^power
    elementwise, each column divided by its sum + eps (eps 0.1, "avoid nan"); the scores
    [background, present classes] are softmaxed over the channels at each position; the
    propagated score of position m is Σ_n score_n · T[n, m]. No gradient.
    """
    b, c, h, w = cams.shape
    n = h * w
    if aff.shape != (b, n, n):
        raise ValueError(f"affinity {tuple(aff.shape)} does not match cams {tuple(cams.shape)}")
    with torch.no_grad():
        near = radius_mask(h, w, radius + 1, device=aff.device)  # |Δ| <= radius
        t = aff.detach().float().masked_fill(~near[None], 0.0) ** power
        t = t / (t.sum(dim=1, keepdim=True) + eps)
        scores = torch.cat([cams.new_full((b, 1, h, w), background), cams.float()], dim=1)
        present = torch.cat([labels.new_ones(b, 1), labels], dim=1) > 0
        scores = scores.masked_fill(~present[..., None, None], float("-inf")).softmax(dim=1)
        out = torch.bmm(scores.reshape(b, c + 1, n), t)
    return out.reshape(b, c + 1, h, w)


__all__ = [
    "affinity_labels",
    "affinity_loss",
    "downsample_labels",
    "propagate_with_background",
    "radius_mask",
]
