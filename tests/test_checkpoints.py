"""Original segment-anything checkpoints load into SamModel and give the same masks as segment-anything itself."""

import importlib.util
import pickle
import sys
import types
from functools import partial

import numpy as np
import pytest
import torch
from transformers import SamModel

from samtune.config import ModelConfig
from samtune.models.loading import load_sam
from samtune.models.segment_anything_checkpoint import load_original_checkpoint


@pytest.fixture(scope="module")
def sa_modeling():
    """segment_anything.modeling without running the package's __init__ (it imports torchvision, absent here)."""
    spec = importlib.util.find_spec("segment_anything")
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {k: v for k, v in sys.modules.items() if k.startswith("segment_anything")}
    sys.modules["segment_anything"] = package
    try:
        yield importlib.import_module("segment_anything.modeling")
    finally:
        for key in [k for k in sys.modules if k.startswith("segment_anything")]:
            del sys.modules[key]
        sys.modules.update(saved)


def _small_sam(sa, image_size=128, hidden=64, prompt=32, global_layers=(1,), depth=2, heads=2, window=4):
    torch.manual_seed(0)
    sam = sa.Sam(
        image_encoder=sa.ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            embed_dim=hidden,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4,
            out_chans=prompt,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=window,
            global_attn_indexes=global_layers,
        ),
        prompt_encoder=sa.PromptEncoder(
            embed_dim=prompt,
            image_embedding_size=(image_size // 16, image_size // 16),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=sa.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sa.TwoWayTransformer(depth=2, embedding_dim=prompt, mlp_dim=64, num_heads=2),
            transformer_dim=prompt,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():  # random everywhere, relative positions included (SAM initialises those to zero)
        for parameter in sam.parameters():
            parameter.normal_(0, 0.1)
    return sam.eval()


@pytest.mark.parametrize("layout", [{"global_layers": (1,)}, {"global_layers": (1, 3), "depth": 4, "heads": 4}])
def test_same_masks_as_segment_anything(sa_modeling, tmp_path, layout):
    sam = _small_sam(sa_modeling, **layout)
    path = tmp_path / "sam_small.pth"
    torch.save(sam.state_dict(), path)
    model, processor = load_sam(ModelConfig(str(path)))  # the same entry point as a hub id or folder
    assert isinstance(model, SamModel)
    assert model.config.vision_config.global_attn_indexes == list(layout["global_layers"])

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)  # long side = input size: no resampling
    box = [10.0, 20.0, 90.0, 70.0]
    with torch.no_grad():
        reference = sam(
            [
                {
                    "image": torch.from_numpy(image).permute(2, 0, 1).float(),
                    "boxes": torch.tensor([box]),
                    "original_size": image.shape[:2],
                }
            ],
            multimask_output=False,
        )[0]
        inputs = processor(images=image, input_boxes=[[box]], return_tensors="pt")
        ours = model(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(), multimask_output=False
        )
    torch.testing.assert_close(ours.pred_masks[0], reference["low_res_logits"], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours.iou_scores[0], reference["iou_predictions"], atol=2e-4, rtol=1e-4)
    masks = processor.post_process_masks(ours.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    agree = (masks[0][0] == reference["masks"][0]).float().mean()
    assert agree > 0.999  # pixels whose logit is within rounding of 0 may differ


def test_converted_folder_round_trip(sa_modeling, tmp_path):
    from samtune.models.segment_anything_checkpoint import main

    sam = _small_sam(sa_modeling)
    torch.save({"model": sam.state_dict()}, tmp_path / "wrapped.pth")  # training checkpoints wrap the weights
    main([str(tmp_path / "wrapped.pth"), str(tmp_path / "converted")])
    direct, _ = load_original_checkpoint(tmp_path / "wrapped.pth")
    folder = SamModel.from_pretrained(tmp_path / "converted")
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(folder.state_dict()[key], value, atol=0, rtol=0)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoints_are_loaded_without_running_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"image_encoder.patch_embed.proj.weight": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_original_checkpoint(path)
