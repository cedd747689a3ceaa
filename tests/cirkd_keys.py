"""Key/shape listings of CIRKD's networks, written from its code (winycg/CIRKD at 7e0d21f,
models/deeplabv3.py, deeplabv3_mobile.py): shared by the model tests that build CIRKD-layout
state_dicts (tests/models/test_cirkd_models.py, test_mobilenet.py)."""

from __future__ import annotations


def bn(out: dict, name: str, c: int) -> None:
    """A BatchNorm2d's five state_dict entries."""
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{leaf}"] = (c,)
    out[f"{name}.num_batches_tracked"] = ()


def deeplabv3_head(out: dict, cin: int, nclass: int, c: int = 128) -> None:
    """CIRKD's `_DeepLabHead`: ASPP (1x1, three 3x3, image pooling, projection) at `c`
    channels over `cin` input channels, then a 3x3 block and the classifier."""
    out["head.aspp.b0.0.weight"] = (c, cin, 1, 1)
    bn(out, "head.aspp.b0.1", c)
    for j in (1, 2, 3):
        out[f"head.aspp.b{j}.block.0.weight"] = (c, cin, 3, 3)
        bn(out, f"head.aspp.b{j}.block.1", c)
    out["head.aspp.b4.gap.1.weight"] = (c, cin, 1, 1)
    bn(out, "head.aspp.b4.gap.2", c)
    out["head.aspp.project.0.weight"] = (c, 5 * c, 1, 1)
    bn(out, "head.aspp.project.1", c)
    out["head.block.0.weight"] = (c, c, 3, 3)
    bn(out, "head.block.1", c)
    out["head.block.4.weight"] = (nclass, c, 1, 1)
    out["head.block.4.bias"] = (nclass,)
