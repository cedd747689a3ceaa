"""WGAN-GP holistic distillation: penalty and losses against closed forms, state round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from components.distillation.adversarial import (
    HolisticDistillation,
    critic_input,
    gradient_penalty,
    wasserstein_critic_loss,
)


class LinearCritic(nn.Module):
    """D(x) = <a, x>: its input gradient is `a` everywhere, so the penalty is (||a|| - 1)^2."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.a).flatten(1).sum(1)


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    torch.manual_seed(0)
    a = torch.randn(3, 2, 2, dtype=torch.float64)
    critic = LinearCritic(a)
    real, fake = torch.randn(5, 3, 2, 2).double(), torch.randn(5, 3, 2, 2).double()
    expected = (a.norm() - 1) ** 2
    assert float(gradient_penalty(critic, real, fake).detach()) == pytest.approx(
        float(expected), rel=1e-9
    )
    loss = wasserstein_critic_loss(critic, real, fake, penalty=10.0)
    by_hand = (fake * a).sum((1, 2, 3)).mean() - (real * a).sum((1, 2, 3)).mean() + 10 * expected
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-9)


def test_critic_input_is_probabilities_and_resized_image():
    images = torch.rand(2, 3, 8, 8)
    logits = torch.randn(2, 4, 4, 4)
    x = critic_input(images, logits)
    assert x.shape == (2, 7, 4, 4)
    torch.testing.assert_close(x[:, :4].sum(1), torch.ones(2, 4, 4))
    # Bilinear 2x downsampling without antialiasing averages each 2x2 block.
    torch.testing.assert_close(x[:, 4:], images.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)))


def _holistic(seed: int = 0) -> HolisticDistillation:
    torch.manual_seed(seed)
    return HolisticDistillation(num_classes=3, width=4, lr=1e-2, penalty=10.0, critic_weight=0.1)


def test_critic_step_trains_the_critic_and_student_loss_reaches_only_the_student():
    h = _holistic()
    images = torch.rand(2, 3, 16, 16)
    teacher = torch.randn(2, 3, 8, 8) * 3
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    before = [p.detach().clone() for p in h.critic.parameters()]
    h.critic_step(images, student, teacher)
    assert any(not torch.equal(b, p) for b, p in zip(before, h.critic.parameters()))
    assert student.grad is None  # the critic saw detached logits

    loss = h.student_loss(images, student)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in h.critic.parameters())

    # Many critic steps separate teacher (real) from a fixed student (fake): D(real) > D(fake).
    for _ in range(30):
        h.critic_step(images, student, teacher)
    with torch.no_grad():
        real = h.critic(critic_input(images, teacher)).mean()
        fake = h.critic(critic_input(images, student)).mean()
    assert real > fake


def test_state_round_trip_continues_identically():
    images = torch.rand(2, 3, 16, 16)
    teacher, student = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    a = _holistic(0)
    for _ in range(3):
        a.critic_step(images, student, teacher)
    b = _holistic(1)
    # As through a checkpoint: a copy (load_state_dict would share a's Adam moment tensors).
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.optimizer.state_dict()["state"][0]["step"] == 3
    torch.manual_seed(5)
    loss_a = a.critic_step(images, student, teacher)
    torch.manual_seed(5)
    loss_b = b.critic_step(images, student, teacher)
    assert float(loss_a) == float(loss_b)
    for p, q in zip(a.critic.parameters(), b.critic.parameters()):
        assert torch.equal(p, q)
