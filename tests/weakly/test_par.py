"""AFA's pixel-adaptive refinement (PAR) against hand-computed values and its formulas.

Reference: rulixiang/afa wetr/PAR.py (commit b1740696): w1 = 0.3, w2 = 0.01 (PAR.__init__,
lines ~36-37); neighbours by an 8-direction kernel with replicate padding per dilation
(get_kernel, get_dilated_neighbors); distances d and d·√2 (get_pos); forward: appearance term
-(|I_n - I| / (std_n + 1e-8) / w1)² averaged over channels, positional term
-(p_n / (std_p + 1e-8) / w1)², softmax(aff) + w2 · softmax(pos) over the neighbours, then
num_iter times masks = Σ_n aff_n · masks_n.
"""

from __future__ import annotations

import math

import pytest
import torch

from components.schema import WeaklyConfig
from components.weakly.pseudo_labels import pseudo_labels
from components.weakly.tscd import refine_function, softmax_before_refine
from components.weakly.varm import (
    DILATIONS,
    neighbour_distances,
    par_refine,
    par_weights,
    refine,
)


def test_positional_term_by_hand():
    # Dilation 1: distances [√2, 1, √2, 1, 1, √2, 1, √2] (row-major 3x3 without the centre).
    d = neighbour_distances((1,))
    r2 = math.sqrt(2)
    torch.testing.assert_close(d, torch.tensor([r2, 1, r2, 1, 1, r2, 1, r2]))
    # mean (1 + √2) / 2; every deviation ±(√2 − 1) / 2, so the unbiased std is
    # sqrt(8 · ((√2 − 1) / 2)² / 7) = 0.2214; π = −(d / 0.2214 / 0.3)²: −226.7 (axis) and
    # −453.3 (diagonal): the positional softmax is 1/4 on each axis neighbour, ~e^-226 elsewhere.
    std = math.sqrt(8 * ((r2 - 1) / 2) ** 2 / 7)
    assert std == pytest.approx(0.221406, rel=1e-5)
    assert (1 / std / 0.3) ** 2 == pytest.approx(226.66, rel=1e-4)
    flat = torch.full((1, 3, 5, 5), 0.5)  # a flat image: the appearance softmax is uniform 1/8
    a = par_weights(flat, (1,))
    axis = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(a[0, axis], torch.full((4, 5, 5), 1 / 8 + 0.01 / 4))
    torch.testing.assert_close(a[0, ~axis], torch.full((4, 5, 5), 1 / 8))
    # The weights sum to 1 + w2 at the default dilations too.
    img = torch.rand(1, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(par_weights(img).sum(1), torch.full((1, 9, 9), 1.01))


def test_one_iteration_by_hand_on_a_1x3_image():
    # Grey image [0, 1, 1] (one row), dilation 1, scores class 0 = [1, 0, 0], class 1 = [0, 1, 1].
    # Replicate padding: up/down neighbours read the pixel's own column, left/right clamp.
    # Pixel 0: neighbour values [0,0,1,0,1,0,0,1] (std 0.5175); the 3 right ones differ by 1:
    #   κ = −(1 / 0.5175 / 0.3)² = −41.5 -> softmax ~1e-18 there, 1/5 on the other five. The
    #   positional 0.01 / 4 goes to the axis ones: up, down, left (-> pixel 0) and right (->
    #   pixel 1). Weight on pixel 0: 5/5 + 3 · 0.0025 = 1.0075, on pixel 1: 0.0025.
    # Pixel 1: values [0,1,1,0,1,0,1,1]; the 3 left ones (pixel 0) differ: 1/5 each on up, down
    #   (pixel 1) and the 3 right (pixel 2); positional: left -> pixel 0, up/down -> pixel 1,
    #   right -> pixel 2. Pixel 0: 0.0025; pixel 1: 0.4 + 0.005; pixel 2: 0.6 + 0.0025.
    # Pixel 2: all neighbours equal 1: std 0 -> κ = 0, uniform 1/8: left 3 -> pixel 1
    #   (+0.0025 positional), up/down and 3 clamped right -> pixel 2 (+3 · 0.0025).
    image = torch.tensor([0.0, 1.0, 1.0]).expand(1, 3, 1, 3).clone()
    scores = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])
    out = par_refine(image, scores, iterations=1, dilations=(1,))
    class0 = [1.0075, 0.0025, 0.0]
    class1 = [0.0025, 0.405 + 0.6025, 0.3775 + 0.6325]
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(class0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 1, 0], torch.tensor(class1), rtol=0, atol=1e-6)


def _par_by_loops(image, scores, dilations, iterations, w1=0.3, w2=0.01):
    """PAR's formulas with explicit clamped indexing (no padding, no shifted views)."""
    _, _, h, w = image.shape
    offs = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    offs = [o for o in offs if o != (0, 0)]
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offs])
    pos = torch.softmax(-((dist / (dist.std() + 1e-8) / w1) ** 2), 0)

    def at(t, y, x):
        return t[0, :, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    weights = torch.zeros(len(offs), h, w)
    for y in range(h):
        for x in range(w):
            nb = torch.stack([at(image, y + dy, x + dx) for dy, dx in offs], 1)  # (C, N)
            sd = nb.std(1, keepdim=True) + 1e-8
            kappa = (-(((nb - image[0, :, y, x][:, None]).abs() / sd / w1) ** 2)).mean(0)
            weights[:, y, x] = torch.softmax(kappa, 0) + w2 * pos
    p = scores.clone()
    for _ in range(iterations):
        new = torch.zeros_like(p)
        for y in range(h):
            for x in range(w):
                for n, (dy, dx) in enumerate(offs):
                    new[0, :, y, x] += weights[n, y, x] * at(p, y + dy, x + dx)
        p = new
    return p


def test_matches_the_formulas_on_a_random_input():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 4, 5, generator=g, dtype=torch.float64)
    scores = torch.rand(1, 3, 4, 5, generator=g, dtype=torch.float64)
    out = par_refine(image, scores, iterations=2, dilations=(1, 2))
    expected = _par_by_loops(image.float(), scores.float(), (1, 2), 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_par_is_not_the_plain_refinement():
    # plain = factor 4, no positional term; PAR = 1 / 0.3 and + 0.01 · positional softmax.
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 24, 24, generator=g)
    scores = torch.rand(2, 4, 24, 24, generator=g)
    par = par_refine(image, scores)
    plain = refine(image, scores, variation_weight=0.0)
    assert not torch.allclose(par, plain)
    # PAR's weights sum to 1.01: the total grows by 1.01^10 over AFA's 10 iterations.
    torch.testing.assert_close(
        par.sum(1).mean(), scores.sum(1).mean() * 1.01**10, rtol=2e-2, atol=0
    )


def test_config_picks_par_with_afa_defaults_and_softmax():
    w = WeaklyConfig(refine="par")
    fn = refine_function(w)
    assert fn.func is par_refine
    assert fn.keywords == {"iterations": 10, "dilations": DILATIONS}
    assert softmax_before_refine(w) and not softmax_before_refine(WeaklyConfig())
    assert refine_function(WeaklyConfig(refine="plain")).keywords["variation_weight"] == 0.0


def test_pseudo_labels_softmax_the_kept_channels_before_the_refinement():
    # AFA (utils/camutils.py refine_cams_with_bkg_v2) softmaxes [background, present classes]
    # before PAR. A spy refinement sees: background 0.55 and CAM 0.8 at a pixel ->
    # softmax([0.55, 0.8]) = [0.4378, 0.5622]; the absent class exactly 0.
    seen = []

    def spy(image, probs):
        seen.append(probs.clone())
        return probs

    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0] = 0.8
    labels = torch.tensor([[1.0, 0.0]])
    image = torch.rand(1, 3, 4, 4)
    pseudo_labels(cams, labels, image, refine_fn=spy, softmax_scores=True)
    high = seen[0][0, :, 0, 0]
    e = math.exp(0.55) + math.exp(0.8)
    torch.testing.assert_close(high, torch.tensor([math.exp(0.55) / e, math.exp(0.8) / e, 0.0]))
