"""The interactive evaluation protocol: the first prompt, then K correction clicks, scored after each.

Per batch, the image encoder runs once. Round 0 is the plain evaluation (the configured first prompt: box,
point or both). Each later round adds, for every instance, one click from ``samtune.clicks.next_click``
(at the original resolution, crowd pixels ignored; none, a ``PAD_LABEL`` point, for an instance without
error), keeps all earlier prompts, gives the previous round's low-resolution logits (the mask with the
highest predicted IoU) as mask prompt, and asks for one mask. Every round is scored like ``score_batch``:
masks by ``post_process_masks``, IoU at the original size without crowd pixels. Nothing is random.

Number of clicks (NoC@t, the interactive-segmentation literature's, RITM / SimpleClick): the first prompt
counts as interaction 1 and correction click k as interaction k + 1, so an instance's NoC@t is 1 + the first
round whose IoU is at least t; an instance that never reaches t within the K clicks counts K + 1 (the cap)
and is a failure (``failed85`` / ``failed90``: the share of such instances).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from samtune.clicks import next_click
from samtune.data.batch import SamBatch
from samtune.data.prompts import PAD_LABEL
from samtune.evaluation import instance_iou_f1, predicted_masks, sam_forward
from samtune.interactive import add_clicks, instance_forward, instance_prompts, instance_rows, to_batch_layout
from samtune.models.family import decoder_inputs, image_features, post_process_masks

THRESHOLDS = {"85": 0.85, "90": 0.90}


@dataclass
class ClickRun:
    """One batch through the protocol."""

    records: list[dict]  # per valid instance: image_id, annotation_id, category_id, ious (K + 1 values)
    logits: torch.Tensor  # (B, K, h, w) low-resolution logits of the last round
    points: list[np.ndarray]  # per image: (P, 3) x, y (model input frame), label of the last round's points


def clicks_to_reach(ious: Sequence[float], threshold: float) -> int | None:
    """Interactions (first prompt = 1) until the IoU is at least ``threshold``; None if it never is."""
    for round_, iou in enumerate(ious):
        if iou >= threshold:
            return round_ + 1
    return None


def summarize(records: list[dict], clicks: int) -> dict:
    """The click curve (mIoU after 0..K clicks), NoC85 / NoC90 and failure shares over instances, each
    instance once (records gathered from several processes may repeat)."""
    curves = {(r["image_id"], r["annotation_id"]): r["ious"] for r in records}
    if not curves:
        nan = float("nan")
        return {"mIoU": [nan] * (clicks + 1), "mIoU_mean": nan, "num_instances": 0}
    table = np.array(list(curves.values()), dtype=np.float64)  # (N, K + 1)
    out: dict = {"mIoU": [float(v) for v in table.mean(axis=0)], "mIoU_mean": float(table.mean())}
    for name, threshold in THRESHOLDS.items():
        reached = [clicks_to_reach(curve, threshold) for curve in table]
        out[f"NoC{name}"] = float(np.mean([clicks + 1 if n is None else n for n in reached]))
        out[f"failed{name}"] = float(np.mean([n is None for n in reached]))
    out["num_instances"] = len(curves)
    return out


def _original_masks(outputs, batch: SamBatch, processor) -> list[torch.Tensor]:
    """Per image, (K_b, H, W) boolean masks of its valid instances at the original size (as ``score_batch``)."""
    logits, _ = predicted_masks(outputs)
    masks = post_process_masks(
        processor, logits[:, :, None].cpu(), batch["original_sizes"].cpu(), batch["reshaped_input_sizes"].cpu()
    )
    counts = batch["valid"].sum(dim=1).tolist()
    return [predicted[:count, 0].bool() for predicted, count in zip(masks, counts)]


def _ious(masks: list[torch.Tensor], batch: SamBatch) -> list[float]:
    """IoU of every valid instance, row-major (the instance layout's order)."""
    out: list[float] = []
    for row, predicted in enumerate(masks):
        iou, _ = instance_iou_f1(predicted, batch["original_masks"][row].cpu(), batch["original_ignore"][row].cpu())
        out += iou.tolist()
    return out


def input_frame_scale(batch: SamBatch) -> torch.Tensor:
    """(B, 2) factors taking original (x, y) pixels to the model's input frame, as the processors scale prompts:
    resized width / original width, resized height / original height."""
    resized, original = batch["reshaped_input_sizes"].cpu().double(), batch["original_sizes"].cpu().double()
    return (resized / original).flip(-1)  # sizes are (h, w); points (x, y)


def _next_clicks(masks: list[torch.Tensor], batch: SamBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) clicks in the model's input frame and (N,) labels (``PAD_LABEL``: nothing wrong), row-major."""
    scale = input_frame_scale(batch)
    points, labels = [], []
    for row, predicted in enumerate(masks):
        truth, ignore = batch["original_masks"][row].cpu().numpy(), batch["original_ignore"][row].cpu().numpy()
        for k in range(len(predicted)):
            click = next_click(predicted[k].numpy(), truth[k].astype(bool), ignore.astype(bool))
            if click is None:
                points.append(torch.zeros(2, dtype=torch.float64))
                labels.append(PAD_LABEL)
            else:
                points.append(torch.from_numpy(click[0]).double() * scale[row])
                labels.append(click[1])
    if not points:
        return torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
    return torch.stack(points).float(), torch.tensor(labels, dtype=torch.long)


def _points_per_image(prompts: dict[str, torch.Tensor], valid: torch.Tensor) -> list[np.ndarray]:
    """The instance layout's points back per image, (P, 3) x, y, label, padding points left out."""
    if "input_points" not in prompts:
        return [np.zeros((0, 3), np.float32) for _ in range(len(valid))]
    points = prompts["input_points"][:, 0].float().cpu()  # (N, P, 2)
    labels = prompts["input_labels"][:, 0].float().cpu()[..., None]
    table = torch.cat([points, labels], dim=-1)  # (N, P, 3)
    out, start = [], 0
    for count in valid.sum(dim=1).tolist():
        rows = table[start : start + count].reshape(-1, 3)
        out.append(rows[rows[:, 2] != PAD_LABEL].numpy())
        start += count
    return out


@torch.no_grad()
def follow_clicks(
    model,
    batch: SamBatch,
    processor,
    clicks: int,
    features: dict[str, torch.Tensor] | None = None,
    first=None,
    hq_token_only: bool = False,
) -> ClickRun:
    """The protocol on one batch (on the model's device; full-size masks anywhere).

    ``features``: the batch's ``image_features`` (computed here when not given); ``first``: the round-0 outputs
    of ``sam_forward`` on those features, when the caller already has them (the plain evaluation's).
    """
    if features is None:
        features = image_features(model, batch["pixel_values"])
    outputs = sam_forward(model, batch, features=features, hq_token_only=hq_token_only) if first is None else first
    valid = batch["valid"]
    masks = _original_masks(outputs, batch, processor)
    curves = [_ious(masks, batch)]
    prompts = instance_prompts(batch)
    if bool(valid.any()):
        rows, inputs = instance_rows(valid), decoder_inputs(model, features)
        for _ in range(clicks):
            points, labels = _next_clicks(masks, batch)
            prompts = add_clicks(prompts, points.to(valid.device), labels.to(valid.device))
            prompts["input_masks"] = predicted_masks(outputs)[0][valid][:, None]  # what the annotator saw
            outputs = to_batch_layout(instance_forward(model, inputs, rows, prompts, False, hq_token_only), valid)
            masks = _original_masks(outputs, batch, processor)
            curves.append(_ious(masks, batch))
    else:
        curves += [[] for _ in range(clicks)]
    records = []
    for index, (row, k) in enumerate(valid.nonzero().tolist()):
        records.append(
            {
                "image_id": int(batch["image_id"][row]),
                "annotation_id": int(batch["annotation_ids"][row, k]),
                "category_id": int(batch["category_ids"][row, k]),
                "ious": [curve[index] for curve in curves],
            }
        )
    return ClickRun(records, predicted_masks(outputs)[0], _points_per_image(prompts, valid))
