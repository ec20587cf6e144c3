"""Original SAM-HQ checkpoints (``sam_hq_vit_b/l/h.pth`` of SysCV/sam-hq, the ``segment-anything-hq`` package),
read safely into transformers' ``SamHQModel``.

SAM-HQ is SAM (same ViT, prompt encoder and decoder, read off the tensor shapes by the segment-anything
converter) plus an HQ output token and three small fusion heads in the mask decoder:

    hf_token                     -> hq_token
    hf_mlp.layers.0 / 1 / 2      -> hq_mask_mlp.proj_in / layers.0 / proj_out
    compress_vit_feat.0 / 1 / 3  -> compress_vit_conv1 / compress_vit_norm / compress_vit_conv2
    embedding_encoder.0 / 1 / 3  -> encoder_conv1 / encoder_norm / encoder_conv2
    embedding_maskfeature.0/1/3  -> mask_conv1 / mask_norm / mask_conv2

(``.2`` of each sequence is a GELU, without weights.) ``compress_vit_feat`` reads the output of the first
global-attention ViT layer, so its input width is the ViT width. HQ-SAM Light (TinyViT encoder) has no
transformers class and is refused.

    python -m samtune.models.sam_hq_checkpoint sam_hq_vit_b.pth out/sam-hq-vit-b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import (
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQModel,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
    SamProcessor,
)

from samtune.errors import UserError, run_command
from samtune.models import segment_anything_checkpoint as sam_format
from samtune.models.architectures import processor_for

_HQ_RENAMES = [
    ("mask_decoder.hf_token.", "mask_decoder.hq_token."),
    ("mask_decoder.hf_mlp.layers.0.", "mask_decoder.hq_mask_mlp.proj_in."),
    ("mask_decoder.hf_mlp.layers.1.", "mask_decoder.hq_mask_mlp.layers.0."),
    ("mask_decoder.hf_mlp.layers.2.", "mask_decoder.hq_mask_mlp.proj_out."),
    ("mask_decoder.compress_vit_feat.0.", "mask_decoder.compress_vit_conv1."),
    ("mask_decoder.compress_vit_feat.1.", "mask_decoder.compress_vit_norm."),
    ("mask_decoder.compress_vit_feat.3.", "mask_decoder.compress_vit_conv2."),
    ("mask_decoder.embedding_encoder.0.", "mask_decoder.encoder_conv1."),
    ("mask_decoder.embedding_encoder.1.", "mask_decoder.encoder_norm."),
    ("mask_decoder.embedding_encoder.3.", "mask_decoder.encoder_conv2."),
    ("mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    ("mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    ("mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
]
_VIT_FEATURES = "mask_decoder.compress_vit_feat.0.weight"  # ConvTranspose2d: (ViT width, decoder width, 2, 2)


def is_sam_hq_checkpoint(state: dict) -> bool:
    """Whether a state dict holds an original SAM-HQ model with a ViT image encoder."""
    return sam_format.SAM_ENCODER_KEY in state and sam_format.HQ_KEY in state


def config_from_state_dict(state: dict[str, torch.Tensor]) -> SamHQConfig:
    """Infer a SamHQConfig from original-format tensor shapes."""
    vision, prompt, decoder = sam_format.config_parts_from_state_dict(state)
    vit_dim = state[_VIT_FEATURES].shape[0]
    if vit_dim != vision["hidden_size"]:
        raise ValueError(f"the HQ fusion reads {vit_dim}-wide ViT features but the ViT is {vision['hidden_size']} wide")
    if not vision["global_attn_indexes"]:
        raise ValueError("no global-attention ViT layer, whose output the HQ fusion reads")
    return SamHQConfig(
        vision_config=SamHQVisionConfig(**vision),
        prompt_encoder_config=SamHQPromptEncoderConfig(**prompt),
        mask_decoder_config=SamHQMaskDecoderConfig(**decoder, vit_dim=vit_dim),
    )


def convert_state_dict(state: dict[str, torch.Tensor], mlp_depth: int = 3) -> dict[str, torch.Tensor]:
    """Original SAM-HQ keys -> SamHQModel keys: the HQ modules renamed here, the rest as for SAM."""

    def rename(key: str) -> str:
        for old, new in _HQ_RENAMES:
            key = key.replace(old, new)
        return key

    return sam_format.convert_state_dict({rename(k): v for k, v in state.items()}, mlp_depth)


def model_from_state_dict(
    state: dict[str, torch.Tensor], source: str | Path, attn_implementation: str = "sdpa"
) -> tuple[SamHQModel, SamProcessor]:
    """SamHQModel (eval mode) and processor from an original SAM-HQ state dict read from ``source``."""
    if sam_format.HQ_KEY in state and sam_format.SAM_ENCODER_KEY not in state:
        raise UserError(
            f"{source}: a SAM-HQ checkpoint without SAM's ViT image encoder (HQ-SAM Light's TinyViT?): "
            "transformers' SamHQModel has only the ViT encoder"
        )
    if not is_sam_hq_checkpoint(state):
        expected = f"{sam_format.SAM_ENCODER_KEY} and {sam_format.HQ_KEY}"
        raise UserError(f"{source}: not a SAM-HQ checkpoint (expected {expected})")
    try:
        config = config_from_state_dict(state)
    except (KeyError, IndexError, ValueError) as error:
        raise sam_format.shape_error(source, "SAM-HQ", error) from error
    config._attn_implementation = attn_implementation
    model = SamHQModel(config)
    sam_format.load_converted(model, convert_state_dict(state, config.mask_decoder_config.iou_head_depth), source)
    return model.eval(), processor_for(config)


def load_original_checkpoint(path: str | Path, attn_implementation: str = "sdpa") -> tuple[SamHQModel, SamProcessor]:
    """An original SAM-HQ ``.pth`` (read with ``weights_only=True``) as SamHQModel and its processor."""
    return model_from_state_dict(sam_format.read_state_dict(path), path, attn_implementation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an original SAM-HQ checkpoint to a SamHQModel folder")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    model, processor = load_original_checkpoint(args.checkpoint)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune convert"))
