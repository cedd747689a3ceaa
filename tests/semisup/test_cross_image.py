"""Relation and style distillation against NumPy references and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.semisup.cross_image import (
    StyleMemory,
    relation_loss,
    relation_matrix,
    style_loss,
    style_statistics,
)


def _np_relation(z_l: np.ndarray, z_u: np.ndarray, tau: float) -> np.ndarray:
    """NumPy reference for one pair: z (C, h, w)."""
    a = z_l.reshape(z_l.shape[0], -1)
    b = z_u.reshape(z_u.shape[0], -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / tau
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_relation_rows_sum_to_one_and_match_numpy():
    g = torch.Generator().manual_seed(0)
    z_l, z_u = torch.randn(3, 5, 4, 6, generator=g), torch.randn(3, 5, 4, 6, generator=g)
    r = relation_matrix(z_l, z_u, 0.1)
    assert r.shape == (3, 5, 5)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 5))
    for k in range(3):
        ref = _np_relation(z_l[k].numpy(), z_u[k].numpy(), 0.1)
        np.testing.assert_allclose(r[k].numpy(), ref, rtol=1e-4, atol=1e-6)


def test_relation_is_invariant_to_channel_scale():
    # Channels are L2-normalised over space first: scaling a channel changes nothing.
    g = torch.Generator().manual_seed(1)
    z_l, z_u = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    scaled = z_l * torch.tensor([2.0, 0.5, 7.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(relation_matrix(z_l, z_u, 0.5), relation_matrix(scaled, z_u, 0.5))


def test_relation_kl_zero_for_identical_positive_otherwise():
    g = torch.Generator().manual_seed(2)
    t_l, t_u = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    assert float(relation_loss(t_l, t_u, t_l.clone(), t_u.clone(), 0.1)) == pytest.approx(
        0.0, abs=1e-6
    )
    other = torch.randn(2, 4, 3, 3, generator=g)
    assert float(relation_loss(t_l, t_u, t_l, other, 0.1)) > 1e-3


def test_relation_loss_hand_computed():
    # C = 2 channels over 2 positions, τ = 1. Labeled: ch0 = (1, 0), ch1 = (0, 1) (already unit).
    # Teacher unlabeled = labeled -> Ẑ_l Ẑ_uᵀ = I -> rows softmax([1, 0]) = (e/(e+1), 1/(e+1)).
    # Student unlabeled: both channels (1, 1)/√2 -> Ẑ_l Ẑ_uᵀ = all 1/√2 -> rows (1/2, 1/2).
    # KL(p ‖ u) for p = (a, 1-a), u = (1/2, 1/2): a ln 2a + (1-a) ln 2(1-a); both rows equal.
    z_l = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]).unsqueeze(0)  # (1, 2, 1, 2)
    z_s = torch.ones(1, 2, 1, 2)
    a = np.e / (np.e + 1)
    expected = a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a))
    assert float(relation_loss(z_l, z_l, z_l, z_s, 1.0)) == pytest.approx(expected, rel=1e-5)
    # No τ² factor (CIRKDv2's scale): at τ = 0.5 the KL of the τ = 0.5 softmaxes, as it is.
    a2 = np.exp(2) / (np.exp(2) + 1)
    expected2 = a2 * np.log(2 * a2) + (1 - a2) * np.log(2 * (1 - a2))
    assert float(relation_loss(z_l, z_l, z_l, z_s, 0.5)) == pytest.approx(expected2, rel=1e-5)


def test_relation_scale_is_cirkdv2s_at_tau_0_1():
    """Issue 21 item 10. The same case at τ = 0.1: teacher rows softmax([10, 0]), so
    a = 1 / (1 + e^-10) = 0.9999546, and the student's rows are uniform: KL = ln 2 + a ln a +
    (1 - a) ln(1 - a) = 0.693147 - 0.0000454 - 0.0004540 = 0.692648. That is CIRKDv2's
    per-pair channel relation (winycg/CIRKD losses/cirkd_channel.py L117-126: KL of the row
    softmaxes at τ, `batchmean` over the C rows, no τ²), which its scripts weight by 1
    (`--lambda-minibatch-channel 1.`). Before, this loss was τ² times that: 0.00692648."""
    z_l = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]).unsqueeze(0)
    z_s = torch.ones(1, 2, 1, 2)
    a = 1 / (1 + np.exp(-10.0))
    expected = np.log(2) + a * np.log(a) + (1 - a) * np.log(1 - a)
    assert expected == pytest.approx(0.692648, abs=1e-6)
    assert float(relation_loss(z_l, z_l, z_l, z_s, 0.1)) == pytest.approx(expected, rel=1e-5)


def test_relation_matches_cirkdv2s_channel_relation_per_pair():
    """A NumPy transcription of CIRKDv2's formula (not its code) on random features, pair by
    pair: rows of L2-normalised channels, softmax at τ, sum of p_t (ln p_t - ln p_s) over the
    C x C entries divided by C (`batchmean`), averaged over the pairs."""
    g = torch.Generator().manual_seed(4)
    t_l, t_u, s_l, s_u = (torch.randn(3, 6, 4, 5, generator=g) for _ in range(4))
    tau = 0.1
    per_pair = []
    for k in range(3):
        p_t = _np_relation(t_l[k].numpy(), t_u[k].numpy(), tau)
        p_s = _np_relation(s_l[k].numpy(), s_u[k].numpy(), tau)
        per_pair.append((p_t * (np.log(p_t) - np.log(p_s))).sum() / p_t.shape[0])
    got = float(relation_loss(t_l, t_u, s_l, s_u, tau))
    assert got == pytest.approx(float(np.mean(per_pair)), rel=1e-4)


def test_relation_gradient_reaches_only_the_student():
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(1, 3, 2, 2, generator=g, requires_grad=True) for _ in range(2)]
    s = [torch.randn(1, 3, 2, 2, generator=g, requires_grad=True) for _ in range(2)]
    relation_loss(t[0], t[1], s[0], s[1], 0.1).backward()
    assert t[0].grad is None and t[1].grad is None
    assert s[0].grad.abs().sum() > 0 and s[1].grad.abs().sum() > 0


def test_relation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal feature shapes"):
        relation_matrix(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4), 0.1)


def test_style_statistics_match_numpy_and_loss_zero_when_equal():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 5, 5, generator=g) * 3 + 1
    mean, std = style_statistics(z)
    flat = z.numpy().reshape(2, 3, -1)
    np.testing.assert_allclose(mean.numpy(), flat.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), np.sqrt(flat.var(-1) + 1e-5), rtol=1e-5)
    # Two images with the same per-channel statistics (one a spatial permutation of the other).
    one = z[:1]
    shuffled = one.flatten(2)[..., torch.randperm(25, generator=g)].view(1, 3, 5, 5)
    both = torch.cat([one, shuffled])
    m, s = style_statistics(one)
    assert float(style_loss(both, m[0], s[0])) == pytest.approx(0.0, abs=1e-8)
    assert float(style_loss(both * 2, m[0], s[0])) > 0.1


def test_style_loss_hand_computed():
    # One image, one channel, values (0, 2): mean 1, std sqrt(1 + eps). Target mean 0, std 0.
    z = torch.tensor([[[[0.0, 2.0]]]])
    expected = 1.0 + (1.0 + 1e-5)
    assert float(style_loss(z, torch.zeros(1), torch.zeros(1))) == pytest.approx(expected)


def test_style_memory_is_an_ema():
    mem = StyleMemory(0.9)
    m, s = mem.update(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(m, torch.tensor([1.0, 2.0]))  # first batch: taken as is
    m, s = mem.update(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(m, torch.tensor([0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 0]))
    torch.testing.assert_close(s, torch.tensor([0.9 * 3 + 0.1 * 1, 0.9 * 4 + 0.1 * 1]))
    copy = StyleMemory(0.9)
    copy.load_state_dict(mem.state_dict())
    torch.testing.assert_close(copy.mean, mem.mean)
