"""The caption's greedy decoder (src/studio/caption.py) against transformers' own `generate`, on the demo model.

Without CUDA the decoder runs its step eagerly: the same loop, static KV cache and in-place step as the CUDA graph
replays on a GPU (bench/probe_caption_graphs.py measures that one against eager in bf16). Every expected value
here comes from `generate` itself, called on the same inputs.
"""

import pytest
import torch
from PIL import Image, ImageDraw

import app
from studio import caption


def caption_inputs(pipe, image: Image.Image, resolution: int = 640) -> dict:
    """The text encoder's inputs for the caption of `image`, built as `app.caption_image` and the pipeline's
    `get_image_caption` build them."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    width, height = calculate_dimensions(resolution * resolution, image.width / image.height)
    prompt_image = pipe.image_processor.resize(image, height, width)
    return dict(pipe.vl_processor(text=pipe.image_caption_prompt_en, images=prompt_image, padding=True,
                                  return_tensors="pt"))


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = torch.Generator().manual_seed(seed)
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (torch.rand(2, generator=rng) * torch.tensor([width, height]) * 0.6).tolist()
        color = tuple(int(c) for c in torch.randint(0, 256, (4,), generator=rng))
        draw.rectangle([x0, y0, x0 + width * 0.3, y0 + height * 0.3], fill=color)
    return image


class Recorder:
    """A streamer that writes down every call it gets, as generate's streamers get them."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.shape, value.tolist()))

    def end(self):
        self.calls.append(("end",))


def generate(pipe, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.pipe.text_encoder.generate(**kwargs)


def first_new_token_at(tokens: list[int], at_least: int) -> int:
    """The first position >= at_least whose token does not occur earlier in `tokens` (an end of text there ends
    the caption there)."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("size, resolution, max_new_tokens", [((300, 200), 640, 96), ((200, 320), 1024, 40),
                                                              ((256, 256), 640, 9), ((300, 200), 640, 2),
                                                              ((300, 200), 640, 1)])
def test_tokens_equal_generate(demo_pipe, size, resolution, max_new_tokens):
    inputs = caption_inputs(demo_pipe.pipe, picture(*size, seed=sum(size)), resolution)
    expected = generate(demo_pipe, **inputs, max_new_tokens=max_new_tokens)
    stats = {}
    decoded = caption.greedy_generate(demo_pipe.pipe.text_encoder, max_new_tokens=max_new_tokens, stats=stats, **inputs)
    assert expected.shape[1] == inputs["input_ids"].shape[1] + max_new_tokens  # the demo writes no end of text
    assert torch.equal(decoded, expected)
    assert stats["steps"] == max_new_tokens - 1 and stats["graphs"] is False  # the CPU: the step, eagerly


@pytest.mark.parametrize("position", [0, 8, 9])  # the first token, around the host's reads every 8 steps
def test_end_of_text_ends_the_caption_as_generate(demo_pipe, position):
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=1))
    length = inputs["input_ids"].shape[1]
    free = generate(demo_pipe, **inputs, max_new_tokens=64)[0, length:].tolist()
    at = first_new_token_at(free, position)
    end = free[at]  # this token as the end of text: generate stops after writing it
    expected = generate(demo_pipe, **inputs, max_new_tokens=64, eos_token_id=[end, 10**6])
    decoded = caption.greedy_generate(demo_pipe.pipe.text_encoder, max_new_tokens=64, eos_token_id=[end, 10**6], **inputs)
    assert expected.shape[1] == length + at + 1
    assert torch.equal(decoded, expected)


def test_end_of_text_from_the_generation_config(demo_pipe):
    """The caption's own path: no eos argument, the text encoder's generation config names it."""
    config = demo_pipe.pipe.text_encoder.generation_config
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=2))
    length = inputs["input_ids"].shape[1]
    free = generate(demo_pipe, **inputs, max_new_tokens=40)[0, length:].tolist()
    at = first_new_token_at(free, 12)
    saved, config.eos_token_id = config.eos_token_id, free[at]
    try:
        expected = generate(demo_pipe, **inputs, max_new_tokens=40)
        decoded = caption.greedy_generate(demo_pipe.pipe.text_encoder, max_new_tokens=40, **inputs)
    finally:
        config.eos_token_id = saved
    assert expected.shape[1] == length + at + 1
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("eos_at", [None, 11])
def test_streamer_gets_generates_calls(demo_pipe, eos_at):
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=3))
    length = inputs["input_ids"].shape[1]
    options = dict(max_new_tokens=30)
    if eos_at is not None:
        free = generate(demo_pipe, **inputs, max_new_tokens=30)[0, length:].tolist()
        options["eos_token_id"] = free[first_new_token_at(free, eos_at)]
    expected, decoded = Recorder(), Recorder()
    generate(demo_pipe, **inputs, **options, streamer=expected)
    caption.greedy_generate(demo_pipe.pipe.text_encoder, **inputs, **options, streamer=decoded)
    assert expected.calls[0][0] == "put" and expected.calls[0][1] == (1, length)  # the prompt first
    assert decoded.calls == expected.calls


def test_stop_ends_the_decode_between_steps(demo_pipe):
    """`stop` runs before the prefill and before each decode step; what it raises ends the caption there."""
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=4))
    forwards, stops = [], []

    class Stopped(RuntimeError):
        pass

    def stop():
        stops.append(1)
        if len(stops) == 5:  # 1: before the prefill; 2, 3, 4: before decode steps 1-3; 5: before step 4
            raise Stopped

    hook = demo_pipe.pipe.text_encoder.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args: forwards.append(1))
    try:
        with pytest.raises(Stopped):
            caption.greedy_generate(demo_pipe.pipe.text_encoder, max_new_tokens=64, stop=stop, **inputs)
    finally:
        hook.remove()
    assert len(forwards) == 1 + 3  # the prefill and three decode steps, nothing after Stop


def test_teacher_forced_logits_equal_eager_in_float32(demo_pipe):
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=5))
    length = inputs["input_ids"].shape[1]
    greedy = generate(demo_pipe, **inputs, max_new_tokens=24)[0, length:]
    arbitrary = torch.randint(0, demo_pipe.pipe.text_encoder.config.text_config.vocab_size, (24,),
                              generator=torch.Generator().manual_seed(0))
    arbitrary[arbitrary == demo_pipe.pipe.text_encoder.generation_config.eos_token_id] = 5
    for tokens in (greedy, arbitrary):
        forced = caption.teacher_forced_logits(demo_pipe.pipe.text_encoder, tokens, **inputs)
        assert forced["eager"].shape == forced["decoder"].shape == (24, demo_pipe.pipe.text_encoder.lm_head.out_features)
        assert forced["max_abs_diff"] < 1e-5 * float(forced["eager"].abs().max())
    assert torch.equal(forced["eager"].argmax(-1)[:1], greedy[:1])  # row 0: the prompt's own logits
    assert not torch.equal(forced["eager"][1:], caption.teacher_forced_logits(
        demo_pipe.pipe.text_encoder, greedy, **inputs)["eager"][1:])  # what was fed changes the logits: it was fed


@pytest.mark.parametrize("settings", [dict(repetition_penalty=1.3), dict(do_sample=True, top_k=1, temperature=0.7)])
def test_greedy_variants_equal_generate(demo_pipe, settings):
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=6))
    torch.manual_seed(0)
    expected = generate(demo_pipe, **inputs, max_new_tokens=40, **settings)
    decoded = caption.greedy_generate(demo_pipe.pipe.text_encoder, max_new_tokens=40, **inputs, **settings)
    assert torch.equal(decoded, expected)
    if "repetition_penalty" in settings:  # the penalty changed the text: it was applied, not ignored
        assert not torch.equal(expected, generate(demo_pipe, **inputs, max_new_tokens=40))


def test_a_static_cache_setting_changes_nothing(demo_pipe):
    """A generation config that asks for a static cache (the retired --caption-compile set one): the prefill's cache
    is then static (its slots past the prompt empty), and the decode still equals generate's."""
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=11))
    settings = dict(cache_implementation="static", max_cache_len=2048, max_new_tokens=20)
    decoded = caption.greedy_generate(demo_pipe.pipe.text_encoder, **inputs, **settings)
    assert torch.equal(decoded, generate(demo_pipe, **inputs, max_new_tokens=20))


def test_other_decoding_goes_to_generate(demo_pipe):
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=7))
    assert "num_beams=2" in caption.greedy_problem(
        demo_pipe.pipe.text_encoder.generation_config.__class__(num_beams=2, max_new_tokens=5))
    expected = generate(demo_pipe, **inputs, max_new_tokens=12, num_beams=2)
    decoded = caption.greedy_generate(demo_pipe.pipe.text_encoder, max_new_tokens=12, num_beams=2, **inputs)
    assert torch.equal(decoded, expected)


def test_the_decoder_serves_caption_image(demo_pipe):
    """The integration point: with `decoder=True` the app's own `caption_image` (its cap and progress streamer
    included) decodes through `graph_decode`'s static cache and writes the text generate writes; then `generate` is
    the class's again."""
    image = picture(300, 200, seed=8)
    expected = app.caption_image(demo_pipe.pipe, image, 640, max_new_tokens=40)
    caches = []
    hook = demo_pipe.pipe.text_encoder.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(type(kwargs.get("cache")).__name__), with_kwargs=True)
    try:
        text = app.caption_image(demo_pipe.pipe, image, 640, decoder=True, max_new_tokens=40)
    finally:
        hook.remove()
    assert text == expected and len(text) > 10
    assert caches.count("_StaticKV") == 40 - 1  # every decode step, not generate's
    assert "generate" not in demo_pipe.pipe.text_encoder.__dict__


def test_the_step_is_one_graph_without_host_syncs(demo_pipe):
    """What a CUDA graph needs, checked without CUDA: torch.compile(fullgraph=True) refuses a step that reads a
    value back to the host (.item(), .tolist()) or branches on one; the traced step then advances its buffers as
    the eager one does (repetition penalty included). Whether its kernels (SDPA with a mask, index_copy_) capture
    on CUDA is for bench/probe_caption_graphs.py to show on a GPU."""
    inputs = caption_inputs(demo_pipe.pipe, picture(300, 200, seed=10))
    with torch.no_grad():
        prefill = demo_pipe.pipe.text_encoder.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True)
        steps = [caption._Step(demo_pipe.pipe.text_encoder, prefill["cache"], inputs["input_ids"], prefill.sequences[:, -1],
                               8, repetition_penalty=1.2) for _ in range(2)]
        traced = torch.compile(steps[0].__call__, backend="eager", fullgraph=True)
        for _ in range(4):
            traced()
            steps[1]()
    torch._dynamo.reset()
    for name in ("tokens", "length", "position", "mask", "seen"):
        assert torch.equal(getattr(steps[0], name), getattr(steps[1], name)), name
    # The traced step's float32 kernels may sum in another order (measured: 4e-8 of logits up to 0.34).
    assert torch.allclose(steps[0].logits, steps[1].logits, rtol=0, atol=1e-5 * float(steps[1].logits.abs().max()))
    assert int(steps[0].length) == inputs["input_ids"].shape[1] + 4


def test_graphs_need_a_hook_free_step(demo_pipe):
    encoder = demo_pipe.pipe.text_encoder
    assert caption.hooks_problem(encoder) is None
    assert "no CUDA" in caption.graphs_problem(encoder, torch.device("cpu"))
    hook = encoder.model.language_model.layers[1].mlp.register_forward_pre_hook(lambda module, args: None)
    try:
        assert caption.hooks_problem(encoder).startswith("layers.1.mlp has forward hooks")
    finally:
        hook.remove()


def test_bf16_tolerance_is_ulps_of_the_largest_logit():
    logits = torch.tensor([[5.4, -1.0, 0.2], [0.3, -1.0, 0.9], [-40.0, 3.0, 0.0]])
    # bf16 keeps 8 significant bits: one ulp at |x| in [2**e, 2**(e+1)) is 2**(e-7).
    expected = caption.LOGIT_TOLERANCE_ULPS * torch.tensor([2.0 ** (2 - 7), 2.0 ** (0 - 7), 2.0 ** (5 - 7)])
    assert torch.equal(caption.bf16_tolerance(logits), expected)


def test_the_decoder_under_the_budget_engine_with_the_text_encoder_split(demo_pipe, models_dir):
    """The 12 GB layout: the engine's `generate` wrapper brings the stage in for the prefill; its per-layer
    streaming and host-RAM embedding hooks then run in every decode step (eagerly: `hooks_problem` names them)."""
    from conftest import demo_settings, engine_on

    split = app.load_pipeline(demo_settings(models_dir))
    engine_on(split, float("inf"), resident_blocks=1, text_resident_layers=1)
    encoder = split.pipe.text_encoder
    assert caption.hooks_problem(encoder) is not None
    inputs = caption_inputs(split.pipe, picture(300, 200, seed=9))
    streamed = []
    hook = encoder.model.language_model.layers[1].register_forward_pre_hook(
        lambda module, args, kwargs: streamed.append(type(kwargs.get("cache")).__name__), with_kwargs=True)
    try:
        decoded = caption.greedy_generate(encoder, max_new_tokens=24, **inputs)
    finally:
        hook.remove()
    assert torch.equal(decoded, generate(demo_pipe, **inputs, max_new_tokens=24))  # the same weights, unhooked
    assert streamed.count("_StaticKV") == 24 - 1
    assert split.stages.current == "text_encoder"  # entered for the prefill's language layers
