"""Probe (issue 24, item 4): the caption's greedy decode as one CUDA graph per caption (src/studio/caption.py)
against eager `generate`, on the full-size Qwen2.5-VL text encoder with random bf16 weights built on the GPU.

Needs only torch and transformers (the GPU machine has no diffusers). PERF_METHOD.md's set-up: a word-level
tokenizer over the real 152,064 ids, the pipeline's English caption prompt around a 640 px image, the lm_head rows of
<|im_end|> and <|endoftext|> zeroed so every caption writes its 512 tokens, the caption's SDPA kernels (no cuDNN),
a card emulated by `set_per_process_memory_fraction(card - 0.5 GB)`. Phases, each saved to the JSON as it ends:
  eager: a warm-up caption (its raw logits kept: eager teacher-forced on its own greedy text), then one timed;
  graphs: a warm-up caption, then one timed (prefill, capture, per-token replay times);
  exactness: the graph step teacher-forced on eager's caption, logits against eager's; the same for eager with
    the memory-efficient SDPA kernel only (how far two correct bf16 kernels are apart);
  new addresses: every weight copied to a new GPU tensor (as the budget engine does per image), then a caption:
    the capture cost per caption, and the same tokens;
  eager steps: the decoder's loop without the graph (its Python and launches, for reference).
    python3 bench/probe_caption_graphs.py --out caption_graphs.json [--card-gb 24] [--tiny] [--deadline-s 380]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from studio import caption  # noqa: E402

# The published text encoder (PERF_METHOD.md) and Qwen's special tokens at their real ids.
TEXT_CONFIG = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6,
                   rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, eos_token_id=151645,
                   pad_token_id=151643)
VISION_CONFIG = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2)
TINY_TEXT = dict(TEXT_CONFIG, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(VISION_CONFIG, depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                   fullatt_block_indexes=[1])
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
               "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
               "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
               "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
VOCAB = 152064
# QwenImageLayeredPipeline.image_caption_prompt_en (diffusers 0.42.1), as `get_image_caption` sends it.
CAPTION_PROMPT_EN = """<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# Image Annotator\nYou are a professional
image annotator. Please write an image caption based on the input image:\n1. Write the caption using natural,
descriptive language without structured formats or rich text.\n2. Enrich caption details by including: \n - Object
attributes, such as quantity, color, shape, size, material, state, position, actions, and so on\n - Vision Relations
between objects, such as spatial relations, functional relations, possessive relations, attachment relations, action
relations, comparative relations, causal relations, and so on\n - Environmental details, such as weather, lighting,
colors, textures, atmosphere, and so on\n - Identify the text clearly visible in the image, without translation or
explanation, and highlight it in the caption with quotation marks\n3. Maintain authenticity and accuracy:\n - Avoid
generalizations\n - Describe all visible information in the image, while do not add information not explicitly shown in
the image\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"""
MAX_NEW_TOKENS = 512  # get_image_caption's (--max-new-tokens: fewer for a dry run)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # app.CAPTION_SDPA_BACKENDS
GIB = 2**30


def word_level_processor():
    """bench_exact.word_level_processor's: each id decodes to one word and re-encodes to one token."""
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
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())


def build_text_encoder(device: str, tiny: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=TINY_TEXT if tiny else TEXT_CONFIG, vision_config=TINY_VISION if tiny else VISION_CONFIG,
            image_token_id=SPECIAL_IDS["<|image_pad|>"], video_token_id=SPECIAL_IDS["<|video_pad|>"],
            vision_start_token_id=SPECIAL_IDS["<|vision_start|>"], vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
            eos_token_id=SPECIAL_IDS["<|im_end|>"], pad_token_id=SPECIAL_IDS["<|endoftext|>"])).eval()
    torch.set_default_dtype(torch.float32)
    encoder.set_attn_implementation("sdpa")  # what from_pretrained picks
    with torch.no_grad():  # the caption always runs to its 512 tokens: no end-of-text logit can win
        encoder.lm_head.weight[[SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]]] = 0
    return encoder


def caption_inputs(processor, side: int, seed: int, device: str) -> dict:
    """A random-noise RGB image of side x side px (the 640 bucket's square image after `caption_image`'s resize)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    inputs = processor(text=CAPTION_PROMPT_EN, images=Image.fromarray(pixels), padding=True, return_tensors="pt")
    return {name: value.to(device) for name, value in inputs.items()}


class TokenClock:
    """A streamer that notes the host time of each new token (generate copies each to the host: one sync a token)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def step_ms(self) -> list[float]:  # times[0]: the prompt, [1]: the prefill's token, then one per decode step
        return [1e3 * (b - a) for a, b in zip(self.times[1:], self.times[2:])]


def median_from_2(step_ms: list[float]) -> float | None:
    """Median per-token time of decode steps 2..N (PERF_METHOD.md)."""
    return round(statistics.median(step_ms[1:]), 3) if len(step_ms) > 1 else None


def memory(device: str) -> dict:
    if device != "cuda":
        return {}
    return dict(peak_allocated_gb=round(torch.cuda.max_memory_allocated() / GIB, 2),
                peak_reserved_gb=round(torch.cuda.max_memory_reserved() / GIB, 2))


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compare(eager_logits: torch.Tensor, other: torch.Tensor, eager_tokens: torch.Tensor) -> dict:
    """Teacher-forced logits (steps x vocabulary, float32) against eager's: differences, the bf16 tolerance
    (caption.bf16_tolerance, per step), and where the other's argmax differs from eager's token, eager's margin."""
    diff = (eager_logits - other).abs().amax(dim=-1)
    tolerance = caption.bf16_tolerance(eager_logits)
    top2 = eager_logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    differ = (other.argmax(dim=-1) != eager_tokens).nonzero().flatten().tolist()
    return dict(
        max_abs_diff=round(float(diff.max()), 5), mean_abs_diff=round(float((eager_logits - other).abs().mean()), 6),
        median_step_max_diff=round(float(diff.median()), 5),
        tolerance_min=round(float(tolerance.min()), 5), tolerance_max=round(float(tolerance.max()), 5),
        steps_over_tolerance=int((diff > tolerance).sum()),
        max_diff_over_tolerance=round(float((diff / tolerance).max()), 3),
        largest_logit_median=round(float(eager_logits.abs().amax(dim=-1).median()), 3),
        eager_margin_median=round(float(margin.median()), 5),
        eager_steps_with_margin_under_tolerance=int((margin <= tolerance).sum()),
        argmax_differs_at=[dict(step=i, eager_margin=round(float(margin[i]), 5), tolerance=round(float(tolerance[i]), 5),
                                margin_under_tolerance=bool(margin[i] <= tolerance[i])) for i in differ],
        all_differences_explained=all(bool(margin[i] <= tolerance[i]) for i in differ),
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--card-gb", type=float, default=24.0, help="the card emulated: per-process cap card - 0.5 GB")
    parser.add_argument("--side", type=int, default=640)
    parser.add_argument("--tiny", action="store_true", help="a small random model (a dry run of this script, CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--deadline-s", type=float, default=380, help="optional phases are skipped after this")
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    result: dict = dict(command=" ".join(["python3"] + sys.argv), card=torch.cuda.get_device_name(0) if device == "cuda"
                        else "cpu", versions=dict(torch=torch.__version__, transformers=transformers.__version__),
                        tiny=args.tiny, max_new_tokens=args.max_new_tokens, check_every=caption.CHECK_EVERY,
                        warm_up_steps=caption.WARM_UP_STEPS, logit_tolerance_ulps=caption.LOGIT_TOLERANCE_ULPS)

    def save(message: str) -> None:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"[{result['wall_s']:6.1f}s] {message}", flush=True)

    if device == "cuda":
        torch.backends.cudnn.benchmark = False  # app.setup_cuda_optimizations
        total = torch.cuda.get_device_properties(0).total_memory
        cap = (args.card_gb - 0.5) * GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        result.update(card_gb=args.card_gb, cap_gb=args.card_gb - 0.5, total_gb=round(total / GIB, 1))
    processor = word_level_processor()
    start = time.perf_counter()
    encoder = build_text_encoder(device, args.tiny)
    sync(device)
    result.update(build_s=round(time.perf_counter() - start, 1), attn=encoder.config._attn_implementation,
                  weights_gb=round(sum(p.numel() * p.element_size() for p in encoder.parameters()) / GIB, 2))
    inputs = caption_inputs(processor, args.side, seed=1, device=device)
    length = inputs["input_ids"].shape[1]
    result.update(prompt_tokens=length, image_grid_thw=inputs["image_grid_thw"].tolist(), memory_after_build=memory(device))
    lm = encoder.model.language_model  # what a decode step reads: every layer, the final norm, lm_head (one embedding row)
    step_bytes = sum(t.numel() * t.element_size() for m in (lm.layers, lm.norm, encoder.lm_head) for t in m.parameters())
    result.update(weights_read_per_token_gb=round(step_bytes / 1e9, 2))
    if device == "cuda":  # the card's device-to-device copy rate (bytes read + written): the floor of a token
        source = torch.empty(GIB, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        target.copy_(source)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(10):
            target.copy_(source)
        end.record()
        end.synchronize()
        rate = 10 * 2 * GIB / (begin.elapsed_time(end) / 1e3)
        result.update(copy_tb_s=round(rate / 1e12, 2), floor_ms_per_token=round(1e3 * step_bytes / rate, 2))
        del source, target
    save(f"built: {result['weights_gb']} GB of weights, prompt {length} tokens")
    attention = lambda: sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_BACKENDS])  # app.caption_attention

    # 1. Eager generate: a warm-up caption (raw logits kept), then one timed.
    with torch.no_grad(), attention():
        reset_peak(device)
        start = time.perf_counter()
        warm = encoder.generate(**inputs, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                                output_logits=True)
        sync(device)
        result["eager_warm_up_s"] = round(time.perf_counter() - start, 2)
        eager_tokens = warm.sequences[0, length:]
        eager_logits = torch.cat(warm.logits, dim=0).float().cpu()  # off the GPU: the peaks below are the decodes'
        del warm
        clock = TokenClock()
        reset_peak(device)
        start = time.perf_counter()
        timed = encoder.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=clock)
        sync(device)
    result["eager"] = dict(seconds=round(time.perf_counter() - start, 2), new_tokens=timed.shape[1] - length,
                           per_token_ms_median_2_to_n=median_from_2(clock.step_ms()),
                           same_tokens_as_warm_up=bool(torch.equal(timed[0, length:], eager_tokens)), **memory(device))
    save(f"eager {result['eager']}")

    # 2. The graph decoder: a warm-up caption, then one timed.
    def graph_caption(name: str, reference: torch.Tensor | None = None, **options) -> torch.Tensor:
        stats = {}
        reset_peak(device)
        start = time.perf_counter()
        with torch.no_grad(), attention():
            out = caption.greedy_generate(encoder, max_new_tokens=args.max_new_tokens, stats=stats, **options, **inputs)
        sync(device)
        step_ms = stats.pop("step_ms", [])
        result[name] = dict(seconds=round(time.perf_counter() - start, 3), new_tokens=out.shape[1] - length,
                            **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
                            per_token_ms_median_2_to_n=median_from_2(step_ms),
                            per_token_ms_min=round(min(step_ms), 3) if step_ms else None,
                            per_token_ms_max=round(max(step_ms), 3) if step_ms else None,
                            first_token_differing_from_eager=None if reference is None else next(
                                (i for i, (a, b) in enumerate(zip(out[0, length:].tolist(), reference.tolist()))
                                 if a != b), None),
                            **memory(device))
        save(f"{name} {result[name]}")
        return out

    def graph_phases() -> None:
        graph_caption("graphs_warm_up", eager_tokens)
        graphs_tokens = graph_caption("graphs", eager_tokens)[0, length:]
        result["speedup_graphs_vs_eager"] = round(result["eager"]["seconds"] / result["graphs"]["seconds"], 2)

        # 3. Exactness: teacher-forced on eager's caption, the graph step's logits against eager's own.
        with torch.no_grad(), attention():
            graph_logits = torch.full(eager_logits.shape, float("nan"), device=device)
            stats = {}
            caption.greedy_generate(encoder, max_new_tokens=args.max_new_tokens, force=eager_tokens, logits_out=graph_logits,
                                    stats=stats, **inputs)
        graph_logits = graph_logits.cpu()
        result["exactness_graphs_vs_eager"] = dict(compare(eager_logits, graph_logits, eager_tokens.cpu()),
                                                   graphs=stats["graphs"],
                                                   unwritten_rows=int(graph_logits.isnan().any(-1).sum()))
        save(f"exactness {result['exactness_graphs_vs_eager']}")

        # 4. New addresses: every weight copied to a new GPU tensor between captions, as the budget engine does.
        with torch.no_grad():
            for parameter in encoder.parameters():
                parameter.data = parameter.data.clone()
        sync(device)
        moved = graph_caption("graphs_after_weights_moved", eager_tokens)[0, length:]
        result["graphs_after_weights_moved"]["same_tokens_as_before"] = bool(torch.equal(moved, graphs_tokens))
        save("weights moved")

    try:
        graph_phases()
    except Exception as error:  # noqa: BLE001 - recorded; the phases below still run
        import traceback

        result["graphs_error"] = traceback.format_exc()[-4000:]
        save(f"graphs failed: {error!r}")

    # 5. How far two correct eager kernels are apart: eager teacher-forced with only the memory-efficient SDPA kernel.
    if device == "cuda" and time.perf_counter() - t0 < args.deadline_s - 2.5 * result["eager"]["seconds"]:
        with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            other = encoder.generate(**inputs, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                                     output_logits=True, logits_processor=[caption._ForceTokens(eager_tokens)])
        result["exactness_eager_efficient_kernel_vs_eager"] = compare(
            eager_logits, torch.cat(other.logits).float().cpu(), eager_tokens.cpu())
        del other
        save(f"eager kernels {result['exactness_eager_efficient_kernel_vs_eager']}")

    # 6. The decoder's loop without the graph: generate's Python gone, the launches left.
    if time.perf_counter() - t0 < args.deadline_s - 1.5 * result["eager"]["seconds"]:
        graph_caption("decoder_eager_steps", eager_tokens, graphs=False)

    # 7. A 1024 px image: a longer prompt, its own capture.
    if time.perf_counter() - t0 < args.deadline_s - 20:
        inputs.clear()
        inputs.update(caption_inputs(processor, 1024, seed=2, device=device))
        length = inputs["input_ids"].shape[1]
        result["prompt_tokens_1024"] = length
        try:
            graph_caption("graphs_1024")
        except Exception:  # noqa: BLE001 - recorded
            import traceback

            result["graphs_1024_error"] = traceback.format_exc()[-4000:]
    save("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
