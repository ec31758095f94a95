"""16 and 12 GB cards and small machines (issue 12): the text encoder split in the budget mode, the `auto` choice,
and the refusals before loading. On the demo pipeline the split must change nothing but where weights live.
Speed and memory are measured on the full-size model by bench/bench_exact.py."""

import math

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

import app
from studio.engine.memory import budget_sizes, budget_sizes_from_files, text_encoder_parts
from studio.engine.plan import BUDGET_AUTO_MIN_VRAM_GB, BUDGET_PLAN_IMAGE_TOKENS, BUDGET_SAFETY_MARGIN_GB, BUDGET_TEXT_ENCODER_ACTIVATION_GB, BUDGET_TEXT_ENCODER_MARGIN_GB, budget_minimum_gb, budget_minimum_ram_gb, plan_budget
from studio.errors import OutOfMemoryError
from studio.params import LAYERS_RANGE
from conftest import demo_settings, run_app, engine_on, machine_fits

# Sizes (GiB) of the real model in bf16: the transformer's from bench/results/h100_24gb.json; the text encoder's language
# layer from Qwen2.5-VL-7B's config (q/o 3584x3584 + k/v 3584x512 with biases, MLP 3 x 3584x18944, two norms:
# 233,057,792 parameters), its vision tower and embedding table (152,064 x 3584).
LAYER_GB = 233_057_792 * 2 / 2**30
REAL = dict(block_gb=0.633, num_blocks=60, other_transformer_gb=0.0755, text_encoder_gb=15.445, vae_gb=0.236,
            text_layer_gb=LAYER_GB, text_num_layers=28, text_vision_gb=1.26, text_embed_gb=152_064 * 3584 * 2 / 2**30)
DEFAULT_JOB_TOKENS = (4 + 2) * (640 // 16) ** 2


def _text_peak(resident: int) -> float:
    """The caption stage's peak, written out here from the sizes: the larger of its two phases. The vision tower alone
    (with the VAE and the activations); then lm_head + norm, the VAE, the activations, the resident language layers
    and, where some stream, two layers in flight."""
    head = REAL["text_encoder_gb"] - 28 * LAYER_GB - REAL["text_vision_gb"] - REAL["text_embed_gb"]
    vision = REAL["text_vision_gb"] + REAL["vae_gb"] + BUDGET_TEXT_ENCODER_ACTIVATION_GB
    streaming = 2 * LAYER_GB if resident < 28 else 0.0
    return max(vision, head + REAL["vae_gb"] + BUDGET_TEXT_ENCODER_ACTIVATION_GB + resident * LAYER_GB + streaming)


def test_on_a_16_gb_card_every_language_layer_stays_and_the_vision_tower_runs_first_alone():
    """15 GB (a 16 GB card less 1 GB) holds lm_head and all 28 language layers (13.17 GB) beside the VAE and the
    activations: nothing is copied per caption token (it was 2.2 GB a token with the vision tower's copy beside them)."""
    text = plan_budget(15.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL).text_encoder
    assert text.split and text.resident_layers == tuple(range(28)) and text.streamed_layers == () == text.fp8_layers
    assert text.decode_on_gpu and text.streamed_gb_per_token == 0.0
    assert text.peak_gb == pytest.approx(_text_peak(28)) == pytest.approx(13.906, abs=0.001)
    assert _text_peak(28) + BUDGET_TEXT_ENCODER_MARGIN_GB <= 15.0
    # With the vision tower's 1.26 GB beside the language layers (one phase) it would not fit.
    assert _text_peak(28) + REAL["text_vision_gb"] + BUDGET_TEXT_ENCODER_MARGIN_GB > 15.0
    assert "28/28 language layers resident, all resident (nothing copied per caption token); the vision tower runs " \
           "first, alone" in text.describe()


def test_on_a_12_gb_card_the_text_encoder_keeps_as_many_layers_as_fit_and_streams_the_others():
    plan = plan_budget(11.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    text = plan.text_encoder
    resident = len(text.resident_layers)
    assert text.split and resident + len(text.streamed_layers) == 28 and not text.decode_on_gpu
    margin = BUDGET_TEXT_ENCODER_MARGIN_GB
    assert _text_peak(resident) + margin <= 11.0 < _text_peak(resident + 1) + margin  # one more would not fit
    assert text.peak_gb == pytest.approx(_text_peak(resident))
    # 17 resident, 11 streamed: 4.8 GB copied per caption token (13 and 6.5 GB with the vision tower beside them).
    assert resident == 17 and text.streamed_gb_per_token == pytest.approx(11 * LAYER_GB) == pytest.approx(4.775, abs=0.001)
    assert 0 in text.resident_layers and 1 in text.resident_layers  # layer 0 starts the copies
    # The transformer keeps as many blocks as fit beside the job, as on 24 GB.
    assert plan.denoise_peak_gb <= 11.0 - BUDGET_SAFETY_MARGIN_GB
    assert 1 <= len(plan.resident_blocks) < 60


def test_on_a_24_gb_card_the_text_encoder_stays_whole():
    plan = plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    assert not plan.text_encoder.split and plan.text_encoder.streamed_layers == ()
    assert plan.text_encoder_peak_gb == pytest.approx(15.445 + 0.236 + BUDGET_TEXT_ENCODER_ACTIVATION_GB)


def test_the_real_models_minimum_is_what_auto_uses_without_the_files():
    minimum = budget_minimum_gb(REAL)  # the default job (640 px, 4 layers) beside one resident block
    assert math.ceil(minimum) == BUDGET_AUTO_MIN_VRAM_GB
    plan_budget(minimum, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    with pytest.raises(ValueError, match=r"needs at least 6\.6 GB .* run a smaller job \(640 px, fewer layers\)"):
        plan_budget(minimum - 0.1, image_tokens=DEFAULT_JOB_TOKENS, **REAL)


def test_the_largest_job_is_planned_with_the_pipelines_rounding_to_32_px():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    ratios = [r / 100 for r in range(100, 1601)] + [100 / r for r in range(100, 1601)]
    frame = max((w // 16) * (h // 16) for w, h in (calculate_dimensions(1024 * 1024, r) for r in ratios))
    assert BUDGET_PLAN_IMAGE_TOKENS == (LAYERS_RANGE[1] + 2) * frame
    # A 12 GB card (11 GB free) runs the default job; the largest is refused with what would fit.
    plan_budget(11.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    with pytest.raises(ValueError, match=r"--vram-budget 11 GB is too small .* needs at least 11\.3 GB"):
        plan_budget(11.0, **REAL)


def test_the_sizes_read_from_the_weight_files_match_the_loaded_models(models_dir, demo_pipe):
    path = app.get_model_path(demo_settings(models_dir))
    from_files = budget_sizes_from_files(path, element_size=4)  # the demo loads in float32 on the CPU
    loaded = budget_sizes(demo_pipe.pipe.transformer, demo_pipe.pipe.text_encoder, demo_pipe.pipe.vae)
    assert from_files.keys() == loaded.keys()
    for key, value in loaded.items():
        assert from_files[key] == pytest.approx(value, abs=2**-20), key  # non-persistent buffers (RoPE) are not in the files
    assert from_files["text_num_layers"] == 2 and from_files["num_blocks"] == 4


def test_a_machine_that_fits_nothing_is_told_its_figures_and_what_each_mode_needs():
    with pytest.raises(ValueError) as err:
        machine_fits("sequential", REAL, vram_gb=8.0, ram_gb=16.0)
    message = str(err.value)
    # sequential keeps every weight in RAM; the budget mode would read the rest from the files (tests/test_low_ram.py)
    for part in ("8.0 GB of VRAM", "16.0 GB of RAM", "needs 53.5 GB plus 4 GB",
                 f"The budget mode: here it needs {budget_minimum_ram_gb(REAL, 8.0):.1f} GB of RAM"):
        assert part in message


def test_a_mode_too_big_for_the_card_names_the_one_that_fits():
    with pytest.raises(ValueError, match=r"--offload off needs ~63 GB of VRAM and this GPU has 15\.0 GB: use "
                                         r"--offload auto \(here: budget\)"):
        machine_fits("off", REAL, vram_gb=15.0, ram_gb=64.0)
    with pytest.raises(ValueError, match=r"--offload model needs ~47 GB .* has 5\.0 GB: .*\(here: sequential\)"):
        machine_fits("model", REAL, vram_gb=5.0, ram_gb=64.0)
    machine_fits("budget", REAL, vram_gb=11.0, ram_gb=64.0)  # fits: no error
    machine_fits("sequential", REAL, vram_gb=4.0, ram_gb=64.0)


def test_too_small_a_budget_exits_2_before_loading_without_a_traceback(tmp_path, models_dir, rgba_image):
    image = tmp_path / "in.png"
    rgba_image.save(image)
    result = run_app("decompose", str(image), "--demo", "--models-dir", str(models_dir), "--offload", "budget",
                     "--vram-budget", "3", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --vram-budget 3 GB is too small for the budget offload mode" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Loaded " not in result.stderr  # refused before from_pretrained
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def split_pipe(models_dir):
    """The demo pipeline in budget mode with the text encoder split: the vision tower a stage of its own, then layer 0
    resident and layer 1 streamed, the embeddings looked up in host RAM; every transformer block but block 0 streamed."""
    pipe = app.load_pipeline(demo_settings(models_dir))
    engine_on(pipe, float("inf"), resident_blocks=1, text_resident_layers=1)
    return pipe


def _count_onloads(groups):
    counts = []
    for group in groups:
        group.onload_ = (lambda onload: lambda: (counts.append(1), onload())[1])(group.onload_)
    return counts


def test_the_split_text_encoder_gives_the_layers_and_the_caption_tokens_of_off(models_dir, rgba_image, split_pipe):
    reference = app.load_pipeline(demo_settings(models_dir))
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=2, seed=11)
    expected, result = app.infer(reference, rgba_image, **kwargs), app.infer(split_pipe, rgba_image, **kwargs)
    for a, b in zip(expected.layers, result.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The caption path (vision tower, image tokens, decoding), shortened to 6 tokens: the same tokens.
    layers, vision, _ = text_encoder_parts(split_pipe.pipe.text_encoder)
    text_hook = HookRegistry.check_if_exists_or_initialize(layers[1]).get_hook(_GROUP_OFFLOADING)
    layer_loads = _count_onloads([text_hook.group])
    layer_calls, stages = [], []
    handle = layers[1].register_forward_pre_hook(lambda module, args: layer_calls.append(1))
    enter = split_pipe.stages.enter
    split_pipe.stages.enter = lambda stage, image_tokens=None: (stages.append(stage), enter(stage, image_tokens))[1]
    try:
        tokens = []
        for pipe in (reference, split_pipe):
            inputs = pipe.pipe.vl_processor(text=pipe.pipe.image_caption_prompt_en, images=rgba_image.resize((64, 64)),
                                       padding=True, return_tensors="pt")
            with torch.inference_mode():
                tokens.append(pipe.pipe.text_encoder.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False))
    finally:
        del text_hook.group.onload_, split_pipe.stages.enter
        handle.remove()
    assert torch.equal(tokens[0], tokens[1])
    # generate starts in the vision stage (its one call), the language model's stage follows, once per caption.
    assert stages[:2] == ["text_vision", "text_vision"] and set(stages[2:]) == {"text_encoder"}
    # The streamed layer ran once per forward (prefill + 5 decode steps), each time through its hook.
    assert len(layer_calls) == 6 and len(layer_loads) >= 6


def test_out_of_memory_in_the_split_text_encoder_frees_everything_and_the_next_run_works(monkeypatch, rgba_image,
                                                                                         split_pipe):
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=2, seed=3)
    expected = app.infer(split_pipe, rgba_image, **kwargs)
    layer = text_encoder_parts(split_pipe.pipe.text_encoder)[0][1]  # the streamed language layer
    forward = layer.forward

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(layer, "forward", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="Out of GPU memory during the decomposition; the memory was freed"):
        app.infer(split_pipe, rgba_image, **{**kwargs, "prompt": ""})  # fails in the caption's prefill
    monkeypatch.setattr(layer, "forward", forward)
    assert split_pipe.stages.current is None  # every weight went back to its host copy
    result = app.infer(split_pipe, rgba_image, **kwargs)
    for a, b in zip(expected.layers, result.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_job_too_large_for_the_budget_is_refused_when_it_starts_and_the_next_run_works(models_dir, rgba_image,
                                                                                           demo_pipe):
    # A budget that holds the default job (the demo's minimum is the real model's activations plus the margin:
    # ~4.4 GB at 640 px / 4 layers) but not 1024 px / 10 layers (~9 GB): enabling warns, the large job is refused.
    pipe = app.load_pipeline(demo_settings(models_dir))
    engine_on(pipe, 6.0)
    with pytest.raises(ValueError, match=r"--vram-budget 6 GB is too small .* activations for 49152 image tokens .* "
                                         r"run a smaller job \(640 px, fewer layers\)"):
        app.infer(pipe, rgba_image.resize((64, 64)), prompt="shapes", layers=10, resolution=1024,
                  num_inference_steps=2, seed=4)
    assert pipe.stages.current is None  # released
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=2, seed=4)
    expected, result = app.infer(demo_pipe, rgba_image, **kwargs), app.infer(pipe, rgba_image, **kwargs)
    for a, b in zip(expected.layers, result.layers):
        assert np.array_equal(np.asarray(a), np.asarray(b))
