"""Whole-network checkpoints saved in another code base's layout, renamed to ours.

    state = convert_state_dict(torch.load(path, weights_only=True), model)
    model.load_state_dict(state)

Layouts recognised (tried in this order):

- "segdistill": ours (`backbone.*`, `head.*`, `aux_head.*`); returned unchanged but for a DDP
  "module." prefix, so the strict load that follows reports any difference as before.
- "cirkd": a state_dict saved by winycg/CIRKD's train scripts (`pretrained.*` for the ResNetV1s
  backbone, `head.*`, `auxlayer.*`), e.g. its released `deeplabv3_resnet101_citys_best_model.pth`
  and the students. It fits a model built with `variant: cirkd` (and the head widths of the
  code that saved it: `head_channels` / `aux_channels`). Names, after CIRKD's models/segbase.py
  (`self.pretrained`, line 24), models/deeplabv3.py (`_DeepLabHead`, `_ASPP`, `_FCNHead`) and
  models/pspnet.py (`_PSPHead`, `_PyramidPooling`) at commit 7e0d21f:

      pretrained.X                      -> backbone.X
      head.aspp.b0.{0,1}.               -> head.aspp.branches.0.{0,1}.
      head.aspp.b{1,2,3}.block.{0,1}.   -> head.aspp.branches.{1,2,3}.{0,1}.
      head.aspp.b4.gap.{1,2}.           -> head.aspp.branches.4.conv.{0,1}.   (gap.0 is the pool)
      head.aspp.project.{0,1}.          -> head.aspp.project.0.{0,1}.
      head.block.{0,1}. (DeepLabV3)     -> head.conv.{0,1}.
      head.block.4. (DeepLabV3)         -> head.classifier.                   (block.3: dropout)
      head.psp.conv{1..4}.{0,1}.        -> head.stages.{0..3}.conv.{0,1}.
      head.block.{0,1}. (PSPNet)        -> head.bottleneck.{0,1}.
      head.classifier. (PSPNet)         -> head.classifier.
      auxlayer.block.{0,1}.             -> aux_head.conv.{0,1}.
      auxlayer.block.4.                 -> aux_head.classifier.
      pretrained.net.features.0.{0,1}.  -> backbone.features.0.{0,1}.          (MobileNetV2)
      pretrained.net.features.{i}.conv.{j}. -> backbone.features.{i}.conv.{j'}. (torchvision's
          nesting: block 1 j 0,1,3,4 -> 0.0, 0.1, 1, 2; blocks 2-17 j 0,1,3,4,6,7 -> 0.0, 0.1,
          1.0, 1.1, 2, 3; components/models/mobilenet.py `cirkd_block_key`)

A converted file that leaves a model tensor out, holds one in another shape, or has a tensor the
model has no place for is a ValueError naming them, unless `partial` (then only the tensors
that fit are returned; load them with strict=False). A file in none of the layouts is a
ValueError naming its first keys and the layouts tried.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from components.models.heads import PSPHead
from components.models.mobilenet import cirkd_block_key

_SHOW = 5


def _mobilenet_block(m: re.Match, key: str) -> str | None:
    """pretrained.net.features.{i}.conv.{j}.X (CIRKD) -> backbone.features.{i}.conv.{j'}.X."""
    sub = cirkd_block_key(int(m.group(1)), int(m.group(2)))
    return None if sub is None else f"backbone.features.{m.group(1)}.conv.{sub}." + key[m.end() :]


# (pattern, replacement) on a CIRKD key; the first match wins. DeepLabV3 and PSPNet both name
# their head's conv block `head.block`, so the rules depend on the head the model has.
_CIRKD_COMMON = (
    # MobileNetV2 (models/base_models/mobilenetv2.py: `MobileNetV2Dilated.net`): the stem keeps
    # its names, the blocks' flat `conv.{j}` become torchvision's nesting (mobilenet.py).
    (r"^pretrained\.net\.features\.0\.([01])\.", r"backbone.features.0.\1."),
    (r"^pretrained\.net\.features\.(\d+)\.conv\.(\d+)\.", _mobilenet_block),
    (r"^pretrained\.", "backbone."),
    (r"^auxlayer\.block\.([01])\.", r"aux_head.conv.\1."),
    (r"^auxlayer\.block\.4\.", "aux_head.classifier."),
)
_CIRKD_DEEPLABV3 = (
    (r"^head\.aspp\.b0\.([01])\.", r"head.aspp.branches.0.\1."),
    (r"^head\.aspp\.b([123])\.block\.([01])\.", r"head.aspp.branches.\1.\2."),
    (r"^head\.aspp\.b4\.gap\.1\.", "head.aspp.branches.4.conv.0."),
    (r"^head\.aspp\.b4\.gap\.2\.", "head.aspp.branches.4.conv.1."),
    (r"^head\.aspp\.project\.([01])\.", r"head.aspp.project.0.\1."),
    (r"^head\.block\.([01])\.", r"head.conv.\1."),
    (r"^head\.block\.4\.", "head.classifier."),
)
_CIRKD_PSPNET = (
    (r"^head\.psp\.conv([1-4])\.([01])\.", None),  # conv{n} -> stages.{n-1}: see _rename
    (r"^head\.block\.([01])\.", r"head.bottleneck.\1."),
    (r"^head\.classifier\.", "head.classifier."),
)

LAYOUTS = {
    "segdistill": "backbone.*, head.*, aux_head.*",
    "cirkd": "pretrained.*, head.aspp.* or head.psp.*, auxlayer.*",
}


def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def detect_layout(state: Mapping[str, Tensor]) -> str | None:
    """ "segdistill", "cirkd" or None, from the key names alone."""
    keys = list(state)
    if any(k.startswith("pretrained.") for k in keys) and any(
        k.startswith(("head.aspp.", "head.psp.")) for k in keys
    ):
        return "cirkd"
    ours = any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    others = any(k.startswith(("pretrained.", "classifier.", "aux_classifier.")) for k in keys)
    return "segdistill" if ours and not others else None


def _rename(key: str, rules: tuple) -> str | None:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m is None:
            continue
        if callable(repl):
            return repl(m, key)
        if repl is None:  # head.psp.conv{n}.{i}. -> head.stages.{n-1}.conv.{i}.
            return f"head.stages.{int(m.group(1)) - 1}.conv.{m.group(2)}." + key[m.end() :]
        return re.sub(pattern, repl, key, count=1)
    return None


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def convert_state_dict(
    state: Mapping[str, Tensor], model: nn.Module, partial: bool = False
) -> dict[str, Tensor]:
    """`state` (a checkpoint's state_dict, in any layout of the module docstring) with our key
    names for `model`. See the module docstring for the mapping and the errors."""
    state = _strip_module(state)
    layout = detect_layout(state)
    if layout == "segdistill":
        return state
    if layout is None:
        tried = "; ".join(f"{name} ({keys})" for name, keys in LAYOUTS.items())
        raise ValueError(
            f"unrecognised checkpoint layout: first keys {_names(list(state))}; layouts tried: "
            f"{tried}"
        )
    head_rules = (
        _CIRKD_PSPNET if isinstance(getattr(model, "head", None), PSPHead) else (_CIRKD_DEEPLABV3)
    )
    rules = _CIRKD_COMMON + head_rules
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    unmatched: list[str] = []  # file keys no rule names, or named to a key the model lacks
    for key, value in state.items():
        new = _rename(key, rules)
        if new is None or new not in own:
            unmatched.append(key if new is None else f"{key} (-> {new})")
        else:
            converted[new] = value
    mismatched = [k for k, v in converted.items() if own[k].shape != v.shape]
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    if not partial and (unmatched or mismatched or missing):
        shapes = "; ".join(
            f"{k} {tuple(converted[k].shape)} here {tuple(own[k].shape)}" for k in mismatched[:3]
        )
        raise ValueError(
            f"a {layout}-layout checkpoint fits this model only in part: {len(missing)} model "
            f"tensor(s) missing ({_names(missing) or '-'}), {len(mismatched)} of another shape "
            f"({shapes or '-'}), {len(unmatched)} file tensor(s) with no place here "
            f"({_names(unmatched) or '-'}). For CIRKD files: model.variant=cirkd, the backbone "
            "and head it was trained with, model.head_channels / model.aux_channels as its "
            "code (CIRKDv2: DeepLabV3 512), model.aux_head=true for a file with auxlayer.*"
        )
    return {k: v for k, v in converted.items() if own[k].shape == v.shape}
