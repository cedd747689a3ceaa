"""The model report: parameters, FLOPs, latency, throughput, peak memory and mIoU of a student
(and its teacher, side by side with the student / teacher ratio).

    python pipelines/report.py --student outputs/<student run> --teacher outputs/<teacher run>
    python pipelines/report.py --student RUN --height 512 --width 1024 --runs 20 --batch 8 \
        --data data/cityscapes --split val --out reports/r18

Measured on this machine at the input size: FLOPs with torch's FlopCounterMode (2 FLOPs per
multiply-add; GMACs = half), latency (median and 90th percentile of `--runs` batch-1 passes
after `--warmup`) and throughput (batch `--batch`) of the eager model on the CPU and, when there
is one, the GPU; the latency of the model exported to ONNX and run by onnxruntime (when it is
installed; `--no-onnx` skips it); the forward pass's peak memory (CPU: resident-memory growth in
a fresh process, `--no-memory` skips it; GPU: torch.cuda.max_memory_allocated); and the mIoU the
checkpoint's meta.json records (`metrics.miou`), plus mIoU measured on `--data`'s `--split` when
given (decoded here, no Ray). What each number counts and its limits: components/model_report.py.

Writes `model_report.md` and `model_report.json` to `--out` (default: the student's run folder,
i.e. the folder given when it is a run folder, else the checkpoint folder's parent) and prints
the Markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from components.export import EXPORTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="run folder, checkpoint folder or file")
    parser.add_argument("--teacher", help="the teacher's run folder, checkpoint folder or file")
    parser.add_argument("--height", type=int, default=512, help="input height (px)")
    parser.add_argument("--width", type=int, default=1024, help="input width (px)")
    parser.add_argument("--runs", type=int, default=10, help="timed passes per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the throughput")
    parser.add_argument("--data", help="dataset folder (dataset.json): also measure mIoU")
    parser.add_argument("--split", default="val", help="split of --data to measure mIoU on")
    parser.add_argument("--eval-batch", type=int, default=8, help="batch size of that evaluation")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime latency")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak memory")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto", help="ONNX exporter")
    parser.add_argument("--out", help="folder for model_report.md/.json (default: student's run)")
    return parser.parse_args(argv)


def default_out(student: str) -> Path:
    """The student's run folder: the folder given if it holds no meta.json (a run folder), else
    the parent of the checkpoint folder."""
    from components.training.checkpoint import META_FILE, resolve_checkpoint

    given = Path(student)
    if given.is_dir() and not (given / META_FILE).is_file():
        return given
    return resolve_checkpoint(student).parent


def main(argv: list[str] | None = None) -> int:
    from pipelines._common import fail

    args = parse_args(argv)
    for flag in ("height", "width"):
        if getattr(args, flag) < 32:
            return fail(f"--{flag} must be at least 32 px, got {getattr(args, flag)}")
    for flag in ("runs", "batch", "eval_batch"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        return fail(f"--warmup must be >= 0, got {args.warmup}")

    from components.data.shards import DatasetError
    from components.model_report import Settings, build_report, measure_models, write_report
    from components.training.checkpoint import CheckpointError

    settings = Settings(
        height=args.height,
        width=args.width,
        runs=args.runs,
        warmup=args.warmup,
        batch=args.batch,
        onnx=not args.no_onnx,
        memory=not args.no_memory,
        exporter=args.exporter,
        data=args.data,
        split=args.split,
        eval_batch=args.eval_batch,
    )
    paths = {"teacher": args.teacher, "student": args.student}
    paths = {role: path for role, path in paths.items() if path is not None}
    try:
        out = Path(args.out) if args.out else default_out(args.student)
        rows = measure_models(paths, settings, log=lambda line: print(line, flush=True))
    except (CheckpointError, DatasetError) as e:
        return fail(str(e))
    report = build_report(rows, settings)
    md, js = write_report(report, out)
    print()
    print(md.read_text(), end="")
    print(f"\nwritten: {md}, {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
