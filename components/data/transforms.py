"""NumPy decode + augmentation for Ray Data `map_batches(batch_format="numpy")`: the import path
the pipelines, benchmarks and tests use.

    from components.data.transforms import decode_train_batch, normalize

The code lives in two modules, re-exported here unchanged:
- augment.py: primitives on one decoded image (`random_scale_crop_flip`, `strong_photometric`,
  `pad_to`, `normalize`, `IMAGENET_MEAN` / `IMAGENET_STD`);
- decode.py: the batch decoders that turn shard rows into training/eval columns
  (`decode_train_batch`, `decode_unlabeled_batch`, `decode_weak_batch`, `decode_eval_batch`,
  `check_row`, `image_label_vector`), with the bad-row and seeding rules in its docstring.
"""

from __future__ import annotations

from components.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_hw,
    normalize,
    pad_to,
    random_scale_crop_flip,
    strong_photometric,
)
from components.data.decode import (
    check_row,
    decode_eval_batch,
    decode_train_batch,
    decode_unlabeled_batch,
    decode_weak_batch,
    image_label_vector,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "check_row",
    "crop_hw",
    "decode_eval_batch",
    "decode_train_batch",
    "decode_unlabeled_batch",
    "decode_weak_batch",
    "image_label_vector",
    "normalize",
    "pad_to",
    "random_scale_crop_flip",
    "strong_photometric",
]
