"""Scores: how well layers give back their image (every run), and how close they come to ground-truth layers
(`evaluate`). Pure numpy; no torch.

The ground-truth metrics follow LayerD (Suzuki et al., "LayerD: Decomposing Raster Graphic Designs into
Layers", ICCV 2025), https://github.com/CyberAgentAILab/LayerD, src/layerd/evaluation/: metrics.py (RGBL1,
AlphaIoU, RGBL1_AIoU), dtw.py (dynamic_time_warping), edits.py (Merge), edit_distance.py (LayersEditDist),
and src/layerd/data/crello.py (group_top_layers_indices). Written here from those definitions; where this
code differs, the comment at the place says how.
"""

import math
from typing import Any

import numpy as np
from PIL import Image

from studio.images import check_layers, composite_layers, resize_layers

# Identical images have an infinite PSNR; it is reported as this cap so that JSON and CSV
# stay plain numbers (one 8-bit level off in one pixel of a 640x640 image is already ~109 dB).
PSNR_CAP_DB = 100.0
# A layer whose mean alpha is below this holds (next to) nothing: flagged "empty" (0.1% of the canvas).
EMPTY_LAYER_COVERAGE = 0.001
# Two layers whose LayerD cost (`layer_cost`: RGB L1 and 1 - alpha soft IoU, averaged) is below this both ways
# are flagged as near-duplicates: the same thing twice.
NEAR_DUPLICATE_COST = 0.02
# `evaluate`: merges of adjacent layers the alignment may make (LayerD's evaluate.py default max_edits is 5).
EVAL_MAX_MERGES = 5


def _float_rgba(image: Image.Image) -> np.ndarray:
    """Straight RGBA as float64 in [0, 1], shape (height, width, 4)."""
    return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0


def psnr_db(mse: float) -> float:
    """PSNR in dB of values in [0, 1]; identical images (mse 0) and anything above give PSNR_CAP_DB."""
    return PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def rgb_l1(pred: np.ndarray, gt: np.ndarray) -> float:
    """LayerD's RGBL1: the mean absolute RGB difference (0..1, averaged over R, G, B) over the pixels where
    the ground truth's alpha is not zero, on straight (not premultiplied) colour; 0 for an empty ground truth."""
    mask = gt[..., 3] > 0
    count = int(mask.sum())
    return float(np.abs(pred[..., :3] - gt[..., :3]).mean(-1)[mask].sum() / count) if count else 0.0


def alpha_soft_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """LayerD's AlphaIoU: sum(min(alpha_pred, alpha_gt)) / sum(max(alpha_pred, alpha_gt)); 0 when both are empty."""
    union = np.maximum(pred[..., 3], gt[..., 3]).sum()
    return float(np.minimum(pred[..., 3], gt[..., 3]).sum() / union) if union > 0 else 0.0


def layer_cost(pred: np.ndarray, gt: np.ndarray) -> float:
    """LayerD's RGBL1_AIoU (alpha weight 1), the cost the alignment minimises: (RGB L1 + 1 - alpha IoU) / 2, 0..1."""
    return (rgb_l1(pred, gt) + 1.0 - alpha_soft_iou(pred, gt)) / 2.0


def layer_report(layers: list[Image.Image]) -> list[dict[str, Any]]:
    """Per layer (1 = bottom): `coverage` (mean alpha, 0..1), `bbox` ([left, top, right, bottom] of its non-zero
    alpha, or None), `empty` (coverage under EMPTY_LAYER_COVERAGE) and `duplicate_of` (the number of a lower
    layer it nearly repeats: `layer_cost` under NEAR_DUPLICATE_COST both ways; None if none)."""
    arrays = [_float_rgba(layer) for layer in layers]
    report: list[dict[str, Any]] = []
    for index, (layer, array) in enumerate(zip(layers, arrays)):
        coverage = float(array[..., 3].mean())
        box = layer.convert("RGBA").getbbox(alpha_only=True)
        empty = coverage < EMPTY_LAYER_COVERAGE
        duplicate_of = None
        for lower in range(index):
            if empty or report[lower]["empty"]:
                continue
            if max(layer_cost(array, arrays[lower]), layer_cost(arrays[lower], array)) < NEAR_DUPLICATE_COST:
                duplicate_of = lower + 1
                break
        report.append(dict(layer=index + 1, coverage=coverage, bbox=list(box) if box else None,
                           empty=empty, duplicate_of=duplicate_of))
    return report


def recomposition_score(image: Image.Image, layers: list[Image.Image]) -> dict[str, Any]:
    """How well `layers` (bottom first) stacked give back `image`, at the layers' size (the model's resolution).

    The input is resized to that size the way `resize_layers` resizes layers, when the sizes differ. Colour is
    compared where the input is visible, each pixel weighted by the input's alpha (the colour under a transparent
    pixel is not part of the picture): `psnr_db` (capped at PSNR_CAP_DB) and `rgb_mae` (0..1). `alpha_error` is
    the mean absolute alpha difference over all pixels. `layers` is `layer_report`, and `empty_layers` and
    `near_duplicates` ([layer, the lower layer it repeats]) list what it flags, numbered from 1 = bottom.
    """
    composite = composite_layers(layers)
    image = image.convert("RGBA")
    if image.size != composite.size:
        image = resize_layers([image], composite.size)[0]
    want, got = _float_rgba(image), _float_rgba(composite)
    weight = want[..., 3]
    visible = float(weight.sum())
    difference = got[..., :3] - want[..., :3]
    mse = float(((difference ** 2).mean(-1) * weight).sum() / visible) if visible > 0 else 0.0
    mae = float((np.abs(difference).mean(-1) * weight).sum() / visible) if visible > 0 else 0.0
    report = layer_report(layers)
    return dict(psnr_db=psnr_db(mse), rgb_mae=mae,
                alpha_error=float(np.abs(got[..., 3] - want[..., 3]).mean()), size=list(composite.size),
                layers=report, empty_layers=[r["layer"] for r in report if r["empty"]],
                near_duplicates=[[r["layer"], r["duplicate_of"]] for r in report if r["duplicate_of"]])


def score_line(score: dict[str, Any]) -> str:
    """One line for the terminal and the page: PSNR, MAE, alpha error and what the layer check flagged."""
    text = (f"recomposition PSNR {score['psnr_db']:.2f} dB, RGB MAE {score['rgb_mae']:.4f}, "
            f"alpha error {score['alpha_error']:.4f}")
    if score["empty_layers"]:
        text += f"; empty layers: {', '.join(map(str, score['empty_layers']))}"
    if score["near_duplicates"]:
        text += "; near-duplicates: " + ", ".join(f"{a}≈{b}" for a, b in score["near_duplicates"])
    return text


def group_top_layers(layers: list[Image.Image]) -> list[Image.Image]:
    """LayerD's grouping before scoring (crello.py, group_top_layers_indices): the layers that overlap no layer
    above them form the top group, composited into one layer; repeat on the rest. Returns the groups bottom first.

    A decomposition that puts two separate objects on one layer, or on two, scores the same this way.
    Overlap means both alphas non-zero on a pixel.
    """
    masks = [np.asarray(layer.convert("RGBA").getchannel("A")) > 0 for layer in layers]
    remaining, groups = list(range(len(layers))), []
    while remaining:
        top = [i for position, i in enumerate(remaining)
               if not any((masks[i] & masks[j]).any() for j in remaining[position + 1:])]
        groups.append(top)
        remaining = [i for i in remaining if i not in top]
    groups.reverse()
    return [layers[group[0]] if len(group) == 1 else composite_layers([layers[i] for i in group]) for group in groups]


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The monotone path from (0, 0) to the last cell whose summed cost is least (steps (1, 0), (0, 1), (1, 1)).

    As LayerD's dtw.py: cumulative sums, then back from the end, taking on ties the diagonal first, then a step
    back in the first sequence (predictions), then in the second (ground truth).
    """
    n, m = cost.shape
    total = np.full((n, m), np.inf)
    for i in range(n):
        for j in range(m):
            before = [total[i - 1, j - 1] if i and j else np.inf, total[i - 1, j] if i else np.inf,
                      total[i, j - 1] if j else np.inf]
            total[i, j] = cost[i, j] + (0.0 if i == j == 0 else min(before))
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i or j:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        elif total[i - 1, j - 1] <= min(total[i - 1, j], total[i, j - 1]):
            i, j = i - 1, j - 1
        elif total[i - 1, j] <= total[i, j - 1]:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    return path[::-1]


def align_layers(pred: list[Image.Image], gt: list[Image.Image], max_merges: int = EVAL_MAX_MERGES) -> dict[str, Any]:
    """Align predicted to ground-truth layers (bottom first, one canvas) and score the aligned pairs, as LayerD's
    LayersEditDist: the cost of a pair is `layer_cost`; `dtw_path` aligns the two sequences (a layer may pair with
    several of the other side, so missing, extra and split layers cost what their pairs cost); then up to
    `max_merges` times two adjacent layers, on either side, are merged ("over") when that lowers the cost.
    A side keeps at least 2 layers (LayerD's Merge min_layers).

    Returns `edit_cost` (mean cost over the path: 0 is perfect), `rgb_l1` and `alpha_iou` (their means over the
    same path), `merges` (how many were made) and `path` ((pred, gt) indices after the merges).

    Differs from LayerD in how a merge is chosen: LayerD estimates each merge's gain from the current pairs
    (edits.py, Merge._compute_merged_scores); here every candidate merge is aligned again and the one whose
    `edit_cost` is lowest is taken, so a merge is made only when the score really improves. LayerD reports a
    row per number of edits; here the score after the merges allowed (`--max-merges 0` gives the unedited one).
    """
    arrays: dict[int, np.ndarray] = {}  # id(image) -> array; the images stay alive in `keep`, so ids stay unique
    pairs: dict[tuple[int, int], tuple[float, float, float]] = {}  # (id pred, id gt) -> metrics()
    keep: list[Image.Image] = []

    def array_of(image: Image.Image) -> np.ndarray:
        if id(image) not in arrays:
            keep.append(image)
            arrays[id(image)] = _float_rgba(image)
        return arrays[id(image)]

    def metrics(p: Image.Image, g: Image.Image) -> tuple[float, float, float]:
        """(RGB L1, alpha IoU, cost) of one pair, computed once (`layer_cost` spelled out to reuse both parts)."""
        key = (id(p), id(g))
        if key not in pairs:
            a, b = array_of(p), array_of(g)
            l1, iou = rgb_l1(a, b), alpha_soft_iou(a, b)
            pairs[key] = (l1, iou, (l1 + 1.0 - iou) / 2.0)
        return pairs[key]

    def align(p_layers: list[Image.Image], g_layers: list[Image.Image]) -> tuple[float, list[tuple[int, int]]]:
        cost = np.array([[metrics(p, g)[2] for g in g_layers] for p in p_layers])
        path = dtw_path(cost)
        return float(np.mean([cost[i, j] for i, j in path])), path

    merged: dict[tuple[int, int], Image.Image] = {}

    def merge(layers: list[Image.Image], i: int) -> list[Image.Image]:
        key = (id(layers[i]), id(layers[i + 1]))
        if key not in merged:
            merged[key] = Image.alpha_composite(layers[i].convert("RGBA"), layers[i + 1].convert("RGBA"))
            keep.extend((layers[i], layers[i + 1]))
        return layers[:i] + [merged[key]] + layers[i + 2:]

    pred, gt = list(pred), list(gt)
    for image in pred + gt:
        array_of(image)
    edit_cost, path = align(pred, gt)
    merges = 0
    while merges < max_merges:
        best = None
        for side in ("pred", "gt"):
            layers = pred if side == "pred" else gt
            if len(layers) <= 2:  # LayerD's Merge(min_layers=2): a side is never merged down to one layer
                continue
            for i in range(len(layers) - 1):
                candidate = (merge(pred, i), gt) if side == "pred" else (pred, merge(gt, i))
                value, candidate_path = align(*candidate)
                if value < edit_cost - 1e-12 and (best is None or value < best[0]):
                    best = (value, candidate, candidate_path)
        if best is None:
            break
        edit_cost, (pred, gt), path = best
        merges += 1
    pair_metrics = [metrics(pred[i], gt[j]) for i, j in path]
    return dict(edit_cost=edit_cost, rgb_l1=float(np.mean([m[0] for m in pair_metrics])),
                alpha_iou=float(np.mean([m[1] for m in pair_metrics])), merges=merges, path=[list(p) for p in path])


def evaluate_layers(pred: list[Image.Image], gt: list[Image.Image], max_merges: int = EVAL_MAX_MERGES,
                    group: bool = True) -> dict[str, Any]:
    """Every score of predicted layers against ground-truth layers (both bottom first, each on one canvas).

    The recomposition score is `recomposition_score` of the flattened ground truth (the image the model was
    given) against the prediction, at the prediction's size: the very number a run reports. The layer scores
    are at the ground truth's size (a prediction of another size is resized with `resize_layers`), after
    `group_top_layers` on both sides when `group` (LayerD does), then `align_layers`.
    """
    check_layers(pred)
    check_layers(gt)
    recomposition = recomposition_score(composite_layers(gt), pred)
    if pred[0].size != gt[0].size:
        pred = resize_layers(pred, gt[0].size)
    if group:
        pred, gt = group_top_layers(pred), group_top_layers(gt)
    aligned = align_layers(pred, gt, max_merges)
    return dict(rgb_l1=aligned["rgb_l1"], alpha_iou=aligned["alpha_iou"],
                edit_cost=aligned["edit_cost"], merges=aligned["merges"], path=aligned["path"],
                scored_pred_layers=len(pred), scored_gt_layers=len(gt),
                recomposition_psnr_db=recomposition["psnr_db"], recomposition_rgb_mae=recomposition["rgb_mae"],
                recomposition_alpha_error=recomposition["alpha_error"])
