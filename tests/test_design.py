"""Layers a designer can use as they are (src/studio/design.py, issue 26), checked on the project's own designs.

The designs are assets/layered_gt/*.psd (drawn by assets/make_layered_gt.py; text_layers.json beside them holds
what each text layer was drawn with), read with psd-tools and scaled as the app scales layers (premultiplied
Lanczos) so their long side is 640 px, the model's 640 bucket. Every expected value comes from the drawing, never
from the code under test. The OCR is made once for the module, of the layers that matter (READ: ~2.5 s on 2 idle
cores); bench/bench_text_layers.py reads all 52 layers of the set, and finds text in exactly the drawn ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import app
from studio import design
from studio.exports import SLIDE_LONG_SIDE_EMU, export_pptx, export_psd
from studio.images import composite_layers, layer_names, read_layered_file, resize_layers
from studio.scores import layer_report

GT_DIR = app.ROOT_DIR / "assets" / "layered_gt"
TRUTH = json.loads((GT_DIR / "text_layers.json").read_text())
LONG_SIDE = 640


def at_640(layers: list[Image.Image]) -> list[Image.Image]:
    width, height = layers[0].size
    scale = LONG_SIDE / max(width, height)
    return resize_layers(layers, (round(width * scale), round(height * scale)))


def scale_of(name: str) -> float:
    return LONG_SIDE / max(read_layered_file(GT_DIR / f"{name}.psd")[0].size)


def floats(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def designs() -> dict[str, list[Image.Image]]:
    return {path.stem: at_640(read_layered_file(path)) for path in sorted(GT_DIR.glob("*.psd"))}


# The layers read: every drawn text layer, and every other layer in which the recogniser sees anything at all (the
# engine run on all 52 layers: 07's bar read as '■' at 0.52, 08's rounded cards as '口' at 0.60-0.64, 11's line
# chart as '//' at 0.90), plus 11's bar chart. The other layers read as nothing.
DECOYS = {"07_wide_header": [3], "08_six_cards": [2, 3, 5], "11_chart": [2, 3]}
READ = {name: sorted({line["layer"] for line in TRUTH.get(name, [])} | set(DECOYS.get(name, [])))
        for name in sorted(set(TRUTH) | set(DECOYS))}


@pytest.fixture(scope="module")
def texts(designs) -> dict[str, list[design.LayerText | None]]:
    """design -> per layer what the OCR read, None for a layer not read (not in READ)."""
    read = {}
    for name, numbers in READ.items():
        found = iter(design.read_layer_text([designs[name][number - 1] for number in numbers]))
        read[name] = [next(found) if index + 1 in numbers else None for index in range(len(designs[name]))]
    return read


# ----------------------------------------------------------------------------------------------------
# Text layers
# ----------------------------------------------------------------------------------------------------
def test_the_module_imports_neither_torch_nor_the_app():
    code = ("import sys; sys.path.insert(0, 'src'); import studio.design; "
            "print('torch' in sys.modules, 'app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=app.ROOT_DIR, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_exactly_the_drawn_text_layers_are_text_layers(texts):
    drawn = {(name, line["layer"]) for name, lines in TRUTH.items() for line in lines}
    found = {(name, index + 1) for name, layer_texts in texts.items() for index, text in enumerate(layer_texts)
             if text is not None and text.is_text}
    assert found == drawn
    decoys = [texts[name][number - 1] for name, numbers in DECOYS.items() for number in numbers]
    assert len(decoys) == 6 and not any(text.lines for text in decoys)  # no line passes the filters


def test_english_lines_read_within_5_percent_character_errors(texts):
    errors = chars = 0
    for name, lines in TRUTH.items():
        for line in lines:
            read = texts[name][line["layer"] - 1].text
            errors += design.edit_distance(read, line["text"])
            chars += len(line["text"])
    assert chars == 65
    assert errors / chars <= 0.05


def test_each_line_has_its_drawn_colour_opacity_and_font_size(texts):
    for name, lines in TRUTH.items():
        scale = scale_of(name)
        for line in lines:
            (read,) = texts[name][line["layer"] - 1].lines
            assert np.abs(np.subtract(read.colour, line["fill"])).max() <= 6, (name, read.colour)
            assert read.opacity == pytest.approx(line["opacity"] / 255, abs=0.03), (name, read.opacity)
            assert read.font_px == pytest.approx(line["font_size"] * scale, rel=0.10), (name, read.font_px)
            # Pillow draws the text with its top-left at xy; the ink starts within a few pixels of it.
            assert abs(read.ink_left - line["xy"][0] * scale) <= 0.15 * read.font_px, (name, read.ink_left)


def test_the_bundled_recogniser_has_no_hangul_so_korean_needs_another_model():
    import onnxruntime
    import rapidocr_onnxruntime

    model = next((Path(rapidocr_onnxruntime.__file__).parent / "models").glob("*_rec_infer.onnx"))
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    characters = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    assert len(characters) > 6000 and "层" in characters and "A" in characters
    assert not [c for c in characters if "\uac00" <= c <= "\ud7a3"]  # the 11,172 Hangul syllables
    assert design.ocr_model("ko") is design.KOREAN_OCR and design.ocr_model("ko").repo_id is not None


def test_drawn_hangul_reads_as_no_korean_with_the_bundled_model():
    fonts = [font for font in ("/usr/share/fonts/truetype/nanum/NanumGothic.ttf",) if Path(font).is_file()]
    if not fonts:
        pytest.skip("no Hangul font here (Debian: apt-get install fonts-nanum)")
    layer = Image.new("RGBA", (640, 160), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((20, 50), "레이어 스튜디오", fill=(20, 20, 20, 255), font=ImageFont.truetype(fonts[0], 48))
    (text,) = design.read_layer_text([layer])
    assert not any("\uac00" <= c <= "\ud7a3" for c in text.text)
    assert not text.is_text  # what it misreads is not made a text box


def test_korean_offline_says_where_to_put_the_model(tmp_path):
    with pytest.raises(design.OcrModelNotAvailableError) as caught:
        design.fetch_ocr_model(design.KOREAN_OCR, tmp_path, offline=True)
    message = str(caught.value)
    assert str(tmp_path / "ocr" / design.KOREAN_OCR.filename) in message
    assert "network access" in message and design.KOREAN_OCR.repo_id in message
    assert isinstance(caught.value, OSError)  # the app's user errors: a message and exit code 2, no traceback


def test_reading_korean_offline_stops_with_that_message(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    with pytest.raises(design.OcrModelNotAvailableError, match="Put the file at: "):
        design.read_layer_text([Image.new("RGBA", (64, 64))], language="ko", models_dir=tmp_path)


def test_a_korean_model_already_in_models_is_used_without_the_network(tmp_path):
    local = tmp_path / "ocr" / design.KOREAN_OCR.filename
    local.parent.mkdir(parents=True)
    local.write_bytes(b"onnx")
    assert design.fetch_ocr_model(design.KOREAN_OCR, tmp_path, offline=True) == local


def test_an_unknown_language_names_the_ones_there_are():
    with pytest.raises(ValueError, match=r"language='fr'.*\['en', 'ko', 'zh'\]"):
        design.ocr_model("fr")


# ----------------------------------------------------------------------------------------------------
# Text into PPTX, PSD and params.json
# ----------------------------------------------------------------------------------------------------
def test_pptx_text_layers_become_text_boxes_above_their_hidden_pictures(designs, texts, tmp_path):
    layers, layer_texts = designs["09_ticket"], texts["09_ticket"]
    names = layer_names(layers)
    path = export_pptx(layers, tmp_path / "ticket.pptx", names, layer_texts)

    from pptx import Presentation

    shapes = list(Presentation(str(path)).slides[0].shapes)
    order = [shape.name for shape in shapes]
    assert order == [names[0], names[1], names[2], f"{names[2]}: ADMIT", names[3], f"{names[3]}: ONE"]
    hidden = [shape.name for shape in shapes if shape._element._nvXxPr.cNvPr.get("hidden") == "1"]
    assert hidden == [names[2], names[3]]
    one = shapes[-1].text_frame.paragraphs[0].runs[0]
    assert one.text == "ONE" and one.font.name == "Arial"
    emu_per_px = SLIDE_LONG_SIDE_EMU // max(layers[0].size)  # export_pptx's
    assert one.font.size.pt == pytest.approx(36 * scale_of("09_ticket") * emu_per_px / 12700, rel=0.10)
    assert np.abs(np.subtract(tuple(one.font.color.rgb), (250, 230, 180))).max() <= 6


def test_psd_text_layers_are_named_by_their_text(designs, texts, tmp_path):
    from psd_tools import PSDImage

    layers = designs["09_ticket"]
    names = design.text_layer_names(layer_names(layers), texts["09_ticket"])
    export_psd(layers, tmp_path / "ticket.psd", names)
    read = [layer.name for layer in PSDImage.open(tmp_path / "ticket.psd")]
    assert read == ["Layer 1 (bottom)", "Layer 2", "Text: ADMIT", "Text: ONE"]


def test_params_record_the_text_read_as_json(texts):
    (record,) = json.loads(json.dumps(design.text_params(texts["11_chart"])))
    assert record["layer"] == 4 and record["is_text"] is True
    assert [line["text"] for line in record["lines"]] == ["Sales 2025"]
    assert record["lines"][0]["colour"] == pytest.approx([40, 40, 40], abs=4)


# ----------------------------------------------------------------------------------------------------
# evaluate's text score
# ----------------------------------------------------------------------------------------------------
def test_edit_distance_by_hand():
    assert design.edit_distance("kitten", "sitting") == 3
    assert design.edit_distance("", "abc") == 3
    assert design.edit_distance("SALE-40%", "SALE -40%") == 1


def test_ground_truth_text_comes_from_the_drawing(tmp_path):
    assert design.ground_truth_text(GT_DIR / "09_ticket.psd") == ["ADMIT", "ONE"]
    assert design.ground_truth_text(GT_DIR / "01_minimal_square.psd") == []
    assert design.ground_truth_text(tmp_path / "x.psd") is None


def test_text_cer_of_the_ground_truth_itself_and_of_layers_without_their_text(designs, texts):
    truth = design.ground_truth_text(GT_DIR / "09_ticket.psd")
    score = design.text_cer(designs["09_ticket"], truth, texts=texts["09_ticket"])
    assert score["cer"] == 0 and [row["read"] for row in score["lines"]] == ["ADMIT", "ONE"]
    without_text = designs["09_ticket"][:2]
    score = design.text_cer(without_text, truth, texts=texts["09_ticket"][:2])
    assert score["cer"] == 1.0 and score["errors"] == 8 and [row["read"] for row in score["lines"]] == [None, None]


def test_text_cer_counts_the_dropped_space(designs, texts):
    truth = ["SALE -40%"]
    strict = design.text_cer(designs["03_sale_banner"], truth, texts=texts["03_sale_banner"])
    loose = design.text_cer(designs["03_sale_banner"], truth, texts=texts["03_sale_banner"], ignore_spaces=True)
    assert (strict["errors"], strict["chars"], loose["errors"], loose["chars"]) == (1, 9, 0, 8)


# ----------------------------------------------------------------------------------------------------
# No empty or repeated layers
# ----------------------------------------------------------------------------------------------------
def speck() -> Image.Image:
    """A layer of 6 x 6 opaque red pixels on 256 x 256 (coverage 0.00055, under EMPTY_LAYER_COVERAGE, 0.001), in
    the top-right corner, which no card of 08_six_cards covers."""
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((240, 10, 245, 15), fill=(255, 0, 0, 255))
    return layer


def test_tidy_drops_the_empty_layer_and_merges_the_duplicate_into_the_one_below():
    cards = read_layered_file(GT_DIR / "08_six_cards.psd")  # 6 layers, 256 x 256
    asked = cards[:3] + [speck(), cards[3].copy(), cards[3]] + cards[4:]  # 8 layers: 4 a speck, 6 repeats 5
    result = design.tidy_layers(asked, layer_report(asked))
    assert result.summary() == "8 layers asked, 6 kept (1 empty, 1 merged into a near-duplicate below)"
    assert result.kept == [1, 2, 3, 5, 7, 8]
    assert result.dropped == [dict(layer=4, coverage=pytest.approx(36 / 256 ** 2))]
    assert result.merged == [dict(layer=6, into=5)]
    # The composite changes by no more than the dropped layer's pixels contribute (their alpha), plus rounding.
    before, after = floats(composite_layers(asked)), floats(composite_layers(result.layers))
    dropped_alpha = floats(asked[3])[..., 3:]
    assert (np.abs(after - before) <= dropped_alpha + 2 / 255).all()
    assert np.abs(after - before).max() > 0.5  # the speck was visible: the bound above is not vacuous


def test_tidy_leaves_a_duplicate_with_other_layers_between_and_keeps_one_layer_of_all_empty():
    cards = read_layered_file(GT_DIR / "08_six_cards.psd")
    asked = cards[:3] + [cards[1].copy()]  # 4 repeats 2, with 3 between them
    result = design.tidy_layers(asked, layer_report(asked))
    assert layer_report(asked)[3]["duplicate_of"] == 2 and result.kept == [1, 2, 3, 4] and not result.merged
    empty = [Image.new("RGBA", (256, 256), (0, 0, 0, 0)), speck()]
    result = design.tidy_layers(empty, layer_report(empty))
    assert result.kept == [2] and result.summary() == "2 layers asked, 1 kept (1 empty)"


def test_tidy_with_a_coverage_threshold_and_its_params_record():
    cards = read_layered_file(GT_DIR / "08_six_cards.psd")
    report = layer_report(cards)
    smallest = min(row["coverage"] for row in report)  # a card: 100 x 100 of 256 x 256, 0.15
    result = design.tidy_layers(cards, report, min_coverage=smallest + 1e-9)
    assert len(result.dropped) == sum(row["coverage"] <= smallest for row in report) >= 1
    assert json.loads(json.dumps(result.as_params()))["asked"] == 6


# ----------------------------------------------------------------------------------------------------
# Clean edges
# ----------------------------------------------------------------------------------------------------
def soft_edged_layers(designs):
    """(design, index, layer, what it was drawn on) for every layer above the bottom with opaque pixels and a
    soft edge (the 640 px scaling softens every edge)."""
    for name, layers in designs.items():
        for index in range(1, len(layers)):
            alpha = np.asarray(layers[index])[..., 3]
            if (alpha >= design.EDGE_OPAQUE_ALPHA).any() and ((alpha > 0) & (alpha < 254)).sum() >= 1000:
                yield name, index, layers[index], composite_layers(layers[:index])


def contaminate(layer: Image.Image, behind: Image.Image) -> Image.Image:
    """What a model returns for a soft edge: its colour mixed with what was behind, a * rgb + (1 - a) * behind."""
    rgba = floats(layer)
    alpha = rgba[..., 3:]
    mixed = rgba.copy()
    mixed[..., :3] = alpha * rgba[..., :3] + (1 - alpha) * floats(behind)[..., :3]
    return Image.fromarray((mixed * 255).round().astype(np.uint8), "RGBA")


def test_clean_edges_cuts_the_halo_over_a_new_background_and_leaves_opaque_pixels_alone(designs):
    errors_before, errors_after, checked = [], [], []
    for name, index, layer, behind in soft_edged_layers(designs):
        observed = contaminate(layer, behind)
        cleaned = design.decontaminate_edges(observed)
        new_background = 1 - floats(behind)[..., :3]  # a different background: the old one's negative

        def over(image, background=new_background):
            rgba = floats(image)
            return rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]) * background

        alpha = np.asarray(layer)[..., 3]
        fringe = (alpha > 0) & (alpha < 255)
        truth = over(layer)
        errors_before.append(np.abs(over(observed) - truth).mean(-1)[fringe].mean() * 255)
        errors_after.append(np.abs(over(cleaned) - truth).mean(-1)[fringe].mean() * 255)
        opaque = alpha >= design.EDGE_OPAQUE_ALPHA
        assert (np.asarray(cleaned)[opaque] == np.asarray(observed)[opaque]).all(), (name, index)
        assert (np.asarray(cleaned)[..., 3] == np.asarray(observed)[..., 3]).all(), (name, index)
        checked.append((name, index))
    assert len(checked) == 25
    # Measured: 10.6 -> 1.4 levels of 255 on average (7.7x); every layer at least 2.5x ("ONE", drawn at 86 %
    # opacity, has no opaque interior of its own but the resampling's overshoot).
    assert np.mean(errors_before) / np.mean(errors_after) >= 6
    assert min(b / a for b, a in zip(errors_before, errors_after)) >= 2


def test_clean_edges_changes_nothing_without_an_opaque_pixel(designs):
    shadow = designs["12_button_shadow"][1]  # a blurred rectangle at 43 % opacity: no interior to carry colour from
    assert np.asarray(shadow)[..., 3].max() < design.EDGE_OPAQUE_ALPHA
    assert np.array_equal(np.asarray(design.decontaminate_edges(shadow)), np.asarray(shadow))
