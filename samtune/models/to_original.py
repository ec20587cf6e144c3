"""transformers' SamModel / SamHQModel / Sam2Model weights back to the original packages' state dicts
(segment-anything, segment-anything-hq, sam2), the reverse of the converters in this package.

The forward converters hold the key maps. Each HF key is turned back by undoing those same rename lists (and
their MLP-index and norm patterns), and every result is checked by running it forward again through the
converter of its family: the original dict must convert to exactly the tensors it came from, or nothing is
written (a bug here, not the user's).
"""

from __future__ import annotations

import re

import torch

from samtune.errors import UserError
from samtune.models import sam2_checkpoint, sam_hq_checkpoint
from samtune.models import segment_anything_checkpoint as sam_format

_SHARED = "shared_image_embedding.positional_embedding"  # transformers' second copy of the prompt encoding


def _undo_substrings(key: str, renames: list[tuple[str, str]], scoped: dict[str, str]) -> str:
    """Undo substring renames (last first); a rename listed in ``scoped`` is undone only under that HF prefix."""
    for old, new in reversed(renames):
        if old in scoped and not key.startswith(scoped[old]):
            continue
        key = key.replace(new, old)
    return key


def _mlp_index(name: str, depth: int) -> int:
    """proj_in / layers.i / proj_out -> the original Sequential index."""
    if name == "proj_in":
        return 0
    if name == "proj_out":
        return depth - 1
    return int(name.split(".")[1]) + 1


_HF_MLP = re.compile(
    r"^(.*(?:iou_prediction_head|output_hypernetworks_mlps\.\d+|pred_obj_score_head))"
    r"\.(proj_in|proj_out|layers\.\d+)\."
)


def _undo_mlp(key: str, depths: dict[str, int]) -> str:
    match = _HF_MLP.match(key)
    if not match:
        return key
    return _HF_MLP.sub(rf"\1.layers.{_mlp_index(match.group(2), depths[match.group(1)])}.", key)


def _mlp_depths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Layers of each MLP head: proj_in + hidden layers + proj_out."""
    depths: dict[str, int] = {}
    for key in state:
        if match := _HF_MLP.match(key):
            hidden = match.group(2).startswith("layers.")
            depths.setdefault(match.group(1), 2)
            if hidden:
                depths[match.group(1)] = max(depths[match.group(1)], int(match.group(2).split(".")[1]) + 3)
    return depths


def sam_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SamModel / SamHQModel state dict -> the original segment-anything (or segment-anything-hq) one."""
    depths = _mlp_depths(state)
    out = {}
    for key, value in state.items():
        if key == _SHARED:
            continue
        original = _undo_substrings(key, sam_hq_checkpoint._HQ_RENAMES, {})  # first: its MLP has its own names
        original = _undo_mlp(original, depths)
        original = re.sub(r"(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2.", original)
        # ".blocks." -> ".layers." renamed the ViT's blocks only (the decoder's layers keep their name)
        original = _undo_substrings(original, sam_format._RENAMES, {".blocks.": "vision_encoder."})
        out[original] = value
    hq = sam_format.HQ_KEY in out
    depth = depths.get("mask_decoder.iou_prediction_head", 3)
    forward = (sam_hq_checkpoint if hq else sam_format).convert_state_dict(out, depth)
    _check_round_trip(state, forward, "SAM-HQ" if hq else "SAM")
    return out


def sam2_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sam2Model state dict -> the image-model part of the original sam2 one (no video-memory tensors)."""
    depths = _mlp_depths(state)
    undo = [  # sam2_checkpoint._RENAMES, read backwards
        (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
        (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
        (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
        (r"^(image_encoder\.trunk\.blocks\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
        (r"^(image_encoder\.trunk\.blocks\.\d+\.mlp)\.proj_in\.", r"\1.layers.0."),
        (r"^(image_encoder\.trunk\.blocks\.\d+\.mlp)\.proj_out\.", r"\1.layers.1."),
        (
            r"^prompt_encoder\.shared_embedding\.positional_embedding$",
            "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        ),
        (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
        (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
        (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
        (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
        (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
        (r"^prompt_encoder\.", "sam_prompt_encoder."),
        (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
        (r"^(mask_decoder\.transformer\.layers\.\d+\.mlp)\.proj_in\.", r"\1.layers.0."),
        (r"^(mask_decoder\.transformer\.layers\.\d+\.mlp)\.proj_out\.", r"\1.layers.1."),
        (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
        (r"\.o_proj\.", ".out_proj."),
        (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
        (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
        (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
        (r"^mask_decoder\.", "sam_mask_decoder."),
        (r"^no_memory_embedding$", "no_mem_embed"),
    ]
    out = {}
    for key, value in state.items():
        if key == _SHARED:
            continue
        if key == "prompt_encoder.point_embed.weight":  # one Embedding(4, d) -> four Embedding(1, d)
            for index, row in enumerate(value):
                out[f"sam_prompt_encoder.point_embeddings.{index}.weight"] = row[None].clone()
            continue
        original = _undo_mlp(key, depths)
        for pattern, replacement in undo:
            original = re.sub(pattern, replacement, original)
        out[original] = value
    _check_round_trip(state, sam2_checkpoint.convert_state_dict(out), "SAM 2")
    return out


def _check_round_trip(state: dict, forward: dict, family: str) -> None:
    if forward.keys() != state.keys():
        extra, missing = sorted(forward.keys() - state.keys()), sorted(state.keys() - forward.keys())
        raise RuntimeError(f"{family} reverse conversion does not round-trip: extra {extra[:5]}, missing {missing[:5]}")
    for key, value in state.items():
        if forward[key] is value or value.is_meta:  # renamed, not copied (or no values to compare)
            continue
        if key == _SHARED and not torch.equal(forward[key], value):
            raise UserError(
                f"{family}: the model's image-wide and prompt positional encodings differ (a randomly initialised "
                "model?); the original format holds one matrix for both, so it cannot hold this model"
            )
        if not torch.equal(forward[key], value):
            raise RuntimeError(f"{family} reverse conversion does not round-trip: {key} differs")
