"""Whole-network SegFormer checkpoints released by NVlabs or HuggingFace, renamed to ours.

    layout = detect_segformer_layout(state)                 # "nvlabs" | "huggingface" | None
    state = convert_segformer_state_dict(state, model)      # model: a SegFormerModel
    model.load_state_dict(state)

Layouts (a leading DDP "module." is stripped first):

- "nvlabs": NVlabs/SegFormer's mmseg checkpoints, e.g. `segformer.b0.512x512.ade.160k.pth`
  (`{"meta", "state_dict"}`; pass the "state_dict" entry, or the whole dict, which is unwrapped).
  The encoder is under `backbone.` with our MiT names already (mmseg/models/backbones/
  mix_transformer.py at 65fa8cf: `patch_embed{1..4}` lines 213-220, `block{1..4}` and
  `norm{1..4}` lines 224-254, Attention `q`/`kv`/`sr`/`norm`/`proj` lines 68-77, Mlp
  `fc1`/`dwconv.dwconv`/`fc2` lines 25-28 and 361), the decoder under `decode_head.` with
  our SegFormerHead names (mmseg/models/decode_heads/segformer_head.py lines 50-62: MLP
  `linear_c{1..4}.proj`, ConvModule `linear_fuse.conv` (no bias) + `linear_fuse.bn`,
  `linear_pred`). So `backbone.X -> backbone.X`, `decode_head.X -> head.X`.
  `decode_head.conv_seg.*` is dropped: mmseg's BaseDecodeHead builds that classifier
  (decode_head.py line 83, on `channels=128`) but SegFormerHead.forward never calls it
  (segformer_head.py lines 64-87 use `linear_pred`), and HF's converter deletes it too
  (convert_segformer_original_to_pytorch.py lines 201-202).
- "huggingface": transformers' `SegformerForSemanticSegmentation` (e.g. the
  `pytorch_model.bin` of nvidia/segformer-b0-finetuned-ade-512-512). The encoder
  (`segformer.encoder.*`) is renamed by components/models/mit.py `mit_state_from_huggingface`
  (HF's split `key`/`value` Linears are concatenated into our `kv`); the decoder after
  modeling_segformer.py (v4.46.3) SegformerDecodeHead, lines 675-696:

      decode_head.linear_c.{i}.proj.   -> head.linear_c{i+1}.proj.
      decode_head.linear_fuse.weight   -> head.linear_fuse.conv.weight      (no bias, both)
      decode_head.batch_norm.          -> head.linear_fuse.bn.
      decode_head.classifier.          -> head.linear_pred.

As components/models/convert.py: a converted file that leaves a model tensor out, holds one in
another shape, or has a tensor the model has no place for is a ValueError naming them (the
first few and the count), unless `partial` (then only the tensors that fit are returned; load
them with strict=False). The error first names the architecture the file implies (MiT variant
from the embed dims and depths per stage, decoder dim, classes) next to the model's when they
differ. A BatchNorm `num_batches_tracked` absent from a file is filled with 0 (it does not
affect eval), so the strict load that follows passes.

Two things the tensors cannot tell, handled here:
- `model.cls_head` (the weakly supervised classifier / affinity heads, `classifier.*`,
  `attn_proj.*`): no released SegFormer has them, so they are missing tensors like any other
  (an error naming them unless `partial`, which leaves them at their init). The weakly regime
  never loads a whole SegFormer teacher, and a silent half-initialised model would be worse
  than the one-line fix (`model.cls_head: false`, or partial).
- the output stride: every release was trained with stage strides 4,2,2,2 (output stride 32;
  mix_transformer.py lines 213-220; HF configuration_segformer.py `strides=[4, 2, 2, 2]`).
  The weights fit any of our strides (the conv shapes do not depend on them), but at output
  stride 16 stage 4 runs at 2x the resolution it was trained at, at 8 stage 3 at 2x and stage
  4 at 4x, so the network is no longer the release's: converting for such a model warns
  (UserWarning) and loads.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from components.models.build import SegFormerModel
from components.models.mit import MIT_VARIANTS, mit_config, mit_state_from_huggingface
from components.models.statedict import names, strip_module, unwrap

SEGFORMER_LAYOUTS = {
    "nvlabs": "backbone.patch_embed1..4.*, backbone.block1..4.*, decode_head.linear_c1..4.*",
    "huggingface": "segformer.encoder.*, decode_head.linear_c.0..3.*, decode_head.classifier.*",
}
RELEASE_STRIDES = (4, 2, 2, 2)

_HF_ENCODER = "segformer.encoder."
# The decoder's HF names -> ours (see the module docstring); the first match wins.
_HF_HEAD = (
    (r"decode_head\.linear_c\.(\d+)\.", lambda m: f"head.linear_c{int(m.group(1)) + 1}."),
    (r"decode_head\.linear_fuse\.", lambda m: "head.linear_fuse.conv."),
    (r"decode_head\.batch_norm\.", lambda m: "head.linear_fuse.bn."),
    (r"decode_head\.classifier\.", lambda m: "head.linear_pred."),
)
_BLOCK = re.compile(r"backbone\.block([1-4])\.(\d+)\.")


def detect_segformer_layout(state: Mapping[str, Tensor]) -> str | None:
    """ "nvlabs", "huggingface" or None, from the key names alone. Both need an encoder and a
    decoder: an encoder-only file (`mit_b*.pth`, HF `nvidia/mit-b0`) is None (load it with
    `model.pretrained`), as is a state_dict in our own layout (`backbone.*`, `head.*`)."""
    keys = list(strip_module(unwrap(state)))
    if any(k.startswith(_HF_ENCODER) for k in keys) and any(
        k.startswith("decode_head.linear_c.") for k in keys
    ):
        return "huggingface"
    if any(k.startswith(("backbone.patch_embed", "backbone.block")) for k in keys) and any(
        re.match(r"decode_head\.linear_(c[1-4]|fuse|pred)\.", k) for k in keys
    ):
        return "nvlabs"
    return None


def _from_nvlabs(
    state: dict[str, Tensor],
) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """(tensors under our names, file keys no rule places, our name -> file key)."""
    out, unmatched, origins = {}, [], {}
    for key, value in state.items():
        if key.startswith("decode_head.conv_seg."):
            continue  # mmseg's unused classifier (module docstring)
        if key.startswith("backbone."):
            new = key
        elif key.startswith("decode_head."):
            new = "head." + key[len("decode_head.") :]
        else:
            unmatched.append(key)
            continue
        out[new], origins[new] = value, key
    return out, unmatched, origins


def _from_huggingface(
    state: dict[str, Tensor],
) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """As _from_nvlabs, for the HuggingFace layout."""
    encoder = {k[len(_HF_ENCODER) :]: v for k, v in state.items() if k.startswith(_HF_ENCODER)}
    mit_origins: dict[str, str] = {}
    mit, unmatched = mit_state_from_huggingface(encoder, mit_origins)
    out = {f"backbone.{k}": v for k, v in mit.items()}
    origins = {
        f"backbone.{k}": " + ".join(_HF_ENCODER + part for part in v.split(" + "))
        for k, v in mit_origins.items()
    }
    unmatched = [_HF_ENCODER + k for k in unmatched]
    for key, value in state.items():
        if key.startswith(_HF_ENCODER):
            continue
        for pattern, repl in _HF_HEAD:
            m = re.match(pattern, key)
            if m is not None:
                new = repl(m) + key[m.end() :]
                out[new], origins[new] = value, key
                break
        else:
            unmatched.append(key)
    return out, unmatched, origins


def _variant(dims: tuple, depths: tuple) -> str:
    for name in MIT_VARIANTS:
        cfg = mit_config(name)
        if cfg["embed_dims"] == dims and cfg["depths"] == depths:
            return "MiT-" + name[4:].upper()
    return "a MiT"


def _describe(dims: tuple, depths: tuple, decoder, classes) -> str:
    def fmt(values: tuple) -> str:
        return ",".join("?" if v is None else str(v) for v in values)

    return (
        f"{_variant(dims, depths)} (depths {fmt(depths)}, dims {fmt(dims)}), decoder dim "
        f"{'?' if decoder is None else decoder}, {'?' if classes is None else classes} classes"
    )


def _file_architecture(state: Mapping[str, Tensor]) -> tuple[tuple, tuple, int | None, int | None]:
    """(embed dims, depths, decoder dim, classes) that a converted state implies; None where the
    tensors that tell are absent."""
    dims = []
    for s in range(1, 5):
        t = state.get(f"backbone.norm{s}.weight", state.get(f"backbone.patch_embed{s}.proj.weight"))
        dims.append(None if t is None or t.dim() == 0 else int(t.shape[0]))
    blocks: dict[int, set[int]] = {s: set() for s in range(1, 5)}
    for key in state:
        m = _BLOCK.match(key)
        if m is not None:
            blocks[int(m.group(1))].add(int(m.group(2)))
    depths = tuple(max(b) + 1 if b else None for b in blocks.values())
    fuse, pred = state.get("head.linear_fuse.conv.weight"), state.get("head.linear_pred.weight")
    decoder = None if fuse is None or fuse.dim() == 0 else int(fuse.shape[0])
    classes = None if pred is None or pred.dim() == 0 else int(pred.shape[0])
    return tuple(dims), depths, decoder, classes


def _architecture_hints(file_arch: tuple, model_arch: tuple) -> list[str]:
    def differs(a, b) -> bool:
        if isinstance(a, tuple):
            return any(x is not None and x != y for x, y in zip(a, b))
        return a is not None and a != b

    hints = []
    if differs(file_arch[0], model_arch[0]) or differs(file_arch[1], model_arch[1]):
        variant = _variant(file_arch[0], file_arch[1])
        name = "mit_" + variant[4:].lower() if variant.startswith("MiT-") else "its variant"
        hints.append(f"model.backbone {name}, model.width 1")
    if differs(file_arch[2], model_arch[2]):
        hints.append(
            f"a decoder dim of {file_arch[2]} (our SegFormer head has 256 x width channels for "
            "every MiT, as NVlabs' B0/B1; their B2-B5 use 768, which no config builds yet)"
        )
    if differs(file_arch[3], model_arch[3]):
        hints.append(f"a dataset of {file_arch[3]} classes (ADE20K 150, Cityscapes 19)")
    return hints


def convert_segformer_state_dict(
    state: Mapping[str, Tensor], model: nn.Module, partial: bool = False
) -> dict[str, Tensor]:
    """`state` (an NVlabs or HuggingFace SegFormer state_dict, see the module docstring) with our
    key names for `model`, a SegFormerModel. Raises ValueError naming what does not fit (unless
    `partial`), for a file in neither layout, or when `model` is not a SegFormer; warns when the
    model's MiT strides are not the release's 4,2,2,2."""
    state = strip_module(unwrap(state))
    layout = detect_segformer_layout(state)
    if layout is None:
        tried = "; ".join(f"{name} ({keys})" for name, keys in SEGFORMER_LAYOUTS.items())
        raise ValueError(
            f"not a whole-network SegFormer checkpoint: first keys {names(list(state))}; "
            f"layouts tried: {tried}"
        )
    if not isinstance(model, SegFormerModel):  # ValueError, what the checkpoint callers catch
        raise ValueError(  # noqa: TRY004
            f"this {layout}-layout SegFormer checkpoint needs a SegFormer model (model.backbone "
            f"one of {', '.join(MIT_VARIANTS)}, model.head segformer), got "
            f"{getattr(model, 'name', type(model).__name__)}"
        )
    convert = _from_nvlabs if layout == "nvlabs" else _from_huggingface
    converted, unmatched, origins = convert(state)
    file_arch = _file_architecture(converted)  # before dropping what the model lacks
    own = model.state_dict()
    for key, value in own.items():  # absent from some files; no effect on eval
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    unmatched += [
        k if origins[k] == k else f"{origins[k]} (-> {k})" for k in converted if k not in own
    ]
    converted = {k: v for k, v in converted.items() if k in own}
    mismatched = [k for k, v in converted.items() if own[k].shape != v.shape]
    missing = [k for k in own if k not in converted]
    backbone = model.backbone
    model_arch = (backbone.out_channels, backbone.depths, model.head.channels, model.num_classes)
    hints = _architecture_hints(file_arch, model_arch)
    if not partial and (unmatched or mismatched or missing or hints):
        shapes = "; ".join(
            f"{k} {tuple(converted[k].shape)} here {tuple(own[k].shape)}" for k in mismatched[:3]
        )
        arch = (
            f"the file is {_describe(*file_arch)}, the model ({model.name}) is "
            f"{_describe(*model_arch)}; it needs {'; '.join(hints)}. "
            if hints
            else ""
        )
        weakly = [k for k in missing if k.startswith(("classifier.", "attn_proj."))]
        extra = (
            " model.cls_head=true adds the weakly supervised classifier/affinity heads, which no "
            "released SegFormer has: set it false, or load partially to leave them at init."
            if weakly
            else ""
        )
        raise ValueError(
            f"this {layout}-layout SegFormer checkpoint fits the model only in part: {arch}"
            f"{len(missing)} model tensor(s) missing ({names(missing) or '-'}), "
            f"{len(mismatched)} of another shape ({shapes or '-'}), {len(unmatched)} file "
            f"tensor(s) with no place here ({names(unmatched) or '-'}).{extra}"
        )
    if tuple(backbone.strides) != RELEASE_STRIDES:
        warnings.warn(
            f"{model.name}: released SegFormer weights were trained with MiT strides "
            f"{','.join(map(str, RELEASE_STRIDES))} (output stride 32); this model's are "
            f"{','.join(map(str, backbone.strides))} (output stride {backbone.output_stride}), "
            "so its later stages run at a resolution they were not trained at and its "
            "predictions differ from the release's (model.output_stride: 32 reproduces it)",
            UserWarning,
            stacklevel=2,
        )
    return {k: v for k, v in converted.items() if own[k].shape == v.shape}
