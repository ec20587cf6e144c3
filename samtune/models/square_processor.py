"""SAM 2 / SAM 3 tracker image processing in plain torch, for machines where torchvision does not import.

transformers ships ``Sam2ImageProcessor`` / ``Sam3ImageProcessor`` only as torchvision classes, and their modules
import torchvision at import time. ``SquareImageProcessor`` repeats what they do for samtune (fixed-square resize,
rescale, normalise, nearest-resized labels, ``post_process_masks``) with torch ops only, op for op as torchvision
does them, and saves the official class name and keys, so a folder saved here loads with ``AutoProcessor`` where
torchvision works. The official class is used wherever it imports.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ProcessorMixin, Sam2Processor, Sam3TrackerProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature, get_size_dict
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Family:
    official: str  # the transformers image processor this stands in for
    module: str
    processor: type[ProcessorMixin]
    size: int
    mask_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


FAMILIES = {
    "sam2": _Family(
        "Sam2ImageProcessor",
        "transformers.models.sam2.image_processing_sam2",
        Sam2Processor,
        1024,
        256,
        tuple(IMAGENET_DEFAULT_MEAN),
        tuple(IMAGENET_DEFAULT_STD),
    ),
    "sam3_tracker": _Family(
        "Sam3ImageProcessor",
        "transformers.models.sam3.image_processing_sam3",
        Sam3TrackerProcessor,
        1008,
        288,
        tuple(IMAGENET_STANDARD_MEAN),
        tuple(IMAGENET_STANDARD_STD),
    ),
}
ALIASES = {"sam2_video": "sam2", "sam3_video": "sam3_tracker"}
# transformers maps PIL resampling to these torchvision modes (NEAREST is torchvision's NEAREST_EXACT).
TORCH_MODES = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


def _family(model_type: str) -> _Family:
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in FAMILIES:
        raise ValueError(f"no square-input processor for model type {model_type!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _family_of_official(name: str) -> _Family:
    for family in FAMILIES.values():
        if name.removesuffix("Fast").removesuffix("Pil") == family.official:
            return family
    raise ValueError(f"SquareImageProcessor stands in for {[f.official for f in FAMILIES.values()]}, not {name!r}")


class SquareImageProcessorKwargs(ImagesKwargs, total=False):
    mask_size: dict[str, int]


class SquareImageProcessor(BaseImageProcessor):
    """``Sam2ImageProcessor`` (default) or ``Sam3ImageProcessor`` (``image_processor_type="Sam3ImageProcessor"``)
    without torchvision. Class attributes mirror the official SAM 2 class so ``to_dict`` saves the same keys."""

    valid_kwargs = SquareImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 1024, "width": 1024}
    mask_size = {"height": 256, "width": 256}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_pad = None
    pad_size = None
    mask_pad_size = None

    def __init__(self, image_processor_type: str = "Sam2ImageProcessor", **kwargs: Any) -> None:
        family = _family_of_official(image_processor_type)
        defaults = {
            "size": {"height": family.size, "width": family.size},
            "mask_size": {"height": family.mask_size, "width": family.mask_size},
            "image_mean": list(family.mean),
            "image_std": list(family.std),
        }
        for key, value in defaults.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)
        self._official = family.official

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_official", None)
        out["image_processor_type"] = self._official  # so the official AutoProcessor loads what is saved here
        return out

    def preprocess(self, images: Any, segmentation_maps: Any = None, **kwargs: Any) -> BatchFeature:
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _standardize_kwargs(self, mask_size: Any = None, **kwargs: Any) -> dict:
        if mask_size is not None and not isinstance(mask_size, SizeDict):
            mask_size = SizeDict(**get_size_dict(mask_size, param_name="mask_size"))
        kwargs["mask_size"] = mask_size
        return super()._standardize_kwargs(**kwargs)

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One image as a channels-first tensor (TorchvisionBackend.process_image without torchvision)."""
        is_pil = not isinstance(image, (np.ndarray, torch.Tensor))
        if is_pil:
            image = convert_to_rgb(image, return_numpy=True) if do_convert_rgb else np.array(image)
            input_data_format = ChannelDimension.LAST
        if isinstance(image, np.ndarray):
            # a read-only array (np.asarray of a PIL image) would make torch warn once per process
            image = torch.from_numpy(image if image.flags.writeable else image.copy())
        if image.ndim == 2:
            image = image.unsqueeze(0)
            input_data_format = ChannelDimension.FIRST
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        if input_data_format == ChannelDimension.LAST:
            image = image.permute(2, 0, 1)
        if do_convert_rgb and not is_pil:
            image = _to_rgb(image)
        image = image.contiguous()
        return image if device is None else image.to(device)

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        segmentation_maps: Any,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        if kwargs.get("do_center_crop"):
            raise ValueError("samtune's torch SAM 2 / 3 image processor does not centre-crop")
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device
        )
        data: dict[str, Any] = {
            "pixel_values": _process(images, **kwargs),
            "original_sizes": [image.shape[-2:] for image in images],
        }
        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                images=segmentation_maps,
                expected_ndims=2,
                do_convert_rgb=False,
                input_data_format=ChannelDimension.FIRST,
            )
            settings = kwargs | {"do_normalize": False, "do_rescale": False, "resample": PILImageResampling.NEAREST}
            settings["size"] = settings.pop("mask_size")
            data["labels"] = torch.stack(_process(maps, **settings)).squeeze(1).to(torch.int64)
        return BatchFeature(data=data, tensor_type=kwargs["return_tensors"])

    def post_process_masks(
        self,
        masks: Any,
        original_sizes: Any,
        mask_threshold: float = 0.0,
        binarize: bool = True,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
        apply_non_overlapping_constraints: bool = False,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """Low-res mask logits -> original size (bilinear), thresholded: the official method, line for line."""
        if isinstance(original_sizes, (torch.Tensor, np.ndarray)):
            original_sizes = original_sizes.tolist()
        output_masks = []
        for i, original_size in enumerate(original_sizes):
            if isinstance(masks[i], np.ndarray):
                masks[i] = torch.from_numpy(masks[i])
            elif not isinstance(masks[i], torch.Tensor):
                raise TypeError("Input masks should be a list of `torch.tensors` or a list of `np.ndarray`")
            mask = F.interpolate(masks[i], original_size, mode="bilinear", align_corners=False)
            if apply_non_overlapping_constraints and mask.size(0) > 1:
                # keep only the highest-scoring object at each pixel (others clamped to -10), as the official one
                keep = (
                    mask.argmax(dim=0, keepdim=True)
                    == torch.arange(mask.size(0), device=mask.device)[:, None, None, None]
                )
                mask = torch.where(keep, mask, mask.clamp(max=-10.0))
            if binarize:
                mask = mask > mask_threshold
            output_masks.append(mask)
        return output_masks


def _process(
    images: list[torch.Tensor],
    do_resize: bool,
    size: SizeDict,
    resample: Any,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean: Any,
    image_std: Any,
    do_pad: bool | None = None,
    pad_size: SizeDict | None = None,
    **kwargs: Any,
) -> list[torch.Tensor]:
    """TorchvisionBackend._preprocess: resize, fused rescale + normalise, pad (right / bottom, zeros)."""
    images = [_resize(image, size, resample) if do_resize else image for image in images]
    images = [
        _rescale_and_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        for image in images
    ]
    if not do_pad:
        return images
    height = pad_size.height if pad_size is not None else max(image.shape[-2] for image in images)
    width = pad_size.width if pad_size is not None else max(image.shape[-1] for image in images)
    if any(image.shape[-2] > height or image.shape[-1] > width for image in images):
        raise ValueError(f"pad size {height}x{width} is smaller than an image")
    return [F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in images]


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale_to_rgb, then alpha onto white for 4 channels (as TorchvisionBackend.convert_to_rgb)."""
    if image.shape[0] == 1:
        return image.repeat(3, 1, 1)
    if image.shape[0] != 4:
        return image
    if image.dtype == torch.uint8:
        scaled = image.to(torch.float32).mul_(1.0 / 255)
    elif image.is_floating_point():
        if image.min() < 0.0 or image.max() > 1.0:
            raise ValueError("an RGBA float image must lie in [0, 1]")
        scaled = image
    else:
        raise ValueError(f"RGBA images of dtype {image.dtype} are not supported")
    blended = scaled[:3] * scaled[3:] + (1 - scaled[3:])
    # torchvision's float -> uint8 conversion scales by 255.999 and truncates (not round)
    return blended.mul(255 + 1.0 - 1e-3).to(torch.uint8) if image.dtype == torch.uint8 else blended


def _native_uint8(mode: str) -> bool:
    """Whether torchvision's CPU resize interpolates uint8 directly (else it goes through float32 and rounds)."""
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64",
            "arm64",
        )
    return True  # bicubic, nearest-exact


def _resize(image: torch.Tensor, size: SizeDict, resample: Any) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize on a (C, H, W) tensor, with antialias=True as transformers
    calls it: uint8 stays uint8 (native kernel on CPUs torchvision picks it for, else float32, round, cast)."""
    if not (size.height and size.width):
        raise ValueError(f"a fixed {{'height', 'width'}} size is needed, got {dict(size)}")
    mode = TORCH_MODES.get(PILImageResampling(resample))
    if mode is None:
        raise ValueError(f"resample {PILImageResampling(resample).name} needs torchvision; use BILINEAR or BICUBIC")
    new_size = (size.height, size.width)
    if tuple(image.shape[-2:]) == new_size:
        return image
    dtype = image.dtype
    native = dtype in (torch.float32, torch.float64) or (
        dtype == torch.uint8 and (mode == "nearest-exact" or (image.device.type == "cpu" and _native_uint8(mode)))
    )
    batch = image.unsqueeze(0) if native else image.unsqueeze(0).to(torch.float32)
    smooth = mode != "nearest-exact"
    out = F.interpolate(batch, size=new_size, mode=mode, align_corners=False if smooth else None, antialias=smooth)
    if not native:
        if mode == "bicubic" and dtype == torch.uint8:
            out = out.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            out = out.round_()
        out = out.to(dtype)
    return out[0]


def _rescale_and_normalize(
    image: torch.Tensor,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Any,
    std: Any,
) -> torch.Tensor:
    """TorchvisionBackend's fused rescale + normalise: (x - mean/f) / (std/f) in float32, not (x*f - mean) / std."""
    if do_normalize:
        if do_rescale:
            mean = torch.tensor(mean, device=image.device) * (1.0 / rescale_factor)
            std = torch.tensor(std, device=image.device) * (1.0 / rescale_factor)
        mean = torch.as_tensor(mean, dtype=torch.float32, device=image.device)
        std = torch.as_tensor(std, dtype=torch.float32, device=image.device)
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        return image.to(torch.float32).sub(mean).div_(std)
    if do_rescale:
        return image * rescale_factor
    return image


_reported: set[str] = set()


@functools.cache
def _official_class(model_type: str) -> tuple[type | None, str]:
    """The official image processor class (None where it does not import) and why."""
    family = _family(model_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a broken torchvision warns before it raises: the raise says enough
            cls = getattr(importlib.import_module(family.module), family.official)
    except Exception as error:  # a broken torchvision raises RuntimeError, a missing one ImportError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (
            None,
            f"torchvision does not import ({reason}): using samtune's torch implementation of {family.official}",
        )
    return cls, f"using transformers' {family.official}"


def official_processor_available(model_type: str) -> bool:
    """Whether transformers' own image processor for ``model_type`` imports here (needs a working torchvision)."""
    return _official_class(model_type)[0] is not None


def _report(model_type: str) -> None:
    """Say once per family which image processor is used and why."""
    family = _family(model_type)
    if family.official not in _reported:
        _reported.add(family.official)
        logger.info("%s image processor: %s", model_type, _official_class(model_type)[1])


def _image_processor(model_type: str, **settings: Any) -> BaseImageProcessor:
    family = _family(model_type)
    cls = _official_class(model_type)[0]
    _report(model_type)
    if cls is not None:
        return cls(**settings)
    return SquareImageProcessor(image_processor_type=family.official, **settings)


def square_processor(
    model_type: str,
    image_size: int,
    mask_size: int,
    image_mean: list[float] | tuple[float, ...] | None = None,
    image_std: list[float] | tuple[float, ...] | None = None,
) -> ProcessorMixin:
    """``Sam2Processor`` ("sam2") or ``Sam3TrackerProcessor`` ("sam3_tracker") at ``image_size`` with low-res masks
    of ``mask_size``; the official image processor where it imports, else ``SquareImageProcessor``."""
    family = _family(model_type)
    image_processor = _image_processor(
        model_type,
        size={"height": image_size, "width": image_size},
        mask_size={"height": mask_size, "width": mask_size},
        image_mean=list(image_mean if image_mean is not None else family.mean),
        image_std=list(image_std if image_std is not None else family.std),
    )
    return family.processor(image_processor=image_processor)


def _read_json(name_or_path: str, filename: str) -> dict | None:
    """A saved json of a local folder or hub repo; None where the file is not there."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name_or_path, filename)).read_text())
    except RemoteEntryNotFoundError:
        return None


def load_square_processor(name_or_path: str, model_type: str) -> ProcessorMixin:
    """The saved processor of a SAM 2 / SAM 3 tracker checkpoint: ``AutoProcessor`` where the official image
    processor imports, else the family's processor around ``SquareImageProcessor`` with the saved settings."""
    family = _family(model_type)
    _report(model_type)
    if official_processor_available(model_type):
        from transformers import AutoProcessor

        loaded = AutoProcessor.from_pretrained(name_or_path)
        # a folder with only preprocessor_config.json gives the bare image processor: prompts need the processor
        return loaded if isinstance(loaded, ProcessorMixin) else family.processor(image_processor=loaded)
    processor_config = _read_json(name_or_path, "processor_config.json") or {}
    settings = processor_config.get("image_processor") or _read_json(name_or_path, "preprocessor_config.json")
    if settings is None:
        raise FileNotFoundError(f"{name_or_path}: no processor_config.json or preprocessor_config.json to read")
    settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
    image_processor = SquareImageProcessor(image_processor_type=family.official, **settings)
    extra = {k: processor_config[k] for k in ("target_size", "point_pad_value") if k in processor_config}
    return family.processor(image_processor=image_processor, **extra)
