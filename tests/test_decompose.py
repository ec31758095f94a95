"""infer() on the tiny demo pipeline, loaded through the same from_pretrained path as the real weights."""

import numpy as np
import pytest
from PIL import Image

import app
from studio.images import to_rgba


@pytest.mark.parametrize(
    "layers, resolution, input_size, expected_size",
    [  # worked out by hand: area resolution^2 at the input's aspect ratio, each side rounded to a multiple of 32
        (2, 640, (300, 200), (768, 512)),  # 3:2
        (3, 640, (180, 320), (480, 864)),  # 9:16
        (5, 640, (300, 200), (768, 512)),
        (2, 1024, (180, 320), (768, 1376)),  # 9:16 at the 1024 bucket
    ],
)
def test_layer_count_mode_and_bucket_size(demo_pipe, layers, resolution, input_size, expected_size):
    image = Image.new("RGBA", input_size, (200, 30, 30, 255))
    result = app.infer(demo_pipe, image, prompt="a red card", layers=layers, resolution=resolution,
                       num_inference_steps=2, seed=1)
    assert len(result.layers) == layers
    assert all(layer.mode == "RGBA" for layer in result.layers)
    assert {layer.size for layer in result.layers} == {expected_size}
    assert result.params["output_size"] == list(expected_size)
    assert result.params["input_size"] == list(input_size)


def test_same_seed_same_layers_different_seed_different(demo_pipe, rgba_image):
    run = lambda seed: app.infer(demo_pipe, rgba_image, prompt="shapes", layers=2, num_inference_steps=2, seed=seed)
    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first.layers, again.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first.layers[0]), np.asarray(other.layers[0]))
    assert (first.seed, other.seed) == (5, 6)


def test_randomize_seed_reports_the_seed_it_used(demo_pipe, rgba_image):
    result = app.infer(demo_pipe, rgba_image, prompt="shapes", layers=2, num_inference_steps=2, seed=5,
                       randomize_seed=True)
    replay = app.infer(demo_pipe, rgba_image, prompt="shapes", layers=2, num_inference_steps=2, seed=result.seed)
    assert np.array_equal(np.asarray(result.layers[1]), np.asarray(replay.layers[1]))


@pytest.fixture
def caption_calls(demo_pipe, monkeypatch):
    """Record every call of the pipeline's own get_image_caption (the real method still runs)."""
    calls = []
    original = demo_pipe.pipe.get_image_caption

    def recording(*args, **kwargs):
        text = original(*args, **kwargs)
        calls.append(text)
        return text

    monkeypatch.setattr(demo_pipe.pipe, "get_image_caption", recording)
    return calls


def test_empty_prompt_captions_once_and_returns_the_caption(demo_pipe, rgba_image, caption_calls):
    result = app.infer(demo_pipe, rgba_image, prompt="", layers=2, num_inference_steps=2, seed=3)
    assert len(caption_calls) == 1  # ours; the pipeline then receives it and does not caption again
    assert result.caption == caption_calls[0].strip() and result.caption != ""
    assert result.auto_caption is True
    assert result.params["prompt_given"] == ""


def test_given_prompt_is_used_without_a_caption_call(demo_pipe, rgba_image, caption_calls):
    result = app.infer(demo_pipe, rgba_image, prompt="  a blue card  ", layers=2, num_inference_steps=2, seed=3)
    assert caption_calls == []
    assert result.caption == "a blue card"
    assert result.auto_caption is False


@pytest.mark.parametrize("source", ["path", "pil_rgb", "array_rgb", "array_float_rgba", "gradio_dict"])
def test_inputs_of_every_kind_become_the_same_rgba(tmp_path, source):
    rgb = Image.new("RGB", (40, 30), (10, 120, 250))
    expected = np.asarray(rgb.convert("RGBA"))
    if source == "path":
        rgb.save(tmp_path / "in.png")
        value = str(tmp_path / "in.png")
    elif source == "pil_rgb":
        value = rgb
    elif source == "array_rgb":
        value = np.asarray(rgb)
    elif source == "array_float_rgba":
        value = np.asarray(rgb.convert("RGBA")).astype(np.float32) / 255.0
    else:
        rgb.save(tmp_path / "in.png")
        value = {"path": str(tmp_path / "in.png")}
    assert np.array_equal(np.asarray(to_rgba(value)), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=1), "layers=1 is out of range"),
        (dict(layers=11), "layers=11 is out of range"),
        (dict(num_inference_steps=1), "num_inference_steps=1 is out of range"),
        (dict(num_inference_steps=51), "num_inference_steps=51 is out of range"),
        (dict(true_cfg_scale=10.5), "true_cfg_scale=10.5 is out of range"),
        (dict(resolution=512), "resolution=512 is not supported"),
    ],
)
def test_out_of_range_parameters_are_refused_with_the_range(demo_pipe, rgba_image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        app.infer(demo_pipe, rgba_image, prompt="x", **kwargs)
