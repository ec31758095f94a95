"""Offload modes: how "auto" chooses, and every mode this machine can run gives the layers of "off"."""

import numpy as np
import pytest
import torch

import app
from conftest import demo_settings


@pytest.mark.parametrize(
    "mode, cuda, vram_gb, expected",
    [
        ("auto", False, None, "off"),  # no GPU: everything on the CPU
        ("sequential", False, None, "off"),  # offload needs a GPU; falls back with a warning
        ("model", False, None, "off"),
        ("budget", False, None, "budget"),  # the budget engine's hooks run on the CPU too (nothing moves)
        ("auto", True, 80.0, "off"),  # H100: everything resident
        ("auto", True, 48.0, "budget"),  # the low-VRAM engine: all it can keep resident, the rest streamed
        ("auto", True, 24.0, "budget"),  # RTX 4090
        ("model", True, 24.0, "model"),  # an explicit choice is kept
    ],
)
def test_resolve_offload_mode(mode, cuda, vram_gb, expected):
    assert app.resolve_offload_mode(mode, cuda, vram_gb).name == expected


def test_unknown_offload_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"offload mode 'fast' is not one of auto, off, model, sequential, budget"):
        app.resolve_offload_mode("fast", True, 24.0)


# The modes this machine runs for real, each against "off": all of them with a GPU; on a CPU-only machine only
# "budget" (its hooks run with nothing to move): "model" and "sequential" resolve to "off" there (see
# test_resolve_offload_mode), and comparing "off" with "off" could not fail. (tests/test_budget_offload.py
# streams a block through the budget hooks.)
@pytest.mark.parametrize("mode", ["model", "sequential", "budget"] if torch.cuda.is_available() else ["budget"])
def test_each_offload_mode_gives_the_layers_of_off(demo_pipe, models_dir, rgba_image, mode):
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=2, seed=21)
    reference = app.infer(demo_pipe, rgba_image, **kwargs)
    pipe = app.load_pipeline(demo_settings(models_dir, offload=mode))
    assert pipe.offload.name == mode
    result = app.infer(pipe, rgba_image, **kwargs)
    for a, b in zip(reference.layers, result.layers):
        # Identical on the CPU; bf16 on a GPU may differ by a few levels between placements.
        tolerance = 0 if not torch.cuda.is_available() else 8
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= tolerance
