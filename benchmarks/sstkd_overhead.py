"""What CDM + DTIEM add to a KD training step: time ratio and memory (issue 3's performance bar).

    python benchmarks/sstkd_overhead.py                       # the default config, CPU or GPU
    python benchmarks/sstkd_overhead.py --batch 16 --crop 96 model.width=0.5

Two methods on the same models and batches, interleaved step by step (alternating which goes
first) so machine noise hits both:
`kd` (CE + aux + pixel KD) and `kd + texture` (the same plus L_str and L_sta, i.e. SSTKD with the
adversarial term off). A step is teacher forward + student forward + losses + backward +
optimizer step. Memory: the bytes autograd saves for backward inside the two texture losses
(device-independent), and on CUDA the peak allocated memory of each step.
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
from components.distillation.texture import statistical_texture_loss
from components.models.build import build_model


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
    for label, extra in (("kd", ["method.name=kd"]), ("kd + texture", ["method.weights.adv=0"])):
        cfg = merge_config(None, [*args.overrides, *extra])
        torch.manual_seed(0)
        student = build_model(cfg.model, k).to(device)
        teacher = build_model(cfg.teacher.model, k).to(device).eval()
        method = build_method(cfg, student, teacher, num_classes=k).to(device)
        opt = torch.optim.SGD(method.trainable.parameters(), lr=0.01, momentum=0.9)
        methods[label] = (method, opt, cfg)

    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(args.batch, 3, args.crop, args.crop, generator=g).to(device),
        "mask": torch.randint(0, k, (args.batch, args.crop, args.crop), generator=g).to(device),
    }
    times: dict[str, list[float]] = {label: [] for label in methods}
    peaks: dict[str, int] = {}
    for step in range(args.steps + 5):
        # Alternate which method goes first, so neither always runs on the other's warm caches.
        order = list(methods.items()) if step % 2 == 0 else list(methods.items())[::-1]
        for label, (method, opt, _) in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            terms = method.training_step(batch)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
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
        kd_ms = 1000 * fn(times["kd"])
        tex_ms = 1000 * fn(times["kd + texture"])
        print(
            f"{stat:>16}: kd {kd_ms:7.1f} ms, kd + texture {tex_ms:7.1f} ms"
            f"  -> ratio {tex_ms / kd_ms:.3f}   ({args.steps} steps each)"
        )
    # Each step's two timings are taken back to back, so their ratio cancels the slow swings of
    # a shared machine's speed; the median of the per-step ratios and its interquartile range.
    paired = sorted(t / k for t, k in zip(times["kd + texture"], times["kd"]))
    q = len(paired) // 4
    print(
        f"{'paired ratio':>16}: median {statistics.median(paired):.3f}"
        f"  (interquartile {paired[q]:.3f} – {paired[-q - 1]:.3f})"
    )
    print(f"texture losses save {texture_bytes / 2**20:.2f} MiB for backward")
    if peaks:
        print(
            f"peak allocated: kd {peaks['kd'] / 2**20:.1f} MiB, "
            f"kd + texture {peaks['kd + texture'] / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
