"""Key/shape listings of released whole-network SegFormer state_dicts, written from the
reference code (not from ours), for tests/models/test_segformer_layouts.py.

- NVlabs/SegFormer at 65fa8cf: mmseg/models/backbones/mix_transformer.py (OverlapPatchEmbed
  lines 160-175: `proj` conv k x k, padding k // 2, `norm`; Attention lines 58-77: `q`, `kv`
  (2C), `proj`, `sr` conv + `norm` when sr_ratio > 1; Block lines 120-134: `norm1`, `attn`,
  `norm2`, `mlp`; Mlp lines 20-28 and DWConv line 361: `fc1`, `dwconv.dwconv` (depthwise 3x3),
  `fc2`; MixVisionTransformer lines 213-254: `patch_embed{1..4}` (7x7 then 3x3),
  `block{1..4}`, `norm{1..4}`; mit_b0..b5 lines 374-424: embed dims, depths, mlp ratio 4,
  sr ratios 8,4,2,1), mmseg/models/decode_heads/segformer_head.py lines 50-62 (`linear_c4`
  .. `linear_c1` MLP `proj`, `linear_fuse` ConvModule `conv` (no bias) + `bn`, `linear_pred`) and
  decode_head.py line 83 (BaseDecodeHead's `conv_seg` on `channels`, 128 in every SegFormer
  config, local_configs/segformer/B*/*.py).
- HuggingFace transformers v4.46.3: src/transformers/models/segformer/modeling_segformer.py
  (SegformerOverlapPatchEmbeddings lines 117-130, SegformerEfficientSelfAttention 160-171,
  SegformerSelfOutput 226, SegformerDWConv 276, SegformerMixFFN 291-297, SegformerLayer
  315-325, SegformerEncoder 372-399, SegformerDecodeHead 675-696).
"""

from __future__ import annotations

SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
B0 = {"dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "decoder": 256}
B1 = {"dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2), "decoder": 256}


def _bn(out: dict, name: str, c: int) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{leaf}"] = (c,)
    out[f"{name}.num_batches_tracked"] = ()


def _linear(out: dict, name: str, cout: int, cin: int) -> None:
    out[f"{name}.weight"] = (cout, cin)
    out[f"{name}.bias"] = (cout,)


def _ln(out: dict, name: str, c: int) -> None:
    out[f"{name}.weight"] = (c,)
    out[f"{name}.bias"] = (c,)


def nvlabs_segformer(
    dims: tuple, depths: tuple, decoder: int, classes: int, channels: int = 128
) -> dict[str, tuple[int, ...]]:
    """The `state_dict` entry of an NVlabs `segformer.b*.*.pth` (EncoderDecoder: `backbone.`,
    `decode_head.`)."""
    out: dict[str, tuple[int, ...]] = {}
    for s in range(1, 5):
        c, k = dims[s - 1], 7 if s == 1 else 3
        cin = 3 if s == 1 else dims[s - 2]
        out[f"backbone.patch_embed{s}.proj.weight"] = (c, cin, k, k)
        out[f"backbone.patch_embed{s}.proj.bias"] = (c,)
        _ln(out, f"backbone.patch_embed{s}.norm", c)
        r = SR_RATIOS[s - 1]
        for j in range(depths[s - 1]):
            p = f"backbone.block{s}.{j}"
            _ln(out, f"{p}.norm1", c)
            _linear(out, f"{p}.attn.q", c, c)
            _linear(out, f"{p}.attn.kv", 2 * c, c)
            _linear(out, f"{p}.attn.proj", c, c)
            if r > 1:
                out[f"{p}.attn.sr.weight"] = (c, c, r, r)
                out[f"{p}.attn.sr.bias"] = (c,)
                _ln(out, f"{p}.attn.norm", c)
            _ln(out, f"{p}.norm2", c)
            _linear(out, f"{p}.mlp.fc1", MLP_RATIO * c, c)
            out[f"{p}.mlp.dwconv.dwconv.weight"] = (MLP_RATIO * c, 1, 3, 3)
            out[f"{p}.mlp.dwconv.dwconv.bias"] = (MLP_RATIO * c,)
            _linear(out, f"{p}.mlp.fc2", c, MLP_RATIO * c)
        _ln(out, f"backbone.norm{s}", c)
    out["decode_head.conv_seg.weight"] = (classes, channels, 1, 1)
    out["decode_head.conv_seg.bias"] = (classes,)
    for i in (4, 3, 2, 1):
        _linear(out, f"decode_head.linear_c{i}.proj", decoder, dims[i - 1])
    out["decode_head.linear_fuse.conv.weight"] = (decoder, 4 * decoder, 1, 1)
    _bn(out, "decode_head.linear_fuse.bn", decoder)
    out["decode_head.linear_pred.weight"] = (classes, decoder, 1, 1)
    out["decode_head.linear_pred.bias"] = (classes,)
    return out


def huggingface_segformer(
    dims: tuple, depths: tuple, decoder: int, classes: int
) -> dict[str, tuple[int, ...]]:
    """The state_dict of transformers' SegformerForSemanticSegmentation."""
    out: dict[str, tuple[int, ...]] = {}
    enc = "segformer.encoder"
    for i in range(4):
        c, k = dims[i], 7 if i == 0 else 3
        cin = 3 if i == 0 else dims[i - 1]
        out[f"{enc}.patch_embeddings.{i}.proj.weight"] = (c, cin, k, k)
        out[f"{enc}.patch_embeddings.{i}.proj.bias"] = (c,)
        _ln(out, f"{enc}.patch_embeddings.{i}.layer_norm", c)
    for i in range(4):
        c, r = dims[i], SR_RATIOS[i]
        for j in range(depths[i]):
            p = f"{enc}.block.{i}.{j}"
            _ln(out, f"{p}.layer_norm_1", c)
            for name in ("query", "key", "value"):
                _linear(out, f"{p}.attention.self.{name}", c, c)
            if r > 1:
                out[f"{p}.attention.self.sr.weight"] = (c, c, r, r)
                out[f"{p}.attention.self.sr.bias"] = (c,)
                _ln(out, f"{p}.attention.self.layer_norm", c)
            _linear(out, f"{p}.attention.output.dense", c, c)
            _ln(out, f"{p}.layer_norm_2", c)
            _linear(out, f"{p}.mlp.dense1", MLP_RATIO * c, c)
            out[f"{p}.mlp.dwconv.dwconv.weight"] = (MLP_RATIO * c, 1, 3, 3)
            out[f"{p}.mlp.dwconv.dwconv.bias"] = (MLP_RATIO * c,)
            _linear(out, f"{p}.mlp.dense2", c, MLP_RATIO * c)
    for i in range(4):
        _ln(out, f"{enc}.layer_norm.{i}", dims[i])
    for i in range(4):
        _linear(out, f"decode_head.linear_c.{i}.proj", decoder, dims[i])
    out["decode_head.linear_fuse.weight"] = (decoder, 4 * decoder, 1, 1)
    _bn(out, "decode_head.batch_norm", decoder)
    out["decode_head.classifier.weight"] = (classes, decoder, 1, 1)
    out["decode_head.classifier.bias"] = (classes,)
    return out
