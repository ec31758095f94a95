"""A library over Ray (issue 14): a batch of images with `decompose_ray` on 2 GPUs vs the local batch on 1 GPU.

The app's own path end to end, on the full-size models with random weights (speed depends on shapes, not values;
quality is never measured: ../shared/PERF_METHOD.md). Two child processes, one after the other:
    (a) local  on GPU 0: `app.load_pipeline` + `studio.batch.decompose_batch` with `app.infer` (what `python
               src/app.py decompose DIR` runs), called one image at a time so the deadline can stop it between images;
    (b) ray    with both GPUs: `studio.batch.decompose_ray` with `app.start_pipeline` / `app.infer` and 2 workers on a
               local Ray instance that it starts (what `decompose DIR --ray --ray-workers 2` runs), over the images (a)
               finished.
Then the run folders of (a) and (b) are compared: the same files, the same pixels in every PNG (layers, composite),
params.json equal except its timing entries (`created`, `duration_s`); the ZIP/PPTX/PSD bytes are compared too.
Job: 640 px, 4 layers, true CFG 4, a prompt (so no caption: one GPU or two, a caption costs the same per image),
FirstBlockCache off and no warm-up in both (plain steps, so the per-step time extrapolates; each process's first
image pays CUDA's one-time work), --steps steps (default 2: the device time). 50-step figures are EXTRAPOLATIONS:
+ (50 - steps) x the per-step median measured in (a) (the transformer's calls timed with CUDA events) per image,
and per worker in (b) (each of the 2 workers runs half the images).

    # GPU machine, 2 GPUs; the pipeline is built at --pipe when missing (~110 s, bench_low_ram.py's build):
    PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 python3 bench/bench_ray_batch.py --pipe /root/pipe --out $OUT/ray_batch.json
    python bench/bench_ray_batch.py --tiny --out /tmp/ray_batch_tiny.json   # CPU: the demo pipeline, 2 CPU workers
    python bench/bench_ray_batch.py --merge ray_batch.json --into bench/results/multi_gpu.json
Ray there: bench/slim_ray.sh (the Ray wheel alone is over the 64 MiB the GPU machine's command may carry).
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("local", "ray")
TIMING_KEYS = ("created", "duration_s", "design_seconds")  # params.json entries that differ between two runs of one job
RAY_START_S = 30.0  # the Ray phase's own costs besides imports, loads and images: instance, workers, shutdown (a guess)


def job(args) -> dict:
    return dict(prompt="a poster with a title, a photo and a logo", negative_prompt=" ", true_cfg_scale=4.0,
                num_inference_steps=args.steps, layers=args.layers, resolution=640, seed=7, randomize_seed=False)


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    """`count` different test images (random pixels, a disc of alpha), written once as PNG."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(np.hypot(*np.mgrid[:size, :size] - size / 2) < size * (0.3 + 0.01 * i), 255, 0)
        paths.append(folder / f"image_{i:02d}.png")
        if not paths[-1].is_file():
            Image.fromarray(rgba, "RGBA").save(paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------------------
class CallTimer:
    """Each call of `module` timed: CUDA events on the GPU (no synchronization inside the run), else perf_counter."""

    def __init__(self, module, cuda: bool):
        import torch

        self.cuda, self.marks = cuda, []
        self.event = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else None
        module.register_forward_pre_hook(lambda *_: self.marks.append([self.now(), None]))
        module.register_forward_hook(lambda *_: self.marks[-1].__setitem__(1, self.now()))

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.event()
        event.record()
        return event

    def step_seconds(self, images: int, steps: int) -> list[float]:
        """Seconds of each denoising step (its transformer calls, first start to last end) of `images` x `steps`."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        per_step = max(1, len(self.marks) // max(1, images * steps))  # 2 with true CFG: cond and uncond calls
        groups = [self.marks[i:i + per_step] for i in range(0, len(self.marks) - per_step + 1, per_step)]
        if self.cuda:
            return [group[0][0].elapsed_time(group[-1][1]) / 1000 for group in groups]
        return [group[-1][1] - group[0][0] for group in groups]


def mark_ready(path: str, loaded) -> None:
    """Ray worker_setup: when each worker's pipeline is loaded (wall clock), its process and GPU."""
    with open(path, "a") as f:
        f.write(json.dumps(dict(t=time.time(), pid=os.getpid(), gpu=os.environ.get("CUDA_VISIBLE_DEVICES"))) + "\n")


def child(args) -> None:
    """One phase; its JSON (--child-out) is rewritten after every image, so a phase cut at the deadline still tells."""
    born = time.time()
    sys.path.insert(0, str(ROOT / "src"))
    import app  # noqa: I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads)
    import torch

    from studio.batch import decompose_batch, decompose_ray
    from studio.params import check_params

    cuda = torch.cuda.is_available()
    res = dict(phase=args.child, import_s=round(time.time() - born, 2), ok=False)

    def save():
        args.child_out.write_text(json.dumps(res, indent=1))

    images = [Path(line) for line in args.images_file.read_text().split()]
    settings = app.Settings(model=str(args.pipe), offload="auto", outputs=args.work / args.child,
                            first_block_cache=False, warm_up=False)
    if args.child == "local":
        if not cuda:
            torch.set_num_threads(1)  # as each 1-CPU Ray worker (Ray sets OMP_NUM_THREADS=1): the same floats
        start = time.time()
        loaded = app.load_pipeline(settings)
        res.update(load_s=round(time.time() - start, 2), mode=loaded.offload.name, applied=loaded.optimizations,
                   card=torch.cuda.get_device_name(0) if cuda else "cpu (--tiny)",
                   versions=dict(torch=torch.__version__, diffusers=app.package_version("diffusers"),
                                 transformers=app.package_version("transformers"), python=sys.version.split()[0]))
        run_info = loaded.run_info()
        timer = CallTimer(loaded.pipe.transformer, cuda)
        res.update(per_image_s=[], errors=[])
        batch_start = time.time()
        for k, image in enumerate(images):
            # Start image k+1 only if Ray can then do the same k+1 images before the deadline (its start, two loads
            # at once, half the images each, its shutdown), with this run's mean image time so far.
            mean = statistics.mean(res["per_image_s"]) if res["per_image_s"] else 0.0
            ray_need = RAY_START_S + res["import_s"] + res["load_s"] + math.ceil((k + 1) / 2) * mean
            if k and time.time() + mean + ray_need > args.deadline_at:
                res["cut"] = f"deadline: {k} of {len(images)} images (the rest would leave Ray too little time)"
                break
            t = time.time()
            [item] = decompose_batch(loaded, app.infer, [image], settings.outputs, run_info, **job(args))
            res["per_image_s"].append(round(time.time() - t, 3))
            if item.error:
                res["errors"].append(f"{image.name}: {item.error}")
            res.update(batch_s=round(time.time() - batch_start, 2), images_done=len(res["per_image_s"]))
            save()
        res["infer_s"] = [round(json.loads(p.read_text())["duration_s"], 3)  # each image's `infer`, as Ray's
                          for p in sorted(settings.outputs.glob("*/params.json"), key=lambda p: p.stat().st_mtime)]
        steps = check_params(num_inference_steps=args.steps)["num_inference_steps"]
        step_s = timer.step_seconds(len(res["per_image_s"]), steps)
        res.update(step_median_s=round(statistics.median(step_s), 4) if step_s else None, steps_timed=len(step_s),
                   transformer_calls=len(timer.marks),
                   peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    else:
        import functools

        ready = args.work / "ray_ready.jsonl"
        ready.unlink(missing_ok=True)
        res["call_start"] = start = time.time()
        save()  # the call's start: a cut run's progress is read from the run folders (`ray_progress`)
        items, skipped = decompose_ray(images, settings, app.start_pipeline, app.infer, workers=2,
                                       worker_setup=functools.partial(mark_ready, str(ready)), **job(args))
        end = time.time()
        res.update(decompose_ray_s=round(end - start, 2), skipped=len(skipped),
                   errors=[f"{item.image.name}: {item.error}" for item in items if item.error],
                   **ray_progress(settings.outputs, ready, start, end))
    res["ok"] = True
    save()


def ray_progress(outputs: Path, ready: Path, start: float, end: float | None = None) -> dict:
    """What the Ray phase did, from its files: the workers' ready times, each complete run folder's time (its
    params.json written) and `infer` seconds, from the call's start `start` (wall clock)."""
    workers = [json.loads(line) for line in ready.read_text().splitlines()] if ready.is_file() else []
    folders = [p for p in outputs.glob("*/params.json") if p.parent.name != ".incomplete"]
    done = [json.loads(p.read_text()) | {"mtime": p.stat().st_mtime} for p in folders]
    res = dict(workers=[dict(w, ready_s=round(w["t"] - start, 2)) for w in workers], images_done=len(done),
               infer_s=[round(p["duration_s"], 3) for p in sorted(done, key=lambda p: p["mtime"])],
               done_at_s=sorted(round(p["mtime"] - start, 2) for p in done))
    end = end or (max(p["mtime"] for p in done) if done else None)
    if workers and end:
        res["batch_after_first_ready_s"] = round(end - min(w["t"] for w in workers), 2)
        res["batch_after_last_ready_s"] = round(end - max(w["t"] for w in workers), 2)
    return res


# ----------------------------------------------------------------------------------------------------
# Parent: the pipeline, the images, the two phases, the comparison
# ----------------------------------------------------------------------------------------------------
def run_phase(phase: str, args, pipe_dir: Path, images_file: Path, deadline_at: float, log) -> dict:
    """One child in its own process group (killed with everything it started, Ray's processes included, at the
    deadline); returns its JSON, partial if it was cut, with the process's wall time."""
    out = args.work / f"{phase}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    if phase == "local" and not args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--child-out", str(out), "--pipe",
           str(pipe_dir), "--work", str(args.work), "--images-file", str(images_file), "--steps", str(args.steps),
           "--layers", str(args.layers), "--deadline-at", str(deadline_at)]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, deadline_at - time.time()))
    except subprocess.TimeoutExpired:
        code = "killed at the deadline"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        proc.wait()
    res = json.loads(out.read_text()) if out.is_file() else dict(phase=phase, ok=False)
    res.update(wall_s=round(time.time() - start, 2), exit=code)
    return res


def zip_members_differ(a: Path, b: Path) -> list[str]:
    """Entries of two ZIPs (a PPTX is one) whose names or contents differ; params.json compared without timing."""
    za, zb = zipfile.ZipFile(a), zipfile.ZipFile(b)
    if za.namelist() != zb.namelist():
        return ["(entry names)"]
    differ = []
    for name in za.namelist():
        x, y = za.read(name), zb.read(name)
        if name.endswith("params.json"):
            x, y = ({k: v for k, v in json.loads(d).items() if k not in TIMING_KEYS} for d in (x, y))
        if x != y:
            differ.append(name)
    return differ


def compare(local: Path, ray: Path) -> dict:
    """The run folders of both phases, matched by their params.json's input_file."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "src"))
    from studio.runs import completed_images

    a, b = completed_images(local), completed_images(ray)
    res = dict(images_local=len(a), images_ray=len(b), missing_in_ray=sorted(Path(k).name for k in set(a) - set(b)),
               max_abs_diff=0, pixels_differing=0, file_sets_differ=[], params_differ={}, exports_bytes_differ=[],
               exports_content_differ=[])
    for key in sorted(set(a) & set(b)):
        fa, fb = a[key], b[key]
        names = sorted(p.name for p in fa.iterdir())
        if names != sorted(p.name for p in fb.iterdir()):
            res["file_sets_differ"].append(Path(key).name)
            continue
        for name in names:
            if name.endswith(".png"):
                x, y = (np.asarray(Image.open(f / name).convert("RGBA"), dtype=np.int16) for f in (fa, fb))
                res["max_abs_diff"] = max(res["max_abs_diff"], int(np.abs(x - y).max()))
                res["pixels_differing"] += int((x != y).any(axis=-1).sum())
            elif name == "params.json":
                pa, pb = (json.loads((f / name).read_text()) for f in (fa, fb))
                differ = sorted(k for k in set(pa) | set(pb) if k not in TIMING_KEYS and pa.get(k) != pb.get(k))
                if differ:
                    res["params_differ"][Path(key).name] = differ
            elif (fa / name).read_bytes() != (fb / name).read_bytes():
                res["exports_bytes_differ"].append(f"{Path(key).name}/{name}")
                if zipfile.is_zipfile(fa / name):  # ZIP, PPTX: each entry's time differs; their contents must not
                    res["exports_content_differ"] += [f"{Path(key).name}/{name}/{member}"
                                                      for member in zip_members_differ(fa / name, fb / name)]
    res["compared"] = len(set(a) & set(b))
    res["identical_compared"] = (res["compared"] > 0 and not res["file_sets_differ"] and not res["params_differ"]
                                 and not res["exports_content_differ"] and res["max_abs_diff"] == 0)
    res["identical"] = res["identical_compared"] and not res["missing_in_ray"] and len(a) == len(b)
    res["identical_means"] = ("the same images, the same file names in each run folder, every PNG's pixels equal, "
                              f"params.json equal except {', '.join(TIMING_KEYS)}, the ZIP's and PPTX's entries equal "
                              "(their params.json likewise) apart from each entry's time stamp")
    return res


def figures(results: dict, steps: int) -> dict:
    """The issue's keys, and the 50-step extrapolations (marked). Both phases whole: each child's wall time, from its
    start to its exit (imports, load, batch; Ray: its instance, the workers and their loads, shutdown). A Ray phase cut
    at the deadline after k images: both up to their k-th image (from the child's start)."""
    local, ray = results.get("local", {}), results.get("ray", {})
    n = ray.get("images_done")
    if not local.get("images_done") or not n or not ray.get("done_at_s"):
        return {}
    whole = ray.get("ok") and n == local["images_done"] and ray.get("exit") == 0 and local.get("exit") == 0
    out = dict(ray_batch_images=n,
               ray_batch_1gpu_s=local["wall_s"] if whole else
               round(local["import_s"] + local["load_s"] + sum(local["per_image_s"][:n]), 2),
               ray_batch_2gpu_s=ray["wall_s"] if whole else round(ray["import_s"] + ray["done_at_s"][n - 1], 2),
               ray_batch_1gpu_no_load_s=round(sum(local["per_image_s"][:n]), 2),
               ray_batch_2gpu_no_load_s=ray.get("batch_after_first_ready_s"))
    out["ray_batch_method"] = (f"each phase's process wall time, {n} images" if whole else
                               f"the Ray phase was cut after {n} of {local['images_done']} images: both up to their "
                               f"image {n}, from the process's start")
    out["ray_batch_2gpu_vs_1gpu"] = round(out["ray_batch_2gpu_s"] / out["ray_batch_1gpu_s"], 3)
    if out["ray_batch_2gpu_no_load_s"]:
        out["ray_batch_2gpu_vs_1gpu_no_load"] = round(out["ray_batch_2gpu_no_load_s"] / out["ray_batch_1gpu_no_load_s"], 3)
    step = local.get("step_median_s")
    if step:
        extra = (50 - steps) * step  # seconds more per image at 50 steps
        ext = dict(ray_batch_1gpu_s=round(out["ray_batch_1gpu_s"] + n * extra, 1),
                   ray_batch_2gpu_s=round(out["ray_batch_2gpu_s"] + math.ceil(n / 2) * extra, 1),
                   ray_batch_1gpu_no_load_s=round(out["ray_batch_1gpu_no_load_s"] + n * extra, 1))
        if out["ray_batch_2gpu_no_load_s"]:
            ext["ray_batch_2gpu_no_load_s"] = round(out["ray_batch_2gpu_no_load_s"] + math.ceil(n / 2) * extra, 1)
        ext["ray_batch_2gpu_vs_1gpu"] = round(ext["ray_batch_2gpu_s"] / ext["ray_batch_1gpu_s"], 3)
        if "ray_batch_2gpu_no_load_s" in ext:
            ext["ray_batch_2gpu_vs_1gpu_no_load"] = round(ext["ray_batch_2gpu_no_load_s"] / ext["ray_batch_1gpu_no_load_s"], 3)
        ext["note"] = (f"EXTRAPOLATED, not measured: + {50 - steps} x {step} s (the per-step median of the local run) "
                       f"per image, {n} images on 1 GPU, {math.ceil(n / 2)} per worker on 2")
        out["ray_batch_50_steps"] = ext
    return out


def merge(src: Path, into: Path) -> int:
    """The ray_batch_* figures of a run into multi_gpu.json (its other keys stay)."""
    run = json.loads(src.read_text())
    target = json.loads(into.read_text())
    target.pop("ray_note", None)
    target.update({k: v for k, v in run.items() if k.startswith("ray_batch")})
    target["ray_batch"] = {k: run[k] for k in ("command", "card", "versions", "job", "local", "ray", "compare", "build_s")
                           if k in run}
    into.write_text(json.dumps(target, indent=1) + "\n")
    print(f"merged {sum(k.startswith('ray_batch') for k in run)} ray_batch keys of {src} into {into}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipe", type=Path, default=Path("/root/pipe"), help="the saved pipeline (built when missing)")
    parser.add_argument("--out", type=Path, default=Path("ray_batch.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ray_batch"), help="images and both outputs go here")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="steps per image (50-step figures are extrapolated)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--deadline-s", type=float, default=330.0, help="everything ends by then (partial JSON)")
    parser.add_argument("--tiny", action="store_true", help="the demo pipeline on the CPU, Ray with 2 CPU workers")
    parser.add_argument("--merge", type=Path, help="merge this output's ray_batch keys into --into")
    parser.add_argument("--into", type=Path, default=ROOT / "bench" / "results" / "multi_gpu.json")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--images-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.merge:
        return merge(args.merge, args.into)

    start = time.time()
    deadline_at = start + args.deadline_s
    results = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                   units="seconds", weights="the tiny demo pipeline (CPU)" if args.tiny else
                   "random, full size (bench_low_ram.py's build: save_pretrained, loaded with from_pretrained)")

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    # 1. The pipeline (built when missing) and the images.
    args.work.mkdir(parents=True, exist_ok=True)
    pipe_dir = (args.work / "pipe") if args.tiny else args.pipe
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out.with_suffix(".log"), "a")
    save()
    if not (pipe_dir / "model_index.json").is_file():
        t = time.time()
        built = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_low_ram.py"), "--build", "--pipe",
                                str(pipe_dir), *(["--tiny"] if args.tiny else [])], stdout=log, stderr=subprocess.STDOUT)
        results["build_s"] = round(time.time() - t, 1)
        if built.returncode:
            results["error"] = f"the pipeline's build failed (exit {built.returncode}): see the .log"
            save()
            return 1
    for phase in PHASES:
        subprocess.run(["rm", "-rf", str(args.work / phase)], check=True)
    images = make_images(args.work / "images", args.images, 640)
    images_file = args.work / "images.txt"
    images_file.write_text("\n".join(str(p.resolve()) for p in images))
    results.update(job=dict(job(args), images=len(images), image_size="640x640", first_block_cache=False,
                            warm_up=False, offload="auto", ray_workers=2))
    save()

    # 2. The local batch on 1 GPU, then Ray over 2 GPUs on the images the local batch finished.
    results["local"] = run_phase("local", args, pipe_dir, images_file, deadline_at, log)
    results.update(card=results["local"].get("card"), versions=results["local"].get("versions", {}))
    save()
    finished = results["local"].get("images_done") or 0
    if finished and time.time() < deadline_at - 20:
        images_file.write_text("\n".join(str(p.resolve()) for p in images[:finished]))
        results["ray"] = ray = run_phase("ray", args, pipe_dir, images_file, deadline_at, log)
        if not ray.get("ok") and ray.get("call_start"):  # cut: what it finished, from its files
            ray.update(ray_progress(args.work / "ray", args.work / "ray_ready.jsonl", ray["call_start"]), cut=True)
        try:
            import ray

            results["versions"]["ray"] = f"{ray.__version__} ({Path(ray.__file__).parent})"
        except ImportError:
            pass
        save()
        # 3. The two outputs' run folders, and the figures.
        results["compare"] = compare(args.work / "local", args.work / "ray")
        results.update(figures(results, args.steps))
    else:
        results["ray"] = dict(ok=False, skipped="no time left or no local image finished")
    results["total_s"] = round(time.time() - start, 1)
    save()
    summary = {k: results.get(k) for k in ("ray_batch_1gpu_s", "ray_batch_2gpu_s", "ray_batch_1gpu_no_load_s",
                                           "ray_batch_2gpu_no_load_s", "total_s")}
    print(json.dumps(summary), "identical:", results.get("compare", {}).get("identical"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
