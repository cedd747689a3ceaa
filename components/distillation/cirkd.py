"""Cross-image relational distillation (Yang et al., "Cross-Image Relational Knowledge
Distillation for Semantic Segmentation", CVPR 2022; reference code: github.com/winycg/CIRKD).

Three terms, all on L2-normalised embeddings (B,C,h,w) of the last feature map; the student's
is projected to the teacher's C upstream (the reference: conv1×1-BN-ReLU-conv1×1):

- `minibatch_pixel_relation`: pixel-to-pixel relations between every pair of images in a batch.
- `memory_contrast_loss` with a `MemoryBank`: relations of each anchor pixel to teacher pixel and
  region embeddings stored over past iterations.

Reference weights (train_cirkd.py): mini-batch 1.0, memory pixel 0.1, memory region 0.1, next
to pixel-wise logit KD 1.0. The caller enqueues the teacher's embeddings of the current batch
(the reference does so just before computing the memory loss, after an all-gather over GPUs;
here each worker keeps its own bank unless the caller gathers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.distillation.term import StepView, Term


def _embeddings(x: Tensor) -> Tensor:
    """(B,C,h,w) -> (B, h·w, C) float32, each pixel L2-normalised over C."""
    return F.normalize(x.float(), dim=1).flatten(2).transpose(1, 2)


def _check_pair(student: Tensor, teacher: Tensor, same_channels: bool) -> Tensor:
    """Validates shapes and returns the student resized (bilinear) to the teacher's h×w."""
    ok = student.ndim == 4 and teacher.ndim == 4 and student.shape[0] == teacher.shape[0]
    if not ok or (same_channels and student.shape[1] != teacher.shape[1]):
        need = "batch size and channel count" if same_channels else "batch size"
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be (B,C,h,w) "
            f"embeddings with the same {need}"
        )
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(
            student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    return student


def _labels_at(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """(B,H,W) labels nearest-resized to `size`, flattened to (B, h·w)."""
    if labels.shape[-2:] != size:
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    return labels.long().flatten(1)


def _kl_rows(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """KL(softmax(t) ‖ softmax(s)) over the last dim, one value per row."""
    log_p_t = F.log_softmax(t_logits, dim=-1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(s_logits, dim=-1))).sum(-1)


def minibatch_pixel_relation(student: Tensor, teacher: Tensor, tau: float = 0.1) -> Tensor:
    """Mini-batch pixel-to-pixel relation loss (CIRKD §3.2; `CriterionMiniBatchCrossImagePair`).

    student: (B,C_s,h_s,w_s), teacher: (B,C_t,h,w) embeddings; the student is resized (bilinear)
    to h×w. Channel counts may differ — the relations are C-independent (the reference applies
    this term to the raw last feature maps). With z L2-normalised over C and n = h·w, for every
    ordered image pair (i, j) and pixel a of image i, the row S_ij[a, :] = z_i[a]·z_j[:] / tau is
    softmaxed over the n pixels of image j (not over the whole batch):

        loss = 1/(B²·n) · Σ_{i,j} Σ_a KL(softmax(T_ij[a]) ‖ softmax(S_ij[a]))

    which is the reference's per-pair `kl_div(..., 'batchmean')` averaged over B². Faithful to the
    reference code: tau = 0.1 (its `--contrast-temperature`) and no tau² factor, so its weight
    1.0 applies unchanged. The reference's pair loop is vectorised over j; the teacher is
    detached; float32.
    """
    student = _check_pair(student, teacher, same_channels=False)
    b, n = teacher.shape[0], teacher.shape[-2] * teacher.shape[-1]
    zs = _embeddings(student)
    with torch.no_grad():
        zt = _embeddings(teacher.detach())
    zs_all, zt_all = zs.reshape(b * n, -1), zt.reshape(b * n, -1)
    total = zs.new_zeros(())
    for i in range(b):  # one anchor image at a time bounds the temporaries to n × B·n
        s_logits = (zs[i] @ zs_all.T / tau).view(n, b, n)
        with torch.no_grad():
            t_logits = (zt[i] @ zt_all.T / tau).view(n, b, n)
        total = total + _kl_rows(t_logits, s_logits).sum()
    return total / (b * b * n)


class MemoryBank(nn.Module):
    """Per-class queues of teacher pixel and region embeddings (CIRKD §3.3).

    Buffers (all in `state_dict`, so checkpoints carry the bank): `pixel_queue` (K,P,C),
    `pixel_ptr` (K,) next slot, `pixel_count` (K,) filled slots; `region_queue` (K,R,C),
    `region_ptr`, `region_count`. Slots are written circularly; only the first `count` slots of a
    class (all of them once it has wrapped) are ever read, so empty slots are never negatives.

    Simplifications of the reference: it keeps 20000 pixels and 2000 regions per class,
    initialised with random unit vectors that count as negatives until overwritten, and samples
    4096/K + 1 pixel and 1024/K + 1 region slots per class each step; here the queues start empty
    and the loss contrasts against every filled slot, so the defaults are sized (256 and 64 per
    class) to give a comparable number of negatives. Its pixel queue jumps to the last slots when
    a write would overflow; here the write wraps around.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        pixel_size: int = 256,
        region_size: int = 64,
        pixels_per_class_per_image: int = 16,
    ):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.pixels_per_class_per_image = pixels_per_class_per_image
        for name, size in (("pixel", pixel_size), ("region", region_size)):
            self.register_buffer(f"{name}_queue", torch.zeros(num_classes, size, dim))
            self.register_buffer(f"{name}_ptr", torch.zeros(num_classes, dtype=torch.long))
            self.register_buffer(f"{name}_count", torch.zeros(num_classes, dtype=torch.long))

    def _push(self, name: str, k: int, items: Tensor) -> None:
        queue, ptr, count = (getattr(self, f"{name}_{s}") for s in ("queue", "ptr", "count"))
        size, n = queue.shape[1], items.shape[0]
        slots = (ptr[k] + torch.arange(n, device=queue.device)) % size
        # of a write longer than the queue only the last `size` items would survive
        queue[k, slots[-size:]] = items[-size:].to(queue.dtype)
        ptr[k] = (ptr[k] + n) % size
        count[k] = torch.clamp(count[k] + n, max=size)

    @torch.no_grad()
    def enqueue(self, teacher_embed: Tensor, labels: Tensor, ignore_index: int = 255) -> None:
        """Adds a batch: teacher_embed (B,C,h,w), labels (B,H,W) int (nearest-resized to h×w).

        For every class present in an image: its mean embedding (of the L2-normalised pixels,
        renormalised) goes to the region queue, and up to `pixels_per_class_per_image` of its
        pixels, drawn without replacement with torch's RNG, to the pixel queue; images in batch
        order, as in the reference. Pixels labelled `ignore_index` are never stored.
        """
        b, c, h, w = teacher_embed.shape
        if c != self.dim or labels.ndim != 3 or labels.shape[0] != b:
            raise ValueError(
                f"embeddings {tuple(teacher_embed.shape)} and labels {tuple(labels.shape)}: need "
                f"(B,{self.dim},h,w) and (B,H,W)"
            )
        z = _embeddings(teacher_embed.detach())  # (B,n,C)
        lab = _labels_at(labels.to(z.device), (h, w))
        present = torch.unique(lab[lab != ignore_index]).tolist()
        if any(k < 0 or k >= self.num_classes for k in present):
            raise ValueError(f"labels {present} outside [0, {self.num_classes}) and not ignore")
        for k in present:
            member = lab == k  # (B,n)
            counts = member.sum(1)
            means = (member.unsqueeze(-1) * z).sum(1) / counts.clamp(min=1).unsqueeze(-1)
            self._push("region", k, F.normalize(means[counts > 0], dim=1))
            keys = torch.rand(member.shape, device=z.device).masked_fill(~member, 2.0)
            order = keys.argsort(dim=1)[:, : self.pixels_per_class_per_image]  # members first
            take = torch.arange(order.shape[1], device=z.device) < counts.unsqueeze(1)
            picked = z.gather(1, order.unsqueeze(-1).expand(-1, -1, c))[take]  # image-major
            self._push("pixel", k, picked)

    def filled(self, name: str) -> Tensor:
        """All filled slots of the `name` ("pixel" or "region") queue, class-major: (M,C)."""
        queue, count = getattr(self, f"{name}_queue"), getattr(self, f"{name}_count")
        slots = torch.arange(queue.shape[1], device=queue.device)
        return queue[slots < count.unsqueeze(1)]


def memory_contrast_loss(
    student: Tensor,
    teacher: Tensor,
    bank: MemoryBank,
    tau: float = 0.1,
    num_anchors: int | None = 1024,
    labels: Tensor | None = None,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    """Memory-based pixel-to-pixel and pixel-to-region relation losses (CIRKD §3.3).

    student (projected), teacher: (B,C,h,w) embeddings with C = bank.dim; the student is resized
    (bilinear) to the teacher's h×w. Anchors are the pixels of the batch (those not labelled
    `ignore_index` when `labels` (B,H,W) is given — nearest-resized, as in the reference). If
    there are more than `num_anchors` (None: no limit) a uniform random subset of that size is
    drawn with torch's RNG; otherwise every anchor is used in order, with no sampling. For each
    queue separately, with M the bank's filled entries, z L2-normalised and the teacher detached:

        loss = mean_anchors KL(softmax(z_t·Mᵀ / tau) ‖ softmax(z_s·Mᵀ / tau))

    Faithful to the reference: tau = 0.1 (its `--contrast-temperature`) and its separate KD
    temperature of 1 (factor 1² — no tau² here), 'batchmean' over anchors. Anchor subsampling is
    ours (the reference uses every valid pixel). Returns (pixel_loss, region_loss), float32
    scalars; a term whose queue is empty, or a batch with no valid anchor, gives 0 that still
    has a gradient path to the student.
    """
    student = _check_pair(student, teacher, same_channels=True)
    if teacher.shape[1] != bank.dim:
        raise ValueError(f"embeddings {tuple(teacher.shape)} do not match bank dim {bank.dim}")
    zs = _embeddings(student).flatten(0, 1)  # (B·n, C)
    zt = _embeddings(teacher.detach()).flatten(0, 1)
    if labels is None:
        idx = torch.arange(zs.shape[0], device=zs.device)
    else:
        lab = _labels_at(labels.to(zs.device), tuple(teacher.shape[-2:]))
        idx = (lab.flatten() != ignore_index).nonzero().squeeze(1)
    if num_anchors is not None and idx.numel() > num_anchors:
        idx = idx[torch.randperm(idx.numel(), device=idx.device)[:num_anchors]]
    zero = student.float().sum() * 0.0

    def relation(name: str) -> Tensor:
        mem = bank.filled(name).to(zs.dtype)
        if mem.shape[0] == 0 or idx.numel() == 0:
            return zero
        return _kl_rows(zt[idx] @ mem.T / tau, zs[idx] @ mem.T / tau).mean()

    return relation("pixel"), relation("region")


class MemoryContrast:
    """The class memory bank as term state, shared by `memory_pixel` and `memory_region`: each
    step the teacher's embeddings join the bank first (as in CIRKD's code), then both
    contrasts are computed once over the same anchors."""

    def __init__(self, settings, num_classes: int, teacher_channels: int):
        c = settings.cirkd
        self.bank = MemoryBank(
            num_classes,
            teacher_channels,
            pixel_size=c.pixel_memory_size,
            region_size=c.region_memory_size,
            pixels_per_class_per_image=c.pixels_per_class,
        )
        self.losses: tuple[Tensor, Tensor] | None = None

    def prepare(self, student: Tensor, teacher: Tensor, view: StepView) -> dict[str, Tensor]:
        c = view.settings.cirkd
        self.bank.enqueue(teacher, view.mask)
        self.losses = memory_contrast_loss(
            student,
            teacher,
            self.bank,
            tau=c.memory_temperature,
            num_anchors=c.num_anchors,
            labels=view.mask,
        )
        return {}

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state)

    def to(self, device: torch.device) -> MemoryContrast:
        self.bank.to(device)
        return self


def _batch_pixel_term(student: Tensor, teacher: Tensor, view: StepView, _state) -> Tensor:
    return minibatch_pixel_relation(student, teacher, view.settings.cirkd.batch_temperature)


def _memory_term(which: int):
    def compute(student: Tensor, teacher: Tensor, view: StepView, state: MemoryContrast):
        return state.losses[which]

    return compute


# CIRKD's three relation terms on `embed`, through the adapter (`method.cirkd`).
BATCH_PIXEL = Term(_batch_pixel_term, feature="embed")
MEMORY_PIXEL = Term(_memory_term(0), feature="embed", state=MemoryContrast, state_key="memory_bank")
MEMORY_REGION = Term(
    _memory_term(1), feature="embed", state=MemoryContrast, state_key="memory_bank"
)
