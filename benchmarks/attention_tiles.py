"""One global-attention layer of the SAM image encoder: transformers' attention against the fast encoder's,
by precision, tile size and kernel; forward only, or forward and backward.

    python benchmarks/attention_tiles.py --preset vit-b [--grad] [--tiles 19 20 21 22] [--threads 2]
    python benchmarks/attention_tiles.py --quick        # tiny model: what the tests run

The module is the preset's ``SamVisionSdpaAttention`` for the whole token grid (window 0) at --image-size,
random weights and random relative-position tables; the fast variants are the same module with its class
swapped (samtune.fast_encoder), so both run the same qkv / proj layers and differ only in attention. Tiles:
2**T scores per tile. Kernel: "fused" is PyTorch's fused CPU SDPA kernel per tile, "products" separate
matrix products and softmax per tile (what the fast encoder uses for bf16 inference). With --grad the input
and the weights require gradients and backward runs too. Each time is the best of --repeats after
one warm-up, monotonic clock; it is what the choices in samtune/fast_encoder.py were measured with.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention  # noqa: E402

import samtune.fast_encoder as fast  # noqa: E402
from samtune.presets import PRESETS, preset_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return min(times)


def layer(preset: str, image_size: int | None) -> SamVisionSdpaAttention:
    config = preset_config(preset, image_size).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = SamVisionSdpaAttention(config, window_size=0)
    with torch.no_grad():
        module.rel_pos_h.normal_(0, 0.5)
        module.rel_pos_w.normal_(0, 0.5)
    return module


def measure(module, dtype: torch.dtype, grad: bool, repeats: int) -> float:
    side = module.rel_pos_h.shape[0] // 2 + 1
    hidden = torch.randn(1, side, side, module.qkv.in_features, requires_grad=grad)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(grad):
            out = module(hidden)[0]
        if grad:
            out.float().sum().backward()

    return best_seconds(step, repeats)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b", choices=PRESETS)
    parser.add_argument("--image-size", type=int, help="input size (default: the preset's, 1024)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--tiles", nargs="+", type=int, default=[19, 20, 21, 22], help="log2 scores per tile")
    parser.add_argument("--grad", action="store_true", help="forward and backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny model at 128, 1 repeat")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.image_size, args.tiles, args.repeats = "tiny", 128, [8, 20], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    plain = layer(args.preset, args.image_size)
    quick = copy.deepcopy(plain)
    fast.enable_fast_encoder(quick)
    rows = []
    saved = fast.TILE_ELEMENTS, fast._fused_kernel
    try:
        for precision in args.precision:
            dtype = DTYPES[precision]
            baseline = measure(plain, dtype, args.grad, args.repeats)
            rows.append({"precision": precision, "variant": "transformers", "seconds": baseline})
            # with gradients the fast encoder always takes the fused kernel (it needs its log-sum-exp)
            kernels = ["fused"] if args.grad else ["fused", "products"]
            for kernel in kernels:
                fast._fused_kernel = (lambda q, want_lse: True) if kernel == "fused" else (lambda q, want_lse: False)
                for tiles in args.tiles:
                    fast.TILE_ELEMENTS = 2**tiles
                    seconds = measure(quick, dtype, args.grad, args.repeats)
                    variant = f"fast {kernel} 2^{tiles}"
                    rows.append({"precision": precision, "variant": variant, "seconds": seconds})
            for row in rows:
                if row["precision"] == precision:
                    row["speedup"] = baseline / row["seconds"]
    finally:
        fast.TILE_ELEMENTS, fast._fused_kernel = saved
    side = plain.rel_pos_h.shape[0] // 2 + 1
    print(
        f"{args.preset} global-attention layer, {side}x{side} tokens, {plain.num_attention_heads} heads; "
        f"{'forward + backward' if args.grad else 'forward'}; cpu, {torch.get_num_threads()} threads; "
        f"best of {args.repeats}"
    )
    print("| precision | variant | ms | vs transformers |")
    print("|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['precision']} | {row['variant']} | {row['seconds'] * 1000:.1f} | {row['speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
