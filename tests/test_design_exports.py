"""The designer's options end to end (issue 26): the PARAMS rows tidy_layers, clean_edges, text_layers, text_language
and name_layers, from the flags and the page through `finish_layers` to the run folder, read back as a designer opens
it (python-pptx, LibreOffice, psd-tools, zipfile), the gallery, and evaluate's text score.

The run is one of the project's designs, assets/layered_gt/09_ticket.psd at 640 px (a background, a card, the text
layers "ADMIT" and "ONE"), handed to the options as if the model had returned it with two faults added: an empty
layer and a second copy of the card. Names come from the demo model through the app's own lock (noise words, or none).
"""

import functools
import json
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image

import app
from conftest import demo_settings
from studio import design
from studio.exports import SLIDE_LONG_SIDE_EMU, export_zip
from studio.images import composite_layers, read_layered_file, resize_layers
from studio.naming import LayerLabels, named_layer_file
from studio.batch import decompose_batch
from studio.params import DESIGN_PARAMS, PARAM, PARAMS, check_param
from studio.runs import DecomposeResult, completed_images, run_folder_complete, save_run
from studio.stack import LayerStack

GT_DIR = app.ROOT_DIR / "assets" / "layered_gt"
SUMMARY = "6 layers asked, 4 kept (1 empty, 1 merged into a near-duplicate below)"


def floats(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0


SCALE = 640 / 288  # 09_ticket is 216 x 288: 480 x 640 at the model's 640 bucket


def ticket_at_640() -> list[Image.Image]:
    return resize_layers(read_layered_file(GT_DIR / "09_ticket.psd"), (480, 640))


def contaminated(layer: Image.Image, behind: Image.Image) -> Image.Image:
    """What a model returns for a soft edge: its colour mixed with what was behind it, a * rgb + (1 - a) * behind."""
    rgba, under = floats(layer), floats(behind)
    rgba[..., :3] = rgba[..., 3:] * rgba[..., :3] + (1 - rgba[..., 3:]) * under[..., :3]
    return Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")


@pytest.fixture(scope="module")
def run(demo_pipe, tmp_path_factory):
    """(drawn layers, finished, result, paths): every option on, saved with an original-size export twice as large."""
    drawn = ticket_at_640()
    empty = Image.new("RGBA", drawn[0].size, (0, 0, 0, 0))
    asked = [drawn[0], drawn[1], drawn[1].copy(), contaminated(drawn[2], composite_layers(drawn[:2])), empty, drawn[3]]
    finished = design.finish_layers(asked, tidy=True, clean_edges=True, text_layers=True, language="en",
                                    name=functools.partial(app.name_layers_locked, demo_pipe))
    result = DecomposeResult(layers=finished.layers, caption="ticket", auto_caption=False, seed=9,
                             params=dict(finished.record, layers=len(asked)), duration_s=0.0,
                             labels=LayerLabels(finished.names, finished.texts))
    size = (2 * drawn[0].width, 2 * drawn[0].height)
    paths = save_run(result, tmp_path_factory.mktemp("runs"), original_size=size)
    return drawn, finished, result, paths


def params_of(paths) -> dict:
    return json.loads(paths["params"].read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# No empty or duplicate layers; clean edges
# ----------------------------------------------------------------------------------------------------
def test_the_empty_layer_is_dropped_and_the_copy_merged_and_params_say_so(run):
    drawn, finished, _, paths = run
    tidy = params_of(paths)["tidy"]
    assert tidy["summary"] == SUMMARY and tidy["kept"] == [1, 2, 4, 6]
    assert tidy["dropped"] == [dict(layer=5, coverage=0.0)] and tidy["merged"] == [dict(layer=3, into=2)]
    assert len(paths["layers"]) == 4 == len(drawn)


def test_the_exported_layers_have_clean_edges_and_their_opaque_pixels_as_given(run):
    drawn, _, _, paths = run
    admit = Image.open(paths["layers"][2])  # given mixed with the red card behind it (`contaminated`)
    given = contaminated(drawn[2], composite_layers(drawn[:2]))
    alpha = np.asarray(drawn[2])[..., 3]
    fringe, opaque = (alpha > 0) & (alpha < 255), alpha == 255
    assert np.array_equal(np.asarray(admit)[..., 3], alpha)
    assert np.array_equal(np.asarray(admit)[opaque], np.asarray(given)[opaque])

    def fringe_error(image):  # the halo on any new background: mean |a * (rgb - drawn rgb)| on the soft edge, of 255
        difference = floats(image)[..., :3] - floats(drawn[2])[..., :3]
        return np.abs(difference * floats(drawn[2])[..., 3:]).mean(-1)[fringe].mean() * 255

    print(f"ADMIT's fringe: {fringe_error(given):.1f} -> {fringe_error(admit):.1f} levels")
    # Measured 13.0 -> 0.3 levels: the white of its strokes carried into its edge.
    assert fringe_error(given) > 10 and fringe_error(admit) < fringe_error(given) / 10


# ----------------------------------------------------------------------------------------------------
# Named layers and the run folder
# ----------------------------------------------------------------------------------------------------
def test_named_files_in_the_zip_and_the_folder_and_the_folder_counts_as_whole(run):
    _, finished, _, paths = run
    names = params_of(paths)["layer_names"]
    assert names == finished.names and len(names) == 4
    files = [named_layer_file(index, name or "") for index, name in enumerate(names)]
    assert params_of(paths)["layer_files"] == files == [path.name for path in paths["layers"]]
    with zipfile.ZipFile(paths["zip"]) as archive:
        listed = archive.namelist()
    assert [name for name in listed if "/" not in name and name.startswith("layer_")] == files
    assert [name.removeprefix("original_size/") for name in listed if name.startswith("original_size/layer_")] == files
    assert run_folder_complete(paths["folder"])
    (paths["folder"] / files[1]).rename(paths["folder"] / "moved.png")  # a named layer missing: not whole
    try:
        assert not run_folder_complete(paths["folder"])
    finally:
        (paths["folder"] / "moved.png").rename(paths["folder"] / files[1])


def test_the_named_zip_reads_back_in_layer_order_in_the_combine_tool_and_evaluate(run):
    import sys

    sys.path.insert(0, str(app.ROOT_DIR / "src" / "tool"))
    import combine_layers

    _, _, result, paths = run
    mixed = LayerLabels((None, "card", None, "title"))  # some layers named, some not (the model gave no name)
    archive = export_zip(result.layers, paths["folder"].parent / "mixed.zip", file_names=mixed.file_names(4))
    for zip_file in (paths["zip"], archive):
        for read in ([layer.image for layer in combine_layers.read_layers(zip_file)], read_layered_file(zip_file)):
            assert len(read) == 4
            assert all(np.array_equal(np.asarray(a.convert("RGBa")), np.asarray(b.convert("RGBa")))
                       for a, b in zip(read, result.layers))


def test_the_gallery_shows_names_and_text_and_says_what_was_dropped(run):
    _, finished, result, paths = run
    stack = LayerStack(layers=result.layers, run_folder=paths["folder"], files=paths, labels=result.labels)
    captions = [caption for _, caption in app.stack_view(stack).gallery]
    named = [f": {name}" if name else "" for name in finished.names]
    assert captions[0] == "Layer 1 (bottom)" + named[0] and captions[1] == "Layer 2" + named[1]
    assert captions[2] == "Layer 3" + (f"{named[2]}, " if named[2] else ": ") + 'Text "ADMIT"'
    assert captions[3] == "Layer 4" + (f"{named[3]}, " if named[3] else ": ") + 'Text "ONE"'
    assert app.gallery_note(stack) == SUMMARY and app.gallery_note(None) == ""


def test_a_sub_run_splices_its_labels_into_the_stacks():
    text = design.LayerText((), 0.0)
    stack = LayerLabels(("sky", None, "title"), (None, None, text))
    sub = LayerLabels(("left", "right"), None)
    spliced = stack.replaced(3, 1, sub, 2)
    assert spliced.names == ("sky", "left", "right", "title") and spliced.texts == (None, None, None, text)
    assert LayerLabels().replaced(3, 0, LayerLabels(), 2) == LayerLabels()


# ----------------------------------------------------------------------------------------------------
# Editable text: PPTX (python-pptx, LibreOffice), PSD (psd-tools), params.json
# ----------------------------------------------------------------------------------------------------
def shapes_of(path):
    from pptx import Presentation

    presentation = Presentation(str(path))
    return presentation, list(presentation.slides[0].shapes)


def test_the_pptx_has_a_text_box_per_line_above_its_hidden_picture(run):
    drawn, finished, result, paths = run
    names = result.labels.layer_names(result.layers)
    assert names[:2] == [finished.names[0] or "Layer 1 (bottom)", finished.names[1] or "Layer 2"]
    _, shapes = shapes_of(paths["pptx"])
    assert [shape.name for shape in shapes] == [names[0], names[1], names[2], f"{names[2]}: ADMIT", names[3],
                                                f"{names[3]}: ONE"]
    assert [shape._element._nvXxPr.cNvPr.get("hidden") for shape in shapes] == [None, None, "1", None, "1", None]
    admit = shapes[3].text_frame.paragraphs[0].runs[0]
    assert admit.text == "ADMIT" and tuple(admit.font.color.rgb) == pytest.approx((255, 255, 255), abs=6)
    emu_per_px = SLIDE_LONG_SIDE_EMU // 640
    assert admit.font.size.pt == pytest.approx(40 * SCALE * emu_per_px / 12700, rel=0.10)  # drawn at 40 px
    # At the original size (twice as large) the slide is as large and the text at the same place and size on it.
    _, big = shapes_of(paths["original"]["pptx"])
    assert [shape.name for shape in big] == [shape.name for shape in shapes]
    for small, large in zip(shapes[3::2], big[3::2]):
        assert large.left == pytest.approx(small.left, rel=0.01) and large.top == pytest.approx(small.top, rel=0.01)
        size = large.text_frame.paragraphs[0].runs[0].font.size.pt
        assert size == pytest.approx(small.text_frame.paragraphs[0].runs[0].font.size.pt, rel=0.01)


@pytest.mark.skipif(not (shutil.which("soffice") and shutil.which("pdftotext") and shutil.which("pdftoppm")),
                    reason="needs LibreOffice and poppler")
def test_libreoffice_shows_the_runs_text_as_text_where_the_picture_was(run, tmp_path):
    _, _, result, paths = run
    profile = f"-env:UserInstallation={(tmp_path / 'lo-profile').as_uri()}"  # its own: another soffice may run
    subprocess.run(["soffice", profile, "--headless", "--convert-to", "pdf", "--outdir", str(tmp_path),
                    str(paths["pptx"])], check=True, capture_output=True, timeout=180)
    (pdf,) = tmp_path.glob("*.pdf")
    words = subprocess.run(["pdftotext", str(pdf), "-"], check=True, capture_output=True, text=True).stdout.split()
    assert words == ["ADMIT", "ONE"]  # selectable text, not pixels
    width, height = result.layers[0].size
    subprocess.run(["pdftoppm", "-png", "-singlefile", "-scale-to-x", str(width), "-scale-to-y", str(height), str(pdf),
                    str(tmp_path / "page")], check=True)
    page = floats(Image.open(tmp_path / "page.png"))[..., :3]
    composite = floats(composite_layers(result.layers))[..., :3]
    # Measured 2.8 levels of 255: the text is Arial (Liberation Sans here), not the font it was drawn with.
    assert np.abs(page - composite).mean() * 255 < 4.0


def test_the_psd_names_text_layers_by_their_text_and_keeps_the_pixels(run):
    from psd_tools import PSDImage

    _, finished, result, paths = run
    psd = PSDImage.open(paths["psd"])
    assert [layer.name for layer in psd] == [finished.names[0] or "Layer 1 (bottom)", finished.names[1] or "Layer 2",
                                            "Text: ADMIT", "Text: ONE"]
    for saved, layer in zip(result.layers, read_layered_file(paths["psd"])):  # the same pixels (any colour at alpha 0)
        assert np.array_equal(np.asarray(saved.convert("RGBa")), np.asarray(layer.convert("RGBa")))
    big = PSDImage.open(paths["original"]["psd"])
    assert [layer.name for layer in big] == [layer.name for layer in psd]


def test_params_json_holds_the_strings_with_their_place_and_colour(run):
    _, _, _, paths = run
    text = params_of(paths)["text"]
    assert [(row["layer"], row["is_text"], [line["text"] for line in row["lines"]]) for row in text] == \
        [(3, True, ["ADMIT"]), (4, True, ["ONE"])]
    assert text[1]["lines"][0]["opacity"] == pytest.approx(220 / 255, abs=0.03)  # drawn at 220 of 255
    assert set(params_of(paths)["design_seconds"]) == {"tidy", "clean_edges", "ocr", "naming"}


# ----------------------------------------------------------------------------------------------------
# The options: flags, page, Korean
# ----------------------------------------------------------------------------------------------------
def test_each_option_is_a_params_row_with_its_flag_and_none_reaches_the_pipeline():
    _, _, ns = app.parse_args(["decompose", "x.png", "--no-tidy-layers", "--clean-edges", "--text-layers",
                               "--text-language", "ko", "--name-layers"])
    assert {name: getattr(ns, name) for name in DESIGN_PARAMS} == dict(
        tidy_layers=False, clean_edges=True, text_layers=True, text_language="ko", name_layers=True)
    assert [PARAM[name].default for name in DESIGN_PARAMS] == [True, False, False, "en", False]
    assert not any(PARAM[name].pipeline for name in DESIGN_PARAMS)
    with pytest.raises(ValueError, match=r"text_language='fr' is not supported: use one of \('en', 'zh', 'ko'\)"):
        check_param("text_language", "fr")


def test_the_page_shows_the_options_in_one_row(demo_pipe, models_dir, tmp_path):
    demo = app.build_ui(demo_pipe, demo_settings(models_dir, outputs=tmp_path))
    labels = {PARAM[name].label: name for name in DESIGN_PARAMS}
    found = [block for block in demo.blocks.values() if getattr(block, "label", None) in labels]
    assert sorted(labels[block.label] for block in found) == sorted(DESIGN_PARAMS)
    assert len({id(block.parent) for block in found}) == 1  # one group (Gradio's Form) in one Row
    assert type(found[0].parent).__name__ == "Form" and type(found[0].parent.parent).__name__ == "Row"
    assert next(block for block in found if block.label == PARAM["tidy_layers"].label).value is True
    # The line under the gallery follows each run, sub-run, edit of a layer and undo (`gallery_note`), not part of
    # the API.
    notes = [fn for fn in demo.fns.values() if fn.fn is app.gallery_note]
    assert len(notes) == 4 and all(fn.api_visibility == "private" for fn in notes)


def test_korean_text_offline_is_a_note_and_the_run_goes_on(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    layers = ticket_at_640()
    finished = design.finish_layers(layers, text_layers=True, language="ko", models_dir=tmp_path)
    assert finished.texts is None and len(finished.layers) == 4
    (note,) = finished.notes
    assert f"Put the file at: {tmp_path / 'ocr' / design.KOREAN_OCR.filename}" in note


def test_decompose_with_every_option_on_the_demo_model(demo_pipe, tmp_path):
    """The flags, as `main` reads them, through `infer` into a whole run folder (the demo's layers are noise: no text
    is found in them, and its names are noise words, or none)."""
    image = tmp_path / "ticket.png"
    composite_layers(read_layered_file(GT_DIR / "09_ticket.psd")).save(image)
    _, _, ns = app.parse_args(["decompose", str(image), "--steps", "2", "--layers", "2", "--prompt", "a ticket",
                               "--clean-edges", "--text-layers", "--name-layers"])
    (item,) = decompose_batch(demo_pipe, app.infer, [image], tmp_path / "out", **{p.name: getattr(ns, p.name)
                                                                                  for p in PARAMS})
    assert item.error is None and completed_images(tmp_path / "out") == {str(image.resolve()): item.folder}
    params = json.loads((item.folder / "params.json").read_text(encoding="utf-8"))
    assert [params[name] for name in DESIGN_PARAMS] == [True, True, True, "en", True]
    assert params["tidy"]["summary"] == "2 layers asked, 2 kept" and params["text"] == []
    assert len(params["layer_names"]) == 2 and set(params["design_seconds"]) == {"tidy", "clean_edges", "ocr", "naming"}
    assert params["layer_files"] == [named_layer_file(i, name or "") for i, name in enumerate(params["layer_names"])]
    print(f"demo model (CPU), {params['duration_s']:.1f} s + {params['design_seconds']}")


# ----------------------------------------------------------------------------------------------------
# evaluate's text score
# ----------------------------------------------------------------------------------------------------
def test_evaluate_scores_the_text_read_in_the_predicted_layers(tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(GT_DIR / "09_ticket.psd", pred / "09_ticket.psd")  # its text layers as drawn
    banner = read_layered_file(GT_DIR / "03_sale_banner.psd")
    (pred / "03_sale_banner").mkdir()
    for index, layer in enumerate(banner[:2]):  # "SALE -40%" (layer 3) left out
        layer.save(pred / "03_sale_banner" / f"layer_{index + 1}.png")
    truths = [str(GT_DIR / "03_sale_banner.psd"), str(GT_DIR / "09_ticket.psd"), str(GT_DIR / "01_minimal_square.psd")]
    out = tmp_path / "out"
    shutil.copy(GT_DIR / "01_minimal_square.psd", pred / "01_minimal_square.psd")
    assert app.main(["evaluate", *truths, "--pred", str(pred), "--out", str(out)]) == 0
    report = json.loads((out / "evaluate.json").read_text())
    rows = {row["ground_truth"].rsplit("/", 1)[1]: row for row in report["rows"]}
    assert rows["09_ticket.psd"]["text_cer"] == 0 and rows["03_sale_banner.psd"]["text_cer"] == 1.0
    assert [line["read"] for line in rows["09_ticket.psd"]["text"]["lines"]] == ["ADMIT", "ONE"]
    assert "text_cer" not in rows["01_minimal_square.psd"]  # no text drawn: no text score
    assert report["summary"][0]["mean_text_cer"] == 0.5
    assert "text CER" in capsys.readouterr().out
    header = (out / "evaluate.csv").read_text().splitlines()[0].split(",")
    assert "text_cer" in header
