"""Recursive decomposition: a layer of the stack is decomposed again and its sub-layers take its place."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

import app
from studio.images import ORIGINAL_SIZE_RESAMPLE
from studio.stack import LayerStack, fit_to_canvas, replace_layer, undo

CANVAS = (300, 200)  # not a resolution bucket: the demo returns 768x512 sub-layers that must be fit back


def pixels(image):
    return np.asarray(image.convert("RGBA"))


def solid(color, size=CANVAS):
    return Image.new("RGBA", size, color)


def sticker(size=CANVAS):
    """A red disc on full transparency: what a decomposed layer looks like."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse([100, 50, 200, 150], fill=(230, 40, 40, 255))
    return image


# --- pure functions: no pipeline ---------------------------------------------------------------------

def test_replace_layer_puts_the_sub_layers_where_the_layer_was():
    a, b, c = solid((255, 0, 0, 255)), solid((0, 255, 0, 255)), solid((0, 0, 255, 255))
    x, y = solid((1, 1, 1, 255)), solid((2, 2, 2, 255))
    layers = [a, b, c]
    assert replace_layer(layers, 1, [x, y]) == [a, x, y, c]
    assert replace_layer(layers, 0, [x, y]) == [x, y, b, c]
    assert replace_layer(layers, 2, [x, y]) == [a, b, x, y]
    assert layers == [a, b, c]  # the old stack is left as it was (it is the undo step)


def test_replace_layer_names_the_bad_index_and_the_range():
    layers = [solid((0, 0, 0, 255))] * 3
    # Counted from 1, as the gallery counts: index 3 is layer 4, and a stack of 3 takes layers 1 to 3.
    # No 0-based index in the message: the page and the API count from 1 (issue 23).
    with pytest.raises(ValueError, match=r"^Layer 4 is not in the stack: it has 3 layers. Choose a layer from 1 "
                                         r"\(bottom\) to 3.$"):
        replace_layer(layers, 3, [solid((1, 1, 1, 255))])
    with pytest.raises(ValueError, match=r"^Layer 0 is not in the stack: it has 3 layers. Choose a layer from 1 \(bottom\) to 3"):
        replace_layer(layers, -1, [solid((1, 1, 1, 255))])


def test_sub_layers_of_the_canvas_size_are_kept_pixel_for_pixel():
    layer = sticker()
    (fitted,) = fit_to_canvas([layer], CANVAS)
    assert np.array_equal(pixels(fitted), pixels(layer))


def test_sub_layers_of_another_size_are_resized_to_the_canvas_without_dark_edges():
    # A red disc at twice the canvas size, on transparent *black*. Resampling colour and alpha apart would
    # mix that black into the disc's soft edge; in premultiplied alpha the edge stays red.
    big = sticker((600, 400))
    (fitted,) = fit_to_canvas([big], CANVAS)
    assert fitted.size == CANVAS and fitted.mode == "RGBA"
    rgba = pixels(fitted).astype(int)
    edge = (rgba[..., 3] > 32) & (rgba[..., 3] < 224)  # (below 32, 8-bit rounding alone moves the colour)
    assert edge.sum() > 50
    assert rgba[edge][:, 0].min() >= 215  # red (230) stays red
    apart = pixels(Image.merge("RGBA", [c.resize(CANVAS, ORIGINAL_SIZE_RESAMPLE) for c in big.split()])).astype(int)
    assert apart[edge][:, 0].min() < 100  # the dark halo it avoids


# --- one real sub-run on the demo pipeline -------------------------------------------------------------

@pytest.fixture(scope="module")
def sub_run(demo_pipe, tmp_path_factory):
    """Layer 2 of a 3-layer stack (bottom: blue, 2: the red sticker, top: a green square) decomposed into 2."""
    run_folder = tmp_path_factory.mktemp("run")
    top = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(top).rectangle([10, 10, 40, 40], fill=(0, 200, 0, 255))
    layers = [solid((30, 90, 200, 255)), sticker(), top]
    before_that = LayerStack(layers=layers[:2], run_folder=run_folder)
    stack = LayerStack(layers=layers, run_folder=run_folder, files={"folder": run_folder / "first"},
                           previous=before_that)
    seen = []  # what the pipeline's image processor is given, to check the layer reaches the model with alpha
    preprocess = demo_pipe.pipe.image_processor.preprocess
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_pipe.pipe.image_processor, "preprocess",
                      lambda image, *args, **kwargs: seen.append(preprocess(image, *args, **kwargs)) or seen[-1])
        new_stack, result = app.decompose_layer(demo_pipe, stack, 1, {"demo": True}, prompt="a red disc", layers=2,
                                                num_inference_steps=2, seed=5)
    return stack, new_stack, result, seen


def test_sub_layers_replace_the_layer_in_place(sub_run):
    stack, new_stack, result, _ = sub_run
    assert len(stack.layers) == 3 and len(new_stack.layers) == 4
    assert new_stack.layers[0] is stack.layers[0] and new_stack.layers[3] is stack.layers[2]
    for layer, sub_layer in zip(new_stack.layers[1:3], fit_to_canvas(result.layers, CANVAS)):
        assert np.array_equal(pixels(layer), pixels(sub_layer))


def test_sub_layers_come_back_at_the_bucket_size_and_are_fit_to_the_canvas(sub_run):
    _, new_stack, result, _ = sub_run
    assert [layer.size for layer in result.layers] == [(768, 512)] * 2  # the 640 bucket of a 3:2 image
    assert [layer.size for layer in new_stack.layers] == [CANVAS] * 4


def test_the_layer_reaches_the_model_with_its_alpha(sub_run):
    _, _, _, seen = sub_run
    (tensor,) = seen
    assert tuple(tensor.shape) == (1, 4, 512, 768)  # RGBA, not flattened to RGB
    alpha = tensor[0, 3].numpy()  # -1 transparent .. 1 opaque
    assert alpha[0, 0] == -1 and alpha[-1, -1] == -1  # the sticker's transparent surroundings
    assert alpha[256, 384] == 1  # the disc's centre
    transparent = (np.asarray(sticker().getchannel("A")) == 0).mean()
    assert abs((alpha == -1).mean() - transparent) < 0.02


def test_the_sub_run_folder_records_its_parameters_and_the_index_it_replaced(sub_run):
    stack, new_stack, result, _ = sub_run
    folder = new_stack.files["folder"]
    assert folder.parent == stack.run_folder / "sub_runs"
    params = json.loads((folder / "params.json").read_text(encoding="utf-8"))
    assert (params["layers"], params["num_inference_steps"], params["seed"]) == (2, 2, 5)
    assert params["caption"] == "a red disc" and params["demo"] is True
    assert params["sub_run"] == dict(replaced_index=1, replaced_file="layer_2.png", sub_layers=2,
                                     stack_layers_before=3, stack_layers_after=4,
                                     applied_to=str(stack.run_folder / "first"))
    # The layer it was given, alpha and all, and its own output at the model's size.
    assert np.array_equal(pixels(Image.open(folder / "input_layer.png")), pixels(stack.layers[1]))
    assert [p.name for p in new_stack.files["sub_layers"]] == ["layer_1.png", "layer_2.png"]
    for path, layer in zip(new_stack.files["sub_layers"], result.layers):
        assert np.array_equal(pixels(Image.open(path)), pixels(layer))


def test_the_exports_write_the_whole_stack(sub_run):
    from psd_tools import PSDImage

    _, new_stack, _, _ = sub_run
    files = new_stack.files
    assert [p.name for p in files["layers"]] == ["layer_1.png", "layer_2.png", "layer_3.png", "layer_4.png"]
    for path, layer in zip(files["layers"], new_stack.layers):
        assert np.array_equal(pixels(Image.open(path)), pixels(layer))
    with zipfile.ZipFile(files["zip"]) as archive:
        assert [n for n in archive.namelist() if n.startswith("layer_")] == [p.name for p in files["layers"]]
    psd = PSDImage.open(files["psd"])
    assert psd.size == CANVAS and len(list(psd)) == 4


def test_undo_goes_back_one_sub_run_and_only_one(sub_run):
    stack, new_stack, _, _ = sub_run
    restored = undo(new_stack)
    assert restored.layers == stack.layers and restored.files == stack.files
    # The stack had an undo step of its own before the sub-run; after undo there is none left.
    with pytest.raises(ValueError, match="nothing to undo"):
        undo(restored)
