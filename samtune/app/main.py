"""``samtune app``: a local page to try a model by hand: click to segment, base and fine-tuned side by side.

    samtune app                                       the demo: its base beside runs/demo's fine-tuned weights
    samtune app --model M [--adapter A] [--compare-base | --baseline B] [--images DIR] [--annotations COCO.json]
                [--port 7860] [--host 127.0.0.1] [--device cpu|cuda] [--precision ...] [--no-fast-encoder]

Open the printed address in a browser. On the image: a click adds a positive point (shift-click, or the
"negative" switch, a negative one), a drag draws a box; each further click refines the mask (the last mask's
low-resolution logits are the mask prompt, as in ``samtune predict --previous``). "New object" keeps the mask and
starts another; the masks download as a COCO results JSON or a PNG of object numbers. With --annotations the
page steps through the COCO file's images, draws their ground truth and scores the current mask against it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from samtune import inference
from samtune.errors import UserError, run_command
from samtune.models.loading import is_adapter_folder, load_trained
from samtune.predict import list_images

if TYPE_CHECKING:
    from samtune.app.session import Session, Source
    from samtune.data.coco import CocoInstanceDataset

DEMO_RUN = Path("runs/demo")  # where `samtune train` with no arguments writes (samtune/demo/run.yaml)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtune app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="hub id, model folder (any SAM family) or original checkpoint (default: demo)")
    parser.add_argument("--adapter", help="PEFT adapter folder trained on --model")
    parser.add_argument("--compare-base", action="store_true", help="--model without the adapter beside it")
    parser.add_argument("--baseline", help="another model beside it (e.g. the base of a full / decoder run)")
    parser.add_argument("--images", type=Path, help="an image file or a folder (searched recursively)")
    parser.add_argument("--annotations", type=Path, help="COCO file of --images: ground truth and IoU against it")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inference.add_arguments(parser)
    return parser


def _demo(args: argparse.Namespace) -> list[str]:
    """No --model: the demo base, the demo's test split, and the demo run's best weights beside it if there are."""
    from samtune.demo.assets import BASE_DIR, prepare_demo

    if args.adapter or args.compare_base or args.baseline:
        raise UserError("--adapter, --compare-base and --baseline need --model (without any: the demo)")
    notes = []
    if args.images is None:
        print("samtune app: the demo's test images (generated on first use, 20-40 s)", file=sys.stderr)
        paths = prepare_demo()
        args.images, args.annotations = paths.test_images, paths.test_annotations
    base = str(BASE_DIR)
    best = DEMO_RUN / "best"
    try:
        config = yaml.safe_load((DEMO_RUN / "config.yaml").read_text()) or {}
        base = str((config.get("model") or {}).get("name_or_path") or base)
    except (OSError, yaml.YAMLError):
        pass
    if not Path(base).exists():  # the run was made in another clone: its base is the one shipped here
        base = str(BASE_DIR)
    shown = _short(base)
    if is_adapter_folder(best):
        args.model, args.adapter, args.compare_base = base, str(best), True
        notes.append(f"Fine-tuned: {best} (the demo run), beside its base {shown}.")
    elif (best / "config.json").is_file():  # a full / decoder demo run: a model folder
        args.model, args.baseline = str(best), base
        notes.append(f"Fine-tuned: {best} (the demo run), beside its base {shown}.")
    else:
        args.model = base
        notes.append(
            f"The demo base alone: no fine-tuned demo run in {DEMO_RUN}. Make one with `samtune train` (about two "
            "minutes on a CPU), then run `samtune app` again to see it beside the base."
        )
    return notes


def _short(path: str) -> str:
    """A path as the user would type it: relative when it lies under the working folder."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _sources(args: argparse.Namespace) -> tuple[list[Source], CocoInstanceDataset | None]:
    from samtune.app.session import Source

    if args.annotations is not None:
        from samtune.data.coco import CocoInstanceDataset

        if args.images is None:
            raise UserError("--annotations needs --images, the folder its file names are relative to")
        dataset = CocoInstanceDataset(args.annotations, args.images)
        if not len(dataset):
            raise UserError(f"--annotations {args.annotations}: no images with annotations to show")
        sources = [Source(image.file_name, image.path, coco_index=n) for n, image in enumerate(dataset.images)]
        return sources, dataset
    if args.images is None:
        return [], None  # uploads only
    if not args.images.exists():
        raise UserError(f"--images {args.images}: no such file or folder")
    files = list_images(args.images)
    if not files:
        raise UserError(f"--images {args.images}: no image files there")
    return [Source(name, path) for name, path in files], None


def build_session(args: argparse.Namespace) -> Session:
    """The models and images the arguments name, as a Session (what the server serves; tests call it too)."""
    from samtune.app.session import Panel, Session

    notes = _demo(args) if args.model is None else []
    if args.compare_base and not args.adapter:
        raise UserError("--compare-base needs --adapter (for a merged or full model, name its base: --baseline B)")
    if args.compare_base and args.baseline:
        raise UserError("--compare-base and --baseline both name the model beside: give one")
    autocast = inference.autocast(args.device, args.precision)
    sources, dataset = _sources(args)  # the data is checked before the (maybe slow) model loads
    options = {"fast_encoder": args.fast_encoder, "compile": args.compile}
    model, processor = load_trained(args.model, args.adapter, **options)
    model.to(args.device)
    tuned = bool(args.adapter or args.baseline)
    panels = [Panel("fine-tuned" if tuned else "model", model, processor)]
    if args.compare_base:  # the same weights, the adapter switched off: no second copy in memory
        panels.insert(0, Panel("base", model, processor, adapter_off=True))
    elif args.baseline:
        other, other_processor = load_trained(args.baseline, **options)
        panels.insert(0, Panel("base", other.to(args.device), other_processor))
    return Session(panels, sources, dataset, args.device, autocast, args.hq_token_only, notes)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.annotations is not None and args.images is None:
        raise UserError("--annotations needs --images, the folder its file names are relative to")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: a port is 0-65535")
    from samtune.app.server import serve

    session = build_session(args)
    serve(session, args.host, args.port)


if __name__ == "__main__":
    sys.exit(run_command(main, prog="samtune app"))
