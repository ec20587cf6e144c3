"""Masks for new images, as a COCO results file (RLE at the original image size, predicted IoU as score).

    python -m samtune.predict --model facebook/sam-vit-base [--adapter runs/x/best] --images photos/ \
        [--prompts prompts.json | --coco detections.json] [--previous last.json] [--save-logits] \
        [--output masks.json] [--overlays overlays/ [--compare-base]] [--precision fp32|bf16|fp16] [--no-fast-encoder]

Prompts, per image file name (relative to --images, or the file's name when --images is one file):

    {"a.jpg": [[x0, y0, x1, y1], ...]}                                  boxes only
    {"a.jpg": {"boxes": [[x0, y0, x1, y1]], "points": [[x, y], ...]}}   boxes and / or single points
    {"a.jpg": {"instances": [{"id": "cat", "box": [x0, y0, x1, y1],     instances: a box and / or clicks each
                              "points": [[x, y], ...], "labels": [1, 0, ...]}, ...]}}

Each box, each point and each instance is one prompt, one mask. An instance's clicks are positive (label 1)
or negative (0), one label per point; its "id" (a number or a string; default: its position) comes back as
the result's "instance_id" (boxes and points: their position, boxes first; --coco: the annotation id). A
single click alone yields SAM's best of three masks; anything more, one mask. With --coco the boxes are the
annotations' bbox fields (a detector's output in COCO format, say). Without prompts, masks are generated
automatically as SAM does (``samtune.automatic_masks``): a grid of clicks (--points-per-side 32) on the image
and on --crop-layers of crops, kept by predicted IoU (--min-score 0.88) and stability (--min-stability 0.95),
de-duplicated by mask IoU (--dedup-iou 0.7). --overlays draws each mask filled and outlined with its prompt
and score; with --adapter, --compare-base puts the base model's masks beside the fine-tuned ones.

Correction rounds: --previous names predict's output of the last round; an instance of this round whose
(file_name, instance id) is there gets its last mask as the mask prompt, with its box and clicks so far plus
the new ones (new ids are new objects). Every instance --previous holds for an image of this round must be
among that image's prompts; its images not in this round are left alone. --save-logits also writes each
mask's low-resolution logits to OUTPUT.logits.safetensors; a next round that names OUTPUT as --previous
takes those (the model's own mask prompt), and the binary mask where there are none or the mask was edited.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from samtune import inference
from samtune.automatic_masks import add_arguments as add_automatic_arguments
from samtune.automatic_masks import automatic_masks, coco_entry, config_from
from samtune.data.images import ImageReadError, displayed_size, probe, read_rgb
from samtune.errors import UserError, run_command
from samtune.evaluation import encode_rle
from samtune.image_encoding import Encoded, encode_image
from samtune.interactive import instance_forward
from samtune.models.family import base_of, family_of, post_process_masks
from samtune.models.loading import load_trained
from samtune.tiling import Tiling, Window, add_tile_arguments, prompt_extent, tiling_of
from samtune.visualize import draw_masks, side_by_side

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
INSTANCE_KEYS = ("id", "box", "points", "labels")
# A binary mask as a mask prompt: +/-20 logits (a confident model's range; SAM 2's tools turn masks into
# +/-10), bilinear at the edge. Saved logits are better: they carry the model's own uncertainty.
MASK_LOGIT = 20.0
DECODER_ROWS = 64  # instances per decoder call: bounds memory (each row holds its own copy of the embedding)
LOGITS_FORMAT = "samtune.predict logits 1"

InstanceId = int | str
Key = tuple[str, InstanceId]  # (file_name, instance id)


@dataclass
class Instance:
    """One object of an image: its prompts, and its last mask when this is a correction round."""

    id: InstanceId
    box: list[float] | None = None  # [x0, y0, x1, y1], inclusive, original pixels
    points: list[list[float]] = field(default_factory=list)  # [[x, y], ...], original pixels
    labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative, one per point
    previous: torch.Tensor | np.ndarray | None = None  # (h, w) logits in the model's mask frame, or (H, W) bool

    @property
    def multimask(self) -> bool:
        """A single click alone is ambiguous (whole, part, sub-part): SAM's best of three, as in its tools."""
        return self.box is None and len(self.points) == 1 and self.previous is None


class Found(NamedTuple):
    mask: torch.Tensor  # (H, W) bool at the original size
    score: float  # predicted IoU
    logits: torch.Tensor  # (h, w) float: the low-resolution logits the mask came from


def list_images(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    return [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read it: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error


def _numbers(value: object, count: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _is_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _check_box(box: object, where: str) -> list[float]:
    if not _numbers(box, 4) or box[2] < box[0] or box[3] < box[1]:  # type: ignore[index]
        raise UserError(f"{where}: box {box} is not [x0, y0, x1, y1] with x0 <= x1, y0 <= y1")
    return [float(v) for v in box]  # type: ignore[union-attr]


def _check_point(point: object, where: str) -> list[float]:
    if not _numbers(point, 2):
        raise UserError(f"{where}: point {point} is not [x, y]")
    return [float(v) for v in point]  # type: ignore[union-attr]


def _instance(value: object, position: int, where: str) -> Instance:
    """One entry of an image's "instances", checked."""
    if not isinstance(value, dict) or not set(value) <= set(INSTANCE_KEYS):
        raise UserError(f"{where}: instance {position} must be an object with keys among {', '.join(INSTANCE_KEYS)}")
    instance_id = value.get("id", position)
    if not _is_id(instance_id):
        raise UserError(f"{where}: instance {position}: id {instance_id!r} is not a number or a string")
    where = f"{where}: instance {instance_id!r}"
    box = _check_box(value["box"], where) if value.get("box") is not None else None
    points = value.get("points", [])
    if not isinstance(points, list):
        raise UserError(f'{where}: "points" must be a list of [x, y]')
    points = [_check_point(point, where) for point in points]
    if points and "labels" not in value:
        raise UserError(f'{where}: "points" without "labels" (1 positive, 0 negative, one per point)')
    labels = value.get("labels", [])
    if not isinstance(labels, list) or len(labels) != len(points):
        raise UserError(f'{where}: "labels" must be a list with one label per point ({len(points)}), got {labels!r}')
    for label in labels:
        if isinstance(label, bool) or label not in (0, 1):
            raise UserError(f"{where}: label {label!r} is not 1 (positive) or 0 (negative)")
    if box is None and not points:
        raise UserError(f'{where}: needs a "box" or "points"')
    return Instance(instance_id, box, points, [int(label) for label in labels])


def read_prompts(path: Path) -> dict[str, list[Instance]]:
    """{file_name: [Instance, ...]} from the small prompt JSON (the three forms in the module's docstring)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object mapping file names to prompts")
    out = {}
    for name, value in data.items():
        where = f"{path}: {name!r}"
        value = {"boxes": value} if isinstance(value, list) else value
        if isinstance(value, dict) and set(value) == {"instances"} and isinstance(value["instances"], list):
            instances = [_instance(item, n, where) for n, item in enumerate(value["instances"])]
            seen: set = set()
            for instance in instances:
                if instance.id in seen:
                    raise UserError(f"{where}: instance id {instance.id!r} is given twice")
                seen.add(instance.id)
        elif isinstance(value, dict) and set(value) <= {"boxes", "points"}:
            boxes = [_check_box(box, where) for box in value.get("boxes", [])]
            points = [_check_point(point, where) for point in value.get("points", [])]
            instances = [Instance(n, box=box) for n, box in enumerate(boxes)]
            instances += [Instance(len(boxes) + n, points=[point], labels=[1]) for n, point in enumerate(points)]
        else:
            raise UserError(
                f"{where}: prompts must be a list of boxes, {{'boxes', 'points'}} or {{'instances': [...]}}"
            )
        out[name] = instances
    return out


def prompts_from_coco(path: Path) -> tuple[dict[str, list[Instance]], dict[str, int], dict[str, list[int]]]:
    """Boxes from a COCO file's bbox fields (instance id: the annotation id), with image ids and category ids to
    carry into the results."""
    data = _read_json(path)
    try:
        names = {image["id"]: image["file_name"] for image in data["images"]}
    except (KeyError, TypeError) as error:
        raise UserError(f"{path}: every entry of 'images' needs 'id' and 'file_name' ({error!r})") from error
    prompts: dict[str, list[Instance]] = {name: [] for name in names.values()}
    categories: dict[str, list[int]] = {name: [] for name in names.values()}
    for position, ann in enumerate(data.get("annotations", [])):
        if "bbox" not in ann or ann.get("image_id") not in names:
            raise UserError(f"{path}: annotation {ann.get('id')} needs a 'bbox' and the id of an image in the file")
        x, y, w, h = ann["bbox"]
        name = names[ann["image_id"]]
        box = [x, y, x + max(w - 1, 0), y + max(h - 1, 0)]  # inclusive corners
        prompts[name].append(Instance(ann.get("id", position), box=box))
        categories[name].append(ann.get("category_id", 1))
    return prompts, {name: image_id for image_id, name in names.items()}, categories


def logits_file(results: Path) -> Path:
    """Where --save-logits puts the logits of a results file: masks.json -> masks.logits.safetensors."""
    stem = results.stem if results.suffix == ".json" else results.name
    return results.with_name(f"{stem}.logits.safetensors")


def _logits_key(key: Key) -> str:
    return json.dumps(list(key))


def _mask_hash(segmentation: dict) -> str:
    """Which mask a saved logit map belongs to: an edited mask no longer matches, and is used itself."""
    return hashlib.sha1(json.dumps(segmentation, sort_keys=True).encode()).hexdigest()[:16]


def _decode(segmentation: dict) -> np.ndarray:
    height, width = segmentation["size"]
    rle = segmentation
    if isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(rle).astype(bool)


def mask_frame(model: torch.nn.Module) -> tuple[str, tuple[int, int]]:
    """("padded" | "square", (h, w)): how the model's mask prompts lie over the image, and their size (4x the
    embedding grid)."""
    base = base_of(model)
    encoder = base.prompt_encoder
    size = getattr(encoder, "mask_input_size", None) or tuple(4 * side for side in encoder.image_embedding_size)
    return ("square" if family_of(base).square_input else "padded"), (int(size[0]), int(size[1]))


def mask_to_logits(
    mask: np.ndarray, reshaped: tuple[int, int], input_size: tuple[int, int], side: tuple[int, int]
) -> torch.Tensor:
    """A binary (H, W) mask as (h, w) mask-prompt logits, placed as the processor places the image: resized to
    ``reshaped`` inside the ``input_size`` frame (SAM: longest side, then padding right / bottom; SAM 2 / 3: the
    whole square), then down to the mask grid."""
    values = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    values = F.interpolate(values, size=reshaped, mode="bilinear", align_corners=False, antialias=True)
    frame = values.new_zeros(1, 1, *input_size)
    frame[..., : reshaped[0], : reshaped[1]] = values
    values = F.interpolate(frame, size=side, mode="area")
    return ((2 * values - 1) * MASK_LOGIT)[0, 0]


@dataclass
class Previous:
    """The last round, from predict's own output (--previous) and, beside it, its saved logits."""

    path: Path
    masks: dict[Key, dict]  # RLE per (file_name, instance id)
    logits: dict[Key, torch.Tensor] = field(default_factory=dict)  # those whose mask is unedited
    logits_path: Path | None = None
    logits_frame: str | None = None

    @classmethod
    def read(cls, path: Path) -> Previous:
        data = _read_json(path)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected the list of results samtune predict writes")
        masks: dict[Key, dict] = {}
        for number, result in enumerate(data):
            if not isinstance(result, dict) or not {"file_name", "segmentation"} <= set(result):
                raise UserError(f"{path}: result {number} needs 'file_name', 'instance_id' and 'segmentation'")
            if not _is_id(result.get("instance_id")):
                raise UserError(
                    f"{path}: result {number} has no 'instance_id' (a number or a string) as samtune predict writes"
                )
            key = (result["file_name"], result["instance_id"])
            segmentation = result["segmentation"]
            if not isinstance(segmentation, dict) or not _numbers(segmentation.get("size"), 2):
                raise UserError(f"{path}: {key[0]!r} instance {key[1]!r}: 'segmentation' is not a COCO RLE")
            if key in masks:
                raise UserError(f"{path}: {key[0]!r} instance {key[1]!r} is there twice")
            masks[key] = segmentation
        previous = cls(path, masks)
        if logits_file(path).is_file():
            previous._read_logits(logits_file(path))
        return previous

    def _read_logits(self, path: Path) -> None:
        wanted = {_logits_key(key): key for key in self.masks}
        try:
            with safe_open(str(path), framework="pt") as opened:
                metadata = opened.metadata() or {}
                stored = {name: opened.get_tensor(name).clone() for name in opened.keys() if name in wanted}  # noqa: SIM118
            hashes = json.loads(metadata.get("masks", "{}"))
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{path}: cannot read it as the logits predict saves: {error}") from error
        if metadata.get("format") != LOGITS_FORMAT or not isinstance(hashes, dict):
            raise UserError(f"{path}: not a logits file samtune predict --save-logits wrote")
        for name, logits in stored.items():
            key = wanted[name]
            if hashes.get(name) == _mask_hash(self.masks[key]):  # else the mask was edited: the mask counts
                self.logits[key] = logits
        self.logits_path, self.logits_frame = path, metadata.get("frame")

    def check(self, prompts: dict[str, list[Instance]], files: dict[str, Path], source: str) -> None:
        """Before the model loads: every instance of an image of this round is among its prompts, and every mask
        has its image's size."""
        names = {name for name, _ in self.masks}
        if not names & set(files):
            raise UserError(f"--previous {self.path}: none of its images is among this round's")
        ids = {name: {instance.id for instance in prompts[name]} for name in files}
        for (name, instance_id), segmentation in self.masks.items():
            if name not in files:
                continue
            if instance_id not in ids[name]:
                raise UserError(
                    f"--previous {self.path}: {name!r} instance {instance_id!r} is not among the image's prompts in "
                    f"{source} (restate it, or leave it out of {self.path.name})"
                )
            if (name, instance_id) in self.logits:
                continue
            try:
                width, height = displayed_size(*probe(files[name]))
            except ImageReadError as error:
                raise UserError(f"{files[name]}: {error}") from error
            if list(segmentation["size"]) != [height, width]:
                raise UserError(
                    f"--previous {self.path}: {name!r} instance {instance_id!r}: the mask is "
                    f"{segmentation['size'][0]}x{segmentation['size'][1]}, the image {height}x{width}"
                )
            try:
                _decode(segmentation)
            except (ValueError, TypeError, KeyError) as error:
                raise UserError(
                    f"--previous {self.path}: {name!r} instance {instance_id!r}: unreadable RLE ({error})"
                ) from error

    def check_model(self, model: torch.nn.Module) -> None:
        """Saved logits fit this model's mask prompts: the same frame and size."""
        frame, side = mask_frame(model)
        if self.logits and self.logits_frame != frame:
            raise UserError(
                f"{self.logits_path}: logits in the {self.logits_frame} frame, this model ({family_of(model).label}) "
                f"takes {frame} ones: predict round 1 with this model (or delete the file to use the masks)"
            )
        for (name, instance_id), logits in self.logits.items():
            if tuple(logits.shape) != side:
                raise UserError(
                    f"{self.logits_path}: {name!r} instance {instance_id!r}: logits are "
                    f"{'x'.join(map(str, logits.shape))}, this model's mask prompts are {side[0]}x{side[1]} "
                    "(saved by another model?)"
                )

    def attach(self, name: str, instances: list[Instance]) -> list[Instance]:
        """The instances with their last mask (saved logits where there are, else the binary mask)."""
        out = []
        for instance in instances:
            key = (name, instance.id)
            if key in self.logits:
                instance = replace(instance, previous=self.logits[key].float())
            elif key in self.masks:
                instance = replace(instance, previous=_decode(self.masks[key]))
            out.append(instance)
        return out


def _scale(coords: list, scale: torch.Tensor) -> torch.Tensor:
    """Original pixels to the model's input frame, as the processors do: x * w' / W, y * h' / H."""
    values = torch.tensor(coords, dtype=torch.float32)
    return (values.reshape(-1, 2) * scale).reshape(values.shape)


@torch.no_grad()
def prompted_masks(
    model, processor, image: np.ndarray, instances: list[Instance], device, hq_token_only: bool = False
) -> list[Found]:
    """(mask at original size, score, low-res logits) per instance, in order; the image encoder runs once."""
    if not instances:
        return []
    encoded = encode_image(model, processor, image, device)
    return decode_prompts(model, processor, encoded, instances, device, hq_token_only)


@torch.no_grad()
def decode_prompts(
    model, processor, encoded: Encoded, instances: list[Instance], device, hq_token_only: bool = False
) -> list[Found]:
    """(mask at original size, score, low-res logits) per instance of an encoded image, in order.

    The decoder runs once per group of instances with the same kind of prompt (box or not, click count, mask
    prompt or not): one decoder row per instance, as a mask prompt per instance needs (``samtune.interactive``),
    and no padding, so an instance's mask does not depend on the others'.
    """
    inputs, reshaped, scale, features = encoded
    _, side = mask_frame(model)
    groups: dict[tuple, list[int]] = {}
    for index, instance in enumerate(instances):
        kind = (instance.box is not None, len(instance.points), instance.previous is not None)
        groups.setdefault(kind, []).append(index)
    found: dict[int, Found] = {}
    for (has_box, clicks, has_mask), members in groups.items():
        for start in range(0, len(members), DECODER_ROWS):
            chunk = [instances[index] for index in members[start : start + DECODER_ROWS]]
            prompts = {}
            if has_box:
                prompts["input_boxes"] = _scale([[item.box] for item in chunk], scale)
            if clicks:
                prompts["input_points"] = _scale([[item.points] for item in chunk], scale)
                prompts["input_labels"] = torch.tensor([[item.labels] for item in chunk], dtype=torch.long)
            if has_mask:
                frame = (reshaped, tuple(inputs["pixel_values"].shape[-2:]), side)
                prompts["input_masks"] = torch.stack([_mask_prompt(item.previous, *frame) for item in chunk])[:, None]
            prompts = {key: value.to(device) for key, value in prompts.items()}
            rows = torch.zeros(len(chunk), dtype=torch.long, device=device)
            result = instance_forward(model, features, rows, prompts, chunk[0].multimask, hq_token_only)
            scores, best = result.iou_scores[:, 0].float().max(dim=-1)
            logits = result.pred_masks[:, 0][torch.arange(len(chunk)), best].float().cpu()  # (n, h, w)
            masks = post_process_masks(
                processor, logits[None, :, None], inputs["original_sizes"], inputs.get("reshaped_input_sizes")
            )[0]
            for k, index in enumerate(members[start : start + DECODER_ROWS]):
                found[index] = Found(masks[k, 0], float(scores[k]), logits[k])
    return [found[index] for index in range(len(instances))]


def in_window(window: Window, instances: list[Instance]) -> list[Instance]:
    """The instances' prompts in ``window``'s frame (tiled inference; no mask prompts there)."""
    return [
        replace(
            item,
            box=None if item.box is None else window.to_window(item.box),
            points=[window.to_window(point) for point in item.points],
        )
        for item in instances
    ]


def windows_of(instances: list[Instance], tiling: Tiling, height: int, width: int) -> dict[Window, list[int]]:
    """The indices of the instances decoded in each window (``samtune.tiling``), windows in image order."""
    groups: dict[Window, list[int]] = {}
    for index, item in enumerate(instances):
        window = tiling.window_for(prompt_extent(item.box, item.points), height, width)
        groups.setdefault(window, []).append(index)
    return dict(sorted(groups.items(), key=lambda entry: (entry[0].y0, entry[0].x0, entry[0].y1, entry[0].x1)))


def in_image(window: Window, found: Found, height: int, width: int) -> Found:
    """A mask found in ``window`` as a mask of the whole (height, width) image (its logits stay the window's)."""
    return Found(torch.from_numpy(window.paste(found.mask.numpy(), height, width)), found.score, found.logits)


@torch.no_grad()
def tiled_masks(
    model, processor, image: np.ndarray, instances: list[Instance], tiling: Tiling, device, hq_token_only: bool = False
) -> list[tuple[Window, Found]]:
    """``prompted_masks`` window by window: each instance decoded in its window (mask, logits in the window's
    frame), each window encoded once. Only the windows that hold prompts are encoded."""
    height, width = image.shape[:2]
    found: dict[int, tuple[Window, Found]] = {}
    for window, members in windows_of(instances, tiling, height, width).items():
        local = in_window(window, [instances[index] for index in members])
        crop = np.ascontiguousarray(window.crop(image))
        for index, item in zip(members, prompted_masks(model, processor, crop, local, device, hq_token_only)):
            found[index] = (window, item)
    return [found[index] for index in range(len(instances))]


def _mask_prompt(previous, reshaped: tuple[int, int], input_size: tuple[int, int], side: tuple[int, int]):
    if isinstance(previous, torch.Tensor):
        return previous.float()
    return mask_to_logits(previous, reshaped, input_size, side)


def coco_result(found: Found, image_id: int, file_name: str, instance_id: InstanceId, category_id: int) -> dict:
    """One mask as a COCO results entry: RLE at the original size, its box, the predicted IoU as score."""
    ys, xs = np.nonzero(found.mask.numpy())
    box = (
        [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        if len(xs)
        else [0.0, 0.0, 0.0, 0.0]
    )
    return {
        "image_id": image_id,
        "file_name": file_name,
        "instance_id": instance_id,
        "category_id": category_id,
        "segmentation": encode_rle(found.mask),
        "bbox": box,
        "score": found.score,
    }


def overlay(image: np.ndarray, entries: list[dict], instances: list[Instance] | None, names: dict) -> np.ndarray:
    """The image with one image's results drawn: masks filled and outlined, each instance's box and clicks,
    its category name (when known) and score."""
    masks = (
        np.stack([_decode(e["segmentation"]) for e in entries]) if entries else np.zeros((0, *image.shape[:2]), bool)
    )
    boxes = points = None
    if instances:
        boxes = [i.box for i in instances]
        points = [np.array([[*xy, label] for xy, label in zip(i.points, i.labels)]) if i.points else None
                  for i in instances]  # fmt: skip
    texts = [f"{names.get(e['category_id'], '')} {e['score']:.2f}".strip() for e in entries]
    return draw_masks(image, masks, boxes, points, texts)


def save_logits(path: Path, results: list[dict], logits: list[torch.Tensor], model: torch.nn.Module) -> None:
    """Each result's low-resolution logits (fp16: ample for logits), keyed by JSON [file_name, instance_id]; None:
    a mask without logits in the model's mask frame (an automatic mask found in a crop)."""
    frame, side = mask_frame(model)
    keys = [_logits_key((r["file_name"], r["instance_id"])) for r in results]
    metadata = {
        "format": LOGITS_FORMAT,
        "frame": frame,
        "side": f"{side[0]}x{side[1]}",
        "model_type": base_of(model).config.model_type,
        "masks": json.dumps({key: _mask_hash(r["segmentation"]) for key, r in zip(keys, results)}),
    }
    stored = {key: value.half().contiguous() for key, value in zip(keys, logits) if value is not None}
    save_file(stored, str(path), metadata)  # masks without logits (automatic, from a crop) go back as masks


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--images", required=True, type=Path, help="an image file or a folder (searched recursively)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path, help="prompt JSON (see above)")
    source.add_argument("--coco", type=Path, help="COCO file whose annotation boxes are the prompts")
    parser.add_argument(
        "--previous", type=Path, help="predict's output of the last round: its masks become the mask prompts"
    )
    parser.add_argument(
        "--save-logits", action="store_true", help="also write the masks' low-res logits to OUTPUT.logits.safetensors"
    )
    parser.add_argument("--output", type=Path, default=Path("predictions.json"))
    parser.add_argument("--overlays", type=Path, help="folder for PNG overlays of the masks")
    parser.add_argument(
        "--compare-base", action="store_true", help="with --adapter and --overlays: the base model's masks beside"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inference.add_arguments(parser)
    add_automatic_arguments(parser)
    add_tile_arguments(parser)
    args = parser.parse_args(argv)
    tiling = tiling_of(args)
    if tiling is not None and (args.previous or args.save_logits):
        raise UserError("--tile with --previous or --save-logits: tiled masks' logits lie in their tile, not the image")

    if args.output and not args.output.resolve().parent.is_dir():  # found now, not after the work
        raise UserError(f"--output {args.output}: its folder {args.output.parent} does not exist")
    if args.compare_base and not (args.adapter and args.overlays):
        raise UserError("--compare-base draws the base beside the fine-tuned model: it needs --adapter and --overlays")
    autocast = inference.autocast(args.device, args.precision)
    automatic = config_from(args).check()
    image_ids, categories, names = {}, {}, {}
    prompts = None
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.coco:
        prompts, image_ids, categories = prompts_from_coco(args.coco)
        names = {c.get("id"): str(c.get("name", "")) for c in _read_json(args.coco).get("categories", [])}
    if args.previous and prompts is None:
        raise UserError("--previous needs --prompts or --coco: the instances of this round, with their new clicks")
    previous = Previous.read(args.previous) if args.previous else None
    files = list_images(args.images)
    if not files:
        raise UserError(f"--images {args.images}: no image files there ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if prompts is not None:
        missing = sorted(set(prompts) - {name for name, _ in files})
        if missing:
            raise UserError(f"prompts name images not under {args.images}: {', '.join(missing[:5])}")
        files = [(name, path) for name, path in files if name in prompts]
    if previous is not None:
        previous.check(prompts, dict(files), str(args.prompts or args.coco))
    # the inputs are checked: now the model (slow for large ones)
    model, processor = load_trained(args.model, args.adapter, fast_encoder=args.fast_encoder, compile=args.compile)
    if previous is not None:
        previous.check_model(model)
    model.to(args.device)
    base = None
    if args.compare_base:
        base = load_trained(args.model, None, fast_encoder=args.fast_encoder, compile=args.compile)
        base[0].to(args.device)
    results, logits = [], []
    for number, (name, path) in enumerate(tqdm(files, desc="predict", unit="image"), start=1):
        image = read_rgb(path)
        instances = None
        if prompts is not None:
            instances = previous.attach(name, prompts[name]) if previous is not None else prompts[name]
        image_id = image_ids.get(name, number)

        def run(model, processor, instances=instances, image=image, name=name, image_id=image_id) -> tuple:
            """This image's results entries and their low-res logits."""
            with autocast:
                if instances is None:
                    tiles = None if tiling is None else tiling.regions(*image.shape[:2])
                    found = automatic_masks(model, processor, image, args.device, automatic, tiles, args.hq_token_only)
                    return [coco_entry(m, image_id, name, k) for k, m in enumerate(found)], [m.logits for m in found]
                if tiling is None:
                    found = prompted_masks(model, processor, image, instances, args.device, args.hq_token_only)
                else:
                    tiled = tiled_masks(model, processor, image, instances, tiling, args.device, args.hq_token_only)
                    found = [in_image(window, item, *image.shape[:2]) for window, item in tiled]
            labels = categories.get(name) or [1] * len(found)
            entries = [coco_result(f, image_id, name, i.id, c) for f, i, c in zip(found, instances, labels)]
            return entries, [f.logits for f in found]

        entries, found_logits = run(model, processor)
        results += entries
        logits += found_logits
        if args.overlays:
            target = args.overlays / f"{Path(name).with_suffix('')}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            picture = overlay(image, entries, instances, names)
            if base is not None:
                picture = side_by_side(
                    [overlay(image, run(*base)[0], instances, names), picture], ["base", "fine-tuned"]
                )
            Image.fromarray(picture).save(target)
    args.output.write_text(json.dumps(results))
    if args.save_logits:
        save_logits(logits_file(args.output), results, logits, model)
    saved = f" (logits: {logits_file(args.output)})" if args.save_logits else ""
    print(f"{len(results)} masks for {len(files)} images -> {args.output}{saved}")
    return results


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune predict"))
