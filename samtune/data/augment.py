"""Training augmentation: one random transform applied alike to an image, its instance masks and its crowd ignore map.

The transforms are kornia's (``kornia.augmentation``, Apache-2.0), on CPU tensors in the loader's workers: the
image goes in as ``input``, the masks and the ignore map as ``mask`` channels of one tensor, so every geometric
change (flip, affine) is the same sampled transform for all of them and masks stay binary (nearest). Turns by 90
degrees are ``torch.rot90`` (exact, and a non-square image changes its shape as a turn must). Prompts are drawn
afterwards from the transformed masks (``samtune.data.prompts``), so boxes and points follow by construction.

Randomness: kornia samples its parameters from torch's global generator; ``augment`` seeds it inside
``torch.random.fork_rng`` from a seed the data set derives from (seed, epoch, image), so a sample depends on those
alone, not on the worker that makes it, and the caller's random state is untouched.

Instances the transform moves out of the image, or leaves with fewer than ``min_visible`` pixels (or fewer than
they had), are dropped and counted, never kept as empty targets. A transform that would drop every instance of
a sample is not used: the sample goes through as it was (there is always something to learn from).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from samtune.config import DataConfig


@dataclass(frozen=True)
class AugmentSettings:
    """What one preset (or the user's keys) asks for; zero / (1, 1) turns a transform off."""

    hflip: float = 0.0  # chance of a horizontal flip
    vflip: float = 0.0  # chance of a vertical flip
    rot90: float = 0.0  # chance of a turn by 90, 180 or 270 degrees
    degrees: float = 0.0  # largest rotation of the affine
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range of the affine
    color: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    blur: float = 0.0  # chance of a Gaussian blur
    noise: float = 0.0  # std of Gaussian noise (0-1 units)
    grayscale: float = 0.0  # chance of grayscale

    @property
    def active(self) -> bool:
        return self != AugmentSettings()


# Presets. Vertical flips and 90-degree turns suit aerial or microscopy images, not photos: they stay opt-in keys.
PRESETS = {
    "none": AugmentSettings(),
    "light": AugmentSettings(hflip=0.5, scale=(0.75, 1.25), color=(0.2, 0.2, 0.2, 0.02)),
    "strong": AugmentSettings(
        hflip=0.5, degrees=15.0, scale=(0.5, 1.5), color=(0.4, 0.4, 0.4, 0.1), blur=0.2, noise=0.03, grayscale=0.1
    ),
}
COLOR_CHANCE = 0.8  # share of samples whose colours are jittered (sam2's trainer jitters most, not all)
NOISE_CHANCE = 0.5


def settings_of(data: DataConfig) -> AugmentSettings:
    """The preset ``data.augment`` with the ``data.augment_*`` keys the user set (negative / empty: unset)."""
    settings = PRESETS[data.augment]
    chosen: dict = {}
    for name in ("hflip", "vflip", "rot90", "degrees", "blur", "noise", "grayscale"):
        value = getattr(data, f"augment_{name}")
        if value >= 0:
            chosen[name] = float(value)
    if data.augment_scale:
        chosen["scale"] = tuple(float(v) for v in data.augment_scale)
    if data.augment_color:
        chosen["color"] = tuple(float(v) for v in data.augment_color)
    return replace(settings, **chosen)


def varies_images(data: DataConfig) -> str | None:
    """Why training images differ from their files (augmentation, random crops), or None when they do not."""
    reasons = []
    if settings_of(data).active:
        reasons.append(f"data.augment {data.augment} changes the training images")
    if data.crop_size:
        reasons.append(f"data.crop_size {data.crop_size} crops them")
    return " and ".join(reasons) or None


@functools.lru_cache(maxsize=8)
def _pipeline(settings: AugmentSettings):
    """kornia's transforms for ``settings`` (stateless between calls, so built once per process)."""
    import kornia.augmentation as K  # noqa: N812 - kornia's own name for it

    steps = []
    if settings.hflip:
        steps.append(K.RandomHorizontalFlip(p=settings.hflip))
    if settings.vflip:
        steps.append(K.RandomVerticalFlip(p=settings.vflip))
    if settings.degrees or settings.scale != (1.0, 1.0):
        steps.append(K.RandomAffine(degrees=settings.degrees, scale=settings.scale, p=1.0))
    if any(settings.color):
        brightness, contrast, saturation, hue = settings.color
        steps.append(K.ColorJitter(brightness, contrast, saturation, hue, p=COLOR_CHANCE))
    if settings.grayscale:
        steps.append(K.RandomGrayscale(p=settings.grayscale))
    if settings.blur:
        steps.append(K.RandomGaussianBlur(kernel_size=(7, 7), sigma=(0.1, 2.0), p=settings.blur))
    if settings.noise:
        steps.append(K.RandomGaussianNoise(std=settings.noise, p=NOISE_CHANCE))
    if not steps:
        return None
    return K.AugmentationSequential(*steps, data_keys=["input", "mask"])


def augment(
    image: np.ndarray, masks: np.ndarray, ignore: np.ndarray, settings: AugmentSettings, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random transform of an (H, W, 3) uint8 image, its (K, H, W) bool masks and (H, W) bool ignore map, the
    same for all of them; the result depends on ``seed`` alone. Returns them transformed (a 90-degree turn swaps H
    and W), masks still bool."""
    count = len(masks)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div_(255)  # a writable copy
    maps = torch.from_numpy(np.concatenate([masks, ignore[None]]).astype(np.float32))[None]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if settings.rot90 and float(torch.rand(())) < settings.rot90:
            turns = int(torch.randint(1, 4, ()))
            pixels, maps = torch.rot90(pixels, turns, dims=(2, 3)), torch.rot90(maps, turns, dims=(2, 3))
        pipeline = _pipeline(settings)
        if pipeline is not None:
            pixels, maps = pipeline(pixels, maps)
    out = pixels[0].clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    binary = maps[0].numpy() > 0.5
    return out, binary[:count], binary[count]


def visible(masks: np.ndarray, areas: np.ndarray, min_visible: int) -> np.ndarray:
    """(K,) bool: which masks keep at least ``min_visible`` pixels, or all the pixels they had (``areas``)."""
    counts = masks.reshape(len(masks), -1).sum(axis=1)
    return (counts > 0) & (counts >= np.minimum(min_visible, areas))


def augment_sample(sample: dict, settings: AugmentSettings, seed: int, min_visible: int) -> dict:
    """``sample`` (``CocoInstanceDataset.sample``'s dict, with pixels) transformed by ``augment``; instances that
    fall under ``min_visible`` pixels are dropped and added to ``sample["dropped"]``. A transform that would drop
    every instance is not used (the sample is returned as it was)."""
    masks = sample["masks"]
    image, moved, ignore = augment(np.asarray(sample["image"]), masks, sample["ignore"], settings, seed)
    keep = visible(moved, masks.reshape(len(masks), -1).sum(axis=1), min_visible)
    if len(masks) and not keep.any():
        return sample
    return {
        **sample,
        "image": image,
        "size": image.shape[:2],
        "masks": moved[keep],
        "ignore": ignore,
        "category_ids": sample["category_ids"][keep],
        "annotation_ids": sample["annotation_ids"][keep],
        "dropped": sample.get("dropped", 0) + int((~keep).sum()),
    }
