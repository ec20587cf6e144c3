"""Loading a SAM-family checkpoint, saving what trained, loading it back, merging adapters.

One call, ``build_model``, turns the ``model`` and ``peft`` config sections into a model ready to train
(``samtune.models.methods`` decides what trains); ``save_trained`` and ``merge_adapter`` turn it back into
folders people load with ``PeftModel.from_pretrained(AutoModelForMaskGeneration.from_pretrained(base), folder)``
or ``AutoModelForMaskGeneration.from_pretrained(folder)``. The family comes from the checkpoint's config.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForMaskGeneration, PreTrainedModel, ProcessorMixin

from samtune.config import QUANTISED_METHODS, ModelConfig, PeftConfig
from samtune.models.family import Family, base_of, family_of
from samtune.models.fast_encoder import enable_fast_encoder
from samtune.models.methods import ModelConfigError, apply_method
from samtune.models.original_checkpoints import load_original
from samtune.models.sam_hq_decoder_fix import fix_sam_hq_decoder
from samtune.models.segment_anything_checkpoint import is_original_checkpoint

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True  # CPU kernels take bf16; bitsandbytes computes in it on CPU


def _nf4_config():
    from transformers import BitsAndBytesConfig

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


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ~, or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


@contextlib.contextmanager
def _loading(key: str, name: str):
    """Loading failures the user can fix (a missing folder, an unknown hub id, no network) as one clear line."""
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelConfigError(f"{key} {name}: no such file or folder")
    try:
        yield
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelConfigError(f"{key} {name!r} does not load: {first}") from error


def load_sam(
    spec: ModelConfig, quantise: bool = False, key: str = "model.name_or_path"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model and processor from one hub id, local folder (any SAM family), or original checkpoint.

    ``quantise`` loads the base in 4 bits (NF4) through bitsandbytes; ``key`` is how errors name the model.
    """
    with _loading(key, spec.name_or_path):
        model, processor = _load_sam(spec, quantise)
    family = family_of(model)
    if family.hq:
        fix_sam_hq_decoder(model)  # the official SAM-HQ decoder where transformers' gets one line wrong
    if spec.fast_encoder and family.fast_encoder:  # before PEFT wraps anything: only encoder classes change
        enable_fast_encoder(model)
    elif spec.fast_encoder:
        logger.info("fast encoder: off, it applies to the SAM ViT (SAM, SAM-HQ), not to %s", family.label)
    if spec.compile:
        # in place (nn.Module.compile): parameter names and state-dict keys stay SamModel's; traced at the first
        # call, so adapters injected after this are compiled too
        model.vision_encoder.compile(backend=spec.compile)
    return model, processor


def load_processor(name_or_path: str, family: Family) -> ProcessorMixin:
    """The family's processor as saved beside the weights (SAM 2 / 3: samtune's torch twin where the official
    image processor cannot be imported)."""
    if family.square_input:
        from samtune.models.square_processor import load_square_processor

        return load_square_processor(name_or_path, family.model_type)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path)


def _load_sam(spec: ModelConfig, quantise: bool) -> tuple[PreTrainedModel, ProcessorMixin]:
    if is_original_checkpoint(spec.name_or_path):
        if quantise:
            raise ModelConfigError(
                "convert an original checkpoint first (samtune convert IN.pth OUT_DIR) to quantise it"
            )
        model, processor = load_original(spec.name_or_path, attn_implementation=spec.attn_implementation)
    else:
        kwargs: dict = {"attn_implementation": spec.attn_implementation, "dtype": DTYPES[spec.dtype]}
        if quantise:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            kwargs.update(quantization_config=_nf4_config(), device_map={"": device})
        family = family_of(AutoConfig.from_pretrained(spec.name_or_path))  # refuses other model types first
        model = AutoModelForMaskGeneration.from_pretrained(spec.name_or_path, **kwargs)
        if quantise and not torch.cuda.is_available():
            _disable_cpu_bf16_kernels(model)
        processor = load_processor(spec.name_or_path, family)
    return model, processor


def build_model(model_config: ModelConfig, peft_config: PeftConfig) -> tuple[torch.nn.Module, ProcessorMixin]:
    """Config -> (model ready to train, processor)."""
    model, processor = load_sam(model_config, quantise=peft_config.method in QUANTISED_METHODS)
    return apply_method(model, peft_config, model_config.gradient_checkpointing), processor


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel (or the model itself)."""
    return base_of(model)


def save_trained(model: torch.nn.Module, processor: ProcessorMixin, folder: str | Path) -> Path:
    """Adapters: a PEFT adapter folder; plain methods: a model folder; the processor beside both."""
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
    """A trained model for inference: base model (+ adapter folder), in full precision."""
    spec = ModelConfig(str(base), attn_implementation=attn_implementation, fast_encoder=fast_encoder, compile=compile)
    model, processor = load_sam(spec, key="--model")
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelConfigError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter))
        if any((Path(adapter) / name).exists() for name in ("processor_config.json", "preprocessor_config.json")):
            processor = load_processor(str(adapter), family_of(model))
    return model.eval(), processor


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Merge an adapter into a freshly loaded full-precision base and save a plain model folder of its family.

    4-bit runs merge here too: into the full-precision weights, never into the quantised ones.
    """
    model, processor = load_trained(base, adapter)
    merged = model.merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out
