"""ONNX export against PyTorch on this CPU: image-encoder and prompt-decoder latency of the fp32 graphs and of the
int8 image encoder (onnxruntime dynamic quantisation), and how far their outputs are from PyTorch's.

    python benchmarks/onnx_latency.py [--preset vit-b [slimsam-77 ...]] [--repeats 3] [--warmup 1] [--rounds 2]
        [--threads N] [--json out.json]
    python benchmarks/onnx_latency.py --quick --json out.json     # the tiny preset: what the tests run

Each preset is the published architecture with random weights (latency depends on the architecture only),
exported once by ``samtune.export.onnx.export_onnx`` (the timings exclude the export). Rows, measured side by
side, every row once per round (statistics pool the rounds, so a shared machine's drift slows all rows alike):

- ``pytorch``: transformers' model (SDPA attention, fp32), the encoder as ``image_features`` and the decoder as
  the exported graph's own PyTorch module (``PromptDecoder``) on those features;
- ``pytorch-fast``: the same with samtune's fast image encoder (SAM / SAM-HQ only);
- ``onnx-fp32``: both graphs in onnxruntime (CPU execution provider, --threads intra-op threads);
- ``onnx-int8``: the int8 image encoder with the fp32 decoder graph.

The prompt is one box as two corners plus a padding point. Error columns compare each row with ``pytorch``:
the largest absolute difference of the encoder output and of the mask logits, and the IoU of the binary masks
(logits > 0). Timing and report: benchmarks/common.py (CPU only: onnxruntime runs on the CPU execution provider).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import numpy as np
import torch

from samtune.config import ModelConfig
from samtune.export.onnx import (
    PROMPT_INPUTS,
    ImageEncoder,
    PromptDecoder,
    example_inputs,
    export_onnx,
    feature_names,
    session,
)
from samtune.models.architectures import PRESETS, preset_config, save_random_sam
from samtune.models.family import family_of
from samtune.models.loading import load_sam

QUICK = {"preset": ["tiny"], "repeats": 3, "warmup": 1, "rounds": 1}
ROWS = ("pytorch", "pytorch-fast", "onnx-fp32", "onnx-int8")


def prompt(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A box as its two corners (labels 2, 3) and the padding point transformers' encoders add (label -1)."""
    coords = np.array([[[0.2 * size, 0.25 * size], [0.7 * size, 0.8 * size], [0.0, 0.0]]], np.float32)
    return coords, np.array([[2, 3, -1]], np.int64)


class Runner:
    """One row's encoder and decoder calls on one model."""

    def __init__(self, row: str, folder: Path, model, names: tuple[str, ...], threads: int):
        self.row, self.names = row, names
        if row.startswith("pytorch"):
            self.encoder = ImageEncoder(model, names).eval()
            self.decoder = PromptDecoder(model, names).eval()
        else:
            suffix = ".int8" if row == "onnx-int8" else ""
            self.encoder = session(folder / f"image_encoder{suffix}.onnx", threads)
            self.decoder = session(folder / "prompt_decoder.onnx", threads)

    def encode(self, pixels: torch.Tensor) -> tuple[np.ndarray, ...]:
        if self.row.startswith("pytorch"):
            with torch.no_grad():
                return tuple(t.numpy() for t in self.encoder(pixels))
        return tuple(self.encoder.run(None, {"pixel_values": pixels.numpy()}))

    def decode(self, features, decoder_prompt) -> np.ndarray:
        if self.row.startswith("pytorch"):
            with torch.no_grad():
                inputs = [torch.from_numpy(x) for x in (*features, *decoder_prompt)]
                return self.decoder(*inputs)[0].numpy()
        return self.decoder.run(None, dict(zip(self.names + PROMPT_INPUTS, (*features, *decoder_prompt))))[0]


def measure(preset: str, args, tmp: Path) -> list[dict]:
    folder = save_random_sam(preset_config(preset), tmp / preset)
    model, _ = load_sam(ModelConfig(str(folder), fast_encoder=False))
    fast, _ = load_sam(ModelConfig(str(folder), fast_encoder=True))
    family = family_of(model)
    size = model.config.prompt_encoder_config.image_size
    graphs = tmp / f"{preset}-onnx"
    graphs.mkdir()
    export_onnx(model, None, graphs, quantize="int8")
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    names = feature_names(model, pixels)
    coords, labels = prompt(size)
    threads = torch.get_num_threads()
    runners = {}
    for row in ROWS:
        if row == "pytorch-fast" and not family.fast_encoder:
            continue
        runners[row] = Runner(row, graphs, fast if row == "pytorch-fast" else model, names, threads)
    features = {row: runner.encode(pixels) for row, runner in runners.items()}
    empty_mask = example_inputs(model, tuple(torch.from_numpy(f) for f in features["pytorch"]))[-2].numpy()
    decoder_prompt = (coords, labels, empty_mask, np.zeros(1, np.float32))
    masks = {row: runner.decode(features[row], decoder_prompt) for row, runner in runners.items()}
    timer = common.Timer(torch.device("cpu"))
    seconds: dict[str, dict[str, list[float]]] = {row: {"encoder": [], "decoder": []} for row in runners}
    for _ in range(args.rounds):
        for row, runner in runners.items():
            encode = lambda runner=runner: runner.encode(pixels)  # noqa: E731
            decode = lambda runner=runner, row=row: runner.decode(features[row], decoder_prompt)  # noqa: E731
            seconds[row]["encoder"] += common.time_calls(encode, args.repeats, args.warmup, timer)
            seconds[row]["decoder"] += common.time_calls(decode, args.repeats, args.warmup, timer)
    reference = seconds["pytorch"]
    rows = []
    for row in runners:
        ours, theirs = masks[row] > 0, masks["pytorch"] > 0
        union = (ours | theirs).sum()
        rows.append(
            {
                "preset": preset,
                "family": family.model_type,
                "image_size": size,
                "row": row,
                **common.timing("encoder", seconds[row]["encoder"]),
                **common.timing("decoder", seconds[row]["decoder"]),
                "encoder_vs_pytorch": float(np.median(reference["encoder"]) / np.median(seconds[row]["encoder"])),
                "decoder_vs_pytorch": float(np.median(reference["decoder"]) / np.median(seconds[row]["decoder"])),
                "encoder_max_abs_error": max(
                    float(np.abs(a - b).max()) for a, b in zip(features[row], features["pytorch"])
                ),
                "mask_logit_max_abs_error": float(np.abs(masks[row] - masks["pytorch"]).max()),
                "mask_iou_vs_pytorch": float((ours & theirs).sum() / union) if union else 1.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(
        __file__, __doc__, quick="the tiny preset, 3 timed calls after 1 warm-up", cpu_only="onnxruntime's CPU provider"
    )
    parser.add_argument("--preset", nargs="+", default=["vit-b"], choices=PRESETS, metavar="NAME")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per part, row and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    parser.add_argument("--rounds", type=int, default=2, help="every row this many times, in turn")
    args = common.parse(parser, argv, quick=QUICK)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in dict.fromkeys(args.preset):
            rows += measure(preset, args, Path(tmp))
    common.report(args, rows, presets=list(args.preset), repeats=args.repeats, rounds=args.rounds)
    for row in rows:
        print(
            f"{row['preset']:12} {row['row']:13} encoder {row['encoder_median_ms']:9.1f} ms "
            f"(x{row['encoder_vs_pytorch']:.2f})  decoder {row['decoder_median_ms']:7.2f} ms "
            f"(x{row['decoder_vs_pytorch']:.2f})  mask logit err {row['mask_logit_max_abs_error']:.2e} "
            f"IoU {row['mask_iou_vs_pytorch']:.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
