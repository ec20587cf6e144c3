"""``--format onnx``: a fine-tuned model as two ONNX graphs, SAM's own split, checked with onnxruntime.

- ``image_encoder.onnx``: ``pixel_values`` (1, 3, S, S), the family's processor output, to what the decoder
  reads of the image (``samtune.models.family.image_features``): SAM ``embedding``; SAM-HQ also
  ``intermediate0``; SAM 2 / SAM 3 tracker ``projected0``, ``projected1`` (the decoder's high-resolution
  projections, applied here once per image) and ``level2``. Run it once per image.
- ``prompt_decoder.onnx``: those tensors plus ``point_coords`` (1, N, 2) in the model's input frame (pixels of
  the resized image, as the processor gives them), ``point_labels`` (1, N) and a mask prompt, to ``masks``
  (1, M, s, s) low-resolution logits and ``iou_scores`` (1, M). N is dynamic. As in SAM's ONNX example: labels 1
  foreground, 0 background, a box is its two corners labelled 2 and 3, -1 a padding point; when there is no box,
  append a point (0, 0) labelled -1 (SAM / SAM-HQ), and after a box a point (0, 0) labelled -1 (SAM 2 / 3), as
  transformers' prompt encoders do. ``mask_input`` (1, 1, 4h, 4w) is the previous low-res logits, used when
  ``has_mask_input`` (1,) is 1. M is 1 (the single-mask output; SAM 2 / 3 pick the most stable) or, exported with
  ``multimask``, the 3 candidates.

Exported with ``torch.onnx.export(dynamo=True)`` (the torch.export-based exporter) at ``OPSET``.
``--quantize int8`` adds ``image_encoder.int8.onnx`` through ``onnxruntime.quantization.quantize_dynamic`` (int8
weights per channel, activations quantised on the fly). Only the encoder: it is nearly all of the compute, while
the decoder is cheap and, quantised, loses far more (on the tiny test models its mask logits moved by up to 0.7
against 0.09 for the encoder; benchmarks/onnx_latency.py measures the encoder on real sizes).
``onnx``, ``onnxruntime`` and ``onnxscript`` are the ``samtune[onnx]`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from samtune.errors import UserError
from samtune.models.family import decoder_inputs, family_of, image_features
from samtune.models.sam_hq_decoder_fix import fix_sam_hq_decoder

OPSET = 18
PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")
OUTPUTS = ("masks", "iou_scores")


def _require(module: str):
    """An optional dependency, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"--format onnx needs {module.split('.')[0]}: pip install 'samtune[onnx]' (onnx, onnxruntime, onnxscript)"
        ) from error


class ImageEncoder(torch.nn.Module):
    """pixel_values -> the decoder's image inputs, as a tuple in ``names`` order."""

    def __init__(self, model: PreTrainedModel, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = image_features(self.model, pixel_values, project=True)
        return tuple(features[name] for name in self.names)


class PromptDecoder(torch.nn.Module):
    """Image features + points (labels 0-3, -1) + mask prompt -> low-res mask logits and IoU scores."""

    def __init__(self, model: PreTrainedModel, names: tuple[str, ...], multimask: bool = False):
        super().__init__()
        self.model, self.names, self.multimask = model, names, multimask
        self.family = family_of(model)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(1, 1, N, C) sparse embeddings: SAM's point encoding, box corners (labels 2 / 3) included."""
        encoder = self.model.prompt_encoder
        size = encoder.input_image_size
        embedding = encoder.shared_embedding(coords + 0.5, (size, size))
        embedding = torch.where(labels[..., None] == -1, encoder.not_a_point_embed.weight, embedding)
        table = encoder.point_embed
        table = torch.cat([e.weight for e in table]) if isinstance(table, torch.nn.ModuleList) else table.weight
        return embedding + table[labels.clamp(min=0)] * (labels >= 0)[..., None].to(embedding.dtype)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = dict(zip(self.names, inputs[: len(self.names)]))
        coords, labels, mask_input, has_mask = inputs[len(self.names) :]
        image = decoder_inputs(self.model, features)
        embeddings = image["image_embeddings"]
        coarse = embeddings[-1] if self.family.square_input else embeddings
        encoder = self.model.prompt_encoder
        sparse = self.embed_points(coords[:, None], labels[:, None].long())
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(coarse)
        dense = has_mask * encoder.mask_embed(mask_input) + (1 - has_mask) * no_mask
        options = {}
        if self.family.square_input:
            options["high_resolution_features"] = embeddings[:-1]
        if self.family.hq:
            options.update(hq_token_only=False, intermediate_embeddings=image["intermediate_embeddings"])
        out = self.model.mask_decoder(
            image_embeddings=coarse,
            image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask,
            **options,
        )
        return out[0][:, 0], out[1][:, 0]


def eager_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The model rebuilt with eager attention in float32: SAM's SDPA vision attention views a non-contiguous
    tensor, which torch.export refuses (the vision layers pick their attention class when built)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"
    for part in ("vision_config", "mask_decoder_config", "prompt_encoder_config"):
        if getattr(config, part, None) is not None:
            getattr(config, part)._attn_implementation = "eager"
    eager = type(model)(config)
    eager.load_state_dict(model.state_dict())
    if family_of(eager).hq:
        fix_sam_hq_decoder(eager)
    return eager.float().eval()


def feature_names(model: PreTrainedModel, pixel_values: torch.Tensor) -> tuple[str, ...]:
    with torch.no_grad():
        return tuple(image_features(model, pixel_values, project=True))


def example_inputs(model: PreTrainedModel, features: tuple[torch.Tensor, ...], points: int = 3) -> tuple:
    """Decoder inputs of the right shapes: ``points`` points and an empty mask prompt."""
    size = model.prompt_encoder.input_image_size
    names = feature_names(model, torch.zeros(1, 3, size, size))
    with torch.no_grad():
        embeddings = decoder_inputs(model, dict(zip(names, features)))["image_embeddings"]
    grid = (embeddings[-1] if isinstance(embeddings, list) else embeddings).shape[-1]  # the decoder's coarsest grid
    coords = torch.rand(1, points, 2) * size
    labels = torch.tensor([[1, 0, -1][:points] + [1] * max(0, points - 3)], dtype=torch.int64)
    return (*features, coords, labels, torch.zeros(1, 1, 4 * grid, 4 * grid), torch.zeros(1))


def export_onnx(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    out: Path,
    quantize: str | None = None,
    opset: int | None = None,
    multimask: bool = False,
) -> tuple[str, ...]:
    """Write the two graphs (and their int8 versions with ``quantize``) into ``out``; returns card lines."""
    _require("onnx")
    _require("onnxscript")
    opset = opset or OPSET
    model = eager_copy(model)
    size = model.prompt_encoder.input_image_size
    pixels = torch.randn(1, 3, size, size)
    names = feature_names(model, pixels)
    encoder, decoder = ImageEncoder(model, names).eval(), PromptDecoder(model, names, multimask).eval()
    with torch.no_grad():
        features = encoder(pixels)
    _export(encoder, (pixels,), out / "image_encoder.onnx", ("pixel_values",), names, {}, opset)
    points = torch.export.Dim("points", min=1, max=64)
    dynamic = {"point_coords": {1: points}, "point_labels": {1: points}}
    _export(
        decoder,
        example_inputs(model, features),
        out / "prompt_decoder.onnx",
        names + PROMPT_INPUTS,
        OUTPUTS,
        dynamic,
        opset,
    )
    lines = [
        f"image_encoder.onnx: pixel_values (1, 3, {size}, {size}) -> {', '.join(names)} (opset {opset})",
        f"prompt_decoder.onnx: {', '.join(names + PROMPT_INPUTS)} -> masks, iou_scores; any number of points",
    ]
    if quantize == "int8":
        quantize_int8(out / "image_encoder.onnx", out / "image_encoder.int8.onnx")
        lines.append(
            "image_encoder.int8.onnx: the encoder with onnxruntime's dynamic int8 quantisation (use it with the "
            "same prompt_decoder.onnx)"
        )
    return tuple(lines)


def _export(module, args, path, input_names, output_names, dynamic, opset) -> None:
    # forward(*inputs): one varargs parameter, so the per-input specs are one tuple inside the outer one
    dynamic_shapes = (tuple(dynamic.get(name) for name in input_names),)
    with _exporter_quiet():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names) or None,
            dynamic_shapes=dynamic_shapes if dynamic else None,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))


@contextlib.contextmanager
def _exporter_quiet():
    """The exporter's notes about itself (torchvision ops it skips, deprecations inside torch, dynamic axes it
    merged): nothing a user can act on, so not shown; errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec.*LeafSpec", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation: int8 weights (per output channel), activations quantised per call."""
    quantization = _require("onnxruntime.quantization")
    with tempfile.TemporaryDirectory() as scratch:  # onnxruntime's recommended pre-processing (shape inference)
        prepared = Path(scratch) / source.name
        quantization.quant_pre_process(str(source), str(prepared))
        quantization.quantize_dynamic(
            str(prepared), str(target), weight_type=quantization.QuantType.QInt8, per_channel=True
        )


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for a graph written here."""
    onnxruntime = _require("onnxruntime")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
