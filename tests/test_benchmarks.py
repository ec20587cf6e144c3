"""The benchmark scripts: each answers --help with the common flags, and its --quick --json mode reports
{"meta", "rows"} with the shared meta, units (*_ms, *_mib) and statistic (median with p90), and numbers that
agree with each other and with known sizes."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = (
    "attention_tiles",
    "augment_table",
    "automatic_masks",
    "cached_epochs",
    "click_curves",
    "data_loading",
    "decoder_prompts",
    "latency",
    "method_table",
    "onnx_latency",
    "param_counts",
    "tiled_inference",
    "train_throughput",
)
VERSIONED = {"python", "torch", "transformers", "peft", "accelerate", "samtune"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the default of every script that has a device


@pytest.fixture
def load(monkeypatch):
    """Load a benchmark script as a module, with benchmarks/ on the path as when it runs as a file; torch's
    thread count is restored afterwards (--threads sets it for the whole process)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()

    def _load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield _load
    torch.set_num_threads(threads)


def _keys(value):
    """Every key of nested dicts and lists of dicts."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def check_report(path: Path, rows: list[dict], name: str, device: str = DEVICE, threads: int | None = 1) -> dict:
    """The JSON report every script writes: meta and exactly the rows main() returned, in shared units."""
    report = json.loads(path.read_text())
    assert set(report) == {"meta", "rows"}
    assert report["rows"] == rows and rows
    meta = report["meta"]
    assert meta["benchmark"] == name
    assert meta["command"][:2] == ["python", f"benchmarks/{name}.py"] and "--quick" in meta["command"]
    assert meta["quick"] is True and meta["device"] == device and meta["memory_unit"] == "MiB"
    if threads is not None:
        assert meta["threads"] == threads
    assert set(meta["versions"]) == VERSIONED and all(isinstance(v, str) for v in meta["versions"].values())
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["machine"]["cores"] == os.cpu_count() and meta["machine"]["cpu"]
    assert (meta["machine"]["gpu"] is not None) == torch.cuda.is_available()
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None
    keys = set(_keys(rows))
    # one memory unit and one time unit everywhere
    times = [k for k in keys if k.endswith("_s") and not k.endswith("_per_s")]
    assert not times and not [k for k in keys if k.endswith(("_gb", "_gib", "_mb", "seconds"))], keys
    assert not [k for k in keys if "memory" in k and k != "peak_memory_kind" and not k.endswith("_mib")], keys
    # one statistic: every median comes with its p90, never below it
    for row in rows:
        for key in [k for k in row if k.endswith("median_ms")]:
            p90 = key.removesuffix("median_ms") + "p90_ms"
            assert row[p90] >= row[key] and math.isfinite(row[p90]), (key, row)
    return meta


# ------------------------------------------------------------------------------------------------- shape


def test_every_script_is_covered():
    assert sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common") == sorted(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_the_common_flags(name, load, capsys):
    module = load(name)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python benchmarks/{name}.py")
    for flag in ("--quick", "--json", "--threads", "--device"):
        assert flag in out, flag
    assert "sys.path" not in (BENCHMARKS / f"{name}.py").read_text()
    assert "noqa: E402" not in (BENCHMARKS / f"{name}.py").read_text()


def test_common_statistic_and_quick_defaults(load):
    common = load("common")
    assert common.timing("step", [0.004, 0.001, 0.003, 0.002]) == pytest.approx(
        {"step_median_ms": 2.5, "step_p90_ms": 3.7}
    )
    assert common.timing("", [0.002]) == {"median_ms": 2.0, "p90_ms": 2.0}
    parser = common.parser(__file__, "doc", quick="small")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--preset", default="vit-b")
    quick = {"repeats": 2, "preset": "tiny"}
    args = common.parse(parser, ["--quick", "--repeats", "5", "--threads", "1"], quick=quick)
    assert (args.repeats, args.preset) == (5, "tiny")  # --quick's defaults, flags given still win
    assert args.device == torch.device(DEVICE) and torch.get_num_threads() == 1
    assert common.parse(parser, [], quick=quick).repeats == 10
    seconds = common.time_calls(lambda: None, repeats=4, warmup=2, timer=common.Timer("cpu"))
    assert len(seconds) == 4


def test_cpu_only_scripts_refuse_another_device(load, capsys):
    for name in ("param_counts", "data_loading", "attention_tiles"):
        with pytest.raises(SystemExit) as exit_:
            load(name).main(["--quick", "--device", "cuda"])
        assert exit_.value.code == 2
        assert "--device" in capsys.readouterr().err


def test_runs_as_a_file_without_path_changes(tmp_path):
    out = tmp_path / "counts.json"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, "benchmarks/param_counts.py", "--quick", "--json", str(out)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["meta"]["command"] == ["python", "benchmarks/param_counts.py", "--quick", "--json", str(out)]
    assert {row["architecture"] for row in report["rows"]} == {"vit-b"}


# ------------------------------------------------------------------------------------------------- scripts


def test_param_counts_quick_match_known_sizes(load, tmp_path):
    module = load("param_counts")
    rows = module.main(["--quick", "--threads", "1", "--json", str(tmp_path / "p.json")])
    check_report(tmp_path / "p.json", rows, "param_counts", device="cpu")
    targets = list(module.TARGET_PRESET_NAMES)
    assert [(r["method"], r["targets"]) for r in rows] == [("full", "-"), ("decoder", "-")] + [
        (method, t) for method in ("lora", "dora") for t in targets
    ]
    by = {(r["method"], r["targets"]): r for r in rows}
    assert {r["base_total"] for r in rows} == {93_735_728}  # SAM ViT-B as published
    assert by["full", "-"]["trainable"] == 93_735_728 and by["full", "-"]["percent"] == 100.0
    assert by["decoder", "-"]["trainable"] == by["decoder", "-"]["decoder"] == by["full", "-"]["decoder"] == 4_058_340
    # rank 8 on qkv (768 -> 2304) and proj (768 -> 768) in 12 layers; DoRA adds one magnitude per output feature
    assert by["lora", "encoder-attn"]["trainable"] == 12 * 8 * ((768 + 2304) + (768 + 768))
    assert by["dora", "encoder-attn"]["trainable"] == by["lora", "encoder-attn"]["trainable"] + 12 * (2304 + 768)
    # and lin1 (768 -> 3072), lin2 (3072 -> 768)
    assert by["lora", "encoder-attn-mlp"]["trainable"] == 12 * 8 * ((768 + 2304) + (768 + 768) + 2 * (768 + 3072))
    for row in rows[1:]:
        assert row["encoder"] + row["decoder"] == row["trainable"]
        assert row["percent"] == pytest.approx(100 * row["trainable"] / 93_735_728)


def test_presets_are_the_published_configs():
    """SAM 2.1 Hiera-T and the SAM 3 tracker presets are transformers' defaults (its docs name those checkpoints);
    every published preset builds its family's config at another input size, and refuses sizes its patch or
    stride cannot tile."""
    from transformers import Sam2Config, Sam3TrackerConfig

    from samtune.models.architectures import PRESET_FAMILIES, preset_config
    from samtune.models.family import family_of

    assert preset_config("sam2.1-hiera-t").to_dict() == Sam2Config().to_dict()
    assert preset_config("sam3-tracker").to_dict() == Sam3TrackerConfig().to_dict()
    for name, family in PRESET_FAMILIES.items():
        if name == "demo":
            continue
        config = preset_config(name, 224)  # 224 = 14 * 16 = 7 * 32: every family's patch and stride tile it
        assert family_of(config).model_type == family and config.prompt_encoder_config.image_size == 224, name
    assert preset_config("sam2.1-hiera-l", 448).vision_config.backbone_feature_sizes == [[112, 112], [56, 56],
                                                                                          [28, 28]]  # fmt: skip
    assert preset_config("sam-hq-vit-l").mask_decoder_config.vit_dim == 1024  # the HQ fusion reads the ViT's width
    for name, size in (("sam2.1-hiera-t", 1008), ("sam3-tracker", 1024), ("vit-b", 1000)):
        with pytest.raises(ValueError, match="multiple of"):
            preset_config(name, size)


def test_param_counts_every_family(load):
    """One published preset per other family, counted on the meta device: totals, what each method trains, and
    every adapter count where it lands (encoder + decoder)."""
    from samtune.models.family import HQ_MODULES

    counts = load("param_counts")

    def rows(name, *plans):
        return {(method, targets, modules): counts.count(name, method, targets, 8, modules)
                for method, targets, modules in plans}  # fmt: skip

    hq = rows("sam-hq-vit-b", ("full", "peft-sam", ()), ("hq", "peft-sam", ()), ("lora", "peft-sam", ("hq",)))
    model = counts.build("sam-hq-vit-b")
    prefixes = tuple(f"{name}." for name in HQ_MODULES)
    hq_size = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    assert hq_size == 94_806_832 - 93_735_728 == 1_071_104  # SAM-HQ ViT-B is SAM ViT-B plus its HQ modules
    full, only_hq, lora_hq = hq.values()
    assert full["base_total"] == full["trainable"] == 94_806_832
    assert only_hq["trainable"] == only_hq["decoder"] == only_hq["hq_modules_total"] == hq_size
    lora = counts.count("sam-hq-vit-b", "lora", "peft-sam", 8)
    assert lora_hq["trainable"] == lora["trainable"] + hq_size and lora["trainable"] == 342_016
    # SAM 2.1 Hiera-T: LoRA r8 on qkv (in -> 3 x width) and proj of 12 blocks in stages of 96 / 192 / 384 / 768;
    # a stage's first block reads the previous width
    hiera = rows("sam2.1-hiera-t", ("full", "peft-sam", ()), ("decoder", "peft-sam", ()),
                 ("lora", "encoder-attn", ()))  # fmt: skip
    full2, decoder2, lora2 = hiera.values()
    widths = [96] + [192] * 2 + [384] * 7 + [768] * 2
    expected = sum(8 * (w_in + 3 * w) + 8 * 2 * w for w_in, w in zip([96, *widths[:-1]], widths))
    assert lora2["trainable"] == lora2["encoder"] == expected == 220_416
    assert full2["trainable"] == full2["base_total"] == 31_440_721
    assert decoder2["trainable"] == decoder2["decoder"] == full2["decoder"] == 4_215_109
    # SAM 3 tracker: unfused q / k / v / o (1024 -> 1024) in 32 layers
    sam3 = counts.count("sam3-tracker", "lora", "encoder-attn", 8)
    assert sam3["trainable"] == sam3["encoder"] == 32 * 4 * 8 * (1024 + 1024)
    assert sam3["base_total"] == 458_260_369 and sam3["model_class"] == "Sam3TrackerModel"
    for row in [*hq.values(), lora, *hiera.values(), sam3]:
        if row["method"] != "full":  # full also trains the prompt encoder
            assert row["encoder"] + row["decoder"] == row["trainable"], row
    assert [m for m, _, _ in counts.plan("sam-hq-vit-b")].count("hq") == 1 and "hq" not in [
        m for m, _, _ in counts.plan("sam2.1-hiera-t")
    ]


def test_latency_quick(load, tmp_path):
    out = tmp_path / "latency.json"
    wanted = ["sdpa-fp32", "eager-fp32", "sdpa-bf16", "sdpa-fp32-unmerged", "sdpa-fp32-merged", "sdpa-fp32-fast",
              "sdpa-bf16-fast", "sdpa-bf16w-fast"]  # fmt: skip
    rows = load("latency").main(["--quick", "--threads", "1", "--rows", *wanted, "--rounds", "2", "--json", str(out)])
    meta = check_report(out, rows, "latency")
    assert "random weights" in meta["model"] and (meta["repeats"], meta["rounds"]) == (3, 2)
    assert [r["row"] for r in rows] == wanted
    for row in rows:
        assert "error" not in row, row
        assert row["rounds"] == 2 and row["timed_calls"] == 2 * 3  # every row in each round, statistics pooled
        for part in ("encoder", "decoder", "end_to_end"):
            assert f"{part}_median_ms" in row and f"{part}_p90_ms" in row
        assert row["decoder_per_prompt_median_ms"] == row["decoder_median_ms"]  # batch 1, one prompt
        assert row["decoder_per_prompt_p90_ms"] == row["decoder_p90_ms"]
        assert row["images_per_s"] == pytest.approx(1000 / row["end_to_end_median_ms"])
        assert row["achieved_gflops"] == pytest.approx(row["encoder_gflop"] / row["encoder_median_ms"] * 1000)
        assert row["percent_of_peak"] == pytest.approx(100 * row["achieved_gflops"] / row["matmul_peak_gflops"])
        # the floor is the row's FLOPs at the matmul peak of its precision
        assert row["flop_floor_ms"] == pytest.approx(row["encoder_gflop"] / row["matmul_peak_gflops"] * 1000)
        assert row["times_floor"] == pytest.approx(row["encoder_median_ms"] / row["flop_floor_ms"])
        assert row["compile_ms"] is None and math.isfinite(row["peak_memory_mib"])
    # one matmul peak per precision, measured once in the run
    assert len({r["matmul_peak_gflops"] for r in rows if r["precision"] == "fp32"}) == 1
    # eager, sdpa and the fast encoder do the same work, counted through different ops (the CPU's fused SDPA
    # kernel gets its own FLOP formula)
    for index in (1, 5, 6):
        assert rows[index]["encoder_gflop"] == pytest.approx(rows[0]["encoder_gflop"], rel=0.02)
    # bf16 weights: products written in place into the bias buffer, counted like their out-of-place forms
    assert rows[7]["encoder_gflop"] == pytest.approx(rows[0]["encoder_gflop"], rel=0.02)
    assert rows[3]["encoder_gflop"] > rows[4]["encoder_gflop"]  # unmerged adapters add their own matmuls
    assert [r["fast"] for r in rows] == [False] * 5 + [True] * 3


def test_latency_across_families(load, tmp_path):
    """Two families side by side in one run: SAM 2's -fast row is reported as not applying, not measured."""
    out = tmp_path / "families.json"
    argv = ["--quick", "--threads", "1", "--preset", "tiny", "tiny-sam2", "--rows", "sdpa-fp32", "sdpa-fp32-fast",
            "--repeats", "1", "--warmup", "0", "--parts", "encoder", "decoder", "--json", str(out)]  # fmt: skip
    rows = load("latency").main(argv)
    meta = check_report(out, rows, "latency")
    assert [(m["model"], m["family"], m["image_size"], m["fast_encoder_applies"]) for m in meta["models"]] == [
        ("tiny", "sam", 128, True), ("tiny-sam2", "sam2", 128, False)
    ]  # fmt: skip
    assert meta["parts"] == ["encoder", "decoder"]
    assert [(r["model"], r["row"]) for r in rows] == [(m, r) for m in ("tiny", "tiny-sam2") for r in argv[7:9]]
    sam, sam_fast, sam2, sam2_fast = rows
    assert sam_fast["fast"] and sam_fast["fast_encoder_applies"] and "skipped" not in sam_fast
    assert "skipped" in sam2_fast and "SAM 2" in sam2_fast["skipped"] and sam2_fast["fast_encoder_applies"] is False
    for row in (sam, sam_fast, sam2):
        assert "error" not in row, row
        assert "end_to_end_median_ms" not in row and "images_per_s" not in row  # not asked for
        assert row["decoder_per_prompt_median_ms"] == row["decoder_median_ms"] and row["encoder_gflop"] > 0
    assert sam2["family"] == "sam2" and not sam2["fast"]


def test_train_throughput_quick(load, tmp_path):
    out = tmp_path / "train.json"
    module = load("train_throughput")
    methods = module.QUICK["methods"]
    if importlib.util.find_spec("bitsandbytes") is None:  # 4-bit bases need it
        methods = [m for m in methods if not m.startswith("q")]
    rows = module.main(["--quick", "--threads", "1", "--methods", *methods, "--json", str(out)])
    check_report(out, rows, "train_throughput")
    # plain SamModel and the fast encoder side by side, per method
    assert [(r["method"], r["encoder"]) for r in rows] == [(m, e) for m in methods for e in ("plain", "fast")]
    counts = load("param_counts")
    for row in rows:
        assert "error" not in row, row
        assert (row["preset"], row["steps"], row["batch_size"], row["instances"]) == ("tiny", 3, 2, 3)
        assert row["images_per_s"] == pytest.approx(2 * 1000 / row["step_median_ms"])
        assert math.isfinite(row["peak_memory_mib"])
        # what trains is what param_counts counts: 4-bit methods train what their full-precision twins train
        twin = row["method"].removeprefix("q")
        assert row["trainable"] == counts.count("tiny", twin, "peft-sam", 8)["trainable"]


def test_train_throughput_other_family(load, tmp_path):
    """A SAM 2 step trains what param_counts counts; the fast encoder's row is skipped there."""
    out = tmp_path / "train2.json"
    module = load("train_throughput")
    argv = ["--quick", "--threads", "1", "--preset", "tiny-sam2", "--methods", "decoder", "--steps", "1",
            "--json", str(out)]  # fmt: skip
    plain, fast = module.main(argv)
    meta = check_report(out, [plain, fast], "train_throughput")
    assert (meta["family"], meta["fast_encoder_applies"], meta["image_size"]) == ("sam2", False, 128)
    assert "error" not in plain and plain["family"] == "sam2" and math.isfinite(plain["step_median_ms"])
    assert plain["trainable"] == load("param_counts").count("tiny-sam2", "decoder", "peft-sam", 8)["trainable"]
    assert fast["encoder"] == "fast" and "SAM 2" in fast["skipped"]


def test_data_loading_quick(load, tmp_path):
    from samtune.config import DataConfig
    from samtune.data.coco import CocoInstanceDataset
    from samtune.data.dataset import SamPromptDataset
    from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco

    out = tmp_path / "d.json"
    rows = load("data_loading").main(["--quick", "--json", str(out)])
    check_report(out, rows, "data_loading", device="cpu", threads=1)  # one thread, like a loader worker
    annotations, images = make_synthetic_coco(tmp_path / "coco", SyntheticSpec(6, min_side=64, max_side=128,
                                                                                max_shapes=6))  # fmt: skip
    dataset = SamPromptDataset(CocoInstanceDataset(annotations, images), None, DataConfig(normalize_on="cpu"))
    assert [row["path"] for row in rows] == ["cpu", "device", "device+normalise"]  # side by side, one worker count
    for row in rows:
        assert (row["workers"], row["input_side"], row["batch_size"], row["prompt"]) == (0, 128, 2, "box")
        assert row["family"] == "sam" and row["images"] == len(dataset)  # every image with instances, once a pass
        assert row["images_per_s"] == pytest.approx(row["images"] * 1000 / row["pass_median_ms"])
        assert row["speedup"] == pytest.approx(row["images_per_s"] / rows[0]["images_per_s"])
        assert math.isfinite(row["open_ms"])
    (sam2,) = load("data_loading").main(["--quick", "--family", "sam2", "--workers", "0"])[1:2]
    assert sam2["path"] == "device" and sam2["family"] == "sam2" and sam2["images"] == len(dataset)


def test_cached_epochs_quick(load, tmp_path):
    out = tmp_path / "c.json"
    module = load("cached_epochs")
    rows = module.main(["--quick", "--threads", "1", "--json", str(out)])
    meta = check_report(out, rows, "cached_epochs")
    assert meta["images"] == 2 and meta["method"] == "decoder"
    recomputed, on_device, on_cpu, decoder = rows
    assert [row["embeddings"] for row in rows] == ["recomputed", "cached, device", "cached, cpu", "decoder"]
    for row in rows[:-1]:
        assert row["epochs"] == len(row["epoch_ms"]) == 2
        assert row["first_epoch_ms"] == row["epoch_ms"][0] and row["later_epoch_median_ms"] == row["epoch_ms"][1]
        assert row["epoch_median_ms"] == pytest.approx(sum(row["epoch_ms"]) / 2)  # median of two
    assert decoder["epochs"] == len(decoder["epoch_ms"]) == 1 and decoder["epoch_ms"][0] > 0  # the later epoch
    for cached in (on_device, on_cpu):
        assert cached["speedup_after_first"] == pytest.approx(
            recomputed["epoch_median_ms"] / cached["later_epoch_median_ms"]
        )
        assert cached["vs_decoder"] == pytest.approx(cached["later_epoch_median_ms"] / decoder["epoch_median_ms"])
    with pytest.raises(SystemExit):
        module.main(["--quick", "--epochs", "1"])  # the first epoch fills the cache: nothing to compare


def test_decoder_prompts_quick(load, tmp_path):
    out = tmp_path / "p.json"
    rows = load("decoder_prompts").main(["--quick", "--threads", "1", "--json", str(out)])
    meta = check_report(out, rows, "decoder_prompts")
    assert meta["method"] == "decoder" and [row["prompts"] for row in rows] == [1, 2]
    for row in rows:
        assert row["per_prompt_ms"] == pytest.approx(row["step_median_ms"] / row["prompts"])
        phases = [row[f"{name}_ms"] for name in ("prompt_encoder", "transformer", "upscaling", "heads")]
        assert all(value >= 0 for value in phases)
        assert row["backward_ms"] == pytest.approx(row["step_median_ms"] - sum(phases))
        shares = [op["share"] for op in row["top_ops"]]
        assert len(shares) == 6 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
        assert any(op["op"].startswith("aten::") for op in row["top_ops"])


def test_tiled_inference_quick(load, tmp_path):
    """Thumbnail and tiled rows on one generated large image: every instance scored both ways, and at tiles the
    demo base's own scale the small objects come out far better than from the thumbnail."""
    out = tmp_path / "t.json"
    rows = load("tiled_inference").main(["--quick", "--threads", "1", "--json", str(out)])
    meta = check_report(out, rows, "tiled_inference")
    assert (meta["side"], meta["images"], meta["objects"]) == (512, 1, 6)
    thumbnail, tiled = rows
    assert (thumbnail["inference"], tiled["inference"]) == ("thumbnail", "tile 128 / 64")
    assert thumbnail["instances"] == tiled["instances"] == 6 and thumbnail["windows_per_image"] == 1
    assert 1 < tiled["windows_per_image"] <= 6
    assert tiled["mIoU"] > thumbnail["mIoU"] + 0.2


def test_automatic_masks_quick(load, tmp_path):
    """The previous and the new automatic masks on one photo, side by side: both timed, the speed-up their ratio,
    and every new mask's best match among the previous ones counted."""
    out = tmp_path / "m.json"
    rows = load("automatic_masks").main(["--quick", "--threads", "1", "--sizes", "120x160", "--json", str(out)])
    meta = check_report(out, rows, "automatic_masks")
    assert meta["points_per_side"] == 8 and [row["size"] for row in rows] == ["120x160"]
    row = rows[0]
    assert row["speedup"] == pytest.approx(row["previous_median_ms"] / row["new_median_ms"])
    assert row["masks_new"] > 0 and row["masks_previous"] > 0
    assert 0 <= row["matched_new"] <= 1 and 0 <= row["mean_best_iou_new"] <= 1


def test_attention_tiles_quick(load, tmp_path):
    out = tmp_path / "a.json"
    rows = load("attention_tiles").main(["--quick", "--threads", "1", "--json", str(out)])
    meta = check_report(out, rows, "attention_tiles", device="cpu")
    assert meta["grad"] is False and meta["repeats"] == 3
    variants = ["transformers"] + [f"fast {k} 2^{t}" for k in ("fused", "products") for t in (8, 20)]
    assert [(r["precision"], r["variant"]) for r in rows] == [(p, v) for p in ("fp32", "bf16") for v in variants]
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        assert mine[0]["speedup"] == 1.0
        for row in mine:
            assert row["speedup"] == pytest.approx(mine[0]["median_ms"] / row["median_ms"])


# ------------------------------------------------------------------------------------------------- method table


def fake_results(method: str, seed: int) -> dict:
    """A results.json as samtune.train writes it, with numbers that depend on method and seed."""
    trained = method != "none"
    return {
        "parameters": {"all": {"trainable": {"none": 0, "dora": 30_272}[method], "total": 1_167_906}},
        "epoch_seconds": [1.5 + seed, 2.5] if trained else [],
        "peak_memory_gib": 0.5 + 0.25 * seed,
        "test": {
            "zero_shot": {"mIoU": 0.2, "mF1": 0.3},
            "best": {"mIoU": 0.2 + trained * (0.1 + 0.02 * seed), "mF1": 0.3 + trained * (0.1 + 0.04 * seed)},
        },
    }


def test_click_curves_quick_trains_both_variants_and_scores_the_curves(load, tmp_path, monkeypatch):
    """--quick for real (2 steps per run, in this process): the clicks run trains with correction rounds, the
    single-shot one does not; every weight set is scored from a point and from a box; table and SVG drawn."""
    from samtune.train import main as train_main

    curves, table = load("click_curves"), load("method_table")
    commands = []

    def launch(command, env):
        commands.append(command)
        train_main(command[2:])

    monkeypatch.setattr(curves.method_table, "launch", launch)
    out, md, drawing = tmp_path / "curves.json", tmp_path / "curves.md", tmp_path / "curves.svg"
    rows = curves.main(["--quick", "--output", str(tmp_path / "runs"), "--json", str(out), "--markdown", str(md),
                        "--svg", str(drawing)])  # fmt: skip
    check_report(out, rows, "click_curves")
    assert [(row["variant"], row["protocol"]) for row in rows] == [
        (variant, protocol) for variant in curves.VARIANTS for protocol in curves.PROTOCOLS
    ]
    options = [dict(zip(c[2::2], c[3::2])) for c in commands]
    assert [o.get("--train.correction_clicks") for o in options] == [None, "3"]
    assert all(o["--data.prompt"] == "mixed" and o["--train.lr"] == str(table.LEARNING_RATES["dora"]) for o in options)
    for row in rows:
        assert len(row["mIoU_mean"]) == 3 and all(0 <= v <= 1 for v in row["mIoU_mean"])
        assert 1 <= row["NoC85_mean"] <= 3 and row["NoC90_mean"] >= row["NoC85_mean"]
    box = json.loads((tmp_path / "runs" / "scores" / "zero-shot-seed0-box-2.json").read_text())
    assert rows[1]["mIoU_mean"][0] == pytest.approx(box["mIoU"])  # the curve starts at the single-shot score
    assert len(md.read_text().splitlines()) == 8 and drawing.read_text().count("<polyline") == 3
    commands.clear()
    assert curves.main(["--quick", "--output", str(tmp_path / "runs"), "--json", str(out)]) == rows  # reused
    assert not commands


def test_click_curves_summary_is_the_mean_and_std_over_seeds(load):
    curves = load("click_curves")
    scores = [
        {"variant": "clicks", "protocol": "point", "seed": seed,
         "clicks": {"mIoU": [0.2 + 0.1 * seed, 0.5, 0.6 + 0.2 * seed], "NoC85": 2.0 + seed, "NoC90": 3.0,
                    "failed85": 0.5, "failed90": 1.0}}
        for seed in (0, 1)
    ]  # fmt: skip
    (row,) = curves.summarise(scores)
    assert row["mIoU_mean"] == pytest.approx([0.25, 0.5, 0.7])
    assert row["mIoU_std"] == pytest.approx([0.1 / 2**0.5, 0.0, 0.2 / 2**0.5])
    assert (row["NoC85_mean"], row["NoC85_std"]) == pytest.approx((2.5, 2**-0.5))


def test_method_table_quick(load, tmp_path, monkeypatch):
    table = load("method_table")
    launched = []

    def launch(command, env):  # a finished run in no time: the table's logic is what is tested here
        launched.append((command, env))
        options = dict(zip(command[2::2], command[3::2]))  # "--key value" pairs up to the extra arguments
        method, seed = options["--peft.method"], int(options["--train.seed"])
        assert Path(command[1]) == table.TRAIN_SCRIPT and table.TRAIN_SCRIPT.exists()
        assert options.get("--train.lr") == (None if method == "none" else str(table.LEARNING_RATES[method]))
        assert env["OMP_NUM_THREADS"] == "1" and command[-2:] == ["--train.epochs", "6"]
        Path(options["--output_dir"]).mkdir(parents=True)
        (Path(options["--output_dir"]) / "results.json").write_text(json.dumps(fake_results(method, seed)))

    monkeypatch.setattr(table, "launch", launch)
    out, md = tmp_path / "table.json", tmp_path / "table.md"
    argv = ["--quick", "--output", str(tmp_path / "runs"), "--json", str(out), "--markdown", str(md)]
    rows = table.main([*argv, "--", "--train.epochs", "6"])
    meta = check_report(out, rows, "method_table")
    assert meta["train_args"][-2:] == ["--train.epochs", "6"]  # after --quick's own, so the user's win
    assert sorted((c[c.index("--peft.method") + 1], c[c.index("--train.seed") + 1]) for c, _ in launched) == [
        ("dora", "0"), ("dora", "1"), ("none", "0"), ("none", "1")
    ]  # fmt: skip
    for split in ("train", "val", "test"):  # --quick's tiny splits, made once
        assert (tmp_path / "runs" / "data" / split / "annotations.json").exists()
    none, dora = rows
    assert (none["method"], dora["method"], none["seeds"], dora["seeds"]) == ("none", "dora", 2, 2)
    assert (none["trainable"], dora["trainable"]) == (0, 30_272)
    assert none["gain_mIoU_mean"] == none["gain_mIoU_std"] == 0.0
    assert dora["test_mIoU_mean"] == pytest.approx(0.31) and dora["test_mIoU_std"] == pytest.approx(0.02 / 2**0.5)
    assert dora["test_mF1_mean"] == pytest.approx(0.42) and dora["test_mF1_std"] == pytest.approx(0.04 / 2**0.5)
    assert dora["gain_mIoU_mean"] == pytest.approx(0.11) and dora["start_mIoU_mean"] == pytest.approx(0.2)
    assert dora["train_mean_ms"] == pytest.approx(4500) and dora["train_std_ms"] == pytest.approx(1000 / 2**0.5)
    assert dora["peak_memory_mean_mib"] == pytest.approx(0.625 * 1024)  # results.json's GiB, in MiB
    assert [run["seed"] for run in dora["runs"]] == [0, 1] and dora["runs"][1]["peak_memory_mib"] == 768
    lines = md.read_text().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| zero-shot | 20.0 +- 0.0 |")
    assert lines[3].startswith("| dora | 31.0 +- 1.4 | 42.0 +- 2.8 | +11.0 +- 1.4 | 20.0 | 30,272 | 4 +- 1 | 640 |")
    launched.clear()
    assert table.main([*argv, "--", "--train.epochs", "6"]) == rows  # finished runs are reused, not rerun
    assert not launched


def test_method_table_one_real_run(load, tmp_path, monkeypatch):
    """The table reads what samtune.train really writes: one decoder-only run of 2 steps, in this process."""
    from transformers import SamModel

    from samtune.demo.assets import BASE_DIR
    from samtune.train import main as train_main

    table = load("method_table")
    monkeypatch.setattr(table, "launch", lambda command, env: train_main(command[2:]))
    out = tmp_path / "table.json"
    (row,) = table.main(["--quick", "--methods", "decoder", "--seeds", "0", "--output", str(tmp_path), "--json",
                         str(out)])  # fmt: skip
    check_report(out, [row], "method_table")
    (run,) = row["runs"]
    results = json.loads((tmp_path / "decoder-seed0" / "results.json").read_text())
    assert run["trainable"] == sum(p.numel() for p in SamModel.from_pretrained(BASE_DIR).mask_decoder.parameters())
    assert run["test_mIoU"] == results["test"]["best"]["mIoU"] and 0 <= run["test_mIoU"] <= 1
    assert run["train_ms"] == pytest.approx(1000 * sum(results["epoch_seconds"]))
    assert run["peak_memory_mib"] == pytest.approx(1024 * results["peak_memory_gib"])
    assert run["wall_ms"] == pytest.approx(1000 * results["wall_seconds"])


def test_method_table_on_the_sam2_demo_base(load, tmp_path, monkeypatch):
    """--base sam2: every run on the SAM 2 demo base, as `samtune train --model.demo_base sam2`; --quick for real."""
    from transformers import Sam2Model

    from samtune.demo.bases import BASES
    from samtune.train import main as train_main

    table = load("method_table")
    launched = []

    def launch(command, env):  # the full table's commands: the demo knob, nothing else changed
        launched.append(command)
        options = dict(zip(command[2::2], command[3::2]))
        Path(options["--output_dir"]).mkdir(parents=True)
        results = fake_results(options["--peft.method"], int(options["--train.seed"]))
        (Path(options["--output_dir"]) / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(table, "launch", launch)
    table.main(["--base", "sam2", "--methods", "none", "dora", "--seeds", "0", "--output", str(tmp_path / "full")])
    assert [dict(zip(c[2::2], c[3::2]))["--model.demo_base"] for c in launched] == ["sam2", "sam2"]
    table.main(["--methods", "none", "--seeds", "1", "--output", str(tmp_path / "sam")])
    assert "--model.demo_base" not in launched[-1]  # the default base: the commands as before

    monkeypatch.setattr(table, "launch", lambda command, env: train_main(command[2:]))
    out = tmp_path / "table.json"
    (row,) = table.main(["--quick", "--base", "sam2", "--methods", "dora", "--seeds", "0", "--output",
                         str(tmp_path / "quick"), "--json", str(out)])  # fmt: skip
    meta = check_report(out, [row], "method_table")
    assert meta["base"] == "sam2" and meta["train_args"][meta["train_args"].index("--model.name_or_path") + 1] == str(
        BASES["sam2"].folder
    )
    (run,) = row["runs"]
    results = json.loads((tmp_path / "quick" / "dora-seed0" / "results.json").read_text())
    assert results["steps"] == 2 and 0 <= run["test_mIoU"] <= 1 and 0 <= run["zero_shot_mIoU"] <= 1
    total = sum(p.numel() for p in Sam2Model.from_pretrained(BASES["sam2"].folder).parameters())
    assert 0 < run["trainable"] < total / 10  # adapters on the SAM 2 base
