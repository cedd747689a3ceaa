"""Holistic (adversarial) distillation with a WGAN-GP critic.

Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019): a critic
scores (image, segmentation) pairs; the teacher's maps are "real", the student's "fake"; the
student is trained to raise its score. The Wasserstein loss with gradient penalty (Gulrajani et
al., NeurIPS 2017) and the weights λ_d 0.1, λ_adv 0.001, GP 10, critic lr 4e-4 are the CIRKD
protocol's. The critic here is a small all-conv network (ours; SKD used a self-attention
discriminator): probabilities and the image resized to the logits' size are concatenated.

The critic and its Adam optimizer are method state outside the DDP-wrapped student: they are
checkpointed through `state_dict()` and, with several workers, their gradients are averaged by
an explicit all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from components.distillation.term import StepView, Term


def critic_input(images: Tensor, logits: Tensor) -> Tensor:
    """(B,3,H,W) images and (B,K,h,w) logits -> (B,K+3,h,w): class probabilities + image."""
    small = F.interpolate(
        images.float(), size=logits.shape[-2:], mode="bilinear", align_corners=False
    )
    return torch.cat([F.softmax(logits.float(), dim=1), small], dim=1)


class Critic(nn.Module):
    """Conv critic: (B,K+3,h,w) -> (B,) Wasserstein scores. No normalisation layers (WGAN-GP)."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP: E[(||∇_x D(x̂)||_2 - 1)^2] on random interpolates x̂ of real and fake (B,...)."""
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def wasserstein_critic_loss(
    critic: nn.Module, real: Tensor, fake: Tensor, penalty: float = 10.0
) -> Tensor:
    """E[D(fake)] - E[D(real)] + penalty * GP. real, fake: critic inputs (B,K+3,h,w)."""
    loss = critic(fake).mean() - critic(real).mean()
    if penalty > 0:
        loss = loss + penalty * gradient_penalty(critic, real, fake)
    return loss


class HolisticDistillation:
    """The critic, its optimizer and the two losses.

    Per training step: `critic_step` updates the critic on detached student logits (fake) against
    the teacher's (real); then `student_loss` is -E[D(student)] with the critic frozen, so only
    the student receives its gradient.
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 64,
        lr: float = 4e-4,
        penalty: float = 10.0,
        critic_weight: float = 0.1,
    ):
        self.critic = Critic(num_classes + 3, width)
        # Adam betas as in the SKD/CIRKD critic.
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.9, 0.99))
        self.penalty, self.critic_weight = penalty, critic_weight

    def critic_step(self, images: Tensor, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """One critic update; returns its (weighted) loss, detached. Runs in float32."""
        device_type = images.device.type
        with torch.autocast(device_type, enabled=False):
            real = critic_input(images, teacher_logits.detach())
            fake = critic_input(images, student_logits.detach())
            self.critic.requires_grad_(True)
            loss = self.critic_weight * wasserstein_critic_loss(
                self.critic, real, fake, self.penalty
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(self.critic)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def student_loss(self, images: Tensor, student_logits: Tensor) -> Tensor:
        """-E[D(image, student)], gradient to the student's logits only."""
        self.critic.requires_grad_(False)
        with torch.autocast(images.device.type, enabled=False):
            return -self.critic(critic_input(images, student_logits)).mean()

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])

    def to(self, device: torch.device) -> HolisticDistillation:
        self.critic.to(device)  # in place: the optimizer keeps the same parameters
        return self

    @classmethod
    def from_settings(cls, settings, num_classes: int, _channels: int) -> HolisticDistillation:
        a = settings.adversarial
        return cls(num_classes, a.critic_width, a.critic_lr, a.gradient_penalty, a.critic_weight)

    def prepare(self, student: Tensor, teacher: Tensor, view: StepView) -> dict[str, Tensor]:
        """The critic's update of this step, before the student's term reads the critic."""
        return {"critic": self.critic_step(view.images, student, teacher)}


def _average_gradients(module: nn.Module) -> None:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def _adversarial_term(student: Tensor, teacher: Tensor, view: StepView, state) -> Tensor:
    return state.student_loss(view.images, student)


# On the logits; the critic (and its optimizer) is the term's state (`method.adversarial`).
ADVERSARIAL = Term(
    _adversarial_term, state=HolisticDistillation.from_settings, state_key="holistic"
)
