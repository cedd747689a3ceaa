"""Self Correspondence Distillation (SCD): CAM correspondences teach the segmentation head.

Xu et al., "Self Correspondence Distillation for End-to-End Weakly-Supervised Semantic
Segmentation", AAAI 2023 (arXiv 2302.13765). The segmentation head of an end-to-end WSSS model
learns from the CAMs of its own classification branch, but not from their values: from their
*correspondences*, the pairwise cosine similarities between pixels of the image and of a
downscaled second view of it. The segmentation logits' correspondences are pulled towards them.

Usage, per training step::

    small = second_view(images)                   # (B, 3, h, w): the image downscaled by 0.3
    cam1, seg1 = model(images)                    # CAMs and segmentation logits of view 1
    cam2, seg2 = model(small)                     # ... of view 2
    seg1 = F.interpolate(seg1, cam1.shape[-2:], mode="bilinear", align_corners=False)
    seg2 = F.interpolate(seg2, cam2.shape[-2:], mode="bilinear", align_corners=False)
    loss = loss + weight * scd_loss(cam1, cam2, seg1, seg2)

The loss. Sample P1 points u of view 1 and P2 points v of view 2 (default 40 x 40 = 1600 each,
uniformly, with replacement, independently per image). With ĉ the L2-normalised channel vector
of a CAM and ŝ that of the segmentation logits at a point,

    F[u, v]  = ĉ₁(u) · ĉ₂(v)                                  (target, no gradient)
    F̃[u, v]  = F[u, v] − mean_v' F[u, v'] + mean_{u', v'} F[u', v']
    C[u, v]  = ŝ₁(u) · ŝ₂(v)
    L_SCD    = −mean_{b, u, v} max(C[u, v], 0) · F̃[u, v]

so C is pushed up where F̃ > 0 and, through the ReLU, only down to 0 where F̃ < 0. Gradients
reach the segmentation maps only; the CAMs are detached.

Faithful (the paper): the 0.3 second view; CAMs as the teacher and the segmentation logits as the
student of the same network; cosine correspondences over randomly sampled points of the two
views; the row-centred target with the mean added back; −max(C, 0) · F̃; no gradient into the CAMs.

Reconstructed (ours):
  * The mean added back is taken *per image*. Public code derived from TSCD (e.g. ECA's
    ``utils/corrloss.py``) adds the mean over the whole batch; per image keeps one image's
    loss independent of its batch-mates.
  * Points are integer pixel positions (flat indices) drawn with replacement, not continuous
    coordinates read with bilinear ``grid_sample`` as in that code; the caller resizes each
    view's segmentation logits to that view's CAM size, so one index addresses both maps.
  * ``eps`` in the normalisation is 1e-6: a zero CAM vector (background pixels whose CAMs are
    all zero) then has similarity 0 to everything, not NaN, and a zero logit vector gets a large
    but finite gradient rather than 1/1e-12.
  * All maths in float32, whatever the input dtype (bf16 autocast included).

A property of the formula worth knowing (tested): ``mean_{u,v} F̃ = mean_{u,v} F`` ≥ 0, so a
collapsed head (C = 1 everywhere) scores ``−mean F``, which is never worse than copying the CAM
correspondences when the CAMs are one-hot (it ties when the regions seen by view 1's points have
equal shares of view 2's points, and wins by the variance of those shares otherwise). SCD is
therefore a shaping term next to the segmentation loss on pseudo-labels, not a loss to train a
head from on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def second_view(images: Tensor, factor: float = 0.3) -> Tensor:
    """(B, 3, H, W) -> (B, 3, h, w): bilinear downscale, h = max(1, round(H·factor)), same for w.

    The paper's second view is the image downscaled by 0.3 (align_corners=False, no antialias).
    """
    if images.dim() != 4:
        raise ValueError(f"second_view needs (B, C, H, W) images, got {tuple(images.shape)}")
    if factor <= 0:
        raise ValueError(f"second_view factor must be positive, got {factor}")
    h, w = images.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def sample_points(
    b: int,
    h: int,
    w: int,
    num: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(b, num) int64 flat indices into an h×w map: uniform, with replacement, one row per image.

    Reproducible for a seeded ``generator`` (which must live on ``device``).
    """
    if b < 1 or h < 1 or w < 1 or num < 1:
        raise ValueError(f"sample_points needs positive b, h, w, num, got {(b, h, w, num)}")
    return torch.randint(h * w, (b, num), generator=generator, device=device, dtype=torch.long)


def correspondence(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """(B, C, N) x (B, C, M) -> (B, N, M): cosine similarity of the channel vectors (float32).

    A zero vector is divided by ``eps`` instead of its norm, so its similarities are 0, not NaN.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(
            "correspondence needs (B, C, N) and (B, C, M), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    with torch.autocast(a.device.type, enabled=False):  # bf16 bmm would round the target
        a_hat = F.normalize(a.float(), dim=1, eps=eps)
        b_hat = F.normalize(b.float(), dim=1, eps=eps)
        return torch.bmm(a_hat.transpose(1, 2), b_hat)


def centred_target(f: Tensor) -> Tensor:
    """(B, N, M) -> (B, N, M): F − mean over the second view's points + the image's mean of F."""
    return f - f.mean(dim=2, keepdim=True) + f.mean(dim=(1, 2), keepdim=True)


def _gather(maps: Tensor, points: Tensor) -> Tensor:
    """(B, K, h, w) and (B, P) flat indices -> (B, K, P): the channel vectors at the points."""
    flat = maps.flatten(2)
    return flat.gather(2, points.unsqueeze(1).expand(-1, flat.shape[1], -1))


def _check_points(points: Tensor, batch: int, name: str) -> Tensor:
    if points.dim() != 2 or points.shape[0] != batch:
        raise ValueError(f"{name} must be (B={batch}, P) flat indices, got {tuple(points.shape)}")
    return points.long()


def _points(b: int, h: int, w: int, num: int, generator: torch.Generator | None, device) -> Tensor:
    """`num` sampled points, or every pixel once when the map has no more than `num` pixels:
    uniform sampling with replacement then only adds noise around that same expectation (small
    crops and the 0.3x view have far fewer than 1600 pixels), at up to (1600 / h·w)² the cost."""
    if h * w <= num:
        return torch.arange(h * w, device=device).expand(b, -1)
    return sample_points(b, h, w, num, generator, device)


def scd_loss(
    cam1: Tensor,
    cam2: Tensor,
    seg1: Tensor,
    seg2: Tensor,
    num_points: int = 1600,
    points1: Tensor | None = None,
    points2: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_SCD = −mean(max(C, 0) · F̃), a float32 scalar; gradients reach seg1 and seg2 only.

    cam1 (B, Kc, h1, w1), cam2 (B, Kc, h2, w2): CAMs of the image and of its second view.
    seg1 (B, Ks, h1, w1), seg2 (B, Ks, h2, w2): segmentation logits, each resized by the caller
    to its view's CAM size. points1 (B, P1) and points2 (B, P2), flat indices into h1·w1 and
    h2·w2, fix the sampled points; otherwise ``num_points`` are drawn per view with
    ``generator`` (every pixel once when a view has no more than ``num_points``). F̃'s added-back mean is per image (reconstruction, see the module docstring).
    """
    for name, cam, seg in (("view 1", cam1, seg1), ("view 2", cam2, seg2)):
        if cam.dim() != 4 or seg.dim() != 4 or cam.shape[-2:] != seg.shape[-2:]:
            raise ValueError(
                f"{name}: CAM and segmentation maps need the same spatial size, got CAM "
                f"{tuple(cam.shape)} and seg {tuple(seg.shape)}"
            )
    batch = cam1.shape[0]
    if {cam2.shape[0], seg1.shape[0], seg2.shape[0]} != {batch}:
        raise ValueError(
            f"batch sizes differ: cam1 {tuple(cam1.shape)}, cam2 {tuple(cam2.shape)}, "
            f"seg1 {tuple(seg1.shape)}, seg2 {tuple(seg2.shape)}"
        )
    if cam1.shape[1] != cam2.shape[1] or seg1.shape[1] != seg2.shape[1]:
        raise ValueError(
            f"the two views need the same channels: cam1 {tuple(cam1.shape)}, cam2 "
            f"{tuple(cam2.shape)}, seg1 {tuple(seg1.shape)}, seg2 {tuple(seg2.shape)}"
        )
    if points1 is None:
        points1 = _points(batch, *cam1.shape[-2:], num_points, generator, cam1.device)
    if points2 is None:
        points2 = _points(batch, *cam2.shape[-2:], num_points, generator, cam2.device)
    points1 = _check_points(points1, batch, "points1")
    points2 = _check_points(points2, batch, "points2")

    # The CAMs are the teacher: the target must not train the classification branch towards
    # whatever the segmentation head currently predicts.
    with torch.no_grad():
        target = centred_target(
            correspondence(_gather(cam1.detach(), points1), _gather(cam2.detach(), points2))
        )
    c = correspondence(_gather(seg1, points1), _gather(seg2, points2))
    return -(c.clamp_min(0) * target).mean()


__all__ = ["centred_target", "correspondence", "sample_points", "scd_loss", "second_view"]
