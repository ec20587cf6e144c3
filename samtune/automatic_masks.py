"""Masks without prompts: SAM's automatic mask generation on transformers' and pycocotools' building blocks.

For each crop of the image (the whole image, then ``crop_layers`` layers of overlapping crops from transformers'
``generate_crop_boxes``, or the regions a caller passes): the crop is preprocessed and encoded once, a grid of
``points_per_side``² single clicks decodes in batches of ``points_per_batch`` (three masks each), and a mask is
kept when

- its predicted IoU is above ``min_score`` (SAM's ``pred_iou_thresh``, 0.88),
- its stability score is above ``min_stability`` (SAM's ``stability_score_thresh``, 0.95): as SAM defines it, the
  IoU of the mask thresholded at +1 and at -1 (``stability_offset``), on the logits upscaled to the crop. A crop
  larger than the model's input is scored at the input's resolution (the logits are 4x coarser still; a ratio
  of areas does not change with the scale it is counted at),
- it does not touch the crop's edge where the crop does not touch the image's (a cut-off object: another crop
  holds it whole),
- and no better mask of the crop overlaps it by more than ``dedup_iou`` (mask IoU on COCO RLEs with pycocotools,
  where SAM compares boxes: a ring and the disc inside it share a box, not a mask).

Only then is a mask made at the original resolution. Across crops, the masks of smaller crops (seen at a higher
resolution) win over the overlapping masks of larger ones (``crop_dedup_iou``), as in SAM.

Tiled inference over an image far larger than the model's input: pass ``crop_boxes`` (overlapping tiles); each
is encoded once, the masks cut by a tile's inner edges are dropped, and duplicates across tiles are removed;
every mask comes back as an RLE of the whole image.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from samtune import inference
from samtune.data.coco import CocoInstanceDataset
from samtune.errors import UserError
from samtune.evaluation import coco_metrics
from samtune.image_encoding import Encoded, encode_image
from samtune.models.family import forward_options, post_process_masks

EDGE_TOLERANCE = 20.0  # pixels: SAM's distance under which a box "touches" a crop edge
WORK_BYTES = 256 * 2**20  # upscaled logits held at once (float32): bounds memory on 12 MP photos


@dataclass(frozen=True)
class AutomaticConfig:
    """The knobs of automatic mask generation, with SAM's defaults (``SamAutomaticMaskGenerator``)."""

    points_per_side: int = 32  # grid of single clicks per crop side (layer 0)
    points_per_batch: int = 64  # clicks per decoder call: bounds memory
    min_score: float = 0.88  # predicted IoU above this (SAM's pred_iou_thresh)
    min_stability: float = 0.95  # stability score above this (SAM's stability_score_thresh)
    stability_offset: float = 1.0  # logit offset of the stability score (SAM's stability_score_offset)
    dedup_iou: float = 0.7  # within a crop, a mask overlapping a better one more than this is a duplicate
    crop_layers: int = 0  # layers of overlapping crops after the whole image: layer i cuts it in (2**i)² crops
    crop_overlap: float = 512 / 1500  # crop overlap as a fraction of the image's short side (layer 1)
    crop_points_downscale: int = 1  # layer i has points_per_side / this**i points a side
    crop_dedup_iou: float = 0.7  # across crops: a mask overlapping one of a smaller crop more than this goes

    def check(self) -> AutomaticConfig:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise UserError("--points-per-side and --points-per-batch must be at least 1")
        if self.crop_layers < 0 or self.crop_points_downscale < 1:
            raise UserError("--crop-layers must be at least 0 and --crop-points-downscale at least 1")
        if not 0 <= self.crop_overlap < 1:
            raise UserError(f"--crop-overlap {self.crop_overlap}: a fraction in [0, 1)")
        for name in ("dedup_iou", "crop_dedup_iou"):
            if not 0 < getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: an IoU in (0, 1]")
        return self


class AutoMask(NamedTuple):
    """One automatic mask."""

    segmentation: dict  # COCO compressed RLE at the original size, JSON-ready ("counts" a str)
    bbox: list[float]  # [x, y, width, height] (COCO), original pixels
    area: int
    score: float  # predicted IoU
    stability: float
    point: list[float]  # the click [x, y] that made it, original pixels
    crop_box: list[int]  # [x0, y0, x1, y1] of the crop it was found in (x1, y1 exclusive)
    logits: torch.Tensor | None  # (h, w) low-res logits when the crop is the whole image (a mask prompt), else None

    def mask(self) -> np.ndarray:
        """The (H, W) bool mask."""
        return mask_utils.decode(_compressed(self.segmentation)).astype(bool)


def coco_entry(mask: AutoMask, image_id: int, file_name: str, instance_id: int) -> dict:
    """One automatic mask as a COCO results entry (class-agnostic: category 1), with SAM's extra fields."""
    return {
        "image_id": image_id,
        "file_name": file_name,
        "instance_id": instance_id,
        "category_id": 1,
        "segmentation": mask.segmentation,
        "bbox": mask.bbox,
        "area": mask.area,
        "score": mask.score,
        "stability_score": mask.stability,
        "point_coords": [mask.point],
        "crop_box": mask.crop_box,
    }


class _Candidate(NamedTuple):
    score: float
    stability: float
    rle: dict  # pycocotools RLE ("counts" bytes) at the crop's working resolution, crop-local
    logits: torch.Tensor  # (h, w) low-res
    point: tuple[float, float]  # crop pixels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The automatic-mask flags (predict, evaluate --automatic), defaults SAM's."""
    default = AutomaticConfig()
    group = parser.add_argument_group("automatic masks (no prompts), SAM's defaults")
    group.add_argument(
        "--points-per-side", type=int, default=default.points_per_side, help="click grid per side (%(default)s)"
    )
    group.add_argument(
        "--points-per-batch", type=int, default=default.points_per_batch, help="clicks per decoder call (%(default)s)"
    )
    group.add_argument(
        "--min-score",
        "--pred-iou-thresh",
        type=float,
        default=default.min_score,
        help="least predicted IoU (%(default)s)",
    )
    group.add_argument(
        "--min-stability",
        "--stability-score-thresh",
        type=float,
        default=default.min_stability,
        help="least stability score (IoU of the mask at logit +1 and -1) (%(default)s)",
    )
    group.add_argument(
        "--dedup-iou",
        type=float,
        default=default.dedup_iou,
        help="mask IoU above which the weaker mask is dropped (%(default)s)",
    )
    group.add_argument(
        "--crop-layers",
        type=int,
        default=default.crop_layers,
        help="layers of overlapping crops (SAM's crop_n_layers) (%(default)s)",
    )
    group.add_argument(
        "--crop-overlap", type=float, default=default.crop_overlap, help="crop overlap ratio (%(default)s)"
    )
    group.add_argument(
        "--crop-points-downscale",
        type=int,
        default=default.crop_points_downscale,
        help="fewer points in deeper layers (%(default)s)",
    )


def config_from(args: argparse.Namespace) -> AutomaticConfig:
    """The AutomaticConfig of parsed ``add_arguments`` flags."""
    return AutomaticConfig(**{f.name: getattr(args, f.name) for f in fields(AutomaticConfig) if hasattr(args, f.name)})


def crop_layers(image: np.ndarray, config: AutomaticConfig) -> list[tuple[list[int], int]]:
    """([x0, y0, x1, y1], layer) of the whole image and its crop layers, by transformers' ``generate_crop_boxes``
    (SAM's layout: layer i has (2**i)² crops overlapping by ``crop_overlap`` of the short side, halved each layer)."""
    boxes = SamImageProcessorPil().generate_crop_boxes(
        image, target_size=1024, crop_n_layers=config.crop_layers, overlap_ratio=config.crop_overlap, points_per_crop=1
    )[0]
    # boxes come layer by layer: 1, 4, 16, ... crops
    layers = [layer for layer in range(config.crop_layers + 1) for _ in range(4**layer)]
    return [([int(v) for v in box], layer) for box, layer in zip(boxes.tolist(), layers)]


def stability_score(logits: torch.Tensor, offset: float = 1.0, threshold: float = 0.0) -> torch.Tensor:
    """SAM's stability score of (..., H, W) logits: the IoU of the masks at ``threshold`` +/- ``offset`` (one lies
    inside the other, so the IoU is the ratio of their areas); 0 for a mask empty at the lower threshold."""
    inner = (logits > threshold + offset).flatten(-2).sum(-1)
    outer = (logits > threshold - offset).flatten(-2).sum(-1)
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner, dtype=torch.float))


def point_grid(per_side: int, width: int, height: int) -> np.ndarray:
    """(per_side², 2) clicks [x, y] at the centres of a per_side x per_side grid over a width x height crop."""
    steps = (np.arange(per_side) + 0.5) / per_side
    xs, ys = np.meshgrid(steps * width, steps * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def dedup(rles: list[dict], order: list[int], iou: float) -> list[int]:
    """Greedy non-maximum suppression on masks: in ``order`` (best first), keep each mask whose mask IoU with every
    kept one is at most ``iou``; returns the kept indices in that order. pycocotools computes the IoU on RLEs."""
    if not rles:
        return []
    ranked = [rles[k] for k in order]
    overlaps = np.asarray(mask_utils.iou(ranked, ranked, [0] * len(ranked))).reshape(len(ranked), len(ranked))
    kept: list[int] = []
    for position in range(len(ranked)):
        if not kept or overlaps[position, kept].max() <= iou:
            kept.append(position)
    return [order[position] for position in kept]


def _near_crop_edge(box: np.ndarray, crop: list[int], height: int, width: int) -> bool:
    """SAM's rule: the mask's XYXY box (image pixels) comes within EDGE_TOLERANCE of an edge of the crop that is
    not an edge of the image: the object is cut off there."""
    crop_edges, image_edges = np.array(crop, float), np.array([0, 0, width, height], float)
    near_crop = np.isclose(box, crop_edges, atol=EDGE_TOLERANCE, rtol=0)
    near_image = np.isclose(box, image_edges, atol=EDGE_TOLERANCE, rtol=0)
    return bool((near_crop & ~near_image).any())


def _encode(masks: np.ndarray) -> list[dict]:
    """pycocotools RLEs of (N, H, W) bool masks."""
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _compressed(segmentation: dict) -> dict:
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_in_image(mask: np.ndarray, x0: int, y0: int, height: int, width: int, transposed: bool = False) -> dict:
    """pycocotools RLE of an (h, w) mask placed at (x0, y0) in an all-false (height, width) image, without building
    the whole image: the column strip it lies in is run-length coded, then the empty columns on both sides are
    added to the first and last runs (COCO RLE runs down columns, starting with a run of zeros). ``transposed``:
    ``mask`` is given as (w, h), already in column order (no strided copy of a 12 MP mask)."""
    columns = mask if transposed else mask.T
    w, h = columns.shape
    strip = np.zeros((w, height), dtype=bool)
    strip[:, y0 : y0 + h] = columns
    flat = strip.ravel()  # the strip's pixels in COCO's column-major order
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    counts[0] += x0 * height
    after = (width - x0 - w) * height
    if after:
        if flat[-1]:
            counts.append(after)
        else:
            counts[-1] += after
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


@torch.no_grad()
def _crop_candidates(
    model, processor, encoded: Encoded, crop_size: tuple[int, int], per_side: int, config, device, hq, bar
) -> tuple[list[_Candidate], tuple[int, int]]:
    """The masks of one encoded crop that pass the score, stability and emptiness filters, at the working
    resolution (the crop, at most the model's input side long), and that resolution."""
    crop_h, crop_w = crop_size
    side = max(encoded.inputs["pixel_values"].shape[-2:])
    factor = min(1.0, side / max(crop_h, crop_w))
    work = (max(1, round(crop_h * factor)), max(1, round(crop_w * factor)))
    grid = point_grid(per_side, crop_w, crop_h)
    options = forward_options(model, hq)
    rows = max(1, WORK_BYTES // (4 * work[0] * work[1]))  # masks upscaled at once
    found: list[_Candidate] = []
    for start in range(0, len(grid), config.points_per_batch):
        points = torch.tensor(grid[start : start + config.points_per_batch], dtype=torch.float32)
        count = len(points)
        result = model(
            **encoded.features,
            input_points=(points * encoded.scale)[None, :, None].to(device),
            input_labels=torch.ones(1, count, 1, dtype=torch.long, device=device),
            multimask_output=True,
            **options,
        )
        logits = result.pred_masks[0].float().flatten(0, 1)  # (count * masks, h, w), upscaled where they are
        scores = result.iou_scores[0].float().cpu().flatten()
        per_point = logits.shape[0] // count
        for index in torch.nonzero(scores > config.min_score).flatten().split(rows):
            upscaled = post_process_masks(
                processor,
                logits[index.to(logits.device)][None, :, None],
                torch.tensor([work]),
                encoded.inputs.get("reshaped_input_sizes"),
                binarize=False,
            )[0][:, 0]
            stability = stability_score(upscaled, config.stability_offset).cpu()
            keep = (stability > config.min_stability) & (upscaled > 0).flatten(1).any(1).cpu()
            if not keep.any():
                continue
            rles = _encode((upscaled[keep.to(upscaled.device)] > 0).cpu().numpy())
            for k, rle in zip(torch.nonzero(keep).flatten().tolist(), rles):
                row = int(index[k])
                x, y = grid[start + row // per_point]
                # a copy: a view would keep the whole batch's logits alive
                found.append(
                    _Candidate(float(scores[row]), float(stability[k]), rle, logits[row].cpu().clone(), (x, y))
                )
        bar.update(1)
    return found, work


@torch.no_grad()
def automatic_masks(
    model,
    processor,
    image: np.ndarray,
    device,
    config: AutomaticConfig | None = None,
    crop_boxes: list[list[int]] | None = None,
    hq_token_only: bool = False,
    progress: bool = True,
) -> list[AutoMask]:
    """Automatic masks of an (H, W, 3) uint8 image (see the module's docstring), best predicted IoU first.

    ``crop_boxes``: [x0, y0, x1, y1] regions (x1, y1 exclusive) to run on instead of the whole image and
    ``config.crop_layers``' crops, each with ``config.points_per_side``² clicks (tiles of a very large image,
    or one region of interest); masks touching a region's edge inside the image are dropped, and across regions
    the smaller region's mask wins.
    """
    config = (config or AutomaticConfig()).check()
    height, width = image.shape[:2]
    if crop_boxes is None:
        crops = crop_layers(image, config)
    else:
        crops = [([int(v) for v in box], 0) for box in crop_boxes]
        for box, _ in crops:
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise UserError(f"crop box {box} is not [x0, y0, x1, y1] inside the {width}x{height} image")
    per_side = [max(1, int(config.points_per_side / config.crop_points_downscale**layer)) for _, layer in crops]
    chunks = sum(math.ceil(n * n / config.points_per_batch) for n in per_side)
    kept: list[AutoMask] = []
    with tqdm(total=chunks, desc="automatic masks", unit="batch", leave=False, disable=not progress) as bar:
        for (box, _), points in zip(crops, per_side):
            kept += _crop_masks(model, processor, image, box, points, config, device, hq_token_only, bar)
    if len(crops) > 1:  # the smaller crop's mask first (seen at a higher resolution), then the better one
        area = [(m.crop_box[2] - m.crop_box[0]) * (m.crop_box[3] - m.crop_box[1]) for m in kept]
        order = sorted(range(len(kept)), key=lambda k: (area[k], -kept[k].score))
        kept = [kept[k] for k in dedup([_compressed(m.segmentation) for m in kept], order, config.crop_dedup_iou)]
    return sorted(kept, key=lambda m: -m.score)


def _crop_masks(model, processor, image, box, per_side, config, device, hq, bar) -> list[AutoMask]:
    """The kept masks of one crop, at the original resolution."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    encoded = encode_image(model, processor, crop, device)
    candidates, work = _crop_candidates(model, processor, encoded, crop.shape[:2], per_side, config, device, hq, bar)
    order = sorted(range(len(candidates)), key=lambda k: -candidates[k].score)
    survivors = [candidates[k] for k in dedup([c.rle for c in candidates], order, config.dedup_iou)]
    scale = np.array([(x1 - x0) / work[1], (y1 - y0) / work[0]] * 2)
    whole = box == [0, 0, width, height]
    reshaped = encoded.inputs.get("reshaped_input_sizes")
    reshaped_t = None if reshaped is None else reshaped.flip(-1)
    out = []
    for candidate in survivors:
        x, y, w, h = mask_utils.toBbox(candidate.rle)  # working pixels
        corners = np.array([x, y, x + w, y + h]) * scale + [x0, y0, x0, y0]
        if not whole and _near_crop_edge(corners, box, height, width):
            continue
        if whole and work == (height, width):  # worked at the original size already
            rle = candidate.rle
        else:
            # upscaled transposed (the padded frame is square: the same bilinear weights), so the mask comes out
            # in COCO's column order
            columns = post_process_masks(
                processor, candidate.logits.mT[None, None, None], torch.tensor([[x1 - x0, y1 - y0]]), reshaped_t
            )[0][0, 0]
            rle = rle_in_image(columns.numpy(), x0, y0, height, width, transposed=True)
        area = int(mask_utils.area(rle))
        if not area:
            continue
        out.append(
            AutoMask(
                segmentation={"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                bbox=[float(v) for v in mask_utils.toBbox(rle)],
                area=area,
                score=candidate.score,
                stability=candidate.stability,
                point=[float(candidate.point[0] + x0), float(candidate.point[1] + y0)],
                crop_box=list(box),
                logits=candidate.logits if whole else None,
            )
        )
    return out


@torch.no_grad()
def score_split(
    model,
    processor,
    source: CocoInstanceDataset,
    annotation_file: str | Path,
    device: str = "cpu",
    config: AutomaticConfig | None = None,
    precision: str = "fp32",
    hq_token_only: bool = False,
    regions: Callable[[int, int], list[list[int]]] | None = None,
) -> tuple[dict, list[dict]]:
    """``evaluate --automatic``: automatic masks of every image of a COCO split scored against all its
    annotations, class-agnostic (COCO AP / AR, ``samtune.evaluation.coco_metrics``), with the masks per image and
    the seconds per image (encoder and masks together); and the COCO results entries. ``regions(height, width)``:
    the crop boxes of an image of that size (tiles, say) in place of the whole image and its crop layers."""
    autocast = inference.autocast(device, precision)
    model.to(device).eval()
    results: list[dict] = []
    seconds: list[float] = []
    for number in tqdm(range(len(source)), desc="eval (automatic)", unit="image", leave=False):
        sample = source.sample(number)
        start = time.perf_counter()
        crops = None if regions is None else regions(*sample["image"].shape[:2])
        with autocast:
            found = automatic_masks(model, processor, sample["image"], device, config, crops, hq_token_only, False)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        name = source.images[number].file_name
        results += [coco_entry(mask, int(sample["image_id"]), name, k) for k, mask in enumerate(found)]
    metrics = {
        "coco": coco_metrics(annotation_file, results, class_agnostic=True),
        "num_images": len(source),
        "masks_per_image": len(results) / max(1, len(source)),
        "seconds_per_image": {"median": float(np.median(seconds)), "p90": float(np.percentile(seconds, 90))}
        if seconds
        else {"median": float("nan"), "p90": float("nan")},
    }
    return metrics, results


def format_scores(columns: dict[str, dict]) -> str:
    """``score_split`` metrics as percentages, one column per evaluated model."""
    names = list(columns)
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'automatic masks':<16}" + "".join(f"{n:>{width}}" for n in names)]
    for key in ("AP", "AP50", "AP75", "AR10", "AR100", "AR1000"):
        lines.append(f"{key:<16}" + "".join(f"{100 * columns[n]['coco'][key]:>{width}.2f}" for n in names))
    lines.append(f"{'masks / image':<16}" + "".join(f"{columns[n]['masks_per_image']:>{width}.1f}" for n in names))
    lines.append(
        f"{'s / image':<16}" + "".join(f"{columns[n]['seconds_per_image']['median']:>{width}.2f}" for n in names)
    )
    return "\n".join(lines) + f"\nclass-agnostic COCO AP / AR over {columns[names[0]]['num_images']} images"
