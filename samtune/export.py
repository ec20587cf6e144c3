"""Export trained weights as a plain model folder of their family with its processor and a model card.

    python -m samtune.export --adapter runs/demo/final --out exports/my-sam [--base facebook/sam-vit-base]

An adapter is merged into its base (by default the one recorded in adapter_config.json); adapters trained
on a 4-bit base are merged into the full-precision base weights, never into quantised ones. A model folder
(full / decoder / hq runs) is re-saved as it is. The result loads with
``AutoModelForMaskGeneration.from_pretrained`` (SamModel, SamHQModel, Sam2Model or Sam3TrackerModel) and
needs no PEFT. When the weights sit in a samtune run folder, the card (README.md) gives the run's training
config, data, method, trainable parameters and final metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from samtune.errors import UserError, run_command
from samtune.models.loading import is_adapter_folder, load_sam, merge_adapter


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def model_card(run: Path | None, base: str, source: Path, model_class: str = "SamModel") -> str:
    """README.md for an exported folder, from the run folder's config.yaml, parameters.json and results.json."""
    config = yaml.safe_load((run / "config.yaml").read_text()) if run and (run / "config.yaml").is_file() else None
    results = _read_json(run / "results.json") if run else None
    parameters = _read_json(run / "parameters.json") if run else None
    method = config["peft"]["method"] if config else "unknown"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: mask-generation",
        f"tags: [segment-anything, samtune, {method}, {model_class}]",
        f"base_model: {base}",
        "---",
        "",
        f"# {model_class} fine-tuned with samtune",
        "",
        f"A `{model_class}` exported from `{source}` (base `{base}`, method `{method}`), adapters merged: it loads",
        "with `AutoModelForMaskGeneration.from_pretrained` / `AutoProcessor.from_pretrained` and needs no PEFT.",
        "",
    ]
    if config:
        peft, data = config["peft"], config["data"]
        if method in ("lora", "dora", "qlora", "qdora"):
            lines.append(
                f"Adapters: rank {peft['rank']}, alpha {peft['alpha']}, targets `{peft['targets']}`"
                + (f", fully trained modules {peft['train_modules']}" if peft["train_modules"] else "")
                + "."
            )
        lines += [
            "",
            "## Data",
            "",
            f"- training: `{data['train_annotations']}` (images `{data['train_images']}`)",
            f"- validation: `{data['val_annotations'] or 'none'}`",
            f"- prompts: `{data['prompt']}`, at most {data['max_instances']} instances per image and step",
            "",
        ]
    if parameters:
        share = 100 * parameters["all"]["trainable"] / max(parameters["all"]["total"], 1)
        lines += [
            "## Trainable parameters",
            "",
            f"{parameters['all']['trainable']:,} of {parameters['all']['total']:,} ({share:.2f}%) during training:",
            "",
        ]
        lines += [f"- {part}: {v['trainable']:,} of {v['total']:,}" for part, v in parameters.items() if part != "all"]
        lines.append("")
    if results and results.get("final"):
        lines += [
            "## Validation metrics (per instance, original resolution)",
            "",
            "| weights | mIoU | mF1 |",
            "|---|---:|---:|",
        ]
        for name in ("zero_shot", "final"):
            if results.get(name):
                lines.append(
                    f"| {name.replace('_', '-')} | {100 * results[name]['mIoU']:.2f} | "
                    f"{100 * results[name]['mF1']:.2f} |"
                )
        if results.get("best_mIoU") is not None:
            lines.append(f"| best (step {results['best_step']}) | {100 * results['best_mIoU']:.2f} | |")
        lines += ["", f"{results.get('steps', '?')} optimizer steps."]
    if config:
        lines += [
            "",
            "## Training configuration",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=False).strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def run_folder_of(weights: Path) -> Path | None:
    parent = weights.resolve().parent
    return parent if (parent / "config.yaml").is_file() else None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter",
        type=Path,
        required=True,
        help="a run's final/ or best/: PEFT adapter folder, or model folder for full / decoder / hq",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported model")
    parser.add_argument("--base", help="base model (hub id or folder); default: the adapter's recorded base")
    args = parser.parse_args(argv)
    source = args.adapter
    if is_adapter_folder(source):
        base = args.base or json.loads((source / "adapter_config.json").read_text())["base_model_name_or_path"]
        out = merge_adapter(base, source, args.out)
    elif (source / "config.json").is_file():
        from samtune.config import ModelConfig

        model, processor = load_sam(ModelConfig(str(source)))
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        out, base = args.out, args.base or str(source)
    else:
        raise UserError(
            f"--adapter {source}: neither a PEFT adapter folder (adapter_config.json) nor a model folder "
            "(config.json); give a run's best/ or final/"
        )
    model_class = json.loads((out / "config.json").read_text())["architectures"][0]
    (out / "README.md").write_text(model_card(run_folder_of(source), base, source, model_class))
    print(f"exported {source} (base {base}) to {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune export"))
