"""A decomposition's run folder: layers, composite, params.json, and ZIP / PPTX / PSD that reopen right."""

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

import app
from studio.runs import save_run


@pytest.fixture(scope="module")
def saved_run(demo_pipe, rgba_image, tmp_path_factory):
    result = app.infer(demo_pipe, rgba_image, prompt="", layers=3, num_inference_steps=2, seed=42)
    outputs = tmp_path_factory.mktemp("outputs")
    paths = save_run(result, outputs, demo_pipe.run_info())
    return result, paths, outputs


def pixels(image):
    return np.asarray(image.convert("RGBA"))


def test_each_run_gets_its_own_folder_with_params(saved_run):
    result, paths, outputs = saved_run
    assert paths["folder"].parent == outputs
    params = json.loads(paths["params"].read_text(encoding="utf-8"))
    assert params["seed"] == 42
    assert params["caption"] == result.caption and params["auto_caption"] is True
    assert params["layers"] == 3 and params["num_inference_steps"] == 2
    assert params["offload_mode"] == "off" and params["demo"] is True
    assert params["model_path"].endswith("demo-tiny-random")
    assert params["versions"]["diffusers"] == app.package_version("diffusers")


def test_layer_pngs_and_composite_on_disk(saved_run):
    result, paths, _ = saved_run
    assert [p.name for p in paths["layers"]] == ["layer_1.png", "layer_2.png", "layer_3.png"]
    for path, layer in zip(paths["layers"], result.layers):
        assert np.array_equal(pixels(Image.open(path)), pixels(layer))
    expected = Image.alpha_composite(Image.alpha_composite(result.layers[0], result.layers[1]), result.layers[2])
    assert np.array_equal(pixels(Image.open(paths["composite"])), pixels(expected))


def test_zip_holds_layers_bottom_first_composite_and_params(saved_run):
    result, paths, _ = saved_run
    with zipfile.ZipFile(paths["zip"]) as archive:
        names = archive.namelist()
        assert names[:3] == ["layer_1.png", "layer_2.png", "layer_3.png"]
        assert {"composite.png", "params.json"} <= set(names)
        for index, layer in enumerate(result.layers):
            assert np.array_equal(pixels(Image.open(io.BytesIO(archive.read(f"layer_{index + 1}.png")))), pixels(layer))
        assert json.loads(archive.read("params.json"))["seed"] == 42


def test_psd_reopens_with_named_layers_in_order_and_equal_pixels(saved_run):
    from psd_tools import PSDImage

    result, paths, _ = saved_run
    psd = PSDImage.open(paths["psd"])
    assert psd.size == result.layers[0].size
    psd_layers = list(psd)
    assert len(psd_layers) == 3
    for index, (psd_layer, layer) in enumerate(zip(psd_layers, result.layers)):  # psd-tools lists bottom first
        assert psd_layer.name.startswith(f"Layer {index + 1}")
        canvas = Image.new("RGBA", psd.size, (0, 0, 0, 0))
        canvas.paste(psd_layer.topil().convert("RGBA"), (psd_layer.left, psd_layer.top))
        assert np.array_equal(pixels(canvas), pixels(layer))


def test_pptx_reopens_with_one_picture_per_layer_in_order(saved_run):
    from pptx import Presentation

    result, paths, _ = saved_run
    presentation = Presentation(paths["pptx"])
    width, height = result.layers[0].size
    assert presentation.slide_width * height == presentation.slide_height * width  # the image's aspect ratio
    (slide,) = presentation.slides
    pictures = [shape for shape in slide.shapes if shape.shape_type == 13]  # MSO_SHAPE_TYPE.PICTURE
    assert len(pictures) == 3
    emu = presentation.slide_width / width
    for picture, layer in zip(pictures, result.layers):  # z-order: first is bottom
        left, top, right, bottom = layer.getchannel("A").getbbox()
        assert (round(picture.left / emu), round(picture.top / emu)) == (left, top)
        assert (round(picture.width / emu), round(picture.height / emu)) == (right - left, bottom - top)
        blob = Image.open(io.BytesIO(picture.image.blob))
        assert np.array_equal(pixels(blob), pixels(layer.crop((left, top, right, bottom))))
