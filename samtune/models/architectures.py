"""Every model config samtune builds: the published architectures, the shipped demo bases and the test-sized
models of each family (SAM, SAM-HQ, SAM 2, SAM 3 tracker).

Latency and memory depend on the architecture alone, so random weights of a published architecture measure
them honestly without a download. Models saved by ``save_random_sam`` load back through the very
``from_pretrained`` calls a hub id takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForMaskGeneration,
    PreTrainedConfig,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
    Sam3TrackerConfig,
    Sam3TrackerMaskDecoderConfig,
    Sam3TrackerPromptEncoderConfig,
    Sam3VisionConfig,
    Sam3ViTConfig,
    SamConfig,
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQProcessor,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from samtune.models.family import family_of

# Image-encoder shapes of the published SAM checkpoints (their prompt encoder and mask decoder are all the same);
# segment-anything's build_sam.py, SlimSAM's pruned widths as transformers' SAM conversion script sets them.
_GLOBAL_EVERY_3RD = {"num_hidden_layers": 12, "num_attention_heads": 12, "global_attn_indexes": [2, 5, 8, 11]}
PUBLISHED = {
    "vit-b": {"hidden_size": 768, **_GLOBAL_EVERY_3RD},
    "vit-l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "global_attn_indexes": [5, 11, 17, 23]},
    "vit-h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
              "global_attn_indexes": [7, 15, 23, 31]},
    "slimsam-50": {"hidden_size": 384, "mlp_dim": 1536, **_GLOBAL_EVERY_3RD},
    "slimsam-77": {"hidden_size": 168, "mlp_dim": 696, **_GLOBAL_EVERY_3RD},
}  # fmt: skip
# SAM-HQ (segment-anything-hq's build_sam_hq.py): SAM's ViT, SAM's decoder plus the HQ token and the fusion of the
# first global layer's features, read at the ViT's width (vit_dim).
PUBLISHED_SAM_HQ = {"sam-hq-vit-b": "vit-b", "sam-hq-vit-l": "vit-l", "sam-hq-vit-h": "vit-h"}
# SAM 2.1 Hiera trunks (facebookresearch/sam2, sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml; B+ is Hiera's
# defaults in sam2/modeling/backbones/hieradet.py). Width and heads double at each of the three stage changes
# (dim_mul = head_mul = 2); the FPN neck reads every stage (backbone_channel_list, widest first) into 256
# channels, top-down fusion from levels 2 and 3, the decoder reading levels at 1/4, 1/8 and 1/16 of the input.
_HIERA_WINDOWS = [8, 4, 14, 7]
PUBLISHED_SAM2 = {
    "sam2.1-hiera-t": {"width": 96, "heads": 1, "blocks_per_stage": [1, 2, 7, 2], "global_attention_blocks": [5, 7, 9],
                       "window_size_per_stage": _HIERA_WINDOWS, "background": [7, 7]},
    "sam2.1-hiera-s": {"width": 96, "heads": 1, "blocks_per_stage": [1, 2, 11, 2],
                       "global_attention_blocks": [7, 10, 13], "window_size_per_stage": _HIERA_WINDOWS,
                       "background": [7, 7]},
    "sam2.1-hiera-b+": {"width": 112, "heads": 2, "blocks_per_stage": [2, 3, 16, 3],
                        "global_attention_blocks": [12, 16, 20], "window_size_per_stage": _HIERA_WINDOWS,
                        "background": [14, 14]},
    "sam2.1-hiera-l": {"width": 144, "heads": 2, "blocks_per_stage": [2, 6, 36, 4],
                       "global_attention_blocks": [23, 33, 43], "window_size_per_stage": [8, 4, 16, 8],
                       "background": [7, 7]},
}  # fmt: skip
# SAM 3's tracker: transformers' Sam3TrackerConfig defaults are the published model (facebookresearch/sam3's
# model_builder: ViT 1024 wide, 32 layers, 16 heads, MLP ratio 4.625 = 4736, windows of 24 with global layers
# 7 / 15 / 23 / 31, patch 14 at 1008, RoPE from a 336 pretraining size; SAM 2's decoder on 3 FPN levels).
# EdgeTAM is left out: its backbone comes through timm, which needs torchvision, which does not import here.
PUBLISHED_SAM3 = ("sam3-tracker",)
# Every preset's family (config.model_type).
PRESET_FAMILIES = {
    **dict.fromkeys(PUBLISHED, "sam"),
    **dict.fromkeys(PUBLISHED_SAM_HQ, "sam_hq"),
    **dict.fromkeys(PUBLISHED_SAM2, "sam2"),
    **dict.fromkeys(PUBLISHED_SAM3, "sam3_tracker"),
    "demo": "sam",
    "tiny": "sam",
    # test-sized models of the other families (TINY_CONFIGS): quick benchmarks and tests
    "tiny-sam-hq": "sam_hq",
    "tiny-sam2": "sam2",
    "tiny-sam3-tracker": "sam3_tracker",
}
PRESETS = tuple(PRESET_FAMILIES)


def tiny_sam_config(image_size: int = 128, patch_size: int = 16, hidden_size: int = 32) -> SamConfig:
    """SAM's architecture at a size that trains in milliseconds on a CPU (tests, quick benchmarks)."""
    embedding_size = image_size // patch_size
    vision = SamVisionConfig(
        hidden_size=hidden_size,
        output_channels=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        window_size=max(2, embedding_size // 2),
        global_attn_indexes=[1],
        mlp_dim=hidden_size * 2,
        num_pos_feats=hidden_size // 2,
        initializer_range=0.05,  # the default 1e-10 makes the encoder output ~0, so adapters get zero gradients
    )
    # mask_input_channels 8: with 4, the mask path's first LayerNorm is one channel wide and outputs zeros,
    # so the model would ignore every mask prompt (SAM's own is 16)
    prompt = SamPromptEncoderConfig(
        hidden_size=hidden_size, image_size=image_size, patch_size=patch_size, mask_input_channels=8
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=hidden_size,
        mlp_dim=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        iou_head_hidden_dim=hidden_size,
    )
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=0.2
    )


def demo_sam_config() -> SamConfig:
    """The shipped demo base: about 1.2M parameters, SAM's architecture at 256 px, pretrainable on a laptop CPU."""
    vision = SamVisionConfig(
        hidden_size=128,
        output_channels=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=256,
        patch_size=16,
        window_size=8,
        global_attn_indexes=[1, 3],
        mlp_dim=512,
        num_pos_feats=32,
        initializer_range=0.02,  # transformers' 1e-10 default leaves a from-scratch encoder dead
    )
    # Original SAM's prompt positional encoding has scale 1; transformers derives hidden_size // 2,
    # whose very high frequencies a model trained from scratch cannot use. Only initialisation reads it.
    vision.scale = 1.0
    prompt = SamPromptEncoderConfig(hidden_size=64, image_size=256, patch_size=16, mask_input_channels=8)
    decoder = SamMaskDecoderConfig(
        hidden_size=64, mlp_dim=256, num_hidden_layers=2, num_attention_heads=4, iou_head_hidden_dim=64
    )
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=0.02
    )


def preset_config(name: str, image_size: int | None = None) -> PreTrainedConfig:
    """The preset's config (its family's config class), optionally at another square input size: a multiple of 16
    for SAM / SAM-HQ (published: 1024), of 32 for SAM 2 (1024), of 14 for SAM 3 (1008). Random weights of a
    published preset are live: every tower's ``initializer_range`` is 0.02 (SAM's ViT default, 1e-10, leaves the
    encoder dead). ``tiny`` and ``tiny-FAMILY`` are the test-sized ``TINY_CONFIGS``."""
    if name not in PRESET_FAMILIES:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if name == "tiny" or name.startswith("tiny-"):
        return TINY_CONFIGS[PRESET_FAMILIES[name]](**({"image_size": image_size} if image_size else {}))
    if name == "demo":
        if image_size:
            raise ValueError("the demo preset has one input size, 256")
        return demo_sam_config()
    if name in PUBLISHED_SAM2:
        return _sam2_config(PUBLISHED_SAM2[name], image_size or 1024)
    if name in PUBLISHED_SAM3:
        return _sam3_tracker_config(image_size or 1008)
    if image_size is not None and image_size % 16:
        raise ValueError(f"{name}: the input size must be a multiple of 16 (the patch size), not {image_size}")
    size = {"image_size": image_size} if image_size else {}
    if name in PUBLISHED_SAM_HQ:
        vit = PUBLISHED[PUBLISHED_SAM_HQ[name]]
        return SamHQConfig(
            vision_config=SamHQVisionConfig(**vit, initializer_range=0.02, **size),
            prompt_encoder_config=SamHQPromptEncoderConfig(**size),
            mask_decoder_config=SamHQMaskDecoderConfig(vit_dim=vit["hidden_size"]),
        )
    return SamConfig(
        vision_config=SamVisionConfig(**PUBLISHED[name], initializer_range=0.02, **size),
        prompt_encoder_config=SamPromptEncoderConfig(**size),
    )


def _sam2_config(trunk: dict, image_size: int) -> Sam2Config:
    """SAM 2.1 with a published Hiera trunk at ``image_size`` (the trunk downsamples by 32)."""
    if image_size % 32:
        raise ValueError(f"SAM 2: the input size must be a multiple of 32 (Hiera's stride), not {image_size}")
    widths = [trunk["width"] * 2**stage for stage in range(4)]
    backbone = Sam2HieraDetConfig(
        hidden_size=trunk["width"],
        num_attention_heads=trunk["heads"],
        image_size=[image_size, image_size],
        blocks_per_stage=trunk["blocks_per_stage"],
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[trunk["heads"] * 2**stage for stage in range(4)],
        window_size_per_stage=trunk["window_size_per_stage"],
        global_attention_blocks=trunk["global_attention_blocks"],
        window_positional_embedding_background_size=trunk["background"],
    )
    sides = [image_size // 4, image_size // 8, image_size // 16]
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[side, side] for side in sides],
        fpn_hidden_size=256,
        fpn_top_down_levels=[2, 3],
    )
    return Sam2Config(vision_config=vision, prompt_encoder_config=Sam2PromptEncoderConfig(image_size=image_size))


def _sam3_tracker_config(image_size: int) -> Sam3TrackerConfig:
    """SAM 3's tracker as published (transformers' defaults), at ``image_size`` (patch 14)."""
    if image_size % 14:
        raise ValueError(f"SAM 3: the input size must be a multiple of 14 (the patch size), not {image_size}")
    grid = image_size // 14
    vision = Sam3VisionConfig(
        backbone_config=Sam3ViTConfig(image_size=image_size),
        backbone_feature_sizes=[[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]],
    )
    return Sam3TrackerConfig(
        vision_config=vision, prompt_encoder_config=Sam3TrackerPromptEncoderConfig(image_size=image_size)
    )


def tiny_sam_hq_config(image_size: int = 128, hidden_size: int = 32) -> SamHQConfig:
    """SAM-HQ at test size: the tiny SAM's ViT and decoder plus the HQ token and fusion modules."""
    sam = tiny_sam_config(image_size=image_size, hidden_size=hidden_size)
    # two global layers: the HQ fusion reads the first one's output only, and tests must tell them apart
    vision = {**sam.vision_config.to_diff_dict(), "num_hidden_layers": 4, "global_attn_indexes": [1, 3]}
    return SamHQConfig(
        vision_config=SamHQVisionConfig(**vision),
        prompt_encoder_config=SamHQPromptEncoderConfig(**sam.prompt_encoder_config.to_diff_dict()),
        mask_decoder_config=SamHQMaskDecoderConfig(
            **sam.mask_decoder_config.to_diff_dict(), vit_dim=sam.vision_config.hidden_size
        ),
        initializer_range=0.2,  # as the tiny SAM: else every mask logit of a random decoder is ~0
    )


def tiny_sam2_config(image_size: int = 128, hidden_size: int = 32) -> Sam2Config:
    """SAM 2's Hiera at test size: four stages of one or two blocks, a global-attention block in stage three."""
    widths = [16, 32, 64, 128]
    backbone = Sam2HieraDetConfig(
        hidden_size=widths[0],
        num_attention_heads=1,
        image_size=[image_size, image_size],
        blocks_per_stage=[1, 1, 2, 1],  # a global block may not open a stage (its window would be 0)
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
        initializer_range=0.05,
    )
    side = image_size // 4
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[side, side], [side // 2, side // 2], [side // 4, side // 4]],
        fpn_hidden_size=hidden_size,
        initializer_range=0.05,
    )
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(
            hidden_size=hidden_size, image_size=image_size, patch_size=16, mask_input_channels=8
        ),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=hidden_size, mlp_dim=2 * hidden_size, num_attention_heads=2, iou_head_hidden_dim=hidden_size
        ),
        initializer_range=0.2,
    )


def tiny_sam3_tracker_config(image_size: int = 112, hidden_size: int = 32) -> Sam3TrackerConfig:
    """SAM 3's tracker at test size: a two-layer ViT (patch 14) with its feature pyramid, SAM 2's decoder."""
    vit = Sam3ViTConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        window_size=4,
        global_attn_indexes=[1],
        pretrain_image_size=56,
        initializer_range=0.05,
    )
    grid = image_size // 14
    vision = Sam3VisionConfig(
        backbone_config=vit,
        fpn_hidden_size=hidden_size,
        backbone_feature_sizes=[[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]],
        initializer_range=0.05,
    )
    return Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config=Sam3TrackerPromptEncoderConfig(
            hidden_size=hidden_size, image_size=image_size, patch_size=14, mask_input_channels=8
        ),
        mask_decoder_config=Sam3TrackerMaskDecoderConfig(
            hidden_size=hidden_size, mlp_dim=2 * hidden_size, num_attention_heads=2, iou_head_hidden_dim=hidden_size
        ),
        initializer_range=0.2,
    )


TINY_CONFIGS = {
    "sam": tiny_sam_config,
    "sam_hq": tiny_sam_hq_config,
    "sam2": tiny_sam2_config,
    "sam3_tracker": tiny_sam3_tracker_config,
}


def processor_for(config: PreTrainedConfig):
    """The family's processor matching a config's input size (low-res masks are 4x the stride-16 / 14 grid)."""
    family = family_of(config)
    prompt = config.prompt_encoder_config
    image_size = prompt.image_size
    mask_size = 4 * (image_size // prompt.patch_size)
    if family.square_input:
        from samtune.models.square_processor import square_processor

        return square_processor(family.model_type, image_size, mask_size)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
    )
    if family.hq:
        return SamHQProcessor(image_processor=image_processor)
    return SamProcessor(image_processor=image_processor)


def tie_prompt_position_encoding(model: torch.nn.Module) -> torch.nn.Module:
    """Give the prompt encoder the image's Fourier matrix, as every released checkpoint has it.

    A prompt's position is read against the image-wide positional encoding, so both must come from one random
    matrix. SAM shares the module; transformers' SAM 2 / SAM 3 tracker build two and draw each at random, so a
    randomly initialised model cannot tell where its prompts are (both are buffers: training never aligns them).
    """
    image = getattr(model, "shared_image_embedding", None)
    prompt = getattr(getattr(model, "prompt_encoder", None), "shared_embedding", None)
    if image is not None and prompt is not None and prompt is not image:
        with torch.no_grad():
            prompt.positional_embedding.copy_(image.positional_embedding)
    return model


def save_random_sam(config: PreTrainedConfig, folder: str | Path, seed: int = 0) -> Path:
    """A model of ``config``'s family with random weights, and its processor, saved like a hub checkpoint."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tie_prompt_position_encoding(AutoModelForMaskGeneration.from_config(config))
    model.save_pretrained(folder)
    processor_for(config).save_pretrained(folder)
    return folder
