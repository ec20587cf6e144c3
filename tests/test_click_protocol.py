"""The click protocol (samtune.click_protocol): NoC definitions, the clicks it gives the model, one encoder pass
per batch, the evaluate command and training with the click curve."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samtune.click_protocol import clicks_to_reach, follow_clicks, summarize
from samtune.clicks import next_click
from samtune.config import DataConfig
from samtune.data.batch import collate, encode_sample, to_device
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, make_loader
from samtune.data.prompts import make_prompts
from samtune.errors import UserError
from samtune.evaluate import evaluate_split
from samtune.evaluate import main as evaluate_main
from samtune.evaluation import predicted_masks, sam_forward, score_batch
from samtune.models.family import image_features, post_process_masks
from samtune.models.loading import load_trained
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny
from samtune.visualize import overlay_panel


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """Four images, one of them with a crowd region."""
    return make_synthetic_coco(tmp_path_factory.mktemp("small"), SyntheticSpec(num_images=4, seed=3, crowd_every=2))


@pytest.fixture(scope="module")
def tiny_sam2_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-sam2"), "sam2")


def _load(folder):
    model, processor = load_trained(str(folder), None)  # SAM 2's processor without torchvision too
    return model.eval(), processor


def _batches(split, processor, prompt="box", batch_size=2):
    dataset = SamPromptDataset(CocoInstanceDataset(*split), processor, DataConfig(prompt=prompt), train=False)
    return [to_device(batch, "cpu") for batch in make_loader(dataset, batch_size, shuffle=False)]


def _records(curves):
    return [{"image_id": 1, "annotation_id": n, "ious": curve} for n, curve in enumerate(curves)]


def test_noc_counts_the_first_prompt_as_one_and_caps_at_k_plus_one():
    assert clicks_to_reach([0.9, 0.95], 0.85) == 1  # the first prompt is enough: 1 interaction
    assert clicks_to_reach([0.5, 0.85, 0.2], 0.85) == 2  # reached at the first click (>=), later losses ignored
    assert clicks_to_reach([0.5, 0.8, 0.89], 0.9) is None
    curves = [[0.9, 0.95, 0.97], [0.5, 0.86, 0.95], [0.1, 0.2, 0.3], [0.5, 0.7, 0.91]]
    out = summarize(_records(curves) + _records(curves[:1]), clicks=2)  # a repeated record counts once
    assert out["num_instances"] == 4
    assert out["mIoU"] == pytest.approx([0.5, 0.6775, 0.7825])
    assert out["mIoU_mean"] == pytest.approx(np.mean(curves))
    assert out["NoC85"] == pytest.approx((1 + 2 + 3 + 3) / 4) and out["failed85"] == 0.25
    # reached at the last click and never reached both count K + 1; only the second is a failure
    assert out["NoC90"] == pytest.approx((1 + 3 + 3 + 3) / 4) and out["failed90"] == 0.25
    empty = summarize([], clicks=2)
    assert len(empty["mIoU"]) == 3 and np.isnan(empty["mIoU_mean"]) and empty["num_instances"] == 0


def test_a_model_right_after_the_first_click_gives_the_noc_computed_by_hand(small, tiny_sam_dir, monkeypatch):
    """Round 0 predicts nothing (every click is then positive, inside the object); every click round returns the
    ground truth at mask resolution, so an instance's NoC is 2 where that mask reaches the threshold, else K + 1."""
    model, processor = _load(tiny_sam_dir)
    batch = _batches(small, processor)[0]
    truth = batch["low_res_masks"].float() * 40 - 20
    seen = []

    def oracle(**kwargs):
        seen.append(kwargs)
        if "input_masks" not in kwargs:  # round 0, the batch layout
            logits = torch.full_like(truth, -20.0)
            return SimpleNamespace(pred_masks=logits[:, :, None], iou_scores=torch.ones(*truth.shape[:2], 1))
        logits = truth[batch["valid"]][:, None, None]
        return SimpleNamespace(pred_masks=logits, iou_scores=torch.ones(len(logits), 1, 1))

    monkeypatch.setattr(model, "forward", oracle)
    clicks = 3
    run = follow_clicks(model, batch, processor, clicks)
    perfect = SimpleNamespace(pred_masks=truth[:, :, None], iou_scores=torch.ones(*truth.shape[:2], 1))
    reference = score_batch(perfect, batch, processor)
    ious = [r["iou"] for r in reference]
    assert [r["ious"] for r in run.records] == [[0.0] + [iou] * clicks for iou in ious]
    first_click = seen[1]["input_labels"][:, 0, -1]
    assert (first_click == 1).all()  # nothing predicted: only misses to click into
    torch.testing.assert_close(seen[2]["input_masks"][:, 0], truth[batch["valid"]])  # the previous round's mask
    out = summarize(run.records, clicks)
    assert out["NoC85"] == pytest.approx(np.mean([2 if iou >= 0.85 else clicks + 1 for iou in ious]))
    assert out["failed90"] == pytest.approx(np.mean([iou < 0.9 for iou in ious]))
    assert out["mIoU"][0] == 0.0 and out["mIoU"][1] == pytest.approx(np.mean(ious))


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_the_click_lands_where_the_processor_puts_that_point(family, tiny_sam_dir, tiny_sam2_dir):
    """A non-square image (resized differently from its original size): the first correction click reaches the
    model where the processor itself would put that original-resolution point; the panel shows it."""
    model, processor = _load(tiny_sam_dir if family == "sam" else tiny_sam2_dir)
    height, width = 50, 130
    image = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    truth = np.zeros((1, height, width), bool)
    truth[0, 10:40, 20:90] = True
    ignore = np.zeros((height, width), bool)
    encoded = encode_sample(processor, image, truth, ignore, make_prompts(truth, DataConfig(prompt="box"), None))
    encoded.update(
        image_id=torch.tensor(1),
        category_ids=torch.tensor([1]),
        annotation_ids=torch.tensor([7]),
        original_masks=torch.from_numpy(truth),
        original_ignore=torch.from_numpy(ignore),
    )
    batch = collate([encoded])
    assert batch["reshaped_input_sizes"][0].tolist() != [height, width]
    features = image_features(model, batch["pixel_values"])
    first = sam_forward(model, batch, features=features)
    logits, _ = predicted_masks(first)
    masks = post_process_masks(processor, logits[:, :, None], batch["original_sizes"], batch["reshaped_input_sizes"])
    point, label = next_click(masks[0][0, 0].numpy(), truth[0])
    scaled = processor(images=image, input_points=[[[point.tolist()]]], input_labels=[[[label]]], return_tensors="pt")
    expected = scaled["input_points"][0, 0, 0]
    calls = []
    original = model.forward

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    model.forward = spy
    run = follow_clicks(model, batch, processor, 1, features, first)
    sent = calls[0]["input_points"][0, 0, -1]
    torch.testing.assert_close(sent, expected.float(), rtol=0, atol=1e-4)
    assert calls[0]["input_labels"][0, 0, -1] == label and calls[0]["multimask_output"] is False
    assert run.points[0].tolist() == [[*sent.tolist(), float(label)]]
    panel = overlay_panel(batch, 0, run.logits, processor, run.points[0])
    resized_width = int(batch["reshaped_input_sizes"][0, 1])
    x, y = (int(round(v)) for v in sent.tolist())
    assert tuple(panel[y, resized_width + 4 + x]) == ((0, 200, 0) if label else (220, 0, 0))


def test_deterministic_and_one_encoder_pass_per_batch(small, tiny_sam_dir):
    model, processor = _load(tiny_sam_dir)
    batches = _batches(small, processor, prompt="point")
    passes = []
    handle = model.vision_encoder.register_forward_hook(lambda *_: passes.append(1))
    first = [follow_clicks(model, batch, processor, 2).records for batch in batches]
    assert len(passes) == len(batches)
    handle.remove()
    second = [follow_clicks(model, batch, processor, 2).records for batch in batches]
    assert first == second
    assert {len(r["ious"]) for records in first for r in records} == {3}


def test_evaluate_split_curve_starts_at_the_plain_miou(small, tiny_sam_dir):
    model, processor = _load(tiny_sam_dir)
    dataset = SamPromptDataset(CocoInstanceDataset(*small), processor, DataConfig(prompt="box+point"), train=False)
    passes = []
    model.vision_encoder.register_forward_hook(lambda *_: passes.append(1))
    plain, _ = evaluate_split(model, processor, dataset, batch_size=2)
    encoder_passes = len(passes)
    with_clicks, _ = evaluate_split(model, processor, dataset, batch_size=2, clicks=2)
    assert len(passes) == 2 * encoder_passes  # the click rounds reuse the plain evaluation's features
    assert "clicks" not in plain and with_clicks["mIoU"] == plain["mIoU"]
    curve = with_clicks["clicks"]
    assert len(curve["mIoU"]) == 3 and curve["mIoU"][0] == pytest.approx(plain["mIoU"], abs=1e-12)
    assert curve["num_instances"] == plain["num_instances"]
    assert 1 <= curve["NoC85"] <= curve["NoC90"] <= 3 and 0 <= curve["failed85"] <= curve["failed90"] <= 1


def test_evaluate_command_writes_the_click_keys(small, tiny_sam2_dir, tmp_path):
    """SAM 2, point prompts (three masks in round 0, one per click round)."""
    output = tmp_path / "r.json"
    base = ["--model", str(tiny_sam2_dir), "--annotations", str(small[0]), "--images", str(small[1])]
    out = evaluate_main([*base, "--prompt", "point", "--clicks", "2", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["clicks"] == out["clicks"]
    assert len(written["clicks"]["mIoU"]) == 3
    assert {"NoC85", "NoC90", "failed85", "failed90"} <= set(written["clicks"])
    assert written["clicks"]["mIoU"][0] == pytest.approx(written["mIoU"], abs=1e-12)
    with pytest.raises(UserError, match="--clicks -1"):
        evaluate_main([*base, "--clicks", "-1"])


def test_training_reports_the_curve_and_selects_on_it(tmp_path, small, train_tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_split = make_synthetic_coco(tmp_path / "train", SyntheticSpec(num_images=3, seed=1))
    settings = {"train.max_steps": 2, "train.eval_every": 1, "train.eval_clicks": 2, "train.select_on": "clicks"}
    results = train_tiny(out, train_split, small, **settings, **{"train.log_images": 1, "peft.method": "decoder"})
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["zero-shot", "eval", "final"]
    for line in lines:
        assert len(line["clicks"]["mIoU"]) == 3 and line["clicks"]["mIoU"][0] == pytest.approx(line["mIoU"])
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["selected_on"] == "clicks"
    assert best["selected_value"] == best["clicks"]["mIoU_mean"] == max(line["clicks"]["mIoU_mean"] for line in lines)
    summary = json.loads((out / "results.json").read_text())
    assert summary["best_selected_value"] == best["selected_value"] and summary["best_mIoU"] == best["mIoU"]
    assert results["final"]["clicks"] == lines[-1]["clicks"]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/clicks_mIoU_0", "val/clicks_mIoU_2", "val/NoC85", "val/NoC90", "val/mIoU"} <= scalars
    assert {"val/overlay_0", "val/clicks_overlay_0"} <= set(events.Tags()["images"])


def test_closing_table_shows_the_best_weights_val_miou_when_selected_on_clicks(tmp_path):
    from samtune.checkpointing import TrainerState
    from samtune.training.report import closing_table

    state = TrainerState()
    state.step, state.best_step, state.best_miou = 4, 2, 0.9  # best_miou: the curve mean that was compared
    state.history = [
        {"step": 2, "kind": "eval", "mIoU": 0.5, "mF1": 0.6},
        {"step": 2, "kind": "test-zero-shot", "mIoU": 0.1, "mF1": 0.2},
    ]
    table = closing_table(state, {"final": {"mIoU": 0.4, "mF1": 0.5}}, tmp_path)
    best_row = next(line for line in table.splitlines() if line.startswith("val best"))
    assert best_row.split()[-2:] == ["50.00", "60.00"]
