"""Loading a SAM checkpoint, choosing what trains (PEFT adapters or plain weights), saving and merging.

One call, ``build_model``, turns the ``model`` and ``peft`` config sections into a model ready to train;
``save_trained`` and ``merge_adapter`` turn it back into folders people load with
``PeftModel.from_pretrained`` / ``SamModel.from_pretrained``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from transformers import SamModel, SamProcessor

from samtune.checkpoints import is_original_checkpoint, load_original_checkpoint
from samtune.config import ModelConfig, PeftConfig
from samtune.fast_encoder import enable_fast_encoder

logger = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "dora", "qlora", "qdora")
METHODS = (*ADAPTER_METHODS, "full", "decoder", "none")
QUANTISED_METHODS = ("qlora", "qdora")

_ENCODER_ATTN = r"vision_encoder\.layers\.\d+\.attn\.(qkv|proj)"
_ENCODER_MLP = r"vision_encoder\.layers\.\d+\.mlp\.(lin1|lin2)"
_DECODER_ATTN = r"mask_decoder\.transformer\.(layers\.\d+\.)?\w+\.(q_proj|k_proj|v_proj|out_proj)"
# Named target presets: full-match regexes over module names, each anchored in its tower,
# so a bare layer name (lin1, q_proj) can never pick up a module of the other tower.
TARGET_PRESETS = {
    "encoder-attn": _ENCODER_ATTN,
    "encoder-attn-mlp": f"{_ENCODER_ATTN}|{_ENCODER_MLP}",
    "decoder-attn": _DECODER_ATTN,
    "all-linear": r"(vision_encoder|mask_decoder)\..*",  # narrowed to nn.Linear modules below
    "peft-sam": r"vision_encoder\.layers\.\d+\.attn\.qkv|"
    r"mask_decoder\.transformer\.(layers\.\d+\.)?\w+\.(q_proj|v_proj)",
}
# Non-reentrant checkpointing: works when the encoder input needs no gradient (frozen base, adapters inside).
_CHECKPOINTING = {"use_reentrant": False}
# Modules trained fully beside adapters, by preset name.
TRAIN_MODULE_PRESETS = {
    "decoder-heads": ["mask_decoder.iou_prediction_head", "mask_decoder.output_hypernetworks_mlps"],
}


class ModelConfigError(ValueError):
    """A model / method combination that cannot work, caught before any weight is loaded."""


def check_peft_config(spec: PeftConfig) -> None:
    """Refuse, with the reason, combinations known not to work."""
    if spec.method not in METHODS:
        raise ModelConfigError(f"peft.method must be one of {METHODS}, got {spec.method!r}")
    if spec.method in QUANTISED_METHODS:
        if spec.bits not in (4, 8):
            raise ModelConfigError(f"peft.bits must be 4 or 8, got {spec.bits}")
        if spec.bits == 8:
            raise ModelConfigError(
                "8-bit bases are refused: bitsandbytes' 8-bit layers quantise activations row by row assuming "
                "2-D inputs and fail on SAM's 4-D ones (seen on CPU: a shape mismatch in int8 quantisation), and "
                "they break DoRA on its second step. Use peft.bits 4."
            )
    if spec.method in ADAPTER_METHODS and spec.rank < 1:
        raise ModelConfigError(f"peft.rank must be >= 1, got {spec.rank}")


def _dtype(name: str) -> torch.dtype | str:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in names:
        raise ModelConfigError(f"model.dtype must be one of {tuple(names)}, got {name!r}")
    return names[name]


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True  # CPU kernels take bf16; bitsandbytes computes in it on CPU


def _quantisation_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits != 4:
        raise ModelConfigError(f"only 4-bit bases are supported, got {bits}")
    compute = torch.bfloat16 if bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _disable_cpu_bf16_kernels(model: torch.nn.Module) -> None:
    # bitsandbytes' AVX512-BF16 CPU path breaks on small layers and after eval passes; the generic path works.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_sam(spec: ModelConfig, quantise_bits: int = 0) -> tuple[SamModel, SamProcessor]:
    """Model and processor from one hub id, local SamModel folder, or original segment-anything checkpoint.

    ``quantise_bits`` 4 or 8 loads the base through bitsandbytes (0: full precision).
    """
    if is_original_checkpoint(spec.name_or_path):
        if quantise_bits:
            raise ModelConfigError(
                "convert an original checkpoint first (python -m samtune.checkpoints) to quantise it"
            )
        model, processor = load_original_checkpoint(spec.name_or_path, attn_implementation=spec.attn_implementation)
    else:
        kwargs: dict = {"attn_implementation": spec.attn_implementation, "dtype": _dtype(spec.dtype)}
        if quantise_bits:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            kwargs.update(quantization_config=_quantisation_config(quantise_bits), device_map={"": device})
        model = SamModel.from_pretrained(spec.name_or_path, **kwargs)
        if quantise_bits == 4 and not torch.cuda.is_available():
            _disable_cpu_bf16_kernels(model)
        processor = SamProcessor.from_pretrained(spec.name_or_path)
    if spec.fast_encoder:  # before PEFT wraps anything: only the encoder's attention / MLP classes change
        enable_fast_encoder(model)
    if spec.compile:
        # in place (nn.Module.compile): parameter names and state-dict keys stay SamModel's; traced at the first
        # call, so adapters injected after this are compiled too
        model.vision_encoder.compile(backend=spec.compile)
    return model, processor


def target_regex(model: torch.nn.Module, targets: str) -> str:
    """The full-match regex for a preset name or a raw regex; it must select at least one Linear layer."""
    pattern = TARGET_PRESETS.get(targets, targets)
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ModelConfigError(f"peft.targets {targets!r} is neither a preset nor a valid regex: {error}") from error
    linear = [n for n, m in model.named_modules() if _is_linear(m) and compiled.fullmatch(n)]
    if not linear:
        raise ModelConfigError(
            f"peft.targets {targets!r} matches no linear layer (regexes must match whole module names such as "
            f"'vision_encoder.layers.0.attn.qkv'); presets: {', '.join(TARGET_PRESETS)}"
        )
    if targets == "all-linear" or any(not _is_linear(m) for n, m in model.named_modules() if compiled.fullmatch(n)):
        # an explicit list of the matching Linear layers, so norms or embeddings never receive adapters
        return "|".join(re.escape(n) for n in linear)
    return pattern


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    try:
        import bitsandbytes as bnb

        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    except ImportError:
        return False


def train_module_names(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Expand presets and ModuleLists (which PEFT cannot wrap) into the module names to train fully."""
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in names:
        for item in TRAIN_MODULE_PRESETS.get(name, [name]):
            if item not in modules:
                raise ModelConfigError(f"peft.train_modules: no module named {item!r} in the model")
            module = modules[item]
            if isinstance(module, torch.nn.ModuleList):
                out += [f"{item}.{child}" for child, _ in module.named_children()]
            else:
                out.append(item)
    return out


def apply_method(model: SamModel, spec: PeftConfig, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Freeze / wrap ``model`` for the method; returns the model to train (a PeftModel for adapters)."""
    check_peft_config(spec)
    if spec.method in QUANTISED_METHODS:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=_CHECKPOINTING
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING)
    if spec.method not in ADAPTER_METHODS:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = spec.method == "full" or (
                spec.method == "decoder" and name.startswith("mask_decoder.")
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


def build_model(model_config: ModelConfig, peft_config: PeftConfig) -> tuple[torch.nn.Module, SamProcessor]:
    """Config -> (model ready to train, processor)."""
    check_peft_config(peft_config)
    bits = peft_config.bits if peft_config.method in QUANTISED_METHODS else 0
    model, processor = load_sam(model_config, quantise_bits=bits)
    return apply_method(model, peft_config, model_config.gradient_checkpointing), processor


def base_model(model: torch.nn.Module) -> SamModel:
    """The SamModel inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def parameter_report(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per tower (top-level SamModel child) and overall."""
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


def save_trained(model: torch.nn.Module, processor: SamProcessor, folder: str | Path) -> Path:
    """Adapters: a PEFT adapter folder; plain methods: a SamModel folder; the processor beside both."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_saved_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Put weights that ``save_trained`` wrote back into the live model it wrote them from (e.g. the best ones)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if is_adapter_folder(folder):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors", device="cpu"))
        return
    state = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(shard, device="cpu"))
    if not state:
        raise FileNotFoundError(f"{folder}: no model*.safetensors or adapter_model.safetensors to load")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{folder}: weights the model does not have: {unexpected[:5]}")


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_trained(
    base: str | Path,
    adapter: str | Path | None = None,
    attn_implementation: str = "sdpa",
    fast_encoder: bool = True,
    compile: str = "",
):
    """A trained model for inference: base SamModel (+ adapter folder), in full precision."""
    spec = ModelConfig(str(base), attn_implementation=attn_implementation, fast_encoder=fast_encoder, compile=compile)
    model, processor = load_sam(spec)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if (Path(adapter) / "processor_config.json").exists():
            processor = SamProcessor.from_pretrained(adapter)
    return model.eval(), processor


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Merge an adapter into a freshly loaded full-precision base and save a plain SamModel folder.

    4-bit runs merge here too: into the full-precision weights, never into the quantised ones.
    """
    model, processor = load_trained(base, adapter)
    merged = model.merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out
