"""COCO images to SAM batches: which instances a sample holds, their prompts, the processor, the loader.

``SamPromptDataset`` picks the instances of one step, draws their prompts and runs the model's own processor;
``make_loader`` batches its samples into a ``SamBatch`` (``samtune.data.batch``).
"""

from __future__ import annotations

import enum
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samtune.config import DataConfig
from samtune.data.augment import augment_sample, settings_of
from samtune.data.batch import collate, encode_sample, encode_uint8
from samtune.data.coco import CocoInstanceDataset
from samtune.data.geometry import InputGeometry, UnsupportedGeometry
from samtune.data.prompts import make_prompts

logger = logging.getLogger(__name__)


class Split(str, enum.Enum):
    """A data split; its value is the name used in logs, metrics and TensorBoard tags."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class SamPromptDataset(Dataset):
    """SAM-ready samples: one prompt per instance, encoded with the model's processor.

    Training (``train=True``): images without instances are left out (in prompt modes),
    at most ``data.max_instances`` instances per image, a fresh random subset and fresh
    prompts each epoch, reproducible from (seed, epoch, index) whatever the worker count.
    Evaluation: every instance, in chunks of ``data.max_instances``, with fixed prompts, and the
    original-resolution masks kept for scoring.

    Training also augments (``data.augment``, ``samtune.data.augment``) and crops (``data.crop_size``) each
    sample, before instances and prompts are chosen, from a second generator of (seed, epoch, index) (so the
    subsets and prompts of un-augmented runs stay as they were); ``dropped`` counts the instances they cut away.

    Images travel as uint8 for the device to normalise (``data.normalize_on: device``, ``samtune.data.geometry``)
    or normalised by the processor (``cpu``); images named by ``skip_pixels`` are not read at all.
    """

    def __init__(
        self, source: CocoInstanceDataset, processor, data: DataConfig, train: bool = True, seed: int = 0
    ) -> None:
        if data.max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {data.max_instances}")
        self.source, self.processor, self.data = source, processor, data
        self.max_instances, self.train, self.seed = data.max_instances, train, seed
        self.epoch = 0
        self.geometry = uint8_geometry(processor) if data.normalize_on == "device" else None
        self.cached: frozenset[int] = frozenset()  # image ids whose pixels are not needed (embedding cached)
        self.augment = settings_of(data) if train else None
        self.crop_size = data.crop_size if train else 0
        counts = [len(image.instances) for image in source.images]
        if data.prompt == "none":
            self.items = [(i, 0) for i in range(len(counts))]
        elif train:
            self.items = [(i, 0) for i, count in enumerate(counts) if count]
        else:
            self.items = [(i, start) for i, count in enumerate(counts) for start in range(0, count, self.max_instances)]
        unused = sum(1 for count in counts if not count) if data.prompt != "none" else 0
        if unused:
            logger.info(
                "%s: %d images without instances are not used with %s prompts",
                source.index.annotation_file,
                unused,
                data.prompt,
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose which instances and prompts the next pass draws."""
        self.epoch = epoch

    def skip_pixels(self, image_ids: set[int] | frozenset[int]) -> None:
        """From the next pass on, do not read these images (their embeddings are cached): targets and prompts come
        from the annotations alone. Only on the uint8 path; workers start with each pass and see the change."""
        if self.geometry is not None:
            self.cached = frozenset(image_ids)

    def __len__(self) -> int:
        return len(self.items)

    def _instances(self, sample: dict, start: int, rng: np.random.Generator | None) -> tuple[np.ndarray, ...]:
        """(masks, category ids, annotation ids) of the instances this sample holds."""
        masks, categories, annotations = sample["masks"], sample["category_ids"], sample["annotation_ids"]
        if self.data.prompt == "none":  # one target per image: the union of its instances (foreground)
            union = masks.any(axis=0, keepdims=True) if len(masks) else np.zeros((1, *sample["size"]), bool)
            return union, np.full(1, -1, dtype=np.int64), np.full(1, -1, dtype=np.int64)
        if rng is None:
            keep = slice(start, start + self.max_instances)
        elif len(masks) > self.max_instances:
            keep = np.sort(rng.choice(len(masks), size=self.max_instances, replace=False))
        else:
            return masks, categories, annotations
        return masks[keep], categories[keep], annotations[keep]

    def __getitem__(self, item: int) -> dict:
        index, start = self.items[item]
        read = self.source.images[index].image_id not in self.cached
        as_image = self.geometry is not None and self.geometry.pil
        sample = self._read(index, read, as_image)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        masks, categories, annotations = self._instances(sample, start, rng)
        prompts = make_prompts(masks, self.data, rng)
        if self.geometry is None:
            encoded = encode_sample(self.processor, sample["image"], masks, sample["ignore"], prompts)
        else:
            encoded = encode_uint8(self.geometry, sample["image"], sample["size"], masks, sample["ignore"], prompts)
        encoded.update(
            image_id=torch.tensor(sample["image_id"]),
            category_ids=torch.from_numpy(categories),
            annotation_ids=torch.from_numpy(annotations),
        )
        if self.train:
            encoded["dropped"] = torch.tensor(sample.get("dropped", 0))
        else:
            encoded["original_masks"] = torch.from_numpy(masks)
            encoded["original_ignore"] = torch.from_numpy(sample["ignore"])
        return encoded

    def _read(self, index: int, read: bool, as_image: bool) -> dict:
        """The source's sample; in training cut to a random window and augmented, both drawn from a generator of
        (seed, epoch, index, 1), whatever the worker."""
        varies = self.crop_size or (self.augment is not None and self.augment.active)
        if not varies:
            return self.source.sample(index, pixels=read, as_image=as_image)
        draws = np.random.default_rng([self.seed, self.epoch, index, 1])
        if self.crop_size:
            sample = self.source.sample_crop(index, self.crop_size, draws, self.data.min_visible_area, read, as_image)
        else:
            sample = self.source.sample(index, pixels=read, as_image=as_image)
        if self.augment.active and sample["image"] is not None:
            seed = int(draws.integers(2**63))
            sample = augment_sample(sample, self.augment, seed, self.data.min_visible_area)
        return sample


def uint8_geometry(processor) -> InputGeometry | None:
    """The processor's geometry for the uint8 path, or None (with the reason logged once) when its settings are
    ones the path does not reproduce: the processor then normalises on the CPU as before."""
    try:
        return InputGeometry.of(processor)
    except UnsupportedGeometry as why:
        if why.args[0] not in _told:
            _told.add(why.args[0])
            logger.info("images normalised on the CPU by the processor: its settings (%s) have no uint8 path", why)
        return None


_told: set[str] = set()


def make_loader(
    dataset: SamPromptDataset, batch_size: int, num_workers: int = 0, shuffle: bool | None = None, seed: int = 0
) -> DataLoader:
    """A DataLoader of ``SamBatch``es; shuffling is seeded, so resumed runs see the same order."""
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
