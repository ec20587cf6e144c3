"""Small randomly initialised SAM models, saved in the same folder format as hub checkpoints.

Tests and the offline demo use these; they load back through the very
``SamModel.from_pretrained`` / ``SamProcessor.from_pretrained`` calls a hub id takes.
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


def tiny_sam_config(image_size: int = 128, patch_size: int = 16, hidden_size: int = 32) -> SamConfig:
    """A SAM config with the real architecture at a size that trains in milliseconds on a CPU."""
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
        # The default 1e-10 makes the encoder output ~0, so adapters get zero gradients.
        initializer_range=0.05,
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
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
        initializer_range=0.2,
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


def save_tiny_sam(folder: str | Path, seed: int = 0, **config_kwargs: int) -> Path:
    """Build a tiny random SAM and its processor and save both to ``folder``."""
    return save_random_sam(tiny_sam_config(**config_kwargs), folder, seed)
