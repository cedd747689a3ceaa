"""UniMatch's labeled criterion for Cityscapes: online hard example mining on probabilities.

LiheYoung/UniMatch@0324f3d `util/ohem.py` `ProbOhemCrossEntropy2d` (L28-57; itself from
TorchSemiSeg), used as the labeled loss when `criterion.name: OHEM` (`unimatch.py` L68-73,
`fixmatch.py` L68-73), which only `configs/cityscapes.yaml` sets (L12-17: `thresh: 0.7`,
`min_kept: 200000`, `ignore_index: 255`; `pascal.yaml` L12-15 uses plain CE). The rule, over the
N valid (non-ignore) pixels of the whole batch that the criterion is called on:

- p_i = softmax probability of pixel i's true class (L35-43);
- if `min_kept` > N: no selection, plain CE over all N valid pixels (L38-39);
- else, with p_(k) the k-th smallest p over the batch, k = `min_kept` (L46-47; ignored pixels
  count as p = 1 there, L41, so they never change that order statistic), the cut is
  max(`thresh`, p_(k)) (L44, L48-49) and the kept pixels are the valid ones with p <= cut
  (L50-52; ties at the cut are all kept, so more than k can be kept);
- if `min_kept` is 0 the selection is skipped altogether (L45 guards L46-52): plain CE;
- the loss is the mean CE over the kept pixels (`nn.CrossEntropyLoss(reduction='mean',
  ignore_index=255)`, L25-26, L57).

So with thresh 0.7 every pixel the network gets less than 70% right is kept, and at least the
`min_kept` hardest ones. **`min_kept` counts pixels of one call**: UniMatch calls the criterion
on one GPU's labeled batch (2 images of 801 x 801 in its Cityscapes protocol: 1,283,202 pixels,
of which at least 200,000 = 15.6% are kept); here it is called on one Ray worker's labeled batch
(`data.batch_size` images of `data.crop_size`), so the same `min_kept` means the same thing only
with the same per-worker batch and crop. The probabilities only select pixels (no gradient flows
through the selection), as in the reference, where they are used in comparisons only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def ohem_keep(
    logits: Tensor, mask: Tensor, threshold: float, min_kept: int, ignore_index: int = 255
) -> Tensor:
    """(B, K, H, W) logits at the mask's size, (B, H, W) int64 mask -> (B, H, W) bool: the
    pixels the OHEM loss averages over (module docstring). Ignored pixels are never kept."""
    valid = mask != ignore_index
    num_valid = int(valid.sum())
    if num_valid == 0 or min_kept == 0 or min_kept > num_valid:
        return valid
    prob = logits.float().softmax(dim=1)
    true_prob = prob.gather(1, mask.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    kth = true_prob[valid].kthvalue(min_kept).values  # the min_kept-th smallest
    cut = max(float(threshold), float(kth))
    return valid & (true_prob <= cut)


def ohem_ce(
    logits: Tensor, mask: Tensor, threshold: float, min_kept: int, ignore_index: int = 255
) -> Tensor:
    """Mean CE over the OHEM-kept pixels (`ohem_keep`); logits (B, K, h, w) are upsampled
    (bilinear) to the mask's (H, W) first, as `segmentation_ce` does. A batch with no valid pixel
    gives 0 with a gradient path, like `segmentation_ce`."""
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    keep = ohem_keep(logits, mask, threshold, min_kept, ignore_index)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.float(), mask.masked_fill(~keep, ignore_index), ignore_index=ignore_index
    )


__all__ = ["ohem_ce", "ohem_keep"]
