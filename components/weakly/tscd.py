"""TSCD: end-to-end weakly supervised segmentation from image-level labels (METHODS.md §2).

    method = TSCD(build_model(cfg.model, num_classes), cfg.method)   # model.cls_head=true
    terms = method.training_step(batch)    # batch: image, labels (B, K-1), area, valid

Xu et al., "Self Correspondence Distillation for End-to-End Weakly-Supervised Semantic
Segmentation", AAAI 2023, on AFA (Ru et al., "Learning Affinity from Attention", CVPR 2022).
One network (MiT + SegFormer head + image-level classifier + affinity head) learns from its own
CAMs. One step:

1. `cls`: multi-label soft margin of the classifier's logits against the image labels. Before
   `method.weakly.warmup_iters` this is the only term (the CAMs are not yet worth learning from).
2. CAMs of the crop (multi-scale + flip, no gradient, `cam.multiscale_cam`) -> pseudo labels
   (`pseudo_labels.pseudo_labels`: background thresholds 0.55 / 0.35, refined by VARM, AFA's
   PAR, the old appearance-only `plain` refinement, or not at all; padding and uncertain pixels
   ignored).
3. `seg`: CE of the segmentation logits on the pseudo labels, the background and the
   foreground pixels averaged separately then together (AFA), so large backgrounds do not drown
   the objects. After `method.weakly.propagate_after` (AFA: 6000) its labels are AFA's
   propagated ones instead: the CAMs random-walked by the learned affinity of the largest CAM
   scale (`affinity.propagate_with_background`), refined and thresholded the same way
   (`pseudo_labels.propagated_pseudo_labels`).
4. `aff`: the affinity predicted from the last stage's raw attention logits (q·kᵀ) against
   the (CAM) pseudo labels' pair-wise affinity within `affinity_radius` (`affinity.py`).
5. `scd`: self correspondence distillation (`scd.py`): the second view (the crop downscaled by
   `scd_scale`) goes through the same network; the correspondence of the two views'
   segmentation maps is taught the correspondence of their CAMs (each view's maps resized to
   that view's image size before the points are sampled).

Weights (`method.weakly.weights.cls/seg/aff/scd`, 0 = off) make the ablations config switches: AFA is
`scd=0` with `refine=par`; "no refinement" is `refine=none`.

DDP: the trainable module is `TwoViews` (the network run on both views in one forward call), so
DDP sees one forward per step; outputs that a step does not use (warm-up, terms switched off)
join the loss with weight 0, so every parameter gets a gradient on every worker and DDP needs no
unused-parameter search.

Faithful: the terms, their default weights and warm-up, the thresholds, the two-view SCD, the
encoder's norms at lr 0 (`method.weakly.freeze_backbone_norms`, via `zero_lr_backbone_norms` on
the trainable module, read by training/schedule.py), AFA's label propagation.
Reconstructed: CAMs of the second view are single-scale; both views' CAMs keep only the image's
classes (absent classes' activations are noise, not correspondence); invalid rows (undecodable)
are left out of every term.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from components.distillation.protocol import MethodBase, segmentation_ce, unwrap
from components.schema import MethodConfig, WeaklyConfig
from components.weakly.affinity import (
    affinity_labels,
    affinity_loss,
    downsample_labels,
    propagate_with_background,
)
from components.weakly.cam import cam_at, multiscale_cam
from components.weakly.pseudo_labels import propagated_pseudo_labels, pseudo_labels
from components.weakly.scd import scd_loss, second_view
from components.weakly.varm import par_refine, refine


class TwoViews(nn.Module):
    """The network run on the crop and (optionally) its second view in one forward call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor, second: Tensor | None = None) -> tuple[dict, dict | None]:
        return self.net(image), (self.net(second) if second is not None else None)


def to_unit_range(image: Tensor) -> Tensor:
    """ImageNet-normalised (B, 3, H, W) -> RGB in [0, 1] (the refinement's appearance input)."""
    mean = image.new_tensor(IMAGENET_MEAN / 255.0)[None, :, None, None]
    std = image.new_tensor(IMAGENET_STD / 255.0)[None, :, None, None]
    return (image.float() * std + mean).clamp(0, 1)


def refine_function(weakly: WeaklyConfig):
    """The configured pseudo-label refinement as `fn(image, probs)`, or None (`refine: none`):
    `varm` (TSCD), `par` (AFA's PAR, `varm.par_refine`: w1 0.3, w2 0.01, the configured
    iterations and dilations, whose defaults are AFA's), or `plain` (the old appearance-only
    ablation: VARM without its variation term; not AFA's PAR)."""
    if weakly.refine == "none":
        return None
    if weakly.refine == "par":
        return partial(
            par_refine,
            iterations=weakly.refine_iterations,
            dilations=tuple(weakly.refine_dilations),
        )
    return partial(
        refine,
        iterations=weakly.refine_iterations,
        dilations=tuple(weakly.refine_dilations),
        variation_weight=weakly.variation_weight if weakly.refine == "varm" else 0.0,
    )


def softmax_before_refine(weakly: WeaklyConfig) -> bool:
    """Whether the scores are softmaxed over the kept channels before the refinement: AFA's
    pipeline does it for PAR (utils/camutils.py refine_cams_with_bkg_v2)."""
    return weakly.refine == "par"


def _at(maps: Tensor, image: Tensor) -> Tensor:
    """maps (B, C, h, w) -> (B, C, H, W) of `image`, bilinear, float32."""
    return F.interpolate(maps.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)


def balanced_seg_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """AFA's segmentation loss: the mean of the CE over background pixels and the CE over
    foreground pixels (each 0 when it has no pixel). logits (B, K, h, w), labels (B, H, W)."""
    background = labels.masked_fill(labels != 0, ignore_index)
    foreground = labels.masked_fill(labels == 0, ignore_index)
    return 0.5 * (
        segmentation_ce(logits, background, ignore_index)
        + segmentation_ce(logits, foreground, ignore_index)
    )


class TSCD(MethodBase):
    """The weakly supervised objective (module docstring); `trainable` is `TwoViews(network)`.

    `weights`: cls, seg, aff and scd, as `regimes.WEAKLY.weights(cfg)` resolves them (0 or
    absent: off)."""

    def __init__(
        self,
        network: nn.Module,
        m: MethodConfig,
        weights: dict[str, float],
        ignore_index: int = 255,
    ):
        if getattr(network, "classifier", None) is None:
            raise ValueError(f"method '{m.name}' needs a network with model.cls_head=true")
        self.cfg = m.weakly
        self.trainable: nn.Module = TwoViews(network)
        # build_optimizer puts the backbone's norms at lr 0 (AFA / TSCD get_param_groups).
        self.trainable.zero_lr_backbone_norms = bool(m.weakly.freeze_backbone_norms)
        self.weights = {k: float(weights.get(k, 0.0)) for k in ("cls", "seg", "aff", "scd")}
        self.ignore_index = ignore_index
        self.iteration = 0
        self.refine_fn = refine_function(m.weakly)

    def _net(self) -> nn.Module:
        return unwrap(self.trainable).net

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["labels"].float()
        valid = batch["valid"]
        area = batch["area"] & valid[:, None, None]
        c, w = self.cfg, self.weights
        step = self.iteration
        warm = step < c.warmup_iters
        self.iteration += 1
        dense = not warm and any(w[k] > 0 for k in ("seg", "aff", "scd"))
        view2 = second_view(image, c.scd_scale) if dense and w["scd"] > 0 else None

        out, out2 = self.trainable(image, view2)
        terms: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        if w["cls"] > 0:
            if bool(valid.any()):
                cls = F.multilabel_soft_margin_loss(out["cls_logits"][valid].float(), labels[valid])
            else:
                cls = out["cls_logits"].sum() * 0.0
            terms["cls"] = w["cls"] * cls

        if dense:
            net = self._net()
            with torch.no_grad():
                cams, plabels = self._cam_pseudo_labels(image, labels, area)
            if w["seg"] > 0:
                seg_labels = plabels
                if c.propagate_after is not None and step > c.propagate_after:
                    # AFA: the seg term's labels come from the affinity-propagated CAMs after
                    # its 6000th iteration (`if n_iter <= 6000:` keeps the CAM labels).
                    with torch.no_grad():
                        seg_labels = self._propagated_labels(image, labels, area, cams)
                    diagnostics["propagated_share"] = (
                        seg_labels != self.ignore_index
                    ).float().sum() / area.float().sum().clamp(min=1)
                terms["seg"] = w["seg"] * balanced_seg_loss(
                    out["logits"], seg_labels, self.ignore_index
                )
            if w["aff"] > 0:
                seeds = downsample_labels(plabels, out["features"]["high"].shape[-2:])
                aff_target = affinity_labels(seeds, c.affinity_radius, self.ignore_index)
                terms["aff"] = w["aff"] * affinity_loss(out["attn_pred"].float(), aff_target, seeds)
            if out2 is not None:
                with torch.no_grad():
                    # Upsampled raw, then ReLU + min-max at the view's size (official order).
                    cams2 = cam_at(net.cam(view2), view2.shape[-2:]) * labels[:, :, None, None]
                # Both maps of a view at the view's own size (METHODS.md §2), so the sampled
                # points cover the whole image and reach every logit through the upsampling.
                cam1_v, seg1 = _at(cams, image), _at(out["logits"], image)
                cam2_v, seg2 = _at(cams2, view2), _at(out2["logits"], view2)
                if bool(valid.any()):
                    scd = scd_loss(
                        cam1_v[valid], cam2_v[valid], seg1[valid], seg2[valid], c.scd_points
                    )
                else:
                    scd = seg1.sum() * 0.0
                terms["scd"] = w["scd"] * scd
            with torch.no_grad():  # diagnostics only: the crop masks never reach a loss
                known = plabels != self.ignore_index
                diagnostics["pseudo_share"] = known.float().sum() / area.float().sum().clamp(min=1)
                truth = batch.get("mask")
                if truth is not None:
                    both = known & (truth != self.ignore_index)
                    if bool(both.any()):
                        diagnostics["pseudo_acc"] = (plabels[both] == truth[both]).float().mean()

        # Outputs no term used this step join with weight 0: every parameter gets a gradient.
        unused = [out["logits"], out["cls_logits"], out.get("attn_pred")]
        if out2 is not None:
            unused.append(out2["logits"])
        loss = sum(terms.values()) if terms else out["cls_logits"].sum() * 0.0
        loss = loss + sum(t.float().sum() * 0.0 for t in unused if t is not None)
        if "background_only" in batch:
            diagnostics["background_only_share"] = batch[
                "background_only"
            ].float().sum() / valid.float().sum().clamp(min=1)
        return {**terms, **diagnostics, "loss": loss}

    def _cam_pseudo_labels(self, image: Tensor, labels: Tensor, area: Tensor):
        """(the image's CAMs kept to its classes, their refined pseudo labels (B,H,W))."""
        c = self.cfg
        cams = multiscale_cam(self._net().cam, image, tuple(c.cam_scales), c.cam_flip)
        cams = cams * labels[:, :, None, None]
        plabels = pseudo_labels(
            cams,
            labels,
            to_unit_range(image),
            area,
            high=c.high_threshold,
            low=c.low_threshold,
            refine_fn=self.refine_fn,
            ignore_index=self.ignore_index,
            softmax_scores=softmax_before_refine(c),
        )
        return cams, plabels

    def _propagated_labels(
        self, image: Tensor, labels: Tensor, area: Tensor, cams: Tensor
    ) -> Tensor:
        """AFA's seg labels after its warm-up (rulixiang/afa scripts/dist_train_voc.py,
        train()): the affinity predicted at the largest CAM scale (multi_scale_cam_with_aff_mat
        keeps `aff_mat[np.argmax(scales)]`), the image-size CAMs resized to that feature size,
        propagated with the high and the low background score, refined, combined."""
        c = self.cfg
        top = max(c.cam_scales)
        height, width = image.shape[-2:]
        x = image
        if top != 1.0:
            size = (max(1, round(height * top)), max(1, round(width * top)))
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        aff, feat_size = self._net().affinity(x)
        small = F.interpolate(cams.float(), size=feat_size, mode="bilinear", align_corners=False)
        high, low = (
            propagate_with_background(small, aff, labels, t, c.affinity_radius)
            for t in (c.high_threshold, c.low_threshold)
        )
        return propagated_pseudo_labels(
            high, low, labels, to_unit_range(image), area, self.refine_fn, self.ignore_index
        )

    @torch.no_grad()
    def panel_maps(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """The refined CAM pseudo labels the `seg` term trains on, with the image-level classes
        taken from the ground truth (a picture of the CAMs; nothing trains on it)."""
        net = self._net()
        was_training = net.training
        net.eval()
        k = net.num_classes
        labels = torch.stack([(masks == j).flatten(1).any(1) for j in range(1, k)], 1).float()
        _, plabels = self._cam_pseudo_labels(images, labels, masks != self.ignore_index)
        net.train(was_training)
        return {"cam pseudo labels": plabels}

    def eval_model(self) -> nn.Module:
        return self._net()

    def extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def load_extra_state(self, state: dict) -> None:
        self.iteration = int(state.get("iteration", 0))


__all__ = [
    "TSCD",
    "TwoViews",
    "balanced_seg_loss",
    "refine_function",
    "softmax_before_refine",
    "to_unit_range",
]
