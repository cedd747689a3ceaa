"""Batches as Ray Data ships them -> as the model takes them, on the worker's device.

    batch = model_batch(batch)              # after iter_torch_batches(device=...)
    batch = model_batch(batch, prefix="u_") # a second stream's keys

Training and evaluation rows travel as they were decoded: images (B, H, W, 3) uint8 and masks
(B, H, W) uint8 (the decoders' `normalized=False` form). Normalisation
((x - IMAGENET_MEAN) / IMAGENET_STD, float32, NCHW) and the int64 masks cross-entropy wants are
made here, on the device: a quarter of the bytes of float32 images (an eighth for int64 masks)
cross the object store and the host-to-device copy, and the CPU decode tasks skip the float work.
The numbers equal the decoders' `normalized=True` output (`augment.normalize`) bit for bit:
the same float32 operations, invalid rows 0.

Already normalised float images pass through unchanged, so a caller that decodes with
`normalized=True` (tests, `decode_split`) can use the same path.
"""

from __future__ import annotations

import torch

from components.data.augment import IMAGENET_MEAN, IMAGENET_STD

IMAGE_COLUMNS = ("image", "image_strong")


def normalize_images(images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised (rows where `valid` is False: 0)."""
    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    out = ((images.permute(0, 3, 1, 2).float() - mean) / std).contiguous()
    if valid is not None and not bool(valid.all()):
        out[~valid.to(out.device)] = 0.0
    return out


def model_batch(batch: dict, prefix: str = "") -> dict:
    """`batch` with its uint8 image columns normalised and its mask as int64 (keys under
    `prefix`); other columns and already-float images are kept as they are."""
    out = dict(batch)
    valid = batch.get(prefix + "valid")
    for name in IMAGE_COLUMNS:
        images = batch.get(prefix + name)
        if images is not None and images.dtype == torch.uint8:
            out[prefix + name] = normalize_images(images, valid)
    mask = batch.get(prefix + "mask")
    if mask is not None and mask.dtype != torch.int64:
        out[prefix + "mask"] = mask.long()
    return out


__all__ = ["IMAGE_COLUMNS", "model_batch", "normalize_images"]
