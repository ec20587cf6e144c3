"""Every family (SAM-HQ, SAM 2, SAM 3 tracker; SAM is covered throughout the suite) through the same pipeline:
what each method trains, the cached and direct forward agree, train -> evaluate -> export -> reload."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForMaskGeneration

from samtune.config import DataConfig, ModelConfig, PeftConfig, load_config
from samtune.data.batch import collate, to_device
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset
from samtune.evaluation import sam_forward
from samtune.losses import InstanceLoss, batch_loss
from samtune.models.family import HQ_MODULES, decoder_inputs, family_of, image_features
from samtune.models.loading import build_model, load_sam
from samtune.models.methods import ModelConfigError, target_presets
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny

FAMILIES = ("sam_hq", "sam2", "sam3_tracker")
METHODS = ("lora", "dora", "qlora", "qdora", "full", "decoder", "none")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny(root / family, family, seed=1) for family in FAMILIES}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Photos (JPEG, EXIF-rotated), 16-bit and palette PNGs, crowd regions: what real COCO files hold."""
    root = tmp_path_factory.mktemp("family-data")
    return {
        "train": make_synthetic_coco(root / "train", SyntheticSpec(num_images=4, seed=11, max_side=120)),
        "val": make_synthetic_coco(root / "val", SyntheticSpec(num_images=7, seed=12, max_side=120)),
    }


def _batch(folder: Path, split: tuple[Path, Path], prompt: str = "box") -> tuple:
    model, processor = load_sam(ModelConfig(str(folder)))
    source = CocoInstanceDataset(*split)
    dataset = SamPromptDataset(source, processor, DataConfig(prompt=prompt, max_instances=3), train=True)
    return model, processor, to_device(collate([dataset[0], dataset[1]]), "cpu")


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = {name.removeprefix("base_model.model."): p for name, p in model.named_parameters()}
    return {name for name, p in after.items() if name in before and not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_what_it_says(family, folders, splits):
    """One optimizer step per method: exactly the intended tensors move (adapters: base weights never do)."""
    _, _, batch = _batch(folders[family], splits["train"])
    for method in METHODS:
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(str(folders[family]), fast_encoder=True), PeftConfig(method=method))
        base = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        if method == "none":
            assert not trainable
            continue
        optimizer = torch.optim.SGD(trainable, lr=1.0)
        loss = batch_loss(sam_forward(model, batch), batch, InstanceLoss())["loss"]
        loss.backward()
        optimizer.step()
        moved = _changed(base, model)
        if method == "full":
            assert any(n.startswith("vision_encoder.") for n in moved) and any(
                n.startswith("mask_decoder.") for n in moved
            )
        elif method == "decoder":
            assert moved and all(n.startswith("mask_decoder.") for n in moved)
        else:  # adapters: only adapter tensors are trainable; the base weights stay as loaded
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            assert names and all("lora_" in n for n in names), (method, names[:3])
            assert not moved or all("lora_" in n for n in moved)
            assert any("lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in model.named_parameters()), method  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_mean_the_same_layers_in_every_family(family, folders):
    model = AutoModelForMaskGeneration.from_pretrained(folders[family])
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    presets = target_presets(family_of(model))

    def picked(name: str) -> list[str]:
        return [n for n in linear if re.fullmatch(presets[name], n)]

    encoder_attn, decoder_attn = picked("encoder-attn"), picked("decoder-attn")
    assert encoder_attn and all(n.startswith("vision_encoder.") for n in encoder_attn)
    assert decoder_attn and all(n.startswith("mask_decoder.transformer.") for n in decoder_attn)
    assert set(picked("encoder-attn-mlp")) > set(encoder_attn)
    assert set(picked("peft-sam")) < set(encoder_attn) | set(decoder_attn)
    assert not [n for n in picked("encoder-attn-mlp") if n.endswith(".proj") and ".attn." not in n]  # Hiera stage
    block = re.compile(family_of(model).encoder_block)
    every_block = {block.match(n).group(0) for n in linear if block.match(n)}
    assert {block.match(n).group(0) for n in encoder_attn} == every_block and len(every_block) > 1


def test_hq_method_trains_only_the_hq_modules(folders):
    model, _ = build_model(ModelConfig(str(folders["sam_hq"])), PeftConfig(method="hq"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(tuple(f"{m}." for m in HQ_MODULES))}
    assert trainable == expected and len(expected) > 10
    share = sum(p.numel() for n, p in model.named_parameters() if n in trainable) / sum(
        p.numel() for p in model.parameters()
    )
    assert 0 < share < 0.5
    lora, _ = build_model(ModelConfig(str(folders["sam_hq"])), PeftConfig(method="lora", train_modules=["hq"]))
    assert any("modules_to_save" in n and "hq_mask_mlp" in n for n, p in lora.named_parameters() if p.requires_grad)
    with pytest.raises(ModelConfigError, match="SAM-HQ"):
        build_model(ModelConfig(str(folders["sam2"])), PeftConfig(method="hq"))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_give_the_direct_forward(family, folders, splits):
    """What the cache stores (the encoder's features, before the decoder's own projections) gives the same
    outputs as the model on pixels, with a non-zero "no memory" embedding."""
    model, _, batch = _batch(folders[family], splits["train"], prompt="point")
    model.eval()
    if hasattr(model, "no_memory_embedding"):
        torch.nn.init.normal_(model.no_memory_embedding)
    with torch.no_grad():
        direct = sam_forward(model, batch)
        cached = sam_forward(model, batch, features=image_features(model, batch["pixel_values"]))
        official = model.get_image_embeddings(batch["pixel_values"])
    torch.testing.assert_close(cached.pred_masks, direct.pred_masks, rtol=0, atol=1e-5)
    assert cached.pred_masks.shape[2] == 3  # points alone: multimask, as for SAM
    inputs = decoder_inputs(model, image_features(model, batch["pixel_values"]))
    ours = inputs["image_embeddings"]
    if isinstance(official, tuple):  # SAM-HQ: (embedding, one output per global layer; the decoder reads the first)
        assert len(official[1]) == 2
        torch.testing.assert_close(ours, official[0])
        torch.testing.assert_close(inputs["intermediate_embeddings"], list(official[1][:1]))
    else:
        for a, b in zip(ours, official):
            torch.testing.assert_close(a, b)


def test_hq_token_only_is_the_hq_mask(folders, splits):
    model, _, batch = _batch(folders["sam_hq"], splits["train"])
    with torch.no_grad():
        both = sam_forward(model.eval(), batch).pred_masks
        hq = sam_forward(model, batch, hq_token_only=True).pred_masks
    assert not torch.allclose(both, hq)


def test_object_score_is_trained_towards_present(folders, splits):
    model, _, batch = _batch(folders["sam2"], splits["train"])
    outputs = sam_forward(model, batch)
    with_score = batch_loss(outputs, batch, InstanceLoss(object_score_weight=1.0))
    without = batch_loss(outputs, batch, InstanceLoss(object_score_weight=0.0))
    expected = torch.nn.functional.softplus(-outputs.object_score_logits[batch["valid"]][:, 0]).mean()
    # equal instance counts per image in this batch, so the per-image mean equals the plain mean
    torch.testing.assert_close(with_score["object_score"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_score["loss"] - without["loss"], with_score["object_score"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_evaluate_export_reload(family, folders, splits, tmp_path):
    """LoRA, 2 steps on photos / 16-bit / crowd data -> evaluate scores every non-crowd instance -> export merges
    -> the export and the unmerged adapter give the same masks."""
    from samtune.evaluate import main as evaluate
    from samtune.export import main as export
    from samtune.train import train

    out = tmp_path / "run"
    settings = {
        "model.name_or_path": str(folders[family]),
        "peft.method": "lora",
        "peft.targets": "all-linear",
        "data.train_annotations": str(splits["train"][0]),
        "data.train_images": str(splits["train"][1]),
        "data.val_annotations": str(splits["val"][0]),
        "data.val_images": str(splits["val"][1]),
        "data.num_workers": 0,
        "train.max_steps": 2,
        "train.lr": 1e-2,
        "train.log_images": 1,
        "output_dir": str(out),
    }
    results = train(load_config(overrides=settings))
    source = CocoInstanceDataset(*splits["val"])
    instances = sum(len(image.instances) for image in source.images)
    assert results["final"]["num_instances"] == instances > 0
    if family_of(AutoModelForMaskGeneration.from_pretrained(folders[family]).config).object_score:
        assert 0.0 <= results["final"]["object_present"] <= 1.0
    scored = evaluate(["--model", str(folders[family]), "--adapter", str(out / "final"),
                       "--annotations", str(splits["val"][0]), "--images", str(splits["val"][1])])  # fmt: skip
    assert scored["num_instances"] == instances
    assert scored["mIoU"] == pytest.approx(results["final"]["mIoU"], abs=1e-6)
    exported = export(["--adapter", str(out / "final"), "--out", str(tmp_path / "export")])
    card = (exported / "README.md").read_text()
    merged = AutoModelForMaskGeneration.from_pretrained(exported)
    assert type(merged).__name__ in card and "lora" in card
    base = AutoModelForMaskGeneration.from_pretrained(folders[family])
    unmerged = PeftModel.from_pretrained(base, str(out / "final"))
    _, _, batch = _batch(folders[family], splits["val"])
    with torch.no_grad():
        a = sam_forward(merged.eval(), batch).pred_masks
        b = sam_forward(unmerged.eval(), batch).pred_masks
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert json.loads((exported / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("family", ["sam_hq", "sam2"])
def test_predict_prompted_and_automatic(family, folders, splits, tmp_path):
    """Masks at each image's original size from box and point prompts, and from the automatic grid."""
    from samtune.predict import main as predict

    annotation_file, image_dir = splits["val"]
    data = json.loads(Path(annotation_file).read_text())
    sizes = {image["file_name"]: (image["height"], image["width"]) for image in data["images"]}
    first, second = list(sizes)[:2]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({first: {"boxes": [[2, 3, 30, 25]], "points": [[5, 5]]}, second: [[0, 0, 9, 9]]}))
    model = ["--model", str(folders[family])]
    prompted = predict([*model, "--images", str(image_dir), "--prompts", str(prompts),
                        "--output", str(tmp_path / "p.json"), "--hq-token-only"])  # fmt: skip
    assert sorted(r["file_name"] for r in prompted) == sorted([first, first, second])
    automatic = predict([*model, "--images", str(image_dir / first), "--points-per-side", "4", "--min-score", "-9",
                         "--min-stability", "0", "--output", str(tmp_path / "a.json")])  # fmt: skip
    assert automatic  # no filter left: the grid's masks, de-duplicated
    for r in prompted + automatic:
        assert tuple(r["segmentation"]["size"]) == sizes.get(r["file_name"], sizes[first])


def test_a_demo_base_that_is_not_installed_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """The SAM 2 demo base is registered but its weights are not shipped yet: the demo says how to make them."""
    from samtune.demo import bases
    from samtune.errors import run_command
    from samtune.train import main

    monkeypatch.setitem(bases.BASES, "sam2", bases.DemoBase("sam2", tmp_path / "absent", bases.demo_sam2_config))
    monkeypatch.setenv("SAMTUNE_CACHE", str(tmp_path / "cache"))
    code = run_command(main, ["--model.demo_base", "sam2", "--output_dir", str(tmp_path / "run")], prog="samtune train")
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0
    assert "sam2 demo base is not in this installation" in error and "samtune demo pretrain --base sam2" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ("sam",) + FAMILIES)
def test_a_prompt_is_encoded_where_the_image_encodes_its_pixel(family, folders, tiny_sam_dir):
    """A point at the centre of a grid cell gets the image-wide positional encoding of that cell, as in every
    released checkpoint; a random SAM 2 / 3 model from transformers draws the two apart, which leaves a model
    pretrained from scratch unable to find its prompts."""
    folder = tiny_sam_dir if family == "sam" else folders[family]
    model = AutoModelForMaskGeneration.from_pretrained(folder)
    grid = model.get_image_wide_positional_embeddings()[0]  # (C, side, side)
    side, size = grid.shape[-1], model.prompt_encoder.input_image_size
    stride = size / side
    row, col = 2, side - 3
    point = torch.tensor([[[[(col + 0.5) * stride - 0.5, (row + 0.5) * stride - 0.5]]]])  # pixel coords
    encoded = model.prompt_encoder.shared_embedding(point + 0.5, (size, size))[0, 0, 0]
    torch.testing.assert_close(encoded, grid[:, row, col], atol=1e-5, rtol=1e-5)
