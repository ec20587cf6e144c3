"""The built-in offline default: a small SAM and synthetic COCO splits, made on first use and cached.

``accelerate launch samtune/train.py`` with no data or model arguments runs on these,
so the main job works on a fresh machine with no downloads.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from samtune.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.tiny import save_tiny_sam

DEMO_VERSION = 1  # bump when what the demo generates changes, so old caches are not reused


@dataclass
class DemoPaths:
    model: Path
    train_annotations: Path
    train_images: Path
    val_annotations: Path
    val_images: Path


def cache_root() -> Path:
    """``$SAMTUNE_CACHE``, else ``$XDG_CACHE_HOME/samtune``, else ``~/.cache/samtune``."""
    if os.environ.get("SAMTUNE_CACHE"):
        return Path(os.environ["SAMTUNE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "samtune"


def _build_once(target: Path, build) -> None:
    """Build into a temporary sibling, then rename: an interrupted build never looks finished."""
    if target.exists():
        return
    scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    build(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_demo(root: str | Path | None = None) -> DemoPaths:
    """Create (once) and return the demo model folder and its train / val splits."""
    folder = Path(root) if root else cache_root() / f"demo-v{DEMO_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    _build_once(folder / "model", lambda path: save_tiny_sam(path, seed=0))
    splits = {"train": SyntheticSpec(num_images=24, seed=1), "val": SyntheticSpec(num_images=8, seed=2)}
    for name, spec in splits.items():
        _build_once(folder / name, lambda path, spec=spec: make_synthetic_coco(path, spec))
    return DemoPaths(
        folder / "model",
        folder / "train" / "annotations.json",
        folder / "train" / "images",
        folder / "val" / "annotations.json",
        folder / "val" / "images",
    )
