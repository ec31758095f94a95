"""Several GPUs, one image: the full-size Qwen-Image-Layered models (random weights) on 1 GPU vs 2 GPUs (CFG-parallel).

Every figure goes through the app's own path: `studio.parallel.init_distributed` / `enable_multi_gpu` /
`serve_rank` (as `app.main` calls them), `app.apply_memory_optimizations` (resident, then the budget engine) and
`app.infer` with an empty prompt (the model writes its 512-token caption). The models are bench_exact.py's
(`build_pipeline`). Quality cannot be measured with random weights and is never claimed. Method:
../shared/PERF_METHOD.md.

Run on a machine with 2 GPUs of >= 80 GB and ~256 GB of RAM, in one command (~5 minutes on 2 H200s):
    PYTHONUNBUFFERED=1 torchrun --standalone --nproc-per-node 2 bench/bench_multi_gpu.py --out bench/results/multi_gpu.json
Test it on the CPU first (the demo model, gloo):
    torchrun --standalone --nproc-per-node 2 bench/bench_multi_gpu.py --tiny --steps 2 --out /tmp/multi_gpu_tiny.json

Phases (the JSON is rewritten after each):
    0. build       the three models on each rank's GPU from the same seed (checked equal across ranks), a
                   word-level tokenizer over the real 152,064 ids (captions cost what real ones cost), the app's
                   apply step (resident), warm-up
    Each phase is measured after a 2-step run of its own configuration (`warmed`).
    1. one_gpu     rank 0 alone, everything resident
    2. two_gpu     both ranks (`enable_multi_gpu`: cond on rank 0, uncond on rank 1), resident; layers vs phase 1
    3. two_gpu_24gb  the budget engine on each rank at a --cap-gb allocator cap and --vram-budget
    4. one_gpu_24gb  rank 0 alone, the same cap and budget
Ray: bench/bench_ray_batch.py measures ray_batch_* (its --merge writes them into this JSON).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import app  # noqa: E402, I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import bench_exact  # noqa: E402  (the full-size pipeline)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402

from studio.modes import OFFLOAD  # noqa: E402
from studio.parallel import enable_multi_gpu, init_distributed, serve_rank  # noqa: E402

GIB = 2**30


def build_pipeline(tiny: bool):
    """bench_exact.py's full-size random pipeline (the word-level tokenizer over the real ids: captions cost what real
    ones cost) in host RAM, or the demo's on the CPU. The same seed on every rank (checked below)."""
    pipe = bench_exact.build_pipeline(tiny)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply(pipe, offload: str, vram_budget_gb: float | None = None):
    """The app's apply step on the in-memory pipeline (`apply_memory_optimizations`: fused QKV and regional compile
    where they apply, then the offload mode), FirstBlockCache off; returns the `Loaded`."""
    settings = app.Settings(offload=offload, vram_budget_gb=vram_budget_gb, first_block_cache=False, warm_up=False)
    return app.apply_memory_optimizations(pipe, settings, OFFLOAD[offload])


def test_image(size: int = 640) -> Image.Image:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.hypot(*np.mgrid[:size, :size] - size / 2) < size * 0.4, 255, 0)
    return Image.fromarray(rgba, "RGBA")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_gpu.json")
    parser.add_argument("--steps", type=int, default=50, help="resident phases (1, 2)")
    parser.add_argument("--budget-steps", type=int, default=None, help="24 GB phases (3, 4); default: --steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=640)
    parser.add_argument("--cap-gb", type=float, default=23.5, help="allocator cap per GPU (GiB): the emulated card")
    parser.add_argument("--vram-budget", type=float, default=23.0, help="the budget engine's budget (GiB)")
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the demo model on the CPU (tests this script)")
    args = parser.parse_args(argv)
    budget_steps = args.budget_steps or args.steps
    start = time.perf_counter()

    # 0. Ranks, models, warm-up.
    state = init_distributed()
    assert state is not None and state.world_size == 2, "run under torchrun --nproc-per-node 2"
    rank, cuda = state.rank, torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def log(msg):
        if rank == 0:
            print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    import diffusers
    import transformers

    results = dict(command=" ".join(["torchrun --standalone --nproc-per-node 2", *sys.argv]), units="GiB, seconds",
                   card=torch.cuda.get_device_name(0) if cuda else "cpu (--tiny)", gpus=torch.cuda.device_count(),
                   versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                 transformers=transformers.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None),
                   env=dict(NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE")),
                   job=dict(resolution=args.resolution, layers=args.layers, true_cfg_scale=4.0, caption="auto (512 tokens)",
                            steps_resident=args.steps, steps_24gb=budget_steps, first_block_cache=False),
                   ray_batch_1gpu_s=None, ray_batch_2gpu_s=None,
                   ray_note="not measured: the Ray wheel (> 64 MiB) cannot be carried to the GPU machine, which has no "
                            "registry; the Ray path is tested on the CPU (tests/test_ray_batch.py)")

    def save():
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))

    if rank != 0:  # --tiny: rank 0 writes the demo model's files first
        dist.barrier(group=state.job_group)
    pipe = build_pipeline(args.tiny)
    if rank == 0:
        dist.barrier(group=state.job_group)
    checksum = sum(float(p.float().sum()) for p in (pipe.transformer.proj_out.weight, pipe.text_encoder.lm_head.weight,
                                                     pipe.transformer.transformer_blocks[-1].attn.to_q.weight))
    sums = [None, None]
    dist.all_gather_object(sums, checksum, group=state.job_group)
    results["weights_equal_across_ranks"] = sums[0] == sums[1]
    log(f"built in {time.perf_counter() - start:.1f} s; weights equal across ranks: {sums[0] == sums[1]}")
    image = test_image(args.resolution)
    caption_s = []
    get_caption = pipe.get_image_caption

    def timed_caption(*a, **k):
        t = time.perf_counter()
        text = get_caption(*a, **k)
        sync()
        caption_s.append(time.perf_counter() - t)
        return text

    pipe.get_image_caption = timed_caption
    step_ends = []  # when each denoising step ended (the scheduler's step closes it), synchronized
    scheduler_step = pipe.scheduler.step

    def timed_step(*a, **k):
        out = scheduler_step(*a, **k)
        sync()
        step_ends.append(time.perf_counter())
        return out

    pipe.scheduler.step = timed_step

    def run(steps):
        caption_s.clear()
        step_ends.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        result = app.infer(loaded, image, prompt="", layers=args.layers, resolution=args.resolution, true_cfg_scale=4.0,
                           num_inference_steps=steps, seed=7, randomize_seed=False)
        sync()
        seconds = time.perf_counter() - t
        peak = round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None
        per_step = np.diff(step_ends)  # step 2 onwards: the steady cost of one step (two transformer calls)
        median = float(np.median(per_step)) if len(per_step) else None
        figures = dict(total_s=round(seconds, 2), caption_s=round(caption_s[0] if caption_s else 0.0, 2),
                       caption_words=len(result.caption.split()), steps=steps,
                       first_step_s=round(step_ends[0] - t - (caption_s[0] if caption_s else 0.0), 3) if step_ends else None,
                       per_step_median_s=round(median, 4) if median else None,
                       after_steps_s=round(t + seconds - step_ends[-1], 3) if step_ends else None,
                       peak_alloc_gb=peak)
        if median and steps < 50:  # the same image at 50 steps: 50 - steps more steps at the measured steady cost
            figures["whole_image_50_steps_s"] = round(seconds + (50 - steps) * median, 2)
            figures["whole_image_50_steps_note"] = f"extrapolated: measured {steps} steps + {50 - steps} x per_step_median_s"
        else:
            figures["whole_image_50_steps_s"] = round(seconds, 2)
        return figures, result.layers

    def alone(steps):
        """Rank 0 alone (rank 1 waits); returns rank 0's figures and layers."""
        out = run(steps) if rank == 0 else (None, None)
        dist.barrier(group=state.job_group)
        return out

    def together(steps):
        """Both ranks through the app's path: rank 0 runs `infer`, rank 1 follows in `serve_rank`."""
        if rank == 0:
            out = run(steps)
            dist.broadcast_object_list([None], src=0, group=state.job_group)  # rank 1 leaves serve_rank
        else:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            serve_rank(loaded, app.infer)
            out = (dict(peak_alloc_gb=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None), None)
        peaks = [None, None]
        dist.all_gather_object(peaks, out[0]["peak_alloc_gb"], group=state.job_group)
        if rank == 0:
            out[0]["peak_alloc_gb_per_rank"] = peaks
        return out

    def warmed(phase, steps):
        """`phase` after a 2-step run of the same configuration, so that no phase pays another's first-run costs. In
        round 4, without it, the 2-GPU budget phase (run first after the engine was applied) captioned in 16.65 s and
        the 1-GPU one after it in 11.35 s; the resident 1-GPU phase (first) in 18.56 s and the 2-GPU one in 13.03 s."""
        phase(2)
        return phase(steps)

    def max_abs_diff(a, b):
        return int(max(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() for x, y in zip(a, b)))

    def compare(suffix, one, two, layers_one, layers_two):
        """2 GPUs against 1: the measured run, the 50-step image, one denoising step; the layers' difference."""
        results["two_vs_one" + suffix] = round(two["total_s"] / one["total_s"], 3)
        results[f"two_vs_one{suffix}_50_steps"] = round(two["whole_image_50_steps_s"] / one["whole_image_50_steps_s"], 3)
        results["denoise_step_two_vs_one" + suffix] = round(two["per_step_median_s"] / one["per_step_median_s"], 3)
        results["max_abs_diff" + suffix] = max_abs_diff(layers_one, layers_two)

    loaded = apply(pipe, "off")  # resident on each rank's GPU
    results["applied_resident"] = loaded.optimizations
    run(2)  # warm-up on both ranks at once: kernels and the caption's sequence lengths (h100_24gb.json: caption_first_lengths)
    log("warm-up done")

    # 1-2. Resident.
    one, layers_one = warmed(alone, args.steps)
    if rank == 0:
        results["one_gpu"], results["one_gpu_s"] = one, one["whole_image_50_steps_s"]
        log(f"one_gpu {one}")
    save()
    loaded.cfg_hook, results["applied"] = enable_multi_gpu(pipe, state)
    loaded.parallel = state
    two, layers_two = warmed(together, args.steps)
    if rank == 0:
        results["two_gpu"], results["two_gpu_s"] = two, two["whole_image_50_steps_s"]
        compare("", one, two, layers_one, layers_two)
        results["max_abs_diff_unit"] = "RGBA levels 0-255 of the output layers, 1 GPU vs 2 GPUs, same seed"
        log(f"two_gpu {two}; ratio {results['two_vs_one']}; max_abs_diff {results['max_abs_diff']}")
    save()

    # 3-4. Each GPU capped, the budget engine on each.
    if not args.skip_budget:
        t = time.perf_counter()
        pipe.to("cpu")  # where from_pretrained leaves the weights; the CFG hook stays on the transformer
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(args.cap_gb * GIB / torch.cuda.get_device_properties(0).total_memory)
        hook = loaded.cfg_hook
        loaded = apply(pipe, "budget", args.vram_budget if cuda else None)
        loaded.cfg_hook, loaded.parallel, applied = hook, state, loaded.optimizations
        dist.barrier(group=state.job_group)
        results["budget_setup"] = dict(applied=applied, setup_s=round(time.perf_counter() - t, 1), cap_gb=args.cap_gb,
                                       vram_budget_gb=args.vram_budget)
        two24, layers_two24 = warmed(together, budget_steps)
        if rank == 0:
            results["two_gpu_24gb"], results["two_gpu_24gb_s"] = two24, two24["whole_image_50_steps_s"]
            log(f"two_gpu_24gb {two24}")
        save()
        loaded.parallel, loaded.cfg_hook = None, None  # rank 0 alone again: the CFG hook stands aside
        hook.enabled = False
        one24, layers_one24 = warmed(alone, budget_steps)
        if rank == 0:
            results["one_gpu_24gb"], results["one_gpu_24gb_s"] = one24, one24["whole_image_50_steps_s"]
            compare("_24gb", one24, two24, layers_one24, layers_two24)
            log(f"one_gpu_24gb {one24}; ratio {results['two_vs_one_24gb']}; max_abs_diff {results['max_abs_diff_24gb']}")
    results["wall_s"] = round(time.perf_counter() - start, 1)
    save()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
