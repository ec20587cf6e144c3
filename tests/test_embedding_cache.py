"""Cached image embeddings: same training as without, and a miss whenever anything they depend on changes."""

import json
import logging
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamModel, SamProcessor

from samtune.config import ModelConfig, PeftConfig
from samtune.data.dataset import Split
from samtune.embedding_cache import EmbeddingCache, why_not_cacheable
from samtune.errors import UserError
from samtune.models.architectures import processor_for, tiny_sam_config
from samtune.models.family import image_features
from samtune.models.loading import build_model
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny, save_tiny_sam
from samtune.train import main as train


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-splits")
    return make_synthetic_coco(root / "train", SyntheticSpec(num_images=6, seed=1)), make_synthetic_coco(
        root / "val", SyntheticSpec(num_images=3, seed=2)
    )


def _train(tmp_path, tiny_sam_dir, splits, name, *extra):
    (train_ann, train_img), (val_ann, val_img) = splits
    out = tmp_path / name
    results = train(
        [
            "--model.name_or_path",
            str(tiny_sam_dir),
            "--data.train_annotations",
            str(train_ann),
            "--data.train_images",
            str(train_img),
            "--data.val_annotations",
            str(val_ann),
            "--data.val_images",
            str(val_img),
            "--data.num_workers",
            "0",
            "--train.epochs",
            "3",
            "--train.eval_every",
            "2",
            "--train.log_every",
            "1",
            "--train.lr",
            "1e-3",
            "--train.log_images",
            "0",
            "--output_dir",
            str(out),
            *extra,
        ]
    )
    return out, results


@pytest.mark.parametrize(
    ("method", "targets", "family"),
    [
        ("decoder", "peft-sam", "sam"),
        ("lora", "decoder-attn", "sam"),
        # SAM 2: the decoder's own projections of the cached levels train; SAM-HQ: its fusion of the cached
        # global-layer outputs trains
        ("decoder", "peft-sam", "sam2"),
        ("lora", "decoder-attn", "sam2"),  # projections frozen: the cache stores the projected levels
        ("hq", "peft-sam", "sam_hq"),
    ],
)
def test_training_with_and_without_the_cache_is_the_same(
    tmp_path, tiny_sam_dir, splits, caplog, method, targets, family
):
    caplog.set_level(logging.INFO, logger="samtune")
    if family != "sam":
        tiny_sam_dir = save_tiny(tmp_path / family, family, seed=1)
    common = ("--peft.method", method, "--peft.targets", targets, "--peft.dropout", "0")
    cached_out, cached = _train(tmp_path, tiny_sam_dir, splits, "cached", *common)
    assert "image embeddings: cached (in memory" in caplog.text
    caplog.clear()
    plain_out, plain = _train(tmp_path, tiny_sam_dir, splits, "plain", *common, "--data.cache_embeddings", "false")
    assert "recomputed every step (data.cache_embeddings is false)" in caplog.text
    summary = json.loads((cached_out / "results.json").read_text())
    images = 5 + 3  # train and val images with instances (one training image has none): each encoded once
    assert summary["embedding_cache"]["misses"] == images and summary["embedding_cache"]["hits"] > images
    lines = [json.loads(x) for x in (cached_out / "metrics.jsonl").read_text().splitlines()]
    plain_lines = [json.loads(x) for x in (plain_out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines, plain_lines, strict=True):
        assert a["step"] == b["step"]
        assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-6)
        assert (a["train_loss"] is None) == (b["train_loss"] is None)
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(cached_out / "final" / weights), load_file(plain_out / "final" / weights)
    for key in a:
        # An attention key bias shifts every logit of a query alike, so softmax cancels it: its true gradient
        # is 0 and Adam turns rounding noise into lr-sized steps. Every other weight agrees to float precision.
        if key.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_the_log_says_why_there_is_no_cache(tiny_sam_dir):
    model, _ = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method="lora", targets="encoder-attn"))
    assert "the image encoder trains" in why_not_cacheable(model)
    model, _ = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method="full"))
    assert "the image encoder trains" in why_not_cacheable(model)
    model, _ = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method="dora", targets="decoder-attn"))
    assert why_not_cacheable(model) is None
    config = tiny_sam_config()
    config.vision_config.attention_dropout = 0.1
    frozen = SamModel(config).requires_grad_(False)
    assert "attention dropout" in why_not_cacheable(frozen)


def _encode_all(cache, split, paths, model):
    ids = torch.tensor(list(paths))
    side = model.config.vision_config.image_size
    pixels = torch.stack([torch.full((3, side, side), float(i)) for i in ids])  # stands in for processed images
    return cache.embeddings(split, ids, pixels, partial(image_features, model))


def test_what_is_cached_is_known_and_a_vanished_entry_of_an_unread_image_is_one_error(tmp_path, tiny_sam_dir):
    """cached_ids tells the loader which images it need not read; if a cache file disappears under the run
    after that, the batch cannot be encoded (its pixels were not read): one line saying how to go on."""
    paths = {}
    for n in range(3):
        paths[n] = tmp_path / f"{n}.png"
        Image.fromarray(np.full((20, 30, 3), 40 * n, np.uint8)).save(paths[n])
    model = SamModel.from_pretrained(tiny_sam_dir)
    for folder in (None, tmp_path / "cache"):
        cache = EmbeddingCache(model, SamProcessor.from_pretrained(tiny_sam_dir), folder)
        cache.register(Split.TRAIN, paths)
        assert cache.cached_ids(Split.TRAIN) == set()
        _encode_all(cache, Split.TRAIN, {n: paths[n] for n in (0, 2)}, model)
        assert cache.cached_ids(Split.TRAIN) == {0, 2} and cache.cached_ids(Split.VAL) == set()
    (victim,) = [f for f in cache.folder.glob("*.safetensors") if f.stem == cache._key(Split.TRAIN, 2)]
    victim.unlink()
    assert cache.cached_ids(Split.TRAIN) == {0}
    side = model.config.vision_config.image_size
    pixels = torch.zeros(2, 3, side, side)
    ids, encode = torch.tensor([0, 2]), partial(image_features, model)
    with pytest.raises(UserError, match="image id 2: its cached embedding vanished .* train.resume_from latest"):
        cache.embeddings(Split.TRAIN, ids, pixels, encode, torch.tensor([False, False]))
    found = cache.embeddings(Split.TRAIN, ids, pixels, encode, torch.tensor([False, True]))  # 2 was read
    assert cache.cached_ids(Split.TRAIN) == {0, 2} and len(next(iter(found.values()))) == 2  # encoded again


def test_every_dependency_change_is_a_miss(tmp_path, tiny_sam_dir):
    images = tmp_path / "images"
    images.mkdir()
    paths = {}
    for n in range(3):
        paths[n] = images / f"{n}.png"
        Image.fromarray(np.full((20, 30, 3), 40 * n, np.uint8)).save(paths[n])
    folder = tmp_path / "cache"

    def cache_for(model_dir, processor=None):
        model = SamModel.from_pretrained(model_dir)
        cache = EmbeddingCache(model, processor or SamProcessor.from_pretrained(model_dir), folder)
        cache.register(0, paths)
        _encode_all(cache, 0, paths, model)
        return cache

    first = cache_for(tiny_sam_dir)
    assert (first.hits, first.misses) == (0, 3)
    again = cache_for(tiny_sam_dir)  # a later run, same everything: all hits from disk
    assert (again.hits, again.misses) == (3, 0)
    assert len(list(first.folder.glob("*.safetensors"))) == 3 and not list(first.folder.glob(".*tmp"))

    other_weights = save_tiny_sam(tmp_path / "other", seed=7)  # another model
    assert cache_for(other_weights).misses == 3
    bigger = save_tiny_sam(tmp_path / "bigger", image_size=160)  # another input size
    assert cache_for(bigger).misses == 3
    processor = processor_for(tiny_sam_config())
    processor.image_processor.image_mean = [0.5, 0.5, 0.5]  # another preprocessing
    assert cache_for(tiny_sam_dir, processor).misses == 3
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(paths[1])  # an edited image file
    edited = cache_for(tiny_sam_dir)
    assert (edited.hits, edited.misses) == (2, 1)
    shutil.rmtree(folder)


def test_sam2_cache_stores_projected_levels_only_when_the_projections_are_frozen(tmp_path):
    from samtune.embedding_cache import encoder_fingerprint, estimate_bytes, projects

    folder = save_tiny(tmp_path / "sam2", "sam2", seed=1)
    adapters, _ = build_model(ModelConfig(str(folder)), PeftConfig(method="lora", targets="decoder-attn"))
    decoder, _ = build_model(ModelConfig(str(folder)), PeftConfig(method="decoder"))
    assert projects(adapters) and not projects(decoder)
    config = adapters.get_base_model().config
    side = config.prompt_encoder_config.image_size // 4
    hidden = config.vision_config.fpn_hidden_size
    raw = hidden * (side**2 + (side // 2) ** 2 + (side // 4) ** 2) * 4
    projected = (hidden // 8 * side**2 + hidden // 4 * (side // 2) ** 2 + hidden * (side // 4) ** 2) * 4
    assert estimate_bytes(decoder, 3) == 3 * raw and estimate_bytes(adapters, 3) == 3 * projected
    pixels = torch.randn(2, 3, 2 * side * 2, 2 * side * 2)
    features = image_features(adapters, pixels, project=True)
    assert sorted(features) == ["level2", "projected0", "projected1"]
    assert sum(t[0].numel() for t in features.values()) * 4 == projected
    # the projections are part of what the projected cache stands in for: other weights there, another key
    before = encoder_fingerprint(adapters)
    with torch.no_grad():
        adapters.get_base_model().mask_decoder.conv_s0.weight.add_(1)
    assert encoder_fingerprint(adapters) != before
