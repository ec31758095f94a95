"""Qwen-Image-Layered studio: split one image into editable RGBA layers on one consumer GPU.

The seed's flow, top to bottom:
    1. flags          the knobs, each with its reason; `LOAD_FLAGS` makes their command-line flags and QIL_* variables
    2. environment    `environment_info`, the GPU and Windows checks, `clear_memory`
    3. loading        `get_model_path`, `resolve_offload_mode`, `apply_memory_optimizations` (offload modes, VAE
                      slicing/tiling, FirstBlockCache), `load_pipeline` -> `Loaded`
    4. infer          `run_pipeline`, the caption, `infer` (one decomposition), `warm_up`, `start_pipeline`
    5. exports        run folders and their files (`studio.runs`, `studio.exports`); `decompose_layer`
    6. UI             `build_ui` (Gradio Blocks, port 7869)
    7. main           `python src/app.py` (UI), `... decompose IMG_OR_DIR...` (headless batch; `--ray`) and
                      `... evaluate GT...` (scores against ground-truth layers)

What the seed never had lives beside this file in `src/studio/`, one module per subsystem (the low-VRAM engine,
quantization, several GPUs, scores and evaluate, the batch and Ray): CLAUDE.md is the map. Importing this module
loads no model and needs no GPU.
"""

# Environment variables that must be set before torch / huggingface_hub / gradio are imported.
import os

# Fewer fragmentation OOMs on a 24 GB card: the allocator grows segments instead of reserving new ones.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# A local tool: no usage reports to Gradio's or the hub's servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Regional compile: Inductor's compiled kernels are cached here, so a second start loads them; its default under /tmp is lost
# at every reboot. The weights' folder, not git.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                              "models", "torch_compile_cache"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from studio.batch import batch_summary, decompose_batch, decompose_ray, find_images, import_ray  # noqa: E402
from studio import caption, compiling  # noqa: E402  (compiling.machine_compile_problem: tests patch it there)
from studio.compiling import (compile_problem, compile_transformer_blocks, fuse_problem, fuse_qkv_projections,  # noqa: E402
                              load_compile_cache, save_compile_cache)
from studio.demo_model import build_demo_pipeline, is_demo_model  # noqa: E402
from studio.design import finish_layers  # noqa: E402
from studio.engine import memory  # noqa: E402  (memory.available_ram_gb: tests patch it there)
from studio.engine.plan import (BUDGET_AUTO_MIN_VRAM_GB, FULL_RESIDENCY_VRAM_GB, GIB, MachinePlan,  # noqa: E402
                                budget_minimum_gb, plan_machine)
from studio.engine.stream import enable_budget_offload, plan_loaded  # noqa: E402
from studio.errors import (STOPPED_MESSAGE, ModelNotAvailableError, OutOfMemoryError, RunStopped,  # noqa: E402
                           TorchWithoutCudaError, exits_with_message, terminal_safe)
from studio.evaluate import evaluate_main, evaluate_parser  # noqa: E402
from studio.exports import EXPORTS  # noqa: E402
from studio.images import IMAGE_SUFFIXES, resize_layers, to_rgba  # noqa: E402
from studio.loaded import Loaded  # noqa: E402
from studio.modes import (FAST_QUANTIZATION, OFFLOAD, OFFLOAD_CHOICES, PRESETS, QUANT, OffloadMode,  # noqa: E402
                          fast_mode_for, quant_mode)
from studio.naming import LayerLabels, name_layers  # noqa: E402
from studio.parallel import (caption_from_rank0, check_gpus, enable_multi_gpu, init_distributed,  # noqa: E402
                             launch_ranks, rank0_says, ranks_on_this_machine, serve_rank, share_job, stop_ranks)
from studio.params import (DEFAULTS, LAYERS_RANGE, MAX_SEED, PARAM, PARAMS, RESOLUTIONS, STEPS_RANGE,  # noqa: E402
                           Flag, add_flags, add_param_args, check_param, check_params, flag_values,
                           non_negative_float, param_widget, positive_int)
from studio.params import DESIGN_PARAMS  # noqa: E402  (issue 26's options: one row of the page)
from studio.progress import TIMINGS_FILE, Job, RunTracker, Shape, Timings, status_html, tap_progress  # noqa: E402
from studio.quant import apply_quantization, fast_sizes, planner_sizes, quant_problem  # noqa: E402
from studio.runs import (DecomposeResult, clean_partial_runs, export_failures_message, prune_outputs,  # noqa: E402
                         save_run, windows_path_warning)
from studio.scores import PSNR_CAP_DB, recomposition_score, score_line  # noqa: E402
from studio.serving import (LAN_HOST, SHUTDOWN_WAIT_S, Sessions, clean_gradio_caches, client_error,  # noqa: E402
                            delete_gradio_files, gradio_cache_schedule, launch_options, network_warning,
                            readable_upload, remove_process_cache, served_file, serving_flags, stop_on_sigterm,
                            use_process_cache)
from studio.stack import (SUB_RUN_LAYERS, LayerStack, check_layer_index, check_stack_files, fit_to_canvas,  # noqa: E402
                          replace_layer, save_sub_run, undo)
from studio.w8a8 import SAGE_BACKEND, sage_attention_problem  # noqa: E402

logger = logging.getLogger("qwen_layered_studio")

# ----------------------------------------------------------------------------------------------------
# 1. Flags (defaults; the command line and QIL_* variables override them through `LOAD_FLAGS`)
# ----------------------------------------------------------------------------------------------------
ROOT_DIR = Path(__file__).resolve().parent.parent
MODEL_ID = "Qwen/Qwen-Image-Layered"  # the hub repo of the real weights (~57 GB in bf16)
MODELS_DIR = ROOT_DIR / "models"  # local weight cache, looked at before the hub; never committed
LOCAL_MODEL_DIR = MODELS_DIR / "Qwen-Image-Layered"  # where `snapshot_download` puts the weights
DEMO_MODEL_DIR = MODELS_DIR / "demo-tiny-random"  # the offline demo pipeline (~1.3 MB), built on first use
OUTPUTS_DIR = ROOT_DIR / "outputs"  # one folder per run, plus Gradio's upload cache
ASSETS_DIR = ROOT_DIR / "assets" / "test_images"  # example images the project made itself
HOST = LAN_HOST  # reachable from the LAN, like the seed; --host 127.0.0.1 keeps it local
PORT = 7869

# Where the weights live (`studio.modes` has a row per mode). "auto" picks per machine in `resolve_offload_mode`:
# everything on the GPU where it fits, else the low-VRAM engine ("budget": a 24 GB card runs the full model near
# resident speed), else "sequential".
CPU_OFFLOAD_MODE = "auto"
# GB of VRAM / host RAM the budget mode may plan for; None: the card's free memory and the RAM available at load.
VRAM_BUDGET_GB = None
RAM_BUDGET_GB = None
# Skip the remaining transformer blocks on a step whose first block changed less than the threshold
# (diffusers' FirstBlockCache). Trades a little fidelity for speed; 0.1 follows the seed.
ENABLE_FIRST_BLOCK_CACHE = True
FIRST_BLOCK_CACHE_THRESHOLD = 0.1
# None keeps the model's bf16. Every other mode (`studio.modes.QUANT_ROWS`) is LOSSY and opt-in.
QUANTIZATION_MODE = None
# "exact": bf16, the model's own output. "fast" (LOSSY, opt-in): the card's 8-bit matmuls (int8 on RTX 30/40, fp8
# from Hopper) in the middle blocks, FirstBlockCache at the seed's 0.1 (`studio.modes.PRESETS`); explicit flags win.
PRESET = "exact"
# The 8-bit modes' blocks: "default" keeps the first and last fifth in bf16 (0-11 and 48-59 of 60), as NVIDIA's
# TensorRT-LLM preset for this model's fp8 path does.
QUANTIZED_BLOCKS = "default"
# Regional torch.compile of the transformer blocks: a faster step after a one-time compile (cached on disk; the first
# start pays it in the warm-up: bench/RESULTS.md, "Compile"). On where it can run (a CUDA GPU with Triton:
# `compiling.machine_compile_problem`); elsewhere off, with the reason in the log.
ENABLE_COMPILE = True
# Each block's Q, K and V projections as one matmul per stream (`compiling.fuse_qkv_projections`): bf16 only, on CUDA.
ENABLE_FUSED_QKV = True
# The caption's SDPA kernels: no cuDNN, which builds a plan per new sequence length, i.e. per decoded token
# (bench/RESULTS.md, "Caption kernels"). The transformer keeps cuDNN: one plan per job shape.
CAPTION_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# The caption's greedy decode as one CUDA graph per caption (`studio.caption`): exact to bf16 (teacher-forced logits
# within LOGIT_TOLERANCE_ULPS of eager's), wherever every decode-step weight stays on the GPU (the offload rows'
# `caption_graphs_problem`); elsewhere the same decoder runs its steps eagerly. It replaces --caption-compile
# (torch.compile with CUDA graphs: not exact, and re-recorded at every caption under the budget engine).
ENABLE_CAPTION_GRAPHS = True
# One short run at the default job's shapes when the model loads (CUDA only): the user's first image then costs what a
# repeat costs instead of paying the process's one-time work (bench/RESULTS.md, "Warm-up").
ENABLE_WARM_UP = True
WARM_UP_CAPTION_TOKENS = 16  # enough decode steps for the caption decoder to warm up and capture its graph (11 at least)
# cuDNN autotuning off: on, two processes can pick different convolution algorithms and the same seed's VAE decode
# differs between them (bench/RESULTS.md, "Determinism").
ENABLE_CUDNN_BENCHMARK = False
# SageAttention kernels through diffusers' attention dispatcher; needs the `sageattention` package.
ENABLE_SAGE_ATTENTION = False
# The VAE decodes N layers at up to 1024 px: one layer at a time (slicing) and in tiles keeps its peak low.
ENABLE_VAE_SLICING = True
ENABLE_VAE_TILING = True

# Serving. Gradio's upload route refuses bigger files before anything reads them (launch(max_file_size=...)).
MAX_UPLOAD_SIZE = "50mb"
# After each UI run the oldest run folders are deleted until the outputs folder holds at most OUTPUTS_MAX_GB and
# nothing older than OUTPUTS_MAX_AGE_HOURS (0 turns a limit off; the newest run always stays). The headless
# `decompose` command never deletes anything.
OUTPUTS_MAX_GB = 10.0
OUTPUTS_MAX_AGE_HOURS = 24.0 * 7
# The page's "Edit this layer" sends the layer to the edit tool's API: its own process and model (~58 GB), started
# when wanted (src/tool/edit_rgba_image.py, port 7871).
EDIT_TOOL_URL = "http://127.0.0.1:7871/"

# THE load-flag table: each row is a `Settings` field, its command-line flag and its QIL_* variable (the edit tool
# takes the rows of "edit"). A new setting: its constant above, one row here, and its use.
LOAD_FLAGS = (
    Flag("offload", CPU_OFFLOAD_MODE, "--offload", "where the weights live", choices=OFFLOAD_CHOICES),
    Flag("model", None, "--model", "folder holding the pipeline (model_index.json); default: models/, then the hub"),
    Flag("demo", False, "--demo", "use the tiny random demo pipeline (offline; its layers are noise)"),
    Flag("outputs", OUTPUTS_DIR, "--outputs", "run folders go here", type=Path),
    Flag("models_dir", MODELS_DIR, "--models-dir", "local weight cache", type=Path),
    Flag("first_block_cache", ENABLE_FIRST_BLOCK_CACHE, "--no-first-block-cache", "run every block at every step"),
    Flag("first_block_cache_threshold", FIRST_BLOCK_CACHE_THRESHOLD, "--first-block-cache-threshold",
         "FirstBlockCache's threshold (higher: faster, less faithful)", type=non_negative_float),
    Flag("preset", PRESET, "--preset", "; ".join(f"{p.name}: {p.label}" for p in PRESETS.values()) + " (the "
         "card's 8-bit matmuls in blocks 12-47, FirstBlockCache 0.1); the flags below win over it",
         choices=tuple(PRESETS)),
    Flag("quantization", QUANTIZATION_MODE, "--quantization", "LOSSY storage or compute: "
         + "; ".join(f"{m.name}: {m.summary}" for m in QUANT.values() if m.lossy),
         choices=tuple(name for name, m in QUANT.items() if m.lossy)),
    Flag("quantized_blocks", QUANTIZED_BLOCKS, "--quantized-blocks", "the transformer blocks int8_w8a8 / fp8_w8a8 "
         "compute in 8 bits, e.g. 12-47, 0-3,50-59, all; default: all but the first and last fifth (12-47 of 60)",
         metavar="RANGE"),
    Flag("compile", ENABLE_COMPILE, "--no-compile", "run the transformer blocks eagerly (default: compiled where a "
         "CUDA GPU and Triton allow; the first start compiles ~25 s)"),
    Flag("caption_graphs", ENABLE_CAPTION_GRAPHS, "--no-caption-graphs", "decode the auto-caption with transformers' "
         "generate (default: one CUDA graph per caption where its weights stay on the GPU)"),
    Flag("warm_up", ENABLE_WARM_UP, "--no-warm-up", "skip the short run at load time (the first image then pays CUDA's "
         "one-time work)"),
    Flag("sage_attention", ENABLE_SAGE_ATTENTION, "--sage-attention", "SageAttention kernels (needs sageattention)"),
    Flag("vram_budget_gb", VRAM_BUDGET_GB, "--vram-budget", "VRAM the budget offload mode may use (default: the "
         "GPU's free memory)", type=float, metavar="GB", env="VRAM_BUDGET"),
    Flag("ram_budget_gb", RAM_BUDGET_GB, "--ram-budget", "host RAM the budget offload mode may use (default: what is "
         "available before loading)", type=float, metavar="GB", env="RAM_BUDGET"),
    Flag("gpus", 1, "--gpus", "split each image over N GPUs of this machine (CFG-parallel; torchrun works too)",
         type=positive_int, metavar="N", commands=("ui", "decompose", "evaluate")),
    *serving_flags(HOST, PORT, MAX_UPLOAD_SIZE, commands=("ui",)),
    Flag("edit_tool", EDIT_TOOL_URL, "--edit-tool", "where the edit tool runs, for the page's \"Edit this layer\" "
         "(python src/tool/edit_rgba_image.py)", metavar="URL", commands=("ui",)),
    Flag("outputs_max_gb", OUTPUTS_MAX_GB, "--outputs-max-gb", "delete the oldest run folders beyond this size; 0: no "
         "limit", type=non_negative_float, commands=("ui", "edit")),
    Flag("outputs_max_age_hours", OUTPUTS_MAX_AGE_HOURS, "--outputs-max-age-hours", "delete run folders older than "
         "this; 0: no limit", type=non_negative_float, commands=("ui", "edit")),
)
# The resolved settings: one field per row, its default the row's.
Settings = dataclasses.make_dataclass(
    "Settings", [(row.name, Any, dataclasses.field(default=row.default)) for row in LOAD_FLAGS])
Settings.__doc__ = "Resolved run-time settings: LOAD_FLAGS' rows after command line and environment overrides."


def parse_args(argv: list[str] | None = None) -> tuple[str, Any, argparse.Namespace]:
    """The one place where command line (`argv`) and environment (`QIL_*`) override the flags above.

    Returns (command, settings, namespace): command is "ui", "decompose" or "evaluate".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("decompose", "evaluate") else "ui"
    argv = argv[1:] if command != "ui" else argv
    if command == "decompose":
        parser = argparse.ArgumentParser(prog="app.py decompose", description=(
            "Decompose images headless: the model loads once, every image gets its own run folder, a file "
            "that fails is reported and skipped; the exit code is 1 when any failed."))
        parser.add_argument("images", nargs="+", metavar="IMG_OR_DIR",
                            help="image files, or folders whose " + "/".join(IMAGE_SUFFIXES) + " files are taken")
        add_param_args(parser)
        parser.add_argument("--out", type=Path, default=None, help="outputs folder (default: --outputs)")
        parser.add_argument("--original-size", action="store_true",
                            help="also export the layers resized to the input's size (run folder's original_size/)")
        parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                            help="spread the images over a Ray cluster, one pipeline per GPU (no ADDRESS: a local "
                                 "Ray instance, or the cluster RAY_ADDRESS names); skips images already done")
        parser.add_argument("--ray-workers", type=positive_int, default=None, metavar="N",
                            help="with --ray: pipelines to start (default: one per GPU of the cluster, else 1)")
    elif command == "evaluate":
        parser = evaluate_parser()
    else:
        parser = argparse.ArgumentParser(prog="app.py", description=(
            "Qwen-Image-Layered studio: the page (this command), or `app.py decompose IMG_OR_DIR...` (headless batch) "
            "and `app.py evaluate GT...` (scores against ground-truth layers); each takes --help."))
    add_flags(parser, LOAD_FLAGS, command)
    ns = parser.parse_args(argv)
    if getattr(ns, "ray_workers", None) is not None and ns.ray is None:
        parser.error(f"--ray-workers {ns.ray_workers} needs --ray: the local batch runs one pipeline")
    if getattr(ns, "out", None) is not None:
        ns.outputs = ns.out
    return command, Settings(**flag_values(ns, LOAD_FLAGS)), ns


# ----------------------------------------------------------------------------------------------------
# 2. Environment
# ----------------------------------------------------------------------------------------------------
def package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """What this machine offers the model: printed once at start-up (`print_environment_info`), stored in params.json."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "accelerate": package_version("accelerate"),
        "gradio": package_version("gradio"),
        "gpu_name": None,
        "gpu_vram_gb": None,
        "sdpa_backends": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = props.name
        info["gpu_vram_gb"] = round(props.total_memory / GIB, 1)
    return info


def print_environment_info(info: dict[str, Any]) -> None:
    width = max(len(k) for k in info)
    print("Environment:")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    if not info["cuda_available"]:
        print("  No CUDA GPU found: the app runs on the CPU in float32, which is very slow for the real model.")


# The CUDA build of torch, from PyTorch's own wheel index (pip's default wheel on Windows is CPU-only). CUDA 13.0
# builds (what this project's torch 2.14.1+cu130 is) run the RTX 20 series to the RTX 50 series; other builds are
# listed at https://pytorch.org/get-started/locally/.
TORCH_CUDA_INDEX_URL = "https://download.pytorch.org/whl/cu130"


def nvidia_driver_answers() -> bool:
    """True when an NVIDIA driver lists a GPU (`nvidia-smi -L`), whatever torch can see."""
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        listed = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def torch_without_cuda_message(driver_answers: bool, cuda_available: bool, torch_cuda: str | None) -> str | None:
    """What to do when the machine has an NVIDIA GPU but torch cannot use it; None when there is nothing to fix."""
    if not driver_answers or cuda_available:
        return None
    if torch_cuda is None:
        return (f"An NVIDIA GPU is present (nvidia-smi answers), but this torch {torch.__version__} was built without "
                f"CUDA (pip's default torch wheel on Windows is CPU-only), so the model would run on the CPU, orders of "
                f"magnitude slower. Install torch's CUDA build in this environment:\n"
                f"  pip uninstall -y torch torchvision\n"
                f"  pip install torch=={torch.__version__.split('+')[0]} torchvision --index-url {TORCH_CUDA_INDEX_URL}\n"
                f"(other CUDA builds: https://pytorch.org/get-started/locally/)")
    return (f"An NVIDIA GPU is present (nvidia-smi answers), but torch {torch.__version__} (CUDA {torch_cuda}) cannot "
            f"use it, so the model would run on the CPU. Update the NVIDIA driver to one that supports CUDA "
            f"{torch_cuda}, and check that CUDA_VISIBLE_DEVICES does not hide the GPU.")


def triton_available() -> bool:
    """Triton (the `triton` module; `triton-windows` on Windows) is what SageAttention's and torch.compile's GPU
    kernels are built with: features that need it stay off where it is missing."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def check_torch_sees_gpu(demo: bool, driver_answers: bool | None = None) -> None:
    """Refuse to load the real model on the CPU when an NVIDIA GPU is there but torch cannot use it.

    The demo model still runs (it is tiny), with the fix in a warning. `driver_answers` None: ask `nvidia-smi`.
    """
    if torch.cuda.is_available():
        return
    driver_answers = nvidia_driver_answers() if driver_answers is None else driver_answers
    message = torch_without_cuda_message(driver_answers, False, torch.version.cuda)
    if message is None:
        return
    if demo:
        logger.warning(message)
        return
    raise TorchWithoutCudaError(message)


def setup_cuda_optimizations() -> list[str]:
    """TF32 matmuls; cuDNN autotuning only where ENABLE_CUDNN_BENCHMARK asks (off: the same layers in every process).
    Flash SDPA stays as PyTorch chose (on)."""
    if not torch.cuda.is_available():
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = ENABLE_CUDNN_BENCHMARK
    return ["tf32"] + (["cudnn_benchmark"] if ENABLE_CUDNN_BENCHMARK else [])


def clear_memory() -> None:
    """Free Python garbage and, when there is a GPU, the CUDA caching allocator's unused blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


# ----------------------------------------------------------------------------------------------------
# 3. Loading
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What `load_pipeline` loads and where from. The app loads LAYERED_MODEL; each tool passes its own."""

    model_id: str  # the hub repo of the real weights
    local_dir_name: str  # its folder under models/, looked at before the hub
    pipeline_class: str | None  # the diffusers pipeline class; None for a plain model folder (e.g. a matting model)
    build_demo: Callable[[Path], Path] | None  # builds the tiny random pipeline offline (--demo); None: no demo
    demo_dir_name: str | None  # the demo pipeline's folder under models/
    download_size: str  # for messages: what a download costs
    marker_file: str = "model_index.json"  # a folder holding this file is taken as complete
    revision: str | None = None  # a pinned hub commit: a repo whose code runs (trust_remote_code) is never taken unpinned


LAYERED_MODEL = ModelSpec(model_id=MODEL_ID, local_dir_name=LOCAL_MODEL_DIR.name,
                          pipeline_class="QwenImageLayeredPipeline", build_demo=build_demo_pipeline,
                          demo_dir_name=DEMO_MODEL_DIR.name, download_size="~57 GB")


def offline_message(models_dir: Path, spec: ModelSpec = LAYERED_MODEL) -> str:
    name = spec.model_id.split("/")[-1]
    lines = [f"No {name} weights found and the Hugging Face hub could not be reached.",
             f"  Put the weights (the folder with {spec.marker_file}, {spec.download_size}) in: "
             f"{Path(models_dir) / spec.local_dir_name}"]
    if spec.pipeline_class:
        lines.append(f"  or pass --model /path/to/{name},")
    lines.append("  or run with network access once so they download there" + ("," if spec.build_demo else "."))
    if spec.build_demo:
        lines.append("  or try it offline with --demo (a tiny random model: it runs everything, but its output is noise).")
    return "\n".join(lines)


def find_weights(models_dir: Path, spec: ModelSpec = LAYERED_MODEL) -> Path:
    """The local folder `models_dir/<spec.local_dir_name>` when complete, else a hub download into it."""
    local = Path(models_dir) / spec.local_dir_name
    if (local / spec.marker_file).is_file():
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("No weights in %s: downloading %s from the hub (%s)", local, spec.model_id, spec.download_size)
    try:
        return Path(snapshot_download(spec.model_id, local_dir=local, revision=spec.revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelNotAvailableError(offline_message(models_dir, spec) + f"\n  (hub error: {type(err).__name__})") from err


def get_model_path(settings, spec: ModelSpec = LAYERED_MODEL) -> Path:
    """Where the pipeline comes from: --demo, --model, the local models/ folder, else the hub."""
    if settings.demo:
        if spec.build_demo is None:
            raise ModelNotAvailableError(f"{spec.model_id} has no demo model: run without --demo.")
        return spec.build_demo(Path(settings.models_dir) / spec.demo_dir_name)
    if settings.model:
        path = Path(settings.model)
        if not (path / spec.marker_file).is_file():
            raise ModelNotAvailableError(f"--model {path} holds no {spec.marker_file}: pass the folder of a "
                                         f"diffusers pipeline (the one that contains {spec.marker_file}).")
        return path
    return find_weights(settings.models_dir, spec)


def resolve_offload_mode(mode: str, cuda_available: bool, vram_gb: float | None,
                         budget_min_gb: float = BUDGET_AUTO_MIN_VRAM_GB) -> OffloadMode:
    """Turn "auto" into a mode for this machine (`vram_gb`: the VRAM it may use, GiB); check an explicit one.
    `budget_min_gb`: the budget mode's minimum for these weights (`budget_minimum_gb`)."""
    if mode not in OFFLOAD_CHOICES:
        raise ValueError(f"offload mode {mode!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    if not cuda_available:
        row = OFFLOAD["off" if mode == "auto" else mode]
        if not row.cpu:
            logger.warning("Offload mode %r needs a CUDA GPU; none found, running everything on the CPU.", mode)
            return OFFLOAD["off"]
        if row.vram == "planned":  # the budget engine's hooks with every weight on the CPU (CI tests it this way)
            logger.info("Offload mode %r without a CUDA GPU: everything stays on the CPU.", mode)
        return row
    if mode != "auto":
        return OFFLOAD[mode]
    if vram_gb >= FULL_RESIDENCY_VRAM_GB:
        return OFFLOAD["off"]
    if vram_gb >= budget_min_gb:
        return OFFLOAD["budget"]  # the low-VRAM engine: 24 GB cards, and 16 / 12 GB with the text encoder split
    return OFFLOAD["sequential"]  # not even one block fits beside the default job's activations: stream every layer


def apply_preset(settings, capability: tuple[int, int] | None):
    """The settings with --preset's on top of the flags a person left at their defaults (`LOAD_FLAGS`' rows; a flag
    or QIL_* variable given wins). Fast's 8-bit mode is the card's (`fast_mode_for`; `capability` None: no CUDA, the
    reference matmul on the CPU); a GPU older than int8's kernels keeps bf16 (`apply_memory_optimizations` says so)."""
    preset = PRESETS[settings.preset]
    defaults = {row.name: row.default for row in LOAD_FLAGS}
    wanted = dict(quantization=fast_mode_for(capability) if preset.quantization == FAST_QUANTIZATION
                  else preset.quantization, quantized_blocks=preset.quantized_blocks, first_block_cache=True,
                  first_block_cache_threshold=preset.first_block_cache_threshold)
    return dataclasses.replace(settings, **{name: value for name, value in wanted.items()
                                            if getattr(settings, name) == defaults[name]})


def default_vram_budget_gb(settings) -> float:
    """--vram-budget, else the GPU's free memory now (the whole budget when there is no GPU: nothing moves)."""
    if settings.vram_budget_gb is not None:
        return float(settings.vram_budget_gb)
    if not torch.cuda.is_available():
        return float("inf")
    return torch.cuda.mem_get_info()[0] / GIB


# Where the weights live: each offload mode's own code (its row is in `studio.modes`). Each returns what it applied.
def place_resident(loaded: Loaded, settings) -> list[str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded.pipe.to(device)
    return [f"resident_on_{device}"]


def model_offload(loaded: Loaded, settings) -> list[str]:
    loaded.pipe.enable_model_cpu_offload()  # text_encoder -> transformer -> vae, whole components in turn
    return ["model_cpu_offload"]


def sequential_offload(loaded: Loaded, settings) -> list[str]:
    loaded.pipe.enable_sequential_cpu_offload()  # accelerate's hooks stream each layer's weights
    return ["sequential_cpu_offload"]


def budget_offload(loaded: Loaded, settings) -> list[str]:
    """The low-VRAM engine (`studio.engine`), as `load_pipeline` planned it before loading; a pipeline built in memory
    (a bench's) is planned here from its modules."""
    if loaded.machine is None:
        loaded.machine = plan_loaded(loaded.pipe, default_vram_budget_gb(settings), settings.ram_budget_gb,
                                     quant=loaded.quant)
    loaded.stages, applied = enable_budget_offload(loaded.pipe, loaded.machine)
    return applied


OFFLOAD_APPLY = {"off": place_resident, "model": model_offload, "sequential": sequential_offload,
                 "budget": budget_offload}


def apply_memory_optimizations(pipe, settings, offload: OffloadMode, machine: MachinePlan | None = None,
                               model_path: Path | str | None = None) -> Loaded:
    """Apply weight storage, compile, offload, VAE, cache and attention features, one line each, and return what was
    loaded. A feature that cannot apply is logged with its reason (never swallowed). `machine`: the budget mode's plan
    made before loading (None: planned here from the modules). `settings.preset` applies here too (`apply_preset`), so a
    pipeline built in memory (a bench's) gets the Fast preset by its name."""
    on_cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if on_cuda else None
    settings = apply_preset(settings, capability)
    loaded = Loaded(pipe, Path(model_path or "."), offload, quant_mode(settings.quantization),
                    dtype=str(pipe.transformer.dtype).replace("torch.", ""),
                    demo=model_path is not None and is_demo_model(model_path), machine=machine,
                    environment=environment_info())
    applied = loaded.optimizations
    compile_blocks = settings.compile

    # 1. Weight storage and quantized compute (before offloading, so offload hooks move the smaller tensors).
    problem = quant_problem(loaded.quant, offload, capability,
                            loaded.quant.package is None or package_version(loaded.quant.package) is not None)
    if settings.preset == "fast" and settings.quantization is None:
        problem = f"--preset fast has no 8-bit mode on a GPU of compute capability {capability[0]}.{capability[1]}"
    if problem:
        logger.warning("%s. Running bf16 compute instead (not lossy).", problem)
        loaded.quant = QUANT["bf16"]
    elif loaded.quant.lossy:
        loaded.quantized = apply_quantization(pipe.transformer, loaded.quant, settings.quantized_blocks)
        what = "".join(f", {key} {value}" for key, value in loaded.quantized.items())
        applied.append(f"{loaded.quant.name} (LOSSY: {loaded.quant.summary}{what})")
        logger.warning("LOSSY: --quantization %s%s: the layers differ from the model's bf16 output.",
                       loaded.quant.name, what)
        compile_blocks = compile_blocks or loaded.quant.forces_compile
    loaded.preset = "fast" if settings.preset == "fast" and loaded.lossy else "exact"  # what runs (explicit flags win)
    if settings.quantized_blocks != QUANTIZED_BLOCKS and not loaded.quant.block_range:
        logger.info("--quantized-blocks %s not applied: only int8_w8a8 and fp8_w8a8 choose blocks.",
                    settings.quantized_blocks)

    # 1b. Fused QKV projections and regional compilation, before any hook: the offload and cache hooks then wrap the
    #     fused, compiled blocks.
    problem = fuse_problem(on_cuda, loaded.quant, machine) if ENABLE_FUSED_QKV else None
    if problem:
        logger.info(problem)
    elif ENABLE_FUSED_QKV:
        applied.append(f"fused_qkv({fuse_qkv_projections(pipe.transformer)} blocks)")
    problem = compile_problem(offload, loaded.quant) if compile_blocks else None
    if compile_blocks and not problem and not loaded.quant.forces_compile:
        problem = compiling.machine_compile_problem(on_cuda, triton_available(), capability)
    if problem:  # info: compiling is the default, and a machine or mode without it is no mistake
        logger.info("%s. Running the blocks eagerly.", problem)
    elif compile_blocks:
        cached = load_compile_cache()  # a previous start's compile (see the function)
        count = compile_transformer_blocks(pipe.transformer)
        applied.append(f"compiled_transformer_blocks({count}{', cache loaded' if cached else ''})")
        loaded.compiled = True

    # 2. Where the weights live: the offload mode's own code.
    applied += OFFLOAD_APPLY[offload.name](loaded, settings)

    # 3. VAE: decode one layer at a time, and in tiles (tiling only saves GPU memory; on the CPU it makes the VAE
    #    2-3x slower: bench/RESULTS.md, "VAE tiling on the CPU").
    if ENABLE_VAE_SLICING:
        pipe.vae.enable_slicing()
        applied.append("vae_slicing")
    if ENABLE_VAE_TILING and not on_cuda:
        logger.info("vae_tiling not applied: it only saves GPU memory, and on the CPU it makes the VAE 2-3x slower.")
    elif ENABLE_VAE_TILING:
        pipe.vae.enable_tiling()
        applied.append("vae_tiling")

    # 4. FirstBlockCache through diffusers' hooks. para-attn's FBC has no adapter for QwenImage
    #    (its apply_cache_on_pipe raises for this pipeline), diffusers' CacheMixin covers it.
    if settings.first_block_cache:
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=settings.first_block_cache_threshold))
        applied.append(f"first_block_cache(threshold={settings.first_block_cache_threshold})")

    # 5. Attention kernels.
    if settings.sage_attention and sage_attention_unavailable(on_cuda, capability):
        logger.warning(sage_attention_unavailable(on_cuda, capability))
    elif settings.sage_attention:
        pipe.transformer.set_attention_backend(SAGE_BACKEND)
        applied.append("sage_attention")

    # 6. The caption's decoder (`studio.caption`): one CUDA graph per caption where every decode-step weight stays on
    #    the GPU; its steps eagerly elsewhere (the reason in the log).
    loaded.caption_decoder = settings.caption_graphs and not offload.caption_graphs_problem
    problem = caption.caption_graphs_problem(offload, on_cuda, loaded.machine) if settings.caption_graphs else None
    if problem:
        logger.info(problem)
    elif settings.caption_graphs:
        applied.append("caption_cuda_graphs")
    return loaded


def sage_attention_unavailable(on_cuda: bool, capability: tuple[int, int] | None = None) -> str | None:
    """Why SageAttention cannot apply on this machine (`capability`: its GPU's; None: not checked); None when it can.
    Its version counts: diffusers' dispatcher needs sageattention >= 2.1.1 and pip has only 1.0.6, with which
    `set_attention_backend("sage")` raises."""
    return sage_attention_problem(on_cuda, capability, package_version("sageattention"), triton_available())


def load_pipeline(settings, spec: ModelSpec = LAYERED_MODEL) -> Loaded:
    """Load `spec`'s pipeline (bf16 on CUDA, float32 on the CPU) and apply the memory features; the machine is checked
    and the budget mode planned once, before any weight loads. `start_pipeline` (section 4) also warms it up."""
    import diffusers

    # 0. A GPU that torch cannot use is said with the fix, not silently replaced by the CPU.
    check_torch_sees_gpu(settings.demo)
    # 1. Find the weights (raises ModelNotAvailableError with what to do).
    model_path = get_model_path(settings, spec)
    # 2. Pick the dtype: bf16 is the model's dtype; PyTorch's CPU bf16 convolutions are ~20x slower than float32
    #    (bench/RESULTS.md, "The CPU's dtype"), so the CPU uses float32.
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    # 3. Plan once, before loading: the offload mode for this machine (the VRAM `--vram-budget` names, else the GPU's
    #    free memory), whether it fits (a ValueError with the figures and what would fit) and, for the budget mode,
    #    which blocks stay resident and which weights are page-locked (`MachinePlan`, handed to the engine).
    vram_gb = default_vram_budget_gb(settings)
    settings = apply_preset(settings, torch.cuda.get_device_capability() if cuda else None)
    quant = quant_mode(settings.quantization)
    element_size = torch.finfo(dtype).bits // 8
    sizes, other_sizes = planner_sizes(model_path, element_size, quant, settings.quantized_blocks)
    offload = resolve_offload_mode(settings.offload, cuda, vram_gb,
                                   budget_minimum_gb(sizes) if sizes else BUDGET_AUTO_MIN_VRAM_GB)
    #    Several GPUs of one machine (`studio.parallel`): each rank loads its own pipeline at the same time, so each
    #    plans with its share of the RAM; what a rank leaves in the weight files is page cache that the ranks share.
    ranks = ranks_on_this_machine()
    ram_gb = settings.ram_budget_gb if settings.ram_budget_gb is not None else memory.available_ram_gb() / ranks
    machine = None
    if sizes is not None and (cuda or offload.vram == "planned"):
        try:
            machine = plan_machine(offload, sizes, vram_gb, ram_gb, transformer_in_ram=quant.holds_transformer_in_ram,
                                   lossy_sizes=None if quant.lossy else other_sizes,
                                   exact_sizes=other_sizes if quant.lossy else None,
                                   fast_sizes=None if quant.lossy else fast_sizes(model_path, element_size))
        except ValueError as err:
            if ranks == 1:
                raise
            raise ValueError(f"{ranks} GPUs of this machine each load the pipeline, so each has 1/{ranks} of its RAM. "
                             f"{err}") from None
        if machine.hint:  # bf16 fits by reading blocks from disk at every call: say what the lossy option would do
            logger.warning(machine.hint)
    setup_cuda_optimizations()
    # 4. Load through from_pretrained, the same path for the real and the demo weights. Where the files' dtype is the
    #    one asked for, diffusers and transformers map the safetensors files and copy nothing: the weights are page
    #    cache until a mode copies them (the budget mode with little RAM keeps part of them so: `HostRamPlan`).
    start = time.perf_counter()
    pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(model_path, dtype=dtype)
    loaded = apply_memory_optimizations(pipe, settings, offload, machine if offload.vram == "planned" else None,
                                        model_path)
    loaded.models_dir = Path(settings.models_dir)  # where the OCR's Korean model is fetched (studio.design)
    logger.info("Loaded %s in %.1f s (offload=%s, dtype=%s)", model_path, time.perf_counter() - start, offload.name,
                loaded.dtype)
    for name in loaded.optimizations:
        logger.info("  applied: %s", name)
    if loaded.demo:
        logger.warning("DEMO MODEL in use: tiny random weights, the layers are noise.")
    return loaded


# ----------------------------------------------------------------------------------------------------
# 4. Infer
# ----------------------------------------------------------------------------------------------------
# One model run at a time. Gradio's queue already runs one GPU job at a time, but a cancelled job's thread
# finishes its current step after Gradio has moved on: the next run waits here for that step.
_PIPELINE_LOCK = threading.Lock()


def stop_callback(stop: threading.Event | None, parallel=None) -> Callable | None:
    """The pipeline's `callback_on_step_end` for a `stop` event: it raises `RunStopped` after the step during which
    `stop` was set (the pipeline's own callback, so no step is cut in half). `run_pipeline` covers the caption.
    With several GPUs (`parallel`, this rank's state) every rank gets it and acts on rank 0's `stop` (`rank0_says`)."""
    if stop is None and parallel is None:
        return None

    def callback(_pipe, _step, _timestep, callback_kwargs):
        if rank0_says(parallel, stop is not None and stop.is_set()):
            raise RunStopped("stopped")
        return callback_kwargs

    return callback


@contextlib.contextmanager
def text_encoder_stop(pipe, stop: threading.Event | None):
    """Within the block, a set `stop` raises `RunStopped` before the text encoder's next forward: the caption (up to
    512 tokens, minutes on a 4090) has no step callback."""
    def check_stop(*_):
        if stop.is_set():
            raise RunStopped("stopped")

    hook = pipe.text_encoder.register_forward_pre_hook(check_stop) if stop is not None else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


def out_of_memory_message(loaded: Loaded, job: str = "decomposition", changes: list[str] = (),
                          program: str = "app") -> str:
    """What to change after a CUDA out-of-memory error: the job's own `changes` first, then the offload mode's."""
    changes = list(changes)
    if loaded.stages is not None:  # the low-VRAM engine
        changes.append(f"restart the {program} with a smaller --vram-budget (GB; fewer transformer blocks stay resident)")
    elif loaded.offload.vram != "one_layer":  # sequential streams every layer already: nothing smaller to offer
        changes.append(f"restart the {program} with --offload budget (now: {loaded.offload.name}; streams what does "
                       f"not fit)")
    changes.append("close other programs that use the GPU")
    return f"Out of GPU memory during the {job}; the memory was freed. Try: " + "; or ".join(changes) + "."


def decomposition_changes(layers: int, resolution: int) -> list[str]:
    """A decomposition's own ways to need less memory, for `out_of_memory_message`."""
    changes = []
    if layers > LAYERS_RANGE[0]:
        changes.append(f"fewer layers (this run asked for {layers})")
    if resolution != RESOLUTIONS[0]:
        changes.append(f"resolution {RESOLUTIONS[0]} (this run used {resolution})")
    return changes


def run_pipeline(loaded: Loaded, job: Callable[[], Any], out_of_memory: str, stop: threading.Event | None = None) -> Any:
    """Run `job()` (calls of the pipeline) the one safe way; the app's `infer` and the edit tool's `edit_layer` use it.

    One run at a time (`_PIPELINE_LOCK`), under `torch.inference_mode()` (+ bf16 autocast on CUDA). Afterwards,
    also after an error, the run's memory is freed: budget mode sends every weight to its host copy,
    FirstBlockCache's state is reset (the pipeline resets it only when a run completes; a stopped run would leave a
    cached first-block residual without the tail residuals it needs), and `clear_memory`. CUDA out of memory
    becomes `OutOfMemoryError(out_of_memory)`, raised only after the run's tensors are freed.
    Setting `stop` ends the run with `RunStopped`: the job passes `stop_callback(stop)` to the pipeline's steps,
    and the caption is stopped before its next token (`text_encoder_stop`). With several GPUs the ranks stop
    together, so only the caption is stopped that way there (`infer` does it), not rank 0's prompt encoding.
    """
    pipe = loaded.pipe
    caption_stop = stop if loaded.parallel is None else None
    failed = stopped = False
    start = time.perf_counter()
    with _PIPELINE_LOCK:
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()), \
                    text_encoder_stop(pipe, caption_stop):
                return job()
        except torch.OutOfMemoryError:
            # Not re-raised here: the exception's traceback holds the run's tensors, so it must be gone before
            # `clear_memory` can give their memory back.
            failed = True
        except RunStopped:  # the same: raised again below, once the run's tensors are freed
            stopped = True
        finally:
            loaded.release_vram()
            pipe.transformer._reset_stateful_cache()
            clear_memory()
    if failed:
        logger.warning("Out of GPU memory; memory freed. %s", out_of_memory)
        raise OutOfMemoryError(out_of_memory)
    if stopped:
        logger.info("Run stopped after %.1f s; memory freed.", time.perf_counter() - start)
        raise RunStopped(STOPPED_MESSAGE)


# The pipeline's `get_image_caption` writes at most this many tokens (its `generate(max_new_tokens=512)`).
CAPTION_MAX_NEW_TOKENS = 512


@contextlib.contextmanager
def caption_progress(pipe, max_new_tokens: int = CAPTION_MAX_NEW_TOKENS):
    """Report the caption's tokens as they are written, on a tqdm bar of "caption tokens" (Gradio's track_tqdm
    shows it like the steps). Yields the transformers streamer; its `written` counts the tokens.

    The pipeline's `get_image_caption` calls `text_encoder.generate` without a streamer argument, so for the
    duration of the block the text encoder's `generate` gets one (transformers' streamer interface: `put` is
    called with the prompt, then with each new token; `end` when done). This keeps the pipeline's own caption
    code instead of a copy of it.
    """
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenCounter(BaseStreamer):
        def __init__(self):
            self.written, self._prompt_seen = 0, False
            # No desc: Gradio then shows "12/512 caption tokens" (with a desc it shows only a percentage).
            self.bar = tqdm(total=max_new_tokens, unit="caption tokens", leave=False)

        def put(self, value):
            if not self._prompt_seen:  # generate's first call hands over the prompt
                self._prompt_seen = True
                return
            self.written += value.numel()
            self.bar.update(value.numel())

        def end(self):
            self.bar.close()

    counter = TokenCounter()
    try:
        with generate_with(pipe.text_encoder, streamer=counter):
            yield counter
    finally:
        counter.bar.close()


@contextlib.contextmanager
def generate_with(encoder, **forced: Any):
    """Within the block, the text encoder's `generate` is called with `forced` keyword arguments on top of its
    caller's (the pipeline's `get_image_caption` passes its own), then it is given back: the class's, or the
    instance's own wrapper (the budget engine's) where one was set."""
    previous = encoder.__dict__.get("generate")
    generate = encoder.generate
    encoder.generate = lambda *args, **kwargs: generate(*args, **{**kwargs, **forced})
    try:
        yield
    finally:
        if previous is None:
            del encoder.generate
        else:
            encoder.generate = previous


def noise_generator(pipe, seed: int) -> torch.Generator:
    """The generator the initial noise is drawn with, seeded.

    On CUDA it is a CUDA generator, as in the official app (`torch.Generator(device="cuda")`), in every offload
    mode: the pipeline's execution device is the GPU in all of them, so a seed found on the official demo gives
    the same noise here. On a machine without CUDA, a CPU generator.
    """
    device = pipe._execution_device
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(int(seed))


def caption_attention():
    """The SDPA kernels the caption's decode may use (CAPTION_SDPA_BACKENDS: no cuDNN plan per new length)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not CAPTION_SDPA_BACKENDS:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, name) for name in CAPTION_SDPA_BACKENDS])


def caption_image(pipe, rgba: Image.Image, resolution: int, use_en_prompt: bool = True,
                  stop: threading.Event | None = None, decoder: bool = False, max_new_tokens: int | None = None) -> str:
    """The pipeline's own `get_image_caption` on the image resized as the pipeline resizes it (greedy decoding).

    `decoder` (`Loaded.caption_decoder`): its `generate` is `studio.caption`'s decoder, one CUDA graph per caption where
    the decode step's weights stay on the GPU, its steps eagerly elsewhere; a set `stop` ends it before its next token
    (its steps never call the text encoder's forward, where `text_encoder_stop` waits). At most `max_new_tokens`
    tokens (the warm-up's), else CAPTION_MAX_NEW_TOKENS."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    def check_stop():
        if stop is not None and stop.is_set():
            raise RunStopped("stopped")

    width, height = calculate_dimensions(resolution * resolution, rgba.width / rgba.height)
    prompt_image = pipe.image_processor.resize(rgba, height, width)
    # Outside in: the decoder replaces generate, the cap and caption_progress (a bar of its tokens, like the steps')
    # reach it through their keyword arguments.
    decode = caption.graph_decode(pipe.text_encoder, stop=check_stop) if decoder else contextlib.nullcontext()
    max_new_tokens = max_new_tokens or CAPTION_MAX_NEW_TOKENS
    with caption_attention(), decode, generate_with(pipe.text_encoder, max_new_tokens=max_new_tokens), \
            caption_progress(pipe, max_new_tokens):
        return pipe.get_image_caption(prompt_image, use_en_prompt=use_en_prompt, device=pipe._execution_device)


def infer(loaded: Loaded, image: Any, stop: threading.Event | None = None, **params: Any) -> DecomposeResult:
    """Decompose `image` into `params["layers"]` RGBA layers (bottom first); `params` are PARAMS rows by name (the
    model card's defaults for those not given). The pipeline's tqdm reports the steps.

    Setting `stop` (another thread: the UI's Stop button, a client that left) ends the run at the next step
    with `RunStopped`, after its memory is freed.
    """
    pipe = loaded.pipe
    # 1. Check inputs (PARAMS says what each accepts) and read the image.
    checked = check_params(**{**DEFAULTS, **params})
    notes: list[str] = []
    rgba = to_rgba(image, notes)
    seed = random.randint(0, MAX_SEED) if checked["randomize_seed"] else checked["seed"]
    prompt = checked["prompt"].strip()
    layers, resolution = checked["layers"], checked["resolution"]
    # Several GPUs (`studio.parallel`): rank 0 hands this checked job to the other ranks, which run this same
    # function with the seed it drew and the prompt as stripped.
    share_job(loaded.parallel, loaded.cfg_hook, dict(checked, image=rgba, prompt=prompt, seed=seed, randomize_seed=False))
    start = time.perf_counter()
    auto_caption = not prompt

    def write_caption() -> str:
        # With several GPUs the ranks stop together, so rank 0's caption stops here (alone: `run_pipeline`).
        with text_encoder_stop(pipe, stop if loaded.parallel is not None else None):
            return (caption_image(pipe, rgba, resolution, checked["use_en_prompt"], stop=stop,
                                  decoder=loaded.caption_decoder) if auto_caption else prompt)

    def job():
        # 2. Caption. An empty prompt makes the pipeline caption the image itself; we call its own
        #    `get_image_caption` on the same resized image first so the caption can be shown and saved.
        #    With several GPUs rank 0 writes it and sends it to the others.
        caption = caption_from_rank0(loaded.parallel, write_caption)
        # 3. Denoise and decode, with the official app's noise (`noise_generator`): every PARAMS row the pipeline
        #    takes, under its own name, the caption as its prompt.
        generator = noise_generator(pipe, seed)
        output = pipe(
            image=rgba,
            **dict({p.name: checked[p.name] for p in PARAMS if p.pipeline}, prompt=caption),
            generator=generator,
            num_images_per_prompt=1,
            callback_on_step_end=stop_callback(stop, loaded.parallel),
        )
        return caption, output, generator.device.type

    # 4. One guarded run: memory freed after it, also after an error; out of memory says what to change.
    caption, output, generator_device = run_pipeline(
        loaded, job, out_of_memory_message(loaded, changes=decomposition_changes(layers, resolution)), stop=stop)
    duration_s = time.perf_counter() - start
    # 5. What a designer gets (`studio.design`, not part of duration_s): empty layers dropped and near-duplicates
    #    merged, edges cleaned, text read, layers named by the text encoder (rank 0's; under the lock, like a caption).
    naming = checked["name_layers"] and (loaded.parallel is None or loaded.parallel.rank == 0)
    finished = finish_layers([layer.convert("RGBA") for layer in output.images[0]], checked["tidy_layers"],
                             checked["clean_edges"], checked["text_layers"], checked["text_language"],
                             loaded.models_dir, name=functools.partial(name_layers_locked, loaded, stop=stop) if naming
                             else None)
    result_layers = finished.layers
    # Every PARAMS value as checked (the prompt as "prompt_given"), the seed used, and what the input needed.
    run_params = {("prompt_given" if name == "prompt" else name): value for name, value in checked.items()}
    run_params.update(prompt_given=prompt if not auto_caption else "", seed=seed, input_size=list(rgba.size),
                      output_size=list(result_layers[0].size), input_notes=notes,
                      generator_device=generator_device)  # "cuda": the official app's noise; "cpu": no CUDA here
    run_params.update(finished.record)  # tidy, text, layer_names, design_seconds
    run_params["recomposition"] = recomposition_score(rgba, result_layers)  # `studio.scores`; not part of duration_s
    return DecomposeResult(layers=result_layers, caption=caption, auto_caption=auto_caption, seed=seed,
                           params=run_params, duration_s=duration_s, notes=notes + finished.notes,
                           labels=LayerLabels(finished.names, finished.texts))


def name_layers_locked(loaded: Loaded, layers: list[Image.Image], stop: threading.Event | None = None) -> list:
    """PARAMS' name_layers: `studio.naming.name_layers` run as the caption runs, under `run_pipeline` (the lock, memory
    freed after) and with the caption's attention kernels; a name per layer, None where the model gave none."""
    def job():
        with caption_attention():
            return name_layers(loaded.pipe, layers)[0]

    return run_pipeline(loaded, job, out_of_memory_message(loaded, "naming of the layers", ["Name the layers off"]),
                        stop=stop)


def warm_up(loaded: Loaded, resolution: int = DEFAULTS["resolution"], layers: int = DEFAULTS["layers"]) -> float:
    """One short decomposition at the default job's shapes (ENABLE_WARM_UP); returns its seconds.

    A caption of WARM_UP_CAPTION_TOKENS tokens (the vision tower and the prompt's prefill at this shape, the caption
    decoder's kernels and a CUDA graph), then a run of the fewest steps with a given prompt (VAE, text encoding, the
    transformer and its cuDNN plans, the compiled blocks). The user's first image at these shapes then costs what a
    repeat costs; another shape still pays its own plans once.
    """
    pipe = loaded.pipe
    image = Image.new("RGBA", (resolution, resolution), (128, 128, 128, 255))
    start = time.perf_counter()
    run_pipeline(loaded, lambda: caption_image(pipe, image, resolution, decoder=loaded.caption_decoder,
                                               max_new_tokens=WARM_UP_CAPTION_TOKENS),
                 "Out of GPU memory during the warm-up.")
    infer(loaded, image, prompt="warm-up", num_inference_steps=STEPS_RANGE[0], layers=layers, resolution=resolution,
          seed=0)
    return time.perf_counter() - start


def start_pipeline(settings) -> Loaded:
    """`load_pipeline`, then on CUDA the warm-up (ENABLE_WARM_UP; the CPU has no plans or graphs to build) and the
    save of --compile's cache for the next start. What the app, `decompose`, `evaluate` and Ray's workers start."""
    loaded = load_pipeline(settings)
    if settings.warm_up and torch.cuda.is_available():
        loaded.optimizations.append(f"warm_up({warm_up(loaded):.1f} s)")
        if loaded.compiled and save_compile_cache():
            loaded.optimizations.append("compile_cache_saved")  # the next start loads it (`load_compile_cache`)
    return loaded


# ----------------------------------------------------------------------------------------------------
# 5. Exports: the writers are pure functions `layers -> file` (`studio.exports`, shared with the combine tool without
#    torch); a run folder holds the layers, composite, params.json and every export, written whole (`studio.runs`).
#    "Decompose this layer" replaces one layer of the stack by its own decomposition (`studio.stack`).
# ----------------------------------------------------------------------------------------------------
def decompose_layer(loaded: Loaded, stack: LayerStack, index: int, run_info: dict[str, Any] | None = None,
                    **infer_kwargs) -> tuple[LayerStack, DecomposeResult]:
    """Decompose `stack.layers[index]` again and put its sub-layers in its place. `infer_kwargs` go to `infer`.

    Returns the new stack (whose `previous` is `stack`, for one step of undo) and the sub-run's own result.
    """
    # 1. Check the index and the run folder before spending a run on them.
    check_layer_index(index, len(stack.layers))
    check_stack_files(stack)
    # 2. Decompose the layer as it is, RGBA: its transparent surroundings stay transparent for the model
    #    (flattening to RGB would turn them black and the model would see a black background).
    result = infer(loaded, stack.layers[index], **infer_kwargs)
    # 3. Its sub-layers, fit to the canvas, take its place.
    new_layers = replace_layer(stack.layers, index, result.layers)
    sub_labels = result.labels.scaled(result.layers[0].size, new_layers[0].size)  # names and text, on the canvas
    labels = stack.labels.replaced(len(stack.layers), index, sub_labels, len(result.layers))
    # 4. Save the sub-run and the new stack's exports.
    files = save_sub_run(stack, new_layers, index, result, run_info, labels)
    # 5. The old stack, without its own undo, is the one step back.
    previous = dataclasses.replace(stack, previous=None)
    return (LayerStack(layers=new_layers, run_folder=stack.run_folder, files=files, previous=previous,
                       original_size=stack.original_size, caption=result.caption, seed=result.seed, labels=labels),
            result)


# ----------------------------------------------------------------------------------------------------
# 6. UI
# ----------------------------------------------------------------------------------------------------
DEMO_BANNER = ("**Demo model in use** — tiny random weights built offline. Everything runs, but the layers are "
               "noise. Put the real weights in `models/Qwen-Image-Layered` (or pass `--model`) for real results.")
# Shown while a LOSSY mode (`studio.modes`) is applied: the layers differ from bf16's.
LOSSY_BANNER = ("**Lossy mode in use** ({}) — the layers differ from the model's bf16 output. Restart with "
                "`--preset exact` and without `--quantization` for bf16.")
# Beside the preset shown on the page: why it is chosen at start-up. A switch would reload 57 GB of weights (minutes),
# hold every session's jobs meanwhile and change the model under the others' feet; the two cannot share RAM either.
PRESET_NOTE = ("Exact: bf16, the model's own output. Fast: 8-bit matmuls in the middle transformer blocks and "
               "FirstBlockCache, LOSSY. The model loads once: restart the app with --preset fast (or exact) to switch.")
# Under the recomposition score on the demo model: why it is poor.
DEMO_SCORE_NOTE = ("The demo model's layers are random noise, so they do not stack back into the input: this poor score "
                   "is expected and says nothing about the real model.")
# The page's own CSS: a checkerboard behind every RGBA preview, the progress area by the buttons, the compact
# downloads row, the heights of the input and the comparison on a phone.
UI_CSS = (Path(__file__).resolve().parent / "studio" / "page.css").read_text(encoding="utf-8")
# The input and the comparison keep these heights (CSS px; page.css has a phone's): a 15:1 strip stays a strip inside
# them instead of shrinking the box to a line.
INPUT_HEIGHT = 360
COMPARISON_HEIGHT = 420
# How often the page asks what a run is doing (seconds).
PROGRESS_POLL_S = 0.5
# A new stack leaves no layer highlighted: the gallery's own Close (of the big view a click opens) clears its
# selection. (Setting the gallery's selected_index from Python would give the session its own copy of the gallery,
# whose files Gradio 6.31 then never deletes.)
DESELECT_LAYER_JS = """() => { document.querySelector('#layers .preview button[aria-label="Close"]')?.click(); }"""
NO_IMAGE_MESSAGE = "No image: upload an image (PNG, JPEG, WebP) first."
NO_LAYERS_MESSAGE = "No layers yet: decompose an image first, then select one of its layers in the gallery."
NO_SELECTION_MESSAGE = "No layer selected: click a layer in the gallery (or type its number, 1 = bottom)."
NOTHING_TO_UNDO_MESSAGE = "Nothing to undo: decompose an image first."
NO_INSTRUCTION_MESSAGE = "No edit instruction: say what to change in the layer, e.g. 'make the cup red'."


def recomposition_view(image: Any, stack: "LayerStack | None", demo: bool = False,
                       read_upload: Callable[[Any], Path] | None = None,
                       serve: Callable[[Path], str] = str) -> tuple[Any, str]:
    """The page's Input | composite pair and the score under it, for the stack the page shows now: the input at the
    composite's size (one picture exactly over the other) and the stack's composite.png (a file: the slider's download
    keeps its name), and how well the stack's layers give back the input (`recomposition_score`; after "Decompose
    this layer" or an undo, the whole new stack's). `read_upload` (bound in `build_ui`) checks the client's image
    value as the decompose handler does; `serve`: the copy of the composite a client is handed (`stack_view`)."""
    if stack is None or image is None:
        return None, ""
    check_stack_files(stack)  # its run folder deleted since: said without the server's path
    before = to_rgba(read_upload(image) if read_upload is not None else image)
    score = recomposition_score(before, stack.layers)
    width, height = stack.layers[0].size
    if before.size != (width, height):
        before = resize_layers([before], (width, height))[0]
    text = (f"**How well the layers stack back into the input** ({width}x{height}): "
            f"{score_line(score)}. Higher PSNR and lower errors are better; {PSNR_CAP_DB:.0f} dB means identical.")
    if demo:
        text += "\n\n" + DEMO_SCORE_NOTE
    return (before, serve(stack.files["composite"])), text


def example_images() -> list[str]:
    return sorted(str(p) for p in ASSETS_DIR.glob("*.png"))


def gallery_items(layer_files: list[Path], labels: LayerLabels | None = None,
                  serve: Callable[[Path], str] = str) -> list[tuple[str, str]]:
    """The gallery's (file, caption) pairs, bottom first; the numbers are the ones "Selected layer" takes, then the
    layer's name and text where they were asked for (`LayerLabels.captions`: "Layer 3: Text "ADMIT""). `serve`: the
    copy of a file a client is handed (`stack_view`)."""
    return list(zip(map(serve, layer_files), (labels or LayerLabels()).captions(len(layer_files))))


def gallery_note(stack: LayerStack | None) -> str:
    """The line under the gallery: what "Drop empty / repeated layers" did in the run shown, from its params.json
    ("4 layers asked, 3 kept (1 empty)"). Not the gallery's label: a component updated by an event becomes a session
    copy whose later result files Gradio no longer deletes at exit (tests/test_served_app.py's SIGTERM test)."""
    tidy = json.loads(Path(stack.files["params"]).read_text(encoding="utf-8")).get("tidy") if stack else None
    return tidy["summary"] if tidy else ""


# What the page shows for a stack, in the `view` outputs' order: the gallery, then one download per EXPORTS row.
StackView = NamedTuple("StackView", [("gallery", list), *((export.key, str) for export in EXPORTS)])


def stack_view(stack: LayerStack, serve: Callable[[Path], str] | None = None) -> StackView:
    """The gallery and the downloads for a stack: the files its sub-run (or first run) wrote (a failed export: an
    empty box). `serve` gives the copy a client is handed (`served_file` under `build_ui`); None: the files' paths."""
    serve = serve or str
    files = stack.files
    offered = files.get("original", files)  # the exports at the size asked for; the ZIP holds both sizes
    downloads = [(offered if e.at_original_size else files).get(e.key) for e in EXPORTS]
    return StackView(gallery_items(files["layers"], stack.labels, serve),
                     *(serve(path) if path else None for path in downloads))


def _user_error(message: str):
    """Gradio's error for the page and the API, shown until closed (gradio is imported late: see `build_ui`)."""
    import gradio as gr

    return gr.Error(message, duration=None)  # stays on the page until closed


def selected_layer(stack: LayerStack | None, layer_number) -> int:
    """The stack's index (0 = bottom) of the layer the page selected (1 = bottom); ValueError saying what to do."""
    if stack is None:
        raise ValueError(NO_LAYERS_MESSAGE)
    if layer_number is None:
        raise ValueError(NO_SELECTION_MESSAGE)
    if not float(layer_number).is_integer():
        raise ValueError(f"Layer {layer_number} is not a whole number: choose a layer from 1 (bottom) to "
                         f"{len(stack.layers)}.")
    check_layer_index(int(layer_number) - 1, len(stack.layers))
    return int(layer_number) - 1


def prune_runs(settings, sessions: "Sessions | None", just_saved: Path) -> None:
    """Apply the outputs limits after a run: never to the run just saved nor to any run a live session shows."""
    keep = (sessions.shown_folders() if sessions is not None else set()) | {Path(just_saved)}
    deleted = prune_outputs(settings.outputs, settings.outputs_max_gb * 1e9, settings.outputs_max_age_hours * 3600,
                            keep=keep)
    if deleted:
        logger.info("Deleted %d old run folder(s) (--outputs-max-gb / --outputs-max-age-hours)", len(deleted))


@contextlib.contextmanager
def guarded_job(sessions: "Sessions | None", request, doing: str, tracker: RunTracker | None = None, progress=None,
                kind: str = "decompose", shape: Shape | None = None):
    """A GPU handler's run. Yields (stop, job): the session's stop event (Stop, or the client leaving, sets it; None
    without sessions) and its `Job` on the tracker (the page's progress area; the pipeline's bars reach it through
    Gradio's `progress`). Every error becomes the client's message: a user's mistake, out of memory or a stop as it
    is, anything else through `client_error` (details in the server log, no server path on the page)."""
    session = getattr(request, "session_hash", None)
    stop = sessions.start_job(session) if sessions is not None else None
    shape = shape or Shape()
    job = tracker.begin(session, kind, shape) if tracker is not None and session is not None else Job(kind, shape)
    if progress is not None:
        tap_progress(progress, job.on_bars)
    outcome = "failed"
    try:
        yield stop, job
        outcome = "done"
    except RunStopped as err:
        outcome = "stopped"
        raise _user_error(str(err)) from err
    except (ValueError, OutOfMemoryError) as err:
        raise _user_error(str(err)) from err
    except Exception as err:  # a bug or the machine: the details stay in the server log
        raise _user_error(client_error(err, doing)) from err
    finally:
        if tracker is not None and session is not None:
            tracker.end(job, outcome)
        if sessions is not None:
            sessions.end_job(session, stop)


# The UI's handlers: module functions, bound to the pipeline and settings with functools.partial in `build_ui`
# (so a test can call them without a server). They only map widget values to `infer`/`save_run`/`decompose_layer`.
# `build_ui` also binds `sessions` (Stop, pruning), `tracker` (the progress area), `read_upload` (`readable_upload`:
# only uploads and examples may be read; a direct Python call is trusted and passes the image as it is) and `serve`
# (`served_file`: the page gets Gradio's cached copies, never the outputs folder's files), and Gradio passes `request`
# and `progress`.
def decompose_handler(loaded: Loaded, settings, run_info: dict[str, Any], image, original_size: bool = False, *,
                      sessions: "Sessions | None" = None, read_upload: Callable[[Any], Path] | None = None,
                      serve: Callable[[Path], str] | None = None, tracker: RunTracker | None = None, request=None,
                      progress=None, **params) -> tuple:
    """"Decompose": `params` are PARAMS values. Returns (*StackView, caption, seed, stack)."""
    import gradio as gr

    with guarded_job(sessions, request, "decomposing the image", tracker, progress, "decompose",
                     Shape.of(params, DEFAULTS)) as (stop, job):
        if image is None:
            raise ValueError(NO_IMAGE_MESSAGE)
        if not isinstance(original_size, bool):  # the API's "no" would be true in Python
            raise ValueError(f"original_size={original_size!r:.40} is not true or false: send a boolean")
        if read_upload is not None:
            image = read_upload(image)
        result = infer(loaded, image, stop=stop, **params)
        job.mark("export")
        name = Path(image).stem if isinstance(image, (str, Path)) else None  # the run folder's name says which image
        paths = save_run(result, settings.outputs, run_info,
                         original_size=result.params["input_size"] if original_size else None, name=name)
    for note in result.notes:
        gr.Warning(note, duration=None)  # stays on the page until closed
    if message := export_failures_message(paths["failed"]):
        gr.Warning(message, duration=None)
    logger.info("Run saved in %s (%.1f s)", paths["folder"], result.duration_s)
    if sessions is not None:
        sessions.show(request.session_hash, paths["folder"])
    prune_runs(settings, sessions, paths["folder"])
    stack = LayerStack(layers=result.layers, run_folder=paths["folder"], files=paths,
                       original_size=tuple(result.params["input_size"]) if original_size else None,
                       caption=result.caption, seed=result.seed, labels=result.labels)
    return (*stack_view(stack, serve), result.caption, result.seed, stack)


def decompose_layer_handler(loaded: Loaded, settings, run_info: dict[str, Any], layer_number,
                            stack: LayerStack | None = None, *, sessions: "Sessions | None" = None,
                            serve: Callable[[Path], str] | None = None, tracker: RunTracker | None = None,
                            request=None, progress=None, **params) -> tuple:
    """"Decompose this layer" (1 = bottom): `params` are PARAMS values. Returns (*StackView, caption, seed, stack)."""
    import gradio as gr

    with guarded_job(sessions, request, "decomposing the layer", tracker, progress, "layer",
                     Shape.of(params, DEFAULTS)) as (stop, job):
        index = selected_layer(stack, layer_number)
        new_stack, result = decompose_layer(loaded, stack, index, run_info, stop=stop, **params)
    for note in result.notes:  # e.g. the Korean OCR model not downloadable offline
        gr.Warning(note, duration=None)
    if message := export_failures_message(new_stack.files["failed"]):
        gr.Warning(message, duration=None)
    if sessions is not None:
        sessions.show(request.session_hash, new_stack.run_folder)
    prune_runs(settings, sessions, Path(new_stack.run_folder))
    logger.info("Layer %d replaced by %d sub-layers; saved in %s", layer_number, len(result.layers),
                new_stack.files["folder"])
    return (*stack_view(new_stack, serve), result.caption, result.seed, new_stack)


def undo_handler(stack: LayerStack | None = None, *, serve: Callable[[Path], str] | None = None) -> tuple:
    """"Undo": returns (*StackView, caption, seed, stack) of the stack before the last sub-run (its run's caption
    and seed, shown again)."""
    if stack is None:
        raise _user_error(NOTHING_TO_UNDO_MESSAGE)
    try:
        restored = undo(stack)
        check_stack_files(restored)
    except ValueError as err:
        raise _user_error(str(err)) from err
    return (*stack_view(restored, serve), restored.caption, restored.seed, restored)


def edit_layer_handler(settings, run_info: dict[str, Any], layer_number, instruction: str | None,
                       stack: LayerStack | None = None, *, sessions: "Sessions | None" = None,
                       serve: Callable[[Path], str] | None = None, tracker: RunTracker | None = None, request=None,
                       **tool_params) -> tuple:
    """"Edit this layer" (1 = bottom): the layer goes to the edit tool's API (`--edit-tool`: its own process and
    model, `src/tool/edit_rgba_image.py`; `tool_params`: its other parameters, else its defaults), and the edited
    layer takes its place in the stack, saved like a sub-run, with one step of undo. Returns (*StackView, caption,
    seed, stack); the caption is the instruction."""
    with guarded_job(sessions, request, "editing the layer", tracker, None, "edit") as (stop, job):
        index = selected_layer(stack, layer_number)
        instruction = check_param("prompt", instruction or "").strip()
        if not instruction:
            raise ValueError(NO_INSTRUCTION_MESSAGE)
        check_stack_files(stack)
        start = time.perf_counter()
        edited, seed, info = edit_with_tool(settings, stack.layers[index], instruction, stop, job, **tool_params)
        job.mark("export")
        result = DecomposeResult(layers=[edited], caption=instruction, auto_caption=False, seed=seed,
                                 params=dict(edit_instruction=instruction, edit_tool=settings.edit_tool,
                                             edit_note=info, seed=seed),
                                 duration_s=time.perf_counter() - start)
        new_layers = replace_layer(stack.layers, index, [edited])
        # The edited layer keeps its name (the cup is still the cup); a text read from it before no longer holds.
        name = stack.labels.name(index)
        labels = stack.labels.replaced(len(stack.layers), index, LayerLabels(names=(name,)) if name else None, 1)
        files = save_sub_run(stack, new_layers, index, result, run_info, labels)
    new_stack = LayerStack(layers=new_layers, run_folder=stack.run_folder, files=files,
                           previous=dataclasses.replace(stack, previous=None), original_size=stack.original_size,
                           caption=instruction, seed=seed, labels=labels)
    if sessions is not None:
        sessions.show(request.session_hash, new_stack.run_folder)
    prune_runs(settings, sessions, Path(new_stack.run_folder))
    logger.info("Layer %d edited by the edit tool; saved in %s", index + 1, files["folder"])
    return (*stack_view(new_stack, serve), instruction, seed, new_stack)


def edit_with_tool(settings, layer: Image.Image, instruction: str, stop: threading.Event | None, job: Job,
                   **tool_params):
    """The edit tool's `/edit` on `layer` (its defaults for the rest): (the edited RGBA layer at the layer's size, the
    seed it used, its note). Its steps go to `job`; a set `stop` leaves the tool (its run then stops at its next
    step: the tool stops a session's run when the session ends)."""
    import tempfile

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url = settings.edit_tool
    with tempfile.TemporaryDirectory(prefix=".edit-", dir=settings.outputs) as folder:
        try:
            client = Client(url, auth=settings.auth, verbose=False, download_files=folder)
        except Exception as err:  # no answer, or not a Gradio app
            logger.info("The edit tool at %s did not answer: %s", url, err)
            raise ValueError(f"The edit tool does not answer at {url}. Start it in a second terminal with "
                             f"`python src/tool/edit_rgba_image.py` (add --demo to try it without its weights), or "
                             f"point --edit-tool at where it runs.") from None
        try:
            path = Path(folder) / "layer.png"
            layer.save(path)
            submitted = client.submit(handle_file(str(path)), instruction, **tool_params, api_name="/edit")
            while not submitted.done():
                if stop is not None and stop.is_set():
                    submitted.cancel()
                    raise RunStopped(STOPPED_MESSAGE)
                bars = submitted.status().progress_data
                if bars:
                    job.mark("edit", int(bars[-1].index or 0), int(bars[-1].length or 0))
                time.sleep(0.25)
            edited_path, seed, info = submitted.result()
        except AppError as err:
            raise ValueError(f"The edit tool says: {err}") from None
        finally:
            client.close()  # the tool's session ends: a run it still has stops at its next step
        with Image.open(edited_path) as opened:
            edited = opened.convert("RGBA")
    return fit_to_canvas([edited], layer.size)[0], int(seed), str(info)


def stop_handler(sessions: "Sessions", request=None, tracker: RunTracker | None = None) -> None:
    """"Stop": the session's running job ends at its next step (Gradio's `cancels=` drops the event itself)."""
    sessions.stop(request.session_hash)
    if tracker is not None:
        tracker.stopping(request.session_hash)


def end_session_handler(sessions: "Sessions", request=None, tracker: RunTracker | None = None) -> None:
    """The page closed or the client left (`demo.unload`): its job stops, its run folder may be pruned again."""
    sessions.end(request.session_hash)
    if tracker is not None:
        tracker.forget(request.session_hash)


# The page's own steps around the API's events (private: a client calls the events above directly). A GPU event is
# `page_start` (its mistakes said at once, the buttons locked, the progress area on), the event, then `page_finish`
# (the view of the new stack, the buttons back); `page_poll` refreshes the progress area meanwhile.
def button_updates(stack: LayerStack | None, layer_number, running: bool) -> list:
    """Decompose, Stop, Decompose this layer, Undo, Edit this layer: what can be pressed now."""
    import gradio as gr

    selected = stack is not None and layer_number is not None
    return [gr.update(interactive=not running), gr.update(interactive=running),
            gr.update(interactive=selected and not running),
            gr.update(interactive=stack is not None and stack.previous is not None and not running),
            gr.update(interactive=selected and not running)]


def page_start(tracker: RunTracker, kind: str, image=None, layer_number=None, instruction=None, stack=None,
               request=None, **params) -> list:
    """Before a run: its mistakes are said now (the run does not start, nothing on the page changes), else the buttons
    lock and the progress area starts. Returns (status, timer, *buttons, the run's input)."""
    import gradio as gr

    try:
        if kind == "decompose" and image is None:
            raise ValueError(NO_IMAGE_MESSAGE)
        if kind in ("layer", "edit"):
            selected_layer(stack, layer_number)
        if kind == "edit" and not (instruction or "").strip():
            raise ValueError(NO_INSTRUCTION_MESSAGE)
        check_params(**{**DEFAULTS, **params})
    except ValueError as err:
        raise _user_error(str(err)) from err
    tracker.queue(request.session_hash, kind, Shape.of(params, DEFAULTS))
    return [status_html(tracker.status(request.session_hash)), gr.Timer(active=True),
            *button_updates(stack, layer_number, running=True), image]


def page_poll(tracker: RunTracker, stack: LayerStack | None, layer_number, request=None) -> list:
    """The progress area now; once the run has ended (a stopped run ends after its event was cancelled), the last word,
    the buttons back and the polling off. Returns (status, timer, *buttons)."""
    import gradio as gr

    status = tracker.status(request.session_hash)
    if status is not None and status.running:
        return [status_html(status), gr.skip(), *[gr.skip()] * 5]
    return [status_html(status), gr.Timer(active=False), *button_updates(stack, layer_number, running=False)]


def page_finish(tracker: RunTracker, kind: str, stack: LayerStack | None, new_input, shown_input, layer_number=None,
                *, demo: bool = False, read_upload: Callable[[Any], Path] | None = None,
                serve: Callable[[Path], str] = str, request=None) -> list:
    """After an event that may have changed the stack: the progress area's last word, the buttons back, and for a new
    stack everything that shows it (nothing selected, the comparison and score of the whole stack, the tools).
    An error or a stop leaves every output as it was. Returns (status, timer, *buttons, selected layer, comparison,
    score, layer tools, caption and seed, downloads, comparison box, the input the comparison shows). The gallery's
    highlight is cleared on the page (`DESELECT_LAYER_JS`).

    The comparison is always sent (the same pictures when the stack did not change): Gradio 6.31 answers a
    `gr.skip()` for a component by giving the session its own copy of it, whose files it then never deletes."""
    import gradio as gr

    changed, running = kind == "undo", False
    status = gr.skip()
    if kind != "undo":
        session = request.session_hash
        job = tracker.job(session)
        if job is not None and job.outcome is None and job.phase == "queued":
            tracker.end(job, "failed")  # refused before its handler began
        running = job is not None and job.outcome is None  # Stop cancelled the event; the run ends at its next step
        changed = job is not None and job.outcome == "done"
        status = status_html(tracker.status(session))
    comparison, score, shown = page_comparison(kind if changed else "kept", stack, new_input, shown_input, demo,
                                               read_upload, serve)
    if not changed:  # an error or a stop: every output as it was (the poll ends a run that is still stopping)
        return [status, gr.skip() if running else gr.Timer(active=False),
                *([gr.skip()] * 5 if running else button_updates(stack, layer_number, running=False)),
                gr.skip(), comparison, score, *[gr.skip()] * 4, shown]
    visible = gr.update(visible=True)
    return [status, gr.Timer(active=False), *button_updates(stack, None, running=False), None, comparison, score,
            visible, visible, visible, visible, shown]


def page_comparison(kind: str, stack: LayerStack | None, new_input, shown_input, demo: bool = False,
                    read_upload: Callable[[Any], Path] | None = None,
                    serve: Callable[[Path], str] = str) -> tuple[Any, str, Any]:
    """The comparison and score for the stack, and the input it compares with, kept in the page's state: a new
    decomposition's upload (read once, here: Gradio's cache lets an upload go after an hour), else the one kept."""
    if stack is None or (kind != "decompose" and shown_input is None):
        return None, "", shown_input
    try:
        if kind == "decompose":
            shown_input = to_rgba(read_upload(new_input) if read_upload is not None else new_input)
        comparison, score = recomposition_view(shown_input, stack, demo, serve=serve)
    except ValueError:  # the upload left Gradio's cache: the layers are still right
        comparison, score, shown_input = None, "The input is no longer on the server: decompose it again to compare.", None
    return comparison, score, shown_input


def selection_changed(tracker: RunTracker, stack: LayerStack | None, layer_number, request=None) -> list:
    """A layer was clicked or typed: the layer buttons follow (Decompose this layer, Edit this layer)."""
    running = tracker.running(request.session_hash)
    _, _, run_layer, _, edit = button_updates(stack, layer_number, running)
    return [run_layer, edit]


def check_upload(image, read_upload: Callable[[Any], Path] | None = None) -> None:
    """An image as soon as it is uploaded, as `infer` will read it (header first, then its pixels): a file the app
    cannot take is said now, not after a wait in the queue (the page then empties the input)."""
    if image is None:
        return
    try:
        to_rgba(read_upload(image) if read_upload is not None else image)
    except ValueError as err:
        raise _user_error(str(err)) from err


def page_nothing_to_undo(stack: LayerStack | None) -> None:
    """Undo on the page with nothing to undo (its button is greyed out then; a click can still race a run): a warning,
    and the undo does not run, so nothing on the page changes."""
    import gradio as gr

    if stack is None or stack.previous is None:
        gr.Warning(NOTHING_TO_UNDO_MESSAGE if stack is None else
                   "Nothing to undo: undo goes back one layer decomposition or edit, and there is none since the "
                   "last decomposition or undo.")
        raise gr.Error("nothing to undo", visible=False, print_exception=False)  # ends the page's chain quietly


def gradio_handler(handler: Callable, names: list[str], defaults: dict[str, Any], progress=None,
                   request: bool = False) -> Callable:
    """`handler(**values)` as Gradio calls it: positionally, one value per `inputs=` component, named `names`.

    Gradio reads the signature: its names are the API's parameter names, a None default makes a parameter
    without an initial widget value optional for gradio_client, and a `gr.Progress` default turns on the
    progress bar (handed to the handler as `progress` where it takes one). Written here (not one hand-written
    signature per handler) so that PARAMS alone decides them.
    """
    import gradio as gr

    # (`is not None`: a gr.Progress is falsy, its len() is that of its tracked iterables, 0 before a run.)
    tracked = ["progress"] if progress is not None else []
    slots = list(names) + (["request"] if request else []) + tracked
    takes_progress = "progress" in inspect.signature(handler).parameters

    def call(*args):
        values = dict(zip(slots, args))
        if not takes_progress:
            values.pop("progress", None)
        return handler(**values)

    call.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(name)) for name in names]
        # Gradio passes its `gr.Request` (the session) to a parameter annotated so; `get_type_hints` reads
        # `__annotations__`, so the annotation goes there too.
        + ([inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=gr.Request)] if request else [])
        + [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=progress) for name in tracked])
    call.__annotations__ = {"request": gr.Request} if request else {}
    call.__name__ = getattr(handler, "__name__", getattr(getattr(handler, "func", None), "__name__", "handler"))
    call.handler = handler  # what it calls (tests check the binding)
    return call


def build_ui(loaded: Loaded, settings, sessions: "Sessions | None" = None):
    """The Gradio Blocks app: widgets from PARAMS, the module's handlers bound with functools.partial.

    The layer stack (`LayerStack`) lives in a `gr.State`, one per browser session (or gradio_client `Client`).
    `sessions`: their run folders and running jobs (`main` passes its own, to stop the jobs when it stops).
    """
    # Gradio reads GRADIO_TEMP_DIR when it is imported: its cache goes in this process's folder in the outputs folder.
    use_process_cache(settings.outputs)
    import gradio as gr

    from gradio.utils import get_upload_folder

    run_info = loaded.run_info()
    # The handlers' API names and defaults: PARAMS' (the prompts' None: an empty Textbox has no value).
    names = [p.name for p in PARAMS]
    defaults = {name: None if p.type is str and not DEFAULTS[name] else DEFAULTS[name] for name, p in PARAM.items()}
    shared = [name for name in names if name not in ("layers", "prompt")]  # "Decompose this layer" has its own two
    progress = gr.Progress(track_tqdm=True)  # the pipeline's tqdm bars: the progress area's counts, an API client's
    sessions = sessions or Sessions()  # each session's shown run folder (pruning keeps it) and running job (Stop)
    tracker = RunTracker(Timings(Path(settings.outputs) / TIMINGS_FILE))  # what each session's run is doing
    examples = example_images()

    def read_upload(value) -> Path:  # the upload record lives on the Blocks, made below
        return readable_upload(value, demo.upload_file_set, get_upload_folder(), examples)

    jobs = dict(sessions=sessions, tracker=tracker)
    decompose = gradio_handler(functools.partial(decompose_handler, loaded, settings, run_info, read_upload=read_upload,
                                                 serve=served_file, **jobs),
                               ["image", *names, "original_size"], dict(defaults, original_size=False), progress,
                               request=True)
    decompose_this_layer = gradio_handler(functools.partial(decompose_layer_handler, loaded, settings, run_info,
                                                            serve=served_file, **jobs),
                                          ["layer_number", "layers", "prompt", *shared, "stack"],
                                          dict(defaults, layers=SUB_RUN_LAYERS), progress, request=True)
    undo_last = gradio_handler(functools.partial(undo_handler, serve=served_file), ["stack"], {})
    edit_this_layer = gradio_handler(functools.partial(edit_layer_handler, settings, run_info, serve=served_file, **jobs),
                                     ["layer_number", "instruction", "stack"], {}, request=True)
    stop_job = gradio_handler(functools.partial(stop_handler, sessions, tracker=tracker), [], {}, request=True)
    end_session = gradio_handler(functools.partial(end_session_handler, sessions, tracker=tracker), [], {}, request=True)

    def select_layer(evt: gr.SelectData):
        return evt.index + 1  # the gallery counts from 0, its captions (and "Selected layer") from 1

    # delete_cache: Gradio deletes its own uploads and result copies on that schedule, and all of them at exit.
    with gr.Blocks(title="Qwen-Image-Layered studio", delete_cache=gradio_cache_schedule(settings)) as demo:
        gr.Markdown("# Qwen-Image-Layered studio\nSplit an image into editable RGBA layers.", elem_classes="page-head")
        if loaded.demo:
            gr.Markdown(DEMO_BANNER, elem_classes="banner")
        if loaded.lossy:
            what = "".join(f"; {key.replace('_', ' ')} {value}" for key, value in loaded.quantized.items())
            gr.Markdown(LOSSY_BANNER.format(f"{loaded.quant.name}: {loaded.quant.summary}{what}"), elem_classes="banner")
        gr.Radio([(preset.label, preset.name) for preset in PRESETS.values()], value=loaded.preset, label="Preset",
                 info=PRESET_NOTE, interactive=False)
        with gr.Row(elem_classes="studio"):
            with gr.Column(min_width=300, elem_classes="settings"):
                image = gr.Image(label="Input image", type="filepath", image_mode=None, height=INPUT_HEIGHT,
                                 sources=["upload", "clipboard"], elem_id="input-image", elem_classes="checker")
                widgets = {"prompt": param_widget(gr, PARAM["prompt"], lines=2)}
                with gr.Row(elem_classes="main-settings"):  # the main choices, beside the prompt
                    widgets["layers"] = param_widget(gr, PARAM["layers"], min_width=160)
                    widgets["resolution"] = param_widget(gr, PARAM["resolution"], min_width=160)
                # More options of a run go in this row (e.g. a speed preset, text layers).
                with gr.Row(elem_classes="run-options"):
                    original_size = gr.Checkbox(label="Also export at the input's original size (PPTX, PSD; the ZIP "
                                                      "holds both)", value=False)
                with gr.Accordion("Advanced settings", open=False):
                    widgets.update({p.name: param_widget(gr, p) for p in PARAMS if p.advanced and p.name not in widgets})
                with gr.Row(elem_classes="design-options"):  # what the exports make of the layers (studio.design)
                    widgets.update({name: param_widget(gr, PARAM[name]) for name in DESIGN_PARAMS})
                with gr.Row(elem_classes="run-buttons"):
                    run = gr.Button("Decompose", variant="primary", scale=3)
                    stop_button = gr.Button("Stop", variant="stop", interactive=False, scale=1)
                status = gr.HTML(elem_id="run-status")  # the one progress area: phase, counts, time left
            with gr.Column(min_width=300, elem_classes="results"):
                gallery = gr.Gallery(label="Layers (bottom first; click one to select it)", columns=4,
                                     object_fit="contain", format="png", height="auto", elem_id="layers",
                                     elem_classes="checker")
                gallery_line = gr.Markdown()  # `gallery_note`: "4 layers asked, 3 kept (1 empty)"
                with gr.Group(visible=False, elem_id="layer-tools") as layer_tools:  # once there are layers
                    with gr.Row():
                        # Empty until a layer is clicked. A plain None start is drawn as 0, red under minimum=1 (Gradio
                        # 6.31 leaves a None value out of the page's config); a value from a function is sent at load.
                        layer_number = gr.Number(lambda: None, label="Selected layer (1 = bottom)", precision=0,
                                                 minimum=1, placeholder="click a layer in the gallery", min_width=140)
                        sub_layers = param_widget(gr, PARAM["layers"], value=SUB_RUN_LAYERS, label="Its layers",
                                                  info="a layer holds fewer things than the image: 2 by default",
                                                  min_width=160)
                    sub_prompt = param_widget(gr, PARAM["prompt"],
                                              label="Prompt for this layer (empty: the model captions the layer)")
                    with gr.Row():
                        run_layer = gr.Button("Decompose this layer", interactive=False)
                        undo_button = gr.Button("Undo last layer change", interactive=False)
                    with gr.Row(equal_height=True):
                        instruction = param_widget(gr, PARAM["prompt"], label="Edit instruction (the edit tool's model)",
                                                   placeholder="e.g. make the cup red", scale=3)
                        edit_button = gr.Button("Edit this layer", interactive=False, scale=1)
                with gr.Row(visible=False, elem_classes="result-info") as result_info:
                    caption = gr.Textbox(label="Caption used", interactive=False, scale=3)
                    used_seed = gr.Number(label="Seed used", interactive=False, precision=0, min_width=100)
                # One slim line per file (its name says what it is), the whole name readable.
                with gr.Column(visible=False, elem_classes="downloads", elem_id="downloads") as downloads_row:
                    downloads = [gr.File(label=export.key.upper(), show_label=False) for export in EXPORTS]
                with gr.Column(visible=False, elem_id="comparison") as comparison_box:
                    comparison = gr.ImageSlider(label="Input | composite of the layers", type="pil", format="png",
                                                interactive=False, max_height=COMPARISON_HEIGHT)
                    score_text = gr.Markdown()
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[image])
        stack = gr.State(None)  # the LayerStack the gallery shows and the downloads hold
        new_input, shown_input = gr.State(None), gr.State(None)  # a run's input; the one the comparison shows
        timer = gr.Timer(PROGRESS_POLL_S, active=False)
        view = [gallery, *downloads]  # a StackView
        results = [*view, caption, used_seed, stack]
        buttons = [run, stop_button, run_layer, undo_button, edit_button]
        quiet = dict(api_visibility="private", show_progress="hidden")  # the page's own steps, drawn nowhere
        # A run's checks go through the queue (a refusal's message reaches the page only there), never waiting in it.
        checks = dict(quiet, concurrency_limit=None)
        # An event's outputs draw no progress and no "Error" over themselves (show_progress="hidden"): the progress
        # area says what runs, and an error leaves every output as it was (its message is said once, in a toast).
        gpu = dict(show_progress="hidden", concurrency_limit=1,  # one GPU job at a time; others wait in the queue
                   concurrency_id="gpu")  # ... shared by "Decompose", "Decompose this layer" and "Edit this layer"
        finish = functools.partial(page_finish, tracker, demo=loaded.demo, read_upload=read_upload, serve=served_file)
        finish_inputs = [stack, new_input, shown_input, layer_number]
        finish_outputs = [status, timer, *buttons, layer_number, comparison, score_text, layer_tools,
                          result_info, downloads_row, comparison_box, shown_input]
        start_outputs = [status, timer, *buttons, new_input]

        def starter(kind: str, names_: list[str]):
            return gradio_handler(functools.partial(page_start, tracker, kind), names_, {}, request=True)

        def finisher(kind: str):
            return gradio_handler(functools.partial(finish, kind),
                                  ["stack", "new_input", "shown_input", "layer_number"], {}, request=True)

        run_event = run.click(
            starter("decompose", ["image", *names]), [image, *(widgets[name] for name in names)], start_outputs,
            preprocess=False, **checks,
        ).success(
            decompose,
            inputs=[image, *(widgets[name] for name in names), original_size],
            outputs=results,
            api_name="decompose",
            # The handler takes the raw values: Gradio's Image preprocess opens the upload with Pillow before the
            # handler runs, so a broken or huge file would fail there with a developer's message. Unprocessed,
            # the image arrives as Gradio's file value; Gradio checks its path only when the value carries its
            # `meta` key, so `readable_upload` checks it (uploads and examples only), then `to_rgba` decodes it with
            # the checks and messages above; `check_params` checks the numbers.
            preprocess=False,
            **gpu,
        )
        layer_inputs = [layer_number, sub_layers, sub_prompt, *(widgets[name] for name in shared), stack]
        layer_event = run_layer.click(
            starter("layer", ["layer_number", "layers", "prompt", *shared, "stack"]), layer_inputs, start_outputs,
            **checks,
        ).success(decompose_this_layer, inputs=layer_inputs, outputs=results, api_name="decompose_layer", **gpu)
        edit_inputs = [layer_number, instruction, stack]
        edit_event = edit_button.click(
            starter("edit", ["layer_number", "instruction", "stack"]), edit_inputs, start_outputs, **checks,
        ).success(edit_this_layer, inputs=edit_inputs, outputs=results, api_name="edit_layer", **gpu)
        undo_event = undo_button.click(page_nothing_to_undo, [stack], None, **quiet).success(
            undo_last, inputs=[stack], outputs=results, api_name="undo", show_progress="hidden")
        for kind, event in (("decompose", run_event), ("layer", layer_event), ("edit", edit_event)):
            event.then(finisher(kind), finish_inputs, finish_outputs, preprocess=False, **quiet)
        undo_event.success(finisher("undo"), finish_inputs, finish_outputs, preprocess=False, **quiet)
        for event in (run_event, layer_event, edit_event, undo_event):  # a new stack: no layer stays highlighted,
            event.success(None, js=DESELECT_LAYER_JS, **quiet)
            event.success(gallery_note, inputs=stack, outputs=gallery_line, **quiet)  # and what the tidy option did
        # Stop: Gradio cancels the event on the page; `stop_job` makes the pipeline itself stop at its next step
        # (a cancelled event's thread would otherwise run to the end). Not in the "gpu" queue: it must not wait.
        stop_button.click(stop_job, cancels=[run_event, layer_event, edit_event], api_name="stop",
                          concurrency_limit=None)
        timer.tick(gradio_handler(functools.partial(page_poll, tracker), ["stack", "layer_number"], {}, request=True),
                   [stack, layer_number], [status, timer, *buttons], queue=False, **quiet)
        gallery.select(select_layer, outputs=layer_number, **quiet)
        layer_number.change(gradio_handler(functools.partial(selection_changed, tracker), ["stack", "layer_number"],
                                           {}, request=True),
                            [stack, layer_number], [run_layer, edit_button], queue=False, **quiet)
        # A file the app cannot take is said when it is uploaded (and the input emptied), not after a wait in the queue.
        image.upload(functools.partial(check_upload, read_upload=read_upload), [image], None, preprocess=False,
                     **quiet).failure(lambda: None, None, image, **quiet)
        demo.unload(end_session)  # a closed page or a vanished client stops its own job the same way
    demo.queue(default_concurrency_limit=1)
    return demo


@exits_with_message
# ----------------------------------------------------------------------------------------------------
# 7. main
# ----------------------------------------------------------------------------------------------------
@exits_with_message
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command, settings, ns = parse_args(argv)
    if command == "ui" and network_warning(settings):
        logger.warning(network_warning(settings))
    if windows_path_warning(settings.outputs):
        logger.warning(windows_path_warning(settings.outputs))
    if command == "evaluate":
        return evaluate_main(settings, ns, start_pipeline, infer)
    if command == "decompose":
        # Mistakes that would fail every image are caught before the model loads.
        images = find_images(ns.images)
        if not images:
            print(terminal_safe(f"error: no images in {' '.join(ns.images)}: pass image files, or folders holding "
                                f"{', '.join(IMAGE_SUFFIXES)} files"), file=sys.stderr)
            return 2
        # (The parameters were checked by their flags' `type=`, from the same PARAMS table `infer` checks with.)
        infer_kwargs = {p.name: getattr(ns, p.name) for p in PARAMS}
        if ns.ray is not None:  # the library over a Ray cluster: this process only hands out images
            return main_ray(images, settings, ns, infer_kwargs)
    # Several GPUs: `--gpus N` starts the ranks (each runs this function again); torchrun starts them itself.
    if settings.gpus > 1 and "WORLD_SIZE" not in os.environ:
        check_gpus(settings.gpus, torch.cuda.device_count())  # ValueError: exit 2 with the message
        return launch_ranks(settings.gpus, list(sys.argv[1:] if argv is None else argv), main)
    parallel = init_distributed()
    if parallel is None or parallel.rank == 0:
        if command == "ui":  # the page's own outputs; `decompose` deletes nothing it did not write itself
            for partial in clean_partial_runs(settings.outputs):
                logger.info("Deleted %s: a run folder a stopped process left half-written", partial)
            for folder in clean_gradio_caches(settings.outputs):
                logger.info("Deleted %s: Gradio's cache of a process that no longer runs", folder)
        print_environment_info(environment_info())
    if parallel is not None:  # rank 0 finds (or builds) the weights before the other ranks look
        if parallel.rank == 0:
            get_model_path(settings)
        torch.distributed.barrier(group=parallel.job_group)
    loaded = start_pipeline(settings)  # ModelNotAvailableError, the machine's checks (VRAM, RAM): exit 2
    if parallel is not None:
        loaded.cfg_hook, applied = enable_multi_gpu(loaded.pipe, parallel)
        loaded.parallel = parallel
        loaded.optimizations += applied
        if parallel.rank != 0:  # the other ranks only follow rank 0's jobs
            serve_rank(loaded, infer)
            stop_ranks(parallel)
            return 0
    if loaded.demo:
        print("DEMO MODEL in use: tiny random weights; everything runs, but the layers are noise.")

    try:
        if command == "decompose":
            items = decompose_batch(loaded, infer, images, settings.outputs, loaded.run_info(),
                                    original_size=ns.original_size, **infer_kwargs)
            print(batch_summary(items))
            return 1 if any(item.error for item in items) else 0

        sessions = Sessions()
        demo = build_ui(loaded, settings, sessions)
        print(f"Serving on http://{settings.host}:{settings.port}")

        def stop_jobs() -> None:
            # Stopped (SIGTERM, Ctrl+C): a running job ends at its next step before the process does (a thread still
            # inside torch at exit aborted the process: "terminate called without an active exception", exit 134).
            if sessions.stop_all():
                logger.info("Stopping the running job before exiting (at most %.0f s)", SHUTDOWN_WAIT_S)

        stop_on_sigterm(first=stop_jobs)  # the job stops while Gradio closes
        # run_history off: Gradio's "Runs" page would leave the app, and its "Load run" restores the gallery but not
        # the layer stack behind it.
        demo.launch(**launch_options(settings, css=UI_CSS), run_history=False)
        stop_jobs()  # (Ctrl+C comes here)
        if _PIPELINE_LOCK.acquire(timeout=SHUTDOWN_WAIT_S):
            _PIPELINE_LOCK.release()
        delete_gradio_files(demo)
        remove_process_cache()
        return 0
    finally:
        stop_ranks(parallel)


def main_ray(images: list[Path], settings, ns: argparse.Namespace, infer_kwargs: dict) -> int:
    """`decompose ... --ray [ADDRESS]`: the images over a Ray cluster, one summary at the end."""
    if settings.gpus > 1:
        raise ValueError("--ray and --gpus do not go together: Ray gives each worker one GPU of the cluster")
    try:
        import_ray()
    except ImportError as err:  # not a USER_ERRORS type: said here, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A missing model is said once, here, before any worker starts (exit 2); every worker loads this folder.
    settings = dataclasses.replace(settings, model=str(get_model_path(settings)))
    # Ray sends functions to its workers by reference to their module: `app`'s, which the workers import from src/,
    # not this process's `__main__` (what `python src/app.py` runs).
    module = importlib.import_module("app")
    items, skipped = decompose_ray(images, settings, module.start_pipeline, module.infer, ns.ray, ns.ray_workers,
                                   ns.original_size, **infer_kwargs)
    if skipped:
        print(f"{len(skipped)} image(s) skipped: a complete run folder for each is already in {settings.outputs}")
    print(batch_summary(items))
    return 1 if any(item.error for item in items) else 0


if __name__ == "__main__":
    sys.exit(main())
