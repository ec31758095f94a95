"""Why a Ray worker's layers can differ from the local batch's by a few levels: process-to-process determinism on a GPU.

The Ray batch (bench_ray_batch.py) gave the local batch's files and parameters, but layers up to 3 of 255 levels apart.
Each process picks its own cuDNN algorithms when `torch.backends.cudnn.benchmark` is on (app.setup_cuda_optimizations):
the fastest by timing, which can differ between two processes on the same card and round differently. This probe runs
the same seeded work in separate processes, benchmark on and off, and compares the outputs (and times each part three
times in each process: the first call picks the algorithms):
  - the full-size VAE (random weights, seeded) decoding a seeded 640 px latent of 4 layers, as the pipeline does
    (one frame per layer; the app's slicing and tiling on);
  - two full-width transformer blocks (seeded) on a 640 px / 4-layer job, cuDNN attention as in the app.
Weights are random (bench_exact.py's configs), so nothing here says anything about quality.

    python bench/probe_determinism.py --out probe.json          # on a GPU
    python bench/probe_determinism.py --out probe.json --tiny   # the script on the CPU (the demo's sizes)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]


def child(benchmark: bool, out: Path, tiny: bool) -> None:
    import app  # noqa: I001  (first: it sets the allocator's settings before torch loads)
    import torch
    import bench_exact
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    if device == "cuda":
        app.setup_cuda_optimizations()  # TF32 + cudnn.benchmark, as the app
    torch.backends.cudnn.benchmark = benchmark
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vae_config = dict(bench_exact.VAE_CONFIG, base_dim=8) if tiny else bench_exact.VAE_CONFIG
    dit_config = dict(bench_exact.TRANSFORMER_CONFIG, num_layers=2)
    if tiny:
        dit_config.update(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLQwenImage(**vae_config).to(dtype).eval()
        dit = QwenImageTransformer2DModel(**dit_config).to(dtype).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.mul_(bench_exact.WEIGHT_SCALE)
    if app.ENABLE_VAE_SLICING:
        vae.enable_slicing()
    if app.ENABLE_VAE_TILING:
        vae.enable_tiling()
    side, layers = (160 if tiny else 640) // 8, 4
    g = torch.Generator(device).manual_seed(1)
    latents = torch.randn(layers, vae_config["z_dim"], 1, side, side, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, 64, dit_config["joint_attention_dim"], generator=g, device=device, dtype=dtype)
    hidden = torch.randn(1, (layers + 2) * (side // 2) ** 2, dit_config["in_channels"], generator=g, device=device,
                         dtype=dtype)
    results = {}
    with torch.no_grad():
        for name, run in (
            ("vae_decode", lambda: vae.decode(latents, return_dict=False)[0]),
            ("two_blocks", lambda: dit(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                                       timestep=torch.full((1,), 0.6, device=device, dtype=dtype),
                                       img_shapes=[[(1, side // 2, side // 2)] * (layers + 2)],
                                       additional_t_cond=torch.zeros(1, dtype=torch.long, device=device),
                                       return_dict=False)[0])):
            seconds, first = [], None
            for _ in range(3):  # the first call picks the algorithms (and autotunes with benchmark on)
                start = time.perf_counter()
                output = run()
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds.append(round(time.perf_counter() - start, 4))
                output = output.float().cpu()
                first = output if first is None else first
            results[name] = dict(first=first, same_process_max_diff=float((first - output).abs().max()),
                                 seconds=seconds)  # the same process: its algorithms are chosen once
    torch.save(results, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child == "on", args.child_out, args.tiny)
        return 0
    import torch

    work = Path("/tmp/probe_determinism_work")  # the outputs themselves stay on the machine
    work.mkdir(parents=True, exist_ok=True)
    report = dict(command="python bench/probe_determinism.py " + " ".join(argv or sys.argv[1:]), processes={})
    outputs = {}
    for name, bench in (("a_benchmark_on", "on"), ("b_benchmark_on", "on"), ("c_benchmark_off", "off"),
                        ("d_benchmark_off", "off")):
        start = time.perf_counter()
        path = work / f"{name}.pt"
        done = subprocess.run([sys.executable, __file__, "--child", bench, "--child-out", str(path),
                               *(["--tiny"] if args.tiny else [])], env=dict(os.environ), capture_output=True, text=True)
        report["processes"][name] = dict(rc=done.returncode, s=round(time.perf_counter() - start, 1),
                                         stderr_tail=done.stderr[-600:] if done.returncode else "")
        if done.returncode == 0:
            outputs[name] = torch.load(path)
    if torch.cuda.is_available() and not args.tiny:
        report["card"] = torch.cuda.get_device_name(0)
    report["versions"] = dict(torch=torch.__version__, cudnn=torch.backends.cudnn.version())

    def diff(a, b, part):
        x, y = outputs[a][part]["first"], outputs[b][part]["first"]
        levels = ((x.clamp(-1, 1) + 1) * 127.5).round() - ((y.clamp(-1, 1) + 1) * 127.5).round()
        return dict(max_abs=float((x - y).abs().max()), differing_fraction=float((x != y).float().mean()),
                    **({"max_levels_0_255": float(levels.abs().max())} if part == "vae_decode" else {}))

    pairs = [("a_benchmark_on", "b_benchmark_on"), ("c_benchmark_off", "d_benchmark_off"),
             ("a_benchmark_on", "c_benchmark_off")]
    report["compare"] = {f"{a}_vs_{b}": {part: diff(a, b, part) for part in ("vae_decode", "two_blocks")}
                         for a, b in pairs if a in outputs and b in outputs}
    report["same_process"] = {name: {part: r[part]["same_process_max_diff"] for part in r} for name, r in outputs.items()}
    report["seconds"] = {name: {part: r[part]["seconds"] for part in r} for name, r in outputs.items()}  # [first, 2nd, 3rd]
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["compare"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
