"""Export a checkpoint to TorchScript and ONNX, verified against the eager model.

    python pipelines/export.py --checkpoint outputs/<run name> --out exports/<name>
    python pipelines/export.py --checkpoint RUN --out DIR --format onnx --height 512 --width 1024 \
        --opset 18 --atol 1e-3 --exporter legacy

Writes into `--out`: `model_torchscript.pt` (torch.jit.trace; load with `torch.jit.load`),
`model.onnx` (dynamic batch, height and width; one file, weights inside) and `preprocess.json`
(normalisation, channel order, class names, palette, ignore index, the output's meaning, the
opset, the source checkpoint and its SHA-256), so the files can be used without this project
(docs/export.md has a numpy + PIL + onnxruntime example).

Both networks take the normalised (N, 3, H, W) float32 image and return the (N, K, H, W) logits
upsampled to the input size (bilinear, align_corners=False), as evaluation computes them. Each
file is checked after export, reloaded (`torch.jit.load`; onnxruntime on CPU) and run on a batch
of two inputs (scikit-image's astronaut photo resized to H x W, and uniform noise) at H x W and at
a second, odd size: the max |logit difference| with the eager model and the argmax agreement are
printed. A difference above `--atol` + `--rtol` x the largest |logit| (1e-3 + 1e-5 x ~30 for a
trained model: docs/export.md says why) exits 1 naming it (preprocess.json is then not written).

`--exporter` picks torch's ONNX exporter: `dynamo` (torch.export based, torch's default; needs
onnxscript), `legacy` (TorchScript based, deprecated in torch) or `auto` (dynamo when onnxscript
is installed). `--checkpoint` takes a run folder (its newest complete checkpoint), a checkpoint
folder or a file inside one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

if __package__ in (None, ""):
    import _common  # noqa: F401  (puts the project root on sys.path)


def _formats(text: str) -> list[str]:
    from components.export import FORMATS

    chosen = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"formats are a comma-separated list of {', '.join(FORMATS)}, got {text!r}"
        )
    return list(dict.fromkeys(chosen))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from components.export import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL, EXPORTERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    parser.add_argument("--out", required=True, help="folder for the files (created)")
    parser.add_argument(
        "--format", type=_formats, default=["torchscript", "onnx"], help="torchscript,onnx"
    )
    parser.add_argument("--height", type=int, default=512, help="example input height (px)")
    parser.add_argument("--width", type=int, default=512, help="example input width (px)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help="max |logit difference| allowed against the eager model, plus --rtol x the "
        "largest |logit| (docs/export.md)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=DEFAULT_RTOL,
        help="the part of the allowed difference proportional to the logits' scale",
    )
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto", help="ONNX exporter")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines._common import fail

    args = parse_args(argv)
    if args.height < 32 or args.width < 32:
        return fail(f"--height and --width must be at least 32 px, got {args.height}x{args.width}")
    if not args.atol > 0 or not args.rtol >= 0:
        return fail(f"--atol must be > 0 and --rtol >= 0, got {args.atol} and {args.rtol}")

    from components.export import (
        FILES,
        PREPROCESS_FILE,
        ExportError,
        export_onnx,
        export_torchscript,
        normalized,
        onnx_opset,
        preprocess_info,
        sample_images,
        second_size,
        sha256_file,
        verify,
    )
    from components.models.checkpointed import load_checkpoint_model
    from components.training.checkpoint import CheckpointError

    try:
        model, meta = load_checkpoint_model(args.checkpoint, "cpu")
    except CheckpointError as e:
        return fail(str(e))
    if "onnx" in args.format:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return fail(
                "checking the ONNX file needs onnxruntime: pip install 'segdistill[export]'"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = normalized(sample_images(args.height, args.width)[:1])
    sizes = [(args.height, args.width), second_size(args.height, args.width)]
    print(f"checkpoint: {meta['folder']} ({getattr(model, 'name', type(model).__name__)})")
    print(
        f"example input 1x3x{args.height}x{args.width}; checked at "
        + ", ".join(f"{h}x{w}" for h, w in sizes)
        + " on batches of 2 (astronaut photo, noise)"
    )

    files, checks, opset = {}, [], None
    for fmt in args.format:
        path = out / FILES[fmt]
        start = time.perf_counter()
        try:
            if fmt == "torchscript":
                export_torchscript(model, example, path)
                entry = {"exporter": "torch.jit.trace"}
            else:
                _, exporter = export_onnx(model, example, path, args.opset, args.exporter)
                opset = onnx_opset(path)
                entry = {"exporter": f"torch.onnx.export ({exporter})", "opset": opset}
        except ExportError as e:
            return fail(str(e))
        seconds = time.perf_counter() - start
        entry = {"file": path.name, **entry, "bytes": path.stat().st_size}
        entry["sha256"] = sha256_file(path)
        files[fmt] = entry
        print(
            f"\n{fmt}: {path} ({entry['bytes'] / 1e6:.1f} MB, {entry['exporter']}, {seconds:.1f} s)"
        )
        for check in verify(model, fmt, path, sizes, args.atol, args.rtol):
            checks.append(check)
            print("  " + check.line())

    failed = [c for c in checks if not c.ok]
    if failed:
        worst = max(failed, key=lambda c: c.max_abs_diff)
        return fail(
            f"{worst.format} at {worst.height}x{worst.width}: max |logit diff| "
            f"{worst.max_abs_diff:.3g} > {worst.allowed:.3g} allowed (--atol {args.atol:g} + "
            f"--rtol {args.rtol:g} x max |logit| {worst.max_abs_logit:.3g}); {len(failed)} of "
            f"{len(checks)} checks failed; the files are kept in {out} for inspection, "
            f"{PREPROCESS_FILE} is not written",
            code=1,
        )
    info = preprocess_info(meta, files, checks, opset)
    (out / PREPROCESS_FILE).write_text(json.dumps(info, indent=2) + "\n")
    worst = max(c.max_abs_diff for c in checks)
    print(
        f"\nall {len(checks)} checks within --atol {args.atol:g} + --rtol {args.rtol:g} x max "
        f"|logit| (largest difference {worst:.3g}); {out / PREPROCESS_FILE} written"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
