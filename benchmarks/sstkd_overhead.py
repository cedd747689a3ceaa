"""What CDM + DTIEM add to a KD training step: time ratio and memory (issue 3's performance bar).

    python benchmarks/sstkd_overhead.py                       # the default config, CPU or GPU
    python benchmarks/sstkd_overhead.py --batch 16 --crop 96 model.width=0.5

Three arms on the same models and batches, interleaved step by step (rotating which goes first)
so machine noise hits all: `kd` (CE + aux + pixel KD), `kd + texture` (the same plus the 1x1
adapter, L_str and L_sta, i.e. SSTKD with the adversarial term off) and `kd + adapter` (that
method with L_str and L_sta stubbed to a zero term, so only the adapter's cost remains). A step
is teacher forward + student forward + losses + backward + optimizer step. Memory: the bytes
autograd saves for backward inside the two texture losses (device-independent), and on CUDA the
peak allocated memory of each step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import merge_config
from components.distillation.build import build_method
from components.distillation.contourlet import structural_texture_loss
from components.distillation.term import Term
from components.distillation.texture import statistical_texture_loss
from components.models.build import build_model
from components.training.core import train_step
from components.training.schedule import build_optimizer


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _zero_term(student: torch.Tensor, teacher: torch.Tensor, view, state) -> torch.Tensor:
    return (student * 0).sum()


# L_str and L_sta as a zero term on the adapted student map: a method with these keeps the
# 1x1 conv + BN adapter's forward and backward and nothing else of the texture modules, so
# `kd + texture` over it is the cost of CDM + DTIEM alone.
ZERO_LOW = Term(_zero_term, feature="low")


def stub_texture(method) -> None:
    """Replace this method's texture terms (only its own; the table is not touched)."""
    for name in ("structural", "statistical"):
        method.terms[name] = ZERO_LOW


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = 5
    methods = {}
    arms = (
        ("kd", ["method.name=kd"]),
        ("kd + adapter", ["method.weights.adversarial=0"]),  # texture losses stubbed out
        ("kd + texture", ["method.weights.adversarial=0"]),
    )
    for label, extra in arms:
        cfg = merge_config(None, [*args.overrides, *extra])
        torch.manual_seed(0)
        student = build_model(cfg.model, k).to(device)
        teacher = build_model(cfg.teacher.model, k).to(device).eval()
        method = build_method(cfg, student, teacher, num_classes=k).to(device)
        if label == "kd + adapter":
            stub_texture(method)
        opt = build_optimizer(method.trainable, cfg.optim)
        methods[label] = (method, opt, cfg)

    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(args.batch, 3, args.crop, args.crop, generator=g).to(device),
        "mask": torch.randint(0, k, (args.batch, args.crop, args.crop), generator=g).to(device),
    }
    times: dict[str, list[float]] = {label: [] for label in methods}
    peaks: dict[str, int] = {}
    for step in range(args.steps + 5):
        # Rotate which method goes first, so none always runs on another's warm caches.
        items = list(methods.items())
        order = items[step % 3 :] + items[: step % 3]
        for label, (method, opt, _) in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_step(method, batch, opt)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[label] = torch.cuda.max_memory_allocated()
            if step >= 5:  # warm-up
                times[label].append(time.perf_counter() - t0)

    method, _, cfg = methods["kd + texture"]
    with torch.no_grad():
        t_low = method.teacher(batch["image"])["features"]["low"]
    s_low = method.trainable(batch["image"])["adapted"]["low"]
    c, d = cfg.method.cdm, cfg.method.dtiem
    texture_bytes = saved_bytes(
        lambda: (
            structural_texture_loss(s_low, t_low, c.levels, c.directions)
            + statistical_texture_loss(s_low, t_low, d.levels, d.iterations, d.clip)
        )
    )
    print(
        f"device {device}, batch {args.batch}x3x{args.crop}x{args.crop}, low map {tuple(s_low.shape)}"
    )
    # Noise on a shared machine only ever adds time (preemption, page faults), so the fastest
    # steps estimate the cost best; the median is printed too.
    for stat, fn in (
        ("min", min),
        ("25th percentile", lambda t: sorted(t)[len(t) // 4]),
        ("median", statistics.median),
    ):
        kd_ms, ad_ms, tex_ms = (1000 * fn(times[label]) for label in methods)
        print(
            f"{stat:>16}: kd {kd_ms:6.1f} ms, kd + adapter {ad_ms:6.1f} ms, kd + texture "
            f"{tex_ms:6.1f} ms -> ratio {tex_ms / kd_ms:.3f} ({args.steps} steps each)"
        )
    # Each step's timings are taken back to back, so their ratio cancels the slow swings of a
    # shared machine's speed; the median of the per-step ratios and its interquartile range.
    for name, num, den in (
        ("paired ratio", "kd + texture", "kd"),
        ("CDM + DTIEM only", "kd + texture", "kd + adapter"),
    ):
        paired = sorted(a / b for a, b in zip(times[num], times[den]))
        q = len(paired) // 4
        print(
            f"{name:>16}: median {statistics.median(paired):.3f}"
            f"  (interquartile {paired[q]:.3f} – {paired[-q - 1]:.3f})   {num} / {den}"
        )
    print(f"texture losses save {texture_bytes / 2**20:.2f} MiB for backward")
    if peaks:
        print("peak allocated: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peaks.items()))


if __name__ == "__main__":
    main()
