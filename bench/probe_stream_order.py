"""Streamed blocks ordered on the GPU vs diffusers' host waits: the budget engine's per-step time, A/B in one process.

The budget engine streams the transformer blocks that do not fit through diffusers' ModuleGroup
(`studio.engine.stream.PageLockedModuleGroup`). With record_stream=False diffusers makes the host wait for the compute
stream after every streamed block (`_offload_to_memory`), so the GPU idles while Python queues the next block. The variant tried
here (`gpu_ordered_onload` / `gpu_ordered_offload`, below) drops that wait: the side stream instead waits on the GPU
for the compute stream before each copy. This probe loads the app's pipeline once (`app.load_pipeline`, `auto`, the
card emulated with `set_per_process_memory_fraction` and `Settings(vram_budget_gb=)`, as bench_low_ram.py does) and
times the denoising steps of a 640 px / 4-layer job (a prompt given: no caption) with each ordering, alternated
A B A B after one warm run of 2 steps:
    - "host_waits": the app's engine as it is (diffusers' own ordering);
    - "gpu_ordered": the variant.
Reported: the per-step time of every run, the peak memory, and the layers of every run against the first one's
(the same kernels in the same order on the compute stream: they must be byte-equal). Random full-size weights
(../shared/PERF_METHOD.md): times, never quality.

Result (H200, bench/results/stream_order_*.json): float8 blocks at 16 GB 1.074 vs 1.083 s a step (0.99x), bf16
blocks at 24 GB 1.052 vs 0.986 s (1.07x: slower, its copies now also wait for the resident blocks queued before
them); layers byte-equal in both. Not adopted: the engine keeps diffusers' ordering. (Measured while the variant
lived in `app.PageLockedModuleGroup`, the same code, with `_BudgetStages.release` waiting for the whole device instead
of the side stream: stage changes fall outside the steps timed.)

    python bench/probe_stream_order.py --pipe /root/pipe --quantization fp8_storage --vram-gb 16 --out $OUT/order.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import app  # noqa: E402, I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import bench_low_ram  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.hooks.group_offloading import ModuleGroup  # noqa: E402
from PIL import Image  # noqa: E402
from studio.engine import stream  # noqa: E402

GIB = 2**30


def gpu_ordered_onload(self):
    """The variant's copy: wait for the previous copy (diffusers' own host wait), then, on the GPU, for everything
    queued on the compute stream (the kernels reading the groups whose memory this copy may reuse)."""
    if self.stream is None:
        return ModuleGroup._onload_from_memory(self)
    self.stream.synchronize()
    self.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(self.stream):
        for tensor, host in self.cpu_param_dict.items():
            tensor.data = host.to(self.onload_device, non_blocking=self.non_blocking)


def gpu_ordered_offload(self):
    """The variant's release: no host wait for the compute stream (the next copy waits for it on the GPU)."""
    if self.stream is None:
        return ModuleGroup._offload_to_memory(self)
    for tensor, host in self.cpu_param_dict.items():
        tensor.data = host


ORDERINGS = {
    "host_waits": (ModuleGroup._onload_from_memory, ModuleGroup._offload_to_memory),
    "gpu_ordered": (gpu_ordered_onload, gpu_ordered_offload),
}


def use(ordering: str) -> None:
    # Stage changes (`_BudgetStages.release`) stay as they are in both: their empty_cache frees blocks with cudaFree,
    # which waits for the whole device, so no kernel still reads a freed group there.
    stream.PageLockedModuleGroup._onload_from_memory, stream.PageLockedModuleGroup._offload_to_memory = ORDERINGS[ordering]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipe", type=Path, required=True, help="a saved full-size pipeline (bench_low_ram.py builds one)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quantization", choices=["fp8_storage"], default=None)
    parser.add_argument("--vram-gb", type=float, default=16.0, help="the card emulated (cap -0.5, budget -1, as the rows)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each ordering, alternated")
    parser.add_argument("--tiny", action="store_true", help="the demo pipeline on the CPU: the script only")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cap_gb, budget_gb = bench_low_ram.emulate_card(args.vram_gb)
    result = dict(command="python " + " ".join(sys.argv), quantization=args.quantization, vram_gb=args.vram_gb,
                  cap_gb=cap_gb, vram_budget_gb=budget_gb, steps=args.steps,
                  card=torch.cuda.get_device_name(0) if cuda else "cpu", runs=[])

    # 1. Load as the app does.
    start = time.perf_counter()
    loaded = bench_low_ram.load_as_app(args.pipe, budget_gb, args.quantization)
    pipe = loaded.pipe
    result.update(load_s=round(time.perf_counter() - start, 1), mode=loaded.offload.name,
                  applied=loaded.optimizations)
    image = Image.open(sorted((ROOT / "assets" / "test_images").iterdir())[0])

    # 2. One warm run (2 steps: first-run costs), then the orderings alternated; every run's layers against the
    #    first measured run's.
    reference = None
    for index, ordering in enumerate(["gpu_ordered"] + ["host_waits", "gpu_ordered"] * args.repeats):
        use(ordering)
        clock = bench_low_ram.StageClock(pipe)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = app.infer(loaded, image, prompt="a poster with a cat", layers=4, resolution=640,
                        num_inference_steps=2 if index == 0 else args.steps, true_cfg_scale=4.0, seed=1)
        clock.close()
        layers = np.stack([np.asarray(layer) for layer in out.layers]).astype(np.int16)
        run = dict(ordering=ordering, per_step_s=round(clock.denoise_s() / (clock.calls / 2), 4),
                   transformer_calls=clock.calls, whole_s=round(out.duration_s, 2),
                   peak_vram_gb=round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
                   alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries") if cuda else None)
        if index == 0:
            result["warm"] = run
            continue
        reference = layers if reference is None else reference
        run["max_abs_diff_vs_first"] = int(np.abs(layers - reference).max())
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    # 3. The means.
    for ordering in ORDERINGS:
        steps = [r["per_step_s"] for r in result["runs"] if r["ordering"] == ordering]
        result[f"{ordering}_per_step_s"] = round(sum(steps) / len(steps), 4)
    result["gpu_ordered_vs_host_waits"] = round(result["gpu_ordered_per_step_s"] / result["host_waits_per_step_s"], 3)
    result["layers_equal"] = all(r["max_abs_diff_vs_first"] == 0 for r in result["runs"])
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "applied")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
