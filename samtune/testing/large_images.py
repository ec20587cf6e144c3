"""Large images with small objects: the data set tiled inference is measured and tested on.

A ``side`` x ``side`` studio background (the demo *source* domain's light gradient and sensor noise) with
``objects`` flat-coloured shapes of the source domain's kinds, 20-60 px across, placed without touching each
other: what the demo base knows, at a scale a 1024 (or 256) thumbnail cannot show. With ``crowd_every`` N, the
first object of every N-th image is marked crowd (an ignore region). Written as PNG + COCO RLE; a
function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from samtune.demo.domains import SHAPES, SOURCE_CATEGORIES, SOURCE_IDS, coco_annotation

CELL = 64  # each object is drawn in a CELL x CELL canvas, then placed


@dataclass(frozen=True)
class LargeSpec:
    num_images: int = 2
    side: int = 4096
    objects: int = 40
    min_diameter: int = 20
    max_diameter: int = 60
    crowd_every: int = 0  # 0: no crowd regions
    seed: int = 0


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    top, bottom = rng.uniform(120, 255, 3).astype(np.float32), rng.uniform(120, 255, 3).astype(np.float32)
    mix = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - mix) + bottom * mix, (side, side, 3)).copy()


def _render(spec: LargeSpec, index: int) -> tuple[np.ndarray, list[tuple[int, tuple[int, int], np.ndarray]]]:
    """The image and (category id, (top, left), CELL x CELL mask) per object."""
    rng = np.random.default_rng([spec.seed, index])
    image = _background(rng, spec.side)
    taken = np.zeros((spec.side // CELL, spec.side // CELL), bool)  # one object per cell: none touch
    objects = []
    while len(objects) < spec.objects and not taken.all():
        row, col = int(rng.integers(taken.shape[0])), int(rng.integers(taken.shape[1]))
        if taken[row, col]:
            continue
        taken[row, col] = True
        name = SOURCE_CATEGORIES[int(rng.integers(len(SOURCE_CATEGORIES)))]["name"]
        mask = SHAPES[name](rng, CELL, rng.uniform(spec.min_diameter, spec.max_diameter) / 2)
        if mask.sum() < 40:
            continue
        top, left = row * CELL, col * CELL
        area = image[top : top + CELL, left : left + CELL]
        local = area[mask].mean(axis=0)
        for _attempt in range(20):  # it stands out from what is behind it, as in the source domain
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - local) > 90:
                break
        area[mask] = colour
        objects.append((SOURCE_IDS[name], (top, left), mask))
    image += rng.normal(0, 2, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def make_large_coco(root: str | Path, spec: LargeSpec | None = None) -> tuple[Path, Path]:
    """Write the data set under ``root``; return (annotation file, image folder)."""
    spec = spec or LargeSpec()
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(spec.num_images):
        image, objects = _render(spec, index)
        file_name = f"{index:04d}.png"
        Image.fromarray(image).save(image_dir / file_name, compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": spec.side, "height": spec.side})
        for number, (category_id, (top, left), cell) in enumerate(objects):
            mask = np.zeros((spec.side, spec.side), dtype=bool)
            mask[top : top + CELL, left : left + CELL] = cell
            crowd = bool(spec.crowd_every) and index % spec.crowd_every == 0 and number == 0
            annotations.append(coco_annotation(len(annotations) + 1, image_id, category_id, mask, crowd))
    dataset = {
        "info": {"description": "samtune large images with small objects", "seed": spec.seed, "side": spec.side},
        "images": images,
        "annotations": annotations,
        "categories": SOURCE_CATEGORIES,
    }
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps(dataset))
    return annotation_file, image_dir
