"""Cityscapes (fine annotations) as distributed:

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Masks are the official labelIds mapped to the 19 trainIds (cityscapesScripts' labels.py);
every other id becomes 255. The test split's public masks are placeholders, so `test` is written
without masks. Row ids are `<city>/<city>_<seq>_<frame>`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from components.data.convert import Item, Sample
from components.data.shards import DatasetError
from components.data.sources.common import load_pair, need_dir

# (name, labelId, colour) of the 19 training classes, in trainId order.
TRAIN_CLASSES = [
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
]
LABEL_IDS = set(range(34))  # 0 unlabeled .. 33 bicycle; license plate (-1) is never in a PNG


def label_to_train_lut() -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for train_id, (_, label_id, _) in enumerate(TRAIN_CLASSES):
        lut[label_id] = train_id
    return lut


LABEL_TO_TRAIN = label_to_train_lut()


@dataclass
class Cityscapes:
    root: str
    include_splits: tuple[str, ...] = ("train", "val")
    name: str = "cityscapes"
    class_names: list[str] = field(default_factory=lambda: [c[0] for c in TRAIN_CLASSES])
    palette: list[list[int]] = field(default_factory=lambda: [list(c[2]) for c in TRAIN_CLASSES])

    def splits(self) -> dict[str, list[Item]]:
        out = {}
        for split in self.include_splits:
            images = need_dir(os.path.join(self.root, "leftImg8bit", split), f"{split} images")
            labels = None
            if split != "test":
                labels = need_dir(os.path.join(self.root, "gtFine", split), f"{split} labels")
            items = []
            for path in sorted(glob.glob(os.path.join(images, "*", "*_leftImg8bit.png"))):
                city = os.path.basename(os.path.dirname(path))
                stem = os.path.basename(path)[: -len("_leftImg8bit.png")]
                label = None
                if labels is not None:
                    label = os.path.join(labels, city, f"{stem}_gtFine_labelIds.png")
                items.append(Item(f"{city}/{stem}", path, label))
            if not items:
                raise DatasetError(f"{images}: no <city>/*_leftImg8bit.png files")
            out[split] = items
        return out

    def load(self, item: Item) -> Sample:
        return load_pair(item, LABEL_TO_TRAIN, LABEL_IDS)
