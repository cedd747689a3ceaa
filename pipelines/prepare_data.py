"""Turn a dataset into parquet shards (the format every pipeline reads).

    python pipelines/prepare_data.py synthetic --out data/synthetic
    python pipelines/prepare_data.py synthetic --out data/synth128 --size 128 --num-train 2000

Writes `<out>/{train,val[,unlabeled]}/part-NNNNN.parquet` and `<out>/dataset.json` (last). An
existing complete dataset at `--out` is left as it is.
"""

from __future__ import annotations

import argparse
import sys
import time

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


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
    args = parser.parse_args(argv)

    from components.data.synthetic import ensure_synthetic
    from pipelines._common import fail

    if args.num_classes < 2 or args.size < 16 or args.num_train < 1 or args.num_val < 1:
        return fail("need --num-classes >= 2, --size >= 16, --num-train >= 1, --num-val >= 1")
    start = time.perf_counter()
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
    counts = ", ".join(f"{k} {v.rows}" for k, v in info.splits.items())
    print(
        f"{args.out}: {info.name}, {info.num_classes} classes, {counts} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
