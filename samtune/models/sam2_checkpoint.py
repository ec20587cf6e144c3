"""Original SAM 2 / SAM 2.1 checkpoints (``sam2_hiera_*.pt``, ``sam2.1_hiera_*.pt`` of facebookresearch/sam2:
``{"model": state_dict}``), read safely into transformers' ``Sam2Model``, the image model.

What the tensors show is read off them: the Hiera width, blocks per stage and stage widths (a block with a
``proj`` opens a stage), the MLP ratio, the first stage's window (``pos_embed_window``) and the background
positional grid (``pos_embed``), the FPN neck, the prompt encoder and the mask decoder. What they do not show,
heads per stage, the later stages' windows and which blocks attend globally, is taken from the one published
trunk with that width and stage layout (``PUBLISHED``); any other trunk is refused, naming the file. The
input size is not stored either: 1024 for every published checkpoint, ``image_size`` for others (MedSAM2: 512).
SAM 2 and SAM 2.1 differ only in the video modules, so both load the same way.

The video model's memory, which ``Sam2Model`` does not have, is left out on purpose (``VIDEO_ONLY``):
``memory_attention.*`` (attention to past frames' memories), ``memory_encoder.*`` (a frame's mask into a
memory), ``maskmem_tpos_enc`` (temporal positions of memories), ``no_mem_pos_enc``, ``mask_downsample.*``,
``obj_ptr_proj.*`` (object pointers), ``no_obj_ptr``, and in SAM 2.1 ``obj_ptr_tpos_proj.*`` and
``no_obj_embed_spatial``. ``no_mem_embed``, which single images use, is kept (``no_memory_embedding``).

    python -m samtune.models.sam2_checkpoint sam2.1_hiera_tiny.pt out/sam2.1-hiera-tiny
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    ProcessorMixin,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

from samtune.errors import UserError, run_command
from samtune.models import segment_anything_checkpoint as sam_format
from samtune.models.square_processor import square_processor

TRUNK = "image_encoder.trunk."
ENCODER_KEY = TRUNK + "patch_embed.proj.weight"
DECODER_KEY = "sam_mask_decoder.iou_token.weight"
IMAGE_SIZE = 1024  # every published SAM 2 / 2.1 checkpoint
DECODER_HEADS = 8  # SAM2Base builds its mask decoder with 8 heads, whatever the width


@dataclass(frozen=True)
class Hiera:
    """A Hiera trunk: what the weights show (``width``, ``stages``, ``windows[0]``, ``background``) and what
    they do not (``heads``, ``windows[1:]``, ``global_blocks``)."""

    width: int
    stages: tuple[int, ...]
    heads: int
    global_blocks: tuple[int, ...]
    windows: tuple[int, ...]
    background: tuple[int, int]


# The trunks of the published checkpoints (sam2/configs/sam2{,.1}/*.yaml; the two versions share them).
PUBLISHED = {
    "Hiera-T": Hiera(96, (1, 2, 7, 2), 1, (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    "Hiera-S": Hiera(96, (1, 2, 11, 2), 1, (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    "Hiera-B+": Hiera(112, (2, 3, 16, 3), 2, (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    "Hiera-L": Hiera(144, (2, 6, 36, 4), 2, (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}
# Tensors of the video model only; dropped knowingly (see the module docstring). Names, or prefixes ending in ".".
VIDEO_ONLY = (
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "mask_downsample.",
    "obj_ptr_proj.",
    "no_obj_ptr",
    "obj_ptr_tpos_proj.",  # SAM 2.1
    "no_obj_embed_spatial",  # SAM 2.1
)
_SAM2_1_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")

# Original -> Sam2Model key renames, applied in order (regular expressions).
_RENAMES = [
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"^(vision_encoder\.backbone\.blocks\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^(vision_encoder\.backbone\.blocks\.\d+\.mlp)\.layers\.0\.", r"\1.proj_in."),
    (r"^(vision_encoder\.backbone\.blocks\.\d+\.mlp)\.layers\.1\.", r"\1.proj_out."),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (
        r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^(mask_decoder\.transformer\.layers\.\d+\.mlp)\.layers\.0\.", r"\1.proj_in."),
    (r"^(mask_decoder\.transformer\.layers\.\d+\.mlp)\.layers\.1\.", r"\1.proj_out."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"\.out_proj\.", ".o_proj."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"^no_mem_embed$", "no_memory_embedding"),
]
# The decoder's MLP heads: layers.0 / 1..n-2 / n-1 -> proj_in / layers.0..n-3 / proj_out.
_HEADS = re.compile(
    r"^(mask_decoder\.(?:iou_prediction_head|pred_obj_score_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\."
)
_POINT_EMBEDDING = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")


def is_sam2_checkpoint(state: dict) -> bool:
    """Whether a state dict holds an original SAM 2 / 2.1 model (Hiera trunk, SAM 2 mask decoder)."""
    return ENCODER_KEY in state and DECODER_KEY in state


def _count(state: dict, prefix: str) -> int:
    """How many numbered children ``prefix.N.`` the state dict has."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return 1 + max(found) if found else 0


def hiera_of(state: dict[str, torch.Tensor]) -> tuple[str, Hiera, list[int], float]:
    """The published trunk these weights are (name, layout), the stage widths and the MLP ratio."""
    width = state[ENCODER_KEY].shape[0]
    depth = _count(state, TRUNK + "blocks.")
    starts = [0] + [i for i in range(depth) if f"{TRUNK}blocks.{i}.proj.weight" in state]
    stages = tuple(b - a for a, b in zip(starts, [*starts[1:], depth]))
    widths = [width] + [state[f"{TRUNK}blocks.{i}.proj.weight"].shape[0] for i in starts[1:]]
    first_window = state[TRUNK + "pos_embed_window"].shape[-1]
    background = tuple(state[TRUNK + "pos_embed"].shape[-2:])
    for name, known in PUBLISHED.items():
        if (known.width, known.stages, known.windows[0], known.background) == (width, stages, first_window, background):
            mlp_ratio = state[TRUNK + "blocks.0.mlp.layers.0.weight"].shape[0] / width
            return name, known, widths, mlp_ratio
    raise ValueError(
        f"a Hiera trunk of width {width}, blocks per stage {list(stages)}, first window {first_window} and "
        f"background {list(background)} is none of the published ones ({', '.join(PUBLISHED)}): its heads, "
        "windows and global-attention blocks are not stored in the weights"
    )


def describe(state: dict[str, torch.Tensor]) -> str:
    """'SAM 2.1 Hiera-B+' and the like."""
    version = "SAM 2.1" if any(k in state for k in _SAM2_1_KEYS) else "SAM 2"
    return f"{version} {hiera_of(state)[0]}"


def config_from_state_dict(state: dict[str, torch.Tensor], image_size: int = IMAGE_SIZE) -> Sam2Config:
    """Sam2Config from original-format tensor shapes and the published trunk they match."""
    _, hiera, widths, mlp_ratio = hiera_of(state)
    backbone = Sam2HieraDetConfig(
        hidden_size=hiera.width,
        num_attention_heads=hiera.heads,
        image_size=[image_size, image_size],
        patch_kernel_size=list(state[ENCODER_KEY].shape[-2:]),
        blocks_per_stage=list(hiera.stages),
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[hiera.heads * 2**i for i in range(len(hiera.stages))],
        window_size_per_stage=list(hiera.windows),
        global_attention_blocks=list(hiera.global_blocks),
        window_positional_embedding_background_size=list(hiera.background),
        mlp_ratio=mlp_ratio,
    )
    levels = _count(state, "image_encoder.neck.convs.")
    necks = [state[f"image_encoder.neck.convs.{i}.conv.weight"] for i in range(levels)]
    channels = [w.shape[1] for w in necks]
    if channels != widths[::-1]:
        raise ValueError(f"the neck reads stages of widths {channels}, the trunk gives {widths[::-1]}")
    if "sam_mask_decoder.conv_s0.weight" not in state:
        raise ValueError("no high-resolution feature projections (conv_s0 / conv_s1) in the mask decoder")
    hidden = state[DECODER_KEY].shape[1]
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=channels,
        backbone_feature_sizes=[[image_size // s] * 2 for s in (4, 8, 16)],
        fpn_hidden_size=necks[0].shape[0],
        fpn_kernel_size=necks[0].shape[-1],
        num_feature_levels=3,
    )
    prompt = Sam2PromptEncoderConfig(
        hidden_size=state["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1] * 2,
        image_size=image_size,
        patch_size=16,
        mask_input_channels=state["sam_prompt_encoder.mask_downscaling.3.weight"].shape[0],
        num_point_embeddings=_count(state, "sam_prompt_encoder.point_embeddings."),
    )
    layer = "sam_mask_decoder.transformer.layers.0."
    decoder = Sam2MaskDecoderConfig(
        hidden_size=hidden,
        mlp_dim=state[layer + "mlp.layers.0.weight"].shape[0],
        num_hidden_layers=_count(state, "sam_mask_decoder.transformer.layers."),
        num_attention_heads=DECODER_HEADS,
        attention_downsample_rate=hidden // state[layer + "cross_attn_token_to_image.q_proj.weight"].shape[0],
        num_multimask_outputs=state["sam_mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count(state, "sam_mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=state["sam_mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def is_video_only(key: str) -> bool:
    return any(key.startswith(name) if name.endswith(".") else key == name for name in VIDEO_ONLY)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> Sam2Model keys, the video-only tensors left out."""
    depths = {}
    out = {}
    points = {}
    for key, value in state.items():
        if is_video_only(key):
            continue
        if match := _POINT_EMBEDDING.match(key):  # four Embedding(1, d) -> one Embedding(4, d)
            points[int(match.group(1))] = value
            continue
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        if match := _HEADS.match(key):
            prefix = match.group(1)
            if prefix not in depths:
                depths[prefix] = _count(state, "sam_" + prefix + ".layers.")
            index = int(match.group(2))
            last = depths[prefix] - 1
            name = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            key = _HEADS.sub(rf"\1.{name}.", key)
        out[key] = value
    if points:
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)])
    # Sam2Model keeps one copy of the prompt positional encoding at the top level as well.
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def model_from_state_dict(
    state: dict[str, torch.Tensor],
    source: str | Path,
    attn_implementation: str = "sdpa",
    image_size: int = IMAGE_SIZE,
) -> tuple[Sam2Model, ProcessorMixin]:
    """Sam2Model (eval mode) and its processor from an original SAM 2 / 2.1 state dict read from ``source``."""
    if not is_sam2_checkpoint(state):
        raise UserError(f"{source}: not a SAM 2 checkpoint (expected {ENCODER_KEY} and {DECODER_KEY})")
    if "sam_mask_decoder.hf_token.weight" in state:
        raise UserError(f"{source}: a SAM 2 HQ (HQ-SAM 2) checkpoint: transformers has no SAM 2 model with an HQ token")
    if image_size <= 0 or image_size % 32:
        raise UserError(f"{source}: input size {image_size} for SAM 2: a multiple of 32 (the trunk's coarsest stride)")
    try:
        config = config_from_state_dict(state, image_size)
    except (KeyError, IndexError, ValueError) as error:
        raise sam_format.shape_error(source, "SAM 2", error) from error
    config._attn_implementation = attn_implementation
    model = Sam2Model(config)
    sam_format.load_converted(model, convert_state_dict(state), source)
    processor = square_processor("sam2", image_size, mask_size=image_size // 4)
    return model.eval(), processor


def load_original_checkpoint(
    path: str | Path, attn_implementation: str = "sdpa", image_size: int = IMAGE_SIZE
) -> tuple[Sam2Model, ProcessorMixin]:
    """An original SAM 2 / 2.1 ``.pt`` (read with ``weights_only=True``) as Sam2Model and its processor."""
    return model_from_state_dict(sam_format.read_state_dict(path), path, attn_implementation, image_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an original SAM 2 / 2.1 checkpoint to a Sam2Model folder")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="input size (not stored in the file)")
    args = parser.parse_args(argv)
    state = sam_format.read_state_dict(args.checkpoint)
    model, processor = model_from_state_dict(state, args.checkpoint, image_size=args.image_size)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    dropped = sum(is_video_only(k) for k in state)
    print(f"saved {args.output}: {describe(state)} image model ({dropped} video-memory tensors left out)")


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune convert"))
