"""``samtune evaluate --tile SIZE --overlap PX``: a COCO split scored with tiled inference (``samtune.tiling``).

The prompts are the plain evaluation's (``samtune.data.prompts``: the tight box, the interior point farthest
from the boundary), made on the whole image; each goes to its window, and each predicted mask is pasted back
into the whole image and scored there by the one metric function (``samtune.evaluation.instance_iou_f1``),
crowd pixels ignored: the numbers mean what the untiled ones mean. One image is in memory at a time (its
pixels, its instance masks); the model sees one window at a time.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from samtune import inference
from samtune.config import DataConfig
from samtune.data.coco import CocoInstanceDataset
from samtune.data.prompts import make_prompts
from samtune.errors import UserError
from samtune.evaluation import aggregate, encode_rle, instance_iou_f1
from samtune.predict import Instance, decode_prompts, encode_image, in_window, windows_of
from samtune.tiling import Tiling, Window


def instances_of(masks: np.ndarray, prompt: str) -> list[Instance]:
    """The evaluation prompts of K masks (K, H, W) as predict's instances (original pixels)."""
    if prompt == "none":
        raise UserError("--tile needs prompts: --prompt none (one mask for the union of all objects) cannot be tiled")
    prompts = make_prompts(masks, DataConfig(prompt=prompt), rng=None)
    instances = []
    for k in range(len(masks)):
        box = prompts["boxes"][k].tolist() if "boxes" in prompts else None
        points = prompts["points"][k].tolist() if "points" in prompts else []
        labels = prompts["point_labels"][k].tolist() if "point_labels" in prompts else []
        instances.append(Instance(id=k, box=box, points=points, labels=labels))
    return instances


@torch.no_grad()
def evaluate_tiled(
    model,
    processor,
    source: CocoInstanceDataset,
    tiling: Tiling,
    prompt: str = "box",
    device: str = "cpu",
    with_rle: bool = False,
    precision: str = "fp32",
    hq_token_only: bool = False,
) -> tuple[dict, list[dict]]:
    """Metrics, latency and (with ``with_rle``) COCO detections of ``model`` on ``source``, tiled.

    Latency is per image: the encoder summed over the windows it ran on, the decoder likewise; the first
    image warms up and is not timed.
    """
    autocast = inference.autocast(device, precision)
    device = torch.device(device)
    model.to(device).eval()
    clock = inference.Clock(device)
    records: list[dict] = []
    encoder_ms, decoder_ms, windows_per_image = [], [], []
    for number in tqdm(range(len(source)), desc="eval (tiled)", unit="image", leave=False):
        sample = source.sample(number)
        masks = sample["masks"]
        if not len(masks):
            continue
        height, width = sample["size"]
        instances = instances_of(masks, prompt)
        windows = windows_of(instances, tiling, height, width)
        encoding = decoding = 0.0
        ignore = sample["ignore"]
        extents = [Window.around(mask) for mask in masks]
        for window, members in windows.items():
            with autocast:
                start = clock.mark()
                encoded = encode_image(model, processor, np.ascontiguousarray(window.crop(sample["image"])), device)
                middle = clock.mark()
                found = decode_prompts(
                    model, processor, encoded, in_window(window, [instances[k] for k in members]), device, hq_token_only
                )
                end = clock.mark()
            encoding += clock.seconds(start, middle)
            decoding += clock.seconds(middle, end)
            for k, item in zip(members, found):
                # scored where the prediction or the truth can be true: the same numbers as on the whole image
                region = window.union(extents[k])
                predicted = torch.from_numpy(region.paste_from(window, item.mask.numpy()))
                truth = torch.from_numpy(np.ascontiguousarray(region.crop(masks[k])))
                iou, f1 = instance_iou_f1(predicted[None], truth[None], torch.from_numpy(region.crop(ignore)))
                record = {
                    "image_id": int(sample["image_id"]),
                    "annotation_id": int(sample["annotation_ids"][k]),
                    "category_id": int(sample["category_ids"][k]),
                    "iou": float(iou[0]),
                    "f1": float(f1[0]),
                }
                if with_rle:
                    record["segmentation"] = encode_rle(
                        torch.from_numpy(window.paste(item.mask.numpy(), height, width))
                    )
                    record["score"] = item.score
                records.append(record)
        windows_per_image.append(len(windows))
        if len(windows_per_image) > 1 or len(source) == 1:
            encoder_ms.append(1000 * encoding)
            decoder_ms.append(1000 * decoding)
    metrics = aggregate(records, source.categories)
    metrics["latency"] = inference.latency(model, device, 1, precision, encoder_ms, decoder_ms)
    metrics["latency"]["tiling"] = {
        "tile": tiling.size,
        "overlap": tiling.overlap,
        "windows_per_image": inference.summary(windows_per_image),
    }
    return metrics, records
