"""Driver-side check of a split's image-level labels before a weakly supervised run starts.

    summary = check_image_labels("data/voc", "train", num_classes=21)

Reads only the `id` and `image_labels` columns. Rows whose labels are null or hold ids outside
0..K-1 are counted (the workers skip them as bad rows, `data.max_bad_fraction` applies); images
with no foreground class are valid (background-only: every pixel's pseudo label is background)
and counted. A split without the column, or with no usable row, is a DatasetError naming it.
"""

from __future__ import annotations

from components.data.shards import DatasetError, iter_shard_tables


def check_image_labels(root: str, split: str, num_classes: int) -> dict[str, int]:
    """{"rows", "missing", "out_of_range", "background_only"} of `split`; prints a line when any
    row is unusable; raises DatasetError when the column is absent or no row is usable."""
    counts = {"rows": 0, "missing": 0, "out_of_range": 0, "background_only": 0}
    examples: list[str] = []
    try:
        tables = list(iter_shard_tables(root, split, ["id", "image_labels"]))
    except DatasetError as e:
        raise DatasetError(
            f"{e}; weakly supervised training needs each row's class list "
            "(pipelines/prepare_data.py writes it)"
        ) from e
    for _, table in tables:
        for row_id, labels in zip(
            table.column("id").to_pylist(), table.column("image_labels").to_pylist()
        ):
            counts["rows"] += 1
            if labels is None:
                counts["missing"] += 1
                examples.append(f"{row_id} (no image_labels)")
            elif any(c is None or c < 0 or c >= num_classes for c in labels):
                counts["out_of_range"] += 1
                examples.append(f"{row_id} (ids {labels}, classes 0..{num_classes - 1})")
            elif not any(c > 0 for c in labels):
                counts["background_only"] += 1
    bad = counts["missing"] + counts["out_of_range"]
    if counts["rows"] and bad == counts["rows"]:
        raise DatasetError(
            f"{root} split '{split}': none of its {counts['rows']} rows has usable image_labels "
            f"(e.g. {', '.join(examples[:3])})"
        )
    if bad:
        print(
            f"data: {bad} of {counts['rows']} '{split}' rows have unusable image_labels and will "
            f"be skipped as bad rows, e.g. {', '.join(examples[:3])}",
            flush=True,
        )
    if counts["background_only"]:
        print(
            f"data: {counts['background_only']} '{split}' rows are background-only (no "
            "foreground class); their pseudo labels are all background",
            flush=True,
        )
    return counts


__all__ = ["check_image_labels"]
