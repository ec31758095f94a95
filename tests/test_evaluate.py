"""Scores: the recomposition score of every run, and `evaluate` against ground-truth layers (LayerD's metrics).

Every expected number below is worked out by hand from the shapes drawn, never by the code under test.
Canvas 64x64; the layers overlap one another (so LayerD's grouping of non-overlapping top layers changes
nothing unless a test says so).
"""

import csv
import io
import json
import math
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import demo_settings  # noqa: F401  (fixtures come from conftest)
import app

SIZE = 64
WHITE, RED, BLUE = (255, 255, 255, 255), (255, 0, 0, 255), (0, 0, 255, 255)


def square(left, top, side, colour):
    """A transparent (black, alpha 0) canvas with one opaque square."""
    layer = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    layer.paste(Image.new("RGBA", (side, side), colour), (left, top))
    return layer


def background():
    return Image.new("RGBA", (SIZE, SIZE), WHITE)


def truth():
    """bg (opaque white), A (red 16x16 at 8,8), B (blue 16x16 at 16,16): A and B overlap on 8x8 = 64 px."""
    return [background(), square(8, 8, 16, RED), square(16, 16, 16, BLUE)]


# Costs worked out by hand for the shapes above (colours 0 or 1 per channel; RGB L1 averages 3 channels).
# cost(pred A, gt B) = cost(pred B, gt A): over the 256 px of the GT square, 64 px show the other square's colour
# (2 channels off: 2/3) and 192 px are transparent black in the prediction (1 channel off: 1/3).
L1_SWAP = (64 * 2 / 3 + 192 * 1 / 3) / 256  # 5/12
IOU_SWAP = 64 / (256 + 256 - 64)  # 1/7
COST_SWAP = (L1_SWAP + 1 - IOU_SWAP) / 2
# The union A∪B (B over A, 448 px) against A: 64 px of A are blue in it; IoU 256/448. Against B: all right; IoU 256/448.
L1_AB_A, L1_AB_B, IOU_AB = 64 * (2 / 3) / 256, 0.0, 256 / 448
COST_AB_A, COST_AB_B = (L1_AB_A + 1 - IOU_AB) / 2, (L1_AB_B + 1 - IOU_AB) / 2


def psnr(mse):
    return 10 * math.log10(1 / mse)


def test_ground_truth_against_itself_is_perfect():
    score = app.evaluate_layers(truth(), truth(), max_merges=5)
    assert score["rgb_l1"] == 0 and score["alpha_iou"] == 1 and score["edit_cost"] == 0 and score["merges"] == 0
    assert score["path"] == [[0, 0], [1, 1], [2, 2]]
    assert score["recomposition_psnr_db"] == app.PSNR_CAP_DB == 100.0  # identical: the stated cap, not inf
    assert score["recomposition_rgb_mae"] == 0 and score["recomposition_alpha_error"] == 0


def test_shifted_layer():
    gt = [background(), square(8, 8, 16, RED)]
    pred = [background(), square(12, 8, 16, RED)]  # 4 px to the right
    score = app.evaluate_layers(pred, gt, max_merges=5)
    # Layer 2: 12x16 = 192 px shared, union 20x16 = 320; 4x16 = 64 GT px are transparent black in the prediction.
    l1, iou = 64 * (1 / 3) / 256, 192 / 320
    assert score["path"] == [[0, 0], [1, 1]] and score["merges"] == 0  # 2 layers a side: nothing to merge
    assert score["rgb_l1"] == pytest.approx((0 + l1) / 2)
    assert score["alpha_iou"] == pytest.approx((1 + iou) / 2)
    assert score["edit_cost"] == pytest.approx((0 + (l1 + 1 - iou) / 2) / 2)
    # Composite: 64 px red where white should be and 64 px white where red should be: 2 channels off of 3.
    assert score["recomposition_psnr_db"] == pytest.approx(psnr(128 * (2 / 3) / SIZE ** 2), abs=1e-3)
    assert score["recomposition_rgb_mae"] == pytest.approx(128 * (2 / 3) / SIZE ** 2, abs=1e-6)


def test_halved_alpha():
    gt = [background(), square(8, 8, 16, RED)]
    half = square(8, 8, 16, RED)
    half.putalpha(half.getchannel("A").point(lambda a: a // 2))  # 255 -> 127
    score = app.evaluate_layers([background(), half], gt)
    iou = 127 / 255  # sum(min)/sum(max) over the square; colour unchanged: L1 0
    assert score["rgb_l1"] == 0
    assert score["alpha_iou"] == pytest.approx((1 + iou) / 2)
    assert score["edit_cost"] == pytest.approx((1 - iou) / 2 / 2)
    # Red at alpha 127/255 over white: G and B become 255 * (1 - 127/255) = 128 instead of 0 (2 of 3 channels).
    mse = 256 * (2 / 3) * (128 / 255) ** 2 / SIZE ** 2
    assert score["recomposition_psnr_db"] == pytest.approx(psnr(mse), abs=0.05)  # Pillow rounds to 8 bits


def test_two_layers_merged_without_and_with_merges():
    gt = truth()
    pred = [background(), Image.alpha_composite(gt[1], gt[2])]  # A and B on one layer
    plain = app.evaluate_layers(pred, gt, max_merges=0)
    # Pred layer 2 pairs with both A and B: path (0,0) (1,1) (1,2).
    assert plain["path"] == [[0, 0], [1, 1], [1, 2]] and plain["merges"] == 0
    assert plain["rgb_l1"] == pytest.approx((0 + L1_AB_A + L1_AB_B) / 3)
    assert plain["alpha_iou"] == pytest.approx((1 + IOU_AB + IOU_AB) / 3)
    assert plain["edit_cost"] == pytest.approx((0 + COST_AB_A + COST_AB_B) / 3)
    merged = app.evaluate_layers(pred, gt, max_merges=1)
    # One merge of the ground truth's A and B makes both sides the same.
    assert merged["merges"] == 1 and merged["path"] == [[0, 0], [1, 1]]
    assert merged["edit_cost"] == 0 and merged["rgb_l1"] == 0 and merged["alpha_iou"] == 1


def test_wrong_order():
    gt = truth()
    pred = [gt[0], gt[2], gt[1]]  # B under A
    score = app.evaluate_layers(pred, gt, max_merges=0)
    # Ties between the diagonal and the detours through the 0-cost (B,B) / (A,A) cells go to the diagonal.
    assert score["path"] == [[0, 0], [1, 1], [2, 2]]
    assert score["rgb_l1"] == pytest.approx(2 * L1_SWAP / 3)
    assert score["alpha_iou"] == pytest.approx((1 + 2 * IOU_SWAP) / 3)
    assert score["edit_cost"] == pytest.approx(2 * COST_SWAP / 3)
    # The 64 overlap px are red instead of blue: 2 channels off.
    assert score["recomposition_psnr_db"] == pytest.approx(psnr(64 * (2 / 3) / SIZE ** 2), abs=1e-3)


def test_missing_layer():
    gt = truth()
    score = app.evaluate_layers(gt[:2], gt, max_merges=0)  # B missing
    assert score["path"] == [[0, 0], [1, 1], [1, 2]]
    assert score["rgb_l1"] == pytest.approx(L1_SWAP / 3)
    assert score["alpha_iou"] == pytest.approx((2 + IOU_SWAP) / 3)
    assert score["edit_cost"] == pytest.approx(COST_SWAP / 3)
    assert score["scored_pred_layers"] == 2 and score["scored_gt_layers"] == 3


def test_non_overlapping_top_layers_are_grouped_like_layerd():
    apart = [background(), square(4, 4, 10, RED), square(40, 40, 10, BLUE)]  # the squares do not touch
    together = [background(), Image.alpha_composite(apart[1], apart[2])]
    assert [np.asarray(x).tolist() for x in app.group_top_layers(apart)] == [np.asarray(x).tolist() for x in together]
    assert app.evaluate_layers(together, apart, max_merges=0)["edit_cost"] == 0
    assert app.evaluate_layers(together, apart, max_merges=0, group=False)["edit_cost"] > 0


def test_recomposition_score_flags_empty_and_duplicate_layers():
    image = Image.alpha_composite(background(), square(8, 8, 16, RED))
    layers = [background(), square(8, 8, 16, RED), Image.new("RGBA", (SIZE, SIZE)), square(8, 8, 16, RED)]
    score = app.recomposition_score(image, layers)
    assert score["psnr_db"] == 100.0 and score["rgb_mae"] == 0 and score["alpha_error"] == 0
    assert score["empty_layers"] == [3] and score["near_duplicates"] == [[4, 2]]
    report = score["layers"]
    assert report[1]["coverage"] == pytest.approx(256 / SIZE ** 2, abs=1e-6) and report[1]["bbox"] == [8, 8, 24, 24]
    assert report[0]["coverage"] == 1 and report[2]["bbox"] is None and report[2]["empty"]
    assert "empty layers: 3" in app.score_line(score) and "4≈2" in app.score_line(score)


def test_recomposition_score_weights_colour_by_the_input_alpha():
    # Input: left half opaque red, right half transparent. Layers: all opaque blue.
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (SIZE // 2, SIZE), RED), (0, 0))
    score = app.recomposition_score(image, [Image.new("RGBA", (SIZE, SIZE), BLUE), Image.new("RGBA", (SIZE, SIZE))])
    # Visible half: red vs blue, 2 of 3 channels off -> MAE 2/3, MSE 2/3; the transparent half does not count.
    assert score["rgb_mae"] == pytest.approx(2 / 3, abs=1e-6)
    assert score["psnr_db"] == pytest.approx(psnr(2 / 3), abs=1e-3)
    assert score["alpha_error"] == pytest.approx(0.5)  # alpha 1 where the input has 0, on half the pixels
