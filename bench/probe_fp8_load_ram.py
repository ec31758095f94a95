"""Does --quantization fp8_storage load without the bf16 transformer in anonymous RAM? (issue 12; CPU, no GPU needed)

A transformer of the real width (3072, 24 heads of 128; 60 blocks in the real model, --blocks here) with random bf16
weights is saved with save_pretrained, then, in a fresh process: `from_pretrained(dtype=bf16)` (the files' dtype:
mapped, nothing copied), `studio.quant.apply_fp8_storage` (the cast the app makes), and `studio.engine.stream._host_copies` as the budget mode
makes it on CUDA (one host buffer; page-locking is skipped here: no GPU). A thread samples RssAnon (anonymous memory:
what a cgroup cannot reclaim) and RssFile (mapped file pages: page cache, evictable) every 10 ms.

    python bench/probe_fp8_load_ram.py --dir /tmp/fp8_probe --blocks 8 --out /tmp/fp8_probe.json
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def status_gb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines())
    return {k: int(fields[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile")}


def build(folder: Path, blocks: int) -> None:
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=blocks,
                                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                        axes_dims_rope=(16, 56, 56), use_additional_t_cond=True, use_layer3d_rope=True)
    model.to(torch.bfloat16).save_pretrained(folder)


def probe(folder: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import app  # noqa: F401, I001  (first: it sets the allocator's settings before torch loads)
    import torch
    from diffusers import QwenImageTransformer2DModel

    from studio.engine import stream
    from studio.engine.memory import module_gb
    from studio.quant import apply_fp8_storage

    peaks = {"phase": "start", "RssAnon": {}, "RssFile": {}}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            now = status_gb()
            for key in ("RssAnon", "RssFile"):
                peaks[key][peaks["phase"]] = max(peaks[key].get(peaks["phase"], 0.0), now[key])
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = {"before": status_gb()}
    peaks["phase"] = "from_pretrained"
    model = QwenImageTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    out["after_from_pretrained"] = status_gb()
    out["bf16_gb"] = round(module_gb(model), 3)
    peaks["phase"] = "cast"
    apply_fp8_storage(model)
    out["after_cast"] = status_gb()
    out["fp8_gb"] = round(module_gb(model), 3)
    peaks["phase"] = "host_copies"
    stream._page_lock = lambda flat: False  # no GPU: the buffer is made and filled as on CUDA, not page-locked
    stream._host_copies(model, on_cuda=True)
    out["after_host_copies"] = status_gb()
    stop.set()
    thread.join()
    out["peak_rss_anon_gb_by_phase"] = {k: round(v, 3) for k, v in peaks["RssAnon"].items()}
    out["peak_rss_file_gb_by_phase"] = {k: round(v, 3) for k, v in peaks["RssFile"].items()}
    out = {k: ({kk: round(vv, 3) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in out.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(probe(args.dir)), flush=True)
        return 0
    if not (args.dir / "config.json").is_file():
        build(args.dir, args.blocks)
    proc = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--child"], capture_output=True, text=True)
    lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return 1
    result = dict(json.loads(lines[0]), command=" ".join(["python", *sys.argv]), blocks=args.blocks,
                  files_gb=round(sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / GIB, 3))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
