"""Probe (issue 13): the caption's compiled decode on the full-size random text encoder, against eager greedy decoding.

One short GPU run before the speed benchmark: `app.compile_caption_decode` (static KV cache + CUDA graphs through
transformers' generate) with transformers 5.17 on Qwen2.5-VL (mrope), seconds per caption and the same text as eager.
    CUDA_VISIBLE_DEVICES=0 python bench/probe_caption_compile.py --out probe.json [--tiny] [--deadline-s 150]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/qil_probe_inductor_cache")  # a cold compile
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402
from bench_speed import app, torch  # noqa: E402


def first_difference(a: str, b: str) -> int | None:
    words = list(zip(a.split(), b.split()))
    return next((i for i, (x, y) in enumerate(words) if x != y), None if len(a.split()) == len(b.split()) else len(words))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--deadline-s", type=float, default=1e9)
    args = parser.parse_args()
    t0 = time.perf_counter()
    result: dict = dict(command=" ".join(["python3"] + sys.argv))

    def save(msg):
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"[{result['wall_s']:6.1f}s] {msg}", flush=True)

    if args.tiny:
        bs.use_tiny()
    import transformers

    result["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)
    app.setup_cuda_optimizations()
    pipe = bs.build_pipeline(args.tiny)
    settings = app.Settings(offload="off", first_block_cache=False, caption_compile=False)
    app.apply_memory_optimizations(pipe, settings, "off")
    image_a, image_b = bs.random_image(640, 640, 1), bs.random_image(960, 640, 2)
    seconds, eager_a = bs.timed(app.caption_image, pipe, image_a, 640)
    result["eager_first_s"] = round(seconds, 2)
    seconds, eager_a2 = bs.timed(app.caption_image, pipe, image_a, 640)
    result.update(eager_repeat_s=round(seconds, 2), eager_tokens=len(eager_a.split()), eager_repeat_same=eager_a == eager_a2)
    save(f"eager {result}")
    options = {} if not args.tiny else dict(backend="eager", mode=None)
    app.compile_caption_decode(pipe.text_encoder, **options)
    runs = []
    for name, image in (("a_compile", image_a), ("a_repeat", image_a), ("b_new_shape", image_b), ("b_repeat", image_b),
                        ("a_again", image_a)):
        try:
            seconds, text = bs.timed(app.caption_image, pipe, image, 640)
        except Exception as err:  # noqa: BLE001 - recorded
            result["error"] = f"{name}: {type(err).__name__}: {err}"[:3000]
            save("error")
            return 1
        runs.append(dict(run=name, seconds=round(seconds, 2), tokens=len(text.split()),
                         same_as_eager=(text == eager_a) if name.startswith("a") else None,
                         first_differing_word=first_difference(text, eager_a) if name.startswith("a") else None))
        if name == "b_new_shape":
            text_b = text
        if name == "b_repeat":
            runs[-1]["same_as_b_new_shape"] = text == text_b
        result["compiled"] = runs
        result["counters"] = dict(stats=dict(bs.compile_cache_counters()), graphs=bs.dynamo_graphs())
        from torch._dynamo.utils import counters
        result["graph_breaks"] = dict(counters["graph_break"])
        save(f"{name} {runs[-1]}")
        if time.perf_counter() - t0 > args.deadline_s:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
