"""Overlays: fills with outlines, boxes, clicks, text labels, panels side by side; predict draws them."""

from __future__ import annotations

import numpy as np
import torch

from samtune.visualize import (
    colour_of,
    draw_box,
    draw_masks,
    line_width,
    outline,
    paint,
    side_by_side,
    write,
)


def _square(size: int = 40, top: int = 10, side: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, top : top + side] = True
    return mask


def test_outline_is_the_border_inside_the_mask():
    mask = _square()
    edge = outline(mask)
    assert edge.sum() == 4 * 12 - 4  # the square's perimeter, one pixel wide
    assert not (edge & ~mask).any()
    assert edge[10, 15] and edge[21, 15] and not edge[15, 15]
    thick = outline(mask, width=2)
    assert thick.sum() == 12 * 12 - 8 * 8
    assert not outline(np.zeros((5, 5), bool)).any()
    touching = np.ones((6, 6), bool)  # a mask filling the image: its border is the image's
    assert outline(touching).sum() == 20


def test_draw_box_and_write():
    image = np.zeros((30, 40, 3), np.uint8)
    boxed = draw_box(image, [5, 6, 20, 25], (255, 0, 0))
    drawn = boxed.any(axis=2)
    assert drawn[6, 5:21].all() and drawn[25, 5:21].all() and drawn[6:26, 5].all() and drawn[6:26, 20].all()
    assert drawn.sum() == 2 * 16 + 2 * 18  # the rectangle's outline only
    assert not image.any()  # a copy
    labelled = write(np.zeros((60, 120, 3), np.uint8), (200, 200), "cat 0.93", (0, 0, 200), size=12)
    changed = labelled.any(axis=2)
    ys, xs = np.nonzero(changed)
    assert xs.max() == 119 and ys.max() == 59  # pushed back inside the image
    assert (labelled.min(axis=2) > 150).sum() > 10  # white (antialiased) glyphs on the blue label


def test_draw_masks_fills_outlines_prompts_and_texts():
    image = np.full((60, 80, 3), 100, np.uint8)
    masks = np.stack([np.pad(_square(60, 10, 12), ((0, 0), (0, 20))), np.pad(_square(60, 30, 20), ((0, 0), (0, 20)))])
    plain = paint(image, masks, 0.4)
    out = draw_masks(image, masks, texts=["", ""])
    assert tuple(out[15, 15]) == tuple(plain[15, 15])  # inside: the fill
    assert tuple(out[10, 15]) == colour_of(0) and tuple(out[30, 40]) == colour_of(1)  # border: the outline
    assert tuple(out[5, 70]) == (100, 100, 100)  # outside: the image
    with_prompts = draw_masks(
        image, masks, boxes=[[2, 2, 50, 50], None], points=[np.array([[60, 55, 1]]), None], texts=["a 0.50", "b"]
    )
    assert tuple(with_prompts[2, 30]) == colour_of(0)  # the box's top edge
    assert tuple(with_prompts[55, 60]) == (0, 200, 0)  # the positive click
    assert (with_prompts[2:20, 2:40].min(axis=2) > 150).sum() > 10  # "a 0.50": white glyphs at the box's corner
    assert line_width((4000, 3000)) == 8 and line_width((100, 100)) == 1


def test_side_by_side_titles_each_panel():
    a, b = np.zeros((50, 30, 3), np.uint8), np.full((50, 40, 3), 9, np.uint8)
    out = side_by_side([a, b], ["base", "fine-tuned"])
    assert out.shape[1] == 30 + 4 + 40 and out.shape[0] > 50
    bar = out.shape[0] - 50
    assert (out[bar:, :30] == 0).all() and (out[bar:, 34:] == 9).all() and (out[:, 30:34] == 255).all()
    assert (out[:bar, :30] < 128).any() and (out[:bar, 34:] < 128).any()  # dark title text on white


def test_overlay_panel_draws_box_prompts_and_titles(coco, processor):
    """Training panels: ground truth | prediction, outlined, the box prompts on the prediction; titled on request."""
    from samtune.config import DataConfig
    from samtune.data.coco import CocoInstanceDataset
    from samtune.data.dataset import SamPromptDataset, make_loader
    from samtune.visualize import overlay_panel

    dataset = SamPromptDataset(CocoInstanceDataset(*coco), processor, DataConfig(prompt="box"), train=False)
    batch = next(b for b in make_loader(dataset, 1, shuffle=False) if b["valid"].any())
    logits = torch.full((1, batch["valid"].shape[1], 32, 32), -10.0)  # an empty prediction: only the boxes show
    height, width = (int(v) for v in batch["reshaped_input_sizes"][0])
    plain = overlay_panel(batch, 0, logits, processor, boxes=False)
    boxed = overlay_panel(batch, 0, logits, processor)
    assert plain.shape == boxed.shape == (height, 2 * width + 4, 3)
    x0, y0, x1, y1 = (int(round(float(v))) for v in batch["input_boxes"][0, 0])
    assert tuple(boxed[y0, width + 4 + (x0 + x1) // 2]) == colour_of(0)
    assert (boxed[:, :width] == plain[:, :width]).all()  # the ground truth half has no prompts drawn
    titled = overlay_panel(batch, 0, logits, processor, titles=("truth", "prediction"))
    assert titled.shape[1] == 2 * width + 4 and titled.shape[0] > height
