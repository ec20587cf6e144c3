"""A synthetic COCO instance-segmentation data set, written to disk like a real one.

Tests and the offline demo share this generator. It exercises what real data
throws at a loader: polygon and RLE (compressed and uncompressed) segmentations,
crowd regions, non-contiguous category ids, images without annotations, varied
sizes and aspect ratios, sub-folders, and image files in modes L, RGBA, P,
16-bit and EXIF-rotated JPEG. With ``with_reference=True`` it also saves the RGB
array a correct loader must return for each image, for tests to compare with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Non-contiguous on purpose: loaders must not assume ids 1..N.
CATEGORIES = [
    {"id": 3, "name": "ellipse", "supercategory": "shape"},
    {"id": 7, "name": "rectangle", "supercategory": "shape"},
    {"id": 12, "name": "triangle", "supercategory": "shape"},
    {"id": 40, "name": "ring", "supercategory": "shape"},
]
CROWD_CATEGORY = 7

# File variants, cycled over images: (folder, extension, how the pixels are stored).
VARIANTS = [
    ("rgb", ".png", "RGB"),
    ("gray", ".png", "L"),
    ("alpha", ".png", "RGBA"),
    ("palette", ".png", "P"),
    ("deep", ".png", "I;16"),
    ("photos", ".jpg", "EXIF"),
    ("photos", ".jpg", "RGB"),
]
# EXIF orientation 6 means "rotate 90 degrees clockwise to display", 8 counter-clockwise.
EXIF_ORIENTATION = 0x0112


@dataclass
class SyntheticSpec:
    """What to generate. Sizes are the displayed image sizes in pixels."""

    num_images: int = 12
    min_side: int = 48
    max_side: int = 160
    max_shapes: int = 4
    empty_every: int = 6
    crowd_every: int = 4
    seed: int = 0
    first_image_id: int = 100
    first_annotation_id: int = 5000


def _shape_mask(rng: np.random.Generator, kind: str, height: int, width: int) -> tuple[np.ndarray, list | None]:
    """Rasterise one random shape; polygons come back with their exact vertex list."""
    side = min(height, width)
    size = rng.uniform(0.18, 0.45) * side
    cx = rng.uniform(size / 2, width - size / 2)
    cy = rng.uniform(size / 2, height - size / 2)
    if kind in ("rectangle", "triangle"):
        if kind == "rectangle":
            w, h = size * rng.uniform(0.6, 1.0), size * rng.uniform(0.6, 1.0)
            xs = [cx - w / 2, cx + w / 2, cx + w / 2, cx - w / 2]
            ys = [cy - h / 2, cy - h / 2, cy + h / 2, cy + h / 2]
        else:
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2])
            xs = list(cx + size / 2 * np.cos(angles))
            ys = list(cy + size / 2 * np.sin(angles))
        polygon = [float(round(v, 2)) for xy in zip(xs, ys) for v in xy]
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        return mask_utils.decode(rle).astype(bool), [polygon]
    yy, xx = np.mgrid[0:height, 0:width]
    ry, rx = size / 2 * rng.uniform(0.6, 1.0), size / 2 * rng.uniform(0.6, 1.0)
    radius = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2
    if kind == "ellipse":
        return radius <= 1.0, None
    return (radius <= 1.0) & (radius >= 0.35), None  # ring: a hole only RLE can express


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    image += rng.normal(0, 8, size=(height, width, 3))
    return image


def _encode_rle(mask: np.ndarray, compressed: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    # Uncompressed COCO RLE: run lengths starting with zeros, column-major.
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _save_variant(rgb: np.ndarray, path: Path, storage: str) -> np.ndarray:
    """Write ``rgb`` in the given storage mode; return the RGB a correct loader must produce."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb, "RGB")
    if storage == "RGB":
        image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)
        return np.asarray(Image.open(path).convert("RGB"))
    if storage == "L":
        gray = image.convert("L")
        gray.save(path)
        return np.repeat(np.asarray(gray)[..., None], 3, axis=2)
    if storage == "RGBA":
        alpha = Image.fromarray(np.full(rgb.shape[:2], 200, np.uint8))
        rgba = image.copy()
        rgba.putalpha(alpha)
        rgba.save(path)
        return rgb.copy()
    if storage == "P":
        palette = image.quantize(colors=32)
        palette.save(path)
        return np.asarray(palette.convert("RGB"))
    if storage == "I;16":
        gray = np.asarray(image.convert("L")).astype(np.uint16)
        # Full 16-bit range: 255 -> 65535, so a loader must scale, not clip.
        Image.fromarray(gray * 257).save(path)
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    if storage == "EXIF":
        # Stored rotated; the EXIF tag says how to turn it back for display.
        stored = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6  # display = rotate stored 90 degrees clockwise
        stored.save(path, quality=95, exif=exif)
        shown = Image.open(path)
        shown = shown.transpose(Image.Transpose.ROTATE_270)
        return np.asarray(shown.convert("RGB"))
    raise ValueError(f"unknown storage mode {storage!r}")


def make_synthetic_coco(
    root: str | Path, spec: SyntheticSpec | None = None, with_reference: bool = False
) -> tuple[Path, Path]:
    """Write a COCO data set under ``root``; return (annotation file, image folder)."""
    spec = spec or SyntheticSpec()
    root = Path(root)
    image_dir = root / "images"
    rng = np.random.default_rng(spec.seed)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    images, annotations = [], []
    ann_id = spec.first_annotation_id
    for index in range(spec.num_images):
        image_id = spec.first_image_id + 3 * index
        aspect = rng.uniform(0.5, 2.0)
        long_side = int(rng.integers(spec.min_side * 1.2, spec.max_side + 1))
        short_side = max(spec.min_side, int(long_side * min(aspect, 1 / aspect)))
        height, width = (long_side, short_side) if aspect < 1 else (short_side, long_side)
        rgb = _background(rng, height, width)
        occupied = np.zeros((height, width), bool)
        shapes = []
        empty = index % spec.empty_every == spec.empty_every - 1
        num_shapes = 0 if empty else int(rng.integers(1, spec.max_shapes + 1))
        for _ in range(num_shapes):
            category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            for _attempt in range(10):
                mask, polygon = _shape_mask(rng, category["name"], height, width)
                if mask.any() and not (mask & occupied).any():
                    break
            else:
                continue
            occupied |= mask
            colour = rng.uniform(0, 255, size=3)
            rgb[mask] = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
            shapes.append((category["id"], mask, polygon))
        if shapes and index % spec.crowd_every == spec.crowd_every - 1:
            crowd = np.zeros((height, width), bool)
            for _ in range(12):
                y, x = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
                crowd[y : y + 4, x : x + 4] = True
            crowd &= ~occupied
            rgb[crowd] = (250, 250, 250)
            shapes.append((CROWD_CATEGORY, crowd, "crowd"))
        folder, suffix, storage = VARIANTS[index % len(VARIANTS)]
        file_name = f"{folder}/{image_id:06d}{suffix}"
        shown = _save_variant(np.clip(rgb, 0, 255).astype(np.uint8), image_dir / file_name, storage)
        if with_reference:
            (root / "reference").mkdir(parents=True, exist_ok=True)
            np.save(root / "reference" / f"{image_id}.npy", shown)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, (category_id, mask, polygon) in enumerate(shapes):
            crowd = polygon == "crowd"
            if polygon is not None and not crowd:
                segmentation = polygon
            else:
                segmentation = _encode_rle(mask, compressed=crowd or number % 2 == 0)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(crowd),
                }
            )
            ann_id += 7
    dataset = {
        "info": {"description": "samtune synthetic shapes", "seed": spec.seed},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, name=names[c["id"]]) for c in CATEGORIES],
    }
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps(dataset))
    return annotation_file, image_dir
