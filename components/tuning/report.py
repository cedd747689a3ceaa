"""A sweep's outputs from its trial rows: CSV, Markdown table, PNG plot, best.yaml. No Ray here.

A row is a dict: `trial_id`, `status` ("done", "stopped early", "error", "not run"), `score` (the
best value of the sweep's metric, or None), `best_miou` (fraction, or None), `epochs` (epochs run),
and one entry per searched key (its value). Rows are ranked by `score`.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from components.tuning.distributions import Distribution


def _fixed_columns(metric: str) -> list[str]:
    extra = [] if metric == "miou" else [f"best_{metric}"]
    return ["rank", "trial_id", "best_miou", *extra, "epochs", "status"]


def rank_rows(rows: list[dict], mode: str = "max") -> list[dict]:
    """Rows sorted best first (trials without a result last), each with its `rank` (1-based)."""
    scored = [r for r in rows if r.get("score") is not None]
    unscored = [r for r in rows if r.get("score") is None]
    scored.sort(key=lambda r: r["score"], reverse=(mode == "max"))
    ranked = []
    for i, r in enumerate(scored + sorted(unscored, key=lambda r: r["trial_id"])):
        ranked.append({**r, "rank": i + 1})
    return ranked


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def to_csv(rows: list[dict], keys: list[str], metric: str = "miou") -> str:
    """All trials, one line each: rank, trial_id, best_miou (fraction), best_<metric> (when the
    sweep ranks by another metric), epochs, status, then the searched values."""
    fixed = _fixed_columns(metric)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fixed + keys)
    for r in rows:
        values = {**r, f"best_{metric}": r.get("score")}
        writer.writerow([_fmt(values.get(c)) for c in fixed] + [_fmt(r.get(k)) for k in keys])
    return out.getvalue()


def to_markdown(rows: list[dict], keys: list[str], title: str = "", metric: str = "miou") -> str:
    """The ranked table (mIoU in %), with a line on how many trials stopped early."""
    extra = [] if metric == "miou" else [f"best {metric}"]
    head = ["rank", "trial", "best mIoU (%)", *extra, "epochs", "status", *keys]
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        miou = "" if r.get("best_miou") is None else f"{100 * r['best_miou']:.2f}"
        cells = [str(r["rank"]), r["trial_id"], miou]
        cells += [_fmt(r.get("score"))] if extra else []
        cells += [str(r.get("epochs", 0)), r["status"]]
        cells += [_fmt(r.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    early = sum(r["status"] == "stopped early" for r in rows)
    lines += ["", f"{len(rows)} trials, {early} stopped early by the scheduler."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The plot: one panel per searched key, best mIoU (y) against the key's value (x).

PANEL_W, PANEL_H, MARGIN = 360, 280, 48
COLOURS = {"done": (31, 119, 180), "stopped early": (255, 127, 14)}


def _x_positions(values: list, dist: Distribution) -> tuple[list[float], list[str]]:
    """x in [0, 1] for each value, and tick labels (categorical for choice/grid)."""
    if dist.name in ("choice", "grid"):
        cats = [repr(c) for c in dist.args[0]]
        n = len(cats)
        pos = [(cats.index(repr(v)) + 0.5) / n if repr(v) in cats else 0.5 for v in values]
        return pos, cats
    low, high = float(dist.args[0]), float(dist.args[1])
    f = math.log10 if dist.log_scale else (lambda v: v)
    lo, hi = f(low), f(high)
    pos = [(f(float(v)) - lo) / (hi - lo) if hi > lo else 0.5 for v in values]
    return pos, [f"{low:g}", f"{high:g}" + (" (log)" if dist.log_scale else "")]


def plot_png(rows: list[dict], search: dict[str, Distribution], metric: str = "miou") -> bytes:
    """A PNG: each trial's best val mIoU (or the sweep's metric) against each searched value;
    blue ran to the end, orange was stopped early. Its text chunk `points` lists what was plotted
    (`trial=y;...`, y in the plot's units)."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    keys = list(search)
    plotted = [r for r in rows if r.get("score") is not None]
    scale = 100.0 if metric == "miou" else 1.0
    ys = [scale * r["score"] for r in plotted]
    y_label = "mIoU %" if metric == "miou" else metric[:6]
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y_hi - y_lo < 1e-6:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    img = Image.new("RGB", (PANEL_W * len(keys), PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        x0, x1 = i * PANEL_W + MARGIN, (i + 1) * PANEL_W - 12
        y0, y1 = 24, PANEL_H - MARGIN
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 6), key, fill="black")
        draw.text((x0 - 44, y0), f"{y_hi:.3g}", fill="black")
        draw.text((x0 - 44, y1 - 10), f"{y_lo:.3g}", fill="black")
        draw.text((x0 - 44, (y0 + y1) // 2), y_label, fill="black")
        pos, ticks = _x_positions([r.get(key) for r in plotted], search[key])
        if search[key].name in ("choice", "grid"):
            for j, t in enumerate(ticks):
                tx = x0 + (x1 - x0) * (j + 0.5) / len(ticks)
                draw.text((tx - 6, y1 + 6), t[:6], fill="black")
        else:
            draw.text((x0, y1 + 6), ticks[0], fill="black")
            draw.text((x1 - 7 * len(ticks[1]), y1 + 6), ticks[1], fill="black")
        for r, p, y in zip(plotted, pos, ys):
            px = x0 + 6 + (x1 - x0 - 12) * p
            py = y1 - 6 - (y1 - y0 - 12) * (y - y_lo) / (y_hi - y_lo)
            colour = COLOURS.get(r["status"], (120, 120, 120))
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
    info = PngInfo()
    info.add_text("points", ";".join(f"{r['trial_id']}={y:.6g}" for r, y in zip(plotted, ys)))
    out = io.BytesIO()
    img.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


__all__ = ["plot_png", "rank_rows", "to_csv", "to_markdown"]
