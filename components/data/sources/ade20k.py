"""ADE20K as in the SceneParsing challenge (ADEChallengeData2016):

    <root>/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
    <root>/annotations/{training,validation}/ADE_{train,val}_NNNNNNNN.png

150 classes: annotation 0 ("other") becomes 255 and k becomes k - 1 (the usual
`reduce_zero_label`). The challenge publishes no colours; the palette is the VOC colour map of
ids 1..150, for display only. `training` -> train, `validation` -> val.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from components.data.convert import Item, Sample
from components.data.shards import DatasetError
from components.data.sources.common import load_pair, need_dir, voc_colormap

# objectInfo150 names (first name of each entry), in annotation-id order 1..150.
CLASS_NAMES = (  # noqa: SIM905  (150 names: a list literal would take 150 lines)
    "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person "
    "earth door table mountain plant curtain chair car water painting sofa shelf house sea "
    "mirror rug field armchair seat fence desk rock wardrobe lamp bathtub railing cushion base "
    "box column signboard chest_of_drawers counter sand sink skyscraper fireplace refrigerator "
    "grandstand path stairs runway case pool_table pillow screen_door stairway river bridge "
    "bookcase blind coffee_table toilet flower book hill bench countertop stove palm "
    "kitchen_island computer swivel_chair boat bar arcade_machine hovel bus towel light truck "
    "tower chandelier awning streetlight booth television_receiver airplane dirt_track apparel "
    "pole land bannister escalator ottoman bottle buffet poster stage van ship fountain "
    "conveyer_belt canopy washer plaything swimming_pool stool barrel basket waterfall tent bag "
    "minibike cradle oven ball food step tank trade_name microwave pot animal bicycle lake "
    "dishwasher screen blanket sculpture hood sconce vase traffic_light tray ashcan fan pier "
    "crt_screen plate monitor bulletin_board shower radiator glass clock flag"
).split()
SPLITS = {"train": "training", "val": "validation"}


def reduce_zero_lut() -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    lut[1:151] = np.arange(150, dtype=np.uint8)
    return lut


REDUCE_ZERO = reduce_zero_lut()
ALLOWED = set(range(151))  # 0 "other" and the 150 classes


@dataclass
class ADE20K:
    root: str
    name: str = "ade20k"
    class_names: list[str] = field(
        default_factory=lambda: [n.replace("_", " ") for n in CLASS_NAMES]
    )
    palette: list[list[int]] = field(default_factory=lambda: voc_colormap(151)[1:])

    def splits(self) -> dict[str, list[Item]]:
        out = {}
        for split, folder in SPLITS.items():
            images = need_dir(os.path.join(self.root, "images", folder), f"{split} images")
            labels = need_dir(os.path.join(self.root, "annotations", folder), f"{split} labels")
            items = []
            for path in sorted(glob.glob(os.path.join(images, "*.jpg"))):
                stem = os.path.splitext(os.path.basename(path))[0]
                items.append(Item(stem, path, os.path.join(labels, f"{stem}.png")))
            if not items:
                raise DatasetError(f"{images}: no *.jpg files")
            out[split] = items
        return out

    def load(self, item: Item) -> Sample:
        return load_pair(item, REDUCE_ZERO, ALLOWED)
