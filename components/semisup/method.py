"""Semi-supervised methods: the FixMatch/mean-teacher base and cross-image distillation on it.

    fixmatch      CE on labeled + unsup (confident pseudo labels of the EMA teacher, strong view)
    cross_image   fixmatch + relation (inter-channel, labeled × unlabeled) + style (statistics)

A weight of 0 switches a term off, so `cross_image` with `relation=0 style=0` is the base and the
ablations are config switches. One step, with B_l labeled and B_u unlabeled images:

1. The EMA teacher (eval mode, no gradient) runs once on [labeled; weak unlabeled]: pseudo labels
   (argmax, confidence >= `threshold`, padding and bad rows never count) and the features the
   relation term needs.
2. CutMix boxes (`cutmix_prob`) mix the strong views, the pseudo labels, their confidence mask,
   the real-pixel mask and the teacher's unlabeled features alike. Image i's partner is image i
   of the previous step's unlabeled batch (kept on the worker; the teacher predicts its weak
   view again in the same call as step 1, with the current weights), because UniMatch mixes
   with a second unlabeled batch (LiheYoung/UniMatch@0324f3d unimatch.py L121-145, L161-172);
   UniMatch's second batch holds other crops of the same images, which its author calls
   unintended (issue #85: "the more correct way is CutMix with different images"). Until a
   previous batch exists (the first step of a run or of a resume: it is not checkpointed) the
   partner is the batch rolled by one, and a batch of one is not mixed on that step.
3. The student runs once on [labeled; strong unlabeled] (one forward, so BatchNorm sees both and
   DDP sees one call). Terms: `ce` (+`aux`) on the labeled masks (plain CE, or UniMatch's OHEM
   criterion with `labeled_loss: ohem`: `ohem.ohem_ce`), `unsup` on the pseudo labels
   (divided by the real pixels, as UniMatch: `fixmatch.confident_ce`),
   `relation` on pairs (labeled k, unlabeled k) for k < min(B_l, B_u), `style` of the
   unlabeled features against the labeled statistics. Every term is multiplied by `loss_scale`
   (1; 0.5 is UniMatch's `loss = (loss_x + loss_u_s) / 2.0`, LiheYoung/UniMatch@0324f3d
   fixmatch.py L166, and unimatch.py L188 halves its four terms likewise), so the reported terms
   still add up to `loss`; the cross-image terms are inside the halving too.
4. After the optimizer step the loop calls `after_step()`: the EMA update.

The unlabeled rows' masks (when a dataset has them) arrive as `u_mask` and are used for one
diagnostic only, `pseudo_acc` (accuracy of the confident pseudo labels), computed without
gradient after the loss; nothing that trains reads them (tests/semisup/test_method.py checks that
the loss and gradients do not change when they do).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.distillation.protocol import MethodBase, supervised_terms, unwrap
from components.schema import MethodConfig
from components.semisup.cross_image import (
    StyleMemory,
    relation_loss,
    style_loss,
    style_statistics,
)
from components.semisup.ema import EMATeacher
from components.semisup.fixmatch import confident_ce, cutmix, cutmix_boxes, pseudo_labels
from components.semisup.ohem import ohem_ce


class SemiSupervised(MethodBase):
    """The semi-supervised objective (module docstring); `trainable` is the student alone.

    `weights`: ce, aux and the unlabeled terms (unsup, relation, style) with their weights, as
    `regimes.SEMI_SUPERVISED.weights(cfg)` resolves them; 0 or absent switches a term off.
    """

    def __init__(
        self,
        student: nn.Module,
        m: MethodConfig,
        weights: dict[str, float],
        ignore_index: int = 255,
    ):
        s = m.semisup
        self.trainable: nn.Module = student
        self.ema = EMATeacher(student, s.ema_momentum)
        self.ce_weight, self.aux_weight = weights.get("ce", 0.0), weights.get("aux", 0.0)
        unlabeled = ("unsup", "relation", "style")
        self.weights = {k: v for k, v in weights.items() if k in unlabeled and v > 0}
        self.threshold = s.threshold
        self.labeled_loss = s.labeled_loss
        self.ohem = (s.ohem_threshold, s.ohem_min_kept)
        self.loss_scale = s.loss_scale
        self.cutmix_prob = s.cutmix_prob if "cutmix" in s.strong else 0.0
        self.temperature = s.relation_temperature
        self.feature = s.feature
        self.evaluate = s.evaluate
        self.ignore_index = ignore_index
        self.style_memory = (
            StyleMemory(s.style_memory_momentum) if s.style_memory_momentum is not None else None
        )
        # The previous step's unlabeled batch, CutMix's partner (module docstring, step 2).
        self.partner: dict[str, Tensor] | None = None

    def _take_partner(self, current: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Swap in this step's unlabeled batch; return the previous one, fitted to this batch
        (image i takes partner i, cycling if the batches differ in size), or None if there is
        none of this image size."""
        previous, self.partner = self.partner, current
        if previous is None or previous["weak"].shape[1:] != current["weak"].shape[1:]:
            return None
        b_u, b_p = current["weak"].shape[0], previous["weak"].shape[0]
        if b_p != b_u:
            index = torch.arange(b_u, device=current["weak"].device) % b_p
            previous = {k: v[index] for k, v in previous.items()}
        return previous

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image, mask = batch["image"], batch["mask"]
        weak, strong = batch["u_image"], batch["u_image_strong"]
        b_l, b_u = image.shape[0], weak.shape[0]
        size = weak.shape[-2:]
        usable = batch["u_area"] & batch["u_valid"][:, None, None]  # real, decodable pixels

        partner = None
        if self.cutmix_prob > 0:
            this_batch = {"weak": weak, "strong": strong, "usable": usable}
            if "u_mask" in batch:
                this_batch["u_mask"] = batch["u_mask"]
            partner = self._take_partner(this_batch)

        with torch.no_grad():
            extra = [partner["weak"]] if partner is not None else []
            t_out = self.ema.model(torch.cat([image, weak, *extra]))
            t_logits = t_out["logits"][b_l:]
            labels, _, confident = pseudo_labels(t_logits[:b_u], self.threshold, size)
            confident &= usable
            t_feat = t_out["features"][self.feature]
            t_feat_l, t_feat_u = t_feat[:b_l], t_feat[b_l : b_l + b_u]
            current = {"strong": strong, "labels": labels, "confident": confident}
            current |= {"usable": usable, "t_feat_u": t_feat_u}
            if "u_mask" in batch:
                current["u_mask"] = batch["u_mask"]
            if partner is not None:
                p_labels, _, p_confident = pseudo_labels(t_logits[b_u:], self.threshold, size)
                others = {"strong": partner["strong"], "labels": p_labels}
                others |= {"confident": p_confident & partner["usable"]}
                others |= {"usable": partner["usable"], "t_feat_u": t_feat[b_l + b_u :]}
                if "u_mask" in partner:
                    others["u_mask"] = partner["u_mask"]
                current = {k: v for k, v in current.items() if k in others}
                boxes = cutmix_boxes(b_u, self.cutmix_prob)
                current = {k: cutmix(v, boxes, others[k]) for k, v in current.items()}
            elif self.cutmix_prob > 0 and b_u > 1:  # no previous batch yet: the batch rolled
                boxes = cutmix_boxes(b_u, self.cutmix_prob)
                current = {k: cutmix(v, boxes) for k, v in current.items()}
            strong, labels, confident = current["strong"], current["labels"], current["confident"]
            usable, t_feat_u, truth = current["usable"], current["t_feat_u"], current.get("u_mask")

        out = self.trainable(torch.cat([image, strong]))
        labeled_out = {k: out[k][:b_l] for k in ("logits", "aux_logits") if k in out}
        terms = self._labeled_terms(labeled_out, mask)
        feat = out["features"][self.feature]
        s_feat_l, s_feat_u = feat[:b_l], feat[b_l:]
        if "unsup" in self.weights:
            terms["unsup"] = self.weights["unsup"] * confident_ce(
                out["logits"][b_l:], labels, confident, usable
            )
        if "relation" in self.weights:
            pairs = min(b_l, b_u)
            terms["relation"] = self.weights["relation"] * relation_loss(
                t_feat_l[:pairs],
                t_feat_u[:pairs],
                s_feat_l[:pairs],
                s_feat_u[:pairs],
                self.temperature,
            )
        if "style" in self.weights:
            with torch.no_grad():
                mean_l, std_l = style_statistics(s_feat_l)
                target = (mean_l.mean(0), std_l.mean(0))
                if self.style_memory is not None:
                    target = self.style_memory.update(*target)
            terms["style"] = self.weights["style"] * style_loss(s_feat_u, *target)
        if self.loss_scale != 1.0:  # UniMatch's (loss_x + loss_u) / 2 at 0.5 (module docstring)
            terms = {k: self.loss_scale * v for k, v in terms.items()}
        terms["loss"] = sum(terms.values())

        with torch.no_grad():  # diagnostics only
            terms["confident_share"] = confident.float().sum() / usable.float().sum().clamp(min=1)
            if truth is not None:
                known = confident & (truth != self.ignore_index)
                if bool(known.any()):
                    terms["pseudo_acc"] = (labels[known] == truth[known]).float().mean()
        return terms

    def _labeled_terms(self, out: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """`ce` (+ `aux`) on the labeled images: plain CE, or UniMatch's OHEM criterion
        (`method.semisup.labeled_loss: ohem`, components/semisup/ohem.py) on the main and the
        aux logits alike, over this worker's labeled batch."""
        if self.labeled_loss == "ce":
            return supervised_terms(out, mask, self.ce_weight, self.aux_weight, self.ignore_index)
        threshold, min_kept = self.ohem
        ce = ohem_ce(out["logits"], mask, threshold, min_kept, self.ignore_index)
        terms = {"ce": self.ce_weight * ce}
        if "aux_logits" in out and self.aux_weight > 0:
            terms["aux"] = self.aux_weight * ohem_ce(
                out["aux_logits"], mask, threshold, min_kept, self.ignore_index
            )
        return terms

    @torch.no_grad()
    def panel_maps(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """The EMA teacher's pseudo labels on the images, ignore where below the threshold."""
        logits = self.ema.model(images)["logits"]
        labels, _, confident = pseudo_labels(logits, self.threshold, images.shape[-2:])
        return {"ema pseudo labels": labels.masked_fill(~confident, self.ignore_index)}

    def after_step(self) -> None:
        self.ema.update(unwrap(self.trainable))

    def eval_model(self) -> nn.Module:
        return self.ema.model if self.evaluate == "ema" else unwrap(self.trainable)

    def extra_state(self) -> dict:
        state = {"ema": self.ema.state_dict()}
        if self.style_memory is not None:
            state["style_memory"] = self.style_memory.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        if "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.style_memory is not None and "style_memory" in state:
            self.style_memory.load_state_dict(state["style_memory"])

    def parts(self) -> list:
        return [self.trainable, self.ema, *([self.style_memory] if self.style_memory else [])]


__all__ = ["SemiSupervised"]
