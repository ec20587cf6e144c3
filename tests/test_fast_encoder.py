"""The fast image encoder computes what plain SamModel computes: outputs, gradients, precisions, layouts, switches."""

from __future__ import annotations

import pytest
import torch
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamMLPBlock, SamVisionAttention, SamVisionSdpaAttention

import samtune.models.fast_encoder as fast
from samtune.config import ModelConfig, PeftConfig
from samtune.models.architectures import preset_config, save_random_sam, tiny_sam_config
from samtune.models.loading import base_model, build_model, load_sam, load_trained
from samtune.models.methods import apply_method

FP32_REL = 1e-4  # the bound: max |fast - plain| / max |plain| in float32
SMALL_TILES = 2**13  # forces many tiles per layer: about 20 query rows of one head at these sizes


def _config(name: str, image_size: int):
    """A preset's widths, heads and window at a small input, with one windowed and one global layer."""
    config = tiny_sam_config(image_size=image_size) if name == "tiny" else preset_config(name, image_size)
    vision = config.vision_config
    vision.num_hidden_layers, vision.global_attn_indexes = 2, [1]
    if name == "tiny":
        vision.window_size = 3  # grids of 8 or 10 are not multiples of 3: the windows are padded
    # decoder weights large enough that masks depend on the image, small enough not to amplify rounding
    # (0.2 at the presets' decoder width 256 turns 1e-6 differences of the embeddings into 1e-4 in the IoU)
    config.initializer_range = 0.2 if name == "tiny" else 0.05
    return config


# (preset, input size): grids of 14 / 16 / 10 tokens against windows of 14 / 14 / 3: one exact window, and
# windows padded at the bottom and right edges
CASES = [("vit-b", 224), ("slimsam-77", 256), ("tiny", 160)]


def _random_rel_pos(model: SamModel, seed: int = 0) -> None:
    # transformers initialises the relative-position tables to zero, which would leave the bias untested
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _ in CASES])
def model_dir(request, tmp_path_factory):
    name, size = request.param
    folder = tmp_path_factory.mktemp(name)
    save_random_sam(_config(name, size), folder, seed=1)
    model = SamModel.from_pretrained(folder)
    _random_rel_pos(model)
    model.save_pretrained(folder)
    return folder


def _inputs(model: SamModel, seed: int = 0, points: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, side, side, generator=generator)
    corners = torch.rand(2, 3, 2, 2, generator=generator) * (side - 1)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    return {"pixel_values": pixels, "input_boxes": boxes}


def _load(folder, fast_encoder: bool, **kwargs) -> SamModel:
    model, _ = load_sam(ModelConfig(str(folder), fast_encoder=fast_encoder, **kwargs))
    return model


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _forward(model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        embeddings = model.get_image_embeddings(inputs["pixel_values"])
        out = model(image_embeddings=embeddings, input_boxes=inputs["input_boxes"], multimask_output=False)
    return embeddings, out.pred_masks, out.iou_scores


@pytest.mark.parametrize("tiles", [fast.TILE_ELEMENTS, SMALL_TILES], ids=["default-tiles", "small-tiles"])
def test_outputs_match_plain_sam_in_fp32(model_dir, tiles, monkeypatch):
    monkeypatch.setattr(fast, "TILE_ELEMENTS", tiles)
    plain, quick = _load(model_dir, False), _load(model_dir, True)
    inputs = _inputs(plain)
    want, got = _forward(plain, inputs), _forward(quick, inputs)
    assert want[0].abs().max() > 1e-2 and want[1].std() > 1e-2  # outputs that depend on the input
    for g, w in zip(got, want):
        assert _rel(g, w) < FP32_REL


@pytest.mark.parametrize(
    "layout",
    [{"window_size": 0}, {"global_attn_indexes": []}, {"use_rel_pos": False}, {"qkv_bias": False}],
    ids=["all-global", "all-windowed", "no-rel-pos", "no-qkv-bias"],
)
def test_other_layouts_match_plain_sam(layout, tmp_path):
    config = _config("tiny", 160)
    for key, value in layout.items():
        setattr(config.vision_config, key, value)
    save_random_sam(config, tmp_path, seed=2)
    plain, quick = _load(tmp_path, False), _load(tmp_path, True)
    _random_rel_pos(plain)
    quick.load_state_dict(plain.state_dict())
    inputs = _inputs(plain)
    for got, want in zip(_forward(quick, inputs), _forward(plain, inputs)):
        assert _rel(got, want) < FP32_REL


def test_bias_is_exercised(model_dir):
    # zeroing the relative-position tables must change the output by far more than the fp32 tolerance, or the
    # equality above would not see a wrong bias
    model = _load(model_dir, True)
    inputs = _inputs(model)
    before = _forward(model, inputs)[0]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name:
                parameter.zero_()
    assert _rel(_forward(model, inputs)[0], before) > 10 * FP32_REL


def _lora_grads(
    model_dir, fast_encoder: bool, method: str = "lora", checkpointing: bool = False, autocast=None, compile=""
):
    torch.manual_seed(0)
    model, _ = build_model(
        ModelConfig(str(model_dir), fast_encoder=fast_encoder, gradient_checkpointing=checkpointing, compile=compile),
        PeftConfig(method=method, targets="encoder-attn-mlp", dropout=0.0, rank=4),
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B, so the A matrices get gradients too
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.train()
    inputs = _inputs(base_model(model), seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        out = model(**inputs, multimask_output=False)
        loss = out.pred_masks.float().sigmoid().mean() + out.iou_scores.float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss.item()


def _assert_grads_match(got: dict, want: dict, rel: float) -> None:
    """Each gradient within ``rel`` of its own max; gradients that are zero in exact arithmetic (the key bias
    under softmax) are held to ``rel`` of a thousandth of the largest gradient instead."""
    assert got.keys() == want.keys() and any("vision_encoder." in n for n in want)
    largest = max(w.abs().max().item() for w in want.values())
    for name in want:
        scale = max(want[name].abs().max().item(), 1e-3 * largest)
        assert (got[name] - want[name]).abs().max().item() < rel * scale, name


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_gradients_match_plain_sam(model_dir, method, monkeypatch):
    monkeypatch.setattr(fast, "TILE_ELEMENTS", SMALL_TILES)
    want, want_loss = _lora_grads(model_dir, False, method)
    got, got_loss = _lora_grads(model_dir, True, method)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    _assert_grads_match(got, want, FP32_REL)


def test_full_fine_tuning_gradients_match_plain_sam(model_dir):
    grads = []
    for fast_encoder in (False, True):
        model = _load(model_dir, fast_encoder)
        model.train()
        out = model(**_inputs(model, seed=3), multimask_output=False)
        out.pred_masks.sigmoid().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert any("rel_pos_h" in n for n in grads[0])  # the tables themselves get gradients
    _assert_grads_match(grads[1], grads[0], FP32_REL)


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    want, _ = _lora_grads(model_dir, False)
    got, _ = _lora_grads(model_dir, True, checkpointing=True)
    _assert_grads_match(got, want, FP32_REL)


def test_bf16_adapter_gradients_are_close(model_dir):
    want, _ = _lora_grads(model_dir, False, autocast=torch.bfloat16)
    got, _ = _lora_grads(model_dir, True, autocast=torch.bfloat16)
    assert got.keys() == want.keys()
    # gradient vectors of each adapter: cosine similarity, since bf16 rounding differs entry by entry
    for name in want:
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten().float(), want[name].flatten().float(), 0)
        assert cosine > 0.98, (name, cosine)


@pytest.mark.parametrize("precision", ["autocast-bf16", "weights-bf16", "weights-fp16"])
def test_half_precision_is_as_close_to_fp32_as_plain_sam(model_dir, precision):
    """Stated tolerance: image embeddings within 2% of fp32 (max-norm), and every output's error versus fp32 at
    most 1.5x plain SamModel's own error in the same precision (the decoder amplifies rounding either way)."""
    plain = _load(model_dir, False)
    reference = _forward(plain, _inputs(plain))
    dtype = torch.float16 if precision.endswith("fp16") else torch.bfloat16
    errors = {}
    for fast_encoder in (False, True):
        if precision.startswith("weights"):
            model = _load(model_dir, fast_encoder, dtype=str(dtype).removeprefix("torch."))
            inputs = {k: v.to(dtype) for k, v in _inputs(model).items()}
        else:
            model, inputs = _load(model_dir, fast_encoder), _inputs(plain)
        with torch.autocast("cpu", dtype=dtype, enabled=precision.startswith("autocast")):
            outputs = _forward(model, inputs)
        assert outputs[0].dtype == dtype  # the precision really was used
        errors[fast_encoder] = [_rel(g, w) for g, w in zip(outputs, reference)]
    assert errors[True][0] < 0.02, errors
    for plain_error, fast_error in zip(errors[False], errors[True]):
        assert fast_error <= 1.5 * plain_error + 1e-3, errors


def test_switch_keeps_modules_and_weights(model_dir):
    plain, quick = _load(model_dir, False), _load(model_dir, True)
    attention = [m for m in plain.modules() if isinstance(m, SamVisionAttention)]
    assert attention and all(type(m) is SamVisionSdpaAttention for m in attention)
    assert all(type(m) is fast.FastSamVisionSdpaAttention for m in quick.modules() if isinstance(m, SamVisionAttention))
    assert fast.uses_fast_encoder(quick) and not fast.uses_fast_encoder(plain)
    assert list(quick.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in quick.named_modules()] == [n for n, _ in plain.named_modules()]
    # the encoder's MLP blocks switch too, the mask decoder's (ReLU) stay transformers'
    encoder_mlps = [n for n, m in quick.named_modules() if type(m) is fast.FastSamMLPBlock]
    layers = plain.config.vision_config.num_hidden_layers
    assert len(encoder_mlps) == layers and all(n.startswith("vision_encoder.") for n in encoder_mlps)
    assert any(type(m) is SamMLPBlock for n, m in quick.named_modules() if n.startswith("mask_decoder."))
    assert fast.disable_fast_encoder(quick) == len(attention) + layers and not fast.uses_fast_encoder(quick)
    assert all(type(m) is SamVisionSdpaAttention for m in quick.modules() if isinstance(m, SamVisionAttention))
    assert not any(type(m) is fast.FastSamMLPBlock for m in quick.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_mlp_matches_the_original(dtype):
    """lin1 + GELU as one oneDNN call in inference; with gradients, or a wrapped lin1, the original path."""
    config = preset_config("vit-b", 224).vision_config
    plain = SamMLPBlock(config).to(dtype).eval()
    quick = SamMLPBlock(config).to(dtype).eval()
    quick.load_state_dict(plain.state_dict())
    quick.__class__ = fast.FastSamMLPBlock  # what enable_fast_encoder does to the encoder's MLP blocks
    x = torch.randn(2, 7, 9, config.hidden_size).to(dtype)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[3])
            return original(*args)

    import unittest.mock

    with unittest.mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", Spy()):
        with torch.no_grad():
            want, got = plain(x), quick(x)
        assert calls == ["gelu"]  # the fused primitive ran, with GELU as its post-op
        bound = FP32_REL if dtype == torch.float32 else 0.02  # bf16: one rounding less than the original
        assert got.dtype == dtype and _rel(got, want) < bound
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast over fp32 weights
            assert quick.float()(x.float()).dtype == torch.bfloat16
        calls.clear()
        quick(x.float().requires_grad_()).sum().backward()  # gradients: the original path
        assert calls == []
        with torch.no_grad():  # fp32 below the width where fusing pays: the original path too
            narrow = fast.FastSamMLPBlock(preset_config("slimsam-77", 224).vision_config).float().eval()
            narrow(torch.randn(1, 4, 4, narrow.lin1.in_features))
            assert narrow.lin1.in_features < fast.FUSE_FP32_MIN_WIDTH and calls == []
            narrow.to(torch.bfloat16)(torch.randn(1, 4, 4, narrow.lin1.in_features, dtype=torch.bfloat16))
            assert calls == ["gelu"]


def test_knob_reaches_the_command_line_and_load_trained(tiny_sam_dir):
    from samtune.config import load_config

    assert ModelConfig().fast_encoder is True
    assert load_config(overrides={"model.fast_encoder": "false"}).model.fast_encoder is False
    assert fast.uses_fast_encoder(load_trained(tiny_sam_dir)[0])
    assert not fast.uses_fast_encoder(load_trained(tiny_sam_dir, fast_encoder=False)[0])


def test_eager_attention_weights_come_from_the_original(tiny_sam_dir):
    inputs = {"pixel_values": torch.randn(1, 3, 128, 128)}
    outputs = []
    for fast_encoder in (False, True):
        model = _load(tiny_sam_dir, fast_encoder, attn_implementation="eager").eval()
        assert fast.uses_fast_encoder(model) is fast_encoder
        with torch.no_grad():
            outputs.append(model.vision_encoder(**inputs, output_attentions=True))
    assert len(outputs[1].attentions) == len(outputs[0].attentions) == 2
    for got, want in zip(outputs[1].attentions, outputs[0].attentions):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(outputs[1].last_hidden_state, outputs[0].last_hidden_state)


def test_save_and_merge_unchanged(tiny_sam_dir, tmp_path):
    # an adapter trained on the fast path merges and reloads into a plain SamModel with the same outputs
    model, processor = build_model(ModelConfig(str(tiny_sam_dir)), PeftConfig(method="lora", targets="encoder-attn"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    plain = SamModel.from_pretrained(tmp_path / "merged")
    assert not fast.uses_fast_encoder(plain)
    inputs = _inputs(plain)
    for got, want in zip(_forward(merged, inputs), _forward(plain, inputs)):
        assert _rel(got, want) < FP32_REL


def test_quantised_base_trains_like_plain(model_dir):
    # on the preset-shaped configs: the 32-wide tiny test model's bf16 gradients are noise-dominated (its own bf16
    # gradients point 0.5-0.8 cosine away from fp32's), below any bar that tells the two encoders apart
    pytest.importorskip("bitsandbytes")
    want, _ = _lora_grads(model_dir, False, method="qlora")
    got, _ = _lora_grads(model_dir, True, method="qlora")
    assert got.keys() == want.keys()
    for name in want:  # 4-bit layers compute in bf16 on a CPU: compare directions
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten().float(), want[name].flatten().float(), 0)
        assert cosine > 0.98, (name, cosine)


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "one-call"])
def test_rel_pos_attention_matches_the_formula(tiled, monkeypatch):
    # the kernel alone, uneven shapes, many tiles, against softmax(q k^T s + bias) v in float64; "one-call" is
    # the path taken on GPUs, run here on the CPU
    monkeypatch.setattr(fast, "_tiled", lambda q: tiled)
    torch.manual_seed(0)
    groups, height, width, dim = 3, 5, 7, 8
    tensors = [torch.randn(groups, height * width, n, dtype=torch.float64) for n in (dim, dim, dim, height, width)]

    def reference(q, k, v, rel_h, rel_w):
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
        return torch.softmax(q @ k.transpose(1, 2) * 0.3 + bias, -1) @ v

    want_inputs = [t.clone().requires_grad_() for t in tensors]
    want = reference(*want_inputs)
    grad = torch.randn_like(want)
    want.backward(grad)
    for tiles in (fast.TILE_ELEMENTS, 64):
        fast.TILE_ELEMENTS, saved = tiles, fast.TILE_ELEMENTS
        try:
            got_inputs = [t.float().requires_grad_() for t in tensors]
            got = fast.rel_pos_attention(*got_inputs, 0.3)
            got.backward(grad.float())
            with torch.no_grad():
                no_grad = fast.rel_pos_attention(*[t.float() for t in tensors], 0.3)
        finally:
            fast.TILE_ELEMENTS = saved
        assert _rel(got, want) < 1e-5 and _rel(no_grad, want) < 1e-5
        for g, w in zip(got_inputs, want_inputs):
            assert _rel(g.grad, w.grad) < 1e-5


def test_apply_method_after_loading_keeps_fast_attention(tiny_sam_dir):
    model = apply_method(_load(tiny_sam_dir, True), PeftConfig(method="lora", targets="encoder-attn"))
    attention = [m for m in model.modules() if isinstance(m, SamVisionAttention)]
    assert attention and all(isinstance(m, fast.FastSamVisionSdpaAttention) for m in attention)
    assert all(type(m.qkv).__module__.startswith("peft") for m in attention)  # LoRA wraps qkv, we call it


def test_compiled_encoder_trains_like_plain_sam(tiny_sam_dir):
    """model.compile: the encoder compiled in place (the aot_eager backend traces forward and backward as
    inductor does, without a C++ build), adapters injected after it included; keys unchanged."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    want, want_loss = _lora_grads(tiny_sam_dir, False)
    got, got_loss = _lora_grads(tiny_sam_dir, True, compile="aot_eager")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really traced the encoder
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    _assert_grads_match(got, want, FP32_REL)
    compiled = _load(tiny_sam_dir, True, compile="aot_eager")
    assert compiled.vision_encoder._compiled_call_impl is not None
    assert compiled.state_dict().keys() == _load(tiny_sam_dir, False).state_dict().keys()


# SAM-HQ: the same ViT under its own generated classes; its encoder also returns the global layers' outputs


def _tiny_sam_hq_config():
    from transformers import SamHQConfig
    from transformers.models.sam_hq.configuration_sam_hq import (
        SamHQMaskDecoderConfig,
        SamHQPromptEncoderConfig,
        SamHQVisionConfig,
    )

    vision = SamHQVisionConfig(
        hidden_size=32,
        output_channels=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=128,
        patch_size=16,
        window_size=3,  # the 8 x 8 grid is not a multiple of 3: padded windows
        global_attn_indexes=[1],
        mlp_dim=64,
        num_pos_feats=16,
        initializer_range=0.05,
    )
    prompt = SamHQPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = SamHQMaskDecoderConfig(
        hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32, vit_dim=32
    )
    return SamHQConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, initializer_range=0.2
    )


@pytest.fixture(scope="module")
def sam_hq_dir(tmp_path_factory):
    from transformers import SamHQModel

    folder = tmp_path_factory.mktemp("sam-hq")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = SamHQModel(_tiny_sam_hq_config())
    _random_rel_pos(model)
    model.save_pretrained(folder)
    return folder


def _sam_hq(folder, fast_encoder: bool, attn_implementation: str = "sdpa"):
    from transformers import SamHQModel

    model = SamHQModel.from_pretrained(folder, attn_implementation=attn_implementation)
    if fast_encoder:
        assert fast.enable_fast_encoder(model) == 2 * model.config.vision_config.num_hidden_layers
    return model


def _forward_hq(model, inputs) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        embeddings, intermediate = model.get_image_embeddings(inputs["pixel_values"])
        out = model(
            image_embeddings=embeddings,
            intermediate_embeddings=intermediate,
            input_boxes=inputs["input_boxes"],
            multimask_output=False,
        )
    return [embeddings, *intermediate, out.pred_masks, out.iou_scores]


@pytest.mark.parametrize(
    ("attention", "tiles"), [("sdpa", 2**10), ("eager", fast.TILE_ELEMENTS)], ids=["sdpa-small-tiles", "eager"]
)
def test_sam_hq_outputs_match_plain(sam_hq_dir, attention, tiles, monkeypatch):
    monkeypatch.setattr(fast, "TILE_ELEMENTS", tiles)
    plain, quick = _sam_hq(sam_hq_dir, False, attention), _sam_hq(sam_hq_dir, True, attention)
    assert fast.uses_fast_encoder(quick) and not fast.uses_fast_encoder(plain)
    inputs = _inputs(plain)
    want, got = _forward_hq(plain, inputs), _forward_hq(quick, inputs)
    # image embedding, one intermediate embedding (global layer 1), masks, IoU
    assert len(want) == len(got) == 4 and want[1].shape == (2, 8, 8, 32)
    assert want[0].abs().max() > 1e-2 and want[1].abs().max() > 1e-2 and want[2].std() > 1e-2
    for g, w in zip(got, want):
        assert _rel(g, w) < FP32_REL


def test_sam_hq_lora_gradients_match_plain(sam_hq_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(fast, "TILE_ELEMENTS", 2**10)
    grads, losses = [], []
    for fast_encoder in (False, True):
        torch.manual_seed(0)
        targets = r"vision_encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(lin1|lin2))"
        model = get_peft_model(_sam_hq(sam_hq_dir, False), LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
        assert fast.fast_encoder_applies(model)  # through the PeftModel wrapper
        if fast_encoder:  # on the PeftModel: the swap reaches through the wrapper and LoRA's layers
            assert fast.enable_fast_encoder(model) == 4
        assert fast.uses_fast_encoder(model) is fast_encoder
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # non-zero B, so the A matrices get gradients too
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model.train()
        out = model(**_inputs(model.base_model.model, seed=2), multimask_output=False)
        loss = out.pred_masks.sigmoid().mean() + out.iou_scores.mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert len(grads[0]) == 2 * 2 * 4  # A and B of 4 layers in each of the 2 encoder layers
    _assert_grads_match(grads[1], grads[0], FP32_REL)


def test_sam_hq_switch_keeps_modules_and_weights(sam_hq_dir):
    from transformers.models.sam_hq.modeling_sam_hq import SamHQMLPBlock, SamHQVisionSdpaAttention

    plain, quick = _sam_hq(sam_hq_dir, False), _sam_hq(sam_hq_dir, True)
    assert fast.fast_encoder_applies(plain) and fast.fast_encoder_applies(quick)
    assert list(quick.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in quick.named_modules()] == [n for n, _ in plain.named_modules()]
    switched = {n: type(m) for n, m in quick.named_modules() if type(m).__name__.startswith("Fast")}
    assert switched == {
        **{f"vision_encoder.layers.{i}.attn": fast.FastSamHQVisionSdpaAttention for i in range(2)},
        **{f"vision_encoder.layers.{i}.mlp": fast.FastSamHQMLPBlock for i in range(2)},
    }
    # the HQ mask decoder's MLP blocks (ReLU) stay transformers'
    assert any(type(m) is SamHQMLPBlock for n, m in quick.named_modules() if n.startswith("mask_decoder."))
    assert fast.disable_fast_encoder(quick) == 4 and not fast.uses_fast_encoder(quick)
    assert all(type(quick.get_submodule(n)) in (SamHQVisionSdpaAttention, SamHQMLPBlock) for n in switched)


# families whose image encoder is not SAM's ViT: the fast encoder does not apply


def _tiny_sam2():
    from transformers import Sam2Config, Sam2Model
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    hiera = Sam2HieraDetConfig(
        hidden_size=16,
        num_attention_heads=1,
        image_size=[128, 128],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=hiera,
        backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        fpn_hidden_size=32,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return Sam2Model(Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))


def _tiny_sam3_tracker():
    from transformers import Sam3TrackerConfig, Sam3TrackerModel
    from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig
    from transformers.models.sam3_tracker.configuration_sam3_tracker import (
        Sam3TrackerMaskDecoderConfig,
        Sam3TrackerPromptEncoderConfig,
    )

    vit = Sam3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=112,
        patch_size=14,
        window_size=4,
        global_attn_indexes=[1],
        pretrain_image_size=56,
    )
    vision = Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]
    )
    prompt = Sam3TrackerPromptEncoderConfig(hidden_size=32, image_size=112, patch_size=14, mask_input_channels=4)
    decoder = Sam3TrackerMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return Sam3TrackerModel(
        Sam3TrackerConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    )


@pytest.mark.parametrize("build", [_tiny_sam2, _tiny_sam3_tracker], ids=["sam2", "sam3-tracker"])
def test_other_families_are_left_alone(build):
    from peft import LoraConfig, get_peft_model

    model = build()
    before = [(n, type(m)) for n, m in model.named_modules()]
    assert not fast.fast_encoder_applies(model)
    assert fast.enable_fast_encoder(model) == 0 and not fast.uses_fast_encoder(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=r".*mask_decoder.*\.q_proj"))
    assert not fast.fast_encoder_applies(wrapped) and fast.enable_fast_encoder(wrapped) == 0


def test_sam_applies_also_wrapped(tiny_sam_dir):
    model = apply_method(_load(tiny_sam_dir, False), PeftConfig(method="lora", targets="encoder-attn"))
    assert fast.fast_encoder_applies(model) and not fast.uses_fast_encoder(model)
    assert fast.enable_fast_encoder(model) == 4 and fast.uses_fast_encoder(model)
