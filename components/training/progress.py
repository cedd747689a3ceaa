"""Progress bars that work where the code runs: in a Ray worker or in a plain process.

    bar = Bar("epoch 1/7", total=186, unit="step")
    for ...: bar.update(1, desc="epoch 1/7 loss 0.913 12.3 img/s")
    bar.close()

In a Ray worker the bar is `ray.experimental.tqdm_ray.tqdm`: the worker sends its state (at most
once a second) through its log stream and the driver draws it with tqdm, so bars from several
workers or trials do not overwrite each other. Anywhere else it is tqdm on stderr. tqdm_ray has
no postfix, so the loss and speed go in the description.

Whether to draw bars at all is the driver's choice (`wants_bars`): on a terminal yes; in a log
file (`ray job submit`, CI, `> run.log`) every redraw would be a line, so runs print their
periodic step lines there instead (`trainer.log_every`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self


def wants_bars(setting: str, stream=None) -> bool:
    """`trainer.progress`: "bar" always, "lines" never, "auto" when the driver's stderr is a
    terminal."""
    if setting in ("bar", "lines"):
        return setting == "bar"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def _in_ray_worker() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE


class Bar:
    """One progress bar (module docstring); `enabled=False` makes every call a no-op."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", enabled: bool = True):
        self._bar = None
        if not enabled:
            return
        if _in_ray_worker():
            from ray.experimental import tqdm_ray

            self._bar = tqdm_ray.tqdm(desc=desc, total=total, unit=unit)
        else:
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, desc: str | None = None) -> None:
        if self._bar is None:
            return
        if desc is not None:
            self._bar.set_description(desc)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iterate(items, bar: Bar, count=None):
    """`items`, advancing `bar` by `count(item)` (default 1) per item; closed at the end."""
    try:
        for item in items:
            yield item
            bar.update(1 if count is None else count(item))
    finally:
        bar.close()
