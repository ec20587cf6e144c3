"""The ``samtune`` command: one entry, a sub-command per tool (as ``accelerate`` and ``hf`` do it).

    samtune train [--config FILE] [--section.key value ...]     fine-tune (no arguments: the offline demo)
    samtune evaluate --model M [--adapter A] --annotations F --images D
    samtune predict --model M --images D [--prompts P]
    samtune export --adapter RUN/best --out DIR [--format hf|segment-anything|onnx|adapter] [--push-to-hub ID]
    samtune convert CHECKPOINT.pth OUT_DIR
    samtune demo prepare | pretrain
    samtune app [--model M [--adapter A] [--compare-base]] [--annotations F] [--images D]

Each sub-command is its module's own ``main`` (``samtune train --help`` lists every key), imported only when
chosen, so ``samtune --help`` is instant and quiet. Errors the user can fix end with one line and status 2
(``--debug`` or ``SAMTUNE_DEBUG=1`` shows the traceback). Several GPUs or machines go through accelerate:
``accelerate launch --multi_gpu -m samtune.train ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

from samtune.errors import run_command

# sub-command: (module whose main(argv) runs it, one line of help)
COMMANDS = {
    "train": ("samtune.train", "fine-tune a SAM model on COCO data (no arguments: the built-in demo)"),
    "evaluate": ("samtune.evaluate", "score weights on a COCO split: mIoU / mF1 per instance, COCO AP, latency"),
    "predict": ("samtune.predict", "masks for new images from boxes / points, or automatic, as COCO results"),
    "export": ("samtune.export", "a run's weights as a model folder, original .pth or ONNX, with a card; to the Hub"),
    "convert": ("samtune.models.original_checkpoints", "an original SAM / SAM-HQ .pth or SAM 2 .pt to a folder"),
    "demo": ("samtune.demo.pretrain", "generate the demo's data, or pretrain its base"),
    "app": ("samtune.app.main", "a local page: click to segment, base and fine-tuned side by side (default: demo)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtune",
        description="Fine-tune Segment Anything on COCO-format data with PEFT.",
        epilog="Run 'samtune COMMAND --help' for a command's options. Tracebacks for user errors: --debug.",
    )
    parser.add_argument("--version", action="version", version=f"samtune {version('samtune')}")
    parser.add_argument("--debug", action="store_true", help="tracebacks for user errors too (or SAMTUNE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)  # the command's own parser answers --help
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]  # samtune --debug COMMAND ...: the same as the command's own --debug
    argv = argv[debug:]
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # --help, or the list of commands with an error
        return 2
    command, rest = argv[0], argv[1:]
    sys.argv[0] = f"samtune {command}"  # the command's usage line reads as the user typed it
    module = importlib.import_module(COMMANDS[command][0])
    return run_command(module.main, rest, prog=f"samtune {command}", debug=debug)


if __name__ == "__main__":
    sys.exit(main())
