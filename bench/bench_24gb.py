"""Low-VRAM engine benchmark: the full-size Qwen-Image-Layered models with random weights at an emulated 24 GB cap.

Speed and memory depend on tensor shapes, not on weight values, so random weights of the real architecture give
the real cost (method: ../shared/PERF_METHOD.md). Output quality cannot be measured this way and is never claimed.

Run on a CUDA machine with ~80 GB of VRAM and ~128 GB of RAM (one command, ~6 minutes on an H100):
    PYTHONUNBUFFERED=1 python bench/bench_24gb.py --out bench/results/h100_24gb.json

Every figure is measured in this one process, against the resident run of the same process:
    1. build       the transformer, text encoder and VAE directly on the GPU (bf16, random)
    2. resident    everything on the GPU, no cap: one DiT forward, caption decode per token, VAE
    3. budget      `app.enable_budget_offload` (the shipping engine) at a --cap-gb allocator cap: the same
                   forward (checked equal to the resident one), FirstBlockCache block calls and bytes moved,
                   caption per token, and one whole decomposition (caption, prompts, VAE encode, steps x CFG, decode)
    4. variants    other resident-block counts, record_stream, contiguous placement
    5. fp8         fp8 weight storage (LOSSY) in the budget mode
    6. sequential  accelerate's sequential offload (the seed's mode), few repetitions, for the whole-image estimate
The JSON is rewritten after each phase, so a run cut short still leaves what it measured.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import app  # noqa: E402  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import torch  # noqa: E402

GIB = 2**30
DEVICE = "cuda"
# The real architecture (the published configs; PERF_METHOD.md).
TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
                          use_additional_t_cond=True, use_layer3d_rope=True)
TEXT_CONFIG = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, eos_token_id=151645,
                   pad_token_id=151643)
VISION_CONFIG = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2)
VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True],
                  input_channels=4)
# Qwen2.5-VL special tokens.
IM_START, VISION_START, IMAGE_PAD, VISION_END = 151644, 151652, 151655, 151653
# The pipeline's prompt template drops its first 34 tokens; a caption of N tokens conditions with ~N + 5.
TEMPLATE_TOKENS, TEMPLATE_SUFFIX_TOKENS = 34, 5
# Random weights are scaled down so 60 residual blocks keep activations finite (PERF_METHOD.md).
WEIGHT_SCALE = 0.02


# ----------------------------------------------------------------------------------------------------
# Measuring helpers
# ----------------------------------------------------------------------------------------------------
class HostRamSampler(threading.Thread):
    """Samples this process's resident set and the machine's used RAM every 0.1 s; keeps the peaks."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_rss_gb = 0.0
        self.peak_used_gb = 0.0
        self.baseline_used_gb = self.used_gb()

    @staticmethod
    def rss_gb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB

    @staticmethod
    def meminfo_gb(key: str) -> float:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / GIB
        raise KeyError(key)

    def used_gb(self) -> float:
        return self.meminfo_gb("MemTotal") - self.meminfo_gb("MemAvailable")

    def run(self):
        while True:
            self.peak_rss_gb = max(self.peak_rss_gb, self.rss_gb())
            self.peak_used_gb = max(self.peak_used_gb, self.used_gb())
            time.sleep(0.1)


def sync() -> None:
    if torch.cuda.is_available():  # bench_speed's --tiny runs on the CPU
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    sync()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return time.perf_counter() - start, out


def reset_peaks() -> None:
    """Peaks from here on; the allocator's cache is emptied first so that the reserved peak is this phase's own."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_gb() -> dict:
    return dict(allocated=round(torch.cuda.max_memory_allocated() / GIB, 2),
                reserved=round(torch.cuda.max_memory_reserved() / GIB, 2))


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def run_context():
    """What the app's `infer` runs under."""
    return torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# 1. Models and inputs
# ----------------------------------------------------------------------------------------------------
def build_models():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, image_token_id=IMAGE_PAD,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, eos_token_id=151645,
            pad_token_id=151643)).eval()
        vae = AutoencoderKLQwenImage(**VAE_CONFIG).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(WEIGHT_SCALE)
    # The app's VAE settings (section 1 flags): one layer at a time, in tiles.
    if app.ENABLE_VAE_SLICING:
        vae.enable_slicing()
    if app.ENABLE_VAE_TILING:
        vae.enable_tiling()
    return types.SimpleNamespace(transformer=transformer, text_encoder=text_encoder, vae=vae)


def dit_inputs(resolution: int, layers: int, text_tokens: int, seed: int) -> dict:
    """One transformer call as the pipeline makes it: layers + 1 noisy frames and the input image's frame."""
    side = resolution // 16  # VAE 8x, then 2x2 patches
    g = torch.Generator(DEVICE).manual_seed(seed)
    channels, text_dim = TRANSFORMER_CONFIG["in_channels"], TRANSFORMER_CONFIG["joint_attention_dim"]
    return dict(
        hidden_states=torch.randn(1, (layers + 2) * side * side, channels, generator=g, device=DEVICE, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text_tokens, text_dim, generator=g, device=DEVICE, dtype=torch.bfloat16),
        encoder_hidden_states_mask=None,
        timestep=torch.full((1,), 0.6, device=DEVICE, dtype=torch.bfloat16),
        img_shapes=[[(1, side, side)] * (layers + 2)],
        additional_t_cond=torch.zeros(1, dtype=torch.long, device=DEVICE),
        return_dict=False,
    )


def caption_inputs(resolution: int, seed: int) -> dict:
    """The caption call: Qwen2.5-VL's chat prompt around the image's vision tokens (the processor resizes the
    image to multiples of 28 px: 46x46 patches, 529 merged tokens at 640)."""
    grid = round(resolution / 28) * 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 150000, (40,), generator=g).tolist()
    ids = [IM_START] + text[:30] + [VISION_START] + [IMAGE_PAD] * (grid * grid // 4) + [VISION_END] + text[30:]
    return dict(
        input_ids=torch.tensor([ids], device=DEVICE),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=DEVICE),
        pixel_values=torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=g).to(DEVICE, torch.bfloat16),
        image_grid_thw=torch.tensor([[1, grid, grid]], device=DEVICE),
    )


def prompt_ids(tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (1, tokens), generator=g).to(DEVICE)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def generate(text_encoder, inputs: dict, tokens: int):
    return text_encoder.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def caption_seconds_per_token(text_encoder, inputs: dict, short: int, long: int) -> dict:
    """Decode time per token: the slope between two caption lengths (the prefill cancels out)."""
    t_short, out_short = timed(generate, text_encoder, inputs, short)
    t_long, out_long = timed(generate, text_encoder, inputs, long)
    new_short = out_short.shape[1] - inputs["input_ids"].shape[1]
    new_long = out_long.shape[1] - inputs["input_ids"].shape[1]
    return dict(s_per_token=(t_long - t_short) / (new_long - new_short), short=(new_short, round(t_short, 3)),
                long=(new_long, round(t_long, 3)))


def forward(transformer, inputs: dict, context: str | None = None):
    if context is None:
        return transformer(**inputs)[0]
    with transformer.cache_context(context):
        return transformer(**inputs)[0]


def time_forward(transformer, inputs: dict, warmup: int, reps: int) -> tuple[dict, torch.Tensor]:
    for _ in range(warmup):
        timed(forward, transformer, inputs)
    times, out = [], None
    for _ in range(reps):
        seconds, out = timed(forward, transformer, inputs)
        times.append(seconds)
    return dict(median_s=statistics.median(times), all_s=[round(t, 4) for t in times]), out


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float())
    return dict(max_abs_diff=diff.abs().max().item(), rel_err=(diff.norm() / ref.float().norm()).item(),
                finite=bool(torch.isfinite(out).all().item()))


# ----------------------------------------------------------------------------------------------------
# Counters for the budget mode: block calls (a block whose attention runs) and bytes moved host -> GPU
# ----------------------------------------------------------------------------------------------------
class Counters:
    def __init__(self, pipe):
        self.block_calls = 0
        self.streamed_bytes = 0
        self.stage_switches = 0
        self.handles = [block.attn.register_forward_pre_hook(self._count_call)
                        for block in pipe.transformer.transformer_blocks]
        stages = pipe._budget_stages
        for group in stages.streamed_groups:
            group_bytes = sum(module_bytes(m) for m in group.modules)
            group.onload_ = self._counting(group.onload_, group_bytes)
        self.stages = stages
        enter = stages.enter

        def counting_enter(stage, image_tokens=None):
            if stage != stages.current:
                self.stage_switches += 1
            return enter(stage, image_tokens)

        stages.enter = counting_enter

    def close(self) -> None:
        """Stop counting calls (the wrapped groups stay with the engine they belong to)."""
        for handle in self.handles:
            handle.remove()

    def _count_call(self, module, args):
        self.block_calls += 1

    def _counting(self, onload, nbytes):
        def counted():
            self.streamed_bytes += nbytes
            return onload()

        return counted

    def snapshot(self) -> dict:
        return dict(block_calls=self.block_calls, streamed_gb=round(self.streamed_bytes / GIB, 3),
                    stage_gb=round(self.stages.stage_bytes / GIB, 3), stage_switches=self.stage_switches)

    @staticmethod
    def delta(after: dict, before: dict) -> dict:
        return {k: round(after[k] - before[k], 3) for k in after}


# ----------------------------------------------------------------------------------------------------
# The whole decomposition, as the pipeline runs it (without its tokenizer: token ids are random)
# ----------------------------------------------------------------------------------------------------
def whole_image(pipe, resolution: int, layers: int, steps: int, cfg: float, caption_tokens: int) -> dict:
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae
    side, parts = resolution // 16, {}
    start = time.perf_counter()
    # 1. Caption (an empty prompt makes the pipeline write one).
    parts["caption_s"], _ = timed(generate, text_encoder, caption_inputs(resolution, 1), caption_tokens)
    # 2. Prompt and negative prompt encoding (hidden states of the last layer, template dropped).
    seconds, out = timed(lambda: text_encoder(**prompt_ids(TEMPLATE_TOKENS + caption_tokens + TEMPLATE_SUFFIX_TOKENS, 2),
                                              output_hidden_states=True).hidden_states[-1][:, TEMPLATE_TOKENS:])
    prompt_embeds = out
    seconds_neg, negative_embeds = timed(lambda: text_encoder(**prompt_ids(TEMPLATE_TOKENS + 1 + TEMPLATE_SUFFIX_TOKENS, 3),
                                                              output_hidden_states=True).hidden_states[-1][:, TEMPLATE_TOKENS:])
    parts["prompt_encode_s"] = seconds + seconds_neg
    # 3. The input image's latents.
    image = torch.rand(1, 4, 1, resolution, resolution, device=DEVICE, dtype=torch.bfloat16) * 2 - 1
    parts["vae_encode_s"], _ = timed(lambda: vae.encode(image).latent_dist.mode())
    # 4. Denoising: `steps` x (cond + uncond), true CFG with normalization, Euler steps.
    g = torch.Generator(DEVICE).manual_seed(4)
    channels, z_dim = TRANSFORMER_CONFIG["in_channels"], VAE_CONFIG["z_dim"]
    latents = torch.randn(1, (layers + 1) * side * side, channels, generator=g, device=DEVICE, dtype=torch.bfloat16)
    image_latents = torch.randn(1, side * side, channels, generator=g, device=DEVICE, dtype=torch.bfloat16)
    common = dict(encoder_hidden_states_mask=None, img_shapes=[[(1, side, side)] * (layers + 2)],
                  additional_t_cond=torch.zeros(1, dtype=torch.long, device=DEVICE), return_dict=False)
    sync()
    denoise_start = time.perf_counter()
    for i in range(steps):
        t = torch.full((1,), 1.0 - i / steps, device=DEVICE, dtype=torch.bfloat16)
        x = torch.cat([latents, image_latents], dim=1)
        with transformer.cache_context("cond"):
            noise = transformer(hidden_states=x, encoder_hidden_states=prompt_embeds, timestep=t, **common)[0]
        with transformer.cache_context("uncond"):
            negative = transformer(hidden_states=x, encoder_hidden_states=negative_embeds, timestep=t, **common)[0]
        noise, negative = noise[:, : latents.size(1)], negative[:, : latents.size(1)]
        combined = negative + cfg * (noise - negative)
        noise = combined * (noise.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        latents = latents - noise / steps
    sync()
    parts["denoise_s"] = time.perf_counter() - denoise_start
    # 5. Decode the layers (the first frame, the input image's reconstruction, is dropped).
    z = latents.view(1, layers + 1, side, side, z_dim, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
    z = z.reshape(layers + 1, z_dim, 1, side * 2, side * 2)
    parts["vae_decode_s"], decoded = timed(lambda: vae.decode(z[1:]).sample)
    parts["total_s"] = time.perf_counter() - start
    parts["finite"] = bool(torch.isfinite(decoded).all().item())
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "h100_24gb.json")
    parser.add_argument("--cap-gb", type=float, default=24.0, help="emulated card size (GiB allocator cap)")
    parser.add_argument("--vram-budget", type=float, default=None, help="the engine's budget (default: --cap-gb)")
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--true-cfg-scale", type=float, default=4.0)
    parser.add_argument("--caption-tokens", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=TEMPLATE_SUFFIX_TOKENS + 512,
                        help="prompt tokens of the timed single forward (a 512-token caption's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-job", action="store_true",
                        help="also run the largest job the plan leaves room for (1024 bucket, 10 layers), resident and budget")
    parser.add_argument("--no-variants", action="store_true", help="skip phase 4")
    parser.add_argument("--no-fp8", action="store_true", help="skip phase 5")
    parser.add_argument("--no-sequential", action="store_true", help="skip phase 6")
    args = parser.parse_args(argv)
    budget_gb = args.vram_budget or args.cap_gb
    results: dict = dict(command=" ".join([Path(sys.executable).name] + sys.argv), units="GiB (2**30 bytes), seconds")

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    t_start = time.perf_counter()
    ram = HostRamSampler()
    ram.start()
    import diffusers
    import transformers

    props = torch.cuda.get_device_properties(0)
    results.update(card=props.name, card_memory_gb=round(props.total_memory / GIB, 1), torch=torch.__version__,
                   diffusers=diffusers.__version__, transformers=transformers.__version__,
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), cap_gb=args.cap_gb, vram_budget_gb=budget_gb,
                   job=dict(resolution=args.resolution, layers=args.layers, steps=args.steps,
                            true_cfg_scale=args.true_cfg_scale, caption_tokens=args.caption_tokens,
                            image_tokens=(args.layers + 2) * (args.resolution // 16) ** 2, text_tokens=args.text_tokens))
    log(f"{props.name}, torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")

    # 1. Build.
    seconds, pipe = timed(build_models)
    sizes = {name: round(module_bytes(getattr(pipe, name)) / GIB, 3) for name in ("transformer", "text_encoder", "vae")}
    sizes["block"] = round(module_bytes(pipe.transformer.transformer_blocks[0]) / GIB, 4)
    results.update(build_s=round(seconds, 2), sizes_gb=sizes)
    log(f"built in {seconds:.1f} s: {sizes}")
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae
    job = dit_inputs(args.resolution, args.layers, args.text_tokens, seed=1)
    job_b = dit_inputs(args.resolution, args.layers, TEMPLATE_SUFFIX_TOKENS + 1, seed=2)  # the uncond call
    job_2 = dit_inputs(args.resolution, args.layers, args.text_tokens, seed=3)
    big_job = dit_inputs(1024, 4, args.text_tokens, seed=4)
    max_job = dit_inputs(1024, app.LAYERS_RANGE[1], args.text_tokens, seed=6) if args.max_job else None
    cap_inputs = caption_inputs(args.resolution, seed=5)

    # 2. Resident: everything on the GPU, no cap.
    inference, autocast = run_context()
    with inference, autocast:
        reset_peaks()
        weights = torch.cuda.memory_allocated()
        fwd, reference = time_forward(transformer, job, warmup=1, reps=args.reps)
        activation_640 = (torch.cuda.max_memory_allocated() - weights) / GIB
        _, reference_2 = timed(forward, transformer, job_2)
        reset_peaks()
        seconds, _ = timed(forward, transformer, big_job)
        activation_1024 = (torch.cuda.max_memory_allocated() - weights) / GIB
        results["resident"] = dict(fwd=fwd, fwd_1024_4layers_s=round(seconds, 3),
                                   activation_gb={f"{job['hidden_states'].shape[1] + args.text_tokens}_tokens": round(activation_640, 3),
                                                  f"{big_job['hidden_states'].shape[1] + args.text_tokens}_tokens": round(activation_1024, 3)})
        if max_job is not None:
            reset_peaks()
            seconds, _ = timed(forward, transformer, max_job)
            tokens = max_job["hidden_states"].shape[1] + args.text_tokens
            results["resident"]["activation_gb"][f"{tokens}_tokens"] = round((torch.cuda.max_memory_allocated() - weights) / GIB, 3)
            results["resident"]["fwd_1024_10layers_s"] = round(seconds, 3)
        results["resident_fwd_s"] = round(fwd["median_s"], 4)
        # The same forward with cuDNN attention off (it slows caption decoding on new lengths; see caption_first_lengths).
        cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        results["resident"]["fwd_cudnn_sdp_off"], _ = time_forward(transformer, job, warmup=1, reps=3)
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        log(f"resident {results['resident']}")
        generate(text_encoder, cap_inputs, 80)  # warm-up over the measured lengths (see caption_first_lengths)
        caption = caption_seconds_per_token(text_encoder, cap_inputs, 16, 80)
        caption["repeat_s_per_token"] = caption_seconds_per_token(text_encoder, cap_inputs, 16, 80)["s_per_token"]
        seconds, _ = timed(lambda: text_encoder(**prompt_ids(TEMPLATE_TOKENS + 512 + TEMPLATE_SUFFIX_TOKENS, 2), output_hidden_states=True))
        results["resident"]["caption"] = caption
        results["resident"]["prompt_encode_551_tokens_s"] = round(seconds, 3)
        results["caption_resident_tok_s"] = round(caption["s_per_token"], 5)
        image = torch.rand(1, 4, 1, args.resolution, args.resolution, device=DEVICE, dtype=torch.bfloat16)
        z = torch.randn(args.layers, VAE_CONFIG["z_dim"], 1, args.resolution // 8, args.resolution // 8, device=DEVICE,
                        dtype=torch.bfloat16)
        timed(lambda: vae.decode(z[:1]).sample)  # warm-up (cuDNN autotune)
        reset_peaks()
        before = torch.cuda.memory_allocated()
        enc_s, _ = timed(lambda: vae.encode(image).latent_dist.mode())
        dec_s, _ = timed(lambda: vae.decode(z).sample)
        results["resident"]["vae"] = dict(encode_s=round(enc_s, 3), decode_s=round(dec_s, 3),
                                          peak_above_weights_gb=round((torch.cuda.max_memory_allocated() - before) / GIB, 3))
        log(f"caption {caption}; VAE {results['resident']['vae']}")
    save()

    # 3. Budget: the shipping engine at the cap.
    ram_before = ram.used_gb()
    seconds, applied = timed(app.enable_budget_offload, pipe, budget_gb)
    stages = pipe._budget_stages
    torch.cuda.empty_cache()
    host = stages.weights["transformer"][0][1]

    def plan_summary(plan):
        return dict(image_tokens=plan.image_tokens, resident=len(plan.resident_blocks), streamed=len(plan.streamed_blocks),
                    streamed_blocks=list(plan.streamed_blocks), predicted_denoise_peak_gb=round(plan.denoise_peak_gb, 2),
                    predicted_text_encoder_peak_gb=round(plan.text_encoder_peak_gb, 2), host_ram_gb=round(plan.host_ram_gb, 2))

    results["budget"] = dict(applied=applied, setup_s=round(seconds, 2), host_ram_added_gb=round(ram.used_gb() - ram_before, 2),
                             host_copies_is_pinned=bool(host.is_pinned()), plans={})
    log(f"budget engine applied in {seconds:.1f} s: {applied}; is_pinned()={host.is_pinned()}")
    # Host -> GPU bandwidth from the page-locked copies (one 1.1 GB copy after a warm-up).
    if DEVICE == "cuda":
        chunk = pipe.transformer._budget_host_copies["flat"][: 2**30 + 2**27]
        chunk.to(DEVICE, non_blocking=True)
        seconds, _ = timed(lambda: chunk.to(DEVICE, non_blocking=True))
        results["budget"]["h2d_gb_per_s"] = round(chunk.numel() / seconds / 1e9, 1)
        del chunk
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(args.cap_gb * GIB / props.total_memory)
    if DEVICE == "cuda":
        try:  # the cap must make the allocator fail past it
            torch.empty(int((args.cap_gb + 0.5) * GIB), dtype=torch.uint8, device=DEVICE)
            results["budget"]["cap_enforced"] = False
        except torch.OutOfMemoryError:
            results["budget"]["cap_enforced"] = True
    torch.cuda.empty_cache()
    reset_peaks()
    counters = Counters(pipe)
    peaks = {}
    with inference, autocast:
        seconds, _ = timed(stages.enter, "transformer", job["hidden_states"].shape[1])
        results["budget"]["enter_transformer_stage_s"] = round(seconds, 3)
        plan = stages.plan
        results["budget"]["plans"]["default_job"] = plan_summary(plan)
        c0 = counters.snapshot()
        fwd, out = time_forward(transformer, job, warmup=1, reps=args.reps)
        per_forward = Counters.delta(counters.snapshot(), c0)
        per_forward = {k: round(v / (1 + args.reps), 3) for k, v in per_forward.items()}
        _, out_2 = timed(forward, transformer, job_2)
        peaks["denoise"] = peak_gb()
        results["budget"].update(fwd=fwd, per_forward=per_forward, peak_denoise=peaks["denoise"])
        results["budget_fwd_s"] = round(fwd["median_s"], 4)
        results["budget_fwd_ratio"] = round(fwd["median_s"] / results["resident_fwd_s"], 3)
        results["correctness"] = dict(budget_vs_resident=compare(out, reference),
                                      budget_vs_resident_second_input=compare(out_2, reference_2))
        log(f"budget forward {fwd} ({results['budget_fwd_ratio']}x); {per_forward}; peak {peaks['denoise']}; "
            f"correctness {results['correctness']}")
        reset_peaks()
        seconds, _ = timed(forward, transformer, big_job)
        results["budget"]["plans"]["1024_4layers"] = plan_summary(stages.plan)
        peaks["denoise_1024_4layers"] = peak_gb()
        results["budget"]["fwd_1024_4layers_s"] = round(seconds, 3)
        results["budget"]["peak_denoise_1024_4layers"] = peaks["denoise_1024_4layers"]
        if max_job is not None:
            reset_peaks()
            seconds, _ = timed(forward, transformer, max_job)
            results["budget"]["plans"]["1024_10layers"] = plan_summary(stages.plan)
            peaks["denoise_1024_10layers"] = peak_gb()
            results["budget"]["fwd_1024_10layers_s"] = round(seconds, 3)
            results["budget"]["peak_denoise_1024_10layers"] = peaks["denoise_1024_10layers"]
        log(f"budget 1024 jobs: {results['budget']}")
        save()

        # FirstBlockCache with the budget hooks: the app enables it after the offload mode, as here.
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=app.FIRST_BLOCK_CACHE_THRESHOLD))
        fbc = []
        for label, inputs, context in (("cond A (first)", job, "cond"), ("uncond B (first)", job_b, "uncond"),
                                       ("cond A again", job, "cond"), ("uncond B again", job_b, "uncond"),
                                       ("cond A2 (new input)", job_2, "cond")):
            c0 = counters.snapshot()
            seconds, out_fbc = timed(forward, transformer, inputs, context)
            fbc.append(dict(call=label, s=round(seconds, 4), **Counters.delta(counters.snapshot(), c0)))
        fbc_check = compare(out_fbc, out_2)  # the computed step after two skips equals the plain budget forward
        transformer.disable_cache()
        results["fbc"] = dict(threshold=app.FIRST_BLOCK_CACHE_THRESHOLD, calls=fbc, computed_after_skips_vs_plain=fbc_check)
        log(f"FBC: {fbc}; after skips {fbc_check}")
        save()

        # Caption in the text encoder's stage.
        reset_peaks()
        seconds, _ = timed(stages.enter, "text_encoder")
        results["budget"]["enter_text_encoder_stage_s"] = round(seconds, 3)
        generate(text_encoder, cap_inputs, 80)  # warm-up, as in the resident phase
        caption = caption_seconds_per_token(text_encoder, cap_inputs, 16, 80)
        caption["repeat_s_per_token"] = caption_seconds_per_token(text_encoder, cap_inputs, 16, 80)["s_per_token"]
        peaks["text_encoder"] = peak_gb()
        results["budget"].update(caption=caption, peak_text_encoder=peaks["text_encoder"])
        results["caption_budget_tok_s"] = round(caption["s_per_token"], 5)
        results["caption_budget_ratio"] = round(caption["s_per_token"] / results["caption_resident_tok_s"], 3)
        log(f"budget caption {caption} ({results['caption_budget_ratio']}x); peak {peaks['text_encoder']}")
        save()

        # Caption decode runs slower on sequence lengths this process has not decoded before (run 2: 57 ms/token
        # on first-seen lengths, 22 ms on a repeat, resident and budget alike). Measure it on lengths new to the
        # process, again on the same lengths, and on new lengths with cuDNN attention off.
        results["caption_first_lengths"] = first_lengths = dict(cudnn_sdp_enabled=torch.backends.cuda.cudnn_sdp_enabled())
        for label, resolution, cudnn in (("new_lengths", 1024, True), ("same_lengths_again", 1024, True),
                                         ("new_lengths_cudnn_sdp_off", 896, False)):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            inputs = caption_inputs(resolution, seed=7)
            prefill_s, _ = timed(generate, text_encoder, inputs, 1)
            total_s, _ = timed(generate, text_encoder, inputs, 256)
            first_lengths[label] = dict(prefill_tokens=inputs["input_ids"].shape[1], s_per_token=round((total_s - prefill_s) / 255, 5))
        torch.backends.cuda.enable_cudnn_sdp(first_lengths["cudnn_sdp_enabled"])
        log(f"caption on first-seen lengths: {first_lengths}")
        save()

        # One whole decomposition at the cap (FirstBlockCache off: with random weights its skips mean nothing), twice:
        # the first in this process (its caption lengths mostly unseen, like an app's first image), then again.
        for key in ("whole_image", "whole_image_again"):
            reset_peaks()
            c0 = counters.snapshot()
            image_run = whole_image(pipe, args.resolution, args.layers, args.steps, args.true_cfg_scale, args.caption_tokens)
            peaks[key] = peak_gb()
            image_run["moved"] = Counters.delta(counters.snapshot(), c0)
            image_run["peak"] = peaks[key]
            results[key] = image_run
            log(f"{key} {image_run}")
            save()
        results["whole_image_budget_s"] = results["whole_image"]["total_s"]
        results["whole_image_budget_again_s"] = results["whole_image_again"]["total_s"]
        results["whole_image_composed"] = False  # measured end to end, twice
    counters.close()
    del counters, stages, host  # nothing of this phase holds the page-locked buffers any more
    results["budget_peak_vram_gb"] = max(p["allocated"] for p in peaks.values())
    results["budget_peak_reserved_gb"] = max(p["reserved"] for p in peaks.values())
    results["host_peak_ram_gb"] = dict(process_rss=round(ram.peak_rss_gb, 2), machine_used=round(ram.peak_used_gb, 2),
                                       machine_used_at_start=round(ram.baseline_used_gb, 2))
    save()

    # 4. Variants: other resident counts, record_stream, contiguous placement.
    def variants_phase():
        variants = results["variants"] = {}
        with inference, autocast:
            def measure(label, resident_blocks=None, record_stream=False):
                if hasattr(pipe, "_budget_stages"):
                    app.disable_budget_offload(pipe)
                app.enable_budget_offload(pipe, budget_gb, resident_blocks=resident_blocks)
                for group in pipe._budget_stages.streamed_groups:
                    group.record_stream = record_stream
                reset_peaks()
                pipe._budget_stages.enter("transformer", job["hidden_states"].shape[1])
                fwd, out = time_forward(transformer, job, warmup=1, reps=2)
                variants[label] = dict(resident=len(pipe._budget_stages.plan.resident_blocks), fwd=fwd,
                                       ratio=round(fwd["median_s"] / results["resident_fwd_s"], 3), peak=peak_gb(),
                                       equal_to_resident=compare(out, reference)["max_abs_diff"] == 0.0)
                log(f"variant {label}: {variants[label]}")
                save()

            k = len(plan.resident_blocks)
            for resident in sorted({max(1, k - 6), max(1, k - 14), 1}, reverse=True):
                measure(f"resident_{resident}", resident)
            spread = app.streamed_block_indices
            app.streamed_block_indices = lambda n, r: tuple(range(r, n))  # the first r blocks resident, the rest streamed
            measure(f"contiguous_resident_{k}", k)
            app.streamed_block_indices = spread
            if DEVICE == "cuda":  # record_stream needs CUDA streams; last, it may hit the cap
                measure("record_stream", k, record_stream=True)

    # 5. fp8 weight storage (LOSSY): the same transformer weights rebuilt, stored in float8, budget mode at the cap.
    def fp8_phase():
        from diffusers import QwenImageTransformer2DModel

        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.manual_seed(0)  # build_models' seed: the same random weights
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(DEVICE):
            transformer_fp8 = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for p in transformer_fp8.parameters():
                p.mul_(WEIGHT_SCALE)
        transformer_fp8.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        pipe_fp8 = types.SimpleNamespace(transformer=transformer_fp8, text_encoder=text_encoder, vae=vae)
        applied = app.enable_budget_offload(pipe_fp8, budget_gb)
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * GIB / props.total_memory)
        reset_peaks()
        with inference, autocast:
            pipe_fp8._budget_stages.enter("transformer", job["hidden_states"].shape[1])
            fwd, out = time_forward(transformer_fp8, job, warmup=1, reps=args.reps)
        results["fp8_storage_lossy"] = dict(
            applied=applied, resident=len(pipe_fp8._budget_stages.plan.resident_blocks), fwd=fwd,
            ratio_to_bf16_resident=round(fwd["median_s"] / results["resident_fwd_s"], 3), peak=peak_gb(),
            vs_bf16_resident_output=compare(out, reference),
            note="LOSSY. The output difference is not a quality figure: these random weights are scaled by 0.02, "
                 "mostly below float8's smallest steps; real weights are larger.")
        log(f"fp8 storage (lossy): {results['fp8_storage_lossy']}")
        app.disable_budget_offload(pipe_fp8)
        save()

    for name, phase, skip in (("variants", variants_phase, args.no_variants), ("fp8", fp8_phase, args.no_fp8)):
        if skip:
            continue
        if hasattr(pipe, "_budget_stages"):
            app.disable_budget_offload(pipe)
        try:  # optional phases: an error is recorded and the required sequential figures still follow
            phase()
        except Exception as err:  # noqa: BLE001 - recorded in the JSON and the log, not swallowed
            results[f"{name}_error"] = f"{type(err).__name__}: {err}"[:800]
            log(f"{name} phase failed: {results[f'{name}_error']}")
        if hasattr(pipe, "_budget_stages"):
            app.disable_budget_offload(pipe)
        gc.collect()  # the fp8 transformer and its page-locked buffer go
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * GIB / props.total_memory)
        torch.cuda.empty_cache()
        save()

    # 6. Sequential offload (the seed's mode): accelerate hooks copy each layer in before it runs.
    if not args.no_sequential:
        from accelerate import cpu_offload

        if hasattr(pipe, "_budget_stages"):
            app.disable_budget_offload(pipe)
        torch.cuda.empty_cache()
        sequential = results["sequential"] = dict(
            note="accelerate cpu_offload (what enable_sequential_cpu_offload applies) with the weights in pageable host "
                 "RAM, as from_pretrained leaves them; 2 forwards; caption slope between 2 and 4 new tokens")

        def to_pageable(module):
            """The weights as from_pretrained leaves them (pageable RAM); the engine's page-locked buffer goes."""
            state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
            cpu_offload(module, execution_device=torch.device(DEVICE), state_dict=state)
            if hasattr(module, "_budget_host_copies"):  # only on CUDA
                del module._budget_host_copies
            gc.collect()

        with inference, autocast:
            to_pageable(transformer)
            first, _ = timed(forward, transformer, job)
            second, _ = timed(forward, transformer, job)
            sequential.update(fwd_first_s=round(first, 3), fwd_s=round(second, 3))
            results["sequential_fwd_s"] = round(second, 3)
            log(f"sequential forward {first:.2f} / {second:.2f} s")
            save()
            to_pageable(text_encoder)
            try:  # generate() under accelerate's hooks is the least tried path here: keep the forward figures
                caption = caption_seconds_per_token(text_encoder, cap_inputs, 2, 4)
            except Exception as err:  # noqa: BLE001 - recorded in the JSON, not swallowed
                caption = dict(error=f"{type(err).__name__}: {err}"[:500])
        sequential["caption"] = caption
        # The seed's whole image: the same caption, 2 x steps sequential forwards, and the budget run's prompt
        # encoding and VAE times (lower bounds for sequential).
        w = results["whole_image"]
        caption_s = args.caption_tokens * caption["s_per_token"] if "s_per_token" in caption else w["caption_s"]
        if "s_per_token" in caption:
            results["caption_sequential_tok_s"] = round(caption["s_per_token"], 4)
        estimate = caption_s + 2 * args.steps * second + w["prompt_encode_s"] + w["vae_encode_s"] + w["vae_decode_s"]
        results["sequential_whole_image_estimate_s"] = round(estimate, 1)
        results["sequential_whole_image_estimate_formula"] = (
            "caption_tokens x caption_sequential_tok_s (the budget run's caption seconds if that failed) + 2 x steps x "
            "sequential_fwd_s + the budget run's prompt-encoding and VAE seconds")
        results["whole_image_speedup_vs_sequential"] = round(estimate / w["total_s"], 1)
        if "whole_image_again" in results:
            results["whole_image_again_speedup_vs_sequential"] = round(estimate / results["whole_image_again"]["total_s"], 1)
        log(f"sequential caption {caption}; whole-image estimate {estimate:.0f} s = "
            f"{results['whole_image_speedup_vs_sequential']}x the budget run")
    results["host_peak_ram_gb"]["process_rss_all_phases"] = round(ram.peak_rss_gb, 2)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    keys = ("card", "resident_fwd_s", "budget_fwd_s", "budget_fwd_ratio", "sequential_fwd_s", "caption_resident_tok_s",
            "caption_budget_tok_s", "caption_budget_ratio", "budget_peak_vram_gb", "budget_peak_reserved_gb",
            "host_peak_ram_gb", "whole_image_budget_s", "whole_image_budget_again_s", "sequential_whole_image_estimate_s",
            "whole_image_speedup_vs_sequential", "whole_image_again_speedup_vs_sequential")
    for key in keys:
        print(f"{key:36s} {results.get(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
