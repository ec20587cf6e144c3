"""--format onnx: image encoder and prompt decoder graphs that onnxruntime runs to the merged model's masks and IoU
(fp32 within 1e-4) for points, boxes as two corners, mask prompts and any number of points; int8 within a stated
tolerance; a missing extra is one line."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForMaskGeneration

from samtune.errors import UserError
from samtune.export import export
from samtune.export.onnx import OPSET, PROMPT_INPUTS, export_onnx, session
from samtune.models.loading import load_trained
from samtune.testing.tiny import save_tiny

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# int8 image encoder against the fp32 merged model on the tiny SAM (logits span about +-1.5): largest mask-logit and
# IoU-score differences allowed, and the least IoU between the two binary masks
INT8_LOGIT_ERROR = 0.15
INT8_MASK_IOU = 0.95


def _onnx_outputs(folder, pixels, prompts, suffix=""):
    encoder = session(folder / f"image_encoder{suffix}.onnx")
    decoder = session(folder / "prompt_decoder.onnx")
    features = encoder.run(None, {"pixel_values": pixels.numpy()})
    names = [i.name for i in encoder.get_outputs()]
    outputs = []
    for coords, labels, mask in prompts:
        grid = decoder.get_inputs()[len(names) + 2].shape[-1]
        mask_input = mask if mask is not None else np.zeros((1, 1, grid, grid), np.float32)
        feed = dict(zip(names, features))
        feed.update(
            point_coords=np.array([coords], np.float32),
            point_labels=np.array([labels], np.int64),
            mask_input=mask_input,
            has_mask_input=np.array([float(mask is not None)], np.float32),
        )
        outputs.append(decoder.run(None, feed))
    return outputs


def _reference(model, pixels, coords, labels, box, mask, multimask):
    """transformers' own forward with the same prompts (points with their padding, or a box)."""
    kwargs = {}
    if box is not None:
        kwargs["input_boxes"] = torch.tensor([[box]])
    if coords:
        kwargs["input_points"] = torch.tensor([[coords]])
        kwargs["input_labels"] = torch.tensor([[labels]])
    if mask is not None:
        kwargs["input_masks"] = torch.from_numpy(mask)
    with torch.no_grad():
        out = model(pixel_values=pixels, multimask_output=multimask, **kwargs)
    return out.pred_masks[0], out.iou_scores[0]


def _cases(size, pad_after_box):
    """(onnx points, onnx labels, hf points, hf labels, hf box): SAM's ONNX convention against transformers'."""
    box = [0.1 * size, 0.2 * size, 0.7 * size, 0.8 * size]
    corners = [[box[0], box[1]], [box[2], box[3]]]
    after_box = ([[0.0, 0.0]], [-1]) if pad_after_box else ([], [])
    one = [[0.4 * size, 0.5 * size]]
    five = [[0.1 * size * i, 0.15 * size * i + 3] for i in range(1, 6)]
    return [
        (one + [[0.0, 0.0]], [1, -1], one, [1], None),
        (five + [[0.0, 0.0]], [1, 0, 1, 1, 0, -1], five, [1, 0, 1, 1, 0], None),
        (corners + after_box[0], [2, 3] + after_box[1], [], [], box),
    ]


def _check(folder, model, multimask=False, suffix="", atol=TOLERANCE["atol"]):
    size = model.config.prompt_encoder_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    cases = _cases(size, pad_after_box=model.config.model_type != "sam" and model.config.model_type != "sam_hq")
    prompts = [(c, lab, None) for c, lab, *_ in cases]
    outputs = _onnx_outputs(folder, pixels, prompts, suffix)
    errors = []
    for (masks, iou), (_, _, points, labels, box) in zip(outputs, cases):
        expected_masks, expected_iou = _reference(model, pixels, points, labels, box, None, multimask)
        assert masks.shape == tuple(expected_masks.shape)
        errors.append(float(np.abs(masks - expected_masks.numpy()).max()))
        both, either = (masks > 0) & (expected_masks.numpy() > 0), (masks > 0) | (expected_masks.numpy() > 0)
        assert both.sum() >= INT8_MASK_IOU * either.sum()
        torch.testing.assert_close(torch.from_numpy(masks), expected_masks, atol=atol, rtol=TOLERANCE["rtol"])
        torch.testing.assert_close(torch.from_numpy(iou), expected_iou, atol=atol, rtol=TOLERANCE["rtol"])
    # a mask prompt: the previous answer's logits fed back
    previous = outputs[0][0][:, :1]
    ((masks, _),) = _onnx_outputs(folder, pixels, [(cases[0][0], cases[0][1], previous)], suffix)
    expected, _ = _reference(model, pixels, cases[0][2], cases[0][3], None, previous, multimask)
    torch.testing.assert_close(torch.from_numpy(masks), expected, atol=atol, rtol=TOLERANCE["rtol"])
    assert np.abs(masks - outputs[0][0]).max() > 10 * TOLERANCE["atol"]  # the mask prompt changed the answer
    return max(errors)


@pytest.fixture(scope="module")
def lora_sam(tiny_sam_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights (as after training) on the tiny SAM, exported as ONNX with int8."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["qkv", "q_proj", "v_proj", "lin1"], init_lora_weights=False)
    adapter = tmp_path_factory.mktemp("lora")
    get_peft_model(AutoModelForMaskGeneration.from_pretrained(tiny_sam_dir), config).save_pretrained(adapter)
    out = export(adapter, tmp_path_factory.mktemp("onnx"), fmt="onnx", base=str(tiny_sam_dir), quantize="int8")
    model, _ = load_trained(tiny_sam_dir, adapter, fast_encoder=False)
    return out, model.merge_and_unload().eval()


def test_sam_lora_onnx_equals_the_merged_model(lora_sam):
    folder, model = lora_sam
    _check(folder, model)
    graph = onnx.load(folder / "prompt_decoder.onnx")
    assert {o.domain: o.version for o in graph.opset_import}[""] == OPSET
    assert [i.name for i in graph.graph.input][-4:] == list(PROMPT_INPUTS)
    assert "prompt_decoder.onnx" in (folder / "README.md").read_text()


def test_sam_int8_within_tolerance(lora_sam):
    folder, model = lora_sam
    error = _check(folder, model, suffix=".int8", atol=INT8_LOGIT_ERROR)
    assert error > 1e-4  # quantised for real: not the fp32 graph again
    graph = onnx.load(folder / "image_encoder.int8.onnx").graph
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert "DynamicQuantizeLinear" in {node.op_type for node in graph.node}


# one export of each other family (about 30 s each on 2 CPU cores): SAM's above keeps the default suite's share small
@pytest.mark.slow
@pytest.mark.parametrize("model_type, multimask", [("sam2", False), ("sam_hq", True), ("sam3_tracker", False)])
def test_other_families_onnx_equal_their_model(tmp_path, model_type, multimask):
    model = AutoModelForMaskGeneration.from_pretrained(save_tiny(tmp_path / "model", model_type)).eval()
    if model_type == "sam_hq":
        from samtune.models.sam_hq_decoder_fix import fix_sam_hq_decoder

        fix_sam_hq_decoder(model)
    export_onnx(model, None, tmp_path, multimask=multimask)
    _check(tmp_path, model, multimask=multimask)


def test_missing_extra_is_one_line(tiny_sam_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if samtune[onnx] were not installed
    with pytest.raises(UserError, match=r"pip install 'samtune\[onnx\]'"):
        export(tiny_sam_dir, tmp_path / "out", fmt="onnx")


@pytest.mark.slow  # one more ONNX export (about 30 s)
def test_onnx_latency_benchmark_quick(tmp_path, monkeypatch):
    """benchmarks/onnx_latency.py --quick: the shared report, ratios that agree with the timings, fp32 within 1e-4
    of PyTorch and int8 within the tolerance above."""
    from test_benchmarks import BENCHMARKS, check_report

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_onnx_latency", BENCHMARKS / "onnx_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        rows = module.main(["--quick", "--threads", "1", "--json", str(tmp_path / "o.json")])
    finally:
        torch.set_num_threads(threads)
    check_report(tmp_path / "o.json", rows, "onnx_latency", device="cpu")
    by_row = {row["row"]: row for row in rows}
    assert set(by_row) == {"pytorch", "pytorch-fast", "onnx-fp32", "onnx-int8"}
    fp32, int8 = by_row["onnx-fp32"], by_row["onnx-int8"]
    assert fp32["mask_logit_max_abs_error"] < 1e-4 and fp32["mask_iou_vs_pytorch"] == 1.0
    assert 1e-4 < int8["mask_logit_max_abs_error"] < INT8_LOGIT_ERROR and int8["mask_iou_vs_pytorch"] > INT8_MASK_IOU
    pytorch = by_row["pytorch"]["encoder_median_ms"]
    assert fp32["encoder_vs_pytorch"] == pytest.approx(pytorch / fp32["encoder_median_ms"])
