"""One global-attention layer of the SAM image encoder: transformers' attention against the fast encoder's,
by precision, tile size and kernel; forward only, or forward and backward.

    python benchmarks/attention_tiles.py --preset vit-b [--grad] [--tiles 19 20 21 22] [--repeats 5] [--threads 2]
        [--json out.json]
    python benchmarks/attention_tiles.py --quick --json out.json  # tiny model at 128 px: what the tests run

The module is the preset's ``SamVisionSdpaAttention`` for the whole token grid (window 0) at --image-size,
random weights and random relative-position tables; the fast variants are the same module with its class
swapped (samtune.models.fast_encoder), so both run the same qkv / proj layers and differ only in attention.
Tiles: 2**T scores per tile. Kernel: "fused" is PyTorch's fused CPU SDPA kernel per tile, "products" separate
matrix products and softmax per tile (what the fast encoder uses for bf16 inference). With --grad the input and
the weights require gradients and backward runs too. Timing and the JSON report are every benchmark's
(benchmarks/common.py): median and p90 in ms of --repeats calls after --warmup (keys median_ms, p90_ms);
"vs transformers" compares medians. It is what the choices in samtune/models/fast_encoder.py were measured
with; the CPU kernels are the subject, so --device takes cpu only.
"""

from __future__ import annotations

import copy

import common
import torch
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

import samtune.models.fast_encoder as fast
from samtune.models.architectures import PRESET_FAMILIES, preset_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the fast encoder's attention is SAM's ViT attention: SAM and SAM-HQ presets (SAM-HQ's ViT is SAM's)
VIT_PRESETS = [name for name, family in PRESET_FAMILIES.items() if family in ("sam", "sam_hq")]


def layer(preset: str, image_size: int | None) -> SamVisionSdpaAttention:
    config = preset_config(preset, image_size).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = SamVisionSdpaAttention(config, window_size=0)
    with torch.no_grad():
        module.rel_pos_h.normal_(0, 0.5)
        module.rel_pos_w.normal_(0, 0.5)
    return module


def measure(module, dtype: torch.dtype, grad: bool, repeats: int, warmup: int) -> dict[str, float]:
    side = module.rel_pos_h.shape[0] // 2 + 1
    hidden = torch.randn(1, side, side, module.qkv.in_features, requires_grad=grad)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(grad):
            out = module(hidden)[0]
        if grad:
            out.float().sum().backward()

    return common.timing("", common.time_calls(step, repeats, warmup, common.Timer("cpu")))


QUICK = {"preset": "tiny", "image_size": 128, "tiles": [8, 20], "repeats": 3, "warmup": 1}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__,
        __doc__,
        quick="the tiny preset at 128 px, tiles 2^8 and 2^20, 3 timed calls after 1 warm-up",
        cpu_only="it measures the fast encoder's CPU attention kernels",
    )
    parser.add_argument("--preset", default="vit-b", choices=VIT_PRESETS, help="a SAM / SAM-HQ ViT preset")
    parser.add_argument("--image-size", type=int, help="input size (default: the preset's, 1024)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--tiles", nargs="+", type=int, default=[19, 20, 21, 22], help="log2 scores per tile")
    parser.add_argument("--grad", action="store_true", help="forward and backward")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    args = common.parse(parser, argv, quick=QUICK)
    plain = layer(args.preset, args.image_size)
    quick = copy.deepcopy(plain)
    fast.enable_fast_encoder(quick)
    rows = []
    saved = fast.TILE_ELEMENTS, fast._fused_kernel
    try:
        for precision in args.precision:
            dtype = DTYPES[precision]
            times = measure(plain, dtype, args.grad, args.repeats, args.warmup)
            mine = [{"precision": precision, "variant": "transformers", "kernel": None, "tile_log2": None, **times}]
            # with gradients the fast encoder always takes the fused kernel (it needs its log-sum-exp)
            kernels = ["fused"] if args.grad else ["fused", "products"]
            for kernel in kernels:
                fast._fused_kernel = (lambda q, want_lse: True) if kernel == "fused" else (lambda q, want_lse: False)
                for tiles in args.tiles:
                    fast.TILE_ELEMENTS = 2**tiles
                    times = measure(quick, dtype, args.grad, args.repeats, args.warmup)
                    variant = f"fast {kernel} 2^{tiles}"
                    mine.append(
                        {"precision": precision, "variant": variant, "kernel": kernel, "tile_log2": tiles, **times}
                    )
            for row in mine:
                row["speedup"] = mine[0]["median_ms"] / row["median_ms"]
            rows += mine
    finally:
        fast.TILE_ELEMENTS, fast._fused_kernel = saved
    side = plain.rel_pos_h.shape[0] // 2 + 1
    print(
        f"{args.preset} global-attention layer, {side}x{side} tokens, {plain.num_attention_heads} heads; "
        f"{'forward + backward' if args.grad else 'forward'}; {common.describe(args.device)}; "
        f"median (p90) of {args.repeats} after {args.warmup} warm-up"
    )
    print("| precision | variant | ms (p90) | vs transformers |")
    print("|---|---|---:|---:|")
    for row in rows:
        print(
            f"| {row['precision']} | {row['variant']} | {row['median_ms']:.1f} ({row['p90_ms']:.1f}) "
            f"| {row['speedup']:.2f}x |"
        )
    common.report(
        args,
        rows,
        layer=f"{args.preset} global attention, {side}x{side} tokens, {plain.num_attention_heads} heads",
        grad=args.grad,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    return rows


if __name__ == "__main__":
    main()
