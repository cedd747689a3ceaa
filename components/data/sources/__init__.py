"""Real datasets as distributed, as `convert.Source`s: Cityscapes, Pascal VOC (+SBD), ADE20K,
COCO. Each lists its items in the official on-disk layout and loads one item with its checks.
`FolderSource` reads your own images + masks folders (its own arguments, so not in SOURCES)."""

from __future__ import annotations

from components.data.sources.ade20k import ADE20K
from components.data.sources.cityscapes import Cityscapes
from components.data.sources.coco import COCO
from components.data.sources.folder import FolderSource
from components.data.sources.voc import VOC

SOURCES = {"cityscapes": Cityscapes, "voc": VOC, "ade20k": ADE20K, "coco": COCO}

__all__ = ["ADE20K", "COCO", "SOURCES", "VOC", "Cityscapes", "FolderSource"]
