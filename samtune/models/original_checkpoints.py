"""Original checkpoints of the three families samtune reads without a conversion step: SAM (Meta's, MedSAM,
SlimSAM), SAM-HQ and SAM 2 / 2.1. The file is read once, with ``weights_only=True`` (or as safetensors), and its
family is told from its keys, never from its name:

- SAM: ``image_encoder.patch_embed.proj.weight`` (a ViT) and ``mask_decoder.iou_token.weight``;
- SAM-HQ: the same plus ``mask_decoder.hf_token.weight``;
- SAM 2 / 2.1: ``image_encoder.trunk.patch_embed.proj.weight`` (a Hiera) and ``sam_mask_decoder.iou_token.weight``.

Anything else is a ``UserError`` naming the file and what was expected.

    samtune convert CHECKPOINT OUT_DIR     (python -m samtune.models.original_checkpoints CHECKPOINT OUT_DIR)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import PreTrainedModel, ProcessorMixin

from samtune.errors import UserError, run_command
from samtune.models import sam2_checkpoint, sam_hq_checkpoint
from samtune.models import segment_anything_checkpoint as sam_checkpoint
from samtune.models.segment_anything_checkpoint import is_original_checkpoint, read_state_dict

__all__ = ["family_of_state", "is_original_checkpoint", "load_original", "main", "model_from_state_dict"]

SAM, SAM_HQ, SAM2 = "SAM", "SAM-HQ", "SAM 2"
_EXPECTED = (
    f"{sam_checkpoint.SAM_ENCODER_KEY} (SAM; with {sam_checkpoint.HQ_KEY}: SAM-HQ) "
    f"or {sam2_checkpoint.ENCODER_KEY} (SAM 2 / 2.1)"
)


def family_of_state(state: dict) -> str | None:
    """SAM, SAM-HQ or SAM 2, from the keys of an original state dict; None for anything else."""
    if sam_hq_checkpoint.is_sam_hq_checkpoint(state):
        return SAM_HQ
    if sam_checkpoint.is_sam_checkpoint(state):
        return SAM
    if sam2_checkpoint.is_sam2_checkpoint(state):
        return SAM2
    return None


def _not_a_checkpoint(path: str | Path, state: object) -> UserError:
    if not isinstance(state, dict):
        return UserError(f"{path}: holds a {type(state).__name__}, not a state dict; expected {_EXPECTED}")
    tops = sorted({str(key).split(".")[0] for key in state})
    found = f"{len(state)} entries under {', '.join(tops[:6])}{', ...' if len(tops) > 6 else ''}"
    if "mask_decoder.iou_token.weight" in state and any(str(k).startswith("image_encoder.layers.") for k in state):
        return UserError(
            f"{path}: a TinyViT image encoder (MobileSAM / HQ-SAM Light): transformers' SAM models have only "
            "the ViT encoder"
        )
    return UserError(f"{path}: not an original SAM, SAM-HQ or SAM 2 checkpoint: expected {_EXPECTED}; found {found}")


def model_from_state_dict(
    state: object, path: str | Path, attn_implementation: str = "sdpa", image_size: int | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """``load_original`` on a state dict already read from ``path``."""
    family = family_of_state(state) if isinstance(state, dict) else None
    if family is None:
        raise _not_a_checkpoint(path, state)
    if family == SAM2:
        size = image_size or sam2_checkpoint.IMAGE_SIZE
        return sam2_checkpoint.model_from_state_dict(state, path, attn_implementation, size)
    module = sam_hq_checkpoint if family == SAM_HQ else sam_checkpoint
    model, processor = module.model_from_state_dict(state, path, attn_implementation)
    stored = model.config.vision_config.image_size
    if image_size is not None and image_size != stored:
        raise UserError(f"{path}: a {family} checkpoint for {stored} px input (read off its weights), not {image_size}")
    return model, processor


def load_original(
    path: str | Path, attn_implementation: str = "sdpa", image_size: int | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """SamModel, SamHQModel or Sam2Model (eval mode) and the family's processor from an original checkpoint.

    ``image_size`` is for SAM 2, whose files do not store it (1024 when not given); SAM and SAM-HQ read theirs
    off the weights, and a different one is refused.
    """
    return model_from_state_dict(read_state_dict(path), path, attn_implementation, image_size)


def summary(state: dict) -> str:
    """What a recognised checkpoint holds, in words."""
    family = family_of_state(state)
    if family != SAM2:
        return str(family)
    dropped = sum(sam2_checkpoint.is_video_only(key) for key in state)
    return f"{sam2_checkpoint.describe(state)}, image model ({dropped} video-memory tensors left out)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="samtune convert",
        description="Convert an original SAM, SAM-HQ or SAM 2 / 2.1 checkpoint (.pth / .pt) to a transformers folder",
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--image-size", type=int, default=None, help="SAM 2 only: the input size, which its files do not store (1024)"
    )
    args = parser.parse_args(argv)
    state = read_state_dict(args.checkpoint)
    model, processor = model_from_state_dict(state, args.checkpoint, image_size=args.image_size)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"saved {args.output}: {summary(state)}, as {type(model).__name__}")


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune convert"))
