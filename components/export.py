"""Export a model of ours to TorchScript and ONNX, and check the files against the eager model.

    net = LogitsAtInputSize(export_ready(model, onnx=True))   # image -> logits at the image size
    export_onnx(model, example, "out/model.onnx", opset=18)  # dynamic batch, height and width
    export_torchscript(model, example, "out/model_torchscript.pt")
    images = sample_images(512, 512)                          # (2, H, W, 3) uint8: photo, noise
    check = compare(reference_logits(model, x), run_onnx("out/model.onnx", x))

The exported network takes a float32 (N, 3, H, W) image normalised as in training
(`components.data.augment.normalize`: RGB on the 0-255 scale, minus the ImageNet mean, over its
std) and returns one tensor: the (N, K, H, W) class logits upsampled to the input size (bilinear,
align_corners=False), i.e. `components.inference.infer_logits` in `whole` mode. Any N, H, W work.

Two of our modules are made export-safe in a copy of the model (`export_ready`), with the same
weights and the same results:
- `AtrousConv2d` skips the off-centre taps of a dilated conv when the dilation is at least the map
  size (they only read padding). That is a Python branch on the input size: a trace would keep the
  branch of the example size for every size. The copy runs the full dilated conv, which gives the
  same numbers at any size (the shortcut is exact).
- `nn.AdaptiveAvgPool2d` to a grid of more than one bin (PSPNet's 2, 3, 6 bins) has no ONNX form
  for an input size unknown at export: the legacy exporter refuses it and the dynamo exporter
  writes fixed windows that are wrong at other sizes (measured: logits off by 1.4 at a second size).
  For ONNX the copy uses `AdaptiveAvgPool2dExport`, the same pooling written as two averaging
  matrices built from the input size. One bin (global pooling) exports as is.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model_torchscript.pt", "onnx": "model.onnx"}
EXPORTERS = ("auto", "dynamo", "legacy")
PREPROCESS_FILE = "preprocess.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DEFAULT_OPSET = 18  # the opset torch 2.13's dynamo exporter writes natively
# Max |logit difference| allowed between an exported file and the eager model: atol + rtol x the
# largest |logit|. Measured (docs/export.md): onnxruntime differs from eager torch by ~3e-6 of the
# logits' scale (1e-4 on a ResNet-18 DeepLabV3 whose logits reach 31), TorchScript by 0; a real
# export bug (a size baked in, a wrong operator) gives differences of 1e-1 and more.
DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-5


class ExportError(RuntimeError):
    """An export that could not be written (a missing package, an unsupported operator)."""


class LogitsAtInputSize(nn.Module):
    """model(image)["logits"] upsampled to the image size: one (N, K, H, W) tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        logits = self.model(image)["logits"]
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


class AdaptiveAvgPool2dExport(nn.Module):
    """`nn.AdaptiveAvgPool2d(bins)` as y = P_h x P_w^T, with P the averaging matrices of the
    windows PyTorch uses (bin i covers [floor(i H / n), ceil((i + 1) H / n))), built from the
    input size at run time so the exported graph works at any size."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        bins = (output_size, output_size) if isinstance(output_size, int) else output_size
        self.bins = (int(bins[0]), int(bins[1]))

    @staticmethod
    def _matrix(size, bins: int, like: Tensor) -> Tensor:
        i = torch.arange(bins, device=like.device)
        start = (i * size) // bins
        end = ((i + 1) * size + bins - 1) // bins
        pos = torch.arange(size, device=like.device)
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
        weights = inside.to(like.dtype)
        return weights / weights.sum(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, bins_h, bins_w)."""
        rows = self._matrix(x.shape[-2], self.bins[0], x)  # (bins_h, H)
        cols = self._matrix(x.shape[-1], self.bins[1], x)  # (bins_w, W)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def export_ready(model: nn.Module, onnx: bool = False) -> nn.Module:
    """A copy of `model` in eval mode whose forward has no branch on the input size (and, with
    `onnx`, no adaptive pooling to several bins); same weights, same outputs."""
    from components.models.heads import AtrousConv2d

    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, AtrousConv2d):
            module.__class__ = nn.Conv2d  # the full dilated conv; same parameters
        elif onnx and isinstance(module, nn.AdaptiveAvgPool2d):
            size = module.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if size != (1, 1) and None not in size:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, AdaptiveAvgPool2dExport(size))
    return model


# --- inputs ---------------------------------------------------------------------------------


def sample_images(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(2, H, W, 3) uint8: scikit-image's astronaut photo resized to H x W, then uniform noise."""
    from skimage.data import astronaut
    from skimage.transform import resize

    photo = resize(astronaut(), (height, width), order=1, preserve_range=True, anti_aliasing=True)
    photo = np.clip(np.rint(photo), 0, 255).astype(np.uint8)
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.stack([photo, noise])


def normalized(images: np.ndarray) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, as the model was trained."""
    from components.data.augment import normalize

    return torch.from_numpy(normalize(images))


def second_size(height: int, width: int) -> tuple[int, int]:
    """Another input size, different in both dimensions and odd, for the dynamic-shape check."""
    return height * 3 // 4 + 1, width * 5 // 4 + 3


# --- export ---------------------------------------------------------------------------------


def resolve_exporter(exporter: str) -> str:
    """`auto` -> `dynamo` (torch's default since 2.9; needs onnxscript) when onnxscript is
    installed, else `legacy` (the TorchScript-based exporter, deprecated in torch)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter != "auto":
        return exporter
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "legacy"
    return "dynamo"


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporters' notices (tracer warnings on size checks that are constant per
    module, the legacy exporter's deprecation, the dynamo exporter's torchvision lines)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_torchscript(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Trace `LogitsAtInputSize(export_ready(model))` on `example` (N, 3, H, W) and save it.
    Sizes are read from the input in the traced graph, so the file works at any N, H, W."""
    net = LogitsAtInputSize(export_ready(model)).eval()
    with torch.no_grad(), _quiet_export():
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(str(path))
    return Path(path)


def export_onnx(
    model: nn.Module,
    example: Tensor,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> tuple[Path, str]:
    """Write `LogitsAtInputSize(export_ready(model, onnx=True))` as one ONNX file (weights
    inside: fine below ONNX's 2 GB protobuf limit) with dynamic batch, height and width.
    Returns (path, the exporter used)."""
    exporter = resolve_exporter(exporter)
    net = LogitsAtInputSize(export_ready(model, onnx=True)).eval()
    names = {0: "batch", 2: "height", 3: "width"}
    common = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset,
    }
    try:
        import onnx  # noqa: F401  (both exporters write through it)
    except ImportError as e:
        raise ExportError(
            "ONNX export needs the onnx package: pip install 'segdistill[export]'"
        ) from e
    try:
        with torch.no_grad(), _quiet_export():
            if exporter == "dynamo":
                try:
                    import onnxscript  # noqa: F401
                except ImportError as e:
                    raise ExportError(
                        "the dynamo ONNX exporter needs onnxscript: pip install "
                        "'segdistill[export]' (or use the legacy exporter)"
                    ) from e
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                    dynamic_shapes={INPUT_NAME: names},
                    **common,
                )
            else:
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={INPUT_NAME: names, OUTPUT_NAME: names},
                    do_constant_folding=True,
                    **common,
                )
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types; keep the first lines
        first = " ".join(str(e).splitlines()[:3])[:500]
        raise ExportError(f"ONNX export ({exporter}) failed: {type(e).__name__}: {first}") from e
    written = onnx_opset(path)
    if written != opset:
        raise ExportError(
            f"asked for opset {opset} but the {exporter} exporter wrote opset {written} to {path}"
            + (
                " (it writes 18 and up; --exporter legacy writes older opsets)"
                if opset < 18
                else ""
            )
        )
    return Path(path), exporter


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset the ONNX file declares."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# --- running the files ----------------------------------------------------------------------


def reference_logits(model: nn.Module, x: Tensor) -> np.ndarray:
    """The eager model's logits at the input size, as evaluation computes them."""
    from components.inference import infer_logits

    return infer_logits(model.eval(), x).numpy()


def run_torchscript(path: str | Path, x: Tensor) -> np.ndarray:
    net = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return net(x).numpy()


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (`threads`: intra-op threads; None = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, x: Tensor) -> np.ndarray:
    session = onnx_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


RUNNERS = {"torchscript": run_torchscript, "onnx": run_onnx}


@dataclass
class Check:
    """One comparison of an exported file with the eager model on a batch of inputs."""

    format: str
    height: int
    width: int
    batch: int
    max_abs_diff: float
    argmax_agreement: float  # % of pixels with the same class
    max_abs_logit: float  # the eager logits' scale, to read the difference against
    atol: float
    rtol: float = 0.0

    @property
    def allowed(self) -> float:
        """atol + rtol x the largest |logit| of the eager model."""
        return self.atol + self.rtol * self.max_abs_logit

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.allowed

    def line(self) -> str:
        verdict = "ok" if self.ok else f"FAILED (> {self.allowed:.3g} allowed)"
        return (
            f"{self.format:<11} {self.height}x{self.width} batch {self.batch}: "
            f"max |logit diff| {self.max_abs_diff:.3g} (logits up to {self.max_abs_logit:.3g}), "
            f"argmax agreement {self.argmax_agreement:.3f}%  {verdict}"
        )

    def to_dict(self) -> dict:
        return dict(asdict(self), allowed=self.allowed, ok=self.ok)


def compare(
    fmt: str, reference: np.ndarray, output: np.ndarray, atol: float, rtol: float = 0.0
) -> Check:
    """`output` of an exported file against the eager `reference`, both (N, K, H, W)."""
    n, _, h, w = reference.shape
    scale = float(np.abs(reference).max())
    if output.shape != reference.shape:
        return Check(fmt, h, w, n, math.inf, 0.0, scale, atol, rtol)
    diff = np.abs(output.astype(np.float64) - reference.astype(np.float64))
    max_diff = float(diff.max()) if np.isfinite(diff).all() else math.inf
    agree = float((output.argmax(1) == reference.argmax(1)).mean() * 100)
    return Check(fmt, h, w, n, max_diff, agree, scale, atol, rtol)


def verify(
    model: nn.Module,
    fmt: str,
    path: str | Path,
    sizes: list[tuple[int, int]],
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> list[Check]:
    """Run the exported file at each (H, W) on a batch of two (the photo and noise) and compare
    it with the eager model."""
    checks = []
    for height, width in sizes:
        x = normalized(sample_images(height, width))
        ref = reference_logits(model, x)
        checks.append(compare(fmt, ref, RUNNERS[fmt](path, x), atol, rtol))
    return checks


# --- the description beside the files -------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_palette(num_classes: int) -> list[list[int]]:
    """The Pascal VOC colour map (black, then colours spread over the bits of the class id)."""
    from components.data.sources.common import voc_colormap

    return voc_colormap(num_classes)


def preprocess_info(meta: dict, files: dict[str, dict], checks: list[Check], opset: int | None):
    """The contents of preprocess.json: what a user of the files needs, without this project."""
    from components.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from components.training.checkpoint import MODEL_FILE

    folder = Path(meta["folder"])
    k = int(meta["num_classes"])
    names = meta.get("class_names") or [f"class_{i}" for i in range(k)]
    palette = meta.get("palette")
    versions = {"torch": torch.__version__}
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return {
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channel_order": "RGB",
            "value_range": [0, 255],
            "mean": [round(float(v), 4) for v in IMAGENET_MEAN],
            "std": [round(float(v), 4) for v in IMAGENET_STD],
            "normalize": "x = (pixel - mean) / std per channel, pixel in 0-255; HWC -> CHW",
            "dynamic": ["batch", "height", "width"],
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", "num_classes", "height", "width"],
            "meaning": "class logits at the input size (bilinear upsampling, align_corners="
            "False); argmax over num_classes gives the class id of each pixel",
        },
        "num_classes": k,
        "class_names": list(names),
        "palette": palette if palette else default_palette(k),
        "palette_source": "checkpoint" if palette else "generated (Pascal VOC colour map)",
        "ignore_index": int(meta.get("ignore_index", 255)),
        "opset": opset,
        "files": files,
        "source": {
            "checkpoint": str(folder),
            "file": str(folder / MODEL_FILE),
            "sha256": sha256_file(folder / MODEL_FILE),
            "model": meta.get("model"),
            "metrics": {key: v for key, v in (meta.get("metrics") or {}).items() if key == "miou"},
        },
        "verification": [c.to_dict() for c in checks],
        "exported_with": versions,
    }


__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "EXPORTERS",
    "FILES",
    "FORMATS",
    "PREPROCESS_FILE",
    "AdaptiveAvgPool2dExport",
    "Check",
    "ExportError",
    "LogitsAtInputSize",
    "compare",
    "export_onnx",
    "export_ready",
    "export_torchscript",
    "normalized",
    "onnx_opset",
    "onnx_session",
    "preprocess_info",
    "reference_logits",
    "resolve_exporter",
    "run_onnx",
    "run_torchscript",
    "sample_images",
    "second_size",
    "sha256_file",
    "verify",
]
