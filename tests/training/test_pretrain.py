"""The synthetic pretraining stage (components/training/pretrain.py): its parts by hand, and one
tiny pretraining run on the session's Ray whose backbone file `model.pretrained` then loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import ConfigError, from_dict, merge_config, to_dict, validate
from components.models.build import architecture, build_model
from components.schema import ModelConfig, PretrainConfig
from components.training.pretrain import (
    Classifier,
    build_encoder,
    label_vectors,
    micro_f1,
    pretrain_name,
    resolve_pretrained,
)
from components.training.trainer import run_name


def test_label_vectors_are_the_foreground_classes_present():
    # Hand case: 4 classes (3 foreground). Row 0 holds classes 0, 2 and ignore (255): [0, 1, 0].
    # Row 1 holds 1 and 3: [1, 0, 1]. Row 2 is invalid: all zero whatever its mask holds.
    masks = np.array([[[0, 2], [255, 2]], [[1, 3], [3, 0]], [[1, 2], [3, 1]]], dtype=np.uint8)
    valid = np.array([True, True, False])
    out = label_vectors(masks, valid, num_classes=4, ignore=255)
    assert out.tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]


def test_micro_f1_by_hand():
    # Predicted positive where the logit > 0: [1, 0, 1] and [0, 1, 1]; targets [1, 0, 0] and
    # [0, 1, 0]: tp = 2, fp = 2, fn = 0 -> F1 = 2*2 / (2*2 + 2 + 0) = 4/6.
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 4.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert micro_f1(logits, targets) == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(backbone="resnet18", width=0.125),
        ModelConfig(backbone="resnet18", width=0.125, variant="cirkd", output_stride=16),
        ModelConfig(backbone="mobilenetv2", width=0.25),
        ModelConfig(backbone="mit_b0", head="segformer", width=0.25),
    ],
    ids=["resnet", "resnet-cirkd", "mobilenetv2", "mit"],
)
def test_the_encoder_is_the_segmentation_models_backbone(model):
    """Every tensor of the pretrained encoder has its place (same name and shape) in the
    segmentation model's backbone, and the classifier gives one logit per foreground class."""
    encoder = build_encoder(model)
    seg = build_model(model, num_classes=5)
    own = {k: v.shape for k, v in seg.state_dict().items() if k.startswith("backbone.")}
    mine = {f"backbone.{k}": v.shape for k, v in encoder.state_dict().items()}
    assert mine == own
    logits = Classifier(encoder, 16)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 16)


def test_names_change_with_the_backbone_and_the_section_not_the_head():
    base = ModelConfig(backbone="resnet18", width=0.25)
    p = PretrainConfig()
    name = pretrain_name(base, p)
    assert name.startswith("pretrain-resnet18-")
    assert pretrain_name(dataclasses.replace(base, head="pspnet", aux_head=False), p) == name
    assert pretrain_name(dataclasses.replace(base, width=0.5), p) != name
    assert pretrain_name(base, dataclasses.replace(p, epochs=3)) != name


def test_run_names_hold_the_section_only_when_the_stage_is_used():
    plain = merge_config(None, [])
    moved = merge_config(None, ["pretrain.epochs=3"])
    assert run_name(plain) == run_name(moved)  # no `synthetic`: the section is not read
    synthetic = merge_config(None, ["model.pretrained=synthetic"])
    assert run_name(synthetic) != run_name(plain)
    again = merge_config(None, ["model.pretrained=synthetic", "pretrain.epochs=3"])
    assert run_name(again) != run_name(synthetic)


def test_bad_values_name_the_key():
    for override, key in [
        ("pretrain.epochs=0", "pretrain.epochs"),
        ("pretrain.lr=-1", "pretrain.lr"),
        ("pretrain.num_images=8", "pretrain.num_images"),  # fewer than a batch of 32
        ("pretrain.num_classes=1", "pretrain.num_classes"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(merge_config(None, [override]))
    validate(merge_config(None, ["model.pretrained=synthetic"]))  # no file needed: made later


def test_a_model_is_never_built_with_the_name_instead_of_a_file():
    cfg = ModelConfig(backbone="resnet18", width=0.125, pretrained="synthetic")
    with pytest.raises(ValueError, match="synthetic pretraining stage"):
        build_model(cfg, 3)
    assert architecture(cfg).pretrained is None
    build_model(architecture(cfg), 3)


def test_a_config_without_the_stage_is_returned_unchanged():
    cfg = merge_config(None, [])
    assert resolve_pretrained(cfg) is cfg


def test_pretraining_writes_a_backbone_that_loads_and_is_reused(ray_session, tmp_path):
    overrides = [
        "model.pretrained=synthetic",
        "model.width=0.125",
        f"trainer.storage_path={tmp_path / 'out'}",
        f"pretrain.root={tmp_path / 'images'}",
        "pretrain.num_images=64",
        "pretrain.num_val=16",
        "pretrain.size=32",
        "pretrain.batch_size=16",
        "pretrain.epochs=2",
    ]
    cfg = merge_config(None, overrides)
    lines: list[str] = []
    resolved = resolve_pretrained(cfg, log=lines.append)
    path = resolved.model.pretrained
    assert path.endswith("backbone.pt") and pretrain_name(cfg.model, cfg.pretrain) in path
    state = torch.load(path, weights_only=True)
    fresh = build_encoder(cfg.model).state_dict()
    assert set(state) == set(fresh)
    trained = [k for k in state if k.endswith("weight") and not torch.equal(state[k], fresh[k])]
    assert trained, "the file holds the initial weights"
    # model.pretrained loads it strictly (a partial fit would raise) into the segmentation model
    model = build_model(resolved.model, num_classes=5)
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], state["conv1.weight"])
    assert (tmp_path / "images" / "dataset.json").is_file()
    # The second call reuses the file: no training, the same path.
    lines.clear()
    assert resolve_pretrained(cfg, log=lines.append).model.pretrained == path
    assert lines == [f"pretrained backbone: reusing {path}"]
    # A run's stored config keeps `synthetic` (reruns name the same run); a checkpoint's
    # config holds the file, which loads as any pretrained file does.
    assert from_dict(to_dict(resolved)).model.pretrained == path
    # The same stage made again elsewhere (the images reused) gives the same weights: the data
    # order and crops are seeded per epoch, the init by pretrain.seed (issue 21). The first was
    # made in this process (local mode: this session started its Ray), this one in a worker.
    assert len(list(Path(path).parent.glob("checkpoint_*/state.pt"))) == 2  # its own, kept
    again = merge_config(
        None,
        [*overrides, f"trainer.storage_path={tmp_path / 'again'}", "trainer.local_mode=false"],
    )
    other = torch.load(
        resolve_pretrained(again, log=lines.append).model.pretrained, weights_only=True
    )
    assert all(torch.equal(state[k], other[k]) for k in state)


@pytest.mark.slow
def test_a_distill_run_pretrains_its_teacher_and_student_once(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys
):
    """`pretrained: synthetic` on both models: each backbone is pretrained by its own fit (the
    teacher's inside the teacher run), the runs' config.yaml keep `synthetic` (a rerun names the
    same runs and reuses everything), their checkpoints hold the files, evaluate.py loads them."""
    from pipelines import distill, evaluate

    storage = tmp_path / "out"
    args = tiny_overrides(
        tiny_data,
        str(storage),
        **{
            "method.name": "kd",
            "model.pretrained": "synthetic",
            "teacher.model.pretrained": "synthetic",
            "teacher.model.width": "0.25",
            "pretrain.root": str(tmp_path / "images"),
            "pretrain.num_images": "32",
            "pretrain.num_val": "8",
            "pretrain.size": "32",
            "pretrain.batch_size": "16",
            "pretrain.epochs": "1",
        },
    )
    assert distill.main(args) == 0
    out = capsys.readouterr().out
    files = sorted(storage.glob("pretrain-resnet18-*/backbone.pt"))
    assert len(files) == 2, out  # x0.25 teacher and x0.125 student: two backbones
    assert out.count("pretrained backbone: training") == 2
    student = next(storage.glob("distill-kd-*"))
    assert "pretrained: synthetic" in (student / "config.yaml").read_text()
    meta = json.loads(next(student.glob("epoch_*/meta.json")).read_text())
    assert meta["config"]["model"]["pretrained"] in {str(f) for f in files}
    assert distill.main(args) == 0  # the finished runs are reused: nothing pretrains again
    assert "pretrained backbone: training" not in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", str(student), "--data", tiny_data]) == 0
