"""Overlays people can read: masks filled and outlined, the prompts that made them (box, clicks), each mask's
category and score written beside it, and panels side by side (ground truth | prediction in TensorBoard;
base | fine-tuned from ``samtune predict --compare-base``; ground truth | each model from ``samtune evaluate
--overlays``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from scipy import ndimage

from samtune.data.batch import SamBatch
from samtune.data.coco import CocoInstanceDataset

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.float32,
)


def paint(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with each of the (K, H, W) ``masks`` filled in its palette colour."""
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        colour = PALETTE[k % len(PALETTE)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.clip(0, 255).astype(np.uint8)


def draw_points(image: np.ndarray, points: np.ndarray, radius: int) -> np.ndarray:
    """Dots on an (H, W, 3) image for (P, 3) x, y, label rows: green positive, red negative."""
    out = image.copy()
    rows, cols = np.ogrid[: out.shape[0], : out.shape[1]]
    for x, y, label in points:
        disc = (cols - x) ** 2 + (rows - y) ** 2 <= radius**2
        out[disc] = (0, 200, 0) if label > 0 else (220, 0, 0)
    return out


def overlay_panel(
    batch: SamBatch,
    row: int,
    logits: torch.Tensor,
    processor,
    points: np.ndarray | None = None,
    boxes: bool = True,
    titles: tuple[str, str] | None = None,
) -> np.ndarray:
    """(H, 2W + 4, 3) uint8 at the model's input scale: the image with its ground truth, then with the prediction,
    its box prompts (``boxes``, when the batch has any) and ``points`` ((P, 3) x, y in the model's input frame,
    label), e.g. the clicks that led to it; masks filled and outlined. ``titles``: a caption over each half (the
    panel is then taller)."""
    height, width = (int(v) for v in batch["reshaped_input_sizes"][row])
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    pixels = batch["pixel_values"][row].float().cpu() * std + mean
    image = (pixels[:, :height, :width].permute(1, 2, 0).numpy() * 255).clip(0, 255)
    count = int(batch["valid"][row].sum())
    truth = (
        F.interpolate(batch["original_masks"][row][None].float().cpu(), size=(height, width), mode="nearest")[0] > 0.5
    )
    side = batch["pixel_values"].shape[-1]  # the padded (SAM) or square (SAM 2 / 3) input side
    predicted = F.interpolate(logits[row, :count][None].float().cpu(), size=(side, side), mode="bilinear")[0]
    predicted = predicted[:, :height, :width] > 0
    prompt_boxes = None
    if boxes and "input_boxes" in batch:
        prompt_boxes = batch["input_boxes"][row, :count].float().cpu().numpy()
    shown = draw_masks(image, predicted.numpy(), boxes=prompt_boxes)
    if points is not None and len(points):
        shown = draw_points(shown, points, radius=max(1, round(max(height, width) / 100)))
    truth_panel = draw_masks(image, truth.numpy())
    if titles is None:
        gap = np.full((height, 4, 3), 255, np.uint8)
        return np.concatenate([truth_panel, gap, shown], axis=1)
    return side_by_side([truth_panel, shown], list(titles))


def colour_of(k: int) -> tuple[int, int, int]:
    """The palette colour of mask ``k``."""
    return tuple(int(v) for v in PALETTE[k % len(PALETTE)])


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of a bool (H, W) ``mask`` within ``width`` pixels of its border (inside it)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.zeros_like(mask, dtype=bool)
    if not len(rows):
        return out
    # eroded within the mask's box only: a 12 MP photo's small object costs its box, not the photo
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    inside = mask[y0:y1, x0:x1].astype(bool)
    out[y0:y1, x0:x1] = inside & ~ndimage.binary_erosion(inside, iterations=width, border_value=0)
    return out


def line_width(shape: Sequence[int]) -> int:
    """An outline / box width that stays visible as the image grows (1 px at 500 px, 8 px on a 4000 px photo)."""
    return max(1, round(max(shape[:2]) / 500))


def draw_box(image: np.ndarray, box: Sequence[float], colour: Sequence[int], width: int = 1) -> np.ndarray:
    """A copy of ``image`` with the rectangle of ``box`` ([x0, y0, x1, y1], inclusive pixels) drawn."""
    canvas = Image.fromarray(image)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)  # the nearest pixels (PIL would truncate)
    ImageDraw.Draw(canvas).rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=tuple(colour), width=width)
    return np.asarray(canvas).copy()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no font files needed


def write(image: np.ndarray, xy: Sequence[float], text: str, colour: Sequence[int], size: int = 12) -> np.ndarray:
    """A copy of ``image`` with ``text`` written at ``xy`` (its top-left, kept inside the image), white on a
    ``colour`` label so it reads on any background."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, size // 6)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = int(min(max(0, xy[0]), max(0, image.shape[1] - w)))
    y = int(min(max(0, xy[1]), max(0, image.shape[0] - h)))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=tuple(colour))
    draw.text((x + pad - left, y + pad - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas).copy()


def draw_masks(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray | Sequence | None = None,
    points: Sequence[np.ndarray | None] | None = None,
    texts: Sequence[str] | None = None,
    alpha: float = 0.4,
) -> np.ndarray:
    """(H, W, 3) uint8: each of the (K, H, W) ``masks`` filled and outlined in its colour, with its prompt box
    (``boxes`` [x0, y0, x1, y1] or None each), its clicks (``points``: (P, 3) x, y, label each, or None: green
    positive, red negative) and its ``texts`` (e.g. "cat 0.93") written at its top-left corner."""
    image = np.ascontiguousarray(image, dtype=np.uint8) if image.dtype != np.uint8 else image
    width = line_width(image.shape)
    out = paint(image, masks, alpha)
    for k, mask in enumerate(masks):
        out[outline(mask, width)] = colour_of(k)
    for k in range(len(masks)):
        box = None if boxes is None else boxes[k]
        if box is not None:
            out = draw_box(out, box, colour_of(k), width)
    size = max(10, round(max(image.shape[:2]) / 60))
    for k, text in enumerate(texts or []):
        if not text:
            continue
        if boxes is not None and boxes[k] is not None:
            corner = (boxes[k][0], boxes[k][1])
        elif masks[k].any():
            ys, xs = np.nonzero(masks[k])
            corner = (xs.min(), ys.min())
        else:
            continue
        out = write(out, corner, text, colour_of(k), size)
    if points is not None:  # last: a label never hides a click
        for clicks in points:
            if clicks is not None and len(clicks):
                out = draw_points(out, np.asarray(clicks), radius=max(3, 3 * width))
    return out


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str], gap: int = 4) -> np.ndarray:
    """Panels of one height next to each other, ``gap`` white pixels apart, each under its title."""
    height = max(panel.shape[0] for panel in panels)
    size = max(12, round(height / 40))
    bar = size + size // 2
    columns = []
    for panel, title in zip(panels, titles):
        column = np.full((height + bar, panel.shape[1], 3), 255, np.uint8)
        column[bar : bar + panel.shape[0]] = panel
        canvas = Image.fromarray(column)
        ImageDraw.Draw(canvas).text((4, size // 4), title, fill=(0, 0, 0), font=_font(size))
        columns.append(np.asarray(canvas))
        columns.append(np.full((height + bar, gap, 3), 255, np.uint8))
    return np.concatenate(columns[:-1], axis=1)


def _decode(segmentation: dict) -> np.ndarray:
    counts = segmentation["counts"]
    rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def evaluation_overlays(
    folder: Path, source: CocoInstanceDataset, runs: dict[str, list[dict]], count: int = 8
) -> list[Path]:
    """``samtune evaluate --overlays``: for the first ``count`` images with masks, one PNG each (named as the
    image): the ground truth (category names) beside each run's masks. ``runs``: per model, entries with
    ``image_id``, ``segmentation`` (RLE) and ``score``; scored instances (``annotation_id``, ``iou``) are drawn
    in their ground truth's colour with their IoU, prompt-free masks with their predicted IoU."""
    per_image = {name: defaultdict(list) for name in runs}
    for name, entries in runs.items():
        for entry in entries:
            per_image[name][entry["image_id"]].append(entry)
    written: list[Path] = []
    for index, image in enumerate(source.images):
        if len(written) == count:
            break
        if not any(image.image_id in found for found in per_image.values()):
            continue
        sample = source.sample(index)
        truth, ids = sample["masks"], [int(v) for v in sample["annotation_ids"]]
        truth_texts = [source.categories.get(int(c), str(int(c))) for c in sample["category_ids"]]
        panels, titles = [draw_masks(sample["image"], truth, texts=truth_texts)], ["ground truth"]
        for name, found in per_image.items():
            entries = found.get(image.image_id, [])
            if entries and "annotation_id" in entries[0]:  # one mask per annotation: in that annotation's colour
                masks, texts = np.zeros_like(truth, dtype=bool), [""] * len(ids)
                for entry in entries:
                    k = ids.index(entry["annotation_id"])
                    masks[k], texts[k] = _decode(entry["segmentation"]), f"IoU {entry['iou']:.2f}"
            else:
                masks = np.stack([_decode(e["segmentation"]) for e in entries]) if entries else truth[:0]
                texts = [f"{e['score']:.2f}" for e in entries]
            panels.append(draw_masks(sample["image"], masks, texts=texts))
            titles.append(name)
        path = folder / f"{Path(image.file_name).with_suffix('')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(side_by_side(panels, titles)).save(path)
        written.append(path)
    return written
