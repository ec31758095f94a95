"""Issue 24 on a GPU: every emulated card through the app's own path, warm, with per-step times and bounds.

Full-size Qwen-Image-Layered models with random weights (speed and memory depend on shapes, not values; quality is
never measured: ../shared/PERF_METHOD.md) built on the GPU, moved to pageable host RAM (where from_pretrained leaves a
user), with a word-level tokenizer over the real 152,064 ids, the lm_head rows of <|im_end|> and <|endoftext|> zeroed
(every caption writes its 512 tokens) and Qwen2.5-VL's generation config (greedy: top_k 1, repetition penalty 1.05).
Phases, in this order, each saved to --out as it ends (a phase that fails records its error; the next one runs):
  bandwidth     pinned host -> GPU copies (1 GiB, 10 times) and the CUDA context (mem_get_info before any tensor);
  eager_ref     with "24" in --rows: the 24 GB card with the blocks eager and unfused, a given-prompt job (--diff-steps)
                whose layers the 24 GB row's compiled + fused run is compared with (max / mean of |a - b| in 1/255);
  resident      every block on the GPU (no cap, a budget of the card less 3 GB): per-forward times, cond and uncond;
  rows          per card (--rows 24,16,12): cap = card - 0.5 GB, budget = card - 1 GB, `apply_memory_optimizations`
                (budget), `warm_up`, then `infer` (empty prompt: the 512-token caption; 640 px, 4 layers, CFG 4,
                --steps steps, FirstBlockCache off): whole image, caption (its decoder's stats: graphs or eager, prefill,
                capture, per-token times), per-step times (median of steps 2..N), per-forward times and token counts,
                peaks (allocated / reserved / + context / device-wide sampled), streamed bytes per forward and the
                bound max(resident forward, streamed bytes / bandwidth), bytes over the link per caption token;
                at 24 GB also the caption's exactness (the decoder teacher-forced on eager's greedy caption, logits
                against eager's within caption.bf16_tolerance) and the layers against eager_ref;
  cpu_decode    one language layer's decode matmuls on the host CPU (bf16), GB/s against the link's (issue 24, item 3);
  attention     the joint attention of one forward (10,117 tokens, 24 heads of 128) per SDPA kernel.
    PYTHONUNBUFFERED=1 python bench/bench_exact.py --out $OUT/exact_24.json --rows 24 --steps 50 --deadline-s 560
    python bench/bench_exact.py --tiny --out /tmp/exact_tiny.json --steps 2    # the script itself, on the CPU
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import app  # noqa: E402, I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from studio import caption, compiling  # noqa: E402
from studio.engine import stream  # noqa: E402
from studio.engine.stream import disable_budget_offload, plan_loaded  # noqa: E402
from studio.modes import OFFLOAD  # noqa: E402

GIB = 2**30
CUDA = torch.cuda.is_available()
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
               "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
               "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
               "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
VOCAB = 152064
TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
                          use_additional_t_cond=True, use_layer3d_rope=True)
TEXT_CONFIG = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=VOCAB, max_position_embeddings=128000, rope_theta=1e6,
                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, eos_token_id=151645,
                   pad_token_id=151643)
VISION_CONFIG = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2)
WEIGHT_SCALE = 0.02  # the random transformer's weights scaled down: 60 random residual blocks keep activations finite
VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True],
                  input_channels=4)
# Qwen2.5-VL-7B-Instruct's generation_config.json (Qwen-Image's text encoder ships it): greedy (top_k 1) with a
# repetition penalty, the decoder's own path.
GENERATION = dict(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05,
                  eos_token_id=[151645, 151643], pad_token_id=151643)
JOB = dict(num_inference_steps=50, layers=4, resolution=640, true_cfg_scale=4.0, seed=1234)
# A given prompt of a caption's length (the word-level tokenizer: one token a word; short words: the app takes 2,000
# characters at most), for jobs without a caption.
PROMPT_512 = " ".join(f"w{i % 50}" for i in range(512))
TINY_TEXT_LAYERS = {24: None, 16: 2, 12: 1}  # --tiny: the demo's 2 layers, whole / two phases / one streamed


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Clock:
    """Time marks: CUDA events (no sync while the job runs) or, on the CPU, perf_counter."""

    def __init__(self):
        self.marks = []

    def mark(self, label):
        if CUDA:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if CUDA else b - a


def word_level_processor():
    """The word-level tokenizer over the real 152,064 ids (PERF_METHOD.md) and its processor: a random model's ids
    decode to one word each and re-encode to one token each, so a caption conditions the transformer with its real
    length. Returns (tokenizer, processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vocab = {f"w{i}": i for i in range(min(SPECIAL_IDS.values()))}
    vocab.update(SPECIAL_IDS)
    vocab.update({f"x{i}": i for i in range(max(SPECIAL_IDS.values()) + 1, VOCAB)})
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.add_special_tokens(list(SPECIAL_IDS))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", bos_token=None)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    return tokenizer, processor


def build_pipeline(tiny: bool):
    """The whole pipeline in pageable host RAM: full size (built on the GPU in seconds, bf16, random), or the demo's."""
    if tiny:
        return app.load_pipeline(app.Settings(demo=True, offload="off", first_block_cache=False,
                                              models_dir=Path("/tmp/bench_exact_models"))).pipe
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, image_token_id=SPECIAL_IDS["<|image_pad|>"],
            video_token_id=SPECIAL_IDS["<|video_pad|>"], vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
            vision_end_token_id=SPECIAL_IDS["<|vision_end|>"], eos_token_id=151645, pad_token_id=151643)).eval()
        vae = AutoencoderKLQwenImage(**VAE_CONFIG).eval()
    torch.set_default_dtype(torch.float32)
    text_encoder.set_attn_implementation("sdpa")  # what from_pretrained picks
    text_encoder.generation_config.update(**GENERATION)
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(WEIGHT_SCALE)
        text_encoder.lm_head.weight[[SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]]] = 0  # 512 tokens
    tokenizer, processor = word_level_processor()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's published scheduler config (studio.demo_model)
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    pipe = QwenImageLayeredPipeline(vae=vae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                                    processor=processor, scheduler=scheduler)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)  # the real template: 34
    pipe.to("cpu")
    torch.cuda.empty_cache()
    return pipe


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class JobClock:
    """One `infer`: the caption (wall, synced), each step's end (scheduler.step) and each transformer call, its
    image / text tokens; bytes copied by the engine's stage entries and streamed groups, during the caption and after."""

    streamed = [0]  # bytes onloaded by every PageLockedModuleGroup (the class's onload_ is counted once, below)

    def __init__(self, loaded):
        self.pipe, self.loaded = loaded.pipe, loaded
        self.clock, self.forwards, self.caption = Clock(), [], {}
        caption_fn, step_fn = self.pipe.get_image_caption, self.pipe.scheduler.step

        def timed_caption(*args, **kwargs):
            sync()
            before = (time.perf_counter(), self.stage_bytes(), JobClock.streamed[0])
            text = caption_fn(*args, **kwargs)
            sync()
            self.caption = dict(s=time.perf_counter() - before[0], words=len(text.split()),
                                stage_bytes=self.stage_bytes() - before[1], streamed_bytes=JobClock.streamed[0] - before[2])
            return text

        def timed_step(*args, **kwargs):
            out = step_fn(*args, **kwargs)
            self.clock.mark("step")
            return out

        self.pipe.get_image_caption, self.pipe.scheduler.step = timed_caption, timed_step
        self.handles = [self.pipe.transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.pipe.transformer.register_forward_hook(lambda *_: self.clock.mark("forward_end"))]

    def stage_bytes(self) -> int:
        return self.loaded.stages.stage_bytes if self.loaded.stages is not None else 0

    def _pre(self, module, args, kwargs):
        self.forwards.append((kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]))
        self.clock.mark("forward_start")

    def close(self) -> dict:
        del self.pipe.get_image_caption, self.pipe.scheduler.step
        for handle in self.handles:
            handle.remove()
        sync()
        marks = self.clock.marks
        starts = [t for label, t in marks if label == "forward_start"]
        ends = [t for label, t in marks if label == "forward_end"]
        steps = [t for label, t in marks if label == "step"]
        forward_s = [self.clock.seconds(a, b) for a, b in zip(starts, ends)]
        step_s = [self.clock.seconds(a, b) for a, b in zip([starts[0], *steps], steps)] if starts else []
        per_step = len(self.forwards) // max(len(steps), 1)  # 2 with true CFG: cond, then uncond
        kinds = {"cond": slice(0, None, per_step), "uncond": slice(1, None, per_step)} if per_step == 2 else {"cond": slice(None)}
        forwards = {kind: dict(tokens=list(self.forwards[cut][0]) if self.forwards[cut] else None,
                               median_s_2_to_n=median(forward_s[cut][1:])) for kind, cut in kinds.items()}
        return dict(step_s=[round(s, 4) for s in step_s], median_step_s_2_to_n=median(step_s[1:]), forwards=forwards,
                    forward_s=[round(s, 4) for s in forward_s], caption=self.caption)


def median(values) -> float | None:
    return round(statistics.median(values), 4) if values else None


def count_streamed_bytes() -> None:
    onload = stream.PageLockedModuleGroup.onload_

    def counted(group):
        if not hasattr(group, "_bench_bytes"):
            group._bench_bytes = sum(h.numel() * h.element_size() for h in group.cpu_param_dict.values())
        JobClock.streamed[0] += group._bench_bytes
        return onload(group)

    stream.PageLockedModuleGroup.onload_ = counted


class DeviceSampler(threading.Thread):
    """The device's used memory (total - free: every process, the CUDA context included), every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0

    def run(self):
        while CUDA:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)


def apply(pipe, card: float | None, tiny: bool, **changes):
    """The card emulated (allocator cap card - 0.5 GB, the budget a real card's free memory would give: card - 1 GB;
    None: no cap, the whole GPU less 3 GB) and the app's apply step on the in-memory pipeline (budget mode)."""
    budget = None  # the CPU: everything fits
    if CUDA:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if card is None else min(1.0, (card - 0.5) * GIB / total))
        budget = total / GIB - 3.0 if card is None else card - 1.0
    machine = None
    if tiny:  # the demo's sizes fit anything: the planner's overrides give each card's layout
        machine = plan_loaded(pipe, float("inf"), resident_blocks=1 if card else None,
                              text_resident_layers=TINY_TEXT_LAYERS.get(card))
    settings = app.Settings(offload="budget", vram_budget_gb=budget, first_block_cache=False, **changes)
    return app.apply_memory_optimizations(pipe, settings, OFFLOAD["budget"], machine)


def run_job(loaded, image, deadline: float, sampler: DeviceSampler, **job) -> tuple[dict, object]:
    """`app.infer` timed (a watchdog sets Stop at the deadline: the run ends cleanly, what it measured kept)."""
    stop = threading.Event()
    watchdog = threading.Timer(max(1.0, deadline - time.time()), stop.set)
    watchdog.start()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    sampler.peak = 0
    clock, stats = JobClock(loaded), []
    greedy = caption.greedy_generate
    caption.greedy_generate = lambda *a, **k: (stats.append(k.setdefault("stats", {})), greedy(*a, **k))[1]
    start, result, error = time.perf_counter(), None, None
    try:
        result = app.infer(loaded, image, stop=stop, **{**JOB, **job})
    except Exception as err:  # noqa: BLE001 - recorded with what was measured
        error = f"{type(err).__name__}: {err}"
    finally:
        watchdog.cancel()
        caption.greedy_generate = greedy
        out = clock.close()
    out.update(wall_s=round(time.perf_counter() - start, 2), error=error, stopped_at_deadline=stop.is_set())
    if result is not None:
        out.update(whole_image_s=round(result.duration_s, 2), caption_text_tokens=len(result.caption.split()))
    if stats:
        decoder = stats[-1]
        step_ms = decoder.pop("step_ms", [])
        out["caption_decoder"] = dict({k: round(v, 4) if isinstance(v, float) else v for k, v in decoder.items()},
                                      per_token_ms_median_2_to_n=median(step_ms[1:]))
    if CUDA:
        out.update(peak_allocated_gb=round(torch.cuda.max_memory_allocated() / GIB, 2),
                   peak_reserved_gb=round(torch.cuda.max_memory_reserved() / GIB, 2),
                   device_used_peak_gb=round(sampler.peak / GIB, 2))
    return out, result


def exactness(loaded, image) -> dict:
    """The decoder teacher-forced on eager generate's greedy caption (issue 24's definition of exact): each step's
    logits against eager's, within caption.bf16_tolerance; where the free-running texts part, eager's top-2 margin."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    pipe = loaded.pipe
    width, height = calculate_dimensions(640 * 640, image.width / image.height)
    device = pipe._execution_device
    inputs = dict(pipe.vl_processor(text=pipe.image_caption_prompt_en, images=pipe.image_processor.resize(image, height, width),
                                    padding=True, return_tensors="pt").to(device))
    length = inputs["input_ids"].shape[1]
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA), app.caption_attention():
            eager = pipe.text_encoder.generate(**inputs, max_new_tokens=512, return_dict_in_generate=True, output_logits=True)
            tokens, eager_logits = eager.sequences[0, length:], torch.cat(eager.logits).float().cpu()
            del eager
            decoder_logits = torch.full(eager_logits.shape, float("nan"), device=device)
            stats = {}
            caption.greedy_generate(pipe.text_encoder, force=tokens, logits_out=decoder_logits, stats=stats,
                                    max_new_tokens=len(tokens), **inputs)
            free = caption.greedy_generate(pipe.text_encoder, max_new_tokens=512, **inputs)[0, length:]
            # The same logits, eagerly, in one teacher-forced pass over prompt + caption (GEMMs instead of one-row
            # GEMVs): mathematically the decode's, differing only in bf16 rounding order. Its distance from eager's
            # is the spread two exact computations of these logits show on this machine.
            try:
                # (The prompt with the image first, then the caption's tokens over its cache: a random caption may
                # hold the image placeholder's id, which a single pass would take for image positions.)
                prompt = pipe.text_encoder(**inputs, use_cache=True)
                key = "cache" if "cache" in inspect.signature(pipe.text_encoder.forward).parameters else "past_key_values"
                rest = pipe.text_encoder(input_ids=tokens[None, :-1], **{key: prompt[key]}, use_cache=True)
                one_pass = torch.cat([prompt.logits[0, -1:], rest.logits[0]]).float().cpu()
                del prompt, rest
            except Exception as err:  # noqa: BLE001 - recorded; the decoder's figures stand alone
                one_pass, one_pass_error = None, f"{type(err).__name__}: {err}"[:300]
    finally:
        loaded.release_vram()
    decoder_logits = decoder_logits.cpu()
    diff = (eager_logits - decoder_logits).abs().amax(-1)
    tolerance = caption.bf16_tolerance(eager_logits)
    top2 = eager_logits.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    parted = next((i for i, (a, b) in enumerate(zip(free.tolist(), tokens.tolist())) if a != b), None)
    spread = {}
    if one_pass is not None:
        one_diff = (eager_logits - one_pass).abs()
        spread = dict(one_pass_max_abs_diff=round(float(one_diff.amax()), 5), one_pass_mean_abs_diff=round(float(one_diff.mean()), 6),
                      one_pass_steps_over_tolerance=int((one_diff.amax(-1) > tolerance).sum()),
                      decoder_within_one_pass_spread=bool(float(diff.max()) <= float(one_diff.amax())))
    else:
        spread = dict(one_pass_error=one_pass_error)
    return dict(**spread,steps=len(tokens), graphs=stats.get("graphs"), problem=stats.get("problem"),
                max_abs_diff=round(float(diff.max()), 5), mean_abs_diff=round(float((eager_logits - decoder_logits).abs().mean()), 6),
                tolerance_min=round(float(tolerance.min()), 5), tolerance_max=round(float(tolerance.max()), 5),
                steps_over_tolerance=int((diff > tolerance).sum()), max_diff_over_tolerance=round(float((diff / tolerance).max()), 3),
                unwritten_rows=int(decoder_logits.isnan().any(-1).sum()), free_text_parts_at=parted,
                eager_margin_at_parting=None if parted is None else round(float(margin[parted]), 5),
                parting_explained=None if parted is None else bool(margin[parted] <= tolerance[parted] + diff[parted]),
                steps_with_eager_margin_under_tolerance=int((margin <= tolerance).sum()))


def layer_difference(a, b) -> dict:
    import numpy as np

    diffs = [np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)) for x, y in zip(a.layers, b.layers)]
    return dict(max_abs_255=int(max(d.max() for d in diffs)), mean_abs_255=round(float(np.mean([d.mean() for d in diffs])), 4))


def cpu_decode(pipe, bandwidth_gb_s: float | None, streamed_layers: int = 11) -> dict:
    """One language layer's decode-step matmuls (one token) on the host CPU in bf16 against copying it over the link;
    per caption token for the 12 GB card's `streamed_layers` (issue 24, item 3: decode them where they are?)."""
    import torch.nn.functional as F

    layer = pipe.text_encoder.model.language_model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    weights = [(m.weight.detach().to("cpu"), None if m.bias is None else m.bias.detach().to("cpu")) for m in linears]
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w, _ in weights}
    torch.set_num_threads(os.cpu_count())
    times = []
    with torch.inference_mode():
        for _ in range(6):
            start = time.perf_counter()
            for w, b in weights:
                F.linear(x[w.shape[1]], w, b)
            times.append(time.perf_counter() - start)
    nbytes = sum(w.numel() * w.element_size() for w, _ in weights)
    seconds = statistics.median(times[1:])
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    copy_s = nbytes / (bandwidth_gb_s * 1e9) if bandwidth_gb_s else None
    return dict(threads=torch.get_num_threads(), layer_gb=round(nbytes / 1e9, 3), ms=round(1e3 * seconds, 2),
                cpu_gb_s=round(nbytes / seconds / 1e9, 1), link_gb_s=bandwidth_gb_s, streamed_layers=streamed_layers,
                cpu_ms_per_token=round(1e3 * streamed_layers * seconds, 1),
                copy_ms_per_token=None if copy_s is None else round(1e3 * streamed_layers * copy_s, 1),
                cpu_features=[f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags.split()])


def attention_kernels() -> dict:
    """One joint attention (1 x 10,117 tokens x 24 heads x 128, bf16) per SDPA kernel: ms, and |diff| to the default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 24, 10117, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = {}
    for name in ("default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            context = sdpa_kernel([getattr(SDPBackend, name)]) if name != "default" else torch.inference_mode()
            with context:
                result = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(10):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                end.record()
                end.synchronize()
            out[name] = dict(ms=round(begin.elapsed_time(end) / 10, 3), max_abs_diff_to_default=float((result - reference).abs().max()))
        except RuntimeError as err:
            out[name] = dict(error=str(err)[:200])
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="24,16,12", help="cards to emulate, GB (24, 16, 12)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--diff-steps", type=int, default=20, help="steps of the eager vs compiled + fused job")
    parser.add_argument("--deadline-s", type=float, default=560, help="stop cleanly before this many seconds")
    parser.add_argument("--tiny", action="store_true", help="the demo model on the CPU: the script itself")
    parser.add_argument("--resident-from", type=Path, help="an earlier run's JSON (same GPU kind) whose resident "
                        "forwards give the bounds, instead of measuring them again (~40 s of device time)")
    args = parser.parse_args()
    t0 = time.time()
    deadline = t0 + args.deadline_s
    rows = [float(r) for r in args.rows.split(",") if r]
    result = dict(command=" ".join(["python"] + sys.argv), tiny=args.tiny, steps=args.steps, rows={},
                  card=torch.cuda.get_device_name(0) if CUDA else "cpu", cpu_count=os.cpu_count(),
                  versions={k: app.package_version(k) for k in ("torch", "diffusers", "transformers", "triton")},
                  job=dict(JOB, num_inference_steps=args.steps), generation=GENERATION)

    def save(message: str) -> None:
        result["wall_s"] = round(time.time() - t0, 1)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"[{result['wall_s']:6.1f}s] {message}", flush=True)

    def phase(name: str, estimate_s: float, run) -> None:
        if time.time() + estimate_s > deadline:
            result[name] = dict(skipped=f"deadline: {estimate_s:.0f} s needed")
        else:
            try:
                result[name] = run()
            except Exception:  # noqa: BLE001 - recorded; the next phase runs
                result[name] = dict(error=traceback.format_exc()[-3000:])
        save(f"{name}: {json.dumps(result[name])[:400]}")

    if CUDA:  # the CUDA context (before any tensor), then the pinned host -> GPU copy rate
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        result.update(context_and_others_gb=round((total - free) / GIB, 2), total_gb=round(total / GIB, 1))
        host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
        device = torch.empty(GIB, dtype=torch.uint8, device="cuda")
        device.copy_(host, non_blocking=True)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(10):
            device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        result["pinned_h2d_gb_s"] = round(10 * GIB / (begin.elapsed_time(end) / 1e3) / 1e9, 1)
        del host, device
    start = time.perf_counter()
    pipe = build_pipeline(args.tiny)
    result["build_s"] = round(time.perf_counter() - start, 1)
    save(f"built; pinned copies {result.get('pinned_h2d_gb_s')} GB/s")
    count_streamed_bytes()
    sampler = DeviceSampler()
    sampler.start()
    image = Image.new("RGBA", (640, 640), (90, 140, 200, 255))
    context_gb = result.get("context_and_others_gb", 0.0)
    references = {}

    def eager_reference() -> dict:  # before anything is fused or compiled in this process
        fused, app.ENABLE_FUSED_QKV = app.ENABLE_FUSED_QKV, False
        try:
            loaded = apply(pipe, 24.0, args.tiny, compile=False)
        finally:
            app.ENABLE_FUSED_QKV = fused
        try:
            out, references["eager"] = run_job(loaded, image, deadline, sampler, prompt=PROMPT_512,
                                               num_inference_steps=args.diff_steps)
        finally:
            disable_budget_offload(loaded.stages)
        return dict(out, applied=loaded.optimizations)

    def resident() -> dict:
        loaded = apply(pipe, None, args.tiny)
        try:
            out, _ = run_job(loaded, image, deadline, sampler, prompt=PROMPT_512, num_inference_steps=6)
            references["resident"] = out["forwards"]
        finally:
            disable_budget_offload(loaded.stages)
        return dict(out, applied=loaded.optimizations)

    def row(card: float) -> dict:
        start = time.perf_counter()
        loaded = apply(pipe, card, args.tiny)
        out = dict(card_gb=card, cap_gb=card - 0.5, vram_budget_gb=card - 1.0, setup_s=round(time.perf_counter() - start, 1),
                   applied=loaded.optimizations)
        try:
            out["warm_up_s"] = round(app.warm_up(loaded), 1)
            if loaded.compiled:
                compiling.save_compile_cache()  # the next command of this machine loads it
            job, _ = run_job(loaded, image, deadline, sampler, prompt="", num_inference_steps=args.steps)
            out.update(job)
            save(f"row {card:g}: whole image {out.get('whole_image_s')} s, caption {out['caption'].get('s')}")
            plan, text = loaded.stages.plan, loaded.machine.default.text_encoder
            blocks = pipe.transformer.transformer_blocks
            streamed = sum(module_bytes(blocks[i]) for i in plan.streamed_blocks)
            out.update(resident_blocks=len(plan.resident_blocks), streamed_gb_per_forward=round(streamed / 1e9, 2),
                       text_encoder_plan=text.describe(),
                       planned_text_streamed_gb_per_token=round(text.streamed_gb_per_token * GIB / 1e9, 2))
            if CUDA:
                out["peak_reserved_plus_context_gb"] = round(out["peak_reserved_gb"] + context_gb, 2)
            cap = out["caption"]
            tokens = (out.get("caption_decoder", {}).get("steps", -1) + 1) or cap.get("words", 0)
            if cap and tokens:
                cap.update(tokens=tokens, link_gb_per_token=round((cap["stage_bytes"] + cap["streamed_bytes"]) / tokens / 1e9, 3),
                           streamed_gb_per_token=round(cap["streamed_bytes"] / tokens / 1e9, 3))
            copy_s = streamed / (result["pinned_h2d_gb_s"] * 1e9) if result.get("pinned_h2d_gb_s") else None
            for kind, forward in out["forwards"].items():
                resident_s = (references.get("resident") or {}).get(kind, {}).get("median_s_2_to_n")
                forward.update(resident_s=resident_s, streamed_copy_s=None if copy_s is None else round(copy_s, 4),
                               bound_s=None if resident_s is None or copy_s is None else round(max(resident_s, copy_s), 4))
            if card == 24.0 and time.time() + 90 < deadline:
                out["caption_exactness"] = exactness(loaded, image)
                save(f"exactness {out['caption_exactness']}")
            if card == 24.0 and references.get("eager") is not None and time.time() + 3 * args.diff_steps + 30 < deadline:
                diff_job, compiled = run_job(loaded, image, deadline, sampler, prompt=PROMPT_512,
                                             num_inference_steps=args.diff_steps)
                out["compiled_fused_vs_eager"] = dict(
                    layer_difference(references["eager"], compiled), steps=args.diff_steps,
                    median_step_s=diff_job["median_step_s_2_to_n"], eager_median_step_s=result["eager_ref"].get("median_step_s_2_to_n"))
        except Exception:  # noqa: BLE001 - what was measured stays in the row
            out["error_after"] = traceback.format_exc()[-3000:]
        finally:
            disable_budget_offload(loaded.stages)
        return out

    if 24.0 in rows and args.diff_steps > 0:  # 0: no eager reference, nor the compiled + fused vs eager job
        phase("eager_ref", 60 + 3 * args.diff_steps, eager_reference)
    if args.resident_from:  # the resident forward of an earlier run: named in the result, its card too
        earlier = json.loads(args.resident_from.read_text())
        references["resident"] = earlier["resident"]["forwards"]
        result["resident"] = dict(earlier["resident"], source=f"{args.resident_from.name} ({earlier['card']})")
    else:
        phase("resident", 60, resident)
    for card in rows:  # the estimate: set-up and warm-up, then an H100's 24 / 16 / 12 GB images (exact_24.json: 52 s;
        # 16 and 12 GB: the earlier plan's 108 / 169 s less the caption time the two-phase stage saves)
        estimate = 40 + {24.0: 55, 16.0: 85, 12.0: 140}.get(card, 170) * args.steps / 50
        phase(f"row_{card:g}", estimate, lambda card=card: row(card))
        result["rows"][f"{card:g}"] = result.pop(f"row_{card:g}")
    phase("cpu_decode", 10, lambda: cpu_decode(pipe, result.get("pinned_h2d_gb_s")))
    if CUDA:
        phase("attention", 10, attention_kernels)
    save("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
