"""Every SamConfig samtune builds: the published architectures, the shipped demo base and the test-sized model.

Latency and memory depend on the architecture alone, so random weights of a published architecture measure
them honestly without a download. Models saved by ``save_random_sam`` load back through the very
``from_pretrained`` calls a hub id takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    SamConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

# Image-encoder shapes of the published checkpoints (their prompt encoder and mask decoder are all the same).
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
PRESETS = (*PUBLISHED, "demo", "tiny")


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
    prompt = SamPromptEncoderConfig(
        hidden_size=hidden_size, image_size=image_size, patch_size=patch_size, mask_input_channels=4
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


def preset_config(name: str, image_size: int | None = None) -> SamConfig:
    """The preset's config, optionally at another input size (a multiple of 16; SAM's own is 1024)."""
    if name == "tiny":
        return tiny_sam_config(**({"image_size": image_size} if image_size else {}))
    if name == "demo":
        if image_size:
            raise ValueError("the demo preset has one input size, 256")
        return demo_sam_config()
    if name not in PUBLISHED:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")
    size = {"image_size": image_size} if image_size else {}
    return SamConfig(
        vision_config=SamVisionConfig(**PUBLISHED[name], initializer_range=0.02, **size),
        prompt_encoder_config=SamPromptEncoderConfig(**size),
    )


def processor_for(config: SamConfig) -> SamProcessor:
    """The processor matching a config's input size (low-res labels are 4x the embedding grid)."""
    image_size = config.vision_config.image_size
    mask_size = 4 * (image_size // config.vision_config.patch_size)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
    )
    return SamProcessor(image_processor=image_processor)


def save_random_sam(config: SamConfig, folder: str | Path, seed: int = 0) -> Path:
    """A SamModel with random weights for ``config`` and its processor, saved like a hub checkpoint."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SamModel(config)
    model.save_pretrained(folder)
    processor_for(config).save_pretrained(folder)
    return folder
