"""Holistic distillation: WGAN-GP (SKD) and hinge (CIRKD) losses against closed forms, what
CIRKD's discriminator sees, the step order, state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from components.distillation.adversarial import (
    CIRKDDiscriminator,
    HolisticDistillation,
    critic_input,
    gradient_penalty,
    hinge_discriminator_loss,
    hinge_generator_loss,
    wasserstein_critic_loss,
)
from components.distillation.term import StepView
from components.schema import MethodConfig


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


# The hinge form (CIRKD: losses/adv.py, utils/sagan.py, train_kd.py) ----------------------------


def test_hinge_losses_by_hand():
    d_teacher = torch.tensor([2.0, 0.5, -1.0, 0.0]).view(1, 1, 2, 2)
    d_student = torch.tensor([-2.0, -0.5, 0.0, 1.5]).view(1, 1, 2, 2)
    # D, real (teacher): relu(1 - [2, 0.5, -1, 0]) = [0, 0.5, 2, 1] -> mean 3.5 / 4 = 0.875
    # D, fake (student): relu(1 + [-2, -0.5, 0, 1.5]) = [0, 0.5, 1, 2.5] -> mean 4 / 4 = 1.0
    # D loss = 0.875 + 1.0 = 1.875; times lambda_d 0.1 = 0.1875
    assert float(hinge_discriminator_loss(d_student, d_teacher)) == pytest.approx(1.875)
    assert float(0.1 * hinge_discriminator_loss(d_student, d_teacher)) == pytest.approx(0.1875)
    # G loss = -mean([-2, -0.5, 0, 1.5]) = -(-1.0 / 4) = 0.25; times lambda_adv 0.001 = 0.00025
    assert float(hinge_generator_loss(d_student)) == pytest.approx(0.25)
    assert float(0.001 * hinge_generator_loss(d_student)) == pytest.approx(0.00025)
    # Scores past the margins cost the discriminator nothing; no gradient penalty is added.
    past = hinge_discriminator_loss(torch.full((2, 1, 1, 1), -3.0), torch.ones(2, 1, 1, 1))
    assert float(past) == 0.0


def _hinge(seed: int = 0, k: int = 3) -> HolisticDistillation:
    torch.manual_seed(seed)
    return HolisticDistillation(num_classes=k, width=8, lr=1e-3, critic_weight=0.1, form="hinge")


def _logits(seed: int, k: int = 3, size: int = 64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(2, k, size, size, generator=g) + 2.0


def test_hinge_discriminator_is_cirkds_architecture():
    d = CIRKDDiscriminator(num_classes=19, width=64)
    # preprocess_GAN_mode=1: BatchNorm over the K logit channels, then a conv taking K channels
    # (no image channels).
    assert isinstance(d.preprocess, nn.BatchNorm2d) and d.preprocess.num_features == 19
    convs = [d.l1[0], d.l2[0], d.l3[0], d.l4[0]]
    channels = [(c.in_channels, c.out_channels) for c in convs]
    assert channels == [(19, 64), (64, 128), (128, 256), (256, 512)]
    for c in convs:
        assert (c.kernel_size, c.stride, c.padding) == ((4, 4), (2, 2), (1, 1))
        assert nn.utils.parametrize.is_parametrized(c, "weight")  # spectral norm
    for layer in (d.l1, d.l2, d.l3, d.l4):
        assert isinstance(layer[1], nn.LeakyReLU) and layer[1].negative_slope == 0.1
    assert d.attn1.value.in_channels == 256 and d.attn2.value.in_channels == 512
    assert (d.last.in_channels, d.last.out_channels, d.last.kernel_size) == (512, 1, (4, 4))
    # A 512x1024 crop at output stride 8 gives 64x128 logits -> a 1x5 score map.
    assert d(torch.randn(2, 19, 64, 128)).shape == (2, 1, 1, 5)
    with pytest.raises(ValueError, match="at least 64x64"):
        d(torch.randn(2, 19, 48, 64))


def test_hinge_discriminator_sees_batch_normalised_raw_logits_without_the_image():
    h = _hinge()
    seen: list[torch.Tensor] = []
    after: list[torch.Tensor] = []

    def hook(module, inputs, output):
        seen.append(inputs[0].detach().clone())
        after.append(output.detach().clone())

    h.critic.preprocess.register_forward_hook(hook)
    student, teacher = _logits(1), _logits(2, scale=3.0)
    images = torch.rand(2, 3, 512, 512)
    h.prepare(student, teacher, StepView(images, torch.zeros(2, 512, 512), MethodConfig()))
    # The live discriminator's hook sees D(student.detach()) then D(teacher) (train_kd.py:338-339;
    # the student's G forward, line 336, runs on a frozen copy taken before, hooks included).
    assert len(seen) >= 2
    for x, ref in zip(seen[-2:], (student, teacher)):
        torch.testing.assert_close(x, ref)  # raw logits: no softmax, no image channels
    # ... normalised per channel with the batch's own statistics (BN weight 1, bias 0 at start).
    for x, y in zip(seen, after):
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_hinge_step_values_and_student_loss_on_the_discriminator_before_its_update():
    h = _hinge()
    student = _logits(1).requires_grad_(True)
    teacher = _logits(2, scale=3.0)
    before = copy.deepcopy(h.critic)
    images = torch.rand(2, 3, 512, 512)
    logged = h.prepare(student, teacher, StepView(images, None, MethodConfig()))
    # train_kd.py's order of the discriminator's forwards: G's on the student (336), then
    # D(student.detach()) and D(teacher) (338-339), all before D's update.
    with torch.no_grad():
        g_expected = hinge_generator_loss(before(student))
        d_expected = 0.1 * hinge_discriminator_loss(before(student), before(teacher))
    assert float(logged["critic"]) == pytest.approx(float(d_expected), rel=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), h.critic.parameters()))
    loss = h.student_loss(images, student)
    assert float(loss) == pytest.approx(float(g_expected), rel=1e-5)
    with torch.no_grad():  # not the updated discriminator's
        assert float(hinge_generator_loss(h.critic(student))) != pytest.approx(float(loss))
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in h.critic.parameters())


def test_hinge_discriminator_learns_to_separate_teacher_from_student():
    h = _hinge()
    student, teacher = _logits(1), _logits(2, scale=3.0)
    images = torch.rand(2, 3, 8, 8)
    first = float(h.critic_step(images, student, teacher))
    for _ in range(15):
        last = float(h.critic_step(images, student, teacher))
    assert last < first
    with torch.no_grad():
        assert h.critic(teacher).mean() > h.critic(student).mean()


def test_form_from_settings_and_hinge_state_round_trip():
    settings = MethodConfig()
    settings.adversarial.form, settings.adversarial.critic_width = "hinge", 8
    a = HolisticDistillation.from_settings(settings, 3, 0)
    assert isinstance(a.critic, CIRKDDiscriminator)
    settings.adversarial.form = "wgan_gp"
    wgan = HolisticDistillation.from_settings(settings, 3, 0)
    assert not isinstance(wgan.critic, CIRKDDiscriminator)
    with pytest.raises(ValueError, match="form"):
        HolisticDistillation(3, form="lsgan")
    images, student, teacher = torch.rand(2, 3, 8, 8), _logits(1), _logits(2, scale=3.0)
    for _ in range(2):
        a.critic_step(images, student, teacher)
    b = _hinge(7)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    loss_a = a.critic_step(images, student, teacher)
    loss_b = b.critic_step(images, student, teacher)
    assert float(loss_a) == float(loss_b)
    for p, q in zip(a.critic.parameters(), b.critic.parameters()):
        assert torch.equal(p, q)
