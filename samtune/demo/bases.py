"""The demo bases: one tiny model per family, each pretrained by samtune itself on the synthetic source domain.

    samtune train                            the demo on the SAM base (samtune/demo/base)
    samtune train --model.demo_base sam2     the same demo on the SAM 2 base (samtune/demo/base-sam2)
    samtune demo pretrain --base sam2 --output runs/demo-pretrain-sam2 [--install]   pretrain it again

Every base sees the same source data and the same pretraining settings (``samtune/demo/pretrain.yaml``), and is
fine-tuned by the same default run (``samtune/demo/run.yaml``) on the same target domain: only the architecture
differs. Each config is random-initialised so that it trains from scratch (see the comments in each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    PreTrainedConfig,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

from samtune.errors import UserError
from samtune.models.architectures import demo_sam_config


def demo_sam2_config() -> Sam2Config:
    """The SAM 2 demo base: about 0.98M parameters, SAM 2.1's architecture at 256 px, pretrainable on a laptop CPU.

    The trunk is SAM 2.1 Hiera-T's (stages of 1, 2, 7 and 2 blocks, global attention in blocks 5, 7 and 9, heads
    doubling with the width) at a sixth of its width, 16 channels to 128; the FPN neck, the prompt encoder and the
    mask decoder are 64 wide, as the SAM demo base's. At 256 px the stages see 64, 32, 16 and 8 tokens a side and
    the decoder reads the levels at 1/4, 1/8 and 1/16, as SAM 2 does at 1024 px.
    """
    widths = [16, 32, 64, 128]
    backbone = Sam2HieraDetConfig(
        hidden_size=widths[0],
        num_attention_heads=1,
        image_size=[256, 256],
        blocks_per_stage=[1, 2, 7, 2],
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[1, 2, 4, 8],  # 16 channels a head throughout
        window_size_per_stage=[8, 4, 8, 8],  # stage 4 (8 x 8 tokens): one window, global
        global_attention_blocks=[5, 7, 9],  # in stage 3 (blocks 3-9); a global block may not open a stage
        window_positional_embedding_background_size=[7, 7],
        initializer_range=0.02,  # every tower at 0.02 (SAM's ViT default, 1e-10, left a from-scratch encoder dead)
    )
    sides = [256 // 4, 256 // 8, 256 // 16]
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[side, side] for side in sides],
        fpn_hidden_size=64,
        fpn_top_down_levels=[2, 3],
        initializer_range=0.02,
    )
    # The prompt encoder's random Fourier features: SAM 2 keeps original SAM's scale 1 (transformers' SAM derives
    # hidden_size // 2, whose very high frequencies a model trained from scratch cannot use); stated, not inherited.
    prompt = Sam2PromptEncoderConfig(hidden_size=64, image_size=256, patch_size=16, mask_input_channels=8, scale=1)
    decoder = Sam2MaskDecoderConfig(hidden_size=64, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=64)
    return Sam2Config(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=0.02
    )


@dataclass(frozen=True)
class DemoBase:
    name: str
    folder: Path  # the shipped weights, config, processor and pretraining.json
    config: Callable[[], PreTrainedConfig]  # its architecture, random weights of which pretraining starts from
    # Pretraining steps spent on the decoder alone first (the encoder frozen at its random weights), out of the
    # total. SAM 2 trained jointly from scratch settles on the union of all objects and never reads its prompts
    # (own and shuffled boxes score the same, at every budget, learning rate and init tried). Decoder-first
    # then full, both with boxes, reads them (500 + 500 steps: own 25.6% vs shuffled 8.9% box mIoU; the shipped
    # base, 500 + 2500 on box+point: own 59.5% vs shuffled 3.1%); mixed prompts fall back to the union (23.3% both).
    decoder_first_steps: int = 0
    # The prompts pretraining draws (data.prompt; pretrain.yaml's mixed unless set). SAM 2 pretrains on box+point
    # (a box with one click inside): a batch with lone clicks (mixed's point draws) pulls it back to the union.
    prompt: str = "mixed"


HERE = Path(__file__).resolve().parent
BASES = {
    "sam": DemoBase("sam", HERE / "base", demo_sam_config),  # samtune.demo.assets.BASE_DIR
    "sam2": DemoBase("sam2", HERE / "base-sam2", demo_sam2_config, decoder_first_steps=500, prompt="box+point"),
}
DEFAULT_BASE = "sam"


def demo_base(name: str) -> DemoBase:
    """The registered demo base called ``name``."""
    if name not in BASES:
        raise UserError(f"unknown demo base {name!r}; choose from {', '.join(BASES)}")
    return BASES[name]


def shipped_base(name: str) -> DemoBase:
    """``demo_base(name)``, refused in one line when its weights are not in the package (not shipped yet, or
    removed), with the command that makes them."""
    base = demo_base(name)
    if not (base.folder / "config.json").is_file():
        raise UserError(
            f"the {name} demo base is not in this installation ({base.folder}); make it with: "
            f"samtune demo pretrain --base {name} --output runs/demo-pretrain-{name} --install"
        )
    return base
