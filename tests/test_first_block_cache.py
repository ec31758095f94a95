"""FirstBlockCache (diffusers' hook) really skips transformer blocks, with separate cond/uncond state."""

import numpy as np
import pytest

import app
from conftest import demo_settings

STEPS = 4


def count_block_work(pipe) -> list[int]:
    """Count calls of each block's attention module: it runs only when the block really computes
    (FirstBlockCache's hook returns cached residuals without calling the block's own forward)."""
    counter = [0]
    for block in pipe.pipe.transformer.transformer_blocks:
        block.attn.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def run(pipe, rgba_image, seed=0):
    # true_cfg_scale > 1 with a negative prompt: a cond and an uncond transformer pass per step.
    return app.infer(pipe, rgba_image, prompt="shapes", negative_prompt=" ", true_cfg_scale=4.0, layers=2,
                     num_inference_steps=STEPS, seed=seed)


@pytest.fixture(scope="module")
def pipe_cache_huge(models_dir):
    # A threshold no change can reach: after the first full pass of each context only block 1 runs.
    return app.load_pipeline(demo_settings(models_dir, first_block_cache=True, first_block_cache_threshold=1e9))


def test_without_cache_every_block_runs_every_pass(models_dir, rgba_image):
    pipe = app.load_pipeline(demo_settings(models_dir, first_block_cache=False))
    blocks = len(pipe.pipe.transformer.transformer_blocks)
    counter = count_block_work(pipe)
    run(pipe, rgba_image)
    assert counter[0] == STEPS * 2 * blocks


def test_huge_threshold_skips_all_but_the_first_block_with_separate_cond_uncond_state_and_resets_between_runs(
        pipe_cache_huge, rgba_image):
    blocks = len(pipe_cache_huge.pipe.transformer.transformer_blocks)
    counter = count_block_work(pipe_cache_huge)
    first = run(pipe_cache_huge, rgba_image, seed=11)
    calls_first = counter[0]
    # Step 1: cond and uncond each compute all blocks (each context starts with an empty cache; a shared
    # state would let uncond reuse cond's residuals and skip). Later steps: only the first block, twice.
    assert calls_first == 2 * blocks + 2 * (STEPS - 1)
    assert calls_first < STEPS * 2 * blocks / 2
    second = run(pipe_cache_huge, rgba_image, seed=11)
    assert counter[0] - calls_first == calls_first  # the second run starts from an empty cache again
    for a, b in zip(first.layers, second.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_para_attn_has_no_adapter_for_this_pipeline(demo_pipe):
    """Why the app uses diffusers' FirstBlockCacheConfig and not para-attn's apply_cache_on_pipe."""
    from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe

    with pytest.raises(ValueError, match="QwenImageLayeredPipeline"):
        apply_cache_on_pipe(demo_pipe.pipe)
