"""Run by tests/test_multi_gpu.py under `torchrun --nproc-per-node 2` (gloo, CPU): the ranks of `--gpus 2` stay in
step when rank 0 is stopped, when rank 1 runs out of memory and when rank 0's caption is stopped; the next job then
runs on both. Rank 0 writes what each job gave to the JSON file argv[2] (layers of the last job to argv[3])."""

import json
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import app  # noqa: E402
from studio.errors import OutOfMemoryError, RunStopped
from studio.parallel import enable_multi_gpu, init_distributed, serve_rank, stop_ranks

OOM_SEED = 13  # the job in which rank 1's half runs out of memory


def main(models_dir: str, out_json: str, out_npz: str) -> None:
    state = init_distributed()
    pipe = app.load_pipeline(app.Settings(demo=True, models_dir=Path(models_dir), offload="off", first_block_cache=False))
    pipe.cfg_hook, _ = enable_multi_gpu(pipe.pipe, state)
    pipe.parallel = state
    if state.rank != 0:
        serve_job = app.infer

        def infer(pipe, **job):  # rank 1: the block's first call of the OOM job raises CUDA's out-of-memory error
            def out_of_memory(*_):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated on rank 1)")

            hook = pipe.pipe.transformer.transformer_blocks[0].register_forward_pre_hook(out_of_memory) \
                if job["seed"] == OOM_SEED else None
            try:
                return serve_job(pipe, **job)
            finally:
                if hook is not None:
                    hook.remove()

        serve_rank(pipe, infer)
        stop_ranks(state)
        return
    image = Image.new("RGBA", (90, 60), (250, 120, 0, 255))
    job = dict(prompt="", layers=2, num_inference_steps=2, true_cfg_scale=4.0, seed=3, randomize_seed=False)
    results = {}

    def attempt(name, stop=None, **changes):
        try:
            app.infer(pipe, image, stop=stop, **dict(job, **changes))
            results[name] = "finished"
        except (RunStopped, OutOfMemoryError) as err:
            results[name] = f"{type(err).__name__}: {err}"

    # 1. Stop pressed during the first step (the transformer's first call sets it): both ranks leave after it.
    stop = threading.Event()
    hook = pipe.pipe.transformer.register_forward_pre_hook(lambda *_: stop.set())
    attempt("stop_in_steps", stop=stop)
    hook.remove()
    # 2. Rank 1 runs out of memory in its half: rank 0 gets the error too, and nobody waits for the other.
    attempt("rank1_out_of_memory", seed=OOM_SEED)
    # 3. Stop pressed during rank 0's caption (its second token).
    stop, calls = threading.Event(), []

    def count_and_stop(*_):  # a pre-hook returns None (else it replaces the arguments)
        calls.append(1)
        if len(calls) == 2:
            stop.set()

    # The first language layer runs once per caption token (the prefill, then each decode step of the caption decoder,
    # which never calls the text encoder's own forward).
    hook = pipe.pipe.text_encoder.model.language_model.layers[0].register_forward_pre_hook(count_and_stop)
    attempt("stop_in_caption", stop=stop)
    hook.remove()
    results["caption_forwards_before_stop"] = len(calls)
    # 4. The next job runs on both ranks.
    result = app.infer(pipe, image, **job)
    results["last_caption"] = result.caption
    np.savez(out_npz, *[np.asarray(layer) for layer in result.layers])
    Path(out_json).write_text(json.dumps(results))
    stop_ranks(state)


if __name__ == "__main__":
    main(*sys.argv[1:4])
