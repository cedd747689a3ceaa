"""Evaluate a checkpoint on a shard dataset: per-class IoU, mIoU and pixel accuracy.

    python pipelines/evaluate.py --checkpoint outputs/<run name> --data data/synthetic
    python pipelines/evaluate.py --checkpoint outputs/<run>/epoch_0012 --data DIR --split val
    python pipelines/evaluate.py --checkpoint RUN --data DIR --mode slide --crop 512,1024 \
        --stride 341,683 --scales 0.75,1.0,1.25 --flip --boundary-width 3

`--checkpoint` takes a run folder (its latest complete checkpoint is used), a checkpoint folder
or a file inside one, or a bare state_dict file (a released model in our layout, CIRKD's,
torchvision's, mmsegmentation's or SegFormer's; components/models/convert.py) whose architecture
a config's `model` section and/or `model.*` overrides describe:

    python pipelines/evaluate.py --checkpoint deeplabv3_resnet101_citys_best_model.pth \
        --data data/cityscapes model.backbone=resnet101 model.variant=cirkd Images are decoded by Ray Data tasks; the model runs in this process (on
the GPU when there is one).

The evaluation mode (components/inference.py): `whole` image (the default, as during training)
or `slide` windows of `--crop` every `--stride` pixels (H,W); `--scales` resize the image by each
factor and `--flip` adds its mirror image, the passes' logits averaged. `--boundary-width D` adds
boundary IoU (bands of D pixels around each class's contours). The row-normalised confusion
matrix is written as a PNG (`--confusion-png`, by default next to the checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def main(argv: list[str] | None = None) -> int:
    from pipelines._common import fail, init_ray, quiet_environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    parser.add_argument("--data", required=True, help="dataset folder with dataset.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole")
    parser.add_argument("--crop", type=_pair, help="slide window H,W (or one number for both)")
    parser.add_argument("--stride", type=_pair, help="slide step H,W (each <= the crop)")
    parser.add_argument("--scales", type=_scales, default=(1.0,), help="e.g. 0.5,0.75,1.0")
    parser.add_argument("--flip", action="store_true", help="add the horizontally flipped image")
    parser.add_argument("--boundary-width", type=int, metavar="D", help="boundary IoU band (px)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own output too")
    parser.add_argument(
        "--config", help="for a bare state_dict file: a config whose `model` section describes it"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="for a bare state_dict file: model.* overrides (model.variant=cirkd)",
    )
    parser.add_argument(
        "--confusion-png",
        metavar="PATH",
        help="where to write the confusion-matrix PNG (default: confusion_<split>.png in the "
        "checkpoint folder; 'none' to skip)",
    )
    args = parser.parse_args(argv)

    import torch

    from components.config import merge_config
    from components.data.device import model_batch
    from components.data.ingest import eval_dataset
    from components.data.shards import DatasetError, DatasetInfo
    from components.inference import EvalMode
    from components.metrics import confusion_png, format_table
    from components.models.checkpointed import load_checkpoint_model
    from components.training.checkpoint import CheckpointError
    from components.training.evaluation import evaluate_counts
    from components.training.progress import Bar, iterate
    from components.training.trainer import quiet_ray_data

    try:
        mode = EvalMode(args.mode, args.crop, args.stride, args.scales, args.flip)
        if args.boundary_width is not None and args.boundary_width < 1:
            raise ValueError(f"--boundary-width must be >= 1 pixel, got {args.boundary_width}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        info = DatasetInfo.load(args.data)
        model_cfg = None
        if args.config or args.overrides:
            bad = [o for o in args.overrides if not o.startswith("model.")]
            if bad:
                raise ValueError(f"only model.* overrides describe a checkpoint, got {bad}")
            model_cfg = merge_config(args.config, args.overrides).model
        model, meta = load_checkpoint_model(args.checkpoint, device, model_cfg, info.num_classes)
        folder = Path(meta["folder"])
        if meta["num_classes"] != info.num_classes:
            raise CheckpointError(
                f"{folder}: model predicts {meta['num_classes']} classes but "
                f"{args.data}/dataset.json has {info.num_classes}"
            )
        if args.split not in info.splits:
            raise DatasetError(
                f"{args.data}/dataset.json has no split '{args.split}' (has {sorted(info.splits)})"
            )
        quiet_environment(args.verbose)
        init_ray(dashboard=False)  # no Train worker group to clean up (init_ray's docstring)
        quiet_ray_data(not args.verbose)
        dataset = eval_dataset(args.data, info, args.split)
    except (CheckpointError, DatasetError, ValueError) as e:  # ConfigError is a ValueError
        return fail(str(e))

    batches = dataset.iter_torch_batches(
        batch_size=args.batch_size,
        dtypes={"image": torch.uint8, "mask": torch.uint8, "valid": torch.bool},
    )
    batches = map(model_batch, batches)
    rows = info.splits[args.split].rows
    bar = Bar(f"evaluating {args.split}", rows, "img", enabled=sys.stderr.isatty())
    batches = iterate(batches, bar, lambda b: len(b["mask"]))
    counts = evaluate_counts(
        model,
        batches,
        info.num_classes,
        info.ignore_index,
        mode=mode,
        boundary_width=args.boundary_width,
    )
    print(f"checkpoint: {folder}\ndata: {args.data} [{args.split}, {rows} images]")
    print(f"mode: {mode.describe()}")
    if counts.boundary is not None:
        print(f"boundary IoU: bands of {counts.boundary_width} px around each class's contours")
    print()
    print(format_table(counts.confusion, info.class_names, counts.boundary, counts.boundary_width))
    png = args.confusion_png or str(folder / f"confusion_{args.split}.png")
    if png.lower() != "none":
        try:
            Path(png).parent.mkdir(parents=True, exist_ok=True)
            Path(png).write_bytes(confusion_png(counts.confusion, info.class_names))
            print(f"\nconfusion matrix: {png}")
        except OSError as e:
            print(f"warning: confusion matrix PNG not written ({e})", file=sys.stderr)
    return 0


def _pair(text: str) -> tuple[int, int]:
    """'512,1024' -> (512, 1024); '512' -> (512, 512)."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W in pixels, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W in pixels, got {text!r}")
    return values[0], values[1]


def _scales(text: str) -> tuple[float, ...]:
    """'0.5,0.75,1.0' -> (0.5, 0.75, 1.0)."""
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected factors like 0.5,1.0, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
