"""Every knob in one place: dataclasses, filled from defaults, then YAML files, then ``--section.key value``.

Unknown keys, values of the wrong type and choices outside a knob's ``Literal`` are errors when the config is
read, never warnings; ``validate`` then checks the rules that tie knobs together.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml

from samtune.errors import UserError

Method = Literal["lora", "dora", "qlora", "qdora", "full", "decoder", "hq", "none"]
ADAPTER_METHODS = ("lora", "dora", "qlora", "qdora")
QUANTISED_METHODS = ("qlora", "qdora")  # adapters on a 4-bit (NF4) base
PromptMode = Literal["box", "point", "box+point", "mixed", "none"]
MIXED_KINDS = ("box", "point", "box+point")  # what a "mixed" training step draws from


def knob(default, help: str):  # noqa: A002 - "help" reads best at the call sites
    """A config field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = knob(
        "",
        "hub id or local folder of any SAM family (SAM, SAM-HQ, SAM 2 / 2.1, SAM 3 tracker), or an original "
        "SAM / MedSAM / SAM-HQ .pth or SAM 2 .pt checkpoint; empty: the built-in demo model",
    )
    demo_base: Literal["sam", "sam2"] = knob(  # the names of samtune.demo.bases.BASES
        "sam",
        "the built-in demo's base, when neither a model nor data is given: sam (SAM, shipped) or sam2 (SAM 2: "
        "not shipped yet, make it with samtune demo pretrain --base sam2 --install)",
    )
    attn_implementation: Literal["sdpa", "eager"] = knob("sdpa", "attention kernel")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = knob("float32", "dtype the weights load in")
    gradient_checkpointing: bool = knob(False, "recompute image-encoder activations in backward to save memory")
    fast_encoder: bool = knob(
        True,
        "SAM / SAM-HQ image-encoder attention computed tile by tile with the relative-position bias built in "
        "cache (same weights, modules and outputs; faster, less memory); false: transformers' own",
    )
    hq_token_only: bool = knob(
        False, "SAM-HQ: the mask from the HQ token alone; false: HQ mask added to SAM's (SAM-HQ's default)"
    )
    compile: str = knob(
        "", "torch.compile the image encoder with this backend (inductor: the default compiler); empty: off"
    )


@dataclass
class PeftConfig:
    method: Method = knob(
        "dora",
        "what trains: lora, dora, qlora, qdora (adapters on a 4-bit base), full (every weight), "
        "decoder (the mask decoder only), hq (SAM-HQ: only its HQ token and fusion modules), none (zero-shot)",
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
        [],
        "modules trained fully beside adapters (comma-separated names, or the presets decoder-heads, "
        "hq: SAM-HQ's HQ token and fusion modules)",
    )


@dataclass
class DataConfig:
    train_annotations: str = knob("", "COCO JSON of the training split; empty: the built-in demo data")
    train_images: str = knob("", "image folder of the training split (file_name is relative to it)")
    val_annotations: str = knob("", "COCO JSON of the validation split")
    val_images: str = knob("", "image folder of the validation split")
    test_annotations: str = knob("", "COCO JSON of a held-out test split, scored zero-shot and with the best weights")
    test_images: str = knob("", "image folder of the test split")
    prompt: PromptMode = knob(
        "box",
        "prompt per instance: box, point, box+point, mixed (each training step draws box, point or both; "
        "evaluation uses boxes), or none (target = union of instances)",
    )
    max_instances: int = knob(16, "instances per image in one step (random subset in training, chunks in eval)")
    box_jitter: float = knob(0.1, "training box noise: max shift of each side as a fraction of the box side")
    num_points: int = knob(1, "positive points per instance in training (evaluation uses one fixed point)")
    num_negative_points: int = knob(0, "negative points per instance in training, inside the box, outside the mask")
    num_workers: int = knob(2, "DataLoader worker processes")
    normalize_on: Literal["device", "cpu"] = knob(
        "device",
        "device: images travel as uint8 at the model's input size and are normalised where the model runs "
        "(images with a cached embedding are not read); cpu: the processor normalises them in the loader",
    )
    check_images: bool = knob(True, "read every image header when opening the data set (existence, size, EXIF)")
    cache_embeddings: bool = knob(True, "compute each image's embedding once when nothing in the image encoder trains")
    embedding_cache_dir: str = knob(
        "",
        "folder for cached embeddings, shared between runs; empty: memory, or output_dir/embedding-cache "
        "when they would take more than data.embedding_cache_memory_gb",
    )
    embedding_cache_memory_gb: float = knob(4.0, "largest embedding cache kept in memory, in GB")
    augment: Literal["none", "light", "strong"] = knob(
        "none",
        "training augmentation (samtune.data.augment), applied alike to the image, its instance masks and crowd "
        "ignore map before prompts are drawn: none; light (horizontal flip, scale 0.75-1.25, mild colour jitter); "
        "strong (flip, scale 0.5-1.5, rotation up to 15 degrees, strong colour jitter, blur, noise, grayscale). "
        "The data.augment_* keys override single settings of the preset; evaluation never augments",
    )
    augment_hflip: float = knob(-1.0, "chance of a horizontal flip; negative: the preset's")
    augment_vflip: float = knob(-1.0, "chance of a vertical flip (aerial, microscopy); negative: the preset's (0)")
    augment_rot90: float = knob(-1.0, "chance of a turn by 90, 180 or 270 degrees; negative: the preset's (0)")
    augment_degrees: float = knob(-1.0, "largest rotation of the random affine, in degrees; negative: the preset's")
    augment_scale: list[float] = knob([], "zoom range MIN,MAX of the random affine (scale jitter); empty: preset's")
    augment_color: list[float] = knob(
        [], "colour jitter BRIGHTNESS,CONTRAST,SATURATION,HUE (applied to 8 samples in 10); empty: the preset's"
    )
    augment_blur: float = knob(-1.0, "chance of a Gaussian blur (sigma 0.1-2 px); negative: the preset's")
    augment_noise: float = knob(-1.0, "std of Gaussian noise (0-1 units) added to half the samples; negative: preset's")
    augment_grayscale: float = knob(-1.0, "chance of turning the image gray; negative: the preset's")
    crop_size: int = knob(
        0,
        "training on random crops: a random N x N window of each image larger than N (centred near a random "
        "instance), instances and crowd cut to it, so high-resolution images are seen at full detail; 0: whole images",
    )
    min_visible_area: int = knob(
        16,
        "an instance cut by a crop or moved by augmentation is dropped (and counted) when fewer of its pixels than "
        "this (or than it had) stay visible",
    )


@dataclass
class TrainConfig:
    epochs: int = knob(3, "passes over the training set (max_steps wins when set)")
    max_steps: int = knob(0, "optimizer steps to run; 0: epochs decide")
    batch_size: int = knob(2, "images per batch per process")
    grad_accum: int = knob(1, "batches accumulated per optimizer step")
    lr: float = knob(1e-4, "peak learning rate")
    weight_decay: float = knob(0.01, "AdamW weight decay")
    optimizer: Literal["adamw", "adamw8bit"] = knob("adamw", "adamw8bit: bitsandbytes' 8-bit states, GPU only")
    scheduler: Literal["cosine", "linear", "constant"] = knob("cosine", "learning-rate schedule after warm-up")
    warmup_ratio: float = knob(0.05, "fraction of the steps spent warming the learning rate up from 0")
    max_grad_norm: float = knob(1.0, "gradient clipping norm; 0: no clipping")
    dice_weight: float = knob(1.0, "weight of the Dice loss")
    focal_weight: float = knob(20.0, "weight of the focal loss (SAM's own ratio is 20 : 1 focal : Dice)")
    iou_weight: float = knob(1.0, "weight of the MSE between predicted and true IoU")
    object_score_weight: float = knob(
        1.0, "SAM 2 / SAM 3: weight of the object-score BCE (every prompted instance is present, as SAM 2 trains)"
    )
    seed: int = knob(0, "seed for weights of new layers, data order, instance subsets and prompts")
    mixed_precision: Literal["", "no", "fp16", "bf16"] = knob(
        "", "autocast precision; empty: what accelerate launch was given (default no)"
    )
    log_every: int = knob(10, "optimizer steps between training-loss log points")
    eval_every: int = knob(0, "optimizer steps between validations; 0: only before and after training")
    save_every: int = knob(0, "optimizer steps between resumable checkpoints; 0: only when stopped early")
    keep_checkpoints: int = knob(2, "resumable checkpoints kept (the newest); 0: keep all")
    resume_from: str = knob("", "'latest' (newest checkpoint of output_dir, if any) or a checkpoint folder")
    stop_at: int = knob(0, "save a checkpoint and stop once this step is reached, to resume later; 0: run to the end")
    early_stopping: int = knob(0, "stop after this many validations without a better mIoU; 0: never")
    max_nonfinite: int = knob(10, "non-finite losses in a row (each skips its step) before the run stops")
    log_images: int = knob(4, "validation images with ground truth and prediction sent to TensorBoard per eval")
    log_train_images: int = knob(
        0,
        "training samples (augmented, as the model sees them) with targets and prediction sent to TensorBoard "
        "at each log point; 0: none",
    )
    correction_clicks: int = knob(
        0, "interactive training: rounds after the first prompt, each adding one click in the instance's error; 0: off"
    )
    mask_prompt_prob: float = knob(0.5, "chance that a correction round also gets the previous mask as mask prompt")
    mask_only_round: bool = knob(False, "one more round at the end with no new click, the previous mask as prompt")
    eval_clicks: int = knob(
        0, "validation also follows the click protocol for this many correction clicks (the click curve); 0: off"
    )
    select_on: Literal["mIoU", "clicks"] = knob(
        "mIoU", "best checkpoint by val mIoU, or by the mean of the click curve (needs train.eval_clicks)"
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = knob(
        "", "run folder: resolved config, metrics, TensorBoard events, checkpoints; empty: runs/<UTC date-time>"
    )
    overwrite: bool = knob(
        False,
        "start a new run in output_dir even if it holds another run (that run's checkpoints, weights and logs are "
        "removed; an embedding cache is kept)",
    )


class ConfigError(UserError):
    """A config file or override that does not fit the schema, or knobs that contradict each other."""


def _leaf_fields(config: object, prefix: str = ""):
    """(dotted key, owner, field) for every leaf knob."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", config, f


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _to_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return None


def _to_number(value: object, kind: type) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return None
    return None


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(key: str, value: object, target: type) -> object:
    """Check or convert one value to the field's type; strings from the command line are parsed."""
    if get_origin(target) is Literal:
        choices = get_args(target)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if get_origin(target) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(key, v, get_args(target)[0]) for v in value]
    if target is bool:
        converted = _to_bool(value)
    elif target in (int, float):
        converted = _to_number(value, target)
    elif target is str:  # paths given as Path objects by library callers are strings in the config
        converted = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    else:
        raise ConfigError(f"{key}: unsupported type {target}")
    if converted is None:
        raise ConfigError(f"{key}: expected {_EXPECTED[target]}, got {value!r}")
    return converted


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


def _apply_file(config: Config, path: str | Path) -> None:
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


def load_config(*files: str | Path | None, overrides: dict[str, object] | None = None) -> Config:
    """Defaults, then each YAML file in turn (later files win; None is skipped), then ``overrides`` (dotted
    keys); validated as a whole."""
    config = Config()
    for path in files:
        if path:
            _apply_file(config, path)
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    validate(config)
    return config


SETUP_KEYS = ("model.name_or_path", *(f"data.{split}_{part}" for split in ("train", "val", "test")
                                     for part in ("annotations", "images")))  # fmt: skip


def is_demo(config: Config) -> bool:
    """Neither a model nor any data given: the built-in demo fills them in."""
    return not any(_get(config, key) for key in SETUP_KEYS)


def _get(config: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _complete_setup(config: Config) -> None:
    """Either nothing (the demo) or a model, a training split and whole val / test splits: never half of one."""
    if is_demo(config):
        return
    missing = [key for key in ("model.name_or_path", "data.train_annotations", "data.train_images")
               if not _get(config, key)]  # fmt: skip
    for split in ("val", "test"):
        pair = (f"data.{split}_annotations", f"data.{split}_images")
        if any(_get(config, key) for key in pair):
            missing += [key for key in pair if not _get(config, key)]
    if missing:
        given = ", ".join(key for key in SETUP_KEYS if _get(config, key))
        raise ConfigError(
            f"{' and '.join(missing)} not given (given: {given}): a run needs a model and a training split (COCO "
            "file and image folder), and each val / test split both its files; give none of them for the demo"
        )


# (key, rule that must hold, what the rule is) for single knobs whose type alone does not say enough.
_RANGES = [
    ("peft.rank", lambda c: c.peft.rank >= 1, "at least 1"),
    ("peft.alpha", lambda c: c.peft.alpha > 0, "positive"),
    ("peft.dropout", lambda c: 0 <= c.peft.dropout < 1, "in [0, 1)"),
    ("data.max_instances", lambda c: c.data.max_instances >= 1, "at least 1"),
    ("data.box_jitter", lambda c: 0 <= c.data.box_jitter < 1, "in [0, 1)"),
    ("data.num_points", lambda c: c.data.num_points >= 1, "at least 1"),
    ("data.num_negative_points", lambda c: c.data.num_negative_points >= 0, "at least 0"),
    ("data.num_workers", lambda c: c.data.num_workers >= 0, "at least 0"),
    (
        "data.augment_scale",
        lambda c: (
            not c.data.augment_scale
            or (len(c.data.augment_scale) == 2 and 0 < c.data.augment_scale[0] <= c.data.augment_scale[1])
        ),
        "empty or MIN,MAX with 0 < MIN <= MAX",
    ),
    (
        "data.augment_color",
        lambda c: (
            not c.data.augment_color
            or (len(c.data.augment_color) == 4 and min(c.data.augment_color) >= 0 and c.data.augment_color[3] <= 0.5)
        ),
        "empty or BRIGHTNESS,CONTRAST,SATURATION,HUE, each at least 0, HUE at most 0.5",
    ),
    *(
        (f"data.augment_{name}", lambda c, name=name: getattr(c.data, f"augment_{name}") <= 1, "at most 1 (a chance)")
        for name in ("hflip", "vflip", "rot90", "blur", "grayscale")
    ),
    ("data.crop_size", lambda c: c.data.crop_size == 0 or c.data.crop_size >= 16, "0 (off) or at least 16"),
    ("data.min_visible_area", lambda c: c.data.min_visible_area >= 1, "at least 1"),
    ("train.epochs", lambda c: c.train.epochs >= 1 or c.train.max_steps > 0, "at least 1 (or set train.max_steps)"),
    ("train.max_steps", lambda c: c.train.max_steps >= 0, "at least 0"),
    ("train.batch_size", lambda c: c.train.batch_size >= 1, "at least 1"),
    ("train.grad_accum", lambda c: c.train.grad_accum >= 1, "at least 1"),
    ("train.lr", lambda c: c.train.lr >= 0, "at least 0"),
    ("train.warmup_ratio", lambda c: 0 <= c.train.warmup_ratio < 1, "in [0, 1)"),
    ("train.max_grad_norm", lambda c: c.train.max_grad_norm >= 0, "at least 0 (0: no clipping)"),
    ("train.log_every", lambda c: c.train.log_every >= 1, "at least 1"),
    ("train.eval_every", lambda c: c.train.eval_every >= 0, "at least 0"),
    ("train.save_every", lambda c: c.train.save_every >= 0, "at least 0"),
    ("train.keep_checkpoints", lambda c: c.train.keep_checkpoints >= 0, "at least 0 (0: keep all)"),
    ("train.max_nonfinite", lambda c: c.train.max_nonfinite >= 1, "at least 1"),
    ("train.log_images", lambda c: c.train.log_images >= 0, "at least 0"),
    ("train.log_train_images", lambda c: c.train.log_train_images >= 0, "at least 0"),
    ("train.correction_clicks", lambda c: c.train.correction_clicks >= 0, "at least 0 (0: off)"),
    ("train.mask_prompt_prob", lambda c: 0 <= c.train.mask_prompt_prob <= 1, "in [0, 1]"),
    ("train.eval_clicks", lambda c: c.train.eval_clicks >= 0, "at least 0 (0: off)"),
]


def validate(config: Config) -> None:
    """The rules that tie knobs together, and ranges their types cannot state; the first broken one is raised."""
    for key, holds, rule in _RANGES:
        if not holds(config):
            section, name = key.split(".")
            raise ConfigError(f"{key} must be {rule}, got {getattr(getattr(config, section), name)!r}")
    _complete_setup(config)
    if config.train.early_stopping and config.data.train_annotations and not config.data.val_annotations:
        raise ConfigError("train.early_stopping needs a validation split (data.val_annotations)")
    if config.train.select_on == "clicks" and not config.train.eval_clicks:
        raise ConfigError("train.select_on clicks needs train.eval_clicks (the number of clicks of the curve)")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def flat_values(config: Config) -> dict[str, int | float | str | bool]:
    """Every knob as ``section.key``: value, lists joined by commas (what TensorBoard's hyper-parameters take)."""
    return {key: ",".join(map(str, v)) if isinstance(v := getattr(owner, f.name), list) else v
            for key, owner, f in _leaf_fields(config)}  # fmt: skip


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _metavar(target: type) -> str:
    if get_origin(target) is Literal:
        return "{" + ",".join(get_args(target)) + "}"
    if get_origin(target) is list:
        return "A,B,..."
    return getattr(target, "__name__", str(target)).upper()


def build_parser(description: str) -> argparse.ArgumentParser:
    """``--config FILE`` plus one ``--section.key`` option per knob, documented with its choices and default."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file with sections model, peft, data, train (command-line keys win)")
    defaults = Config()
    for key, owner, f in _leaf_fields(defaults):
        kind = _field_types(owner)[f.name]
        flag = {"nargs": "?", "const": "true"} if kind is bool else {}  # --overwrite alone means true
        parser.add_argument(
            f"--{key}",
            dest=key,
            default=argparse.SUPPRESS,
            metavar=_metavar(kind),
            help=f"{f.metadata.get('help', '')} (default: {getattr(owner, f.name)!r})",
            **flag,
        )
    return parser


def parse_args(argv: list[str] | None = None, description: str = "", defaults_file: str | Path | None = None) -> Config:
    """The command line's config: ``defaults_file`` (e.g. the demo's settings), then ``--config``, then keys."""
    args = vars(build_parser(description).parse_args(argv))
    path = args.pop("config", None)
    return load_config(defaults_file, path, overrides=args)
