"""Speed features (issues 13, 24): the caption's attention kernels, regional compile, and the lossy compute modes'
refusals.

Speed itself is measured by bench/bench_exact.py (earlier: bench/results/speed.json), never by a test. These tests check that
the features change nothing they should not: the same caption and layers, the same layers compiled, no recompiles.
"""

import logging

import numpy as np
import pytest
import torch

import app
import studio.compiling
from studio.compiling import COMPILE_OPTIONS, compile_cache_file, compile_problem, load_compile_cache
from studio.modes import BF16, OFFLOAD, QUANT
from studio.params import STEPS_RANGE
from studio.quant import _torchao_linear_filter, quant_problem
from conftest import demo_settings

CAPTION_TOKENS = 24  # the demo's caption is 512 random tokens (~30 s on 2 cores); these tests need only a few


@pytest.fixture
def short_captions(demo_pipe, monkeypatch):
    """Cap the caption's length (speed only) and record, for every forward of the first language layer (the prefill,
    each decode step, each prompt encoding), whether cuDNN attention was allowed."""
    monkeypatch.setattr(app, "CAPTION_MAX_NEW_TOKENS", CAPTION_TOKENS)
    cudnn_allowed: list[bool] = []
    handle = demo_pipe.pipe.text_encoder.model.language_model.layers[0].register_forward_pre_hook(
        lambda *_: cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled()))
    yield cudnn_allowed
    handle.remove()


def test_caption_runs_without_cudnn_attention_and_the_layers_stay_the_same(demo_pipe, rgba_image, short_captions, monkeypatch):
    run = dict(prompt="", layers=2, num_inference_steps=2, seed=5)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    new = app.infer(demo_pipe, rgba_image, **run)
    # Caption: the prefill and CAPTION_TOKENS - 1 decode steps without cuDNN; then the prompt and negative prompt
    # encodings with it.
    assert short_captions[:CAPTION_TOKENS] == [False] * CAPTION_TOKENS
    assert short_captions[CAPTION_TOKENS:] == [cudnn_before] * 2
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before  # the setting is given back after the caption
    short_captions.clear()
    monkeypatch.setattr(app, "CAPTION_SDPA_BACKENDS", ())  # the behaviour before the change
    old = app.infer(demo_pipe, rgba_image, **run)
    assert short_captions[:CAPTION_TOKENS] == [cudnn_before] * CAPTION_TOKENS
    assert new.auto_caption and len(new.caption) > 0
    assert new.caption == old.caption
    for a, b in zip(new.layers, old.layers, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_blocks_under_budget_hooks_and_first_block_cache_match_eager_without_recompiling(models_dir, rgba_image,
                                                                                               monkeypatch):
    # Dynamo traces the real blocks with fullgraph=True (a graph break would raise); the "eager" backend runs the
    # traced graph without Inductor, so no C++ toolchain is needed on the CPU (which compiles nothing by default).
    monkeypatch.setattr(studio.compiling, "COMPILE_OPTIONS", dict(COMPILE_OPTIONS, backend="eager"))
    settings = dict(offload="budget", first_block_cache=True)
    eager_pipe = app.load_pipeline(demo_settings(models_dir, compile=False, **settings))
    monkeypatch.setattr(studio.compiling, "machine_compile_problem", lambda *args, **kwargs: None)
    compiled_pipe = app.load_pipeline(demo_settings(models_dir, compile=True, **settings))
    blocks = len(compiled_pipe.pipe.transformer.transformer_blocks)
    assert f"compiled_transformer_blocks({blocks})" in compiled_pipe.optimizations
    assert "compiled_transformer_blocks" not in " ".join(eager_pipe.optimizations)
    graphs = unique_graphs()
    for layers, prompt in ((2, "shapes"), (3, "red circle on blue")):  # a new layer count and prompt length
        run = dict(prompt=prompt, layers=layers, num_inference_steps=2, seed=3)
        compiled = app.infer(compiled_pipe, rgba_image, **run)
        eager = app.infer(eager_pipe, rgba_image, **run)
        assert len(compiled.layers) == layers
        for a, b in zip(compiled.layers, eager.layers, strict=True):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    # One graph serves every block, both jobs and both prompt lengths: the hooks stay outside it (fullgraph held).
    assert unique_graphs() - graphs == 1


def test_lossy_compute_on_a_cpu_machine_is_refused_with_the_reason_and_bf16_runs(models_dir, caplog):
    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        pipe = app.load_pipeline(demo_settings(models_dir, quantization="fp8_dynamic"))
    assert ("--quantization fp8_dynamic needs a CUDA GPU and this machine has none. Running bf16 compute instead "
            "(not lossy).") in caplog.text
    assert not [name for name in pipe.optimizations if "LOSSY" in name or "compiled" in name]
    linear = pipe.pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(linear.weight) is torch.nn.Parameter and linear.weight.dtype == torch.float32  # not quantized


@pytest.mark.parametrize("mode, offload, capability, torchao, expected", [
    ("fp8_dynamic", "off", (8, 6), "0.18.0", "compute capability 8.9 or newer for its fp8 matmuls; this one is 8.6"),
    ("int8_dynamic", "off", (7, 5), "0.18.0", "compute capability 8.0 or newer for its int8 matmuls; this one is 7.5"),
    ("int8_dynamic", "off", (8, 6), None, "needs the torchao package (pip install torchao)"),
    ("fp8_dynamic", "budget", (8, 9), "0.18.0", "runs only with --offload off (now: budget)"),
    ("fp8_dynamic", "sequential", (9, 0), "0.18.0", "--offload off (now: sequential)"),
])
def test_lossy_compute_problem_names_the_reason(mode, offload, capability, torchao, expected):
    assert expected in quant_problem(QUANT[mode], OFFLOAD[offload], capability, torchao is not None)


def test_lossy_compute_runs_where_it_can():
    assert quant_problem(QUANT["fp8_dynamic"], OFFLOAD["off"], (8, 9), True) is None
    assert quant_problem(QUANT["int8_dynamic"], OFFLOAD["off"], (8, 0), True) is None
    assert quant_problem(QUANT["fp8_storage"], OFFLOAD["budget"], None, False) is None  # any machine, any mode


def test_lossy_filter_keeps_the_one_row_linears_in_bf16(demo_pipe):
    names = [name for name, module in demo_pipe.pipe.transformer.named_modules()
             if _torchao_linear_filter(module, name)]
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.img_mlp.net.2" in names
    assert not [name for name in names if "_mod." in name or not name.startswith("transformer_blocks.")]
    assert "transformer_blocks.0.img_mod.1" not in names  # modulation: one row per image


def test_compile_is_refused_where_hooks_sit_inside_the_blocks():
    assert "accelerate's hooks" in compile_problem(OFFLOAD["sequential"], BF16)
    assert "fp8_storage" in compile_problem(OFFLOAD["budget"], QUANT["fp8_storage"])
    assert compile_problem(OFFLOAD["budget"], BF16) is None and compile_problem(OFFLOAD["off"], BF16) is None


def test_compile_and_lossy_flags_from_the_command_line_and_environment(monkeypatch):
    assert app.parse_args([])[1].compile is True  # where it can run (`compiling.machine_compile_problem`)
    assert app.parse_args(["--no-compile", "--quantization", "int8_dynamic"])[1].compile is False
    monkeypatch.setenv("QIL_COMPILE", "0")
    assert app.parse_args([])[1].compile is False
    with pytest.raises(SystemExit):  # an unknown mode is refused by the parser, naming the choices
        app.parse_args(["--quantization", "int4_dynamic"])


# ----------------------------------------------------------------------------------------------------
# The caption's decoder (CUDA graphs where they can run) and the warm-up at load time
# ----------------------------------------------------------------------------------------------------
def test_on_the_cpu_the_caption_decoder_runs_eagerly_and_nothing_warms_up(models_dir, caplog):
    with caplog.at_level(logging.INFO, logger=app.logger.name):
        pipe = app.load_pipeline(demo_settings(models_dir, warm_up=True))
    assert pipe.caption_decoder  # the decoder's steps, eagerly: no CUDA
    assert "Caption decoder without CUDA graphs: no CUDA GPU" in caplog.text
    assert not [name for name in pipe.optimizations if "caption_cuda_graphs" in name or "warm_up" in name]
    assert not app.load_pipeline(demo_settings(models_dir, caption_graphs=False)).caption_decoder


def test_warm_up_runs_a_short_caption_and_the_fewest_steps_then_gives_generate_back(demo_pipe):
    encoder, transformer = demo_pipe.pipe.text_encoder, demo_pipe.pipe.transformer
    assert "generate" not in encoder.__dict__
    calls = {"text_encoder": 0, "transformer": 0}
    layer = encoder.model.language_model.layers[0]  # the decoder's steps call the layers, not the text encoder
    handles = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__("text_encoder", calls["text_encoder"] + 1)),
               transformer.register_forward_pre_hook(lambda *_: calls.__setitem__("transformer", calls["transformer"] + 1))]
    try:
        seconds = app.warm_up(demo_pipe, resolution=640, layers=2)
    finally:
        for handle in handles:
            handle.remove()
    assert seconds > 0
    # The caption: WARM_UP_CAPTION_TOKENS forwards (prefill + one step per further token); then the prompt and the negative
    # prompt encoded once each. The transformer: the fewest steps, each with true CFG (two calls).
    assert calls["text_encoder"] == app.WARM_UP_CAPTION_TOKENS + 2
    assert calls["transformer"] == STEPS_RANGE[0] * 2
    assert "generate" not in encoder.__dict__  # the class's own generate again: the user's caption is whole


def test_caption_graphs_and_warm_up_flags_from_the_command_line_and_environment(monkeypatch):
    settings = app.parse_args([])[1]
    assert settings.caption_graphs is True and settings.warm_up is True  # exact to bf16: on by default
    settings = app.parse_args(["--no-caption-graphs", "--no-warm-up"])[1]
    assert settings.caption_graphs is False and settings.warm_up is False
    monkeypatch.setenv("QIL_WARM_UP", "0")
    monkeypatch.setenv("QIL_CAPTION_GRAPHS", "0")
    settings = app.parse_args([])[1]
    assert settings.warm_up is False and settings.caption_graphs is False
    with pytest.raises(SystemExit):  # retired: --caption-compile was not exact
        app.parse_args(["--caption-compile"])


# ----------------------------------------------------------------------------------------------------
# --compile's mega-cache (a second start loads what the first one compiled)
# ----------------------------------------------------------------------------------------------------
def test_compile_cache_file_sits_in_the_inductor_cache_dir_and_names_the_torch_version(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compile_cache_file() == tmp_path / f"mega_cache_torch{torch.__version__}.bin"
    assert load_compile_cache() is False  # none saved yet: nothing loaded, nothing said


def test_a_damaged_compile_cache_is_said_and_the_blocks_compile_anyway(models_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(studio.compiling, "COMPILE_OPTIONS", dict(COMPILE_OPTIONS, backend="eager"))  # no C++ toolchain needed
    monkeypatch.setattr(studio.compiling, "machine_compile_problem", lambda *args, **kwargs: None)  # the CPU compiles too
    damaged = compile_cache_file()
    damaged.write_bytes(b"half a file" * 100)
    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        pipe = app.load_pipeline(demo_settings(models_dir, compile=True))
    assert f"Compile cache {damaged} not loaded" in caplog.text and "compiling anew" in caplog.text
    blocks = len(pipe.pipe.transformer.transformer_blocks)
    assert f"compiled_transformer_blocks({blocks})" in pipe.optimizations  # not "cache loaded"
    assert "compile_cache_saved" not in pipe.optimizations  # the CPU has no warm-up to save after
    assert damaged.read_bytes() == b"half a file" * 100  # left for the user to delete, not overwritten half-read
