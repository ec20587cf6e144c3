"""Interactive rounds: after the first prompt, correction clicks and the previous mask as a mask prompt.

transformers' SAM models add the dense (mask) prompt to the image embedding once per image, before the
decoder repeats it per instance, so a mask prompt per instance needs one decoder row per instance: the
"instance layout" below has N rows (the batch's valid instances), each with its image's features, its own
prompts and its own mask. The image encoder never runs again: its features are indexed, not recomputed.
Outputs go back to the batch's (B, K) layout, so ``batch_loss`` and the scorers read them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from samtune.clicks import sample_clicks
from samtune.data.batch import SamBatch, prompts_of, uses_multimask
from samtune.evaluation import predicted_masks
from samtune.models.family import decoder_inputs, forward_options


@dataclass(frozen=True)
class Rounds:
    """Correction rounds of one training step (``train.correction_clicks`` and its companions)."""

    clicks: int = 0  # rounds after the first prompt, one new click per instance each
    mask_prompt_prob: float = 0.5  # chance that a round also gets the previous round's logits as mask prompt
    mask_only_round: bool = False  # one more round at the end: no new click, the previous mask as prompt


def instance_rows(valid: torch.Tensor) -> torch.Tensor:
    """(N,) image index of each valid instance of a (B, K) ``valid`` map, in row-major order."""
    return torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]


def instance_prompts(batch: SamBatch) -> dict[str, torch.Tensor]:
    """The batch's prompts in the instance layout: (N, 1, ...) each."""
    valid = batch["valid"]
    return {key: value[valid][:, None] for key, value in prompts_of(batch).items()}


def _index_rows(value, rows: torch.Tensor):
    if isinstance(value, (list, tuple)):
        return [_index_rows(item, rows) for item in value]
    return value.index_select(0, rows)


def instance_forward(
    model,
    inputs: dict,
    rows: torch.Tensor,
    prompts: dict[str, torch.Tensor],
    multimask: bool = False,
    hq_token_only: bool = False,
):
    """The decoder on N instance rows: ``inputs`` are ``decoder_inputs`` of the B images, ``rows`` (N,) picks
    each instance's image, ``prompts`` (N, 1, ...) may hold ``input_masks`` (N, 1, h, w) logits."""
    images = {key: _index_rows(value, rows) for key, value in inputs.items()}
    return model(**images, multimask_output=multimask, **forward_options(model, hq_token_only), **prompts)


def to_batch_layout(outputs, valid: torch.Tensor) -> SimpleNamespace:
    """Instance-layout outputs (N, 1, ...) as the batch's (B, K, ...), padding zero (never read)."""

    def place(value: torch.Tensor) -> torch.Tensor:
        out = value.new_zeros(*valid.shape, *value.shape[2:])
        out[valid] = value[:, 0]
        return out

    fields = {"pred_masks": outputs.pred_masks, "iou_scores": outputs.iou_scores}
    if getattr(outputs, "object_score_logits", None) is not None:
        fields["object_score_logits"] = outputs.object_score_logits
    return SimpleNamespace(**{name: place(value) for name, value in fields.items()})


def add_clicks(prompts: dict[str, torch.Tensor], points: torch.Tensor, labels: torch.Tensor) -> dict:
    """``prompts`` with one more point per instance: ``points`` (N, 2) in the model's input frame, ``labels``
    (N,) (``PAD_LABEL`` for none)."""
    out = dict(prompts)
    new_points, new_labels = points[:, None, None].float(), labels[:, None, None].long()
    if "input_points" in prompts:
        new_points = torch.cat([prompts["input_points"], new_points.to(prompts["input_points"].dtype)], dim=2)
        new_labels = torch.cat([prompts["input_labels"], new_labels], dim=2)
    out["input_points"], out["input_labels"] = new_points, new_labels
    return out


def inside_image(batch: SamBatch, side: int) -> torch.Tensor:
    """(B, side, side) True where a mask-grid pixel shows the image, not the padding (SAM pads right / bottom)."""
    input_side = batch["pixel_values"].shape[-1]
    extent = torch.ceil(batch["reshaped_input_sizes"].float() * side / input_side).long()  # (B, 2): rows, cols
    grid = torch.arange(side, device=extent.device)
    return (grid[None, :, None] < extent[:, 0, None, None]) & (grid[None, None, :] < extent[:, 1, None, None])


def training_rounds(
    model,
    batch: SamBatch,
    features: dict[str, torch.Tensor],
    rounds: Rounds,
    generator: torch.Generator,
    hq_token_only: bool = False,
) -> list:
    """The outputs of every round of one training step, in the batch layout: the first prompt, then
    ``rounds.clicks`` correction rounds, then the optional mask-only round.

    The previous round's mask is detached: it is an input here, as it is in a tool, where it comes from an
    earlier call; each round's loss trains the model on that round's state of the interaction.
    """
    inputs = decoder_inputs(model, features)
    options = forward_options(model, hq_token_only)
    outputs = model(**inputs, multimask_output=uses_multimask(batch), **options, **prompts_of(batch))
    history = [outputs]
    valid = batch["valid"]
    if not bool(valid.any()):
        return history
    rows, prompts = instance_rows(valid), instance_prompts(batch)
    targets = batch["low_res_masks"][valid]
    side = targets.shape[-1]
    keep = (~batch["low_res_ignore"] & inside_image(batch, side))[rows]
    stride = batch["pixel_values"].shape[-1] / side
    plan = [True] * rounds.clicks + [False] * rounds.mask_only_round  # True: a round with a new click
    for with_click in plan:
        logits = predicted_masks(outputs)[0][valid].detach()  # (N, h, w): the mask an annotator sees
        if with_click:
            points, labels = sample_clicks(logits > 0, targets, keep, generator)
            prompts = add_clicks(prompts, (points.float() + 0.5) * stride - 0.5, labels)
            use_mask = bool(torch.rand((), generator=generator, device=generator.device) < rounds.mask_prompt_prob)
        else:
            use_mask = True
        prompts.pop("input_masks", None)
        if use_mask:
            prompts["input_masks"] = logits[:, None]
        outputs = to_batch_layout(instance_forward(model, inputs, rows, prompts, False, hq_token_only), valid)
        history.append(outputs)
    return history

