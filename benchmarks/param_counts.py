"""Trainable-parameter counts of every method and target preset, for SAM ViT-B/L/H- and SlimSAM-sized models.

    python benchmarks/param_counts.py [--presets vit-b slimsam-77] [--rank 8] [--json out.json]
    python benchmarks/param_counts.py --quick --json out.json     # SAM ViT-B only: what the tests run

Counts depend on the architecture only, so models are built on the meta device (no weights, no download, no
time measured): --device takes cpu only, --threads is recorded. qlora / qdora train exactly the adapters lora /
dora train; their base is stored in 4 bits. The JSON report is every benchmark's (benchmarks/common.py): one
row per (model, method, targets).
"""

from __future__ import annotations

import common
import torch
from transformers import SamModel

from samtune.config import PeftConfig
from samtune.models.architectures import PRESETS, preset_config
from samtune.models.methods import TARGET_PRESETS, apply_method, parameter_report


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
        "rank": rank if method in ("lora", "dora") else None,
        "trainable": report["all"]["trainable"],
        "base_total": base_total,
        "percent": 100.0 * report["all"]["trainable"] / base_total,
        "encoder": report["vision_encoder"]["trainable"],
        "decoder": report["mask_decoder"]["trainable"],
    }


QUICK = {"presets": ["vit-b"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__,
        __doc__,
        quick="SAM ViT-B only",
        cpu_only="parameters are counted on the meta device, nothing is computed",
    )
    parser.add_argument("--presets", nargs="+", default=["vit-b", "slimsam-77"], choices=PRESETS)
    parser.add_argument("--rank", type=int, default=8)
    args = common.parse(parser, argv, quick=QUICK)
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
    common.report(args, rows, rank=args.rank)
    return rows


if __name__ == "__main__":
    main()
