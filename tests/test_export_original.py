"""--format segment-anything: merged weights as the original packages' checkpoints. SAM's loads strictly into
segment_anything's Sam and gives the merged model's masks and IoU; SAM-HQ's and SAM 2's are the very tensors the
official packages hold (official -> transformers -> back); SAM 3's tracker is refused in one line."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_original_checkpoints import _hq_modules, _official, _official_sam2, _official_sam_hq
from transformers import SamModel

from samtune.errors import UserError
from samtune.export import export
from samtune.export.original import save_original
from samtune.models import sam2_checkpoint, sam_hq_checkpoint, to_original
from samtune.models.loading import load_trained
from samtune.testing.tiny import save_tiny

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@contextmanager
def segment_anything():
    """segment_anything's modeling and build_sam, without its __init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("segment_anything")
    stand_in = types.ModuleType("segment_anything")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["segment_anything"] = stand_in
    try:
        yield (
            importlib.import_module("segment_anything.modeling"),
            importlib.import_module("segment_anything.build_sam"),
        )
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "segment_anything"]:
            del sys.modules[key]


def _official_tiny_sam(modeling, config):
    """segment_anything's Sam at the tiny SamConfig's size (as build_sam.py builds the published ones)."""
    vision, decoder = config.vision_config, config.mask_decoder_config
    grid = vision.image_size // vision.patch_size
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=vision.image_size,
            patch_size=vision.patch_size,
            embed_dim=vision.hidden_size,
            depth=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            mlp_ratio=vision.mlp_dim / vision.hidden_size,
            out_chans=vision.output_channels,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=vision.window_size,
            global_attn_indexes=tuple(vision.global_attn_indexes),
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=decoder.hidden_size,
            image_embedding_size=(grid, grid),
            input_image_size=(vision.image_size, vision.image_size),
            mask_in_chans=config.prompt_encoder_config.mask_input_channels,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(
                depth=decoder.num_hidden_layers,
                embedding_dim=decoder.hidden_size,
                mlp_dim=decoder.mlp_dim,
                num_heads=decoder.num_attention_heads,
            ),
            transformer_dim=decoder.hidden_size,
            iou_head_depth=decoder.iou_head_depth,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        ),
    ).eval()


@pytest.fixture(scope="module")
def lora_adapter(tiny_sam_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights on encoder and decoder (as after training), saved without a run."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["qkv", "q_proj", "v_proj", "lin1"], init_lora_weights=False)
    model = get_peft_model(SamModel.from_pretrained(tiny_sam_dir), config)
    folder = tmp_path_factory.mktemp("lora")
    model.save_pretrained(folder)
    return folder


_IMAGE = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)  # long side = input size
_PROMPTS = {
    "box": ({"boxes": torch.tensor([[10.0, 20.0, 90.0, 70.0]])}, {"input_boxes": [[[10.0, 20.0, 90.0, 70.0]]]}),
    "points": (
        {"point_coords": torch.tensor([[[40.0, 50.0], [100.0, 20.0]]]), "point_labels": torch.tensor([[1, 0]])},
        {"input_points": [[[[40.0, 50.0], [100.0, 20.0]]]], "input_labels": [[[1, 0]]]},
    ),
}


@pytest.mark.parametrize("multimask", [False, True])
def test_sam_pth_gives_the_merged_models_masks_in_segment_anything(lora_adapter, tiny_sam_dir, tmp_path, multimask):
    out = export(lora_adapter, tmp_path / "pth", fmt="segment-anything", base=str(tiny_sam_dir))
    merged, processor = load_trained(tiny_sam_dir, lora_adapter, fast_encoder=False)
    merged = merged.merge_and_unload()
    base = SamModel.from_pretrained(tiny_sam_dir)
    with segment_anything() as (modeling, _):
        official = _official_tiny_sam(modeling, merged.config)
        official.load_state_dict(torch.load(out / "sam.pth", weights_only=True), strict=True)
        image = torch.from_numpy(_IMAGE).permute(2, 0, 1).float()
        for official_prompt, our_prompt in _PROMPTS.values():
            with torch.no_grad():
                reference = official(
                    [{"image": image, "original_size": _IMAGE.shape[:2], **official_prompt}], multimask
                )
                inputs = processor(images=_IMAGE, return_tensors="pt", **our_prompt)
                prompts = {k: inputs[k].float() if k != "input_labels" else inputs[k] for k in our_prompt}
                ours = merged(pixel_values=inputs["pixel_values"], multimask_output=multimask, **prompts)
                stock = base(pixel_values=inputs["pixel_values"], multimask_output=multimask, **prompts)
            torch.testing.assert_close(ours.pred_masks[0], reference[0]["low_res_logits"], **TOLERANCE)
            torch.testing.assert_close(ours.iou_scores[0], reference[0]["iou_predictions"], **TOLERANCE)
            # not vacuous: the adapter moved the masks by far more than the tolerance
            assert (stock.pred_masks - ours.pred_masks).abs().max() > 100 * TOLERANCE["atol"]
    assert "sam.pth" in (out / "README.md").read_text()


def test_published_sam_sizes_load_through_the_registry():
    """A ViT-B-sized SamModel's export has the keys and shapes of sam_model_registry["vit_b"] (meta tensors)."""
    from transformers import SamConfig

    with torch.device("meta"):
        model = SamModel(SamConfig())
    ours = to_original.sam_state_dict(model.state_dict())
    with segment_anything() as (_, build), torch.device("meta"):
        official = build.sam_model_registry["vit_b"]().state_dict()
    assert sorted(ours) == sorted(official)
    assert all(ours[k].shape == official[k].shape for k in official)


def test_sam_hq_round_trip_is_the_official_state_dict(tmp_path):
    with _official("segment_anything_hq", "segment_anything_hq.modeling") as load:
        official = _official_sam_hq(_hq_modules(load))
    state = official.state_dict()
    model, _ = sam_hq_checkpoint.model_from_state_dict(state, "official")
    line = save_original(model, tmp_path)
    back = torch.load(tmp_path / "sam_hq.pth", weights_only=True)
    assert "segment_anything_hq" in line and sorted(back) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, atol=0, rtol=0)


def test_sam2_round_trip_is_the_official_image_model(tmp_path):
    with _official("sam2") as load:
        official = _official_sam2(load)
        state = official.state_dict()
        model, _ = sam2_checkpoint.model_from_state_dict(state, "official", image_size=256)
        # no original base: the image model alone, which the official model loads with strict=False
        save_original(model, tmp_path)
        back = torch.load(tmp_path / "sam2.pt", weights_only=True)["model"]
        image_model = {k: v for k, v in state.items() if not sam2_checkpoint.is_video_only(k)}
        assert sorted(back) == sorted(image_model)
        for key, value in image_model.items():
            torch.testing.assert_close(back[key], value, atol=0, rtol=0)
        # an original .pt base: its video-memory tensors come along, and the official model loads it strictly
        torch.save({"model": state}, tmp_path / "base.pt")
        save_original(model, tmp_path, base=str(tmp_path / "base.pt"))
        _official_sam2(load).load_state_dict(torch.load(tmp_path / "sam2.pt", weights_only=True)["model"], strict=True)


def test_sam3_tracker_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "sam3", "sam3_tracker")
    with pytest.raises(UserError, match="SAM 3 tracker has no original standalone checkpoint format"):
        export(folder, tmp_path / "out", fmt="segment-anything")
