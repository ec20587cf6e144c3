"""What a training run is built from: the accelerator, the demo's defaults, the data, the cache, the optimizer."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from torch.utils.data import DataLoader

from samtune.config import Config, ConfigError, is_demo
from samtune.data.augment import varies_images
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, Split, make_loader
from samtune.demo.assets import prepare_demo
from samtune.demo.bases import shipped_base
from samtune.embedding_cache import EmbeddingCache, estimate_bytes, why_not_cacheable
from samtune.training.folder import choose_output_dir

logger = logging.getLogger("samtune.train")
# transformers' "constant" ignores warm-up; samtune's constant schedule is constant after it
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def make_accelerator(config: Config) -> Accelerator:
    """The accelerator, logging, and the run folder's name (``output_dir``, filled in when empty)."""
    train = config.train
    # no GPU: CPU processes (gloo) even under --multi_gpu, as the 2-process CPU test runs
    cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    PartialState(cpu=cpu)  # the process group first, so that every process agrees on a generated folder name
    choose_output_dir(config)
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=train.grad_accum,
        mixed_precision=train.mixed_precision or None,
        log_with="tensorboard",
        project_dir=config.output_dir,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, at any process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
    )
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return accelerator


def fill_demo_defaults(config: Config) -> None:
    """With neither a model nor any data given, the shipped demo base ``model.demo_base`` and the demo's splits
    (made on first use)."""
    if not is_demo(config):
        return
    shipped_base(config.model.demo_base)  # refused in one line, before minutes of data generation, if absent
    demo, data = prepare_demo(base=config.model.demo_base), config.data
    config.model.name_or_path = str(demo.model)
    data.train_annotations, data.train_images = str(demo.train_annotations), str(demo.train_images)
    data.val_annotations, data.val_images = str(demo.val_annotations), str(demo.val_images)
    data.test_annotations, data.test_images = str(demo.test_annotations), str(demo.test_images)


@dataclass
class RunData:
    """The run's splits: the training set and loader, the evaluation loaders, each split's category names."""

    train_set: SamPromptDataset
    train_loader: DataLoader
    eval_loaders: dict[Split, DataLoader] = field(default_factory=dict)
    categories: dict[Split, dict[int, str]] = field(default_factory=dict)

    def sources(self) -> dict[Split, CocoInstanceDataset]:
        return {Split.TRAIN: self.train_set.source} | {s: ld.dataset.source for s, ld in self.eval_loaders.items()}


def build_data(config: Config, processor) -> RunData:
    data, seed, batch_size = config.data, config.train.seed, config.train.batch_size
    files = {
        Split.TRAIN: (data.train_annotations, data.train_images),
        Split.VAL: (data.val_annotations, data.val_images),
        Split.TEST: (data.test_annotations, data.test_images),
    }
    sources = {split: CocoInstanceDataset(*paths, data.check_images) for split, paths in files.items() if paths[0]}
    train_set = SamPromptDataset(sources[Split.TRAIN], processor, data, train=True, seed=seed)
    if not len(train_set):
        raise ConfigError(f"{data.train_annotations}: no image with an instance to train on")
    run_data = RunData(train_set, make_loader(train_set, batch_size, data.num_workers, seed=seed))
    for split, source in sources.items():
        run_data.categories[split] = source.categories
        if split is not Split.TRAIN:
            evaluation = SamPromptDataset(source, processor, data, train=False)
            run_data.eval_loaders[split] = make_loader(evaluation, batch_size, data.num_workers)
    return run_data


def build_cache(config: Config, model, processor, run_data: RunData, out: Path) -> EmbeddingCache | None:
    """An embedding cache when the encoder is frozen and the user did not opt out; the log says which and why."""
    if not config.data.cache_embeddings:
        logger.info("image embeddings: recomputed every step (data.cache_embeddings is false)")
        return None
    reason = why_not_cacheable(model)
    if reason:
        logger.info("image embeddings: recomputed every step, not cached, because %s", reason)
        return None
    sources = run_data.sources()
    varies = varies_images(config.data)
    if varies:  # an embedding of the file would be wrong for the augmented or cropped image the model sees
        del sources[Split.TRAIN]
        if not sources:
            logger.info("image embeddings: recomputed every step, not cached, because %s", varies)
            return None
        logger.info("image embeddings: training images recomputed every step because %s", varies)
    size = estimate_bytes(model, sum(len(source) for source in sources.values()))
    folder = config.data.embedding_cache_dir or None
    if folder is None and size > config.data.embedding_cache_memory_gb * 1e9:
        folder = out / "embedding-cache"
    cache = EmbeddingCache(model, processor, folder)
    for split, source in sources.items():
        cache.register(split, {image.image_id: image.path for image in source.images})
    logger.info(
        "image embeddings: cached (%s, about %.2f GB): the image encoder runs once per image",
        f"in {cache.folder}" if cache.folder else "in memory",
        size / 1e9,
    )
    return cache


def build_optimizer(config: Config, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    train = config.train
    # an optimizer needs at least one tensor; with nothing to train (method none) it never steps
    parameters = parameters or [torch.nn.Parameter(torch.zeros(1))]
    if train.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise ConfigError("train.optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer states)")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)


def count_steps(config: Config, batches_per_epoch: int, processes: int, trains_anything: bool) -> int:
    """Optimizer steps of the whole run: train.max_steps, else epochs of the (sharded, accumulated) loader."""
    if not trains_anything:
        return 0
    per_epoch = math.ceil(batches_per_epoch / (config.train.grad_accum * processes))
    return config.train.max_steps or per_epoch * config.train.epochs


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler  # here, not at import: it pulls in peft and bitsandbytes (slow, noisy)

    return get_scheduler(
        _SCHEDULES[config.train.scheduler],
        optimizer,
        num_warmup_steps=int(config.train.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
    )
