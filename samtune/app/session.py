"""What the page does, without the page: images, prompts, one or two models, masks, scores, downloads.

A ``Panel`` is one model shown on the page (the fine-tuned one, the base beside it): it keeps the current image's
encoding (``samtune.predict.encode_image``) while the image is shown, so every click after the first only runs
the decoder. A ``Session`` holds the image list, the current image and its objects: each object is a box and / or
clicks (positive, negative) and, per panel, its last mask; each new prompt decodes the object again with all its
prompts so far and its last mask's low-resolution logits as the mask prompt, as ``samtune predict --previous``
does. With a COCO file, the image's ground truth is drawn and the current mask is scored against it.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from samtune.data.images import ImageReadError, read_rgb, to_rgb
from samtune.errors import UserError
from samtune.evaluation import instance_iou_f1
from samtune.models.family import base_of
from samtune.predict import Encoded, Found, Instance, coco_result, decode_prompts, encode_image
from samtune.visualize import PALETTE, draw_box, draw_points, outline, paint

if TYPE_CHECKING:
    from samtune.data.coco import CocoInstanceDataset

# An image encoder above this many parameters takes seconds per image on a CPU (the demo base has 0.5M, SlimSAM
# about 6M, SAM ViT-B 89M: 9 s on 2 cores): the page says so.
SLOW_ON_CPU = 20_000_000


@dataclass
class Panel:
    """One model on the page, with its encoding of the image shown."""

    name: str
    model: torch.nn.Module
    processor: object
    adapter_off: bool = False  # the base of a PeftModel: the same weights with the adapter disabled
    encodes: int = 0  # image-encoder runs (one per image shown)
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    _cached: tuple[int, Encoded] | None = None

    def _weights(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()

    def encoded(self, key: int, image: np.ndarray, device: str) -> Encoded:
        """The image's encoding, computed once while ``key`` (the image shown) stays the same."""
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the last image's features before computing the next
            start = time.perf_counter()
            with self._weights():
                self._cached = (key, encode_image(self.model, self.processor, image, device))
            self.encode_ms = 1000 * (time.perf_counter() - start)
            self.encodes += 1
        return self._cached[1]

    def segment(self, key: int, image: np.ndarray, instance: Instance, device: str, hq_token_only: bool) -> Found:
        encoded = self.encoded(key, image, device)
        start = time.perf_counter()
        with self._weights():
            (found,) = decode_prompts(self.model, self.processor, encoded, [instance], device, hq_token_only)
        self.decode_ms = 1000 * (time.perf_counter() - start)
        return found

    def encoder_parameters(self) -> int:
        return sum(p.numel() for p in base_of(self.model).vision_encoder.parameters())


@dataclass
class Source:
    """One image of the list: a file, an upload, or an image of a COCO file (with its ground truth)."""

    name: str
    path: Path | None = None
    pixels: np.ndarray | None = None  # uploads
    coco_index: int | None = None


@dataclass
class Truth:
    masks: np.ndarray  # (K, H, W) bool
    annotation_ids: list[int]
    ignore: np.ndarray  # (H, W) bool: crowd pixels, not scored


@dataclass
class Step:
    """An object after one prompt: its prompts so far and each panel's mask."""

    points: list[list[float]]
    labels: list[int]
    box: list[float] | None
    found: list[Found]


@dataclass
class Object:
    steps: list[Step] = field(default_factory=list)

    @property
    def last(self) -> Step | None:
        return self.steps[-1] if self.steps else None


class Session:
    """The page's state and its actions; the server turns each request into one call."""

    def __init__(
        self,
        panels: list[Panel],
        sources: list[Source],
        dataset: CocoInstanceDataset | None = None,
        device: str = "cpu",
        autocast: contextlib.AbstractContextManager | None = None,
        hq_token_only: bool = False,
        notes: list[str] | None = None,
    ) -> None:
        self.panels = panels
        self.sources = sources
        self.dataset = dataset  # a CocoInstanceDataset when a COCO file was given
        self.device = device
        self.autocast = autocast or contextlib.nullcontext()
        self.hq_token_only = hq_token_only
        self.notes = list(notes or [])
        self.index: int | None = None
        self.image: np.ndarray | None = None
        self.truth: Truth | None = None
        self.objects: list[Object] = []
        self.key = 0  # bumped for every image opened: the panels' encodings follow it
        self.version = 0  # bumped on every change: the page reloads its pictures when it moves
        if device == "cpu" and any(p.encoder_parameters() > SLOW_ON_CPU for p in panels):
            millions = max(p.encoder_parameters() for p in panels) / 1e6
            self.notes.append(
                f"The image encoder has {millions:.0f}M parameters and runs on the CPU: each new image takes "
                "seconds to several tens of seconds (once per image; clicks after that take well under a second)."
            )
        if sources:
            self.open(0)

    # images
    def open(self, index: int) -> None:
        if not 0 <= index < len(self.sources):
            raise UserError(f"no image {index}: there are {len(self.sources)}")
        source = self.sources[index]
        truth = None
        if source.coco_index is not None:
            sample = self.dataset[source.coco_index]
            image = sample["image"]
            truth = Truth(sample["masks"], [int(a) for a in sample["annotation_ids"]], sample["ignore"])
        elif source.pixels is not None:
            image = source.pixels
        else:
            image = read_rgb(source.path)
        self.index, self.image, self.truth = index, image, truth
        self.objects = [Object()]
        self.key += 1
        self.version += 1

    def upload(self, name: str, data: bytes) -> None:
        """An image sent from the page: added to the list and opened."""
        try:
            with Image.open(io.BytesIO(data)) as opened:
                pixels = to_rgb(opened)
        except (UnidentifiedImageError, OSError, ValueError, ImageReadError) as error:
            raise UserError(f"{name}: not an image this page can read ({error})") from error
        self.sources.append(Source(Path(name).name or "upload", pixels=pixels))
        self.open(len(self.sources) - 1)

    # prompts
    @property
    def current(self) -> Object:
        return self.objects[-1]

    def click(self, x: float, y: float, positive: bool = True) -> None:
        """A click on the current object: positive adds to the mask, negative takes away."""
        self._check_point(x, y)
        last = self.current.last
        points = (last.points if last else []) + [[float(x), float(y)]]
        labels = (last.labels if last else []) + [1 if positive else 0]
        self._prompt(points, labels, last.box if last else None)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """A dragged box for the current object (a later box replaces it; its clicks stay)."""
        self._check_point(x0, y0)
        self._check_point(x1, y1)
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        last = self.current.last
        self._prompt(last.points if last else [], last.labels if last else [], [float(v) for v in box])

    def _check_point(self, x: float, y: float) -> None:
        if self.image is None:
            raise UserError("open or upload an image first")
        height, width = self.image.shape[:2]
        if not (0 <= x < width and 0 <= y < height):
            raise UserError(f"({x:g}, {y:g}) lies outside the {width}x{height} image")

    def _prompt(self, points: list[list[float]], labels: list[int], box: list[float] | None) -> None:
        last = self.current.last
        found = []
        with self.autocast:
            for n, panel in enumerate(self.panels):
                # the refinement: this panel's own last mask (its low-res logits) as the mask prompt
                previous = last.found[n].logits if last else None
                instance = Instance(len(self.objects) - 1, box, points, labels, previous)
                found.append(panel.segment(self.key, self.image, instance, self.device, self.hq_token_only))
        self.current.steps.append(Step(points, labels, box, found))
        self.version += 1

    def undo(self) -> None:
        """The last prompt of the current object off (or, with none left, back to the previous object)."""
        if self.current.steps:
            self.current.steps.pop()
        elif len(self.objects) > 1:
            self.objects.pop()
        self.version += 1

    def new_object(self) -> None:
        """Keep the current object and start another."""
        if self.current.steps:
            self.objects.append(Object())
            self.version += 1

    def clear(self) -> None:
        self.objects = [Object()]
        self.version += 1

    # what the page shows
    def finished(self) -> list[Object]:
        return [obj for obj in self.objects if obj.steps]

    def truth_match(self, step: Step, panel: int) -> tuple[int | None, float | None]:
        """(annotation id, IoU) of the current mask against the ground truth: the instance under the object's
        first positive click (else the one that overlaps the mask most)."""
        if self.truth is None or not len(self.truth.masks):
            return None, None
        mask = step.found[panel].mask
        masks = torch.from_numpy(self.truth.masks)
        ignore = torch.from_numpy(self.truth.ignore)[None].expand_as(masks)
        ious, _ = instance_iou_f1(mask[None].expand_as(masks), masks, ignore)
        first = next(((x, y) for (x, y), label in zip(step.points, step.labels) if label == 1), None)
        under = [k for k in range(len(masks)) if first and self.truth.masks[k, int(first[1]), int(first[0])]]
        k = under[0] if under else int(ious.argmax())
        return self.truth.annotation_ids[k], float(ious[k])

    def state(self) -> dict:
        """Everything the page writes as text, JSON-ready."""
        step = self.current.last
        panels = []
        for n, panel in enumerate(self.panels):
            row: dict = {"name": panel.name, "encode_ms": round(panel.encode_ms, 1), "decode_ms": None}
            row.update(score=None, area=0, truth_id=None, truth_iou=None)
            if step:
                found = step.found[n]
                truth_id, truth_iou = self.truth_match(step, n)
                row.update(score=round(found.score, 4), area=int(found.mask.sum()), decode_ms=round(panel.decode_ms, 1))
                row.update(truth_id=truth_id, truth_iou=None if truth_iou is None else round(truth_iou, 4))
            panels.append(row)
        height, width = self.image.shape[:2] if self.image is not None else (0, 0)
        return {
            "version": self.version,
            "images": [source.name for source in self.sources],
            "index": self.index,
            "width": width,
            "height": height,
            "has_truth": self.truth is not None,
            "truth_count": 0 if self.truth is None else len(self.truth.masks),
            "objects": len(self.finished()),
            "points": step.points if step else [],
            "labels": step.labels if step else [],
            "box": step.box if step else None,
            "panels": panels,
            "notes": self.notes,
        }

    def view(self, panel: int, truth: bool = True) -> np.ndarray:
        """(H, W, 3) uint8: the image with this panel's masks (one colour per object), the current object's
        prompts, and the ground truth's outlines."""
        if self.image is None:
            return np.full((64, 64, 3), 235, np.uint8)
        objects = self.finished()
        masks = np.stack([obj.last.found[panel].mask.numpy() for obj in objects]) if objects else None
        out = paint(self.image, masks) if masks is not None else self.image.copy()
        if truth and self.truth is not None and len(self.truth.masks):
            out[outline(self.truth.masks.any(axis=0))] = (255, 255, 255)
        step = self.current.last
        if step and step.box:
            colour = PALETTE[(len(self.objects) - 1) % len(PALETTE)]
            out = draw_box(out, step.box, [int(c) for c in colour])
        if step and step.points:
            radius = max(3, round(max(out.shape[:2]) / 64))
            rows = np.array([[x, y, label] for (x, y), label in zip(step.points, step.labels)])
            out = draw_points(out, rows, radius)
        return out

    def label_mask(self, panel: int) -> np.ndarray:
        """(H, W) uint8: 0 background, k for the k-th object (later objects on top)."""
        if self.image is None:
            raise UserError("open or upload an image first")
        out = np.zeros(self.image.shape[:2], np.uint8)
        for k, obj in enumerate(self.finished(), start=1):
            out[obj.last.found[panel].mask.numpy()] = min(k, 255)
        return out

    def results(self, panel: int) -> list[dict]:
        """This panel's masks of the current image as a COCO results list (as ``samtune predict`` writes)."""
        if self.index is None:
            return []
        source = self.sources[self.index]
        image_id = self.index + 1
        if source.coco_index is not None:
            image_id = self.dataset.images[source.coco_index].image_id
        return [
            coco_result(obj.last.found[panel], image_id, source.name, number, 1)
            for number, obj in enumerate(self.finished())
        ]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
