"""`report.md` of a finished run, in its run folder (local or URI), written by the driver.

    write_run_report(run_folder, cfg, summary_rows)

It holds the config, the run's summary (the rows the pipeline prints), `curves.png` (each loss
term and val mIoU against the iteration, from `steps.jsonl` and `metrics.jsonl`) and links to
the prediction panels the last evaluation wrote (`panels/<image id>.png`: image | ground truth |
student | teacher ...). Everything is read back from the run folder's plain files, so a run
resumed several times gets one report of its whole history.

The plot is drawn with Pillow (already a dependency, as the sweep's params.png) rather than
matplotlib, which would add about 40 MB to the install for two line charts.
"""

from __future__ import annotations

import io
import json
import math

from components.config import Config, to_yaml
from components.data.shards import resolve_fs, write_atomic

# Row keys that are not loss terms (components/training/loop._epoch_metrics).
NOT_TERMS = {
    "epoch", "iteration", "best_miou", "best_epoch", "teacher_miou", "miou", "pixel_acc", "lr",
    "images_per_s", "data_wait_share", "train_s", "eval_s", "bad_rows", "world_size",
    "boundary_iou",
}  # fmt: skip
COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
W, H, LEFT, RIGHT, TOP, BOTTOM = 520, 300, 58, 120, 26, 30


def read_rows(run_folder: str, name: str) -> list[dict]:
    """The JSON lines of `name` in the run folder ([] when absent; torn lines skipped)."""
    fs, root = resolve_fs(run_folder)
    try:
        with fs.open_input_stream(f"{root}/{name}") as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: list[dict], keys: list[str], scale: float = 1.0) -> dict[str, list]:
    out: dict[str, list] = {}
    for key in keys:
        points = [
            (r["iteration"], scale * r[key])
            for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if points:
            out[key] = points
    return out


SYMLOG_C = 0.01


def _symlog(y: float) -> float:
    return math.copysign(math.log10(1 + abs(y) / SYMLOG_C), y)


def _symexp(v: float) -> float:
    return math.copysign(SYMLOG_C * (10 ** abs(v) - 1), v)


def _chart(title: str, series: dict[str, list], log_y: bool):
    """One line chart (Pillow image) of {name: [(x, y), ...]} with a legend on the right."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = LEFT, TOP, W - RIGHT, H - BOTTOM
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, 6), title, fill="black")
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((x0 + 10, (y0 + y1) // 2), "no data", fill="black")
        return img
    # Symmetric log (terms can be negative, e.g. an adversarial term): linear within +-SYMLOG_C.
    fy = _symlog if log_y else (lambda y: y)
    xs, ys = [x for x, _ in points], [fy(y) for _, y in points]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        px = x0 + 4 + (x1 - x0 - 8) * (x - x_lo) / (x_hi - x_lo)
        return px, y1 - 4 - (y1 - y0 - 8) * (fy(y) - y_lo) / (y_hi - y_lo)

    shown = (lambda v: f"{_symexp(v):.3g}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((4, y0), shown(y_hi), fill="black")
    draw.text((4, y1 - 10), shown(y_lo), fill="black")
    draw.text((x0, y1 + 6), str(x_lo), fill="black")
    draw.text((x1 - 6 * len(str(x_hi)), y1 + 6), str(x_hi), fill="black")
    draw.text(((x0 + x1) // 2 - 24, y1 + 6), "iteration", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) < 30 else xy[-1:]:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((x1 + 8, y0 + 14 * i), name[:18], fill=colour)
    return img


def curves_png(steps: list[dict], epochs: list[dict]) -> bytes:
    """Loss terms (every logged step when there are some, else each epoch's means; log scale)
    beside val mIoU (%) per evaluation, against the iteration."""
    from PIL import Image

    source = steps if len(steps) > 1 else epochs
    terms = sorted({k for r in source for k, v in r.items() if k not in NOT_TERMS and _number(v)})
    left = _chart("train loss terms (symmetric log)", _series(source, terms), log_y=True)
    evaluated = [r for r in epochs if r.get("miou", 0) >= 0]  # -1: an epoch not evaluated
    right = _chart("val mIoU %", _series(evaluated, ["miou", "teacher_miou"], 100.0), log_y=False)
    img = Image.new("RGB", (2 * W, H), "white")
    img.paste(left, (0, 0))
    img.paste(right, (W, 0))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _panel_names(run_folder: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = resolve_fs(run_folder)
    selector = pafs.FileSelector(f"{root}/panels", allow_not_found=True)
    return sorted(i.base_name for i in fs.get_file_info(selector) if i.base_name.endswith(".png"))


def write_run_report(run_folder: str, cfg: Config, summary: list[tuple[str, str]]) -> str:
    """Write `curves.png` and `report.md` into the run folder; returns report.md's path."""
    steps = read_rows(run_folder, "steps.jsonl")
    epochs = read_rows(run_folder, "metrics.jsonl")
    fs, root = resolve_fs(run_folder)
    write_atomic(fs, f"{root}/curves.png", curves_png(steps, epochs))
    width = max((len(k) for k, _ in summary), default=0)
    lines = [
        f"# Run {run_folder.rstrip('/').rsplit('/', 1)[-1]}",
        "",
        "## Summary",
        "",
        "```",
        *(f"{k:<{width}}  {v}" for k, v in summary),
        "```",
        "",
        "## Curves",
        "",
        "![loss terms and val mIoU against the iteration](curves.png)",
        "",
        (
            f"Every step is in `tensorboard/` (`tensorboard --logdir {run_folder}`); each "
            "epoch's row is in `metrics.jsonl`."
        ),
        "",
    ]
    if epochs:
        lines += ["## Evaluations", "", "| epoch | iteration | val mIoU | pixel acc | img/s |"]
        lines += ["|---:|---:|---:|---:|---:|"]
        for r in (r for r in epochs if r.get("miou", 0) >= 0):
            lines.append(
                f"| {r.get('epoch')} | {r.get('iteration')} | {100 * r.get('miou', math.nan):.2f}"
                f" | {100 * r.get('pixel_acc', math.nan):.2f}"
                f" | {r.get('images_per_s', math.nan):.1f} |"
            )
        lines.append("")
    panels = _panel_names(run_folder)
    if panels:
        lines += ["## Predictions (last evaluation)", ""]
        lines += [f"- [{p[:-4]}](panels/{p})" for p in panels]
        lines += [
            "",
            "Each panel: image | ground truth | student | teacher or the method's maps.",
            "",
        ]
    lines += ["## Config", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    write_atomic(fs, f"{root}/report.md", "\n".join(lines).encode())
    return f"{run_folder.rstrip('/')}/report.md"
