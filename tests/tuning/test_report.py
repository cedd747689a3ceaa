"""Sweep outputs: the CSV, the Markdown table and the PNG agree with the trial rows."""

from __future__ import annotations

import csv
import io

from PIL import Image

from components.tuning import report
from components.tuning.space import parse_distribution

SEARCH = {
    "method.weights.structural": parse_distribution("s", "loguniform(0.1, 10)"),
    "method.dtiem.levels": parse_distribution("l", "choice([4, 8, 16])"),
}
ROWS = [
    {
        "trial_id": "a",
        "score": 0.30,
        "best_miou": 0.30,
        "epochs": 1,
        "status": "stopped early",
        "method.weights.structural": 0.1,
        "method.dtiem.levels": 4,
    },
    {
        "trial_id": "b",
        "score": 0.50,
        "best_miou": 0.50,
        "epochs": 2,
        "status": "done",
        "method.weights.structural": 10.0,
        "method.dtiem.levels": 16,
    },
    {
        "trial_id": "c",
        "score": None,
        "best_miou": None,
        "epochs": 0,
        "status": "error",
        "method.weights.structural": 1.0,
        "method.dtiem.levels": 8,
    },
]


def test_rank_best_first_and_unscored_last():
    ranked = report.rank_rows(ROWS, "max")
    assert [r["trial_id"] for r in ranked] == ["b", "a", "c"]
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    assert [r["trial_id"] for r in report.rank_rows(ROWS, "min")] == ["a", "b", "c"]


def test_csv_and_markdown_agree():
    ranked = report.rank_rows(ROWS)
    keys = list(SEARCH)
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(ranked, keys))))
    assert [p["trial_id"] for p in parsed] == ["b", "a", "c"]
    assert float(parsed[0]["best_miou"]) == 0.5 and parsed[2]["best_miou"] == ""
    assert parsed[1]["status"] == "stopped early" and parsed[1]["method.dtiem.levels"] == "4"
    md = report.to_markdown(ranked, keys, "t")
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "rank" not in ln]
    assert lines[0].startswith("| 1 | b | 50.00 | 2 | done | 10 | 16 |")
    assert "3 trials, 1 stopped early" in md
    # Another ranking metric gets its own column beside mIoU.
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(ranked, keys, metric="lr"))))
    assert "best_lr" in parsed[0] and float(parsed[0]["best_lr"]) == 0.5


def test_png_plots_every_scored_trial_where_expected():
    ranked = report.rank_rows(ROWS)
    img = Image.open(io.BytesIO(report.plot_png(ranked, SEARCH)))
    assert img.size == (2 * report.PANEL_W, report.PANEL_H)
    assert img.text["points"] == "b=50;a=30"  # the error trial has nothing to plot
    # Trial b: str = 10 is the right end of the log axis, mIoU 50 the top of the y range.
    x0, x1 = report.MARGIN, report.PANEL_W - 12
    y0, y1 = 24, report.PANEL_H - report.MARGIN
    bx, by = x0 + 6 + (x1 - x0 - 12) * 1.0, y1 - 6 - (y1 - y0 - 12) * 1.0
    assert img.getpixel((round(bx), round(by))) == report.COLOURS["done"]
    # Trial a: levels 4 is the first of three categories in the second panel, at the bottom.
    ax = report.PANEL_W + x0 + 6 + (x1 - x0 - 12) * (0.5 / 3)
    assert img.getpixel((round(ax), round(y1 - 6))) == report.COLOURS["stopped early"]
