"""Methods: exactly which weights train, that one step moves only those, save -> load and merge reproduce outputs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import SamModel

from samtune.config import ConfigError, ModelConfig, PeftConfig, load_config
from samtune.errors import UserError
from samtune.models.loading import base_model, build_model, load_trained, merge_adapter, save_trained
from samtune.models.methods import ModelConfigError, target_regex

ATOL = 1e-5  # float32 outputs of models that should be identical up to summation order


def _inputs(processor, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(80, 110, 3), dtype=np.uint8)
    inputs = processor(images=image, input_boxes=[[[5, 8, 60, 50], [40, 20, 100, 75]]], return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "input_boxes": inputs["input_boxes"].float()}


def _outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs, multimask_output=False)
    return out.pred_masks.float(), out.iou_scores.float()


def _step(model, inputs, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out = model(**inputs, multimask_output=False)
    loss = out.pred_masks.float().sigmoid().mean() + out.iou_scores.float().mean()
    loss.backward()
    moving = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    optimizer.step()
    optimizer.zero_grad()
    return moving


def _clean(name):
    return name.removeprefix("base_model.model.")


def _expected_lora_modules(model, targets):
    """Independent of the regexes: which module names each preset should adapt."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    enc = [n for n in names if n.startswith("vision_encoder.layers.")]
    dec = [n for n in names if n.startswith("mask_decoder.transformer.")]
    pick = {
        "encoder-attn": [n for n in enc if n.endswith((".attn.qkv", ".attn.proj"))],
        "encoder-attn-mlp": [n for n in enc if n.endswith((".attn.qkv", ".attn.proj", ".mlp.lin1", ".mlp.lin2"))],
        "decoder-attn": [n for n in dec if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))],
        "all-linear": [n for n in names if n.startswith(("vision_encoder.", "mask_decoder."))],
        "peft-sam": [n for n in enc if n.endswith(".attn.qkv")] + [n for n in dec if n.endswith(("q_proj", "v_proj"))],
    }
    return set(pick[targets])


@pytest.mark.parametrize("method", ["full", "decoder", "none"])
def test_plain_methods_train_exactly_their_weights(tiny_sam_dir, method):
    model, _ = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method=method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    everything = {n for n, _ in model.named_parameters()}
    expected = {
        "full": everything,
        "decoder": {n for n in everything if n.startswith("mask_decoder.")},
        "none": set(),
    }[method]
    assert trainable == expected


@pytest.mark.parametrize("targets", ["peft-sam", "encoder-attn", "encoder-attn-mlp", "decoder-attn", "all-linear"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_sit_exactly_on_the_preset_targets(tiny_sam_dir, tiny_sam, method, targets):
    model, _ = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method=method, targets=targets))
    trainable = {_clean(n) for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert adapted == _expected_lora_modules(tiny_sam, targets)
    kinds = {n.split(".lora_")[1].split(".")[0] for n in trainable}
    assert kinds == ({"A", "B", "magnitude_vector"} if method == "dora" else {"A", "B"})


def test_bare_names_and_bad_regexes_are_refused(tiny_sam):
    with pytest.raises(ModelConfigError, match="matches no linear layer"):
        target_regex(tiny_sam, "lin1")
    with pytest.raises(ModelConfigError, match="neither a preset nor a valid regex"):
        target_regex(tiny_sam, "vision_encoder.(")
    custom = target_regex(tiny_sam, r"mask_decoder\.transformer\.layers\.0\.self_attn\.q_proj")
    assert custom == r"mask_decoder\.transformer\.layers\.0\.self_attn\.q_proj"


def test_train_modules_beside_adapters(tiny_sam_dir):
    spec = PeftConfig(method="lora", targets="encoder-attn", train_modules=["decoder-heads"])
    model, _ = build_model(ModelConfig(str(tiny_sam_dir)), spec)
    trainable = {_clean(n) for n, p in model.named_parameters() if p.requires_grad}
    full = {n for n in trainable if ".lora_" not in n}
    assert full and all(".modules_to_save." in n for n in full)
    heads = {n.split(".modules_to_save.")[0] for n in full}
    assert heads == {"mask_decoder.iou_prediction_head"} | {
        f"mask_decoder.output_hypernetworks_mlps.{i}" for i in range(4)
    }
    with pytest.raises(ModelConfigError, match="no module named 'mask_decoder.nothing'"):
        build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method="lora", train_modules=["mask_decoder.nothing"]))


def test_unworkable_settings_are_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match="peft.method: expected one of 'lora', 'dora'.*got 'ia3'"):
        load_config(overrides={"peft.method": "ia3"})
    with pytest.raises(ConfigError, match="unknown config key 'peft.bits'"):  # 4-bit is the only quantised base
        load_config(overrides={"peft.method": "qlora", "peft.bits": 8})
    with pytest.raises(ConfigError, match="peft.rank must be at least 1, got 0"):
        load_config(overrides={"peft.method": "lora", "peft.rank": 0})


@pytest.mark.parametrize("method", ["lora", "dora", "full", "decoder"])
def test_one_step_moves_only_trainable_weights_and_save_load_reproduces(tiny_sam_dir, tmp_path, method):
    model, processor = build_model(
        ModelConfig(str(tiny_sam_dir)),
        PeftConfig(method=method, train_modules=["decoder-heads"] if method == "lora" else []),
    )
    inputs = _inputs(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moving = _step(model, inputs)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # exactly the weights with a gradient move, and only trainable ones have one
    assert changed == moving and changed <= trainable
    must_move = {
        "lora": ".lora_B.",
        "dora": ".lora_B.",
        "decoder": "mask_decoder.transformer.",
        "full": "vision_encoder.layers.",
    }[method]
    assert {n for n in trainable if must_move in n} <= changed
    if method == "full":
        assert any(n.startswith("mask_decoder.") for n in changed)
    expected = _outputs(model, inputs)

    folder = save_trained(model, processor, tmp_path / "saved")
    if method in ("lora", "dora"):
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(SamModel.from_pretrained(tiny_sam_dir), folder)
    else:
        reloaded = SamModel.from_pretrained(folder)
    assert (folder / "processor_config.json").exists()
    for got, want in zip(_outputs(reloaded, inputs), expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_gives_a_plain_sammodel_with_the_same_outputs(tiny_sam_dir, tmp_path, method):
    model, processor = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method=method, targets="all-linear"))
    inputs = _inputs(processor, seed=1)
    _step(model, inputs)
    _step(model, inputs)  # second step: lora_A moves too
    adapter = save_trained(model, processor, tmp_path / "adapter")
    expected = _outputs(model, inputs)
    merged = merge_adapter(tiny_sam_dir, adapter, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    plain = SamModel.from_pretrained(merged)
    assert set(plain.state_dict()) == set(SamModel.from_pretrained(tiny_sam_dir).state_dict())
    for got, want in zip(_outputs(plain, inputs), expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # and it loads where PEFT is not installed at all
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import SamModel\n"
        f"m = SamModel.from_pretrained({str(merged)!r}); print(type(m).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("SamModel")


@pytest.mark.parametrize("method", ["qlora", "qdora"])
def test_quantised_adapters_train_evaluate_train_and_merge_into_full_precision(tiny_sam_dir, tmp_path, method):
    import bitsandbytes as bnb

    spec = PeftConfig(method=method, targets="encoder-attn-mlp")
    model, processor = build_model(ModelConfig(str(tiny_sam_dir)), spec)
    layer = bnb.nn.Linear4bit
    assert any(isinstance(m, layer) for m in model.modules())
    inputs = _inputs(processor, seed=2)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    _step(model, inputs)
    masks, scores = _outputs(model, inputs)  # an evaluation pass between training steps
    assert torch.isfinite(masks).all() and torch.isfinite(scores).all()
    _step(model, inputs)
    moved = [n for n, p in model.named_parameters() if ".lora_B." in n and not torch.equal(p, lora_b[n])]
    assert moved
    adapter = save_trained(model, processor, tmp_path / "adapter")
    merged = SamModel.from_pretrained(merge_adapter(tiny_sam_dir, adapter, tmp_path / "merged"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # the merge went into the full-precision base: it matches the fp32 base with the adapter applied
    reference, _ = load_trained(tiny_sam_dir, adapter)
    for got, want in zip(_outputs(merged, inputs), _outputs(reference, inputs)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_export_cli_uses_the_recorded_base(tiny_sam_dir, tmp_path):
    from samtune.export import main as export

    model, processor = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method="lora"))
    inputs = _inputs(processor, seed=3)
    _step(model, inputs)
    _step(model, inputs)
    adapter = save_trained(model, processor, tmp_path / "adapter")
    out = export(["--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    for got, want in zip(_outputs(SamModel.from_pretrained(out), inputs), _outputs(model, inputs)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="neither a PEFT adapter folder"):
        export(["--adapter", str(tmp_path), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sam_dir, method):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = ModelConfig(str(tiny_sam_dir), gradient_checkpointing=checkpointing)
        model, processor = build_model(spec, PeftConfig(method=method, targets="encoder-attn-mlp", dropout=0.0))
        assert base_model(model).vision_encoder.gradient_checkpointing is checkpointing
        model.train()
        out = model(**_inputs(processor, seed=4), multimask_output=False)
        out.pred_masks.float().sigmoid().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_eager_and_sdpa_attention_agree(tiny_sam_dir):
    outputs = []
    for attention in ("sdpa", "eager"):
        model, processor = build_model(
            ModelConfig(str(tiny_sam_dir), attn_implementation=attention), PeftConfig(method="none")
        )
        assert model.config._attn_implementation == attention
        outputs.append(_outputs(model, _inputs(processor)))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
