"""bench/results/exact_speed.json: issue 24's summary, drawn from one `bench_exact.py` run's JSON (nothing typed in).

    python bench/summarize_exact.py bench/results/exact_rows.json --out bench/results/exact_speed.json

Per row: the whole image (50 steps run, warm: after `warm_up`, as the app runs), the caption, the ratio to the 24 GB
row of the same command, and the denoise bound: per forward max(the resident forward, bytes streamed / the pinned
host-to-device rate measured in the same run), times 2 forwards (cond, uncond) a step, times the steps. The
row's whole-image bound adds the caption and the rest (VAE decode, exports) as measured.

The consumer-card columns are a PROJECTION (bench/RESULTS.md, "Exact on consumer cards: the projection"): per
forward max(FLOP / (the card's dense bf16 rate x the efficiency the H100 reached), bytes streamed at that card's
VRAM / a PCIe 4 x16 link's ~25 GB/s pinned), plus the caption at its memory floor on the card (bytes read per token /
the card's memory bandwidth, as the H100's measured decode reached of its own floor).
"""

import argparse
import json
from pathlib import Path

# The default job's forward, counted from the code (bench/RESULTS.md, "A forward's arithmetic"): 9,600 image + 517
# text tokens, each through its own stream's 6.8e9 weights (2 FLOP a weight), and joint attention over all of them
# in 60 blocks of 3,072 channels (QK^T and PV: 4 N^2 d).
TOKENS = 9600 + 517
LINEAR_TFLOP = 2 * 6.8e9 * TOKENS / 1e12
ATTENTION_TFLOP = 4 * TOKENS**2 * 3072 * 60 / 1e12
FORWARD_TFLOP = LINEAR_TFLOP + ATTENTION_TFLOP
H100_BF16_TFLOPS = 989.4  # dense, Hopper SXM datasheet
H100_MEMORY_GB_S = 3350
CAPTION_GB_PER_TOKEN = 14.1  # the language layers and lm_head, read once a token (issue 24)
# Published dense bf16 tensor rates with fp32 accumulate (Ada whitepaper) and memory bandwidth; PCIe 4 x16 pinned.
CARDS = {"RTX 4090": dict(vram=24, bf16=165.2, memory=1008), "RTX 4080": dict(vram=16, bf16=97.5, memory=717),
         "RTX 4070": dict(vram=12, bf16=58.3, memory=504)}
PCIE4_GB_S = 25.0


def summarize(run: dict) -> dict:
    rows, link = run["rows"], run["pinned_h2d_gb_s"]
    steps = run["steps"]
    out = dict(gpu=run["card"], command=run["command"], source="bench/results/exact_rows.json", steps_run=steps,
               warm=True, pinned_h2d_gb_s=link, cuda_context_gb=run["context_and_others_gb"],
               resident_forward_from=run["resident"].get("source", "this run"),
               forward_tflop=round(FORWARD_TFLOP, 1))
    reference = rows["24"]["whole_image_s"]
    for card, row in rows.items():
        forwards = row["forwards"]
        bound_step = sum(f["bound_s"] for f in forwards.values())
        denoise_s = row["median_step_s_2_to_n"] * steps
        rest_s = row["whole_image_s"] - denoise_s - row["caption"]["s"]
        out[f"whole_image_{card}gb_s"] = row["whole_image_s"]
        out[f"caption_{card}gb_s"] = round(row["caption"]["s"], 2)
        out[f"ratio_{card}gb_to_24gb"] = round(row["whole_image_s"] / reference, 3)
        out[f"bound_{card}gb"] = dict(
            per_forward_s={k: f["bound_s"] for k, f in forwards.items()},
            bound_kind="bytes / link" if all(f["streamed_copy_s"] >= f["resident_s"] for f in forwards.values())
            else "compute (the resident forward)",
            measured_forward_s={k: f["median_s_2_to_n"] for k, f in forwards.items()},
            denoise_over_bound=round(row["median_step_s_2_to_n"] / bound_step, 3),
            whole_image_bound_s=round(bound_step * steps + row["caption"]["s"] + rest_s, 2),
            whole_image_over_bound=round(row["whole_image_s"] / (bound_step * steps + row["caption"]["s"] + rest_s), 3),
            streamed_gb_per_forward=row["streamed_gb_per_forward"], resident_blocks=row["resident_blocks"],
            cond_tokens=forwards["cond"]["tokens"], uncond_tokens=forwards["uncond"]["tokens"])
        out[f"peak_{card}gb"] = dict(allocated_gb=row["peak_allocated_gb"], reserved_gb=row["peak_reserved_gb"],
                                     reserved_plus_context_gb=row["peak_reserved_plus_context_gb"],
                                     device_used_gb=row["device_used_peak_gb"])
        out[f"caption_{card}gb_detail"] = dict(row["caption_decoder"], link_gb_per_token=row["caption"]["link_gb_per_token"],
                                               text_encoder_plan=row["text_encoder_plan"])
    exact = rows["24"].get("caption_exactness", {})
    out["caption_exactness_24gb"] = exact
    # PROJECTION to consumer cards (the module's docstring; bench/RESULTS.md).
    efficiency = FORWARD_TFLOP / (run["resident"]["forwards"]["cond"]["median_s_2_to_n"] * H100_BF16_TFLOPS)
    decode_ms = rows["24"]["caption_decoder"]["per_token_ms_median_2_to_n"]
    floor_fraction = (CAPTION_GB_PER_TOKEN / H100_MEMORY_GB_S * 1e3) / decode_ms  # of its floor the H100 reached
    projection = dict(marked="PROJECTION, not measured", h100_forward_efficiency=round(efficiency, 3),
                      h100_caption_fraction_of_floor=round(floor_fraction, 3), pcie_gb_s=PCIE4_GB_S)
    for name, card in CARDS.items():
        row = rows[str(card["vram"])]
        compute_s = FORWARD_TFLOP / (card["bf16"] * efficiency)
        copy_s = row["streamed_gb_per_forward"] / PCIE4_GB_S
        caption_s = 512 * (CAPTION_GB_PER_TOKEN / card["memory"] / floor_fraction
                           + row["caption"]["streamed_gb_per_token"] / PCIE4_GB_S)
        rest_s = row["whole_image_s"] - row["median_step_s_2_to_n"] * steps - row["caption"]["s"]
        projection[name] = dict(forward_s=round(max(compute_s, copy_s), 3), compute_s=round(compute_s, 3),
                                copy_s=round(copy_s, 3), bound="compute" if compute_s >= copy_s else "PCIe copies",
                                caption_s=round(caption_s, 1),
                                whole_image_s=round(2 * steps * max(compute_s, copy_s) + caption_s + rest_s, 1))
    out["projection"] = projection
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a bench_exact.py JSON with rows 24, 16 and 12")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = summarize(json.loads(args.run.read_text()))
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))
    print(json.dumps(summary["projection"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
