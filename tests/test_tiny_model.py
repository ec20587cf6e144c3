import torch
from transformers import SamModel, SamProcessor

from samtune.models.architectures import tiny_sam_config


def test_saved_like_a_hub_checkpoint(tiny_sam_dir):
    names = {p.name for p in tiny_sam_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names
    assert not any(name.endswith(".bin") for name in names)  # safetensors only


def test_processor_matches_model_geometry(processor, tiny_sam):
    config = tiny_sam.config
    assert processor.image_processor.size["longest_edge"] == config.vision_config.image_size
    embedding = config.vision_config.image_size // config.vision_config.patch_size
    assert processor.image_processor.mask_pad_size["height"] == 4 * embedding


def test_forward_shapes_and_working_initialisation(tiny_sam, processor):
    torch.manual_seed(0)
    image = (torch.rand(90, 120, 3) * 255).to(torch.uint8).numpy()
    inputs = processor(images=image, input_boxes=[[[10, 10, 60, 50], [70, 20, 110, 80]]], return_tensors="pt")
    out = tiny_sam(
        pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(), multimask_output=False
    )
    embedding = tiny_sam.config.vision_config.image_size // tiny_sam.config.vision_config.patch_size
    assert out.pred_masks.shape == (1, 2, 1, 4 * embedding, 4 * embedding)
    assert out.iou_scores.shape == (1, 2, 1)
    # The default SamVisionConfig.initializer_range (1e-10) gives an encoder whose output is ~0.
    embeddings = tiny_sam.get_image_embeddings(inputs["pixel_values"])
    assert embeddings.std() > 1e-2


def test_gradients_reach_the_image_encoder(tiny_sam_dir):
    model = SamModel.from_pretrained(tiny_sam_dir)
    processor = SamProcessor.from_pretrained(tiny_sam_dir)
    image = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    inputs = processor(images=image, input_boxes=[[[5, 5, 40, 40]]], return_tensors="pt")
    out = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(), multimask_output=False)
    out.pred_masks.sum().backward()
    grad = model.vision_encoder.layers[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().max() > 1e-6


def test_same_seed_same_weights(tmp_path):
    from samtune.testing.tiny import save_tiny_sam

    a = SamModel.from_pretrained(save_tiny_sam(tmp_path / "a", seed=1))
    b = SamModel.from_pretrained(save_tiny_sam(tmp_path / "b", seed=1))
    c = SamModel.from_pretrained(save_tiny_sam(tmp_path / "c", seed=2))
    key = "vision_encoder.layers.0.attn.qkv.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    assert tiny_sam_config().vision_config.image_size == 128
