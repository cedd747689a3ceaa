"""Pascal VOC 2012 segmentation, plus the SBD-augmented training set when it is present:

    <root>/VOCdevkit/VOC2012/   (or <root> itself)
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          palette PNGs: index = class id, 255 = object border
        ImageSets/Segmentation/{train,val}.txt
        SegmentationClassAug/<id>.png       optional (SBD + VOC, single-channel ids)
        ImageSets/Segmentation/train_aug.txt   optional; also looked for in VOC2012/ and <root>/

Splits: `train` (1464), `val` (1449) and, with the augmented set, `train_aug` (10582), whose
labels come from SegmentationClassAug. 21 classes; the border value 255 is kept as ignore.
List lines are ids (`2007_000032`) or the augmented lists' path pairs
(`/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from components.data.convert import Item, Sample
from components.data.shards import DatasetError
from components.data.sources.common import load_pair, need_dir, voc_colormap

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
ALLOWED = set(range(21)) | {255}


def find_voc2012(root: str) -> str:
    for candidate in (os.path.join(root, "VOCdevkit", "VOC2012"), root):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise DatasetError(f"{root}: no VOCdevkit/VOC2012/JPEGImages (is this the VOC folder?)")


def read_list(path: str) -> list[str]:
    """Ids from a VOC list file (id lines or 'image label' path pairs)."""
    try:
        with open(path) as f:
            lines = [ln.split() for ln in f if ln.strip()]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the list: {e}") from e
    return [os.path.splitext(os.path.basename(parts[0]))[0] for parts in lines]


@dataclass
class VOC:
    root: str
    name: str = "voc"
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    palette: list[list[int]] = field(default_factory=lambda: voc_colormap(21))

    def splits(self) -> dict[str, list[Item]]:
        base = find_voc2012(self.root)
        lists = need_dir(os.path.join(base, "ImageSets", "Segmentation"), "split lists")
        labels = need_dir(os.path.join(base, "SegmentationClass"), "labels")
        out = {}
        for split in ("train", "val"):
            path = os.path.join(lists, f"{split}.txt")
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: missing split list")
            out[split] = self._items(base, read_list(path), labels)
        aug = os.path.join(base, "SegmentationClassAug")
        if os.path.isdir(aug):
            for folder in (lists, base, self.root):
                path = os.path.join(folder, "train_aug.txt")
                if os.path.isfile(path):
                    out["train_aug"] = self._items(base, read_list(path), aug)
                    break
        return out

    @staticmethod
    def _items(base: str, ids: list[str], labels: str) -> list[Item]:
        return [
            Item(i, os.path.join(base, "JPEGImages", f"{i}.jpg"), os.path.join(labels, f"{i}.png"))
            for i in dict.fromkeys(ids)  # a repeated line is one item
        ]

    def load(self, item: Item) -> Sample:
        return load_pair(item, None, ALLOWED)
