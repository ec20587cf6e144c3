"""Automatic masks (``samtune predict`` without prompts): the previous hand-rolled implementation against
``samtune.automatic_masks``, side by side on the same synthetic photo, model and thresholds.

    python benchmarks/automatic_masks.py [--model samtune/demo/base] [--sizes 768x1024 3000x4000]
        [--points-per-side 16] [--min-score 0.7] [--min-stability 0.8] [--repeats 1] [--threads N] [--json out.json]
    python benchmarks/automatic_masks.py --quick --json out.json   # what the tests run

The photo is the demo's source domain (clean objects on a smooth background, ``samtune.demo.domains``), drawn at
256 px and resized to each ``--sizes`` HxW. The model defaults to the shipped demo base (trained: its masks
follow the objects), whose IoU head is not calibrated to SAM's thresholds (0.88, 0.95 pass nothing), hence the
lower defaults here; both implementations get the same ones. Per size, one row: the seconds per image of each
(``previous_*_ms``, ``new_*_ms``: median and p90 over --repeats, after one untimed call of the new one), their
ratio, the mask counts, and how far the masks agree: for each mask of one, its best mask IoU among the other's
(``matched_new`` / ``matched_previous``: shares with a match of IoU >= 0.9, ``mean_best_iou_*``). The image
encoder runs once per call in both (the same cost), so the difference is the mask machinery.

Expected differences: the previous one scored stability on the 256² low-resolution logits (SAM scores the
upscaled ones), so a few borderline masks pass one filter and not the other.
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.automatic_masks import AutomaticConfig, automatic_masks
from samtune.demo.domains import _source_scene
from samtune.evaluation import encode_rle
from samtune.models.family import decoder_inputs, forward_options, image_features, post_process_masks
from samtune.models.loading import load_trained

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"sizes": ["200x256", "480x640"], "points_per_side": 8, "repeats": 1}


@torch.no_grad()
def previous_automatic_masks(
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
) -> list[tuple[torch.Tensor, float]]:
    """samtune.predict.automatic_masks before issue 19, line for line (Found reduced to (mask, score)): stability
    on the low-res logits, the processor re-run on the image per chunk, pairwise IoU of full-size masks."""
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
    kept: list[tuple[torch.Tensor, float]] = []
    for score, logits in candidates:
        mask = post_process_masks(
            processor, logits[None, None, None].cpu(), inputs["original_sizes"], inputs.get("reshaped_input_sizes")
        )[0][0, 0]
        if not mask.any():
            continue
        if all((mask & other).sum() / (mask | other).sum() <= overlap for other, _ in kept):
            kept.append((mask, score))
    return kept


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """The demo's source-domain scene at 256 px, resized (bilinear) to height x width."""
    image, _ = _source_scene(np.random.default_rng(seed), 256)
    small = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.BILINEAR))


def agreement(previous: list[dict], new: list[dict]) -> dict:
    """Best mask IoU of each mask among the other side's, summarised both ways."""
    if not previous or not new:
        return {"matched_new": float(not new), "matched_previous": float(not previous)}
    ious = np.asarray(mask_utils.iou(new, previous, [0] * len(previous))).reshape(len(new), len(previous))
    best_new, best_previous = ious.max(axis=1), ious.max(axis=0)
    return {
        "matched_new": float((best_new >= 0.9).mean()),
        "matched_previous": float((best_previous >= 0.9).mean()),
        "mean_best_iou_new": float(best_new.mean()),
        "mean_best_iou_previous": float(best_previous.mean()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="two small photos, an 8x8 grid, one repeat")
    parser.add_argument("--model", default=str(ROOT / "samtune" / "demo" / "base"), help="model folder or hub id")
    parser.add_argument("--sizes", nargs="+", default=["768x1024", "3000x4000"], help="photo sizes HxW")
    parser.add_argument("--points-per-side", type=int, default=16, help="the previous default (SAM's: 32)")
    parser.add_argument("--min-score", type=float, default=0.7)
    parser.add_argument("--min-stability", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=1)
    args = common.parse(parser, argv, quick=QUICK)
    model, processor = load_trained(args.model, None)
    model.to(args.device).eval()
    config = AutomaticConfig(
        points_per_side=args.points_per_side, min_score=args.min_score, min_stability=args.min_stability
    )
    timer = common.Timer(args.device)
    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        image = photo(height, width)
        out: dict[str, list] = {}

        def new(image=image, out=out) -> None:
            out["new"] = automatic_masks(model, processor, image, args.device, config, progress=False)

        def previous(image=image, out=out) -> None:
            out["previous"] = previous_automatic_masks(
                model, processor, image, args.device, args.points_per_side, args.min_score, args.min_stability
            )

        new_seconds = common.time_calls(new, args.repeats, 1, timer)
        previous_seconds = common.time_calls(previous, args.repeats, 0, timer)
        new_rles = [m.segmentation for m in out["new"]]
        previous_rles = [encode_rle(mask) for mask, _ in out["previous"]]
        for rle in new_rles + previous_rles:
            rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        row = {
            "size": f"{height}x{width}",
            "megapixels": height * width / 1e6,
            **common.timing("previous", previous_seconds),
            **common.timing("new", new_seconds),
            "speedup": float(np.median(previous_seconds) / np.median(new_seconds)),
            "masks_previous": len(previous_rles),
            "masks_new": len(new_rles),
            **agreement(previous_rles, new_rles),
        }
        rows.append(row)
    print(
        f"automatic masks, {Path(args.model).name}, {args.points_per_side}² points, min score {args.min_score}, "
        f"min stability {args.min_stability}, {common.describe(args.device)}"
    )
    print("| photo | previous s | new s | speed-up | masks prev / new | matched (IoU>=0.9) new / prev |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['size']} | {r['previous_median_ms'] / 1000:.2f} | {r['new_median_ms'] / 1000:.2f} | "
            f"{r['speedup']:.1f}x | {r['masks_previous']} / {r['masks_new']} | "
            f"{r['matched_new']:.2f} / {r['matched_previous']:.2f} |"
        )
    common.report(args, rows, model=args.model, points_per_side=args.points_per_side)
    return rows


if __name__ == "__main__":
    main()
