"""Mix Vision Transformer (MiT-B0...B5), the SegFormer encoder (Xie et al., NeurIPS 2021), with
the state_dict layout of the official NVlabs release.

    encoder = build_mit("mit_b1", strides=(4, 2, 2, 1))     # output stride 16, as AFA / TSCD
    report = load_pretrained_mit(encoder, "mit_b1.pth")     # the ImageNet release, or a SegFormer
    feats, attns = encoder(images)      # images (B, 3, H, W)
    feats[i]                            # (B, out_channels[i], H_i, W_i), i = 0..3
    attns[j]                            # (B, num_heads[3], N, N), N = H_3 * W_3, block j of stage 4
                                        # raw attention logits q·kᵀ (no 1/sqrt(d), no softmax)

Each stage is an overlapping patch embedding (a strided conv then LayerNorm), `depths[i]`
pre-norm transformer blocks and a LayerNorm. Stage 1 embeds with a 7x7 conv (padding 3), stages
2-4 with 3x3 convs (padding 1); `strides` sets each conv's stride, so H_i = ceil(H_{i-1} /
strides[i]) and `output_stride` = prod(strides). A block is efficient self-attention, whose keys
and values come from the tokens reduced by a conv of kernel = stride = sr_ratios[i] (then
LayerNorm), followed by a Mix-FFN: fc1, depthwise 3x3 conv, GELU, fc2. Inputs must be large
enough for every reduction conv: at least 32 px with the default ratios (8, 4, 2, 1).

`attns` are the raw attention logits q·kᵀ of the last stage's blocks (token to token, as its sr
ratio is 1): before the 1/sqrt(head_dim) scale and before the softmax, as AFA's mix_transformer
returns them (rulixiang/afa wetr/mix_transformer.py, Attention.forward: `attn_ = (q @
k.transpose(-2, -1))` is returned, the scaled softmax only weights the values) and TSCD's
network feeds them (Rongtao-Xu/RepresentationLearning SCD-AAAI2023/network/TSCD_model.py,
`torch.cat(_attns[-2:], dim=1)`). The probabilities the block uses are
softmax(attns[j] * head_dim ** -0.5, dim=-1). They are for methods that build affinities from
attention (AFA, TSCD) and stay in the autograd graph. Stages 1-3 use
F.scaled_dot_product_attention and never form their maps (AFA's `_attns[-2:]` only reads stage 4).

State-dict names are the release's (`patch_embed1.proj.weight`, `block1.0.attn.sr.weight`,
`block4.1.mlp.dwconv.dwconv.weight`, `norm4.bias`, ...), so `mit_b*.pth` files and the encoder of
SegFormer checkpoints (under `backbone.`) load; the release's ImageNet classifier `head.*` is not
part of the encoder. Like the release, block and stage LayerNorms use eps 1e-6 while the patch
embedding and spatial-reduction LayerNorms keep PyTorch's 1e-5 (HuggingFace's port uses 1e-5
throughout). `mit_state_from_huggingface` renames HuggingFace transformers' `SegformerEncoder`
tensors to these names (components/models/convert_segformer.py loads whole HF checkpoints).

`width` scales the channels for CPU tests: every stage has a head dimension of 32 (B0) or 64
(B1-B5), which becomes max(8, round(head_dim * width)), and a stage's channels are its heads
times that, so they stay divisible by the head count. width=1 gives the published sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.models.resnet import load_weights_file

MIT_VARIANTS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")

_DEPTHS = {
    "mit_b0": (2, 2, 2, 2),
    "mit_b1": (2, 2, 2, 2),
    "mit_b2": (3, 4, 6, 3),
    "mit_b3": (3, 4, 18, 3),
    "mit_b4": (3, 8, 27, 3),
    "mit_b5": (3, 6, 40, 3),
}
_NUM_HEADS = (1, 2, 5, 8)
_MIN_HEAD_DIM = 8

# The release's norm_layer for blocks and stage outputs.
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def mit_config(name: str, width: float = 1.0) -> dict[str, tuple[int, ...]]:
    """{"embed_dims", "num_heads", "mlp_ratios", "sr_ratios", "depths"} of a variant, the first
    scaled by `width` (see the module docstring). Raises ValueError for an unknown name."""
    if name not in _DEPTHS:
        raise ValueError(f"unknown MiT variant {name!r}; valid: {', '.join(MIT_VARIANTS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    head_dim = 32 if name == "mit_b0" else 64
    head_dim = max(_MIN_HEAD_DIM, round(head_dim * width))
    return {
        "embed_dims": tuple(h * head_dim for h in _NUM_HEADS),
        "num_heads": _NUM_HEADS,
        "mlp_ratios": (4, 4, 4, 4),
        "sr_ratios": (8, 4, 2, 1),
        "depths": _DEPTHS[name],
    }


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016) on a residual branch: in training, each sample's
    branch output is zeroed with probability p and kept ones are scaled by 1 / (1 - p), so the
    expectation is unchanged. Identity in eval mode or when p is 0."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> same shape."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """A conv of kernel `patch_size` (padding patch_size // 2) and `stride`, then LayerNorm."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # default eps, as the release

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """x: (B, Cin, H, W) -> tokens (B, h*w, embed_dim), h, w (row-major tokens)."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Multi-head self-attention whose keys/values come from the tokens reduced `sr_ratio` times
    per side by a conv of kernel = stride = sr_ratio and a LayerNorm (no reduction at 1)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # default eps, as the release

    def forward(
        self, x: Tensor, h: int, w: int, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, C) tokens of an h x w map (N = h*w). Returns (B, N, C) and, when
        need_weights, the raw attention logits q·kᵀ (B, heads, N, M), unscaled and before the
        softmax (AFA's `attn_`), with M = N / sr_ratio**2 (rounded down per side), else None.
        The attention probabilities are softmax(logits * self.scale, dim=-1)."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            r = self.sr_ratio
            if h < r or w < r:
                # A map smaller than the reduction (small images, SCD's 0.3x view, the 0.5x CAM
                # scale of small crops) is zero-padded to one reduction cell instead of failing:
                # its keys/values become a single token, the same as a map of exactly r x r.
                grid = F.pad(grid, (0, max(0, r - w), 0, max(0, r - h)))
            x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        if need_weights:
            attn = q @ k.transpose(-2, -1)  # the logits, returned as they are (AFA)
            out = (attn * self.scale).softmax(dim=-1) @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), attn


class DWConv(nn.Module):
    """Depthwise 3x3 conv on tokens (wrapped so the key is `mlp.dwconv.dwconv.*`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """x: (B, h*w, C) -> (B, h*w, C)."""
        b, _, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2: the conv gives positional information, which
    is why MiT has no position embeddings."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """x: (B, h*w, C) -> (B, h*w, C)."""
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm block: x + DropPath(Attention(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = _LayerNorm(dim)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(
        self, x: Tensor, h: int, w: int, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, h*w, C) -> (B, h*w, C), raw attention logits or None (see Attention)."""
        y, attn = self.attn(self.norm1(x), h, w, need_weights)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x), h, w))
        return x, attn


def init_mit_weights(module: nn.Module) -> None:
    """SegFormer's init: Linear trunc-normal std 0.02 (bias 0), LayerNorm 1/0, convs
    N(0, sqrt(2 / fan_out)) with fan_out = k*k*out_channels / groups (bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MixVisionTransformer(nn.Module):
    """The four-stage MiT encoder (see the module docstring). The per-stage sequences give
    channels, heads, FFN expansion, spatial-reduction ratio, block count and embedding stride.
    Stochastic depth rises linearly from 0 on the first block to `drop_path_rate` on the last.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[int],
        sr_ratios: Sequence[int],
        depths: Sequence[int],
        strides: Sequence[int] = (4, 2, 2, 2),
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        stages = (embed_dims, num_heads, mlp_ratios, sr_ratios, depths, strides)
        if any(len(s) != 4 for s in stages):
            raise ValueError(f"MiT takes 4 values per stage argument, got {stages}")
        if any(s < 1 for s in strides):
            raise ValueError(f"strides must be >= 1, got {tuple(strides)}")
        self.out_channels = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.depths = tuple(depths)
        self.strides = tuple(strides)
        self.output_stride = math.prod(strides)
        total = sum(depths)
        dpr = [drop_path_rate * j / max(1, total - 1) for j in range(total)]  # torch.linspace
        cin, cur = in_chans, 0
        for i in range(4):
            patch = 7 if i == 0 else 3
            dim = embed_dims[i]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(patch, strides[i], cin, dim))
            blocks = [
                Block(dim, num_heads[i], mlp_ratios[i], sr_ratios[i], dpr[cur + j])
                for j in range(depths[i])
            ]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", _LayerNorm(dim))
            cin, cur = dim, cur + depths[i]
        init_mit_weights(self)

    def forward(self, x: Tensor, need_weights: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """x: (B, in_chans, H, W) -> ([four (B, out_channels[i], H_i, W_i) maps], [per block of
        stage 4, its raw attention logits q·kᵀ (B, num_heads[3], N, N), N = H_4 * W_4, unscaled
        and before the softmax, as AFA's encoder returns them]). With
        `need_weights=False` the list is empty and stage 4 uses the fused attention kernel too:
        the N x N maps cost O(heads * N^2) memory, too much for large eval images."""
        b = x.shape[0]
        feats: list[Tensor] = []
        attns: list[Tensor] = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            last = i == 4 and need_weights
            for blk in getattr(self, f"block{i}"):
                x, attn = blk(x, h, w, need_weights=last)
                if last:
                    attns.append(attn)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            feats.append(x)
        return feats, attns


def build_mit(
    name: str,
    width: float = 1.0,
    strides: Sequence[int] = (4, 2, 2, 2),
    drop_path_rate: float = 0.1,
) -> MixVisionTransformer:
    """A randomly initialised MiT by name ("mit_b0" ... "mit_b5"); see mit_config for `width`.
    Raises ValueError naming the bad name and the valid ones."""
    return MixVisionTransformer(
        **mit_config(name, width), strides=strides, drop_path_rate=drop_path_rate
    )


def load_pretrained_mit(
    model: MixVisionTransformer, path: str, partial: bool = False
) -> dict[str, list[str]]:
    """Load a local MiT state_dict file (NVlabs `mit_b*.pth` layout, or HuggingFace's
    `segformer.encoder.*` names, converted by `mit_state_from_huggingface`) into `model`.

    The file may hold the state dict itself or a dict with a "state_dict" or "model" entry;
    leading "module." / "backbone." prefixes are stripped (so a SegFormer checkpoint's encoder
    loads; its `decode_head.*` is reported as unexpected) and the ImageNet classifier `head.*` is
    ignored. Tensors whose shape differs from the model's are skipped. Returns {"missing": model
    keys absent from the file, "unexpected": file keys the model lacks, "mismatched": keys skipped
    for their shape}. Raises ValueError naming the file when it is unreadable, not a state dict,
    or shares no key with the model.
    """
    return load_weights_file(model, path, "head.", "the MiT encoder", partial, transform=_our_mit)


def _our_mit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A HuggingFace MiT file (`segformer.encoder.*`, as nvidia/mit-b0's
    SegformerForImageClassification) under our names; its classifier, decode head and any
    encoder key no rule places stay as keys the encoder lacks (reported, never loaded). NVlabs'
    files are in our names already."""
    prefixes = ("segformer.encoder.", "encoder.")
    hf = {k.split("encoder.", 1)[1]: v for k, v in state.items() if k.startswith(prefixes)}
    if not hf:
        return state
    ours, unmatched = mit_state_from_huggingface(hf)
    rest = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return {**rest, **ours, **{f"encoder.{k}": hf[k] for k in unmatched}}


# HuggingFace transformers' SegformerEncoder names -> ours (the release's), from
# src/transformers/models/segformer/modeling_segformer.py (v4.46.3): SegformerOverlapPatchEmbeddings
# `proj`, `layer_norm` (lines 122-130); SegformerEfficientSelfAttention `query`, `key`, `value`,
# `sr`, `layer_norm` (160-171) under SegformerAttention `self`, SegformerSelfOutput `dense` (226)
# under `output`; SegformerMixFFN `dense1`, `dwconv.dwconv`, `dense2` (276, 291-297);
# SegformerLayer `layer_norm_1`, `attention`, `layer_norm_2`, `mlp` (315-325); SegformerEncoder
# ModuleLists `patch_embeddings`, `block`, `layer_norm` (372, 395, 398). The same renaming, read the
# other way, is convert_segformer_original_to_pytorch.py `rename_keys` (lines 40-88). `{s}` is
# the 1-based stage of HF's 0-based index.
_HF_ENCODER_RULES = (
    (r"patch_embeddings\.(\d+)\.proj\.", "patch_embed{s}.proj."),
    (r"patch_embeddings\.(\d+)\.layer_norm\.", "patch_embed{s}.norm."),
    (r"block\.(\d+)\.(\d+)\.layer_norm_([12])\.", "block{s}.{j}.norm{k}."),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.query\.", "block{s}.{j}.attn.q."),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.sr\.", "block{s}.{j}.attn.sr."),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.", "block{s}.{j}.attn.norm."),
    (r"block\.(\d+)\.(\d+)\.attention\.output\.dense\.", "block{s}.{j}.attn.proj."),
    (r"block\.(\d+)\.(\d+)\.mlp\.dense1\.", "block{s}.{j}.mlp.fc1."),
    (r"block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.", "block{s}.{j}.mlp.dwconv.dwconv."),
    (r"block\.(\d+)\.(\d+)\.mlp\.dense2\.", "block{s}.{j}.mlp.fc2."),
    (r"layer_norm\.(\d+)\.", "norm{s}."),
)
# HF splits the release's `kv` Linear into `key` (its first C output rows) and `value` (the last
# C): convert_segformer_original_to_pytorch.py `read_in_k_v` (lines 91-108).
_HF_KEY_VALUE = re.compile(r"block\.(\d+)\.(\d+)\.attention\.self\.(key|value)\.(weight|bias)$")


def _hf_encoder_key(key: str) -> str | None:
    for pattern, template in _HF_ENCODER_RULES:
        m = re.match(pattern, key)
        if m is not None:
            groups = m.groups() + (None, None)
            s, j, k = int(groups[0]) + 1, groups[1], groups[2]
            return template.format(s=s, j=j, k=k) + key[m.end() :]
    return None


def mit_state_from_huggingface(
    state: Mapping[str, Tensor], origins: dict[str, str] | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """HuggingFace `SegformerEncoder` tensors (names without the `segformer.encoder.` prefix,
    e.g. `block.0.1.attention.self.query.weight`) -> (our MiT names, e.g.
    `block1.1.attn.q.weight`; the file keys no rule places). Each block's `key` and `value`
    Linears become our `attn.kv` (key rows first); a `key` without its `value` (or one of another
    shape) has no place. `origins`, when given, is filled with our name -> the HF name(s)."""
    origins = {} if origins is None else origins
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    pairs: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        kv = _HF_KEY_VALUE.match(key)
        if kv is not None:
            stage, block, which, leaf = kv.groups()
            name = f"block{int(stage) + 1}.{block}.attn.kv.{leaf}"
            pairs.setdefault(name, {})[which] = (key, value)
            continue
        new = _hf_encoder_key(key)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
            origins[new] = key
    for name, pair in pairs.items():
        if set(pair) == {"key", "value"} and pair["key"][1].shape == pair["value"][1].shape:
            out[name] = torch.cat([pair["key"][1], pair["value"][1]], dim=0)
            origins[name] = f"{pair['key'][0]} + {pair['value'][0]}"
        else:
            unmatched += [k for k, _ in pair.values()]
    return out, unmatched
