"""Image embeddings computed once when nothing in the image encoder trains.

With a frozen encoder (``decoder`` runs, adapters only in the decoder) every epoch would recompute the same
embedding for the same image, and the encoder is nearly all of a step's cost. The cache keys an embedding by
the encoder's weights and config, the processor's settings and the image file's bytes, so another model,
another input size or preprocessing, or an edited image file is a miss, never a stale hit. It lives in
memory, or as one safetensors file per image in a folder (atomic writes, safe to share between processes and
runs) when it would not fit. What is cached is everything the family's decoder consumes of the encoder
(``samtune.models.family.image_features``): one embedding (SAM), plus the first global layer's output (SAM-HQ), or
three feature levels (SAM 2 / 3), the two finest already through the decoder's projections when those are
frozen (5x smaller at 1024) and as the encoder gives them when they train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from samtune.data.dataset import Split
from samtune.errors import UserError
from samtune.models.family import base_of, decoder_projections, family_of

Features = dict[str, torch.Tensor]

logger = logging.getLogger(__name__)


def projects(model: torch.nn.Module) -> bool:
    """SAM 2 / 3 with frozen decoder projections: the cache stores the projected levels."""
    projections = decoder_projections(model)
    return bool(projections) and not any(p.requires_grad for m in projections for p in m.parameters())


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the weights, dtype and config of the whole function the cache stands in for: the image encoder
    (and the decoder's projections when the cache stores their output)."""
    encoder = base_of(model).vision_encoder
    digest = hashlib.sha256(encoder.config.to_json_string().encode())
    modules = [encoder, *(decoder_projections(model) if projects(model) else [])]
    for number, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{number}.{name}".encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def processor_fingerprint(processor) -> str:
    settings = json.loads(processor.image_processor.to_json_string())
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def why_not_cacheable(model: torch.nn.Module) -> str | None:
    """None when the encoder's output is a fixed function of the image; else the reason it is not."""
    vision = base_of(model).config.vision_config
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "vision_encoder." in n]
    if trainable:
        return f"the image encoder trains ({len(trainable)} tensors, e.g. {trainable[0]})"
    for config in (vision, getattr(vision, "backbone_config", None)):
        for key in ("attention_dropout", "hidden_dropout"):
            if getattr(config, key, 0):
                return f"the image encoder uses {key.replace('_', ' ')} in training"
    return None


class EmbeddingCache:
    """Embeddings by (encoder, processor, image bytes); ``folder`` None keeps them in memory."""

    def __init__(self, model: torch.nn.Module, processor, folder: str | Path | None = None) -> None:
        self.project = projects(model)  # what image_features(..., project=) must compute for this cache
        self.prefix = f"{encoder_fingerprint(model)}-{processor_fingerprint(processor)}"
        self.folder = Path(folder) / self.prefix if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.memory: dict[str, Features] = {}
        self.paths: dict[Split, dict[int, Path]] = {}  # per split: image id -> file
        self.digests: dict[Path, str] = {}
        self.hits = self.misses = 0

    def register(self, split: Split, paths: dict[int, Path]) -> None:
        """Image files of one split (image ids are only unique within a split)."""
        self.paths[split] = paths

    def _key(self, split: Split, image_id: int) -> str:
        path = self.paths[split][image_id]
        if path not in self.digests:  # read each file once per run; an edited file gets a new key
            self.digests[path] = file_digest(path)
        return self.digests[path]

    def _load(self, key: str) -> Features | None:
        if self.folder is None:
            return self.memory.get(key)
        file = self.folder / f"{key}.safetensors"
        return load_file(file) if file.exists() else None

    def _store(self, key: str, features: Features) -> None:
        if self.folder is None:
            self.memory[key] = features
            return
        scratch = self.folder / f".{key}.{os.getpid()}.tmp"
        save_file({name: tensor.contiguous() for name, tensor in features.items()}, str(scratch))
        os.replace(scratch, self.folder / f"{key}.safetensors")  # atomic: readers never see half a file

    def cached_ids(self, split: Split) -> set[int]:
        """Image ids of ``split`` whose features are cached: the loader need not read those images."""
        if self.folder is None:
            return {i for i in self.paths.get(split, {}) if self._key(split, i) in self.memory}
        return {i for i in self.paths.get(split, {}) if (self.folder / f"{self._key(split, i)}.safetensors").exists()}

    @torch.no_grad()
    def embeddings(
        self, split: Split, image_ids: torch.Tensor, pixel_values: torch.Tensor, encode, has_pixels=None
    ) -> Features:
        """The batch's image features (name -> (B, ...) tensor); ``encode(pixel_values)`` runs only for the
        images not cached. ``has_pixels`` (B,) marks the images the loader read (the others were cached)."""
        if split not in self.paths:  # a split not cached (training images that augmentation changes)
            return encode(pixel_values)
        keys = [self._key(split, int(i)) for i in image_ids]
        found = [self._load(key) for key in keys]
        missing = [n for n, value in enumerate(found) if value is None]
        unread = [int(image_ids[n]) for n in missing if has_pixels is not None and not bool(has_pixels[n])]
        if unread:  # a cache folder emptied under a running job: the loader trusted it at the epoch's start
            raise UserError(
                f"{split.value} image id {unread[0]}: its cached embedding vanished from {self.folder} during the "
                "epoch; restart the run with train.resume_from latest (it re-reads what is no longer cached)"
            )
        if missing:
            computed = encode(pixel_values[missing])
            for row, n in enumerate(missing):
                found[n] = {name: tensor[row].detach().cpu() for name, tensor in computed.items()}
                self._store(keys[n], found[n])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return {name: torch.stack([f[name] for f in found]).to(pixel_values.device) for name in found[0]}


def estimate_bytes(model: torch.nn.Module, images: int) -> int:
    """Bytes of the cached features of ``images`` images (fp32), from the config alone."""
    base = base_of(model)
    vision = base.config.vision_config
    if family_of(base).square_input:
        channels = [vision.fpn_hidden_size] * len(base.backbone_feature_sizes)
        if projects(model):
            channels[:2] = [m.out_channels for m in decoder_projections(model)]
        per_image = sum(c * h * w for c, (h, w) in zip(channels, base.backbone_feature_sizes))
    else:
        side = vision.image_size // vision.patch_size
        per_image = vision.output_channels * side * side
        if family_of(base).hq:  # the first global layer's output, at the encoder's width
            per_image += vision.hidden_size * side * side
    return images * per_image * 4
