"""A dataset of your own: a folder of images, a folder of masks and a list of class names.

    <images>/<any/sub/folders>/<stem>.{jpg,jpeg,png,webp}
    <masks>/<the same sub/folders>/<stem>.png    class ids: a palette PNG's indices (as VOC) or
                                                 a greyscale PNG's values; 255 = ignore
    classes.txt    one name per line, line 1 is class 0      (or YAML: a list, or {id: name})
    palette.txt    optional, R,G,B per line                  (or YAML: a list of [r, g, b])

Splits: `split_lists={"train": "train.txt", "val": "val.txt"}`, each file listing ids (the image
path relative to `<images>` without extension, `a/x` for `<images>/a/x.jpg`; one per line).
Without lists, `<images>/train/` and `<images>/val/` are the splits (masks in `<masks>/train/`
and `<masks>/val/`), and ids are relative to those folders. The palette defaults to the masks'
own palette when they are palette PNGs, else to the VOC colour map (distinct colours).

List lines never name a path outside their folder: absolute ids and `..` are refused with the
file and line. An image without its mask, a listed id without an image, and a mask with class ids
beyond the class list are bad items (skipped, listed, counted against --max-bad-fraction).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np
import yaml
from PIL import Image

from components.data.convert import BadItem, Item, Sample, image_size, read_file
from components.data.images import IMAGE_EXTENSIONS
from components.data.shards import DatasetError, decode_mask
from components.data.sources.common import need_dir, voc_colormap

IGNORE = 255
# A split name becomes a folder under --out: letters, digits, '_' and '-', nothing that walks.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


# ----------------------------------------------------------------------------------------------
# The small files: classes, palette, split lists


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: missing {what}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the {what}: {e}") from e


def _is_yaml(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def _load_yaml(text: str, path: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML: {e}") from e


def read_classes(path: str) -> list[str]:
    """Class names in id order from a text file (line k = class k - 1) or YAML (a list, or a
    mapping id -> name covering 0..N-1). Raises DatasetError naming the file (and line)."""
    text = _read_text(path, "classes file")
    names = (
        _yaml_classes(_load_yaml(text, path), path) if _is_yaml(path) else _text_classes(text, path)
    )
    if not names:
        raise DatasetError(f"{path}: no class names (write one per line; line 1 is class 0)")
    if len(names) > IGNORE:
        raise DatasetError(f"{path}: {len(names)} classes; at most 255 (id 255 means ignore)")
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise DatasetError(f"{path}: class '{name}' is listed twice (ids {first[name]}, {i})")
        first[name] = i
    return names


def _text_classes(text: str, path: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for k, line in enumerate(lines, 1):
        if not line:
            raise DatasetError(
                f"{path} line {k}: blank; each line is one class id (line 1 is class 0), so a "
                "blank line would shift every id after it"
            )
    return lines


def _yaml_classes(data, path: str) -> list[str]:
    if data is None:
        return []
    if isinstance(data, list):
        pairs = list(enumerate(data))
    elif isinstance(data, dict):
        pairs = []
        for key, name in data.items():
            if isinstance(key, bool) or not str(key).isdigit():
                raise DatasetError(f"{path}: key {key!r} is not a class id (0, 1, 2, ...)")
            pairs.append((int(key), name))
        ids = sorted(i for i, _ in pairs)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise DatasetError(f"{path}: class ids must be 0..{len(ids) - 1}; missing {missing}")
        pairs.sort()
    else:
        raise DatasetError(f"{path}: expected a list of class names or a mapping id: name")
    for i, name in pairs:
        if not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip():
            raise DatasetError(f"{path}: class {i}: {name!r} is not a name")
    return [str(name).strip() for _, name in pairs]


def read_palette(path: str, num_classes: int) -> list[list[int]]:
    """RGB colours of classes 0..N-1 from a text file (`R,G,B` or `R G B` per line) or YAML (a
    list of [r, g, b]); extra colours are ignored, too few is an error naming the file."""
    text = _read_text(path, "palette file")
    if _is_yaml(path):
        data = _load_yaml(text, path) or []
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of [r, g, b] colours")
        entries = [(f"entry {k}", v) for k, v in enumerate(data, 1)]
    else:
        entries = [
            (f"line {k}", re.split(r"[,\s]+", ln.strip()))
            for k, ln in enumerate(text.splitlines(), 1)
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
    colours = []
    for where, value in entries:
        try:
            rgb = [int(v) for v in value]
        except (TypeError, ValueError):
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise DatasetError(f"{path} {where}: expected R,G,B with values 0..255, got {value!r}")
        colours.append(rgb)
    if len(colours) < num_classes:
        raise DatasetError(f"{path}: {len(colours)} colours for {num_classes} classes")
    return colours[:num_classes]


def check_id(raw: str, where: str) -> str:
    """A list line as a row id: a relative path without extension that stays inside its folder.
    Raises DatasetError naming `where` (file and line) for absolute paths and `..`."""
    text = raw.strip()
    if "\0" in text:
        raise DatasetError(f"{where}: {text!r} holds a NUL character")
    if text.startswith(("/", "\\")) or os.path.isabs(text) or re.match(r"[A-Za-z]:[\\/]", text):
        raise DatasetError(
            f"{where}: '{text}' is an absolute path; write it relative to the folder"
        )
    if ".." in re.split(r"[\\/]", text):
        raise DatasetError(f"{where}: '{text}' climbs out of the folder with '..'")
    stem, ext = posixpath.splitext(posixpath.normpath(text))
    return stem if ext.lower() in IMAGE_EXTENSIONS else posixpath.normpath(text)


def read_ids(path: str) -> list[tuple[str, int]]:
    """(id, line number) for each non-blank, non-# line of a split list; see `check_id`."""
    text = _read_text(path, "split list")
    out = [
        (check_id(line, f"{path} line {k}"), k)
        for k, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not out:
        raise DatasetError(f"{path}: lists no ids (one image path per line, without extension)")
    return out


def parse_split_lists(spec: str) -> dict[str, str]:
    """`train=train.txt,val=val.txt` -> {"train": "train.txt", "val": "val.txt"}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not part:
            continue
        if not sep or not path:
            raise DatasetError(f"--splits: '{part}' is not NAME=FILE (e.g. train=train.txt)")
        if not SPLIT_NAME.fullmatch(name):
            raise DatasetError(f"--splits: split name '{name}': use letters, digits, '_' and '-'")
        if name in out:
            raise DatasetError(f"--splits: split '{name}' is given twice")
        out[name] = path
    if not out:
        raise DatasetError("--splits: no split given (e.g. train=train.txt,val=val.txt)")
    return out


# ----------------------------------------------------------------------------------------------
# Listing images


def index_images(folder: str) -> dict[str, list[str]]:
    """Relative stem ('a/x') -> image files with that stem, for every image below `folder`
    (hidden files and folders skipped)."""
    out: dict[str, list[str]] = {}
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = os.path.relpath(os.path.join(base, stem), folder).replace(os.sep, "/")
            out.setdefault(rel, []).append(os.path.join(base, name))
    return out


def _one(stem: str, paths: list[str]) -> str:
    if len(paths) > 1:
        raise DatasetError(f"{paths[0]} and {paths[1]}: two images for the id '{stem}'")
    return paths[0]


@dataclass
class FolderSource:
    """Your own images + masks folders as a `convert.Source` (see the module docstring);
    `prepare_data.py folder` builds it from its flags."""

    images: str
    masks: str
    classes: str
    palette_file: str | None = None
    split_lists: dict[str, str] | None = None
    name: str = "folder"
    class_names: list[str] = field(default_factory=list)  # filled by splits()
    palette: list[list[int]] = field(default_factory=list)

    def identity(self) -> dict:
        """What makes two conversions the same one (see convert.conversion_identity): the
        folders and split lists that choose the rows. The classes and palette files only name
        and colour them, so a corrected classes file resumes the same conversion."""
        lists = self.split_lists or {}
        return {
            "images": os.path.abspath(self.images),
            "masks": os.path.abspath(self.masks),
            "splits": {k: os.path.abspath(v) for k, v in lists.items()},
        }

    def splits(self) -> dict[str, list[Item]]:
        need_dir(self.images, "images")
        need_dir(self.masks, "masks")
        self.class_names = read_classes(self.classes)
        out = self._listed() if self.split_lists else self._train_val()
        if self.palette_file:
            self.palette = read_palette(self.palette_file, len(self.class_names))
        else:
            self.palette = self._mask_palette(out)
        return out

    def _train_val(self) -> dict[str, list[Item]]:
        folders = {s: os.path.join(self.images, s) for s in ("train", "val")}
        if not all(os.path.isdir(f) for f in folders.values()):
            raise DatasetError(
                f"{self.images}: no train/ and val/ subfolders, so the splits are unknown; list "
                "them with --splits train=train.txt,val=val.txt (one image path per line, "
                f"relative to {self.images}, without extension)"
            )
        out = {}
        for split, folder in folders.items():
            found = index_images(folder)
            if not found:
                raise DatasetError(f"{folder}: no {'/'.join(IMAGE_EXTENSIONS)} images")
            masks = os.path.join(self.masks, split)
            out[split] = [
                Item(stem, _one(stem, paths), os.path.join(masks, *stem.split("/")) + ".png")
                for stem, paths in sorted(found.items())
            ]
        return out

    def _listed(self) -> dict[str, list[Item]]:
        found = index_images(self.images)
        out = {}
        for split, path in (self.split_lists or {}).items():
            if not SPLIT_NAME.fullmatch(split):
                raise DatasetError(f"split name '{split}': use letters, digits, '_' and '-'")
            items, seen = [], set()
            for stem, line in read_ids(path):
                if stem in seen:  # a repeated line is one item
                    continue
                seen.add(stem)
                mask = os.path.join(self.masks, *stem.split("/")) + ".png"
                if stem in found:
                    items.append(Item(stem, _one(stem, found[stem]), mask))
                else:  # a bad item, named when loaded: the other items still convert
                    image = os.path.join(self.images, *stem.split("/"))
                    items.append(Item(stem, image, mask, extra=(path, line)))
            out[split] = items
        return out

    def _mask_palette(self, splits: dict[str, list[Item]]) -> list[list[int]]:
        """The first readable mask's own palette when it is a palette PNG, else the VOC colours."""
        n = len(self.class_names)
        default = voc_colormap(n)
        for item in (it for items in splits.values() for it in items):
            try:
                with Image.open(item.label) as img:
                    mode, flat = img.mode, img.getpalette() or []
            except (OSError, ValueError):
                continue
            if mode != "P":
                return default
            own = [flat[3 * i : 3 * i + 3] for i in range(len(flat) // 3)]
            return [own[i] if i < len(own) else default[i] for i in range(n)]
        return default

    def load(self, item: Item) -> Sample:
        if item.extra is not None:
            path, line = item.extra
            raise BadItem(
                f"{path} line {line}: no image {item.image}{{{','.join(IMAGE_EXTENSIONS)}}}"
            )
        data = read_file(item.image)
        height, width = image_size(data, item.image)
        if not os.path.isfile(item.label):
            raise BadItem(f"no mask for image {item.image} (expected {item.label})")
        try:
            mask = decode_mask(read_file(item.label))
        except ValueError as e:
            hint = ""
            if "mode RGB" in str(e):
                hint = "; colour masks are not read: save class ids as a palette or grey PNG"
            raise BadItem(f"unreadable mask {item.label}: {e}{hint}") from e
        if mask.shape != (height, width):
            raise BadItem(
                f"mask {item.label} is {mask.shape[0]}x{mask.shape[1]} but its image is "
                f"{height}x{width}"
            )
        n = len(self.class_names)
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
        beyond = [int(c) for c in present if n <= c < IGNORE]
        if beyond:
            raise BadItem(
                f"mask {item.label} has class ids {beyond} but {self.classes} lists {n} classes "
                f"(ids 0..{n - 1}; 255 = ignore)"
            )
        return Sample(data, mask, height, width)


__all__ = [
    "FolderSource",
    "check_id",
    "index_images",
    "parse_split_lists",
    "read_classes",
    "read_ids",
    "read_palette",
]
