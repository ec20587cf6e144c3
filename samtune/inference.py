"""The precision and encoder options that evaluate and predict share.

Weights stay in fp32 (what training saved, what merging needs); ``--precision bf16`` runs the model under
autocast, so the matrix products and attention take bf16 while layer norms, the loss-free post-processing
and the scores stay fp32. On a CPU with AVX512-BF16 or AMX that is where the fast encoder gains most
(benchmarks/RESULTS.md); on older CPUs bf16 can be slower than fp32.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from samtune.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--precision, --compile, --fast-encoder / --no-fast-encoder and --hq-token-only."""
    parser.add_argument(
        "--precision", default="fp32", choices=PRECISIONS, help="autocast for the model: fp32 (none), bf16, fp16 (GPU)"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default="",
        metavar="BACKEND",
        help="torch.compile the image encoder (default backend inductor); pays after the first images",
    )
    parser.add_argument(
        "--fast-encoder",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="samtune's fast image encoder for SAM / SAM-HQ (same outputs); --no-fast-encoder: transformers' own",
    )
    parser.add_argument(
        "--hq-token-only",
        action="store_true",
        help="SAM-HQ: the HQ token's mask alone (default: added to SAM's, as SAM-HQ does); other families: no effect",
    )


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context the model calls run in for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 is for GPUs; on a CPU use bf16")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
