"""Two synthetic image domains for the offline demo: a *source* to pretrain a small SAM on, a *target* to adapt to.

The shift mimics real data against SAM's training data (the PEFT-SAM experiment used
underwater debris): the source is clean, high-contrast, flat-coloured objects on plain
backgrounds; the target is a murky seabed with other colours and textures, haze, a
colour cast and sensor noise, low-contrast textured objects of four categories (bags,
bottles, cans, ropes: irregular and thin shapes), unannotated clutter (rocks, shells)
and objects occluding each other. Masks are the visible parts, saved as COCO RLE.
Everything is a function of the seed, so a split is the same on every machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.ndimage import gaussian_filter, zoom

SOURCE_CATEGORIES = [
    {"id": 1, "name": "blob", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "capsule", "supercategory": "shape"},
    {"id": 4, "name": "polygon", "supercategory": "shape"},
    {"id": 5, "name": "bar", "supercategory": "shape"},
]
SOURCE_IDS = {c["name"]: c["id"] for c in SOURCE_CATEGORIES}
TARGET_CATEGORIES = [
    {"id": 1, "name": "bag", "supercategory": "debris"},
    {"id": 2, "name": "bottle", "supercategory": "debris"},
    {"id": 3, "name": "can", "supercategory": "debris"},
    {"id": 4, "name": "rope", "supercategory": "debris"},
]
MIN_VISIBLE_PIXELS = 40  # an object hidden behind others down to a few pixels is not annotated (as in real labels)


@dataclass(frozen=True)
class DomainSpec:
    domain: str  # "source" or "target"
    num_images: int
    seed: int
    size: int = 256


# ---------------------------------------------------------------- shapes (boolean masks)


def _polygon_mask(points: np.ndarray, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """Star-convex irregular outline: a circle whose radius wanders with a few harmonics."""
    centre = rng.uniform(radius, size - radius, 2)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = sum(rng.uniform(0, 0.22) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r = radius * (1 + wobble) * rng.uniform(0.6, 1.0, 2)[:, None]  # anisotropic
    angle = rng.uniform(0, np.pi)
    x, y = r[0] * np.cos(theta), r[1] * np.sin(theta)
    rotated = np.stack([x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)], 1)
    return _polygon_mask(rotated + centre, size)


def _ellipse(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    centre = rng.uniform(radius, size - radius, 2)
    theta = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    a, b = radius, radius * rng.uniform(0.4, 1.0)
    angle = rng.uniform(0, np.pi)
    x, y = a * np.cos(theta), b * np.sin(theta)
    rotated = np.stack([x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)], 1)
    return _polygon_mask(rotated + centre, size)


def _capsule(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """A rotated bottle-like outline: a long rounded body with a narrower neck."""
    length, width = radius * 2, radius * rng.uniform(0.35, 0.6)
    centre = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, np.pi)
    half = np.linspace(-np.pi / 2, np.pi / 2, 8)
    body = [(length * 0.3 + width / 2 * np.cos(t), width / 2 * np.sin(t)) for t in half]  # rounded bottom
    neck = width * 0.2
    outline = np.array(
        [
            (-length * 0.3, width / 2),
            *body[::-1],
            (-length * 0.3, -width / 2),
            (-length * 0.45, -neck),
            (-length * 0.6, -neck),
            (-length * 0.6, neck),
            (-length * 0.45, neck),
        ]
    )
    x, y = outline[:, 0], outline[:, 1]
    rotated = np.stack([x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)], 1)
    return _polygon_mask(rotated + centre, size)


def _polygon(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    centre = rng.uniform(radius, size - radius, 2)
    corners = int(rng.integers(3, 7))
    theta = np.sort(rng.uniform(0, 2 * np.pi, corners))
    r = radius * rng.uniform(0.6, 1.0, corners)
    return _polygon_mask(np.stack([r * np.cos(theta), r * np.sin(theta)], 1) + centre, size)


def _bar(rng: np.random.Generator, size: int, radius: float, thin: tuple[int, int] = (3, 8)) -> np.ndarray:
    """A thin bent strip (rope, wire): a random walk drawn as a thick curved line."""
    steps = int(rng.integers(4, 9))
    step = radius * 2.2 / steps
    point = rng.uniform(size * 0.2, size * 0.8, 2)
    heading = rng.uniform(0, 2 * np.pi)
    points = [point.copy()]
    for _ in range(steps):
        heading += rng.normal(0, 0.45)
        point = np.clip(point + step * np.array([np.cos(heading), np.sin(heading)]), 2, size - 3)
        points.append(point.copy())
    canvas = Image.new("L", (size, size), 0)
    width = int(rng.integers(thin[0], thin[1] + 1))
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=1, width=width, joint="curve")
    return np.asarray(canvas, dtype=bool)


SHAPES = {"blob": _blob, "ellipse": _ellipse, "capsule": _capsule, "polygon": _polygon, "bar": _bar}
TARGET_SHAPES = {"bag": "blob", "bottle": "capsule", "can": "ellipse", "rope": "bar"}


# ---------------------------------------------------------------- textures


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in about [-1, 1] that vary over ``size / cells`` pixels (bicubic upsampled noise)."""
    coarse = rng.normal(0, 1, (cells, cells))
    field = zoom(coarse, size / cells, order=3)[:size, :size]
    return field / (np.abs(field).max() + 1e-6)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A surface texture multiplier around 1: stripes, spots or mottling."""
    yy, xx = _grid(size)
    kind = rng.integers(3)
    if kind == 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 12)
        return 1 + 0.25 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    if kind == 1:
        return 1 + 0.3 * (smooth_noise(rng, size, size // 6) > 0.4)
    return 1 + 0.25 * smooth_noise(rng, size, size // 10)


# ---------------------------------------------------------------- scenes


def _source_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Clean studio shots: a light smooth background, saturated flat objects with gentle shading."""
    yy, xx = _grid(size)
    top, bottom = rng.uniform(120, 255, 3), rng.uniform(120, 255, 3)
    mix = (yy / size)[..., None]
    image = top * (1 - mix) + bottom * mix
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        name = SOURCE_CATEGORIES[int(rng.integers(len(SOURCE_CATEGORIES)))]["name"]
        mask = SHAPES[name](rng, size, rng.uniform(size * 0.08, size * 0.25))
        if not mask.any():
            continue
        local = image[mask].mean(axis=0)
        for _attempt in range(20):  # an object always stands out from what is behind it
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - local) > 90:
                break
        shade = 1 + 0.08 * ((xx - size / 2) / size)[..., None]
        image[mask] = (colour * shade)[mask]
        objects = [(c, m & ~mask) for c, m in objects]  # what the new object covers is no longer visible
        objects.append((SOURCE_IDS[name], mask))
    image += rng.normal(0, 2, image.shape)
    return image, objects


def _seabed(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    sand = np.array([150, 135, 100]) * rng.uniform(0.7, 1.1)
    relief = 0.18 * smooth_noise(rng, size, 8) + 0.08 * smooth_noise(rng, size, 40)
    angle = rng.uniform(0, np.pi)
    ripples = 0.06 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / rng.uniform(10, 20))
    return sand * (1 + relief + ripples)[..., None]


def _target_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Murky seabed: textured low-contrast debris among rocks, under haze, a colour cast and noise."""
    image = _seabed(rng, size)
    visible: list[tuple[int, np.ndarray]] = []
    palette = {
        "bag": [(200, 200, 190), (120, 150, 170), (60, 60, 60)],
        "bottle": [(70, 110, 60), (110, 70, 40), (160, 170, 160)],
        "can": [(150, 40, 40), (170, 170, 175), (40, 60, 130)],
        "rope": [(190, 160, 60), (70, 120, 80), (170, 90, 40)],
    }
    layers = []  # (is_debris, category id, mask), drawn in order: later ones occlude earlier ones
    for _ in range(int(rng.integers(2, 7))):  # clutter: rocks and shells, not annotated
        radius = rng.uniform(size * 0.05, size * 0.16)
        mask = _blob(rng, size, radius) if rng.random() < 0.7 else _ellipse(rng, size, radius * 0.5)
        layers.append((False, 0, mask))
    for _ in range(int(rng.integers(2, 7))):
        category = TARGET_CATEGORIES[int(rng.integers(len(TARGET_CATEGORIES)))]
        shape = TARGET_SHAPES[category["name"]]
        radius = rng.uniform(size * 0.08, size * 0.22) if shape != "ellipse" else rng.uniform(size * 0.05, size * 0.1)
        mask = _bar(rng, size, radius, thin=(3, 6)) if shape == "bar" else SHAPES[shape](rng, size, radius)
        layers.append((True, category["id"], mask))
    order = rng.permutation(len(layers))
    for index in order:
        is_debris, category_id, mask = layers[index]
        if not mask.any():
            continue
        if is_debris:
            name = TARGET_CATEGORIES[category_id - 1]["name"]
            base = np.array(palette[name][int(rng.integers(3))], float) * rng.uniform(0.8, 1.1)
            texture = _pattern(rng, size)[..., None]
            opacity = rng.uniform(0.55, 0.85) if name == "bag" else 1.0  # thin plastic shows the sand through
            image[mask] = (opacity * base * texture + (1 - opacity) * image)[mask]
        else:
            stone = np.array([110, 105, 95]) * rng.uniform(0.6, 1.2)
            image[mask] = (stone * (1 + 0.25 * smooth_noise(rng, size, 24))[..., None])[mask]
        visible = [(c, m & ~mask) for c, m in visible]
        if is_debris:
            visible.append((category_id, mask.copy()))
    # Water: haze toward a blue-green, a colour cast, caustics, blur and sensor noise.
    yy, xx = _grid(size)
    water = np.array([40, 110, 120]) * rng.uniform(0.8, 1.2)
    haze = rng.uniform(0.3, 0.55)
    image = image * (1 - haze) + water * haze
    image *= np.array([0.75, 1.0, 1.05])
    caustic = np.abs(np.sin(xx / rng.uniform(6, 11) + 2 * smooth_noise(rng, size, 6)))
    image += (12 * (1 - caustic) ** 6)[..., None]
    image = gaussian_filter(image, sigma=(0.9, 0.9, 0))
    image += rng.normal(0, 5, image.shape)
    return image, [(c, m) for c, m in visible if m.sum() >= MIN_VISIBLE_PIXELS]


def render(spec: DomainSpec, index: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Image ``index`` of a split: uint8 RGB and (category id, visible mask) per annotated object."""
    rng = np.random.default_rng([spec.seed, index])
    scene = _source_scene if spec.domain == "source" else _target_scene
    image, objects = scene(rng, spec.size)
    objects = [(c, m) for c, m in objects if m.sum() >= MIN_VISIBLE_PIXELS]
    return np.clip(image, 0, 255).astype(np.uint8), objects


def coco_annotation(annotation_id: int, image_id: int, category_id: int, mask: np.ndarray, crowd: bool = False) -> dict:
    """A COCO annotation of a boolean (H, W) mask: compressed RLE, its area and box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(crowd),
    }


def make_domain_coco(root: str | Path, spec: DomainSpec) -> tuple[Path, Path]:
    """Write a split as COCO (RLE masks) under ``root``; return (annotation file, image folder)."""
    if spec.domain not in ("source", "target"):
        raise ValueError(f"domain must be source or target, got {spec.domain!r}")
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(spec.num_images):
        image, objects = render(spec, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(image_dir / file_name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": spec.size, "height": spec.size})
        for category_id, mask in objects:
            annotations.append(coco_annotation(len(annotations) + 1, image_id, category_id, mask))
    categories = SOURCE_CATEGORIES if spec.domain == "source" else TARGET_CATEGORIES
    dataset = {
        "info": {"description": f"samtune demo {spec.domain} domain", "seed": spec.seed, "size": spec.size},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps(dataset))
    return annotation_file, image_dir
