"""The plain-PyTorch side of the side-by-side benchmarks: a torch DataLoader over a split's
encoded rows, decoding in its worker processes with the project's own decoders (the same
decode + augment as the Ray Data arm), batches as the Ray workers get them (uint8 images and
masks, `valid`).

    loader = row_loader(root, "train", batch_size=8, decode=partial(decode_train_batch, ...),
                        workers=1, shuffle=True)
"""

from __future__ import annotations

from functools import partial

import numpy as np


def split_rows(root: str, split: str) -> list[tuple]:
    """(id, image bytes, mask bytes) of every row of a split, read once with pyarrow."""
    from components.data.shards import read_split_table

    table = read_split_table(root, split, ["id", "image", "mask"])
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "image", "mask"))))


def collate(rows, decode) -> dict:
    """A batch of rows through `decode` (a decoder of components/data/decode.py with its
    settings bound), as torch tensors: image, mask, valid."""
    import torch

    ids, images, masks = zip(*rows)
    out = decode({"id": np.array(ids, dtype=str), "image": np.array(images, dtype=object),
                  "mask": np.array(masks, dtype=object)})  # fmt: skip
    return {k: torch.from_numpy(out[k]) for k in ("image", "mask", "valid")}


def row_loader(root: str, split: str, batch_size: int, decode, workers: int, shuffle: bool = True):
    """A DataLoader of decoded batches (full batches only), persistent worker processes."""
    from torch.utils.data import DataLoader

    return DataLoader(
        split_rows(root, split), batch_size=batch_size, shuffle=shuffle, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0,
        collate_fn=partial(collate, decode=decode),
    )  # fmt: skip


def train_decoder(cfg, info):
    """`decode_train_batch` with the config's crop, scale range and flip, uint8 rows out (the
    decode + augment the Ray path runs)."""
    from components.data.transforms import decode_train_batch

    d = cfg.data
    return partial(
        decode_train_batch, crop_size=d.crop_size, scale_range=(d.scale_min, d.scale_max),
        flip=d.flip, num_classes=info.num_classes, ignore_index=info.ignore_index,
        normalized=False,
    )  # fmt: skip


def plain_method(cfg, info, teacher, epochs: int, seed: int):
    """(method, optimizer, schedule, steps per epoch) for one process, built as the Ray worker
    builds them (regime.build_method, build_optimizer, Schedule.of), no autocast."""
    import torch

    from components.models.build import build_model
    from components.regimes import regime_of
    from components.training.schedule import Schedule, build_optimizer

    k = info.num_classes
    torch.manual_seed(seed)
    student = build_model(cfg.model, k)
    method = regime_of(cfg.method.name).build_method(
        cfg, student, teacher, num_classes=k, autocast_dtype=None, ignore_index=info.ignore_index
    )
    optimizer = build_optimizer(method.trainable, cfg.optim)
    steps = info.splits[cfg.data.train_split].rows // cfg.data.batch_size
    return method, optimizer, Schedule.of(optimizer, steps * epochs, cfg.optim), steps
