"""Where the mask decoder's time goes as the prompts per image grow: forward + backward, phase by phase, op by op.

    python benchmarks/decoder_prompts.py [--preset vit-b] [--prompts 1 2 8 16] [--repeats 5] [--warmup 1]
        [--threads N] [--device cuda] [--json out.json]
    python benchmarks/decoder_prompts.py --quick --json out.json   # tiny model, 1 and 2 prompts: the tests

What a cached decoder-only step runs (``peft.method decoder``, the image embedding given, as the embedding cache
gives it): the prompt encoder and mask decoder forward on K box prompts of one image, the training loss,
backward. One row per K: ``step_median_ms`` / ``step_p90_ms`` over --repeats timed steps after --warmup (CUDA
events on a GPU, a monotonic clock on a CPU) and ``per_prompt_ms``; the forward's phases (module hooks,
synchronised on a GPU), median ms: ``prompt_encoder``, ``transformer`` (the two-way transformer, which
repeats the image embedding and its positional encoding once per prompt), ``upscaling`` (two transposed
convolutions, a layer norm and two GELUs at 4x the embedding's side, per prompt), ``heads`` (hypernetwork MLPs,
mask product, IoU head); ``backward_ms`` is the rest of the step. ``top_ops``: the profiler's largest self times
over one step at the row's K (forward and backward together), as shares of the step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from train_throughput import random_batch

from samtune.config import ModelConfig, PeftConfig
from samtune.evaluation import sam_forward
from samtune.losses import InstanceLoss, batch_loss
from samtune.models.architectures import PRESET_FAMILIES, preset_config, save_random_sam
from samtune.models.family import image_features
from samtune.models.loading import build_model

QUICK = {"preset": "tiny", "prompts": [1, 2], "repeats": 2, "warmup": 1}


class PhaseClock:
    """Forward time of named module spans, from forward hooks (first module's start to last module's end)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        decoder = model.mask_decoder
        spans = {
            "prompt_encoder": (model.prompt_encoder, model.prompt_encoder),
            "transformer": (decoder.transformer, decoder.transformer),
            "upscaling": (decoder.upscale_conv1, decoder.upscale_conv2),
            "heads": (decoder.output_hypernetworks_mlps[0], decoder.iou_prediction_head),
        }
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.started: dict[str, float] = {}
        for name, (first, last) in spans.items():
            first.register_forward_pre_hook(lambda *_, name=name: self._start(name))
            last.register_forward_hook(lambda *_, name=name: self._stop(name))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, name: str) -> None:
        self.started[name] = self._now()

    def _stop(self, name: str) -> None:
        self.seconds[name].append(self._now() - self.started.pop(name))

    def medians_ms(self) -> dict[str, float]:
        return {name: 1000 * float(np.median(values)) for name, values in self.seconds.items()}


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C++ profiler's start / stop lines on file descriptor 2 (nothing a reader can act on)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="the tiny preset, 1 and 2 prompts, 2 timed steps each")
    sam_vit = [name for name, family in PRESET_FAMILIES.items() if family == "sam"]  # SAM's decoder
    parser.add_argument("--preset", default="vit-b", choices=sam_vit)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 8, 16], help="box prompts per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = common.parse(parser, argv, quick=QUICK)
    config = preset_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_sam(config, Path(tmp) / args.preset)
        model, _ = build_model(ModelConfig(name_or_path=str(folder)), PeftConfig(method="decoder"))
    model.to(args.device).train()
    loss_fn = InstanceLoss(1.0, 20.0, 1.0)
    rows = []
    for count in args.prompts:
        batch = random_batch(config, 1, count, args.device)
        with torch.no_grad():
            features = image_features(model, batch["pixel_values"])

        def step(batch=batch, features=features) -> None:
            batch_loss(sam_forward(model, batch, features=features), batch, loss_fn)["loss"].backward()
            model.zero_grad(set_to_none=True)

        clock = PhaseClock(model, args.device)
        seconds = common.time_calls(step, args.repeats, args.warmup, common.Timer(args.device))
        times = common.timing("step", seconds)
        phases = clock.medians_ms()
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:  # self times of host ops
            step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        rows.append(
            {
                "prompts": count,
                **times,
                "per_prompt_ms": times["step_median_ms"] / count,
                **{f"{name}_ms": value for name, value in phases.items()},
                "backward_ms": times["step_median_ms"] - sum(phases.values()),
                "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / total} for e in events[:6]],
            }
        )
        for module in (model.prompt_encoder, model.mask_decoder.transformer, model.mask_decoder.upscale_conv1,
                       model.mask_decoder.upscale_conv2, model.mask_decoder.output_hypernetworks_mlps[0],
                       model.mask_decoder.iou_prediction_head):  # fmt: skip
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
    names = ("prompt_encoder", "transformer", "upscaling", "heads")
    print(f"{args.preset} mask decoder, forward + backward on one image's box prompts, {common.describe(args.device)}")
    header = " | ".join(f"{n} fwd ms" for n in names)
    print(f"| prompts | step ms (p90) | per prompt ms | {header} | backward ms |")
    print("|---:|---:|---:|" + "---:|" * (len(names) + 1))
    for row in rows:
        cells = " | ".join(f"{row.get(f'{n}_ms', float('nan')):.0f}" for n in names)
        print(
            f"| {row['prompts']} | {row['step_median_ms']:.0f} ({row['step_p90_ms']:.0f}) | "
            f"{row['per_prompt_ms']:.0f} | {cells} | {row['backward_ms']:.0f} |"
        )
    last = rows[-1]
    print(f"largest self times at {last['prompts']} prompts: " + ", ".join(
        f"{op['op']} {100 * op['share']:.0f}%" for op in last["top_ops"]
    ))  # fmt: skip
    common.report(args, rows, preset=args.preset, method="decoder", repeats=args.repeats)
    return rows


if __name__ == "__main__":
    main()
