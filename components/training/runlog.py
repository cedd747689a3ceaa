"""A run's own record in its run folder, written by rank 0 (no Ray here).

    log = RunLog("outputs/distill-sstkd-...", resume_iteration=0)
    log.step(iteration, {"loss": 0.9, "ce": 0.7}, lr=0.02, data_wait_s=0.01)
    log.evaluation(iteration, {"miou": 0.31, ...}, {"background": 0.7, ...}, panels)
    log.row(metrics)         # one line of metrics.jsonl per reported epoch
    log.line("epoch 1/7: val mIoU 31.20 ...")   # console.log (and stdout)

- `tensorboard/`: TensorBoard event files (tensorboardX's writer): per step `train/<term>`,
  `train/lr`, `train/data_wait_s`; per evaluation `val/miou`, `val/pixel_acc`,
  `val/iou/<class>`, `val/images_per_s`, and image panels `val_images/<id>` (image | ground
  truth | student | teacher ...). `tensorboard --logdir outputs/` shows every run.
- `metrics.jsonl`: every reported row, appended across resumes.
- `console.log`: rank 0's lines, appended across resumes.

A resumed run continues the same curves: the writer purges events past the resumed iteration
and `metrics.jsonl` drops rows past it, so a step written after the last checkpoint by a run that
then died is not there twice. On URI storage (s3://, gs://) the files are written in a local
staging folder and copied to the run folder after every epoch (`sync`).

`quiet_train_console()` keeps Ray Train's own INFO dumps off a worker's console (not --verbose).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.data.shards import resolve_fs
from components.training.storage import is_uri

LOG_FILES = ("metrics.jsonl", "steps.jsonl", "console.log")


def safe_file_name(name: str) -> str:
    """A row id as one file name: characters outside [A-Za-z0-9._-] become "_", and a leading
    dot too, so no id (`../x`, `a/b`, `.hidden`) reaches outside its folder."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120] or "_"
    return "_" + cleaned[1:] if cleaned.startswith(".") else cleaned


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A normalised (3,H,W) float image (data/augment.normalize) -> (H,W,3) uint8 RGB."""
    from components.data.augment import IMAGENET_MEAN, IMAGENET_STD

    rgb = image.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def colour(labels: np.ndarray, palette: list[list[int]], ignore_index: int = 255) -> np.ndarray:
    """(H,W) class ids -> (H,W,3) uint8 in the dataset's palette; ignore is black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    table[ignore_index] = 0
    return table[np.clip(labels, 0, 255).astype(np.uint8)]


def panel(image: np.ndarray, maps: list[np.ndarray], palette, ignore_index: int = 255):
    """One row for TensorBoard: the RGB image (H,W,3) uint8 and each label map (H,W) in the
    palette, side by side with a 2 px white gap: (H, (1+n)W + 2n, 3) uint8."""
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    parts = [image]
    for m in maps:
        parts += [gap, colour(m, palette, ignore_index)]
    return np.concatenate(parts, axis=1)


class RunLog:
    """The event files, metrics.jsonl and console.log of one run (module docstring)."""

    def __init__(self, run_folder: str, resume_iteration: int = 0, echo: bool = True):
        from tensorboardX import SummaryWriter

        self.target = run_folder
        self.echo = echo
        if is_uri(run_folder):
            self._staging = tempfile.TemporaryDirectory(prefix="segdistill-runlog-")
            self.folder = Path(self._staging.name)
            _download_logs(run_folder, self.folder)
        else:
            self._staging = None
            self.folder = Path(run_folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for rows in ("metrics.jsonl", "steps.jsonl"):
            _truncate_rows(self.folder / rows, resume_iteration)
        # Steps up to the checkpoint's iteration are kept; later ones were written by a run that
        # died after it, and the resumed run writes them again.
        purge = resume_iteration + 1 if resume_iteration > 0 else None
        # One event file per start (its name would otherwise repeat within a second, and the
        # writer would overwrite the earlier file).
        self.writer = SummaryWriter(
            str(self.folder / "tensorboard"),
            purge_step=purge,
            flush_secs=30,
            filename_suffix=f".{os.getpid()}.{resume_iteration}",
        )

    def step(self, iteration: int, terms: dict[str, float], lr: float, data_wait_s: float):
        for name, value in terms.items():
            self.writer.add_scalar(f"train/{name}", value, iteration)
        self.writer.add_scalar("train/lr", lr, iteration)
        self.writer.add_scalar("train/data_wait_s", data_wait_s, iteration)

    def evaluation(
        self,
        iteration: int,
        metrics: dict[str, float],
        per_class: dict[str, float],
        panels: dict[str, np.ndarray] | None = None,
    ) -> None:
        for key in ("miou", "pixel_acc", "boundary_iou", "images_per_s", "teacher_miou"):
            if key in metrics:
                self.writer.add_scalar(f"val/{key}", metrics[key], iteration)
        for name, value in per_class.items():
            if not math.isnan(value):
                self.writer.add_scalar(f"val/iou/{name}", value, iteration)
        for name, image in (panels or {}).items():
            self.writer.add_image(f"val_images/{name}", image, iteration, dataformats="HWC")
        if panels:
            self.panel_files(panels)
        self.writer.flush()

    def row(self, metrics: dict) -> None:
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, default=float) + "\n")

    def step_row(self, iteration: int, terms: dict[str, float], lr: float) -> None:
        """A step's terms in steps.jsonl (every `trainer.log_every` steps: report.md's curves)."""
        with open(self.folder / "steps.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, **terms, "lr": lr}) + "\n")

    def panel_files(self, panels: dict[str, np.ndarray]) -> None:
        """The last evaluation's panels as `panels/<id>.png` (linked from report.md)."""
        from PIL import Image

        folder = self.folder / "panels"
        folder.mkdir(exist_ok=True)
        for name, image in panels.items():
            out = io.BytesIO()
            Image.fromarray(image).save(out, format="PNG")
            tmp = folder / f".{safe_file_name(name)}.png.tmp"
            tmp.write_bytes(out.getvalue())
            os.replace(tmp, folder / f"{safe_file_name(name)}.png")

    def line(self, text: str, echo: bool = True) -> None:
        with open(self.folder / "console.log", "a") as f:
            f.write(text + "\n")
        if self.echo and echo:
            print(text, flush=True)

    def sync(self) -> None:
        """Flush; on URI storage copy the files to the run folder."""
        self.writer.flush()
        if self._staging is not None:
            _upload_logs(self.folder, self.target)

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self._staging is not None:
            self._staging.cleanup()


def _truncate_rows(path: Path, resume_iteration: int) -> None:
    """Keep the rows up to the resumed iteration (none on a fresh start)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line half-written when the run died
        if row.get("iteration", 0) <= resume_iteration:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))


def _download_logs(uri: str, local: Path) -> None:
    """The log files a run on URI storage already has (a resumed run appends to them)."""
    import pyarrow.fs as pafs

    fs, root = resolve_fs(uri)
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    for info in fs.get_file_info(selector):
        rel = info.path[len(root) :].lstrip("/")
        if info.type == pafs.FileType.File and (rel in LOG_FILES or rel.startswith("tensorboard/")):
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src:
                (local / rel).write_bytes(src.read())


def _upload_logs(local: Path, uri: str) -> None:
    fs, root = resolve_fs(uri)
    for path in local.rglob("*"):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            fs.create_dir(f"{root}/{Path(rel).parent.as_posix()}".rstrip("/."), recursive=True)
            with fs.open_output_stream(f"{root}/{rel}") as out:
                out.write(path.read_bytes())


@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    was_training = model.training
    model.eval()
    logits = model(images)["logits"].float()
    model.train(was_training)
    logits = torch.nn.functional.interpolate(
        logits, size=images.shape[-2:], mode="bilinear", align_corners=False
    )
    return logits.argmax(1).cpu().numpy()


def val_panels(models: list, rows: dict, palette, ignore_index: int, device, method=None) -> dict:
    """{row id: image | ground truth | each model's prediction | the method's own maps} of
    decoded val rows (`id`, `image` normalised (N,3,H,W), `mask`, `valid`), for TensorBoard."""
    images = torch.from_numpy(rows["image"]).to(device)
    maps = [rows["mask"], *(predict_labels(m, images) for m in models)]
    if method is not None:
        masks = torch.from_numpy(np.asarray(rows["mask"], np.int64)).to(device)
        maps += [m.cpu().numpy() for m in method.panel_maps(images, masks).values()]
    return {
        str(row_id): panel(to_rgb(rows["image"][i]), [m[i] for m in maps], palette, ignore_index)
        for i, row_id in enumerate(rows["id"])
        if rows["valid"][i]
    }


class _TrainInfoFilter(logging.Filter):
    """Drops Ray Train's own INFO records (a dump of every report) from a console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = "/ray/train/" in record.pathname.replace("\\", "/")
        return not (own and record.levelno < logging.WARNING)


def quiet_train_console() -> None:
    """Without --verbose. Ray Train logs each report at INFO through a logger named after its
    file, not `ray.train`, so its LoggingConfig level does not reach it and the root logger's
    console shows it; it is filtered from the console handlers here. The log files in the
    session folder keep everything."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "SessionFileHandler":
            continue
        if not any(isinstance(f, _TrainInfoFilter) for f in handler.filters):
            handler.addFilter(_TrainInfoFilter())
