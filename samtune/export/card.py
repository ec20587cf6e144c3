"""Model cards (README.md) for exported folders and a run's adapter folders, through huggingface_hub's
``ModelCard`` / ``ModelCardData``, from the run folder's config.yaml, parameters.json and results.json.

``base_model`` is the base's Hub id as the run's config names it; a local folder or an original ``.pth`` is no
Hub id, so the field is left out rather than written as a path that means nothing elsewhere (the body names it).
Validation and test scores become ``eval_results`` (mIoU / mF1 per instance, at the original resolution).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from samtune.config import ADAPTER_METHODS
from samtune.models.family import FAMILIES

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub id ("org/model") and is no file or folder here; else None."""
    if not name or Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name):
        return None
    if name.lower().endswith(_CHECKPOINT_SUFFIXES):  # an original checkpoint file that is not here
        return None
    return name


def run_folder_of(weights: Path) -> Path | None:
    """The samtune run folder holding ``weights`` (its best/ or final/), when it is one."""
    parent = Path(weights).resolve().parent
    return parent if (parent / "config.yaml").is_file() else None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class RunRecord:
    """What a run folder says about itself (everything optional: weights may come from anywhere)."""

    config: dict | None = None
    parameters: dict | None = None
    results: dict | None = None
    selected: dict = field(default_factory=dict)  # best/metrics.json: the step and scores best/ was kept for

    @classmethod
    def read(cls, run: Path | None, weights: Path | None = None) -> RunRecord:
        if run is None:
            return cls()
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
        selected = _read_json(Path(weights) / "metrics.json") if weights else None
        return cls(config, _read_json(run / "parameters.json"), _read_json(run / "results.json"), selected or {})

    @property
    def base(self) -> str | None:
        return self.config["model"]["name_or_path"] if self.config else None

    @property
    def method(self) -> str:
        return self.config["peft"]["method"] if self.config else "unknown"


def _eval_results(record: RunRecord, model_name: str, weights_name: str) -> list[EvalResult]:
    """Validation scores of these weights (final/ or best/) and the test scores of the weights validation chose."""
    data = (record.config or {}).get("data", {})
    results = record.results or {}
    scores = []
    val = results.get("final") if weights_name != "best" else (record.selected or None)
    if weights_name == "best" and val is None and results.get("best_mIoU") is not None:
        val = {"mIoU": results["best_mIoU"]}
    if val and data.get("val_annotations"):
        scores.append(("validation", data["val_annotations"], val))
    test = (results.get("test") or {}).get("best")
    if test and data.get("test_annotations") and weights_name == "best":
        scores.append(("test", data["test_annotations"], test))
    out = []
    for split, annotation_file, metrics in scores:
        for key, name in (("mIoU", "mean IoU per instance"), ("mF1", "mean F1 per instance")):
            if metrics.get(key) is not None:
                out.append(
                    EvalResult(
                        task_type="mask-generation",
                        dataset_type="coco",
                        dataset_name=_dataset_name(Path(annotation_file)),
                        dataset_split=split,
                        metric_type="mean_iou" if key == "mIoU" else "f1",
                        metric_name=name,
                        metric_value=round(float(metrics[key]), 4),
                    )
                )
    return out


def _dataset_name(annotation_file: Path) -> str:
    """instances_val2017 for COCO's layout; the folder's name for data/val/annotations.json."""
    return annotation_file.stem if annotation_file.stem != "annotations" else annotation_file.parent.name


def build_card(
    weights: Path,
    model_class: str,
    model_type: str,
    base: str | None = None,
    run: Path | None = None,
    adapter: bool = False,
    license: str | None = None,
    formats: tuple[str, ...] = (),
) -> ModelCard:
    """The card of ``weights`` (an adapter folder when ``adapter``, else a merged / plain model of its family).

    ``base`` is the model the weights were trained from (default: the run's ``model.name_or_path``).
    """
    weights = Path(weights)
    run = run if run is not None else run_folder_of(weights)
    record = RunRecord.read(run, weights)
    base = base or record.base
    base_id = hub_id(base)
    family = FAMILIES.get(model_type)
    license_name = family.license_name if family else None
    license = license or (family.license if family else None)
    name = weights.resolve().name if weights.resolve().name not in ("best", "final") else (run or weights).name
    tags = ["segment-anything", "samtune", model_type, record.method] + (["peft", "lora"] if adapter else [])
    eval_results = _eval_results(record, name, weights.name)
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="mask-generation",
        license=license,
        license_name=license_name if license == "other" else None,
        tags=tags,
        model_name=name,
        eval_results=eval_results or None,
    )
    body = _body(record, model_class, base, base_id, adapter, formats)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _body(
    record: RunRecord, model_class: str, base: str | None, base_id: str | None, adapter: bool, formats: tuple
) -> str:
    method = record.method
    base_words = f"`{base_id}`" if base_id else f"a local model (`{base}`, not on the Hub)" if base else "unknown"
    if adapter:
        load = (
            f"A PEFT adapter (method `{method}`) for `{model_class}`; base {base_words}. Load it with\n"
            "`PeftModel.from_pretrained(AutoModelForMaskGeneration.from_pretrained(BASE), FOLDER)`, or merge it\n"
            "into a plain model folder with `samtune export --adapter FOLDER --out DIR`."
        )
    else:
        load = (
            f"A `{model_class}` fine-tuned with samtune (method `{method}`, adapters merged); base {base_words}.\n"
            "It loads with `AutoModelForMaskGeneration.from_pretrained` and needs no PEFT."
        )
    lines = [f"# {model_class} fine-tuned with samtune", "", load, ""]
    if formats:
        lines += ["## Files", ""] + [f"- {line}" for line in formats] + [""]
    config = record.config
    if config:
        peft, data = config["peft"], config["data"]
        if method in ADAPTER_METHODS:
            lines.append(
                f"Adapters: rank {peft['rank']}, alpha {peft['alpha']}, targets `{peft['targets']}`"
                + (f", fully trained modules {peft['train_modules']}" if peft["train_modules"] else "")
                + "."
            )
        else:
            lines.append(f"Method `{method}`, targets `{peft['targets']}`.")
        lines += [
            "",
            "## Data",
            "",
            f"- training: `{data['train_annotations']}` (images `{data['train_images']}`)",
            f"- validation: `{data['val_annotations'] or 'none'}`",
            f"- test: `{data.get('test_annotations') or 'none'}`",
            f"- prompts: `{data['prompt']}`, at most {data['max_instances']} instances per image and step",
            "",
        ]
    parameters = record.parameters
    if parameters:
        total = parameters["all"]
        share = 100 * total["trainable"] / max(total["total"], 1)
        lines += [
            "## Trainable parameters",
            "",
            f"{total['trainable']:,} of {total['total']:,} ({share:.2f}%) during training:",
            "",
        ]
        lines += [f"- {part}: {v['trainable']:,} of {v['total']:,}" for part, v in parameters.items() if part != "all"]
        lines.append("")
    lines += _metrics_table(record.results)
    if config:
        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


def _metrics_table(results: dict | None) -> list[str]:
    if not results or not results.get("final"):
        return []
    lines = [
        "## Metrics (per instance, original resolution)",
        "",
        "| split | weights | mIoU | mF1 |",
        "|---|---|---:|---:|",
    ]
    rows = [("validation", "zero-shot", results.get("zero_shot")), ("validation", "final", results.get("final"))]
    test = results.get("test") or {}
    rows += [
        ("test", "zero-shot", test.get("zero_shot")),
        ("test", f"best (step {test.get('weights_step')})", test.get("best")),
    ]
    for split, name, metrics in rows:
        if metrics:
            lines.append(f"| {split} | {name} | {100 * metrics['mIoU']:.2f} | {100 * metrics['mF1']:.2f} |")
    if results.get("best_mIoU") is not None:
        lines.append(f"| validation | best (step {results['best_step']}) | {100 * results['best_mIoU']:.2f} | |")
    return lines + ["", f"{results.get('steps', '?')} optimizer steps.", ""]


def write_run_cards(run: str | Path) -> list[Path]:
    """Replace the template cards PEFT writes into a run's adapter folders (best/, final/) with samtune's card;
    model folders (full / decoder runs) get the same card. Called once a run has its results.json."""
    run = Path(run)
    written = []
    for name in ("best", "final"):
        folder = run / name
        adapter = (folder / "adapter_config.json").is_file()
        config_file = folder / ("adapter_config.json" if adapter else "config.json")
        if not config_file.is_file():
            continue
        model_class, model_type = model_class_of(folder, adapter)
        card = build_card(folder, model_class, model_type, run=run, adapter=adapter)
        card.save(folder / "README.md")
        written.append(folder / "README.md")
    return written


def model_class_of(folder: Path, adapter: bool) -> tuple[str, str]:
    """(class name, model_type) of a model folder, or of an adapter folder's base."""
    if not adapter:
        config = json.loads((folder / "config.json").read_text())
        return config["architectures"][0], config["model_type"]
    return adapter_model_class(folder)


def adapter_model_class(folder: Path) -> tuple[str, str]:
    """(class name, model_type) of an adapter folder's base, as PEFT recorded it."""
    mapping = json.loads((folder / "adapter_config.json").read_text()).get("auto_mapping") or {}
    library = mapping.get("parent_library", "transformers.models.sam.modeling_sam")  # transformers.models.TYPE.*
    return mapping.get("base_model_class", "SamModel"), library.split(".")[2]
