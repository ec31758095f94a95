"""The renovation of src/app.py (issue 21) moves code, not behaviour: a decomposition of the same image with the same
seed gives the same bytes as before the move.

The hashes below were taken on the tiny demo pipeline (float32 on the CPU, FirstBlockCache off) with the app as it
was before the move (commit 7a4e2da), in a fresh process each time. A change here means the layers changed.
"""

import hashlib

import pytest
from PIL import Image, ImageDraw

from conftest import demo_settings

import app

PINNED = [
    # (infer's keyword arguments, sha256 of the layers' RGBA bytes, bottom first)
    (dict(prompt="a red circle", num_inference_steps=2, layers=3, seed=5),
     "0d8c97fa2f8e74a0949be3d549a942a5a627f26a68c3d27b84475cf7c9d22090"),
    # An empty prompt: the model writes the caption (512 tokens of the random demo model), then decomposes.
    (dict(prompt="", num_inference_steps=2, layers=2, seed=777),
     "c9ba550e2c3c8c5c317b03e01d7f7b299b1b4971df08fe3517343b0453629068"),
]


def pinned_image() -> Image.Image:
    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 20, 280, 180], fill=(30, 90, 200, 255))
    draw.ellipse([100, 50, 200, 150], fill=(230, 40, 40, 255))
    return image


@pytest.mark.parametrize("kwargs, digest", PINNED, ids=["given-prompt", "auto-caption"])
def test_the_same_seed_gives_the_layers_it_gave_before_the_renovation(demo_pipe, kwargs, digest):
    result = app.infer(demo_pipe, pinned_image(), **kwargs)
    assert hashlib.sha256(b"".join(layer.tobytes() for layer in result.layers)).hexdigest() == digest


def test_the_budget_engine_gives_the_pinned_layers_too(models_dir):
    loaded = app.load_pipeline(demo_settings(models_dir, offload="budget"))
    kwargs, digest = PINNED[0]
    result = app.infer(loaded, pinned_image(), **kwargs)
    assert hashlib.sha256(b"".join(layer.tobytes() for layer in result.layers)).hexdigest() == digest
