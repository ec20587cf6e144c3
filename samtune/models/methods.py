"""What trains: the fine-tuning methods, the adapter target presets, and the per-tower parameter report.

``apply_method`` freezes or wraps a loaded model for ``peft.method``: PEFT adapters (LoRA / DoRA, on a 4-bit
base for QLoRA / QDoRA), every weight (full), the mask decoder only (decoder), SAM-HQ's own modules only (hq),
or nothing (none). Target presets mean the same layers in every family, mapped to its module names
(``samtune.models.family``).
"""

from __future__ import annotations

import re
import sys

import torch

from samtune.config import ADAPTER_METHODS, QUANTISED_METHODS, PeftConfig
from samtune.errors import UserError
from samtune.models.family import FAMILIES, HQ_MODULES, Family, family_of

# The two-way transformer's attention projections: the same tree in every family (out_proj / o_proj).
_DECODER_ATTN = r"mask_decoder\.transformer\.(layers\.\d+\.)?\w+\.(q_proj|k_proj|v_proj|out_proj|o_proj)"
_DECODER_QV = r"mask_decoder\.transformer\.(layers\.\d+\.)?\w+\.(q_proj|v_proj)"
TARGET_PRESET_NAMES = ("encoder-attn", "encoder-attn-mlp", "decoder-attn", "all-linear", "peft-sam")


def target_presets(family: Family) -> dict[str, str]:
    """Named target presets for a family: full-match regexes over module names, each anchored in its tower, so a
    bare layer name (lin1, q_proj) can never pick up a module of the other tower."""
    block = family.encoder_block
    attn, mlp = rf"{block}\.{family.encoder_attn}", rf"{block}\.{family.encoder_mlp}"
    return {
        "encoder-attn": attn,
        "encoder-attn-mlp": f"{attn}|{mlp}",
        "decoder-attn": _DECODER_ATTN,
        "all-linear": r"(vision_encoder|mask_decoder)\..*",  # narrowed to nn.Linear modules below
        "peft-sam": rf"{block}\.{family.encoder_qkv}|{_DECODER_QV}",
    }


# SAM's presets, by name (documentation, benchmarks); other families: target_presets(family).
TARGET_PRESETS = target_presets(FAMILIES["sam"])
# Non-reentrant checkpointing: works when the encoder input needs no gradient (frozen base, adapters inside).
_CHECKPOINTING = {"use_reentrant": False}
# Modules trained fully beside adapters, by preset name.
TRAIN_MODULE_PRESETS = {
    "decoder-heads": ["mask_decoder.iou_prediction_head", "mask_decoder.output_hypernetworks_mlps"],
    "hq": list(HQ_MODULES),
}


class ModelConfigError(UserError):
    """A model / method combination that cannot work, caught before any weight is loaded."""


def target_regex(model: torch.nn.Module, targets: str) -> str:
    """The full-match regex for a preset name or a raw regex; it must select at least one Linear layer."""
    pattern = target_presets(family_of(model)).get(targets, targets)
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ModelConfigError(f"peft.targets {targets!r} is neither a preset nor a valid regex: {error}") from error
    linear = [n for n, m in model.named_modules() if _is_linear(m) and compiled.fullmatch(n)]
    if not linear:
        raise ModelConfigError(
            f"peft.targets {targets!r} matches no linear layer (regexes must match whole module names such as "
            f"'vision_encoder.layers.0.attn.qkv'); presets: {', '.join(TARGET_PRESET_NAMES)}"
        )
    if targets == "all-linear" or any(not _is_linear(m) for n, m in model.named_modules() if compiled.fullmatch(n)):
        # an explicit list of the matching Linear layers, so norms or embeddings never receive adapters
        return "|".join(re.escape(n) for n in linear)
    return pattern


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    bnb = sys.modules.get("bitsandbytes")  # 4-bit layers exist only once it was imported: never import it here
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def train_module_names(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Expand presets and ModuleLists (which PEFT cannot wrap) into the module names to train fully."""
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in names:
        if name == "hq" and not family_of(model).hq:
            raise ModelConfigError(f"peft.train_modules hq: SAM-HQ's modules, but this is {family_of(model).label}")
        for item in TRAIN_MODULE_PRESETS.get(name, [name]):
            if item not in modules:
                raise ModelConfigError(f"peft.train_modules: no module named {item!r} in the model")
            module = modules[item]
            if isinstance(module, torch.nn.ModuleList):
                out += [f"{item}.{child}" for child, _ in module.named_children()]
            else:
                out.append(item)
    return out


def apply_method(model: torch.nn.Module, spec: PeftConfig, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Freeze / wrap ``model`` for the method; returns the model to train (a PeftModel for adapters)."""
    family = family_of(model)
    if spec.method == "hq" and not family.hq:
        raise ModelConfigError(
            f"peft.method hq trains SAM-HQ's HQ token and fusion modules; {family.label} has none "
            "(use a SAM-HQ checkpoint, or another method)"
        )
    if gradient_checkpointing and not family.gradient_checkpointing:
        raise ModelConfigError(
            f"model.gradient_checkpointing: transformers does not support it for {family.label}; set it false"
        )
    if spec.method in QUANTISED_METHODS:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=_CHECKPOINTING
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING)
    if spec.method not in ADAPTER_METHODS:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = (
                spec.method == "full"
                or (spec.method == "decoder" and name.startswith("mask_decoder."))
                or (spec.method == "hq" and name.startswith(tuple(f"{m}." for m in HQ_MODULES)))
            )
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_regex(model, spec.targets),
        modules_to_save=train_module_names(model, spec.train_modules) or None,
        use_dora=spec.method in ("dora", "qdora"),
        bias="none",
    )
    return get_peft_model(model, lora)


def parameter_report(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per tower (top-level child of the model) and overall."""
    report: dict[str, dict[str, int]] = {}
    for name, parameter in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        tower = name.split(".")[0]
        count = parameter.numel()
        if hasattr(parameter, "quant_state") or parameter.dtype == torch.uint8:
            count *= 2  # two 4-bit weights per stored byte
        entry = report.setdefault(tower, {"trainable": 0, "total": 0})
        entry["total"] += count
        entry["trainable"] += count if parameter.requires_grad else 0
    report["all"] = {key: sum(entry[key] for entry in report.values()) for key in ("trainable", "total")}
    return report


def format_report(report: dict[str, dict[str, int]]) -> str:
    lines = [f"{'part':<24}{'trainable':>14}{'total':>14}{'%':>9}"]
    for tower, entry in report.items():
        share = 100.0 * entry["trainable"] / max(entry["total"], 1)
        lines.append(f"{tower:<24}{entry['trainable']:>14,}{entry['total']:>14,}{share:>8.2f}%")
    return "\n".join(lines)
