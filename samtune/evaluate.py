"""Evaluate a SAM model (+ adapter) on a COCO split, per instance at the original image resolution.

    python -m samtune.evaluate --model facebook/sam-vit-base [--adapter runs/x/best] \
        --annotations val.json --images images/ [--prompt box] [--coco] [--output results.json] \
        [--precision fp32|bf16|fp16] [--no-fast-encoder] [--clicks K]

Zero-shot is the same command without --adapter; --compare-base also scores the base alone and prints both.
The metrics are the training loop's own (samtune.evaluation): mIoU / mF1 are means over instances,
mIoU_image / mF1_image means over images of their per-image means. JSON holds fractions; the printed table
percentages. Latency is per image, image encoder and decoder timed apart (CUDA events on a GPU, a monotonic
clock on a CPU), the first batch excluded as warm-up. ``--clicks K`` also follows the click protocol
(samtune.click_protocol): K correction clicks after the first prompt, the mIoU after each, NoC85 / NoC90.
``--automatic`` scores masks made without prompts (samtune.automatic_masks, SAM's defaults, the same flags as
predict) against all annotations, class-agnostic: COCO AP / AP50 / AP75 at 1000 masks an image, AR10 / AR100 /
AR1000; --output also gets the masks (*.automatic.json beside it). ``--overlays DIR`` draws the first
--overlay-count images: the ground truth beside each evaluated model's masks (zero-shot | fine-tuned with
--compare-base or --baseline), outlined, with categories and IoUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

import torch

from samtune import inference
from samtune.automatic_masks import add_arguments as add_automatic_arguments
from samtune.automatic_masks import config_from, format_scores, score_split
from samtune.click_protocol import follow_clicks, summarize
from samtune.config import DataConfig, PromptMode
from samtune.data.batch import to_device
from samtune.data.coco import SKIP_REASONS, CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, make_loader
from samtune.errors import UserError, run_command
from samtune.evaluation import aggregate, coco_metrics, detections, sam_forward, score_loader
from samtune.models.family import image_features
from samtune.models.loading import load_trained
from samtune.tiled_evaluation import evaluate_tiled
from samtune.tiling import add_tile_arguments, tiling_of
from samtune.visualize import evaluation_overlays


class _TimedForward:
    """The shared forward (``samtune.evaluation.sam_forward``) with the image encoder and the decoder timed apart,
    per image; the first ``warmup`` batches warm up kernels and caches and are not timed."""

    def __init__(self, model, device: torch.device, autocast, warmup: int, hq_token_only: bool = False) -> None:
        self.model, self.device, self.autocast, self.warmup = model, device, autocast, warmup
        self.hq_token_only = hq_token_only
        self.clock = inference.Clock(device)
        self.encoder_ms: list[float] = []
        self.decoder_ms: list[float] = []
        self.last: tuple = ()  # the last batch on the device and its image features (for the click protocol)

    def __call__(self, batch):
        batch = to_device(batch, self.device)
        with self.autocast:
            start = self.clock.mark()
            features = image_features(self.model, batch["pixel_values"])
            middle = self.clock.mark()
            outputs = sam_forward(self.model, batch, features=features, hq_token_only=self.hq_token_only)
            end = self.clock.mark()
        self.last = (batch, features)
        if self.warmup:
            self.warmup -= 1
        else:
            images = batch["pixel_values"].shape[0]
            self.encoder_ms.append(1000 * self.clock.seconds(start, middle) / images)
            self.decoder_ms.append(1000 * self.clock.seconds(middle, end) / images)
        return outputs


@torch.no_grad()
def evaluate_split(
    model,
    processor,
    dataset: SamPromptDataset,
    batch_size: int = 1,
    device: str = "cpu",
    num_workers: int = 0,
    with_rle: bool = False,
    precision: str = "fp32",
    hq_token_only: bool = False,
    clicks: int = 0,
) -> tuple[dict, list[dict]]:
    """Metrics, latency and (with ``with_rle``) COCO detections of ``model`` on an evaluation dataset.

    ``precision``: the model runs under that autocast (samtune.inference); masks are scored in fp32.
    ``clicks``: also the click protocol's ``clicks`` entry, its rounds on the plain evaluation's image features
    and first outputs (untimed: latency stays the plain forward's).
    """
    autocast = inference.autocast(device, precision)
    device = torch.device(device)
    model.to(device).eval()
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    forward = _TimedForward(model, device, autocast, warmup=1 if len(loader) > 1 else 0, hq_token_only=hq_token_only)
    click_records: list[dict] = []

    def follow(_batch, outputs) -> None:
        batch, features = forward.last
        with autocast:
            run = follow_clicks(model, batch, processor, clicks, features, outputs, hq_token_only)
        click_records.extend(run.records)

    records = score_loader(loader, forward, processor, with_rle=with_rle, on_batch=follow if clicks else None)
    metrics = aggregate(records, dataset.source.categories)
    if clicks:
        metrics["clicks"] = summarize(click_records, clicks)
    metrics["latency"] = inference.latency(model, device, batch_size, precision, forward.encoder_ms, forward.decoder_ms)
    return metrics, records


def skipped_counts(source: CocoInstanceDataset) -> dict:
    index = source.index
    out = {SKIP_REASONS[key]: count for key, count in index.skipped.items() if key in SKIP_REASONS and count}
    empty = sum(1 for image in index.images if not image.instances)
    if empty:
        out["images without instances (nothing to prompt)"] = empty
    return out


def format_table(columns: dict[str, dict]) -> str:
    """Metrics as percentages, one column per evaluated model."""
    names = list(columns)
    width = max(14, *(len(n) + 2 for n in names))
    categories = sorted({c for n in names for c in columns[n]["per_category"]})
    label = max(16, *(len(category) + 4 for category in categories)) if categories else 16  # long names align
    lines = [f"{'':<{label}}" + "".join(f"{n:>{width}}" for n in names)]
    keys = ["mIoU", "mF1", "mIoU_image", "mF1_image"] + (["AP", "AP50", "AP75"] if "coco" in columns[names[0]] else [])
    for key in keys:
        cells = [columns[n].get("coco", {}).get(key, columns[n].get(key)) for n in names]
        lines.append(f"{key:<{label}}" + "".join(f"{100 * c:>{width}.2f}" for c in cells))
    for category in categories:
        cells = [columns[n]["per_category"].get(category, {}).get("mIoU", float("nan")) for n in names]
        lines.append(f"{'  ' + category:<{label}}" + "".join(f"{100 * c:>{width}.2f}" for c in cells))
    first = columns[names[0]]
    latency = first["latency"]
    lines.append(
        f"{first['num_instances']} instances in {first['num_images']} images; per image on "
        f"{latency['device']}, batch {latency['batch_size']}, {latency.get('precision', 'fp32')}"
        f"{'' if latency.get('fast_encoder', True) else ', plain SamModel encoder'}:"
    )
    if "tiling" in latency:
        tiling = latency["tiling"]
        lines.append(
            f"  tiled: {tiling['tile']} px tiles, overlap {tiling['overlap']} px, "
            f"{tiling['windows_per_image']['median']:.0f} windows per image (median), times summed over them"
        )
    for n in names:
        lat = columns[n]["latency"]
        lines.append(
            f"  {n}: image encoder {lat['image_encoder_ms']['median']:.1f} ms (p90 "
            f"{lat['image_encoder_ms']['p90']:.1f}), decoder {lat['decoder_ms']['median']:.1f} ms (p90 "
            f"{lat['decoder_ms']['p90']:.1f})"
        )
    return "\n".join(lines)


def format_clicks(columns: dict[str, dict]) -> str:
    """The click curves as percentages, one line per evaluated model."""
    lines = []
    for name, metrics in columns.items():
        curve, nan = metrics["clicks"], float("nan")
        values = " ".join(f"{100 * v:.2f}" for v in curve["mIoU"])
        lines.append(
            f"{name}: mIoU % after 0..{len(curve['mIoU']) - 1} clicks {values}; "
            f"NoC85 {curve.get('NoC85', nan):.2f}, NoC90 {curve.get('NoC90', nan):.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id, model folder (any SAM family) or original checkpoint")
    parser.add_argument("--adapter", help="PEFT adapter folder trained on --model")
    parser.add_argument("--annotations", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--prompt", default="box", choices=get_args(PromptMode))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-instances", type=int, default=64, help="prompts per decoder call (chunks)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    inference.add_arguments(parser)
    parser.add_argument("--coco", action="store_true", help="also COCO results file + COCOeval segm AP")
    parser.add_argument("--compare-base", action="store_true", help="also evaluate --model without the adapter")
    parser.add_argument("--baseline", help="also evaluate this model (e.g. the base of a full / decoder run)")
    parser.add_argument("--output", type=Path, help="results JSON (COCO results go beside it: *.segm.json)")
    parser.add_argument(
        "--clicks", type=int, default=0, help="also K correction clicks after the prompt: mIoU per click, NoC85/90"
    )
    add_tile_arguments(parser)
    parser.add_argument(
        "--automatic", action="store_true", help="score masks made without prompts: class-agnostic COCO AP / AR"
    )
    add_automatic_arguments(parser)
    parser.add_argument("--overlays", type=Path, help="PNGs: ground truth | each model's masks, per image")
    parser.add_argument("--overlay-count", type=int, default=8, help="images drawn with --overlays (8)")
    args = parser.parse_args(argv)
    if args.automatic and args.clicks:
        raise UserError("--automatic with --clicks: automatic masks have no prompt to correct; drop one of the two")
    tiling = tiling_of(args)
    if tiling is not None and args.clicks:
        raise UserError("--clicks with --tile: the click protocol runs on whole images; drop one of the two")
    if args.clicks < 0:
        raise UserError(f"--clicks {args.clicks}: the number of correction clicks is at least 0 (0: off)")
    if args.overlays and args.overlay_count < 1:
        raise UserError(f"--overlay-count {args.overlay_count}: draw at least 1 image (or leave out --overlays)")

    if args.output and not args.output.resolve().parent.is_dir():  # found now, not after the work
        raise UserError(f"--output {args.output}: its folder {args.output.parent} does not exist")
    source = CocoInstanceDataset(args.annotations, args.images)
    runs = {"fine-tuned" if args.adapter or args.baseline else "model": (args.model, args.adapter)}
    if args.baseline:
        runs = {"zero-shot": (args.baseline, None), **runs}
    elif args.compare_base and args.adapter:
        runs = {"zero-shot": (args.model, None), **runs}
    columns, results, drawn = {}, {}, {}
    for name, (weights, adapter) in runs.items():
        model, processor = load_trained(
            weights,
            adapter,
            attn_implementation=args.attn_implementation,
            fast_encoder=args.fast_encoder,
            compile=args.compile,
        )
        if args.automatic:
            metrics, found = score_split(
                model,
                processor,
                source,
                args.annotations,
                args.device,
                config_from(args).check(),
                args.precision,
                args.hq_token_only,
                regions=None if tiling is None else tiling.regions,
            )
            metrics.update(model=weights, adapter=adapter, annotations=str(args.annotations), prompt="automatic")
            if args.output:
                path = args.output.with_name(f"{args.output.stem}.{name}.automatic.json")
                path.write_text(json.dumps(found))
                metrics["coco"]["results_file"] = str(path)
            columns[name] = results[name] = metrics
            drawn[name] = found
            continue
        if tiling is not None:
            metrics, records = evaluate_tiled(
                model,
                processor,
                source,
                tiling,
                args.prompt,
                args.device,
                args.coco or bool(args.overlays),
                args.precision,
                args.hq_token_only,
            )
        else:
            data = DataConfig(prompt=args.prompt, max_instances=args.max_instances)
            dataset = SamPromptDataset(source, processor, data, train=False)
            metrics, records = evaluate_split(
                model,
                processor,
                dataset,
                args.batch_size,
                args.device,
                args.num_workers,
                args.coco or bool(args.overlays),  # the masks themselves, to draw
                args.precision,
                args.hq_token_only,
                args.clicks,
            )
        metrics.update(
            model=weights,
            adapter=adapter,
            annotations=str(args.annotations),
            prompt=args.prompt,
            skipped=skipped_counts(source),
        )
        if args.coco:
            found = detections(records)
            metrics["coco"] = coco_metrics(args.annotations, found)
            if args.output:
                path = args.output.with_name(f"{args.output.stem}.{name}.segm.json")
                path.write_text(json.dumps(found))
                metrics["coco"]["results_file"] = str(path)
        columns[name] = metrics
        results[name] = metrics
        drawn[name] = records
    print(format_scores(columns) if args.automatic else format_table(columns))
    if args.clicks:
        print(format_clicks(columns))
    if not_scored := skipped_counts(source):
        print("not scored: " + "; ".join(f"{count} {why}" for why, count in not_scored.items()))
    if args.overlays:
        written = evaluation_overlays(args.overlays, source, drawn, args.overlay_count)
        print(f"overlays of {len(written)} images -> {args.overlays}")
    out = results if len(results) > 1 else next(iter(results.values()))
    if args.output:
        args.output.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune evaluate"))
