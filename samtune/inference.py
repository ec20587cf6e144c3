"""The precision and encoder options that evaluate and predict share.

Weights stay in fp32 (what training saved, what merging needs); ``--precision bf16`` runs the model under
autocast, so the matrix products and attention take bf16 while layer norms, the loss-free post-processing
and the scores stay fp32. On a CPU with AVX512-BF16 or AMX that is where the fast encoder gains most
(benchmarks/RESULTS.md); on older CPUs bf16 can be slower than fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from samtune.errors import UserError
from samtune.models.fast_encoder import uses_fast_encoder

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


class Clock:
    """Wall time of GPU work with CUDA events, of CPU work with perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end - start


def summary(values: list[float]) -> dict:
    """Median and 90th percentile (NaN when nothing was timed)."""
    if not values:
        return {"median": float("nan"), "p90": float("nan")}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def latency(
    model, device: torch.device, batch_size: int, precision: str, encoder_ms: list[float], decoder_ms: list[float]
) -> dict:
    """The latency entry of evaluate's results: where it ran, how, and the per-image times."""
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "batch_size": batch_size,
        "precision": precision,
        "fast_encoder": uses_fast_encoder(model),
        "image_encoder_ms": summary(encoder_ms),
        "decoder_ms": summary(decoder_ms),
    }
