"""Trainable-parameter counts of every method and target preset, for the published architectures of every family.

    python benchmarks/param_counts.py [--presets vit-b sam2.1-hiera-t ...] [--rank 8] [--json out.json]
    python benchmarks/param_counts.py --quick --json out.json     # SAM ViT-B only: what the tests run

Counts depend on the architecture only, so models are built on the meta device (no weights, no download, no
time measured): --device takes cpu only, --threads is recorded. Each model is its family's class
(AutoModelForMaskGeneration: SamModel, SamHQModel, Sam2Model, Sam3TrackerModel), image part only; the target
presets are the family's own module names for the same layers (samtune.models.methods.target_presets). SAM-HQ
adds the hq method (its HQ token and fusion modules alone) and LoRA / DoRA on peft-sam with those modules trained
fully beside them (train_modules hq). qlora / qdora train exactly the adapters lora / dora train; their base is
stored in 4 bits. The JSON report is every benchmark's (benchmarks/common.py): one row per (model, method,
targets, train_modules).
"""

from __future__ import annotations

import common
import torch
from transformers import AutoModelForMaskGeneration

from samtune.config import PeftConfig
from samtune.models.architectures import PRESET_FAMILIES, PRESETS, preset_config
from samtune.models.family import FAMILIES, HQ_MODULES, family_of
from samtune.models.methods import TARGET_PRESET_NAMES, apply_method, parameter_report

ADAPTERS = ("lora", "dora")
# every published architecture (not the demo and test-sized ones)
PUBLISHED_PRESETS = [name for name in PRESETS if name != "demo" and not name.startswith("tiny")]


def build(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForMaskGeneration.from_config(preset_config(name))


def count(name: str, method: str, targets: str, rank: int, train_modules: tuple[str, ...] = ()) -> dict:
    model = build(name)
    family = family_of(model)
    hq_total = sum(p.numel() for n, p in model.named_parameters() if n.startswith(tuple(f"{m}." for m in HQ_MODULES)))
    spec = PeftConfig(method=method, targets=targets, rank=rank, train_modules=list(train_modules))
    model = apply_method(model, spec)
    report = parameter_report(model)
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    adapters = method in ADAPTERS
    return {
        "architecture": name,
        "family": family.model_type,
        "model_class": type(model.get_base_model() if adapters else model).__name__,
        "method": method,
        "targets": targets if adapters else "-",
        "train_modules": "+".join(train_modules) or "-",
        "rank": rank if adapters else None,
        "trainable": report["all"]["trainable"],
        "base_total": base_total,
        "percent": 100.0 * report["all"]["trainable"] / base_total,
        "encoder": report["vision_encoder"]["trainable"],
        "decoder": report["mask_decoder"]["trainable"],
        "encoder_total": report["vision_encoder"]["total"],
        "decoder_total": report["mask_decoder"]["total"],
        "hq_modules_total": hq_total if family.hq else None,
    }


def plan(name: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(method, targets, train_modules) of every row of one model."""
    rows = [("full", "peft-sam", ()), ("decoder", "peft-sam", ())]
    if FAMILIES[PRESET_FAMILIES[name]].hq:
        rows.append(("hq", "peft-sam", ()))
    rows += [(method, targets, ()) for method in ADAPTERS for targets in TARGET_PRESET_NAMES]
    if FAMILIES[PRESET_FAMILIES[name]].hq:
        rows += [(method, "peft-sam", ("hq",)) for method in ADAPTERS]
    return rows


QUICK = {"presets": ["vit-b"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__,
        __doc__,
        quick="SAM ViT-B only",
        cpu_only="parameters are counted on the meta device, nothing is computed",
    )
    parser.add_argument(
        "--presets",
        nargs="+",
        default=PUBLISHED_PRESETS,
        choices=PRESETS,
        metavar="NAME",
        help=f"default: every published architecture; any of {', '.join(PRESETS)}",
    )
    parser.add_argument("--rank", type=int, default=8)
    args = common.parse(parser, argv, quick=QUICK)
    rows = [
        count(name, method, targets, args.rank, modules)
        for name in dict.fromkeys(args.presets)
        for method, targets, modules in plan(name)
    ]
    print(f"rank {args.rank}; qlora / qdora: same trainable counts as lora / dora\n")
    print("| model | method | targets | + trained fully | trainable | % of base | in encoder | in decoder |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['architecture']} | {r['method']} | {r['targets']} | {r['train_modules']} | {r['trainable']:,} "
            f"| {r['percent']:.3f} | {r['encoder']:,} | {r['decoder']:,} |"
        )
    common.report(args, rows, rank=args.rank)
    return rows


if __name__ == "__main__":
    main()
