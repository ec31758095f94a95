"""One row per consumer machine (VRAM, host RAM) through the app's real path: `auto` picks the mode, `infer` runs.

Full-size Qwen-Image-Layered models with random weights (speed and memory depend on shapes, not values; quality is
never measured: ../shared/PERF_METHOD.md), built on the GPU, moved to pageable host RAM (where from_pretrained
leaves a user), then per row:
    1. emulate the card: `torch.cuda.set_per_process_memory_fraction(cap)` and the budget `auto` sees
       (`Settings(vram_budget_gb=...)`: the real card's free memory; mem_get_info here would say 140 GB);
    2. `app.resolve_offload_mode("auto", ...)` with the planner's minimum, `app.check_machine_fits` with the row's
       RAM, then `app.apply_memory_optimizations` (what `load_pipeline` runs after from_pretrained);
    3. `app.infer` on a 640 px / 4-layer job with an empty prompt (the model writes a 512-token caption), then a
       1024 px / 10-layer job of 2 steps for the peak;
    4. the hooks come off (`app.disable_budget_offload`), the weights stay in their host copies for the next row.
The JSON is rewritten after every row, so a run cut short keeps what it measured.

    PYTHONUNBUFFERED=1 python bench/bench_machines.py --out bench/results/machines.json --rows 24x64,16x64,12x64
    python bench/bench_machines.py --tiny --out /tmp/machines_tiny.json   # the script itself, on the CPU, in seconds
"""

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import app  # noqa: E402, I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import torch  # noqa: E402

GIB = 2**30
# Qwen's special tokens at their real ids (151643 <|endoftext|> ... 151656 <|video_pad|>).
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
               "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
               "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
               "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
VOCAB = 152064


class Sampler(threading.Thread):
    """Peak resident set of this process, every 0.1 s (page-locked host copies count: they are resident)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_gb = 0.0

    @staticmethod
    def rss_gb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB

    def run(self):
        while True:
            self.peak_gb = max(self.peak_gb, self.rss_gb())
            time.sleep(0.1)


def disk_read_gb() -> float:
    """Bytes this process made the block layer read (page-cache misses), /proc/self/io."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"]) / GIB


def word_level_processor():
    """A word-level tokenizer over the real 152,064 ids (PERF_METHOD.md): a random model's ids decode to one word
    each and re-encode to as many tokens, so the caption conditions the transformer with its real length."""
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
    from diffusers import QwenImageLayeredPipeline

    if tiny:
        return app.load_pipeline(app.Settings(demo=True, offload="off", first_block_cache=False,
                                              models_dir=Path("/tmp/bench_machines_models")))
    import bench_24gb

    models = bench_24gb.build_models()
    tokenizer, processor = word_level_processor()
    with torch.no_grad():  # the caption always runs to its 512 tokens: no end-of-text logit can win
        models.text_encoder.lm_head.weight[[SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]]] = 0
    pipe = QwenImageLayeredPipeline(vae=models.vae, transformer=models.transformer, text_encoder=models.text_encoder,
                                    tokenizer=tokenizer, processor=processor,
                                    scheduler=app.build_demo_components("")["scheduler"])
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)  # the real template: 34
    pipe.to("cpu")
    torch.cuda.empty_cache()
    return pipe


class StageClock:
    """Wall time of the caption and of the denoising loop, from hooks on the models (one sync per call)."""

    def __init__(self, pipe):
        self.pipe, self.caption_s, self.first, self.last, self.calls = pipe, 0.0, None, None, 0
        caption = pipe.get_image_caption

        def timed_caption(*args, **kwargs):
            sync()
            start = time.perf_counter()
            # cuDNN attention builds a plan per new sequence length: every decode step is one, so a caption of new
            # lengths costs ~3.5x (bench/RESULTS.md). Off for the caption in every row alike.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                out = caption(*args, **kwargs)
            sync()
            self.caption_s += time.perf_counter() - start
            self.caption_words = len(out.split())
            return out

        pipe.get_image_caption = timed_caption
        self.handles = [pipe.transformer.register_forward_pre_hook(self._pre),
                        pipe.transformer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.first is None:
            sync()
            self.first = time.perf_counter()

    def _post(self, module, args, output):
        sync()
        self.last = time.perf_counter()
        self.calls += 1

    def denoise_s(self) -> float:
        return (self.last - self.first) if self.first is not None else 0.0

    def close(self):
        del self.pipe.get_image_caption
        for handle in self.handles:
            handle.remove()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def limit_ram(ram_gb: float) -> str:
    """This process into a cgroup v2 with memory.max (page cache counts too: an honest small machine)."""
    group = Path(f"/sys/fs/cgroup/qil_bench_{os.getpid()}")
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(f"{int(ram_gb * GIB)}\n")
        (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
        return f"cgroup v2 memory.max {ram_gb:g} GiB ({group})"
    except OSError as err:
        return f"not limited ({type(err).__name__}: {err})"


def run_row(pipe, vram_gb: float, ram_gb: float, args, sizes: dict) -> dict:
    """One machine: the card's allocator cap, the budget `auto` sees, the app's mode choice, two jobs."""
    from PIL import Image

    cuda = torch.cuda.is_available()
    cap_gb, budget_gb = vram_gb - args.cap_below_gb, vram_gb - args.budget_below_gb
    row = dict(vram_gb=vram_gb, ram_gb=ram_gb, cap_gb=cap_gb, vram_budget_gb=budget_gb, ok=False)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(cap_gb * GIB / torch.cuda.get_device_properties(0).total_memory)
    settings = app.Settings(offload="auto", vram_budget_gb=budget_gb, first_block_cache=False)
    mode = app.resolve_offload_mode("auto", cuda, budget_gb, app.budget_minimum_gb(sizes)) if cuda else "budget"
    row["mode"] = mode
    available = ram_gb - args.ram_used_by_os_gb
    try:
        app.check_machine_fits(mode, sizes, budget_gb, ram_gb=available if cuda else None)
    except ValueError as err:
        row.update(refused=str(err))
        return row
    image = Image.open(ROOT / "assets" / "test_images" / sorted(os.listdir(ROOT / "assets" / "test_images"))[0])
    start = time.perf_counter()
    row["applied"] = app.apply_memory_optimizations(pipe, settings, mode)
    row["setup_s"] = round(time.perf_counter() - start, 2)
    clock = StageClock(pipe)
    read_before = disk_read_gb()
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # The 640 px / 4-layer job, empty prompt: caption + prompts + VAE encode + steps x CFG + decode.
        result = app.infer(pipe, image, prompt="", layers=4, resolution=640, num_inference_steps=args.steps,
                           true_cfg_scale=4.0, seed=1)
        denoise = clock.denoise_s()
        row.update(
            steps_run=args.steps, whole_image_measured_s=round(result.duration_s, 2), caption_s=round(clock.caption_s, 2),
            caption_words=clock.caption_words, denoise_measured_s=round(denoise, 2), transformer_calls=clock.calls,
            per_step_s=round(denoise / args.steps, 3),
            # Extrapolated to 50 steps from the measured per-step time (labelled: not measured at 50 steps).
            denoise_s=round(denoise * 50 / args.steps, 1),
            whole_image_s=round(result.duration_s - denoise + denoise * 50 / args.steps, 1),
            whole_image_is_extrapolated=args.steps != 50,
            peak_vram_gb=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
            peak_reserved_gb=round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None)
        if args.peak_job:
            clock.first = None
            try:
                result = app.infer(pipe, image, prompt="a poster", layers=10, resolution=1024, num_inference_steps=2, seed=2)
                row["peak_job_1024_10_s"] = round(result.duration_s, 2)
            except ValueError as err:  # the planner refuses a job the budget cannot hold: the app's answer, recorded
                row["peak_job_1024_10_refused"] = str(err)
        row.update(peak_vram_all_jobs_gb=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
                   peak_reserved_all_jobs_gb=round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
                   ok=True)
    except Exception as err:  # noqa: BLE001  (a row that fails is data: recorded, the next row runs)
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
    finally:
        clock.close()
        row["disk_read_gb"] = round(disk_read_gb() - read_before, 2)
        if getattr(pipe, "_budget_stages", None) is not None:
            app.disable_budget_offload(pipe)
        elif mode == "sequential":
            row["note"] = "sequential hooks stay on: it is the last row it can be"
        app.clear_memory()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="24x64,16x64,12x64", help="VRAMxRAM in GB, comma separated, reference first")
    parser.add_argument("--steps", type=int, default=50, help="steps of the 640 job (per-step time extrapolated to 50)")
    parser.add_argument("--cap-below-gb", type=float, default=0.5, help="allocator cap = VRAM - this (24 -> 23.5)")
    parser.add_argument("--budget-below-gb", type=float, default=1.0, help="budget auto sees = VRAM - this (24 -> 23)")
    parser.add_argument("--ram-used-by-os-gb", type=float, default=2.0, help="RAM a desktop uses besides the app")
    parser.add_argument("--ram-cgroup-gb", type=float, default=None, help="run the process under this memory.max")
    parser.add_argument("--no-peak-job", dest="peak_job", action="store_false")
    parser.add_argument("--tiny", action="store_true", help="the demo pipeline on the CPU: checks the script only")
    args = parser.parse_args(argv)
    rows = [tuple(float(x) for x in row.split("x")) for row in args.rows.split(",")]

    results = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                   card=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   versions=dict(torch=torch.__version__, diffusers=app._version("diffusers"),
                                 transformers=app._version("transformers"), python=platform.python_version()),
                   weights="random, full size (bench_24gb.build_models)" if not args.tiny else "the tiny demo pipeline",
                   caption_attention="cuDNN SDPA off for the caption in every row (StageClock)",
                   rows=[])
    if args.ram_cgroup_gb:
        results["ram_limit"] = limit_ram(args.ram_cgroup_gb)

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    pipe = build_pipeline(args.tiny)
    results["build_to_host_s"] = round(time.perf_counter() - start, 1)
    sizes = app.budget_sizes(pipe.transformer, pipe.text_encoder, pipe.vae)
    results["sizes_gb"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in sizes.items()}
    save()
    print(json.dumps(results, indent=1), flush=True)
    for vram_gb, ram_gb in rows:
        sampler.peak_gb = sampler.rss_gb()
        row = run_row(pipe, vram_gb, ram_gb, args, sizes)
        row["peak_ram_gb"] = round(sampler.peak_gb, 2)
        results["rows"].append(row)
        reference = results["rows"][0]
        if reference.get("ok"):
            results["reference_whole_image_s"] = reference["whole_image_s"]
            if row.get("ok"):
                row["vs_reference"] = round(row["whole_image_s"] / reference["whole_image_s"], 3)
        save()
        print(json.dumps(row, indent=1), flush=True)
        if row.get("mode") == "sequential":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
