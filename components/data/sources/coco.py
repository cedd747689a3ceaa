"""COCO 2014 as distributed, with masks rasterised from the instance annotations:

    <root>/train2014/COCO_train2014_NNNNNNNNNNNN.jpg
    <root>/val2014/COCO_val2014_NNNNNNNNNNNN.jpg
    <root>/annotations/instances_{train,val}2014.json

The usual weakly supervised convention: class 0 is background and classes 1..80 are the 80
object categories in ascending category-id order (person = 1, ..., toothbrush = 80; names from the
annotation file). Polygons are filled with scikit-image (pixels whose centres lie inside) and
RLEs (compressed or not) are decoded exactly. Instances are painted largest first, so a smaller
object lying on a larger one stays visible; crowd regions become 255 (ignore). Images without
annotations are all background. Row ids are the file stems; image-level labels come from the
mask like every other dataset's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from skimage.draw import polygon as fill_polygon

from components.data.convert import BadItem, Item, Sample, image_size, read_file
from components.data.shards import DatasetError
from components.data.sources.common import need_dir, voc_colormap

SPLITS = {"train": "train2014", "val": "val2014"}


def rle_counts(counts: str | list[int]) -> list[int]:
    """Run lengths of a COCO RLE; a string is the compressed form (6-bit groups from '0', with a
    continuation bit and a sign bit, each count after the second stored as a difference to the
    count two before it)."""
    if not isinstance(counts, str):
        return [int(c) for c in counts]
    out: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_decode(rle: dict) -> np.ndarray:
    """(H, W) bool mask of a COCO RLE; runs alternate 0s and 1s over the column-major pixels."""
    h, w = rle["size"]
    runs = rle_counts(rle["counts"])
    if sum(runs) != h * w:
        raise ValueError(f"RLE covers {sum(runs)} pixels, size is {h}x{w}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(w, h).T


def rasterise(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of one annotation's `segmentation` (polygons or RLE)."""
    if isinstance(segmentation, dict):
        return rle_decode(segmentation)
    mask = np.zeros((height, width), dtype=bool)
    for poly in segmentation:
        xy = np.asarray(poly, dtype=float).reshape(-1, 2)
        rr, cc = fill_polygon(xy[:, 1], xy[:, 0], shape=(height, width))
        mask[rr, cc] = True
    return mask


@dataclass
class COCO:
    root: str
    name: str = "coco"
    class_names: list[str] = field(default_factory=list)  # filled from the annotation file
    palette: list[list[int]] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)

    def splits(self) -> dict[str, list[Item]]:
        out = {}
        for split, folder in SPLITS.items():
            images = need_dir(os.path.join(self.root, folder), f"{split} images")
            path = os.path.join(self.root, "annotations", f"instances_{folder}.json")
            try:
                with open(path) as f:
                    data = json.load(f)
            except FileNotFoundError as e:
                raise DatasetError(f"{path}: missing annotation file") from e
            except (OSError, json.JSONDecodeError) as e:
                raise DatasetError(f"{path}: cannot read: {e}") from e
            categories = sorted(data["categories"], key=lambda c: c["id"])
            ids = [c["id"] for c in categories]
            if self.category_ids and ids != self.category_ids:
                raise DatasetError(f"{path}: categories differ from the other split's")
            self.category_ids = ids
            self.class_names = ["background"] + [c["name"] for c in categories]
            self.palette = voc_colormap(len(self.class_names))
            by_image: dict[int, list] = {}
            for ann in data["annotations"]:
                by_image.setdefault(ann["image_id"], []).append(ann)
            items = []
            for img in data["images"]:
                anns = [
                    (a.get("area", 0.0), bool(a.get("iscrowd", 0)), a["category_id"],
                     a["segmentation"])
                    for a in by_image.get(img["id"], [])
                ]  # fmt: skip
                stem = os.path.splitext(img["file_name"])[0]
                extra = (img["height"], img["width"], anns)
                items.append(Item(stem, os.path.join(images, img["file_name"]), None, extra))
            out[split] = items
        return out

    def load(self, item: Item) -> Sample:
        data = read_file(item.image)
        height, width = image_size(data, item.image)
        ann_h, ann_w, anns = item.extra
        if (ann_h, ann_w) != (height, width):
            raise BadItem(
                f"{item.image} is {height}x{width} but its annotations say {ann_h}x{ann_w}"
            )
        lookup = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        mask = np.zeros((height, width), dtype=np.uint8)
        for _, crowd, cid, seg in sorted(anns, key=lambda a: -a[0]):
            if cid not in lookup:
                raise BadItem(f"{item.id}: category id {cid} is not in the annotation file's set")
            try:
                region = rasterise(seg, height, width)
            except (ValueError, TypeError, KeyError) as e:
                raise BadItem(f"{item.id}: bad segmentation: {e}") from e
            if region.shape != (height, width):
                raise BadItem(f"{item.id}: an RLE of {region.shape} on a {height}x{width} image")
            mask[region] = 255 if crowd else lookup[cid]
        return Sample(data, mask, height, width)
