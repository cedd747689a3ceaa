"""Evaluate a checkpoint on a shard dataset: per-class IoU, mIoU and pixel accuracy.

    python pipelines/evaluate.py --checkpoint outputs/<run name> --data data/synthetic
    python pipelines/evaluate.py --checkpoint outputs/<run>/epoch_0012 --data DIR --split val

`--checkpoint` takes a run folder (its latest complete checkpoint is used), a checkpoint folder
or a file inside one. Images are decoded by Ray Data tasks; the model runs in this process (on
the GPU when there is one).
"""

from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def main(argv: list[str] | None = None) -> int:
    from pipelines._common import fail, init_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    parser.add_argument("--data", required=True, help="dataset folder with dataset.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    from components.config import from_dict
    from components.data.ingest import eval_dataset
    from components.data.shards import DatasetError, DatasetInfo
    from components.metrics import format_table
    from components.models.build import build_model
    from components.training.checkpoint import CheckpointError, load_model_state, resolve_checkpoint
    from components.training.evaluation import predict_confusion

    try:
        folder = resolve_checkpoint(args.checkpoint)
        state, meta = load_model_state(folder)
        info = DatasetInfo.load(args.data)
        if meta["num_classes"] != info.num_classes:
            raise CheckpointError(
                f"{folder}: model predicts {meta['num_classes']} classes but "
                f"{args.data}/dataset.json has {info.num_classes}"
            )
        init_ray()
        dataset = eval_dataset(args.data, info, args.split)
    except (CheckpointError, DatasetError, ValueError) as e:
        return fail(str(e))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(from_dict({"model": meta["model"]}).model, info.num_classes)
    model.load_state_dict(state)
    model.to(device)
    batches = dataset.iter_torch_batches(
        batch_size=args.batch_size,
        dtypes={"image": torch.float32, "mask": torch.int64, "valid": torch.bool},
    )
    confusion = predict_confusion(model, batches, info.num_classes, info.ignore_index)
    rows = info.splits[args.split].rows
    print(f"checkpoint: {folder}\ndata: {args.data} [{args.split}, {rows} images]\n")
    print(format_table(confusion, info.class_names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
