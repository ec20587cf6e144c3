"""Tiny random SAM folders for tests: SAM's architecture, saved like a hub checkpoint, trained in milliseconds."""

from __future__ import annotations

from pathlib import Path

from samtune.models.architectures import save_random_sam, tiny_sam_config


def save_tiny_sam(folder: str | Path, seed: int = 0, **config_kwargs: int) -> Path:
    """A tiny random SAM (``tiny_sam_config(**config_kwargs)``) and its processor, saved to ``folder``."""
    return save_random_sam(tiny_sam_config(**config_kwargs), folder, seed)
