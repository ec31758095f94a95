"""PROJECTION of the Fast preset's DiT forward onto RTX 4090 / 4080 / 4070 from per-kernel times measured on another
GPU (bench/probe_w8a8.py's JSON). Nothing here is measured on those cards: every figure it prints is a projection,
made with the formula below (bench/RESULTS.md, "Fast on consumer cards: the projection").

Per transformer block of the default job (640 px, 4 layers, 517 prompt tokens: 10,117 tokens), on the measuring GPU M:
    K(mode)  the block's 12 token-wise matmuls alone (bf16: `linears_s`; 8-bit: `kernels_only_s`)
    Q(mode)  the activations' quantization and the epilogue: linears (compiled where measured) - K; 0 for bf16
    A        the joint attention (`attention_s`)
    R        the rest of the block (norms, modulation, gates, residuals): block (compiled) - bf16 linears - A
onto a card C:
    K_C(mode) = FLOP / (peak_C(mode) x e(mode))   e: the fraction of its dense peak the kernel reached on M
                                                   ("measured"), or bf16's fraction for every mode ("bf16 efficiency")
    Q_C, R_C  = Q, R x bandwidth_M / bandwidth_C    (elementwise: memory-bound)
    A_C       = A x peak_M(bf16) / peak_C(bf16)     (compute-bound; SageAttention not included)
    forward_C = 60 x (A_C + R_C) + n x (K_C(mode) + Q_C(mode)) + (60 - n) x K_C(bf16)   (n: blocks in 8 bits)
and the low-VRAM engine's bound: max(forward_C, bytes streamed per forward / PCIe), the streamed bytes from the
planner at the card's VRAM less 1 GB (bf16 and Fast's sizes of the real model, tests/test_w8a8.py's FAST).
Left out: the layers outside the blocks (img_in, txt_in, norm_out, proj_out: small), the rotary embedding (the probe
runs the block without it), kernel launch gaps. FirstBlockCache is the same in both presets and is not counted.

    python bench/project_fast.py bench/results/w8a8_kernels.json --out bench/results/fast_projection.json
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src")]

from studio.engine.plan import BUDGET_DEFAULT_JOB_IMAGE_TOKENS, plan_budget  # noqa: E402

# Dense tensor rates (TFLOP/s; int8: TOPS) with fp32 accumulation, and memory bandwidth (GB/s). GeForce Ada from
# NVIDIA's Ada whitepaper (bf16 and fp8 with fp32 accumulate run at half the fp16-accumulate rate there); Hopper SXM
# from its datasheet. PCIe 4 x16 moves ~25 GB/s pinned (shared/PERF_METHOD.md).
CARDS = {
    "RTX 4090": dict(bf16=165.2, fp8=330.3, int8=660.6, memory=1008, vram_gb=24, pcie=25.0),
    "RTX 4080": dict(bf16=97.5, fp8=194.9, int8=389.9, memory=717, vram_gb=16, pcie=25.0),
    "RTX 4070": dict(bf16=58.3, fp8=116.6, int8=233.2, memory=504, vram_gb=12, pcie=25.0),
}
MEASURING = {"H100": dict(bf16=989.4, fp8=1978.9, int8=1978.9, memory=3350),
             "H200": dict(bf16=989.4, fp8=1978.9, int8=1978.9, memory=4800)}
COMPUTE = {"bf16": "bf16", "int8_w8a8": "int8", "fp8_w8a8": "fp8"}
NUM_BLOCKS = 60
# The real model's block sizes (GiB; tests/test_small_cards.py's REAL, tests/test_w8a8.py's FAST): 226,492,416
# token-wise weights go to 1 byte, the modulation stays bf16.
REAL = dict(block_gb=0.633, num_blocks=60, other_transformer_gb=0.0755, text_encoder_gb=15.445, vae_gb=0.236,
            text_layer_gb=233_057_792 * 2 / 2**30, text_num_layers=28, text_vision_gb=1.26,
            text_embed_gb=152_064 * 3584 * 2 / 2**30)
FAST_BLOCK_GB = REAL["block_gb"] - 226_492_416 / 2**30


def measuring_gpu(probe: dict, name: str | None) -> dict:
    for key, rates in MEASURING.items():
        if key in (name or probe["device"]):
            return rates
    raise ValueError(f"no published rates for {name or probe['device']!r}: pass --measured-on H100 or H200")


def block_times(probe: dict, mode: str, efficiency: str, m: dict, c: dict) -> dict:
    """One block's projected seconds on card `c` in `mode` (see the module's formula)."""
    bf16, row = probe["modes"]["bf16"], probe["modes"][mode]
    flop = probe["linear_tflop_per_block"]
    kernel = row["kernels_only_s"] if mode != "bf16" else row["linears_s"]
    linears = row.get("linears_compiled_s", row["linears_s"])
    measured_e = flop / (kernel * m[COMPUTE[mode]])
    e = measured_e if efficiency == "measured" else flop / (bf16["linears_s"] * m["bf16"])
    block = bf16.get("block_compiled_s") or bf16["block_eager_s"]
    rest = max(block - bf16.get("linears_compiled_s", bf16["linears_s"]) - probe["attention_s"], 0.0)
    return dict(kernels=flop / (c[COMPUTE[mode]] * e), quantization=max(linears - kernel, 0.0) * m["memory"] / c["memory"],
                attention=probe["attention_s"] * m["bf16"] / c["bf16"], rest=rest * m["memory"] / c["memory"],
                efficiency=e)


def streamed_gb(vram_gb: float, blocks_8bit: int) -> float:
    """GiB streamed per forward by the low-VRAM engine at the default job, blocks 12.. in 8 bits (the planner)."""
    first = (NUM_BLOCKS - blocks_8bit) // 2
    each = tuple(FAST_BLOCK_GB if first <= i < first + blocks_8bit else REAL["block_gb"] for i in range(NUM_BLOCKS))
    sizes = dict(REAL, block_gb=max(each), block_gbs=each) if 0 < blocks_8bit < NUM_BLOCKS else \
        dict(REAL, block_gb=max(each))
    plan = plan_budget(vram_gb - 1.0, image_tokens=BUDGET_DEFAULT_JOB_IMAGE_TOKENS, **sizes)
    return sum(each[i] for i in plan.streamed_blocks)


def project(probe: dict, card: str, mode: str, blocks_8bit: int, efficiency: str, measured_on: str | None) -> dict:
    m, c = measuring_gpu(probe, measured_on), CARDS[card]
    exact, fast = block_times(probe, "bf16", efficiency, m, c), block_times(probe, mode, efficiency, m, c)
    shared = NUM_BLOCKS * (exact["attention"] + exact["rest"])
    forward = shared + blocks_8bit * (fast["kernels"] + fast["quantization"]) + (NUM_BLOCKS - blocks_8bit) * exact["kernels"]
    stream_s = streamed_gb(c["vram_gb"], blocks_8bit) * 2**30 / 1e9 / c["pcie"]
    return dict(card=card, mode=mode, blocks_8bit=blocks_8bit, efficiency=efficiency, projection=True,
                forward_compute_s=round(forward, 3), streamed_gb=round(streamed_gb(c["vram_gb"], blocks_8bit), 1),
                stream_bound_s=round(stream_s, 3), forward_s=round(max(forward, stream_s), 3),
                per_block_s={k: round(v, 5) for k, v in fast.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", type=Path, help="bench/probe_w8a8.py's JSON")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measured-on", default=None, help="H100 or H200 (default: read from the probe's device)")
    args = parser.parse_args(argv)
    probe = json.loads(args.probe.read_text())
    rows = []
    for card in CARDS:
        for efficiency in ("bf16 efficiency", "measured"):
            exact = project(probe, card, "bf16", 0, efficiency, args.measured_on)
            for mode in ("int8_w8a8", "fp8_w8a8"):
                if "kernels_only_s" not in probe["modes"].get(mode, {}):
                    continue
                for blocks in (36, 60):  # the preset's 12-47, and --quantized-blocks all
                    row = project(probe, card, mode, blocks, efficiency, args.measured_on)
                    row.update(exact_forward_s=exact["forward_s"], speedup=round(exact["forward_s"] / row["forward_s"], 3))
                    rows.append(row)
                    print(f"PROJECTION {card} {mode} {blocks:2d} blocks ({efficiency}): forward {row['forward_s']:.2f} s"
                          f" vs bf16 {exact['forward_s']:.2f} s = {row['speedup']:.2f}x (streams {row['streamed_gb']} GB,"
                          f" {row['stream_bound_s']:.2f} s at PCIe)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(projection=True, probe=str(args.probe), measured_on=probe["device"],
                                            formula=__doc__.split("\n\n")[1], rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
