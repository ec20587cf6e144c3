"""What the demo runs on: the shipped base, its default-run settings and the generated target-domain splits.

``accelerate launch samtune/train.py`` with no model or data runs it: the base in ``samtune/demo/base``
(pretrained by samtune itself on the synthetic *source* domain; ``--model.demo_base sam2``: the SAM 2 base in
``samtune/demo/base-sam2``, see ``samtune.demo.bases``) is fine-tuned with the settings in
``samtune/demo/run.yaml`` on the *target* domain (``samtune.demo.domains``), and scored zero-shot and
fine-tuned on the held-out test split. The splits are generated on first use and cached.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from samtune.demo.domains import DomainSpec, make_domain_coco

DEMO_VERSION = 2  # bump when what the demo generates changes, so old caches are not reused
HERE = Path(__file__).resolve().parent
BASE_DIR = HERE / "base"  # the default base, SAM's; every base: samtune.demo.bases
RUN_CONFIG = HERE / "run.yaml"  # the default run's settings, under the user's file and keys
PRETRAIN_CONFIG = HERE / "pretrain.yaml"  # how the base is pretrained from random weights
TARGET_SPLITS = {
    "train": DomainSpec("target", 240, seed=7001),
    "val": DomainSpec("target", 40, seed=7002),
    "test": DomainSpec("target", 120, seed=7003),
}
SOURCE_SPLITS = {"train": DomainSpec("source", 3000, seed=5001), "val": DomainSpec("source", 60, seed=5002)}


@dataclass
class DemoPaths:
    model: Path
    train_annotations: Path
    train_images: Path
    val_annotations: Path
    val_images: Path
    test_annotations: Path
    test_images: Path


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


def _splits(folder: Path, specs: dict[str, DomainSpec]) -> dict[str, tuple[Path, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        _build_once(folder / name, lambda path, spec=spec: make_domain_coco(path, spec))
    return {name: (folder / name / "annotations.json", folder / name / "images") for name in specs}


def prepare_demo(root: str | Path | None = None, base: str = "sam") -> DemoPaths:
    """A shipped base (``samtune.demo.bases``: sam, the default, or sam2) and the target-domain train / val / test
    splits (generated once, then cached; the same for every base)."""
    from samtune.demo.bases import demo_base  # here: it loads transformers

    model = demo_base(base).folder  # pretraining makes it: whether it is there is the caller's question
    splits = _splits(Path(root) if root else cache_root() / f"demo-v{DEMO_VERSION}" / "target", TARGET_SPLITS)
    return DemoPaths(model, *splits["train"], *splits["val"], *splits["test"])


def prepare_source(root: str | Path | None = None) -> dict[str, tuple[Path, Path]]:
    """The source-domain train / val splits the base is pretrained on."""
    return _splits(Path(root) if root else cache_root() / f"demo-v{DEMO_VERSION}" / "source", SOURCE_SPLITS)
