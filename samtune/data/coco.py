"""Reading and checking a COCO instance-segmentation file, and its images with their masks.

Everything that can be found wrong without decoding pixels is found here, when
the data set is opened, so that a bad sample never stops a run mid-epoch.
Each error names the file, the image or annotation id, and the problem.
``CocoInstanceDataset`` then gives, per image, the upright RGB pixels, the instance
masks at original resolution, their category and annotation ids, and the crowd
regions as an ignore map.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from samtune.data.images import ImageReadError, displayed_size, orient_mask, probe, read_rgb, read_rgb_image
from samtune.errors import UserError

logger = logging.getLogger(__name__)

SKIP_REASONS = {
    "zero_area": "zero-area masks",
    "degenerate": "degenerate geometry (polygons with fewer than 3 points)",
    "crowd": "crowd annotations (kept as ignore regions, not prompts)",
}


class CocoFormatError(UserError):
    """The annotation file or an image it names is not usable; the message says where and why."""


@dataclass
class CocoInstance:
    annotation_id: int
    category_id: int
    rle: dict  # compressed RLE in the annotation frame (the JSON's height x width)
    area: int


@dataclass
class CocoImage:
    image_id: int
    file_name: str
    path: Path
    width: int  # as the JSON states: the frame the annotations are drawn in
    height: int
    orientation: int = 1  # EXIF orientation of the file
    annotations_on_stored_pixels: bool = False  # JSON size is the un-rotated file size
    instances: list[CocoInstance] = field(default_factory=list)
    crowd: list[dict] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the upright image a loader returns."""
        if self.annotations_on_stored_pixels:
            width, height = displayed_size(self.width, self.height, self.orientation)
            return height, width
        return self.height, self.width


def _load_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{path}: cannot read annotation file: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CocoFormatError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path}: missing required list '{key}'")
    return data


def _require(path: Path, what: str, entry: object, keys: dict[str, type | tuple[type, ...]]) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{path}: {what} is not an object: {entry!r:.80}")
    where = f"{what} id {entry['id']}" if "id" in entry else what
    for key, kind in keys.items():
        if key not in entry:
            raise CocoFormatError(f"{path}: {where} is missing required key '{key}'")
        value = entry[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CocoFormatError(f"{path}: {where} has '{key}' = {value!r:.80}, expected {kind}")


def _safe_relative(path: Path, image_id: int, file_name: str) -> PurePosixPath:
    relative = PurePosixPath(file_name.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(file_name).drive or ".." in relative.parts:
        raise CocoFormatError(
            f"{path}: image id {image_id}: file_name {file_name!r} escapes the image folder "
            "(absolute paths and '..' are not allowed)"
        )
    return relative


def _segmentation_rle(path: Path, ann: dict, height: int, width: int) -> tuple[dict | None, bool]:
    """Compressed RLE of an annotation's segmentation in a height x width frame (None if degenerate),
    and whether its polygons reach outside the image (pycocotools clips them)."""
    seg = ann["segmentation"]
    where = f"{path}: annotation id {ann['id']} (image id {ann['image_id']})"
    if isinstance(seg, list):
        polygons = []
        for polygon in seg:
            if not isinstance(polygon, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon
            ):
                raise CocoFormatError(f"{where}: polygon must be a flat list of numbers")
            if len(polygon) % 2:
                raise CocoFormatError(f"{where}: polygon has an odd number of coordinates ({len(polygon)})")
            if len(polygon) >= 6:  # pycocotools reads a 4-number list as a box, not a polygon
                polygons.append([float(v) for v in polygon])
        if not polygons:
            return None, False
        xs = [v for p in polygons for v in p[0::2]]
        ys = [v for p in polygons for v in p[1::2]]
        outside = min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)), outside
    if isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(size, list) or len(size) != 2:
            raise CocoFormatError(f"{where}: RLE segmentation needs 'size' [height, width] and 'counts'")
        if list(size) != [height, width]:
            raise CocoFormatError(
                f"{where}: RLE size {size} does not match the image's height x width [{height}, {width}]"
            )
        if isinstance(seg["counts"], list):
            if sum(seg["counts"]) != height * width:
                raise CocoFormatError(
                    f"{where}: uncompressed RLE counts sum to {sum(seg['counts'])}, expected {height * width}"
                )
            return mask_utils.frPyObjects(seg, height, width), False
        if isinstance(seg["counts"], str):
            return {"size": [height, width], "counts": seg["counts"].encode("ascii")}, False
        raise CocoFormatError(f"{where}: RLE 'counts' must be a list or a string")
    raise CocoFormatError(f"{where}: segmentation must be a list of polygons or an RLE object")


class CocoIndex:
    """A checked, in-memory index of a COCO instance-segmentation file.

    ``check_images`` reads every image header once (no pixel decoding) to check that
    the file exists, is an image, and has the size the JSON states.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, check_images: bool = True) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        data = _load_json(self.annotation_file)
        path = self.annotation_file
        self.skipped: Counter = Counter()

        self.categories: dict[int, str] = {}
        for category in data["categories"]:
            _require(path, "category", category, {"id": int, "name": str})
            if category["id"] in self.categories:
                raise CocoFormatError(f"{path}: category id {category['id']} appears twice")
            self.categories[category["id"]] = category["name"]

        self.images: list[CocoImage] = []
        by_id: dict[int, CocoImage] = {}
        for entry in data["images"]:
            _require(path, "image", entry, {"id": int, "file_name": str, "width": int, "height": int})
            image_id = entry["id"]
            if image_id in by_id:
                raise CocoFormatError(f"{path}: image id {image_id} appears twice")
            if entry["width"] <= 0 or entry["height"] <= 0:
                raise CocoFormatError(f"{path}: image id {image_id} has a non-positive width or height")
            relative = _safe_relative(path, image_id, entry["file_name"])
            image = CocoImage(image_id, entry["file_name"], self.image_dir / relative, entry["width"], entry["height"])
            if check_images:
                self._check_file(image)
            by_id[image_id] = image
            self.images.append(image)

        seen: set[int] = set()
        for ann in data["annotations"]:
            _require(path, "annotation", ann, {"id": int, "image_id": int, "category_id": int})
            if "segmentation" not in ann:
                raise CocoFormatError(f"{path}: annotation id {ann['id']} is missing required key 'segmentation'")
            if ann["id"] in seen:
                raise CocoFormatError(f"{path}: annotation id {ann['id']} appears twice")
            seen.add(ann["id"])
            image = by_id.get(ann["image_id"])
            if image is None:
                raise CocoFormatError(
                    f"{path}: annotation id {ann['id']} refers to image id {ann['image_id']}, which does not exist"
                )
            if ann["category_id"] not in self.categories:
                raise CocoFormatError(
                    f"{path}: annotation id {ann['id']} (image id {ann['image_id']}) refers to "
                    f"category id {ann['category_id']}, which does not exist"
                )
            rle, outside = _segmentation_rle(path, ann, image.height, image.width)
            if rle is None:
                self.skipped["degenerate"] += 1
                continue
            if ann.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                image.crowd.append(rle)
                continue
            area = int(mask_utils.area(rle))
            if area == 0:
                self.skipped["zero_area"] += 1
                continue
            self.skipped["clipped"] += outside
            image.instances.append(CocoInstance(ann["id"], ann["category_id"], rle, area))
        logger.info(self.summary())

    def _check_file(self, image: CocoImage) -> None:
        where = f"{self.annotation_file}: image id {image.image_id} ({image.path})"
        if not image.path.is_file():
            raise CocoFormatError(f"{where}: image file is missing")
        try:
            stored_w, stored_h, orientation = probe(image.path)
        except ImageReadError as error:
            raise CocoFormatError(f"{where}: {error}") from error
        image.orientation = orientation
        shown_w, shown_h = displayed_size(stored_w, stored_h, orientation)
        if (image.width, image.height) == (shown_w, shown_h):
            return
        if (image.width, image.height) == (stored_w, stored_h):
            image.annotations_on_stored_pixels = True
            return
        raise CocoFormatError(
            f"{where}: file is {shown_w}x{shown_h} once upright (stored {stored_w}x{stored_h}, EXIF orientation "
            f"{orientation}) but the JSON says width x height = {image.width}x{image.height}"
        )

    @property
    def num_instances(self) -> int:
        return sum(len(image.instances) for image in self.images)

    def summary(self) -> str:
        empty = sum(1 for image in self.images if not image.instances)
        parts = [f"{count} {SKIP_REASONS[key]}" for key, count in sorted(self.skipped.items()) if key in SKIP_REASONS]
        line = (
            f"{self.annotation_file}: {len(self.images)} images ({empty} without instances), "
            f"{self.num_instances} instances, {len(self.categories)} categories; "
            f"skipped: {', '.join(parts) or 'none'}"
        )
        if self.skipped["clipped"]:
            line += f"; clipped to the image: {self.skipped['clipped']} polygons"
        return line


class CocoInstanceDataset(Dataset):
    """Images and their instance masks, at original resolution, from a checked COCO file."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, check_images: bool = True) -> None:
        self.index = CocoIndex(annotation_file, image_dir, check_images=check_images)
        self.images = self.index.images
        self.categories = self.index.categories

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, image: CocoImage, rles: list[dict]) -> np.ndarray:
        if not rles:
            return np.zeros((0, *image.size), dtype=bool)
        masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
        if image.annotations_on_stored_pixels:
            masks = np.stack([orient_mask(m, image.orientation) for m in masks])
        return masks

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def sample(self, index: int, pixels: bool = True, as_image: bool = False) -> dict:
        """Image ``index``: its pixels (``image``: (H, W, 3) uint8, a PIL RGB image with ``as_image``, None with
        ``pixels=False`` when only its annotations are needed), ``size`` (H, W) upright, instance masks, ids and
        crowd ignore map at that size."""
        image = self.images[index]
        if pixels:
            rgb = self._read(image, as_image)
        crowd = self._decode(image, image.crowd)
        return {
            "image_id": image.image_id,
            "image": rgb if pixels else None,
            "size": image.size,
            "masks": self._decode(image, [inst.rle for inst in image.instances]),
            "category_ids": np.array([inst.category_id for inst in image.instances], dtype=np.int64),
            "annotation_ids": np.array([inst.annotation_id for inst in image.instances], dtype=np.int64),
            "ignore": crowd.any(axis=0) if len(crowd) else np.zeros(image.size, dtype=bool),
        }

    def sample_crop(
        self,
        index: int,
        crop: int,
        rng: np.random.Generator,
        min_visible: int,
        pixels: bool = True,
        as_image: bool = False,
    ) -> dict:
        """``sample``, cut to a random ``crop`` x ``crop`` window (each side of the image longer than ``crop``), for
        training on high-resolution images at full detail. The window holds a random pixel of a random instance
        (that instance is always kept); other instances with fewer than ``min_visible`` pixels (or fewer than they
        had) in it are dropped, counted in ``dropped``. Masks are decoded one at a time and cut at once, and the
        image is cut right after decoding, so at most one full-size image or mask is in memory."""
        image = self.images[index]
        height, width = image.size
        crop_h, crop_w = min(crop, height), min(crop, width)
        if (crop_h, crop_w) == (height, width):
            return {**self.sample(index, pixels, as_image), "dropped": 0}
        anchor = int(rng.integers(len(image.instances))) if image.instances else -1
        if anchor >= 0:  # a window over a random pixel of a random instance: crops are rarely empty
            rows, cols = np.nonzero(self._decode_one(image, image.instances[anchor].rle))
            pick = int(rng.integers(len(rows)))
            row, col = int(rows[pick]), int(cols[pick])
        else:
            row, col = int(rng.integers(height)), int(rng.integers(width))
        top = int(rng.integers(max(0, row - crop_h + 1), min(row, height - crop_h) + 1))
        left = int(rng.integers(max(0, col - crop_w + 1), min(col, width - crop_w) + 1))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        kept, masks = [], []
        for number, instance in enumerate(image.instances):
            if not self._may_reach(image, instance.rle, top, left, crop_h, crop_w):
                continue
            mask = np.ascontiguousarray(self._decode_one(image, instance.rle)[window])
            shown = int(mask.sum())
            if number == anchor or (shown and shown >= min(min_visible, instance.area)):
                kept.append(number)
                masks.append(mask)
        ignore = np.zeros((crop_h, crop_w), dtype=bool)
        for rle in image.crowd:
            ignore |= self._decode_one(image, rle)[window]
        rgb = None
        if pixels:  # cut the decoded PIL image before any copy into numpy: no second full-size array
            cut = self._read(image, as_image=True).crop((left, top, left + crop_w, top + crop_h))
            rgb = cut if as_image else np.asarray(cut)
        instances = [image.instances[n] for n in kept]
        return {
            "image_id": image.image_id,
            "image": rgb,
            "size": (crop_h, crop_w),
            "masks": np.stack(masks) if masks else np.zeros((0, crop_h, crop_w), dtype=bool),
            "category_ids": np.array([inst.category_id for inst in instances], dtype=np.int64),
            "annotation_ids": np.array([inst.annotation_id for inst in instances], dtype=np.int64),
            "ignore": ignore,
            "dropped": len(image.instances) - len(kept),
            "window": (top, left, crop_h, crop_w),
        }

    @staticmethod
    def _decode_one(image: CocoImage, rle: dict) -> np.ndarray:
        """One upright (H, W) bool mask, viewing pycocotools' 0 / 1 bytes as bool (no second full-size copy)."""
        mask = mask_utils.decode(rle).view(bool)
        return orient_mask(mask, image.orientation) if image.annotations_on_stored_pixels else mask

    @staticmethod
    def _may_reach(image: CocoImage, rle: dict, top: int, left: int, height: int, width: int) -> bool:
        """False when the annotation's box lies wholly outside the window (its mask need not be decoded); boxes
        are in the annotation frame, so a file turned by EXIF is always decoded."""
        if image.annotations_on_stored_pixels and image.orientation != 1:
            return True
        x, y, w, h = mask_utils.toBbox(rle)
        return x < left + width and x + w > left and y < top + height and y + h > top

    def _read(self, image: CocoImage, as_image: bool = False) -> np.ndarray | Image.Image:
        try:
            pixels = read_rgb_image(image.path) if as_image else read_rgb(image.path)
        except ImageReadError as error:
            where = f"{self.index.annotation_file}: image id {image.image_id} ({image.path})"
            raise CocoFormatError(f"{where}: {error}") from error
        height, width = (pixels.height, pixels.width) if as_image else pixels.shape[:2]
        if (height, width) != image.size:
            raise CocoFormatError(
                f"{self.index.annotation_file}: image id {image.image_id} ({image.path}): decoded size "
                f"{width}x{height} differs from the {image.size[1]}x{image.size[0]} "
                "seen when the data set was opened (was the file changed?)"
            )
        return pixels
