"""Export trained weights where they run: a model folder of their family, an original segment-anything
checkpoint, ONNX graphs, or the adapter itself; each with a model card, optionally pushed to the Hub.

    samtune export --adapter runs/demo/final --out exports/my-sam [--base facebook/sam-vit-base]
        [--format hf | segment-anything | onnx | adapter] [--quantize int8] [--push-to-hub USER/NAME [--private]]

- ``hf`` (default): an adapter merged into its base, or a model folder (full / decoder / hq runs) re-saved; it
  loads with ``AutoModelForMaskGeneration.from_pretrained`` and needs no PEFT. Adapters trained on a 4-bit base
  are merged into the full-precision base weights, never into quantised ones.
- ``segment-anything``: the merged weights as the original package's ``.pth`` (SAM: ``segment_anything``;
  SAM-HQ: ``segment_anything_hq``); see ``samtune.export.original``.
- ``onnx``: image encoder and prompt-encoder + mask-decoder as two graphs (SAM's own split), ``--quantize int8``
  adds onnxruntime's dynamic int8 quantisation; see ``samtune.export.onnx``.
- ``adapter``: the adapter folder as it is, with samtune's card (to share or push the adapter alone).

The base is ``--base``, else the one the adapter records, else the run folder's ``model.name_or_path``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from transformers import PreTrainedModel, ProcessorMixin

from samtune.errors import UserError, run_command
from samtune.export.card import RunRecord, adapter_model_class, build_card, hub_id, run_folder_of
from samtune.models.family import family_of
from samtune.models.loading import is_adapter_folder, load_sam, load_trained

__all__ = ["FORMATS", "export", "main", "resolve_base"]
FORMATS = ("hf", "segment-anything", "onnx", "adapter")


class ExportError(UserError):
    """What was asked cannot be exported as given."""


def resolve_base(source: Path, given: str | None = None) -> str:
    """The base an adapter was trained on: ``given``, else the adapter's record when it is a Hub id or an existing
    path, else the run folder's config (adapters trained on an original ``.pth`` record none)."""
    if given:
        return given
    recorded = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and (hub_id(recorded) or Path(recorded).expanduser().exists()):
        return recorded
    from_run = RunRecord.read(run_folder_of(source)).base
    if from_run:
        return from_run
    raise ExportError(
        f"--adapter {source}: the adapter records no usable base ({recorded!r}) and no run folder config.yaml "
        "beside it names one; give --base (the hub id, folder or .pth it was trained on)"
    )


def load_exportable(source: Path, base: str | None) -> tuple[PreTrainedModel, ProcessorMixin, str | None, bool]:
    """(model with adapters merged, processor, base, whether the source is an adapter) for an export."""
    if is_adapter_folder(source):
        base = resolve_base(source, base)
        model, processor = load_trained(base, source, fast_encoder=False)
        return model.merge_and_unload().eval(), processor, base, True
    if (source / "config.json").is_file():
        from samtune.config import ModelConfig

        model, processor = load_sam(ModelConfig(str(source), fast_encoder=False), key="--adapter")
        return model.eval(), processor, base or RunRecord.read(run_folder_of(source)).base, False
    raise ExportError(
        f"--adapter {source}: neither a PEFT adapter folder (adapter_config.json) nor a model folder "
        "(config.json); give a run's best/ or final/"
    )


def export(
    source: str | Path,
    out: str | Path,
    fmt: str = "hf",
    base: str | None = None,
    quantize: str | None = None,
    license: str | None = None,
    opset: int | None = None,
    multimask: bool = False,
) -> Path:
    """Write ``source`` (an adapter or model folder) to ``out`` in format ``fmt``, with its model card."""
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if (quantize or opset or multimask) and fmt != "onnx":
        given = f"--quantize {quantize}" if quantize else f"--opset {opset}" if opset else "--multimask"
        raise ExportError(f"{given}: only for --format onnx")
    if fmt == "adapter":
        if not is_adapter_folder(source):
            raise ExportError(f"--adapter {source}: --format adapter needs an adapter folder (adapter_config.json)")
        base = resolve_base(source, base)
        shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md", "metrics.json"))
        model_class, model_type = adapter_model_class(source)
        build_card(source, model_class, model_type, base=base, adapter=True, license=license).save(out / "README.md")
        return out
    model, processor, base, _ = load_exportable(source, base)
    family = family_of(model)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        model.save_pretrained(out)
        processor.save_pretrained(out)
        files = ("model.safetensors, config.json, processor config: `AutoModelForMaskGeneration.from_pretrained`",)
    elif fmt == "segment-anything":
        from samtune.export.original import save_original

        files = (save_original(model, out, base),)
    else:
        from samtune.export.onnx import export_onnx

        files = export_onnx(model, processor, out, quantize=quantize, opset=opset, multimask=multimask)
    card = build_card(source, type(model).__name__, family.model_type, base=base, license=license, formats=files)
    card.save(out / "README.md")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="samtune export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        required=True,
        help="a run's final/ or best/: PEFT adapter folder, or model folder for full / decoder / hq",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the export")
    parser.add_argument("--base", help="base model (hub id, folder or .pth); default: the adapter's or the run's")
    parser.add_argument("--format", default="hf", choices=FORMATS, help="what to write (default: hf)")
    parser.add_argument("--quantize", choices=["int8"], help="onnx only: onnxruntime dynamic int8 quantisation")
    parser.add_argument("--opset", type=int, help="onnx only: the ONNX opset (default: samtune.export.onnx.OPSET)")
    parser.add_argument(
        "--multimask", action="store_true", help="onnx only: the decoder returns the 3 candidate masks, not 1"
    )
    parser.add_argument("--license", help="the card's license (default: that of the family's published weights)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        raise ExportError("--private: only with --push-to-hub REPO_ID")
    out = export(
        args.adapter, args.out, args.format, args.base, args.quantize, args.license, args.opset, args.multimask
    )
    print(f"exported {args.adapter} ({args.format}) to {out}")
    if args.push_to_hub:
        from samtune.export.hub import push_folder

        print(f"pushed to {push_folder(out, args.push_to_hub, private=args.private)}")
    return out


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune export"))
