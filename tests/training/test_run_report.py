"""report.md and curves.png of a run folder, the panel files, progress-bar choice."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from components.config import Config
from components.training.progress import Bar, iterate, wants_bars
from components.training.report import curves_png, read_rows, write_run_report
from components.training.runlog import RunLog, safe_file_name


def _rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 9, "lo')


def test_report_has_summary_evaluations_curves_panels_and_config(tmp_path):
    log = RunLog(str(tmp_path), echo=False)  # a fresh start: before the rows it would clear
    panels = {"val-7": np.zeros((4, 10, 3), np.uint8), "../escape": np.ones((4, 10, 3), np.uint8)}
    log.panel_files(panels)
    log.close()
    _rows(tmp_path / "steps.jsonl", [{"iteration": i, "ce": 1 / i, "adv": -0.01} for i in (2, 4)])
    _rows(
        tmp_path / "metrics.jsonl",
        [
            {"epoch": 1, "iteration": 2, "miou": 0.25, "pixel_acc": 0.5, "images_per_s": 9.5},
            {"epoch": 2, "iteration": 4, "miou": 0.375, "pixel_acc": 0.75, "images_per_s": 10.0},
        ],
    )
    path = write_run_report(str(tmp_path), Config(), [("model", "val mIoU 37.50")])

    text = (tmp_path / "report.md").read_text()
    assert path.endswith("report.md")
    assert "model  val mIoU 37.50" in text
    assert "| 1 | 2 | 25.00 | 50.00 | 9.5 |" in text and "| 2 | 4 | 37.50 | 75.00 | 10.0 |" in text
    assert "![loss terms and val mIoU against the iteration](curves.png)" in text
    assert "(panels/val-7.png)" in text and "(panels/_._escape.png)" in text
    assert "method:" in text  # the config as YAML
    assert Image.open(tmp_path / "curves.png").size == (1040, 300)
    # No panel outside panels/: the id "../escape" became a file name inside it.
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == [
        "_._escape.png",
        "val-7.png",
    ]
    assert not (tmp_path / "escape.png").exists()


def test_safe_file_name_keeps_ids_inside_their_folder():
    assert safe_file_name("frankfurt_000000_000294") == "frankfurt_000000_000294"
    assert safe_file_name("a/b") == "a_b"
    assert safe_file_name("..") == "_."
    assert safe_file_name(".hidden") == "_hidden"
    assert safe_file_name("") == "_"


def test_torn_last_line_is_skipped_and_empty_history_still_plots(tmp_path):
    _rows(tmp_path / "metrics.jsonl", [{"epoch": 1, "iteration": 3, "miou": 0.5}])
    assert read_rows(str(tmp_path), "metrics.jsonl") == [{"epoch": 1, "iteration": 3, "miou": 0.5}]
    assert read_rows(str(tmp_path), "absent.jsonl") == []
    png = curves_png([], [])
    assert Image.open(io.BytesIO(png)).size == (1040, 300)


def test_bars_on_a_terminal_only_unless_asked():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert wants_bars("auto", Tty()) and not wants_bars("auto", io.StringIO())
    assert wants_bars("bar", io.StringIO()) and not wants_bars("lines", Tty())


def test_bar_counts_what_it_is_given(capsys):
    bar = Bar("val", total=6, unit="img")
    assert list(iterate([[1, 2], [3, 4, 5], [6]], bar, count=len)) == [[1, 2], [3, 4, 5], [6]]
    err = capsys.readouterr().err
    assert "6/6" in err and bar._bar is None  # closed at the end
    off = Bar("x", total=3, enabled=False)
    off.update(1, desc="y")
    off.close()
    assert capsys.readouterr().err == ""
