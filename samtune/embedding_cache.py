"""Image embeddings computed once when nothing in the image encoder trains.

With a frozen encoder (``decoder`` runs, adapters only in the decoder) every epoch would recompute the same
embedding for the same image, and the encoder is nearly all of a step's cost. The cache keys an embedding by
the encoder's weights and config, the processor's settings and the image file's bytes, so another model,
another input size or preprocessing, or an edited image file is a miss, never a stale hit. It lives in
memory, or as one safetensors file per image in a folder (atomic writes, safe to share between processes and
runs) when it would not fit.
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

logger = logging.getLogger(__name__)


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the image encoder's weights, dtype and config (the whole function the cache stands in for)."""
    encoder = model.get_base_model().vision_encoder if hasattr(model, "get_base_model") else model.vision_encoder
    digest = hashlib.sha256(encoder.config.to_json_string().encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "vision_encoder." in n]
    if trainable:
        return f"the image encoder trains ({len(trainable)} tensors, e.g. {trainable[0]})"
    if base.config.vision_config.attention_dropout:
        return "the image encoder uses attention dropout in training"
    return None


class EmbeddingCache:
    """Embeddings by (encoder, processor, image bytes); ``folder`` None keeps them in memory."""

    def __init__(self, model: torch.nn.Module, processor, folder: str | Path | None = None) -> None:
        self.prefix = f"{encoder_fingerprint(model)}-{processor_fingerprint(processor)}"
        self.folder = Path(folder) / self.prefix if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.memory: dict[str, torch.Tensor] = {}
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

    def _load(self, key: str) -> torch.Tensor | None:
        if self.folder is None:
            return self.memory.get(key)
        file = self.folder / f"{key}.safetensors"
        return load_file(file)["embedding"] if file.exists() else None

    def _store(self, key: str, embedding: torch.Tensor) -> None:
        if self.folder is None:
            self.memory[key] = embedding
            return
        scratch = self.folder / f".{key}.{os.getpid()}.tmp"
        save_file({"embedding": embedding.contiguous()}, str(scratch))
        os.replace(scratch, self.folder / f"{key}.safetensors")  # atomic: readers never see half a file

    @torch.no_grad()
    def embeddings(self, split: Split, image_ids: torch.Tensor, pixel_values: torch.Tensor, encode) -> torch.Tensor:
        """(B, C, h, w) embeddings for a batch; ``encode(pixel_values)`` runs only for the images not cached."""
        keys = [self._key(split, int(i)) for i in image_ids]
        found = [self._load(key) for key in keys]
        missing = [n for n, value in enumerate(found) if value is None]
        if missing:
            computed = encode(pixel_values[missing])
            for n, value in zip(missing, computed):
                found[n] = value.detach().cpu()
                self._store(keys[n], found[n])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack(found).to(pixel_values.device)


def estimate_bytes(model: torch.nn.Module, images: int) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.config.vision_config
    side = vision.image_size // vision.patch_size
    return images * vision.output_channels * side * side * 4
