"""Tiny random models of each family for tests: saved like a hub checkpoint, trained in milliseconds."""

from __future__ import annotations

from pathlib import Path

from samtune.models.architectures import TINY_CONFIGS, save_random_sam, tiny_sam_config


def save_tiny_sam(folder: str | Path, seed: int = 0, **config_kwargs: int) -> Path:
    """A tiny random SAM (``tiny_sam_config(**config_kwargs)``) and its processor, saved to ``folder``."""
    return save_random_sam(tiny_sam_config(**config_kwargs), folder, seed)


def save_tiny(folder: str | Path, model_type: str = "sam", seed: int = 0, **config_kwargs: int) -> Path:
    """A tiny random model of the family ``model_type`` (sam, sam_hq, sam2, sam3_tracker) and its processor."""
    return save_random_sam(TINY_CONFIGS[model_type](**config_kwargs), folder, seed)
