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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
import studio.images
from studio.batch import BatchItem, batch_summary
from studio.evaluate import parse_grid
from studio.exports import export_layer_pngs, export_psd, export_zip
from studio.images import composite_layers, find_ground_truth, read_layered_file
from studio.runs import save_run
from studio.scores import PSNR_CAP_DB, evaluate_layers, group_top_layers, recomposition_score, score_line
from studio.stack import LayerStack

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
    score = evaluate_layers(truth(), truth(), max_merges=5)
    assert score["rgb_l1"] == 0 and score["alpha_iou"] == 1 and score["edit_cost"] == 0 and score["merges"] == 0
    assert score["path"] == [[0, 0], [1, 1], [2, 2]]
    assert score["recomposition_psnr_db"] == PSNR_CAP_DB == 100.0  # identical: the stated cap, not inf
    assert score["recomposition_rgb_mae"] == 0 and score["recomposition_alpha_error"] == 0


def test_shifted_layer():
    gt = [background(), square(8, 8, 16, RED)]
    pred = [background(), square(12, 8, 16, RED)]  # 4 px to the right
    score = evaluate_layers(pred, gt, max_merges=5)
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
    score = evaluate_layers([background(), half], gt)
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
    plain = evaluate_layers(pred, gt, max_merges=0)
    # Pred layer 2 pairs with both A and B: path (0,0) (1,1) (1,2).
    assert plain["path"] == [[0, 0], [1, 1], [1, 2]] and plain["merges"] == 0
    assert plain["rgb_l1"] == pytest.approx((0 + L1_AB_A + L1_AB_B) / 3)
    assert plain["alpha_iou"] == pytest.approx((1 + IOU_AB + IOU_AB) / 3)
    assert plain["edit_cost"] == pytest.approx((0 + COST_AB_A + COST_AB_B) / 3)
    merged = evaluate_layers(pred, gt, max_merges=1)
    # One merge of the ground truth's A and B makes both sides the same.
    assert merged["merges"] == 1 and merged["path"] == [[0, 0], [1, 1]]
    assert merged["edit_cost"] == 0 and merged["rgb_l1"] == 0 and merged["alpha_iou"] == 1


def test_wrong_order():
    gt = truth()
    pred = [gt[0], gt[2], gt[1]]  # B under A
    score = evaluate_layers(pred, gt, max_merges=0)
    # Ties between the diagonal and the detours through the 0-cost (B,B) / (A,A) cells go to the diagonal.
    assert score["path"] == [[0, 0], [1, 1], [2, 2]]
    assert score["rgb_l1"] == pytest.approx(2 * L1_SWAP / 3)
    assert score["alpha_iou"] == pytest.approx((1 + 2 * IOU_SWAP) / 3)
    assert score["edit_cost"] == pytest.approx(2 * COST_SWAP / 3)
    # The 64 overlap px are red instead of blue: 2 channels off.
    assert score["recomposition_psnr_db"] == pytest.approx(psnr(64 * (2 / 3) / SIZE ** 2), abs=1e-3)


def test_missing_layer():
    gt = truth()
    score = evaluate_layers(gt[:2], gt, max_merges=0)  # B missing
    assert score["path"] == [[0, 0], [1, 1], [1, 2]]
    assert score["rgb_l1"] == pytest.approx(L1_SWAP / 3)
    assert score["alpha_iou"] == pytest.approx((2 + IOU_SWAP) / 3)
    assert score["edit_cost"] == pytest.approx(COST_SWAP / 3)
    assert score["scored_pred_layers"] == 2 and score["scored_gt_layers"] == 3


def test_non_overlapping_top_layers_are_grouped_like_layerd():
    apart = [background(), square(4, 4, 10, RED), square(40, 40, 10, BLUE)]  # the squares do not touch
    together = [background(), Image.alpha_composite(apart[1], apart[2])]
    assert same_layers(group_top_layers(apart), together)
    assert evaluate_layers(together, apart, max_merges=0)["edit_cost"] == 0
    assert evaluate_layers(together, apart, max_merges=0, group=False)["edit_cost"] > 0


def test_recomposition_score_flags_empty_and_duplicate_layers():
    image = Image.alpha_composite(background(), square(8, 8, 16, RED))
    layers = [background(), square(8, 8, 16, RED), Image.new("RGBA", (SIZE, SIZE)), square(8, 8, 16, RED)]
    score = recomposition_score(image, layers)
    assert score["psnr_db"] == 100.0 and score["rgb_mae"] == 0 and score["alpha_error"] == 0
    assert score["empty_layers"] == [3] and score["near_duplicates"] == [[4, 2]]
    report = score["layers"]
    assert report[1]["coverage"] == pytest.approx(256 / SIZE ** 2, abs=1e-6) and report[1]["bbox"] == [8, 8, 24, 24]
    assert report[0]["coverage"] == 1 and report[2]["bbox"] is None and report[2]["empty"]
    assert "empty layers: 3" in score_line(score) and "4≈2" in score_line(score)


def test_recomposition_score_weights_colour_by_the_input_alpha():
    # Input: left half opaque red, right half transparent. Layers: all opaque blue.
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (SIZE // 2, SIZE), RED), (0, 0))
    score = recomposition_score(image, [Image.new("RGBA", (SIZE, SIZE), BLUE), Image.new("RGBA", (SIZE, SIZE))])
    # Visible half: red vs blue, 2 of 3 channels off -> MAE 2/3, MSE 2/3; the transparent half does not count.
    assert score["rgb_mae"] == pytest.approx(2 / 3, abs=1e-6)
    assert score["psnr_db"] == pytest.approx(psnr(2 / 3), abs=1e-3)
    assert score["alpha_error"] == pytest.approx(0.5)  # alpha 1 where the input has 0, on half the pixels


# ---- ground-truth files: three formats, bad files, the shipped set ----------------------------------------------
def pixels(layers):
    """The layers' RGBA pixels as one array (layer, row, column, channel): equal arrays, equal layers."""
    return np.stack([np.asarray(layer.convert("RGBA")) for layer in layers])


def same_layers(a, b):
    return len(a) == len(b) and np.array_equal(pixels(a), pixels(b))


@pytest.fixture()
def truth_files(tmp_path):
    """The same three layers as a PSD (the app's exporter), the studio's ZIP and a folder of PNGs."""
    layers = truth()
    psd = export_psd(layers, tmp_path / "design.psd")
    archive = export_zip(layers, tmp_path / "design.zip", {"params.json": b"{}"}, original_size_layers=layers)
    folder = tmp_path / "design_pngs"
    export_layer_pngs(layers, folder)
    composite_layers(layers).save(folder / "composite.png")  # the stack itself: must not count as a layer
    return layers, psd, archive, folder


def test_each_ground_truth_format_reads_to_the_same_layers(truth_files):
    layers, psd, archive, folder = truth_files
    for path in (psd, archive, folder):
        assert same_layers(read_layered_file(path), layers), path


def test_png_folder_is_read_in_natural_order(tmp_path):
    for number in (1, 2, 10):  # layer_10 is the top one, after layer_2
        Image.new("RGBA", (8, 8), (number, 0, 0, 255)).save(tmp_path / f"layer_{number}.png")
    assert [layer.getpixel((0, 0))[0] for layer in read_layered_file(tmp_path)] == [1, 2, 10]


@pytest.fixture()
def bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(bad / "flat.png")  # not layered
    good_psd = export_psd(truth(), tmp_path / "good.psd")
    (bad / "corrupt.psd").write_bytes(good_psd.read_bytes()[:300])  # a PSD cut short
    with zipfile.ZipFile(bad / "nopng.zip", "w") as archive:
        archive.writestr("readme.txt", "no layers here")
    one = export_psd([square(0, 0, 8, RED)], bad / "one_layer.psd")
    traversal = bad / "evil.zip"
    with zipfile.ZipFile(traversal, "w") as archive:  # a name that climbs out: read in memory, never extracted
        archive.writestr("../../layer_1.png", _png_bytes(background()))
    return good_psd, {"flat.png": "one flat image, not a layered file", "corrupt.psd": "not a readable PSD",
                      "nopng.zip": "holds no PNG layer", "one_layer.psd": "holds 1 layer(s)",
                      "evil.zip": "holds 1 layer(s)"}, bad, one


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_files_are_reported_and_skipped_and_the_run_goes_on(bad_files, tmp_path, capsys):
    good_psd, expected, bad, _ = bad_files
    pred = tmp_path / "pred"
    export_layer_pngs(truth(), pred / "good")
    out = tmp_path / "out"
    paths = [bad / name for name in expected] + [good_psd]  # the good file comes last: the run must reach it
    code = app.main(["evaluate", *map(str, paths), "--pred", str(pred), "--out", str(out)])
    assert code == 1  # something failed
    captured = capsys.readouterr()
    err = captured.err
    # The footer counts what the table counts, then the files that could not be read (issue 23: it said "0 scored,
    # 2 failed" under a table of "0 images, 1 failed").
    assert f"1 scored, 0 failed, {len(expected)} ground truth file(s) unreadable;" in captured.out
    with open(out / "evaluate.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["ground_truth"]).name for r in rows] == [*expected, "good.psd"]
    for row, (name, message) in zip(rows, expected.items()):
        assert message in row["error"] and f"skipped {bad / name}" in err, name
    assert rows[-1]["error"] == "" and float(rows[-1]["edit_cost"]) == 0 and float(rows[-1]["alpha_iou"]) == 1
    report = json.loads((out / "evaluate.json").read_text())
    assert sorted(Path(p).name for p in report["unreadable"]) == sorted(expected)
    (summary,) = report["summary"]
    assert (summary["settings"], summary["images"], summary["failed"], summary["mean_edit_cost"]) == ("pred", 1, 0, 0)


def test_a_pred_folder_of_png_layers_with_several_ground_truths_says_where_each_prediction_goes(tmp_path, capsys):
    one, two = export_psd(truth(), tmp_path / "one.psd"), export_psd(truth(), tmp_path / "two.psd")
    export_layer_pngs(truth(), tmp_path / "pred")  # PNG layers in the folder itself: one prediction
    code = app.main(["evaluate", str(one), str(two), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()  # said before anything runs
    assert (f"--pred {tmp_path / 'pred'} holds PNG layers itself: that is one prediction, and 2 ground truths were "
            f"given (one, two). Put each prediction in {tmp_path / 'pred'}/<name>/") in capsys.readouterr().err
    # One ground truth: the folder is its prediction.
    assert app.main(["evaluate", str(one), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "out")]) == 0


def test_evaluate_refuses_bad_arguments_before_any_model_loads(tmp_path, capsys):
    psd = export_psd(truth(), tmp_path / "t.psd")
    out = str(tmp_path / "out")
    cases = {("--grid", "steps=2,x"): "every value of steps must be a int",
             ("--grid", "colour=red"): "KEY one of steps",
             ("--grid", "steps=1"): "num_inference_steps",
             ("--max-merges", "-1"): "--max-merges -1 is negative",
             ("--pred", str(tmp_path / "nowhere")): "is not a folder",
             ("--out", str(psd)): "is a file: pass a folder"}
    for args, message in cases.items():
        assert app.main(["evaluate", str(psd), "--out", out, "--model", str(tmp_path / "no-model"), *args]) == 2
        assert message in capsys.readouterr().err, args
    assert app.main(["evaluate", str(tmp_path / "empty_dir_missing"), "--out", out, "--pred", str(tmp_path)]) == 1
    assert not (tmp_path / "no-model").exists()


def test_oversized_layers_are_refused_before_decoding(tmp_path, monkeypatch):
    export_layer_pngs(truth(), tmp_path / "pngs")
    psd = export_psd(truth(), tmp_path / "t.psd")
    monkeypatch.setattr(studio.images, "MAX_INPUT_PIXELS", SIZE * SIZE - 1)  # one pixel short of the 64x64 canvas
    for path in (tmp_path / "pngs", psd):
        with pytest.raises(ValueError, match="64x64: more than the 4,095 pixels"):
            read_layered_file(path)


def test_parse_grid_gives_every_combination():
    assert parse_grid(["steps=2,4", "first_block_cache_threshold=0,0.1"]) == [
        {"steps": 2, "first_block_cache_threshold": 0.0}, {"steps": 2, "first_block_cache_threshold": 0.1},
        {"steps": 4, "first_block_cache_threshold": 0.0}, {"steps": 4, "first_block_cache_threshold": 0.1}]
    assert parse_grid([]) == [{}]


def test_shipped_ground_truth_set():
    """assets/layered_gt: 12+ PSDs of 2-6 layers, several aspect ratios, semi-transparent layers among them."""
    paths = find_ground_truth([app.ROOT_DIR / "assets" / "layered_gt"])
    assert len(paths) >= 12 and all(p.suffix == ".psd" for p in paths)
    sets = [read_layered_file(p) for p in paths]
    assert {len(layers) for layers in sets} >= {2, 3, 4, 5, 6} and max(map(len, sets)) == 6
    assert len({round(layers[0].width / layers[0].height, 2) for layers in sets}) >= 4
    semi = [any(((a := np.asarray(layer.getchannel("A"))) > 0).any() and ((a > 0) & (a < 255)).any() for layer in layers)
            for layers in sets]
    assert sum(semi) >= 10
    assert sum(p.stat().st_size for p in paths) < 1_000_000  # small files


# ---- the per-run score equals `evaluate --pred`; a tiny evaluate over the demo model ---------------------------
@pytest.fixture(scope="module")
def demo_run(demo_pipe, tmp_path_factory):
    """One demo decomposition of the flattened ground truth, saved as a run folder: (input file, result, paths)."""
    folder = tmp_path_factory.mktemp("demo-run")
    image_path = folder / "in.png"
    composite_layers(truth()).save(image_path)
    result = app.infer(demo_pipe, image_path, prompt="three squares", layers=2, num_inference_steps=2, seed=5)
    return image_path, result, save_run(result, folder / "runs")


def test_run_score_equals_evaluate_pred_on_the_same_layers(demo_run, tmp_path, capsys):
    _, result, run = demo_run
    psd = export_psd(truth(), tmp_path / "design.psd")
    assert json.loads(run["params"].read_text())["recomposition"] == result.params["recomposition"]
    out = tmp_path / "out"
    assert app.main(["evaluate", str(psd), "--pred", str(run["folder"]), "--out", str(out)]) == 0
    (row,) = json.loads((out / "evaluate.json").read_text())["rows"]
    run_score = result.params["recomposition"]
    assert (row["recomposition_psnr_db"], row["recomposition_rgb_mae"], row["recomposition_alpha_error"]) == \
        (run_score["psnr_db"], run_score["rgb_mae"], run_score["alpha_error"])
    assert run_score["psnr_db"] < 30  # the demo's noise does not stack back into the input
    assert row["pred_layers"] == 2 and row["gt_layers"] == 3


def test_evaluate_with_the_demo_model_and_a_grid(models_dir, tmp_path, capsys):
    psd = export_psd(truth(), tmp_path / "design.psd")
    out = tmp_path / "out"
    code = app.main(["evaluate", str(psd), "--demo", "--models-dir", str(models_dir), "--no-first-block-cache",
                     "--steps", "2", "--prompt", "squares", "--grid", "layers=2,3", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "DEMO MODEL" in stdout and "layers=2" in stdout and "layers=3" in stdout
    report = json.loads((out / "evaluate.json").read_text())
    assert [row["pred_layers"] for row in report["rows"]] == [2, 3] and report["demo"] is True
    assert all(row["seconds"] > 0 and 0 <= row["edit_cost"] <= 1 for row in report["rows"])
    for row, layers in zip(report["rows"], (2, 3)):  # the predicted layers are kept, and score the same again
        folder = out / "pred" / f"layers-{layers}" / "design"
        again = evaluate_layers(read_layered_file(folder), truth())
        assert again["edit_cost"] == row["edit_cost"] and again["recomposition_psnr_db"] == row["recomposition_psnr_db"]


def test_ui_shows_the_score_next_to_input_and_composite(demo_run):
    image_path, result, paths = demo_run
    stack = LayerStack(layers=result.layers, run_folder=paths["folder"], files=paths)
    (before, after), text = app.recomposition_view({"path": str(image_path)}, stack, demo=True)
    assert before.size == Image.open(after).size == result.layers[0].size  # the input at the model's resolution
    assert Path(after) == paths["composite"]  # the file itself: the slider's download is composite.png
    assert np.array_equal(np.asarray(Image.open(after)), np.asarray(composite_layers(result.layers)))
    assert f"{result.params['recomposition']['psnr_db']:.2f} dB" in text and app.DEMO_SCORE_NOTE in text
    assert app.DEMO_SCORE_NOTE not in app.recomposition_view(str(image_path), stack, demo=False)[1]
    assert app.recomposition_view(str(image_path), None) == (None, "")


def test_decompose_summary_lists_each_recomposition_psnr_after_the_count():
    items = [BatchItem(Path("a.png"), folder=Path("runs/a"), score={"psnr_db": 12.0}),
             BatchItem(Path("b.png"), folder=Path("runs/b"), score={"psnr_db": 18.5}),
             BatchItem(Path("c.png"), error="ValueError: bad")]
    lines = batch_summary(items).splitlines()
    assert lines[0] == "2 of 3 images decomposed, 1 failed" and lines[2] == "  ok      a.png -> runs/a"
    assert lines[1] == "recomposition PSNR: a.png 12.00 dB, b.png 18.50 dB; mean 15.25 dB (params.json: recomposition)"


def test_cli_max_merges_flag_reaches_the_alignment(tmp_path):
    gt = truth()
    psd = export_psd(gt, tmp_path / "design.psd")
    export_layer_pngs([background(), Image.alpha_composite(gt[1], gt[2])], tmp_path / "pred" / "design")
    costs = {}
    for merges in ("0", "1"):
        out = tmp_path / f"out{merges}"
        assert app.main(["evaluate", str(psd), "--pred", str(tmp_path / "pred"), "--out", str(out),
                         "--max-merges", merges]) == 0
        (row,) = json.loads((out / "evaluate.json").read_text())["rows"]
        costs[merges] = (row["edit_cost"], row["merges"])
    assert costs["0"] == (pytest.approx((0 + COST_AB_A + COST_AB_B) / 3), 0)
    assert costs["1"] == (0, 1)


def test_the_shipped_psds_hold_exactly_what_the_script_draws():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_layered_gt", app.ROOT_DIR / "assets" / "make_layered_gt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    drawn = script.designs()
    shipped = find_ground_truth([app.ROOT_DIR / "assets" / "layered_gt"])
    assert [p.stem for p in shipped] == sorted(drawn)
    for path in shipped:
        assert same_layers(read_layered_file(path), drawn[path.stem]), path.name
