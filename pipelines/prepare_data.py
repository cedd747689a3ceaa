"""Turn a dataset into parquet shards (the format every pipeline reads).

    python pipelines/prepare_data.py synthetic --out data/synthetic
    python pipelines/prepare_data.py synthetic --out data/synth128 --size 128 --num-train 2000
    python pipelines/prepare_data.py cityscapes --root /data/cityscapes --out data/cityscapes
    python pipelines/prepare_data.py voc --root /data/VOCdevkit/.. --out s3://bucket/shards/voc
    python pipelines/prepare_data.py ade20k --root /data/ADEChallengeData2016 --out data/ade20k
    python pipelines/prepare_data.py coco --root /data/coco2014 --out data/coco
    python pipelines/prepare_data.py folder --images my/images --masks my/masks \
        --classes my/classes.txt --out data/mine    # your own data (docs/datasets.md)
    python pipelines/prepare_data.py voc --root ... --out data/voc_1464 --labeled-from train_aug \
        --labeled 1464 --seed 0                     # semi-supervised: labeled + unlabeled/ splits
    python pipelines/prepare_data.py verify --out data/cityscapes

Writes `<out>/<split>/part-NNNNN.parquet` and `<out>/dataset.json` (last). Real datasets are
converted in parallel (`--workers`), resumably (finished shards are kept; run the same command
again after an interruption), and bad files are skipped and listed; the command fails when more
than `--max-bad-fraction` of the items are bad. A complete synthetic dataset is left as it is.
An `--out` holding anything else than the same conversion (or a synthetic dataset, for
`synthetic`) is refused; `--overwrite` replaces it, removing only the files a conversion writes.
"""

from __future__ import annotations

import argparse
import sys
import time

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def _conversion_options(p) -> None:
    """The options every converter of files (not `synthetic`) shares."""
    p.add_argument("--out", required=True, help="output folder or URI (s3://, gs://, ...)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--shard-rows", type=int, default=500, help="rows per parquet shard")
    p.add_argument("--max-bad-fraction", type=float, default=0.0,
                   help="fail (and write no dataset.json) above this share of bad items")  # fmt: skip
    p.add_argument("--labeled", default=None,
                   help="semi-supervised: a count or a file of ids; the rest of the split "
                        "becomes unlabeled/")  # fmt: skip
    p.add_argument("--labeled-from", default="train", help="the split to divide (default train)")
    p.add_argument("--seed", type=int, default=0, help="for --labeled COUNT")
    p.add_argument("--verify", action="store_true", help="re-read and check the result")
    _overwrite_option(p)


def _overwrite_option(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace another dataset at --out (only the files a conversion writes "
                        "are removed; a folder holding other files is refused)")  # fmt: skip


def _real_parser(sub, name: str, help: str):
    p = sub.add_parser(name, help=help)
    p.add_argument("--root", required=True, help="the dataset folder as distributed")
    _conversion_options(p)
    if name == "cityscapes":
        p.add_argument("--splits", default="train,val",
                       help="comma-separated; `test` is written without masks")  # fmt: skip
    return p


def _folder_parser(sub):
    p = sub.add_parser("folder", help="your own images + masks folders (docs/datasets.md)")
    p.add_argument("--images", required=True, help="folder of JPEG/PNG/WebP images (recursive)")
    p.add_argument("--masks", required=True,
                   help="folder of PNG masks mirroring --images: palette or greyscale PNGs of "
                        "class ids, 255 = ignore")  # fmt: skip
    p.add_argument(
        "--classes",
        required=True,
        help="class names: a text file (line 1 = class 0) or YAML (list or id: name)",
    )
    p.add_argument("--palette", default=None,
                   help="R,G,B per line (or YAML list); default: the masks' own palette, else "
                        "the VOC colours")  # fmt: skip
    p.add_argument("--splits", default=None,
                   help="train=train.txt,val=val.txt: files of ids (image paths relative to "
                        "--images, without extension); default: the images/train/ and "
                        "images/val/ subfolders")  # fmt: skip
    p.add_argument("--name", default=None, help="the dataset's name (default: --out's last part)")
    _conversion_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from components.config import SyntheticConfig

    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    syn = sub.add_parser("synthetic", help="the procedural texture dataset (no download)")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-train", type=int, default=defaults.num_train)
    syn.add_argument("--num-val", type=int, default=defaults.num_val)
    syn.add_argument("--num-unlabeled", type=int, default=defaults.num_unlabeled)
    syn.add_argument("--size", type=int, default=defaults.size)
    syn.add_argument("--num-classes", type=int, default=defaults.num_classes)
    syn.add_argument("--seed", type=int, default=defaults.seed)
    _overwrite_option(syn)
    _real_parser(sub, "cityscapes", "Cityscapes (leftImg8bit + gtFine), 19 train ids")
    _real_parser(sub, "voc", "Pascal VOC 2012 (+ SegmentationClassAug), 21 classes")
    _real_parser(sub, "ade20k", "ADE20K SceneParsing (ADEChallengeData2016), 150 classes")
    _real_parser(sub, "coco", "COCO 2014 instances rasterised to 81 classes")
    _folder_parser(sub)
    ver = sub.add_parser("verify", help="re-read a converted dataset and check it")
    ver.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from pipelines._common import fail

    if args.dataset == "synthetic":
        return _synthetic(args)
    if args.dataset == "verify":
        return _verify(args.out)
    return _real(args, fail)


def _synthetic(args) -> int:
    from components.config import SyntheticConfig
    from components.data.convert import clear_output, inspect_output
    from components.data.shards import DatasetError
    from components.data.synthetic import ensure_synthetic
    from pipelines._common import fail

    if args.num_classes < 2 or args.size < 16 or args.num_train < 1 or args.num_val < 1:
        return fail("need --num-classes >= 2, --size >= 16, --num-train >= 1, --num-val >= 1")
    start = time.perf_counter()
    try:
        held = inspect_output(args.out)
        if args.overwrite:
            clear_output(held)
        elif held.dataset != "synthetic" and not held.empty:
            # a synthetic dataset is reused as it is; anything else is not ours to replace
            raise held.refusal("a synthetic dataset")
        info = ensure_synthetic(
            args.out,
            SyntheticConfig(
                num_train=args.num_train,
                num_val=args.num_val,
                num_unlabeled=args.num_unlabeled,
                size=args.size,
                num_classes=args.num_classes,
                seed=args.seed,
            ),
        )
    except DatasetError as e:
        return fail(str(e))
    counts = ", ".join(f"{k} {v.rows}" for k, v in info.splits.items())
    print(
        f"{args.out}: {info.name}, {info.num_classes} classes, {counts} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _source(args):
    """The Source for the command line, and the options that divide its splits differently (part
    of what makes a rerun the same conversion: another labeled subset would replace this one)."""
    import os

    from components.data.sources import SOURCES, FolderSource
    from components.data.sources.folder import parse_split_lists

    options: dict = {}
    if args.labeled is not None:
        labeled = args.labeled
        if os.path.isfile(labeled):
            labeled = os.path.abspath(labeled)
        options = {"labeled": labeled, "labeled_from": args.labeled_from, "seed": args.seed}
    if args.dataset == "folder":
        lists = parse_split_lists(args.splits) if args.splits is not None else None
        name = args.name or args.out.rstrip("/").rsplit("/", 1)[-1] or "folder"
        source = FolderSource(args.images, args.masks, args.classes, args.palette, lists, name)
        return source, options
    kwargs = {}
    if args.dataset == "cityscapes":
        kwargs["include_splits"] = tuple(s for s in args.splits.split(",") if s)  # adds, keeps
    return SOURCES[args.dataset](args.root, **kwargs), options


def _real(args, fail) -> int:
    import pyarrow as pa

    from components.data.convert import bad_summary, convert, labeled_subset
    from components.data.shards import DatasetError

    if args.shard_rows < 1 or not 0 <= args.max_bad_fraction <= 1:
        return fail("need --shard-rows >= 1 and 0 <= --max-bad-fraction <= 1")
    start = time.perf_counter()
    try:
        source, options = _source(args)
        splits = source.splits()
        if args.labeled is not None:
            if args.labeled_from not in splits:
                return fail(f"--labeled-from {args.labeled_from}: the splits are {sorted(splits)}")
            pool = splits.pop(args.labeled_from)
            splits["train"], splits["unlabeled"] = labeled_subset(pool, args.labeled, args.seed)
        report = convert(
            source,
            args.out,
            workers=args.workers,
            shard_rows=args.shard_rows,
            max_bad_fraction=args.max_bad_fraction,
            splits=splits,
            options=options,
            overwrite=args.overwrite,
        )
    except DatasetError as e:
        return fail(str(e))
    except (OSError, pa.ArrowException) as e:  # writing the output failed
        return fail(f"{args.out}: cannot write the dataset: {e}")
    counts = ", ".join(f"{k} {v}" for k, v in report.rows.items())
    if report.bad:
        print(bad_summary(report), file=sys.stderr)
    print(
        f"{args.out}: {source.name}, {len(source.class_names)} classes, {counts}; "
        f"{report.written_chunks} shards written, {report.skipped_chunks} kept from before "
        f"({time.perf_counter() - start:.1f} s)"
    )
    if not report.ok:
        return fail(
            f"{len(report.bad)} of {report.items} items bad ({100 * report.bad_fraction:.2f}% > "
            f"--max-bad-fraction {100 * args.max_bad_fraction:g}%) or a split is empty: "
            "no dataset.json written; fix the files (or raise the fraction) and run again",
            code=1,
        )
    return _verify(args.out) if args.verify else 0


def _verify(out: str) -> int:
    from components.data.shards import DatasetError
    from components.data.verify import verify
    from pipelines._common import fail

    try:
        problems = verify(out)
    except DatasetError as e:
        return fail(str(e))
    for p in problems[:50]:
        print(f"  {p}", file=sys.stderr)
    if problems:
        return fail(f"{out}: {len(problems)} problems found", code=1)
    print(f"{out}: verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
