"""COCO images to SAM training and evaluation samples.

``CocoInstanceDataset`` gives, per image, the upright RGB pixels, the instance
masks at original resolution, their category and annotation ids, and the crowd
regions as an ignore map. ``SamPromptDataset`` picks the instances of one step,
draws their prompts and runs the model's own ``SamProcessor``; ``collate`` pads
a batch to its largest instance count and marks which instances are real.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from samtune.coco import CocoFormatError, CocoImage, CocoIndex
from samtune.collate import collate, encode_sample
from samtune.images import ImageReadError, orient_mask, read_rgb
from samtune.prompts import PromptConfig, make_prompts

logger = logging.getLogger(__name__)


class CocoInstanceDataset(Dataset):
    """Images and their instance masks, at original resolution, from a checked COCO file."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, check_images: bool = True) -> None:
        self.index = CocoIndex(annotation_file, image_dir, check_images=check_images)
        self.images = self.index.images
        self.categories = self.index.categories

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, image: CocoImage, rles: list[dict]) -> np.ndarray:
        if not rles:
            return np.zeros((0, *image.size), dtype=bool)
        masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
        if image.annotations_on_stored_pixels:
            masks = np.stack([orient_mask(m, image.orientation) for m in masks])
        return masks

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        try:
            pixels = read_rgb(image.path)
        except ImageReadError as error:
            where = f"{self.index.annotation_file}: image id {image.image_id} ({image.path})"
            raise CocoFormatError(f"{where}: {error}") from error
        if pixels.shape[:2] != image.size:
            raise CocoFormatError(
                f"{self.index.annotation_file}: image id {image.image_id} ({image.path}): decoded size "
                f"{pixels.shape[1]}x{pixels.shape[0]} differs from the {image.size[1]}x{image.size[0]} "
                "seen when the data set was opened (was the file changed?)"
            )
        crowd = self._decode(image, image.crowd)
        return {
            "image_id": image.image_id,
            "image": pixels,
            "masks": self._decode(image, [inst.rle for inst in image.instances]),
            "category_ids": np.array([inst.category_id for inst in image.instances], dtype=np.int64),
            "annotation_ids": np.array([inst.annotation_id for inst in image.instances], dtype=np.int64),
            "ignore": crowd.any(axis=0) if len(crowd) else np.zeros(image.size, dtype=bool),
        }


class SamPromptDataset(Dataset):
    """SAM-ready samples: one prompt per instance, encoded with the model's processor.

    Training (``train=True``): images without instances are left out (in prompt modes),
    at most ``max_instances`` instances per image, a fresh random subset and fresh
    prompts each epoch, reproducible from (seed, epoch, index) whatever the worker count.
    Evaluation: every instance, in chunks of ``max_instances``, with fixed prompts, and the
    original-resolution masks kept for scoring.
    """

    def __init__(
        self,
        source: CocoInstanceDataset,
        processor,
        prompt: PromptConfig,
        max_instances: int = 16,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.source, self.processor, self.prompt = source, processor, prompt
        self.max_instances, self.train, self.seed = max_instances, train, seed
        self.epoch = 0
        counts = [len(image.instances) for image in source.images]
        if prompt.mode == "none":
            self.items = [(i, 0) for i in range(len(counts))]
        elif train:
            self.items = [(i, 0) for i, count in enumerate(counts) if count]
        else:
            self.items = [(i, start) for i, count in enumerate(counts) for start in range(0, count, max_instances)]
        unused = sum(1 for count in counts if not count) if prompt.mode != "none" else 0
        if unused:
            logger.info(
                "%s: %d images without instances are not used with %s prompts",
                source.index.annotation_file,
                unused,
                prompt.mode,
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose which instances and prompts the next pass draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict:
        index, start = self.items[item]
        sample = self.source[index]
        masks, categories, annotations = sample["masks"], sample["category_ids"], sample["annotation_ids"]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        if self.prompt.mode == "none":
            # One target per image: the union of its instances (foreground segmentation).
            masks = masks.any(axis=0, keepdims=True) if len(masks) else np.zeros((1, *sample["image"].shape[:2]), bool)
            categories = annotations = np.full(1, -1, dtype=np.int64)
        elif rng is not None:
            if len(masks) > self.max_instances:
                keep = np.sort(rng.choice(len(masks), size=self.max_instances, replace=False))
                masks, categories, annotations = masks[keep], categories[keep], annotations[keep]
        else:
            chunk = slice(start, start + self.max_instances)
            masks, categories, annotations = masks[chunk], categories[chunk], annotations[chunk]
        prompts = make_prompts(masks, self.prompt, rng)
        encoded = encode_sample(self.processor, sample["image"], masks, sample["ignore"], prompts)
        encoded.update(
            image_id=torch.tensor(sample["image_id"]),
            category_ids=torch.from_numpy(categories),
            annotation_ids=torch.from_numpy(annotations),
        )
        if not self.train:
            encoded["masks"] = torch.from_numpy(masks)
            encoded["ignore_full"] = torch.from_numpy(sample["ignore"])
        return encoded


def make_loader(
    dataset: SamPromptDataset, batch_size: int, num_workers: int = 0, shuffle: bool | None = None, seed: int = 0
) -> DataLoader:
    """A DataLoader with samtune's collation; shuffling is seeded, so resumed runs see the same order."""
    shuffle = dataset.train if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=False,  # workers must see set_epoch()
        pin_memory=torch.cuda.is_available(),
    )
