"""Offline batch prediction: a checkpoint and images -> label maps, overlays, Cityscapes files.

    inputs = list_images("photos/")                   # or list_shard_rows(data, "val")
    plan = Plan(out, palette, ignore_index, formats=("cityscapes",))
    todo, skipped = plan.pending(inputs.items)        # resumable: finished images are skipped
    pool = plan_pool(ray.cluster_resources(), actors=None, cpus=None)
    for row in predict_rows(inputs, todo, plan, checkpoint, mode, pool):   # one row per image
        ...                                           # row: stem, source, error ("" = written)

The Ray Data plan (`build_dataset`):

    read_binary_files / read_parquet      tasks: encoded bytes
      → repartition                       blocks of 8 rows, so that every actor gets work
      → map_batches(decode_batch)         tasks: PNG/JPEG/WebP → (H, W, 3) uint8, or an error
      → map_batches(Predictor)            an actor pool holding the model (a GPU each on GPU
                                          clusters): normalise, `infer_logits`, argmax → (H, W)
      → map_batches(write_batch)          tasks: the PNGs, written atomically under the output
      → the driver                        one small row per image (counts, progress, bad list)

Outputs, for an image whose relative path (or shard row id) is `a/b/x.jpg`:

    <out>/labels/a/b/x.png        palette PNG of class ids (the dataset's palette, else VOC colours)
    <out>/overlays/a/b/x.png      the image blended with the colour map (alpha 0.5)
    <out>/cityscapes/a/b/x_leftImg8bit.png   (format "cityscapes") labelIds for the test server

Output names come from input paths and row ids, so they are cleaned first (`safe_stem`): no `..`
step, no absolute path, no empty part; every output path is checked to be under `<out>` before it
is written. The pieces the actor and the tasks run (`decode_batch`, `Predictor`, `write_batch`)
are plain functions and classes, so a loop in one process can run exactly the same code
(benchmarks/predict_vs_loop.py, the tests).
"""

from __future__ import annotations

import io
import math
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from components.data.images import IMAGE_EXTENSIONS
from components.data.shards import (
    DatasetError,
    decode_image,
    list_shards,
    read_shard_table,
    resolve_fs,
    write_atomic,
)
from components.data.sources.cityscapes import LABEL_TO_TRAIN, TRAIN_CLASSES
from components.data.sources.common import voc_colormap

LABELS, OVERLAYS, CITYSCAPES = "labels", "overlays", "cityscapes"
FORMATS = (CITYSCAPES,)
OVERLAY_ALPHA = 0.5
CITYSCAPES_SUFFIX = "_leftImg8bit"
BAD_LIST = "bad_images.txt"


class PredictError(ValueError):
    """Bad input to a prediction run (the message names the path or the numbers)."""


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Item:
    """One input image. `key` matches its rows in Ray Data (the file's path in its filesystem,
    or the shard row id); `source` names it in messages; `stem` is its output path below each
    output folder, without extension (see `assign_stems`)."""

    key: str
    source: str
    stem: str


@dataclass
class Inputs:
    """What to read: image files (`paths` in `fs`) or the rows of a shard split."""

    kind: str  # "files" | "shards"
    items: list[Item]
    fs: pafs.FileSystem | None = None
    shards: list[str] = field(default_factory=list)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(source: str, exclude: str | None = None) -> Inputs:
    """An image file, or every image below a folder (recursively; .jpg/.jpeg/.png/.webp in any
    case), local or a URI pyarrow opens. Files under `exclude` (the output folder, when it lies
    inside the input) are left out. Raises PredictError naming `source` when nothing is found."""
    try:
        fs, root = resolve_fs(source)
    except DatasetError as e:
        raise PredictError(str(e)) from e
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise PredictError(f"{source}: no such file or folder")
    if info.type == pafs.FileType.File:
        if not _is_image(root):
            raise PredictError(f"{source}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        rels, paths = [posixpath.basename(root)], [root]
    else:
        skip = None
        if exclude is not None:
            out_fs, out_root = resolve_fs(exclude)
            if type(out_fs) is type(fs):
                skip = out_root.rstrip("/") + "/"
        found = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File
            and _is_image(i.base_name)
            and not (skip and i.path.startswith(skip))
        )
        base = root.rstrip("/") + "/"
        rels, paths = [p.removeprefix(base) for p in found], found
    if not paths:
        raise PredictError(
            f"{source}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    display = source if "://" in source else None
    items = [
        Item(path, _display(display, root, path), stem)
        for path, stem in zip(paths, assign_stems(rels, strip_extension=True))
    ]
    return Inputs("files", items, fs=fs)


def _display(uri: str | None, root: str, path: str) -> str:
    """A file as the user spelled its input: a URI stays a URI."""
    if uri is None:
        return path
    return uri.rstrip("/") + path[len(root.rstrip("/")) :] if path != root else uri


def list_shard_rows(data: str, split: str) -> Inputs:
    """Every row of a shard split (`dataset.json` + `<split>/part-*.parquet`); ids are read on
    the driver (the `id` column only), the images by Ray Data tasks."""
    try:
        shards = list_shards(data, split)
        ids = [
            str(i)
            for shard in shards
            for i in read_shard_table(data, split, shard, ["id"]).column("id").to_pylist()
        ]
    except DatasetError as e:
        raise PredictError(str(e)) from e
    if not ids:
        raise PredictError(f"{data} [{split}]: no images found (the split has no rows)")
    where = f"{data.rstrip('/')}/{split}"
    items = [Item(i, f"{where}: {i}", stem) for i, stem in zip(ids, assign_stems(ids, False))]
    return Inputs("shards", items, shards=shards)


def safe_stem(name: str) -> str:
    """A relative path or row id as a path that stays inside the folder it is joined to:
    `\\` counts as `/`, empty and `.` parts are dropped (so `/abs/x` becomes `abs/x`), a `..`
    part becomes `__`, control characters become `_`; nothing left gives `_`."""
    parts = []
    for part in re.split(r"[\\/]+", name):
        if part in ("", "."):
            continue
        part = "__" if part == ".." else re.sub(r"[\x00-\x1f]", "_", part)
        parts.append(part)
    return "/".join(parts) or "_"


def assign_stems(names: list[str], strip_extension: bool) -> list[str]:
    """Output stems for `names` (relative paths or ids), one each, all different: `safe_stem`,
    without the file extension when `strip_extension`. Two names with the same stem (`x.jpg`
    and `x.png`, or `../x` and `__/x`) keep their extension (`x.jpg`, `x.png`) and then, if
    still equal, get `~2`, `~3`, ... in input order."""
    clean = [safe_stem(n) for n in names]
    stems = [posixpath.splitext(c)[0] or c if strip_extension else c for c in clean]
    counts = Counter(stems)
    stems = [c if counts[s] > 1 else s for s, c in zip(stems, clean)]
    out: list[str] = []
    taken: set[str] = set()
    for s in stems:
        name, k = s, 1
        while name in taken:
            k += 1
            name = f"{s}~{k}"
        taken.add(name)
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------
# Outputs


def default_palette(num_classes: int) -> list[list[int]]:
    """The colours when no dataset.json is given: the VOC colour map, a function of the class
    count only (as `sources/folder.py` and COCO/ADE20K do when a dataset publishes none)."""
    return voc_colormap(num_classes)


def cityscapes_name(stem: str) -> str:
    """`<city>/<city>_<seq>_<frame>[_leftImg8bit]` -> `<city>/<city>_<seq>_<frame>_leftImg8bit`
    (the test server matches `<city>_<seq>_<frame>*.png`; cityscapesScripts' own results use
    the image's name)."""
    return stem if stem.endswith(CITYSCAPES_SUFFIX) else stem + CITYSCAPES_SUFFIX


def _train_to_label_lut() -> np.ndarray:
    """trainId -> labelId for the 19 training classes (cityscapesScripts helpers/labels.py: the
    `id` of each label whose `trainId` is 0..18); anything else -> 0 (`unlabeled`)."""
    lut = np.zeros(256, np.uint8)
    for train_id, (_, label_id, _) in enumerate(TRAIN_CLASSES):
        lut[train_id] = label_id
    return lut


TRAIN_TO_LABEL = _train_to_label_lut()
CITYSCAPES_CLASSES = len(TRAIN_CLASSES)


def train_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes trainIds -> labelIds (uint8), the ids the evaluation server reads."""
    return TRAIN_TO_LABEL[np.asarray(train_ids).astype(np.uint8)]


def label_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """(H, W) labelIds -> trainIds (uint8, 255 for the ignored labels), as the converter maps
    ground truth (`sources/cityscapes.LABEL_TO_TRAIN`)."""
    return LABEL_TO_TRAIN[np.asarray(label_ids).astype(np.uint8)]


def label_png(labels: np.ndarray, palette: list[list[int]]) -> bytes:
    """(H, W) class ids -> palette PNG: pixel values are the ids (`decode_mask` reads them back),
    viewers show the palette's colours."""
    img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    img.putpalette(table.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overlay(
    image: np.ndarray, labels: np.ndarray, palette: list[list[int]], ignore_index: int = 255
) -> np.ndarray:
    """(H, W, 3) uint8: the image blended with the colour map, `OVERLAY_ALPHA` each."""
    from components.training.runlog import colour

    mixed = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colour(
        labels, palette, ignore_index
    ).astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Plan:
    """Where and how the outputs of one run are written (picklable: it travels to the tasks)."""

    out: str
    palette: list[list[int]]
    ignore_index: int = 255
    formats: tuple[str, ...] = ()

    @cached_property
    def fs_root(self) -> tuple[pafs.FileSystem, str]:
        return resolve_fs(self.out)

    def kinds(self) -> tuple[str, ...]:
        return (LABELS, OVERLAYS, *(f for f in FORMATS if f in self.formats))

    def paths(self, stem: str) -> dict[str, str]:
        """Output kind -> path in the output filesystem; raises PredictError for a path that
        would not be below the output folder (never for a stem from `assign_stems`)."""
        root = self.fs_root[1].rstrip("/")
        out = {}
        for kind in self.kinds():
            name = cityscapes_name(stem) if kind == CITYSCAPES else stem
            path = posixpath.normpath(f"{root}/{kind}/{name}.png")
            if not path.startswith(f"{root}/{kind}/"):
                raise PredictError(f"output for '{stem}' would be outside {self.out}: {path}")
            out[kind] = path
        return out

    def pending(self, items: list[Item]) -> tuple[list[Item], int]:
        """(items with an output missing, how many have every output already)."""
        fs, root = self.fs_root
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        existing = {i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}
        todo = [it for it in items if not set(self.paths(it.stem).values()) <= existing]
        return todo, len(items) - len(todo)


# ----------------------------------------------------------------------------------------------
# The three stages (Ray Data runs them; a plain loop can too)


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of `values` (arrays of different shapes stay separate elements)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def decode_batch(batch: dict, keys: dict[str, tuple[str, str]], key_column: str) -> dict:
    """Encoded rows -> `stem`, `source`, `image` ((H, W, 3) uint8; (0, 0, 3) when bad),
    `error` ("" when decoded). `keys` maps a row's key (`key_column`: the file path or the row
    id) to its (stem, source); rows not in it (already done) are dropped."""
    stems, sources, images, errors = [], [], [], []
    for key, data in zip(batch[key_column], batch["bytes" if "bytes" in batch else "image"]):
        key = str(key)
        if key not in keys:
            continue
        stem, source = keys[key]
        try:
            image, error = decode_image(bytes(data)), ""
        except ValueError as e:
            image, error = np.zeros((0, 0, 3), np.uint8), str(e)
        stems.append(stem)
        sources.append(source)
        images.append(image)
        errors.append(error)
    return {
        "stem": np.array(stems, dtype=object),
        "source": np.array(sources, dtype=object),
        "image": _objects(images),
        "error": np.array(errors, dtype=object),
    }


class Predictor:
    """The model, loaded once per actor (`load_checkpoint_model`), on the actor's GPU when it
    has one. A call predicts each decoded image of a batch at its own full resolution: images
    of the same size go through `infer_logits` together, normalised as in training
    (`augment.normalize`); the argmax is the label map, `labels` ((H, W) uint8)."""

    def __init__(self, checkpoint: str, mode=None, threads: int | None = None, device=None):
        import torch

        from components.models.checkpointed import load_checkpoint_model

        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.meta = load_checkpoint_model(checkpoint, self.device)
        self.mode = mode

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W) uint8 class ids for each (H, W, 3) uint8 image."""
        import torch

        from components.data.augment import normalize
        from components.inference import infer_logits

        out: list = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for indices in groups.values():
            x = torch.from_numpy(normalize(np.stack([images[i] for i in indices])))
            logits = infer_logits(self.model, x.to(self.device), self.mode)
            labels = logits.argmax(1).to(torch.uint8).cpu().numpy()
            for i, lab in zip(indices, labels):
                out[i] = lab
        return out

    def __call__(self, batch: dict) -> dict:
        images = list(batch["image"])
        errors = [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        labels = [np.zeros((0, 0), np.uint8)] * len(images)
        try:
            for i, lab in zip(ok, self.predict([images[i] for i in ok])):
                labels[i] = lab
        except Exception:  # noqa: BLE001  one image at a time, to name the one that fails
            for i in ok:
                try:
                    labels[i] = self.predict([images[i]])[0]
                except Exception as e:  # noqa: BLE001  (an image too large for memory, ...)
                    errors[i] = f"inference failed: {type(e).__name__}: {e}"
        return {
            "stem": batch["stem"],
            "source": batch["source"],
            "image": _objects(images),
            "labels": _objects(labels),
            "error": np.array(errors, dtype=object),
        }


def write_outputs(plan: Plan, stem: str, image: np.ndarray, labels: np.ndarray) -> None:
    """The outputs of one image, each written under a temporary name and moved into place (a
    half-written PNG is never taken for a finished one by the next run's skip check)."""
    fs, paths = plan.fs_root[0], plan.paths(stem)
    data = {LABELS: label_png(labels, plan.palette)}
    data[OVERLAYS] = _png(overlay(image, labels, plan.palette, plan.ignore_index))
    if CITYSCAPES in paths:
        data[CITYSCAPES] = _png(train_to_label_ids(labels), mode="L")
    for kind, path in paths.items():
        fs.create_dir(posixpath.dirname(path), recursive=True)
        write_atomic(fs, path, data[kind])


def write_batch(batch: dict, plan: Plan) -> dict:
    """Write each predicted image's outputs; one small row per image back to the driver:
    `stem`, `source`, `error` ("" when written), `height`, `width`."""
    errors, heights, widths = [], [], []
    for stem, image, labels, error in zip(
        batch["stem"], batch["image"], batch["labels"], batch["error"]
    ):
        error = str(error)
        if not error:
            try:
                write_outputs(plan, str(stem), image, labels)
            except OSError as e:
                error = f"cannot write outputs: {e}"
        errors.append(error)
        heights.append(int(image.shape[0]))
        widths.append(int(image.shape[1]))
    return {
        "stem": np.array([str(s) for s in batch["stem"]], dtype=object),
        "source": np.array([str(s) for s in batch["source"]], dtype=object),
        "error": np.array(errors, dtype=object),
        "height": np.array(heights, dtype=np.int64),
        "width": np.array(widths, dtype=np.int64),
    }


# ----------------------------------------------------------------------------------------------
# Ray Data


@dataclass(frozen=True)
class Pool:
    """The model's actor pool: `actors` actors of `cpus` CPUs (and one GPU each when `gpu`);
    `batch_size` images per actor call."""

    actors: int = 1
    cpus: float = 1.0
    gpu: bool = False
    batch_size: int = 4

    def describe(self) -> str:
        each = f"1 GPU + {self.cpus:g} CPU" if self.gpu else f"{self.cpus:g} CPU"
        return f"{self.actors} actor{'s' if self.actors != 1 else ''} x {each}"


def plan_pool(
    resources: dict,
    actors: int | None,
    cpus: float | None,
    batch_size: int = 4,
    images: int | None = None,
) -> Pool:
    """The pool for a cluster's `ray.cluster_resources()`: one actor per GPU on GPU clusters;
    on CPU clusters single-CPU actors on all CPUs but one (left to the decode and write tasks);
    by default no more actors than blocks of `images` (DECODE_BATCH each), which is all the
    work there is for them. Raises PredictError when the asked-for pool cannot fit."""
    gpus, total = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    cpus = 1.0 if cpus is None else float(cpus)
    if cpus <= 0 or batch_size < 1:
        raise PredictError(f"--cpus-per-actor ({cpus:g}) and --batch-size must be positive")
    if gpus:
        n = gpus if actors is None else actors
        if n > gpus:
            raise PredictError(f"--actors {n} asks for {n} GPUs; the cluster has {gpus}")
    else:
        n = max(1, int((total - 1) // cpus)) if actors is None else actors
    if actors is None and images is not None:
        n = min(n, max(1, math.ceil(images / DECODE_BATCH)))
    if n < 1:
        raise PredictError(f"--actors must be >= 1, got {n}")
    if n * cpus + 1 > total:
        raise PredictError(
            f"{n} actor(s) x {cpus:g} CPU and 1 CPU for the decode and write tasks need "
            f"{n * cpus + 1:g} CPUs; the cluster has {total:g}"
        )
    return Pool(n, cpus, bool(gpus), batch_size)


# Decode and write tasks: one CPU each. `max_calls=0` is Ray's default for CPU tasks (a worker
# process runs any number of them); spelled out, it makes the tasks' remote arguments differ from
# the actors', which keeps Ray Data from fusing the decoding into the model actors
# (operator_fusion.are_remote_args_compatible): images are decoded by tasks, alongside the model,
# not by the actor between its forward passes. tests/pipelines/test_predict.py checks the plan.
TASK_ARGS = {"num_cpus": 1, "max_calls": 0}
DECODE_BATCH = 8
WRITE_BATCH = 8


def build_dataset(inputs: Inputs, todo: list[Item], plan: Plan, checkpoint: str, mode, pool: Pool):
    """The Ray Data plan of the module docstring for the `todo` items (not executed yet)."""
    import ray.data

    keys = {it.key: (it.stem, it.source) for it in todo}
    if inputs.kind == "files":
        ds = ray.data.read_binary_files(
            [it.key for it in todo], include_paths=True, filesystem=inputs.fs
        )
        key_column = "path"
    else:
        ds = ray.data.read_parquet(inputs.shards).select_columns(["id", "image"])
        key_column = "id"
    # Blocks of DECODE_BATCH encoded rows: a shard (or a read task's files) would otherwise be
    # one block, decoded by one task and predicted by one actor while the others wait.
    ds = ds.repartition(target_num_rows_per_block=DECODE_BATCH)
    ds = ds.map_batches(
        decode_batch,
        batch_size=DECODE_BATCH,
        batch_format="numpy",
        fn_kwargs={"keys": keys, "key_column": key_column},
        **TASK_ARGS,
    )
    ds = ds.map_batches(
        Predictor,
        batch_size=pool.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"checkpoint": checkpoint, "mode": mode, "threads": pool.cpus},
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus,
        num_gpus=1 if pool.gpu else None,
    )
    return ds.map_batches(
        write_batch,
        batch_size=WRITE_BATCH,
        batch_format="numpy",
        fn_kwargs={"plan": plan},
        **TASK_ARGS,
    )


def predict_rows(
    inputs: Inputs, todo: list[Item], plan: Plan, checkpoint: str, mode, pool: Pool
) -> Iterator[dict]:
    """Run the plan; one dict per image (`write_batch`'s columns), as they finish."""
    if not todo:
        return
    ds = build_dataset(inputs, todo, plan, checkpoint, mode, pool)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["stem"])):
            yield {k: batch[k][i] for k in batch}


def write_bad_list(plan: Plan, bad: list[tuple[str, str]]) -> str | None:
    """`<out>/bad_images.txt` (source<TAB>reason per line) when there are bad images; a stale
    one from an earlier run is removed when there are none. Returns its path or None."""
    fs, root = resolve_fs(plan.out)
    path = f"{root.rstrip('/')}/{BAD_LIST}"
    if not bad:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
        return None
    text = "".join(f"{s}\t{' '.join(r.split())}\n" for s, r in bad)
    write_atomic(fs, path, text.encode("utf-8"))
    return path if "://" not in plan.out else f"{plan.out.rstrip('/')}/{BAD_LIST}"


__all__ = [
    "CITYSCAPES",
    "CITYSCAPES_CLASSES",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "Inputs",
    "Item",
    "Plan",
    "Pool",
    "PredictError",
    "Predictor",
    "assign_stems",
    "build_dataset",
    "cityscapes_name",
    "decode_batch",
    "default_palette",
    "label_png",
    "label_to_train_ids",
    "list_images",
    "list_shard_rows",
    "overlay",
    "plan_pool",
    "predict_rows",
    "safe_stem",
    "train_to_label_ids",
    "write_bad_list",
    "write_batch",
    "write_outputs",
]
