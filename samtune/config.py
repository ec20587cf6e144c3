"""Every knob in one place: dataclasses, filled from defaults, then a YAML file, then ``--section.key value``.

Unknown keys and values of the wrong type are errors, never warnings.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def knob(default, help: str):  # noqa: A002 - "help" reads best at the call sites
    """A config field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = knob(
        "", "hub id, local SamModel folder, or original segment-anything .pth; empty: the built-in demo model"
    )
    attn_implementation: str = knob("sdpa", "attention kernel: sdpa or eager")
    dtype: str = knob("float32", "dtype the weights load in: float32, bfloat16, float16 or auto")
    gradient_checkpointing: bool = knob(False, "recompute image-encoder activations in backward to save memory")
    fast_encoder: bool = knob(
        True,
        "image-encoder attention computed tile by tile with the relative-position bias built in cache "
        "(same weights, modules and outputs as SamModel; faster, less memory); false: transformers' own",
    )
    compile: str = knob(
        "", "torch.compile the image encoder with this backend (inductor: the default compiler); empty: off"
    )


@dataclass
class PeftConfig:
    method: str = knob(
        "dora",
        "what trains: lora, dora, qlora, qdora (adapters on a 4-bit base), full (every weight), "
        "decoder (the mask decoder only), none (zero-shot)",
    )
    rank: int = knob(8, "adapter rank r")
    alpha: float = knob(16.0, "adapter scale alpha (the update is scaled by alpha / r)")
    dropout: float = knob(0.05, "dropout on the adapter input")
    targets: str = knob(
        "peft-sam",
        "layers that get adapters: a preset (encoder-attn, encoder-attn-mlp, decoder-attn, all-linear, peft-sam) "
        "or a regex matching whole module names",
    )
    train_modules: list[str] = knob(
        [], "modules trained fully beside adapters (comma-separated names, or the preset decoder-heads)"
    )
    bits: int = knob(4, "base precision for qlora / qdora (4; 8-bit bases are refused, see the README)")


@dataclass
class DataConfig:
    train_annotations: str = knob("", "COCO JSON of the training split; empty: the built-in demo data")
    train_images: str = knob("", "image folder of the training split (file_name is relative to it)")
    val_annotations: str = knob("", "COCO JSON of the validation split")
    val_images: str = knob("", "image folder of the validation split")
    test_annotations: str = knob("", "COCO JSON of a held-out test split, scored zero-shot and with the best weights")
    test_images: str = knob("", "image folder of the test split")
    prompt: str = knob(
        "box",
        "prompt per instance: box, point, box+point, mixed (each training step draws box, point or both; "
        "evaluation uses boxes), or none (target = union of instances)",
    )
    max_instances: int = knob(16, "instances per image in one step (random subset in training, chunks in eval)")
    box_jitter: float = knob(0.1, "training box noise: max shift of each side as a fraction of the box side")
    num_points: int = knob(1, "positive points per instance in training (evaluation uses one fixed point)")
    num_negative_points: int = knob(0, "negative points per instance in training, inside the box, outside the mask")
    num_workers: int = knob(2, "DataLoader worker processes")
    check_images: bool = knob(True, "read every image header when opening the data set (existence, size, EXIF)")
    cache_embeddings: bool = knob(True, "compute each image's embedding once when nothing in the image encoder trains")
    embedding_cache_dir: str = knob(
        "",
        "folder for cached embeddings, shared between runs; empty: memory, or output_dir/embedding-cache "
        "when they would take more than data.embedding_cache_memory_gb",
    )
    embedding_cache_memory_gb: float = knob(4.0, "largest embedding cache kept in memory, in GB")


@dataclass
class TrainConfig:
    epochs: int = knob(3, "passes over the training set (max_steps wins when set)")
    max_steps: int = knob(0, "optimizer steps to run; 0: epochs decide")
    batch_size: int = knob(2, "images per batch per process")
    grad_accum: int = knob(1, "batches accumulated per optimizer step")
    lr: float = knob(1e-4, "peak learning rate")
    weight_decay: float = knob(0.01, "AdamW weight decay")
    optimizer: str = knob("adamw", "adamw, or adamw8bit (bitsandbytes, GPU only)")
    scheduler: str = knob("cosine", "learning-rate schedule: cosine, linear or constant (after warm-up)")
    warmup_ratio: float = knob(0.05, "fraction of the steps spent warming the learning rate up from 0")
    max_grad_norm: float = knob(1.0, "gradient clipping norm; 0: no clipping")
    dice_weight: float = knob(1.0, "weight of the Dice loss")
    focal_weight: float = knob(20.0, "weight of the focal loss (SAM's own ratio is 20 : 1 focal : Dice)")
    iou_weight: float = knob(1.0, "weight of the MSE between predicted and true IoU")
    seed: int = knob(0, "seed for weights of new layers, data order, instance subsets and prompts")
    mixed_precision: str = knob("", "no, fp16 or bf16; empty: what accelerate launch was given (default no)")
    log_every: int = knob(10, "optimizer steps between training-loss log points")
    eval_every: int = knob(0, "optimizer steps between validations; 0: only before and after training")
    save_every: int = knob(0, "optimizer steps between resumable checkpoints; 0: only when stopped early")
    keep_checkpoints: int = knob(2, "resumable checkpoints kept (the newest); 0: keep all")
    resume_from: str = knob("", "'latest' (newest checkpoint of output_dir, if any) or a checkpoint folder")
    stop_at: int = knob(0, "save a checkpoint and stop once this step is reached, to resume later; 0: run to the end")
    early_stopping: int = knob(0, "stop after this many validations without a better mIoU; 0: never")
    max_nonfinite: int = knob(10, "non-finite losses in a row (each skips its step) before the run stops")
    log_images: int = knob(4, "validation images with ground truth and prediction sent to TensorBoard per eval")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = knob("runs/demo", "run folder: resolved config, metrics, TensorBoard events, checkpoints")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _leaf_fields(config: object, prefix: str = ""):
    """(dotted key, owner, field) for every leaf knob."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", config, f


def _convert(key: str, value: object, target: type) -> object:
    """Check or convert one value to the field's type; strings from the command line are parsed."""
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if target is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typing.get_origin(target) is list:
        item = typing.get_args(target)[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(key, v, item) for v in value]
    raise ConfigError(f"{key}: unsupported type {target}")


def _field_types(config: object) -> dict[str, type]:
    return typing.get_type_hints(type(config))


def set_value(config: Config, key: str, value: object) -> None:
    """Set ``section.key`` (or a top-level key) with type checking."""
    leaves = {name: (owner, f) for name, owner, f in _leaf_fields(config)}
    if key not in leaves:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(leaves))}")
    owner, f = leaves[key]
    setattr(owner, f.name, _convert(key, value, _field_types(owner)[f.name]))


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, object] = {}
    for name, value in data.items():
        flat.update(_flatten(value, f"{prefix}{name}."))
    return flat


def load_config(
    path: str | Path | None = None, overrides: dict[str, object] | None = None, base: dict[str, object] | None = None
) -> Config:
    """Defaults, then ``base`` (dotted keys, e.g. the demo's settings), then the YAML file at ``path``, then
    ``overrides`` (dotted keys)."""
    config = Config()
    for key, value in (base or {}).items():
        set_value(config, key, value)
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read config: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        for key, value in _flatten(data).items():
            try:
                set_value(config, key, value)
            except ConfigError as error:
                raise ConfigError(f"{path}: {error}") from error
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _type_name(target: type) -> str:
    return getattr(target, "__name__", str(target))


def build_parser(description: str) -> argparse.ArgumentParser:
    """``--config FILE`` plus one ``--section.key`` option per knob, documented with its default."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file with sections model, data, train (command-line keys win)")
    defaults = Config()
    for key, owner, f in _leaf_fields(defaults):
        kind = _field_types(owner)[f.name]
        default = getattr(owner, f.name)
        parser.add_argument(
            f"--{key}",
            dest=key,
            default=argparse.SUPPRESS,
            metavar=_type_name(kind).upper(),
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )
    return parser


def parse_args(argv: list[str] | None = None, description: str = "", base: dict[str, object] | None = None) -> Config:
    args = vars(build_parser(description).parse_args(argv))
    path = args.pop("config", None)
    return load_config(path, args, base)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "PeftConfig",
    "TrainConfig",
    "build_parser",
    "load_config",
    "parse_args",
    "save_config",
    "set_value",
    "to_dict",
]
