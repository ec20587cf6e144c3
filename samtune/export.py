"""Merge a trained adapter into its base and save a plain SamModel folder (with the processor).

    python -m samtune.export --adapter runs/demo/final --out exports/my-sam [--base facebook/sam-vit-base]

The base defaults to the one recorded in the adapter's adapter_config.json. The result loads with
``SamModel.from_pretrained`` and needs no PEFT. Adapters trained on a 4-bit base are merged into the
full-precision base weights, never into quantised ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from samtune.modeling import is_adapter_folder, merge_adapter


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT adapter folder (a run's final/ or best/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged SamModel")
    parser.add_argument("--base", help="base model (hub id or folder); default: the adapter's recorded base")
    args = parser.parse_args(argv)
    if not is_adapter_folder(args.adapter):
        sys.exit(
            f"{args.adapter}: not a PEFT adapter folder (no adapter_config.json); full and decoder runs "
            "already save a plain SamModel folder"
        )
    base = args.base or json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = merge_adapter(base, args.adapter, args.out)
    print(f"merged {args.adapter} into {base}: {out}")
    return out


if __name__ == "__main__":
    main()
