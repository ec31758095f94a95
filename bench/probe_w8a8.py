"""W8A8 kernels at the real shapes (issue 25): the per-block times the Fast projection needs, and kernel = reference.

One full-width QwenImageTransformerBlock (random weights, scaled down as bench_exact.py does) at the default job, 640 px /
4 layers with a 517-token prompt: 9,600 image and 517 text tokens. For bf16, int8_w8a8 and fp8_w8a8 (src/studio/w8a8.py):
  - the block's 12 token-wise linears alone (the FLOPs the modes change: 2 x 113.2M x 10,117 = 2.29 TFLOP a block),
    eager and compiled (Inductor fuses the activations' quantization and the epilogue), and the 8-bit kernels alone
    on activations quantized beforehand (`kernels_only_s`: what the quantization costs is the difference);
  - the whole block forward, eager and compiled (torch.compile of the block, as the app's regional compile; without
    the rotary embedding, an elementwise cost the rest of the block's time leaves out);
  - the joint attention alone (SDPA, 24 heads of 128 over all 10,117 tokens: `attention_s`, the same in every mode);
and per mode whether the CUDA kernel gives the reference path's result on one linear: int8 bit for bit; fp8 within
float32 accumulation (its max difference is reported against the output's scale). Random weights: nothing here says
anything about quality. bench/project_fast.py turns the JSON into a projection for RTX 4090 / 4080 / 4070.

    python bench/probe_w8a8.py --out bench/results/w8a8_kernels.json           # on a GPU (H100: ~2-4 min, compiles)
    python bench/probe_w8a8.py --out /tmp/w8a8.json --tiny                      # the script on the CPU (demo sizes)
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src")]

import torch  # noqa: E402

from studio import w8a8  # noqa: E402
from studio.modes import OFFLOAD, QUANT  # noqa: E402
from studio.quant import quant_problem  # noqa: E402

IMAGE_TOKENS, TEXT_TOKENS = 9600, 517  # 640 px, 4 layers (+2 frames) x 1,600; a 512-token caption + the template
WEIGHT_SCALE = 0.02  # bench_exact.py's: keeps random activations finite


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="demo width on the CPU: checks the script, measures nothing")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dim, heads, head_dim = (32, 2, 16) if args.tiny else (3072, 24, 128)
    image_tokens, text_tokens = (64, 7) if args.tiny else (IMAGE_TOKENS, TEXT_TOKENS)
    torch.manual_seed(0)
    with torch.device(device):
        block = QwenImageTransformerBlock(dim, heads, head_dim).to(dtype).eval()
        with torch.no_grad():
            for p in block.parameters():
                p.mul_(WEIGHT_SCALE)
        image = torch.randn(1, image_tokens, dim, dtype=dtype)
        text = torch.randn(1, text_tokens, dim, dtype=dtype)
        temb = torch.randn(1, dim, dtype=dtype)
    capability = torch.cuda.get_device_capability() if cuda else None
    results = dict(device=torch.cuda.get_device_name() if cuda else "cpu (--tiny)", capability=capability,
                   torch=torch.__version__, tokens=[image_tokens, text_tokens], width=dim, modes={})
    # Each stream's tokens pass through its own half of the token-wise weights: 2 x (weights / 2) x all tokens.
    flops = sum(m.weight.numel() for name, m in block.named_modules() if name in w8a8.TOKENWISE_LINEARS) * (
        image_tokens + text_tokens)
    results["linear_tflop_per_block"] = flops / 1e12
    # Joint attention: the image and text streams' queries, keys and values concatenated (QwenDoubleStreamAttnProcessor).
    tokens = image_tokens + text_tokens
    q, k, v = (torch.randn(1, heads, tokens, head_dim, dtype=dtype, device=device) for _ in range(3))
    results["attention_tflop_per_block"] = 4 * tokens**2 * heads * head_dim / 1e12
    with torch.inference_mode():
        results["attention_s"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.repeats,
                                       cuda)

    for mode in ("bf16", *w8a8.W8A8_MODES):
        problem = None if mode == "bf16" else quant_problem(QUANT[mode], OFFLOAD["off"], capability, True)
        if problem:
            results["modes"][mode] = dict(skipped=problem)
            continue
        holder = torch.nn.Module()
        holder.transformer_blocks = torch.nn.ModuleList([copy.deepcopy(block)])
        if mode != "bf16":
            w8a8.quantize_blocks(holder, mode, "all")
        this = holder.transformer_blocks[0]
        linears = [(this.get_submodule(name), image if not name.startswith(("attn.add", "attn.to_add", "txt"))
                    else text) for name in w8a8.TOKENWISE_LINEARS]
        # The inputs of the second linear of each MLP and of the output projections have their own widths.
        linears = [(m, x if m.in_features == dim else torch.randn(*x.shape[:-1], m.in_features, dtype=dtype,
                                                                   device=device)) for m, x in linears]

        def run_linears(linears=linears):
            for m, x in linears:
                m(x)

        def run_block(module=this):
            module(image, text, None, temb)

        row = {}
        with torch.inference_mode():
            row["linears_s"] = timed(run_linears, args.repeats, cuda)
            if mode != "bf16":  # the 8-bit products alone, on activations quantized beforehand
                operands = [(w8a8.quantize_rows(x.reshape(-1, m.in_features), mode), m) for m, x in linears]

                def run_kernels(operands=operands, mode=mode):
                    for (x_q, x_scale), m in operands:
                        if w8a8.kernel_problem(mode, x_q, m.weight, dtype) is not None:
                            w8a8.reference_matmul(x_q, m.weight)
                        elif mode == "int8_w8a8":
                            torch._int_mm(x_q, m.weight.t())
                        else:
                            torch._scaled_mm(x_q, m.weight.t(), scale_a=x_scale, scale_b=m.weight_scale.view(1, -1),
                                             out_dtype=torch.bfloat16, use_fast_accum=w8a8.FP8_FAST_ACCUM)

                row["kernels_only_s"] = timed(run_kernels, args.repeats, cuda)
            row["block_eager_s"] = timed(run_block, args.repeats, cuda)
            if cuda:
                row["linears_compiled_s"] = timed(torch.compile(run_linears), args.repeats, cuda)
                compiled = torch.compile(this)
                row["block_compiled_s"] = timed(lambda compiled=compiled: compiled(image, text, None, temb),
                                                args.repeats, cuda)
            row["linear_tflops"] = flops / row["linears_s"] / 1e12
            if mode != "bf16":  # the kernel against the reference path on the first linear
                layer, x = linears[0]
                x2 = x.reshape(-1, layer.in_features)
                kernel = w8a8.w8a8_matmul(x2, layer.weight, layer.weight_scale, layer.bias, mode)
                x_q, x_scale = w8a8.quantize_rows(x2, mode)
                reference = w8a8._epilogue(w8a8.reference_matmul(x_q, layer.weight), x_scale, layer.weight_scale,
                                           layer.bias, x2.dtype)
                row["kernel_used"] = w8a8.kernel_problem(mode, x_q, layer.weight, x2.dtype) or mode
                row["kernel_equals_reference"] = bool(torch.equal(kernel, reference))
                row["kernel_max_abs_diff"] = (kernel.float() - reference.float()).abs().max().item()
                row["output_abs_max"] = reference.float().abs().max().item()
        results["modes"][mode] = row
        print(mode, json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
