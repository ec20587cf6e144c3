"""Trainable-parameter counts of every method and target preset, for SAM ViT-B/L/H- and SlimSAM-sized models.

    python benchmarks/param_counts.py [--presets vit-b slimsam-77] [--json out.json]

Counts depend on the architecture only, so models are built on the meta device (no weights, no download).
qlora / qdora train exactly the adapters lora / dora train; their base is stored in 4 bits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import SamModel  # noqa: E402

from samtune.config import PeftConfig  # noqa: E402
from samtune.modeling import TARGET_PRESETS, apply_method, parameter_report  # noqa: E402
from samtune.presets import ARCHITECTURES, preset_config  # noqa: E402


def count(name: str, method: str, targets: str, rank: int) -> dict:
    with torch.device("meta"):
        model = SamModel(preset_config(name))
    model = apply_method(model, PeftConfig(method=method, targets=targets, rank=rank))
    report = parameter_report(model)
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {
        "architecture": name,
        "method": method,
        "targets": targets if method in ("lora", "dora") else "-",
        "trainable": report["all"]["trainable"],
        "base_total": base_total,
        "percent": 100.0 * report["all"]["trainable"] / base_total,
        "encoder": report["vision_encoder"]["trainable"],
        "decoder": report["mask_decoder"]["trainable"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["vit-b", "slimsam-77"], choices=list(ARCHITECTURES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for name in args.presets:
        for method in ("full", "decoder"):
            rows.append(count(name, method, "peft-sam", args.rank))
        for method in ("lora", "dora"):
            for targets in TARGET_PRESETS:
                rows.append(count(name, method, targets, args.rank))
    print(f"rank {args.rank}; qlora / qdora: same trainable counts as lora / dora\n")
    print("| model | method | targets | trainable | % of base | in encoder | in decoder |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['architecture']} | {r['method']} | {r['targets']} | {r['trainable']:,} | {r['percent']:.3f} "
            f"| {r['encoder']:,} | {r['decoder']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
