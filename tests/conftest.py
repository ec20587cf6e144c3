"""Shared fixtures: a tiny SAM saved like a hub checkpoint, and a synthetic COCO data set on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import SamModel, SamProcessor

from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny_sam


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture(scope="session")
def tiny_sam(tiny_sam_dir) -> SamModel:
    return SamModel.from_pretrained(tiny_sam_dir)


@pytest.fixture(scope="session")
def processor(tiny_sam_dir) -> SamProcessor:
    return SamProcessor.from_pretrained(tiny_sam_dir)


@pytest.fixture(scope="session")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """(annotation file, image folder) of a 14-image synthetic set, with reference pixels under root/reference."""
    root = tmp_path_factory.mktemp("coco")
    return make_synthetic_coco(root, SyntheticSpec(num_images=14, seed=3), with_reference=True)


@pytest.fixture
def coco_copy(coco, tmp_path) -> tuple[Path, Path, dict]:
    """A private copy of the annotation JSON (same images) that a test may break."""
    annotation_file, image_dir = coco
    data = json.loads(Path(annotation_file).read_text())
    return tmp_path / "annotations.json", image_dir, data


@pytest.fixture
def train_tiny(tiny_sam_dir):
    """Run samtune.train.train on the tiny model: train_tiny(out, train_split, val_split, **{"section.key": value})."""
    from samtune.config import load_config
    from samtune.train import train

    def run(out: Path, train_split: tuple[Path, Path], val_split: tuple[Path, Path], **overrides) -> dict:
        settings = {
            "model.name_or_path": str(tiny_sam_dir),
            "data.train_annotations": str(train_split[0]),
            "data.train_images": str(train_split[1]),
            "data.val_annotations": str(val_split[0]),
            "data.val_images": str(val_split[1]),
            "data.num_workers": 0,
            "train.max_steps": 3,
            "train.lr": 1e-2,
            "train.log_images": 0,
            "output_dir": str(out),
            **overrides,
        }
        return train(load_config(overrides=settings))

    return run
