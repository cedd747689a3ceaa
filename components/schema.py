"""The configuration schema: every key, its type and its default, as nested dataclasses.

`components.config` fills them from a YAML file and `key.sub=value` overrides (OmegaConf
structured configs) and validates the values; it re-exports everything here, so
`from components.config import Config, ModelConfig` is the usual import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MITS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
BACKBONES = RESNETS + ("mobilenetv2",) + MITS
HEADS = ("deeplabv3", "pspnet", "segformer")
REFINEMENTS = ("varm", "par", "plain", "none")  # par: AFA's PAR; plain: the old ablation
STRONG_AUGMENTATIONS = ("colour_jitter", "grayscale", "blur", "cutmix")


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


@dataclass
class SyntheticConfig:
    """The procedural texture dataset made when `data.root` does not exist yet."""

    num_train: int = 512
    num_val: int = 64
    num_unlabeled: int = 0
    size: int = 48
    num_classes: int = 5
    seed: int = 0


# The roots of the pipelines' embedded defaults (distill, semisup, wsss), generated on first use.
SYNTHETIC_ROOTS = ("data/synthetic", "data/synthetic_semisup", "data/synthetic_wsss")

# `model.pretrained` (or the teacher's) set to this: the backbone pretrained by the synthetic
# classification stage (`pretrain` below; components/training/pretrain.py), made on first use.
SYNTHETIC_PRETRAINED = "synthetic"


@dataclass
class PretrainConfig:
    """The embedded benchmark's stand-in for ImageNet weights: a backbone pretrained once by
    multi-label image classification on its own synthetic image set (`root`; the same texture
    generator with more classes and another seed, never the segmentation images), cached under
    trainer.storage_path and loaded where `model.pretrained: synthetic`. docs/benchmarks.md."""

    root: str = "data/synthetic_pretrain"
    num_images: int = 4096
    num_val: int = 256
    size: int = 48
    num_classes: int = 9  # background + 8 textures: the segmentation sets' first 4 among them
    seed: int = 101
    epochs: int = 20
    batch_size: int = 32
    # AdamW with poly decay (power 0.9) over all steps. lr None: 3e-3 for ResNet / MobileNetV2,
    # 1e-3 for MiT; weight_decay None: 0.05.
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # folder (or URI) holding dataset.json and one folder per split
    # Make the synthetic dataset at `root` when it is absent. None: only at the embedded
    # defaults' own roots (SYNTHETIC_ROOTS), so a mistyped `data.root` is an error, not a new
    # synthetic dataset; true: at any root; false: never.
    generate_synthetic: bool | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_split: str = "train"
    val_split: str = "val"
    # Semi-supervised runs (pipelines/semisup.py): the split of unlabeled images (its masks, if
    # any, are only used for diagnostics), and how many of `train_split`'s rows keep their
    # labels (None: all; N: a seeded random N, the rest join the unlabeled stream unlabeled).
    unlabeled_split: str = "unlabeled"
    labeled_count: int | None = None
    unlabeled_batch_size: int | None = None  # per worker; None: batch_size (ratio 1:1)
    # Passes over the training split per epoch (small labeled sets: fewer, longer epochs, so a
    # supervised baseline makes as many steps per epoch as a semi-supervised run).
    train_repeat: int = 1
    num_classes: int | None = None  # if set, must equal dataset.json's num_classes
    crop_size: Any = 48  # pixels: an int (square) or [height, width], e.g. [512, 1024]
    scale_min: float = 0.75
    scale_max: float = 1.5
    flip: bool = True
    batch_size: int = 8  # per worker
    val_batch_size: int = 8  # per worker
    max_bad_fraction: float = 0.01  # fail when more than this share of rows is undecodable
    shuffle_seed: int = 0
    prefetch_batches: int = 2
    # Keep the encoded rows in the object store after the first epoch (None: when they take
    # under 20% of it). Saves re-listing and re-reading the shards every epoch.
    cache_encoded: bool | None = None
    # Evaluate from the val rows decoded once in each worker's memory (its share, by rank)
    # instead of through Ray Data every epoch (None: when a worker's share decodes to under
    # 256 MiB). Evaluation has no randomness, so the numbers are the same either way.
    val_in_workers: bool | None = None


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    head: str = "deeplabv3"
    width: float = 1.0  # channel multiplier of backbone and head (0.25 for CPU tests)
    output_stride: int = 8  # ResNet: 8 or 16; MiT: 8, 16 (AFA/TSCD) or 32 (SegFormer)
    aux_head: bool = True  # ResNet heads only
    # Local pretrained backbone weights: a torchvision-format ResNet / MobileNetV2 state_dict (or
    # a CIRKD network file), or a SegFormer ImageNet release (NVlabs mit_b*.pth or HuggingFace
    # nvidia/mit-b*) for MiT backbones; "synthetic": the synthetic pretraining stage (`pretrain`).
    pretrained: str | None = None
    # A pretrained file that fits the backbone only in part (another stem, width or depth) is an
    # error naming what does not fit; true loads the tensors that do and reports the rest.
    pretrained_partial: bool = False
    # Weakly supervised networks (MiT + SegFormer): the image-level classifier (1x1 conv, no bias,
    # global max pooling) and the affinity head on the last stage's attention maps.
    cls_head: bool = False
    drop_path: float = 0.1  # MiT stochastic depth rate
    # ResNet networks: "torchvision" (7x7 stem, torchvision's dilation; our heads; torchvision's
    # deeplabv3_resnet50/101 files load into it), "cirkd" (CIRKD's ResNetV1s deep 3x3 stem and
    # dilation rule, its heads' pooled-branch BatchNorm and align_corners; CIRKD's checkpoints
    # load into it) or "mmseg" (mmsegmentation's ResNetV1c 32-32-64 stem, its ASPPHead / PSPHead
    # / FCNHead; its "-d8" DeepLabV3 / PSPNet files load). docs/methods.md, "Model variants".
    variant: str = "torchvision"
    # Main-head channels (ASPP / PSP bottleneck), used as given (not scaled by width). None: the
    # variant's: torchvision 256 (DeepLabV3) / 512 (PSPNet) x width; cirkd as CIRKD's released
    # code, 128 for ResNet-18/34, 256 (DeepLabV3) / 512 (PSPNet) for ResNet-50/101, x width.
    # CIRKDv2's code (2025) uses 512 (DeepLabV3) and 128 / 256 (PSPNet). mmseg: 512 x width
    # (128 for ResNet-18/34, as its *_r18-d8 configs).
    head_channels: int | None = None
    # Aux (FCN) head channels, used as given. None: torchvision 256 x width; cirkd layer3 / 4;
    # mmseg 256 x width (64 for ResNet-18/34).
    aux_channels: int | None = None


@dataclass
class TeacherConfig:
    # A run dir or checkpoint file of a trained teacher. When unset, distill.py trains one with
    # `method: none` on the same data (cached under trainer.storage_path and reused next time).
    checkpoint: str | None = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet18", width=0.5))
    # Only used when the teacher is trained here. 10 epochs of the default data = 640 steps:
    # enough for a teacher that clearly beats the student (docs/benchmarks.md).
    epochs: int = 10
    lr: float = 0.02


@dataclass
class DTIEMConfig:
    """Denoised Texture Intensity Equalization Module (SSTKD statistical texture)."""

    levels: int = 16  # quantization levels N (Tune range 4-128)
    iterations: int = 3  # Lloyd-Max refinement rounds T
    clip: float = 2.0  # β: histogram bins are clipped at β/N


@dataclass
class CDMConfig:
    """Contourlet Decomposition Module (SSTKD structural texture)."""

    levels: int = 2  # Laplacian pyramid levels
    directions: int = 8  # directional sub-bands per level (a power of two)


@dataclass
class AdversarialConfig:
    """The adversarial (holistic) term's critic: `form` "wgan_gp" (SKD's code: a WGAN critic
    with gradient penalty) or "hinge" (CIRKD's train_kd.py, being implemented: see
    docs/methods.md)."""

    form: str = "wgan_gp"
    critic_weight: float = 0.1  # λ_d, the critic's own loss weight
    critic_lr: float = 4e-4
    gradient_penalty: float = 10.0
    critic_width: int = 64  # channels of the critic's first conv


@dataclass
class CIRKDConfig:
    """Cross-image relational KD: mini-batch relations and class memory banks."""

    batch_temperature: float = 0.1
    memory_temperature: float = 0.1
    # Per class. The paper keeps 20000 / 2000 and samples negatives from them; here every filled
    # entry is a negative, so smaller queues give a similar count (docs/methods.md).
    pixel_memory_size: int = 256
    region_memory_size: int = 64
    pixels_per_class: int = 16  # enqueued per image and class
    num_anchors: int = 1024  # student pixels contrasted with the memory per step


@dataclass
class SemiSupConfig:
    """The mean-teacher/FixMatch base and cross-image distillation (METHODS.md §3)."""

    # Loss weights (0 = off), over the method's published ones (components/regimes.py): ce and
    # aux on the labeled images, unsup (CE on the EMA teacher's confident pseudo labels),
    # relation (inter-channel, labeled x unlabeled) and style (feature statistics).
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "aux": 0.4})
    threshold: float = 0.95  # pseudo-label confidence threshold
    ema_momentum: float = 0.999  # EMA teacher momentum (ramped: min(m, 1 - 1/(t+1)))
    # Strong-view augmentations of unlabeled images (any subset, in this order of application).
    strong: list[str] = field(default_factory=lambda: list(STRONG_AUGMENTATIONS))
    cutmix_prob: float = 0.5  # share of unlabeled images that get a CutMix box
    relation_temperature: float = 0.1  # τ of the relation matrices
    style_memory_momentum: float | None = None  # None: the labeled batch's statistics
    feature: str = "embed"  # the feature map of relation and style: embed, high or low
    evaluate: str = "student"  # which model is evaluated and exported: student or ema
    # The labeled criterion (ce and aux): "ce", or "ohem", UniMatch's Cityscapes criterion
    # (components/semisup/ohem.py): mean CE over the labeled pixels whose true-class probability
    # is <= ohem_threshold, or over the ohem_min_kept hardest ones if that is more (0: no
    # selection). min_kept counts the pixels of one worker's labeled batch (UniMatch's: of one
    # GPU's, 2 x 801 x 801 for its 200000).
    labeled_loss: str = "ce"
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 200000
    # Multiplies every term (the whole objective); 0.5 is UniMatch's (loss_x + loss_u) / 2.
    loss_scale: float = 1.0


@dataclass
class WeaklyConfig:
    """TSCD / AFA weakly supervised segmentation from image-level labels (METHODS.md §2)."""

    # Loss weights (0 = off), over the method's published ones (components/regimes.py): cls
    # (multi-label soft margin on the image labels), seg (CE on the refined CAM pseudo labels),
    # aff (attention affinity vs pseudo-label affinity), scd (self correspondence distillation).
    weights: dict[str, float] = field(default_factory=dict)
    cam_scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5])  # first must be 1
    cam_flip: bool = True
    high_threshold: float = 0.55  # background score of the confident pseudo label
    low_threshold: float = 0.35  # background score of the permissive one; between: ignore
    # varm (TSCD), par (AFA's PAR), plain (the old appearance-only ablation, not AFA's) or none
    refine: str = "varm"
    refine_iterations: int = 10
    refine_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    variation_weight: float = 0.01  # VARM's weight of the variation softmax
    affinity_radius: int = 8  # feature-map pixels
    scd_scale: float = 0.3  # the second view of SCD: the image downscaled by this factor
    scd_points: int = 1600  # points sampled per view (40 x 40)
    warmup_iters: int = 2000  # classification loss only before this iteration
    # The backbone's LayerNorms at lr 0 and weight decay 0, as AFA and TSCD train (their
    # get_param_groups; components/training/schedule.py). False: they train at the backbone lr.
    freeze_backbone_norms: bool = True
    # After this iteration the seg term learns from labels propagated by the learned affinity
    # (AFA's random walk, its default 6000 of 20k iterations); None: always the CAM labels.
    propagate_after: int | None = 6000


@dataclass
class MethodConfig:
    """`name` picks the method and with it the regime (components/regimes.py). The keys from
    `weights` to `cirkd` are the supervised regime's; `semisup` and `weakly` are the other two
    regimes' sections. A run may only set its own regime's keys."""

    name: str = "sstkd"
    # Supervised loss weights (0 = off), over the method's published ones
    # (components/distillation/terms.py): ce and aux on the labels, and any distillation term
    # (pixel_kd, adversarial, structural, statistical, cwd_feature, cwd_logit, pairwise,
    # batch_pixel, memory_pixel, memory_region); a term the method lacks is added to it.
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "aux": 0.4})
    temperature: float = 1.0  # pixel-wise KD temperature
    cwd_temperature: float = 4.0
    skd_pool_size: int = 2  # SKD max-pools features in patches of this size (CIRKD's protocol)
    dtiem: DTIEMConfig = field(default_factory=DTIEMConfig)
    cdm: CDMConfig = field(default_factory=CDMConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    cirkd: CIRKDConfig = field(default_factory=CIRKDConfig)
    semisup: SemiSupConfig = field(default_factory=SemiSupConfig)
    weakly: WeaklyConfig = field(default_factory=WeaklyConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd or adamw
    lr: float = 0.02  # of the backbone; the heads get lr * head_lr_mult
    head_lr_mult: float = 1.0  # 10 in TSCD/AFA (backbone 6e-5, heads 6e-4)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_iters: int = 0


@dataclass
class EvalConfig:
    """How val is predicted during training and by evaluate.py (components/inference.py)."""

    mode: str = "whole"  # whole | slide (mmseg's sliding window)
    crop: list[int] | None = None  # slide: [height, width] of a window, e.g. [512, 1024]
    stride: list[int] | None = None  # slide: [height, width] between windows, each <= crop
    scales: list[float] = field(default_factory=lambda: [1.0])  # resize factors; logits averaged
    flip: bool = False  # add the mirrored image (its logits mirrored back)
    boundary_width: int | None = None  # pixels: also report boundary IoU (None: off)


@dataclass
class TrainerConfig:
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    cpus_per_worker: float = 1.0
    # CPU training only: torch threads per worker. None: the node's cores shared among its
    # workers (Ray would otherwise pin torch to one thread per requested CPU).
    torch_threads: int | None = None
    epochs: int = 7
    storage_path: str = "outputs"  # local path or URI (s3://, gs://); must be shared for multi-node
    name: str | None = None  # None: derived from the config, so the same command resumes
    # Checkpoints kept by val mIoU (the best); the newest is always kept too, for resume.
    num_to_keep: int = 1
    max_failures: int = 0  # worker-group restarts from the last checkpoint within one run
    # One worker on this command's own Ray instance: the training function runs in the driver
    # process (Ray Train's local mode) instead of a worker actor; Ray Data still feeds it. It
    # saves a fit's controller, worker and data-coordinator processes (seconds and GiB on a
    # small machine). None: on when the run has 1 CPU worker, Ray was started by this command,
    # the storage is a local folder and max_failures is 0; false: a worker process.
    local_mode: bool | None = None
    # A cluster without an autoscaler that is too small for the run: seconds to wait for nodes to
    # join before failing with the numbers (an autoscaling cluster is checked against its maximum).
    resource_wait_s: float = 60.0
    # An autoscaling cluster that can hold the run: seconds for its autoscaler to start the
    # nodes (cloud GPU nodes take minutes to boot, pull the image and install).
    autoscale_wait_s: float = 1200.0
    # SyncBatchNorm across workers (CIRKD / SSTKD train 2 images per GPU with it). None: on when
    # more than one GPU worker trains; torch supports it on GPUs only.
    sync_bn: bool | None = None
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True  # on GPU
    log_every: int = 50  # steps between step lines on the console (TensorBoard gets every step)
    # "auto": a progress bar per epoch when the driver's stderr is a terminal, else a step line
    # every `log_every` steps (a log file would get every redraw); "bar" or "lines" to choose.
    progress: str = "auto"
    # Ray's own output (Train's INFO logs, Ray Data's plans and progress bars); `--verbose`.
    verbose: bool = False
    # Epochs between evaluations of val (the last always evaluates). An epoch without one
    # reports miou -1, so it never becomes the best checkpoint; it is still checkpointed.
    eval_every: int = 1
    image_every: int = 1  # epochs between TensorBoard image panels (the last always; 0: none)
    panel_images: int = 4  # the first N val images shown in the panels
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet18", width=0.25))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
