"""Loading a SAM checkpoint and choosing what trains."""

from __future__ import annotations

import logging

import torch
from transformers import SamModel, SamProcessor

logger = logging.getLogger(__name__)

METHODS = ("decoder", "full", "none")


def load_sam(name_or_path: str, attn_implementation: str = "sdpa") -> tuple[SamModel, SamProcessor]:
    """The model and its processor from one hub id or local folder (weights via safetensors)."""
    model = SamModel.from_pretrained(name_or_path, attn_implementation=attn_implementation, use_safetensors=True)
    processor = SamProcessor.from_pretrained(name_or_path)
    return model, processor


def select_trainable(model: SamModel, method: str) -> None:
    """``decoder``: the mask decoder only; ``full``: everything; ``none``: nothing (zero-shot)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = method == "full" or (method == "decoder" and name.startswith("mask_decoder."))


def parameter_report(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per tower (top-level child) and overall."""
    report: dict[str, dict[str, int]] = {}
    for name, parameter in model.named_parameters():
        tower = name.split(".")[0]
        entry = report.setdefault(tower, {"trainable": 0, "total": 0})
        entry["total"] += parameter.numel()
        entry["trainable"] += parameter.numel() if parameter.requires_grad else 0
    report["all"] = {key: sum(entry[key] for entry in report.values()) for key in ("trainable", "total")}
    return report


def format_report(report: dict[str, dict[str, int]]) -> str:
    lines = [f"{'part':<18}{'trainable':>14}{'total':>14}{'%':>9}"]
    for tower, entry in report.items():
        share = 100.0 * entry["trainable"] / max(entry["total"], 1)
        lines.append(f"{tower:<18}{entry['trainable']:>14,}{entry['total']:>14,}{share:>8.2f}%")
    return "\n".join(lines)
