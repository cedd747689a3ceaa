"""Denoised Texture Intensity Equalization Module (DTIEM) of SSTKD (Ji et al., CVPR 2022) and L_sta.

Statistical texture of a low-level feature map, parameter-free and fully vectorised:

1. anchors: importance-weighted average of the feature on region grids {1,2,3,6};
2. s_i: cosine similarity of each pixel's feature vector to the anchor of its cell;
3. heuristic iterative quantization of s into N levels (uniform start + T Lloyd–Max rounds) and a
   soft, differentiable assignment e_iq of every pixel to the levels;
4. intensity-limited denoising: the level histogram with tiny bins dropped and high bins clipped
   (CLAHE-style, excess redistributed);
5. descriptor per anchor grid: [levels, equalized histogram, level-wise mean feature].

    desc = texture_descriptor(feat)                                    # dict of (B,G,N[,C])
    loss = statistical_texture_loss(student_low, teacher_low, num_levels=16)

Faithful to the paper: the five steps above and one MSE between student and teacher descriptors.
Reconstructed (our choices, documented where they are made): the importance weights (level-1
Laplacian band magnitude), Lloyd–Max with empty levels kept in place, per-side hat widths of the
soft assignment, the order "drop, then clip" and its water-filling redistribution, quantizing
the student with the teacher's levels, and the unit scale of the two descriptor parts in the
loss (histogram x N, level means / the teacher's mean square: `statistical_texture_terms`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from components.distillation.contourlet import laplacian_band, match_teacher_size, max_levels
from components.distillation.term import StepView, Term

_GRIDS = (1, 2, 3, 6)
_IMPORTANCE_FLOOR = 1e-3  # a flat cell's pixels still count, relative to the map's mean energy
_GAP_EPS = 1e-6  # coincident levels (a constant map) would give a zero hat width
_MASS_EPS = 1e-6
_COS_EPS = 1e-8  # a zero feature vector has similarity 0 to everything
_TINY = torch.finfo(torch.float32).tiny  # the mean square of an all-zero teacher map


def _importance(feat: Tensor) -> Tensor:
    """Per-pixel texture energy (B,1,H,W), no gradient: |B_1| (the level-1 Laplacian band-pass,
    `contourlet.laplacian_band`) averaged over channels, plus a floor of 1e-3 × its mean over the
    map so all-flat cells fall back to a plain average. Maps under 3 px get uniform weights."""
    b, _, h, w = feat.shape
    if max_levels(h, w) < 1:
        return feat.new_ones(b, 1, h, w)
    energy = laplacian_band(feat.detach()).abs().mean(dim=1, keepdim=True)
    return energy + _IMPORTANCE_FLOOR * energy.mean(dim=(2, 3), keepdim=True) + 1e-12


def anchor_similarity(feat: Tensor, grids: Sequence[int] = _GRIDS) -> Tensor:
    """Cosine similarity of every pixel's feature vector to the anchor of its cell, (B,G,H*W).

    feat: (B,C,H,W). For a g×g grid the cells are adaptive_avg_pool2d's regions and the anchor of
    a cell is Σ w_i f_i / Σ w_i over its pixels, with w the importance of `_importance`
    (equivalently: weights normalised to average 1 per cell). Pixel (y, x) takes the anchor of
    cell (⌊y·g/H⌋, ⌊x·g/W⌋) — nearest upsampling, and always a region that contains the pixel.
    Gradients flow through the features and the anchors, not through the weights.
    """
    if not grids or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grids):
        raise ValueError(f"DTIEM grids must be positive integers, got {grids!r}")
    _, _, h, w = feat.shape
    weight = _importance(feat).flatten(2)  # (B,1,HW)
    member, pick = _cell_matrices(h, w, tuple(grids), feat.device, feat.dtype)
    flat = feat.flatten(2)  # (B,C,HW)
    # All cells of all grids at once (K = Σ g² of them): weighted sums, unit anchors, and every
    # pixel's dot product with every unit anchor; `pick` keeps the one of its cell per grid
    # (index_select: unlike gather, its backward does not keep the (B,HW,K) dots alive).
    anchors = (flat * weight) @ member / (weight @ member).clamp_min(1e-30)  # (B,C,K)
    dots = _unit(flat).transpose(1, 2) @ _unit(anchors)  # (B,HW,K)
    picked = dots.flatten(1).index_select(1, pick)  # (B,HW·G)
    return picked.view(dots.shape[0], h * w, -1).transpose(1, 2)  # (B,G,HW)


def _unit(x: Tensor) -> Tensor:
    """x / max(‖x‖, eps) along dim 1, as x · rsqrt(max(Σx², eps²)): the same value as with
    `Tensor.norm`, whose CPU kernel and backward cost several times more on these small maps.
    Clamping the sum (not the root) keeps the gradient finite for a zero vector."""
    return x * torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp_min(_COS_EPS**2))


@functools.lru_cache(maxsize=64)
def _cell_matrices(
    h: int, w: int, grids: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The cells of all grids of an h×w map, K = Σ g² of them (grid by grid, row-major):
    `member` (HW,K) 1 where a pixel lies in a cell — adaptive_avg_pool2d's regions, rows
    [⌊i·h/g⌋, ⌈(i+1)·h/g⌉), which overlap when g does not divide h — so pooling is a matmul
    (indexing and its index_put backward are several times slower on CPU); `pick` (HW·G,) int64,
    for pixel i = y·w + x and grid k at i·G + k, the flat index i·K + c into (HW,K) of the cell
    c = (⌊y·g/h⌋, ⌊x·g/w⌋) whose anchor the pixel takes (nearest upsampling of the anchors)."""

    def axis(n: int, g: int) -> Tensor:
        inside = torch.zeros(g, n, dtype=dtype)
        for i in range(g):
            inside[i, (i * n) // g : -(-((i + 1) * n) // g)] = 1
        return inside

    members, owners, offset = [], [], 0
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for g in grids:
        members.append(torch.einsum("iy,jx->yxij", axis(h, g), axis(w, g)).reshape(h * w, g * g))
        owners.append((offset + (ys * g // h) * g + xs * g // w).flatten())
        offset += g * g
    member = torch.cat(members, 1)
    pick = torch.arange(h * w).unsqueeze(1) * member.shape[1] + torch.stack(owners, 1)
    return member.to(device).contiguous(), pick.flatten().to(device)


def quantization_levels(s: Tensor, num_levels: int = 16, iterations: int = 3) -> Tensor:
    """Heuristic iterative quantization of the rows of s: (…, M) -> sorted levels (…, N).

    Levels start uniform over [min s, max s] of each row (both ends included) and take
    `iterations` Lloyd–Max rounds: every value goes to its nearest level (ties to the lower one)
    and each level moves to the mean of its values. An empty level is re-seeded where it was
    (keeps its previous value): a Lloyd centroid lies inside its own cell, so levels stay
    distinct, sorted and inside [min, max]. Computed without gradient — levels are statistics.
    """
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(
            f"method.dtiem.levels must be an integer >= 2 quantization levels, got {num_levels!r}"
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"method.dtiem.iterations must be an integer >= 0, got {iterations!r}")
    with torch.no_grad():
        s = s.detach().contiguous()
        lo, hi = s.amin(dim=-1, keepdim=True), s.amax(dim=-1, keepdim=True)
        steps = torch.linspace(0, 1, num_levels, device=s.device, dtype=s.dtype)
        levels = lo + (hi - lo) * steps
        ones = torch.ones_like(s)
        for _ in range(iterations):
            mids = ((levels[..., 1:] + levels[..., :-1]) / 2).contiguous()
            nearest = torch.searchsorted(mids, s)  # s == mid goes to the lower level
            sums = torch.zeros_like(levels).scatter_add_(-1, nearest, s)
            counts = torch.zeros_like(levels).scatter_add_(-1, nearest, ones)
            levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
        levels = levels.sort(dim=-1).values
        return torch.minimum(torch.maximum(levels, lo), hi)


def soft_assignment(s: Tensor, levels: Tensor) -> Tensor:
    """e_iq = max(0, 1 − |s_i − l_q| / Δ_q): (…, M) values and (…, N) sorted levels -> (…, M, N).

    For non-uniform levels Δ_q is the gap to the neighbouring level on s_i's side (the lower gap
    when s_i < l_q, the upper one otherwise; the end levels use their one gap on both sides), i.e.
    piecewise-linear interpolation weights: inside [l_0, l_{N-1}] each value's e sums to one, and
    for uniform levels Δ is the spacing. Gradients flow to s.
    """
    gaps = (levels[..., 1:] - levels[..., :-1]).clamp_min(_GAP_EPS)
    below = torch.cat([gaps[..., :1], gaps], dim=-1).unsqueeze(-2)  # (…, 1, N)
    above = torch.cat([gaps, gaps[..., -1:]], dim=-1).unsqueeze(-2)
    diff = s.unsqueeze(-1) - levels.unsqueeze(-2)  # (…, M, N)
    width = torch.where(diff >= 0, above, below)
    if not (torch.is_grad_enabled() and (s.requires_grad or levels.requires_grad)):
        # No graph to keep (the teacher's descriptor): one buffer, in place.
        return diff.abs_().div_(width).neg_().add_(1).clamp_min_(0)
    return (1 - diff.abs() / width).clamp_min(0)


def equalized_histogram(e: Tensor, clip: float = 2.0, eps: float = 1e-3) -> Tensor:
    """Intensity-limited denoising of the level histogram: (…, M, N) assignments -> (…, N).

    1. h_q = Σ_i e_iq / Σ_iq e_iq (uniform if no value reaches any level);
    2. denoise: bins with h_q < eps are set to 0 (the largest bin always stays) and h is
       renormalised;
    3. equalise: bins are clipped at β/N (β = clip >= 1) and the excess is redistributed
       uniformly over the surviving bins below the limit, none of them pushed past it
       (water-filling: the fixed point of repeating CLAHE's clip-and-redistribute). If the
       survivors cannot hold the unit mass under the limit (fewer than N/β of them), all bins
       receive it, dropped ones included.
    The result sums to one and every bin is <= β/N; clip = inf skips step 3.
    """
    n = e.shape[-1]
    if not clip >= 1:
        raise ValueError(f"method.dtiem.clip must be >= 1 (a histogram above 1/N), got {clip!r}")
    mass = e.sum(dim=-2)
    total = mass.sum(dim=-1, keepdim=True)
    h = torch.where(total > 0, mass / total.clamp_min(1e-30), torch.full_like(mass, 1 / n))
    keep = (h >= eps) | (h == h.amax(dim=-1, keepdim=True))
    h = torch.where(keep, h, torch.zeros_like(h))
    h = h / h.sum(dim=-1, keepdim=True)
    if math.isinf(clip):
        return h
    limit = clip / n
    clipped = h.clamp(max=limit)
    excess = 1 - clipped.sum(dim=-1, keepdim=True)
    open_bins = keep | (keep.sum(dim=-1, keepdim=True) * limit < 1)
    headroom = torch.where(open_bins, limit - clipped, torch.zeros_like(clipped))
    # Find the water level r with Σ_q min(r, headroom_q) = excess. With the headrooms sorted,
    # g_(k), the k smallest fill completely once r >= g_(k); f(g_(k)) = Σ_{j<=k} g_(j) + g_(k)(N−k).
    g = headroom.sort(dim=-1).values
    cum = g.cumsum(dim=-1)
    k = torch.arange(1, n + 1, device=e.device, dtype=g.dtype)
    full = ((cum + g * (n - k)) < excess).sum(dim=-1, keepdim=True).clamp(max=n - 1)
    filled = torch.where(
        full > 0, cum.gather(-1, (full - 1).clamp_min(0)), torch.zeros_like(excess)
    )
    level = ((excess - filled) / (n - full)).clamp_min(0)
    return clipped + torch.minimum(headroom, level)


def texture_descriptor(
    feat: Tensor,
    levels: Tensor | None = None,
    num_levels: int = 16,
    iterations: int = 3,
    clip: float = 2.0,
    grids: Sequence[int] = _GRIDS,
) -> dict[str, Tensor]:
    """DTIEM statistical texture descriptor of feat (B,C,H,W), per anchor grid (G = len(grids)).

    Returns "levels" (B,G,N), "hist" (B,G,N) the equalized histogram and "level_mean" (B,G,N,C)
    the level-wise mean feature Σ_i e_iq f_i / Σ_i e_iq (0 for a level no pixel reaches). When
    `levels` (B,G,N) is given (the teacher's) it is used as is and num_levels/iterations are
    ignored, so student bins match the teacher's.
    """
    s = anchor_similarity(feat, grids)  # (B,G,HW)
    if levels is None:
        levels = quantization_levels(s, num_levels, iterations)
    elif levels.dim() != 3 or levels.shape[:2] != s.shape[:2]:
        raise ValueError(
            f"levels {tuple(levels.shape)} must be (B,G,N) with (B,G) = {tuple(s.shape[:2])}"
        )
    e = soft_assignment(s, levels)  # (B,G,HW,N)
    mass = e.sum(dim=-2).clamp_min(_MASS_EPS).unsqueeze(-1)
    level_mean = torch.einsum("bgiq,bci->bgqc", e, feat.flatten(2)) / mass
    return {"levels": levels, "hist": equalized_histogram(e, clip), "level_mean": level_mean}


def statistical_texture_terms(
    student_low: Tensor,
    teacher_low: Tensor,
    num_levels: int = 16,
    iterations: int = 3,
    clip: float = 2.0,
    grids: Sequence[int] = _GRIDS,
) -> dict[str, Tensor]:
    """The two parts of L_sta (`statistical_texture_loss`), each a float32 scalar:

        "hist":       mean over (B,G,N) of (N·hist_S − N·hist_T)²
        "level_mean": mean over the batch of  mean_{G,N,C} (m_S − m_T)² / mean_{C,h,w} T²

    with m the level-wise mean features and T² the teacher's squared features of that sample.
    Both are dimensionless and O(1) (our scaling, docs/methods.md "SSTKD"): N·hist is the
    histogram as a density relative to the uniform one (1 = a uniform bin), and the level means
    are in units of the teacher map's RMS. So both terms, and their ratio, do not change when
    student and teacher features are multiplied by the same factor; without the scaling the
    level-mean term grows as the square of the feature scale while the histogram (of cosine
    similarities) does not change at all, and at unit scale the histogram was ~0.15% of L_sta.
    An all-zero teacher map (no scale) takes its mean square as float32's smallest normal.
    """
    student, teacher = match_teacher_size(student_low, teacher_low, "statistical_texture_loss")
    with torch.no_grad():
        target = texture_descriptor(teacher.detach(), None, num_levels, iterations, clip, grids)
        scale = teacher.detach().square().mean(dim=(1, 2, 3)).clamp_min(_TINY)  # (B,)
    pred = texture_descriptor(student, target["levels"], num_levels, iterations, clip, grids)
    n = target["hist"].shape[-1]
    # (a − b)².mean() rather than F.mse_loss: the same value, and mse_loss's CPU kernel is
    # several times slower on these small non-contiguous (einsum output) tensors.
    hist = ((pred["hist"] - target["hist"]) ** 2).mean() * (n * n)
    level = ((pred["level_mean"] - target["level_mean"]) ** 2).mean(dim=(1, 2, 3))
    return {"hist": hist, "level_mean": (level / scale).mean()}


def statistical_texture_loss(
    student_low: Tensor,
    teacher_low: Tensor,
    num_levels: int = 16,
    iterations: int = 3,
    clip: float = 2.0,
    grids: Sequence[int] = _GRIDS,
) -> Tensor:
    """SSTKD statistical texture loss (Ji et al., CVPR 2022, Sec. 3.3):

        L_sta = MSE(N·hist_S, N·hist_T) + MSE(level_mean_S, level_mean_T) / mean(T²)

    The paper's one MSE between the student's and the teacher's DTIEM descriptors, with each
    descriptor part put on a unit scale (`statistical_texture_terms`; the paper gives no scale):
    the histogram times the number of levels N, the level-wise mean features divided by the
    teacher's mean squared feature (per sample). L_sta is therefore unchanged when both feature
    maps are multiplied by one factor, and both parts are O(1) (the histogram was 0.15% of the
    unscaled L_sta on the synthetic benchmark's features, 54% of this one).

    The teacher's descriptor uses its own levels and no gradient; the student's similarities are
    quantized with the teacher's levels, so the bins match and the levels term of the descriptor
    is identically zero (left out). Each MSE is a mean over its elements (our weighting).

    student_low, teacher_low: (B,C,h,w), equal (B,C); the student is resized (bilinear) to the
    teacher's size when they differ. Returns a float32 scalar, zero when student == teacher.
    """
    terms = statistical_texture_terms(student_low, teacher_low, num_levels, iterations, clip, grids)
    return terms["hist"] + terms["level_mean"]


def _statistical_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    d = view.settings.dtiem
    return statistical_texture_loss(student, teacher, d.levels, d.iterations, d.clip)


# SSTKD's L_sta on the stride-4 `low` map, through the adapter (`method.dtiem`).
STATISTICAL = Term(_statistical_term, feature="low")
