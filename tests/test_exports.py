"""Exports that open right in real applications.

The layers here are synthetic (flat shapes on transparency, at known places), because the demo model's
layers are noise: a shape's bounding box and offset are known in advance, so cropping and placement can
be asserted exactly. Real applications check the files: psd-tools and python-pptx read them back,
ImageMagick flattens the PSD, LibreOffice Impress renders the PPTX.
"""

import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import app
from studio.exports import FILE_NAME_TEXT_MAX_BYTES, SLIDE_LONG_SIDE_EMU, export_pptx, export_psd, export_stem, safe_file_text
from studio.images import ORIGINAL_SIZE_RESAMPLE, composite_layers, crop_to_alpha, layer_names, resize_layers
from studio.runs import DecomposeResult, save_run

SIZE = (300, 200)
BLUE_BOX = (40, 30, 140, 120)  # left, top, right, bottom (exclusive), as PIL's getbbox gives it
RED_BOX = (150, 60, 260, 170)
# The LibreOffice rendering may differ from our composite by this much, mean over every RGB value (of 255).
# Measured with LibreOffice 7.4 (Debian 12): 0.0 for the shapes below, 0.08 for noise layers.
LIBREOFFICE_MEAN_DIFF_MAX = 1.0


def shape(box, fill, ellipse=False) -> Image.Image:
    layer = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    (draw.ellipse if ellipse else draw.rectangle)([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill)
    return layer


@pytest.fixture
def shape_layers() -> list[Image.Image]:
    """Bottom first: an opaque backdrop, a blue rectangle, an empty layer, a red disc with a half-transparent band."""
    red = shape(RED_BOX, (220, 30, 30, 255), ellipse=True)
    ImageDraw.Draw(red).rectangle([170, 100, 239, 129], fill=(220, 30, 30, 128))
    return [Image.new("RGBA", SIZE, (235, 225, 200, 255)), shape(BLUE_BOX, (30, 90, 200, 255)),
            Image.new("RGBA", SIZE, (0, 0, 0, 0)), red]


@pytest.fixture
def noise_layers() -> list[Image.Image]:
    """The worst case for compositing: random colours and alphas, overlapping patches (like the demo's noise)."""
    rng = np.random.default_rng(0)
    layers = []
    for index in range(4):
        pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], 4), dtype=np.uint8)
        if index > 0:  # patches of random alpha on transparency; the bottom layer stays opaque
            left, top = 40 * index, 30 * index
            outside = np.ones(SIZE[::-1], bool)
            outside[top:top + 90, left:left + 120] = False
            pixels[outside, 3] = 0
        else:
            pixels[..., 3] = 255
        layers.append(Image.fromarray(pixels, "RGBA"))
    return layers


def array(image: Image.Image, mode: str = "RGBA") -> np.ndarray:
    return np.asarray(image.convert(mode)).astype(int)


# ---- cropping, names, resizing, file names ---------------------------------------------------------
def test_crop_to_alpha_gives_the_shape_and_its_offset_and_is_lossless(shape_layers):
    blue = shape_layers[1]
    cropped, offset = crop_to_alpha(blue)
    assert offset == BLUE_BOX[:2]
    assert cropped.size == (BLUE_BOX[2] - BLUE_BOX[0], BLUE_BOX[3] - BLUE_BOX[1])
    rebuilt = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    rebuilt.paste(cropped, offset)
    assert np.array_equal(array(rebuilt), array(blue))


def test_crop_to_alpha_of_a_fully_transparent_layer_is_none():
    assert crop_to_alpha(Image.new("RGBA", SIZE, (255, 255, 255, 0))) is None


def test_layer_names_say_bottom_top_and_empty(shape_layers):
    assert layer_names(shape_layers) == ["Layer 1 (bottom)", "Layer 2", "Layer 3 (empty)", "Layer 4 (top)"]


def test_exporters_reject_layers_of_different_sizes(tmp_path, shape_layers):
    layers = shape_layers[:1] + [Image.new("RGBA", (64, 64))]
    with pytest.raises(ValueError, match="layer 2 is 64x64 but layer 1 is 300x200"):
        export_psd(layers, tmp_path / "x.psd")


def test_resize_to_original_size_keeps_a_red_edge_red_where_straight_alpha_darkens_it():
    red = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black around an opaque red disc
    ImageDraw.Draw(red).ellipse([12, 12, 51, 51], fill=(255, 0, 0, 255))
    size = (300, 200)  # an upscale, and a change of aspect ratio

    resized = array(resize_layers([red], size)[0])
    edge = (resized[..., 3] > 0) & (resized[..., 3] < 255)
    assert edge.sum() > 300  # the disc's whole rim, not a few pixels
    assert resized[edge, 0].min() >= 250 and resized[edge, 1:3].max() <= 5  # red, no dark fringe

    # The same resize on straight (non-premultiplied) channels mixes the transparent black into the rim:
    # the check above would catch it.
    straight = array(Image.merge("RGBA", [band.resize(size, ORIGINAL_SIZE_RESAMPLE) for band in red.split()]))
    assert np.median(straight[edge, 0]) < 200


@pytest.mark.parametrize("text, expected", [
    ("a red apple", "a-red-apple"),
    ("빨간 사과", "빨간-사과"),  # Hangul
    ("红色的苹果。", "红色的苹果"),  # Han, and the ideographic full stop goes
    ("apple 🍎🍏 pie", "apple-pie"),  # emoji go
    ("../../etc/passwd", "etc-passwd"),  # no path can be spelled
    ('a\\b:c*d?"e<f>g|h\ti\x00j', "a-b-c-d-e-f-g-h-i-j"),  # Windows' forbidden characters, controls
    ("e\u0301te\u0301", "\u00e9t\u00e9"),  # decomposed (macOS) text becomes composed
    ("🍎 / 🍏", ""),
    ("", ""),
])
def test_safe_file_text_keeps_letters_and_digits_of_any_script(text, expected):
    assert safe_file_text(text) == expected


def test_safe_file_text_is_cut_by_utf8_bytes_on_a_character_boundary():
    cut = safe_file_text("사과" * 40)  # 3 bytes per Hangul syllable
    assert cut == "사과" * 10 and len(cut.encode("utf-8")) == FILE_NAME_TEXT_MAX_BYTES


def test_export_stem_falls_back_to_layers_without_text():
    assert export_stem("🍎", 7) == "layers_seed7"
    assert export_stem("CON", 7) == "CON_seed7"


# ---- PSD ---------------------------------------------------------------------------------------------
def test_psd_layers_read_back_with_names_order_offsets_and_pixels(tmp_path, shape_layers):
    from psd_tools import PSDImage

    psd = PSDImage.open(export_psd(shape_layers, tmp_path / "layers.psd"))
    assert psd.size == SIZE
    assert [layer.name for layer in psd] == ["Layer 1 (bottom)", "Layer 2", "Layer 3 (empty)", "Layer 4 (top)"]
    assert [layer.bbox for layer in psd] == [(0, 0, *SIZE), BLUE_BOX, (0, 0, 0, 0), RED_BOX]
    for layer, original in zip(psd, shape_layers):
        if layer.bbox == (0, 0, 0, 0):
            assert layer.topil() is None  # kept, named and empty
            continue
        assert np.array_equal(array(layer.topil()), array(original.crop(layer.bbox)))


def test_psd_keeps_layer_names_in_any_script(tmp_path, shape_layers):
    from psd_tools import PSDImage

    names = ["배경", "蓝色方块", "empty", "Apfel 🍎"]
    psd = PSDImage.open(export_psd(shape_layers, tmp_path / "layers.psd", names=names))
    assert [layer.name for layer in psd] == names


def test_psd_carries_the_composite_with_its_transparency(tmp_path, shape_layers):
    from psd_tools import PSDImage

    floating = shape_layers[1:]  # no backdrop: the composite is transparent around the shapes
    psd = PSDImage.open(export_psd(floating, tmp_path / "floating.psd"))
    stored = array(psd.topil())  # the file's merged image, not a fresh compositing
    ours = array(composite_layers(floating))
    assert stored[0, 0, 3] == 0 and stored[50, 50, 3] == 255
    assert np.abs(stored - ours).max() <= 1


def imagemagick() -> str:
    for name in ("magick", "convert"):  # ImageMagick 7, then 6 (Debian 12's)
        path = shutil.which(name)
        if path and "ImageMagick" in subprocess.run([path, "-version"], capture_output=True, text=True).stdout:
            return path
    pytest.skip("ImageMagick is not installed: apt-get install imagemagick (.ci/run does)")


@pytest.mark.parametrize("layers_fixture", ["shape_layers", "noise_layers"])
def test_imagemagick_flattens_the_psd_to_our_composite_within_one_level(tmp_path, request, layers_fixture):
    layers = request.getfixturevalue(layers_fixture)
    psd = export_psd(layers, tmp_path / "layers.psd")
    ours = array(composite_layers(layers))
    # Frame 0 is the file's composite; frames 1.. are the layers at their offsets (the empty one is skipped).
    # -repage keeps each layer's offset and restores the canvas size before flattening.
    flattened, merged = tmp_path / "flattened.png", tmp_path / "merged.png"
    subprocess.run([imagemagick(), str(psd), "-delete", "0", "-repage", "{}x{}".format(*SIZE), "-background", "none",
                    "-flatten", f"PNG32:{flattened}"], check=True, capture_output=True)
    subprocess.run([imagemagick(), f"{psd}[0]", f"PNG32:{merged}"], check=True, capture_output=True)
    assert np.abs(array(Image.open(flattened)) - ours).max() <= 1
    assert np.abs(array(Image.open(merged)) - ours).max() <= 1


def test_imagemagick_sees_the_layer_names_and_offsets(tmp_path, shape_layers):
    psd = export_psd(shape_layers, tmp_path / "layers.psd")
    listing = subprocess.run([imagemagick(), str(psd), "-format", "%l|%g\\n", "info:"],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    # %l is the frame's label (the layer name), %g its page geometry: size and offset on the canvas.
    # Frame 0, the composite, has no label; ImageMagick skips the empty layer 3 (it has no pixels).
    assert listing == ["|300x200+0+0", "Layer 1 (bottom)|300x200+0+0", "Layer 2|100x90+40+30",
                       "Layer 4 (top)|110x110+150+60"]


# ---- PPTX --------------------------------------------------------------------------------------------
def test_pptx_pictures_are_cropped_named_and_placed_at_their_offsets(tmp_path, shape_layers):
    from pptx import Presentation

    presentation = Presentation(export_pptx(shape_layers, tmp_path / "layers.pptx"))
    emu_per_px = SLIDE_LONG_SIDE_EMU // SIZE[0]  # whole EMUs per pixel
    assert (presentation.slide_width, presentation.slide_height) == (SIZE[0] * emu_per_px, SIZE[1] * emu_per_px)
    (slide,) = presentation.slides
    pictures = list(slide.shapes)  # z-order, bottom first; the empty layer has no picture
    assert [p.name for p in pictures] == ["Layer 1 (bottom)", "Layer 2", "Layer 4 (top)"]
    for picture, layer, box in zip(pictures, [shape_layers[0], shape_layers[1], shape_layers[3]],
                                   [(0, 0, *SIZE), BLUE_BOX, RED_BOX]):
        assert [picture.left, picture.top, picture.width, picture.height] == \
            [box[0] * emu_per_px, box[1] * emu_per_px, (box[2] - box[0]) * emu_per_px, (box[3] - box[1]) * emu_per_px]
        embedded = Image.open(io.BytesIO(picture.image.blob))
        assert np.array_equal(array(embedded), array(layer.crop(box)))


def render_with_libreoffice(pptx: Path, size: tuple[int, int], workdir: Path) -> Image.Image:
    """LibreOffice Impress, headless, exports the slide as a PNG of `size` pixels."""
    soffice = shutil.which("soffice") or shutil.which("libreoffice")
    if soffice is None:
        pytest.skip("LibreOffice is not installed: apt-get install libreoffice-impress (.ci/run does)")
    png_filter = 'png:impress_png_Export:{"PixelWidth":{"type":"long","value":"%d"},' \
                 '"PixelHeight":{"type":"long","value":"%d"}}' % size
    # A profile of its own: a second LibreOffice running on the machine does not take the job over.
    subprocess.run([soffice, f"-env:UserInstallation={(workdir / 'lo-profile').as_uri()}", "--headless",
                    "--convert-to", png_filter, "--outdir", str(workdir), str(pptx)],
                   check=True, capture_output=True, timeout=180)
    return Image.open(workdir / (pptx.stem + ".png"))


@pytest.mark.parametrize("layers_fixture", ["shape_layers", "noise_layers"])
def test_libreoffice_renders_the_pptx_like_our_composite(tmp_path, request, layers_fixture):
    layers = request.getfixturevalue(layers_fixture)
    rendered = array(render_with_libreoffice(export_pptx(layers, tmp_path / "layers.pptx"), SIZE, tmp_path), "RGB")
    ours = array(composite_layers(layers), "RGB")  # the bottom layers are opaque: no slide white shows
    assert np.abs(rendered - ours).mean() <= LIBREOFFICE_MEAN_DIFF_MAX

    # The threshold tells placement apart: the same crops all put at the top-left corner are far off.
    misplaced = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    for cropped, _ in filter(None, map(crop_to_alpha, layers)):
        misplaced.alpha_composite(cropped, (0, 0))
    assert np.abs(array(misplaced, "RGB") - ours).mean() > 10 * LIBREOFFICE_MEAN_DIFF_MAX


# ---- a run's folder ----------------------------------------------------------------------------------
def test_save_run_writes_both_sizes_named_after_the_prompt_and_a_zip_with_layers_composite_params(tmp_path, shape_layers):
    from psd_tools import PSDImage
    from pptx import Presentation

    result = DecomposeResult(layers=shape_layers, caption="빨간 사과 / 红苹果 🍎", auto_caption=False, seed=7,
                                 params={"input_size": [450, 300]}, duration_s=1.0)
    paths = save_run(result, tmp_path, original_size=(450, 300))

    folder = paths["folder"]
    assert paths["pptx"] == folder / "빨간-사과-红苹果_seed7.pptx"
    assert paths["psd"] == folder / "빨간-사과-红苹果_seed7.psd"
    assert paths["zip"] == folder / "빨간-사과-红苹果_seed7.zip"
    assert paths["original"]["pptx"] == folder / "original_size" / "빨간-사과-红苹果_seed7_450x300.pptx"
    assert PSDImage.open(paths["original"]["psd"]).size == (450, 300)
    original = Presentation(paths["original"]["pptx"])
    assert original.slide_width * 300 == original.slide_height * 450  # the 3:2 of the original size
    assert Image.open(paths["original"]["composite"]).size == (450, 300)
    assert [Image.open(p).size for p in paths["original"]["layers"]] == [(450, 300)] * 4

    with zipfile.ZipFile(paths["zip"]) as archive:
        assert sorted(archive.namelist()) == sorted(
            [f"layer_{i}.png" for i in range(1, 5)] + ["composite.png", "params.json"]
            + [f"original_size/layer_{i}.png" for i in range(1, 5)] + ["original_size/composite.png"])
        params = json.loads(archive.read("params.json"))
        composite = Image.open(io.BytesIO(archive.read("composite.png")))
    assert params["caption"] == "빨간 사과 / 红苹果 🍎" and params["export_original_size"] == [450, 300]
    assert np.array_equal(array(composite), array(composite_layers(shape_layers)))


def test_save_run_without_original_size_writes_one_set(tmp_path, shape_layers):
    result = DecomposeResult(layers=shape_layers, caption="", auto_caption=True, seed=3,
                                 params={"input_size": [450, 300]}, duration_s=1.0)
    paths = save_run(result, tmp_path)
    assert "original" not in paths and not (paths["folder"] / "original_size").exists()
    assert paths["psd"].name == "layers_seed3.psd"
    assert json.loads(paths["params"].read_text())["export_original_size"] is None


def test_decompose_command_with_original_size_exports_at_the_input_size(tmp_path, models_dir, rgba_image):
    image = tmp_path / "input.png"
    rgba_image.save(image)  # 300x200; the model works at its 640 bucket
    code = app.main(["decompose", str(image), "--demo", "--models-dir", str(models_dir), "--out", str(tmp_path / "out"),
                     "--offload", "off", "--no-first-block-cache", "--steps", "2", "--layers", "2",
                     "--prompt", "a card", "--original-size"])
    assert code == 0
    (folder,) = (tmp_path / "out").iterdir()
    assert Image.open(folder / "layer_1.png").size != (300, 200)
    assert [Image.open(folder / "original_size" / f"layer_{i}.png").size for i in (1, 2)] == [(300, 200)] * 2
    assert (folder / "original_size" / "a-card_seed777_300x200.psd").is_file()
