"""predict drives correction rounds: per-instance clicks with labels, and the last round's mask (its saved
logits, or the binary mask) as the mask prompt; the image encoder still runs once per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from safetensors.torch import load_file

from samtune import cli
from samtune import predict as predict_module
from samtune.models.family import base_of, post_process_masks
from samtune.models.loading import load_trained
from samtune.predict import logits_file, mask_frame, mask_to_logits, save_logits
from samtune.predict import main as predict
from samtune.testing.synthetic import SyntheticSpec, make_synthetic_coco
from samtune.testing.tiny import save_tiny

FAMILIES = ("sam", "sam2")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sam_dir) -> dict[str, Path]:
    return {"sam": tiny_sam_dir, "sam2": save_tiny(tmp_path_factory.mktemp("tiny-sam2"), "sam2", seed=1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str], dict[str, tuple[int, int]]]:
    """(image folder, two image names, (H, W) per name): non-square images, so the frames matter."""
    annotations, images = make_synthetic_coco(
        tmp_path_factory.mktemp("rounds"), SyntheticSpec(num_images=2, seed=21, max_side=120, empty_every=100)
    )
    sizes = {i["file_name"]: (i["height"], i["width"]) for i in json.loads(annotations.read_text())["images"]}
    names = sorted(sizes)
    assert all(h != w for h, w in sizes.values())
    return images, names, sizes


class Spy:
    """What reaches the model: image-encoder calls, and each prompt-encoder call's prompts."""

    def __init__(self) -> None:
        self.encoder_calls = 0
        self.prompts: list[dict[str, torch.Tensor]] = []
        self.multimask: list[bool] = []

    def load(self, real):
        def load(*args, **kwargs):
            model, processor = real(*args, **kwargs)
            base = base_of(model)
            base.vision_encoder.register_forward_hook(lambda *_: setattr(self, "encoder_calls", self.encoder_calls + 1))
            base.prompt_encoder.register_forward_pre_hook(self._prompts, with_kwargs=True)
            base.register_forward_pre_hook(self._forward, with_kwargs=True)
            return model, processor

        return load

    def _prompts(self, module, args, kwargs) -> None:
        self.prompts.append({k: v.detach().clone() for k, v in kwargs.items() if v is not None})

    def _forward(self, module, args, kwargs) -> None:
        self.multimask.append(kwargs["multimask_output"])


@pytest.fixture
def spy(monkeypatch) -> Spy:
    spy = Spy()
    monkeypatch.setattr(predict_module, "load_trained", spy.load(predict_module.load_trained))
    return spy


def _run(model: Path, images: Path, prompts: dict, out: Path, *extra: str) -> list[dict]:
    path = out.with_name(out.stem + "-prompts.json")
    path.write_text(json.dumps(prompts))
    return predict(["--model", str(model), "--images", str(images), "--prompts", str(path), "--output", str(out),
                    *extra])  # fmt: skip


def _logits(out: Path) -> dict[tuple[str, object], torch.Tensor]:
    return {tuple(json.loads(key)): value.float() for key, value in load_file(logits_file(out)).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_previous_mask_reaches_the_decoder(family, models, data, spy, tmp_path):
    """Round 2 with --previous: the saved logits are the mask prompt (the binary mask, converted, where none
    were saved), and the masks differ from the same prompts without it."""
    images, names, sizes = data
    name = names[0]
    height, width = sizes[name]
    box = [2, 3, width // 2, height // 2]
    first = tmp_path / "r1.json"
    round1 = _run(models[family], images, {name: {"instances": [{"id": "a", "box": box}]}}, first, "--save-logits")
    assert [(r["file_name"], r["instance_id"]) for r in round1] == [(name, "a")]
    saved = _logits(first)
    _, side = mask_frame(load_trained(str(models[family]))[0])
    assert saved[(name, "a")].shape == side
    again = tmp_path / "again.json"
    _run(models[family], images, {name: {"instances": [{"id": "a", "box": box}]}}, again, "--save-logits")
    torch.testing.assert_close(_logits(again), saved)  # deterministic: what changes below is the mask prompt

    spy.prompts.clear()
    second = tmp_path / "r2.json"
    _run(models[family], images, {name: {"instances": [{"id": "a", "box": box}]}}, second, "--save-logits",
         "--previous", str(first))  # fmt: skip
    (call,) = spy.prompts
    assert call["input_masks"].shape == (1, 1, *side)
    torch.testing.assert_close(call["input_masks"][0, 0], saved[(name, "a")])  # the saved logits, not the mask
    assert not torch.allclose(_logits(second)[(name, "a")], saved[(name, "a")], atol=1e-3)

    # the mask edited by hand since (a brush): the saved logits no longer belong to it, the mask is the prompt,
    # as +/- MASK_LOGIT logits in the model's frame; so it is without the logits file
    edited = np.zeros((height, width), bool)
    edited[height // 3 :, : width // 2] = True
    round1[0]["segmentation"] = predict_module.encode_rle(torch.from_numpy(edited))
    first.write_text(json.dumps(round1))
    expected = mask_to_logits(edited, *_frame(family, models, images / name, side))
    assert expected.abs().max() <= predict_module.MASK_LOGIT
    for remove in (False, True):
        if remove:
            logits_file(first).unlink()
        spy.prompts.clear()
        _run(models[family], images, {name: {"instances": [{"id": "a", "box": box}]}}, tmp_path / "r2b.json",
             "--previous", str(first))  # fmt: skip
        torch.testing.assert_close(spy.prompts[0]["input_masks"][0, 0], expected)


def _frame(family, models, path, side):
    processor = load_trained(str(models[family]))[1]
    out = processor(images=predict_module.read_rgb(path), return_tensors="pt")
    size = tuple(out["pixel_values"].shape[-2:])
    reshaped = tuple(int(v) for v in out["reshaped_input_sizes"][0]) if "reshaped_input_sizes" in out else size
    return reshaped, size, side


@pytest.mark.parametrize("family", FAMILIES)
def test_a_binary_mask_lies_where_the_processor_puts_the_image(family, models, data):
    """SAM pads right / bottom, SAM 2 squeezes into the square: the mask converted to logits and post-processed
    back is the mask again."""
    images, names, sizes = data
    height, width = sizes[names[0]]
    mask = np.zeros((height, width), bool)
    mask[height // 4 : height // 2, width // 8 : (3 * width) // 4] = True
    model, processor = load_trained(str(models[family]))
    _, side = mask_frame(model)
    reshaped, size, _ = _frame(family, models, images / names[0], side)
    logits = mask_to_logits(mask, reshaped, size, side)
    back = post_process_masks(processor, logits[None, None, None], torch.tensor([[height, width]]),
                              torch.tensor([reshaped]))[0][0, 0].numpy()  # fmt: skip
    assert (back & mask).sum() / (back | mask).sum() > 0.9
    if family == "sam":  # the padding is background
        assert (logits[:, -1] < 0).all() if reshaped[1] < size[1] else (logits[-1] < 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_clicks_reach_the_model_and_the_encoder_runs_once_per_image(family, models, data, spy, tmp_path):
    """Per instance: its box and clicks with their labels, in the model's input frame, one decoder row each;
    multimask for a single click alone; one encoder call per image however many groups of prompts."""
    images, names, sizes = data
    height, width = sizes[names[0]]
    box = [1, 2, width - 3, height // 2]
    inside = [width // 2, height // 4]
    instances = [
        {"id": 0, "box": box},
        {"id": 1, "box": box, "points": [inside], "labels": [1]},
        {"id": 2, "points": [inside, [1, 1]], "labels": [1, 0]},
        {"id": 3, "points": [inside], "labels": [1]},
        {"id": 4, "box": box, "points": [inside], "labels": [0]},
    ]
    prompts = {names[0]: {"instances": instances}, names[1]: [[0, 0, 10, 10]]}
    out = tmp_path / "clicks.json"
    results = _run(models[family], images, prompts, out, "--save-logits")
    assert spy.encoder_calls == 2
    assert [(r["file_name"], r["instance_id"]) for r in results] == [(names[0], n) for n in range(5)] + [(names[1], 0)]
    calls = spy.prompts[:4]  # the first image: one call per kind of prompt
    assert [tuple(c.get("input_points", torch.zeros(0, 1, 0, 2)).shape) for c in calls] == [
        (0, 1, 0, 2), (2, 1, 1, 2), (1, 1, 2, 2), (1, 1, 1, 2)]  # fmt: skip
    assert [c["input_labels"].tolist() for c in calls[1:]] == [[[[1]], [[0]]], [[[1, 0]]], [[[1]]]]
    assert [tuple(c["input_boxes"].shape) if "input_boxes" in c else None for c in calls] == [
        (1, 1, 4), (2, 1, 4), None, None]  # fmt: skip
    assert spy.multimask[:4] == [False, False, False, True]  # best of three for the single click alone
    _, processor = load_trained(str(models[family]))
    expected = processor(images=predict_module.read_rgb(images / names[0]), input_points=[[[inside]]],
                         input_labels=[[[1]]], return_tensors="pt")["input_points"]  # fmt: skip
    torch.testing.assert_close(calls[1]["input_points"][:1].float(), expected.float().reshape(1, 1, 1, 2))
    logits = _logits(out)
    # a click changes the mask of the box it is added to, and its label counts (a random model's masks do not
    # follow the click's sign: that is for a trained one)
    assert not torch.allclose(logits[(names[0], 0)], logits[(names[0], 1)], atol=1e-3)
    assert not torch.allclose(logits[(names[0], 1)], logits[(names[0], 4)], atol=1e-3)
    assert (mask_utils.decode(results[3]["segmentation"]).shape) == (height, width)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    status = cli.main(["predict", *argv])
    return status, capsys.readouterr().err


def test_two_rounds_through_the_command_line(tiny_sam_dir, data, tmp_path, capsys):
    """Round 1 boxes, round 2 the same boxes with a negative click on one instance, from round 1's output."""
    images, names, sizes = data
    (tmp_path / "p1.json").write_text(json.dumps({name: [[0, 0, 20, 20], [5, 5, 40, 30]] for name in names}))
    argv = ["--model", str(tiny_sam_dir), "--images", str(images), "--save-logits"]
    status, err = _cli([*argv, "--prompts", str(tmp_path / "p1.json"), "--output", str(tmp_path / "r1.json")], capsys)
    assert status == 0, err
    round1 = json.loads((tmp_path / "r1.json").read_text())
    assert [r["instance_id"] for r in round1] == [0, 1, 0, 1]
    second = {
        name: {"instances": [{"id": 0, "box": [0, 0, 20, 20]},
                             {"id": 1, "box": [5, 5, 40, 30], "points": [[10, 10]], "labels": [0]}]}
        for name in names
    }  # fmt: skip
    (tmp_path / "p2.json").write_text(json.dumps(second))
    status, err = _cli([*argv, "--prompts", str(tmp_path / "p2.json"), "--previous", str(tmp_path / "r1.json"),
                        "--output", str(tmp_path / "r2.json")], capsys)  # fmt: skip
    assert status == 0, err
    round2 = json.loads((tmp_path / "r2.json").read_text())
    assert [(r["file_name"], r["instance_id"]) for r in round2] == [(r["file_name"], r["instance_id"]) for r in round1]
    assert set(_logits(tmp_path / "r2.json")) == {(r["file_name"], r["instance_id"]) for r in round2}
    # round 3 from round 2, written over it (a tool keeps one file per image set)
    status, err = _cli([*argv, "--prompts", str(tmp_path / "p2.json"), "--previous", str(tmp_path / "r2.json"),
                        "--output", str(tmp_path / "r2.json")], capsys)  # fmt: skip
    assert status == 0, err
    assert len(json.loads((tmp_path / "r2.json").read_text())) == len(round2)


def test_bad_round_inputs_are_one_line(tiny_sam_dir, models, data, tmp_path, capsys):
    images, names, sizes = data
    name = names[0]
    previous = tmp_path / "r1.json"
    (tmp_path / "p1.json").write_text(json.dumps({name: [[0, 0, 20, 20]]}))
    base = ["--model", str(tiny_sam_dir), "--images", str(images)]
    assert _cli([*base, "--prompts", str(tmp_path / "p1.json"), "--output", str(previous), "--save-logits"],
                capsys)[0] == 0  # fmt: skip
    out = tmp_path / "out.json"

    def refused(prompts, *extra: str, names: tuple[str, ...]) -> None:
        path = tmp_path / "p.json"
        path.write_text(json.dumps(prompts))
        status, err = _cli([*base, "--prompts", str(path), "--output", str(out), *extra], capsys)
        assert status == 2, err
        lines = [line for line in err.splitlines() if line.startswith("samtune")]  # not the loading bars
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("samtune predict: error: "), err
        for word in names:
            assert word in lines[0], (word, err)
        assert not out.exists() and not logits_file(out).exists()

    p = str(tmp_path / "p.json")
    refused({name: {"instances": [{"id": 0, "points": [[3, 3]]}]}}, names=(p, repr(name), "instance 0", '"labels"'))
    refused({name: {"instances": [{"id": 0, "points": [[3, 3]], "labels": [2]}]}}, names=(p, "instance 0", "label 2"))
    refused({name: {"instances": [{"id": 0, "points": [[3, 3]], "labels": [1, 0]}]}}, names=(p, "one label per"))
    refused({name: {"instances": [{"id": 0}]}}, names=(p, "instance 0", '"box" or "points"'))
    refused({name: {"instances": [{"id": 0, "box": [0, 0, 9, 9]}, {"id": 0, "box": [0, 0, 5, 5]}]}},
            names=(p, "given twice"))  # fmt: skip
    # round 2 names instance 7, not 0 which --previous holds for this image
    refused({name: {"instances": [{"id": 7, "box": [0, 0, 20, 20]}]}}, "--previous", str(previous),
            names=(str(previous), repr(name), "instance 0", "not among"))  # fmt: skip
    refused({names[1]: [[0, 0, 5, 5]]}, "--previous", str(previous), names=(str(previous), "none of its images"))
    # logits of another model's size
    model = load_trained(str(tiny_sam_dir))[0]
    results = json.loads(previous.read_text())
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(results))
    save_logits(logits_file(wrong), results, [torch.zeros(16, 16) for _ in results], model)
    refused({name: [[0, 0, 20, 20]]}, "--previous", str(wrong),
            names=(str(logits_file(wrong)), repr(name), "instance 0", "16x16"))  # fmt: skip
    # SAM's logits (padded frame) for a SAM 2 model
    status, err = _cli(["--model", str(models["sam2"]), "--images", str(images), "--prompts",
                        str(tmp_path / "p1.json"), "--previous", str(previous), "--output", str(out)],
                       capsys)  # fmt: skip
    assert status == 2 and str(logits_file(previous)) in err and "frame" in err and not out.exists(), err
    # a results file without instance ids (evaluate's, or an older predict's)
    for result in results:
        del result["instance_id"]
    wrong.write_text(json.dumps(results))
    refused({name: [[0, 0, 20, 20]]}, "--previous", str(wrong), names=(str(wrong), "result 0", "instance_id"))
    status, err = _cli([*base, "--previous", str(previous), "--output", str(out)], capsys)
    assert status == 2 and "--previous needs --prompts or --coco" in err
