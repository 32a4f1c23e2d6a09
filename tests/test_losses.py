"""Each loss against an independent computation on small hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab.config import TrainConfig
from deeplab.losses import (
    LOSSES,
    build_criterion,
    dice_loss,
    focal_loss,
    lovasz_softmax_loss,
    ohem_loss,
    parse_loss_spec,
    segmentation_loss,
    topk_loss,
)

IGNORE = 255


def two_class_logits(p1: list) -> torch.Tensor:
    """``(1, 2, H, W)`` logits whose softmax gives class 1 probability ``p1`` ((H, W) nested list)."""
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.log(1 - p), torch.log(p)])[None]


def random_case(seed: int = 0, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, classes, (2, 5, 6), generator=g)
    target[0, :2] = IGNORE
    return logits, target


def test_ce_weighted_is_sum_of_weighted_pixel_losses_over_valid_count() -> None:
    logits, target = random_case()
    w = torch.tensor([0.5, 1.0, 2.0, 3.0])
    valid = target != IGNORE
    logp = torch.log_softmax(logits, 1)
    per = -logp.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    ref = (w.double()[torch.where(valid, target, 0)] * per)[valid].sum() / valid.sum()
    got = segmentation_loss(logits, target, weight=w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    # unweighted: the usual mean over valid pixels
    assert segmentation_loss(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=IGNORE).item(), rel=1e-6)


def test_focal_matches_formula_and_gamma_zero_is_ce() -> None:
    logits, target = random_case(1)
    valid = (target != IGNORE).numpy()
    p = torch.softmax(logits, 1).numpy()
    t = np.where(valid, target.numpy(), 0)
    pt = np.take_along_axis(p, t[:, None], 1)[:, 0]
    ref = (-(1 - pt) ** 2 * np.log(pt))[valid].sum() / valid.sum()
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(ref, rel=1e-5)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(segmentation_loss(logits, target).item(),
                                                                           rel=1e-6)


@pytest.mark.parametrize("min_kept,kept", [(1, [0.6, 0.3]), (3, [0.6, 0.3, 0.8])])
def test_ohem_keeps_exactly_the_pixels_the_rule_says(min_kept: int, kept: list) -> None:
    # target probabilities 0.9 0.6 / 0.3 0.8 (class 1 everywhere), thresh 0.7:
    # min_kept=1 -> threshold max(sorted[1]=0.6, 0.7)=0.7 keeps 0.6, 0.3;
    # min_kept=3 -> threshold max(sorted[3]=0.9, 0.7)=0.9 keeps 0.6, 0.3, 0.8.
    logits = two_class_logits([[0.9, 0.6], [0.3, 0.8]])
    target = torch.ones(1, 2, 2, dtype=torch.long)
    ref = float(np.mean([-math.log(k) for k in kept]))
    got = ohem_loss(logits, target, thresh=0.7, min_kept=min_kept)
    assert got.item() == pytest.approx(ref, rel=1e-6)


def test_topk_keeps_the_largest_losses_like_tf() -> None:
    logits = two_class_logits([[0.9, 0.6], [0.3, 0.8]])
    target = torch.tensor([[[1, 1], [IGNORE, 1]]])
    # k = int(0.5 * 4) = 2 of all pixels (ignored counts as a 0 loss): -log 0.6 and -log 0.8
    got = topk_loss(logits, target, percent=0.5)
    assert got.item() == pytest.approx((-math.log(0.6) - math.log(0.8)) / 2, rel=1e-6)


def test_dice_against_numpy() -> None:
    logits, target = random_case(2, classes=3)
    p = torch.softmax(logits, 1).numpy()
    t = target.numpy()
    valid = t != IGNORE
    dice = []
    for c in range(3):
        pc = p[:, c][valid]
        gc = (t[valid] == c).astype(float)
        dice.append((2 * (pc * gc).sum() + 1) / (pc.sum() + gc.sum() + 1))
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(1 - np.mean(dice), rel=1e-5)
    w = torch.tensor([1.0, 2.0, 3.0])
    wn = w.numpy() / w.numpy().mean()
    assert dice_loss(logits, target, weight=w).item() == pytest.approx(1 - np.mean(wn * np.array(dice)), rel=1e-5)


def test_lovasz_on_a_2x2_image_worked_out_by_hand() -> None:
    # target [[0, 1], [1, 1]], class-1 probabilities [[0.2, 0.7], [0.4, 0.9]].
    # class 1: errors sorted 0.6 0.3 0.2 0.1 with gt 1 1 0 1 -> Jaccard steps 1/3 1/3 1/12 1/4
    #          -> 0.6/3 + 0.3/3 + 0.2/12 + 0.1/4 = 41/120
    # class 0: errors sorted 0.6 0.3 0.2 0.1 with gt 0 0 1 0 -> steps 1/2 1/6 1/3 0
    #          -> 0.3 + 0.05 + 0.2/3 = 5/12
    logits = two_class_logits([[0.2, 0.7], [0.4, 0.9]])
    target = torch.tensor([[[0, 1], [1, 1]]])
    expected = (41 / 120 + 5 / 12) / 2
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert lovasz_softmax_loss(logits, target, per_image=True).item() == pytest.approx(expected, rel=1e-6)
    perfect = two_class_logits([[1e-9, 1 - 1e-9], [1 - 1e-9, 1 - 1e-9]])
    assert lovasz_softmax_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # weights give the weighted mean of the per-class terms
    w = torch.tensor([1.0, 3.0])
    assert lovasz_softmax_loss(logits, target, weight=w).item() == pytest.approx(
        (5 / 12 + 3 * 41 / 120) / 4, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_get_zero_gradient_and_change_nothing(name: str) -> None:
    logits, target = random_case(3)
    logits.requires_grad_(True)
    crit = build_criterion(name, ohem_min_kept=5, topk_percent=0.5)
    crit(logits, target).backward()
    ignored = (target == IGNORE)[:, None].expand_as(logits)
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[ignored]) == 0
    assert torch.count_nonzero(logits.grad[~ignored]) > 0
    # the logits at ignored pixels do not matter
    other = logits.detach().clone()
    other[ignored] = 100.0
    assert crit(other, target).item() == pytest.approx(crit(logits.detach(), target).item(), rel=1e-9)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weights_change_the_value(name: str) -> None:
    logits, target = random_case(4)
    plain = build_criterion(name, ohem_min_kept=5)(logits, target).item()
    ones = build_criterion(name, ohem_min_kept=5, class_weights=[1.0] * 4)(logits, target).item()
    skew = build_criterion(name, ohem_min_kept=5, class_weights=[0.1, 1.0, 5.0, 1.0])(logits, target).item()
    assert ones == pytest.approx(plain, rel=1e-9)
    assert skew != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_in_bf16_autocast(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 16, 16, generator=g) * 30  # large logits: overflow would show
    target = torch.randint(0, 5, (2, 16, 16), generator=g)
    target[:, :3] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        loss = build_criterion(name, ohem_min_kept=10)(logits, target)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss)
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_all_ignored_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    for name in LOSSES:
        crit = build_criterion(name)
        value = crit(logits, target)
        assert torch.isfinite(value), name


def test_weighted_sum_and_normalizer() -> None:
    logits, target = random_case(5)
    crit = build_criterion("ce:1,dice:0.5")
    parts = segmentation_loss(logits, target) + 0.5 * dice_loss(logits, target)
    assert crit(logits, target).item() == pytest.approx(parts.item(), rel=1e-6)
    # with the loop's normaliser: CE is a pixel sum / normaliser, Dice is scaled by valid / normaliser
    valid = float((target != IGNORE).sum())
    n = 2 * valid
    ref = segmentation_loss(logits, target, normalizer=n) + 0.5 * dice_loss(logits, target) * valid / n
    assert crit(logits, target, normalizer=n).item() == pytest.approx(ref.item(), rel=1e-6)
    assert crit.describe() == "ce:1,dice:0.5"


def test_spec_errors_name_the_choices() -> None:
    assert parse_loss_spec("ce") == [("ce", 1.0)]
    assert parse_loss_spec("ce:1, dice:0.5") == [("ce", 1.0), ("dice", 0.5)]
    with pytest.raises(ValueError, match="choose from"):
        parse_loss_spec("bce")
    with pytest.raises(ValueError, match="not a number"):
        parse_loss_spec("ce:x")
    with pytest.raises(ValueError, match="twice"):
        parse_loss_spec("ce,ce:2")


def test_train_config_loss_fields_roundtrip_and_validate() -> None:
    cfg = TrainConfig(loss="ohem", class_weights=[1, 2.5], ohem_min_kept=10)
    assert cfg.class_weights == (1.0, 2.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="class_weights"):
        TrainConfig(class_weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="topk_percent"):
        TrainConfig(topk_percent=0.0)
