"""The benchmark scripts run (quick modes) and report finite, positive numbers."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_quick(tmp_path):
    out = tmp_path / "train.json"
    rows = _load("train_throughput").main(["--quick", "--methods", "decoder", "lora", "qdora", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    # plain SamModel and the fast encoder side by side, per method
    assert [(r["method"], r["encoder"]) for r in rows] == [
        (method, encoder) for method in ("decoder", "lora", "qdora") for encoder in ("plain", "fast")
    ]
    for row in rows:
        assert "error" not in row, row
        for key in ("seconds_per_step", "images_per_s", "peak_memory_mib"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert row["trainable"] > 0 and row["device"].startswith(("cpu", "NVIDIA"))


def test_data_loading_quick(tmp_path):
    rows = _load("data_loading").main(
        ["--images", "6", "--side", "128", "--workers", "0", "--repeats", "1", "--json", str(tmp_path / "d.json")]
    )
    assert rows[0]["images"] > 0 and rows[0]["images_per_s"] > 0


def test_param_counts_match_known_sizes():
    rows = _load("param_counts").main(["--presets", "vit-b"])
    full = next(r for r in rows if r["method"] == "full")
    assert full["trainable"] == 93_735_728  # SAM ViT-B as published
    lora = next(r for r in rows if r["method"] == "lora" and r["targets"] == "encoder-attn")
    # rank 8 on qkv (768 -> 2304) and proj (768 -> 768) in 12 layers
    assert lora["trainable"] == 12 * 8 * ((768 + 2304) + (768 + 768))


def test_cached_epochs_quick(tmp_path):
    result = _load("cached_epochs").main(
        ["--preset", "tiny", "--images", "2", "--epochs", "2", "--json", str(tmp_path / "c.json")]
    )
    assert len(result["epoch_seconds"]["cached"]) == len(result["epoch_seconds"]["recomputed"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in result["epoch_seconds"]["cached"])
    assert result["speedup_after_first"] > 0


def test_latency_quick(tmp_path):
    out = tmp_path / "latency.json"
    rows = _load("latency").main(
        [
            "--quick",
            "--rows",
            "sdpa-fp32",
            "eager-fp32",
            "sdpa-bf16",
            "sdpa-fp32-unmerged",
            "sdpa-fp32-merged",
            "sdpa-fp32-fast",
            "sdpa-bf16-fast",
            "sdpa-bf16w-fast",
            "--rounds",
            "2",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and "random weights" in saved["meta"]["model"]
    for row in rows:
        assert "error" not in row, row
        numbers = [
            row["encoder"]["median_ms"],
            row["encoder"]["p90_ms"],
            row["decoder_per_prompt_ms"],
            row["end_to_end"]["median_ms"],
            row["images_per_s"],
            row["peak_memory_mib"],
            row["encoder_gflop"],
            row["achieved_gflops"],
            row["matmul_peak_gflops"],
            row["percent_of_peak"],
            row["flop_floor_ms"],
            row["times_floor"],
        ]
        assert all(math.isfinite(v) and v > 0 for v in numbers), row
    # eager, sdpa and the fast encoder do the same work, counted through different ops (the CPU's fused SDPA
    # kernel gets its own FLOP formula)
    assert rows[1]["encoder_gflop"] == pytest.approx(rows[0]["encoder_gflop"], rel=0.02)
    assert rows[5]["encoder_gflop"] == pytest.approx(rows[0]["encoder_gflop"], rel=0.02)
    assert rows[6]["encoder_gflop"] == pytest.approx(rows[0]["encoder_gflop"], rel=0.02)
    # bf16 weights: products written in place into the bias buffer, counted like their out-of-place forms
    assert rows[7]["encoder_gflop"] == pytest.approx(rows[0]["encoder_gflop"], rel=0.02)
    assert rows[3]["encoder_gflop"] > rows[4]["encoder_gflop"]  # unmerged adapters add their own matmuls
    assert [r["fast"] for r in rows] == [False] * 5 + [True] * 3
    assert all(r["rounds"] == 2 for r in rows)  # every row measured in each round, statistics pooled
    for row in rows:  # the floor is the row's FLOPs at the matmul peak of its precision
        floor = row["encoder_gflop"] / row["matmul_peak_gflops"] * 1000
        assert row["flop_floor_ms"] == pytest.approx(floor)


def test_method_table_quick(tmp_path):
    from samtune.demo import BASE_DIR
    from samtune.domains import DomainSpec, make_domain_coco

    table = _load("method_table")
    splits = {name: make_domain_coco(tmp_path / name, DomainSpec("target", n, seed=i)) for i, (name, n) in
              enumerate([("train", 6), ("val", 3), ("test", 3)])}  # fmt: skip
    extra = ["--model.name_or_path", str(BASE_DIR), "--train.max_steps", "2", "--data.num_workers", "0"]
    for name, (annotations, images) in splits.items():
        extra += [f"--data.{name}_annotations", str(annotations), f"--data.{name}_images", str(images)]
    argv = ["--methods", "none", "dora", "--seeds", "0", "1", "--output", str(tmp_path / "table")]
    summary = table.main([*argv, "--markdown", str(tmp_path / "table.md"), "--", *extra])
    assert [row["method"] for row in summary] == ["none", "dora"]
    none, dora = summary
    assert none["gain_mIoU"] == (0.0, 0.0) and none["trainable"] == 0
    assert dora["trainable"] > 0 and dora["seeds"] == 2
    runs = json.loads((tmp_path / "table" / "table.json").read_text())["runs"]
    assert {(row["method"], row["seed"]) for row in runs} == {(m, s) for m in ("none", "dora") for s in (0, 1)}
    assert all(row["peak_memory_gb"] > 0 for row in runs)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| zero-shot |")
    finished = (tmp_path / "table" / "dora-seed0" / "results.json").stat().st_mtime
    assert table.main([*argv, "--", *extra]) == summary  # finished runs are reused, not rerun
    assert (tmp_path / "table" / "dora-seed0" / "results.json").stat().st_mtime == finished
