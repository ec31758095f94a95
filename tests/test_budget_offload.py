"""The low-VRAM engine (offload mode "budget"): its plan, its errors, and on the demo pipeline that it changes
nothing but where weights live. Speed and memory are measured on the full-size model by bench/bench_exact.py."""

import numpy as np
import pytest
import torch

import app
from studio.engine.plan import BUDGET_PLAN_IMAGE_TOKENS, BUDGET_SAFETY_MARGIN_GB, check_host_ram, plan_budget, streamed_block_indices
from studio.errors import OutOfMemoryError
from conftest import demo_settings, engine_on

# Sizes (GiB) of the real model in bf16, as bench/results/h100_24gb.json reports them for the full-size architecture.
REAL_SIZES = dict(block_gb=0.633, num_blocks=60, other_transformer_gb=0.0755, text_encoder_gb=15.445, vae_gb=0.236)
DEFAULT_JOB_TOKENS = (4 + 2) * (640 // 16) ** 2  # 640 bucket, 4 layers


def test_a_24_gb_budget_keeps_more_blocks_resident_for_the_default_job_than_for_the_largest():
    default = plan_budget(24, image_tokens=DEFAULT_JOB_TOKENS, **REAL_SIZES)
    largest = plan_budget(24, image_tokens=BUDGET_PLAN_IMAGE_TOKENS, **REAL_SIZES)
    assert (len(default.resident_blocks), len(default.streamed_blocks)) == (28, 32)
    assert (len(largest.resident_blocks), len(largest.streamed_blocks)) == (21, 39)
    for plan in (default, largest):
        assert plan.denoise_peak_gb <= 24 - BUDGET_SAFETY_MARGIN_GB
        assert plan.text_encoder_peak_gb <= 24 - BUDGET_SAFETY_MARGIN_GB
        assert plan.host_ram_gb == pytest.approx(0.0755 + 60 * 0.633 + 15.445)


def test_streamed_blocks_are_spread_out_and_the_first_two_stay():
    streamed = streamed_block_indices(60, 28)
    assert len(streamed) == 32 and len(set(streamed)) == 32
    assert 0 not in streamed and 1 not in streamed  # FirstBlockCache's probe, and the block that starts the copies
    gaps = np.diff(streamed)
    assert gaps.min() >= 1 and gaps.max() <= 2  # every copy overlaps at least one resident block's compute


def test_with_one_resident_block_every_other_block_streams():
    assert streamed_block_indices(60, 1) == tuple(range(1, 60))
    assert streamed_block_indices(60, 60) == ()


def test_a_budget_too_small_names_the_minimum_and_the_fix():
    # Without the text encoder's layer sizes it is one piece: 15.4 + VAE + 0.5 GB of activations + 1 GB margin = 17.2 GB.
    with pytest.raises(ValueError, match=r"--vram-budget 16 GB is too small .* needs at least 17\.2 GB .* "
                                         r"Pass --vram-budget 18 or more, run a smaller job .* or use --offload sequential"):
        plan_budget(16, **REAL_SIZES)


def test_the_resident_block_override_is_checked():
    with pytest.raises(ValueError, match="resident_blocks=61 is out of range: use 1 to 60"):
        plan_budget(24, resident_blocks=61, **REAL_SIZES)


def test_too_little_host_ram_is_reported_with_the_figure_needed():
    with pytest.raises(ValueError, match=r"needs 53\.5 GB plus 4 GB for the system, and 32\.0 GB is available"):
        check_host_ram(53.5, available_gb=32.0)
    check_host_ram(53.5, available_gb=64.0)  # enough: no error


@pytest.mark.parametrize("cuda, vram_gb, expected", [(True, 24.0, "budget"), (True, 48.0, "budget"),
                                                     (True, 80.0, "off"), (True, 16.0, "budget"), (True, 11.0, "budget"),
                                                     (True, 7.0, "budget"), (True, 6.0, "sequential"),
                                                     (False, None, "budget")])
def test_budget_is_chosen_from_7_to_64_gb_and_kept_without_a_gpu(cuda, vram_gb, expected):
    mode = "auto" if cuda else "budget"
    assert app.resolve_offload_mode(mode, cuda, vram_gb).name == expected


@pytest.fixture(scope="module")
def streaming_pipe(models_dir):
    """The demo pipeline in budget mode with only block 0 resident: the others go through the streaming hooks.
    FirstBlockCache is enabled first, as a user's settings would, so the engine must put it back outside."""
    pipe = app.load_pipeline(demo_settings(models_dir, first_block_cache=True))
    engine_on(pipe, float("inf"), resident_blocks=1)
    return pipe


def test_budget_gives_the_layers_of_off_for_the_same_seed(models_dir, rgba_image, streaming_pipe):
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=3, seed=5)
    reference = app.infer(app.load_pipeline(demo_settings(models_dir, first_block_cache=True)), rgba_image, **kwargs)
    result = app.infer(streaming_pipe, rgba_image, **kwargs)
    num_blocks = len(streaming_pipe.pipe.transformer.transformer_blocks)
    assert streaming_pipe.stages.plan.streamed_blocks == tuple(range(1, num_blocks))
    for a, b in zip(reference.layers, result.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _transformer_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4 * 4 * 4, 32, generator=g), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g), encoder_hidden_states_mask=None,
                img_shapes=[[(1, 4, 4)] * 4], additional_t_cond=torch.zeros(1, dtype=torch.long), return_dict=False)


def test_a_step_first_block_cache_skips_loads_no_streamed_weights(streaming_pipe):
    transformer = streaming_pipe.pipe.transformer
    num_blocks = len(transformer.transformer_blocks)
    groups = [hook.group for hook in streaming_pipe.stages.hooks.values()]
    onloads, block_calls = [], []
    for group in groups:  # count every streamed block's copy to the device
        group.onload_ = (lambda onload: lambda: (onloads.append(1), onload())[1])(group.onload_)
    handles = [block.attn.register_forward_pre_hook(lambda module, args: block_calls.append(1))
               for block in transformer.transformer_blocks]
    try:
        with torch.inference_mode():
            counts = []
            for context in ("cond", "uncond", "cond", "uncond"):  # the same input twice per context
                onloads.clear(), block_calls.clear()
                with transformer.cache_context(context):
                    transformer(**_transformer_inputs(seed=1 if context == "cond" else 2))
                counts.append((len(block_calls), len(onloads)))
    finally:
        for group in groups:
            del group.onload_  # back to the class's method
        for handle in handles:
            handle.remove()
        transformer._reset_stateful_cache()
    computed, skipped = counts[:2], counts[2:]
    assert all(calls == num_blocks and loads >= num_blocks - 1 for calls, loads in computed)
    # Second call per context: only block 0 runs, and no streamed block's weights are touched; cond and uncond
    # each skip on their own state.
    assert skipped == [(1, 0), (1, 0)]


def test_after_an_out_of_memory_error_the_next_run_works(monkeypatch, rgba_image, streaming_pipe):
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=2, seed=9)
    expected = app.infer(streaming_pipe, rgba_image, **kwargs)
    block = streaming_pipe.pipe.transformer.transformer_blocks[1]
    forward = block.forward

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(block, "forward", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="Out of GPU memory during the decomposition; the memory was freed"):
        app.infer(streaming_pipe, rgba_image, **kwargs)
    monkeypatch.setattr(block, "forward", forward)
    assert streaming_pipe.stages.current is None  # everything went back to its host copy
    result = app.infer(streaming_pipe, rgba_image, **kwargs)
    for a, b in zip(expected.layers, result.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))
