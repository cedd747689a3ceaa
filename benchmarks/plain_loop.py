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
