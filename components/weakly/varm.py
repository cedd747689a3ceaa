"""Pseudo-label refinements: TSCD's variation-aware refinement (VARM), AFA's pixel-adaptive
refinement (PAR), and the older appearance-only `plain` ablation.

Coarse class scores (CAMs with a background score) blur across object boundaries. All three
refinements propagate the scores between each pixel and its 48 dilated neighbours — the 8
directions of a 3×3 window (centre excluded) at dilations (1, 2, 4, 8, 12, 24) — with weights
that are large for neighbours of similar colour, iterating P ← Σ_n a_n · P_n.

Usage:

    refined = refine(image, scores)                           # VARM, variation_weight = 0.01
    par = par_refine(image, scores)                           # AFA's PAR (w1 0.3, w2 0.01)
    plain = refine(image, scores, variation_weight=0.0)       # the old "plain" ablation
    refine_fn = functools.partial(refine, iterations=10)      # for pseudo_labels(refine_fn=...)

`image` is (B, 3, H, W) in [0, 1] and the scores (B, K, H, W) at the same resolution (the
pseudo-label code refines at half the crop size).

The weights, per pixel and neighbour n (I_n: the image read at the neighbour, replicate padding):

    κ_n = −mean_c ( (4 · |I_n − I| / σ_local)² ),  σ_local = std of the 48 I_n per channel, +1e-8
    V_n = mean_c ( D at the neighbour ),  D = (I[y+1,x] − I[y,x])² + (I[y,x+1] − I[y,x])²
    a_n = softmax_n(κ) − variation_weight · softmax_n(V)

The variation term takes weight away from neighbours that sit on strong image variation (edges,
texture), so scores do not creep along a boundary. Because softmax_n(V) sums to one, the weights
sum to 1 − variation_weight: each iteration shrinks all scores by that factor (0.99¹⁰ ≈ 0.904
after 10 iterations). Every class shrinks alike, so the argmax — all the pseudo labels use — is
unaffected; do not read the refined scores as probabilities. With variation_weight = 0 the
weights are a softmax (sum to one) and this is the plain appearance-only refinement: that is how
the "plain" ablation is built. It is not AFA's PAR (below): its factor is 4 where PAR divides by
w1 = 0.3, and it has no positional term; it stays for configs that name `refine: plain`.

AFA's PAR (rulixiang/afa wetr/PAR.py; `par_refine`), per pixel and neighbour n:

    κ_n = −mean_c ( (|I_n − I| / σ_local / w1)² ),  σ_local as above (+1e-8),  w1 = 0.3
    π_n = −(p_n / σ_p / w1)²,  p_n = d for the 4 axis neighbours and d·√2 for the 4 diagonal
          ones at dilation d, σ_p their (unbiased) standard deviation over all N neighbours
    a_n = softmax_n(κ) + w2 · softmax_n(π),  w2 = 0.01

The positional softmax is the same at every pixel: it favours the nearest axis neighbours (at
the default dilations almost all its mass is on the 4 at distance 1). The weights sum to
1 + w2, so each iteration grows every score by 1.01 — again the argmax is unaffected.
PAR.py lines (commit b1740696): w1, w2 = 0.3, 0.01 (lines ~36-37); the 8-direction kernel and
replicate padding per dilation (get_kernel, get_dilated_neighbors, lines ~10-49); the distances
(get_pos, lines ~51-62: ones, √2 at kernel indices 0, 2, 5, 7, times each dilation); forward
(lines ~64-91): `aff = -(_imgs_abs / (_imgs_std + 1e-8) / self.w1)**2` averaged over channels,
`pos_aff = -(_pos_rep / (_pos_std + 1e-8) / self.w1)**2`, `softmax(aff) + w2 * softmax(pos_aff)`
over the neighbours, then num_iter times `masks = (_masks * aff).sum(2)`. AFA builds it with
num_iter=10, dilations [1, 2, 4, 8, 12, 24] (scripts/dist_train_voc.py, train()).

Faithful (Xu et al., "Self Correspondence Distillation for End-to-End Weakly-Supervised Semantic
Segmentation" (TSCD), AAAI 2023; Ru et al., "Learning Affinity from Attention" (AFA), CVPR 2022):
    * 48 neighbours (8 directions × dilations 1, 2, 4, 8, 12, 24), replicate padding.
    * κ with the factor 4 and the per-pixel, per-channel standard deviation over the neighbours
      (unbiased, as torch.std in both papers' code), averaged over colour channels.
    * The variation term as a second softmax over the neighbours subtracted with weight 0.01,
      and 10 iterations.
Reconstructed (our choices):
    * V_n is D evaluated at the neighbour's (clamped) position. TSCD's code differences the
      replicate-shifted image stack itself; the two agree except within the largest dilation of
      the border, where the shifted view repeats a border row/column (difference 0 there).
    * AFA's PAR adds a positional term (w2 · softmax of the neighbour distance), which is not
      part of VARM and is left out of the plain variant too: plain = VARM with variation_weight 0
      (`par_refine` has it).
    * PAR's interpolation of the scores to the image size (align_corners=True) is left to the
      caller: the scores must already have the image's size (AFA's callers resize them first,
      so it is a no-op there).
    * The propagation accumulates neighbour by neighbour instead of stacking a (B, K, 48, H, W)
      tensor: same result, memory of a few (B, K, H, W) maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)

# The 8 directions of a 3×3 window without its centre, row-major (AFA's kernel order).
_DIRECTIONS: tuple[tuple[int, int], ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)


def neighbour_offsets(dilations: Sequence[int] = DILATIONS) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the neighbours: for each dilation d, the 8 directions times d."""
    if not dilations or any(int(d) < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {tuple(dilations)}")
    return [(dy * int(d), dx * int(d)) for d in dilations for dy, dx in _DIRECTIONS]


def _shifted_views(x: Tensor, offsets: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Views of x (B, C, H, W) read at (y + dy, x + dx), clamped to the image (replicate pad)."""
    height, width = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return [
        padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width] for dy, dx in offsets
    ]


def neighbours(x: Tensor, dilations: Sequence[int] = DILATIONS) -> Tensor:
    """(B, C, H, W) -> (B, C, N, H, W): x read at each of the N = 8·len(dilations) neighbours."""
    return torch.stack(_shifted_views(x, neighbour_offsets(dilations)), dim=2)


def appearance_affinity(image: Tensor, dilations: Sequence[int] = DILATIONS) -> Tensor:
    """κ (B, N, H, W) of image (B, 3, H, W): −mean_c((4·|I_n − I| / σ_local)²) (AFA PAR, TSCD).

    σ_local is the (unbiased) standard deviation of the N neighbour values per pixel and channel,
    plus 1e-8: the colour difference is measured relative to the local contrast, so a faint edge
    in a flat region counts as much as a strong one in a textured region.
    """
    image = image.float()
    nb = neighbours(image, dilations)  # (B, 3, N, H, W)
    sigma = nb.std(dim=2, keepdim=True) + 1e-8
    return -((4.0 * (nb - image.unsqueeze(2)).abs() / sigma) ** 2).mean(dim=1)


def variation_term(image: Tensor, dilations: Sequence[int] = DILATIONS) -> Tensor:
    """V (B, N, H, W): the image's squared forward differences, read at each neighbour (TSCD).

    D = (I[y+1,x] − I[y,x])² + (I[y,x+1] − I[y,x])² with replicate padding (so 0 across the last
    row/column), averaged over channels, then read at the neighbour's clamped position.
    """
    image = image.float()
    nxt = F.pad(image, (0, 1, 0, 1), mode="replicate")
    d = (nxt[..., 1:, :-1] - image) ** 2 + (nxt[..., :-1, 1:] - image) ** 2
    return neighbours(d.mean(dim=1, keepdim=True), dilations)[:, 0]


def neighbour_weights(
    image: Tensor, dilations: Sequence[int] = DILATIONS, variation_weight: float = 0.01
) -> Tensor:
    """a (B, N, H, W) = softmax_n(κ) − variation_weight · softmax_n(V) (TSCD's VARM).

    Sums over n to 1 − variation_weight; variation_weight = 0 is the plain appearance-only
    refinement (weights sum to 1).
    """
    a = appearance_affinity(image, dilations).softmax(dim=1)
    if variation_weight != 0.0:
        a = a - variation_weight * variation_term(image, dilations).softmax(dim=1)
    return a


@torch.no_grad()
def refine(
    image: Tensor,
    probs: Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = DILATIONS,
    variation_weight: float = 0.01,
) -> Tensor:
    """Refined scores (B, K, H, W): `iterations` times P ← Σ_n a_n · P_n (TSCD VARM; with
    variation_weight 0, the old appearance-only `plain` refinement — AFA's PAR is `par_refine`).

    image (B, 3, H, W) in [0, 1], probs (B, K, H, W) at the same size; the weights a_n come from
    `neighbour_weights` (computed once, from the image only), P_n is the current P read at the
    n-th neighbour with replicate padding. Scores shrink by (1 − variation_weight) per iteration
    (see the module docstring); argmax is what to use.
    """
    _check_sizes(image, probs)
    weights = neighbour_weights(image, dilations, variation_weight)
    return _propagate(weights, probs, dilations, iterations)


def _check_sizes(image: Tensor, probs: Tensor) -> None:
    if image.shape[0] != probs.shape[0] or image.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and scores {tuple(probs.shape)} "
            "need the same batch and size"
        )


def _propagate(weights: Tensor, probs: Tensor, dilations: Sequence[int], iterations: int) -> Tensor:
    """`iterations` times P ← Σ_n a_n · P_n, weights (B, N, H, W), P read with replicate padding."""
    offsets = neighbour_offsets(dilations)
    weights = weights.unsqueeze(2)  # (B, N, 1, H, W)
    p = probs.float()
    for _ in range(iterations):
        out = torch.zeros_like(p)
        for n, view in enumerate(_shifted_views(p, offsets)):
            out.add_(weights[:, n] * view)
        p = out
    return p


PAR_W1 = 0.3  # AFA wetr/PAR.py: self.w1
PAR_W2 = 0.01  # AFA wetr/PAR.py: self.w2


def neighbour_distances(dilations: Sequence[int] = DILATIONS) -> Tensor:
    """(N,) float: each neighbour's distance, d for the axis directions and d·√2 for the
    diagonal ones, in `neighbour_offsets` order (AFA PAR's get_pos)."""
    return torch.tensor(
        [(dy * dy + dx * dx) ** 0.5 for dy, dx in neighbour_offsets(dilations)],
        dtype=torch.float32,
    )


def par_weights(
    image: Tensor,
    dilations: Sequence[int] = DILATIONS,
    w1: float = PAR_W1,
    w2: float = PAR_W2,
) -> Tensor:
    """a (B, N, H, W) = softmax_n(κ) + w2 · softmax_n(π) of AFA's PAR (module docstring).

    κ_n = −mean_c((|I_n − I| / (σ_local + 1e-8) / w1)²), π_n = −(p_n / (σ_p + 1e-8) / w1)², with
    p_n the neighbour distances and σ's the unbiased standard deviations over the neighbours.
    Sums over n to 1 + w2."""
    if w1 <= 0:
        raise ValueError(f"w1 must be > 0, got {w1}")
    image = image.float()
    nb = neighbours(image, dilations)  # (B, C, N, H, W)
    sigma = nb.std(dim=2, keepdim=True) + 1e-8
    kappa = -(((nb - image.unsqueeze(2)).abs() / sigma / w1) ** 2).mean(dim=1)
    a = kappa.softmax(dim=1)
    if w2 != 0.0:
        dist = neighbour_distances(dilations).to(image.device)
        pos = (-((dist / (dist.std() + 1e-8) / w1) ** 2)).softmax(dim=0)
        a = a + w2 * pos[None, :, None, None]
    return a


@torch.no_grad()
def par_refine(
    image: Tensor,
    probs: Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = DILATIONS,
    w1: float = PAR_W1,
    w2: float = PAR_W2,
) -> Tensor:
    """AFA's pixel-adaptive refinement (rulixiang/afa wetr/PAR.py): `iterations` times
    P ← Σ_n a_n · P_n with a = `par_weights(image)`. image (B, C, H, W) in [0, 1], probs
    (B, K, H, W) at the same size; AFA's defaults: 10 iterations, dilations 1, 2, 4, 8, 12, 24,
    w1 0.3, w2 0.01. Scores grow by (1 + w2) per iteration; argmax is what to use."""
    _check_sizes(image, probs)
    return _propagate(par_weights(image, dilations, w1, w2), probs, dilations, iterations)


__all__ = [
    "DILATIONS",
    "PAR_W1",
    "PAR_W2",
    "appearance_affinity",
    "neighbour_distances",
    "neighbour_offsets",
    "neighbour_weights",
    "neighbours",
    "par_refine",
    "par_weights",
    "refine",
    "variation_term",
]
