"""The training entry point end to end on the tiny model and generated data (CPU)."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import SamModel

from samtune.config import load_config
from samtune.data.batch import NormalizedBatches
from samtune.data.coco import CocoInstanceDataset
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.train import main, train

REPO = Path(__file__).resolve().parent.parent
NO_VAL = {"data.val_annotations": "", "data.val_images": ""}  # a run without a validation split


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    return {
        "train": make_synthetic_coco(root / "train", SyntheticSpec(num_images=8, seed=1)),
        "val": make_synthetic_coco(root / "val", SyntheticSpec(num_images=4, seed=2)),
    }


def _settings(splits, tiny_sam_dir, out, **overrides) -> dict:
    return {
        "model.name_or_path": str(tiny_sam_dir),
        "data.train_annotations": str(splits["train"][0]),
        "data.train_images": str(splits["train"][1]),
        "data.val_annotations": str(splits["val"][0]),
        "data.val_images": str(splits["val"][1]),
        "data.num_workers": 0,
        "train.max_steps": 4,
        "train.log_every": 2,
        "train.lr": 1e-3,
        "train.log_images": 2,
        "peft.dropout": 0.0,
        "output_dir": str(out),
        **overrides,
    }


def _argv(splits, tiny_sam_dir, out, **overrides):
    """The same settings as command-line arguments (for runs in their own process)."""
    settings = _settings(splits, tiny_sam_dir, out, **overrides)
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def _run(splits, tiny_sam_dir, out, **overrides):
    """samtune as a library: train(config)."""
    return train(load_config(overrides=_settings(splits, tiny_sam_dir, out, **overrides)))


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    name = "adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors"
    return load_file(folder / name)


def _assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        # An attention key bias shifts all of a query's logits alike, so softmax cancels it: its true gradient is
        # 0 and Adam turns rounding noise (say, embeddings recomputed in other batches) into lr-sized steps.
        if key.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _tensorboard_hparams(folder):
    """The hyper-parameters accelerate's tracker wrote (into a sub-folder of the run's tensorboard/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for sub in (path for path in folder.iterdir() if path.is_dir()):
        events = EventAccumulator(str(sub))
        events.Reload()
        for metadata in events.summary_metadata.values():
            if metadata.plugin_data.plugin_name != "hparams":
                continue
            data = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                values = data.session_start_info.hparams
                return {key: getattr(value, value.WhichOneof("kind")) for key, value in values.items()}
    raise AssertionError(f"no hyper-parameters under {folder}")


def test_run_folder_metrics_tensorboard_and_weights(tmp_path, splits, tiny_sam_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    results = _run(splits, tiny_sam_dir, out, **{"peft.method": "decoder", "train.eval_every": 2})
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["model"]["name_or_path"] == str(tiny_sam_dir)
    lines = _lines(out)
    assert [(line["kind"], line["step"]) for line in lines] == [("zero-shot", 0), ("eval", 2), ("final", 4)]
    assert all(math.isfinite(line["train_loss"]) for line in lines[1:])
    assert all(0 <= line["mIoU"] <= 1 and line["num_instances"] > 0 for line in lines)
    assert set(lines[-1]["per_category"]) <= {"ellipse", "rectangle", "triangle", "ring"}
    assert results["final"]["mIoU"] == lines[-1]["mIoU"] and results["ranks_in_sync"]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    hparams = _tensorboard_hparams(out / "tensorboard")  # every section's knobs, typed, not only train.*
    assert hparams["train.max_steps"] == 4 and hparams["peft.method"] == "decoder"
    assert hparams["train.lr"] == pytest.approx(1e-3) and hparams["output_dir"] == str(out)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "val/mIoU", "val/mF1"} <= scalars
    assert [e.step for e in events.Scalars("val/mIoU")] == [0, 2, 4]
    images = events.Tags()["images"]
    assert {"val/overlay_0", "val/overlay_1"} <= set(images)
    assert len(events.Images("val/overlay_0")) == 3

    # decoder-only training: the encoder is untouched, the decoder moved; best/ and final/ both load
    before, after = SamModel.from_pretrained(tiny_sam_dir), SamModel.from_pretrained(out / "final")
    enc, dec = "vision_encoder.layers.0.attn.qkv.weight", "mask_decoder.iou_prediction_head.proj_out.weight"
    assert torch.equal(before.state_dict()[enc], after.state_dict()[enc])
    assert not torch.equal(before.state_dict()[dec], after.state_dict()[dec])
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["mIoU"] == max(line["mIoU"] for line in lines)
    SamModel.from_pretrained(out / "best")


def test_short_run_lowers_the_loss_and_raises_val_miou(tmp_path, tiny_sam_dir):
    train = make_synthetic_coco(tmp_path / "train", SyntheticSpec(num_images=4, seed=1, empty_every=100))
    splits = {"train": train, "val": train}  # fitting the images it sees: a check of the loop, not of the data
    out = tmp_path / "run"
    overrides = {
        "peft.method": "decoder",
        "train.lr": 1e-2,
        "train.max_steps": 120,
        "train.eval_every": 20,
        "train.log_every": 20,
        "train.focal_weight": 1,
        "train.iou_weight": 0,
        "data.box_jitter": 0,
        "train.log_images": 0,
    }
    results = _run(splits, tiny_sam_dir, out, **overrides)
    lines = _lines(out)
    assert lines[-1]["train_loss"] < 0.8 * lines[1]["train_loss"]
    # the tiny random model starts near 3% and fits its 4 images to about 9% in 120 steps
    assert results["final"]["mIoU"] > max(2.5 * results["zero_shot"]["mIoU"], results["zero_shot"]["mIoU"] + 0.05)


@pytest.mark.slow
def test_batch_4_equals_batch_2_with_accumulation_2(tmp_path, tiny_sam_dir):
    # 8 images with instances: two full steps per epoch either way
    train = make_synthetic_coco(tmp_path / "train", SyntheticSpec(num_images=8, seed=4, empty_every=100))
    splits = {"train": train, "val": ("", "")}
    common = {
        "peft.method": "lora",
        "peft.targets": "all-linear",
        "train.max_steps": 4,
        "train.log_images": 0,
        "train.scheduler": "constant",
        "train.warmup_ratio": 0,
    }
    _run(splits, tiny_sam_dir, tmp_path / "a", **common, **{"train.batch_size": 4, "train.grad_accum": 1})
    _run(splits, tiny_sam_dir, tmp_path / "b", **common, **{"train.batch_size": 2, "train.grad_accum": 2})
    # same samples per step; only the summation order differs
    _assert_same_weights(_weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final"), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "targets"), [("dora", "all-linear"), ("decoder", "peft-sam")])
def test_resume_continues_exactly(tmp_path, splits, tiny_sam_dir, method, targets):
    # 2N steps straight versus N steps, stop, resume, N more: 3 steps per epoch, so the stop falls mid-epoch.
    # The decoder run uses the (in-memory) embedding cache, rebuilt after the resume.
    common = {
        "peft.method": method,
        "peft.targets": targets,
        "train.max_steps": 8,
        "train.eval_every": 4,
        "train.batch_size": 3,
        "peft.dropout": 0.1,
        "data.max_instances": 2,
    }
    straight = _run(splits, tiny_sam_dir, tmp_path / "straight", **common)
    stopped = _run(splits, tiny_sam_dir, tmp_path / "resumed", **common, **{"train.stop_at": 4})
    assert stopped["interrupted"] and (tmp_path / "resumed" / "checkpoints" / "step-4").is_dir()
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = _run(splits, tiny_sam_dir, tmp_path / "resumed", **common, **{"train.resume_from": "latest"})
    _assert_same_weights(_weights(tmp_path / "straight" / "final"), _weights(tmp_path / "resumed" / "final"), 1e-6)
    assert resumed["final"]["mIoU"] == straight["final"]["mIoU"]
    # the same log (numbers to float noise: the decoder run re-encodes its images after the resume)
    for a, b in zip(_lines(tmp_path / "straight"), _lines(tmp_path / "resumed"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
            elif key != "per_category":
                assert a[key] == b[key], key


def test_checkpoints_are_pruned_and_partial_ones_ignored(tmp_path, splits, tiny_sam_dir):
    from samtune.checkpointing import resolve_resume

    out = tmp_path / "run"
    _run(
        splits,
        tiny_sam_dir,
        out,
        **{
            "peft.method": "decoder",
            "train.max_steps": 6,
            "train.save_every": 2,
            "train.keep_checkpoints": 2,
            **NO_VAL,
        },
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    (out / "checkpoints" / ".step-8.partial").mkdir()  # what a crash mid-write leaves
    (out / "checkpoints" / "step-10").mkdir()  # a folder without the trainer state is not a checkpoint
    assert resolve_resume("latest", out).name == "step-6"
    with pytest.raises(FileNotFoundError, match="not a complete samtune checkpoint"):
        resolve_resume(str(out / "checkpoints" / "step-10"), out)


def test_nonfinite_losses_skip_steps_then_stop_the_run(tmp_path, splits, tiny_sam_dir, monkeypatch):
    import samtune.training.run as train_module

    real = train_module.batch_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] in (2, 3):
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train_module, "batch_loss", sometimes_nan)
    out = tmp_path / "run"
    results = _run(splits, tiny_sam_dir, out, **{"peft.method": "decoder", **NO_VAL})
    summary = json.loads((out / "results.json").read_text())
    assert summary["nonfinite_steps"] == 2 and summary["steps"] == 4 and not results["interrupted"]

    calls["n"] = 0
    monkeypatch.setattr(
        train_module, "batch_loss", lambda *a, **k: {"loss": torch.tensor(float("inf"), requires_grad=True)}
    )
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        _run(
            splits,
            tiny_sam_dir,
            tmp_path / "bad",
            **{"peft.method": "decoder", **NO_VAL, "train.max_nonfinite": 3},
        )


def test_early_stopping(tmp_path, splits, tiny_sam_dir):
    results = _run(
        splits,
        tiny_sam_dir,
        tmp_path / "run",
        **{
            "peft.method": "decoder",
            "train.lr": 0,
            "train.max_steps": 10,
            "train.eval_every": 1,
            "train.early_stopping": 2,
            "train.log_images": 0,
        },
    )
    assert results["stop_reason"].startswith("early stopping") and not results["interrupted"]
    # zero-shot is the best; two evaluations without improvement; the final line reuses the last evaluation
    lines = _lines(tmp_path / "run")
    assert [(line["kind"], line["step"]) for line in lines] == [
        ("zero-shot", 0),
        ("eval", 1),
        ("eval", 2),
        ("final", 2),
    ]
    assert lines[-1]["mIoU"] == lines[-2]["mIoU"]


def test_adapter_run_saves_a_peft_folder(tmp_path, splits, tiny_sam_dir):
    from peft import PeftModel

    out = tmp_path / "run"
    _run(splits, tiny_sam_dir, out, **{"peft.method": "dora", "peft.targets": "encoder-attn"})
    assert (out / "final" / "adapter_config.json").exists()
    model = PeftModel.from_pretrained(SamModel.from_pretrained(tiny_sam_dir), out / "final")
    magnitudes = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all("vision_encoder" in n for n in magnitudes)
    report = json.loads((out / "parameters.json").read_text())
    assert 0 < report["vision_encoder"]["trainable"] < report["vision_encoder"]["total"]
    assert report["mask_decoder"]["trainable"] == 0


def test_method_none_evaluates_without_training(tmp_path, splits, tiny_sam_dir):
    out = tmp_path / "run"
    results = _run(splits, tiny_sam_dir, out, **{"peft.method": "none"})
    assert results["final"]["mIoU"] == results["zero_shot"]["mIoU"]
    assert [line["kind"] for line in _lines(out)] == ["zero-shot"]


def test_point_prompts_train_three_masks_per_instance(tmp_path, splits, tiny_sam_dir, monkeypatch):
    # which of the three masks trains is tests/test_losses.py's business; here: the loop asks for three masks on
    # point-only prompts (ambiguous), pads the missing negatives, and evaluates the best-scored one per instance
    import samtune.training.run as train_module

    seen = []

    def spy(outputs, batch, loss_fn):
        seen.append((outputs.pred_masks.shape[2], batch["input_labels"].shape[-1], "input_boxes" in batch))
        return real(outputs, batch, loss_fn)

    real = train_module.batch_loss
    monkeypatch.setattr(train_module, "batch_loss", spy)
    results = _run(
        splits,
        tiny_sam_dir,
        tmp_path / "run",
        **{"peft.method": "decoder", "data.prompt": "point", "data.num_negative_points": 1},
    )
    assert seen == [(3, 2, False)] * 4  # 4 steps: 3 masks, 1 positive + 1 negative point, no box
    val_instances = sum(len(image.instances) for image in CocoInstanceDataset(*splits["val"]).images)
    assert results["final"]["num_instances"] == val_instances
    assert 0 <= results["final"]["mIoU"] <= 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, processes=1, module=False, **popen):
    """accelerate launch of samtune/train.py (or, with ``module``, of -m samtune.train: both are documented)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    command += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = ["-m", "samtune.train"] if module else [str(REPO / "samtune" / "train.py")]
    return subprocess.Popen([*command, *script, *args], env=env, cwd=REPO, **popen)


@pytest.mark.slow
def test_two_process_ddp_matches_a_single_process_evaluation(tmp_path, splits, tiny_sam_dir):
    from samtune.config import DataConfig
    from samtune.data.coco import CocoInstanceDataset
    from samtune.data.dataset import SamPromptDataset, make_loader
    from samtune.evaluation import aggregate, sam_forward, score_loader
    from samtune.models.loading import load_trained

    out = tmp_path / "ddp"
    # adapters in the decoder only: each process also keeps its own embedding cache
    args = _argv(
        splits, tiny_sam_dir, out, **{"peft.method": "lora", "peft.targets": "decoder-attn", "train.log_images": 0}
    )
    process = _launch(
        args, processes=2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"2-process run did not finish in 180 s:\n{log[-5000:]}")
    assert process.returncode == 0, log[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["ranks_in_sync"] and "2 x cpu" in log and "image embeddings: cached" in log
    model, processor = load_trained(tiny_sam_dir, out / "final")
    source = CocoInstanceDataset(*splits["val"])
    loader = make_loader(SamPromptDataset(source, processor, DataConfig(prompt="box"), train=False), batch_size=3)
    records = score_loader(NormalizedBatches(loader), lambda batch: sam_forward(model, batch), processor)
    single = aggregate(records, source.categories)
    assert single["num_instances"] == summary["final"]["num_instances"]
    assert single["mIoU"] == pytest.approx(summary["final"]["mIoU"], abs=1e-6)
    assert single["mF1"] == pytest.approx(summary["final"]["mF1"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_leaves_a_checkpoint_to_resume_from(tmp_path, splits, tiny_sam_dir):
    out = tmp_path / "run"
    args = _argv(
        splits,
        tiny_sam_dir,
        out,
        **{"peft.method": "decoder", "train.max_steps": 100000, "train.save_every": 5, **NO_VAL},
    )
    # a new process group, signalled as a whole: what Slurm, Kubernetes or a Ctrl-C in a terminal do
    process = _launch(
        args, module=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    log, _ = process.communicate(timeout=120)  # returns once the training process closed its output too
    assert "stopped at step" in log and "resume with --train.resume_from latest" in log, log[-3000:]
    from samtune.checkpointing import resolve_resume

    last = resolve_resume("latest", out)
    step = int(last.name.split("-")[1])
    results = main(args + ["--train.resume_from", "latest", "--train.max_steps", str(step + 3)])
    assert not results["interrupted"]
    assert json.loads((out / "results.json").read_text())["steps"] == step + 3


def test_every_epoch_draws_new_prompts(tmp_path, splits, tiny_sam_dir, monkeypatch):
    from samtune.data.dataset import SamPromptDataset

    seen = []
    real = SamPromptDataset.__getitem__

    def spy(self, item):
        if self.train:
            seen.append(self.epoch)
        return real(self, item)

    monkeypatch.setattr(SamPromptDataset, "__getitem__", spy)
    _run(
        splits,
        tiny_sam_dir,
        tmp_path / "run",
        **{"peft.method": "decoder", "train.max_steps": 0, "train.epochs": 2, **NO_VAL},
    )
    half = len(seen) // 2
    assert seen[:half] == [0] * half and seen[half:] == [1] * half


def test_test_split_is_scored_zero_shot_and_with_the_weights_validation_selected(tmp_path, splits, tiny_sam_dir):
    out = tmp_path / "run"
    # The test split is the validation split here, so both scores must equal validation's for the same weights.
    results = _run(
        splits,
        tiny_sam_dir,
        out,
        **{
            "peft.method": "dora",
            "data.test_annotations": splits["val"][0],
            "data.test_images": splits["val"][1],
            "train.eval_every": 2,
            "train.lr": 1e-2,
        },
    )
    lines = _lines(out)
    assert [line["kind"] for line in lines][:2] == ["zero-shot", "test-zero-shot"]
    assert lines[-1]["kind"] == "test-best"
    test = results["test"]
    assert test["zero_shot"]["mIoU"] == results["zero_shot"]["mIoU"]
    best = next(line for line in lines if line["step"] == results["best_step"] and not line["kind"].startswith("test"))
    assert test["weights_step"] == results["best_step"]
    assert test["best"]["mIoU"] == pytest.approx(best["mIoU"], abs=1e-6)
    assert results["peak_memory_gib"] > 0


@pytest.mark.parametrize("method", ["dora", "full"])
def test_saved_weights_load_back_into_the_live_model(tmp_path, tiny_sam_dir, method):
    from samtune.config import ModelConfig, PeftConfig
    from samtune.models.loading import build_model, load_saved_weights, save_trained

    model, processor = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method=method, targets="all-linear"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable.values():
            p.add_(torch.randn_like(p))
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    save_trained(model, processor, tmp_path / "best")
    with torch.no_grad():
        for p in trainable.values():
            p.zero_()
    load_saved_weights(model, tmp_path / "best")
    for name, p in trainable.items():
        torch.testing.assert_close(p, saved[name], rtol=0, atol=0, msg=name)


def test_mixed_prompts_draw_boxes_points_or_both_per_step_reproducibly(tmp_path, splits, tiny_sam_dir, monkeypatch):
    import samtune.training.run as train_module

    def recording(kinds):
        def keep(batch, kind):
            kinds.append(kind)
            return keep_prompt_kind(batch, kind)

        return keep

    from samtune.data.prompts import keep_prompt_kind

    runs = []
    for name in ("a", "b"):
        kinds: list[str] = []
        monkeypatch.setattr(train_module, "keep_prompt_kind", recording(kinds))
        results = _run(
            splits,
            tiny_sam_dir,
            tmp_path / name,
            **{"data.prompt": "mixed", "train.max_steps": 8, "data.cache_embeddings": "false"},
        )
        runs.append(kinds)
        assert results["final"]["num_instances"] > 0  # evaluation: boxes
    assert len(runs[0]) == 8 and runs[0] == runs[1]
    assert len(set(runs[0])) > 1


def test_test_metrics_carry_the_test_splits_own_category_names(tmp_path, splits, tiny_sam_dir):
    data = json.loads(Path(splits["val"][0]).read_text())
    for category in data["categories"]:
        category["name"] = f"test-{category['name']}"
    renamed = tmp_path / "test.json"
    renamed.write_text(json.dumps(data))
    out = tmp_path / "run"
    _run(splits, tiny_sam_dir, out, **{"peft.method": "decoder", "data.test_annotations": renamed,
                                       "data.test_images": splits["val"][1]})  # fmt: skip
    lines = {line["kind"]: line for line in _lines(out)}
    assert set(lines["test-best"]["per_category"]) <= {c["name"] for c in data["categories"]}
    assert lines["test-best"]["per_category"] and lines["test-zero-shot"]["per_category"]
    assert all(not name.startswith("test-") for name in lines["final"]["per_category"])


def test_a_validation_split_without_instances_never_counts_as_better(tmp_path, splits, tiny_sam_dir):
    data = json.loads(Path(splits["val"][0]).read_text())
    data["annotations"] = []
    empty = tmp_path / "val.json"
    empty.write_text(json.dumps(data))
    out = tmp_path / "run"
    results = _run(splits, tiny_sam_dir, out, **{"peft.method": "decoder", "data.val_annotations": empty,
                                                 "train.max_steps": 10, "train.eval_every": 1,
                                                 "train.early_stopping": 2})  # fmt: skip
    assert math.isnan(results["zero_shot"]["mIoU"]) and results["zero_shot"]["num_instances"] == 0
    assert results["best_step"] == -1 and not (out / "best").exists()  # NaN never beats anything
    assert results["stop_reason"].startswith("early stopping") and json.loads((out / "results.json").read_text())[
        "steps"] == 1  # fmt: skip


def test_every_schedule_warms_up_then_follows_its_shape():
    from samtune.training.setup import build_scheduler

    rates = {}
    for schedule in ("constant", "linear", "cosine"):
        config = load_config(overrides={"train.scheduler": schedule, "train.warmup_ratio": 0.2, "train.lr": 1.0})
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
        scheduler = build_scheduler(config, optimizer, total_steps=10)
        rates[schedule] = []
        for _ in range(10):
            rates[schedule].append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
    for schedule, lrs in rates.items():
        assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0]), schedule  # 2 warm-up steps from 0, then the peak
    assert rates["constant"][2:] == pytest.approx([1.0] * 8)
    assert rates["linear"][2:] == pytest.approx([1 - k / 8 for k in range(8)])
    assert rates["cosine"][2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
