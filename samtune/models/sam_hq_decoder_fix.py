"""SAM-HQ's mask decoder as SAM-HQ defines it, where the installed transformers gets one line wrong.

transformers 5.24's ``SamHQMaskDecoder.forward`` keeps the two-way transformer's image output under the name
``iou_token_out``, overwrites it, and upscales the image embedding as it *entered* the transformer instead:
with SAM-HQ's published weights its masks then differ from the official ``MaskDecoderHQ`` by 0.3-0.5 in logits
(tests/test_original_checkpoints.py measures both). ``fix_sam_hq_decoder`` hands ``upscale_conv1`` the
transformer's output through two forward hooks, which is the official computation (equal to 1e-5 there). The
weights and the module tree are untouched, so saving, PEFT and merging are unaffected; the hooks are added only
while the installed transformers still has that line, so a fixed release is used as it is.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def decoder_needs_fix() -> bool:
    """True while the installed SamHQMaskDecoder upscales the pre-transformer embedding."""
    from transformers.models.sam_hq.modeling_sam_hq import SamHQMaskDecoder

    return "point_embedding, iou_token_out = self.transformer(" in inspect.getsource(SamHQMaskDecoder.forward)


def fix_sam_hq_decoder(model: torch.nn.Module) -> bool:
    """Hook a SamHQModel's mask decoder so that it upscales the transformer's image output; True if hooked."""
    decoder = model.mask_decoder
    if not decoder_needs_fix() or getattr(decoder, "_samtune_upscales_transformer_output", False):
        return False
    seen: dict[str, torch.Tensor] = {}

    def keep_image_output(module, args, output):
        seen["keys"] = output[1]  # (B * prompts, 1, h * w, C): the image tokens after the two-way transformer

    def upscale_it(module, args):
        # the decoder transposes its (B, C, h, w) embedding into this layout before upscaling; do the same
        return (seen.pop("keys").transpose(2, 3).reshape(args[0].shape),)

    decoder.transformer.register_forward_hook(keep_image_output)
    decoder.upscale_conv1.register_forward_pre_hook(upscale_it)
    decoder._samtune_upscales_transformer_output = True
    return True
