"""Original SAM-HQ and SAM 2 / 2.1 checkpoints load into SamHQModel / Sam2Model and give the masks, IoU and object
scores of the official code (segment-anything-hq 0.3, sam2 1.1.0) on random weights of small models; the family is
told from the keys; layouts that cannot be read are refused, naming the file.

launch/setup.sh installs the official packages into .venv/reference, off the import path, without dependencies
(both declare torchvision, which must not be installed here). The fixtures import only their modeling modules,
through stand-in package modules, so no package __init__ runs: segment_anything_hq's imports its predictor
(torchvision), segment_anything_hq.modeling's imports TinyViT (timm, which needs torchvision), sam2's starts hydra.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import types
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import Sam2Model, SamHQModel, SamModel

from samtune.config import ModelConfig
from samtune.errors import UserError, run_command
from samtune.models import original_checkpoints, sam2_checkpoint, sam_hq_checkpoint
from samtune.models.loading import load_sam

REFERENCE = Path(sys.prefix) / "reference"  # where launch/setup.sh puts the official packages
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@contextmanager
def _official(*packages: str):
    """Import modules of the reference packages with ``packages`` as stand-ins whose __init__ does not run."""
    if not REFERENCE.is_dir():
        pytest.fail(f"{REFERENCE} is missing: `bash launch/setup.sh` installs the official reference packages there")
    roots = ("segment_anything_hq", "sam2", "iopath", "portalocker")
    sys.path.append(str(REFERENCE))
    for name in packages:
        stand_in = types.ModuleType(name)
        stand_in.__path__ = [str(REFERENCE / name.replace(".", "/"))]
        sys.modules[name] = stand_in
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(REFERENCE))
        for key in [k for k in sys.modules if k.split(".")[0] in roots]:
            del sys.modules[key]


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on top of the default initialisation: activations stay in range, and tensors initialised to zero or
    one (positions, norms, tokens) become distinct, so a tensor mapped to the wrong place changes the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- SAM-HQ


@pytest.fixture(scope="module")
def hq():
    with _official("segment_anything_hq", "segment_anything_hq.modeling") as load:
        yield _hq_modules(load)


def _hq_modules(load):
    modules = ("sam", "image_encoder", "prompt_encoder", "mask_decoder_hq", "transformer")
    return types.SimpleNamespace(**{name: load(f"segment_anything_hq.modeling.{name}") for name in modules})


def _official_sam_hq(hq, image_size=128, hidden=64, prompt=32, depth=4, global_layers=(1, 3)):
    """The official model as build_sam.py builds sam_hq_vit_*, at test size (the decoder's 8 heads kept)."""
    torch.manual_seed(0)
    sam = hq.sam.Sam(
        image_encoder=hq.image_encoder.ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            embed_dim=hidden,
            depth=depth,
            num_heads=4,
            mlp_ratio=4,
            out_chans=prompt,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=global_layers,
        ),
        prompt_encoder=hq.prompt_encoder.PromptEncoder(
            embed_dim=prompt,
            image_embedding_size=(image_size // 16, image_size // 16),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=hq.mask_decoder_hq.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=hq.transformer.TwoWayTransformer(depth=2, embedding_dim=prompt, mlp_dim=64, num_heads=8),
            transformer_dim=prompt,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
            vit_dim=hidden,
        ),
    )
    return _randomise(sam)


@pytest.fixture(scope="module")
def sam_hq_file(hq, tmp_path_factory):
    sam = _official_sam_hq(hq)
    path = tmp_path_factory.mktemp("sam_hq") / "sam_hq_small.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture(scope="module")
def sam_hq_run(sam_hq_file):
    """The official model, and the file converted (as transformers' SamHQModel computes it)."""
    sam, path = sam_hq_file
    model, processor = sam_hq_checkpoint.load_original_checkpoint(path)
    return sam, model, processor


@pytest.fixture(scope="module")
def sam_hq_loaded(sam_hq_file):
    """The official model, and the file as samtune loads it for training, evaluation and prediction."""
    sam, path = sam_hq_file
    model, processor = load_sam(ModelConfig(str(path)))
    return sam, model, processor


_IMAGE = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)  # long side = input size
_HQ_PROMPTS = {
    "box": ({"boxes": torch.tensor([[10.0, 20.0, 90.0, 70.0]])}, {"input_boxes": [[[10.0, 20.0, 90.0, 70.0]]]}),
    "points": (
        {"point_coords": torch.tensor([[[40.0, 50.0], [100.0, 20.0]]]), "point_labels": torch.tensor([[1, 0]])},
        {"input_points": [[[[40.0, 50.0], [100.0, 20.0]]]], "input_labels": [[[1, 0]]]},
    ),
}


def _sam_hq_outputs(sam, model, processor, prompt, multimask, hq_token_only):
    official_prompt, our_prompt = _HQ_PROMPTS[prompt]
    image = torch.from_numpy(_IMAGE).permute(2, 0, 1).float()
    with torch.no_grad():
        reference = sam(
            [{"image": image, "original_size": _IMAGE.shape[:2], **official_prompt}],
            multimask_output=multimask,
            hq_token_only=hq_token_only,
        )[0]
        inputs = processor(images=_IMAGE, return_tensors="pt", **our_prompt)
        prompts = {k: inputs[k].float() if k != "input_labels" else inputs[k] for k in our_prompt}
        ours = model(
            pixel_values=inputs["pixel_values"], multimask_output=multimask, hq_token_only=hq_token_only, **prompts
        )
    return reference, ours, inputs


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", ["box", "points"])
def test_sam_hq_same_masks_as_official(sam_hq_loaded, prompt, multimask, hq_token_only):
    """What samtune loads (the decoder fix of samtune.models.sam_hq_decoder_fix and the fast encoder included)."""
    sam, model, processor = sam_hq_loaded
    assert isinstance(model, SamHQModel) and model.config.vision_config.global_attn_indexes == [1, 3]
    reference, ours, inputs = _sam_hq_outputs(sam, model, processor, prompt, multimask, hq_token_only)
    # The official decoder returns, for multimask, the best of the three SAM masks plus the HQ mask; transformers
    # returns all three sorted by predicted IoU (each plus the HQ mask): its first is the official one.
    torch.testing.assert_close(ours.pred_masks[0][:, :1], reference["low_res_logits"], **TOLERANCE)
    torch.testing.assert_close(ours.iou_scores[0][:, :1], reference["iou_predictions"], **TOLERANCE)
    masks = processor.post_process_masks(ours.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert (masks[0][:, :1] == reference["masks"]).float().mean() > 0.999  # logits within rounding of 0 may differ


def test_sam_hq_prompts_and_hq_token_matter(sam_hq_run):
    """The comparison above is not vacuous: what it compares moves by far more than its tolerance."""
    sam, model, processor = sam_hq_run
    box = _sam_hq_outputs(sam, model, processor, "box", False, False)[0]["low_res_logits"]
    points = _sam_hq_outputs(sam, model, processor, "points", False, False)[0]["low_res_logits"]
    hq_only = _sam_hq_outputs(sam, model, processor, "box", False, True)[0]["low_res_logits"]
    assert (box - points).abs().max() > 100 * TOLERANCE["atol"]
    assert (box - hq_only).abs().max() > 100 * TOLERANCE["atol"]


@pytest.mark.xfail(
    strict=True,
    reason="transformers 5.24 SamHQMaskDecoder upscales the pre-transformer image embedding (see "
    "samtune.models.sam_hq_decoder_fix); when this passes, transformers has fixed it and the fix can go",
)
def test_sam_hq_stock_transformers_decoder_matches_official(sam_hq_run):
    sam, model, processor = sam_hq_run
    reference, ours, _ = _sam_hq_outputs(sam, model, processor, "box", False, False)
    torch.testing.assert_close(ours.iou_scores[0], reference["iou_predictions"], **TOLERANCE)  # tokens are right
    torch.testing.assert_close(ours.pred_masks[0], reference["low_res_logits"], **TOLERANCE)


def _edited(state: dict, drop: str = "", add: dict | None = None) -> dict:
    return {**{k: v for k, v in state.items() if not (drop and k.startswith(drop))}, **(add or {})}


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"drop": "mask_decoder.embedding_maskfeature.3."}, "do not fit SamHQModel: missing"),
        ({"add": {"mask_decoder.hf_mlp.layers.3.weight": torch.zeros(4, 4)}}, "do not fit SamHQModel"),
        ({"add": {"mask_decoder.compress_vit_feat.0.weight": torch.zeros(48, 32, 2, 2)}}, "48-wide ViT features"),
    ],
    ids=["missing-fusion-conv", "deeper-hq-mlp", "hq-fusion-width"],
)
def test_sam_hq_unexpected_layout_is_refused_naming_the_file(sam_hq_file, tmp_path, edit, says):
    sam, _ = sam_hq_file
    path = tmp_path / "odd_sam_hq.pth"
    torch.save(_edited(sam.state_dict(), **edit), path)
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*" + re.escape(says)):
        original_checkpoints.load_original(path)


# ---------------------------------------------------------------------------------------------------- SAM 2


@pytest.fixture(scope="module")
def sam2():
    with _official("sam2") as load:
        yield load


def _instantiate(node, load):
    """hydra.utils.instantiate for the official yaml configs: ``_target_`` classes built from their keys."""
    if isinstance(node, list):
        return [_instantiate(item, load) for item in node]
    if isinstance(node, str) and re.fullmatch(r"-?\d+(\.\d*)?e-?\d+", node):
        return float(node)  # YAML 1.1 reads 1e-6 as a string
    if not isinstance(node, dict):
        return node
    kwargs = {k: _instantiate(v, load) for k, v in node.items() if k != "_target_"}
    if "_target_" not in node:
        return kwargs
    module, name = node["_target_"].rsplit(".", 1)
    return getattr(load(module), name)(**kwargs)


HIERA_T = {  # sam2{,.1}_hiera_t.yaml
    "embed_dim": 96,
    "num_heads": 1,
    "stages": [1, 2, 7, 2],
    "global_att_blocks": [5, 7, 9],
    "window_pos_embed_bkg_spatial_size": [7, 7],
}


def _official_sam2(load, version="2.1", image_size=256, hidden=32, memory=16, trunk=None):
    """SAM2Base as build_sam2 builds it from sam2{,.1}_hiera_t.yaml for single images (mask-decoder extra args of
    build_sam.py), at test size: a small neck / decoder width and memory, the Hiera-T trunk unless ``trunk``."""
    hieradet = load("sam2.modeling.backbones.hieradet")
    encoder = load("sam2.modeling.backbones.image_encoder")
    position = load("sam2.modeling.position_encoding")
    attention = load("sam2.modeling.memory_attention")
    memory_encoder = load("sam2.modeling.memory_encoder")
    rope = partial(
        load("sam2.modeling.sam.transformer").RoPEAttention,
        rope_theta=10000.0,
        feat_sizes=[image_size // 16] * 2,
        embedding_dim=hidden,
        num_heads=1,
        downsample_rate=1,
        dropout=0.1,
    )
    torch.manual_seed(0)
    trunk = hieradet.Hiera(**(trunk or HIERA_T))
    sine = partial(position.PositionEmbeddingSine, normalize=True, scale=None, temperature=10000)
    image_encoder = encoder.ImageEncoder(
        trunk=trunk,
        neck=encoder.FpnNeck(
            position_encoding=sine(num_pos_feats=hidden),
            d_model=hidden,
            backbone_channel_list=trunk.channel_list,
            fpn_top_down_levels=[2, 3],
            fpn_interp_model="nearest",
        ),
        scalp=1,
    )
    memory_attention = attention.MemoryAttention(
        d_model=hidden,
        pos_enc_at_input=True,
        num_layers=1,
        layer=attention.MemoryAttentionLayer(
            activation="relu",
            cross_attention=rope(rope_k_repeat=True, kv_in_dim=memory),
            d_model=hidden,
            dim_feedforward=64,
            dropout=0.1,
            pos_enc_at_attn=False,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            self_attention=rope(),
        ),
    )
    encode_memory = memory_encoder.MemoryEncoder(
        out_dim=memory,
        mask_downsampler=memory_encoder.MaskDownSampler(kernel_size=3, stride=2, padding=1, embed_dim=hidden),
        fuser=memory_encoder.Fuser(memory_encoder.CXBlock(dim=hidden, kernel_size=7, padding=3), num_layers=1),
        position_encoding=sine(num_pos_feats=memory),
        in_dim=hidden,
    )
    v21 = version == "2.1"
    model = load("sam2.modeling.sam2_base").SAM2Base(
        image_encoder,
        memory_attention,
        encode_memory,
        image_size=image_size,
        directly_add_no_mem_embed=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=v21,
        proj_tpos_enc_in_obj_ptrs=v21,
        use_signed_tpos_enc_to_obj_ptrs=v21,
        no_obj_embed_spatial=v21,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        use_mlp_for_obj_ptr_proj=True,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
    )
    return _randomise(model)


@contextmanager
def _meta_device():
    """Build without allocating (published sizes in milliseconds); Hiera reads its drop-path rates with .item(),
    which meta tensors cannot, so torch.linspace alone stays on the CPU meanwhile."""
    linspace = torch.linspace
    torch.linspace = partial(linspace, device="cpu")
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.linspace = linspace


def _official_features(model, pixels):
    """SAM2ImagePredictor.set_image after its (torchvision) transforms: the decoder's three feature levels."""
    backbone = model.forward_image(pixels)
    _, features, _, sizes = model._prepare_backbone_features(backbone)
    features[-1] = features[-1] + model.no_mem_embed
    return [f.permute(1, 2, 0).view(1, -1, *size) for f, size in zip(features, sizes)]


@pytest.fixture(scope="module")
def sam2_run(sam2, tmp_path_factory):
    return _sam2_setup(sam2, tmp_path_factory.mktemp("sam2"))


def _sam2_setup(load, folder: Path) -> types.SimpleNamespace:
    """The official SAM 2.1 model (video modules included) saved as {"model": state}, converted, both encoders
    run once on the same 256 px image."""
    official = _official_sam2(load)
    path = folder / "sam2.1_hiera_tiny_small.pt"
    torch.save({"model": official.state_dict()}, path)
    model, processor = sam2_checkpoint.load_original_checkpoint(path, image_size=256)
    image = np.random.default_rng(1).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = ((torch.from_numpy(image).float() / 255 - mean) / std).permute(2, 0, 1)[None]  # SAM2Transforms
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        reference = _official_features(official, pixels)
        ours = model.get_image_embeddings(inputs["pixel_values"])
    return types.SimpleNamespace(
        official=official, path=path, model=model, processor=processor, image=image, reference=reference, ours=ours
    )


_SAM2_PROMPTS = {  # official predictor: a box is two points labelled 2 and 3
    "box": (([[40.0, 60.0], [200.0, 180.0]], [2, 3]), {"input_boxes": [[[40.0, 60.0, 200.0, 180.0]]]}),
    "points": (
        ([[100.0, 120.0], [30.0, 200.0]], [1, 0]),
        {"input_points": [[[[100.0, 120.0], [30.0, 200.0]]]], "input_labels": [[[1, 0]]]},
    ),
}


def _sam2_outputs(run, prompt, multimask):
    (coords, labels), our_prompt = _SAM2_PROMPTS[prompt]
    official = run.official
    with torch.no_grad():
        sparse, dense = official.sam_prompt_encoder(
            points=(torch.tensor([coords]), torch.tensor([labels], dtype=torch.int)), boxes=None, masks=None
        )
        masks, iou, _, object_score = official.sam_mask_decoder(
            image_embeddings=run.reference[-1],
            image_pe=official.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=run.reference[:-1],
        )
        inputs = run.processor(images=run.image, return_tensors="pt", **our_prompt)
        prompts = {k: inputs[k] for k in our_prompt}
        ours = run.model(image_embeddings=run.ours, multimask_output=multimask, **prompts)
    return (masks, iou, object_score), ours, inputs


def test_sam2_image_features_match_official(sam2_run):
    for ours, reference in zip(sam2_run.ours, sam2_run.reference):
        torch.testing.assert_close(ours, reference, **TOLERANCE)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", ["box", "points"])
def test_sam2_same_masks_as_official(sam2_run, prompt, multimask):
    (masks, iou, object_score), ours, inputs = _sam2_outputs(sam2_run, prompt, multimask)
    torch.testing.assert_close(ours.pred_masks[0], masks, **TOLERANCE)
    torch.testing.assert_close(ours.iou_scores[0], iou, **TOLERANCE)
    torch.testing.assert_close(ours.object_score_logits[0], object_score, **TOLERANCE)
    full = sam2_run.processor.post_process_masks(ours.pred_masks, inputs["original_sizes"])[0][0]
    official_full = F.interpolate(masks, sam2_run.image.shape[:2], mode="bilinear", align_corners=False) > 0
    assert (full == official_full).float().mean() > 0.999


def test_sam2_prompts_matter(sam2_run):
    """The comparison above is not vacuous: what it compares moves by far more than its tolerance."""
    box = _sam2_outputs(sam2_run, "box", True)[1]
    points = _sam2_outputs(sam2_run, "points", True)[1]
    for name in ("pred_masks", "iou_scores", "object_score_logits"):
        assert (getattr(box, name) - getattr(points, name)).abs().max() > 10 * TOLERANCE["atol"], name


def test_sam2_video_modules_are_left_out_quietly(sam2_run, tmp_path, caplog):
    state = sam2_run.official.state_dict()
    video = [k for k in state if sam2_checkpoint.is_video_only(k)]
    assert {k.split(".")[0] for k in video} == {
        "memory_attention",
        "memory_encoder",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "mask_downsample",
        "obj_ptr_proj",
        "no_obj_ptr",
        "obj_ptr_tpos_proj",
        "no_obj_embed_spatial",
    }
    assert sam2_checkpoint.describe(state) == "SAM 2.1 Hiera-T"
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = original_checkpoints.load_original(sam2_run.path, image_size=256)
    said = " ".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]).lower()
    assert "memory" not in said and "unexpected" not in said
    assert not any("memory" in k for k in model.state_dict() if k != "no_memory_embedding")


def test_sam2_0_checkpoint_converts_to_the_same_image_model(sam2, sam2_run):
    """SAM 2 and 2.1 differ only in video modules: a SAM 2 file of the same weights converts identically."""
    with _meta_device():
        sam2_0_keys = set(_official_sam2(sam2, version="2.0").state_dict())
    sam2_1 = sam2_run.official.state_dict()
    assert set(sam2_1) - sam2_0_keys == {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"}
    sam2_0 = {k: v for k, v in sam2_1.items() if k in sam2_0_keys}
    assert sam2_checkpoint.describe(sam2_0) == "SAM 2 Hiera-T"
    assert original_checkpoints.family_of_state(sam2_0) == "SAM 2"
    config = sam2_checkpoint.config_from_state_dict(sam2_0, image_size=256)
    assert config.to_dict() == sam2_run.model.config.to_dict()
    converted = sam2_checkpoint.convert_state_dict(sam2_0)
    assert converted.keys() == sam2_checkpoint.convert_state_dict(sam2_1).keys()
    for key, value in sam2_run.model.state_dict().items():
        torch.testing.assert_close(converted[key], value, atol=0, rtol=0)


_CONFIGS = ["sam2/sam2_hiera_t", "sam2/sam2_hiera_s", "sam2/sam2_hiera_b+", "sam2/sam2_hiera_l"]
_CONFIGS += [name.replace("sam2/sam2_", "sam2.1/sam2.1_") for name in _CONFIGS]


@pytest.mark.parametrize("config", _CONFIGS)
def test_published_sam2_layouts_are_read(sam2, config):
    """Each published architecture, built from the official yaml on the meta device, converts into a Sam2Model with
    the same tensors and the official trunk's per-block width, heads and attention window."""
    settings = yaml.safe_load((REFERENCE / "sam2" / "configs" / f"{config}.yaml").read_text())["model"]
    settings.pop("compile_image_encoder", None)
    with _meta_device():
        official = _instantiate(settings, sam2)
    state = official.state_dict()
    with torch.device("meta"):
        model = Sam2Model(sam2_checkpoint.config_from_state_dict(state))
    version = "SAM 2.1" if config.startswith("sam2.1/") else "SAM 2"
    size = {"t": "T", "s": "S", "b+": "B+", "l": "L"}[config.rsplit("_", 1)[1]]
    assert sam2_checkpoint.describe(state) == f"{version} Hiera-{size}"
    converted = sam2_checkpoint.convert_state_dict(state)
    expected = model.state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    ours = model.vision_encoder.backbone.blocks
    theirs = official.image_encoder.trunk.blocks
    assert [(b.dim_out, b.attn.num_heads, b.window_size) for b in theirs] == [
        (b.dim_out, b.attn.num_attention_heads, b.window_size) for b in ours
    ]


def test_unknown_sam2_trunk_is_refused_naming_the_file(sam2, tmp_path):
    trunk = {
        "embed_dim": 16,
        "num_heads": 1,
        "stages": [1, 1, 2, 1],
        "global_att_blocks": [3],
        "window_spec": [4, 4, 4, 4],
        "window_pos_embed_bkg_spatial_size": [2, 2],
    }
    path = tmp_path / "custom_sam2.pt"
    torch.save({"model": _official_sam2(sam2, image_size=128, trunk=trunk).state_dict()}, path)
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*none of the published"):
        original_checkpoints.load_original(path)


def test_sam2_unexpected_tensors_are_refused_naming_the_file(sam2_run):
    state = sam2_run.official.state_dict()
    source = "checkpoints/odd_sam2.pt"
    for edited, says in [
        (_edited(state, drop="sam_mask_decoder.pred_obj_score_head."), "do not fit Sam2Model: missing"),
        (_edited(state, add={"sam_mask_decoder.hf_token.weight": torch.zeros(1, 32)}), "a SAM 2 HQ"),
    ]:
        with pytest.raises(UserError, match=re.escape(source) + ".*" + says):
            original_checkpoints.model_from_state_dict(edited, source, image_size=256)


# ---------------------------------------------------------------------------------------------------- dispatcher


def test_family_is_read_from_the_keys(sam_hq_file, sam2_run, tmp_path):
    sam, _ = sam_hq_file
    hq_state = sam.state_dict()
    plain = {k: v for k, v in hq_state.items() if not re.match(r"mask_decoder\.(hf_|compress|embedding_)", k)}
    files = {"sam.bin": plain, "sam_hq.bin": hq_state}  # names say nothing: the keys decide
    for name, state in files.items():
        torch.save(state, tmp_path / name)
    assert isinstance(original_checkpoints.load_original(tmp_path / "sam.bin")[0], SamModel)
    assert isinstance(original_checkpoints.load_original(tmp_path / "sam_hq.bin")[0], SamHQModel)
    assert original_checkpoints.family_of_state(plain) == "SAM"
    assert original_checkpoints.family_of_state(hq_state) == "SAM-HQ"
    assert original_checkpoints.family_of_state(sam2_run.official.state_dict()) == "SAM 2"


@pytest.mark.parametrize(
    "content, says",
    [
        ({"backbone.conv.weight": torch.zeros(2)}, "not an original SAM, SAM-HQ or SAM 2 checkpoint: expected"),
        (torch.zeros(3), "holds a Tensor, not a state dict"),
        (
            {"image_encoder.layers.0.blocks.0.attn.qkv.weight": torch.zeros(1), "mask_decoder.iou_token.weight": 0},
            "TinyViT image encoder",
        ),
    ],
    ids=["other-model", "not-a-dict", "tinyvit"],
)
def test_other_checkpoints_are_refused_naming_the_file(tmp_path, content, says):
    path = tmp_path / "model.pth"
    torch.save(content, path)
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*" + says):
        original_checkpoints.load_original(path)


def test_convert_command(sam_hq_file, tmp_path, capsys):
    _, path = sam_hq_file
    assert run_command(original_checkpoints.main, [str(path), str(tmp_path / "out")]) == 0
    assert "SAM-HQ, as SamHQModel" in capsys.readouterr().out
    direct, _ = sam_hq_checkpoint.load_original_checkpoint(path)
    folder = SamHQModel.from_pretrained(tmp_path / "out")
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(folder.state_dict()[key], value, atol=0, rtol=0)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert run_command(original_checkpoints.main, [str(tmp_path / "bad.pth"), str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / "bad.pth") in error


if __name__ == "__main__":  # the largest differences, printed: .venv/bin/python tests/test_original_checkpoints.py
    import tempfile
    from itertools import product

    def largest(a, b):
        return f"{(a - b).abs().max().item():.1e}"

    with tempfile.TemporaryDirectory() as folder, _official("segment_anything_hq", "segment_anything_hq.modeling") as h:
        official_hq, path = _official_sam_hq(_hq_modules(h)), Path(folder) / "sam_hq.pth"
        torch.save(official_hq.state_dict(), path)
        stock, processor = sam_hq_checkpoint.load_original_checkpoint(path)
        fixed, _ = load_sam(ModelConfig(str(path)))
        cases = product(_HQ_PROMPTS, (False, True), (False, True), ("samtune", "stock"))
        for prompt, multimask, hq_only, loaded in cases:
            model = fixed if loaded == "samtune" else stock
            ref, ours, _ = _sam_hq_outputs(official_hq, model, processor, prompt, multimask, hq_only)
            print(
                f"SAM-HQ {prompt:6} multimask={multimask:d} hq_token_only={hq_only:d} {loaded}:"
                f" masks {largest(ours.pred_masks[0][:, :1], ref['low_res_logits'])}"
                f" iou {largest(ours.iou_scores[0][:, :1], ref['iou_predictions'])}"
            )
    with tempfile.TemporaryDirectory() as folder, _official("sam2") as load:
        run = _sam2_setup(load, Path(folder))
        print("SAM 2 image features", [largest(a, b) for a, b in zip(run.ours, run.reference)])
        for prompt, multimask in product(_SAM2_PROMPTS, (False, True)):
            (masks, iou, score), ours, _ = _sam2_outputs(run, prompt, multimask)
            print(
                f"SAM 2 {prompt:6} multimask={multimask:d}: masks {largest(ours.pred_masks[0], masks)}"
                f" iou {largest(ours.iou_scores[0], iou)} object score {largest(ours.object_score_logits[0], score)}"
            )
