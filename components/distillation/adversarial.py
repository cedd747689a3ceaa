"""Holistic (adversarial) distillation: a discriminator tells the teacher's maps from the student's.

Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019): the
teacher's maps are "real", the student's "fake"; the student is trained to raise its score.
Two forms (`method.adversarial.form`), both weighted by λ_adv (`method.weights.adversarial`) for
the student and λ_d (`critic_weight`) for the discriminator, whose Adam has betas (0.9, 0.99):

- "wgan_gp" (the default; SKD's code, irfanICMLL/structure_knowledge_distillation): a Wasserstein
  critic with gradient penalty (Gulrajani et al., NeurIPS 2017; `gradient_penalty`, 10). The
  critic here is a small all-conv network (ours; SKD's is a self-attention GAN discriminator)
  on class probabilities concatenated with the image resized to the logits' size. Per step the
  critic is updated first, then the student's term reads the updated critic.
- "hinge" (CIRKD's train_kd.py, winycg/CIRKD @ dab64db, lines 220, 239-240, 260-262, 336-339):
  `CIRKDDiscriminator` as CIRKD's `utils/sagan.py` `Discriminator(preprocess_GAN_mode=1,
  input_channel=K)`: BatchNorm over the raw logits (no softmax, no image), four spectral-norm
  4x4 stride-2 convs with LeakyReLU(0.1) at widths w, 2w, 4w, 8w, self-attention after the third
  and the fourth, a plain 4x4 conv to one channel. Hinge losses (`losses/adv.py`, no gradient
  penalty; `gradient_penalty` is unused):
      D: λ_d · (mean(relu(1 - D(teacher))) + mean(relu(1 + D(student.detach()))))
      G: λ_adv · (-mean(D(student)))
  As there, the student's term reads the discriminator of before this step's update.

The critic and its Adam optimizer are method state outside the DDP-wrapped student: they are
checkpointed through `state_dict()` and, with several workers, their gradients are averaged by
an explicit all-reduce (CIRKD wraps D in DDP and uses SyncBatchNorm; `to()` converts the
hinge form's BatchNorm layers to SyncBatchNorm on CUDA with several workers).
"""

from __future__ import annotations

import copy

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


# The hinge form: CIRKD's discriminator and losses ---------------------------------------------

FORMS = ("wgan_gp", "hinge")


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al., ICML 2019) as in CIRKD's `utils/sagan.py` `Self_Attn`:
    1x1 query/key convs to C/8, a 1x1 value conv, softmax over the key positions, and
    `gamma · out + x` with `gamma` starting at 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, C/8, N)
        k = self.key(x).flatten(2)  # (B, C/8, N)
        attention = F.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N queries, N keys)
        out = self.value(x).flatten(2) @ attention.transpose(1, 2)  # (B, C, N)
        return self.gamma * out.view(b, c, h, w) + x


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(conv), nn.LeakyReLU(0.1))


class CIRKDDiscriminator(nn.Module):
    """CIRKD's discriminator (`utils/sagan.py` `Discriminator`, preprocess_GAN_mode=1), written
    anew: (B,K,h,w) raw logits -> (B,1,h/16-3,w/16-3) score map.

    BatchNorm2d(K) on the logits (batch statistics: the discriminator always runs in training
    mode there and here); spectral-norm 4x4 stride-2 convs K -> w -> 2w -> 4w, self-attention,
    -> 8w, self-attention, each conv followed by LeakyReLU(0.1); a plain 4x4 conv (no padding)
    to one channel. CIRKD's width is 64 (`conv_dim`). Needs logits of at least 64x64 (a 512
    crop at output stride 8): smaller maps vanish before the last conv.
    """

    MIN_SIZE = 64

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.preprocess = nn.BatchNorm2d(num_classes)
        self.l1 = _down(num_classes, width)
        self.l2 = _down(width, 2 * width)
        self.l3 = _down(2 * width, 4 * width)
        self.attn1 = SelfAttention(4 * width)
        self.l4 = _down(4 * width, 8 * width)
        self.attn2 = SelfAttention(8 * width)
        self.last = nn.Conv2d(8 * width, 1, 4)

    def forward(self, logits: Tensor) -> Tensor:
        if min(logits.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(
                f"the hinge discriminator (CIRKD's) needs logits of at least {self.MIN_SIZE}x"
                f"{self.MIN_SIZE}, got {tuple(logits.shape[-2:])}: use larger crops, or "
                "method.adversarial.form=wgan_gp"
            )
        x = self.l3(self.l2(self.l1(self.preprocess(logits))))
        x = self.attn2(self.l4(self.attn1(x)))
        return self.last(x)


def hinge_discriminator_loss(d_student: Tensor, d_teacher: Tensor) -> Tensor:
    """mean(relu(1 - D(teacher))) + mean(relu(1 + D(student))): CIRKD's `CriterionAdv('hinge')`
    (losses/adv.py), teacher real, student fake; each mean over all score-map entries."""
    return F.relu(1.0 - d_teacher).mean() + F.relu(1.0 + d_student).mean()


def hinge_generator_loss(d_student: Tensor) -> Tensor:
    """-mean(D(student)): CIRKD's `CriterionAdvForG('hinge')` (losses/adv.py)."""
    return -d_student.mean()


def discriminator_input(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """What CIRKD feeds its discriminator: the raw (B,K,h,w) logits of each model in float32 (its
    BatchNorm normalises them), no softmax and no image. A student of another spatial size is
    resized (bilinear) to the teacher's."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    return student.float(), teacher.float()


class HolisticDistillation:
    """The critic, its optimizer and the two losses, in the form `form` (module docstring).

    "wgan_gp": per step, `critic_step` updates the critic on detached student logits (fake)
    against the teacher's (real); then `student_loss` is -E[D(student)] with the updated critic
    frozen. "hinge" (CIRKD): `prepare` first takes the student's loss -mean(D(student)) on a
    frozen copy of the discriminator as it is before this step's update (CIRKD's
    `adv_G_loss`, train_kd.py:336), then updates the discriminator with the hinge loss; the
    student's term returns that loss. Only the student receives the student loss's gradient.
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 64,
        lr: float = 4e-4,
        penalty: float = 10.0,
        critic_weight: float = 0.1,
        form: str = "wgan_gp",
    ):
        if form not in FORMS:
            raise ValueError(f"method.adversarial.form: '{form}' is not one of {FORMS}")
        self.form = form
        if form == "hinge":
            self.critic: nn.Module = CIRKDDiscriminator(num_classes, width)
        else:
            self.critic = Critic(num_classes + 3, width)
        # Adam betas (0.9, 0.99) as SKD's and CIRKD's (train_kd.py:260-262, lr 4e-4).
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.9, 0.99))
        self.penalty, self.critic_weight = penalty, critic_weight
        self._pending: tuple[Tensor, Tensor] | None = None  # hinge: (student logits, its loss)

    def critic_step(self, images: Tensor, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """One critic update; returns its (weighted) loss, detached. Runs in float32."""
        device_type = images.device.type
        with torch.autocast(device_type, enabled=False):
            self.critic.requires_grad_(True)
            if self.form == "hinge":
                fake, real = discriminator_input(student_logits.detach(), teacher_logits.detach())
                d_fake = self.critic(fake)  # CIRKD's order: D(student) first, then D(teacher)
                d_real = self.critic(real)
                loss = self.critic_weight * hinge_discriminator_loss(d_fake, d_real)
            else:
                real = critic_input(images, teacher_logits.detach())
                fake = critic_input(images, student_logits.detach())
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
        """-E[D(student)], gradient to the student's logits only. Hinge form: the loss `prepare`
        took for these very logits before the discriminator's update, if it took one."""
        if self._pending is not None and self._pending[0] is student_logits:
            loss, self._pending = self._pending[1], None
            return loss
        self.critic.requires_grad_(False)
        with torch.autocast(images.device.type, enabled=False):
            if self.form == "hinge":
                return hinge_generator_loss(self.critic(student_logits.float()))
            return -self.critic(critic_input(images, student_logits)).mean()

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])

    def to(self, device: torch.device) -> HolisticDistillation:
        self.critic.to(device)  # in place: the optimizer keeps the same parameters
        if self.form == "hinge" and torch.device(device).type == "cuda" and _world_size() > 1:
            # CIRKD's discriminator uses SyncBatchNorm when distributed; the converted layers
            # keep the same Parameter objects, so the optimizer is unaffected.
            self.critic = nn.SyncBatchNorm.convert_sync_batchnorm(self.critic)
        return self

    @classmethod
    def from_settings(cls, settings, num_classes: int, _channels: int) -> HolisticDistillation:
        a = settings.adversarial
        return cls(
            num_classes,
            a.critic_width,
            a.critic_lr,
            a.gradient_penalty,
            a.critic_weight,
            getattr(a, "form", "wgan_gp"),
        )

    def prepare(self, student: Tensor, teacher: Tensor, view: StepView) -> dict[str, Tensor]:
        """The critic's update of this step, before the student's term reads the critic (hinge:
        after the student's loss has been taken on the discriminator as it was)."""
        if self.form == "hinge":
            frozen = copy.deepcopy(self.critic).requires_grad_(False)
            with torch.autocast(view.images.device.type, enabled=False):
                fake, _ = discriminator_input(student, teacher)
                loss = hinge_generator_loss(frozen(fake))
            # CIRKD's G forward runs on the live discriminator: keep what it advances (BatchNorm
            # running statistics, the spectral norms' power-iteration vectors).
            with torch.no_grad():
                for mine, theirs in zip(self.critic.buffers(), frozen.buffers()):
                    mine.copy_(theirs)
            self._pending = (student, loss)
        return {"critic": self.critic_step(view.images, student, teacher)}


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _average_gradients(module: nn.Module) -> None:
    world = _world_size()
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def _adversarial_term(student: Tensor, teacher: Tensor, view: StepView, state) -> Tensor:
    return state.student_loss(view.images, student)


# On the logits; the critic (and its optimizer) is the term's state (`method.adversarial`, its
# `form` choosing SKD's WGAN-GP or CIRKD's hinge).
ADVERSARIAL = Term(
    _adversarial_term, state=HolisticDistillation.from_settings, state_key="holistic"
)
