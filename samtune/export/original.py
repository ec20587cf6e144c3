"""``--format segment-anything``: merged weights as the original packages' checkpoint files.

- SAM (Meta's, MedSAM, SlimSAM sizes): ``sam.pth``, a state dict for ``segment_anything``'s ``Sam``
  (``sam_model_registry["vit_b" | "vit_l" | "vit_h"](checkpoint=...)`` for the published sizes);
- SAM-HQ: ``sam_hq.pth`` for ``segment_anything_hq``'s ``sam_model_registry``;
- SAM 2 / 2.1: ``sam2.pt`` as ``{"model": state_dict}``. A ``Sam2Model`` is the image model only; the video
  model's memory tensors are copied from the base when it was an original ``.pt``, else left out, and then
  ``build_sam2`` (which loads strictly) needs ``ckpt_path=None`` and ``model.load_state_dict(sd, strict=False)``.
- SAM 3 tracker: no original standalone checkpoint format; refused.

The key maps are those of samtune's importers, run backwards and checked forwards (``samtune.models.to_original``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from samtune.errors import UserError
from samtune.models import sam2_checkpoint, to_original
from samtune.models.family import family_of
from samtune.models.segment_anything_checkpoint import is_original_checkpoint, read_state_dict

REGISTRY = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}  # ViT width -> sam_model_registry key (1024 px input)


def save_original(model: PreTrainedModel, out: Path, base: str | None = None) -> str:
    """Write the original-format checkpoint of ``model`` into ``out``; returns a line saying how to load it."""
    family = family_of(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if family.model_type in ("sam", "sam_hq"):
        original = to_original.sam_state_dict(state)
        package, name = ("segment_anything_hq", "sam_hq.pth") if family.hq else ("segment_anything", "sam.pth")
        torch.save(original, out / name)
        vision = model.config.vision_config
        key = REGISTRY.get(vision.hidden_size) if vision.image_size == 1024 else None
        how = f'`{package}.sam_model_registry["{key}"](checkpoint="{name}")`' if key else f"`{package}`'s `Sam`"
        return f"{name}: original {family.label} state dict for {how}"
    if family.model_type == "sam2":
        original = to_original.sam2_state_dict(state)
        video = {}
        if base and is_original_checkpoint(base):
            video = {k: v for k, v in read_state_dict(base).items() if sam2_checkpoint.is_video_only(k)}
        torch.save({"model": {**original, **video}}, out / "sam2.pt")
        if video:
            return f"sam2.pt: original SAM 2 checkpoint (video-memory tensors of {Path(base).name}) for `build_sam2`"
        return (
            "sam2.pt: original SAM 2 image-model weights, without the video model's memory tensors: "
            "`build_sam2(config, ckpt_path=None)`, then `model.load_state_dict(torch.load('sam2.pt')['model'], "
            "strict=False)`"
        )
    raise UserError(
        f"--format segment-anything: {family.label} has no original standalone checkpoint format samtune writes "
        "(SAM, SAM-HQ and SAM 2 do); export it as --format hf or onnx"
    )
