"""Masks for new images, as a COCO results file (RLE at the original image size, predicted IoU as score).

    python -m samtune.predict --model facebook/sam-vit-base [--adapter runs/x/best] --images photos/ \
        [--prompts prompts.json | --coco detections.json] [--output masks.json] [--overlays overlays/] \
        [--precision fp32|bf16|fp16] [--no-fast-encoder]

Prompts, per image file name (relative to --images, or the file's name when --images is one file):

    {"a.jpg": [[x0, y0, x1, y1], ...]}                                  boxes only
    {"a.jpg": {"boxes": [[x0, y0, x1, y1]], "points": [[x, y], ...]}}   boxes and / or single points

Each box and each point is one prompt (a point alone yields SAM's best of three masks). With --coco the
boxes are the annotations' bbox fields (a detector's output in COCO format, say). Without prompts, masks are
generated automatically from a grid of points (--points-per-side), kept by predicted IoU and stability,
and de-duplicated by mask overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from samtune import inference
from samtune.data.images import read_rgb
from samtune.errors import UserError, run_command
from samtune.evaluation import encode_rle
from samtune.models.family import decoder_inputs, forward_options, image_features, post_process_masks
from samtune.models.loading import load_trained
from samtune.visualize import paint

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


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


def read_prompts(path: Path) -> dict[str, dict]:
    """{file_name: {"boxes": [...], "points": [...]}} from the small prompt JSON."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object mapping file names to prompts")
    out = {}
    for name, value in data.items():
        value = {"boxes": value} if isinstance(value, list) else value
        if not isinstance(value, dict) or not set(value) <= {"boxes", "points"}:
            raise UserError(f"{path}: prompts of {name!r} must be a list of boxes or {{'boxes', 'points'}}")
        for box in value.get("boxes", []):
            if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
                raise UserError(f"{path}: {name!r}: box {box} is not [x0, y0, x1, y1] with x0 <= x1, y0 <= y1")
        for point in value.get("points", []):
            if len(point) != 2:
                raise UserError(f"{path}: {name!r}: point {point} is not [x, y]")
        out[name] = value
    return out


def prompts_from_coco(path: Path) -> tuple[dict[str, dict], dict[str, int], dict[str, list[int]]]:
    """Boxes from a COCO file's bbox fields, with image ids and category ids to carry into the results."""
    data = _read_json(path)
    try:
        names = {image["id"]: image["file_name"] for image in data["images"]}
    except (KeyError, TypeError) as error:
        raise UserError(f"{path}: every entry of 'images' needs 'id' and 'file_name' ({error!r})") from error
    prompts: dict[str, dict] = {name: {"boxes": []} for name in names.values()}
    categories: dict[str, list[int]] = {name: [] for name in names.values()}
    for ann in data.get("annotations", []):
        if "bbox" not in ann or ann.get("image_id") not in names:
            raise UserError(f"{path}: annotation {ann.get('id')} needs a 'bbox' and the id of an image in the file")
        x, y, w, h = ann["bbox"]
        name = names[ann["image_id"]]
        prompts[name]["boxes"].append([x, y, x + max(w - 1, 0), y + max(h - 1, 0)])  # inclusive corners
        categories[name].append(ann.get("category_id", 1))
    return prompts, {name: image_id for image_id, name in names.items()}, categories


@torch.no_grad()
def prompted_masks(
    model, processor, image: np.ndarray, boxes: list, points: list, device, hq_token_only: bool = False
) -> list[tuple]:
    """(mask at original size, score) per prompt: boxes first, then points."""
    out = []
    features = None  # the image encoder runs once per image, for boxes and points alike
    for kind, prompts in (("boxes", boxes), ("points", points)):
        if not prompts:
            continue
        if kind == "boxes":
            inputs = processor(images=image, input_boxes=[prompts], return_tensors="pt")
            args = {"input_boxes": inputs["input_boxes"].float().to(device)}
        else:
            inputs = processor(
                images=image,
                input_points=[[[p] for p in prompts]],
                input_labels=[[[1] for _ in prompts]],
                return_tensors="pt",
            )
            args = {
                "input_points": inputs["input_points"].float().to(device),
                "input_labels": inputs["input_labels"].to(device),
            }
        if features is None:
            features = image_features(model, inputs["pixel_values"].to(device))
        result = model(
            **decoder_inputs(model, features),
            multimask_output=kind == "points",
            **forward_options(model, hq_token_only),
            **args,
        )
        scores, best = result.iou_scores[0].float().max(dim=-1)
        logits = result.pred_masks[0][torch.arange(len(prompts)), best][None, :, None].float()
        masks = post_process_masks(
            processor, logits.cpu(), inputs["original_sizes"], inputs.get("reshaped_input_sizes")
        )
        out += [(masks[0][k, 0], float(scores[k])) for k in range(len(prompts))]
    return out


@torch.no_grad()
def automatic_masks(
    model,
    processor,
    image: np.ndarray,
    device,
    points_per_side: int = 16,
    iou_threshold: float = 0.8,
    stability_threshold: float = 0.9,
    overlap: float = 0.7,
    batch: int = 64,
    hq_token_only: bool = False,
) -> list[tuple]:
    """SAM's automatic mask generation, in its simplest form: a point grid, filters, greedy mask NMS."""
    height, width = image.shape[:2]
    steps = (np.arange(points_per_side) + 0.5) / points_per_side
    grid = [[float(x * width), float(y * height)] for y in steps for x in steps]
    inputs = processor(images=image, return_tensors="pt")
    features = image_features(model, inputs["pixel_values"].to(device))
    candidates = []
    for start in range(0, len(grid), batch):
        chunk = grid[start : start + batch]
        prompt = processor(
            images=image, input_points=[[[p] for p in chunk]], input_labels=[[[1] for _ in chunk]], return_tensors="pt"
        )
        result = model(
            **decoder_inputs(model, features),
            input_points=prompt["input_points"].float().to(device),
            input_labels=prompt["input_labels"].to(device),
            multimask_output=True,
            **forward_options(model, hq_token_only),
        )
        logits = result.pred_masks[0].float()  # (N, 3, h, w)
        scores = result.iou_scores[0].float()
        stability = (logits > 1).flatten(2).sum(-1) / (logits > -1).flatten(2).sum(-1).clamp(min=1)
        keep = (scores > iou_threshold) & (stability > stability_threshold)
        for n, m in torch.nonzero(keep).tolist():
            candidates.append((float(scores[n, m]), logits[n, m]))
    candidates.sort(key=lambda c: -c[0])
    kept: list[tuple] = []
    for score, logits in candidates:
        mask = post_process_masks(
            processor, logits[None, None, None].cpu(), inputs["original_sizes"], inputs.get("reshaped_input_sizes")
        )[0][0, 0]
        if not mask.any():
            continue
        if all((mask & other).sum() / (mask | other).sum() <= overlap for other, _ in kept):
            kept.append((mask, score))
    return kept


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--images", required=True, type=Path, help="an image file or a folder (searched recursively)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path, help="prompt JSON (see above)")
    source.add_argument("--coco", type=Path, help="COCO file whose annotation boxes are the prompts")
    parser.add_argument("--points-per-side", type=int, default=16, help="grid for automatic masks")
    parser.add_argument("--min-score", type=float, default=0.8, help="automatic masks: least predicted IoU")
    parser.add_argument("--min-stability", type=float, default=0.9, help="automatic masks: least stability")
    parser.add_argument("--output", type=Path, default=Path("predictions.json"))
    parser.add_argument("--overlays", type=Path, help="folder for PNG overlays of the masks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inference.add_arguments(parser)
    args = parser.parse_args(argv)

    if args.output and not args.output.resolve().parent.is_dir():  # found now, not after the work
        raise UserError(f"--output {args.output}: its folder {args.output.parent} does not exist")
    autocast = inference.autocast(args.device, args.precision)
    image_ids, categories = {}, {}
    prompts = None
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.coco:
        prompts, image_ids, categories = prompts_from_coco(args.coco)
    files = list_images(args.images)
    if not files:
        raise UserError(f"--images {args.images}: no image files there ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if prompts is not None:
        missing = sorted(set(prompts) - {name for name, _ in files})
        if missing:
            raise UserError(f"prompts name images not under {args.images}: {', '.join(missing[:5])}")
        files = [(name, path) for name, path in files if name in prompts]
    # the inputs are checked: now the model (slow for large ones)
    model, processor = load_trained(args.model, args.adapter, fast_encoder=args.fast_encoder, compile=args.compile)
    model.to(args.device)
    results = []
    for number, (name, path) in enumerate(tqdm(files, desc="predict", unit="image"), start=1):
        image = read_rgb(path)
        if prompts is None:
            with autocast:
                found = automatic_masks(
                    model,
                    processor,
                    image,
                    args.device,
                    args.points_per_side,
                    args.min_score,
                    args.min_stability,
                    hq_token_only=args.hq_token_only,
                )
            labels = [1] * len(found)
        else:
            entry = prompts[name]
            with autocast:
                found = prompted_masks(
                    model,
                    processor,
                    image,
                    entry.get("boxes", []),
                    entry.get("points", []),
                    args.device,
                    args.hq_token_only,
                )
            labels = categories.get(name) or [1] * len(found)
        for (mask, score), category in zip(found, labels):
            ys, xs = np.nonzero(mask.numpy())
            box = (
                [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
                if len(xs)
                else [0.0, 0.0, 0.0, 0.0]
            )
            results.append(
                {
                    "image_id": image_ids.get(name, number),
                    "file_name": name,
                    "category_id": category,
                    "segmentation": encode_rle(mask),
                    "bbox": box,
                    "score": score,
                }
            )
        if args.overlays:
            target = args.overlays / f"{Path(name).with_suffix('')}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            masks = np.stack([m.numpy() for m, _ in found]) if found else np.zeros((0, *image.shape[:2]), bool)
            Image.fromarray(paint(image, masks)).save(target)
    args.output.write_text(json.dumps(results))
    print(f"{len(results)} masks for {len(files)} images -> {args.output}")
    return results


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune predict"))
