"""Predict label maps for images with a checkpoint: labels, overlays (and Cityscapes files).

    python pipelines/predict.py --checkpoint outputs/<run> photos/ --out predictions/
    python pipelines/predict.py --checkpoint RUN image.jpg --out pred/ --mode slide \
        --crop 512,1024 --stride 341,683 --scales 0.75,1.0,1.25 --flip
    python pipelines/predict.py --checkpoint RUN --data data/cityscapes --split test \
        --out pred/ --format cityscapes

The input is an image file, a folder of images (recursively: .jpg, .jpeg, .png, .webp in any
case), local or a URI pyarrow opens (s3://, gs://, file://), or a shard dataset split (`--data
DIR --split val`). For each image (relative path `a/x.jpg`, or shard row id `a/x`):

    <out>/labels/a/x.png       palette PNG of class ids (pixel value = class id)
    <out>/overlays/a/x.png     the image blended with the colour map (alpha 0.5)
    <out>/cityscapes/a/x_leftImg8bit.png    --format cityscapes: labelIds for the test server

It is Ray Data batch inference (components/predict.py): tasks read and decode the images, an
actor pool holds the model (one GPU per actor on GPU clusters, CPU actors otherwise) and predicts
each image at full resolution with the evaluation mode's flags (as evaluate.py), tasks write the
PNGs. Images whose outputs all exist are skipped, so the same command resumes. Images that
cannot be decoded are skipped, named and counted (and listed in <out>/bad_images.txt); the run
fails (exit 1) when they are more than --max-bad-fraction of the images. Bad arguments, an
output folder that cannot be written, a checkpoint whose class count differs from --data's and
an input without images fail before any work (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipelines.evaluate import _pair, _scales

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", help="image file or folder (local or URI)")
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    parser.add_argument("--out", required=True, help="output folder (local or URI)")
    parser.add_argument("--data", help="shard dataset folder (dataset.json): predict a split")
    parser.add_argument("--split", default="val", help="the --data split (default: val)")
    parser.add_argument(
        "--format",
        choices=["cityscapes"],
        action="append",
        default=[],
        help="also write Cityscapes test-server files (labelIds PNGs; a 19-class model)",
    )
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole")
    parser.add_argument("--crop", type=_pair, help="slide window H,W (or one number for both)")
    parser.add_argument("--stride", type=_pair, help="slide step H,W (each <= the crop)")
    parser.add_argument("--scales", type=_scales, default=(1.0,), help="e.g. 0.5,0.75,1.0")
    parser.add_argument("--flip", action="store_true", help="add the horizontally flipped image")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail (exit 1, after writing the good images) when more than this share of the "
        "images cannot be decoded (default 0.01)",
    )
    parser.add_argument(
        "--actors",
        type=int,
        help="model actors (default: one per GPU, or the "
        "CPUs but one, divided by --cpus-per-actor)",
    )
    parser.add_argument(
        "--cpus-per-actor", type=float, help="CPUs (torch threads) per actor (default 1)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    parser.add_argument(
        "--progress",
        choices=["auto", "bar", "lines"],
        default="auto",
        help="a progress bar (auto: when stderr is a terminal) or a line per 10%% of the images",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own output too (Ray Data's progress)"
    )
    args = parser.parse_args(argv)
    if (args.input is None) == (args.data is None):
        parser.error("give an input (an image or a folder) or --data DIR, not both or neither")
    return args


def main(argv: list[str] | None = None) -> int:
    from pipelines._common import fail, quiet_environment

    args = parse_args(argv)
    quiet_environment(args.verbose)

    import ray

    from components.config import ConfigError
    from components.data.shards import DatasetError, DatasetInfo
    from components.inference import EvalMode
    from components.models.checkpointed import load_checkpoint_model
    from components.predict import (
        CITYSCAPES,
        CITYSCAPES_CLASSES,
        Plan,
        PredictError,
        default_palette,
        list_images,
        list_shard_rows,
        plan_pool,
    )
    from components.training.checkpoint import CheckpointError
    from components.training.storage import check_writable, is_uri
    from pipelines._common import init_ray

    try:
        if not 0.0 <= args.max_bad_fraction <= 1.0:
            raise PredictError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
        mode = EvalMode(args.mode, args.crop, args.stride, args.scales, args.flip)
        check_writable(args.out, key="--out")  # before anything else is read or started
        _, meta = load_checkpoint_model(args.checkpoint, "cpu")  # verified, and its weights fit
        folder, classes = meta["folder"], int(meta["num_classes"])
        info = DatasetInfo.load(args.data) if args.data else None
        if info is not None and info.num_classes != classes:
            raise PredictError(
                f"{folder}: model predicts {classes} classes but {args.data}/dataset.json "
                f"has {info.num_classes}"
            )
        if CITYSCAPES in args.format and classes != CITYSCAPES_CLASSES:
            raise PredictError(
                f"--format cityscapes needs a {CITYSCAPES_CLASSES}-class model (the trainIds); "
                f"{folder} predicts {classes} classes"
            )
        if classes > 256:
            raise PredictError(f"{folder}: {classes} classes do not fit a PNG of class ids (256)")
        palette = info.palette if info is not None else default_palette(classes)
        if args.data:
            inputs = list_shard_rows(args.data, args.split)
            source = f"{args.data} [{args.split}]"
        else:
            inputs, source = list_images(args.input, exclude=args.out), args.input
        ignore = meta.get("ignore_index")
        plan = Plan(args.out, palette, 255 if ignore is None else int(ignore), tuple(args.format))
        todo, skipped = plan.pending(inputs.items)
        pool = None
        if todo:  # a finished run is not worth a Ray start-up
            init_ray(dashboard=False)  # no Train worker group to clean up (init_ray's docstring)
            _quiet_ray_data(not args.verbose)
            resources = ray.cluster_resources()
            pool = plan_pool(
                resources, args.actors, args.cpus_per_actor, args.batch_size, len(todo)
            )
    except (ConfigError, CheckpointError, DatasetError, PredictError, ValueError) as e:
        return fail(str(e))

    # The actors load the checkpoint themselves: the folder resolved here (the same checkpoint
    # even if a run writes a newer one meanwhile), or the URI, which each node copies to its cache.
    checkpoint = args.checkpoint if is_uri(args.checkpoint) else folder
    model = meta.get("model", {})
    print(f"checkpoint: {folder} ({model.get('backbone')} {model.get('head')}, {classes} classes)")
    print(f"input: {source}: {len(inputs.items)} images, {len(todo)} to predict, {skipped} done")
    print(f"mode: {mode.describe()}")
    print(f"output: {args.out} ({', '.join(plan.kinds())})")
    if pool is not None:
        print(f"model: {pool.describe()}, {pool.batch_size} images per call", flush=True)
    return _run(args, inputs, todo, skipped, plan, checkpoint, mode, pool)


def _run(args, inputs, todo, skipped, plan, checkpoint, mode, pool) -> int:
    import ray
    from ray.data.exceptions import SystemException

    from components.predict import predict_rows, write_bad_list
    from components.training.progress import Bar, wants_bars
    from pipelines._common import fail

    start = time.perf_counter()
    written, bad = 0, []
    bar_on = wants_bars(args.progress)
    bar = Bar("predict", total=len(todo), unit="img", enabled=bar_on)
    every = max(1, len(todo) // 10)
    try:
        for done, row in enumerate(predict_rows(inputs, todo, plan, checkpoint, mode, pool), 1):
            if row["error"]:
                bad.append((str(row["source"]), str(row["error"])))
                _say(f"bad image: {row['source']}: {row['error']}", bar_on)
            else:
                written += 1
            bar.update(1)
            if not bar_on and (done % every == 0 or done == len(todo)):
                rate = done / max(time.perf_counter() - start, 1e-9)
                print(f"predicted {done}/{len(todo)} ({rate:.2f} images/s)", flush=True)
    except KeyboardInterrupt:
        bar.close()
        print("\ninterrupted; the written images are kept: the same command resumes", flush=True)
        return 130
    except (ray.exceptions.RayError, SystemException) as e:  # an actor or task failed
        bar.close()
        return fail(f"prediction failed: {e}", code=1)
    bar.close()
    seconds = time.perf_counter() - start
    bad_list = write_bad_list(plan, bad)
    total = len(inputs.items)
    if bad:
        print(f"{len(bad)} of {total} images could not be read or predicted: {bad_list}")
    print(
        f"written {written}, skipped {skipped}, bad {len(bad)}, "
        f"{written / seconds if written else 0.0:.2f} images/s, in {args.out}",
        flush=True,
    )
    if len(bad) > args.max_bad_fraction * total:
        return fail(
            f"{len(bad)} of {total} images bad ({100 * len(bad) / total:.1f}%), more than "
            f"--max-bad-fraction {args.max_bad_fraction:g}; the good ones are written",
            code=1,
        )
    return 0


def _say(text: str, bar_on: bool) -> None:
    """A line on stderr that does not break a progress bar."""
    if bar_on:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def _quiet_ray_data(quiet: bool) -> None:
    """Ray Data's execution plans and progress bars off (on with --verbose); as
    components/training/trainer.quiet_ray_data, without importing Ray Train (Ray Data's
    console logging is quieted by pipelines._common.quiet_environment)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet


if __name__ == "__main__":
    sys.exit(main())
