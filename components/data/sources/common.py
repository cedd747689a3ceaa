"""Helpers the dataset sources share."""

from __future__ import annotations

import os

import numpy as np

from components.data.convert import BadItem, Sample, check_mask, image_size, read_file
from components.data.shards import DatasetError, decode_mask


def voc_colormap(n: int) -> list[list[int]]:
    """The Pascal VOC colour map: class i's colour spreads the bits of i over R, G and B
    (from the high bit down), so 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0), ..."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: missing folder ({what})")
    return path


def load_pair(item, lut: np.ndarray | None, allowed: set[int]) -> Sample:
    """The image bytes as distributed plus its single-channel mask, checked: decodable, same
    size, ids in `allowed` (before the `lut` remaps them to training ids)."""
    data = read_file(item.image)
    height, width = image_size(data, item.image)
    if item.label is None:
        return Sample(data, None, height, width)
    try:
        mask = decode_mask(read_file(item.label))
    except ValueError as e:
        raise BadItem(f"unreadable mask {item.label}: {e}") from e
    check_mask(mask, height, width, item.label, allowed)
    if lut is not None:
        mask = lut[mask]
    return Sample(data, mask, height, width)


__all__ = ["load_pair", "need_dir", "voc_colormap"]
