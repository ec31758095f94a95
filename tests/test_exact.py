"""Every card at the speed of its arithmetic, exactly (issue 24), what the CPU can check: the caption's two phases on
16 GB cards (the vision tower alone, then every language layer) against --offload off, the decoder's embedding lookup
outside its step, the fused QKV projections against diffusers' own processor in float32 and under the engine's hooks,
and where regional compile, fusion and the caption's CUDA graphs are off and why. Speed, peaks and the bf16 differences
are measured on a GPU by bench/bench_exact.py."""

import copy

import pytest
import torch

import app
from studio import caption
from studio.compiling import FusedQwenDoubleStreamAttnProcessor, fuse_problem, fuse_qkv_projections, machine_compile_problem
from studio.engine.memory import text_encoder_parts
from studio.engine.plan import plan_machine
from studio.modes import OFFLOAD, QUANT
from conftest import demo_settings, engine_on
from test_small_cards import REAL

CAPTION_TOKENS = 24  # the demo writes 512 random tokens (~30 s on 2 cores); these tests need only a few
@pytest.fixture(scope="module")
def two_phase(models_dir):
    """The demo in budget mode with the 16 GB card's caption stage: the vision tower a stage of its own, then both
    language layers resident (the planner's override, as a 15 GB budget plans the real model)."""
    loaded = app.load_pipeline(demo_settings(models_dir))
    engine_on(loaded, float("inf"), resident_blocks=1, text_resident_layers=2)
    return loaded


def test_the_two_phase_caption_gives_the_caption_and_prompt_encoding_of_off(demo_pipe, rgba_image, two_phase,
                                                                            monkeypatch):
    """The text encoder's stage in two phases changes nothing but where its weights live: the same caption (through
    the app's decoder) and the same prompt encoding, bitwise; the denoising after it is the engine's as on 24 GB."""
    text = two_phase.machine.default.text_encoder
    assert text.split and text.decode_on_gpu and text.resident_layers == (0, 1)
    entered = []
    enter = two_phase.stages.enter
    monkeypatch.setattr(two_phase.stages, "enter", lambda stage, image_tokens=None: (entered.append(stage),
                                                                                     enter(stage, image_tokens))[1])
    outputs = []
    for loaded in (two_phase, demo_pipe):
        with torch.inference_mode():
            text = app.caption_image(loaded.pipe, rgba_image, 640, decoder=True, max_new_tokens=CAPTION_TOKENS)
            outputs.append((text, loaded.pipe.encode_prompt(text, device=torch.device("cpu"))))
        loaded.release_vram()
    (caption, (embeds, mask)), (expected_caption, (expected_embeds, expected_mask)) = outputs
    assert caption == expected_caption and len(caption) > 10
    assert torch.equal(embeds, expected_embeds) and (mask is None) == (expected_mask is None)
    # The vision tower alone first (generate's start, then its own call), then the language model's stage for the
    # caption's prefill and steps and the prompt encoding.
    first_language = entered.index("text_encoder")
    assert set(entered[:first_language]) == {"text_vision"} and first_language >= 1
    assert set(entered[first_language:]) == {"text_encoder"}


def test_the_two_phases_hold_the_vision_tower_and_the_language_model_apart(two_phase):
    layers, vision, embed = text_encoder_parts(two_phase.pipe.text_encoder)
    ids = lambda *modules: {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}  # noqa: E731
    stage = {name: {id(tensor) for tensor, _ in pairs} for name, pairs in two_phase.stages.weights.items()}
    assert stage["text_vision"] == ids(vision)
    # The language stage: every layer, the norm and lm_head; the vision tower's 3 MB patch_embed (generate reads the
    # model's device from it); not the vision blocks, not the embedding table (host RAM).
    assert ids(*layers, two_phase.pipe.text_encoder.lm_head, vision.patch_embed) <= stage["text_encoder"]
    assert not stage["text_encoder"] & (ids(*vision.blocks, vision.merger) | ids(embed))
    assert stage["text_encoder_streamed"] == ids(embed)  # nothing streamed: only the table, looked up in host RAM
    # No hook on any module a decode step calls: a CUDA graph could replay it; the table's lookup goes outside. A
    # prompt encoding leaves transformers' output recorders on every layer: idle outside such a forward, they count not.
    with torch.inference_mode():
        two_phase.pipe.encode_prompt("a card", device=torch.device("cpu"))
    assert layers[0]._forward_hooks  # the recorder
    assert caption.hooks_problem(two_phase.pipe.text_encoder, with_embedding=False) is None
    assert "has forward hooks" in caption.hooks_problem(two_phase.pipe.text_encoder)
    assert caption.embedding_outside(two_phase.pipe.text_encoder, torch.device("cpu"))


def test_the_step_with_the_embedding_looked_up_outside_gives_generates_tokens(demo_pipe, two_phase, rgba_image):
    """What the two-phase stage's graph replays: the step reads a static embedded-input buffer that `prepare` fills
    from the host-RAM table before each step (here eagerly, through the engine's hooks)."""
    encoder = two_phase.pipe.text_encoder
    inputs = dict(demo_pipe.pipe.vl_processor(text=demo_pipe.pipe.image_caption_prompt_en, images=rgba_image,
                                              padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = demo_pipe.pipe.text_encoder.generate(**inputs, max_new_tokens=12)
        prefill = encoder.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True)
        step = caption._Step(encoder, prefill["cache"], inputs["input_ids"], prefill.sequences[:, -1], 12, None,
                             embed_outside=True)
        for _ in range(11):
            step.prepare()
            step()
    assert step.embedded is not None and torch.equal(step.tokens, expected[0, inputs["input_ids"].shape[1]:])


# ----------------------------------------------------------------------------------------------------
# Fused QKV projections
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformer_call(demo_pipe, rgba_image) -> dict:
    """The keyword arguments of the transformer's first call in a 2-step decomposition (cond, true CFG)."""
    calls = []
    handle = demo_pipe.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(copy.deepcopy(kwargs)), with_kwargs=True)
    try:
        app.infer(demo_pipe, rgba_image, prompt="a red circle", layers=2, num_inference_steps=2, seed=3)
    finally:
        handle.remove()
    return calls[0]


@pytest.fixture(scope="module")
def fused_transformer(demo_pipe):
    fused = copy.deepcopy(demo_pipe.pipe.transformer)
    assert fuse_qkv_projections(fused) == len(fused.transformer_blocks) == fuse_qkv_projections(fused)  # twice: once
    return fused


def test_fused_qkv_equals_diffusers_processor_in_float32_and_holds_each_weight_once(demo_pipe, transformer_call,
                                                                                   fused_transformer):
    unfused, fused = demo_pipe.pipe.transformer, fused_transformer
    attn = fused.transformer_blocks[0].attn
    assert isinstance(attn.processor, FusedQwenDoubleStreamAttnProcessor)
    assert not any(hasattr(attn, name) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    # Stacked, not copied beside the originals.
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in unfused.parameters())
    with torch.no_grad():
        expected, result = unfused(**transformer_call)[0], fused(**transformer_call)[0]
    assert result.shape == expected.shape and not torch.equal(expected, torch.zeros_like(expected))
    # One matmul of the stacked weights instead of three: float32's summation order may differ, nothing more.
    assert (result - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_engines_block_hooks_stream_the_fused_blocks(models_dir, transformer_call):
    """Fused before any hook (as `apply_memory_optimizations` does): the budget engine's groups and host copies are
    made from the fused modules, and its streamed blocks give the fused pipeline's output with --offload off, bitwise
    (both loaded alike: a tensor's alignment alone can change the CPU's float32 rounding)."""
    off, budget = app.load_pipeline(demo_settings(models_dir)), app.load_pipeline(demo_settings(models_dir))
    for loaded in (off, budget):
        fuse_qkv_projections(loaded.pipe.transformer)
    engine_on(budget, float("inf"), resident_blocks=1)
    streamed = budget.stages.streamed_groups[0]
    assert any(module is budget.pipe.transformer.transformer_blocks[1] for module in streamed.modules)
    calls = []
    handle = budget.pipe.transformer.transformer_blocks[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            result = budget.pipe.transformer(**transformer_call)[0]
            expected = off.pipe.transformer(**transformer_call)[0]
    finally:
        handle.remove()
        budget.release_vram()
    assert budget.stages.plan.streamed_blocks == (1, 2, 3) and calls == [1]  # through the streamed block's hook
    assert torch.equal(result, expected)


@pytest.mark.parametrize("on_cuda, quant, low_ram, expected", [
    (False, "bf16", False, "pay on a GPU"),
    (True, "fp8_storage", False, "--quantization fp8_storage"),
    (True, "bf16", True, "less RAM than the weights"),
    (True, "bf16", False, None),
])
def test_fusion_is_off_where_it_cannot_pay_or_would_change_the_plan(on_cuda, quant, low_ram, expected):
    machine = plan_machine(OFFLOAD["budget"], REAL, 23.0, 30.0 if low_ram else 64.0)
    assert machine.ram.low_ram is low_ram
    problem = fuse_problem(on_cuda, QUANT[quant], machine)
    assert problem == expected if expected is None else expected in problem


# ----------------------------------------------------------------------------------------------------
# Where regional compile and the caption's graphs run
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_cuda, triton, capability, system, version, expected", [
    (False, True, None, "Linux", "2.11.0", "no CUDA GPU"),
    (True, False, (8, 9), "Linux", "2.11.0", "need Triton"),
    (True, True, (6, 1), "Linux", "2.11.0", "compute capability 7.0 or newer and this GPU has 6.1"),
    (True, True, (8, 9), "Windows", "2.4.1+cu121", "PyTorch 2.4 on Windows"),
    (True, True, (8, 9), "Windows", "2.6.0+cu126", None),
    (True, True, (9, 0), "Linux", "2.11.0+cu130", None),
])
def test_regional_compile_is_on_where_it_can_run_and_says_why_not_elsewhere(on_cuda, triton, capability, system,
                                                                            version, expected):
    problem = machine_compile_problem(on_cuda, triton, capability, system, version)
    assert problem == expected if expected is None else expected in problem


def test_the_caption_decodes_with_graphs_where_its_weights_stay_on_the_gpu():
    def plan(vram_gb):
        return plan_machine(OFFLOAD["budget"], REAL, vram_gb, 64.0)

    assert caption.caption_graphs_problem(OFFLOAD["budget"], True, plan(23.0)) is None  # 24 GB: whole
    assert caption.caption_graphs_problem(OFFLOAD["budget"], True, plan(15.0)) is None  # 16 GB: two phases
    assert "11 language layers are copied in at each token" in caption.caption_graphs_problem(OFFLOAD["budget"], True,
                                                                                               plan(11.0))
    assert caption.caption_graphs_problem(OFFLOAD["off"], True) is None
    assert caption.caption_graphs_problem(OFFLOAD["model"], True) is None  # the steps never call the hooked forward
    assert "transformers' generate" in caption.caption_graphs_problem(OFFLOAD["sequential"], True)
    assert "no CUDA GPU" in caption.caption_graphs_problem(OFFLOAD["off"], False)

