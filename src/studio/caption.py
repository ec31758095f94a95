"""The auto-caption's greedy decode, one CUDA graph per caption (issue 24, item 4). Imports no `app`.

Eager decoding of the 8.3B text encoder is bound by the host: ~1,370 kernel launches and generate's own Python per
token (20-30 ms a token against a ~4.2 ms weight-read floor on an H100). Here the prompt's prefill stays
transformers' own (`generate` with max_new_tokens=1: the vision tower, Qwen2.5-VL's mrope positions, the first
token), and the decode step -- embedding lookup, the 28 layers over a static KV cache, final norm, lm_head, argmax
and the in-place update of its own inputs for the next step -- is captured once as a `torch.cuda.CUDAGraph` and
replayed per token. The host reads the tokens back every CHECK_EVERY steps (streamer, end of text, Stop).

Why capturing once per caption suffices (no arena of stable addresses): a graph holds the raw addresses of the
weights it read at capture. It is captured after this caption's prefill, which is when the budget engine has
copied the text encoder's weights in (`BudgetStages.enter`, from forward pre-hooks: on 16 GB cards the vision
tower's stage first, then the language model's, both within the prefill), and it is destroyed before
`greedy_generate` returns. Between those two points nothing but the graph runs on the GPU, and the steps never call
the modules whose hooks change stages, so no weight moves while it lives. An arena (weights at the same addresses in
every caption) would only save the capture itself, once per caption; bench/probe_caption_graphs.py measures that
cost with the weights copied to new tensors between captions, as the engine does.

The token-embedding table may stay in host RAM (the engine's two-phase caption stage): each step's one row is then
looked up on the host before the replay (`_Step.prepare`, one sync a step) into a static buffer the graph reads.
Without CUDA, or where a weight would move inside the step (language layers streamed per token on 12 GB cards, float8
layers cast per call), the same loop runs the step eagerly: hooks run, no graph.

Exactness: the decode's numbers differ from eager `generate` only where kernels differ (attention over the static
cache with a mask of the unfilled slots, instead of over the grown dynamic cache without one). On the CPU in
float32 that is ~1e-7 of a logit (tests/test_caption_decode.py); in bf16 the tolerance is LOGIT_TOLERANCE_ULPS
bf16 ulps of the step's largest logit (`bf16_tolerance`): on a 2-layer bf16 model on the CPU the largest difference
was a quarter of it. On the full-size model (28 layers, H100, bench/bench_exact.py) 4 ulps is too tight for any two
exact computations: eager's own teacher-forced single pass differs from eager `generate` by up to 0.258 (mean 0.032)
and the graph decode by up to 0.235 (mean 0.032), within that spread (bench/RESULTS.md, "The caption's exactness").
"""

import contextlib
import copy
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------
# The host copies the new tokens back every this many decode steps: one sync per 8 steps (~34 ms of replays at the
# H100's floor) leaves the GPU idle for a few tens of microseconds, and a caption that meets its end of text computes
# at most 7 steps that are thrown away. Stop is checked before every step, the streamer fed after each read.
CHECK_EVERY = 8
# Steps run eagerly on a side stream before the capture (PyTorch's CUDA graph docs): cuBLAS handles and workspaces,
# lazily loaded kernels and the allocator's blocks exist before the capture records them. They are real steps.
WARM_UP_STEPS = 2
# Fewer decode steps than this and the capture costs more than it saves: the step runs eagerly.
MIN_GRAPH_STEPS = 8
# The static KV cache holds the prompt and the new tokens, rounded up to this many slots: SDPA's memory-efficient
# kernel reads the attention mask's rows in aligned chunks (a shorter row would be copied to a padded one per call).
CACHE_ALIGN = 64
# On a small bf16 model two computations of the same logits (different attention kernels, summation orders) agree to
# a few units in the last place of the largest logit (`bf16_tolerance`; the CPU tests' bound). On the full-size model
# the spread of two exact computations is wider, and that spread is the GPU check's tolerance (bench_exact.py).
LOGIT_TOLERANCE_ULPS = 4

# Generation settings the greedy decode reproduces exactly, and the values at which the others change nothing.
# Any other setting (beams, min length, bad words, ...) and `greedy_generate` hands the call to `generate`.
IGNORED_SETTINGS = {  # they do not change greedy decoding's tokens, or they are handled below
    "max_length", "max_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
    "length_penalty", "early_stopping", "repetition_penalty", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "transformers_version", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
}
NEUTRAL_SETTINGS = {
    "num_beams": (1,), "num_return_sequences": (1,), "num_beam_groups": (1,), "min_length": (0,),
    "min_new_tokens": (0,), "no_repeat_ngram_size": (0,), "encoder_no_repeat_ngram_size": (0,),
    "encoder_repetition_penalty": (1.0,), "guidance_scale": (1.0,), "diversity_penalty": (0.0,),
    "renormalize_logits": (False,), "remove_invalid_values": (False,), "output_attentions": (False,),
    "output_hidden_states": (False,), "output_scores": (False,), "output_logits": (False,),
    "return_dict_in_generate": (False,), "use_cache": (True,), "low_memory": (False,), "is_assistant": (False,),
    "token_healing": (False,), "penalty_alpha": (0.0,), "prefill_chunk_size": (),
}


# ----------------------------------------------------------------------------------------------------------------
# What can run
# ----------------------------------------------------------------------------------------------------------------
def greedy_problem(config) -> str | None:
    """Why `generate` with this GenerationConfig is not plain greedy decoding (None: `greedy_generate` reproduces
    it). Sampling with top_k=1 is greedy (the one token left is drawn), up to exact ties of the top two scores."""
    if config.do_sample and config.top_k != 1:
        return f"do_sample=True with top_k={config.top_k} samples"
    if config.max_new_tokens is None:
        return "no max_new_tokens"
    if config.repetition_penalty is not None and not config.repetition_penalty > 0:
        return f"repetition_penalty={config.repetition_penalty}"
    for name, value in config.to_dict().items():
        if value is None or name.startswith("_") or name in IGNORED_SETTINGS:
            continue
        if name not in NEUTRAL_SETTINGS or value not in NEUTRAL_SETTINGS[name]:
            return f"generation setting {name}={value!r}"
    return None


def caption_graphs_problem(offload, on_cuda: bool, machine=None) -> str | None:
    """Why captions in this offload mode (its row, `studio.modes`) on this machine decode without CUDA graphs (None:
    with them). `machine`: the budget mode's `MachinePlan`, whose text encoder plan may stream layers per token."""
    if offload.caption_graphs_problem:
        return f"Caption decode through transformers' generate (--offload {offload.name}): {offload.caption_graphs_problem}"
    if not on_cuda:
        return "Caption decoder without CUDA graphs: no CUDA GPU (its steps run eagerly)"
    text = machine.default.text_encoder if machine is not None and machine.default is not None else None
    if text is not None and not text.decode_on_gpu:
        why = ("its float8 layers are cast to bf16 by hooks at each call" if text.fp8_layers else
               f"{len(text.streamed_layers)} language layers are copied in at each token")
        return f"Caption decoder without CUDA graphs on this card ({why}): its steps run eagerly"
    return None


def graphs_problem(text_encoder, device: torch.device) -> str | None:
    """Why the decode step cannot be a CUDA graph on `device` (None: it can). Asked after the prefill, when the
    budget engine has brought the weights in. The token-embedding table may stay off the GPU (the budget engine's
    two-phase caption keeps it in host RAM): its one row a token is looked up outside the graph (`embedding_outside`)."""
    if device.type != "cuda":
        return "no CUDA device: the step runs eagerly"
    for module in step_modules(text_encoder, with_embedding=not embedding_outside(text_encoder, device)):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device != device:
                return f"{type(module).__name__}.{name} is on {tensor.device}, not {device} (offloaded): the step runs eagerly"
    return hooks_problem(text_encoder, with_embedding=not embedding_outside(text_encoder, device))


def step_modules(text_encoder, with_embedding: bool = True) -> list[torch.nn.Module]:
    """The modules a decode step calls, in order (not the language model's own forward: its hooks never run)."""
    lm = text_encoder.model.language_model
    return [*([lm.embed_tokens] if with_embedding else []), lm.rotary_emb, *lm.layers, lm.norm, text_encoder.lm_head]


# transformers' output recorders (`output_hidden_states=True`, the prompt encoding's) stay on every decoder layer once
# installed, and do nothing outside a forward that asks for hidden states: a graph may replay a step they were on.
INACTIVE_HOOK_MODULES = ("transformers.utils.output_capturing",)


def has_hooks(module: torch.nn.Module) -> bool:
    """Hooks that would run per call of `module`: forward hooks (but transformers' idle output recorders), accelerate's,
    diffusers' (its registry is left in place, empty, when its hooks are removed)."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    registry = getattr(module, "_diffusers_hook", None)
    return bool([h for h in hooks if getattr(h, "__module__", None) not in INACTIVE_HOOK_MODULES]
                or hasattr(module, "_hf_hook") or (registry is not None and registry.hooks))


def hooks_problem(text_encoder, with_embedding: bool = True) -> str | None:
    """Which module of the decode step has hooks that run per call (offloading, float8 casting, a caller's own):
    a graph would replay what they did at capture, stale addresses included. None: no such hook."""
    for top in step_modules(text_encoder, with_embedding):
        for name, sub in top.named_modules():
            if has_hooks(sub):
                where = type(top).__name__ + (f".{name}" if name else "")
                if top in text_encoder.model.language_model.layers:
                    where = f"layers.{list(text_encoder.model.language_model.layers).index(top)}" + (f".{name}" if name else "")
                return f"{where} has forward hooks (offload, casting): the step runs eagerly"
    return None


def embedding_outside(text_encoder, device: torch.device) -> bool:
    """The token-embedding table is not on `device`, or hooks move its lookup (the budget engine's host-RAM table)."""
    embed = text_encoder.model.language_model.embed_tokens
    return embed.weight.device != device or has_hooks(embed)


def bf16_tolerance(logits: torch.Tensor) -> torch.Tensor:
    """Per row of `logits` (steps x vocabulary): LOGIT_TOLERANCE_ULPS units in the last place of bf16 (8 bits of
    significand) at the row's largest |logit|. At a largest logit of 5.4 that is 4 x 2**(2 - 7) = 0.125."""
    largest = logits.abs().amax(dim=-1).float().clamp_min(torch.finfo(torch.float32).tiny)
    return LOGIT_TOLERANCE_ULPS * torch.exp2(torch.floor(torch.log2(largest)) - 7)


# ----------------------------------------------------------------------------------------------------------------
# The decode step
# ----------------------------------------------------------------------------------------------------------------
class _StaticKV:
    """The KV cache as the attention layers see it (`cache.update(key, value, layer_idx)`): fixed buffers of
    `capacity` slots per layer, written at the device-side `length`, returned whole (the mask hides unfilled slots)."""

    def __init__(self, prefilled, filled: int, capacity: int, length: torch.Tensor):
        self.length = length  # (1,) long, the next free slot; shared with the decoder, advanced by it
        self.keys, self.values = [], []
        for layer in prefilled.layers:  # the prefill's cache: dynamic, or static where the generation config says so
            for stored, buffers in ((layer.keys, self.keys), (layer.values, self.values)):
                batch, heads, _, dim = stored.shape
                buffer = stored.new_zeros(batch, heads, capacity, dim)
                buffer[:, :, :filled] = stored[:, :, :filled]
                buffers.append(buffer)

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.length, key)
        self.values[layer_idx].index_copy_(2, self.length, value)
        return self.keys[layer_idx], self.values[layer_idx]


class _Step:
    """One caption's decode state on the device and the step that advances it in place (graph-capturable: no
    host sync, no allocation that outlives the step, every input read from a buffer the step itself updates)."""

    def __init__(self, text_encoder, prefilled, prompt_ids: torch.Tensor, first_token: torch.Tensor,
                 max_new_tokens: int, repetition_penalty: float | None, embed_outside: bool = False):
        lm = text_encoder.model.language_model
        self.lm, self.lm_head = lm, text_encoder.lm_head
        # The layers' name for the KV cache: `cache` since transformers 5.2x, `past_key_values` before (an unknown
        # keyword would be swallowed by their **kwargs and the layers would attend without the cache).
        self.cache_keyword = "cache" if "cache" in inspect.signature(lm.layers[0].forward).parameters else "past_key_values"
        device, dtype = first_token.device, lm.embed_tokens.weight.dtype
        filled = prompt_ids.shape[1]
        capacity = -(-(filled + max_new_tokens) // CACHE_ALIGN) * CACHE_ALIGN
        self.length = torch.full((1,), filled, dtype=torch.long, device=device)
        self.cache = _StaticKV(prefilled, filled, capacity, self.length)
        # The step's input token and its mrope position: as generate's, the next text position plus the image's
        # rope delta, the same on the three axes after the prompt's last (text) token.
        deltas = text_encoder.model.rope_deltas
        delta = int(deltas.reshape(-1)[0]) if deltas is not None else 0
        self.token = first_token.reshape(1, 1).clone()
        # embed_outside: the table is in host RAM; `prepare` looks the token up before each step (one row, outside a
        # graph) into this buffer, which the step reads.
        self.embed_outside = embed_outside
        self.embedded = torch.zeros(1, 1, lm.config.hidden_size, dtype=dtype, device=device) if embed_outside else None
        self.position = torch.full((3, 1, 1), filled + delta, dtype=torch.long, device=device)
        # Additive mask over the cache's slots (0: visible, dtype's min: not yet written), as transformers builds it.
        self.mask = torch.full((1, 1, 1, capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask[..., :filled] = 0
        self.penalty = repetition_penalty if repetition_penalty not in (None, 1.0) else None
        if self.penalty is not None:  # RepetitionPenaltyLogitsProcessor: every token of the sequence so far
            self.seen = torch.zeros(self.lm_head.out_features, dtype=torch.bool, device=device)
            self.seen[prompt_ids.reshape(-1)] = True
            self.seen[first_token.reshape(-1)] = True
        self.logits = torch.zeros(1, self.lm_head.out_features, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(max_new_tokens, dtype=torch.long, device=device)  # new token i at [i]
        self.tokens[0] = first_token.reshape(())
        self.index = torch.ones(1, dtype=torch.long, device=device)  # where the step writes its token

    def prepare(self) -> None:
        """Before each step, on the host: the input token's embedding where the table is off the GPU (reads the token
        back: one sync a step)."""
        if self.embed_outside:
            self.embedded.copy_(self.lm.embed_tokens(self.token))

    def __call__(self) -> None:
        lm = self.lm
        self.mask.index_fill_(-1, self.length, 0)  # the slot this step writes becomes visible to itself
        hidden = self.embedded if self.embed_outside else lm.embed_tokens(self.token)
        position_embeddings = lm.rotary_emb(hidden, self.position)
        for layer in lm.layers:
            hidden = layer(hidden, attention_mask=self.mask, position_embeddings=position_embeddings, use_cache=True,
                           **{self.cache_keyword: self.cache})
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = self.lm_head(lm.norm(hidden))[:, -1].float()  # generate: the last position's logits in float32
        self.logits.copy_(logits)
        scores = logits
        if self.penalty is not None:
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalized, scores)
        token = torch.argmax(scores, dim=-1)  # (1,), the first of equal maxima, as generate's argmax
        if self.penalty is not None:
            self.seen.index_fill_(0, token, True)
        self.tokens.index_copy_(0, self.index, token)
        self.token.copy_(token.view(1, 1))
        self.length.add_(1)
        self.position.add_(1)
        self.index.add_(1)


def _capture(step: _Step, warm_up: Callable[[], None], timings: dict) -> "torch.cuda.CUDAGraph":
    """WARM_UP_STEPS real steps (`warm_up`: the step and what goes around it) on a side stream, as PyTorch's CUDA
    graph docs ask, then one step captured, not run, into a graph. Notes warm_up_s and capture_s in `timings`."""
    start = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_STEPS):
            warm_up()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    timings["warm_up_s"] = time.perf_counter() - start
    start = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's unrelated CUDA call (the UI's memory readout) must not break the capture. The
    # app's bf16 autocast stays as it is, without its cache of cast weights (PyTorch's CUDA graph docs: a cached cast
    # made in the capture would be freed after it).
    autocast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
    with autocast, torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    torch.cuda.synchronize()
    timings["capture_s"] = time.perf_counter() - start
    return graph


# ----------------------------------------------------------------------------------------------------------------
# The decode
# ----------------------------------------------------------------------------------------------------------------
def _split_arguments(kwargs: dict) -> tuple[dict, dict, str | None]:
    """generate's keyword arguments as (model inputs: the tensors, generation settings, why not greedy-able)."""
    from transformers import GenerationConfig

    fields = set(GenerationConfig().to_dict())
    inputs, settings = {}, {}
    for name, value in kwargs.items():
        if torch.is_tensor(value):
            inputs[name] = value
        elif name in fields:
            settings[name] = value
        elif value is not None:
            return inputs, settings, f"argument {name}"
    return inputs, settings, None


def greedy_generate(text_encoder, generate: Callable | None = None, *, streamer=None,
                    stop: Callable[[], None] | None = None, graphs: bool | None = None, check_every: int = CHECK_EVERY,
                    force: torch.Tensor | None = None, logits_out: torch.Tensor | None = None,
                    stats: dict | None = None, **kwargs: Any) -> torch.LongTensor:
    """What `text_encoder.generate(**kwargs, streamer=streamer)` returns for greedy decoding (prompt ids + new ids,
    up to the first end of text or max_new_tokens), decoded with one CUDA graph per caption.

    generate: the callable that runs the prefill (default: the text encoder's `generate` as it is now: the budget
        engine's wrapper, which brings the weights in, where one is set); non-greedy calls go to it whole.
    streamer: gets generate's calls (`put(prompt ids)`, `put(tensor([id]))` per new token, `end()`), the tokens in
        groups of `check_every` as the host reads them back.
    stop: called before every decode step; it raises to end the caption (the app's RunStopped).
    graphs: None: where `graphs_problem` allows; False: the same loop, eagerly.
    force, logits_out, stats: for `teacher_forced_logits` and the benchmark: feed these new tokens instead of the
        argmax (row 0 is the prefill's); write each step's float32 logits into `logits_out` (steps x vocabulary);
        fill `stats` with timings (prefill_s; warm_up_s and capture_s where a graph is captured; decode_s: the
        steps after those; steps; graphs; step_ms on CUDA: between consecutive replays).
    """
    generate = generate or text_encoder.generate
    inputs, settings, problem = _split_arguments(kwargs)
    config = copy.deepcopy(text_encoder.generation_config)
    config.update(**settings)
    problem = problem or greedy_problem(config)
    input_ids = inputs.get("input_ids")
    if problem is None and (input_ids is None or input_ids.shape[0] != 1):
        problem = "not one prompt of input_ids"
    if problem is None and "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
        problem = "padding in the attention mask"
    if problem is not None:
        if force is not None or logits_out is not None:
            raise ValueError(f"greedy_generate cannot teacher-force this call: {problem}")
        logger.info("Caption decode through generate: %s", problem)
        return generate(**kwargs, streamer=streamer)

    eos = config.eos_token_id if config.eos_token_id is not None else []
    eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    max_new_tokens = config.max_new_tokens
    if force is not None:
        max_new_tokens = min(max_new_tokens, len(force))
    timings = {} if stats is None else stats
    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)

    # 1. Prefill: transformers' own (vision tower, mrope positions and rope deltas, the first token).
    if stop is not None:
        stop()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    start = time.perf_counter()
    with torch.no_grad():
        prefill = generate(**inputs, **{**settings, "max_new_tokens": 1}, return_dict_in_generate=True,
                           output_logits=logits_out is not None)
    first = prefill.sequences[:, -1] if force is None else force[:1].to(input_ids.device)
    if logits_out is not None:
        logits_out[0].copy_(prefill.logits[0][0])
    new_tokens = [int(first)]
    if streamer is not None:
        streamer.put(first.cpu())
    sync()
    timings.update(prefill_s=time.perf_counter() - start, steps=0, graphs=False, decode_s=0.0)
    if new_tokens[0] in eos or max_new_tokens == 1:
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, first.view(1, 1).to(input_ids)], dim=1)

    # 2. Decode: the step, captured once (CUDA) or run as it is, until an end of text or max_new_tokens.
    prefilled = prefill["cache"] if "cache" in prefill else prefill["past_key_values"]  # older transformers
    del prefill
    forced = None if force is None else force.to(input_ids.device)
    graph, events, done = None, [], 1  # done: new tokens computed so far (the prefill's)

    def advance(run: Callable[[], None], timed: bool = False) -> None:
        """One decode step and what the host queues around it (forced input, logits out, a timing event)."""
        nonlocal done
        if stop is not None:
            stop()
        if forced is not None:
            step.token.copy_(forced[done - 1].view(1, 1))
        step.prepare()
        run()
        if logits_out is not None:
            logits_out[done].copy_(step.logits[0])
        if timed:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        done += 1

    try:
        with torch.no_grad():
            problem = graphs_problem(text_encoder, input_ids.device)
            if graphs and problem is not None:
                raise ValueError(f"graphs=True, but {problem}")
            capture = (problem is None if graphs is None else graphs) and max_new_tokens - 1 >= MIN_GRAPH_STEPS + WARM_UP_STEPS
            step = _Step(text_encoder, prefilled, input_ids, first, max_new_tokens, config.repetition_penalty,
                         embed_outside=capture and embedding_outside(text_encoder, input_ids.device))
            del prefilled  # its tensors are in the static cache now
            timings["problem"] = None if capture else ("graphs=False" if graphs is False else problem
                                                        or "too few steps for a graph")
            if not capture and input_ids.device.type == "cuda":
                logger.info("Caption decode without a CUDA graph: %s", timings["problem"])
            if capture:
                graph = _capture(step, lambda: advance(step), timings)
                timings["graphs"] = True
            run = graph.replay if graph is not None else step
            timed = stats is not None and input_ids.device.type == "cuda"
            start = time.perf_counter()
            while True:
                # The host hands the computed tokens over (streamer, end of text) before it queues more steps.
                for token in step.tokens[len(new_tokens):done].tolist():
                    new_tokens.append(int(forced[len(new_tokens)]) if forced is not None else token)
                    if streamer is not None:
                        streamer.put(torch.tensor([new_tokens[-1]]))
                    if new_tokens[-1] in eos:
                        break
                if new_tokens[-1] in eos or len(new_tokens) == max_new_tokens:
                    break
                for _ in range(min(check_every, max_new_tokens - done)):
                    advance(run, timed)
            sync()
            timings.update(decode_s=time.perf_counter() - start, steps=done - 1)
            timings["step_ms"] = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    finally:
        if graph is not None:  # replays still queued (Stop, an error) finish before its memory pool goes back
            torch.cuda.synchronize()
        del graph
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.tensor([new_tokens], dtype=input_ids.dtype, device=input_ids.device)], dim=1)


@contextlib.contextmanager
def graph_decode(text_encoder, stop: Callable[[], None] | None = None, graphs: bool | None = None):
    """Within the block, the text encoder's `generate` is `greedy_generate` (non-greedy calls still reach the
    `generate` it replaces); then that one is given back, as `generate_with` does. Enter it outside
    `caption_progress` (whose streamer then reaches the decoder) and after the budget engine's hooks are in place."""
    previous = text_encoder.__dict__.get("generate")
    generate = text_encoder.generate
    text_encoder.generate = lambda *args, **kwargs: greedy_generate(
        text_encoder, generate, stop=stop, graphs=graphs, **dict(zip(("input_ids",), args)), **kwargs)
    try:
        yield
    finally:
        if previous is None:
            del text_encoder.generate
        else:
            text_encoder.generate = previous


# ----------------------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------------------
class _ForceTokens:
    """A logits processor that makes generate pick `tokens[i]` at its step i (its raw logits stay as computed)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, int(self.tokens[self.step])] = 0
        self.step += 1
        return forced


def teacher_forced_logits(text_encoder, new_tokens: torch.Tensor, graphs: bool | None = None,
                          **inputs: torch.Tensor) -> dict:
    """Both decodes fed the same `new_tokens` (e.g. eager's greedy caption, up to its end of text) after the
    prompt `inputs`: each step's float32 logits from eager `generate` (dynamic cache; its raw logits, the tokens
    forced by a logits processor) and from `greedy_generate`'s step (graph or eager), and their largest difference."""
    count, vocab = len(new_tokens), text_encoder.lm_head.out_features
    device = inputs["input_ids"].device
    with torch.no_grad():
        eager = text_encoder.generate(**inputs, max_new_tokens=count, logits_processor=[_ForceTokens(new_tokens)],
                                      return_dict_in_generate=True, output_logits=True)
        eager_logits = torch.cat(eager.logits, dim=0).float()
        decoder_logits = torch.full((count, vocab), float("nan"), device=device)
        greedy_generate(text_encoder, graphs=graphs, force=new_tokens, logits_out=decoder_logits,
                        max_new_tokens=count, **inputs)
    return dict(eager=eager_logits, decoder=decoder_logits,
                max_abs_diff=float((eager_logits - decoder_logits).abs().max()))
