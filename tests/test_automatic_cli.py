"""The command-line side of issue 19: evaluate --automatic (class-agnostic COCO AP / AR of prompt-free masks) and
predict's overlays (prompts drawn, base | fine-tuned side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import SamModel

from samtune.errors import UserError
from samtune.evaluation import coco_metrics
from samtune.visualize import colour_of


def test_evaluate_automatic(coco, tiny_sam_dir, tmp_path, capsys):
    from samtune.evaluate import main as evaluate

    annotation_file, image_dir = coco
    out = tmp_path / "scores.json"
    args = ["--model", str(tiny_sam_dir), "--annotations", str(annotation_file), "--images", str(image_dir)]
    metrics = evaluate([*args, "--automatic", "--points-per-side", "3", "--min-score", "-100", "--output", str(out)])
    assert set(metrics["coco"]) >= {"AP", "AP50", "AP75", "AR10", "AR100", "AR1000"}
    assert all(0 <= metrics["coco"][k] <= 1 for k in ("AP", "AP50", "AR1000"))
    found = json.loads(Path(metrics["coco"]["results_file"]).read_text())
    assert len(found) == pytest.approx(metrics["masks_per_image"] * metrics["num_images"])
    assert coco_metrics(annotation_file, found, class_agnostic=True) == {
        k: v for k, v in metrics["coco"].items() if k != "results_file"
    }
    assert "AR1000" in capsys.readouterr().out
    with pytest.raises(UserError, match="--automatic with --clicks"):
        evaluate([*args, "--automatic", "--clicks", "2"])


def test_score_split_on_regions(coco, tiny_sam_dir):
    """evaluate --automatic's scorer on caller regions (tiles of each image): every mask is found in one of them
    and comes back at its image's size."""
    from samtune.automatic_masks import AutomaticConfig, score_split
    from samtune.data.coco import CocoInstanceDataset
    from samtune.models.loading import load_trained

    model, processor = load_trained(str(tiny_sam_dir), None)
    source = CocoInstanceDataset(*coco)
    config = AutomaticConfig(points_per_side=2, min_score=-100, min_stability=-1)

    def halves(height: int, width: int) -> list[list[int]]:
        return [[0, 0, width // 2 + 10, height], [width // 2 - 10, 0, width, height]]

    tiled = score_split(model, processor, source, coco[0], config=config, regions=halves)[1]
    assert tiled
    sizes = {image.image_id: image.size for image in source.images}
    for r in tiled:
        height, width = sizes[r["image_id"]]
        assert r["crop_box"] in halves(height, width) and r["segmentation"]["size"] == [height, width]


def test_predict_overlays_draw_prompts_and_compare_with_the_base(coco, tiny_sam_dir, tmp_path):
    """predict --overlays: boxes drawn in their mask's colour; --compare-base: base | fine-tuned, titled."""
    from samtune.errors import UserError
    from samtune.predict import main as predict

    annotation_file, image_dir = coco
    data = json.loads(annotation_file.read_text())
    image = next(i for i in data["images"] if i["width"] >= 60 and i["height"] >= 40)
    name = image["file_name"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({name: [[5, 5, 40, 30]]}))
    base = ["--model", str(tiny_sam_dir), "--images", str(image_dir), "--prompts", str(prompts)]
    predict([*base, "--overlays", str(tmp_path / "plain"), "--output", str(tmp_path / "p.json")])
    picture = np.asarray(Image.open((tmp_path / "plain" / name).with_suffix(".png")))
    assert picture.shape[:2] == (image["height"], image["width"])
    assert tuple(picture[5, 20]) == colour_of(0)  # the box's top edge
    adapter_dir = tmp_path / "adapter"  # an untrained LoRA: what --compare-base loads, not what it learnt
    model = get_peft_model(SamModel.from_pretrained(tiny_sam_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(adapter_dir)
    adapter = ["--adapter", str(adapter_dir)]
    predict([*base, *adapter, "--overlays", str(tmp_path / "both"), "--compare-base", "--output", str(tmp_path / "q")])
    both = np.asarray(Image.open((tmp_path / "both" / name).with_suffix(".png")))
    assert both.shape[1] == 2 * image["width"] + 4 and both.shape[0] > image["height"]
    with pytest.raises(UserError, match="--compare-base .* needs --adapter and --overlays"):
        predict([*base, "--compare-base"])


def test_evaluate_overlays_put_truth_beside_each_model(coco, tiny_sam_dir, tmp_path):
    """evaluate --overlays with --compare-base: ground truth | zero-shot | fine-tuned, one PNG per drawn image,
    the fine-tuned masks in their annotation's colour; --automatic draws its masks too."""
    from samtune.data.coco import CocoInstanceDataset
    from samtune.evaluate import main as evaluate

    annotation_file, image_dir = coco
    adapter_dir = tmp_path / "adapter"
    get_peft_model(SamModel.from_pretrained(tiny_sam_dir), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        adapter_dir
    )
    args = ["--model", str(tiny_sam_dir), "--annotations", str(annotation_file), "--images", str(image_dir)]
    evaluate([*args, "--adapter", str(adapter_dir), "--compare-base", "--overlays", str(tmp_path / "o"),
              "--overlay-count", "2"])  # fmt: skip
    source = CocoInstanceDataset(annotation_file, image_dir)
    drawn = sorted((tmp_path / "o").rglob("*.png"))
    assert len(drawn) == 2
    first = next(image for image in source.images if image.instances)
    picture = np.asarray(Image.open((tmp_path / "o" / first.file_name).with_suffix(".png")))
    height, width = first.size
    assert picture.shape[1] == 3 * width + 2 * 4 and picture.shape[0] > height  # three titled panels
    truth_panel = picture[-height:, :width]
    assert (truth_panel == colour_of(0)).all(axis=2).any()  # the first annotation's outline
    evaluate([*args, "--automatic", "--points-per-side", "2", "--min-score", "-100", "--min-stability", "-1",
              "--overlays", str(tmp_path / "a"), "--overlay-count", "1"])  # fmt: skip
    assert len(list((tmp_path / "a").rglob("*.png"))) == 1
    with pytest.raises(UserError, match="--overlay-count 0"):
        evaluate([*args, "--overlays", str(tmp_path / "b"), "--overlay-count", "0"])
