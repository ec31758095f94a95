"""Speed benchmark (issue 13): first image vs repeat, caption on new shapes, compiled and lossy transformer.

Everything runs through the app's own path on full-size random weights of the real architecture (models built by
bench_24gb.py's `build_models`, the one owner; method: ../shared/PERF_METHOD.md): `app.apply_memory_optimizations`,
`app.infer`, `app.caption_image`, `app.compile_transformer_blocks`, `app.apply_lossy_compute`. Output quality cannot
be measured with random weights and is never claimed; output differences are "not a quality figure".

One command, one process (plus one child process for the second start), weights resident ("off" mode, no cap);
every phase needs ~6 minutes on an H200 (--deadline-s skips the later ones; the committed speed.json ran 110 s):
    PYTHONUNBUFFERED=1 python bench/bench_speed.py --out bench/results/speed.json
--caption-variants cudagraphs adds CUDA graphs of the eager kernels (measured once: 0.86x eager, text not exact).
CPU smoke test at toy size (timings meaningless; torch.compile with the "eager" backend):
    python bench/bench_speed.py --tiny --out /tmp/speed_tiny.json

Phases (the JSON is rewritten after each; a run cut short keeps what it measured; optional phases are skipped when
--deadline-s would be passed):
    1. build        models on the GPU, a word-level tokenizer over Qwen's 152,064 ids (a caption costs 512 real tokens)
    1b. warm-up     `app.warm_up`, as `app.load_pipeline` runs it on CUDA (--no-warm-up: without)
    2. first        `app.infer` twice on the same image (the process's first image, then its repeat), --steps steps
    5b. caption     `app.compile_caption_decode` per --caption-variants: seconds, and the same text as phase 2's eager
                    caption or not (the first differing word)
    3. shapes       `app.caption_image` on an image of another aspect ratio, twice; the DiT's first forward on a new shape
    4. eager        the DiT forward at 640 / 4 layers (for the 50-step extrapolations)
    5. compile      `app.compile_transformer_blocks`: warm-up, steady forward, a new shape, one `app.infer` compiled
    6. second start a child process: the same compile from the on-disk cache
    7. lossy        `app.apply_lossy_compute("fp8_dynamic")` (LOSSY), compiled; then int8 on freshly built weights
--budget-cap-gb GB replaces phases 2-7 with issue 13's goals where they are set, the budget engine at an allocator cap:
    B1. eager       `app.apply_memory_optimizations` (budget), `app.warm_up`, `app.infer` with its 512-token caption
    B2. compile     the engine off, then on again with `--compile` (it compiles before any hook), warm-up (the compile),
                    `app.save_compile_cache`, `app.infer` with B1's caption as prompt: layers vs B1's (bf16 tolerance)
    B3. + caption   `--caption-compile` on top (opt-in, NOT exact: its text is compared with B1's)
    B4. 2nd start   two child processes compile the blocks again: Inductor's disk caches only, then + the mega-cache
    B5. lossy       a child (killed at --deadline-s) quantizes a RESIDENT transformer to fp8_dynamic on the GPU, then
                    compiles; each step's seconds are saved as they end (fp8 does not fit the cap: see the todo)
GPU command (H200, ~440 s): python3 bench/bench_speed.py --budget-cap-gb 23.5 --out speed.json --deadline-s 420
Whole-image figures at 50 steps are extrapolated from --steps-step runs plus the measured per-forward time; the
JSON says so next to each (`extrapolated`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# A fresh cache for this run's cold compile (the app's own default is models/torch_compile_cache); the child inherits it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/qil_speed_inductor_cache")
import bench_24gb as base  # noqa: E402  (imports app first, as the app's own start does)
from bench_24gb import app, torch  # noqa: E402

# Qwen2.5-VL's special tokens at their real ids (the word-level tokenizer keeps them there).
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
               "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
VOCAB = 152064
TINY = dict(  # --tiny: toy configs of the same classes, for the CPU smoke test
    TRANSFORMER_CONFIG=dict(patch_size=2, in_channels=32, out_channels=8, num_layers=4, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                            use_additional_t_cond=True, use_layer3d_rope=True),
    TEXT_CONFIG=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=1e6,
                     rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, eos_token_id=151645,
                     pad_token_id=151643),
    VISION_CONFIG=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
                       fullatt_block_indexes=[0], window_size=28, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2),
    VAE_CONFIG=dict(base_dim=4, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
                    input_channels=4, latents_mean=[0.0] * 8, latents_std=[1.0] * 8),
)
TINY_CAPTION_TOKENS = 16  # --tiny only: a 512-token caption takes ~30 s on a 2-core CPU


def use_tiny() -> None:
    for name, value in TINY.items():
        setattr(base, name, value)
    base.DEVICE = "cpu"
    app.COMPILE_OPTIONS = dict(app.COMPILE_OPTIONS, backend="eager")  # no C++ toolchain needed for the smoke test


timed = base.timed  # one owner: bench_24gb's (it synchronises CUDA where there is one)


# ----------------------------------------------------------------------------------------------------
# 1. The pipeline: bench_24gb's models + a word-level tokenizer over the real ids
# ----------------------------------------------------------------------------------------------------
def word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vocab = {f"w{i}": i for i in range(VOCAB)}
    for token, index in SPECIAL_IDS.items():
        vocab.pop(f"w{index}")
        vocab[token] = index
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.add_special_tokens(list(SPECIAL_IDS))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    return tokenizer, processor


def build_pipeline(tiny: bool):
    from diffusers import QwenImageLayeredPipeline

    models = base.build_models()
    if tiny:  # PyTorch's CPU bf16 convolutions are ~20x slower (app.load_pipeline uses float32 on the CPU too)
        for name in ("transformer", "text_encoder", "vae"):
            getattr(models, name).float()
        models.vae.disable_tiling()  # as app.apply_memory_optimizations does on the CPU
    with torch.no_grad():  # the random model must always write the full 512 tokens: never end the caption
        head = models.text_encoder.lm_head.weight
        head[SPECIAL_IDS["<|im_end|>"]] = 0
        head[SPECIAL_IDS["<|endoftext|>"]] = 0
    tokenizer, processor = word_level_tokenizer()
    scheduler = app.build_demo_components(app.LAYERED_DEMO_CORPUS)["scheduler"]  # the published scheduler config
    pipe = QwenImageLayeredPipeline(vae=models.vae, transformer=models.transformer, text_encoder=models.text_encoder,
                                    tokenizer=tokenizer, processor=processor, scheduler=scheduler)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix)["input_ids"])  # word-level: fewer than 34
    if tiny:
        generate = pipe.text_encoder.generate
        pipe.text_encoder.generate = lambda **kw: generate(**dict(kw, max_new_tokens=TINY_CAPTION_TOKENS))
    return pipe


def random_image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


class CallTimer:
    """Seconds of each call of `owner.name` (instrumentation only: the call itself is unchanged)."""

    def __init__(self, owner, name: str):
        self.seconds = []
        call = getattr(owner, name)

        def timed_call(*args, **kwargs):
            seconds, result = timed(call, *args, **kwargs)
            self.seconds.append(round(seconds, 3))
            return result

        setattr(owner, name, timed_call)

    def take(self) -> list[float]:
        """The seconds since the last take."""
        seconds, self.seconds = self.seconds, []
        return seconds


def stage_timers(pipe) -> dict:
    """Where an image's seconds go: the caption, prompt encoding, VAE, each transformer forward."""
    return dict(caption=CallTimer(pipe, "get_image_caption"), encode_prompt=CallTimer(pipe, "encode_prompt"),
                vae_encode=CallTimer(pipe.vae, "encode"), vae_decode=CallTimer(pipe.vae, "decode"),
                transformer=CallTimer(pipe.transformer, "forward"))


def take_stages(timers: dict) -> dict:
    out = {}
    for name, timer in timers.items():
        seconds = timer.take()
        out[name] = dict(calls=len(seconds), total_s=round(sum(seconds), 3), first_s=seconds[0] if seconds else None)
    return out


def dit_job(transformer, resolution: int, layers: int, text_tokens: int, seed: int) -> dict:
    inputs = base.dit_inputs(resolution, layers, text_tokens, seed)
    dtype = transformer.dtype
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def forward_times(transformer, inputs: dict, reps: int) -> tuple[dict, torch.Tensor]:
    times, out = [], None
    for _ in range(reps):
        seconds, out = timed(base.forward, transformer, inputs)
        times.append(seconds)
    return dict(median_s=round(statistics.median(times), 4), all_s=[round(t, 4) for t in times]), out


def layers_diff(a, b) -> dict:
    import numpy as np

    diffs = [np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)) for x, y in zip(a.layers, b.layers)]
    return dict(max_abs_uint8=int(max(d.max() for d in diffs)), mean_abs_uint8=round(float(np.mean([d.mean() for d in diffs])), 4))


def compile_cache_counters() -> dict:
    """Inductor's and AOTAutograd's cache hits, misses and bypasses so far in this process."""
    from torch._dynamo.utils import counters

    return {group: {k: v for k, v in counters[group].items() if "cache" in k} for group in ("inductor", "aot_autograd")}


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def first_difference(a: str, b: str) -> int | None:
    """The index of the first word where two captions differ (None: equal)."""
    if a == b:
        return None
    pairs = list(zip(a.split(), b.split()))
    return next((i for i, (x, y) in enumerate(pairs) if x != y), len(pairs))


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------------
# 6. The second start (child process): build, compile from the on-disk cache, first and steady forwards
# ----------------------------------------------------------------------------------------------------
def second_start_child(args) -> int:
    start = time.perf_counter()
    if args.tiny:
        use_tiny()
    models = base.build_models()
    transformer = models.transformer.float() if args.tiny else models.transformer
    del models
    inference, autocast = torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=not args.tiny)
    result = {}
    with inference, autocast:
        job = dit_job(transformer, args.resolution, args.layers, 517, seed=1)
        eager, _ = forward_times(transformer, job, 2)  # CUDA libraries warmed, as in the parent
        result["mega_cache_loaded"] = False if args.no_mega_cache else app.load_compile_cache()  # as the app does
        seconds, _ = timed(app.compile_transformer_blocks, transformer)
        first, _ = timed(base.forward, transformer, job)
        steady, _ = forward_times(transformer, job, 3)
    result.update(eager_fwd=eager, compile_call_s=round(seconds, 3), first_compiled_fwd_s=round(first, 3),
                  compiled_fwd=steady, extra_s=round(seconds + first - steady["median_s"], 3),
                  child_wall_s=round(time.perf_counter() - start, 1),
                  inductor_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR"), cache_counters=compile_cache_counters(),
                  compile_breakdown=compile_breakdown())
    Path(args.child_out).write_text(json.dumps(result, indent=2))
    return 0


def compile_breakdown() -> dict:
    """Where this process's compile seconds went (Dynamo's own metrics: tracing, AOTAutograd, Inductor, cache loads)."""
    from torch._dynamo.utils import compile_times

    header, values = compile_times(repr="csv", aggregate=True)
    return {name: round(float(value), 3) for name, value in zip(header, values)}


# ----------------------------------------------------------------------------------------------------
# 7c. Lossy compute (child process, killed at its deadline): quantize on the GPU, compile, forwards
# ----------------------------------------------------------------------------------------------------
def lossy_child(args) -> int:
    """fp8_dynamic / int8_dynamic on a resident transformer as `app.apply_memory_optimizations` runs it (quantize,
    then compile, before any hook). Rewrites its JSON after each step, so a child killed at its deadline says where
    its seconds went."""
    start, out_path = time.perf_counter(), Path(args.child_out)
    result: dict = dict(mode=args.lossy_child, resident=True, note="LOSSY; output differences are not a quality figure")

    def step(name, seconds):
        result[name] = round(seconds, 3)
        result["child_wall_s"] = round(time.perf_counter() - start, 1)
        out_path.write_text(json.dumps(result, indent=2))

    if args.tiny:
        use_tiny()
    models = base.build_models()
    transformer = models.transformer.float() if args.tiny else models.transformer
    del models
    step("build_s", time.perf_counter() - start)
    inference, autocast = torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=not args.tiny)
    with inference, autocast:
        job = dit_job(transformer, args.resolution, args.layers, 517, seed=1)
        base.forward(transformer, job)
        eager, reference = forward_times(transformer, job, 2)
    result["eager_fwd"] = eager
    if args.tiny:  # the CPU has no fp8 / int8 kernels: the smoke test checks the flow, not torchao
        step("quantize_s", 0.0)
    else:
        step("quantize_s", timed(app.apply_lossy_compute, transformer, args.lossy_child)[0])
    result["transformer_gb"] = round(sum(map(tensor_bytes, transformer.state_dict().values())) / 2**30, 2)
    step("compile_call_s", timed(app.compile_transformer_blocks, transformer)[0])
    with inference, autocast:
        step("first_fwd_s", timed(base.forward, transformer, job)[0])
        fwd, out = forward_times(transformer, job, 3)
    result.update(fwd=fwd, vs_eager_bf16=round(fwd["median_s"] / eager["median_s"], 3),
                  vs_bf16_output_not_a_quality_figure=base.compare(out, reference), compile_breakdown=compile_breakdown())
    step("done_s", time.perf_counter() - start)
    if not args.tiny:  # would it fit a 24 GB card whole (`model` offload) with the modulation linears fp8 weight-only?
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(transformer, Float8WeightOnlyConfig(), device="cuda",
                  filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "_mod." in name)
        result["transformer_gb_modulation_fp8_weight_only"] = round(
            sum(map(tensor_bytes, transformer.state_dict().values())) / 2**30, 2)
        step("done_s", time.perf_counter() - start)
    return 0


def tensor_bytes(tensor) -> int:
    """A tensor's bytes; a torchao tensor's are its inner tensors' (its outer dtype is the original bf16)."""
    if hasattr(tensor, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def run_child(args, flags: list[str], timeout_s: float) -> dict:
    """This script in a new process (`flags` pick the child); its JSON, or what stopped it (its partial JSON kept)."""
    child_out = args.out.with_name(f"{args.out.stem}_child.json")
    child_out.unlink(missing_ok=True)
    command = [sys.executable, __file__, *flags, "--child-out", str(child_out), "--resolution", str(args.resolution),
               "--layers", str(args.layers)] + (["--tiny"] if args.tiny else [])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout_s, 1))
        error = None if proc.returncode == 0 else proc.stderr[-1500:]
    except subprocess.TimeoutExpired:
        error = f"killed at its {timeout_s:.0f} s deadline"
    result = json.loads(child_out.read_text()) if child_out.exists() else {}
    child_out.unlink(missing_ok=True)
    if error:
        result["error"] = error
    return result


# ----------------------------------------------------------------------------------------------------
# 8. At the 24 GB cap (--budget-cap-gb): the budget engine eager, then with --compile, then --caption-compile
# ----------------------------------------------------------------------------------------------------
def set_cap(gb: float | None) -> None:
    """The allocator's cap (an emulated card of `gb` GiB; None: the whole card)."""
    if torch.cuda.is_available() and base.DEVICE == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if gb is None else gb * 2**30 / total)


def budget_image(pipe, timers, image, run, prompt: str):
    """`app.infer` under the budget engine; its stages and each transformer forward's seconds."""
    result = app.infer(pipe, image, prompt=prompt, **run)
    forwards = list(timers["transformer"].seconds)
    return result, take_stages(timers), forwards


def budget_main(args, results, pipe, save, log, time_left) -> int:
    """Issue 13's bf16 goal where it is set: the app's own path at an emulated 24 GB card (budget engine)."""
    cap = args.budget_cap_gb
    timers = stage_timers(pipe)
    image_a = random_image(args.resolution, args.resolution, 1)
    run = dict(layers=args.layers, num_inference_steps=args.steps, resolution=args.resolution, seed=7)
    extra_forwards = 2 * (50 - args.steps)
    results["job"].update(offload="budget", cap_gb=cap, vram_budget_gb=cap)

    def settings(**changes):
        return app.Settings(**{**dict(offload="budget", vram_budget_gb=cap, first_block_cache=False,
                                      caption_compile=False, compile=False), **changes})

    def whole_image(infer_s, forwards, caption_s=0.0):
        return round(caption_s + infer_s + extra_forwards * statistics.median(forwards), 2)

    # B1. Eager budget: warm-up, then an image with its 512-token caption (the reference layers).
    seconds, applied = timed(app.apply_memory_optimizations, pipe, settings(), "budget")
    set_cap(cap)
    entry = results["budget_eager"] = dict(applied=applied, setup_s=round(seconds, 1))
    if not args.no_warm_up:
        entry["warm_up_s"] = round(app.warm_up(pipe), 2)
        take_stages(timers)
    eager, stages, forwards = budget_image(pipe, timers, image_a, run, prompt="")
    entry.update(infer_s=round(eager.duration_s, 3), stages=stages, forwards_s=forwards,
                 caption_tokens=len(eager.caption.split()), whole_image_s=whole_image(eager.duration_s, forwards))
    results["whole_image_budget_eager_s"] = entry["whole_image_s"]
    results["extrapolated"]["whole_image_budget_eager_s"] = f"infer_s ({args.steps} steps) + {extra_forwards} x median forward"
    log(f"budget eager: {entry}")
    save()

    # B2. --compile under the budget hooks (the app compiles before any hook: the engine is taken off and put back).
    if time_left(90, "budget + compile"):
        try:
            set_cap(None)
            app.disable_budget_offload(pipe)
            graphs = dynamo_graphs()
            seconds, applied = timed(app.apply_memory_optimizations, pipe, settings(compile=True), "budget")
            set_cap(cap)
            entry = results["budget_compile"] = dict(applied=applied, setup_s=round(seconds, 1))
            entry["warm_up_s"] = round(app.warm_up(pipe), 2)  # the compile happens here, as in app.load_pipeline
            take_stages(timers)
            if "warm_up_s" in results["budget_eager"]:
                results["compile_warmup_s"] = round(entry["warm_up_s"] - results["budget_eager"]["warm_up_s"], 2)
                results["extrapolated"]["compile_warmup_s"] = "budget_compile.warm_up_s - budget_eager.warm_up_s"
            entry["mega_cache_save_s"], saved = timed(app.save_compile_cache)
            entry["mega_cache_bytes"] = saved.stat().st_size if saved else 0
            save()
            # The empty prompt again: the caption is written anew (greedy: B1's text, checked below) and counted, as a
            # user's image would be. (B1's caption as the prompt is refused: the random model's 512 words are over
            # the app's prompt limit, PROMPT_MAX_CHARS.)
            compiled, stages, forwards = budget_image(pipe, timers, image_a, run, prompt="")
            entry.update(infer_s=round(compiled.duration_s, 3), stages=stages, forwards_s=forwards,
                         dynamo_graphs=dynamo_graphs() - graphs, cache_counters=compile_cache_counters(),
                         layers_vs_eager_budget=layers_diff(compiled, eager),
                         same_caption_as_eager=compiled.caption == eager.caption)
            results["whole_image_bf16_s"] = whole_image(compiled.duration_s, forwards)
            results["extrapolated"]["whole_image_bf16_s"] = (
                f"budget at {cap} GiB, --compile: app.infer with the empty prompt (eager caption + compiled blocks, "
                f"{args.steps} steps) + {extra_forwards} x its median forward")
            log(f"budget compile: {entry}; whole image bf16 {results['whole_image_bf16_s']} s")
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and the log, not swallowed
            results["budget_compile_error"] = f"{type(err).__name__}: {err}"[:1500]
            log(f"budget compile failed: {results['budget_compile_error']}")
        save()

    # B3. Opt-in and NOT exact: --caption-compile on top (its text leaves the eager caption's; ENABLE_CAPTION_COMPILE).
    stages = getattr(pipe, "_budget_stages", None)
    # The app refuses --caption-compile under budget because of this phase's measurement (caption_compile_problem);
    # the phase still measures it, where the text encoder is whole on the GPU (not split) and Triton is there.
    problem = None if args.tiny else (  # tiny: the "eager" backend on the CPU (smoke test)
        app.caption_compile_problem("off", base.DEVICE == "cuda")
        or ("the text encoder is split at this cap" if stages and stages.weights["text_encoder_streamed"] else None))
    if "whole_image_bf16_s" in results and problem:
        results["budget_compile_caption_compile"] = dict(refused=problem)
    elif "whole_image_bf16_s" in results and time_left(100, "budget + compile + caption compile"):
        entry = results["budget_compile_caption_compile"] = dict(label="opt-in --caption-compile: NOT exact")
        try:
            options = dict(backend="eager", mode=None) if args.tiny else {}
            app.compile_caption_decode(pipe.text_encoder, **options)
            seconds, _ = timed(app.caption_image, pipe, image_a, args.resolution)  # compiles (at load in the app)
            entry["first_caption_s"] = round(seconds, 3)
            take_stages(timers)
            run_c, stages_c, forwards = budget_image(pipe, timers, image_a, run, prompt="")
            entry.update(infer_s=round(run_c.duration_s, 3), stages=stages_c, forwards_s=forwards,
                         same_text_as_eager=run_c.caption == eager.caption,
                         first_differing_word=first_difference(run_c.caption, eager.caption),
                         whole_image_s=whole_image(run_c.duration_s, forwards))
            results["whole_image_bf16_caption_compile_not_exact_s"] = entry["whole_image_s"]
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and the log, not swallowed
            entry["error"] = f"{type(err).__name__}: {err}"[:1500]
        app.eager_caption_decode(pipe.text_encoder)
        log(f"budget compile + caption compile: {entry}")
        save()

    # B4. Second start: new processes compile the same blocks (resident) from the caches this process left, first
    #     with Inductor's on-disk caches only (turn 3's case), then as the app now does (+ the mega-cache).
    if "whole_image_bf16_s" in results:
        for name, flags in (("second_start_disk_cache_only", ["--no-mega-cache"]), ("second_start", [])):
            if time_left(60, name):
                results[name] = run_child(args, ["--second-start-child", *flags], args.deadline_s - 15 - elapsed(results))
                if "extra_s" in results[name]:
                    results[name + "_extra_s"] = results[name]["extra_s"]
                log(f"{name}: {results[name]}")
                save()

    # B5. Lossy (LOSSY, resident: see the README), in a child killed at the deadline.
    if not args.no_lossy and time_left(60, "lossy fp8_dynamic"):
        capability = torch.cuda.get_device_capability() if base.DEVICE == "cuda" else None
        problem = None if args.tiny else app.lossy_compute_problem("fp8_dynamic", "off", capability, app._version("torchao"))
        if problem:
            results["lossy_fp8_dynamic"] = dict(refused=problem)
        else:
            set_cap(None)
            app.release_budget_vram(pipe)
            lossy = results["lossy_fp8_dynamic"] = run_child(args, ["--lossy-child", "fp8_dynamic"],
                                                             args.deadline_s - 5 - elapsed(results))
            if "fwd" in lossy:
                rest = results["budget_eager"]["infer_s"] - sum(results["budget_eager"]["forwards_s"])
                results["whole_image_lossy_s"] = round(rest + 2 * 50 * lossy["fwd"]["median_s"], 2)
                results["extrapolated"]["whole_image_lossy_s"] = (
                    "LOSSY fp8_dynamic, RESIDENT transformer (not at the cap): the eager budget image's seconds outside "
                    "the transformer (caption, text, VAE, stage moves) + 100 x the resident fp8 compiled forward")
        log(f"lossy fp8_dynamic: {results['lossy_fp8_dynamic']}")
        save()
    return finish(results, save)


def elapsed(results) -> float:
    return results["wall_s"]  # as of the last save (each phase saves)


def finish(results, save) -> int:
    issue_keys = ("first_image_s", "repeat_image_s", "new_shape_caption_s", "repeat_shape_caption_s", "whole_image_bf16_s",
                  "whole_image_lossy_s", "compile_warmup_s", "second_start_extra_s", "resident_whole_image_s")
    for key in issue_keys:
        if key not in results:
            results.setdefault("not_measured", {})[key] = "its phase was skipped, failed or is not part of this mode"
    save()
    for key in ("card", "whole_image_budget_eager_s", "whole_image_bf16_s", "whole_image_bf16_caption_compile_not_exact_s",
                "second_start_disk_cache_only_extra_s", "second_start_extra_s", "whole_image_lossy_s", "wall_s"):
        print(f"{key:44s} {results.get(key)}")
    return 0


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.json")
    parser.add_argument("--tiny", action="store_true", help="toy models on the CPU (smoke test; timings meaningless)")
    parser.add_argument("--steps", type=int, default=2, help="steps of each measured image (50-step figures extrapolated)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip optional phases that would end past this")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-lossy", action="store_true", help="skip phase B5 (the lossy child)")
    parser.add_argument("--no-warm-up", action="store_true", help="measure the first image without app.warm_up")
    parser.add_argument("--caption-variants", default="inductor,static",
                        help="compiled caption decodes to compare with the eager caption (phase 5b), in this order")
    parser.add_argument("--first-image-only", action="store_true", help="stop after phase 2 (where a first image's seconds go)")
    parser.add_argument("--budget-cap-gb", type=float, default=None,
                        help="instead of the resident phases: the budget engine at this cap (GiB), eager, --compile, "
                             "--caption-compile, then the second start and the lossy child (phases B1-B5)")
    parser.add_argument("--second-start-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-mega-cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lossy-child", choices=app.LOSSY_COMPUTE_MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.second_start_child:
        return second_start_child(args)
    if args.lossy_child:
        return lossy_child(args)
    t_start = time.perf_counter()
    results: dict = dict(command=" ".join(["python3"] + sys.argv), units="seconds",
                         note="random weights: output differences are not a quality figure", extrapolated={})

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        args.out.write_text(json.dumps(results, indent=2))

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def time_left(needed_s: float, phase: str) -> bool:
        if time.perf_counter() - t_start + needed_s <= args.deadline_s:
            return True
        results.setdefault("skipped", []).append(f"{phase}: not started, ~{needed_s:.0f} s would pass --deadline-s")
        log(f"skip {phase}")
        return False

    # 1. Build.
    if args.tiny:
        use_tiny()
    import diffusers
    import transformers

    cuda = torch.cuda.is_available() and not args.tiny
    results.update(card=torch.cuda.get_device_name(0) if cuda else "cpu (tiny smoke test)",
                   versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                 transformers=transformers.__version__, torchao=app._version("torchao")),
                   job=dict(resolution=args.resolution, layers=args.layers, steps=args.steps, true_cfg_scale=4.0,
                            first_block_cache=False, offload="off"))
    app.setup_cuda_optimizations()
    seconds, pipe = timed(build_pipeline, args.tiny)
    if args.budget_cap_gb is not None:  # issue 13's goals at the 24 GB cap (phases B1-B5)
        results["build_s"] = round(seconds, 1)
        return budget_main(args, results, pipe, save, log, time_left)
    # The caption decodes eagerly here (the reference text); its compiled variants are phase 5b.
    settings = app.Settings(offload="off", first_block_cache=False, caption_compile=False)
    applied = app.apply_memory_optimizations(pipe, settings, "off")
    results.update(build_s=round(seconds, 1), applied=applied,
                   caption_sdpa_backends=list(app.CAPTION_SDPA_BACKENDS))
    log(f"built in {seconds:.1f} s; {applied}; {results['versions']}")
    timers = stage_timers(pipe)
    image_a = random_image(args.resolution, args.resolution, 1)
    image_b = random_image(args.resolution * 3 // 2, args.resolution, 2)  # 3:2: another caption shape
    run = dict(layers=args.layers, num_inference_steps=args.steps, resolution=args.resolution, seed=7)

    # 1b. The warm-up `app.load_pipeline` runs on CUDA (`app.warm_up`: a short caption and a 2-step run at the default job).
    if settings.warm_up and not args.no_warm_up:
        seconds = app.warm_up(pipe)
        take_stages(timers)
        results["warm_up_s"] = round(seconds, 3)
        log(f"warm-up {seconds:.2f} s")

    # 2. The process's first image, then the same image again.
    first = app.infer(pipe, image_a, prompt="", **run)
    first_stages = take_stages(timers)
    results.update(first_image_s=round(first.duration_s, 3), stages=dict(first_image=first_stages))
    log(f"first {first.duration_s:.2f} s; stages {first_stages}")
    save()  # a run cut short still says where the first image's seconds went
    again = app.infer(pipe, image_a, prompt="", **run)
    again_stages = take_stages(timers)
    caption_tokens = len(first.caption.split())
    results.update(first_image_s=round(first.duration_s, 3), repeat_image_s=round(again.duration_s, 3),
                   first_image_caption_s=first_stages["caption"]["total_s"],
                   repeat_image_caption_s=again_stages["caption"]["total_s"], caption_tokens=caption_tokens,
                   first_vs_repeat=round(first.duration_s / again.duration_s, 3),
                   stages=dict(first_image=first_stages, repeat_image=again_stages),
                   repeat_same_caption=first.caption == again.caption, repeat_layers=layers_diff(first, again))
    log(f"first {first.duration_s:.2f} s, repeat {again.duration_s:.2f} s, {caption_tokens} caption tokens; "
        f"stages {results['stages']}")
    save()
    if args.first_image_only:
        return 0

    # 5b. The caption's compiled decode (`app.compile_caption_decode`: static cache + CUDA graphs), per backend, on the
    #     first image's image: seconds and whether the text equals the eager caption of phase 2 (greedy decoding).
    variants = results["caption_decode"] = {}
    for backend in filter(None, args.caption_variants.split(",")):
        if backend == "static" and variants and all(v.get("first_same_text_as_eager") for v in variants.values()):
            continue  # the static cache alone is only looked at when a compiled text differs
        if not time_left(dict(cudagraphs=45, static=20).get(backend, 75), f"caption decode {backend}"):
            continue
        # "static": the static cache decoded eagerly (tells the cache's attention from the compiler's arithmetic)
        options = dict(backend=backend, mode="reduce-overhead" if backend == "inductor" else None)
        if args.tiny or backend == "static":  # no CUDA graphs on the CPU: the decode graph runs as traced
            options = dict(backend="eager", mode=None)
        graphs, skips = dynamo_graphs(), cudagraph_skips()
        entry = variants[backend] = dict(options={k: str(v) for k, v in options.items()})
        try:
            app.compile_caption_decode(pipe.text_encoder, **options)
            pipe.text_encoder.generation_config.disable_compile = backend == "static"
            for name in ("first_s",) if backend == "static" else ("first_s", "repeat_s"):  # static: eager, no compile
                seconds, text = timed(app.caption_image, pipe, image_a, args.resolution)
                entry[name] = round(seconds, 3)
                entry[name.replace("_s", "_same_text_as_eager")] = text == first.caption
                entry[name.replace("_s", "_first_differing_word")] = first_difference(text, first.caption)
                save()  # a run cut short keeps each caption
            if backend == "static":
                raise StopIteration  # nothing compiled: one caption tells its text
            entry.update(ms_per_token=round(1000 * entry["repeat_s"] / caption_tokens, 2),
                         vs_eager_repeat=round(entry["repeat_s"] / results["repeat_image_caption_s"], 3),
                         compile_s=round(entry["first_s"] - entry["repeat_s"], 2),
                         dynamo_graphs=dynamo_graphs() - graphs, cudagraph_skips=cudagraph_skips() - skips)
            if time_left(20, f"caption decode {backend} new shape"):
                seconds, _ = timed(app.caption_image, pipe, image_b, args.resolution)
                entry["new_shape_s"] = round(seconds, 3)  # one static cache size: no recompile expected
                entry["dynamo_graphs"] = dynamo_graphs() - graphs
        except StopIteration:
            pass
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and the log, not swallowed
            entry["error"] = f"{type(err).__name__}: {err}"[:1500]
        app.eager_caption_decode(pipe.text_encoder)
        pipe.text_encoder.generation_config.disable_compile = False
        log(f"caption decode {backend}: {entry}")
        save()

    # 3. A new shape: the caption on another aspect ratio (the app's caption path), then the DiT on a new job shape.
    if time_left(35, "new shape captions"):
        new_shape_s, caption_b = timed(app.caption_image, pipe, image_b, args.resolution)
        repeat_shape_s, caption_b2 = timed(app.caption_image, pipe, image_b, args.resolution)
        results.update(new_shape_caption_s=round(new_shape_s, 3), repeat_shape_caption_s=round(repeat_shape_s, 3),
                       new_shape_vs_repeat=round(new_shape_s / repeat_shape_s, 3),
                       new_shape_same_caption=caption_b == caption_b2)
        log(f"new shape caption {new_shape_s:.2f} s, repeat {repeat_shape_s:.2f} s")
    inference, autocast = torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    transformer = pipe.transformer
    with inference, autocast:
        new_job = dit_job(transformer, args.resolution, args.layers - 1, 301, seed=3)
        dit_new_s, _ = timed(base.forward, transformer, new_job)
        dit_new_again_s, _ = timed(base.forward, transformer, new_job)
    results.update(dit_new_shape=dict(job=f"{args.resolution} px, {args.layers - 1} layers, 301 text tokens",
                                      first_fwd_s=round(dit_new_s, 3), repeat_fwd_s=round(dit_new_again_s, 3)))
    log(f"DiT new shape {dit_new_s:.3f} / {dit_new_again_s:.3f} s")
    save()

    # 4. The eager forward of the job (text tokens: the caption's, as the pipeline conditions on it).
    text_tokens = caption_tokens + base.TEMPLATE_SUFFIX_TOKENS
    with inference, autocast:
        job = dit_job(transformer, args.resolution, args.layers, text_tokens, seed=1)
        timed(base.forward, transformer, job)
        eager, reference = forward_times(transformer, job, args.reps)
    extra_forwards = 2 * (50 - args.steps)
    results.update(eager_fwd=eager, resident_whole_image_s=round(again.duration_s + extra_forwards * eager["median_s"], 2))
    results["extrapolated"]["resident_whole_image_s"] = f"repeat_image_s ({args.steps} steps) + {extra_forwards} x eager_fwd"
    results["extrapolated"]["first_image_50_steps_s"] = round(first.duration_s + extra_forwards * eager["median_s"], 2)
    log(f"eager forward {eager}; resident whole image (extrapolated) {results['resident_whole_image_s']} s")
    save()

    # 5. Regional compilation through the app's function (the app applies it before any hook; here nothing is hooked).
    if time_left(60, "compile"):
        try:
            graphs_before = dynamo_graphs()
            call_s, count = timed(app.compile_transformer_blocks, transformer)
            with inference, autocast:
                first_s, out = timed(base.forward, transformer, job)
                compiled, out = forward_times(transformer, job, args.reps)
                new_first_s, _ = timed(base.forward, transformer, new_job)
                new_again_s, _ = timed(base.forward, transformer, new_job)
            results["compile"] = dict(blocks=count, options={k: str(v) for k, v in app.COMPILE_OPTIONS.items()},
                                      compile_call_s=round(call_s, 3), first_fwd_s=round(first_s, 3), fwd=compiled,
                                      vs_eager=round(compiled["median_s"] / eager["median_s"], 3),
                                      vs_eager_output=base.compare(out, reference),
                                      new_shape_first_fwd_s=round(new_first_s, 3), new_shape_repeat_fwd_s=round(new_again_s, 3),
                                      dynamo_graphs=dynamo_graphs() - graphs_before, cache_counters=compile_cache_counters())
            results["compile_warmup_s"] = round(call_s + first_s - compiled["median_s"], 2)
            results["compile"]["mega_cache_saved"] = bool(app.save_compile_cache())  # as the app does: phase 6 loads it
            log(f"compile {results['compile']}")
            save()
            # The empty prompt: the caption is written again (greedy: the eager repeat's text, so the same conditioning)
            # and counted. The caption as the prompt is refused: the random model's 512 words are over PROMPT_MAX_CHARS.
            compiled_run = app.infer(pipe, image_a, prompt="", **run)
            results["compile"]["infer_s"] = round(compiled_run.duration_s, 3)
            results["compile"]["infer_stages"] = take_stages(timers)
            results["compile"]["layers_vs_eager"] = layers_diff(compiled_run, again)
            results["compile"]["same_caption_as_eager"] = compiled_run.caption == again.caption
            results["whole_image_bf16_s"] = round(compiled_run.duration_s + extra_forwards * compiled["median_s"], 2)
            results["extrapolated"]["whole_image_bf16_s"] = (f"compiled app.infer with the empty prompt (its caption "
                                                             f"included, {args.steps} steps) + {extra_forwards} x compile.fwd")
            log(f"compiled infer {compiled_run.duration_s:.2f} s; whole image bf16 (extrapolated) {results['whole_image_bf16_s']} s")
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and the log, not swallowed
            results["compile_error"] = f"{type(err).__name__}: {err}"[:1500]
            log(f"compile failed: {results['compile_error']}")
        save()

    # 6. Second start: a new process compiles the same blocks from the on-disk cache.
    if "compile" in results and time_left(60, "second start"):
        child_out = args.out.with_name(args.out.stem + "_second_start.json")
        command = [sys.executable, __file__, "--second-start-child", "--child-out", str(child_out),
                   "--resolution", str(args.resolution), "--layers", str(args.layers)]
        if args.tiny:
            command.append("--tiny")
        wall_s, proc = timed(subprocess.run, command, capture_output=True, text=True)
        if proc.returncode == 0:
            child = json.loads(child_out.read_text())
            child_out.unlink()
            results["second_start"] = child
            results["second_start_extra_s"] = child["extra_s"]
        else:
            results["second_start"] = dict(error=proc.stderr[-1500:])
        log(f"second start {results['second_start']}")
        save()

    # 7. Lossy compute (LOSSY), compiled as the app runs it.
    capability = torch.cuda.get_device_capability() if cuda else None

    def lossy_phase(mode):
        nonlocal transformer
        problem = app.lossy_compute_problem(mode, "off", capability, app._version("torchao"))
        if problem:
            results[f"lossy_{mode}"] = dict(refused=problem)
            log(f"{mode} refused: {problem}")
            save()
            return
        if not time_left(70, mode):
            return
        try:
            if mode == "int8_dynamic":  # fresh bf16 weights (the same seed, so the same random weights)
                fresh = base.build_models()
                pipe.transformer = transformer = fresh.transformer
                del fresh
                torch.cuda.empty_cache()
                app.compile_transformer_blocks(transformer)
            quantize_s, _ = timed(app.apply_lossy_compute, transformer, mode)
            with inference, autocast:
                first_s, out = timed(base.forward, transformer, job)
                fwd, out = forward_times(transformer, job, args.reps)
            entry = results[f"lossy_{mode}"] = dict(
                quantize_s=round(quantize_s, 2), first_fwd_s=round(first_s, 2), fwd=fwd,
                vs_eager_bf16=round(fwd["median_s"] / eager["median_s"], 3),
                vs_bf16_output_not_a_quality_figure=base.compare(out, reference))
            save()
            lossy_run = app.infer(pipe, image_a, prompt="", **run)  # as the compiled run: its caption included
            entry["infer_s"] = round(lossy_run.duration_s, 3)
            entry["infer_stages"] = take_stages(timers)
            entry["layers_vs_bf16_not_a_quality_figure"] = layers_diff(lossy_run, again)
            entry["whole_image_s"] = round(lossy_run.duration_s + extra_forwards * fwd["median_s"], 2)
            if "whole_image_lossy_s" not in results or entry["whole_image_s"] < results["whole_image_lossy_s"]:
                results["whole_image_lossy_s"] = entry["whole_image_s"]
                results["whole_image_lossy_mode"] = mode
            results["extrapolated"]["whole_image_lossy_s"] = "as whole_image_bf16_s, with the lossy mode's forward"
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and the log, not swallowed
            results[f"lossy_{mode}"] = dict(error=f"{type(err).__name__}: {err}"[:1500])
        log(f"{mode}: {results[f'lossy_{mode}']}")
        save()

    lossy_phase("fp8_dynamic")

    # 7b. int8 last: it needs the transformer built again.
    if not args.no_int8:
        lossy_phase("int8_dynamic")

    issue_keys = ("first_image_s", "repeat_image_s", "new_shape_caption_s", "repeat_shape_caption_s", "whole_image_bf16_s",
                  "whole_image_lossy_s", "compile_warmup_s", "second_start_extra_s", "resident_whole_image_s")
    for key in issue_keys:
        if key not in results:
            results.setdefault("not_measured", {})[key] = "its phase was skipped or failed: see skipped / *_error"
    keys = ("card", "first_image_s", "repeat_image_s", "first_vs_repeat", "new_shape_caption_s", "repeat_shape_caption_s",
            "resident_whole_image_s", "whole_image_bf16_s", "whole_image_lossy_s", "compile_warmup_s",
            "second_start_extra_s", "wall_s")
    save()
    for key in keys:
        print(f"{key:28s} {results.get(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
