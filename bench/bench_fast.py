"""Exact against Fast (issue 25) through the app's own path: full-size Qwen-Image-Layered models with random weights
(speed depends on shapes, not values; quality is never measured here: ../shared/PERF_METHOD.md), an emulated card.

`apply_preset(pipe, preset, vram_budget_gb)` is the one call a bench needs: the app's `apply_memory_optimizations`
on a pipeline built in memory, with `Settings(preset=...)` and the budget offload mode, as `load_pipeline` runs it
after from_pretrained (the preset picks the card's 8-bit mode: int8 below compute capability 9.0, fp8 from Hopper on).

Per row (`--rows exact:24,fast:24,fast:16`; the exact rows first: Fast quantizes the transformer in place):
    1. the card emulated: the allocator capped at VRAM - 0.5 GB, the app told VRAM - 1 GB (`emulate_card`);
    2. `apply_preset` (FirstBlockCache off in every row: with random weights its skips mean nothing; both presets
       use it alike);
    3. `app.warm_up`, then `app.infer` with a given prompt (no caption: both presets caption with the same bf16 text
       encoder) at 640 px / 4 layers, CFG 4, --steps steps: the whole image, the median transformer call of calls
       2..N (hooks with a sync), the peak VRAM, the plan (blocks resident, GB streamed per call);
    4. the engine's hooks off, the weights left in their host copies, and the Q, K and V projections an exact row
       fused on CUDA split again (`unfuse_qkv_projections`): each row starts from the blocks from_pretrained gives, as
       the app's own load of that preset would (Fast keeps its 8-bit projections apart: `fuse_problem`).
The JSON is rewritten after every row. The pipeline is bench_exact.py's (`build_pipeline`).

    PYTHONUNBUFFERED=1 python bench/bench_fast.py --out bench/results/fast.json --rows exact:24,fast:24,exact:16,fast:16
    python bench/bench_fast.py --tiny --out /tmp/fast_tiny.json        # the script on the CPU (demo model), seconds
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import app  # noqa: E402, I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads, as the app does)
import torch  # noqa: E402

import bench_exact  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0  # noqa: E402
from studio.compiling import FUSED_PROJECTIONS  # noqa: E402
from studio.engine.stream import disable_budget_offload  # noqa: E402
from studio.modes import OFFLOAD  # noqa: E402

GIB = 2**30


def apply_preset(pipe, preset: str, vram_budget_gb: float | None, **settings):
    """The app's path for a pipeline built in memory: `app.apply_memory_optimizations(pipe, Settings(preset=...),
    OFFLOAD["budget"])`; returns the `Loaded`. `settings`: other `Settings` fields (e.g. quantized_blocks="all",
    first_block_cache=False); explicit ones win over the preset's, as on the command line."""
    return app.apply_memory_optimizations(pipe, app.Settings(preset=preset, vram_budget_gb=vram_budget_gb,
                                                             warm_up=False, **settings), OFFLOAD["budget"])


def emulate_card(vram_gb: float) -> tuple[float, float]:
    """The allocator capped at the card's size less 0.5 GB; returns (cap, the budget the app is told: less 1 GB), as
    bench_exact.py's rows: 24 -> cap 23.5, budget 23."""
    cap_gb, budget_gb = vram_gb - 0.5, vram_gb - 1.0
    torch.cuda.set_per_process_memory_fraction(cap_gb * GIB / torch.cuda.get_device_properties(0).total_memory)
    return cap_gb, budget_gb


def unfuse_qkv_projections(transformer) -> int:
    """Undo `studio.compiling.fuse_qkv_projections` (an exact row's, on CUDA): each stacked projection split back into
    the three Linears from_pretrained gave (copies of its rows) and diffusers' processor back; returns how many blocks.
    Only bf16 blocks are fused (`fuse_problem`), and this runs after every row, so a Fast row never meets one."""
    count = 0
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            attn = block.attn
            if not hasattr(attn, "to_qkv"):
                continue
            for fused, names in (("to_qkv", FUSED_PROJECTIONS[:3]), ("to_added_qkv", FUSED_PROJECTIONS[3:])):
                stacked = getattr(attn, fused)
                weights = stacked.weight.chunk(len(names))
                biases = stacked.bias.chunk(len(names)) if stacked.bias is not None else [None] * len(names)
                for name, weight, bias in zip(names, weights, biases):
                    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
                    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
                    if bias is not None:
                        linear.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
                    setattr(attn, name, linear)
                delattr(attn, fused)
            previous = attn.processor
            attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
            attn.processor._attention_backend = previous._attention_backend
            attn.processor._parallel_config = previous._parallel_config
            count += 1
    return count


def build_pipeline(tiny: bool):
    """The whole pipeline in pageable host RAM, where from_pretrained leaves a user: bench_exact.py's full-size
    random pipeline (built on the GPU in seconds, bf16; the word-level tokenizer of PERF_METHOD.md), or the demo's."""
    return bench_exact.build_pipeline(tiny)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class CallClock:
    """Seconds of each transformer call (a sync on each side)."""

    def __init__(self, transformer):
        self.times, self.start = [], None
        self.handles = [transformer.register_forward_pre_hook(self._pre), transformer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        sync()
        self.start = time.perf_counter()

    def _post(self, module, args, output):
        sync()
        self.times.append(time.perf_counter() - self.start)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_row(pipe, preset: str, vram_gb: float, args) -> dict:
    from PIL import Image

    cuda = torch.cuda.is_available()
    cap_gb, budget_gb = emulate_card(vram_gb) if cuda else (None, None)
    row = dict(preset=preset, vram_gb=vram_gb, cap_gb=cap_gb, vram_budget_gb=budget_gb)
    start = time.perf_counter()
    loaded = apply_preset(pipe, preset, budget_gb, first_block_cache=False, quantized_blocks=args.quantized_blocks,
                          sage_attention=args.sage_attention and preset == "fast")
    row.update(setup_s=round(time.perf_counter() - start, 2), quantization=loaded.quant.name, lossy=loaded.lossy,
               quantized=loaded.quantized, sage_attention="sage_attention" in loaded.optimizations,
               applied=loaded.optimizations)
    image = Image.open(sorted((ROOT / "assets" / "test_images").glob("*.png"))[0])
    try:
        row["warm_up_s"] = round(app.warm_up(loaded), 2) if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock = CallClock(pipe.transformer)
        result = app.infer(loaded, image, prompt=args.prompt, layers=4, resolution=640,
                           num_inference_steps=args.steps, true_cfg_scale=4.0, seed=1)
        clock.close()
        plan = loaded.stages.plan
        row.update(whole_image_s=round(result.duration_s, 2), steps=args.steps, transformer_calls=len(clock.times),
                   call_median_s=round(statistics.median(clock.times[1:] or clock.times), 4),
                   resident_blocks=len(plan.resident_blocks),
                   streamed_gb_per_call=round(sum(sum(h.numel() * h.element_size() for _, h in loaded.stages.block_weights[i])
                                                  for i in plan.streamed_blocks) / GIB, 2),
                   peak_vram_gb=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None, ok=True)
    except Exception as err:  # noqa: BLE001  (a row that fails is data: recorded, the next row runs)
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
    finally:
        disable_budget_offload(loaded.stages)
        row["unfused_blocks_after"] = unfuse_qkv_projections(pipe.transformer)  # the next row starts as loaded
        app.clear_memory()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="exact:24,fast:24", help="PRESET:VRAM_GB, comma separated, exact rows first")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quantized-blocks", default="default", help="the Fast rows' blocks (default: 12-47)")
    parser.add_argument("--prompt", default="a poster with a title, a photo and a logo on a plain background")
    parser.add_argument("--sage-attention", action="store_true", help="the Fast rows with --sage-attention too (where "
                        "sageattention >= 2.1.1 is built; else the row says why it is off: `applied` has no sage_attention)")
    parser.add_argument("--tiny", action="store_true", help="the demo pipeline on the CPU: checks the script only")
    args = parser.parse_args(argv)
    rows = [(preset, float(vram)) for preset, vram in (row.split(":") for row in args.rows.split(","))]
    presets = [preset for preset, _ in rows]
    if "fast" in presets and "exact" in presets[presets.index("fast"):]:
        parser.error("put the exact rows first: Fast quantizes the transformer in place")
    cuda = torch.cuda.is_available()
    results = dict(card=torch.cuda.get_device_name(0) if cuda else "cpu", capability=torch.cuda.get_device_capability()
                   if cuda else None, torch=torch.__version__, weights="the demo model" if args.tiny else
                   "random, full size (bench_exact.build_pipeline)", first_block_cache=False, rows=[])
    pipe = build_pipeline(args.tiny)
    for preset, vram_gb in rows:
        row = run_row(pipe, preset, vram_gb, args)
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "applied"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(row.get("ok") for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
