"""Original segment-anything checkpoints (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)
as Meta, MedSAM, SlimSAM and others publish them, read safely into ``SamModel``.

The architecture (ViT-B/L/H, SlimSAM widths, window / global layout, input size) is read off the
tensor shapes, so no size has to be named.

Convert once, to a SamModel folder:

    python -m samtune.models.segment_anything_checkpoint sam_vit_b_01ec64.pth out/sam-vit-b
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch
from transformers import (
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from samtune.errors import UserError, run_command
from samtune.models.architectures import processor_for

# Renames from the original module tree to transformers' (applied in order, as substrings).
_RENAMES = [
    ("image_encoder.", "vision_encoder."),
    (".blocks.", ".layers."),
    ("patch_embed.proj.", "patch_embed.projection."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    ("neck.0.", "neck.conv1."),
    ("neck.1.", "neck.layer_norm1."),
    ("neck.2.", "neck.conv2."),
    ("neck.3.", "neck.layer_norm2."),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    (".norm_final_attn.", ".layer_norm_final_attn."),
]
# Three-layer MLPs (IoU head, hypernetworks): layers.0 / 1 / 2 -> proj_in / layers.0 / proj_out.
_MLP = re.compile(r"(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\.")
# Decoder transformer norms: norm1..norm4 -> layer_norm1..4.
_DECODER_NORM = re.compile(r"(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.")
SAM_ENCODER_KEY = "image_encoder.patch_embed.proj.weight"  # the ViT image encoder of SAM and SAM-HQ
HQ_KEY = "mask_decoder.hf_token.weight"  # SAM-HQ's extra output token


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint that would run pickled code to load."""


def is_original_checkpoint(path: str) -> bool:
    return Path(path).is_file() and Path(path).suffix in (".pth", ".pt", ".bin", ".ckpt")


def _rename(key: str, mlp_depth: int) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    key = _DECODER_NORM.sub(r"\1.layer_norm\2.", key)

    def mlp(match: re.Match) -> str:
        index = int(match.group(2))
        name = "proj_in" if index == 0 else "proj_out" if index == mlp_depth - 1 else f"layers.{index - 1}"
        return f"{match.group(1)}.{name}."

    return _MLP.sub(mlp, key)


def config_parts_from_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Vision, prompt-encoder and mask-decoder settings read off original-format tensor shapes (as keyword
    arguments, so SAM-HQ builds its own config classes from the same reading)."""
    patch = state["image_encoder.patch_embed.proj.weight"]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    head_dim = rel[0].shape[1]
    sizes = [(r.shape[0] + 1) // 2 for r in rel]
    grid = max(sizes)
    window = min(sizes)
    global_layers = [i for i, s in enumerate(sizes) if s == grid and s != window]
    neck = state["image_encoder.neck.0.weight"]
    mlp_dim = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
    prompt_hidden = state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1] * 2
    decoder_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers."))
    vision = {
        "hidden_size": hidden,
        "output_channels": neck.shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": hidden // head_dim,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "window_size": window,
        "global_attn_indexes": global_layers,
        "mlp_dim": mlp_dim,
        "num_pos_feats": prompt_hidden // 2,
    }
    prompt = {
        "hidden_size": prompt_hidden,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "mask_input_channels": state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
    }
    decoder = {
        "hidden_size": prompt_hidden,
        "mlp_dim": state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        "num_hidden_layers": decoder_layers,
        "iou_head_hidden_dim": state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        "iou_head_depth": 1
        + max(int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.iou_prediction_head.layers.")),
    }
    return vision, prompt, decoder


def config_from_state_dict(state: dict[str, torch.Tensor]) -> SamConfig:
    """Infer a SamConfig from original-format tensor shapes."""
    vision, prompt, decoder = config_parts_from_state_dict(state)
    return SamConfig(
        vision_config=SamVisionConfig(**vision),
        prompt_encoder_config=SamPromptEncoderConfig(**prompt),
        mask_decoder_config=SamMaskDecoderConfig(**decoder),
    )


def convert_state_dict(state: dict[str, torch.Tensor], mlp_depth: int = 3) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
    out = {_rename(k, mlp_depth): v for k, v in state.items()}
    # SamModel keeps one copy of the positional encoding at the top level as well.
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only: ``weights_only=True`` refuses pickled code; safetensors files are read as such."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: not a checkpoint of tensors alone, refused (read with weights_only=True, which runs no "
            f"pickled code): {first}"
        ) from error
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def is_sam_checkpoint(state: dict) -> bool:
    """Whether a state dict holds an original segment-anything SAM (ViT image encoder, no SAM-HQ modules)."""
    return SAM_ENCODER_KEY in state and "mask_decoder.iou_token.weight" in state and HQ_KEY not in state


def shape_error(source: str | Path, family: str, error: Exception) -> UserError:
    """A state dict whose keys or shapes do not give an architecture: one line naming the file."""
    return UserError(f"{source}: not a {family} checkpoint of a known layout ({type(error).__name__}: {error})")


def load_converted(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load converted weights, every parameter and buffer accounted for; a mismatch is the file's fault."""
    name = type(model).__name__
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a size mismatch: the shapes read do not all agree
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise UserError(f"{source}: weights do not fit {name}: {lines[0] if lines else error}") from error
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def model_from_state_dict(
    state: dict[str, torch.Tensor], source: str | Path, attn_implementation: str = "sdpa"
) -> tuple[SamModel, SamProcessor]:
    """SamModel (eval mode) and processor from an original segment-anything state dict read from ``source``."""
    if SAM_ENCODER_KEY not in state:
        raise UserError(f"{source}: not a segment-anything checkpoint (no {SAM_ENCODER_KEY})")
    try:
        config = config_from_state_dict(state)
    except (KeyError, IndexError, ValueError) as error:
        raise shape_error(source, "segment-anything", error) from error
    config._attn_implementation = attn_implementation
    model = SamModel(config)
    load_converted(model, convert_state_dict(state, config.mask_decoder_config.iou_head_depth), source)
    return model.eval(), processor_for(config)


def load_original_checkpoint(path: str | Path, attn_implementation: str = "sdpa") -> tuple[SamModel, SamProcessor]:
    return model_from_state_dict(read_state_dict(path), path, attn_implementation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an original segment-anything checkpoint to a SamModel folder")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    model, processor = load_original_checkpoint(args.checkpoint)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune convert"))
