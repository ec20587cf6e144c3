"""The training loss: per-instance Dice + focal + IoU-head MSE, best-of-M masks, padding, crowd pixels, image means."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from samtune.losses import InstanceLoss, batch_loss

SIDE = 8
KEYS = ("loss", "dice", "focal", "iou_mse")
# MONAI defaults (DiceLoss / MaskedDiceLoss: smooth_nr = smooth_dr = 1e-5; FocalLoss: gamma = 2, alpha = None).
SMOOTH_NR = SMOOTH_DR = 1e-5
GAMMA = 2.0


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_masks(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=_generator(seed)) > 0.5


def _confident(targets: torch.Tensor, scale: float = 8.0) -> torch.Tensor:
    """Logits that predict ``targets`` (bool) exactly at threshold 0."""
    return scale * (targets.float() * 2 - 1)


def _batch(valid, masks, ignore) -> dict:
    return {"valid": valid, "low_res_masks": masks, "low_res_ignore": ignore}


def _outputs(pred_masks, iou_scores, grad: bool = False) -> SimpleNamespace:
    if grad:
        pred_masks = pred_masks.clone().requires_grad_(True)
        iou_scores = iou_scores.clone().requires_grad_(True)
    return SimpleNamespace(pred_masks=pred_masks, iou_scores=iou_scores)


def _single(loss_fn, logits, target, keep, iou_pred) -> dict[str, torch.Tensor]:
    """InstanceLoss of one instance and one mask, as scalars."""
    out = loss_fn(logits[None], target[None], keep[None], torch.as_tensor(iou_pred, dtype=torch.float32).reshape(1))
    return {name: value[0] for name, value in out.items()}


def _assert_same(a: dict, b: dict, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    for name in KEYS:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _ref_dice(logits, target, keep) -> float:
    p = torch.sigmoid(logits.double()) * keep.double()
    t = target.double() * keep.double()
    return float(1 - (2 * (p * t).sum() + SMOOTH_NR) / (p.sum() + t.sum() + SMOOTH_DR))


def _ref_focal(logits, target, keep) -> float:
    p = torch.sigmoid(logits.double())
    pt = torch.where(target, p, 1 - p)
    per_pixel = -((1 - pt) ** GAMMA) * torch.log(pt)
    return float((per_pixel * keep.double()).sum() / keep.double().sum())


def _ref_iou(logits, target, keep) -> float:
    predicted = (logits > 0) & keep
    truth = target & keep
    union = (predicted | truth).sum()
    return float((predicted & truth).sum() / union) if union else 1.0


# 1. Best of three masks.


def test_each_instance_trains_only_its_best_of_three_masks():
    loss_fn = InstanceLoss()
    count, candidates = 3, 3
    targets = _random_masks((1, count, SIDE, SIDE), seed=1)
    ignore = torch.zeros(1, SIDE, SIDE, dtype=torch.bool)
    ignore[0, :2, :3] = True
    logits = torch.randn(1, count, candidates, SIDE, SIDE, generator=_generator(2)) * 2
    scores = torch.rand(1, count, candidates, generator=_generator(3))
    best = [2, 0, 1]  # a different matching candidate per instance
    for k, c in enumerate(best):
        logits[0, k, c] = _confident(targets[0, k])
    outputs = _outputs(logits, scores, grad=True)
    batch = _batch(torch.ones(1, count, dtype=torch.bool), targets, ignore)

    out = batch_loss(outputs, batch, loss_fn)

    keep = ~ignore[0]
    chosen = [_single(loss_fn, logits[0, k, c], targets[0, k], keep, scores[0, k, c]) for k, c in enumerate(best)]
    # The matching candidate is the strict minimum for every instance (so the test exercises the selection).
    for k, c in enumerate(best):
        others = [_single(loss_fn, logits[0, k, o], targets[0, k], keep, scores[0, k, o]) for o in range(candidates)]
        assert min(range(candidates), key=lambda o, others=others: float(others[o]["loss"])) == c
    expected = {name: torch.stack([item[name] for item in chosen]).mean() for name in KEYS}
    _assert_same(out, expected)

    out["loss"].backward()
    mask_grad, score_grad = outputs.pred_masks.grad[0], outputs.iou_scores.grad[0]
    for k, c in enumerate(best):
        for other in range(candidates):
            if other == c:
                assert mask_grad[k, other].abs().sum() > 0
                assert score_grad[k, other] != 0
            else:
                assert torch.equal(mask_grad[k, other], torch.zeros(SIDE, SIDE)), (k, other)
                assert score_grad[k, other] == 0, (k, other)


def test_single_mask_loss_of_the_chosen_candidate_matches_a_one_mask_batch():
    """With M = 3, the loss equals the loss of a batch holding only each instance's chosen candidate (M = 1)."""
    loss_fn = InstanceLoss()
    targets = _random_masks((2, 2, SIDE, SIDE), seed=11)
    valid = torch.tensor([[True, True], [True, False]])
    ignore = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    logits = torch.randn(2, 2, 3, SIDE, SIDE, generator=_generator(12)) * 2
    scores = torch.rand(2, 2, 3, generator=_generator(13))
    best = {(0, 0): 1, (0, 1): 2, (1, 0): 0, (1, 1): 0}
    for (b, k), c in best.items():
        logits[b, k, c] = _confident(targets[b, k])
    index = torch.tensor([[best[0, 0], best[0, 1]], [best[1, 0], best[1, 1]]])
    one_logits = logits.gather(2, index[..., None, None, None].expand(-1, -1, 1, SIDE, SIDE))
    one_scores = scores.gather(2, index[..., None])

    batch = _batch(valid, targets, ignore)
    _assert_same(
        batch_loss(_outputs(logits, scores), batch, loss_fn),
        batch_loss(_outputs(one_logits, one_scores), batch, loss_fn),
    )


# 2. Padding.


def _padding_case():
    """Two images, K = 3 real slots; image 0 has 3 valid instances, image 1 has 1 (two padded slots)."""
    valid = torch.tensor([[True, True, True], [True, False, False]])
    targets = _random_masks((2, 3, SIDE, SIDE), seed=21) & valid[..., None, None]
    ignore = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    ignore[1, 4:, 4:] = True
    logits = torch.randn(2, 3, 3, SIDE, SIDE, generator=_generator(22))
    scores = torch.rand(2, 3, 3, generator=_generator(23))
    return valid, targets, ignore, logits, scores


def test_padded_instances_change_neither_loss_nor_gradients():
    loss_fn = InstanceLoss()
    valid, targets, ignore, logits, scores = _padding_case()
    clean = batch_loss(_outputs(logits, scores), _batch(valid, targets, ignore), loss_fn)

    # Garbage (large, finite) logits, scores and targets in the padded slots, plus two extra padded slots.
    extra = 2
    garbage = torch.randn(2, 3 + extra, 3, SIDE, SIDE, generator=_generator(24)) * 50
    garbage_scores = torch.randn(2, 3 + extra, 3, generator=_generator(25)) * 50
    padded_valid = torch.cat([valid, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    padded_targets = _random_masks((2, 3 + extra, SIDE, SIDE), seed=26)
    padded_logits, padded_scores = garbage.clone(), garbage_scores.clone()
    padded_logits[padded_valid] = logits[valid]
    padded_scores[padded_valid] = scores[valid]
    padded_targets[padded_valid] = targets[valid]
    outputs = _outputs(padded_logits, padded_scores, grad=True)

    out = batch_loss(outputs, _batch(padded_valid, padded_targets, ignore), loss_fn)
    _assert_same(out, clean, rtol=0, atol=0)

    out["loss"].backward()
    pad = ~padded_valid
    assert torch.equal(outputs.pred_masks.grad[pad], torch.zeros_like(outputs.pred_masks.grad[pad]))
    assert torch.equal(outputs.iou_scores.grad[pad], torch.zeros_like(outputs.iou_scores.grad[pad]))
    assert outputs.pred_masks.grad[padded_valid].abs().sum() > 0


def test_padding_equals_the_batch_without_padded_rows():
    """Image 1 alone (its one valid instance, no padding) gives the same loss as inside the padded batch."""
    loss_fn = InstanceLoss()
    valid, targets, ignore, logits, scores = _padding_case()
    garbage = logits.clone()
    garbage[1, 1:] = torch.randn(2, 3, SIDE, SIDE, generator=_generator(27)) * 40
    full = batch_loss(_outputs(garbage, scores), _batch(valid, targets, ignore), loss_fn)
    first = batch_loss(_outputs(garbage[:1], scores[:1]), _batch(valid[:1], targets[:1], ignore[:1]), loss_fn)
    second = batch_loss(
        _outputs(garbage[1:, :1], scores[1:, :1]), _batch(valid[1:, :1], targets[1:, :1], ignore[1:]), loss_fn
    )
    _assert_same(full, {name: (first[name] + second[name]) / 2 for name in KEYS})


# 3. Crowd pixels.


def test_crowd_pixels_are_ignored_by_dice_focal_and_iou():
    loss_fn = InstanceLoss()
    targets = _random_masks((1, 2, SIDE, SIDE), seed=31)
    ignore = torch.zeros(1, SIDE, SIDE, dtype=torch.bool)
    ignore[0, 2:6, 1:5] = True
    valid = torch.ones(1, 2, dtype=torch.bool)
    logits = _confident(targets)[:, :, None] + torch.randn(1, 2, 1, SIDE, SIDE, generator=_generator(32)) * 0.5
    scores = torch.tensor([[[0.9], [0.7]]])

    crowd = ignore[:, None, None].expand_as(logits)
    changed_logits = torch.where(crowd, -logits * 5, logits)  # flips every prediction on crowd pixels
    changed_targets = torch.where(ignore[:, None], ~targets, targets)

    base = batch_loss(_outputs(logits, scores), _batch(valid, targets, ignore), loss_fn)
    for new_logits, new_targets in ((changed_logits, targets), (logits, changed_targets)):
        outputs = _outputs(new_logits, scores, grad=True)
        out = batch_loss(outputs, _batch(valid, new_targets, ignore), loss_fn)
        _assert_same(out, base, rtol=0, atol=0)
        out["loss"].backward()
        grad = outputs.pred_masks.grad
        assert torch.equal(grad[crowd], torch.zeros_like(grad[crowd]))
        assert grad[~crowd].abs().sum() > 0

    # The perturbation is large enough to change every term were the pixels not ignored.
    no_ignore = torch.zeros_like(ignore)
    plain = batch_loss(_outputs(logits, scores), _batch(valid, targets, no_ignore), loss_fn)
    for new_logits, new_targets in ((changed_logits, targets), (logits, changed_targets)):
        out = batch_loss(_outputs(new_logits, scores), _batch(valid, new_targets, no_ignore), loss_fn)
        for name in KEYS:
            assert abs(float(out[name]) - float(plain[name])) > 1e-3, name


# 4. Per-image mean.


def test_batch_loss_is_the_mean_over_images_of_the_mean_over_instances():
    loss_fn = InstanceLoss()
    valid = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
    targets = _random_masks((3, 3, SIDE, SIDE), seed=41)
    ignore = torch.zeros(3, SIDE, SIDE, dtype=torch.bool)
    # Image 0's instance is predicted almost perfectly; image 1's are poor: per-image and per-instance means differ.
    logits = torch.randn(3, 3, 1, SIDE, SIDE, generator=_generator(42)) * 3
    logits[0, 0, 0] = _confident(targets[0, 0])
    logits[2] = torch.randn(3, 1, SIDE, SIDE, generator=_generator(43)) * 30  # no valid instance: must not count
    scores = torch.rand(3, 3, 1, generator=_generator(44))
    keep = torch.ones(SIDE, SIDE, dtype=torch.bool)

    out = batch_loss(_outputs(logits, scores), _batch(valid, targets, ignore), loss_fn)

    single = {
        (b, k): _single(loss_fn, logits[b, k, 0], targets[b, k], keep, scores[b, k, 0])
        for b, k in valid.nonzero().tolist()
    }
    first = single[0, 0]
    second = {name: torch.stack([single[1, k][name] for k in range(3)]).mean() for name in KEYS}
    expected = {name: (first[name] + second[name]) / 2 for name in KEYS}
    _assert_same(out, expected)

    per_instance = torch.stack([item["loss"] for item in single.values()]).mean()
    over_three_images = (first["loss"] + second["loss"]) / 3
    assert abs(float(out["loss"]) - float(per_instance)) > 0.1
    assert abs(float(out["loss"]) - float(over_three_images)) > 0.1

    # Dropping the image with no valid instance leaves the loss unchanged.
    two = batch_loss(_outputs(logits[:2], scores[:2]), _batch(valid[:2], targets[:2], ignore[:2]), loss_fn)
    _assert_same(out, two)


# 5. Reference values and weights.


def test_dice_focal_and_iou_match_hand_written_formulas():
    logits = torch.randn(3, SIDE, SIDE, generator=_generator(51)) * 2
    targets = _random_masks((3, SIDE, SIDE), seed=52)
    targets[2] = False  # an empty target
    keep = torch.ones(3, SIDE, SIDE, dtype=torch.bool)
    keep[1, :3] = False  # some crowd pixels on one instance
    iou_pred = torch.tensor([0.2, 0.5, 0.9])

    out = InstanceLoss(dice_weight=1.0, focal_weight=20.0, iou_weight=1.0)(logits, targets, keep, iou_pred)
    for n in range(3):
        dice = _ref_dice(logits[n], targets[n], keep[n])
        focal = _ref_focal(logits[n], targets[n], keep[n])
        iou_mse = (float(iou_pred[n]) - _ref_iou(logits[n], targets[n], keep[n])) ** 2
        assert float(out["dice"][n]) == pytest.approx(dice, abs=1e-6)
        assert float(out["focal"][n]) == pytest.approx(focal, abs=1e-6)
        assert float(out["iou_mse"][n]) == pytest.approx(iou_mse, abs=1e-6)
        assert float(out["loss"][n]) == pytest.approx(dice + 20 * focal + iou_mse, abs=1e-5)


def test_hand_computed_small_example():
    """A 2 x 2 example worked out by hand: logits (0, ln 3 | -ln 3, 0), target (1, 1 | 0, 0)."""
    ln3 = torch.log(torch.tensor(3.0)).item()
    logits = torch.tensor([[[0.0, ln3], [-ln3, 0.0]]])
    targets = torch.tensor([[[True, True], [False, False]]])
    keep = torch.ones(1, 2, 2, dtype=torch.bool)
    out = InstanceLoss()(logits, targets, keep, torch.tensor([0.0]))
    # p = (1/2, 3/4 | 1/4, 1/2): sum p t = 5/4, sum p = 2, sum t = 2.
    dice = 1 - (2 * 1.25 + 1e-5) / (4 + 1e-5)
    # pt = (1/2, 3/4 | 3/4, 1/2); focal = -(1 - pt)^2 log pt, mean over the 4 pixels.
    ln2, ln43 = torch.log(torch.tensor(2.0)).item(), torch.log(torch.tensor(4 / 3)).item()
    focal = (2 * 0.25 * ln2 + 2 * 0.0625 * ln43) / 4
    # Predicted (logits > 0): only the top-right pixel; IoU = 1 / 2.
    assert float(out["dice"][0]) == pytest.approx(dice, abs=1e-6)
    assert float(out["focal"][0]) == pytest.approx(focal, abs=1e-6)
    assert float(out["iou_mse"][0]) == pytest.approx(0.25, abs=1e-6)


def test_weights_combine_linearly():
    logits = torch.randn(4, SIDE, SIDE, generator=_generator(53)) * 2
    targets = _random_masks((4, SIDE, SIDE), seed=54)
    keep = torch.ones(4, SIDE, SIDE, dtype=torch.bool)
    keep[:, 0] = False
    iou_pred = torch.rand(4, generator=_generator(55))

    parts = InstanceLoss()(logits, targets, keep, iou_pred)
    for weights in ((2.0, 3.0, 0.0), (0.0, 0.0, 5.0), (1.0, 20.0, 1.0), (0.5, 0.0, 2.0)):
        out = InstanceLoss(*weights)(logits, targets, keep, iou_pred)
        expected = weights[0] * parts["dice"] + weights[1] * parts["focal"] + weights[2] * parts["iou_mse"]
        torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
        for name in ("dice", "focal", "iou_mse"):  # the parts do not depend on the weights
            torch.testing.assert_close(out[name], parts[name], rtol=0, atol=0)


# 6. IoU threshold.


def test_true_iou_thresholds_logits_at_zero():
    """The IoU target uses logits > 0 (equivalently sigmoid > 0.5): a 0.5 threshold applied to the logits, or a
    0 threshold applied to the probabilities, would each give a different target here."""
    targets = torch.zeros(1, SIDE, SIDE, dtype=torch.bool)
    targets[0, :2] = True  # 16 target pixels
    logits = torch.full((1, SIDE, SIDE), -4.0)
    logits[0, 0] = 0.3  # in (0, 0.5): predicted at logits > 0, not at logits > 0.5
    logits[0, 1] = 2.0  # confidently predicted under any threshold
    logits[0, 2] = 0.55  # 8 false positives under both logit thresholds
    logits[0, 3, :4] = 0.4  # 4 false positives at logits > 0, not at logits > 0.5
    keep = torch.ones(1, SIDE, SIDE, dtype=torch.bool)
    # logits > 0: predicted = rows 0-2 + 4 px = 28, inter = 16, union = 28 -> IoU 16/28.
    # logits > 0.5 (0.5 used on logits): predicted = rows 1-2 = 16, inter = 8, union = 24 -> IoU 1/3.
    # probabilities > 0 (threshold 0 on sigmoid): everything predicted -> IoU 16/64.
    at_zero, at_half, on_probs = 16 / 28, 8 / 24, 16 / 64
    assert _ref_iou(logits[0], targets[0], keep[0]) == pytest.approx(at_zero)
    for iou_pred in (at_zero, at_half, on_probs):
        out = InstanceLoss()(logits, targets, keep, torch.tensor([iou_pred]))
        assert float(out["iou_mse"][0]) == pytest.approx((iou_pred - at_zero) ** 2, abs=1e-6)
    out = InstanceLoss()(logits, targets, keep, torch.tensor([at_zero]))
    assert float(out["iou_mse"][0]) == pytest.approx(0.0, abs=1e-9)


def test_true_iou_ignores_crowd_pixels_and_is_one_for_empty_prediction_and_target():
    targets = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    targets[0, :2] = True
    logits = torch.full((2, SIDE, SIDE), -3.0)
    logits[0, :2] = 3.0
    logits[0, 5:] = 3.0  # false positives, all on crowd pixels
    keep = torch.ones(2, SIDE, SIDE, dtype=torch.bool)
    keep[0, 5:] = False
    out = InstanceLoss()(logits, targets, keep, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out["iou_mse"], torch.zeros(2), rtol=0, atol=1e-9)


# 7. Accumulation.


def test_four_image_batch_equals_mean_of_its_two_halves():
    loss_fn = InstanceLoss()
    valid = torch.tensor(
        [[True, False, False], [True, True, True], [True, True, False], [True, False, False]], dtype=torch.bool
    )
    targets = _random_masks((4, 3, SIDE, SIDE), seed=71) & valid[..., None, None]
    ignore = _random_masks((4, SIDE, SIDE), seed=72) & (torch.rand(4, SIDE, SIDE, generator=_generator(73)) > 0.7)
    logits = torch.randn(4, 3, 3, SIDE, SIDE, generator=_generator(74)) * 2
    scores = torch.rand(4, 3, 3, generator=_generator(75))

    full_out = _outputs(logits, scores, grad=True)
    full = batch_loss(full_out, _batch(valid, targets, ignore), loss_fn)
    full["loss"].backward()

    halves, grads = [], []
    for part in (slice(0, 2), slice(2, 4)):
        outputs = _outputs(logits[part], scores[part], grad=True)
        out = batch_loss(outputs, _batch(valid[part], targets[part], ignore[part]), loss_fn)
        (out["loss"] / 2).backward()  # accumulation divides by the number of steps
        halves.append(out)
        grads.append(outputs.pred_masks.grad)

    _assert_same(full, {name: (halves[0][name] + halves[1][name]) / 2 for name in KEYS})
    torch.testing.assert_close(full_out.pred_masks.grad, torch.cat(grads), rtol=1e-5, atol=1e-8)
    # Not a trivial identity: the two halves differ.
    assert abs(halves[0]["loss"].item() - halves[1]["loss"].item()) > 1e-3
