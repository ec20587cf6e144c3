"""An image through the processor and the image encoder once: any number of prompts decode from the result
(``samtune.predict`` for prompts, ``samtune.automatic_masks`` for its point grids, the app while an image is
shown)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from samtune.models.family import decoder_inputs, image_features


class Encoded(NamedTuple):
    """One image through the processor and the image encoder: all that decoding its prompts needs."""

    inputs: dict  # the processor's output (pixel_values, original_sizes, reshaped_input_sizes for SAM / SAM-HQ)
    reshaped: tuple[int, int]  # the image's size inside the model's input frame
    scale: torch.Tensor  # original pixels -> input frame: (x, y) factors
    features: dict  # decoder_inputs(image_features(...)): what the decoder takes in place of pixel_values


@torch.no_grad()
def encode_image(model, processor, image: np.ndarray, device) -> Encoded:
    """The processor and the image encoder, once per image: any number of prompts decode from the result."""
    inputs = processor(images=image, return_tensors="pt")
    pixel_values = inputs["pixel_values"]
    if "reshaped_input_sizes" in inputs:
        reshaped = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
    else:  # SAM 2 / 3: the image fills the square
        reshaped = tuple(pixel_values.shape[-2:])
    original = tuple(int(v) for v in inputs["original_sizes"][0])
    scale = torch.tensor([reshaped[1] / original[1], reshaped[0] / original[0]])
    features = decoder_inputs(model, image_features(model, pixel_values.to(device)))
    return Encoded(inputs, reshaped, scale, features)
