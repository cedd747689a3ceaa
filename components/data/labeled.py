"""The labeled / unlabeled split of a converted dataset (`prepare_data.py ... --labeled N|FILE`)."""

from __future__ import annotations

import os
import random

from components.data.shards import DatasetError


def labeled_subset(items: list, labeled: str, seed: int) -> tuple[list, list]:
    """(labeled, unlabeled) from `--labeled`: a count (a seeded random choice) or a list file
    with one id (or file name) per line. `items`: the split's `convert.Item`s (`.id`,
    `.image`), in order."""
    if labeled.isdigit():
        count = int(labeled)
        if not 0 < count <= len(items):
            raise DatasetError(f"--labeled {count}: the split has {len(items)} items")
        chosen = set(random.Random(seed).sample(range(len(items)), count))
    else:
        try:
            with open(labeled) as f:
                wanted = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        except OSError as e:
            raise DatasetError(f"--labeled {labeled}: cannot read: {e}") from e
        keys = {}
        for i, item in enumerate(items):
            for key in (item.id, os.path.basename(item.id), _stem(item.image)):
                keys.setdefault(key, i)
        missing = [w for w in wanted if _stem(w) not in keys and w not in keys]
        if missing:
            raise DatasetError(
                f"{labeled}: {len(missing)} listed ids are not in the split, e.g. {missing[:3]}"
            )
        chosen = {keys.get(w, keys.get(_stem(w))) for w in wanted}
    lab = [it for i, it in enumerate(items) if i in chosen]
    unl = [it for i, it in enumerate(items) if i not in chosen]
    return lab, unl


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
