"""Inference latency of SAM-family models: image encoder, decoder per prompt, end to end; images/s, memory, FLOP/s.

    python benchmarks/latency.py [--preset vit-b [sam2.1-hiera-t ...] | --model PATH [PATH ...]]
        [--rows sdpa-fp32 sdpa-fp32-fast sdpa-bf16 ...] [--parts encoder decoder end_to_end] [--image-size N]
        [--batch-size 1] [--prompts 1] [--repeats 5] [--warmup 2] [--rounds 1] [--threads N] [--device cuda]
        [--json out.json]
    python benchmarks/latency.py --quick --json out.json     # tiny model, 3 repeats: what the tests run

Several presets (or models) in one run are measured side by side: every row of every model once per round, so
their ratios come from the same minutes of the machine; "vs first" compares with the first model's first row.
Timing, statistics, memory and the JSON report are every benchmark's (benchmarks/common.py): each call timed by
CUDA events on a GPU or a monotonic clock on a CPU, after --warmup calls; median and p90 in ms over --repeats
(keys ENCODER_median_ms / _p90_ms for encoder, decoder, end_to_end; --parts leaves parts out); peak memory in
MiB. With --rounds R every row is loaded and measured R times in turn and the statistics pool all rounds, so a
machine whose speed drifts (shared CPUs) slows every row alike instead of whichever row ran during the slow
minute. A row is ATTENTION-PRECISION[-fast][-ADAPTER][-compile]: attention sdpa or eager; precision fp32, bf16 or
fp16 (autocast over fp32 weights), or bf16w / fp16w (weights loaded in that dtype, model.dtype, no autocast);
fast: samtune's fast image encoder (model.fast_encoder; without it, transformers' own model). The fast encoder
is SAM's ViT (SAM, SAM-HQ): on SAM 2 / SAM 3 a -fast row is not measured but reported with
``fast_encoder_applies: false`` and a ``skipped`` reason (its twin without -fast is what samtune runs there);
every measured row and the meta's ``models`` say whether it applies. Adapter unmerged or merged: LoRA rank 8
on the encoder's attention and MLP (the family's encoder-attn-mlp preset), random non-zero weights; compile:
the image encoder compiled by torch.compile (model.compile inductor; its compile time, compile_ms, is reported
apart). All rows of a model load the same weights. The encoder part is what the decoder consumes of the image
(samtune.models.family.image_features: SAM's embedding, SAM-HQ's plus its ViT features, SAM 2 / 3's three
levels), the decoder part ``sam_forward`` on those features, end to end ``sam_forward`` on the pixels. Presets
are the published architectures with random weights at their own input size (SAM / SAM-HQ / SAM 2.1 1024, SAM
3 1008; --image-size sets one size for all: 224 or 448 suits every family), read from the config's
``prompt_encoder_config.image_size`` (latency depends on the architecture only; the output says so); --model
takes any SAM-family folder or hub id. Encoder FLOPs come from torch's FLOP counter (one more encoder pass, in a
row's first round), taught the CPU's fused SDPA kernel so every row counts the attention products; the FLOP
floor is those FLOPs at the matmul peak measured on the same device in the same run, in the row's precision ("x
floor": encoder median / floor; the peak is the best of a few large square products, a peak rate rather than a
timing). Peak memory: the CUDA allocator's peak, or on a CPU the process's peak resident size during the row's
timed calls (reset per row).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import common
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from samtune.config import ModelConfig, PeftConfig
from samtune.evaluation import sam_forward
from samtune.models.architectures import PRESETS, preset_config, save_random_sam
from samtune.models.family import family_of, image_features
from samtune.models.loading import load_sam
from samtune.models.methods import apply_method

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "bf16w": torch.bfloat16,
    "fp16w": torch.float16,
}
CPU_ROWS = [
    "sdpa-fp32",
    "sdpa-fp32-fast",
    "sdpa-bf16",
    "sdpa-bf16-fast",
    "eager-fp32",
    "sdpa-fp32-unmerged",
    "sdpa-fp32-merged",
]
GPU_ROWS = [
    "sdpa-fp32",
    "sdpa-fp32-fast",
    "eager-fp32",
    "sdpa-bf16",
    "sdpa-bf16-fast",
    "sdpa-fp16",
    "sdpa-fp16-fast",
    "sdpa-bf16-unmerged",
    "sdpa-bf16-merged",
    "sdpa-bf16-compile",
    "sdpa-bf16-fast-compile",
]
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:  # torch counts the GPU kernels' attention products, not the CPU kernel's

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
if _LINEAR_POINTWISE is not None and _LINEAR_POINTWISE not in flop_registry:  # the fused lin1 + GELU of the MLP

    @register_flop_formula(_LINEAR_POINTWISE)
    def _linear_pointwise_flops(input_shape, weight_shape, *args, **kwargs) -> int:
        rows = math.prod(input_shape[:-1])
        return 2 * rows * weight_shape[0] * weight_shape[1]


# nor the in-place products (the fast encoder writes its scores into the bias buffer): same FLOPs as out of place
for _in_place, _out_of_place in (
    (torch.ops.aten.addmm_, torch.ops.aten.addmm),
    (torch.ops.aten.baddbmm_, torch.ops.aten.baddbmm),
):
    if _in_place not in flop_registry:
        register_flop_formula(_in_place, get_raw=True)(flop_registry[_out_of_place])


def parse_row(row: str) -> dict:
    parts = row.split("-")
    spec = {"attention": parts[0], "precision": parts[1], "fast": False, "adapter": "plain", "compile": False}
    for part in parts[2:]:
        if part == "fast":
            spec["fast"] = True
        elif part in ("unmerged", "merged"):
            spec["adapter"] = part
        elif part == "compile":
            spec["compile"] = True
        else:
            raise ValueError(f"unknown row part {part!r} in {row!r}")
    if spec["attention"] not in ("sdpa", "eager") or spec["precision"] not in DTYPES:
        raise ValueError(f"bad row {row!r}: attention sdpa|eager, precision {'|'.join(DTYPES)}")
    return spec


def matmul_peak(device: torch.device, dtype: torch.dtype, timer: common.Timer) -> float:
    """GFLOP/s of a large square matrix product on this device, in this precision: a peak rate, so the best of
    5 (3 on a CPU) timed products after one warm-up."""
    side = 8192 if device.type == "cuda" else 2048
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = common.time_calls(
        lambda: torch.mm(a, b), repeats=5 if device.type == "cuda" else 3, warmup=1, timer=timer
    )
    return 2 * side**3 / min(seconds) / 1e9


PARTS = ("encoder", "decoder", "end_to_end")


def build(folder: str, spec: dict, device: torch.device):
    weights = str(DTYPES[spec["precision"]]).removeprefix("torch.") if spec["precision"].endswith("w") else "float32"
    compile = "inductor" if spec["compile"] else ""  # the model.compile knob: the encoder compiled in place
    model, processor = load_sam(
        ModelConfig(
            folder, attn_implementation=spec["attention"], dtype=weights, fast_encoder=spec["fast"], compile=compile
        )
    )
    if spec["adapter"] != "plain":
        model = apply_method(model, PeftConfig(method="lora", targets="encoder-attn-mlp", rank=8, dropout=0.0))
        with torch.no_grad():  # non-zero adapters, so merged and unmerged compute something real
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.01)
        if spec["adapter"] == "merged":
            model = model.merge_and_unload()
    return model.to(device).eval(), processor


@torch.inference_mode()
def measure(model_info: dict, row: str, args, timer: common.Timer, peaks: dict, flops: int | None = None) -> dict:
    """One round of one row of one model: the timed calls' seconds per part, the peak memory, the encoder's
    FLOPs (counted in one more encoder pass unless ``flops``, an earlier round's count, is given)."""
    device = args.device
    spec = parse_row(row)
    dtype = DTYPES[spec["precision"]]
    if spec["precision"] == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for GPUs")
    model, _ = build(model_info["folder"], spec, device)
    side = model_info["image_size"]
    generator = torch.Generator().manual_seed(0)
    weights = dtype if spec["precision"].endswith("w") else torch.float32
    pixels = torch.randn(args.batch_size, 3, side, side, generator=generator).to(device, weights)
    corners = torch.rand(args.batch_size, args.prompts, 2, 2, generator=generator) * (side - 1)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1).to(device, weights)
    batch = {"pixel_values": pixels, "input_boxes": boxes}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != weights)
    compile_seconds = None
    if spec["compile"]:  # the first call compiles
        with autocast:
            compile_seconds = timer(lambda: image_features(model, pixels))
    if "decoder" in args.parts:  # the decoder's input, computed once
        with autocast:
            features = image_features(model, pixels)
    common.reset_peak_memory(device)
    calls = {
        "encoder": lambda: image_features(model, pixels),
        "decoder": lambda: sam_forward(model, batch, features=features, multimask_output=False),
        "end_to_end": lambda: sam_forward(model, batch, multimask_output=False),
    }
    with autocast:
        seconds = {
            part: common.time_calls(calls[part], args.repeats, args.warmup, timer)
            for part in PARTS
            if part in args.parts
        }
    memory = common.peak_memory_mib(device)
    if flops is None:
        counter = FlopCounterMode(display=False)  # no autocast: the FLOP count does not depend on precision
        with counter:
            image_features(model, pixels[:1])
        flops = counter.get_total_flops() * args.batch_size
    if dtype not in peaks:
        peaks[dtype] = matmul_peak(device, dtype, timer)
    return {
        "row": row,
        **spec,
        "seconds": seconds,
        "peak_memory_mib": memory,
        "compile_seconds": compile_seconds,
        "encoder_flops": flops,
    }


def summarise(model_info: dict, rounds: list[dict], args, peaks: dict) -> dict:
    """One row's result from its measurements in every round: median and p90 over all timed calls, the largest
    peak memory."""
    first = rounds[0]
    seconds = {part: [t for r in rounds for t in r["seconds"][part]] for part in first["seconds"]}
    times = {key: value for part, values in seconds.items() for key, value in common.timing(part, values).items()}
    dtype = DTYPES[first["precision"]]
    spec = {key: first[key] for key in ("attention", "precision", "fast", "adapter", "compile")}
    compile_ms = None if first["compile_seconds"] is None else first["compile_seconds"] * 1000
    per_prompt = args.batch_size * args.prompts
    result = {
        **_model_fields(model_info),
        "row": first["row"],
        **spec,
        "batch_size": args.batch_size,
        "prompts": args.prompts,
        "rounds": len(rounds),
        "timed_calls": len(next(iter(seconds.values()))),
        **times,
    }
    if "decoder" in seconds:
        result["decoder_per_prompt_median_ms"] = times["decoder_median_ms"] / per_prompt
        result["decoder_per_prompt_p90_ms"] = times["decoder_p90_ms"] / per_prompt
    if "end_to_end" in seconds:
        result["images_per_s"] = args.batch_size / (times["end_to_end_median_ms"] / 1000)
    result.update(
        peak_memory_mib=max(r["peak_memory_mib"] for r in rounds),
        peak_memory_kind=common.memory_kind(args.device),
        compile_ms=compile_ms,
        encoder_gflop=first["encoder_flops"] / 1e9,
        matmul_peak_gflops=peaks[dtype],
    )
    if "encoder" in seconds:
        encoder_ms = times["encoder_median_ms"]
        gflops = first["encoder_flops"] / (encoder_ms / 1000) / 1e9
        floor_ms = first["encoder_flops"] / (peaks[dtype] * 1e9) * 1000
        result.update(
            achieved_gflops=gflops,
            percent_of_peak=100 * gflops / peaks[dtype],
            flop_floor_ms=floor_ms,
            times_floor=encoder_ms / floor_ms,
        )
    return result


def _model_fields(model_info: dict) -> dict:
    return {key: model_info[key] for key in ("model", "family", "image_size", "fast_encoder_applies")}


def _cell(row: dict, key: str, fmt: str = ".1f") -> str:
    return "" if row.get(key) is None else format(row[key], fmt)


def _ratio(base: dict | None, row: dict, key: str) -> str:
    if not base or base.get(key) is None or row.get(key) is None:
        return ""
    return f"{base[key] / row[key]:.2f}x"


def table(rows: list[dict]) -> str:
    baseline = next((r for r in rows if "error" not in r and "skipped" not in r), None)
    lines = [
        "| model | row | encoder ms (p90) | encoder vs first | x FLOP floor | decoder ms / prompt | end to end ms | "
        "vs first | images/s | peak MiB | GFLOP/s (% of matmul peak) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['model']} | {r['row']} | {r.get('error') or r['skipped']} | | | | | | | | |")
            continue
        encoder = f"{_cell(r, 'encoder_median_ms')} ({_cell(r, 'encoder_p90_ms')})" if "encoder_median_ms" in r else ""
        gflops = f"{r['achieved_gflops']:.0f} ({r['percent_of_peak']:.0f}%)" if "achieved_gflops" in r else ""
        lines.append(
            f"| {r['model']} | {r['row']} | {encoder} | {_ratio(baseline, r, 'encoder_median_ms')} | "
            f"{_cell(r, 'times_floor', '.2f')} | {_cell(r, 'decoder_per_prompt_median_ms', '.2f')} | "
            f"{_cell(r, 'end_to_end_median_ms')} | {_ratio(baseline, r, 'end_to_end_median_ms')} | "
            f"{_cell(r, 'images_per_s', '.2f')} | {r['peak_memory_mib']:.0f} | {gflops} |"
        )
    return "\n".join(lines)


def prepare(name: str, folder: str, is_preset: bool) -> dict:
    """What the run needs to know of one model: its folder, family, input side and whether the fast encoder
    applies (from the config alone: nothing is loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    family = family_of(config)
    return {
        "model": name,
        "folder": folder,
        "weights": f"{name} architecture, random weights" if is_preset else name,
        "family": family.model_type,
        "image_size": config.prompt_encoder_config.image_size,  # square for every family (SAM pads to it)
        "fast_encoder_applies": family.fast_encoder,
        "label": family.label,
    }


QUICK = {"preset": ["tiny"], "model": None, "repeats": 3, "warmup": 1}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__file__, __doc__, quick="the tiny preset, 3 timed calls after 1 warm-up per part")
    parser.add_argument(
        "--preset",
        nargs="+",
        default=["vit-b"],
        choices=PRESETS,
        metavar="NAME",
        help=f"one or more, side by side (default vit-b): {', '.join(PRESETS)}",
    )
    parser.add_argument("--model", nargs="+", help="SAM-family folders or hub ids instead of presets")
    parser.add_argument(
        "--rows", nargs="+", help=f"default on a GPU: {' '.join(GPU_ROWS)}; on a CPU: {' '.join(CPU_ROWS)}"
    )
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to time (default: all)")
    parser.add_argument(
        "--image-size", type=int, help="input size of every preset (default: each its own, 1024 / SAM 3 1008)"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=1, help="box prompts per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per part, row and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before them")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every row this many times, in turn (statistics pool all rounds)"
    )
    args = common.parse(parser, argv, quick=QUICK)
    device = args.device
    rows_wanted = list(dict.fromkeys(args.rows or (GPU_ROWS if device.type == "cuda" else CPU_ROWS)))  # once each
    for row in rows_wanted:
        try:
            parse_row(row)
        except ValueError as error:
            parser.error(f"--rows: {error}")
    names = list(dict.fromkeys(args.model or args.preset))
    timer, peaks = common.Timer(device), {}
    measured: dict[tuple[str, str], list[dict]] = {}
    outcome: dict[tuple[str, str], dict] = {}  # rows not measured: errors, and -fast rows where it does not apply
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for name in names:
            if args.model:
                folder = name
            else:
                config = preset_config(name, args.image_size)
                folder = str(save_random_sam(config, Path(tmp) / name))
            models.append(prepare(name, folder, is_preset=not args.model))
        for info in models:
            for row in rows_wanted:
                measured[info["model"], row] = []
                if parse_row(row)["fast"] and not info["fast_encoder_applies"]:
                    outcome[info["model"], row] = {
                        **_model_fields(info),
                        "row": row,
                        "skipped": f"fast encoder does not apply to {info['label']} (SAM's ViT only)",
                    }
        for _ in range(args.rounds):  # every row once per round: slow drift of the machine hits all rows alike
            for info in models:
                for row in rows_wanted:
                    key = info["model"], row
                    if key in outcome:
                        continue
                    try:
                        earlier = measured[key][0]["encoder_flops"] if measured[key] else None
                        measured[key].append(measure(info, row, args, timer, peaks, earlier))
                    except (RuntimeError, ValueError) as error:
                        outcome[key] = {**_model_fields(info), "row": row}
                        outcome[key]["error"] = f"{type(error).__name__}: {str(error)[:160]}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    rows = [
        outcome.get((info["model"], row)) or summarise(info, measured[info["model"], row], args, peaks)
        for info in models
        for row in rows_wanted
    ]
    weights = "; ".join(info["weights"] for info in models)
    print(
        f"{weights}; {common.describe(device)}; batch {args.batch_size}, {args.prompts} box prompt(s) per image; "
        f"median (p90) of {args.rounds} x {args.repeats} after {args.warmup} warm-up per round; "
        f"torch {torch.__version__}"
    )
    for info in models:
        if not info["fast_encoder_applies"]:
            print(f"{info['model']}: the fast encoder does not apply ({info['label']}); -fast rows not measured")
    print(table(rows))
    common.report(
        args,
        rows,
        model=weights,
        models=[
            {key: info[key] for key in ("model", "weights", "family", "image_size", "fast_encoder_applies")}
            for info in models
        ],
        image_size=args.image_size,
        parts=[part for part in PARTS if part in args.parts],
        batch_size=args.batch_size,
        prompts=args.prompts,
        repeats=args.repeats,
        warmup=args.warmup,
        rounds=args.rounds,
    )
    return rows


if __name__ == "__main__":
    main()
