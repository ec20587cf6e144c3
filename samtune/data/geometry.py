"""The processor's geometry without its float work: images resized in uint8, targets and prompts in its frame.

``SamProcessor`` (and SAM 2 / 3's) resize, rescale, normalise and pad each image on the CPU in float32 (at 1024
px, 12 MB per image and most of the loading time), then the batch crosses to the device at 4 bytes a pixel.
``InputGeometry`` does only what must happen on the CPU, as the processor does it: the resize, in uint8 (PIL for
the PIL image processor, the torch kernel that torchvision runs for the others), the zero padding, the
nearest-resized low-resolution targets and the prompt coordinates. ``normalize_on_device`` does the rest where
the model runs. A sample whose image embedding is cached needs no pixels at all: targets and prompts come from
the annotations and the image's size (``image=None``).

Tests hold it equal to the processor for every family (pixels to float tolerance after normalisation; sizes,
targets and prompts exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling, SizeDict

from samtune.models.square_processor import _resize as torch_resize

PIXEL_KEYS = ("pixel_mean", "pixel_std")  # per-sample normalisation the device applies (``normalize_on_device``)


class UnsupportedGeometry(ValueError):
    """Processor settings this module does not reproduce (the processor's own path is used then)."""


def _longest_edge_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """SamImageProcessor._get_preprocess_shape: the longest side to ``longest``, rounded half up."""
    scale = longest * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class InputGeometry:
    square: bool  # fixed-square resize, no padding (SAM 2 / 3) rather than longest side + pad (SAM / SAM-HQ)
    side: int  # the model's input side S
    mask_side: int  # the low-resolution target side
    pil: bool  # PIL resize (the PIL image processor) rather than torch's (torchvision's kernels)
    resample: int  # PILImageResampling of the image resize
    mean: tuple[float, ...]  # per channel, in 0-255 units (rescale folded in)
    std: tuple[float, ...]

    @classmethod
    def of(cls, processor) -> InputGeometry:
        """The geometry of ``processor`` (a SAM / SAM-HQ / SAM 2 / SAM 3 tracker processor); UnsupportedGeometry
        for settings it does not reproduce (no resize, centre crop, other sizes or resampling)."""
        image = processor.image_processor
        settings = image.to_dict()
        if not settings.get("do_resize", True) or settings.get("do_center_crop"):
            raise UnsupportedGeometry("the processor does not resize, or centre-crops")
        if not (settings.get("do_rescale") and settings.get("do_normalize")):
            raise UnsupportedGeometry("the processor does not rescale and normalise")
        resample = int(settings.get("resample", PILImageResampling.BILINEAR))
        if resample not in (PILImageResampling.BILINEAR, PILImageResampling.BICUBIC):
            raise UnsupportedGeometry(f"resample {resample}")
        size, mask = settings["size"], settings.get("mask_size") or {}
        factor = float(settings["rescale_factor"])
        mean = tuple(float(m) / factor for m in settings["image_mean"])
        std = tuple(float(s) / factor for s in settings["image_std"])
        pil = getattr(image, "backend", "") == "pil"
        if "longest_edge" in size:
            pad, mask_pad = settings.get("pad_size") or {}, settings.get("mask_pad_size") or {}
            side, mask_side = size["longest_edge"], mask.get("longest_edge")
            if not settings.get("do_pad") or pad != {"height": side, "width": side}:
                raise UnsupportedGeometry(f"padding {pad} for input side {side}")
            if mask_pad != {"height": mask_side, "width": mask_side}:
                raise UnsupportedGeometry(f"mask padding {mask_pad} for mask side {mask_side}")
            return cls(False, side, mask_side, pil, resample, mean, std)
        if size.get("height") != size.get("width") or mask.get("height") != mask.get("width") or settings.get("do_pad"):
            raise UnsupportedGeometry(f"size {size}, mask size {mask}")
        return cls(True, size["height"], mask["height"], pil, resample, mean, std)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') of the resized image inside the S x S input."""
        return (self.side, self.side) if self.square else _longest_edge_shape(height, width, self.side)

    def _resize(self, array: np.ndarray, shape: tuple[int, int], resample: int) -> torch.Tensor:
        """(C, H, W) uint8 -> (C, h, w) uint8 with the processor's kernel."""
        if self.pil:  # one PIL image per channel plane, as the PIL processor resizes segmentation maps
            if array.shape[0] == 3 and resample != PILImageResampling.NEAREST:
                resized = Image.fromarray(np.moveaxis(array, 0, -1)).resize(shape[::-1], resample=resample)
                return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
            planes = [np.asarray(Image.fromarray(p).resize(shape[::-1], resample=resample)) for p in array]
            return torch.from_numpy(np.stack(planes))
        size = SizeDict(height=shape[0], width=shape[1])
        return torch_resize(torch.from_numpy(np.ascontiguousarray(array)), size, resample)

    def image(self, rgb: np.ndarray | Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) uint8 input (zero padding right and bottom) and its (h', w'), from an (H, W, 3) uint8 image
        or a PIL RGB image (resized as it is by the PIL processor's kernel: no copy through numpy)."""
        if isinstance(rgb, Image.Image):
            shape = self.resized(rgb.height, rgb.width)
            if self.pil:
                resized = torch.from_numpy(np.array(rgb.resize(shape[::-1], resample=self.resample))).permute(2, 0, 1)
            else:
                resized = self._resize(np.moveaxis(np.asarray(rgb), -1, 0), shape, self.resample)
        else:
            shape = self.resized(*rgb.shape[:2])
            resized = self._resize(np.moveaxis(rgb, -1, 0), shape, self.resample)
        if self.square:
            return resized.contiguous(), torch.tensor(shape)
        out = torch.zeros(3, self.side, self.side, dtype=torch.uint8)
        out[:, : shape[0], : shape[1]] = resized
        return out, torch.tensor(shape)

    def targets(self, maps: np.ndarray) -> torch.Tensor:
        """(N, H, W) bool maps -> (N, m, m) bool at the mask resolution (nearest, zero padding), as the processor's
        segmentation maps."""
        height, width = maps.shape[1:]
        shape = (self.mask_side,) * 2 if self.square else _longest_edge_shape(height, width, self.mask_side)
        out = torch.zeros(len(maps), self.mask_side, self.mask_side, dtype=torch.bool)
        if len(maps):
            resized = self._resize(maps.astype(np.uint8), shape, PILImageResampling.NEAREST)
            out[:, : shape[0], : shape[1]] = resized.bool()
        return out

    def coordinates(self, coords: np.ndarray, height: int, width: int) -> torch.Tensor:
        """(x, y) pairs in the last axis, original pixels -> the input frame (boxes as two corners)."""
        new_h, new_w = self.resized(height, width)
        if self.square:  # Sam2Processor / Sam3TrackerProcessor: float32, ratios of the int64 size tensor's items
            out = torch.as_tensor(coords, dtype=torch.float32).clone()
            out[..., 0] = out[..., 0] * (new_w / torch.tensor(width))
            out[..., 1] = out[..., 1] * (new_h / torch.tensor(height))
            return out
        scaled = np.array(coords, dtype=np.float64)  # SamProcessor: float64 numpy
        scaled[..., 0] = scaled[..., 0] * (new_w / width)
        scaled[..., 1] = scaled[..., 1] * (new_h / height)
        return torch.from_numpy(scaled).float()

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's ``pixel_mean`` and ``pixel_std`` (3,), for ``normalize_on_device``."""
        return torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)


def normalize_on_device(batch: dict) -> dict:
    """A batch from the uint8 path made model-ready where it lies: ``pixel_values`` (B, 3, S, S) uint8 -> float32
    (x - mean) / std, padding 0 as the processor pads after normalising; rows without pixels (their embedding is
    cached) stay 0. A batch already in float (the processor's path) is returned as it is."""
    pixels = batch["pixel_values"]
    if pixels.dtype != torch.uint8:
        return batch
    out = {key: value for key, value in batch.items() if key not in PIXEL_KEYS}
    has = batch.get("has_pixels")
    if has is not None and not bool(has.any()):  # nothing to encode: a zero-stride stand-in keeps the shape
        out["pixel_values"] = torch.zeros((), dtype=torch.float32, device=pixels.device).expand(pixels.shape)
        return out
    mean = batch["pixel_mean"][:, :, None, None]
    std = batch["pixel_std"][:, :, None, None]
    values = pixels.float().sub_(mean).div_(std)
    # zero the padding and the rows not read: on the CPU by slicing only what needs it; on an accelerator by one
    # masked multiply, which needs no host sync to read the sizes
    zero = zero_outside_by_rows if pixels.device.type == "cpu" else zero_outside_by_mask
    out["pixel_values"] = zero(values, batch["reshaped_input_sizes"], has)
    return out


def zero_outside_by_rows(values: torch.Tensor, sizes: torch.Tensor, has: torch.Tensor | None) -> torch.Tensor:
    """Zero (B, C, S, S) ``values`` outside each row's (h', w') and in rows whose ``has`` is False, in place."""
    read = has.tolist() if has is not None else [True] * len(sizes)
    for row, ((height, width), kept) in enumerate(zip(sizes.tolist(), read)):
        if not kept:
            values[row] = 0
        values[row, :, height:] = 0
        values[row, :, :height, width:] = 0
    return values


def zero_outside_by_mask(values: torch.Tensor, sizes: torch.Tensor, has: torch.Tensor | None) -> torch.Tensor:
    """``zero_outside_by_rows`` as one multiply by a (B, 1, S, S) mask."""
    side = values.shape[-1]
    positions = torch.arange(side, device=values.device)
    inside = (positions[None, :, None] < sizes[:, 0, None, None]) & (positions[None, None, :] < sizes[:, 1, None, None])
    if has is not None:
        inside &= has[:, None, None]
    return values.mul_(inside[:, None])
