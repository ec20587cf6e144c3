"""Architectures of the published SAM checkpoints, for benchmarks and counts with random weights.

Latency and memory depend on the architecture alone, so random weights measure them honestly without a
download; ``tiny`` is the test-sized model.
"""

from __future__ import annotations

from pathlib import Path

from transformers import SamConfig, SamPromptEncoderConfig, SamVisionConfig

from samtune.tiny import save_random_sam, tiny_sam_config

# Image-encoder shapes (the prompt encoder and the mask decoder are the same in all of them).
ARCHITECTURES = {
    "vit-b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit-l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "vit-h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
    "slimsam-50": {
        "hidden_size": 384,
        "mlp_dim": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "slimsam-77": {
        "hidden_size": 168,
        "mlp_dim": 696,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
}
PRESETS = (*ARCHITECTURES, "tiny")


def preset_config(name: str, image_size: int | None = None) -> SamConfig:
    """The preset's config, optionally at another input size (a multiple of 16; SAM's own is 1024)."""
    if name == "tiny":
        return tiny_sam_config(**({"image_size": image_size} if image_size else {}))
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")
    size = {"image_size": image_size} if image_size else {}
    return SamConfig(
        vision_config=SamVisionConfig(**ARCHITECTURES[name], initializer_range=0.02, **size),
        prompt_encoder_config=SamPromptEncoderConfig(**size),
    )


def save_random_preset(name: str, folder: str | Path, seed: int = 0, image_size: int | None = None) -> Path:
    """A randomly initialised model of the preset's architecture, saved with its processor."""
    return save_random_sam(preset_config(name, image_size), folder, seed)
