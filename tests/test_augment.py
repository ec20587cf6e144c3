"""Training augmentation: image, masks, crowd map and prompts stay aligned under every transform; dropped instances
are counted; a sample depends on (seed, epoch, image) alone; evaluation never augments; runs train and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import load_file
from scipy.ndimage import binary_dilation, binary_erosion
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from samtune.config import ConfigError, DataConfig, load_config
from samtune.data.augment import PRESETS, AugmentSettings, augment, augment_sample, settings_of, varies_images
from samtune.data.coco import CocoInstanceDataset
from samtune.data.dataset import SamPromptDataset, make_loader
from samtune.data.prompts import box_from_mask, make_prompts

# Every geometric transform, each where it can be checked: flips and turns move pixels exactly, the affine
# resamples (bilinear image, nearest masks), so there the two may differ on boundary pixels only.
EXACT = AugmentSettings(hflip=1.0, vflip=1.0, rot90=1.0)
AFFINE = AugmentSettings(hflip=0.5, degrees=20.0, scale=(0.6, 1.4))
GEOMETRY_OF_STRONG = AugmentSettings(hflip=0.5, vflip=0.5, rot90=0.5, degrees=15.0, scale=(0.5, 1.5))


def painted(height: int = 60, width: int = 90) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image whose red, green and blue channels are two instance masks and a crowd map (255 inside, 0 out)."""
    masks = np.zeros((2, height, width), bool)
    masks[0, 10:30, 5:40] = True
    masks[1, 35:55, 50:85] = True
    masks[1, 40:50, 60:70] = False  # a hole
    ignore = np.zeros((height, width), bool)
    ignore[2:8, 60:80] = True
    image = np.stack([masks[0], masks[1], ignore], axis=-1).astype(np.uint8) * 255
    return image, masks, ignore


def boundary(mask: np.ndarray) -> np.ndarray:
    return binary_dilation(mask) & ~binary_erosion(mask)


@pytest.mark.parametrize("settings", [EXACT, AFFINE, GEOMETRY_OF_STRONG], ids=["flips-turns", "affine", "strong"])
def test_image_masks_and_ignore_stay_aligned(settings):
    image, masks, ignore = painted()
    shapes = set()
    for seed in range(8):
        out, moved, crowd = augment(image, masks, ignore, settings, seed)
        assert out.dtype == np.uint8 and moved.dtype == bool and crowd.dtype == bool
        assert out.shape[:2] == moved.shape[1:] == crowd.shape
        shapes.add(out.shape[:2])
        for channel, target in ((0, moved[0]), (1, moved[1]), (2, crowd)):
            wrong = (out[..., channel] > 127) != target
            if settings is EXACT:
                assert not wrong.any(), (seed, channel)
            else:
                assert not (wrong & ~boundary(target)).any(), (seed, channel)
                assert wrong.sum() <= 0.05 * boundary(target).sum() + 2
    if settings is EXACT:  # turns by 90 degrees swap the sides of a non-square image
        assert shapes == {(60, 90), (90, 60)}
        out, moved, _ = augment(image, masks, ignore, EXACT, 0)
        assert moved.sum(axis=(1, 2)).tolist() == masks.sum(axis=(1, 2)).tolist()


def test_prompts_follow_the_transformed_masks():
    image, masks, ignore = painted()
    sample = {"image": image, "size": image.shape[:2], "masks": masks, "ignore": ignore,
              "category_ids": np.array([3, 7]), "annotation_ids": np.array([11, 12])}  # fmt: skip
    data = DataConfig(prompt="box+point", box_jitter=0.0, num_points=3)
    for seed in range(4):
        moved = augment_sample(sample, GEOMETRY_OF_STRONG, seed, min_visible=16)
        prompts = make_prompts(moved["masks"], data, np.random.default_rng(seed))
        for k, mask in enumerate(moved["masks"]):
            x0, y0, x1, y1 = prompts["boxes"][k].astype(int)
            assert (x0, y0, x1, y1) == tuple(box_from_mask(mask).astype(int))
            assert (moved["image"][y0 : y1 + 1, x0 : x1 + 1, k] > 127).any()  # the box holds the painted object
            for x, y in prompts["points"][k].astype(int):
                assert mask[y, x] and moved["image"][y, x, k] > 127  # positive points on the object's pixels


def test_instances_pushed_under_the_visible_minimum_are_dropped_and_counted():
    image = np.zeros((64, 64, 3), np.uint8)
    masks = np.zeros((3, 64, 64), bool)
    masks[0, 8:48, 8:48] = True  # 1600 px: about 100 at a quarter of the side
    masks[1, 52:60, 52:60] = True  # 64 px: about 4, under 16
    masks[2, 0:3, 0:3] = True  # 9 px, already under 16: kept while any pixel stays
    sample = {"image": image, "size": (64, 64), "masks": masks, "ignore": np.zeros((64, 64), bool),
              "category_ids": np.array([1, 2, 3]), "annotation_ids": np.array([10, 20, 30]), "dropped": 2}  # fmt: skip
    shrink = AugmentSettings(scale=(0.25, 0.25))
    out = augment_sample(sample, shrink, seed=0, min_visible=16)
    _, moved, _ = augment(image, masks, sample["ignore"], shrink, 0)
    counts = moved.sum(axis=(1, 2))
    expected = (counts > 0) & (counts >= np.minimum(16, masks.sum(axis=(1, 2))))
    assert expected[0] and not expected[1]
    assert out["annotation_ids"].tolist() == [a for a, keep in zip([10, 20, 30], expected) if keep]
    assert out["dropped"] == 2 + int((~expected).sum())  # added to what a crop already dropped
    assert all(m.any() for m in out["masks"]) and len(out["masks"]) == len(out["category_ids"])
    # a transform that would leave nothing to learn from is not used
    only_small = {**sample, "masks": masks[1:2], "category_ids": np.array([2]), "annotation_ids": np.array([20])}
    assert augment_sample(only_small, shrink, seed=0, min_visible=16) is only_small


def test_a_sample_depends_on_its_seed_alone_and_leaves_the_caller_random_state_alone():
    image, masks, ignore = painted()
    strong = PRESETS["strong"]
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    first = augment(image, masks, ignore, strong, 123)
    assert torch.equal(torch.rand(3), expected_next)
    again = augment(image, masks, ignore, strong, 123)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    others = [augment(image, masks, ignore, strong, seed)[0] for seed in range(4)]
    assert len({o.tobytes() for o in others}) == 4


def test_presets_and_explicit_keys():
    assert not settings_of(DataConfig()).active and varies_images(DataConfig()) is None
    light = settings_of(DataConfig(augment="light"))
    assert light == PRESETS["light"] and light.active
    mine = settings_of(DataConfig(augment="light", augment_hflip=0.0, augment_vflip=0.5, augment_scale=[0.9, 1.1]))
    assert (mine.hflip, mine.vflip, mine.scale, mine.color) == (0.0, 0.5, (0.9, 1.1), light.color)
    assert "data.crop_size 64" in varies_images(DataConfig(crop_size=64))
    # what the run's banner says training sees
    from samtune.training.report import training_view

    assert training_view(load_config(overrides={"data.prompt": "mixed"})) == "mixed prompts"
    strong = load_config(overrides={"data.augment": "strong", "data.crop_size": 512})
    assert training_view(strong) == "box prompts, augment strong, 512 px crops"
    own = load_config(overrides={"data.augment": "light", "data.augment_vflip": 0.5})
    assert training_view(own) == "box prompts, augment light + data.augment_* keys"
    with pytest.raises(ConfigError, match="data.augment_scale"):
        load_config(overrides={"data.augment_scale": "1.5,0.5"})
    with pytest.raises(ConfigError, match="data.augment_color"):
        load_config(overrides={"data.augment_color": "0.1,0.1"})


@pytest.fixture(scope="module")
def painted_coco(tmp_path_factory) -> tuple[Path, Path]:
    """Three images whose channels are their instances (red, green) and crowd (blue), annotated as RLE."""
    root = tmp_path_factory.mktemp("painted")
    (root / "images").mkdir()
    images, annotations = [], []
    for number in range(3):
        image, masks, ignore = painted(60 + 10 * number, 90 - 10 * number)
        Image.fromarray(image).save(root / "images" / f"{number}.png")
        height, width = image.shape[:2]
        images.append({"id": number, "file_name": f"{number}.png", "width": width, "height": height})
        for k, (mask, crowd) in enumerate([(masks[0], 0), (masks[1], 0), (ignore, 1)]):
            counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
            annotations.append({"id": 10 * number + k, "image_id": number, "category_id": 1 + k, "iscrowd": crowd,
                                "segmentation": {"size": [height, width], "counts": counts}})  # fmt: skip
    categories = [{"id": k, "name": name} for k, name in ((1, "red"), (2, "green"), (3, "crowd"))]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))  # fmt: skip
    return root / "annotations.json", root / "images"


@pytest.mark.parametrize("crop", [0, 40])
def test_training_samples_are_aligned_and_evaluation_never_augments(painted_coco, processor, crop):
    source = CocoInstanceDataset(*painted_coco)
    data = DataConfig(augment="strong", augment_color=[0, 0, 0, 0], augment_blur=0, augment_noise=0,
                      augment_grayscale=0, augment_rot90=0.5, augment_vflip=0.5, crop_size=crop)  # fmt: skip
    train = SamPromptDataset(source, processor, data, train=True, seed=1)
    for epoch in range(3):
        train.set_epoch(epoch)
        for index in range(len(source)):
            sample = train._read(index, read=True, as_image=False)
            image = sample["image"]
            for category, mask in zip(sample["category_ids"], sample["masks"]):
                wrong = (image[..., category - 1] > 127) != mask
                assert not (wrong & ~boundary(mask)).any()
            assert not (((image[..., 2] > 127) != sample["ignore"]) & ~boundary(sample["ignore"])).any()
    evaluation = SamPromptDataset(source, processor, data, train=False)
    plain = SamPromptDataset(source, processor, DataConfig(), train=False)
    for a, b in zip(evaluation, plain):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_batches_do_not_depend_on_worker_count(coco, processor):
    data = DataConfig(augment="strong", crop_size=64, prompt="box+point", max_instances=3)
    dataset = SamPromptDataset(CocoInstanceDataset(*coco), processor, data, train=True, seed=2)
    dataset.set_epoch(1)
    serial = list(make_loader(dataset, batch_size=4, num_workers=0))
    parallel = list(make_loader(dataset, batch_size=4, num_workers=2))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert sum(int(batch["dropped"].sum()) for batch in serial) > 0  # the crops cut something away
    dataset.set_epoch(2)  # and another epoch draws other transforms
    assert not torch.equal(next(iter(make_loader(dataset, 4)))["pixel_values"], serial[0]["pixel_values"])


def _scalars(out: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    return [event.value for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_train_script_with_strong_augmentation_on_photos_with_crowd_and_16_bit(coco, tiny_sam_dir, tmp_path, caplog):
    """``samtune/train.py --data.augment strong`` on the synthetic real-file set (crowd, 16-bit PNG, EXIF JPEG)."""
    from samtune.train import main

    annotations, images = (str(p) for p in coco)
    out = tmp_path / "run"
    argv = ["--model.name_or_path", str(tiny_sam_dir), "--data.train_annotations", annotations,
            "--data.train_images", images, "--data.val_annotations", annotations, "--data.val_images", images,
            "--data.num_workers", "0", "--train.max_steps", "3", "--train.log_every", "1", "--train.log_images", "0",
            "--peft.method", "decoder", "--data.augment", "strong", "--data.crop_size", "48", "--train.batch_size", "4",
            "--train.log_train_images", "2", "--output_dir", str(out)]  # fmt: skip
    stored = CocoInstanceDataset(*coco)
    assert any(image.path.suffix == ".png" and Image.open(image.path).mode.startswith("I") for image in stored.images)
    assert stored.images and any(image.crowd for image in stored.images)
    with caplog.at_level("INFO"):
        results = main(argv)
    assert not results["interrupted"] and results["final"]["num_instances"] > 0
    assert "training images recomputed every step because data.augment strong" in caplog.text
    summary = json.loads((out / "results.json").read_text())
    logged = _scalars(out, "train/dropped_instances")
    assert len(logged) == 3 and summary["dropped_instances"] == sum(logged) > 0
    # the cache holds the validation images only: training images were never looked up
    evaluated = sum(1 for image in stored.images if image.instances)  # per validation (zero-shot and final)
    assert summary["embedding_cache"] == {"hits": evaluated, "misses": evaluated}
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/sample_0", "train/sample_1"} <= set(events.Tags()["images"])
    assert len(events.Images("train/sample_0")) == 3


@pytest.mark.slow
def test_resume_with_strong_augmentation_continues_exactly(coco, train_tiny, tmp_path):
    """3 + 3 steps == 6 steps, with strong augmentation and random crops."""
    common = {"data.augment": "strong", "data.crop_size": 64, "train.max_steps": 6, "train.batch_size": 3,
              "data.max_instances": 2, "peft.dropout": 0.1}  # fmt: skip
    straight = train_tiny(tmp_path / "straight", coco, coco, **common)
    stopped = train_tiny(tmp_path / "resumed", coco, coco, **common, **{"train.stop_at": 3})
    assert stopped["interrupted"]
    resumed = train_tiny(tmp_path / "resumed", coco, coco, **common, **{"train.resume_from": "latest"})
    a = load_file(tmp_path / "straight/final/adapter_model.safetensors")
    b = load_file(tmp_path / "resumed/final/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"]["mIoU"] == straight["final"]["mIoU"]
    summary = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert summary["dropped_instances"] > 0  # the crops and transforms were really on


def test_augment_table_quick(coco, tmp_path, monkeypatch):
    """The benchmark's logic on fake runs: one row per preset, mean and std over seeds, the median epoch."""
    import importlib.util

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("benchmark_augment_table", benchmarks / "augment_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    threads = torch.get_num_threads()
    train = ["--data.train_annotations", str(coco[0]), "--data.train_images", str(coco[1])]
    monkeypatch.setattr(table, "small_split", lambda output, images, quick: train)
    launched = []

    def launch(command, env):
        options = dict(zip(command[2::2], command[3::2]))
        augment, seed = command[command.index("--data.augment") + 1], int(options["--train.seed"])
        launched.append((augment, seed))
        score = {"none": 0.30, "strong": 0.40}[augment] + 0.02 * seed
        results = {
            "test": {"best": {"mIoU": score, "mF1": score + 0.1}, "zero_shot": {"mIoU": 0.2, "mF1": 0.3}},
            "parameters": {"all": {"trainable": 7}}, "epoch_seconds": [1.0, 3.0 + seed, 2.0],
            "peak_memory_gib": 0.5, "dropped_instances": 4 if augment == "strong" else 0,
        }  # fmt: skip
        Path(options["--output_dir"]).mkdir(parents=True)
        (Path(options["--output_dir"]) / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(table.method_table, "launch", launch)
    out, md = tmp_path / "table.json", tmp_path / "table.md"
    rows = table.main(["--quick", "--seeds", "0", "1", "--output", str(tmp_path / "runs"), "--json", str(out),
                       "--markdown", str(md)])  # fmt: skip
    torch.set_num_threads(threads)
    assert sorted(launched) == [("none", 0), ("none", 1), ("strong", 0), ("strong", 1)]
    none, strong = rows
    assert (none["augment"], strong["augment"]) == ("none", "strong")
    assert strong["test_mIoU_mean"] == pytest.approx(0.41) and strong["test_mIoU_std"] == pytest.approx(0.02 / 2**0.5)
    assert strong["test_mF1_mean"] == pytest.approx(0.51)
    assert strong["epoch_mean_ms"] == pytest.approx(2000) and strong["epoch_std_ms"] == 0  # medians 2 s and 2 s
    assert strong["dropped_instances"] == 8 and none["dropped_instances"] == 0
    report = json.loads(out.read_text())
    assert report["meta"]["images"] == 6 and len(report["rows"]) == 2
    line = md.read_text().splitlines()[3]
    assert line.startswith("| strong | 41.0 +- 1.4 | 51.0 +- 1.4 | 2.00 +- 0.00 | ") and line.endswith(" | 2 |")
    # the side-by-side loader passes (one round under --quick), really run on the training split
    for row in rows:
        assert 0 < row["loader_pass_median_ms"] == row["loader_pass_p90_ms"]
        assert f"| {row['loader_pass_median_ms'] / 1000:.2f} |" in md.read_text()


def test_a_run_resumes_only_with_its_own_augmentation(tmp_path):
    """Augmentation and crop keys are resume keys: other values would silently train something else."""
    from samtune.config import save_config
    from samtune.errors import UserError
    from samtune.training.folder import check_resumable

    stored = load_config(overrides={"data.augment": "strong", "data.crop_size": 256})
    save_config(stored, tmp_path / "config.yaml")
    check_resumable(tmp_path, load_config(overrides={"data.augment": "strong", "data.crop_size": 256}))
    for key, value in (("data.augment", "light"), ("data.augment_hflip", 0.0), ("data.crop_size", 0),
                       ("data.augment_scale", "0.9,1.1"), ("data.min_visible_area", 4)):  # fmt: skip
        changed = load_config(overrides={"data.augment": "strong", "data.crop_size": 256, key: value})
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            check_resumable(tmp_path, changed)
