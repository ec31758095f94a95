"""Where a caption token's time goes under the budget engine: the GPU's busy time against the wall, and the host's
Python hot spots, for one emulated card (a probe: it informs the engine's design, it is not a machine row).

Loads the app's pipeline (`app.load_pipeline`, `auto`, the card emulated as bench_low_ram.py does, the word-level
tokenizer of PERF_METHOD.md), then:
    1. a caption of 512 tokens (the text encoder's stage enters: its copies included), then a second one (stage
       already in: the decode alone), then an image of 2 steps with a prompt (the stages change, the allocator's
       cache is emptied), then a caption again; each caption timed per 64 tokens, with the allocator's device
       allocations and frees meanwhile;
    2. a caption of --profile-tokens tokens under torch.profiler: the sum of the GPU's kernel time against the wall
       (a launch-bound decode has the GPU idle most of the time), the top aten ops by host time;
    3. the same under cProfile: the Python functions that take the host's time per token.
Random full-size weights (../shared/PERF_METHOD.md): times, never quality.

    python bench/probe_caption_split.py --pipe /root/pipe --quantization fp8_storage --vram-gb 16 --out $OUT/cap16.json
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import app  # noqa: E402, I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import bench_low_ram  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

GIB = 2**30


def allocator_counts() -> dict:
    """The caching allocator's device allocations and frees so far (cudaMalloc / cudaFree, or segment maps and unmaps
    with expandable_segments), its segments and retries."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "segment.all.current", "num_alloc_retries")}


def timed_caption(pipe, image, tokens: int | None = None) -> dict:
    """One caption, timed, with its time per 64 tokens (host clock at each lm_head call: generate waits for every
    token anyway) and what the allocator did meanwhile."""
    stamps = []
    handle = pipe.text_encoder.lm_head.register_forward_hook(lambda *a: stamps.append(time.perf_counter()))
    before = allocator_counts()
    bench_low_ram.sync()
    start = time.perf_counter()
    forced = {} if tokens is None else dict(max_new_tokens=tokens)
    try:
        with app.generate_with(pipe.text_encoder, **forced):
            caption = app.caption_image(pipe, image, 640)
        bench_low_ram.sync()
    finally:
        handle.remove()
    seconds, words = time.perf_counter() - start, len(caption.split())
    after = allocator_counts()
    chunks = [round(1000 * (stamps[min(i + 64, len(stamps) - 1)] - stamps[i]) / (min(i + 64, len(stamps) - 1) - i), 1)
              for i in range(0, len(stamps) - 1, 64)]
    return dict(s=round(seconds, 2), words=words, ms_per_token=round(1000 * seconds / max(words, 1), 1),
                first_token_s=round(stamps[0] - start, 2) if stamps else None, ms_per_token_by_64=chunks,
                allocator={k: after[k] - before[k] for k in after}, peak_reserved_gb=round(
                    torch.cuda.max_memory_reserved() / GIB, 2) if torch.cuda.is_available() else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quantization", choices=["fp8_storage"], default=None)
    parser.add_argument("--vram-gb", type=float, default=16.0, help="the card emulated (cap -0.5, budget -1, as the rows)")
    parser.add_argument("--profile-tokens", type=int, default=64)
    parser.add_argument("--no-profile", action="store_true", help="the timed captions and the image only")
    parser.add_argument("--tiny", action="store_true", help="the demo pipeline on the CPU: the script only")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cap_gb, budget_gb = bench_low_ram.emulate_card(args.vram_gb)
    result = dict(command="python " + " ".join(sys.argv), quantization=args.quantization, vram_gb=args.vram_gb,
                  card=torch.cuda.get_device_name(0) if cuda else "cpu",
                  alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    save = lambda: (args.out.parent.mkdir(parents=True, exist_ok=True),  # noqa: E731
                    args.out.write_text(json.dumps(result, indent=1)))

    start = time.perf_counter()
    loaded = bench_low_ram.load_as_app(args.pipe, budget_gb, args.quantization)
    pipe = loaded.pipe
    result.update(load_s=round(time.perf_counter() - start, 1), applied=loaded.optimizations)
    if not args.tiny:
        bench_low_ram.use_word_level_tokenizer(pipe)
    image = app.to_rgba(Image.open(sorted((ROOT / "assets" / "test_images").iterdir())[0]))

    # 1. Two full captions (the first enters the stage, the second is the decode alone), then an image of 2 steps with
    #    a prompt (the stages change: the allocator's cache is emptied), then a caption again.
    for key in ("caption_first", "caption_second", "image", "caption_after_image"):
        if key == "image":
            start = time.perf_counter()
            app.infer(loaded, image, prompt="a poster with a cat", layers=4, resolution=640, num_inference_steps=2, seed=1)
            result[key] = dict(s=round(time.perf_counter() - start, 2))
        else:
            result[key] = timed_caption(pipe, image)
        save()
        print(key, result[key], flush=True)
    if args.no_profile:
        return 0

    # 2. torch.profiler: the GPU's busy time against the wall.
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        profiled = timed_caption(pipe, image, args.profile_tokens)
    seconds, words = profiled["s"], profiled["words"]
    averages = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in averages)
    result["profiled"] = dict(s=round(seconds, 2), words=words, gpu_busy_s=round(device_us / 1e6, 3),
                              gpu_busy_share=round(device_us / 1e6 / seconds, 3),
                              top_host_ops=averages.table(sort_by="self_cpu_time_total", row_limit=20).splitlines(),
                              top_device_ops=averages.table(sort_by="self_device_time_total", row_limit=12).splitlines()
                              if cuda else None)
    save()
    print("profiled", {k: v for k, v in result["profiled"].items() if not k.startswith("top")}, flush=True)

    # 3. cProfile: the host's Python hot spots.
    profiler = cProfile.Profile()
    profiler.enable()
    profiled = timed_caption(pipe, image, args.profile_tokens)
    profiler.disable()
    seconds, words = profiled["s"], profiled["words"]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    result["cprofile"] = dict(s=round(seconds, 2), words=words, top_tottime=text.getvalue().splitlines()[-45:])
    save()
    print("\n".join(result["cprofile"]["top_tottime"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
