"""Metrics against an independent numpy reference; COCO AP; the evaluate command agrees with training."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from samtune.evaluate import main as evaluate_main
from samtune.evaluation import aggregate, coco_metrics, instance_iou_f1, score_batch


def _reference(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None) -> tuple[float, float]:
    """IoU and F1 the way one computes them by hand, crowd pixels removed from both masks."""
    keep = np.ones_like(truth) if ignore is None else ~ignore
    p, t = pred & keep, truth & keep
    inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
    if union == 0:
        return 1.0, 1.0
    return inter / union, 2 * inter / (p.sum() + t.sum())


def _cases():
    rng = np.random.default_rng(0)
    cases = []
    for height, width in [(20, 30), (41, 17), (64, 64)]:  # every image its own size
        truth = np.zeros((height, width), bool)
        truth[: height // 2, : width // 3] = True  # touches the top and left borders
        empty = np.zeros_like(truth)
        partial = np.roll(truth, 3, axis=1)
        noisy = truth ^ (rng.random(truth.shape) < 0.1)
        crowd = np.zeros_like(truth)
        crowd[height // 2 :, width // 2 :] = True
        blob = crowd.copy()  # a prediction lying entirely in the crowd region
        blob[: height // 4, : width // 6] = True
        for pred, ignore in [
            (truth, None),
            (empty, None),
            (partial, None),
            (noisy, None),
            (noisy, crowd),
            (blob, crowd),
            (empty, crowd),
        ]:
            cases.append((pred, truth, ignore))
    return cases


@pytest.mark.parametrize(("pred", "truth", "ignore"), _cases())
def test_iou_f1_match_a_numpy_reference(pred, truth, ignore):
    iou, f1 = instance_iou_f1(
        torch.from_numpy(pred)[None],
        torch.from_numpy(truth)[None],
        None if ignore is None else torch.from_numpy(ignore),
    )
    want_iou, want_f1 = _reference(pred, truth, ignore)
    assert iou.item() == pytest.approx(want_iou, abs=1e-12) and f1.item() == pytest.approx(want_f1, abs=1e-12)


def test_empty_prediction_scores_zero_and_crowd_pixels_do_not_count():
    truth = torch.zeros(1, 10, 10, dtype=torch.bool)
    truth[0, :5] = True
    assert instance_iou_f1(torch.zeros_like(truth), truth)[0].item() == 0.0
    crowd = torch.zeros(10, 10, dtype=torch.bool)
    crowd[5:] = True
    everything = torch.ones_like(truth)  # the false positives all lie in the crowd region
    iou, f1 = instance_iou_f1(everything, truth, crowd)
    assert iou.item() == 1.0 and f1.item() == 1.0


def test_aggregate_means_per_instance_per_image_and_category():
    records = [
        {"image_id": 1, "annotation_id": 10, "category_id": 3, "iou": 1.0, "f1": 1.0},
        {"image_id": 1, "annotation_id": 11, "category_id": 3, "iou": 0.5, "f1": 0.6},
        {"image_id": 1, "annotation_id": 12, "category_id": 7, "iou": 0.0, "f1": 0.0},
        {"image_id": 2, "annotation_id": 20, "category_id": 7, "iou": 0.9, "f1": 0.8},
        {"image_id": 2, "annotation_id": 20, "category_id": 7, "iou": 0.9, "f1": 0.8},  # a DDP duplicate
    ]
    out = aggregate(records, {3: "cat", 7: "dog"})
    assert out["num_instances"] == 4 and out["num_images"] == 2
    assert out["mIoU"] == pytest.approx(np.mean([1.0, 0.5, 0.0, 0.9]))
    assert out["mIoU_image"] == pytest.approx(np.mean([np.mean([1.0, 0.5, 0.0]), 0.9]))
    assert out["mF1_image"] == pytest.approx(np.mean([np.mean([1.0, 0.6, 0.0]), 0.8]))
    assert out["per_category"] == {
        "cat": {"mIoU": 0.75, "mF1": 0.8, "count": 2},
        "dog": {"mIoU": pytest.approx(0.45), "mF1": 0.4, "count": 2},
    }


def test_scoring_happens_at_each_images_original_size(processor):
    """Logits made from the low-res labels score near 1 once upsampled to each image's own size."""
    from samtune.config import DataConfig
    from samtune.data.batch import collate, encode_sample
    from samtune.data.prompts import make_prompts

    samples = []
    for height, width in [(50, 120), (90, 40)]:
        truth = np.zeros((1, height, width), bool)
        truth[0, 5 : height - 5, 8 : width // 2] = True  # touches nothing, different shape per image
        ignore = np.zeros((height, width), bool)
        encoded = encode_sample(
            processor,
            np.zeros((height, width, 3), np.uint8),
            truth,
            ignore,
            make_prompts(truth, DataConfig(prompt="box"), None),
        )
        encoded.update(
            image_id=torch.tensor(height),
            category_ids=torch.tensor([1]),
            annotation_ids=torch.tensor([height]),
            original_masks=torch.from_numpy(truth),
            original_ignore=torch.from_numpy(ignore),
        )
        samples.append(encoded)
    batch = collate(samples)
    logits = batch["low_res_masks"].float() * 20 - 10

    class Outputs:
        pred_masks = logits[:, :, None]
        iou_scores = torch.ones(2, 1, 1)

    records = score_batch(Outputs(), batch, processor, with_rle=True)
    assert [r["image_id"] for r in records] == [50, 90]
    for record, (height, width) in zip(records, [(50, 120), (90, 40)]):
        assert record["segmentation"]["size"] == [height, width]
        assert record["iou"] > 0.85


def _json_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def test_perfect_predictions_give_coco_ap_1(coco, tmp_path):
    annotation_file, _ = coco
    truth = COCO(str(annotation_file))
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "score": 1.0,
            "segmentation": _json_rle(truth.annToRLE(a)),
        }
        for a in truth.dataset["annotations"]
        if not a["iscrowd"]
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert len(truth.loadRes(str(path)).getAnnIds()) == len(results)
    assert coco_metrics(annotation_file, results) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    shifted = [
        dict(
            r,
            segmentation=_json_rle(
                mask_utils.encode(np.asfortranarray(np.roll(mask_utils.decode(r["segmentation"]), 6, axis=1)))
            ),
        )
        for r in results
    ]
    assert coco_metrics(annotation_file, shifted)["AP75"] < 1.0


def test_evaluate_agrees_with_training_time_evaluation(tmp_path, coco, tiny_sam_dir, train_tiny):
    from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco

    train = make_synthetic_coco(tmp_path / "train", SyntheticSpec(num_images=6, seed=1))
    out = tmp_path / "run"
    trained = train_tiny(out, train, coco, **{"peft.method": "lora", "peft.targets": "all-linear"})
    output = tmp_path / "eval.json"
    results = evaluate_main(
        [
            "--model",
            str(tiny_sam_dir),
            "--adapter",
            str(out / "final"),
            "--annotations",
            str(coco[0]),
            "--images",
            str(coco[1]),
            "--coco",
            "--compare-base",
            "--output",
            str(output),
        ]
    )
    tuned, base = results["fine-tuned"], results["zero-shot"]
    assert tuned["mIoU"] == pytest.approx(trained["final"]["mIoU"], abs=1e-6)
    assert base["mIoU"] == pytest.approx(trained["zero_shot"]["mIoU"], abs=1e-6)
    assert tuned["num_instances"] == trained["final"]["num_instances"]
    assert json.loads(output.read_text())["fine-tuned"]["mIoU"] == tuned["mIoU"]
    for key in ("image_encoder_ms", "decoder_ms"):
        assert 0 < tuned["latency"][key]["median"] <= tuned["latency"][key]["p90"]
    assert tuned["skipped"]["crowd annotations (kept as ignore regions, not prompts)"] >= 1
    assert 0 <= tuned["coco"]["AP"] <= 1
    truth = COCO(str(coco[0]))
    loaded = truth.loadRes(tuned["coco"]["results_file"])
    assert len(loaded.getAnnIds()) == tuned["num_instances"]


def test_evaluate_sh_compares_zero_shot_and_fine_tuned(tmp_path, coco, tiny_sam_dir):
    import subprocess
    from pathlib import Path

    from transformers import SamModel, SamProcessor

    repo = Path(__file__).resolve().parent.parent
    tuned = tmp_path / "tuned"  # a SamModel folder with different weights, as a full or decoder run leaves
    model = SamModel.from_pretrained(tiny_sam_dir)
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(0.5)
    model.save_pretrained(tuned)
    SamProcessor.from_pretrained(tiny_sam_dir).save_pretrained(tuned)
    out = tmp_path / "cmp.json"
    result = subprocess.run(
        [
            "bash",
            str(repo / "launch" / "evaluate.sh"),
            str(tiny_sam_dir),
            str(tuned),
            str(coco[0]),
            str(coco[1]),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = result.stdout.splitlines()[0]
    assert "zero-shot" in header and "fine-tuned" in header
    both = json.loads(out.read_text())
    assert both["zero-shot"]["model"] == str(tiny_sam_dir) and both["fine-tuned"]["model"] == str(tuned)
    assert both["zero-shot"]["num_instances"] == both["fine-tuned"]["num_instances"] > 0


def test_precision_and_encoder_options(coco, tiny_sam_dir):
    """bf16 autocast scores close to fp32; transformers' own encoder scores what the fast one does; fp16 on a
    CPU is refused before any work."""
    base = ["--model", str(tiny_sam_dir), "--annotations", str(coco[0]), "--images", str(coco[1])]
    fp32 = evaluate_main(base)
    plain = evaluate_main([*base, "--no-fast-encoder"])
    bf16 = evaluate_main([*base, "--precision", "bf16", "--compile", "aot_eager"])  # compiled, as a user may
    assert fp32["latency"]["fast_encoder"] and not plain["latency"]["fast_encoder"]
    assert (fp32["latency"]["precision"], bf16["latency"]["precision"]) == ("fp32", "bf16")
    assert plain["mIoU"] == pytest.approx(fp32["mIoU"], abs=1e-3)
    assert bf16["num_instances"] == fp32["num_instances"] > 0
    assert bf16["mIoU"] == pytest.approx(fp32["mIoU"], abs=0.03)
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        evaluate_main([*base, "--precision", "fp16", "--device", "cpu"])


def test_inference_autocast_runs_products_in_the_asked_precision():
    from samtune import inference

    layer = torch.nn.Linear(4, 4)
    with inference.autocast("cpu", "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with inference.autocast("cpu", "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        inference.autocast("cpu", "int8")


def test_the_table_aligns_long_category_names():
    from samtune.evaluate import format_table

    def column(miou):
        return {
            "mIoU": miou, "mF1": miou, "mIoU_image": miou, "mF1_image": miou, "num_instances": 3, "num_images": 2,
            "per_category": {"burts_bees_baby_wipes_and_more": {"mIoU": miou}, "can": {"mIoU": miou / 2}},
            "latency": {"device": "cpu", "batch_size": 1, "image_encoder_ms": {"median": 1.0, "p90": 2.0},
                        "decoder_ms": {"median": 1.0, "p90": 2.0}},
        }  # fmt: skip

    lines = format_table({"zero-shot": column(0.25), "fine-tuned": column(0.5)}).splitlines()
    rows = [line for line in lines if line.rstrip().endswith(("25.00", "50.00", "12.50"))]
    assert len(rows) == 6  # four metrics, two categories
    assert len({len(line) for line in [lines[0], *rows]}) == 1  # every number column ends at the same place
    assert any(line.startswith("  burts_bees_baby_wipes_and_more ") for line in rows)
