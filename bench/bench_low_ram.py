"""Machines with 32 GB of host RAM (issue 12) through the app's real path: weights read from the files on demand.

For the rows whose RAM is below the weights (~54 GB):
    1. full-size Qwen-Image-Layered models with random weights (speed and memory depend on shapes, not values;
       quality is never measured: ../shared/PERF_METHOD.md), bench_exact.py's (`build_pipeline`), built on the GPU by
       a child process and written with `save_pretrained` to --pipe (~54 GB; outside $OUT);
    2. per row, after `sync` and `echo 3 > /proc/sys/vm/drop_caches` (every weight starts on disk), a child process
       inside a cgroup v2 with memory.max = the row's RAM (page cache counts: an honest small machine), holding
       --os-gb of touched ballast for what a desktop uses besides the app. It caps the allocator at the card's size
       (`set_per_process_memory_fraction`), calls `app.load_pipeline` with `auto` and `Settings(vram_budget_gb=...)`
       (the app measures the cgroup's RAM itself: `available_ram_gb`), then `app.infer` on a 640 px / 4-layer job,
       empty prompt (a 512-token caption), at --steps steps; 50-step figures are extrapolated from the per-step time.
Reported per row: whole_image_s, caption_s, denoise_s, peak_vram_gb, peak_ram_gb (the cgroup's memory.peak: page cache
included), disk_read_gb (the child's /proc/self/io read_bytes) split by phase, bytes copied to the GPU, and a
PROJECTION for a desktop: disk reads at 7 GB/s instead of the rate measured here, host->GPU copies at PCIe 4's
~25 GB/s instead of the H200 host's ~54 GB/s (compute as measured here: a 4090 computes ~3-4x slower).

    PYTHONUNBUFFERED=1 python bench/bench_low_ram.py --pipe /root/pipe --out $OUT/low_ram.json --rows 24x32,16x32 --steps 2
    # the opt-in LOSSY weights (issue 12): the same rows through `--quantization fp8_storage`, keyed apart in machines.json
    PYTHONUNBUFFERED=1 python bench/bench_low_ram.py --pipe /root/pipe --out $OUT/lossy.json --quantization fp8_storage
    python bench/bench_low_ram.py --tiny --pipe /tmp/low_ram_pipe --out /tmp/low_ram_tiny.json   # CPU, the script only
    python bench/bench_low_ram.py --merge low_ram.json --into bench/results/machines.json        # rows into the table
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# Desktop figures for the projection (not measured here): a PCIe 4 x16 card's copies and a fast NVMe's reads.
DESKTOP_PCIE_GB_S, DESKTOP_DISK_GB_S, HOST_PCIE_GB_S = 25.0, 7.0, 54.0


def row_key(quantization: str | None) -> dict:
    """What tells a row's weight format apart in machines.json: bf16 rows carry quantization None, lossy: false."""
    return dict(quantization=quantization, lossy=quantization is not None)


def rss_anon_gb() -> float:
    """This process's anonymous memory (what a cgroup cannot reclaim; page cache excluded), GiB."""
    with open("/proc/self/status") as f:
        return int(dict(line.split(":", 1) for line in f.read().splitlines())["RssAnon"].split()[0]) / 2**20


def read_bytes() -> int:
    """Bytes this process made the block layer read (page-cache misses, mmap faults included)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])


def drop_page_cache(pipe_dir: Path | None = None) -> str:
    """Every cached page of the machine out (root), else at least the pipeline's files' (posix_fadvise DONTNEED)."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError as err:
        for file in (f for f in (pipe_dir.rglob("*") if pipe_dir else ()) if f.is_file()):
            with open(file, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f"drop_caches refused ({type(err).__name__}); the pipeline's files evicted with posix_fadvise"


def disk_rate_gb_s(pipe_dir: Path, gb: float = 3.0) -> float | None:
    """Sequential read rate of the disk the weights are on (after a cache drop), 16 MB reads of one shard."""
    files = sorted((pipe_dir / "transformer").glob("*.safetensors"), key=lambda f: -f.stat().st_size)
    if not files:
        return None
    drop_page_cache(pipe_dir)
    start, done = time.perf_counter(), 0
    with open(files[0], "rb", buffering=0) as f:
        while done < gb * GIB and (chunk := f.read(16 << 20)):
            done += len(chunk)
    return round(done / GIB / (time.perf_counter() - start), 2)


# ----------------------------------------------------------------------------------------------------
# A card emulated, the app's pipeline loaded (the rows and the probes: probe_stream_order.py, probe_caption_split.py)
# ----------------------------------------------------------------------------------------------------
def emulate_card(vram_gb: float) -> tuple[float, float]:
    """The allocator capped at the card's size less 0.5 GB; returns (cap, the budget `auto` is told: less 1 GB), as
    bench_exact.py's rows: 24 -> cap 23.5, budget 23. Without CUDA nothing is capped."""
    import torch

    cap_gb, budget_gb = vram_gb - 0.5, vram_gb - 1.0
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(cap_gb * GIB / torch.cuda.get_device_properties(0).total_memory)
    return cap_gb, budget_gb


def load_as_app(pipe_dir: Path, budget_gb: float, quantization: str | None):
    """`app.load_pipeline` with `auto` told the card's budget (`budget` on the CPU), the RAM measured by the app itself,
    no FirstBlockCache and no warm-up at load (for a row it would be a second image's disk reads inside load_s)."""
    import app
    import torch

    cuda = torch.cuda.is_available()
    return app.load_pipeline(app.Settings(model=str(pipe_dir), offload="auto" if cuda else "budget",
                                          vram_budget_gb=budget_gb if cuda else None, first_block_cache=False,
                                          warm_up=False, quantization=quantization))


def use_word_level_tokenizer(pipe) -> None:
    """The word-level tokenizer and processor over the real ids (PERF_METHOD.md, bench_exact.word_level_processor)
    in place of the saved demo ones, so the 512-token caption conditions the transformer with its real length."""
    import bench_exact

    pipe.tokenizer, pipe.processor = bench_exact.word_level_processor()
    pipe.vl_processor = pipe.processor  # the caption's processor: the pipeline keeps its own reference
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix).input_ids)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StageClock:
    """Wall time of the caption and of the denoising loop, from hooks on the models (one sync per call)."""

    def __init__(self, pipe):
        self.pipe, self.caption_s, self.caption_words, self.first, self.last, self.calls = pipe, 0.0, 0, None, None, 0
        caption = pipe.get_image_caption

        def timed_caption(*args, **kwargs):
            sync()
            start = time.perf_counter()
            # cuDNN attention builds a plan per new sequence length: every decode step is one, so a caption of new
            # lengths costs ~3.5x (bench/RESULTS.md). Off for the caption in every row alike.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                out = caption(*args, **kwargs)
            sync()
            self.caption_s += time.perf_counter() - start
            self.caption_words = len(out.split())
            return out

        pipe.get_image_caption = timed_caption
        self.handles = [pipe.transformer.register_forward_pre_hook(self._pre),
                        pipe.transformer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.first is None:
            sync()
            self.first = time.perf_counter()

    def _post(self, module, args, output):
        sync()
        self.last = time.perf_counter()
        self.calls += 1

    def denoise_s(self) -> float:
        return (self.last - self.first) if self.first is not None else 0.0

    def close(self):
        del self.pipe.get_image_caption
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------
# Child 1: build and save the pipeline
# ----------------------------------------------------------------------------------------------------
def build(pipe_dir: Path, tiny: bool) -> None:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]
    import app  # noqa: I001  (first: it sets PYTORCH_CUDA_ALLOC_CONF before torch loads)

    if tiny:
        app.build_demo_pipeline(pipe_dir)
        return
    import bench_exact
    from diffusers import QwenImageLayeredPipeline

    from studio.demo_model import LAYERED_DEMO_CORPUS, build_demo_components, save_demo_pipeline

    built = bench_exact.build_pipeline(tiny=False)  # random, full size; the caption always runs to its 512 tokens
    # Saved with the demo's tokenizer and processor (they round-trip through from_pretrained); each row puts the
    # word-level ones in after loading (`use_word_level_tokenizer`).
    components = build_demo_components(LAYERED_DEMO_CORPUS)
    pipe = QwenImageLayeredPipeline(vae=built.vae, transformer=built.transformer, text_encoder=built.text_encoder,
                                    tokenizer=components["tokenizer"], processor=components["processor"],
                                    scheduler=built.scheduler)
    save_demo_pipeline(pipe, pipe_dir, "Full-size random Qwen-Image-Layered weights (bench/bench_low_ram.py)")
    (pipe_dir / "DEMO_MODEL.txt").unlink()  # not the demo: the app must treat it as the real model


# ----------------------------------------------------------------------------------------------------
# Child 2: one machine row, inside its cgroup
# ----------------------------------------------------------------------------------------------------
def run_row(args) -> dict:
    ballast = bytearray(b"\1") * int(args.os_gb * GIB)  # touched: what a desktop holds besides the app
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]
    import app  # noqa: I001
    import torch
    from diffusers.hooks.group_offloading import ModuleGroup
    from PIL import Image

    from studio.engine import memory

    vram_gb, ram_gb = (float(x) for x in args.row.split("x"))
    cuda = torch.cuda.is_available()
    cap_gb, budget_gb = emulate_card(vram_gb)
    row = dict(vram_gb=vram_gb, ram_gb=ram_gb, **row_key(args.quantization), cap_gb=cap_gb, vram_budget_gb=budget_gb,
               os_ballast_gb=args.os_gb,
               card=torch.cuda.get_device_name(0) if cuda else "cpu",
               versions=dict(torch=torch.__version__, diffusers=app.package_version("diffusers"),
                             transformers=app.package_version("transformers"),
                             safetensors=app.package_version("safetensors")),
               ok=False, available_ram_gb_seen=round(memory.available_ram_gb(), 2))
    marks = {"start": read_bytes()}
    group = Path("/sys/fs/cgroup") / args.cgroup if args.cgroup else None
    sampled = {"peak": 0}

    def sample():  # the cgroup's memory.current (page cache included), where the kernel has no memory.peak
        while group is not None:
            sampled["peak"] = max(sampled["peak"], int((group / "memory.current").read_text()))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    try:
        # 1. Load as the app does (`auto`, the RAM it measures itself), then the word-level tokenizer (PERF_METHOD.md).
        start = time.perf_counter()
        loaded = load_as_app(args.pipe, budget_gb, args.quantization)
        pipe = loaded.pipe
        row.update(load_s=round(time.perf_counter() - start, 2), mode=loaded.offload.name,
                   applied=loaded.optimizations, lossy=loaded.lossy, rss_anon_loaded_gb=round(rss_anon_gb(), 2))
        marks["loaded"] = read_bytes()
        if not args.tiny:
            use_word_level_tokenizer(pipe)

        # 2. Where the time goes: stage entries (whole models to the GPU) and streamed groups, bytes and seconds.
        copies = dict(stage_s=0.0, stage_gb=0.0, streamed_gb=0.0)
        stages = loaded.stages
        if stages is not None:
            enter = stages.enter

            def timed_enter(*a, **k):
                sync()
                t, before = time.perf_counter(), stages.stage_bytes
                enter(*a, **k)
                sync()
                copies["stage_s"] += time.perf_counter() - t
                copies["stage_gb"] += (stages.stage_bytes - before) / GIB

            stages.enter = timed_enter
        onload = ModuleGroup.onload_

        def counted_onload(group):
            copies["streamed_gb"] += sum(t.numel() * t.element_size() for t in group.cpu_param_dict.values()) / GIB
            return onload(group)

        ModuleGroup.onload_ = counted_onload
        clock = StageClock(pipe)
        caption = pipe.get_image_caption  # StageClock's timing wrapper: mark the disk reads after it too

        def caption_marked(*a, **k):
            out = caption(*a, **k)
            marks["caption"] = read_bytes()
            copies["caption_streamed_gb"] = copies["streamed_gb"]  # the split text encoder's layers, per token
            return out

        pipe.get_image_caption = caption_marked
        pre = clock._pre
        clock._pre = lambda module, a: (marks.setdefault("denoise_start", read_bytes()), pre(module, a))[1]
        post = clock._post
        clock._post = lambda module, a, o: (marks.__setitem__("denoise_end", read_bytes()), post(module, a, o))[1]
        for handle in clock.handles:
            handle.remove()
        clock.handles = [pipe.transformer.register_forward_pre_hook(clock._pre),
                         pipe.transformer.register_forward_hook(clock._post)]

        # 3. One image: 640 px, 4 layers, empty prompt, --steps steps.
        image = Image.open(ROOT / "assets" / "test_images" / sorted(os.listdir(ROOT / "assets" / "test_images"))[0])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        marks["infer"] = read_bytes()
        result = app.infer(loaded, image, prompt="", layers=4, resolution=640, num_inference_steps=args.steps,
                           true_cfg_scale=4.0, seed=1)
        marks["end"] = read_bytes()
        pipe.get_image_caption = caption
        clock.close()
        denoise, scale = clock.denoise_s(), 50 / args.steps
        gb = {k: (marks[b] - marks[a]) / GIB for k, (a, b) in dict(
            load=("start", "loaded"), caption=("infer", "caption"), denoise=("denoise_start", "denoise_end"),
            image=("infer", "end")).items() if a in marks and b in marks}
        other_gb = gb["image"] - gb.get("caption", 0.0) - gb.get("denoise", 0.0)
        whole = result.duration_s - denoise + denoise * scale
        disk_gb = gb["image"] - gb.get("denoise", 0.0) + gb.get("denoise", 0.0) * scale
        caption_streamed_gb = copies.get("caption_streamed_gb", 0.0)  # the caption's: not scaled with the steps
        streamed_denoise_gb = copies["streamed_gb"] - caption_streamed_gb  # measured at --steps
        row.update(
            ok=True, steps_run=args.steps, whole_image_measured_s=round(result.duration_s, 2),
            caption_s=round(clock.caption_s, 2), caption_words=clock.caption_words,
            denoise_measured_s=round(denoise, 2), transformer_calls=clock.calls, per_step_s=round(denoise / args.steps, 3),
            denoise_s=round(denoise * scale, 1), whole_image_s=round(whole, 1), whole_image_is_extrapolated=args.steps != 50,
            peak_vram_gb=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
            peak_reserved_gb=round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
            # Allocator retries since the process started (each a cache flush and a device sync): a plan too close to
            # the cap would show here.
            alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries") if cuda else None,
            disk_read_load_gb=round(gb["load"], 2), disk_read_measured_gb=round(gb["image"], 2),
            disk_read_caption_gb=round(gb.get("caption", 0.0), 2), disk_read_denoise_measured_gb=round(gb.get("denoise", 0.0), 2),
            disk_read_other_gb=round(other_gb, 2), disk_read_gb=round(disk_gb, 1),
            stage_copies_s=round(copies["stage_s"], 2), stage_copies_gb=round(copies["stage_gb"], 2),
            streamed_copies_measured_gb=round(copies["streamed_gb"], 1), streamed_caption_gb=round(caption_streamed_gb, 1))
        if args.disk_gb_s:  # PROJECTION (not measured): the same parts on a desktop's disk and PCIe 4
            rate = args.disk_gb_s
            copied_gb = copies["stage_gb"] + caption_streamed_gb + streamed_denoise_gb * scale
            row["projection_desktop"] = dict(
                assumes=f"disk {DESKTOP_DISK_GB_S:g} GB/s instead of the {rate:g} GB/s measured here, host->GPU "
                        f"{DESKTOP_PCIE_GB_S:g} GB/s instead of ~{HOST_PCIE_GB_S:g}; compute as on this H200",
                whole_image_s=round(whole - disk_gb / rate + disk_gb / DESKTOP_DISK_GB_S
                                    + copied_gb * (1 / DESKTOP_PCIE_GB_S - 1 / HOST_PCIE_GB_S), 1),
                disk_s=round(disk_gb / DESKTOP_DISK_GB_S, 1), is_projection=True)
    except Exception as err:  # noqa: BLE001  (a row that fails is data: recorded)
        row["error"] = f"{type(err).__name__}: {err}"[:3000]
    finally:
        peak = group / "memory.peak" if group else None
        if peak is not None and peak.is_file():
            row["peak_ram_gb"] = round(int(peak.read_text()) / GIB, 2)
        elif group is not None:
            row["peak_ram_gb"] = round(sampled["peak"] / GIB, 2)
        row["peak_ram_is"] = "the cgroup's memory.peak: anonymous + page-locked + page cache (the ballast included)"
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines())
        row["peak_rss_gb"] = round(int(status["VmHWM"].split()[0]) / 2**20, 2)
        row["rss_anon_end_gb"] = round(int(status["RssAnon"].split()[0]) / 2**20, 2)
        del ballast
    return row


# ----------------------------------------------------------------------------------------------------
# Parent: build, then one child per row in its cgroup
# ----------------------------------------------------------------------------------------------------
def cgroup_for(ram_gb: float, name: str) -> tuple[str | None, str]:
    group = Path("/sys/fs/cgroup") / name
    try:
        group.mkdir(exist_ok=True)
        if not (group / "cgroup.controllers").is_file():  # a plain folder: /sys/fs/cgroup is no cgroup v2 here
            group.rmdir()
            return None, "not limited (/sys/fs/cgroup is not a cgroup v2 hierarchy)"
        (group / "memory.max").write_text(f"{int(ram_gb * GIB)}\n")
        (group / "memory.swap.max").write_text("0\n") if (group / "memory.swap.max").exists() else None
        return name, f"cgroup v2 memory.max {ram_gb:g} GiB (/sys/fs/cgroup/{name})"
    except OSError as err:
        return None, f"not limited ({type(err).__name__}: {err})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipe", type=Path, help="the saved pipeline's folder (built there when missing)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rows", default="24x32,16x32", help="VRAMxRAM in GB, comma separated")
    parser.add_argument("--steps", type=int, default=2, help="steps of the 640 job (per-step time extrapolated to 50)")
    parser.add_argument("--os-gb", type=float, default=2.0, help="RAM a desktop uses besides the app (ballast)")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no row after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="the demo pipeline on the CPU: checks the script only")
    parser.add_argument("--quantization", choices=["fp8_storage"], default=None,
                        help="the opt-in LOSSY weights, as the app's --quantization (rows keyed quantization/lossy)")
    parser.add_argument("--merge", type=Path, help="merge this output's rows into --into (machines.json)")
    parser.add_argument("--into", type=Path)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # child: run this row
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # child: build the pipeline
    parser.add_argument("--cgroup", help=argparse.SUPPRESS)
    parser.add_argument("--disk-gb-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.merge:
        return merge(args.merge, args.into)
    if args.build:
        build(args.pipe, args.tiny)
        return 0
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return 0

    start = time.perf_counter()
    results = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                   **row_key(args.quantization),
                   weights="random, full size (bench_exact.build_pipeline), save_pretrained to disk" if not args.tiny
                   else "the tiny demo pipeline", rows=[])

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    me = [sys.executable, str(Path(__file__).resolve())]
    if not (args.pipe / "model_index.json").is_file():
        t = time.perf_counter()
        subprocess.run([*me, "--build", "--pipe", str(args.pipe), *(["--tiny"] if args.tiny else [])], check=True)
        results["save_pretrained_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    results["sync_s"] = round((subprocess.run(["sync"], check=False), time.perf_counter() - t)[1], 1)
    results["pipe_gb"] = round(sum(f.stat().st_size for f in args.pipe.rglob("*") if f.is_file()) / GIB, 2)
    results["disk_read_gb_s"] = disk_rate_gb_s(args.pipe)
    save()
    print(json.dumps(results), flush=True)
    for spec in args.rows.split(","):
        if time.perf_counter() - start > args.deadline_s:
            results["rows"].append(dict(row=spec, **row_key(args.quantization),
                                        skipped=f"past --deadline-s {args.deadline_s:g}"))
            save()
            break
        ram_gb = float(spec.split("x")[1])
        name, limit = cgroup_for(ram_gb, f"qil_low_ram_{spec}_{os.getpid()}")
        cache = drop_page_cache(args.pipe)

        def join_cgroup(name=name):
            if name:
                (Path("/sys/fs/cgroup") / name / "cgroup.procs").write_text(f"{os.getpid()}\n")

        child = [*me, "--row", spec, "--pipe", str(args.pipe), "--steps", str(args.steps), "--os-gb", str(args.os_gb),
                 *(["--quantization", args.quantization] if args.quantization else []),
                 *(["--cgroup", name] if name else []), *(["--tiny"] if args.tiny else []),
                 *(["--disk-gb-s", str(results["disk_read_gb_s"])] if results["disk_read_gb_s"] else [])]
        t = time.perf_counter()
        proc = subprocess.run(child, preexec_fn=join_cgroup, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-6000:])
        rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        row = rows[0] if rows else dict(vram_gb=float(spec.split("x")[0]), ram_gb=ram_gb, **row_key(args.quantization),
                                        ok=False,
                                        error=f"the row's process ended with code {proc.returncode} (137: killed, "
                                              f"e.g. by the cgroup's memory.max)", stderr_tail=proc.stderr[-1500:])
        row.update(ram_limit=limit, page_cache=cache, process_s=round(time.perf_counter() - t, 1))
        if name:
            (Path("/sys/fs/cgroup") / name).rmdir()  # empty: its one process has ended
        results["rows"].append(row)
        save()
        print(json.dumps(row), flush=True)
    return 0


def merge(source: Path, into: Path) -> int:
    """Put `source`'s rows into machines.json (rows of the same VRAM, RAM and weight format replaced, the others
    kept; a lossy row never replaces a bf16 one)."""
    new, table = json.loads(source.read_text()), json.loads(into.read_text())

    def key(r: dict) -> tuple:
        return r["vram_gb"], r["ram_gb"], r.get("quantization")

    keys = {key(r) for r in new["rows"] if "vram_gb" in r}
    reference = table.get("reference_whole_image_s")
    for row in new["rows"]:
        if reference and row.get("ok"):
            row["vs_reference"] = round(row["whole_image_s"] / reference, 3)
        row["source"] = dict(command=new["command"], card=new.get("card"), weights=new["weights"],
                             disk_read_gb_s=new.get("disk_read_gb_s"), save_pretrained_s=new.get("save_pretrained_s"))
    table["rows"] = [r for r in table["rows"] if key(r) not in keys] + new["rows"]
    table.setdefault("commands", [table["command"]])
    if new["command"] not in table["commands"]:
        table["commands"].append(new["command"])
    into.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
