"""The offline demo: the source / target domains, the pretraining command, the shipped base, the default run."""

import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForMaskGeneration, Sam2Model, SamModel, SamProcessor

from samtune.config import ConfigError, ModelConfig, load_config
from samtune.data.coco import CocoIndex
from samtune.demo import assets, bases
from samtune.demo.domains import MIN_VISIBLE_PIXELS, TARGET_CATEGORIES, DomainSpec, make_domain_coco, render
from samtune.demo.pretrain import main as demo_main
from samtune.models.architectures import demo_sam_config
from samtune.models.loading import load_sam
from samtune.train import main as train_main
from samtune.train import parse_config


@pytest.mark.parametrize("domain", ["source", "target"])
def test_a_split_is_a_function_of_its_seed(domain):
    spec = DomainSpec(domain, 4, seed=11)
    for index in range(4):
        image, objects = render(spec, index)
        again, objects_again = render(spec, index)
        np.testing.assert_array_equal(image, again)
        assert [c for c, _ in objects] == [c for c, _ in objects_again]
        for (_, mask), (_, mask_again) in zip(objects, objects_again):
            np.testing.assert_array_equal(mask, mask_again)
    other, _ = render(DomainSpec(domain, 4, seed=12), 0)
    assert not np.array_equal(render(spec, 0)[0], other)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_masks_are_the_visible_disjoint_parts(domain):
    for index in range(6):
        image, objects = render(DomainSpec(domain, 6, seed=3), index)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        stacked = np.stack([mask for _, mask in objects]) if objects else np.zeros((0, 256, 256), bool)
        assert (stacked.sum(axis=0) <= 1).all(), "an occluded object keeps only what is not covered"
        assert all(mask.sum() >= MIN_VISIBLE_PIXELS for _, mask in objects)


def test_target_differs_from_source_in_colour_contrast_and_shape():
    source = [render(DomainSpec("source", 20, seed=1), i) for i in range(20)]
    target = [render(DomainSpec("target", 20, seed=1), i) for i in range(20)]

    def contrast(samples):  # mean |object colour - colour around it|
        values = []
        for image, objects in samples:
            pixels = image.astype(float)
            for _, mask in objects:
                ring = np.zeros_like(mask)
                rows, cols = np.nonzero(mask)
                ring[max(rows.min() - 6, 0) : rows.max() + 7, max(cols.min() - 6, 0) : cols.max() + 7] = True
                ring &= ~np.any([m for _, m in objects], axis=0)
                if ring.any():
                    values.append(np.abs(pixels[mask].mean(0) - pixels[ring].mean(0)).sum())
        return np.mean(values)

    assert contrast(target) < 0.5 * contrast(source)
    blue_green = np.mean([image[..., 1:].mean() - image[..., 0].mean() for image, _ in target])
    assert blue_green > 20  # the water's cast
    ropes = [mask for _, objects in target for c, mask in objects if c == 4]
    assert ropes, "thin objects (ropes) occur"
    fill = [mask.sum() / np.prod(np.ptp(np.argwhere(mask), axis=0) + 1) for mask in ropes]
    assert np.median(fill) < 0.4  # thin and bent: a small part of their box


def test_coco_files_load_with_every_object_annotated(tmp_path):
    annotations, images = make_domain_coco(tmp_path, DomainSpec("target", 5, seed=4))
    index = CocoIndex(annotations, images)
    expected = sum(len(render(DomainSpec("target", 5, seed=4), i)[1]) for i in range(5))
    assert len(index.images) == 5
    assert sum(len(image.instances) for image in index.images) == expected
    data = json.loads(annotations.read_text())
    assert [c["name"] for c in data["categories"]] == [c["name"] for c in TARGET_CATEGORIES]
    with pytest.raises(ValueError, match="domain"):
        make_domain_coco(tmp_path / "x", DomainSpec("other", 1, seed=0))


def test_shipped_base_loads_and_is_small():
    files = {path.name: path.stat().st_size for path in assets.BASE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "pretraining.json"} <= set(files)
    assert sum(files.values()) <= 10 * 2**20
    model = SamModel.from_pretrained(assets.BASE_DIR)
    SamProcessor.from_pretrained(assets.BASE_DIR)
    expected = demo_sam_config().vision_config
    assert model.config.vision_config.hidden_size == expected.hidden_size
    assert model.config.vision_config.image_size == 256
    record = json.loads((assets.BASE_DIR / "pretraining.json").read_text())
    assert record["source_val_box_mIoU"] > 0.6  # what pretraining reached on its own domain
    assert record["target_test_box_mIoU"] < record["source_val_box_mIoU"] - 0.1  # and the shift it faces


def test_the_demo_settings_apply_only_to_the_demo_and_under_the_users_keys():
    settings = yaml.safe_load(assets.RUN_CONFIG.read_text())
    config = parse_config([])
    assert config.peft.method == settings["peft"]["method"] and config.train.lr == settings["train"]["lr"]
    assert parse_config(["--train.lr", "0.5"]).train.lr == 0.5
    own = parse_config(["--model.name_or_path", "m", "--data.train_annotations", "a.json", "--data.train_images", "i"])
    assert own.train.lr == 1e-4 and own.output_dir == ""  # a user's own run: samtune's general defaults
    with pytest.raises(ConfigError, match="model.name_or_path not given"):  # data alone is half a setup
        parse_config(["--data.train_annotations", "a.json", "--data.train_images", "img"])


@pytest.fixture
def small_demo(tmp_path, monkeypatch):
    """The demo with small splits in a private cache."""
    monkeypatch.setenv("SAMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        assets,
        "TARGET_SPLITS",
        {
            "train": DomainSpec("target", 32, seed=7001),
            "val": DomainSpec("target", 12, seed=7002),
            "test": DomainSpec("target", 24, seed=7003),
        },
    )
    monkeypatch.setattr(
        assets, "SOURCE_SPLITS", {"train": DomainSpec("source", 8, seed=1), "val": DomainSpec("source", 4, seed=2)}
    )
    return tmp_path


@pytest.mark.slow
def test_a_short_default_run_raises_test_miou_on_the_target_domain(small_demo):
    results = train_main(
        ["--output_dir", str(small_demo / "run"), "--train.max_steps", "40", "--data.num_workers", "0",
         "--train.eval_every", "20", "--train.log_images", "0"]
    )  # fmt: skip
    test = results["test"]
    assert test["best"]["mIoU"] > test["zero_shot"]["mIoU"] + 0.03
    assert test["weights_step"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sam", "sam2"])
def test_the_pretraining_command_trains_scores_and_installs_a_base(small_demo, monkeypatch, base):
    installed = small_demo / "installed" / f"demo-base-{base}"
    monkeypatch.setitem(bases.BASES, base, dataclasses.replace(bases.BASES[base], folder=installed))
    out = small_demo / "pretrain"
    chosen = [] if base == "sam" else ["--base", base]  # sam: the command as it always was
    demo_main(["pretrain", "--output", str(out), *chosen, "--steps", "2", "--install", "--data.num_workers", "0"])
    record = json.loads((out / "pretraining.json").read_text())
    assert record["steps"] == 2 and record["base"] == base
    # SAM 2 spends its first steps on the decoder alone (here 1 of 2), then trains everything from there
    assert record["decoder_first_steps"] == (1 if base == "sam2" else 0)
    assert (out / "decoder-first" / "final").is_dir() == (base == "sam2")
    assert record["prompt"] == ("box+point" if base == "sam2" else "mixed")  # each base's own pretraining prompts
    given = " ".join(["--output", str(out), *chosen, "--seed", "0", "--steps", "2", "--data.num_workers", "0"])
    assert record["command"] == f"samtune demo pretrain {given}"  # what ran, to run it again
    for key in ("source_val_box_mIoU", "source_val_point_mIoU", "target_test_box_mIoU", "target_test_point_mIoU"):
        assert 0 <= record[key] <= 1
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "zero-shot"
    model = AutoModelForMaskGeneration.from_pretrained(installed)
    assert model.config.model_type == base and record["parameters"] == sum(p.numel() for p in model.parameters())
    trained = AutoModelForMaskGeneration.from_pretrained(out / "run" / "best")
    for (name, a), (_, b) in zip(model.state_dict().items(), trained.state_dict().items()):
        assert (a == b).all(), name
    assert (installed / "pretraining.json").exists() and (installed / "processor_config.json").exists()


def test_the_demo_run_is_one_file_shipped_with_the_package():
    assert parse_config([]) == load_config(assets.RUN_CONFIG)
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert "demo/*.yaml" in pyproject and "demo/base/*" in pyproject and "demo/base-sam2/*" in pyproject


def test_the_demo_bases_are_one_registry(tiny_demo):
    assert list(bases.BASES) == list(typing.get_args(typing.get_type_hints(ModelConfig)["demo_base"]))
    assert bases.BASES[bases.DEFAULT_BASE].folder == assets.BASE_DIR == assets.prepare_demo().model
    assert ModelConfig().demo_base == bases.DEFAULT_BASE and parse_config([]).model.demo_base == "sam"
    assert bases.BASES["sam2"].folder == assets.HERE / "base-sam2"
    with pytest.raises(ConfigError, match="model.demo_base"):
        parse_config(["--model.demo_base", "vit-h"])
    with pytest.raises(ValueError, match="unknown demo base"):
        bases.demo_base("vit-h")


def test_the_sam2_demo_config_trains_from_scratch():
    config = bases.demo_sam2_config()
    backbone = config.vision_config.backbone_config
    assert config.model_type == "sam2" and config.prompt_encoder_config.image_size == 256
    assert backbone.image_size == [256, 256] and config.vision_config.backbone_feature_sizes == [[64, 64], [32, 32],
                                                                                               [16, 16]]  # fmt: skip
    starts = np.cumsum([0, *backbone.blocks_per_stage[:-1]])
    assert not set(backbone.global_attention_blocks) & set(starts.tolist())  # no global block opens a stage
    assert min(config.initializer_range, config.vision_config.initializer_range, backbone.initializer_range) == 0.02
    assert config.prompt_encoder_config.scale == 1  # low-frequency prompt encoding, as original SAM
    model = Sam2Model(config)
    count = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < count < 1.3e6  # about the SAM demo base's 1.17M
    features = model.vision_encoder(torch.randn(1, 3, 256, 256)).fpn_hidden_states
    assert all(level.std() > 1e-3 for level in features)  # a live encoder (1e-10 weights: outputs ~0)
    sum(level.pow(2).mean() for level in features).backward()
    assert model.vision_encoder.backbone.patch_embed.projection.weight.grad.abs().max() > 1e-6  # a gradient reaches it


def test_shipped_sam2_base_loads_like_a_hub_folder_and_is_small(tiny_demo):
    folder = bases.BASES["sam2"].folder
    files = {path.name: path.stat().st_size for path in folder.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "processor_config.json", "pretraining.json"}
    assert sum(files.values()) <= 10 * 2**20
    assert assets.prepare_demo(base="sam2").model == folder  # the demo's own lookup
    model, processor = load_sam(ModelConfig(name_or_path=str(folder)))  # what samtune train does with a folder
    assert isinstance(model, Sam2Model) and isinstance(AutoModelForMaskGeneration.from_pretrained(folder), Sam2Model)
    assert processor.image_processor.size == {"height": 256, "width": 256}
    expected = bases.demo_sam2_config().vision_config.backbone_config
    backbone = model.config.vision_config.backbone_config
    assert backbone.embed_dim_per_stage == expected.embed_dim_per_stage
    assert backbone.blocks_per_stage == expected.blocks_per_stage
    record = json.loads((folder / "pretraining.json").read_text())
    assert record["command"].startswith("samtune demo pretrain --output ") and "--base sam2" in record["command"]
    assert record["base"] == "sam2" and record["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["source_val_box_mIoU"] > 0.5  # what pretraining reached on its own domain
    assert record["target_test_box_mIoU"] < record["source_val_box_mIoU"] - 0.1  # and the shift it faces


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """The demo with tiny target-domain splits in a private cache."""
    monkeypatch.setenv("SAMTUNE_CACHE", str(tmp_path / "cache"))
    splits = {"train": DomainSpec("target", 4, seed=7001), "val": DomainSpec("target", 2, seed=7002),
              "test": DomainSpec("target", 2, seed=7003)}  # fmt: skip
    monkeypatch.setattr(assets, "TARGET_SPLITS", splits)
    return tmp_path


def test_the_demo_runs_on_the_sam2_base_by_one_knob(tiny_demo):
    settings = yaml.safe_load(assets.RUN_CONFIG.read_text())
    config = parse_config(["--model.demo_base", "sam2"])
    assert config.peft.method == settings["peft"]["method"] and config.output_dir == settings["output_dir"]
    out = tiny_demo / "run"
    results = train_main(["--model.demo_base", "sam2", "--output_dir", str(out), "--train.max_steps", "2",
                          "--data.num_workers", "0", "--train.log_images", "0"])  # fmt: skip
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["name_or_path"] == str(bases.BASES["sam2"].folder)
    assert resolved["model"]["demo_base"] == "sam2" and resolved["peft"]["method"] == settings["peft"]["method"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["steps"] == 2 and 0 < summary["parameters"]["all"]["trainable"] < 10**5  # adapters only
    test = results["test"]
    assert 0 <= test["zero_shot"]["mIoU"] <= 1 and 0 <= test["best"]["mIoU"] <= 1
