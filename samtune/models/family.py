"""The model families samtune fine-tunes, and every fact that differs between them, in one table.

A family is read from the checkpoint's config (``config.model_type``), never guessed from a name. Data, loop,
metrics, cache and export ask the family; nothing else looks at model classes:

- geometry: SAM / SAM-HQ resize the longest side and pad; SAM 2 / SAM 3 resize to a fixed square, so masks go
  back to the original size by one bilinear resize instead of upsample, crop, resize;
- module names behind the adapter presets (``samtune.models.methods``);
- what the image encoder hands the decoder: SAM one embedding; SAM-HQ the embedding and the first
  global-attention layer's output (``intermediate_embeddings[0]``, all its decoder reads); SAM 2 / SAM 3 three
  feature levels, of which the decoder
  projects the two finest itself (``conv_s0`` / ``conv_s1``, decoder weights, so the cache stores them raw);
- extra outputs and options: SAM 2 / SAM 3 object-score logits, SAM-HQ's ``hq_token_only``;
- whether samtune's fast image encoder applies (the SAM ViT: SAM and SAM-HQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samtune.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    label: str
    square_input: bool  # fixed-square resize (SAM 2 / 3) rather than longest side + pad (SAM / SAM-HQ)
    encoder_block: str  # regex of one image-encoder block's module name
    encoder_attn: str  # the attention linears inside a block
    encoder_mlp: str  # the MLP linears inside a block
    encoder_qkv: str  # the query / key / value projection(s): what PEFT-SAM adapts in the encoder
    object_score: bool = False  # the decoder also predicts whether the object is present
    hq: bool = False  # SAM-HQ's HQ token and feature fusion
    fast_encoder: bool = False  # samtune's fast SAM ViT encoder applies
    gradient_checkpointing: bool = False  # transformers supports it for this model class
    # The published weights' license (a Hub card's license / license_name): what a fine-tune inherits
    license: str = "apache-2.0"
    license_name: str | None = None  # for license "other"

    @property
    def multi_level(self) -> bool:
        return self.square_input


_SAM_VIT = {
    "encoder_block": r"vision_encoder\.layers\.\d+",
    "encoder_attn": r"attn\.(qkv|proj)",
    "encoder_mlp": r"mlp\.(lin1|lin2)",
    "encoder_qkv": r"attn\.qkv",
    "fast_encoder": True,
    "gradient_checkpointing": True,
}
FAMILIES = {
    family.model_type: family
    for family in (
        Family("sam", "SAM", square_input=False, **_SAM_VIT),
        Family("sam_hq", "SAM-HQ", square_input=False, hq=True, **_SAM_VIT),
        Family(
            "sam2",
            "SAM 2 / 2.1",
            square_input=True,
            encoder_block=r"vision_encoder\.backbone\.blocks\.\d+",
            encoder_attn=r"attn\.(qkv|proj)",
            encoder_mlp=r"mlp\.(proj_in|proj_out)",
            encoder_qkv=r"attn\.qkv",
            object_score=True,
        ),
        Family(
            "sam3_tracker",
            "SAM 3 tracker",
            square_input=True,
            encoder_block=r"vision_encoder\.backbone\.layers\.\d+",
            encoder_attn=r"attention\.(q_proj|k_proj|v_proj|o_proj)",
            encoder_mlp=r"mlp\.(fc1|fc2)",
            encoder_qkv=r"attention\.(q_proj|k_proj|v_proj)",  # unfused: the three PEFT-SAM's fused qkv holds
            object_score=True,
            license="other",
            license_name="sam-license",
        ),
    )
}
# SAM-HQ's own modules (the paper's ~0.5% of parameters): HQ output token, its MLP, and the global-local fusion.
HQ_MODULES = tuple(
    f"mask_decoder.{name}"
    for name in (
        "hq_token",
        "hq_mask_mlp",
        "compress_vit_conv1",
        "compress_vit_norm",
        "compress_vit_conv2",
        "encoder_conv1",
        "encoder_norm",
        "encoder_conv2",
        "mask_conv1",
        "mask_norm",
        "mask_conv2",
    )
)


# Checkpoints of the video models whose image part AutoModelForMaskGeneration loads as the image model.
ALIASES = {"sam2_video": "sam2", "sam3_video": "sam3_tracker"}


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP / PeftModel wrapper (or the model itself)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model_or_config) -> Family:
    """The family of a model (PeftModel-wrapped too) or config, from its ``model_type``."""
    config = getattr(base_of(model_or_config), "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in FAMILIES:
        why = " (its backbone comes through timm, which needs torchvision)" if model_type == "edgetam" else ""
        raise UserError(
            f"model type {model_type!r} is not one samtune fine-tunes{why}; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def image_features(
    model: torch.nn.Module, pixel_values: torch.Tensor, project: bool = False
) -> dict[str, torch.Tensor]:
    """What the decoder consumes of the image encoder, as named tensors with a leading batch axis (what the
    embedding cache stores). Gradients flow when enabled (unlike transformers' ``get_image_embeddings``).

    SAM 2 / 3: the three levels as the encoder gives them, or with ``project`` the two finest already through
    the decoder's ``conv_s0`` / ``conv_s1`` (8x / 4x fewer channels: what a cache can store when those are frozen).
    """
    base = base_of(model)
    family = family_of(base)
    out = base.vision_encoder(pixel_values)
    if family.square_input:
        levels = list(out.fpn_hidden_states)[: len(base.backbone_feature_sizes)]
        features = {f"level{n}": level for n, level in enumerate(levels)}
        if project:
            features["projected0"] = base.mask_decoder.conv_s0(features.pop("level0"))
            features["projected1"] = base.mask_decoder.conv_s1(features.pop("level1"))
        return features
    features = {"embedding": out[0]}
    if family.hq:  # the decoder fuses the first global layer's output only (as SAM-HQ's MaskDecoderHQ does)
        features["intermediate0"] = out.intermediate_embeddings[0]
    return features


def decoder_inputs(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> dict:
    """``image_features`` as the model's forward takes them in place of ``pixel_values``."""
    base = base_of(model)
    family = family_of(base)
    if family.square_input:
        # as the model's own get_image_features / forward: the decoder's projections of the two finest levels
        # (unless already applied), and the "no memory" embedding on the coarsest when it is one the decoder reads
        levels = [
            features[f"projected{n}"] if f"projected{n}" in features else projection(features[f"level{n}"])
            for n, projection in enumerate((base.mask_decoder.conv_s0, base.mask_decoder.conv_s1))
        ]
        levels += [features[f"level{n}"] for n in range(2, len(base.backbone_feature_sizes))]
        if len(levels) == _emitted_levels(base):
            levels[-1] = levels[-1] + base.no_memory_embedding.view(1, -1, 1, 1)
        return {"image_embeddings": levels}
    inputs = {"image_embeddings": features["embedding"]}
    if family.hq:
        inputs["intermediate_embeddings"] = [features["intermediate0"]]
    return inputs


def decoder_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """SAM 2 / 3: the decoder's projections of the two finest levels (none for SAM / SAM-HQ)."""
    base = base_of(model)
    if not family_of(base).square_input:
        return []
    return [base.mask_decoder.conv_s0, base.mask_decoder.conv_s1]


def _emitted_levels(base: torch.nn.Module) -> int:
    """How many feature levels the vision encoder emits (SAM 3's emits one more than the tracker reads)."""
    vision = base.config.vision_config
    if getattr(vision, "scale_factors", None):
        return len(vision.scale_factors)
    return vision.num_feature_levels


def post_process_masks(
    processor,
    logits: torch.Tensor,
    original_sizes: torch.Tensor,
    reshaped_input_sizes: torch.Tensor,
    binarize: bool = True,
) -> list[torch.Tensor]:
    """Binary masks at each image's original size from (B, K, 1, h, w) low-resolution logits, by the family's own
    processor: SAM / SAM-HQ upsample, crop the padding and resize; SAM 2 / 3 resize once (no padding).
    ``binarize=False``: the upscaled logits themselves (what SAM's stability score is computed on)."""
    padded = getattr(processor.image_processor, "pad_size", None)
    if padded:
        return processor.post_process_masks(logits, original_sizes, reshaped_input_sizes, binarize=binarize)
    return processor.post_process_masks(logits, original_sizes, binarize=binarize)


def forward_options(model: torch.nn.Module, hq_token_only: bool = False) -> dict:
    """Family-specific forward arguments: SAM-HQ's ``hq_token_only``."""
    return {"hq_token_only": hq_token_only} if family_of(model).hq else {}
