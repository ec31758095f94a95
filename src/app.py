"""Qwen-Image-Layered studio: split one image into editable RGBA layers on one consumer GPU.

The whole runtime lives in this file, top to bottom:
    1. flags            the knobs, each with its reason; command line and environment override them in `parse_args`
    2. environment      `print_environment_info`, `clear_memory`
    3. demo model       a tiny random pipeline of the real classes, for machines without the 57 GB of weights
    4. loading          `ModelSpec`, `get_model_path`, `load_pipeline`, `apply_memory_optimizations`
    4b. low-VRAM engine offload mode "budget": `plan_budget`, `enable_budget_offload` (bench/RESULTS.md)
    5. infer            `infer` (one decomposition)
    6. exports          pure functions `layers -> file`: PNG, ZIP, PPTX, PSD; `save_run` (a run folder)
    6b. layer stack     `LayerStack`, `replace_layer`, `decompose_layer`, `undo`: decompose a layer again, in place
    7. UI               `build_ui` (Gradio Blocks, port 7869)
    8. main             `python src/app.py` (UI) and `python src/app.py decompose IMG_OR_DIR...` (headless batch)

Importing this module loads no model and needs no GPU.
"""

# Environment variables that must be set before torch / huggingface_hub / gradio are imported.
import os

# Fewer fragmentation OOMs on a 24 GB card: the allocator grows segments instead of reserving new ones.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# A local tool: no usage reports to Gradio's or the hub's servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import inspect
import io
import itertools
import json
import logging
import math
import platform
import random
import re
import shutil
import sys
import time
import unicodedata
import weakref
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

# The low-VRAM engine (section 4b) builds on diffusers' hooks; importing them loads no model.
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.group_offloading import (_GROUP_OFFLOADING, GroupOffloadingConfig, GroupOffloadingHook,
                                              GroupOffloadingType, ModuleGroup)

logger = logging.getLogger("qwen_layered_studio")

# ----------------------------------------------------------------------------------------------------
# 1. Flags (defaults; `parse_args` is the one place where command line and environment override them)
# ----------------------------------------------------------------------------------------------------
ROOT_DIR = Path(__file__).resolve().parent.parent
MODEL_ID = "Qwen/Qwen-Image-Layered"  # the hub repo of the real weights (~57 GB in bf16)
MODELS_DIR = ROOT_DIR / "models"  # local weight cache, looked at before the hub; never committed
LOCAL_MODEL_DIR = MODELS_DIR / "Qwen-Image-Layered"  # where `snapshot_download` puts the weights
DEMO_MODEL_DIR = MODELS_DIR / "demo-tiny-random"  # the offline demo pipeline (~3 MB), built on first use
OUTPUTS_DIR = ROOT_DIR / "outputs"  # one folder per run, plus Gradio's upload cache
ASSETS_DIR = ROOT_DIR / "assets" / "test_images"  # example images the project made itself
HOST = "0.0.0.0"  # reachable from the LAN, like the seed; pass --host 127.0.0.1 to keep it local
PORT = 7869

# "auto" picks per machine in `resolve_offload_mode`. "off": everything on the GPU (needs ~60 GB);
# "model": whole components move to the GPU in turn (the 41 GB transformer must fit alone);
# "sequential": accelerate streams every layer from CPU (fits ~1 GB of VRAM, but ~12x slower per step);
# "budget": the low-VRAM engine (section 4b): each stage gets the GPU in turn, as many transformer blocks
# stay resident as VRAM_BUDGET_GB holds and the rest stream in ahead of use (a 24 GB card runs the
# full model near resident speed; bench/RESULTS.md has the measurements).
CPU_OFFLOAD_MODE = "auto"
# Below this much VRAM "auto" takes "sequential": the budget mode keeps the 15.4 GB text encoder resident while
# it runs (plus VAE, activations and margin), which `plan_budget` refuses below ~20 GB.
BUDGET_AUTO_MIN_VRAM_GB = 20.0
OFFLOAD_MODES = ("auto", "off", "model", "sequential", "budget")
# GB of VRAM the "budget" mode may plan for; None: the card's free memory when the model loads.
VRAM_BUDGET_GB = None
# Skip the remaining transformer blocks on a step whose first block changed less than the threshold
# (diffusers' FirstBlockCache). Trades a little fidelity for speed; 0.1 follows the seed.
ENABLE_FIRST_BLOCK_CACHE = True
FIRST_BLOCK_CACHE_THRESHOLD = 0.1
# None keeps bf16 weights. "fp8_storage" stores transformer weights in float8 and computes in bf16
# (diffusers layerwise casting): half the weight memory, LOSSY.
QUANTIZATION_MODE = None
QUANTIZATION_MODES = (None, "fp8_storage")
# SageAttention kernels through diffusers' attention dispatcher; needs the `sageattention` package.
ENABLE_SAGE_ATTENTION = False
# The VAE decodes N layers at up to 1024 px: one layer at a time (slicing) and in tiles keeps its peak low.
ENABLE_VAE_SLICING = True
ENABLE_VAE_TILING = True

# Serving. Gradio's upload route refuses bigger files before anything reads them (launch(max_file_size=...)).
MAX_UPLOAD_SIZE = "50mb"
# Optional login through Gradio's auth, "user:password" (--auth, or QIL_AUTH to keep it out of `ps`). None: no login.
AUTH = None
# Disk. After each UI run the oldest run folders are deleted until the outputs folder holds at most
# OUTPUTS_MAX_GB and nothing older than OUTPUTS_MAX_AGE_HOURS (0 turns a limit off; the newest run always stays).
# The headless `decompose` command never deletes anything.
OUTPUTS_MAX_GB = 10.0
OUTPUTS_MAX_AGE_HOURS = 24.0 * 7
# Gradio's cache (uploads, and the copies of results it serves to the page) is deleted by Gradio's own
# delete_cache after this long, or after OUTPUTS_MAX_AGE_HOURS when that is shorter.
GRADIO_CACHE_MAX_AGE_S = 3600

# Parameter ranges of the decomposition (the pipeline asserts the resolution; the rest are the UI's limits).
LAYERS_RANGE = (2, 10)
# At 1 step the scheduler's shift_terminal stretch divides by zero and every layer comes out NaN
# (seen with diffusers 0.42.1: FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal), so 2 is the minimum.
STEPS_RANGE = (2, 50)
TRUE_CFG_RANGE = (1.0, 10.0)
RESOLUTIONS = (640, 1024)
MAX_SEED = 2**31 - 1
# Input images. Pillow reads the header before any pixel, so the size is checked first: 64 MP still takes a
# full-size phone photo; a 20000x20000 image (400 MP, 1.6 GB as RGBA) is refused before it is decoded.
MAX_INPUT_PIXELS = 64_000_000
# The model works on 16 px patches of an image resized to ~640 or ~1024 px a side: a side under 16 px, or a
# strip longer than 16:1 (its short side falls under 160 px at 640; past 1600:1 the pipeline's size is 0), is refused.
MIN_INPUT_SIDE = 16
MAX_ASPECT_RATIO = 16
# The files `decompose DIR` takes from a folder (not recursive); a file named on the command line is tried
# whatever its name, so a bad one is reported instead of silently left out.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Exports (section 6). PowerPoint's default widescreen slide is 13.333 in wide; the slide's longer side
# gets (about) that length and the shorter one follows the image's aspect ratio (PowerPoint accepts 1 to 56 in).
SLIDE_LONG_SIDE_EMU = 12192000  # 914400 EMU per inch
# Layers resized to the input's original size use Lanczos, the sharpest of Pillow's filters, for the
# 1.5-4x upscales from the model's 640/1024 buckets; it runs on premultiplied alpha (no dark halo).
ORIGINAL_SIZE_RESAMPLE = Image.Resampling.LANCZOS
# Prompt text in file names is cut to this many UTF-8 bytes: readable, and far under the 255-byte name
# limit of ext4, NTFS and APFS (a Hangul or Han character takes 3 bytes).
FILE_NAME_TEXT_MAX_BYTES = 60
# The longest path the app writes inside the outputs folder, in characters: a sub-run's original-size PPTX,
# <stamp>_seed<10 digits> (37) / sub_runs / <stamp>_seed<10> (37) / original_size / <60-char text>_seed<10>_<32000x2000>.pptx
# (91), with separators: 190 (Gradio's cached copies, .gradio-cache/<64 hex>/<name>, stay under 160). Windows
# without long paths enabled stops at 259 characters, which leaves 68 for the outputs folder (`windows_path_warning`).
RUN_PATH_MAX_CHARS = 190
WINDOWS_MAX_PATH_CHARS = 259  # MAX_PATH (260) less the terminating NUL

# Text inputs are capped: the pipeline keeps the first 512 prompt tokens (its max_sequence_length), about 2,000
# English characters, so nothing longer reaches the model; a 10 MB prompt once held the only job slot for 17
# minutes and 10 GB of RAM while the tokenizer and text encoder chewed on it.
PROMPT_MAX_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class Param:
    """One decomposition parameter: `infer`'s keyword (the pipeline's name), its check, widget and CLI flag."""

    name: str  # infer's keyword argument; also the API parameter name
    default: Any  # the model card's example call
    type: type  # int, float, bool or str
    label: str  # the widget's label
    flag: str  # the `decompose` flag; for a bool, the flag that flips the default
    help: str  # the flag's help
    range: tuple | None = None  # (min, max) of a number; (0, max characters) of a text
    choices: tuple | None = None  # the accepted values, when only a few are
    step: float | None = None  # a slider's step; None: a number box
    advanced: bool = True  # in the UI's "Advanced settings"


# THE parameter table: `infer` checks its inputs with it (`check_params`), the UI builds its widgets, its
# `inputs=` lists and its handlers' arguments from it, `decompose` its flags. Its order is the API's order.
# Adding a parameter: one row here, and its use in `infer`.
PARAMS = (
    Param("prompt", "", str, "Prompt (empty: the model writes a caption)", "--prompt",
          "empty: the model writes a caption", range=(0, PROMPT_MAX_CHARS), advanced=False),
    Param("negative_prompt", " ", str, "Negative prompt", "--negative-prompt", "what the layers should not show",
          range=(0, PROMPT_MAX_CHARS)),
    Param("seed", 777, int, "Seed", "--seed", "noise seed", range=(0, MAX_SEED)),
    Param("randomize_seed", False, bool, "Randomize seed", "--randomize-seed", "draw a new seed for every image"),
    Param("true_cfg_scale", 4.0, float, "True CFG scale", "--true-cfg-scale", "prompt guidance", range=TRUE_CFG_RANGE,
          step=0.1),
    Param("num_inference_steps", 50, int, "Steps", "--steps", "denoising steps", range=STEPS_RANGE, step=1),
    Param("layers", 4, int, "Layers", "--layers", "how many RGBA layers", range=LAYERS_RANGE, step=1),
    Param("resolution", 640, int, "Resolution bucket", "--resolution", "the model's working size",
          choices=RESOLUTIONS),
    Param("cfg_normalize", True, bool, "CFG normalize", "--no-cfg-normalize", "turn off CFG normalization"),
    Param("use_en_prompt", True, bool, "English auto-caption (off: Chinese)", "--zh-caption",
          "auto-caption in Chinese instead of English"),
)
PARAM = {p.name: p for p in PARAMS}
# The defaults by name (tests and the README's server override them here; widgets and handlers read them at build).
DEFAULTS = {p.name: p.default for p in PARAMS}

# Low-VRAM engine ("budget" mode) planning figures. Sizes in GiB (GIB bytes), like torch's memory stats.
GIB = 2**30
# "auto" keeps everything on a GPU of at least this much VRAM: transformer 41 GB + text encoder 17 GB + VAE + activations.
FULL_RESIDENCY_VRAM_GB = 64
# Left free inside the budget: the allocator's cache above its allocated peak (up to 1.2 GB measured), the CUDA
# context (~0.5 GB on a 4090, outside PyTorch's allocator) and some slack. 24 GB plans for a 21 GB peak.
BUDGET_SAFETY_MARGIN_GB = 3.0
# Transformer activations while denoising, per token (image + text), and a fixed part (latents, CFG's two
# predictions). Measured on the full-size model (bench/bench_24gb.py, H100): 1.11 GB at 10,117 tokens,
# 2.76 GB at 25,093, 5.45 GB at 49,669: 115 KB per token, nothing fixed worth naming.
BUDGET_ACTIVATION_KB_PER_TOKEN = 116.0
BUDGET_ACTIVATION_FIXED_GB = 0.25
# Each job is planned for its own image tokens plus this many prompt tokens (a 512-token caption and the
# template); the largest job the UI allows (1024 bucket, 10 layers: layers + 2 frames of 64x64 tokens) must fit.
def image_tokens(layers: int, resolution: int) -> int:
    """Image tokens of one job: the layers plus two frames (input and composite), of 16 px patches at the bucket."""
    return (layers + 2) * (resolution // 16) ** 2


BUDGET_PLAN_IMAGE_TOKENS = image_tokens(LAYERS_RANGE[1], RESOLUTIONS[-1])
BUDGET_PLAN_TEXT_TOKENS = 600
# Streamed blocks on the GPU at once: the one computing and the next one arriving.
BUDGET_STREAM_BUFFERS = 2
# Text encoder activations beside its weights: the caption's prefill (image tokens + prompt), its KV cache
# and the prompt encoding's full-vocabulary logits and hidden states.
BUDGET_TEXT_ENCODER_ACTIVATION_GB = 1.5
# Host RAM left to the OS, Python and Gradio beside the page-locked weight copies.
BUDGET_HOST_RAM_RESERVE_GB = 4.0


@dataclasses.dataclass
class Settings:
    """Resolved run-time settings: the flags above after command line and environment overrides."""

    host: str = HOST
    port: int = PORT
    offload: str = CPU_OFFLOAD_MODE
    model: str | None = None  # a folder with model_index.json; None: models/ then the hub
    demo: bool = False
    outputs: Path = OUTPUTS_DIR
    models_dir: Path = MODELS_DIR
    first_block_cache: bool = ENABLE_FIRST_BLOCK_CACHE
    first_block_cache_threshold: float = FIRST_BLOCK_CACHE_THRESHOLD
    quantization: str | None = QUANTIZATION_MODE
    sage_attention: bool = ENABLE_SAGE_ATTENTION
    auth: tuple[str, str] | None = None  # (user, password) for Gradio's login; None: no login
    max_upload_size: str | int = MAX_UPLOAD_SIZE  # Gradio's max_file_size: "50mb", or bytes
    outputs_max_gb: float = OUTPUTS_MAX_GB  # 0: no size limit
    outputs_max_age_hours: float = OUTPUTS_MAX_AGE_HOURS  # 0: no age limit
    vram_budget_gb: float | None = VRAM_BUDGET_GB  # "budget" mode only


def _env(name: str, default: Any) -> Any:
    """Environment override `QIL_<NAME>` for a flag default, parsed to the default's type."""
    raw = os.environ.get(f"QIL_{name}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)(raw)
    if isinstance(default, Path):
        return Path(raw)
    return raw


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offload", default=_env("OFFLOAD", CPU_OFFLOAD_MODE), choices=OFFLOAD_MODES,
                        help="CPU offload mode (default: %(default)s)")
    parser.add_argument("--model", default=_env("MODEL", None),
                        help="folder holding the pipeline (model_index.json); default: models/, then the hub")
    parser.add_argument("--demo", action="store_true", default=_env("DEMO", False),
                        help="use the tiny random demo pipeline (offline; its layers are noise)")
    parser.add_argument("--outputs", type=Path, default=_env("OUTPUTS", OUTPUTS_DIR), help="run folders go here")
    parser.add_argument("--models-dir", type=Path, default=_env("MODELS_DIR", MODELS_DIR),
                        help="local weight cache (default: %(default)s)")
    parser.add_argument("--no-first-block-cache", dest="first_block_cache", action="store_false",
                        default=_env("FIRST_BLOCK_CACHE", ENABLE_FIRST_BLOCK_CACHE))
    parser.add_argument("--first-block-cache-threshold", type=float,
                        default=_env("FIRST_BLOCK_CACHE_THRESHOLD", FIRST_BLOCK_CACHE_THRESHOLD))
    parser.add_argument("--quantization", default=_env("QUANTIZATION", QUANTIZATION_MODE),
                        choices=[m for m in QUANTIZATION_MODES if m], help="fp8_storage is lossy")
    parser.add_argument("--sage-attention", action="store_true", default=_env("SAGE_ATTENTION", ENABLE_SAGE_ATTENTION))
    parser.add_argument("--vram-budget", dest="vram_budget_gb", type=float, metavar="GB",
                        default=_env("VRAM_BUDGET", VRAM_BUDGET_GB),
                        help="VRAM the budget offload mode may use (default: the GPU's free memory)")


def _add_param_args(parser: argparse.ArgumentParser) -> None:
    """One flag per row of PARAMS (`dest` is the row's name); a bool's flag flips its default."""
    for p in PARAMS:
        if p.type is bool:
            parser.add_argument(p.flag, dest=p.name, action="store_false" if p.default else "store_true",
                                default=p.default, help=p.help)
            continue
        limits = f" ({p.range[0]:g} to {p.range[1]:g})" if p.range and p.type is not str else ""
        parser.add_argument(p.flag, dest=p.name, type=_param_arg(p), default=p.default, choices=p.choices,
                            help=f"{p.help}{limits} (default: %(default)r)")


def _param_arg(p: "Param") -> Callable[[str], Any]:
    """argparse `type=` for a row: parsed and checked by `check_param`, so the CLI says what the API says."""
    def parse(text: str) -> Any:
        try:
            value = {int: int, float: float, str: str}[p.type](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a number' if p.type is float else 'a whole number'}") from None
        try:
            return check_param(p.name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = p.type.__name__
    return parse


def parse_args(argv: list[str] | None = None) -> tuple[str, Settings, argparse.Namespace]:
    """The one place where command line (`argv`) and environment (`QIL_*`) override the flags above.

    Returns (command, settings, namespace): command is "ui" or "decompose".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "decompose":
        command, argv = "decompose", argv[1:]
        parser = argparse.ArgumentParser(prog="app.py decompose", description=(
            "Decompose images headless: the model loads once, every image gets its own run folder, a file "
            "that fails is reported and skipped; the exit code is 1 when any failed."))
        parser.add_argument("images", nargs="+", metavar="IMG_OR_DIR",
                            help="image files, or folders whose " + "/".join(IMAGE_SUFFIXES) + " files are taken")
        _add_param_args(parser)
        parser.add_argument("--out", type=Path, default=None, help="outputs folder (default: --outputs)")
        parser.add_argument("--original-size", action="store_true",
                            help="also export the layers resized to the input's size (run folder's original_size/)")
    else:
        command = "ui"
        parser = argparse.ArgumentParser(prog="app.py", description="Qwen-Image-Layered studio (Gradio UI).")
        parser.add_argument("--host", default=_env("HOST", HOST))
        parser.add_argument("--port", type=int, default=_env("PORT", PORT))
        parser.add_argument("--auth", default=_env("AUTH", AUTH), metavar="USER:PASSWORD",
                            help="ask for this login (Gradio's auth); QIL_AUTH keeps it off the command line")
        parser.add_argument("--max-upload-size", default=_env("MAX_UPLOAD_SIZE", MAX_UPLOAD_SIZE),
                            help="larger uploads are refused, e.g. 50mb, 2gb (default: %(default)s)")
        parser.add_argument("--outputs-max-gb", type=float, default=_env("OUTPUTS_MAX_GB", OUTPUTS_MAX_GB),
                            help="delete the oldest run folders beyond this size; 0: no limit (default: %(default)s)")
        parser.add_argument("--outputs-max-age-hours", type=float,
                            default=_env("OUTPUTS_MAX_AGE_HOURS", OUTPUTS_MAX_AGE_HOURS),
                            help="delete run folders older than this; 0: no limit (default: %(default)s)")
    _add_common_args(parser)
    ns = parser.parse_args(argv)
    auth = getattr(ns, "auth", None)
    if auth is not None:
        user, _, password = auth.partition(":")
        if not user or not password:
            parser.error("--auth / QIL_AUTH must be USER:PASSWORD, both non-empty (e.g. --auth alice:s3cret)")
        auth = (user, password)
    for flag in ("outputs_max_gb", "outputs_max_age_hours"):
        if getattr(ns, flag, 0) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(ns, flag)} is negative: use 0 for no limit, or a positive number")
    ns.auth = auth
    return command, settings_from_args(ns), ns


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Settings from a parser that has `_add_common_args` (the app's, or a tool's with its own --host/--port)."""
    return Settings(
        host=getattr(ns, "host", HOST),
        port=getattr(ns, "port", PORT),
        offload=ns.offload,
        model=ns.model,
        demo=ns.demo,
        outputs=Path(getattr(ns, "out", None) or ns.outputs),
        models_dir=Path(ns.models_dir),
        first_block_cache=ns.first_block_cache,
        first_block_cache_threshold=ns.first_block_cache_threshold,
        quantization=ns.quantization,
        sage_attention=ns.sage_attention,
        auth=getattr(ns, "auth", None),  # parse_args has turned USER:PASSWORD into (user, password)
        max_upload_size=getattr(ns, "max_upload_size", MAX_UPLOAD_SIZE),
        outputs_max_gb=getattr(ns, "outputs_max_gb", OUTPUTS_MAX_GB),
        outputs_max_age_hours=getattr(ns, "outputs_max_age_hours", OUTPUTS_MAX_AGE_HOURS),
        vram_budget_gb=ns.vram_budget_gb,
    )


# ----------------------------------------------------------------------------------------------------
# 2. Environment
# ----------------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def print_environment_info(print_it: bool = True) -> dict[str, Any]:
    """What this machine offers the model; printed once at start-up and stored in every params.json."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "gradio": _version("gradio"),
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
    if print_it:
        width = max(len(k) for k in info)
        print("Environment:")
        for key, value in info.items():
            print(f"  {key:<{width}}  {value}")
        if not info["cuda_available"]:
            print("  No CUDA GPU found: the app runs on the CPU in float32, which is very slow for the real model.")
    return info


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


def clear_memory() -> None:
    """Free Python garbage and, when there is a GPU, the CUDA caching allocator's unused blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


# ----------------------------------------------------------------------------------------------------
# 3. Demo model: the real classes at toy size, random weights, built offline
# ----------------------------------------------------------------------------------------------------
# Qwen's special tokens the pipeline's prompt templates use.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


# The layered pipeline's caption and prompt templates: the demo tokenizer learns its merges from them.
LAYERED_DEMO_CORPUS = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                       "relationships of the objects and background. You are a helpful assistant. Image Annotator.")


def build_demo_components(corpus: str) -> dict[str, Any]:
    """The parts every tiny Qwen-Image pipeline shares: tokenizer, Qwen2.5-VL text encoder, processor, scheduler.

    Used by `build_demo_pipeline` here and by the edit tool's demo builder (src/tool/edit_rgba_image.py).
    Seeds torch, so every machine builds the same demo weights; build the pipeline's own models right after.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    # 1. A byte-level BPE tokenizer (Qwen2's kind) trained on the pipeline's own templates.
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    # 2. The text encoder. Seeded, so every machine builds the same demo weights.
    torch.manual_seed(0)
    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
                       rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                         window_size=28)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])).eval()
    # The caption sees at most 112x112 px (16 vision tokens) so a 512-token caption stays ~2 s on a CPU.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor)
    # 3. The published scheduler config of Qwen-Image (Qwen-Image-Edit-2509 ships the same one).
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, processor=processor, scheduler=scheduler)


def save_demo_pipeline(pipe, path: Path, note: str) -> Path:
    """Save next to the target, then rename: a half-written folder is never taken for a model."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    pipe.save_pretrained(partial)
    (partial / "DEMO_MODEL.txt").write_text(note + "\n")
    partial.rename(path)
    return path


def build_demo_pipeline(path: Path) -> Path:
    """Build (once) a tiny random QwenImageLayeredPipeline of the real classes and save it to `path`.

    It loads through the same `from_pretrained` path as the real weights, so everything but the output
    quality is exercised: its layers are noise. Cached: an existing `model_index.json` means done.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    from diffusers import AutoencoderKLQwenImage, QwenImageLayeredPipeline, QwenImageTransformer2DModel

    logger.info("Building the tiny demo pipeline in %s", path)
    # 1. Tokenizer, text encoder, processor and scheduler (seeds torch: the weights below follow from it).
    components = build_demo_components(LAYERED_DEMO_CORPUS)
    # 2. The real DiT's switches (layer-3D RoPE, the RGB/RGBA t-cond), at 4 blocks of width 32 (enough blocks
    #    for FirstBlockCache to have a tail to skip). in_channels = 4 * z_dim: latents are packed in 2x2 patches.
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=32, out_channels=8, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), use_additional_t_cond=True, use_layer3d_rope=True)
    # RGBA in (input_channels=4). z_dim must differ from 4: the pipeline tells images from latents by channels.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], input_channels=4,
                                 latents_mean=[0.0] * 8, latents_std=[1.0] * 8)

    # 3. Save (atomically).
    pipe = QwenImageLayeredPipeline(vae=vae, transformer=transformer, **components)
    return save_demo_pipeline(pipe, path, "Tiny random Qwen-Image-Layered pipeline built by src/app.py --demo. "
                                          "Its layers are noise.")


def is_demo_model(path: Path | str) -> bool:
    return (Path(path) / "DEMO_MODEL.txt").is_file()


# ----------------------------------------------------------------------------------------------------
# 4. Loading
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


LAYERED_MODEL = ModelSpec(model_id=MODEL_ID, local_dir_name=LOCAL_MODEL_DIR.name,
                          pipeline_class="QwenImageLayeredPipeline", build_demo=build_demo_pipeline,
                          demo_dir_name=DEMO_MODEL_DIR.name, download_size="~57 GB")


class ModelNotAvailableError(RuntimeError):
    """No local weights and the hub could not provide them. The message says what to do."""


class TorchWithoutCudaError(ModelNotAvailableError):
    """The machine has an NVIDIA GPU that torch cannot use; the message gives the fix (`main` prints it, exit 2)."""


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
    """TF32 matmuls and cuDNN autotuning. Flash SDPA stays as PyTorch chose (on)."""
    if not torch.cuda.is_available():
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return ["tf32", "cudnn_benchmark"]


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
        return Path(snapshot_download(spec.model_id, local_dir=local))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelNotAvailableError(offline_message(models_dir, spec) + f"\n  (hub error: {type(err).__name__})") from err


def get_model_path(settings: Settings, spec: ModelSpec = LAYERED_MODEL) -> Path:
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


def resolve_offload_mode(mode: str, cuda_available: bool, vram_gb: float | None) -> str:
    """Turn "auto" into a concrete mode for this machine; check an explicit one."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode {mode!r} is not one of {OFFLOAD_MODES}")
    if not cuda_available:
        if mode == "budget":  # the same hooks with every weight on the CPU: nothing moves (CI tests it this way)
            logger.info("Offload mode 'budget' without a CUDA GPU: everything stays on the CPU.")
            return "budget"
        if mode not in ("auto", "off"):
            logger.warning("Offload mode %r needs a CUDA GPU; none found, running everything on the CPU.", mode)
        return "off"
    if mode != "auto":
        return mode
    if vram_gb >= FULL_RESIDENCY_VRAM_GB:
        return "off"
    if vram_gb >= BUDGET_AUTO_MIN_VRAM_GB:
        return "budget"  # the low-VRAM engine (section 4b)
    return "sequential"  # the text encoder alone does not fit resident: stream every layer


def default_vram_budget_gb(settings: Settings) -> float:
    """--vram-budget, else the GPU's free memory now (the whole budget when there is no GPU: nothing moves)."""
    if settings.vram_budget_gb is not None:
        return float(settings.vram_budget_gb)
    if not torch.cuda.is_available():
        return float("inf")
    return torch.cuda.mem_get_info()[0] / GIB


def apply_memory_optimizations(pipe, settings: Settings, offload_mode: str) -> list[str]:
    """Apply offload, VAE, cache and attention features, one line each; return what was applied by name.

    A feature that cannot apply is logged with its reason (never swallowed).
    """
    applied: list[str] = []
    on_cuda = torch.cuda.is_available()

    # 1. Weight storage (before offloading, so offload hooks move the smaller tensors).
    if settings.quantization == "fp8_storage":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=pipe.transformer.dtype)
        applied.append("fp8_storage (LOSSY: transformer weights stored in float8)")
    elif settings.quantization is not None:
        raise ValueError(f"quantization {settings.quantization!r} is not one of {QUANTIZATION_MODES}")

    # 2. Where the weights live.
    if offload_mode == "off":
        pipe.to("cuda" if on_cuda else "cpu")
        applied.append("resident_on_" + ("cuda" if on_cuda else "cpu"))
    elif offload_mode == "model":
        pipe.enable_model_cpu_offload()  # text_encoder -> transformer -> vae, whole components in turn
        applied.append("model_cpu_offload")
    elif offload_mode == "sequential":
        pipe.enable_sequential_cpu_offload()  # accelerate hooks stream each layer's weights
        applied.append("sequential_cpu_offload")
    elif offload_mode == "budget":
        applied += enable_budget_offload(pipe, default_vram_budget_gb(settings))  # section 4b
    else:
        raise ValueError(f"offload mode {offload_mode!r} is not one of {OFFLOAD_MODES[1:]}")

    # 3. VAE: decode one layer at a time, and in tiles.
    if ENABLE_VAE_SLICING:
        pipe.vae.enable_slicing()
        applied.append("vae_slicing")
    if ENABLE_VAE_TILING and not on_cuda:
        # Tiling only saves GPU memory; on the CPU it costs time (measured on the demo models, 2 cores:
        # a 2-step 640 layered run 57 s tiled vs 31 s untiled; one 1248x832 edit encode+decode 66 s vs 20 s).
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
    if settings.sage_attention:
        if sage_attention_unavailable(on_cuda):
            logger.warning(sage_attention_unavailable(on_cuda))
        else:
            pipe.transformer.set_attention_backend("sage")
            applied.append("sage_attention")
    return applied


def sage_attention_unavailable(on_cuda: bool) -> str | None:
    """Why SageAttention cannot apply on this machine; None when it can."""
    if not on_cuda:
        return "SageAttention not applied: it needs a CUDA GPU."
    if _version("sageattention") is None:
        return "SageAttention not applied: the `sageattention` package is not installed (pip install sageattention)."
    if not triton_available():  # its kernels are Triton kernels
        return ("SageAttention not applied: it needs Triton, which is not installed (pip install triton; on Windows "
                "pip install triton-windows).")
    return None


def load_pipeline(settings: Settings, spec: ModelSpec = LAYERED_MODEL):
    """Load `spec`'s pipeline (bf16 on CUDA, float32 on CPU) and apply the memory features."""
    import diffusers

    # 0. A GPU that torch cannot use is said with the fix, not silently replaced by the CPU.
    check_torch_sees_gpu(settings.demo)
    # 1. Find the weights (raises ModelNotAvailableError with what to do).
    model_path = get_model_path(settings, spec)
    # 2. Pick the dtype: bf16 is the model's dtype; PyTorch's CPU bf16 convolutions are ~20x slower than
    #    float32 (measured: a 2-step demo run took 214 s in bf16, 11 s in float32), so the CPU uses float32.
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    vram_gb = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None
    offload_mode = resolve_offload_mode(settings.offload, cuda, vram_gb)
    if offload_mode == "budget":  # say it before loading: the page-locked copies need the RAM
        check_host_ram(pipeline_weight_gb(model_path))
    setup_cuda_optimizations()
    # 3. Load through from_pretrained, the same path for the real and the demo weights.
    start = time.perf_counter()
    pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(model_path, dtype=dtype)
    applied = apply_memory_optimizations(pipe, settings, offload_mode)
    # Attach what the run folders record.
    pipe._studio_info = dict(model_path=str(model_path), offload_mode=offload_mode, dtype=str(dtype).replace("torch.", ""),
                             optimizations=applied, demo=is_demo_model(model_path))
    logger.info("Loaded %s in %.1f s (offload=%s, dtype=%s)", model_path, time.perf_counter() - start, offload_mode, dtype)
    for name in applied:
        logger.info("  applied: %s", name)
    if pipe._studio_info["demo"]:
        logger.warning("DEMO MODEL in use: tiny random weights, the layers are noise.")
    return pipe


# ----------------------------------------------------------------------------------------------------
# 4b. Low-VRAM engine: offload mode "budget"
# ----------------------------------------------------------------------------------------------------
# A decomposition runs in stages, and each stage has the GPU to itself:
#   "text_encoder"  caption + prompt encoding with all 8.3B weights resident (16.6 GB: they fit a 24 GB card);
#   "transformer"   as many of the 60 blocks resident as the budget holds after this job's activations; each
#                   other block is copied in on a side CUDA stream while the blocks before it compute (diffusers'
#                   group offloading ModuleGroup + GroupOffloadingHook, one block per group, chained in block
#                   order). Measured at a 24 GB cap (H100): 28 of 60 resident at 640 px / 4 layers, 1.04x the
#                   all-resident forward, bitwise equal output;
#   "vae"           encode and decode (the VAE's 0.25 GB stay on the GPU throughout).
# Off the GPU, each model's weights live in one page-locked host buffer: entering a stage is one copy at PCIe
# speed, leaving it is free (the GPU copy is dropped; the host copy never changes).
# FirstBlockCache's hooks wrap ours: a step it skips never calls the later blocks, so none of their weights
# move (bench/bench_24gb.py counts block calls and bytes moved).
_PAGE_BYTES = 4096  # cudaHostRegister locks whole pages
_TENSOR_ALIGN_BYTES = 512  # each tensor starts aligned inside the host buffer: full-speed copies, any dtype
_START_STREAMING_HOOK = "budget_start_streaming"


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """How the "budget" mode shares the GPU; `plan_budget` computes it. Sizes in GiB."""

    vram_budget_gb: float
    resident_blocks: tuple[int, ...]  # transformer blocks that stay on the GPU while denoising
    streamed_blocks: tuple[int, ...]  # transformer blocks copied in just ahead of use
    image_tokens: int  # the job the plan leaves activation room for
    denoise_peak_gb: float  # predicted allocator peak while denoising that job
    text_encoder_peak_gb: float  # predicted allocator peak while captioning / encoding the prompt
    host_ram_gb: float  # page-locked host copies of the transformer and the text encoder

    def describe(self) -> str:
        blocks = len(self.resident_blocks) + len(self.streamed_blocks)
        return (f"budget {self.vram_budget_gb:g} GB: {len(self.resident_blocks)}/{blocks} transformer blocks resident, "
                f"{len(self.streamed_blocks)} streamed; predicted peak {self.denoise_peak_gb:.1f} GB denoising "
                f"{self.image_tokens} image tokens, {self.text_encoder_peak_gb:.1f} GB encoding text; "
                f"{self.host_ram_gb:.1f} GB of page-locked host RAM")


def activation_gb(tokens: int) -> float:
    """Planned transformer activation memory (GiB) for a forward over `tokens` image + text tokens."""
    return BUDGET_ACTIVATION_FIXED_GB + tokens * BUDGET_ACTIVATION_KB_PER_TOKEN * 1024 / GIB


def streamed_block_indices(num_blocks: int, num_resident: int) -> tuple[int, ...]:
    """Which blocks stream: spread evenly, so each copy overlaps the compute of the resident blocks before it.

    Block 0 always stays (FirstBlockCache decides from its output); block 1 too when it can: its start
    begins the first copy, and it runs only on steps FirstBlockCache computes.
    """
    num_streamed = num_blocks - num_resident
    if num_streamed <= 0:
        return ()
    candidates = range(2 if num_resident >= 2 else 1, num_blocks)
    return tuple(candidates[int((i + 0.5) * len(candidates) / num_streamed)] for i in range(num_streamed))


def plan_budget(
    vram_budget_gb: float,
    *,
    block_gb: float,
    num_blocks: int,
    other_transformer_gb: float,
    text_encoder_gb: float,
    vae_gb: float,
    image_tokens: int = BUDGET_PLAN_IMAGE_TOKENS,
    resident_blocks: int | None = None,
) -> BudgetPlan:
    """How many transformer blocks stay on the GPU within `vram_budget_gb`. Pure arithmetic on sizes (GiB).

    Raises ValueError naming the minimum budget when the text encoder cannot be resident, or when not even
    one transformer block fits beside the streamed ones. `resident_blocks` overrides the count (tests, tuning).
    """
    # 1. What the denoising stage holds besides its resident blocks: the transformer's other layers, the VAE,
    #    activations for the planned job, and the margin. Streaming adds two blocks in flight.
    fixed = other_transformer_gb + vae_gb + activation_gb(image_tokens + BUDGET_PLAN_TEXT_TOKENS) + BUDGET_SAFETY_MARGIN_GB
    streaming = BUDGET_STREAM_BUFFERS * block_gb
    text_encoder_peak = text_encoder_gb + vae_gb + BUDGET_TEXT_ENCODER_ACTIVATION_GB

    # 2. The minimum: the whole text encoder resident; block 0 resident and the others streamed.
    minimum = max(fixed + block_gb + (streaming if num_blocks > 1 else 0.0),
                  text_encoder_peak + BUDGET_SAFETY_MARGIN_GB)
    if vram_budget_gb < minimum:
        raise ValueError(
            f"--vram-budget {vram_budget_gb:g} GB is too small for the budget offload mode: it needs at least "
            f"{minimum:.1f} GB (the {text_encoder_gb:.1f} GB text encoder resident while it runs; one transformer "
            f"block resident and {BUDGET_STREAM_BUFFERS} streaming, activations for {image_tokens} image tokens, and "
            f"a {BUDGET_SAFETY_MARGIN_GB:g} GB margin). Pass --vram-budget {math.ceil(minimum)} or more, or use "
            f"--offload sequential (fits ~1 GB, about 12x slower per step).")

    # 3. As many resident blocks as fit. With all of them resident nothing streams and no buffers are needed.
    if fixed + num_blocks * block_gb <= vram_budget_gb:
        count = num_blocks
    else:
        count = min(num_blocks - 1, int((vram_budget_gb - fixed - streaming) // block_gb))
    if resident_blocks is not None:
        if not 1 <= resident_blocks <= num_blocks:
            raise ValueError(f"resident_blocks={resident_blocks} is out of range: use 1 to {num_blocks}")
        count = resident_blocks
    streamed = streamed_block_indices(num_blocks, count)
    return BudgetPlan(
        vram_budget_gb=vram_budget_gb,
        resident_blocks=tuple(i for i in range(num_blocks) if i not in streamed),
        streamed_blocks=streamed,
        image_tokens=image_tokens,
        denoise_peak_gb=fixed - BUDGET_SAFETY_MARGIN_GB + count * block_gb + (streaming if streamed else 0.0),
        text_encoder_peak_gb=text_encoder_peak,
        host_ram_gb=other_transformer_gb + num_blocks * block_gb + text_encoder_gb,
    )


def pipeline_weight_gb(model_path: Path | str) -> float:
    """GiB of transformer + text encoder weights in a diffusers folder, read from the file sizes (before loading)."""
    files = [f for sub in ("transformer", "text_encoder") for f in (Path(model_path) / sub).glob("*.safetensors")]
    return sum(f.stat().st_size for f in files) / GIB


def check_host_ram(needed_gb: float, available_gb: float | None = None) -> None:
    """Raise before loading when host RAM cannot hold the page-locked weight copies of the budget mode."""
    if available_gb is None:
        import psutil

        available_gb = psutil.virtual_memory().available / GIB
    if needed_gb + BUDGET_HOST_RAM_RESERVE_GB > available_gb:
        raise ValueError(
            f"The budget offload mode keeps page-locked copies of the weights in host RAM: it needs {needed_gb:.1f} GB "
            f"plus {BUDGET_HOST_RAM_RESERVE_GB:g} GB for the system, and {available_gb:.1f} GB is available. Close other "
            f"programs or add RAM; --quantization fp8_storage halves the transformer's share (lossy).")


def _module_gb(*modules: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in itertools.chain(m.parameters(), m.buffers())) / GIB


def _page_lock(flat: torch.Tensor) -> bool:
    """Page-lock a host buffer in place (cudaHostRegister); False, with a warning, when the driver refuses."""
    size = -(-flat.numel() // _PAGE_BYTES) * _PAGE_BYTES
    error = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), size, 0))
    if error != 0:
        logger.warning("Could not page-lock %.1f GB of host weight copies (cudaError %d): stage changes copy at pageable "
                       "speed and diffusers pins its own copies of the streamed blocks (~1.6x their size in RAM).",
                       size / GIB, error)
    return error == 0


def _host_copies(module: torch.nn.Module, on_cuda: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move every parameter and buffer of `module` into one page-locked host buffer; return (tensor, host) pairs.

    Not `tensor.pin_memory()` per tensor, as diffusers' group offloading does: PyTorch's pinned allocator rounds
    each request up to a power of two, ~1.6x the RAM for this model's 19-113 MB weights (a 75 MB MLP weight
    takes 128 MB). One buffer locked in place costs exactly the weights' size, and diffusers' ModuleGroup takes
    an already pinned tensor as its host copy. Done once per module: a second call finds the buffer in place.
    Without CUDA each tensor is its own host copy (nothing moves; a copy's new alignment alone can change
    CPU matmul rounding, and "budget" must equal "off" there).
    """
    tensors = list({id(t): t for t in itertools.chain(module.parameters(), module.buffers())}.values())
    if not on_cuda:
        return [(t, t.data) for t in tensors]
    existing = getattr(module, "_budget_host_copies", None)
    if existing is not None and len(existing["pairs"]) == len(tensors) and all(
            t is old and t.data_ptr() == host.data_ptr() for (old, host), t in zip(existing["pairs"], tensors)):
        return existing["pairs"]

    # 1. One buffer, each tensor at an aligned offset, the start page-aligned for cudaHostRegister.
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _TENSOR_ALIGN_BYTES) * _TENSOR_ALIGN_BYTES
    raw = torch.empty(total + 2 * _PAGE_BYTES, dtype=torch.uint8)
    start = -raw.data_ptr() % _PAGE_BYTES
    flat = raw[start : start + total]
    # 2. Lock before copying when the weights come from the GPU (the copies then run at full PCIe speed), after
    #    copying when they come from host RAM (the old tensors are freed one by one: the weights never exist twice).
    from_gpu = any(t.is_cuda for t in tensors)
    locked = from_gpu and _page_lock(flat)
    pairs = []
    for tensor, offset in zip(tensors, offsets):
        host = flat[offset : offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor.data)
        tensor.data = host
        pairs.append((tensor, host))
    if not from_gpu:
        locked = _page_lock(flat)
    if locked:  # unlock before the memory goes back to the system
        weakref.finalize(flat, torch.cuda.cudart().cudaHostUnregister, flat.data_ptr())
    module._budget_host_copies = dict(pairs=pairs, flat=flat, locked=locked)
    return pairs


class _BudgetStages:
    """Which stage's weights are on the GPU, and which transformer blocks stream for the job at hand.

    `enter(stage)` switches stages; the transformer's stage is planned per job (its image tokens), so a 640 px
    job keeps more blocks resident than the largest one. `release()` sends everything back and empties the GPU.
    """

    def __init__(self, device: torch.device, plan_for: Callable[[int], BudgetPlan], weights: dict[str, list],
                 block_weights: list[list], hooks: dict, start_hook, stream: "torch.cuda.Stream | None"):
        self.device = device
        self.plan_for = plan_for  # image tokens -> BudgetPlan
        self.weights = weights  # "transformer" (all but its blocks), "text_encoder": [(tensor, host copy)]
        self.block_weights = block_weights  # per transformer block: [(tensor, host copy)]
        self.hooks = hooks  # block index (1 on) -> its group-offloading hook
        self.start_hook = start_hook
        self.stream = stream
        self.plan: BudgetPlan | None = None  # the current job's split
        self.current: str | None = None
        self.stage_bytes = 0  # copied to the GPU by stage changes so far (for logs and the benchmark)
        self.undo: list[Callable[[], None]] = []  # what `disable_budget_offload` runs

    @property
    def streamed_groups(self) -> list:
        return [hook.group for hook in self.hooks.values()]

    def enter(self, stage: str, image_tokens: int | None = None) -> None:
        same_job = self.plan is not None and image_tokens in (None, self.plan.image_tokens)
        if stage == self.current and (stage != "transformer" or same_job):
            return
        self.release()
        weights = list(self.weights.get(stage, ()))
        if stage == "transformer":
            self._split(image_tokens if image_tokens is not None else BUDGET_PLAN_IMAGE_TOKENS)
            weights += [pair for i in self.plan.resident_blocks for pair in self.block_weights[i]]
        for tensor, host in weights:
            tensor.data = host.to(self.device, non_blocking=True)
            self.stage_bytes += host.numel() * host.element_size()
        self.current = stage

    def _split(self, image_tokens: int) -> None:
        """Plan this job: resident blocks skip their hooks; the streamed ones are chained in block order."""
        if self.plan is None or self.plan.image_tokens != image_tokens:
            self.plan = self.plan_for(image_tokens)
            logger.info("Low-VRAM engine, this job: %s", self.plan.describe())
        streamed = [self.hooks[i] for i in self.plan.streamed_blocks]
        for hook in self.hooks.values():
            hook.resident = hook not in streamed
            hook.next_group = None
            # Started by the streamed block before it. The first one: by block 1 (the start hook), or, when
            # block 1 streams too, by diffusers' own fallback (a synchronous copy on first use).
            hook.group.onload_self = False
        for hook, next_hook in zip(streamed, streamed[1:]):
            hook.next_group = next_hook.group
        self.start_hook.group = streamed[0].group if streamed else None

    def release(self) -> None:
        """Every weight back to its host copy (also after an error mid-run) and the allocator's cache emptied."""
        if self.stream is not None:
            self.stream.synchronize()  # a block copy may still be in flight
        for weights in [*self.weights.values(), *self.block_weights]:
            for tensor, host in weights:
                tensor.data = host
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.current = None


class PageLockedModuleGroup(ModuleGroup):
    """A ModuleGroup whose host copies are the page-locked buffer as it is. torch's `is_pinned()` does not see
    memory locked with cudaHostRegister (torch 2.11: False, while copies from it ran at 54 GB/s), so plain
    ModuleGroup pins a second, power-of-two-rounded copy of every weight (measured: +40 GB of RAM, +40 s)."""

    def _init_cpu_param_dict(self):
        return {t: t.data for m in self.modules for t in itertools.chain(m.parameters(), m.buffers())}

    @contextlib.contextmanager
    def _pinned_memory_tensors(self):
        yield self.cpu_param_dict


class BudgetBlockHook(GroupOffloadingHook):
    """diffusers' group-offloading hook that stands aside while its block is resident for the current job."""

    resident = False

    def pre_forward(self, module, *args, **kwargs):
        return (args, kwargs) if self.resident else super().pre_forward(module, *args, **kwargs)

    def post_forward(self, module, output):
        return output if self.resident else super().post_forward(module, output)


class StartStreamingHook(ModelHook):
    """On block 1, which runs only on steps FirstBlockCache computes: start copying the first streamed block."""

    group = None

    def pre_forward(self, module, *args, **kwargs):
        if self.group is not None:
            self.group.onload_()
        return args, kwargs


def install_block_hooks(blocks, device: torch.device, stream: "torch.cuda.Stream | None") -> tuple[dict, StartStreamingHook]:
    """Blocks 1.. get one diffusers ModuleGroup + BudgetBlockHook each (block 0 always stays resident: FirstBlockCache
    decides from its output), block 1 the StartStreamingHook. Returns ({block index: hook}, start hook); which
    blocks stream is set per job by `_BudgetStages._split`.

    apply_group_offloading would stream every block or none, hence the groups by hand. record_stream=False: a
    streamed block's GPU copy is freed as soon as it has run (the host waits for it there; it waits for the next
    copy anyway), so at most two are on the GPU.
    """
    host, on_cuda = torch.device("cpu"), device.type == "cuda"
    config = GroupOffloadingConfig(onload_device=device, offload_device=host, offload_type=GroupOffloadingType.BLOCK_LEVEL,
                                   non_blocking=on_cuda, record_stream=False, low_cpu_mem_usage=False,
                                   num_blocks_per_group=1, stream=stream)
    hooks = {}
    for index, block in enumerate(blocks):
        if index == 0:  # always resident: FirstBlockCache decides from its output
            continue
        group = PageLockedModuleGroup(modules=[block], offload_device=host, onload_device=device, offload_leader=block,
                                      onload_leader=block, non_blocking=on_cuda, stream=stream, record_stream=False,
                                      onload_self=False, group_id=f"transformer_blocks.{index}")
        hooks[index] = BudgetBlockHook(group, config=config)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hooks[index], _GROUP_OFFLOADING)
    start_hook = StartStreamingHook()
    if len(blocks) > 1:
        HookRegistry.check_if_exists_or_initialize(blocks[1]).register_hook(start_hook, _START_STREAMING_HOOK)
    return hooks, start_hook


def install_stage_hooks(pipe, stages: _BudgetStages) -> None:
    """Each model, when called, first brings its stage's weights to the GPU and sends the others back
    (forward pre-hooks; the text encoder's `generate` too). Their removal goes to `stages.undo`."""
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae

    def enter_transformer(module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        stages.enter("transformer", image_tokens=hidden_states.shape[1])

    stages.undo.append(transformer.register_forward_pre_hook(enter_transformer, with_kwargs=True).remove)
    for module, stage in ((text_encoder, "text_encoder"), (vae.encoder, "vae"), (vae.decoder, "vae")):
        handle = module.register_forward_pre_hook(lambda module, args, stage=stage: stages.enter(stage))
        stages.undo.append(handle.remove)
    # transformers' generate() reads the model's device before its first forward: the weights must be on the GPU
    # when generate starts.
    generate = text_encoder.generate

    @functools.wraps(generate)
    def generate_on_gpu(*args, **kwargs):
        stages.enter("text_encoder")
        return generate(*args, **kwargs)

    text_encoder.generate = generate_on_gpu
    stages.undo.append(lambda: delattr(text_encoder, "generate"))


def enable_budget_offload(pipe, vram_budget_gb: float, resident_blocks: int | None = None) -> list[str]:
    """Offload mode "budget" (see the comment above): plan, then apply. Returns what was applied, by name.

    Without CUDA the same hooks run with every weight on the CPU: nothing moves and the outputs equal "off"
    (tests/test_budget_offload.py checks this on the demo pipeline). Weight storage (fp8) goes first, and
    FirstBlockCache, if enabled before, is put back outside our hooks. `resident_blocks` fixes the number of
    resident transformer blocks for every job (tests, tuning); by default each job gets as many as fit.
    """
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae
    blocks = transformer.transformer_blocks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"

    # 1. Plan from the loaded weights (fp8 storage, applied before, halves the blocks). The largest job the UI
    #    allows must fit: that raises here, before anything moves, when the budget is too small.
    sizes = dict(block_gb=max(_module_gb(block) for block in blocks), num_blocks=len(blocks),
                 other_transformer_gb=_module_gb(transformer) - _module_gb(*blocks),
                 text_encoder_gb=_module_gb(text_encoder), vae_gb=_module_gb(vae))

    def plan_for(tokens: int) -> BudgetPlan:
        return plan_budget(vram_budget_gb, image_tokens=tokens, resident_blocks=resident_blocks, **sizes)

    largest = plan_for(BUDGET_PLAN_IMAGE_TOKENS)
    default = plan_for(image_tokens(DEFAULTS["layers"], DEFAULTS["resolution"]))
    logger.info("Low-VRAM engine: %s; at the default job (%d px, %d layers): %d blocks resident", largest.describe(),
                DEFAULTS["resolution"], DEFAULTS["layers"], len(default.resident_blocks))

    # 2. FirstBlockCache must wrap our hooks, so that a skipped step never reaches a streamed block: take it off
    #    now, put it back last.
    cache_config = transformer._cache_config
    if cache_config is not None:
        transformer.disable_cache()

    # 3. Each model's weights move into its host buffer; the VAE stays on the GPU.
    transformer_weights = _host_copies(transformer, on_cuda)
    text_encoder_weights = _host_copies(text_encoder, on_cuda)
    vae.to(device)

    # 4. Block hooks: blocks 1.. get one diffusers ModuleGroup each; per job, the streamed ones are chained in block
    #    order, so each streamed block's start copies the next one in on the side stream, and the resident ones
    #    skip their hook.
    stream = torch.cuda.Stream() if on_cuda else None
    hooks, start_hook = install_block_hooks(blocks, device, stream)

    # 5. Stages: each model, when called, first brings its stage's weights to the GPU and sends the others back.
    block_ids = [{id(t) for t in itertools.chain(b.parameters(), b.buffers())} for b in blocks]
    in_blocks = set().union(*block_ids)
    stages = _BudgetStages(
        device, plan_for,
        {"transformer": [pair for pair in transformer_weights if id(pair[0]) not in in_blocks],
         "text_encoder": text_encoder_weights},
        [[pair for pair in transformer_weights if id(pair[0]) in ids] for ids in block_ids],
        hooks, start_hook, stream)
    install_stage_hooks(pipe, stages)
    for block in blocks:
        registry = HookRegistry.check_if_exists_or_initialize(block)
        stages.undo.append(functools.partial(registry.remove_hook, _GROUP_OFFLOADING, recurse=False))
        stages.undo.append(functools.partial(registry.remove_hook, _START_STREAMING_HOOK, recurse=False))
    pipe._budget_stages = stages

    # 6. FirstBlockCache back on, outside.
    if cache_config is not None:
        transformer.enable_cache(cache_config)
    applied = [f"budget_offload({largest.describe()}; {len(default.resident_blocks)} blocks resident at the default job)"]
    if on_cuda and not all(m._budget_host_copies["locked"] for m in (transformer, text_encoder)):
        applied.append("host_copies_not_page_locked")
    return applied


def release_budget_vram(pipe) -> None:
    """Budget mode: send every weight back to its host copy and empty the allocator (after a run or an OOM)."""
    stages = getattr(pipe, "_budget_stages", None)
    if stages is not None:
        stages.release()


def disable_budget_offload(pipe) -> None:
    """Undo `enable_budget_offload`: hooks off, weights left in their host copies (on the CPU)."""
    stages = pipe._budget_stages
    stages.release()
    for undo in stages.undo:
        undo()
    del pipe._budget_stages


# ----------------------------------------------------------------------------------------------------
# 5. Infer
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecomposeResult:
    layers: list[Image.Image]  # RGBA, bottom first
    caption: str  # the prompt that conditioned the run (the auto-caption when the prompt was empty)
    auto_caption: bool  # True when the model wrote the caption
    seed: int
    params: dict[str, Any]  # every input, for params.json
    duration_s: float
    notes: list[str] = dataclasses.field(default_factory=list)  # what the input needed, for the user (animated GIF ...)


class OutOfMemoryError(RuntimeError):
    """The GPU ran out of memory during a run; the message says which setting to change."""


def out_of_memory_message(pipe, job: str = "decomposition", changes: list[str] = (), program: str = "app") -> str:
    """What to change after a CUDA out-of-memory error: the job's own `changes` first, then the offload mode's."""
    offload = getattr(pipe, "_studio_info", {}).get("offload_mode", "?")
    changes = list(changes)
    if offload == "budget":
        changes.append(f"restart the {program} with a smaller --vram-budget (GB; fewer transformer blocks stay resident)")
    elif offload != "sequential":
        changes.append(f"restart the {program} with --offload budget (now: {offload}; streams what does not fit)")
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


def run_pipeline(pipe, job: Callable[[], Any], out_of_memory: str) -> Any:
    """Run `job()` (calls of `pipe`) the one safe way; the app's `infer` and the edit tool's `edit_layer` use it.

    Under `torch.inference_mode()` (+ bf16 autocast on CUDA). Afterwards, also after an error, the run's memory is
    freed: budget mode sends every weight to its host copy, FirstBlockCache's state is reset (the pipeline resets
    it only when a run completes; a stopped run would leave a cached first-block residual without the tail
    residuals it needs), and `clear_memory`. CUDA out of memory becomes `OutOfMemoryError(out_of_memory)`,
    raised only after the run's tensors are freed.
    """
    failed = False
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            return job()
    except torch.OutOfMemoryError:
        # Not re-raised here: the exception's traceback holds the run's tensors, so it must be gone before
        # `clear_memory` can give their memory back.
        failed = True
    finally:
        release_budget_vram(pipe)
        pipe.transformer._reset_stateful_cache()
        clear_memory()
    if failed:
        logger.warning("Out of GPU memory; memory freed. %s", out_of_memory)
        raise OutOfMemoryError(out_of_memory)


# Pillow modes whose `convert("RGBA")` would clip: `to_rgba` scales them to 8 bits first.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNG / TIFF


def read_image_file(path: Path, notes: list[str] | None = None) -> Image.Image:
    """Decode an image file defensively; every refusal is a ValueError that names the file and the fix.

    Its size is checked from the header before any pixel is decoded, the EXIF orientation is applied, and an
    animation gives its first frame (a line saying so is appended to `notes`).
    """
    name = path.name
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes): the file holds no image. Choose the image file again.")
    # 1. The header: format, size, frame count. No pixel is decoded yet.
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's own guard, from the header, past twice its MAX_IMAGE_PIXELS
        raise ValueError(f"{name} is too large: over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, and this app "
                         f"takes at most {MAX_INPUT_PIXELS / 1e6:.0f}. Scale it down first (the model works at about "
                         f"{RESOLUTIONS[-1]} px a side anyway).") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{name} is not an image: its content is no image format this app reads. Upload a PNG, "
                         f"JPEG or WebP file.") from None
    except (OSError, SyntaxError) as err:  # a known format with a broken header
        raise ValueError(f"{name} is damaged ({err}). Open it in an image editor and save it again, or export it "
                         f"as PNG.") from None
    with opened:
        check_image_size(opened.width, opened.height, name)
        frames = getattr(opened, "n_frames", 1)
        # 2. The pixels (of the first frame).
        try:
            opened.seek(0)
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a copy, turned upright as the EXIF orientation says
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ValueError(f"{name} is damaged: its pixels could not be decoded ({err}). Open it in an image "
                             f"editor and save it again, or export it as PNG.") from None
    if frames > 1 and notes is not None:
        notes.append(f"{name} is animated ({frames} frames): the first frame was used.")
    return image


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """Refuse images too large to decode safely, or too small or too thin for the model."""
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels): the limit is "
                         f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels. Scale it down first (the model works at about "
                         f"{RESOLUTIONS[-1]} px a side anyway).")
    if min(width, height) < MIN_INPUT_SIDE:
        raise ValueError(f"{name} is {width}x{height} px: too small for the model. Use an image at least "
                         f"{MIN_INPUT_SIDE} px on each side.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{name} is {width}x{height} px, longer than {MAX_ASPECT_RATIO}:1: the model needs a "
                         f"wider strip. Crop it to at most {MAX_ASPECT_RATIO}:1 first.")


def to_rgba(image: Any, notes: list[str] | None = None) -> Image.Image:
    """Accept a path, PIL image, numpy array (HxW, HxWx3, HxWx4; uint8 or float 0..1) or Gradio's file value.

    Files go through `read_image_file` (size checked before decoding, EXIF orientation, first frame of an
    animation, which appends a line to `notes`). CMYK, 16-bit grey and palette images with transparency
    become RGBA with their colours and transparency kept.
    """
    if isinstance(image, dict):  # Gradio ImageEditor / FileData-like values
        image = image.get("composite") or image.get("background") or image.get("path") or image.get("name")
    if isinstance(image, (str, Path)):
        image = read_image_file(Path(image), notes)
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image array of shape {array.shape} is not HxW, HxWx3 or HxWx4")
        image = Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)
    if not isinstance(image, Image.Image):
        raise ValueError(f"cannot read an image from a {type(image).__name__}; pass a path, PIL image or array")
    check_image_size(image.width, image.height)
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's convert("RGBA") clips 16-bit values at 255 (most of the range turns white): scale to 8 bits.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) * (255 / 65535)).round().clip(0, 255).astype(np.uint8))
    # Pillow's own conversion covers the rest: a palette's transparency (tRNS) becomes alpha, CMYK becomes RGB
    # (Adobe's inverted CMYK JPEGs included); tests/test_hardening.py checks the pixels of each.
    return image.convert("RGBA")


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

    encoder = pipe.text_encoder
    counter = TokenCounter()
    encoder.generate = functools.partial(type(encoder).generate, encoder, streamer=counter)
    try:
        yield counter
    finally:
        del encoder.generate  # the class's own generate again
        counter.bar.close()


def noise_generator(pipe, seed: int) -> torch.Generator:
    """The generator the initial noise is drawn with, seeded.

    On CUDA it is a CUDA generator, as in the official app (`torch.Generator(device="cuda")`), in every offload
    mode: the pipeline's execution device is the GPU in all of them, so a seed found on the official demo gives
    the same noise here. On a machine without CUDA, a CPU generator.
    """
    device = pipe._execution_device
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(int(seed))


def check_param(name: str, value: Any) -> Any:
    """`value` for the PARAMS row `name`, in the row's type; a ValueError names the value and what is accepted.

    Numbers may arrive as floats from the API (a whole float such as 7.0 is taken as 7); bools, NaN, infinities,
    fractions, text and lists are refused. None gives the row's default (an empty Textbox sends None).
    """
    p = PARAM[name]
    if value is None:
        return DEFAULTS[name]
    shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else f"a text of {len(value):,} characters"
    # 1. The type.
    if p.type is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, not a {type(value).__name__} ({shown}): send one string")
        if len(value) > p.range[1]:
            raise ValueError(f"{name} is {len(value):,} characters long: the limit is {p.range[1]:,} (the model reads "
                             f"about that much; a longer text is cut off). Shorten it.")
        return value
    if p.type is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name}={shown} is not true or false: send a boolean")
        return bool(value)
    whole = "a whole number" if p.type is int else "a number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={shown} is not {whole}: {_accepted(p)}")
    if not math.isfinite(value) or (p.type is int and not float(value).is_integer()):
        raise ValueError(f"{name}={shown} is not {whole}: {_accepted(p)}")
    value = int(value) if p.type is int else float(value)
    # 2. The range.
    if p.choices is not None and value not in p.choices:
        raise ValueError(f"{name}={value!r} is not supported: use one of {p.choices}")
    if p.range is not None and not p.range[0] <= value <= p.range[1]:
        hint = " (1 step makes the scheduler divide by zero)" if name == "num_inference_steps" else ""
        raise ValueError(f"{name}={value!r} is out of range: {_accepted(p)}{hint}")
    return value


def _accepted(p: Param) -> str:
    if p.choices is not None:
        return f"use one of {p.choices}"
    kind = "an integer" if p.type is int else "a number"
    return f"use {kind} from {p.range[0]} to {p.range[1]}"


def check_params(**values: Any) -> dict[str, Any]:
    """`check_param` for each keyword given (PARAMS names); returns the checked values, in their types."""
    unknown = sorted(set(values) - set(PARAM))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}: use {', '.join(PARAM)}")
    return {name: check_param(name, value) for name, value in values.items()}


def infer(
    pipe,
    image: Any,
    prompt: str = DEFAULTS["prompt"],
    negative_prompt: str = DEFAULTS["negative_prompt"],
    true_cfg_scale: float = DEFAULTS["true_cfg_scale"],
    num_inference_steps: int = DEFAULTS["num_inference_steps"],
    layers: int = DEFAULTS["layers"],
    resolution: int = DEFAULTS["resolution"],
    cfg_normalize: bool = DEFAULTS["cfg_normalize"],
    use_en_prompt: bool = DEFAULTS["use_en_prompt"],
    seed: int = DEFAULTS["seed"],
    randomize_seed: bool = DEFAULTS["randomize_seed"],
) -> DecomposeResult:
    """Decompose `image` into `layers` RGBA layers (bottom first). The pipeline's tqdm reports the steps."""
    # 1. Check inputs (PARAMS says what each accepts).
    checked = check_params(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                           num_inference_steps=num_inference_steps, layers=layers, resolution=resolution,
                           cfg_normalize=cfg_normalize, use_en_prompt=use_en_prompt, seed=seed,
                           randomize_seed=randomize_seed)
    prompt, negative_prompt, true_cfg_scale = checked["prompt"], checked["negative_prompt"], checked["true_cfg_scale"]
    num_inference_steps, layers, resolution = checked["num_inference_steps"], checked["layers"], checked["resolution"]
    cfg_normalize, use_en_prompt, seed = checked["cfg_normalize"], checked["use_en_prompt"], checked["seed"]
    randomize_seed = checked["randomize_seed"]
    notes: list[str] = []
    rgba = to_rgba(image, notes)
    if randomize_seed:
        seed = random.randint(0, MAX_SEED)
    prompt = prompt.strip()
    start = time.perf_counter()
    auto_caption = not prompt

    def job():
        # 2. Caption. An empty prompt makes the pipeline caption the image itself; we call its own
        #    `get_image_caption` on the same resized image first so the caption can be shown and saved.
        caption = prompt
        if auto_caption:
            from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

            width, height = calculate_dimensions(resolution * resolution, rgba.width / rgba.height)
            prompt_image = pipe.image_processor.resize(rgba, height, width)
            with caption_progress(pipe):  # a bar of the caption's tokens, like the steps' bar
                caption = pipe.get_image_caption(prompt_image, use_en_prompt=use_en_prompt,
                                                 device=pipe._execution_device)
        # 3. Denoise and decode, with the official app's noise (`noise_generator`).
        generator = noise_generator(pipe, seed)
        output = pipe(
            image=rgba,
            prompt=caption,
            negative_prompt=negative_prompt,
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps,
            layers=layers,
            resolution=resolution,
            cfg_normalize=cfg_normalize,
            use_en_prompt=use_en_prompt,
            generator=generator,
            num_images_per_prompt=1,
        )
        return caption, output, generator.device.type

    # 4. One guarded run: memory freed after it, also after an error; out of memory says what to change.
    prompt, output, generator_device = run_pipeline(pipe, job, out_of_memory_message(pipe, changes=decomposition_changes(layers, resolution)))
    result_layers = [layer.convert("RGBA") for layer in output.images[0]]
    # Every PARAMS value as checked (the prompt as "prompt_given"), the seed used, and what the input needed.
    params = {("prompt_given" if name == "prompt" else name): value for name, value in checked.items()}
    params.update(prompt_given=prompt if not auto_caption else "", seed=seed, input_size=list(rgba.size),
                  output_size=list(result_layers[0].size), input_notes=notes,
                  generator_device=generator_device)  # "cuda": the official app's noise; "cpu": no CUDA here
    return DecomposeResult(layers=result_layers, caption=prompt, auto_caption=auto_caption, seed=seed,
                           params=params, duration_s=time.perf_counter() - start, notes=notes)


# ----------------------------------------------------------------------------------------------------
# 6. Exports: pure functions, layers -> file (bottom first), no Gradio in them
# ----------------------------------------------------------------------------------------------------
def check_layers(layers: list[Image.Image], names: list[str] | None = None) -> None:
    """Exporters take one canvas: at least one layer, all of the first layer's size, one name per layer."""
    if not layers:
        raise ValueError("layers is empty: pass at least one RGBA layer (bottom first)")
    for index, layer in enumerate(layers):
        if layer.size != layers[0].size:
            raise ValueError(f"layer {index + 1} is {layer.width}x{layer.height} but layer 1 is "
                             f"{layers[0].width}x{layers[0].height}: all layers must share one canvas size")
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers: pass one name per layer, or none")


def composite_layers(layers: list[Image.Image]) -> Image.Image:
    """Stack RGBA layers bottom first with Porter-Duff "over"."""
    check_layers(layers)
    canvas = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        canvas = Image.alpha_composite(canvas, layer.convert("RGBA"))
    return canvas


def crop_to_alpha(layer: Image.Image) -> tuple[Image.Image, tuple[int, int]] | None:
    """The layer cut to the bounding box of its non-zero alpha, and the box's (left, top); None when empty.

    Lossless: every pixel outside the box is fully transparent, so placing the crop at (left, top) gives
    the layer back.
    """
    layer = layer.convert("RGBA")
    box = layer.getbbox(alpha_only=True)
    if box is None:
        return None
    return layer.crop(box), (box[0], box[1])


def layer_names(layers: list[Image.Image]) -> list[str]:
    """`Layer 1 (bottom)`, `Layer 2`, ..., `Layer N (top)`; `empty` is added for a fully transparent layer."""
    names = []
    for index, layer in enumerate(layers):
        notes = ["bottom"] if index == 0 else ["top"] if index == len(layers) - 1 else []
        if layer.convert("RGBA").getbbox(alpha_only=True) is None:
            notes.append("empty")
        names.append(f"Layer {index + 1}" + (f" ({', '.join(notes)})" if notes else ""))
    return names


def resize_layers(layers: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Resize RGBA layers to `size` (width, height) in premultiplied alpha, so edges get no dark halo.

    Resampling straight RGBA mixes the colour of the transparent pixels around a shape (black, here) into
    its edge. Premultiplied, a transparent pixel weighs nothing. Pillow's `resize` premultiplies RGBA by
    itself (Image.resize: "RGBA" -> "RGBa"); it is spelled out here because the no-halo edge is the point.
    """
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size={tuple(size)!r} is not an image size: pass (width, height), both at least 1 px")
    return [layer.convert("RGBA").convert("RGBa").resize((width, height), ORIGINAL_SIZE_RESAMPLE).convert("RGBA")
            for layer in layers]


def safe_file_text(text: str, max_bytes: int = FILE_NAME_TEXT_MAX_BYTES) -> str:
    """Any prompt text as part of a file name that is valid on Linux, macOS and Windows.

    Letters, digits and combining marks of every script are kept (Hangul, Han, Latin, Devanagari ...);
    each run of anything else (spaces, slashes, dots, punctuation, emoji, control characters) becomes one
    "-". NFC first, so the same text typed on macOS and on Linux gives the same name. Cut to `max_bytes`
    of UTF-8 on a character boundary. "" when nothing is left.
    """
    text = unicodedata.normalize("NFC", text or "")
    kept = "".join(c if unicodedata.category(c)[0] in "LNM" else "-" for c in text)
    kept = re.sub(r"-+", "-", kept).strip("-")
    return kept.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").strip("-")


def windows_path_warning(outputs: Path, windows: bool = os.name == "nt") -> str | None:
    """On Windows, the start-up warning for an outputs folder too deep for the longest path a run writes
    (RUN_PATH_MAX_CHARS) under the 260-character limit; None elsewhere, or when it fits."""
    if not windows:
        return None
    outputs = Path(outputs).absolute()
    if len(str(outputs)) + 1 + RUN_PATH_MAX_CHARS <= WINDOWS_MAX_PATH_CHARS:
        return None
    return (f"The outputs folder {outputs} is {len(str(outputs))} characters long: a run writes paths up to "
            f"{RUN_PATH_MAX_CHARS} characters inside it, past Windows' 260-character limit. Pass a shorter --outputs "
            f"(at most {WINDOWS_MAX_PATH_CHARS - 1 - RUN_PATH_MAX_CHARS} characters, e.g. C:\\qil-outputs), or enable "
            f"long paths (LongPathsEnabled, see Microsoft's 'Maximum Path Length Limitation').")


def export_stem(caption: str, seed: int) -> str:
    """`<caption>_seed<seed>`, the name of a run's ZIP, PPTX and PSD; `layers_seed<seed>` without text.

    The suffix also keeps a name from being one Windows reserves (CON, NUL, ...).
    """
    return f"{safe_file_text(caption) or 'layers'}_seed{seed}"


def layer_file_name(index: int) -> str:
    """`layer_1.png` is the bottom layer."""
    return f"layer_{index + 1}.png"


def export_layer_pngs(layers: list[Image.Image], folder: Path) -> list[Path]:
    """Full-canvas layer_1.png ... layer_N.png (bottom first) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, layer in enumerate(layers):
        path = folder / layer_file_name(index)
        layer.save(path)
        paths.append(path)
    return paths


def export_zip(layers: list[Image.Image], path: Path, extra_files: dict[str, bytes] | None = None,
               original_size_layers: list[Image.Image] | None = None) -> Path:
    """layer_1.png ... layer_N.png (bottom first), composite.png and any extra files (params.json);
    with `original_size_layers`, the same layer and composite files under `original_size/` too."""
    check_layers(layers)
    sets = {"": layers, "original_size/": original_size_layers or []}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for prefix, set_layers in sets.items():
            for index, layer in enumerate(set_layers):
                archive.writestr(prefix + layer_file_name(index), _png_bytes(layer))
            if set_layers:
                archive.writestr(prefix + "composite.png", _png_bytes(composite_layers(set_layers)))
        for name, data in (extra_files or {}).items():
            archive.writestr(name, data)
    return Path(path)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def export_pptx(layers: list[Image.Image], path: Path, names: list[str] | None = None) -> Path:
    """One slide of the image's aspect ratio; each layer a named picture cropped to its alpha bounding box
    and placed at its offset, so objects can be selected and moved; bottom first in z-order.

    A fully transparent layer gets no picture (there is nothing to select); the others keep their numbers.
    """
    from pptx import Presentation
    from pptx.util import Emu

    check_layers(layers, names)
    names = names or layer_names(layers)
    width, height = layers[0].size
    emu_per_px = SLIDE_LONG_SIDE_EMU // max(width, height)  # whole EMUs per pixel: places and aspect ratio exact
    presentation = Presentation()
    presentation.slide_width, presentation.slide_height = Emu(width * emu_per_px), Emu(height * emu_per_px)
    slide = presentation.slides.add_slide(presentation.slide_layouts[6])  # layout 6: blank
    for layer, name in zip(layers, names):
        cropped = crop_to_alpha(layer)
        if cropped is None:
            continue
        image, (left, top) = cropped
        picture = slide.shapes.add_picture(io.BytesIO(_png_bytes(image)), Emu(left * emu_per_px), Emu(top * emu_per_px),
                                           Emu(image.width * emu_per_px), Emu(image.height * emu_per_px))
        picture.name = name
    presentation.save(path)
    return Path(path)


def export_psd(layers: list[Image.Image], path: Path, names: list[str] | None = None) -> Path:
    """An 8-bit RGB PSD with transparency: one named pixel layer per layer (bottom first), cropped to its
    alpha bounding box and placed at its offset, plus the merged composite that layer-less viewers show.

    A fully transparent layer stays as an empty (0x0) named layer, the way Photoshop stores one.
    """
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    check_layers(layers, names)
    names = names or layer_names(layers)
    psd = PSDImage.new(mode="RGBA", size=layers[0].size, color=(0, 0, 0, 0))
    # A negative layer count tells readers the composite's 4th channel is its alpha (PSD spec). psd-tools
    # 1.26 keeps that sign for files it read but has no public switch for a new document; without it
    # ImageMagick shows the composite's transparent parts as opaque black.
    psd._merged_alpha = True
    for layer, name in zip(layers, names):
        image, (left, top) = crop_to_alpha(layer) or (Image.new("RGBA", (0, 0)), (0, 0))
        psd_layer = PixelLayer.frompil(image, psd, top=top, left=left)  # frompil appends the layer to psd
        psd_layer.name = name  # the setter writes the Unicode name too; frompil's name= takes MacRoman only
    psd.save(path)  # psd-tools composites the layers into the file's merged image here
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Export:
    """One download: `save_run` writes it into every run folder, the page offers it in a box of its own."""

    key: str  # save_run's paths key (the download box's label is its upper case)
    suffix: str
    # write(layers, path, params.json bytes, the original-size layers or None) -> path
    write: Callable[[list[Image.Image], Path, bytes, list[Image.Image] | None], Path]
    at_original_size: bool = True  # also written into original_size/ (the ZIP holds both sizes instead)


# THE exports table, in the page's order. A new format: its `export_*` function above and one row here.
EXPORTS = (
    Export("pptx", ".pptx", lambda layers, path, params, original: export_pptx(layers, path)),
    Export("zip", ".zip", lambda layers, path, params, original: export_zip(layers, path, {"params.json": params},
                                                                            original), at_original_size=False),
    Export("psd", ".psd", lambda layers, path, params, original: export_psd(layers, path)),
)


def new_run_folder(outputs: Path, seed: int) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = Path(outputs) / f"{stamp}_seed{seed}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def save_run(result: DecomposeResult, outputs: Path, run_info: dict[str, Any] | None = None,
             original_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write one run's folder and return its paths.

    At the model's resolution: layer_1.png ... layer_N.png, composite.png, params.json and
    <stem>.zip / .pptx / .psd, where <stem> is `export_stem(caption, seed)`. With `original_size`
    (width, height; the input's is `result.params["input_size"]`), the layers are also resized to it and
    written to original_size/ (layer PNGs, composite.png, <stem>_<W>x<H>.pptx / .psd; paths["original"]);
    the ZIP then holds both sets.
    """
    folder = new_run_folder(outputs, result.seed)
    original_layers = resize_layers(result.layers, original_size) if original_size else None
    params = dict(result.params, seed=result.seed, caption=result.caption, auto_caption=result.auto_caption,
                  duration_s=round(result.duration_s, 3), created=datetime.datetime.now().isoformat(timespec="seconds"),
                  export_original_size=list(original_layers[0].size) if original_layers else None,
                  **(run_info or {}))
    params_bytes = json.dumps(params, indent=2, ensure_ascii=False).encode("utf-8")
    stem = export_stem(result.caption, result.seed)
    paths: dict[str, Any] = {"folder": folder}
    paths["layers"] = export_layer_pngs(result.layers, folder)
    paths["composite"] = folder / "composite.png"
    composite_layers(result.layers).save(paths["composite"])
    paths["params"] = folder / "params.json"
    paths["params"].write_bytes(params_bytes)
    for export in EXPORTS:
        paths[export.key] = export.write(result.layers, folder / f"{stem}{export.suffix}", params_bytes, original_layers)
    if original_layers:
        sub = folder / "original_size"
        size = "{}x{}".format(*original_layers[0].size)
        paths["original"] = {"folder": sub, "layers": export_layer_pngs(original_layers, sub),
                             "composite": sub / "composite.png"}
        composite_layers(original_layers).save(paths["original"]["composite"])
        for export in EXPORTS:
            if export.at_original_size:
                paths["original"][export.key] = export.write(original_layers, sub / f"{stem}_{size}{export.suffix}",
                                                             params_bytes, None)
    return paths


def run_info_for(pipe, environment: dict[str, Any]) -> dict[str, Any]:
    """What params.json records about the model and machine besides the inputs."""
    info = dict(getattr(pipe, "_studio_info", {}))
    info["versions"] = {k: environment.get(k) for k in ("python", "torch", "cuda", "diffusers", "transformers", "gradio")}
    info["gpu_name"] = environment.get("gpu_name")
    return info


def prune_outputs(outputs: Path, max_bytes: float, max_age_s: float, keep: Path | None = None) -> list[Path]:
    """Delete run folders, oldest first, until none is older than `max_age_s` and together they hold at most
    `max_bytes` (0: no limit). `keep` (the run just saved) is never deleted. Returns what was deleted.

    Only run folders (those holding a params.json) are touched: Gradio's cache (.gradio-cache, which Gradio's
    delete_cache cleans) and anything else put in the outputs folder stay.
    """
    runs = [p for p in Path(outputs).iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "params.json").is_file()]
    runs.sort(key=lambda p: p.stat().st_mtime)
    sizes = {run: sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) for run in runs}
    total, now, deleted = sum(sizes.values()), time.time(), []
    for run in runs:
        too_old = max_age_s > 0 and now - run.stat().st_mtime > max_age_s
        too_big = max_bytes > 0 and total > max_bytes
        if run == keep or not (too_old or too_big):
            continue
        shutil.rmtree(run)
        total -= sizes[run]
        deleted.append(run)
    return deleted


# ----------------------------------------------------------------------------------------------------
# 6b. Layer stack: recursive decomposition ("decompose this layer" again), plain data, no Gradio
# ----------------------------------------------------------------------------------------------------
# A layer usually holds fewer things than the whole image, so a sub-run asks for fewer layers by default.
SUB_RUN_LAYERS = 2
SUB_RUNS_DIR = "sub_runs"  # inside the first decomposition's run folder, one folder per sub-run


@dataclasses.dataclass
class LayerStack:
    """What the UI shows and the exports write: RGBA layers bottom first on one canvas, with one step of undo."""

    layers: list[Image.Image]  # RGBA, bottom first, all of one size (the canvas)
    run_folder: Path  # the first decomposition's run folder; sub-runs are saved under it
    files: dict[str, Any] = dataclasses.field(default_factory=dict)  # save_run's paths for exactly these layers
    previous: "LayerStack | None" = None  # the stack before the last sub-run (one step of undo)
    original_size: tuple[int, int] | None = None  # also export at the input's size (exports' original-size option)
    caption: str | None = None  # the caption and seed of the run that made these layers (shown after an undo too)
    seed: int | None = None


def fit_to_canvas(layers: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Fit sub-layers to the canvas `size` (width, height); layers already that size are returned as they are.

    A sub-run returns its layers at the resolution bucket of the layer it was given, which can differ from the
    stack's canvas (another bucket, or the 32 px rounding of the aspect ratio): those go through the exports'
    `resize_layers` (premultiplied Lanczos, no dark edges).
    """
    size = (int(size[0]), int(size[1]))
    return [layer if layer.size == size else resize_layers([layer], size)[0]
            for layer in (layer.convert("RGBA") for layer in layers)]


def check_layer_index(index: int, count: int) -> None:
    """Reject an index outside a stack of `count` layers; the message counts layers from 1, as the gallery does."""
    if not isinstance(index, (int, np.integer)):
        raise ValueError(f"layer index {index!r} is not a whole number: choose a layer from 1 (bottom) to {count}")
    if not 0 <= index < count:
        raise ValueError(f"layer {index + 1} is not in the stack: choose a layer from 1 (bottom) to {count} "
                         f"(layer index {index}; indices run from 0)")


def replace_layer(layers: list[Image.Image], index: int, sub_layers: list[Image.Image]) -> list[Image.Image]:
    """A new list in which `layers[index]` is replaced, in place, by `sub_layers` (bottom first) fit to the canvas."""
    check_layer_index(index, len(layers))
    if not sub_layers:
        raise ValueError(f"no sub-layers to put in place of layer {index + 1}: a decomposition gives at least "
                         f"{LAYERS_RANGE[0]}")
    return list(layers[:index]) + fit_to_canvas(sub_layers, layers[0].size) + list(layers[index + 1:])


def undo(stack: LayerStack) -> LayerStack:
    """The stack before the last sub-run. One step only: the restored stack has no undo of its own."""
    if stack.previous is None:
        raise ValueError("nothing to undo: undo goes back one sub-run, and there is none since the last "
                         "decomposition or undo")
    return stack.previous


def save_sub_run(stack: LayerStack, new_layers: list[Image.Image], index: int, result: DecomposeResult,
                 run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one sub-run under `stack.run_folder/sub_runs/` and return its paths.

    The folder is a normal run folder for the *new stack* (layer PNGs, composite, ZIP, PPTX, PSD: what the UI
    offers), whose params.json holds the sub-run's parameters and a `sub_run` entry with the index it replaced.
    Next to them: `input_layer.png` (the layer that was decomposed, alpha as it was) and `sub_layers/` (the
    sub-run's own output at the model's resolution).
    """
    sub_run = dict(replaced_index=index, replaced_file=layer_file_name(index), sub_layers=len(result.layers),
                   stack_layers_before=len(stack.layers), stack_layers_after=len(new_layers),
                   applied_to=str(stack.files.get("folder", stack.run_folder)))
    step = dataclasses.replace(result, layers=new_layers)
    paths = save_run(step, Path(stack.run_folder) / SUB_RUNS_DIR, dict(run_info or {}, sub_run=sub_run),
                     original_size=stack.original_size)
    paths["input_layer"] = paths["folder"] / "input_layer.png"
    stack.layers[index].save(paths["input_layer"])
    paths["sub_layers"] = export_layer_pngs(result.layers, paths["folder"] / "sub_layers")
    return paths


def decompose_layer(pipe, stack: LayerStack, index: int, run_info: dict[str, Any] | None = None,
                    **infer_kwargs) -> tuple[LayerStack, DecomposeResult]:
    """Decompose `stack.layers[index]` again and put its sub-layers in its place. `infer_kwargs` go to `infer`.

    Returns the new stack (whose `previous` is `stack`, for one step of undo) and the sub-run's own result.
    """
    # 1. Check the index before spending a run on it.
    check_layer_index(index, len(stack.layers))
    # 2. Decompose the layer as it is, RGBA: its transparent surroundings stay transparent for the model
    #    (flattening to RGB would turn them black and the model would see a black background).
    result = infer(pipe, stack.layers[index], **infer_kwargs)
    # 3. Its sub-layers, fit to the canvas, take its place.
    new_layers = replace_layer(stack.layers, index, result.layers)
    # 4. Save the sub-run and the new stack's exports.
    files = save_sub_run(stack, new_layers, index, result, run_info)
    # 5. The old stack, without its own undo, is the one step back.
    previous = dataclasses.replace(stack, previous=None)
    return (LayerStack(layers=new_layers, run_folder=stack.run_folder, files=files, previous=previous,
                       original_size=stack.original_size, caption=result.caption, seed=result.seed), result)


# ----------------------------------------------------------------------------------------------------
# 7. UI
# ----------------------------------------------------------------------------------------------------
DEMO_BANNER = ("**Demo model in use** — tiny random weights built offline. Everything runs, but the layers are "
               "noise. Put the real weights in `models/Qwen-Image-Layered` (or pass `--model`) for real results.")


# The page's own CSS (given to `launch`): Gradio's file box cuts a long file name to "...p"; the downloads'
# names wrap instead, so the whole name is read.
UI_CSS = ".downloads .filename .stem { white-space: normal; overflow-wrap: anywhere; }"


def example_images() -> list[str]:
    return sorted(str(p) for p in ASSETS_DIR.glob("*.png"))


def gallery_items(layer_files: list[Path]) -> list[tuple[str, str]]:
    """The gallery's (file, caption) pairs, bottom first; the numbers are the ones "Selected layer" takes."""
    return [(str(p), f"Layer {i + 1}" + (" (bottom)" if i == 0 else "")) for i, p in enumerate(layer_files)]


def gradio_cache_schedule(settings: Settings) -> tuple[int, int]:
    """Gradio's delete_cache (every, older than) in seconds: GRADIO_CACHE_MAX_AGE_S, or the outputs' age limit."""
    age = GRADIO_CACHE_MAX_AGE_S
    if settings.outputs_max_age_hours > 0:
        age = min(age, settings.outputs_max_age_hours * 3600)
    age = max(1, int(age))
    return max(1, age // 4), age


def launch_options(settings: Settings) -> dict[str, Any]:
    """`demo.launch` keyword arguments: where to listen, Gradio's own login and upload limit.

    Gradio serves result files only from the working directory, the system temp dir or `allowed_paths`:
    an --outputs folder elsewhere (or a start from another directory) needs it named there.
    """
    return dict(server_name=settings.host, server_port=settings.port, auth=settings.auth,
                max_file_size=settings.max_upload_size, allowed_paths=[str(settings.outputs)], show_error=True,
                css=UI_CSS)


def network_warning(settings: Settings) -> str | None:
    """The start-up warning for an app that anyone on the network can use; None when it is local or has a login."""
    if settings.host not in ("0.0.0.0", "::", "") or settings.auth is not None:
        return None
    return (f"The app listens on {settings.host or '0.0.0.0'}:{settings.port} without a login: anyone who can reach "
            f"this machine can use it and its GPU. Pass --host 127.0.0.1 to keep it on this machine, or "
            f"--auth USER:PASSWORD (or QIL_AUTH) to ask for a login.")


# What the page shows for a stack, in the `view` outputs' order: the gallery, then one download per EXPORTS row.
StackView = NamedTuple("StackView", [("gallery", list), *((export.key, str) for export in EXPORTS)])


def stack_view(stack: LayerStack) -> StackView:
    """The gallery and the downloads for a stack: the files its sub-run (or first run) wrote."""
    files = stack.files
    offered = files.get("original", files)  # the exports at the size asked for; the ZIP holds both sizes
    return StackView(gallery_items(files["layers"]),
                     *(str(offered[e.key] if e.at_original_size else files[e.key]) for e in EXPORTS))


def _user_error(message: str):
    """Gradio's error for the page and the API (gradio is imported late: see `build_ui`)."""
    import gradio as gr

    return gr.Error(message, duration=None)  # stays on the page until closed


# The UI's handlers: module functions, bound to the pipeline and settings with functools.partial in `build_ui`
# (so a test can call them without a server). They only map widget values to `infer`/`save_run`/`decompose_layer`.
def decompose_handler(pipe, settings: Settings, run_info: dict[str, Any], image, original_size: bool = False,
                      **params) -> tuple:
    """"Decompose": `params` are PARAMS values. Returns (*StackView, caption, seed, stack)."""
    import gradio as gr

    if image is None:
        raise _user_error("No image: upload an image (PNG, JPEG, WebP) first.")
    try:
        result = infer(pipe, image, **params)
    except (ValueError, OutOfMemoryError) as err:
        raise _user_error(str(err)) from err
    for note in result.notes:
        gr.Warning(note, duration=None)  # stays on the page until closed
    paths = save_run(result, settings.outputs, run_info,
                     original_size=result.params["input_size"] if original_size else None)
    logger.info("Run saved in %s (%.1f s)", paths["folder"], result.duration_s)
    deleted = prune_outputs(settings.outputs, settings.outputs_max_gb * 1e9, settings.outputs_max_age_hours * 3600,
                            keep=paths["folder"])
    if deleted:
        logger.info("Deleted %d old run folder(s) (--outputs-max-gb / --outputs-max-age-hours)", len(deleted))
    stack = LayerStack(layers=result.layers, run_folder=paths["folder"], files=paths,
                       original_size=tuple(result.params["input_size"]) if original_size else None,
                       caption=result.caption, seed=result.seed)
    return (*stack_view(stack), result.caption, result.seed, stack)


def decompose_layer_handler(pipe, run_info: dict[str, Any], layer_number, stack: LayerStack | None = None,
                            **params) -> tuple:
    """"Decompose this layer" (1 = bottom): `params` are PARAMS values. Returns (*StackView, caption, seed, stack)."""
    if stack is None:
        raise _user_error("No layers yet: decompose an image first, then select one of its layers in the gallery.")
    if layer_number is None:
        raise _user_error("No layer selected: click a layer in the gallery (or type its number, 1 = bottom).")
    try:
        new_stack, result = decompose_layer(pipe, stack, int(layer_number) - 1, run_info, **params)
    except (ValueError, OutOfMemoryError) as err:
        raise _user_error(str(err)) from err
    logger.info("Layer %d replaced by %d sub-layers; saved in %s", layer_number, len(result.layers),
                new_stack.files["folder"])
    return (*stack_view(new_stack), result.caption, result.seed, new_stack)


def undo_handler(stack: LayerStack | None = None) -> tuple:
    """"Undo": returns (*StackView, caption, seed, stack) of the stack before the last sub-run (its run's caption
    and seed, shown again)."""
    if stack is None:
        raise _user_error("Nothing to undo: decompose an image first.")
    try:
        restored = undo(stack)
    except ValueError as err:
        raise _user_error(str(err)) from err
    return (*stack_view(restored), restored.caption, restored.seed, restored)


def gradio_handler(handler: Callable, names: list[str], defaults: dict[str, Any], progress=None) -> Callable:
    """`handler(**values)` as Gradio calls it: positionally, one value per `inputs=` component, named `names`.

    Gradio reads the signature: its names are the API's parameter names, a None default makes a parameter
    without an initial widget value optional for gradio_client, and a `gr.Progress` default turns on the
    progress bar. Written here (not one hand-written signature per handler) so that PARAMS alone decides them.
    """
    # (`is not None`: a gr.Progress is falsy, its len() is that of its tracked iterables, 0 before a run.)
    tracked = ["progress"] if progress is not None else []
    slots = list(names) + tracked

    def call(*args):
        values = dict(zip(slots, args))
        values.pop("progress", None)
        return handler(**values)

    call.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(name)) for name in names]
        + [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=progress) for name in tracked])
    call.__name__ = getattr(handler, "__name__", getattr(getattr(handler, "func", None), "__name__", "handler"))
    call.handler = handler  # what it calls (tests check the binding)
    return call


def param_widget(gr, p: Param, **overrides):
    """The widget of a PARAMS row: text box, checkbox, radio (choices), slider (a step) or number box."""
    value = DEFAULTS[p.name]  # read at build time: the README's test server changes its steps here
    if p.type is str:
        options = dict(label=p.label, value=value or None, max_length=p.range[1])
        return gr.Textbox(**{**options, **overrides})
    if p.type is bool:
        return gr.Checkbox(**{**dict(label=p.label, value=value), **overrides})
    if p.choices is not None:
        return gr.Radio(**{**dict(choices=list(p.choices), value=value, label=p.label), **overrides})
    if p.step is not None:
        return gr.Slider(**{**dict(minimum=p.range[0], maximum=p.range[1], value=value, step=p.step, label=p.label),
                            **overrides})
    return gr.Number(**{**dict(label=p.label, value=value, precision=0 if p.type is int else None,
                               minimum=p.range[0], maximum=p.range[1]), **overrides})


def build_ui(pipe, settings: Settings, environment: dict[str, Any] | None = None):
    """The Gradio Blocks app: widgets from PARAMS, the module's handlers bound with functools.partial.

    The layer stack (`LayerStack`) lives in a `gr.State`, one per browser session (or gradio_client `Client`).
    """
    # Gradio reads GRADIO_TEMP_DIR when it is imported: keep its upload cache inside the outputs folder.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(settings.outputs) / ".gradio-cache"))
    import gradio as gr

    environment = environment or print_environment_info(print_it=False)
    run_info = run_info_for(pipe, environment)
    # The handlers' API names and defaults: PARAMS' (the prompts' None: an empty Textbox has no value).
    names = [p.name for p in PARAMS]
    defaults = {name: None if p.type is str and not DEFAULTS[name] else DEFAULTS[name] for name, p in PARAM.items()}
    shared = [name for name in names if name not in ("layers", "prompt")]  # "Decompose this layer" has its own two
    progress = gr.Progress(track_tqdm=True)  # the pipeline's tqdm steps become the page's progress bar
    decompose = gradio_handler(functools.partial(decompose_handler, pipe, settings, run_info),
                               ["image", *names, "original_size"], dict(defaults, original_size=False), progress)
    decompose_this_layer = gradio_handler(functools.partial(decompose_layer_handler, pipe, run_info),
                                          ["layer_number", "layers", "prompt", *shared, "stack"],
                                          dict(defaults, layers=SUB_RUN_LAYERS), progress)
    undo_last = gradio_handler(undo_handler, ["stack"], {})

    def select_layer(evt: gr.SelectData):
        return evt.index + 1  # the gallery counts from 0, its captions (and "Selected layer") from 1

    # delete_cache: Gradio deletes its own uploads and result copies on that schedule, and all of them at exit.
    with gr.Blocks(title="Qwen-Image-Layered studio", delete_cache=gradio_cache_schedule(settings)) as demo:
        gr.Markdown("# Qwen-Image-Layered studio\nSplit an image into editable RGBA layers.")
        if run_info.get("demo"):
            gr.Markdown(DEMO_BANNER)
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Input image", type="filepath", image_mode=None)
                widgets = {"prompt": param_widget(gr, PARAM["prompt"], lines=2)}
                with gr.Accordion("Advanced settings", open=False):
                    widgets.update({p.name: param_widget(gr, p) for p in PARAMS if p.advanced})
                original_size = gr.Checkbox(label="Export at the input's original size (PPTX, PSD; the ZIP holds both sizes)",
                                            value=False)
                run = gr.Button("Decompose", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Layers (bottom first; click one to select it)", columns=4,
                                     object_fit="contain", format="png")
                with gr.Group():
                    with gr.Row():
                        # Empty until a layer is clicked. A plain None start is drawn as 0, red under minimum=1 (Gradio
                        # 6.31 leaves a None value out of the page's config); a value from a function is sent at load.
                        layer_number = gr.Number(lambda: None, label="Selected layer (1 = bottom)", precision=0,
                                                 minimum=1, placeholder="click a layer in the gallery")
                        sub_layers = param_widget(gr, PARAM["layers"], value=SUB_RUN_LAYERS, label="Its layers")
                    sub_prompt = param_widget(gr, PARAM["prompt"],
                                              label="Prompt for this layer (empty: the model captions the layer)")
                    with gr.Row():
                        run_layer = gr.Button("Decompose this layer")
                        undo_button = gr.Button("Undo last layer decomposition")
                caption = gr.Textbox(label="Caption used", interactive=False)
                used_seed = gr.Number(label="Seed used", interactive=False, precision=0)
                # One under the other, full width, so the file names can be read whole (UI_CSS wraps long ones).
                with gr.Column(elem_classes="downloads"):
                    downloads = [gr.File(label=export.key.upper()) for export in EXPORTS]
        examples = example_images()
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[image])
        stack = gr.State(None)  # the LayerStack the gallery shows and the downloads hold
        view = [gallery, *downloads]  # a StackView
        run.click(
            decompose,
            inputs=[image, *(widgets[name] for name in names), original_size],
            outputs=[*view, caption, used_seed, stack],
            api_name="decompose",
            concurrency_limit=1,  # one GPU job at a time; others wait in Gradio's queue
            concurrency_id="gpu",  # ... shared with "Decompose this layer"
            # The handler takes the raw values: Gradio's Image preprocess opens the upload with Pillow before the
            # handler runs, so a broken or huge file would fail there with a developer's message. Unprocessed,
            # the image arrives as Gradio's file value (its path still checked to lie in Gradio's upload cache),
            # and `to_rgba` decodes it with the checks and messages above; `check_params` checks the numbers.
            preprocess=False,
        ).success(lambda: None, outputs=layer_number, api_visibility="private")  # a new stack: nothing selected
        gallery.select(select_layer, outputs=layer_number, api_visibility="private")
        run_layer.click(
            decompose_this_layer,
            inputs=[layer_number, sub_layers, sub_prompt, *(widgets[name] for name in shared), stack],
            outputs=[*view, caption, used_seed, stack],
            api_name="decompose_layer",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        undo_button.click(undo_last, inputs=[stack], outputs=[*view, caption, used_seed, stack], api_name="undo")
    demo.queue(default_concurrency_limit=1)
    return demo


# ----------------------------------------------------------------------------------------------------
# 8. main
# ----------------------------------------------------------------------------------------------------
def find_images(paths: list[Path | str]) -> list[Path]:
    """The images `decompose` runs on, in the order given: a folder gives its image files (IMAGE_SUFFIXES,
    sorted, not recursive); anything else is taken as it is, so a missing or bad file fails visibly."""
    images: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images += sorted(p for p in path.iterdir()
                             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        else:
            images.append(path)
    return images


@dataclasses.dataclass
class BatchItem:
    image: Path
    folder: Path | None = None  # its run folder, when it worked
    error: str | None = None  # why it failed


def decompose_batch(pipe, images: list[Path], outputs: Path, run_info: dict[str, Any] | None = None,
                    original_size: bool = False, **infer_kwargs) -> list[BatchItem]:
    """Decompose each image into its own run folder under `outputs`; `infer_kwargs` go to `infer`.

    One progress bar counts the images, the pipeline's own bar the current image's steps. A file that
    cannot be read as an image (or whose run folder cannot be written) is reported and skipped.
    """
    from tqdm.auto import tqdm

    # 1. The pipeline's step bar sits under the images bar and clears itself after each image.
    pipe.set_progress_bar_config(desc="steps", position=1, leave=False)
    items: list[BatchItem] = []
    for image in tqdm(images, desc="images", unit="image", position=0):
        # 2. Decompose and save. Bad input: missing (ValueError), not an image or truncated (OSError),
        #    a decompression bomb (Pillow's own error). Anything else is a bug or the machine: it stops the batch.
        try:
            result = infer(pipe, image, **infer_kwargs)
            paths = save_run(result, outputs, dict(run_info or {}, input_file=str(image)),
                             original_size=result.params["input_size"] if original_size else None)
        except (ValueError, OSError, Image.DecompressionBombError, OutOfMemoryError) as err:
            items.append(BatchItem(image, error=f"{type(err).__name__}: {err}"))
            tqdm.write(f"skipped {image}: {err}", file=sys.stderr)
            continue
        items.append(BatchItem(image, folder=paths["folder"]))
        tqdm.write(f"{image} -> {paths['folder']} (caption: {result.caption})", file=sys.stderr)
    return items


def batch_summary(items: list[BatchItem]) -> str:
    """What `decompose` prints at the end: the count, then each image that worked, then each that failed."""
    done = [item for item in items if item.error is None]
    failed = [item for item in items if item.error is not None]
    lines = [f"{len(done)} of {len(items)} images decomposed, {len(failed)} failed"]
    lines += [f"  ok      {item.image} -> {item.folder}" for item in done]
    lines += [f"  FAILED  {item.image}: {item.error}" for item in failed]
    return "\n".join(lines)


# What ends a command with its message and exit code 2, never a traceback: the user's mistakes (ValueError names
# the value and the fix), missing weights, and the machine's limits (GPU or host memory, a busy port, a full disk).
USER_ERRORS = (ValueError, ModelNotAvailableError, OutOfMemoryError, OSError, Image.DecompressionBombError)


def exits_with_message(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv)`: a USER_ERRORS exception prints `error: <message>` to stderr and returns 2.
    Used by the app's and both tools' `main`; anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as err:
            logger.debug("stopped by a user error", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            return 2
    return run


@exits_with_message
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command, settings, ns = parse_args(argv)
    if command == "ui" and network_warning(settings):
        logger.warning(network_warning(settings))
    if windows_path_warning(settings.outputs):
        logger.warning(windows_path_warning(settings.outputs))
    if command == "decompose":
        # Mistakes that would fail every image are caught before the model loads.
        images = find_images(ns.images)
        if not images:
            print(f"error: no images in {' '.join(ns.images)}: pass image files, or folders holding "
                  f"{', '.join(IMAGE_SUFFIXES)} files", file=sys.stderr)
            return 2
        # (The parameters were checked by their flags' `type=`, from the same PARAMS table `infer` checks with.)
    environment = print_environment_info()
    pipe = load_pipeline(settings)  # ModelNotAvailableError, check_host_ram's, plan_budget's: exit 2 with the message
    if pipe._studio_info["demo"]:
        print("DEMO MODEL in use: tiny random weights; everything runs, but the layers are noise.")

    if command == "decompose":
        items = decompose_batch(pipe, images, settings.outputs, run_info_for(pipe, environment),
                                original_size=ns.original_size, **{p.name: getattr(ns, p.name) for p in PARAMS})
        print(batch_summary(items))
        return 1 if any(item.error for item in items) else 0

    demo = build_ui(pipe, settings, environment)
    print(f"Serving on http://{settings.host}:{settings.port}")
    demo.launch(**launch_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
