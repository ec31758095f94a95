"""Qwen-Image-Layered studio: split one image into editable RGBA layers on one consumer GPU.

The whole runtime lives in this file, top to bottom:
    1. flags            the knobs, each with its reason; command line and environment override them in `parse_args`
    2. environment      `print_environment_info`, `clear_memory`
    3. demo model       a tiny random pipeline of the real classes, for machines without the 57 GB of weights
    4. loading          `ModelSpec`, `get_model_path`, `load_pipeline`, `apply_memory_optimizations`
    4b. low-VRAM engine offload mode "budget": `plan_budget`, `plan_host_ram`, `check_machine_fits`, `enable_budget_offload` (bench/RESULTS.md)
    4c. several GPUs    `--gpus N` / torchrun: `init_distributed`, `enable_multi_gpu` (CFG-parallel), `share_job`
    5. infer            `infer` (one decomposition)
    6. exports          pure functions `layers -> file`: PNG, ZIP, PPTX, PSD; `save_run` (a run folder)
    6b. layer stack     `LayerStack`, `replace_layer`, `decompose_layer`, `undo`: decompose a layer again, in place
    6c. scores          `recomposition_score` (every run), ground truth readers and LayerD's metrics (`evaluate`)
    7. UI               `build_ui` (Gradio Blocks, port 7869)
    8. main             `python src/app.py` (UI), `python src/app.py decompose IMG_OR_DIR...` (headless batch;
                        `--ray [ADDRESS]`: over a Ray cluster, `decompose_ray`) and `python src/app.py evaluate GT...`
                        (scores against ground-truth layers)

Importing this module loads no model and needs no GPU.
"""

# Environment variables that must be set before torch / huggingface_hub / gradio are imported.
import os

# Fewer fragmentation OOMs on a 24 GB card: the allocator grows segments instead of reserving new ones.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# A local tool: no usage reports to Gradio's or the hub's servers.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# --compile: Inductor's compiled kernels are cached on disk here (FX graph + autotune caches), so a second start of the
# app loads them instead of compiling again; its default under /tmp is lost at every reboot. Weights' folder, not git.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                              "models", "torch_compile_cache"))

import argparse
import collections
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
import threading
import time
import unicodedata
import weakref
import zipfile
from pathlib import Path
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

# The low-VRAM engine (section 4b) and CFG-parallel (4c) build on diffusers' hooks; importing them loads no model.
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
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
DEMO_MODEL_DIR = MODELS_DIR / "demo-tiny-random"  # the offline demo pipeline (~1.3 MB), built on first use
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
# Below this much VRAM "auto" takes "sequential". `load_pipeline` computes the real minimum from the weight files
# (`budget_minimum_gb`: the default job's activations beside one resident and two streamed transformer blocks);
# this is that figure for the real model, used where the files cannot be read.
BUDGET_AUTO_MIN_VRAM_GB = 7.0
OFFLOAD_MODES = ("auto", "off", "model", "sequential", "budget")
# GB of VRAM the "budget" mode may plan for; None: the card's free memory when the model loads.
VRAM_BUDGET_GB = None
# GB of host RAM the "budget" mode may plan for; None: what is available (psutil, within the process's cgroup
# memory.max) before the model loads. Below the weights' size it reads the rest from the files (section 4b).
RAM_BUDGET_GB = None
# Skip the remaining transformer blocks on a step whose first block changed less than the threshold
# (diffusers' FirstBlockCache). Trades a little fidelity for speed; 0.1 follows the seed.
ENABLE_FIRST_BLOCK_CACHE = True
FIRST_BLOCK_CACHE_THRESHOLD = 0.1
# None keeps bf16 weights. "fp8_storage" stores transformer weights in float8 and computes in bf16
# (diffusers layerwise casting): half the weight memory, LOSSY.
QUANTIZATION_MODE = None
QUANTIZATION_MODES = (None, "fp8_storage", "fp8_dynamic", "int8_dynamic")
# Opt-in LOSSY compute through torchao (off by default): "fp8_dynamic" runs the transformer blocks' linears as float8
# matmuls (activations and weights scaled on the fly; needs compute capability >= 8.9), "int8_dynamic" as int8 matmuls
# (>= 8.0). Only the blocks' attention and feed-forward linears are quantized: the modulation and timestep linears see
# one row per image, which int8's kernel refuses ("self.size(0) needs to be greater than 16") and which costs nothing.
# Both pay only compiled (eager, H200: fp8 1.18x slower per forward, int8 5x), so they turn ENABLE_COMPILE on, and
# only with every weight resident (--offload off): the budget engine lays weights out by their bytes and cannot move
# torchao's quantized tensors. Where they cannot run, `lossy_compute_problem` says why and bf16 runs instead.
LOSSY_COMPUTE_MODES = ("fp8_dynamic", "int8_dynamic")
LOSSY_COMPUTE_MIN_CAPABILITY = {"fp8_dynamic": (8, 9), "int8_dynamic": (8, 0)}
# Regional compilation: torch.compile on the transformer blocks' own forward (all 60 share one compiled graph; shapes
# are dynamic, so another layer count, resolution or prompt length reuses it). Offload and FirstBlockCache hooks stay
# outside the compiled code. H200, one resident 640/4 forward: 0.444 s vs 0.531 s eager (bench/bench_speed.py). Off by
# default: the first run pays the compile (~25 s); later starts load it from disk (TORCHINDUCTOR_CACHE_DIR, at the top).
ENABLE_COMPILE = False
COMPILE_OPTIONS = dict(fullgraph=True, dynamic=True)
# The auto-caption decodes up to 512 tokens and every step is a new sequence length: cuDNN attention builds a plan per
# new length (H100: 81 ms per token on lengths new to the process, 23 ms on a repeat), so the first image and every new
# image shape paid ~20 s more. The caption runs with these SDPA kernels instead (24 ms per token on new lengths). The
# transformer keeps cuDNN: one plan per job shape, and its forward is 16% slower without it (bench/RESULTS.md).
CAPTION_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# The caption's decode runs one forward of the 8.3B text encoder per token; eager, it is bound by kernel launches and
# Python (H200: ~24-30 ms per token against a ~3 ms weight-read floor). A static KV cache gives every decode step the
# same shapes, so transformers' `generate` compiles the step (Inductor) and replays it as CUDA graphs ("reduce-overhead";
# the prompt's prefill stays eager). H200, full-size random weights, 512 tokens: 5.4 s instead of 14-15 s eager, one
# graph for every image shape; the first caption of a process compiles for ~55 s (at load, in `warm_up`).
# OFF by default because it is not exact: its text left eager greedy decoding's at the 7th word on the random weights
# (fused kernels round differently, and random weights' top logits nearly tie). CUDA graphs of the eager kernels
# (backend "cudagraphs") were no better: different from the 21st word, and only 0.86x the eager time
# (bench/results/caption_probe.json, speed.json). Not tied to --compile, which changes only the transformer's speed.
# Only with every weight resident (--offload off): under budget the text encoder's weights get new GPU addresses each
# image, so the graphs are recorded again every caption (H200, 24 GB cap: 22.1 s against 11.6 s eager,
# bench/results/speed_24gb.json); `caption_compile_problem` says why not elsewhere.
ENABLE_CAPTION_COMPILE = False
# One static cache length for every caption (prompt with image tokens, ~1,400 at 1024 px, + 512 new tokens): every
# image shape then shares one compiled graph. 2048 tokens of KV cache cost 0.1 GB; a longer prompt grows it (recompiles).
CAPTION_CACHE_TOKENS = 2048
CAPTION_COMPILE_OPTIONS = dict(mode="reduce-overhead", fullgraph=False, dynamic=False)
# One short run at the default job's shapes when the model loads (`warm_up`, CUDA only): the user's first image then
# costs what a repeat costs instead of paying the process's one-time work (cuDNN/cuBLAS plans, CUDA's lazy kernel
# loading, compiled code). H200, resident, 640/4, 2 steps: first image 15.7 s vs repeat 16.1 s after a 12.6 s warm-up
# (without it: 31.1 s vs 16.5 s, 1.22x at 50 steps; bench/results/speed.json). --compile adds its ~19 s compile here.
ENABLE_WARM_UP = True
WARM_UP_CAPTION_TOKENS = 8  # enough decode steps for the compiled decode to compile, warm up and record its CUDA graph
# cuDNN autotuning (torch.backends.cudnn.benchmark) off: on, each process times the convolution algorithms and keeps the
# fastest, which can differ between two processes on the same card. The VAE's decode then rounds differently: the
# same seeded decode differed by up to 3 of 255 levels between two processes on an H200 (89% of its values), and
# was identical with autotuning off; the transformer blocks were identical either way (bench/probe_determinism.py,
# bench/results/determinism.json). That is what made a Ray worker's layers differ from the local batch's
# (bench/results/ray_batch.json). Off, the same seed gives the same layers in every process and on every start. Its
# cost, same probe (640 px, 4 layers, full-size VAE): a decode takes 0.73-1.02 s off against 0.70-0.79 s on after
# autotuning, and the process's first decode 1.2-1.6 s off against 3.0-5.0 s on (the autotuning itself).
ENABLE_CUDNN_BENCHMARK = False
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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # what the UI takes
# Exports (section 6). PowerPoint's default widescreen slide is 13.333 in wide; the slide's longer side
# gets (about) that length and the shorter one follows the image's aspect ratio (PowerPoint accepts 1 to 56 in).
SLIDE_LONG_SIDE_EMU = 12192000  # 914400 EMU per inch
# python-pptx refuses a slide side under 1 in: a strip past 13.3:1 gets a 1 in short side and a longer slide.
SLIDE_MIN_SIDE_EMU = 914400
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
# template). The largest job the UI allows: 1024 bucket, 10 layers = layers + 2 frames of up to 4,320 tokens
# (64x64 at 1:1; the pipeline's rounding to 32 px reaches 216x20 at 11.3:1; a 4:3 image gives 4,144).
def image_tokens(layers: int, resolution: int) -> int:
    """Image tokens of one job: the layers plus two frames (input and composite), of 16 px patches at the bucket."""
    return (layers + 2) * (resolution // 16) ** 2


BUDGET_PLAN_IMAGE_TOKENS = (LAYERS_RANGE[1] + 2) * 4320
# The job `auto` and the loader's minimum are planned for: the model card's default (640 bucket, 4 layers).
# A larger job that does not fit the budget is refused when it starts, with what would fit.
BUDGET_DEFAULT_JOB_IMAGE_TOKENS = image_tokens(DEFAULTS["layers"], DEFAULTS["resolution"])
BUDGET_PLAN_TEXT_TOKENS = 600
# Streamed blocks on the GPU at once: the one computing and the next one arriving.
BUDGET_STREAM_BUFFERS = 2
# Text encoder activations beside its weights: the caption's prefill (image tokens + prompt), its KV cache
# and the prompt encoding's full-vocabulary logits and hidden states.
BUDGET_TEXT_ENCODER_ACTIVATION_GB = 1.5
# Host RAM left to the OS, Python and Gradio beside the page-locked weight copies.
BUDGET_HOST_RAM_RESERVE_GB = 4.0
# Host RAM below the weights (32 GB machines): the budget mode page-locks what moves most often and leaves the rest
# as views of the safetensors files (`plan_host_ram`); those are read through the OS page cache, which needs this
# much room of its own.
BUDGET_PAGE_CACHE_MIN_GB = 2.0
# Transformer calls of the default image (50 steps, two with true CFG) and decoded tokens of a full caption: how often
# a streamed weight is copied per image, for `plan_host_ram`'s disk figure.
BUDGET_FORWARDS_PER_IMAGE = 100
BUDGET_CAPTION_TOKENS = 512
# Beyond this many GB read from disk per image (~6 min at a desktop NVMe's 7 GB/s, more than `sequential` costs) the
# budget mode refuses a machine whose RAM is too small, with the figures, rather than run for hours.
BUDGET_MAX_DISK_READ_GB_PER_IMAGE = 2500.0
# Text encoder on cards where its 15.4 GB do not fit whole (16 and 12 GB): the caption's decode activations are
# small and steady (KV cache of ~1,100 tokens: 0.06 GB), so it is planned with a smaller margin than denoising's.
BUDGET_TEXT_ENCODER_MARGIN_GB = 1.0

# Scores (section 6c). Identical images have an infinite PSNR; it is reported as this cap so that JSON and CSV
# stay plain numbers (one 8-bit level off in one pixel of a 640x640 image is already ~109 dB).
PSNR_CAP_DB = 100.0
# A layer whose mean alpha is below this holds (next to) nothing: flagged "empty" (0.1% of the canvas).
EMPTY_LAYER_COVERAGE = 0.001
# Two layers whose LayerD cost (`layer_cost`: RGB L1 and 1 - alpha soft IoU, averaged) is below this both ways
# are flagged as near-duplicates: the same thing twice.
NEAR_DUPLICATE_COST = 0.02
# `evaluate`: merges of adjacent layers the alignment may make (LayerD's evaluate.py default max_edits is 5).
EVAL_MAX_MERGES = 5
# `evaluate --grid KEY=V1,V2`: the settings a grid may vary -> the PARAMS row each sets (its type reads the values,
# `check_param` checks them); first_block_cache_threshold is a load setting, not a PARAMS row.
EVAL_GRID_KEYS = {"steps": "num_inference_steps", "layers": "layers", "true_cfg_scale": "true_cfg_scale",
                  "resolution": "resolution", "seed": "seed", "first_block_cache_threshold": None}


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
    compile: bool = ENABLE_COMPILE
    caption_compile: bool = ENABLE_CAPTION_COMPILE
    warm_up: bool = ENABLE_WARM_UP
    auth: tuple[str, str] | None = None  # (user, password) for Gradio's login; None: no login
    max_upload_size: str | int = MAX_UPLOAD_SIZE  # Gradio's max_file_size: "50mb", or bytes
    outputs_max_gb: float = OUTPUTS_MAX_GB  # 0: no size limit
    outputs_max_age_hours: float = OUTPUTS_MAX_AGE_HOURS  # 0: no age limit
    vram_budget_gb: float | None = VRAM_BUDGET_GB  # "budget" mode only
    ram_budget_gb: float | None = RAM_BUDGET_GB  # "budget" mode only; None: the RAM available before loading


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
                        choices=[m for m in QUANTIZATION_MODES if m],
                        help="all LOSSY: fp8_storage stores weights in float8; fp8_dynamic / int8_dynamic compute in "
                             "float8 / int8 (torchao, CUDA, --offload off)")
    parser.add_argument("--compile", action="store_true", default=_env("COMPILE", ENABLE_COMPILE),
                        help="torch.compile the transformer blocks (faster steps; the first run compiles ~25 s)")
    parser.add_argument("--caption-compile", action="store_true", default=_env("CAPTION_COMPILE", ENABLE_CAPTION_COMPILE),
                        help="decode the auto-caption with a static KV cache and CUDA graphs (~2.7x faster; not exact: "
                             "its greedy text can differ from eager's; the first start compiles ~1 min)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false", default=_env("WARM_UP", ENABLE_WARM_UP),
                        help="skip the short run at load time (the first image then pays CUDA's one-time work)")
    parser.add_argument("--sage-attention", action="store_true", default=_env("SAGE_ATTENTION", ENABLE_SAGE_ATTENTION))
    parser.add_argument("--vram-budget", dest="vram_budget_gb", type=float, metavar="GB",
                        default=_env("VRAM_BUDGET", VRAM_BUDGET_GB),
                        help="VRAM the budget offload mode may use (default: the GPU's free memory)")
    parser.add_argument("--ram-budget", dest="ram_budget_gb", type=float, metavar="GB",
                        default=_env("RAM_BUDGET", RAM_BUDGET_GB),
                        help="host RAM the budget offload mode may use (default: what is available before loading)")


def _add_param_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """One flag per row of PARAMS (`dest` is the row's name); a bool's flag flips its default. `defaults` replaces
    some rows' defaults (`evaluate`'s --layers: None, the ground truth's count)."""
    for p in PARAMS:
        default = (defaults or {}).get(p.name, p.default)
        if p.type is bool:
            parser.add_argument(p.flag, dest=p.name, action="store_false" if p.default else "store_true",
                                default=p.default, help=p.help)
            continue
        limits = f" ({p.range[0]:g} to {p.range[1]:g})" if p.range and p.type is not str else ""
        parser.add_argument(p.flag, dest=p.name, type=_param_arg(p), default=default, choices=p.choices,
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

    Returns (command, settings, namespace): command is "ui", "decompose" or "evaluate".
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
        parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                            help="spread the images over a Ray cluster, one pipeline per GPU (no ADDRESS: a local "
                                 "Ray instance, or the cluster RAY_ADDRESS names); skips images already done")
        parser.add_argument("--ray-workers", type=int, default=None, metavar="N",
                            help="--ray: pipelines to start (default: one per GPU of the cluster, else 1)")
    elif argv and argv[0] == "evaluate":
        command, argv = "evaluate", argv[1:]
        parser = evaluate_parser()
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
    parser.add_argument("--gpus", type=int, default=_env("GPUS", 1), metavar="N",
                        help="split each image over N GPUs of this machine (CFG-parallel; torchrun works too)")
    _add_common_args(parser)
    ns = parser.parse_args(argv)
    if ns.gpus < 1:
        parser.error(f"--gpus {ns.gpus}: use 1 or more")
    if getattr(ns, "ray_workers", None) is not None and ns.ray_workers < 1:
        parser.error(f"--ray-workers {ns.ray_workers}: use 1 or more")
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


def evaluate_parser() -> argparse.ArgumentParser:
    """`app.py evaluate`'s own flags (the common ones are added by `parse_args`)."""
    parser = argparse.ArgumentParser(prog="app.py evaluate", description=(
        "Score decompositions against ground-truth layers (LayerD's metrics): each ground truth is flattened, "
        "decomposed with the settings given (or its prediction is read from --pred), aligned and scored. "
        "Writes evaluate.csv (one row per image and setting) and evaluate.json (summary) into --out."))
    parser.add_argument("ground_truth", nargs="+", metavar="GT",
                        help="layered files: PSD, the studio's ZIP, a folder of RGBA PNGs (bottom first), or a folder "
                             "holding such files (e.g. assets/layered_gt)")
    parser.add_argument("--out", type=Path, required=True, help="folder for evaluate.csv, evaluate.json and the "
                                                                  "predicted layers")
    parser.add_argument("--max-merges", type=int, default=EVAL_MAX_MERGES,
                        help="merges of adjacent layers the alignment may make (default: %(default)s, as LayerD)")
    parser.add_argument("--no-group", dest="group", action="store_false",
                        help="score layers as they are; by default non-overlapping top layers are grouped, as LayerD does")
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="run every combination, one row each with time per image; KEY: " + ", ".join(EVAL_GRID_KEYS))
    parser.add_argument("--pred", type=Path, default=None, metavar="DIR",
                        help="score layers made elsewhere, no model: DIR/<ground truth name>/ (PNGs), .zip or .psd; "
                             "with one ground truth, DIR itself may hold the PNG layers")
    _add_param_args(parser, defaults={"layers": None})  # --layers None: the ground truth's count
    return parser


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
        compile=ns.compile,
        caption_compile=ns.caption_compile,
        warm_up=ns.warm_up,
        auth=getattr(ns, "auth", None),  # parse_args has turned USER:PASSWORD into (user, password)
        max_upload_size=getattr(ns, "max_upload_size", MAX_UPLOAD_SIZE),
        outputs_max_gb=getattr(ns, "outputs_max_gb", OUTPUTS_MAX_GB),
        outputs_max_age_hours=getattr(ns, "outputs_max_age_hours", OUTPUTS_MAX_AGE_HOURS),
        vram_budget_gb=ns.vram_budget_gb,
        ram_budget_gb=getattr(ns, "ram_budget_gb", RAM_BUDGET_GB),
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
    # base_dim=2: the full-size convolutions are the demo's main CPU cost (a 2-layer run: 2.0 s, not 2.8 s, and its
    # noise layers save in 0.6 s, not 1.8 s).
    vae = AutoencoderKLQwenImage(base_dim=2, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
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
    """TF32 matmuls; cuDNN autotuning only where ENABLE_CUDNN_BENCHMARK asks (off: the same layers in every process).
    Flash SDPA stays as PyTorch chose (on)."""
    if not torch.cuda.is_available():
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = ENABLE_CUDNN_BENCHMARK
    return ["tf32"] + (["cudnn_benchmark"] if ENABLE_CUDNN_BENCHMARK else [])


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


def resolve_offload_mode(mode: str, cuda_available: bool, vram_gb: float | None,
                         budget_min_gb: float = BUDGET_AUTO_MIN_VRAM_GB) -> str:
    """Turn "auto" into a concrete mode for this machine (`vram_gb`: the VRAM it may use, GiB); check an explicit
    one. `budget_min_gb`: the budget mode's minimum for these weights (`budget_minimum_gb`)."""
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
    if vram_gb >= budget_min_gb:
        return "budget"  # the low-VRAM engine (section 4b): 24 GB cards, and 16 / 12 GB with the text encoder split
    return "sequential"  # not even one transformer block fits beside the default job's activations: stream every layer


def default_vram_budget_gb(settings: Settings) -> float:
    """--vram-budget, else the GPU's free memory now (the whole budget when there is no GPU: nothing moves)."""
    if settings.vram_budget_gb is not None:
        return float(settings.vram_budget_gb)
    if not torch.cuda.is_available():
        return float("inf")
    return torch.cuda.mem_get_info()[0] / GIB


def lossy_compute_problem(mode: str, offload_mode: str, capability: tuple[int, int] | None,
                          torchao_version: str | None) -> str | None:
    """Why LOSSY compute `mode` cannot run here (None: it can). `capability` is the GPU's, None without CUDA."""
    if capability is None:
        return f"--quantization {mode} needs a CUDA GPU and this machine has none"
    if capability < LOSSY_COMPUTE_MIN_CAPABILITY[mode]:
        need = ".".join(map(str, LOSSY_COMPUTE_MIN_CAPABILITY[mode]))
        return (f"--quantization {mode} needs a GPU of compute capability {need} or newer for its "
                f"{mode.split('_')[0]} matmuls; this one is {capability[0]}.{capability[1]}")
    if torchao_version is None:
        return f"--quantization {mode} needs the torchao package (pip install torchao), which is not installed"
    if offload_mode != "off":
        return (f"--quantization {mode} runs only with every weight resident (--offload off; now: {offload_mode}): "
                f"the offload hooks move weights by their bytes and cannot move torchao's quantized tensors")
    return None


def _lossy_linear_filter(module: torch.nn.Module, name: str) -> bool:
    """The transformer blocks' attention and feed-forward linears (one row per token); see LOSSY_COMPUTE_MODES."""
    return isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and "_mod." not in name


def apply_lossy_compute(transformer: torch.nn.Module, mode: str) -> None:
    """Quantize the blocks' linears with torchao's dynamic `mode` (LOSSY), on the GPU where it is fast."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig,
                                      quantize_)

    config = Float8DynamicActivationFloat8WeightConfig() if mode == "fp8_dynamic" else Int8DynamicActivationInt8WeightConfig()
    quantize_(transformer, config, filter_fn=_lossy_linear_filter, device="cuda")


def compile_problem(offload_mode: str, quantization: str | None = None) -> str | None:
    """Why the transformer blocks cannot be compiled with these settings (None: they can)."""
    if offload_mode == "sequential":
        return ("--compile does not apply with --offload sequential: accelerate's hooks on every layer inside a "
                "block would break the compiled graph at each weight copy")
    if quantization == "fp8_storage":
        return ("--compile does not apply with --quantization fp8_storage: its casting hooks on every layer inside "
                "a block would be traced into the compiled graph")
    return None


def compile_transformer_blocks(transformer: torch.nn.Module) -> int:
    """torch.compile each transformer block's own forward (regional compilation); returns how many blocks.

    diffusers' `compile_repeated_blocks` compiles the module call, which runs the forward that offload and
    FirstBlockCache hooks replace: their Python would be traced and break the graph. Compiling the block's forward
    before any hook is installed keeps the hooks outside (they wrap the compiled forward) and the graph whole.
    Inductor caches the compiled kernels on disk (TORCHINDUCTOR_CACHE_DIR, set at the top of this file).
    """
    blocks = transformer.transformer_blocks
    for block in blocks:
        block.forward = torch.compile(block.forward, **COMPILE_OPTIONS)
    return len(blocks)


def compile_cache_file() -> Path:
    """torch's portable compile cache ("mega-cache") for --compile, beside Inductor's on-disk caches."""
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / f"mega_cache_torch{torch.__version__}.bin"


def load_compile_cache() -> bool:
    """Before compiling: load the mega-cache a previous start saved (`save_compile_cache`); False when there is none.

    Why, beside TORCHINDUCTOR_CACHE_DIR: a second start of the app with that directory alone still paid ~18 s on an
    H200 (bench/results/speed_previous.json, as much as the cold compile). `torch.compiler.save_cache_artifacts`
    gathers in one file everything the compile used (Inductor's FX graphs, AOTAutograd's graphs, the Triton kernels'
    binaries, the autotuning results and the automatic-dynamic profile) and `load_cache_artifacts` puts them all back
    in place before the first compile. On the CPU a process with an empty cache directory and this file alone hit
    Inductor's and AOTAutograd's caches; whether it pays on a GPU's second start is bench_speed.py's B4 (pending a
    run). With --caption-compile the file holds the caption decode's compile too. A file that does not load (another
    torch, a damaged file) is said and the blocks compile anew.
    """
    path = compile_cache_file()
    if not path.is_file():
        return False
    try:
        problem = None if torch.compiler.load_cache_artifacts(path.read_bytes()) else "no cache in it, or a damaged one"
    except Exception as err:  # noqa: BLE001 - any failure only costs the compile time; said, not swallowed
        problem = f"{type(err).__name__}: {err}"
    if problem:
        logger.warning("Compile cache %s not loaded (%s); compiling anew. Delete the file to stop this warning.",
                       path, problem)
    return problem is None


def save_compile_cache() -> Path | None:
    """After the first compiled run (the warm-up): save the mega-cache for the next start; None when nothing compiled."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None or not artifacts[0]:
        return None
    path = compile_cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a start cut while writing leaves no half file to load
    partial.write_bytes(artifacts[0])
    partial.replace(path)
    return path


def caption_compile_problem(offload_mode: str, on_cuda: bool) -> str | None:
    """Why the caption's decode is not compiled with these settings (None: it is; ENABLE_CAPTION_COMPILE)."""
    if not on_cuda:
        return "caption decode not compiled: its CUDA graphs need a CUDA GPU (the CPU decodes eagerly)"
    if not triton_available():
        return ("caption decode not compiled: torch.compile's GPU kernels need Triton, which is not installed "
                "(pip install triton; on Windows pip install triton-windows)")
    if offload_mode == "budget":  # measured: bench/results/speed_24gb.json, phase B3
        return ("caption decode not compiled with --offload budget: the text encoder's weights are copied to the GPU "
                "anew for each image (new addresses), so its CUDA graphs are recorded again every caption; measured on "
                "an H200 at a 24 GB cap, 22.1 s for 512 tokens against 11.6 s eager")
    if offload_mode != "off":
        return (f"caption decode not compiled with --offload {offload_mode}: accelerate's hooks move the text encoder's "
                f"weights inside its forward, which the compiled step would trace and a CUDA graph cannot replay")
    return None


def compile_caption_decode(text_encoder, **options: Any) -> None:
    """A static KV cache and a compiled decode step for the text encoder's `generate` (ENABLE_CAPTION_COMPILE).

    Set on its generation config, so the pipeline's own `get_image_caption` stays the caller: transformers compiles
    the decode step (`get_compiled_call`) when the cache is static; the prefill stays eager. `options` override
    CAPTION_COMPILE_OPTIONS (tests: backend "eager" on the CPU).
    """
    from transformers import CompileConfig

    config = text_encoder.generation_config
    config.cache_implementation = "static"
    config.max_cache_len = CAPTION_CACHE_TOKENS
    config.compile_config = CompileConfig(**{**CAPTION_COMPILE_OPTIONS, **options})
    if text_encoder.device.type == "cpu":  # transformers compiles only on accelerators unless told (tests)
        config.compile_config._compile_all_devices = True


def eager_caption_decode(text_encoder) -> None:
    """Undo `compile_caption_decode`: transformers' default dynamic cache and eager decoding again."""
    config = text_encoder.generation_config
    config.cache_implementation = config.max_cache_len = config.compile_config = None


def apply_fp8_storage(transformer: torch.nn.Module) -> None:
    """--quantization fp8_storage (LOSSY): diffusers' layerwise casting stores the transformer's Linear weights in
    float8 and casts each layer to the compute dtype for its own forward. What it skips (norms, positional embedding,
    proj_out, the model's `_skip_layerwise_casting_patterns`: 0.04 GB of the real model) keeps the loaded dtype.

    It casts leaf by leaf: each layer's float8 copy is made from the bf16 weights that from_pretrained left as views of
    the mapped safetensors files, so loading holds the float8 transformer (19 GB) in anonymous RAM and the bf16 one
    (38 GB) only as page cache, which the OS evicts as it goes (measured on the CPU: todo/optimize4090.md).
    """
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype)


def apply_fp8_text_layers(text_encoder: torch.nn.Module, indices: tuple[int, ...]) -> None:
    """--quantization fp8_storage (LOSSY) on a card the text encoder does not fit whole: its language layers `indices`
    (`TextEncoderPlan.fp8_layers`, the ones that would otherwise stream per caption token) get the transformer's
    treatment, diffusers' layerwise casting: Linear weights stored in float8, each layer cast back to bf16 for its
    own forward, norms kept. The float8 copies are made in RAM from the bf16 file views, as `apply_fp8_storage`'s."""
    if not indices:
        return
    from diffusers.hooks import apply_layerwise_casting

    layers = _text_encoder_parts(text_encoder)[0]
    for index in indices:
        if not any(p.dtype == torch.float8_e4m3fn for p in layers[index].parameters()):  # cast once (a re-plan)
            apply_layerwise_casting(layers[index], storage_dtype=torch.float8_e4m3fn,
                                    compute_dtype=next(layers[index].parameters()).dtype)
    release_freed_heap()


def fp8_text_layer_gb(layer: torch.nn.Module) -> float:
    """GiB of a text encoder language layer as `apply_fp8_text_layers` stores it: a twin built on the meta device
    (no memory) in the layer's dtype and cast by the same rule, so diffusers decides what is 1 byte."""
    with torch.device("meta"):
        twin = type(layer)(layer.self_attn.config, 0).to(next(layer.parameters()).dtype)
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(twin, storage_dtype=torch.float8_e4m3fn, compute_dtype=next(twin.parameters()).dtype)
    return _module_gb(twin)


def fp8_text_layer_gb_from_files(model_path: Path | str, dtype: torch.dtype) -> float:
    """`fp8_text_layer_gb` before loading: the text encoder is built from its config on the meta device."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(Path(model_path) / "text_encoder")
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ValueError(f"{Path(model_path) / 'text_encoder' / 'config.json'} names no transformers model class "
                         f"({config.architectures!r}): --quantization fp8_storage cannot size its text encoder's "
                         f"float8 layers; pass the folder of a diffusers pipeline")
    with torch.device("meta"):
        text_encoder = model_class._from_config(config, dtype=dtype)
    return fp8_text_layer_gb(_text_encoder_parts(text_encoder)[0][0])


def fp8_storage_element_sizes(model_path: Path | str) -> dict[str, int]:
    """Bytes per element of each transformer weight that fp8_storage stores in float8, by name (the others keep the
    loaded dtype), for the planner before loading (`budget_sizes_from_files`). The cast's own rule decides: the
    transformer is built from its config on the meta device (no memory; 0.3 s for the real one) and cast as
    `apply_fp8_storage` does."""
    import diffusers

    folder = Path(model_path) / "transformer"
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    model_class = getattr(diffusers, str(name), None)
    if not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        raise ValueError(f"{folder / 'config.json'} names no diffusers model class ({name!r}): --quantization "
                         f"fp8_storage cannot size its float8 weights; pass the folder of a diffusers pipeline")
    with torch.device("meta"):
        transformer = model_class.from_config(model_class.load_config(folder))
    apply_fp8_storage(transformer)
    return {name: t.element_size() for name, t in itertools.chain(transformer.named_parameters(),
                                                                   transformer.named_buffers())
            if t.dtype == torch.float8_e4m3fn}


def fp8_stored(transformer: torch.nn.Module) -> bool:
    """Whether `apply_fp8_storage` cast this transformer (its weights are then float8 copies in RAM, not file views)."""
    return any(p.dtype == torch.float8_e4m3fn for p in transformer.parameters())


def fp8_storage_sizes(model_path: Path | str, element_size: int) -> dict[str, Any] | None:
    """fp8_storage's sizes from the files: the transformer's float8 weights, and `text_layer_fp8_gb`, a text encoder
    language layer in float8 (the planner stores so those that would stream, where the text encoder does not fit)."""
    sizes = budget_sizes_from_files(model_path, element_size, fp8_storage_element_sizes(model_path))
    if sizes is None:
        return None
    dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}.get(element_size, torch.bfloat16)
    return dict(sizes, text_layer_fp8_gb=fp8_text_layer_gb_from_files(model_path, dtype))


def planner_sizes(model_path: Path | str, element_size: int, quantization: str | None
                  ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The sizes `load_pipeline` checks the machine with before loading (`budget_sizes_from_files`): (the weights as
    they will be held, fp8_storage's float8 figures for it; for a bf16 run the float8 figures too, so that a refusal
    says what the lossy option needs; for an fp8_storage run the bf16 ones, to say what bf16 needs; else None).
    (None, None) where the files cannot say."""
    sizes = budget_sizes_from_files(model_path, element_size)
    if sizes is None or quantization not in (None, "fp8_storage"):
        return sizes, None
    if quantization == "fp8_storage":
        return fp8_storage_sizes(model_path, element_size), sizes
    try:  # only for a refusal's advice: never a reason for a bf16 load to fail
        return sizes, fp8_storage_sizes(model_path, element_size)
    except (OSError, ValueError) as err:
        logger.info("The lossy option's sizes could not be read (%s): refusals will not name its figures.", err)
        return sizes, None


def apply_memory_optimizations(pipe, settings: Settings, offload_mode: str) -> list[str]:
    """Apply offload, VAE, cache and attention features, one line each; return what was applied by name.

    A feature that cannot apply is logged with its reason (never swallowed).
    """
    applied: list[str] = []
    on_cuda = torch.cuda.is_available()
    compile_blocks = settings.compile

    # 1. Weight storage (before offloading, so offload hooks move the smaller tensors).
    if settings.quantization == "fp8_storage":
        apply_fp8_storage(pipe.transformer)
        applied.append("fp8_storage (LOSSY: transformer weights stored in float8)")
    elif settings.quantization in LOSSY_COMPUTE_MODES:
        capability = torch.cuda.get_device_capability() if on_cuda else None
        problem = lossy_compute_problem(settings.quantization, offload_mode, capability, _version("torchao"))
        if problem:
            logger.warning("%s. Running bf16 compute instead (not lossy).", problem)
        else:
            apply_lossy_compute(pipe.transformer, settings.quantization)
            applied.append(f"{settings.quantization} (LOSSY: transformer matmuls in {settings.quantization[:4]}, torchao)")
            compile_blocks = True  # torchao's dynamic quantization pays only compiled (LOSSY_COMPUTE_MODES)
    elif settings.quantization is not None:
        raise ValueError(f"quantization {settings.quantization!r} is not one of {QUANTIZATION_MODES}")

    # 1b. Regional compilation, before any hook: the offload and cache hooks then wrap the compiled forward.
    if compile_blocks and compile_problem(offload_mode, settings.quantization):
        logger.warning("%s. Running the blocks eagerly.", compile_problem(offload_mode, settings.quantization))
    elif compile_blocks:
        cached = load_compile_cache()  # a previous start's compile (see the function)
        count = compile_transformer_blocks(pipe.transformer)
        applied.append(f"compiled_transformer_blocks({count}{', cache loaded' if cached else ''})")

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
        applied += enable_budget_offload(pipe, default_vram_budget_gb(settings), host_ram_gb=settings.ram_budget_gb)  # 4b
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

    # 6. The caption's decode: a static KV cache and CUDA graphs, with every weight resident.
    if settings.caption_compile:
        problem = caption_compile_problem(offload_mode, on_cuda)
        if problem:
            logger.info(problem)
        else:
            compile_caption_decode(pipe.text_encoder)
            applied.append(f"caption_compiled_decode(static cache {CAPTION_CACHE_TOKENS} tokens)")
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


def warm_up(pipe, resolution: int = DEFAULTS["resolution"], layers: int = DEFAULTS["layers"]) -> float:
    """One short decomposition at the default job's shapes (ENABLE_WARM_UP); returns its seconds.

    A caption of WARM_UP_CAPTION_TOKENS tokens (the vision tower and the prompt's prefill at this shape, the compiled
    decode's compile and CUDA graph), then a run of the fewest steps with a given prompt (VAE, text encoding, the
    transformer and its cuDNN plans, --compile's blocks). The user's first image at these shapes then costs what a
    repeat costs; another shape still pays its own plans once (the caption's decode does not: one static cache size).
    """
    image = Image.new("RGBA", (resolution, resolution), (128, 128, 128, 255))
    start = time.perf_counter()
    with generate_with(pipe.text_encoder, max_new_tokens=WARM_UP_CAPTION_TOKENS):
        caption_image(pipe, image, resolution)
    infer(pipe, image, prompt="warm-up", num_inference_steps=STEPS_RANGE[0], layers=layers, resolution=resolution, seed=0)
    return time.perf_counter() - start


def load_pipeline(settings: Settings, spec: ModelSpec = LAYERED_MODEL):
    """Load `spec`'s pipeline (bf16 on CUDA, float32 on CPU), apply the memory features and, on CUDA, warm it up."""
    import diffusers

    # 0. A GPU that torch cannot use is said with the fix, not silently replaced by the CPU.
    check_torch_sees_gpu(settings.demo)
    # 1. Find the weights (raises ModelNotAvailableError with what to do).
    model_path = get_model_path(settings, spec)
    # 2. Pick the dtype: bf16 is the model's dtype; PyTorch's CPU bf16 convolutions are ~20x slower than
    #    float32 (measured: a 2-step demo run took 214 s in bf16, 11 s in float32), so the CPU uses float32.
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    # 3. Pick the offload mode from what this machine has (the VRAM `--vram-budget` names, else the GPU's free
    #    memory), and say before loading when it cannot fit, with the figures and what would (ValueError).
    vram_gb = default_vram_budget_gb(settings) if cuda else None
    sizes, other_sizes = planner_sizes(model_path, torch.finfo(dtype).bits // 8, settings.quantization)
    fp8_storage = settings.quantization == "fp8_storage"
    offload_mode = resolve_offload_mode(settings.offload, cuda, vram_gb,
                                        budget_minimum_gb(sizes) if sizes else BUDGET_AUTO_MIN_VRAM_GB)
    #    Several GPUs of one machine (section 4c): each rank loads its own pipeline at the same time, so each plans
    #    with its share of the RAM; what a rank leaves in the weight files is page cache that the ranks share.
    ram_gb = (settings.ram_budget_gb if settings.ram_budget_gb is not None
              else available_ram_gb() / ranks_on_this_machine())
    if sizes is not None and (cuda or offload_mode == "budget"):
        try:
            check_machine_fits(offload_mode, sizes, vram_gb if cuda else default_vram_budget_gb(settings), ram_gb=ram_gb,
                               fp8_storage=fp8_storage, lossy_sizes=None if fp8_storage else other_sizes,
                               exact_sizes=other_sizes if fp8_storage else None)
        except ValueError as err:
            if ranks_on_this_machine() == 1:
                raise
            raise ValueError(f"{ranks_on_this_machine()} GPUs of this machine each load the pipeline, so each has 1/"
                             f"{ranks_on_this_machine()} of its RAM. {err}") from None
        hint = None if fp8_storage or offload_mode != "budget" else fp8_storage_hint(
            sizes, other_sizes, vram_gb if cuda else default_vram_budget_gb(settings), ram_gb)
        if hint:  # bf16 fits by reading blocks from disk at every call: say what the lossy option would do
            logger.warning(hint)
    if offload_mode == "budget":  # the RAM measured before loading: the budget mode plans its host copies in it
        settings = dataclasses.replace(settings, ram_budget_gb=ram_gb)
    setup_cuda_optimizations()
    # 4. Load through from_pretrained, the same path for the real and the demo weights. Where the files' dtype is the
    #    one asked for, diffusers and transformers map the safetensors files and copy nothing: the weights are page
    #    cache until a mode copies them (the budget mode with little RAM keeps part of them so: `HostRamPlan`).
    start = time.perf_counter()
    pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(model_path, dtype=dtype)
    applied = apply_memory_optimizations(pipe, settings, offload_mode)
    # 5. Warm-up on CUDA (ENABLE_WARM_UP): the CPU has no plans or graphs to build, and the edit tool's pipeline has
    #    no layered job to run.
    if settings.warm_up and cuda and spec is LAYERED_MODEL:
        applied.append(f"warm_up({warm_up(pipe):.1f} s)")
        if any(name.startswith("compiled_transformer_blocks") for name in applied) and save_compile_cache():
            applied.append("compile_cache_saved")  # the next start loads it (`load_compile_cache`)
    # Attach what the run folders record.
    pipe._studio_info = dict(model_path=str(model_path), offload_mode=offload_mode, dtype=str(dtype).replace("torch.", ""),
                             optimizations=applied, demo=is_demo_model(model_path),
                             lossy=any("LOSSY" in name for name in applied))
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
#                   on 16 and 12 GB cards split (`TextEncoderPlan`): as many language layers resident as fit, the
#                   others streamed per token through the same hooks as the blocks, the vision tower copied in
#                   per caption, the token embeddings looked up in host RAM;
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
    text_encoder: "TextEncoderPlan | None" = None  # how the caption stage shares the GPU (None: all resident)
    minimum_gb: float = 0.0  # the smallest budget this job fits in

    def describe(self) -> str:
        blocks = len(self.resident_blocks) + len(self.streamed_blocks)
        text = f"; text encoder: {self.text_encoder.describe()}" if self.text_encoder and self.text_encoder.split else ""
        return (f"budget {self.vram_budget_gb:g} GB: {len(self.resident_blocks)}/{blocks} transformer blocks resident, "
                f"{len(self.streamed_blocks)} streamed; predicted peak {self.denoise_peak_gb:.1f} GB denoising "
                f"{self.image_tokens} image tokens, {self.text_encoder_peak_gb:.1f} GB encoding text; "
                f"{self.host_ram_gb:.1f} GB of page-locked host RAM{text}")


@dataclasses.dataclass(frozen=True)
class TextEncoderPlan:
    """How the text encoder's stage shares the GPU; `plan_text_encoder` computes it. Sizes in GiB.

    split=False: the whole text encoder is resident (24 GB cards and up). split=True (16 and 12 GB cards): the
    token-embedding table stays in host RAM (a lookup of one row per token), the vision tower is copied in for its
    one call per caption, lm_head and `resident_layers` stay, and the other language layers stream in per token.
    Under --quantization fp8_storage (LOSSY) the layers that would stream are stored in float8 instead and stay
    resident too (`fp8_layers`, cast to bf16 for their own forward): nothing is copied per token.
    """

    split: bool
    resident_layers: tuple[int, ...]  # in the loaded dtype (bf16)
    streamed_layers: tuple[int, ...]
    peak_gb: float  # predicted allocator peak while captioning / encoding the prompt
    minimum_gb: float  # the smallest budget that holds this stage
    streamed_gb_per_token: float  # copied host -> GPU per decoded caption token
    fp8_layers: tuple[int, ...] = ()  # resident in float8 (fp8_storage only: LOSSY)

    @property
    def num_layers(self) -> int:
        return len(self.resident_layers) + len(self.streamed_layers) + len(self.fp8_layers)

    def describe(self) -> str:
        layers = self.num_layers
        fp8 = (f"{len(self.fp8_layers)} in float8 (LOSSY), all resident (nothing copied per caption token)"
               if self.fp8_layers else "")
        streamed = (f"{len(self.streamed_layers)} streamed ({self.streamed_gb_per_token:.1f} GB copied per caption "
                    f"token)" if self.streamed_layers or not self.fp8_layers else "")
        return (f"{len(self.resident_layers)}/{layers} language layers resident, {fp8 or streamed}, vision tower "
                f"copied in per caption, token embeddings in host RAM")


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
    text_layer_gb: float = 0.0,
    text_num_layers: int = 0,
    text_vision_gb: float = 0.0,
    text_embed_gb: float = 0.0,
    text_resident_layers: int | None = None,
    text_layer_fp8_gb: float = 0.0,
) -> BudgetPlan:
    """How many transformer blocks (and text encoder layers) stay on the GPU within `vram_budget_gb`. Pure
    arithmetic on sizes (GiB).

    Raises ValueError naming the minimum budget when not even one transformer block, or one language layer of the
    text encoder, fits beside the streamed ones. `resident_blocks` / `text_resident_layers` override the counts
    (tests, tuning). Without `text_num_layers` the text encoder is one piece that must be resident.
    `text_layer_fp8_gb` (fp8_storage's sizes only): a language layer stored in float8, for `plan_text_encoder`.
    """
    # 1. What the denoising stage holds besides its resident blocks: the transformer's other layers, the VAE,
    #    activations for the planned job, and the margin. Streaming adds two blocks in flight.
    fixed = other_transformer_gb + vae_gb + activation_gb(image_tokens + BUDGET_PLAN_TEXT_TOKENS) + BUDGET_SAFETY_MARGIN_GB
    streaming = BUDGET_STREAM_BUFFERS * block_gb
    text = plan_text_encoder(vram_budget_gb, text_encoder_gb=text_encoder_gb, layer_gb=text_layer_gb,
                             num_layers=text_num_layers, vision_gb=text_vision_gb, embed_gb=text_embed_gb, vae_gb=vae_gb,
                             resident_layers=text_resident_layers, fp8_layer_gb=text_layer_fp8_gb)

    # 2. The minimum: block 0 resident and the others streamed; the text encoder's own minimum.
    minimum = max(fixed + block_gb + (streaming if num_blocks > 1 else 0.0), text.minimum_gb)
    if vram_budget_gb < minimum:
        raise ValueError(
            f"--vram-budget {vram_budget_gb:g} GB is too small for the budget offload mode: it needs at least "
            f"{math.ceil(minimum * 10) / 10:.1f} GB (one transformer block resident and {BUDGET_STREAM_BUFFERS} streaming, activations "
            f"for {image_tokens} image tokens and a {BUDGET_SAFETY_MARGIN_GB:g} GB margin; for the caption "
            f"{text.minimum_gb:.1f} GB). Pass --vram-budget {math.ceil(minimum)} or more, run a smaller job "
            f"(640 px, fewer layers), or use --offload sequential (fits ~1 GB, about 12x slower per step).")
    text_encoder_peak = text.peak_gb

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
        text_encoder=text,
        minimum_gb=minimum,
    )


def plan_default_job(vram_gb: float, sizes: dict[str, Any]) -> BudgetPlan:
    """`plan_budget` for the default job (BUDGET_DEFAULT_JOB_IMAGE_TOKENS): what the loader's checks, the RAM plan
    and the refusals' advice plan with before loading."""
    return plan_budget(vram_gb, image_tokens=BUDGET_DEFAULT_JOB_IMAGE_TOKENS, **sizes)


def plan_text_encoder(vram_budget_gb: float, *, text_encoder_gb: float, layer_gb: float, num_layers: int,
                      vision_gb: float, embed_gb: float, vae_gb: float, resident_layers: int | None = None,
                      fp8_layer_gb: float = 0.0) -> TextEncoderPlan:
    """The caption stage within `vram_budget_gb` (GiB): the whole text encoder when it fits, else the split
    (see TextEncoderPlan) with as many language layers resident as fit. Pure; the caller raises on `minimum_gb`.

    A streamed layer costs its bytes once per decoded token (a 512-token caption: 512 copies of it), so the
    resident layers are spread like the transformer's (`streamed_block_indices`) and as many as fit stay.
    `fp8_layer_gb` (fp8_storage, LOSSY): a layer in float8. Where the split would stream, as many bf16 layers as fit
    beside the others in float8 stay, and nothing streams: at 16 GB, 18 bf16 + 10 float8 layers instead of 23 + 5
    streamed, which copied 2.2 GB per caption token (1.1 TB a 512-token caption; 39.5 s against 27.3 s at 24 GB,
    measured). Where even all-float8 does not fit (12 GB cards), the bf16 split streams as before.
    """
    margin = BUDGET_TEXT_ENCODER_MARGIN_GB
    whole = text_encoder_gb + vae_gb + BUDGET_TEXT_ENCODER_ACTIVATION_GB
    everything = tuple(range(num_layers))
    if num_layers == 0:  # sizes without the layer split (older callers): one piece, resident
        return TextEncoderPlan(False, everything, (), whole, whole + margin, 0.0)
    # The split: lm_head and the final norm stay; the vision tower runs before any language layer, so its copy
    # shares room with the two streamed layers' buffers.
    head = text_encoder_gb - num_layers * layer_gb - vision_gb - embed_gb
    base = head + vae_gb + BUDGET_TEXT_ENCODER_ACTIVATION_GB

    def peak(count: int) -> float:
        return base + count * layer_gb + max(vision_gb, BUDGET_STREAM_BUFFERS * layer_gb if count < num_layers else 0.0)

    def peak_fp8(count: int) -> float:  # `count` bf16 layers, the others float8, the vision tower's copy
        return base + count * layer_gb + (num_layers - count) * fp8_layer_gb + vision_gb

    minimum = min(whole, peak(1)) + margin
    if resident_layers is None and whole + margin <= vram_budget_gb:
        return TextEncoderPlan(False, everything, (), whole, minimum, 0.0)
    # Layer 0 stays bf16, as it stays resident in the streaming split. `resident_layers` (tests, tuning) fixes the
    # bf16 count, the others float8.
    fits_fp8 = [c for c in range(1, num_layers) if peak_fp8(c) + margin <= vram_budget_gb] if fp8_layer_gb > 0 else []
    if resident_layers is not None:
        fits_fp8 = [resident_layers] if fp8_layer_gb > 0 and 1 <= resident_layers < num_layers else []
    if fits_fp8:
        count = max(fits_fp8)
        fp8 = streamed_block_indices(num_layers, count)
        return TextEncoderPlan(True, tuple(i for i in everything if i not in fp8), (), peak_fp8(count), minimum, 0.0,
                               fp8_layers=fp8)
    if resident_layers is not None:
        if not 1 <= resident_layers <= num_layers:
            raise ValueError(f"text_resident_layers={resident_layers} is out of range: use 1 to {num_layers}")
        count = resident_layers
    else:
        count = max([c for c in range(1, num_layers + 1) if peak(c) + margin <= vram_budget_gb], default=1)
    streamed = streamed_block_indices(num_layers, count)
    return TextEncoderPlan(True, tuple(i for i in everything if i not in streamed), streamed, peak(count), minimum,
                           len(streamed) * layer_gb)


@dataclasses.dataclass(frozen=True)
class HostRamPlan:
    """Which weights the budget mode page-locks in host RAM; `plan_host_ram` computes it. Sizes in GiB.

    Where RAM holds every weight, all are page-locked (one buffer per model, `_host_copies`). Where it does not
    (32 GB machines), the weights copied most often per image are: the text encoder's streamed language layers (every
    caption token), then the transformer blocks that stream at the default job (every transformer call), then the
    resident blocks and the rest (once per image). The others stay what from_pretrained made them: views of the
    safetensors files (diffusers and transformers map the files and copy nothing while the dtype matches), held by
    the OS page cache while it has room and read from disk again when evicted; copies from them to the GPU go at
    pageable speed. A cgroup's memory.max counts that cache but reclaims it, so it never kills the process.
    Not diffusers' `offload_to_disk_path` (group offloading): it writes a second copy of each group's weights to its
    own folder when applied (~40 GB at every start) and reads it back through safetensors' load_file per onload; the
    files from_pretrained already mapped serve as they are. accelerate's disk offload feeds its per-layer hooks (the
    sequential mode), not the engine's block groups.
    """

    ram_gb: float  # host RAM the plan was made for (available to the app, before the reserve)
    pinned_blocks: tuple[int, ...]  # transformer blocks with a page-locked host copy
    pinned_text_layers: tuple[int, ...]  # text encoder language layers with one (its streamed and float8 ones, at least)
    pin_text_encoder: bool  # the rest of the text encoder page-locked too
    pin_transformer_rest: bool  # the transformer's weights outside its blocks page-locked
    pinned_gb: float
    file_backed_gb: float
    disk_read_gb_per_image: float  # upper bound: each copy of a file-backed weight read from disk again

    @property
    def low_ram(self) -> bool:
        return self.file_backed_gb > 0

    def describe(self) -> str:
        if not self.low_ram:
            return f"{self.pinned_gb:.1f} GB of page-locked host RAM"
        return (f"low RAM ({self.ram_gb:.1f} GB): {self.pinned_gb:.1f} GB page-locked ({len(self.pinned_blocks)} "
                f"transformer blocks, {len(self.pinned_text_layers)} text encoder layers"
                f"{', the rest of the text encoder' if self.pin_text_encoder else ''}), {self.file_backed_gb:.1f} GB "
                f"left in the weight files (read through the page cache): up to {self.disk_read_gb_per_image:.0f} GB "
                f"from disk per image")


def plan_host_ram(plan: BudgetPlan, sizes: dict[str, Any], ram_gb: float,
                  forwards: int = BUDGET_FORWARDS_PER_IMAGE, transformer_in_ram: bool = False) -> HostRamPlan:
    """Which weights get a page-locked host copy within `ram_gb` of host RAM (see HostRamPlan). Pure arithmetic on
    `plan` (the default job's) and `sizes` (`budget_sizes`). Raises ValueError naming the figures when the text
    encoder's streamed layers do not fit, or when the disk would read more than BUDGET_MAX_DISK_READ_GB_PER_IMAGE.
    `transformer_in_ram` (fp8_storage; `sizes` then hold its float8 figures): the whole transformer is page-locked,
    or the machine refused; see `fp8_storage_host_ram`."""
    if not ram_gb > 0:  # NaN too
        raise ValueError(f"--ram-budget {ram_gb} GB: pass a positive number of GB (the host RAM the app may use)")
    blocks = range(sizes["num_blocks"])
    text = plan.text_encoder
    text_streamed = text.streamed_layers if text is not None and text.split else ()
    text_fp8 = text.fp8_layers if text is not None else ()  # float8 copies in RAM (fp8_storage): no file has them
    layer_gb, block_gb = sizes.get("text_layer_gb", 0.0), sizes["block_gb"]
    text_pinned = tuple(sorted(text_streamed + text_fp8))
    text_pinned_gb = len(text_streamed) * layer_gb + len(text_fp8) * sizes.get("text_layer_fp8_gb", 0.0)
    text_rest_gb = sizes["text_encoder_gb"] - len(text_pinned) * layer_gb
    all_gb = weights_gb(sizes) - len(text_pinned) * layer_gb + text_pinned_gb
    if all_gb + BUDGET_HOST_RAM_RESERVE_GB <= ram_gb:  # every weight page-locked: nothing read from the files
        return HostRamPlan(ram_gb, tuple(blocks), text_pinned, True, True, all_gb, 0.0, 0.0)

    # 1. The text encoder's streamed layers are copied every caption token, its float8 ones exist only in RAM:
    #    page-locked, or no plan.
    left = ram_gb - BUDGET_HOST_RAM_RESERVE_GB - BUDGET_PAGE_CACHE_MIN_GB - text_pinned_gb
    if left < 0:
        streamed = (f", and the text encoder's {len(text_streamed)} streamed layers page-locked (copied every caption "
                    f"token): {len(text_streamed) * layer_gb:.1f} GB" if text_streamed else
                    f", and the text encoder's {len(text_fp8)} float8 layers: {text_pinned_gb:.1f} GB" if text_fp8
                    else "")
        raise ValueError(
            f"Not enough host RAM for the budget mode at {plan.vram_budget_gb:g} GB of VRAM: it needs at least "
            f"{ram_gb - left:.1f} GB ({BUDGET_HOST_RAM_RESERVE_GB:g} GB for the system, {BUDGET_PAGE_CACHE_MIN_GB:g} GB "
            f"of page cache{streamed}) and {ram_gb:.1f} GB is available.")
    # 2. Then the blocks streamed at the default job (every call), the resident ones and the rest (once per image).
    pinned_blocks = []
    for index in [] if transformer_in_ram else [*plan.streamed_blocks, *plan.resident_blocks]:
        if block_gb <= left:
            pinned_blocks.append(index)
            left -= block_gb
    if transformer_in_ram:
        pinned_blocks, left = fp8_storage_host_ram(plan, sizes, ram_gb, left, text_pinned_gb)
    pin_rest = transformer_in_ram or sizes["other_transformer_gb"] <= left
    left -= sizes["other_transformer_gb"] if pin_rest else 0.0
    pin_text = text_rest_gb <= left
    # 3. What is read from the files per image: each copy of an unpinned weight, at worst from disk.
    file_streamed = len(set(plan.streamed_blocks) - set(pinned_blocks))
    file_resident = len(set(plan.resident_blocks) - set(pinned_blocks))
    file_gb = ((file_streamed + file_resident) * block_gb + (0.0 if pin_rest else sizes["other_transformer_gb"])
               + (0.0 if pin_text else text_rest_gb))
    disk_gb = (file_streamed * block_gb * forwards + file_resident * block_gb
               + (0.0 if pin_rest else sizes["other_transformer_gb"]) + (0.0 if pin_text else text_rest_gb))
    if disk_gb > BUDGET_MAX_DISK_READ_GB_PER_IMAGE:
        raise ValueError(
            f"Not enough host RAM for the budget mode at {plan.vram_budget_gb:g} GB of VRAM: with {ram_gb:.1f} GB "
            f"available, {file_streamed} of the {len(plan.streamed_blocks)} streamed transformer blocks would be read "
            f"from the weight files at every transformer call, {disk_gb:.0f} GB from disk per image (the limit is "
            f"{BUDGET_MAX_DISK_READ_GB_PER_IMAGE:g} GB).")
    return HostRamPlan(ram_gb, tuple(sorted(pinned_blocks)), text_pinned, pin_text, pin_rest, all_gb - file_gb,
                       file_gb, disk_gb)


def fp8_storage_host_ram(plan: BudgetPlan, sizes: dict[str, Any], ram_gb: float, left: float,
                         text_pinned_gb: float) -> tuple[list[int], float]:
    """`plan_host_ram`'s step for --quantization fp8_storage: every transformer block page-locked; returns (the blocks,
    the RAM left for the text encoder). Raises ValueError naming the figures when the transformer does not fit.

    The float8 copies are made in RAM when the model loads (`apply_fp8_storage`) and no file holds them: unlike bf16
    weights they cannot be left in the files and read back, so the transformer (19.0 GB for the real model, every
    block at 1 byte a weight, its norms and proj_out in bf16) must fit whole; page-locking it costs no more RAM.
    Where the text encoder lives at 32 GB (29.4 GB available, measured, with a desktop's 2 GB): 29.4 - 4 (system)
    - 2 (page cache) - 19.0 leaves 4.4 GB, and its bf16 weights are 15.4 GB, so it stays in the weight files and is
    read through the page cache (at worst 15.4 GB from disk per caption: ~2 s at 7 GB/s, 12 s at this H200 host's
    1.3 GB/s), exact where it fits the card whole (24 GB). All its language layers in float8 (12.2 GB -> 6.1 GB; with
    its bf16 rest 9.4 GB) would not fit RAM either (19.0 + 9.4 > 23.4) and would make every caption lossy. On a
    16 GB card only the layers that would stream per caption token are float8 (`plan_text_encoder`; `text_pinned_gb`
    counts them here, 10 layers 2.2 GB, as much RAM as the 5 bf16 layers it streamed page-locked).
    """
    held = sizes["num_blocks"] * sizes["block_gb"] + sizes["other_transformer_gb"]
    if held > left:
        streamed = f", the text encoder's pinned layers {text_pinned_gb:.1f} GB" if text_pinned_gb else ""
        raise ValueError(
            f"Not enough host RAM for --quantization fp8_storage in the budget mode at {plan.vram_budget_gb:g} GB of "
            f"VRAM: its transformer is held in RAM in float8 ({held:.1f} GB; no file holds those copies), so it needs "
            f"at least {ram_gb - left + held:.1f} GB ({BUDGET_HOST_RAM_RESERVE_GB:g} GB for the system, "
            f"{BUDGET_PAGE_CACHE_MIN_GB:g} GB of page cache{streamed}) and {ram_gb:.1f} GB is available.")
    return list(range(sizes["num_blocks"])), left - held


def budget_minimum_ram_gb(sizes: dict[str, Any], vram_gb: float, fp8_storage: bool = False) -> float | None:
    """The least host RAM (GiB, in steps of 0.5) the budget mode accepts at `vram_gb` (`plan_host_ram`) for the
    default job; None when `vram_gb` is too small for it. `fp8_storage`: `sizes` are its float8 figures."""
    try:
        plan = plan_default_job(vram_gb, sizes)
    except ValueError:
        return None
    ram = BUDGET_HOST_RAM_RESERVE_GB
    while True:
        try:
            plan_host_ram(plan, sizes, ram, transformer_in_ram=fp8_storage)
            return ram
        except ValueError:
            ram += 0.5


def budget_sizes(transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module) -> dict[str, Any]:
    """The sizes `plan_budget` takes (GiB), from loaded models; under fp8_storage, with `text_layer_fp8_gb`. A text
    encoder some of whose layers are float8 already (a re-plan) counts them at their bf16 size: the plan's own."""
    blocks = transformer.transformer_blocks
    layers, vision, embed = _text_encoder_parts(text_encoder)
    layer_gb = max(_module_gb(layer) for layer in layers)
    saved_by_fp8 = sum(layer_gb - _module_gb(layer) for layer in layers)
    sizes = dict(block_gb=max(_module_gb(block) for block in blocks), num_blocks=len(blocks),
                 other_transformer_gb=_module_gb(transformer) - _module_gb(*blocks),
                 text_encoder_gb=_module_gb(text_encoder) + saved_by_fp8, vae_gb=_module_gb(vae),
                 text_layer_gb=layer_gb, text_num_layers=len(layers),
                 text_vision_gb=_module_gb(vision), text_embed_gb=_module_gb(embed))
    return dict(sizes, text_layer_fp8_gb=fp8_text_layer_gb(layers[0])) if fp8_stored(transformer) else sizes


def budget_sizes_from_files(model_path: Path | str, element_size: int,
                            stored: dict[str, int] | None = None) -> dict[str, Any] | None:
    """The same sizes read from the safetensors headers of a diffusers folder (no weights loaded), for weights held
    in a dtype of `element_size` bytes; `stored`: the transformer weights held in another, {name: bytes per element}
    (fp8_storage: `fp8_storage_element_sizes`). None when a model's files are missing (the loader will say so)."""
    from safetensors import safe_open

    numels: dict[str, dict] = {"transformer": collections.Counter(), "text_encoder": collections.Counter(),
                               "vae": collections.Counter()}
    for model, counter in numels.items():
        files = sorted((Path(model_path) / model).glob("*.safetensors"))
        if not files:
            return None
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    numel = math.prod(f.get_slice(name).get_shape()) * (
                        (stored or {}).get(name, element_size) if model == "transformer" else element_size)  # bytes
                    if model == "transformer":
                        block = re.match(r"transformer_blocks\.(\d+)\.", name)
                        counter[f"block{block[1]}" if block else "other"] += numel
                    elif model == "text_encoder":  # transformers 4 and 5 key names ("model.layers." / "model.language_model.layers.")
                        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
                        part = ("vision" if "visual." in name else "embed" if "embed_tokens" in name
                                else f"layer{layer[1]}" if layer else "head")
                        counter[part] += numel
                    else:
                        counter["vae"] += numel
    gb = 1 / GIB
    blocks = [v for k, v in numels["transformer"].items() if k.startswith("block")]
    layers = [v for k, v in numels["text_encoder"].items() if k.startswith("layer")]
    if not blocks or not layers:  # not the Qwen-Image layout: nothing to plan from (the loader says what is wrong)
        return None
    return dict(block_gb=max(blocks) * gb, num_blocks=len(blocks), other_transformer_gb=numels["transformer"]["other"] * gb,
                text_encoder_gb=sum(numels["text_encoder"].values()) * gb, vae_gb=numels["vae"]["vae"] * gb,
                text_layer_gb=max(layers) * gb, text_num_layers=len(layers),
                text_vision_gb=numels["text_encoder"]["vision"] * gb, text_embed_gb=numels["text_encoder"]["embed"] * gb)


def weights_gb(sizes: dict[str, Any]) -> float:
    """The transformer's and the text encoder's weights together (GiB), from `budget_sizes`."""
    return sizes["text_encoder_gb"] + sizes["other_transformer_gb"] + sizes["num_blocks"] * sizes["block_gb"]


def budget_minimum_gb(sizes: dict[str, Any], image_tokens: int = BUDGET_DEFAULT_JOB_IMAGE_TOKENS) -> float:
    """The smallest VRAM budget (GiB) in which the budget mode runs a job of `image_tokens` (default: the default job)."""
    return plan_budget(float("inf"), image_tokens=image_tokens, **sizes).minimum_gb


def _text_encoder_parts(text_encoder: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module, torch.nn.Module]:
    """Qwen2.5-VL's language layers, vision tower and token-embedding table."""
    model = text_encoder.model
    language = getattr(model, "language_model", model)
    return language.layers, model.visual, text_encoder.get_input_embeddings()


def available_ram_gb() -> float:
    """Host RAM this process may still use (GiB): the system's available memory (psutil), or less where the process's
    cgroup v2 memory.max leaves less (a container's limit; the benchmark's emulated machines)."""
    import psutil

    return min(psutil.virtual_memory().available, _cgroup_available_bytes()) / GIB


def _cgroup_available_bytes() -> float:
    """memory.max of this process's cgroup v2 minus what it holds that cannot be reclaimed (all but its file pages,
    i.e. the page cache); inf where there is no such limit (no cgroup v2, "max", Windows, macOS)."""
    if sys.platform.startswith("linux"):
        try:
            group = Path("/proc/self/cgroup").read_text().split("0::", 1)[1].splitlines()[0].strip("/")
            folder = Path("/sys/fs/cgroup") / group
            limit = (folder / "memory.max").read_text().strip()
            if limit != "max":
                stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
                return int(limit) - (int((folder / "memory.current").read_text()) - int(stat.get("file", 0)))
        except (OSError, IndexError, ValueError):
            pass
    return float("inf")


def check_host_ram(needed_gb: float, available_gb: float | None = None) -> None:
    """Raise before loading when host RAM cannot hold the weights (the offload modes other than budget keep them all
    in RAM; the budget mode below this reads part of them from the files: `plan_host_ram`)."""
    if available_gb is None:
        available_gb = available_ram_gb()
    if needed_gb + BUDGET_HOST_RAM_RESERVE_GB > available_gb:
        raise ValueError(
            f"Not enough host RAM: this offload mode keeps the transformer and text encoder weights in RAM: it needs "
            f"{needed_gb:.1f} GB plus {BUDGET_HOST_RAM_RESERVE_GB:g} GB for the system, and {available_gb:.1f} GB is "
            f"available. Close other programs or add RAM, or use --offload budget (or auto), which reads what does "
            f"not fit from the weight files.")


def low_ram_advice(sizes: dict[str, Any], vram_gb: float, fp8_storage: bool = False) -> str:
    """What each mode needs in host RAM, for a machine the budget mode refuses (`check_machine_fits`).
    `fp8_storage`: `sizes` are its float8 figures (the transformer held in RAM)."""
    all_gb = weights_gb(sizes)
    here, at_24 = budget_minimum_ram_gb(sizes, vram_gb, fp8_storage), budget_minimum_ram_gb(sizes, 23.0, fp8_storage)
    needs = f"at {vram_gb:.1f} GB of VRAM it needs {here:.1f} GB of RAM available" if here is not None else ""
    lossy = " with --quantization fp8_storage (LOSSY: the transformer in float8, held in RAM)" if fp8_storage else ""
    return (f"The budget mode{lossy} reads what does not fit in RAM from the weight files: {needs}"
            f"{'; ' if needs else ''}with a 24 GB card {at_24:.1f} GB; every other mode keeps all the weights in RAM "
            f"({all_gb + BUDGET_HOST_RAM_RESERVE_GB:.1f} GB).")


def check_machine_fits(offload_mode: str, sizes: dict[str, Any], vram_gb: float, ram_gb: float | None,
                       fp8_storage: bool = False, lossy_sizes: dict[str, Any] | None = None,
                       exact_sizes: dict[str, Any] | None = None) -> None:
    """Before loading: raise ValueError when `offload_mode` cannot run with `vram_gb` of VRAM and `ram_gb` of
    available host RAM (None: not checked, no GPU), naming the machine's figures and the mode that would fit.
    Pure arithmetic on `sizes` (`budget_sizes_from_files`; `fp8_storage`: its float8 figures). `lossy_sizes`: the
    float8 figures of a bf16 run, for the refusal to say what the lossy option needs (`fp8_storage_advice`);
    `exact_sizes`: the bf16 figures of an fp8_storage run, for it to say what bf16 needs in the budget mode."""
    all_gb = weights_gb(sizes)
    minimum = budget_minimum_gb(sizes)
    machine = f"This machine: {vram_gb:.1f} GB of VRAM, {ram_gb or 0:.1f} GB of RAM available."
    if ram_gb is not None and offload_mode == "budget" and vram_gb >= minimum:
        try:  # with less RAM than the weights, it keeps what moves most in RAM and reads the rest from the files
            plan_host_ram(plan_default_job(vram_gb, sizes), sizes, ram_gb,
                          transformer_in_ram=fp8_storage)
        except ValueError as err:
            exact = budget_minimum_ram_gb(exact_sizes, vram_gb) if exact_sizes else None
            raise ValueError(f"{machine} {err} {low_ram_advice(sizes, vram_gb, fp8_storage)}"
                             f"{fp8_storage_advice(lossy_sizes, vram_gb, ram_gb)}"
                             + (f" Without --quantization (bf16, exact) the budget mode leaves the transformer in its "
                                f"files and needs {exact:.1f} GB of RAM here." if exact is not None else "")) from None
    elif ram_gb is not None and offload_mode != "budget":
        try:
            check_host_ram(all_gb, ram_gb)
        except ValueError as err:
            low_ram = budget_minimum_ram_gb(sizes, vram_gb)
            budget = (f"here it needs {low_ram:.1f} GB of RAM" if low_ram is not None
                      else f"it needs {minimum:.1f} GB of VRAM")
            raise ValueError(f"{machine} {err} (The budget mode: {budget}; the sequential mode ~1 GB of VRAM and "
                             f"all the weights in RAM.){fp8_storage_advice(lossy_sizes, vram_gb, ram_gb)}") from None
    largest = activation_gb(BUDGET_PLAN_IMAGE_TOKENS + BUDGET_PLAN_TEXT_TOKENS) + BUDGET_SAFETY_MARGIN_GB
    needs = {"off": all_gb + sizes["vae_gb"] + largest,
             "model": sizes["other_transformer_gb"] + sizes["num_blocks"] * sizes["block_gb"] + sizes["vae_gb"] + largest}
    if offload_mode in needs and vram_gb < needs[offload_mode]:
        fits = "budget" if vram_gb >= minimum else "sequential"
        raise ValueError(f"--offload {offload_mode} needs ~{needs[offload_mode]:.0f} GB of VRAM and this GPU has "
                         f"{vram_gb:.1f} GB: use --offload auto (here: {fits}).")
    if offload_mode == "budget":
        try:
            plan_default_job(vram_gb, sizes)  # raises naming the minimum and the fix
        except ValueError as err:
            raise ValueError(f"{err}{fp8_storage_advice(lossy_sizes, vram_gb, ram_gb)}") from None


def fp8_storage_hint(sizes: dict[str, Any], lossy_sizes: dict[str, Any] | None, vram_gb: float,
                     ram_gb: float) -> str | None:
    """For a bf16 budget run that fits only by reading transformer blocks from disk at every call (16 GB of VRAM with
    32 GB of RAM: 845 GB per image planned, 950 s measured): the lossy option's figures where it fits and reads
    less (a log line at load; `auto` stays bf16). None where bf16 reads less than the weights' size per image."""
    if lossy_sizes is None:
        return None
    try:
        exact = plan_host_ram(plan_default_job(vram_gb, sizes), sizes, ram_gb)
        lossy = plan_host_ram(plan_default_job(vram_gb, lossy_sizes),
                              lossy_sizes, ram_gb, transformer_in_ram=True)
    except ValueError:
        return None
    if exact.disk_read_gb_per_image <= weights_gb(sizes):
        return None
    return (f"Low RAM: bf16 reads up to {exact.disk_read_gb_per_image:.0f} GB from disk per image here (transformer "
            f"blocks at every call). The opt-in lossy option --quantization fp8_storage (LOSSY: the transformer in "
            f"float8{fp8_text_layers_note(lossy_sizes, vram_gb)}, {lossy.pinned_gb:.1f} GB page-locked) fits this "
            f"machine and reads up to {lossy.disk_read_gb_per_image:.0f} GB per image.")


def fp8_text_layers_note(lossy_sizes: dict[str, Any], vram_gb: float) -> str:
    """", N of the text encoder's M layers in float8 too" where fp8_storage stores some at `vram_gb` (else "")."""
    try:
        text = plan_default_job(vram_gb, lossy_sizes).text_encoder
    except ValueError:
        return ""
    return f", {len(text.fp8_layers)} of the text encoder's {text.num_layers} layers in float8 too" if text.fp8_layers else ""


def fp8_storage_advice(lossy_sizes: dict[str, Any] | None, vram_gb: float, ram_gb: float | None) -> str:
    """For a bf16 refusal (`check_machine_fits`): what the opt-in lossy format, --quantization fp8_storage, needs on
    this machine (VRAM and RAM, the budget mode's figures with `lossy_sizes`, its float8 sizes) and whether it fits.
    "" without `lossy_sizes`. `auto` never picks it: bf16 stays the default, exact."""
    if lossy_sizes is None:
        return ""
    held = lossy_sizes["num_blocks"] * lossy_sizes["block_gb"] + lossy_sizes["other_transformer_gb"]
    vram_needed = budget_minimum_gb(lossy_sizes)
    ram_needed = budget_minimum_ram_gb(lossy_sizes, max(vram_gb, vram_needed), fp8_storage=True)
    fits = vram_gb >= vram_needed and (ram_gb is None or ram_needed <= ram_gb)
    at = f"at {vram_gb:.1f} GB of VRAM" if vram_gb >= vram_needed else f"at {vram_needed:.1f} GB of VRAM"
    text = fp8_text_layers_note(lossy_sizes, max(vram_gb, vram_needed)) or "; the text encoder stays bf16"
    return (f" The lossy option, --quantization fp8_storage (LOSSY: the transformer stored in float8, {held:.1f} GB "
            f"held in RAM{text}), needs at least {vram_needed:.1f} GB of VRAM and, {at}, "
            f"{ram_needed:.1f} GB of RAM available: "
            + ("it fits this machine (pass --quantization fp8_storage)." if fits else "it does not fit this machine either."))


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


def _host_copies(module: torch.nn.Module, on_cuda: bool, pin: set[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move every parameter and buffer of `module` (those whose id is in `pin`, when given; the others in host RAM
    stay where they are, views of the weight files: `HostRamPlan`) into one page-locked host buffer; return (tensor,
    host) pairs.

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
    unpinned = [(t, t.data) for t in tensors if pin is not None and id(t) not in pin and not t.is_cuda]
    tensors = [t for t in tensors if pin is None or id(t) in pin or t.is_cuda]
    existing = getattr(module, "_budget_host_copies", None)
    if existing is not None and len(existing["pairs"]) == len(tensors) + len(unpinned) and all(
            t is old and t.data_ptr() == host.data_ptr() for (old, host), t in zip(existing["pairs"], tensors)):
        return existing["pairs"]
    if not tensors:  # nothing to page-lock
        module._budget_host_copies = dict(pairs=unpinned, flat=None, locked=True)
        return unpinned

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
    pairs, freed = [], 0
    for tensor, offset in zip(tensors, offsets):
        host = flat[offset : offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor.data)
        tensor.data = host
        pairs.append((tensor, host))
        freed += host.numel() * host.element_size()
        if freed >= GIB and not from_gpu:  # fp8_storage's float8 copies go back to the system as they are copied
            freed = release_freed_heap()
    if not from_gpu:
        release_freed_heap()
        locked = _page_lock(flat)
    if locked:  # unlock before the memory goes back to the system
        weakref.finalize(flat, torch.cuda.cudart().cudaHostUnregister, flat.data_ptr())
    pairs += unpinned
    module._budget_host_copies = dict(pairs=pairs, flat=flat, locked=locked)
    return pairs


def release_freed_heap() -> int:
    """Give the C heap's freed pages back to the system (glibc's malloc_trim); returns 0 for `_host_copies`' count.

    Why: fp8_storage's float8 copies (`apply_fp8_storage`) are made by malloc; those under glibc's mmap threshold (the
    9 MB attention weights once the threshold has grown) live in the heap, and freeing them does not lower the
    process's memory until the heap is trimmed. Measured on the CPU (bench/probe_fp8_load_ram.py, 8 blocks of the real
    width): copying 2.6 GB of float8 weights into the page-locked buffer held 0.6 GB more anonymous RAM at the end
    without a trim, none with one; for the real 19 GB transformer on a 32 GB machine that is ~4.4 GB that is not there.
    A no-op off glibc (Windows, macOS, musl)."""
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return 0


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
        chain_streamed(streamed, self.start_hook)

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
    """On a module that runs before the first streamed one (transformer block 1, which runs only on steps
    FirstBlockCache computes; the text encoder's language layer 0): start copying the first streamed block."""

    group = None

    def pre_forward(self, module, *args, **kwargs):
        if self.group is not None:
            self.group.onload_()
        return args, kwargs


def chain_streamed(streamed: list[BudgetBlockHook], start_hook: StartStreamingHook) -> None:
    """Each streamed block's start copies the next one in on the side stream; the start hook copies the first."""
    for hook, next_hook in zip(streamed, streamed[1:]):
        hook.next_group = next_hook.group
    start_hook.group = streamed[0].group if streamed else None


def group_offloading_config(device: torch.device, stream: "torch.cuda.Stream | None",
                            exclude_kwargs: tuple[str, ...] = ()) -> GroupOffloadingConfig:
    """The config of our hooks: one module group per block, host copies in CPU RAM, copies on `stream`."""
    return GroupOffloadingConfig(onload_device=device, offload_device=torch.device("cpu"),
                                 offload_type=GroupOffloadingType.BLOCK_LEVEL, non_blocking=device.type == "cuda",
                                 record_stream=False, low_cpu_mem_usage=False, num_blocks_per_group=1, stream=stream,
                                 exclude_kwargs=list(exclude_kwargs) or None)


def install_group_hook(leader: torch.nn.Module, modules: list[torch.nn.Module], config: GroupOffloadingConfig,
                       group_id: str) -> BudgetBlockHook:
    """One page-locked ModuleGroup of `modules`, copied in when `leader` is called (after the previous streamed
    group started it, else on first use) and dropped after it has run."""
    group = PageLockedModuleGroup(modules=modules, offload_device=config.offload_device, onload_device=config.onload_device,
                                  offload_leader=leader, onload_leader=leader, non_blocking=config.non_blocking,
                                  stream=config.stream, record_stream=False, onload_self=False, group_id=group_id)
    hook = BudgetBlockHook(group, config=config)
    HookRegistry.check_if_exists_or_initialize(leader).register_hook(hook, _GROUP_OFFLOADING)
    return hook


def install_block_hooks(blocks, device: torch.device, stream: "torch.cuda.Stream | None", indices=None, start_at: int = 1,
                        group_id: str = "transformer_blocks", exclude_kwargs: tuple[str, ...] = ()
                        ) -> tuple[dict, StartStreamingHook]:
    """Blocks `indices` (default 1..: block 0 always stays resident, FirstBlockCache decides from its output) get
    one diffusers ModuleGroup + BudgetBlockHook each, block `start_at` the StartStreamingHook. Returns ({block
    index: hook}, start hook); which transformer blocks stream is set per job by `_BudgetStages._split`, the text
    encoder's streamed language layers are chained once (`install_text_encoder_hooks`). `exclude_kwargs`: keyword
    arguments the hook leaves where they are (the text encoder's KV cache is updated in place).

    apply_group_offloading would stream every block or none, hence the groups by hand. record_stream=False: a
    streamed block's GPU copy is freed as soon as it has run (the host waits for it there; it waits for the next
    copy anyway), so at most two are on the GPU.
    """
    config = group_offloading_config(device, stream, exclude_kwargs)
    hooks = {}
    for index in range(1, len(blocks)) if indices is None else indices:
        hooks[index] = install_group_hook(blocks[index], [blocks[index]], config, f"{group_id}.{index}")
    start_hook = StartStreamingHook()
    if len(blocks) > start_at:
        HookRegistry.check_if_exists_or_initialize(blocks[start_at]).register_hook(start_hook, _START_STREAMING_HOOK)
    return hooks, start_hook


def install_text_encoder_hooks(text_encoder, plan: TextEncoderPlan, device: torch.device,
                               stream: "torch.cuda.Stream | None") -> tuple[list[torch.nn.Module], set[int], list]:
    """The text encoder where it does not fit whole (16 and 12 GB cards; `TextEncoderPlan`): its streamed language
    layers get the same groups and hooks as the streamed transformer blocks (`install_block_hooks`), chained once
    (the split does not depend on the job), layer 0 (always resident) starting the copies; the vision tower's
    blocks and merger are one group copied in for its call (patch_embed, 3 MB, stays: transformers' generate()
    takes the model's device from its first parameter); the token-embedding table is looked up in host RAM, one
    row per token. Returns (the modules that got hooks, ids of the weights that do not enter with the text
    encoder's stage, removers of the embedding's hooks)."""
    host = torch.device("cpu")
    layers, vision, embed = _text_encoder_parts(text_encoder)
    exclude = ("past_key_values", "past_key_value")  # the KV cache is updated in place
    hooks, start_hook = install_block_hooks(layers, device, stream, indices=plan.streamed_layers, start_at=0,
                                            group_id="text_encoder.layers", exclude_kwargs=exclude)
    chain_streamed(list(hooks.values()), start_hook)
    vision_modules = [*vision.blocks, vision.merger]
    install_group_hook(vision, vision_modules, group_offloading_config(device, stream, exclude),
                       "text_encoder.visual")  # copies on first use
    removers = [embed.register_forward_pre_hook(lambda module, args: tuple(a.to(host) if torch.is_tensor(a) else a
                                                                           for a in args)).remove,
                embed.register_forward_hook(lambda module, args, output: output.to(device)).remove]
    off_stage = {id(t) for m in [embed, *vision_modules, *(layers[i] for i in plan.streamed_layers)]
                 for t in itertools.chain(m.parameters(), m.buffers())}
    return [*layers, vision], off_stage, removers


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


def enable_budget_offload(pipe, vram_budget_gb: float, resident_blocks: int | None = None,
                          text_resident_layers: int | None = None, host_ram_gb: float | None = None) -> list[str]:
    """Offload mode "budget" (see the comment above): plan, then apply. Returns what was applied, by name.

    Without CUDA the same hooks run with every weight on the CPU: nothing moves and the outputs equal "off"
    (tests/test_budget_offload.py checks this on the demo pipeline). Weight storage (fp8) goes first, and
    FirstBlockCache, if enabled before, is put back outside our hooks. `resident_blocks` fixes the number of
    resident transformer blocks for every job (tests, tuning); by default each job gets as many as fit.
    `text_resident_layers` splits the text encoder (`TextEncoderPlan`) with that many language layers resident;
    by default it is split only when it does not fit whole. `host_ram_gb`: the host RAM the weights may take
    (`HostRamPlan`; None: every weight page-locked).
    """
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae
    blocks = transformer.transformer_blocks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"

    # 1. Plan from the loaded weights (fp8 storage, applied before, halves the blocks). The default job must fit:
    #    that raises here, before anything moves, when the budget is too small; a larger job that does not fit is
    #    refused when it starts.
    sizes = budget_sizes(transformer, text_encoder, vae)

    def plan_for(tokens: int) -> BudgetPlan:
        return plan_budget(vram_budget_gb, image_tokens=tokens, resident_blocks=resident_blocks,
                           text_resident_layers=text_resident_layers, **sizes)

    default = plan_for(BUDGET_DEFAULT_JOB_IMAGE_TOKENS)
    try:
        largest = plan_for(BUDGET_PLAN_IMAGE_TOKENS)
    except ValueError as err:  # small cards: the default job fits, the largest is refused when it starts
        logger.warning("Low-VRAM engine: the largest job (%d px, %d layers) will not fit: %s", RESOLUTIONS[-1],
                       LAYERS_RANGE[1], err)
        largest = default
    logger.info("Low-VRAM engine: %s; at the default job (%d px, %d layers): %d blocks resident", largest.describe(),
                DEFAULTS["resolution"], DEFAULTS["layers"], len(default.resident_blocks))

    # 2. FirstBlockCache must wrap our hooks, so that a skipped step never reaches a streamed block: take it off
    #    now, put it back last.
    cache_config = transformer._cache_config
    if cache_config is not None:
        transformer.disable_cache()

    # 3. Each model's weights move into its host buffer (where host RAM is short, only those `plan_host_ram` picks:
    #    the others stay views of the weight files); the VAE stays on the GPU. Under fp8_storage on a card the text
    #    encoder does not fit whole, the layers that would stream are cast to float8 first (`plan_text_encoder`).
    text_plan = largest.text_encoder
    apply_fp8_text_layers(text_encoder, text_plan.fp8_layers)
    ram = plan_host_ram(default, sizes, float("inf") if host_ram_gb is None else host_ram_gb,
                        transformer_in_ram=fp8_stored(transformer))
    transformer_pin = text_encoder_pin = None
    if ram.low_ram:
        layers = _text_encoder_parts(text_encoder)[0]
        transformer_pin = {id(t) for i in ram.pinned_blocks for t in itertools.chain(blocks[i].parameters(), blocks[i].buffers())}
        if ram.pin_transformer_rest:
            in_blocks = {id(t) for b in blocks for t in itertools.chain(b.parameters(), b.buffers())}
            transformer_pin |= {id(t) for t in itertools.chain(transformer.parameters(), transformer.buffers())
                                if id(t) not in in_blocks}
        text_encoder_pin = ({id(t) for t in itertools.chain(text_encoder.parameters(), text_encoder.buffers())}
                            if ram.pin_text_encoder else
                            {id(t) for i in ram.pinned_text_layers for t in itertools.chain(layers[i].parameters(),
                                                                                             layers[i].buffers())})
        logger.info("Low-VRAM engine, host RAM: %s", ram.describe())
    transformer_weights = _host_copies(transformer, on_cuda, transformer_pin)
    text_encoder_weights = _host_copies(text_encoder, on_cuda, text_encoder_pin)
    vae.to(device)

    # 4. Block hooks: blocks 1.. get one diffusers ModuleGroup each; per job, the streamed ones are chained in block
    #    order, so each streamed block's start copies the next one in on the side stream, and the resident ones
    #    skip their hook.
    stream = torch.cuda.Stream() if on_cuda else None
    hooks, start_hook = install_block_hooks(blocks, device, stream)
    hooked = list(blocks)

    # 4b. The text encoder where it does not fit whole (16 and 12 GB cards): the same hooks on its streamed language
    #     layers and vision tower, its embeddings in host RAM. The split does not depend on the job.
    off_stage: set[int] = set()  # ids of text encoder weights that do not enter with its stage
    removers: list[Callable[[], None]] = []
    if text_plan.split:
        text_modules, off_stage, removers = install_text_encoder_hooks(text_encoder, text_plan, device, stream)
        hooked += text_modules

    # 5. Stages: each model, when called, first brings its stage's weights to the GPU and sends the others back.
    block_ids = [{id(t) for t in itertools.chain(b.parameters(), b.buffers())} for b in blocks]
    in_blocks = set().union(*block_ids)
    stages = _BudgetStages(
        device, plan_for,
        {"transformer": [pair for pair in transformer_weights if id(pair[0]) not in in_blocks],
         "text_encoder": [pair for pair in text_encoder_weights if id(pair[0]) not in off_stage],
         "text_encoder_streamed": [pair for pair in text_encoder_weights if id(pair[0]) in off_stage]},  # never a stage
        [[pair for pair in transformer_weights if id(pair[0]) in ids] for ids in block_ids],
        hooks, start_hook, stream)
    install_stage_hooks(pipe, stages)
    stages.undo += removers
    for module in hooked:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        stages.undo.append(functools.partial(registry.remove_hook, _GROUP_OFFLOADING, recurse=False))
        stages.undo.append(functools.partial(registry.remove_hook, _START_STREAMING_HOOK, recurse=False))
    pipe._budget_stages = stages

    # 6. FirstBlockCache back on, outside.
    if cache_config is not None:
        transformer.enable_cache(cache_config)
    applied = [f"budget_offload({largest.describe()}; {len(default.resident_blocks)} blocks resident at the default job)"]
    if text_plan.split:
        applied.append(f"budget_text_encoder_split({text_plan.describe()})")
    if ram.low_ram:
        applied.append(f"budget_low_ram({ram.describe()})")
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
# 4c. Several GPUs, one image: `--gpus N` or `torchrun --nproc-per-node N src/app.py ...`
# ----------------------------------------------------------------------------------------------------
# Every rank loads the whole pipeline on its own GPU with the offload mode it would use alone (two 24 GB cards:
# the budget engine on each) and runs the same `infer` on the same job. Rank 0 alone serves the UI or the CLI:
# `infer` hands it each job (`share_job`); the other ranks wait in `serve_rank` and never open a port.
# The transformer calls are split between the ranks:
#   CFG-parallel      true CFG makes two transformer calls a step (cond, then uncond). The ranks form two
#                     halves: the first computes cond, the second uncond, and each rank pair swaps its result
#                     (`CfgParallelHook`, installed by `enable_multi_gpu`). diffusers 0.42.1 has no CFG-parallel (its
#                     `enable_parallelism` splits one call: context or tensor parallel), hence a hook of a few lines.
#   context parallel  with 4+ ranks (or an odd count) the ranks of each half split every call's sequence with
#                     diffusers' own Ulysses attention (`ContextParallelConfig`, QwenImageTransformer2DModel's
#                     `_cp_plan`). Measured only on 2 GPUs, where it is not used.
# The layers equal one process's: the same CPU-generator noise and the same two predictions every step.
# The caption is written by rank 0 alone and sent to the others (`caption_from_rank0`): decoding is one token after
# another, so other GPUs could only repeat it; it costs what it costs on one GPU.
# The ranks stay in step, or a rank would wait in a collective for one that left: a Stop is rank 0's answer sent to
# every rank at each step end (`rank0_says`), a caption rank 0 did not finish stops them all, and an out-of-memory
# error in one rank's CFG half is agreed on before the swap (`CfgParallelHook`), so every rank raises it.
MULTI_GPU_JOB_TIMEOUT = datetime.timedelta(days=365)  # how long ranks 1.. wait for rank 0's next job (UI idle time)


@dataclasses.dataclass
class ParallelState:
    """This process's place among the ranks (`init_distributed`)."""

    rank: int
    world_size: int
    job_group: Any  # a gloo group: jobs are Python objects (the image, the parameters) sent from rank 0
    mesh: Any  # DeviceMesh ("cfg", "ring", "ulysses") for 3+ ranks; None for 2 (the default group is the pair)
    cfg_size: int  # 2: CFG-parallel halves; 1: none (an odd number of ranks)
    cp_size: int  # ranks per half that split each transformer call (context parallel); 1: none


def ranks_on_this_machine() -> int:
    """How many ranks of `--gpus N` / torchrun run on this machine (LOCAL_WORLD_SIZE); 1 alone."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_gpus(gpus: int, available: int) -> None:
    """`--gpus N` needs N GPUs on this machine."""
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: use 1 or more")
    if gpus > available:
        raise ValueError(f"--gpus {gpus} needs {gpus} CUDA GPUs, this machine has {available}: use --gpus {max(available, 1)}"
                         + (", or run without --gpus" if available <= 1 else ""))


def launch_ranks(gpus: int, argv: list[str]) -> int:
    """`--gpus N`: start N ranks of this same command on this machine (what torchrun would do); rank 0's exit code."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(_rank_main, args=(gpus, port, argv), nprocs=gpus, join=True)
    except mp.ProcessExitedException as err:  # a rank exited non-zero (rank 0: some images failed)
        return err.exit_code if err.exit_code > 0 else 1
    return 0


def _rank_main(local_rank: int, gpus: int, port: int, argv: list[str]) -> None:
    """One rank started by `launch_ranks`: torchrun's environment variables, then `main` as usual."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(gpus), LOCAL_WORLD_SIZE=str(gpus),
                      RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    code = main(argv)
    if code:
        sys.exit(code)


def init_distributed() -> ParallelState | None:
    """Join the ranks started by `launch_ranks` or torchrun (env WORLD_SIZE > 1); None when running alone.

    NCCL on CUDA (one GPU per rank: LOCAL_RANK), gloo on the CPU (the tests' two-process run).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        check_gpus(ranks_on_this_machine(), torch.cuda.device_count())
        torch.cuda.set_device(local_rank)  # "cuda" means this rank's GPU from here on
        # No `device_id=` (eager NCCL init): with it, torch 2.11 creates sub-groups by ncclCommSplit at their first
        # collective, which hung the first CFG swap on 2 H200s (NCCL 2.28.9; the same hang: NVIDIA-NeMo/RL#3189).
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    job_group = dist.new_group(backend="gloo", timeout=MULTI_GPU_JOB_TIMEOUT)
    cfg_size = 2 if world_size % 2 == 0 else 1
    cp_size = world_size // cfg_size
    # Two ranks swap over the default group; more need the mesh's sub-groups (cfg pairs, context-parallel halves).
    mesh = None if cp_size == 1 else init_device_mesh("cuda" if torch.cuda.is_available() else "cpu",
                                                      (cfg_size, 1, cp_size), mesh_dim_names=("cfg", "ring", "ulysses"))
    logger.info("Rank %d of %d: %s", rank, world_size,
                f"CFG-parallel halves of {cp_size} rank(s)" if cfg_size == 2 else f"context parallel over {cp_size} ranks")
    return ParallelState(rank, world_size, job_group, mesh, cfg_size, cp_size)


class _NoState(BaseState):
    """CfgParallelHook's StateManager needs a state class; the hook keeps none of its own there."""

    def reset(self, *args, **kwargs):
        pass


class CfgParallelHook(ModelHook):
    """Cond on the first half, uncond on the second; the prediction a rank skips comes from its pair.

    Stateful only to receive the pipeline's `cache_context` name ("cond" / "uncond") through its StateManager.
    A skipped call returns an empty tensor that is filled in place by the swap after the uncond call: the
    pipeline only slices the cond prediction before the uncond call, and a slice is a view of it.
    """

    _is_stateful = True

    def __init__(self, group, half: int, flag_group):
        super().__init__()
        self.group, self.half, self.flag_group = group, half, flag_group
        self.state_manager = StateManager(_NoState)
        self.enabled = False  # per job (`share_job`): only true CFG makes the uncond call
        self.predictions: list = [None, None]
        self.out_of_memory = False  # this rank's half ran out of GPU memory this step

    @staticmethod
    def empty_prediction(module, args, kwargs) -> torch.Tensor:
        """The uninitialized prediction of the shape and dtype the transformer's forward returns."""
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        channels = module.config.out_channels * module.config.patch_size**2
        # The dtype the pair's forward returns: autocast's (bf16 on CUDA) where it is on, else the weights'.
        device_type = hidden_states.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else module.dtype
        return hidden_states.new_empty((*hidden_states.shape[:2], channels), dtype=dtype)

    def new_forward(self, module, *args, **kwargs):
        if not self.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch = 0 if self.state_manager.context.name == "cond" else 1
        prediction = None
        if branch == self.half:
            try:
                output = self.fn_ref.original_forward(*args, **kwargs)
                prediction = output[0] if isinstance(output, tuple) else output.sample
            except torch.OutOfMemoryError:  # raised below on every rank, once they agree (else the pair would wait)
                self.out_of_memory = True
        if prediction is None:
            prediction = self.empty_prediction(module, args, kwargs)
        self.predictions[branch] = prediction
        if branch == 1:
            # 1. Every rank says whether its half ran out of memory: all raise it, or none.
            failed = torch.tensor([int(self.out_of_memory)])
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=self.flag_group)
            if failed.item():
                self.reset_state(module)
                raise torch.OutOfMemoryError("CFG-parallel: a rank ran out of GPU memory")
            # 2. The swap.
            mine, other = self.predictions[self.half], self.predictions[1 - self.half]
            if (mine.shape, mine.dtype) != (other.shape, other.dtype):  # a swap of unequal sizes would hang NCCL
                raise RuntimeError(f"CFG-parallel: the prediction is {tuple(mine.shape)} {mine.dtype}, the empty one "
                                   f"made for the pair's {tuple(other.shape)} {other.dtype}; run with one GPU")
            for src, tensor in enumerate(self.predictions):
                torch.distributed.broadcast(tensor, group_src=src, group=self.group)
            self.predictions = [None, None]
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=prediction)
        return (prediction,)

    def reset_state(self, module):
        self.predictions, self.out_of_memory = [None, None], False
        return module


def enable_multi_gpu(pipe, state: ParallelState) -> list[str]:
    """Split the transformer's calls between the ranks (see the comment above); returns what was applied."""
    applied = []
    transformer = pipe.transformer
    # 1. Context parallel inside each half: diffusers' Ulysses attention over the half's ranks.
    if state.cp_size > 1:
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=state.cp_size, ulysses_anything=True,
                                                                    mesh=state.mesh))
        applied.append(f"context_parallel(ulysses={state.cp_size})")

    # 2. CFG-parallel across the halves.
    if state.cfg_size == 2:
        group, half = (None, state.rank) if state.mesh is None else (state.mesh.get_group("cfg"), state.mesh.get_local_rank("cfg"))
        hook = CfgParallelHook(group, half, flag_group=state.job_group)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, "cfg_parallel")
        pipe._cfg_parallel_hook = hook
        # NCCL builds a communicator at a group's first collective (seconds): here, not in the first image's steps.
        warm = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(warm, group=group)
        applied.append("cfg_parallel(2 halves)")
    pipe._parallel = state
    return applied


def share_job(pipe, job: dict[str, Any]) -> None:
    """Called by `infer` with its checked job: rank 0 sends it to the other ranks; every rank arms CFG-parallel.

    Alone (no `--gpus`), it does nothing.
    """
    state = getattr(pipe, "_parallel", None)
    if state is None:
        return
    if state.rank == 0:
        import torch.distributed as dist

        dist.broadcast_object_list([job], src=0, group=state.job_group)
    hook = getattr(pipe, "_cfg_parallel_hook", None)
    if hook is not None:  # the pipeline makes the uncond call only with true CFG (a negative prompt and scale > 1)
        hook.enabled = job["true_cfg_scale"] > 1 and job["negative_prompt"] is not None


def rank0_says(pipe, flag: bool) -> bool:
    """Rank 0's `flag` on every rank (one number over the CPU job group), so that all ranks act on it at the same
    point of a job; alone, `flag`."""
    state = getattr(pipe, "_parallel", None)
    if state is None:
        return flag
    value = torch.tensor([int(flag)])
    torch.distributed.broadcast(value, src=0, group=state.job_group)
    return bool(value.item())


def caption_from_rank0(pipe, write: Callable[[], str], stop: threading.Event | None) -> str:
    """The caption every rank conditions on: alone, `write()`. With several GPUs rank 0 writes it (stoppable, as
    `run_pipeline` stops a caption alone) and sends it to the other ranks, which wait; a caption rank 0 did not
    finish (stopped, out of memory, an error) ends the job on every rank with `RunStopped`."""
    state = getattr(pipe, "_parallel", None)
    if state is None:
        return write()
    message = [None]
    if state.rank == 0:
        try:
            with text_encoder_stop(pipe, stop):
                message = [write()]
        finally:  # sent also when `write` raised: [None] then
            torch.distributed.broadcast_object_list(message, src=0, group=state.job_group)
        return message[0]
    torch.distributed.broadcast_object_list(message, src=0, group=state.job_group)
    if message[0] is None:
        raise RunStopped("rank 0 did not finish the caption")
    return message[0]


def serve_rank(pipe) -> None:
    """Ranks 1..N-1: run each job rank 0 sends (the same `infer`), until it sends None (`stop_ranks`)."""
    import torch.distributed as dist

    state = pipe._parallel
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=state.job_group)
        if message[0] is None:
            return
        try:
            infer(pipe, **message[0])
        except (ValueError, OutOfMemoryError, RunStopped) as err:  # rank 0 reports the same failure to the user
            logger.error("Rank %d: %s", state.rank, err)


def stop_ranks(pipe) -> None:
    """Rank 0 at exit: the other ranks leave `serve_rank`, then everyone leaves the process group."""
    import torch.distributed as dist

    state = getattr(pipe, "_parallel", None)
    if state is None:
        return
    if state.rank == 0:
        dist.broadcast_object_list([None], src=0, group=state.job_group)
    dist.destroy_process_group()


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


class RunStopped(RuntimeError):
    """The run's `stop` event was set (Stop pressed, or the client left); it ended at the next step, memory freed."""


STOPPED_MESSAGE = "Stopped: the run ended at the next step and its memory was freed. Nothing was saved."

# One model run at a time. Gradio's queue already runs one GPU job at a time, but a cancelled job's thread
# finishes its current step after Gradio has moved on: the next run waits here for that step.
_PIPELINE_LOCK = threading.Lock()


def stop_callback(stop: threading.Event | None, pipe=None) -> Callable | None:
    """The pipeline's `callback_on_step_end` for a `stop` event: it raises `RunStopped` after the step during which
    `stop` was set (the pipeline's own callback, so no step is cut in half). `run_pipeline` covers the caption.
    With several GPUs (`pipe`'s ranks) every rank gets it and acts on rank 0's `stop` (`rank0_says`)."""
    if stop is None and getattr(pipe, "_parallel", None) is None:
        return None

    def callback(_pipe, _step, _timestep, callback_kwargs):
        if rank0_says(pipe, stop is not None and stop.is_set()):
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


def out_of_memory_message(pipe, job: str = "decomposition", changes: list[str] = (), program: str = "app") -> str:
    """What to change after a CUDA out-of-memory error: the job's own `changes` first, then the offload mode's."""
    offload = getattr(pipe, "_studio_info", {}).get("offload_mode", "?")
    if getattr(pipe, "_budget_stages", None) is not None:  # the engine in effect (also where it was enabled by hand)
        offload = "budget"
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


def run_pipeline(pipe, job: Callable[[], Any], out_of_memory: str, stop: threading.Event | None = None) -> Any:
    """Run `job()` (calls of `pipe`) the one safe way; the app's `infer` and the edit tool's `edit_layer` use it.

    One run at a time (`_PIPELINE_LOCK`), under `torch.inference_mode()` (+ bf16 autocast on CUDA). Afterwards,
    also after an error, the run's memory is freed: budget mode sends every weight to its host copy,
    FirstBlockCache's state is reset (the pipeline resets it only when a run completes; a stopped run would leave a
    cached first-block residual without the tail residuals it needs), and `clear_memory`. CUDA out of memory
    becomes `OutOfMemoryError(out_of_memory)`, raised only after the run's tensors are freed.
    Setting `stop` ends the run with `RunStopped`: the job passes `stop_callback(stop)` to the pipeline's steps,
    and the caption is stopped before its next token (`text_encoder_stop`). With several GPUs the ranks stop
    together, so only the caption is stopped that way there (`caption_from_rank0`), not rank 0's prompt encoding.
    """
    caption_stop = stop if getattr(pipe, "_parallel", None) is None else None
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
            release_budget_vram(pipe)
            pipe.transformer._reset_stateful_cache()
            clear_memory()
    if failed:
        logger.warning("Out of GPU memory; memory freed. %s", out_of_memory)
        raise OutOfMemoryError(out_of_memory)
    if stopped:
        logger.info("Run stopped after %.1f s; memory freed.", time.perf_counter() - start)
        raise RunStopped(STOPPED_MESSAGE)


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


def caption_attention():
    """The SDPA kernels the caption's decode may use (CAPTION_SDPA_BACKENDS: no cuDNN plan per new length)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not CAPTION_SDPA_BACKENDS:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, name) for name in CAPTION_SDPA_BACKENDS])


def caption_image(pipe, rgba: Image.Image, resolution: int, use_en_prompt: bool = True) -> str:
    """The pipeline's own `get_image_caption` on the image resized as the pipeline resizes it (greedy decoding)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    width, height = calculate_dimensions(resolution * resolution, rgba.width / rgba.height)
    prompt_image = pipe.image_processor.resize(rgba, height, width)
    with caption_attention(), caption_progress(pipe):  # caption_progress: a bar of its tokens, like the steps'
        return pipe.get_image_caption(prompt_image, use_en_prompt=use_en_prompt, device=pipe._execution_device)


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
    stop: threading.Event | None = None,
) -> DecomposeResult:
    """Decompose `image` into `layers` RGBA layers (bottom first). The pipeline's tqdm reports the steps.

    Setting `stop` (another thread: the UI's Stop button, a client that left) ends the run at the next step
    with `RunStopped`, after its memory is freed.
    """
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
    # Several GPUs (section 4c): rank 0 hands this checked job to the other ranks, which run this same function
    # with the seed it drew and the prompt as stripped.
    share_job(pipe, dict(checked, image=rgba, prompt=prompt, seed=seed, randomize_seed=False))
    start = time.perf_counter()
    auto_caption = not prompt

    def job():
        # 2. Caption. An empty prompt makes the pipeline caption the image itself; we call its own
        #    `get_image_caption` on the same resized image first so the caption can be shown and saved.
        #    With several GPUs rank 0 writes it and sends it to the others (section 4c).
        caption = caption_from_rank0(
            pipe, lambda: caption_image(pipe, rgba, resolution, use_en_prompt) if auto_caption else prompt, stop)
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
            callback_on_step_end=stop_callback(stop, pipe),
        )
        return caption, output, generator.device.type

    # 4. One guarded run: memory freed after it, also after an error; out of memory says what to change.
    prompt, output, generator_device = run_pipeline(
        pipe, job, out_of_memory_message(pipe, changes=decomposition_changes(layers, resolution)), stop=stop)
    result_layers = [layer.convert("RGBA") for layer in output.images[0]]
    # Every PARAMS value as checked (the prompt as "prompt_given"), the seed used, and what the input needed.
    params = {("prompt_given" if name == "prompt" else name): value for name, value in checked.items()}
    params.update(prompt_given=prompt if not auto_caption else "", seed=seed, input_size=list(rgba.size),
                  output_size=list(result_layers[0].size), input_notes=notes,
                  generator_device=generator_device)  # "cuda": the official app's noise; "cpu": no CUDA here
    duration_s = time.perf_counter() - start
    params["recomposition"] = recomposition_score(rgba, result_layers)  # section 6c; not part of duration_s
    return DecomposeResult(layers=result_layers, caption=prompt, auto_caption=auto_caption, seed=seed,
                           params=params, duration_s=duration_s, notes=notes)


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
    emu_per_px = max(emu_per_px, -(-SLIDE_MIN_SIDE_EMU // min(width, height)))  # strips: 1 in short side
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


# A run folder is written under this prefix (+ the writer's process id) and renamed when complete: a run folder
# without it is whole. `clean_partial_runs` deletes those a killed process left behind.
PARTIAL_PREFIX = ".partial-"


@contextlib.contextmanager
def atomic_run_folder(outputs: Path, seed: int):
    """Yield `(partial, final)`: write the run into `partial`; when the block ends without error it is renamed to
    `final` (one rename, so a run folder is either complete or absent); after an error it is deleted."""
    final = new_run_folder(outputs, seed)  # reserves the name (stamps are unique per microsecond)
    final.rmdir()
    partial = final.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{final.name}")
    partial.mkdir()
    try:
        yield partial, final
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, final)


def clean_partial_runs(outputs: Path) -> list[Path]:
    """Delete the half-written run folders (`PARTIAL_PREFIX`) of processes that no longer run, in `outputs`
    and in its runs' sub_runs/. Called at start-up; returns what was deleted."""
    import psutil

    outputs = Path(outputs)
    if not outputs.is_dir():
        return []
    deleted = []
    for partial in [*outputs.glob(f"{PARTIAL_PREFIX}*"), *outputs.glob(f"*/{SUB_RUNS_DIR}/{PARTIAL_PREFIX}*")]:
        pid = partial.name[len(PARTIAL_PREFIX):].partition("-")[0]
        if partial.is_dir() and not (pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)
            deleted.append(partial)
    return deleted


def _export_or_note(failed: dict[str, str], key: str, export: Callable[..., Path], *args) -> Path | None:
    """Run one export; if it fails, log the reason and note it under `failed[key]` so the layers and the other
    exports are still saved and offered. (Deliberately broad: any exporter bug must cost only its own file.)"""
    try:
        return export(*args)
    except Exception as err:
        logger.exception("The %s export failed", key)
        failed[key] = f"{type(err).__name__}: {err}"
        return None


def export_failures_message(failed: dict[str, str]) -> str | None:
    """What the user is told when some exports failed (the layers and the other files are there)."""
    if not failed:
        return None
    names = ", ".join(("original-size " if key.startswith("original_") else "") + key.removeprefix("original_").upper()
                      for key in failed)
    return (f"The {names} export failed and is not offered (the reason is in the server log); the layers and the "
            f"other files were saved.")


def save_run(result: DecomposeResult, outputs: Path, run_info: dict[str, Any] | None = None,
             original_size: tuple[int, int] | None = None,
             extra_files: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write one run's folder and return its paths.

    At the model's resolution: layer_1.png ... layer_N.png, composite.png, params.json and
    <stem>.zip / .pptx / .psd, where <stem> is `export_stem(caption, seed)`. With `original_size`
    (width, height; the input's is `result.params["input_size"]`), the layers are also resized to it and
    written to original_size/ (layer PNGs, composite.png, <stem>_<W>x<H>.pptx / .psd; paths["original"]);
    the ZIP then holds both sets. `extra_files(folder)` may write more files (it returns their paths).

    The folder is written under a temporary name and renamed when complete (`atomic_run_folder`). An export that
    fails costs only its own file: it is missing from `paths`, and `paths["failed"]` names it with the reason.
    """
    with atomic_run_folder(outputs, result.seed) as (partial, final):
        paths = _write_run(result, partial, run_info, original_size)
        if extra_files is not None:
            paths.update(extra_files(partial))
    # The same paths, in the renamed folder.
    def moved(value):
        if isinstance(value, Path) and value.is_relative_to(partial):
            return final / value.relative_to(partial)
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [moved(item) for item in value]
        return value
    return moved(paths)


def _write_run(result: DecomposeResult, folder: Path, run_info: dict[str, Any] | None,
               original_size: tuple[int, int] | None) -> dict[str, Any]:
    """`save_run`'s files, written into `folder`. An export (ZIP, PPTX, PSD) that fails is left out and named in
    `paths["failed"]` ({key: reason}); the layer PNGs, composite and params.json are always written."""
    original_layers = resize_layers(result.layers, original_size) if original_size else None
    params = dict(result.params, seed=result.seed, caption=result.caption, auto_caption=result.auto_caption,
                  duration_s=round(result.duration_s, 3), created=datetime.datetime.now().isoformat(timespec="seconds"),
                  export_original_size=list(original_layers[0].size) if original_layers else None,
                  **(run_info or {}))
    params_bytes = json.dumps(params, indent=2, ensure_ascii=False).encode("utf-8")
    stem = export_stem(result.caption, result.seed)
    failed: dict[str, str] = {}
    paths: dict[str, Any] = {"folder": folder, "failed": failed}
    paths["layers"] = export_layer_pngs(result.layers, folder)
    paths["composite"] = folder / "composite.png"
    composite_layers(result.layers).save(paths["composite"])
    paths["params"] = folder / "params.json"
    paths["params"].write_bytes(params_bytes)
    for export in EXPORTS:
        path = _export_or_note(failed, export.key, export.write, result.layers, folder / f"{stem}{export.suffix}",
                               params_bytes, original_layers)
        if path is not None:
            paths[export.key] = path
    if original_layers:
        sub = folder / "original_size"
        size = "{}x{}".format(*original_layers[0].size)
        paths["original"] = {"folder": sub, "layers": export_layer_pngs(original_layers, sub),
                             "composite": sub / "composite.png"}
        composite_layers(original_layers).save(paths["original"]["composite"])
        for export in EXPORTS:
            if export.at_original_size:
                path = _export_or_note(failed, f"original_{export.key}", export.write, original_layers,
                                       sub / f"{stem}_{size}{export.suffix}", params_bytes, None)
                if path is not None:
                    paths["original"][export.key] = path
    if failed:  # params.json says which files are missing and why
        params_bytes = json.dumps(dict(params, failed_exports=failed), indent=2, ensure_ascii=False).encode("utf-8")
        paths["params"].write_bytes(params_bytes)
    return paths


def run_info_for(pipe, environment: dict[str, Any]) -> dict[str, Any]:
    """What params.json records about the model and machine besides the inputs."""
    info = dict(getattr(pipe, "_studio_info", {}))
    info["versions"] = {k: environment.get(k) for k in ("python", "torch", "cuda", "diffusers", "transformers", "gradio")}
    info["gpu_name"] = environment.get("gpu_name")
    return info


def prune_outputs(outputs: Path, max_bytes: float, max_age_s: float,
                  keep: "Path | Collection[Path] | None" = None) -> list[Path]:
    """Delete run folders, oldest first, until none is older than `max_age_s` and together they hold at most
    `max_bytes` (0: no limit). `keep` (the run just saved, and every run a live session shows) is never deleted.
    Returns what was deleted.

    Only run folders (those holding a params.json, or a sub_runs/ folder left without one) are touched: Gradio's
    cache (.gradio-cache, which Gradio's delete_cache cleans), half-written runs (`clean_partial_runs`) and
    anything else put in the outputs folder stay. A run's age is that of its newest sub-run.
    """
    keep = {Path(keep)} if isinstance(keep, (str, Path)) else {Path(path) for path in keep or ()}
    runs = [p for p in Path(outputs).iterdir() if p.is_dir() and not p.name.startswith(".")
            and ((p / "params.json").is_file() or (p / SUB_RUNS_DIR).is_dir())]
    last_used = {run: max([run.stat().st_mtime] + [sub.stat().st_mtime for sub in (run / SUB_RUNS_DIR).glob("*")])
                 for run in runs}
    runs.sort(key=last_used.get)
    sizes = {run: sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) for run in runs}
    total, now, deleted = sum(sizes.values()), time.time(), []
    for run in runs:
        too_old = max_age_s > 0 and now - last_used[run] > max_age_s
        too_big = max_bytes > 0 and total > max_bytes
        if run in keep or not (too_old or too_big):
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

    def input_and_sub_layers(folder: Path) -> dict[str, Any]:
        stack.layers[index].save(folder / "input_layer.png")
        return {"input_layer": folder / "input_layer.png",
                "sub_layers": export_layer_pngs(result.layers, folder / "sub_layers")}

    return save_run(step, Path(stack.run_folder) / SUB_RUNS_DIR, dict(run_info or {}, sub_run=sub_run),
                    original_size=stack.original_size, extra_files=input_and_sub_layers)


def check_stack_files(stack: LayerStack) -> None:
    """Refuse a stack whose run folder (or its layer files) was deleted, e.g. by hand or by an older app's pruning:
    a sub-run would recreate a folder holding only sub_runs/, and the page could not show the layers."""
    files = [stack.run_folder, *stack.files.get("layers", [])]
    if not all(Path(path).exists() for path in files):
        raise ValueError("The files of these layers are no longer on the server (their run folder was deleted). "
                         "Decompose the image again.")


def decompose_layer(pipe, stack: LayerStack, index: int, run_info: dict[str, Any] | None = None,
                    **infer_kwargs) -> tuple[LayerStack, DecomposeResult]:
    """Decompose `stack.layers[index]` again and put its sub-layers in its place. `infer_kwargs` go to `infer`.

    Returns the new stack (whose `previous` is `stack`, for one step of undo) and the sub-run's own result.
    """
    # 1. Check the index and the run folder before spending a run on them.
    check_layer_index(index, len(stack.layers))
    check_stack_files(stack)
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
# 6c. Scores: how well layers give back their image, and how close they come to ground-truth layers
# ----------------------------------------------------------------------------------------------------
# The ground-truth metrics follow LayerD (Suzuki et al., "LayerD: Decomposing Raster Graphic Designs into
# Layers", ICCV 2025), https://github.com/CyberAgentAILab/LayerD, src/layerd/evaluation/: metrics.py (RGBL1,
# AlphaIoU, RGBL1_AIoU), dtw.py (dynamic_time_warping), edits.py (Merge), edit_distance.py (LayersEditDist),
# and src/layerd/data/crello.py (group_top_layers_indices). Written here from those definitions; where this
# code differs, the comment at the place says how.
GROUND_TRUTH_SUFFIXES = (".psd", ".zip")  # layered files; a folder of PNGs is the third kind
MIN_GROUND_TRUTH_LAYERS = 2  # one layer is the picture itself, not a decomposition


def _float_rgba(image: Image.Image) -> np.ndarray:
    """Straight RGBA as float64 in [0, 1], shape (height, width, 4)."""
    return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0


def psnr_db(mse: float) -> float:
    """PSNR in dB of values in [0, 1]; identical images (mse 0) and anything above give PSNR_CAP_DB."""
    return PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def rgb_l1(pred: np.ndarray, gt: np.ndarray) -> float:
    """LayerD's RGBL1: the mean absolute RGB difference (0..1, averaged over R, G, B) over the pixels where
    the ground truth's alpha is not zero, on straight (not premultiplied) colour; 0 for an empty ground truth."""
    mask = gt[..., 3] > 0
    count = int(mask.sum())
    return float(np.abs(pred[..., :3] - gt[..., :3]).mean(-1)[mask].sum() / count) if count else 0.0


def alpha_soft_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """LayerD's AlphaIoU: sum(min(alpha_pred, alpha_gt)) / sum(max(alpha_pred, alpha_gt)); 0 when both are empty."""
    union = np.maximum(pred[..., 3], gt[..., 3]).sum()
    return float(np.minimum(pred[..., 3], gt[..., 3]).sum() / union) if union > 0 else 0.0


def layer_cost(pred: np.ndarray, gt: np.ndarray) -> float:
    """LayerD's RGBL1_AIoU (alpha weight 1), the cost the alignment minimises: (RGB L1 + 1 - alpha IoU) / 2, 0..1."""
    return (rgb_l1(pred, gt) + 1.0 - alpha_soft_iou(pred, gt)) / 2.0


def layer_report(layers: list[Image.Image]) -> list[dict[str, Any]]:
    """Per layer (1 = bottom): `coverage` (mean alpha, 0..1), `bbox` ([left, top, right, bottom] of its non-zero
    alpha, or None), `empty` (coverage under EMPTY_LAYER_COVERAGE) and `duplicate_of` (the number of a lower
    layer it nearly repeats: `layer_cost` under NEAR_DUPLICATE_COST both ways; None if none)."""
    arrays = [_float_rgba(layer) for layer in layers]
    report: list[dict[str, Any]] = []
    for index, (layer, array) in enumerate(zip(layers, arrays)):
        coverage = float(array[..., 3].mean())
        box = layer.convert("RGBA").getbbox(alpha_only=True)
        empty = coverage < EMPTY_LAYER_COVERAGE
        duplicate_of = None
        for lower in range(index):
            if empty or report[lower]["empty"]:
                continue
            if max(layer_cost(array, arrays[lower]), layer_cost(arrays[lower], array)) < NEAR_DUPLICATE_COST:
                duplicate_of = lower + 1
                break
        report.append(dict(layer=index + 1, coverage=coverage, bbox=list(box) if box else None,
                           empty=empty, duplicate_of=duplicate_of))
    return report


def recomposition_score(image: Image.Image, layers: list[Image.Image]) -> dict[str, Any]:
    """How well `layers` (bottom first) stacked give back `image`, at the layers' size (the model's resolution).

    The input is resized to that size the way `resize_layers` resizes layers, when the sizes differ. Colour is
    compared where the input is visible, each pixel weighted by the input's alpha (the colour under a transparent
    pixel is not part of the picture): `psnr_db` (capped at PSNR_CAP_DB) and `rgb_mae` (0..1). `alpha_error` is
    the mean absolute alpha difference over all pixels. `layers` is `layer_report`, and `empty_layers` and
    `near_duplicates` ([layer, the lower layer it repeats]) list what it flags, numbered from 1 = bottom.
    """
    composite = composite_layers(layers)
    image = image.convert("RGBA")
    if image.size != composite.size:
        image = resize_layers([image], composite.size)[0]
    want, got = _float_rgba(image), _float_rgba(composite)
    weight = want[..., 3]
    visible = float(weight.sum())
    difference = got[..., :3] - want[..., :3]
    mse = float(((difference ** 2).mean(-1) * weight).sum() / visible) if visible > 0 else 0.0
    mae = float((np.abs(difference).mean(-1) * weight).sum() / visible) if visible > 0 else 0.0
    report = layer_report(layers)
    return dict(psnr_db=psnr_db(mse), rgb_mae=mae,
                alpha_error=float(np.abs(got[..., 3] - want[..., 3]).mean()), size=list(composite.size),
                layers=report, empty_layers=[r["layer"] for r in report if r["empty"]],
                near_duplicates=[[r["layer"], r["duplicate_of"]] for r in report if r["duplicate_of"]])


def score_line(score: dict[str, Any]) -> str:
    """One line for the terminal and the page: PSNR, MAE, alpha error and what the layer check flagged."""
    text = (f"recomposition PSNR {score['psnr_db']:.2f} dB, RGB MAE {score['rgb_mae']:.4f}, "
            f"alpha error {score['alpha_error']:.4f}")
    if score["empty_layers"]:
        text += f"; empty layers: {', '.join(map(str, score['empty_layers']))}"
    if score["near_duplicates"]:
        text += "; near-duplicates: " + ", ".join(f"{a}≈{b}" for a, b in score["near_duplicates"])
    return text


def group_top_layers(layers: list[Image.Image]) -> list[Image.Image]:
    """LayerD's grouping before scoring (crello.py, group_top_layers_indices): the layers that overlap no layer
    above them form the top group, composited into one layer; repeat on the rest. Returns the groups bottom first.

    A decomposition that puts two separate objects on one layer, or on two, scores the same this way.
    Overlap means both alphas non-zero on a pixel.
    """
    masks = [np.asarray(layer.convert("RGBA").getchannel("A")) > 0 for layer in layers]
    remaining, groups = list(range(len(layers))), []
    while remaining:
        top = [i for position, i in enumerate(remaining)
               if not any((masks[i] & masks[j]).any() for j in remaining[position + 1:])]
        groups.append(top)
        remaining = [i for i in remaining if i not in top]
    groups.reverse()
    return [layers[group[0]] if len(group) == 1 else composite_layers([layers[i] for i in group]) for group in groups]


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The monotone path from (0, 0) to the last cell whose summed cost is least (steps (1, 0), (0, 1), (1, 1)).

    As LayerD's dtw.py: cumulative sums, then back from the end, taking on ties the diagonal first, then a step
    back in the first sequence (predictions), then in the second (ground truth).
    """
    n, m = cost.shape
    total = np.full((n, m), np.inf)
    for i in range(n):
        for j in range(m):
            before = [total[i - 1, j - 1] if i and j else np.inf, total[i - 1, j] if i else np.inf,
                      total[i, j - 1] if j else np.inf]
            total[i, j] = cost[i, j] + (0.0 if i == j == 0 else min(before))
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i or j:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        elif total[i - 1, j - 1] <= min(total[i - 1, j], total[i, j - 1]):
            i, j = i - 1, j - 1
        elif total[i - 1, j] <= total[i, j - 1]:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    return path[::-1]


def align_layers(pred: list[Image.Image], gt: list[Image.Image], max_merges: int = EVAL_MAX_MERGES) -> dict[str, Any]:
    """Align predicted to ground-truth layers (bottom first, one canvas) and score the aligned pairs, as LayerD's
    LayersEditDist: the cost of a pair is `layer_cost`; `dtw_path` aligns the two sequences (a layer may pair with
    several of the other side, so missing, extra and split layers cost what their pairs cost); then up to
    `max_merges` times two adjacent layers, on either side, are merged ("over") when that lowers the cost.
    A side keeps at least 2 layers (LayerD's Merge min_layers).

    Returns `edit_cost` (mean cost over the path: 0 is perfect), `rgb_l1` and `alpha_iou` (their means over the
    same path), `merges` (how many were made) and `path` ((pred, gt) indices after the merges).

    Differs from LayerD in how a merge is chosen: LayerD estimates each merge's gain from the current pairs
    (edits.py, Merge._compute_merged_scores); here every candidate merge is aligned again and the one whose
    `edit_cost` is lowest is taken, so a merge is made only when the score really improves. LayerD reports a
    row per number of edits; here the score after the merges allowed (`--max-merges 0` gives the unedited one).
    """
    arrays: dict[int, np.ndarray] = {}  # id(image) -> array; the images stay alive in `keep`, so ids stay unique
    pairs: dict[tuple[int, int], tuple[float, float, float]] = {}  # (id pred, id gt) -> metrics()
    keep: list[Image.Image] = []

    def array_of(image: Image.Image) -> np.ndarray:
        if id(image) not in arrays:
            keep.append(image)
            arrays[id(image)] = _float_rgba(image)
        return arrays[id(image)]

    def metrics(p: Image.Image, g: Image.Image) -> tuple[float, float, float]:
        """(RGB L1, alpha IoU, cost) of one pair, computed once (`layer_cost` spelled out to reuse both parts)."""
        key = (id(p), id(g))
        if key not in pairs:
            a, b = array_of(p), array_of(g)
            l1, iou = rgb_l1(a, b), alpha_soft_iou(a, b)
            pairs[key] = (l1, iou, (l1 + 1.0 - iou) / 2.0)
        return pairs[key]

    def align(p_layers: list[Image.Image], g_layers: list[Image.Image]) -> tuple[float, list[tuple[int, int]]]:
        cost = np.array([[metrics(p, g)[2] for g in g_layers] for p in p_layers])
        path = dtw_path(cost)
        return float(np.mean([cost[i, j] for i, j in path])), path

    merged: dict[tuple[int, int], Image.Image] = {}

    def merge(layers: list[Image.Image], i: int) -> list[Image.Image]:
        key = (id(layers[i]), id(layers[i + 1]))
        if key not in merged:
            merged[key] = Image.alpha_composite(layers[i].convert("RGBA"), layers[i + 1].convert("RGBA"))
            keep.extend((layers[i], layers[i + 1]))
        return layers[:i] + [merged[key]] + layers[i + 2:]

    pred, gt = list(pred), list(gt)
    for image in pred + gt:
        array_of(image)
    edit_cost, path = align(pred, gt)
    merges = 0
    while merges < max_merges:
        best = None
        for side in ("pred", "gt"):
            layers = pred if side == "pred" else gt
            if len(layers) <= 2:  # LayerD's Merge(min_layers=2): a side is never merged down to one layer
                continue
            for i in range(len(layers) - 1):
                candidate = (merge(pred, i), gt) if side == "pred" else (pred, merge(gt, i))
                value, candidate_path = align(*candidate)
                if value < edit_cost - 1e-12 and (best is None or value < best[0]):
                    best = (value, candidate, candidate_path)
        if best is None:
            break
        edit_cost, (pred, gt), path = best
        merges += 1
    pair_metrics = [metrics(pred[i], gt[j]) for i, j in path]
    return dict(edit_cost=edit_cost, rgb_l1=float(np.mean([m[0] for m in pair_metrics])),
                alpha_iou=float(np.mean([m[1] for m in pair_metrics])), merges=merges, path=[list(p) for p in path])


def evaluate_layers(pred: list[Image.Image], gt: list[Image.Image], max_merges: int = EVAL_MAX_MERGES,
                    group: bool = True) -> dict[str, Any]:
    """Every score of predicted layers against ground-truth layers (both bottom first, each on one canvas).

    The recomposition score is `recomposition_score` of the flattened ground truth (the image the model was
    given) against the prediction, at the prediction's size: the very number a run reports. The layer scores
    are at the ground truth's size (a prediction of another size is resized with `resize_layers`), after
    `group_top_layers` on both sides when `group` (LayerD does), then `align_layers`.
    """
    check_layers(pred)
    check_layers(gt)
    recomposition = recomposition_score(composite_layers(gt), pred)
    if pred[0].size != gt[0].size:
        pred = resize_layers(pred, gt[0].size)
    if group:
        pred, gt = group_top_layers(pred), group_top_layers(gt)
    aligned = align_layers(pred, gt, max_merges)
    return dict(rgb_l1=aligned["rgb_l1"], alpha_iou=aligned["alpha_iou"],
                edit_cost=aligned["edit_cost"], merges=aligned["merges"], path=aligned["path"],
                scored_pred_layers=len(pred), scored_gt_layers=len(gt),
                recomposition_psnr_db=recomposition["psnr_db"], recomposition_rgb_mae=recomposition["rgb_mae"],
                recomposition_alpha_error=recomposition["alpha_error"])


def _natural_key(name: str) -> list:
    """layer_2 before layer_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _layer_pngs(folder: Path) -> list[Path]:
    """A folder's PNG layers, bottom first in natural order; composite.png is the stack, not a layer."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".png"
                   and p.name.lower() != "composite.png" and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _check_layer_pixels(width: int, height: int, name: str) -> None:
    """A layer may be any size the model could take (no minimum side: `--pred` layers are only scored)."""
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height}: more than the {MAX_INPUT_PIXELS:,} pixels (MAX_INPUT_PIXELS) "
                         f"a layer may have")


def _open_layer(source: Any, name: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            _check_layer_pixels(opened.width, opened.height, name)
            opened.load()
            return opened.convert("RGBA")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name} is not a readable PNG ({err})") from err


def _read_psd_layers(path: Path) -> list[Image.Image]:
    """The visible pixel layers of a PSD, bottom first, each placed at its offset on the PSD's canvas with its
    opacity folded into alpha. Blend modes, masks and effects are not applied (the app's own PSDs have none)."""
    from psd_tools import PSDImage

    try:
        psd = PSDImage.open(path)
        _check_layer_pixels(psd.width, psd.height, str(path))
        layers = []
        for psd_layer in psd.descendants():
            if psd_layer.is_group() or not psd_layer.is_visible():
                continue
            canvas = Image.new("RGBA", psd.size, (0, 0, 0, 0))
            _check_layer_pixels(psd_layer.width, psd_layer.height, f"{path}: layer {psd_layer.name!r}")
            pixels = psd_layer.topil() if psd_layer.width and psd_layer.height else None
            if pixels is not None:
                pixels = pixels.convert("RGBA")
                if psd_layer.opacity < 255:
                    pixels.putalpha(pixels.getchannel("A").point(lambda a, o=psd_layer.opacity: round(a * o / 255)))
                canvas.paste(pixels, (psd_layer.left, psd_layer.top))
            layers.append(canvas)
    except ValueError:
        raise
    except Exception as err:  # psd-tools raises struct.error, EOFError, AssertionError, ... on a damaged file
        raise ValueError(f"{path} is not a readable PSD ({type(err).__name__}: {err})") from err
    return layers


def read_layered_file(path: Path | str) -> list[Image.Image]:
    """Ground-truth (or predicted) layers, bottom first, all on one canvas, from a PSD, the studio's ZIP
    (layer_1.png ... at its top-most folder holding PNGs; composite.png and original_size/ left out) or a folder
    of RGBA PNGs (natural order, bottom first; composite.png left out).

    Raises ValueError naming the file: not found, not layered (one image), fewer than 2 layers, unreadable.
    """
    path = Path(path)
    if path.is_dir():
        files = _layer_pngs(path)
        layers = [_open_layer(file, str(file)) for file in files]
    elif not path.is_file():
        raise ValueError(f"{path} does not exist: pass a PSD, the studio's ZIP or a folder of RGBA PNGs")
    else:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"8BPS":
            layers = _read_psd_layers(path)
        elif magic == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(path) as archive:
                    names = [n for n in archive.namelist() if n.lower().endswith(".png") and not n.startswith("__MACOSX/")]
                    if names:
                        top = min((n.count("/"), str(Path(n).parent)) for n in names)[1]
                        names = [n for n in names if str(Path(n).parent) == top and Path(n).name.lower() != "composite.png"]
                    names.sort(key=lambda n: _natural_key(Path(n).name))
                    if not names:
                        raise ValueError(f"{path}: the ZIP holds no PNG layer (expected layer_1.png, layer_2.png, ...)")
                    layers = []
                    for name in names:
                        with archive.open(name) as data:
                            layers.append(_open_layer(io.BytesIO(data.read()), f"{path}/{name}"))
            except zipfile.BadZipFile as err:
                raise ValueError(f"{path} is not a readable ZIP ({err})") from err
        else:
            raise ValueError(f"{path} is one flat image, not a layered file: pass a PSD with layers, the studio's "
                             f"ZIP or a folder of RGBA PNGs (bottom first)")
    if len(layers) < MIN_GROUND_TRUTH_LAYERS:
        raise ValueError(f"{path} holds {len(layers)} layer(s): layered ground truth needs at least "
                         f"{MIN_GROUND_TRUTH_LAYERS}")
    for index, layer in enumerate(layers):
        if layer.size != layers[0].size:
            raise ValueError(f"{path}: layer {index + 1} is {layer.width}x{layer.height} but layer 1 is "
                             f"{layers[0].width}x{layers[0].height}: all layers must share one canvas")
    return layers


def find_ground_truth(paths: list[Path | str]) -> list[Path]:
    """What `evaluate` scores, in the order given: a file as it is (a bad one is reported, not dropped); a folder
    holding PNGs and no PSD/ZIP is one ground truth; any other folder gives its PSD and ZIP files and its
    sub-folders that hold PNGs, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        children = sorted(path.iterdir(), key=lambda p: _natural_key(p.name))
        layered = [p for p in children if p.is_file() and p.suffix.lower() in GROUND_TRUTH_SUFFIXES]
        if not layered and _layer_pngs(path):
            found.append(path)
            continue
        found += [p for p in children if not p.name.startswith(".") and
                  (p in layered or (p.is_dir() and _layer_pngs(p)))]
    return found


# ----------------------------------------------------------------------------------------------------
# 7. UI
# ----------------------------------------------------------------------------------------------------
DEMO_BANNER = ("**Demo model in use** — tiny random weights built offline. Everything runs, but the layers are "
               "noise. Put the real weights in `models/Qwen-Image-Layered` (or pass `--model`) for real results.")
# Shown while a LOSSY setting (fp8_storage, fp8_dynamic, int8_dynamic) is applied: outputs differ from bf16.
LOSSY_BANNER = "**Lossy mode in use** ({}) — the layers differ from the model's bf16 output. Restart without `--quantization` for bf16."


# Under the recomposition score on the demo model: why it is poor.
DEMO_SCORE_NOTE = ("The demo model's layers are random noise, so they do not stack back into the input: this poor score "
                   "is expected and says nothing about the real model.")


def recomposition_view(image: Any, stack: "LayerStack | None", demo: bool = False,
                       read_upload: Callable[[Any], Path] | None = None) -> tuple[Any, str]:
    """The UI's before/after pair (the input at the model's resolution, the composite of the layers) and the score
    text, for a stack's run: the score is the one `infer` computed and `save_run` wrote into params.json.
    `read_upload` (bound in `build_ui`) checks the client's image value as the decompose handler does."""
    if stack is None:
        return None, ""
    composite = Image.open(stack.files["composite"]).convert("RGBA")
    before = to_rgba(read_upload(image) if read_upload is not None else image)
    if before.size != composite.size:
        before = resize_layers([before], composite.size)[0]
    score = json.loads(Path(stack.files["params"]).read_text(encoding="utf-8"))["recomposition"]
    text = (f"**How well the layers stack back into the input** ({composite.width}x{composite.height}): "
            f"{score_line(score)}. Higher PSNR and lower errors are better; {PSNR_CAP_DB:.0f} dB means identical.")
    if demo:
        text += "\n\n" + DEMO_SCORE_NOTE
    return (before, composite), text


# The page's own CSS (given to `launch`): Gradio's file box cuts a long file name to "...p"; the downloads'
# names wrap instead, so the whole name is read.
UI_CSS = ".downloads .filename .stem { white-space: normal; overflow-wrap: anywhere; }"


def example_images() -> list[str]:
    return sorted(str(p) for p in ASSETS_DIR.glob("*.png"))


# The one answer for any file a client may not read, whether or not it exists (so it reveals nothing).
NOT_AN_UPLOAD_MESSAGE = ("This image was not uploaded to this app (or it was cleaned from its upload cache): upload "
                         "the image again, or pick one of the examples.")


def readable_upload(value: Any, uploaded: Collection[str], upload_dir: Path | str,
                    examples: Collection[str] = ()) -> Path:
    """The file a client's image value names, if the client may read it; else ValueError(NOT_AN_UPLOAD_MESSAGE).

    Readable: a file that Gradio's upload route received (`uploaded`: Gradio's record of them, `upload_file_set`)
    lying inside `upload_dir`, or one of `examples`, or Gradio's cached copy of one (the page sends that copy when
    an example is clicked; it is recognised by its bytes). Gradio's upload route puts each file in a folder named
    by the SHA-256 of its content, so a client can name only an upload whose bytes it has; Gradio's upload route
    does not tell which session sent a file, so "this session's uploads" cannot be checked more closely.

    Why: with `preprocess=False` a value without Gradio's `meta` key (`{"path": "/any/file.png"}` or a bare
    string) reaches the handler unchecked, and `to_rgba` would read any image file on the server.
    """
    import filecmp

    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(NOT_AN_UPLOAD_MESSAGE)
    resolved = Path(os.path.realpath(path))  # symlinks and ".." resolved before any check
    example_paths = [Path(os.path.realpath(example)) for example in examples]
    if resolved in example_paths:
        return resolved
    upload_root = Path(os.path.realpath(upload_dir))
    if resolved.is_relative_to(upload_root) and resolved.is_file():
        if str(path) in uploaded or str(resolved) in uploaded:
            return resolved
        for example in example_paths:  # the page's cached copy of an example: read the example itself
            if example.name == resolved.name and filecmp.cmp(example, resolved, shallow=False):
                return example
    raise ValueError(NOT_AN_UPLOAD_MESSAGE)


class Sessions:
    """What each live session (a browser tab, or a gradio_client `Client`) holds, by Gradio's session hash: the
    run folder its page shows (pruning keeps it) and the stop event of its running job (Stop, or leaving, sets it).

    Gradio's `unload` event (the page's heartbeat connection closed: tab closed, client gone) calls `end`.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._folders: dict[str, Path] = {}
        self._stops: dict[str, threading.Event] = {}

    def show(self, session: str, folder: Path) -> None:
        with self._lock:
            self._folders[session] = Path(folder)

    def shown_folders(self) -> set[Path]:
        with self._lock:
            return set(self._folders.values())

    def start_job(self, session: str) -> threading.Event:
        with self._lock:
            stop = self._stops[session] = threading.Event()
            return stop

    def end_job(self, session: str, stop: threading.Event) -> None:
        with self._lock:
            if self._stops.get(session) is stop:
                del self._stops[session]

    def stop(self, session: str) -> bool:
        """Ask the session's running job to stop at its next step; False when it has none."""
        with self._lock:
            stop = self._stops.get(session)
        if stop is not None:
            stop.set()
        return stop is not None

    def end(self, session: str) -> None:
        self.stop(session)
        with self._lock:
            self._folders.pop(session, None)


def client_error(err: Exception, doing: str) -> str:
    """The message a client gets for an unexpected error: no server path, no handler internals (those go to the
    server log with the traceback), and what to do."""
    logger.exception("Unexpected error while %s", doing)
    return (f"Something went wrong on the server while {doing} ({type(err).__name__}). The details are in the "
            f"server's log. Try again; if it happens again, restart the app and report the log.")


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
    """The gallery and the downloads for a stack: the files its sub-run (or first run) wrote (a failed export: an
    empty box)."""
    files = stack.files
    offered = files.get("original", files)  # the exports at the size asked for; the ZIP holds both sizes
    downloads = [(offered if e.at_original_size else files).get(e.key) for e in EXPORTS]
    return StackView(gallery_items(files["layers"]), *(str(path) if path else None for path in downloads))


def _user_error(message: str):
    """Gradio's error for the page and the API, shown until closed (gradio is imported late: see `build_ui`)."""
    import gradio as gr

    return gr.Error(message, duration=None)  # stays on the page until closed


def prune_runs(settings: Settings, sessions: "Sessions | None", just_saved: Path) -> None:
    """Apply the outputs limits after a run: never to the run just saved nor to any run a live session shows."""
    keep = (sessions.shown_folders() if sessions is not None else set()) | {Path(just_saved)}
    deleted = prune_outputs(settings.outputs, settings.outputs_max_gb * 1e9, settings.outputs_max_age_hours * 3600,
                            keep=keep)
    if deleted:
        logger.info("Deleted %d old run folder(s) (--outputs-max-gb / --outputs-max-age-hours)", len(deleted))


@contextlib.contextmanager
def guarded_job(sessions: "Sessions | None", request, doing: str):
    """A GPU handler's run: the session's stop event (Stop, or the client leaving, sets it; None without sessions),
    and every error turned into the client's message: a user's mistake, out of memory or a stop as it is, anything
    else through `client_error` (details in the server log, no server path on the page)."""
    session = getattr(request, "session_hash", None)
    stop = sessions.start_job(session) if sessions is not None else None
    try:
        yield stop
    except (ValueError, OutOfMemoryError, RunStopped) as err:
        raise _user_error(str(err)) from err
    except Exception as err:  # a bug or the machine: the details stay in the server log
        raise _user_error(client_error(err, doing)) from err
    finally:
        if sessions is not None:
            sessions.end_job(session, stop)


# The UI's handlers: module functions, bound to the pipeline and settings with functools.partial in `build_ui`
# (so a test can call them without a server). They only map widget values to `infer`/`save_run`/`decompose_layer`.
# `build_ui` also binds `sessions` (Stop, pruning) and `read_upload` (`readable_upload`: only uploads and examples
# may be read; a direct Python call is trusted and passes the image as it is), and Gradio passes `request`.
def decompose_handler(pipe, settings: Settings, run_info: dict[str, Any], image, original_size: bool = False, *,
                      sessions: "Sessions | None" = None, read_upload: Callable[[Any], Path] | None = None,
                      request=None, **params) -> tuple:
    """"Decompose": `params` are PARAMS values. Returns (*StackView, caption, seed, stack)."""
    import gradio as gr

    if image is None:
        raise _user_error("No image: upload an image (PNG, JPEG, WebP) first.")
    with guarded_job(sessions, request, "decomposing the image") as stop:
        if read_upload is not None:
            image = read_upload(image)
        result = infer(pipe, image, stop=stop, **params)
        paths = save_run(result, settings.outputs, run_info,
                         original_size=result.params["input_size"] if original_size else None)
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
                       caption=result.caption, seed=result.seed)
    return (*stack_view(stack), result.caption, result.seed, stack)


def decompose_layer_handler(pipe, settings: Settings, run_info: dict[str, Any], layer_number,
                            stack: LayerStack | None = None, *, sessions: "Sessions | None" = None, request=None,
                            **params) -> tuple:
    """"Decompose this layer" (1 = bottom): `params` are PARAMS values. Returns (*StackView, caption, seed, stack)."""
    import gradio as gr

    if stack is None:
        raise _user_error("No layers yet: decompose an image first, then select one of its layers in the gallery.")
    if layer_number is None:
        raise _user_error("No layer selected: click a layer in the gallery (or type its number, 1 = bottom).")
    with guarded_job(sessions, request, "decomposing the layer") as stop:
        new_stack, result = decompose_layer(pipe, stack, int(layer_number) - 1, run_info, stop=stop, **params)
    if message := export_failures_message(new_stack.files["failed"]):
        gr.Warning(message, duration=None)
    if sessions is not None:
        sessions.show(request.session_hash, new_stack.run_folder)
    prune_runs(settings, sessions, Path(new_stack.run_folder))
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
        check_stack_files(restored)
    except ValueError as err:
        raise _user_error(str(err)) from err
    return (*stack_view(restored), restored.caption, restored.seed, restored)


def stop_handler(sessions: "Sessions", request=None) -> None:
    """"Stop": the session's running job ends at its next step (Gradio's `cancels=` drops the event itself)."""
    sessions.stop(request.session_hash)


def end_session_handler(sessions: "Sessions", request=None) -> None:
    """The page closed or the client left (`demo.unload`): its job stops, its run folder may be pruned again."""
    sessions.end(request.session_hash)


def gradio_handler(handler: Callable, names: list[str], defaults: dict[str, Any], progress=None,
                   request: bool = False) -> Callable:
    """`handler(**values)` as Gradio calls it: positionally, one value per `inputs=` component, named `names`.

    Gradio reads the signature: its names are the API's parameter names, a None default makes a parameter
    without an initial widget value optional for gradio_client, and a `gr.Progress` default turns on the
    progress bar. Written here (not one hand-written signature per handler) so that PARAMS alone decides them.
    """
    import gradio as gr

    # (`is not None`: a gr.Progress is falsy, its len() is that of its tracked iterables, 0 before a run.)
    tracked = ["progress"] if progress is not None else []
    slots = list(names) + (["request"] if request else []) + tracked

    def call(*args):
        values = dict(zip(slots, args))
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

    from gradio.utils import get_upload_folder

    environment = environment or print_environment_info(print_it=False)
    run_info = run_info_for(pipe, environment)
    # The handlers' API names and defaults: PARAMS' (the prompts' None: an empty Textbox has no value).
    names = [p.name for p in PARAMS]
    defaults = {name: None if p.type is str and not DEFAULTS[name] else DEFAULTS[name] for name, p in PARAM.items()}
    shared = [name for name in names if name not in ("layers", "prompt")]  # "Decompose this layer" has its own two
    progress = gr.Progress(track_tqdm=True)  # the pipeline's tqdm steps become the page's progress bar
    sessions = Sessions()  # each session's shown run folder (pruning keeps it) and running job (Stop)
    examples = example_images()

    def read_upload(value) -> Path:  # the upload record lives on the Blocks, made below
        return readable_upload(value, demo.upload_file_set, get_upload_folder(), examples)

    decompose = gradio_handler(functools.partial(decompose_handler, pipe, settings, run_info, sessions=sessions,
                                                 read_upload=read_upload),
                               ["image", *names, "original_size"], dict(defaults, original_size=False), progress,
                               request=True)
    decompose_this_layer = gradio_handler(functools.partial(decompose_layer_handler, pipe, settings, run_info,
                                                            sessions=sessions),
                                          ["layer_number", "layers", "prompt", *shared, "stack"],
                                          dict(defaults, layers=SUB_RUN_LAYERS), progress, request=True)
    undo_last = gradio_handler(undo_handler, ["stack"], {})
    stop_job = gradio_handler(functools.partial(stop_handler, sessions), [], {}, request=True)
    end_session = gradio_handler(functools.partial(end_session_handler, sessions), [], {}, request=True)

    def select_layer(evt: gr.SelectData):
        return evt.index + 1  # the gallery counts from 0, its captions (and "Selected layer") from 1

    # delete_cache: Gradio deletes its own uploads and result copies on that schedule, and all of them at exit.
    with gr.Blocks(title="Qwen-Image-Layered studio", delete_cache=gradio_cache_schedule(settings)) as demo:
        gr.Markdown("# Qwen-Image-Layered studio\nSplit an image into editable RGBA layers.")
        if run_info.get("demo"):
            gr.Markdown(DEMO_BANNER)
        lossy = [name for name in run_info.get("optimizations", []) if "LOSSY" in name]
        if lossy:
            gr.Markdown(LOSSY_BANNER.format("; ".join(lossy)))
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Input image", type="filepath", image_mode=None)
                widgets = {"prompt": param_widget(gr, PARAM["prompt"], lines=2)}
                with gr.Accordion("Advanced settings", open=False):
                    widgets.update({p.name: param_widget(gr, p) for p in PARAMS if p.advanced})
                original_size = gr.Checkbox(label="Export at the input's original size (PPTX, PSD; the ZIP holds both sizes)",
                                            value=False)
                with gr.Row():
                    run = gr.Button("Decompose", variant="primary")
                    stop_button = gr.Button("Stop", variant="stop")
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
                comparison = gr.ImageSlider(label="Input | composite of the layers", type="pil", image_mode="RGBA",
                                            format="png", interactive=False)
                score_text = gr.Markdown()
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[image])
        stack = gr.State(None)  # the LayerStack the gallery shows and the downloads hold
        view = [gallery, *downloads]  # a StackView
        run_event = run.click(
            decompose,
            inputs=[image, *(widgets[name] for name in names), original_size],
            outputs=[*view, caption, used_seed, stack],
            api_name="decompose",
            concurrency_limit=1,  # one GPU job at a time; others wait in Gradio's queue
            concurrency_id="gpu",  # ... shared with "Decompose this layer"
            # The handler takes the raw values: Gradio's Image preprocess opens the upload with Pillow before the
            # handler runs, so a broken or huge file would fail there with a developer's message. Unprocessed,
            # the image arrives as Gradio's file value; Gradio checks its path only when the value carries its
            # `meta` key, so `readable_upload` checks it (uploads and examples only), then `to_rgba` decodes it with
            # the checks and messages above; `check_params` checks the numbers.
            preprocess=False,
        )
        run_event.success(lambda: None, outputs=layer_number, api_visibility="private"  # a new stack: nothing selected
                          ).success(functools.partial(recomposition_view, demo=bool(run_info.get("demo")),
                                                      read_upload=read_upload),
                                    inputs=[image, stack], outputs=[comparison, score_text], api_visibility="private",
                                    preprocess=False)
        gallery.select(select_layer, outputs=layer_number, api_visibility="private")
        layer_event = run_layer.click(
            decompose_this_layer,
            inputs=[layer_number, sub_layers, sub_prompt, *(widgets[name] for name in shared), stack],
            outputs=[*view, caption, used_seed, stack],
            api_name="decompose_layer",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        undo_button.click(undo_last, inputs=[stack], outputs=[*view, caption, used_seed, stack], api_name="undo")
        # Stop: Gradio cancels the event on the page; `stop_job` makes the pipeline itself stop at its next step
        # (a cancelled event's thread would otherwise run to the end). Not in the "gpu" queue: it must not wait.
        stop_button.click(stop_job, cancels=[run_event, layer_event], api_name="stop", concurrency_limit=None)
        demo.unload(end_session)  # a closed page or a vanished client stops its own job the same way
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
    warnings: list[str] = dataclasses.field(default_factory=list)  # input notes, exports that failed
    score: dict[str, Any] | None = None  # its `recomposition_score`, when it worked


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
            # The absolute path, as Ray's workers record it: `completed_images` (resume) matches on it.
            paths = save_run(result, outputs, dict(run_info or {}, input_file=str(Path(image).resolve())),
                             original_size=result.params["input_size"] if original_size else None)
        except (ValueError, OSError, Image.DecompressionBombError, OutOfMemoryError) as err:
            items.append(BatchItem(image, error=f"{type(err).__name__}: {err}"))
            tqdm.write(f"skipped {image}: {err}", file=sys.stderr)
            continue
        warnings = result.notes + [f"{key} export failed: {reason}" for key, reason in paths["failed"].items()]
        items.append(BatchItem(image, folder=paths["folder"], warnings=warnings, score=result.params["recomposition"]))
        tqdm.write(f"{image} -> {paths['folder']} (caption: {result.caption}); "
                   f"{score_line(result.params['recomposition'])}", file=sys.stderr)
        for warning in warnings:
            tqdm.write(f"  note: {warning}", file=sys.stderr)
    return items


def batch_summary(items: list[BatchItem]) -> str:
    """What `decompose` prints at the end: the recomposition PSNRs, the count, then each image that worked, then each
    that failed."""
    done = [item for item in items if item.error is None]
    failed = [item for item in items if item.error is not None]
    lines = [f"{len(done)} of {len(items)} images decomposed, {len(failed)} failed"]
    scored = [item for item in done if item.score]
    if scored:  # after the count line, before the list of run folders (which stays last)
        lines.append("recomposition PSNR: " + ", ".join(f"{item.image.name} {item.score['psnr_db']:.2f} dB"
                                                           for item in scored)
                     + f"; mean {np.mean([item.score['psnr_db'] for item in scored]):.2f} dB (params.json: recomposition)")
    for item in done:
        lines.append(f"  ok      {item.image} -> {item.folder}")
        lines += [f"          note: {warning}" for warning in item.warnings]
    lines += [f"  FAILED  {item.image}: {item.error}" for item in failed]
    return "\n".join(lines)


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill`, systemd, docker stop) stop the app the way Ctrl+C does: Gradio's launch then closes
    the server, and closing runs its delete_cache clean-up (uploads and result copies). Python's default for
    SIGTERM ends the process at once, leaving Gradio's cache behind."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def delete_gradio_files(demo) -> None:
    """After the server closed: delete the files this app put in Gradio's cache (uploads, result copies).

    Gradio does this in its server's shutdown, but it waits only 5 s for the server thread, and a client still
    connected (an open API client, a browser tab) holds uvicorn's shutdown past that: the process then ended first
    and the uploads stayed on disk. This runs Gradio's own clean-up function once more (files already gone are
    skipped; the example images it keeps for the page stay).
    """
    from gradio.route_utils import delete_files_created_by_app

    delete_files_created_by_app(demo, None)


# A library over a cluster: `decompose DIR --ray [ADDRESS]`. Each worker is a Ray actor holding one pipeline
# (one GPU each where the cluster has GPUs); `ray.util.ActorPool` gives each image to a free worker. A worker
# that dies is restarted by Ray, which retries the image it was on (max_restarts / max_task_retries): only that
# image is redone. Each image goes through `decompose_batch` (the local batch's own code) into a staging folder
# OUT/.incomplete/<hash>/ and is moved into OUT/ once written, so a run folder in OUT/ is always complete and a
# rerun skips the images that have one. Every node must see the images and OUT/ at the same paths (a shared
# file system), and this repository's src/ (PYTHONPATH is passed to the workers).
RAY_RETRIES = 3  # restarts of a worker that dies, and retries of the image it was on
INCOMPLETE_DIR = ".incomplete"  # under the outputs folder: images being written by a Ray worker


def import_ray():
    """Ray is optional: imported only for --ray."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray, which is not installed: pip install ray==2.60.0 "
                          "(or run without --ray: the local batch)") from None
    return ray


def run_folder_complete(folder: Path) -> bool:
    """True when `folder` holds everything `save_run` writes (its params.json says which files)."""
    try:
        params = json.loads((folder / "params.json").read_text(encoding="utf-8"))
        stem = export_stem(params["caption"], params["seed"])
        names = [layer_file_name(i) for i in range(params["layers"])] + ["composite.png"]
        failed = params.get("failed_exports") or {}  # an export that failed is not written (and never will be)
        names += [f"{stem}{export.suffix}" for export in EXPORTS if export.key not in failed]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() for name in names)


def completed_images(outputs: Path) -> dict[str, Path]:
    """input_file -> its complete run folder, for the run folders directly under `outputs`."""
    done = {}
    for folder in sorted(Path(outputs).glob("*/params.json")):
        if run_folder_complete(folder.parent):
            done[json.loads(folder.read_text(encoding="utf-8")).get("input_file")] = folder.parent
    return done


class RayDecomposeWorker:
    """One pipeline in a Ray actor (see `decompose_ray`); `worker_setup(pipe)` runs after loading (tests inject faults)."""

    def __init__(self, settings: Settings, worker_setup: Callable | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.pipe = load_pipeline(settings)
        self.run_info = run_info_for(self.pipe, print_environment_info(print_it=False))
        if worker_setup is not None:
            worker_setup(self.pipe)

    def decompose(self, image: str, outputs: str, original_size: bool, infer_kwargs: dict) -> BatchItem:
        import hashlib

        staging = Path(outputs) / INCOMPLETE_DIR / hashlib.sha256(image.encode()).hexdigest()[:16]
        shutil.rmtree(staging, ignore_errors=True)  # what a worker that died on this image left
        [item] = decompose_batch(self.pipe, [Path(image)], staging, self.run_info, original_size, **infer_kwargs)
        if item.folder is not None:
            item.folder = item.folder.rename(Path(outputs) / item.folder.name)
        shutil.rmtree(staging, ignore_errors=True)
        return item


def decompose_ray(images: list[Path], settings: Settings, address: str | None = None, workers: int | None = None,
                  original_size: bool = False, worker_setup: Callable | None = None,
                  **infer_kwargs) -> tuple[list[BatchItem], list[Path]]:
    """Decompose `images` on a Ray cluster into `settings.outputs`; returns (items run, images skipped as done)."""
    ray = import_ray()
    # 1. Resume: images with a complete run folder are skipped.
    outputs = Path(settings.outputs).resolve()
    done = completed_images(outputs)
    images = [Path(image).resolve() for image in images]
    skipped = [image for image in images if str(image) in done]
    todo = [image for image in images if str(image) not in done]
    if not todo:
        return [], skipped
    # 2. The cluster. The worker class is sent by reference to the module `app`, which the workers import from
    #    src/ (this file runs as `__main__` under `python src/app.py`).
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, include_dashboard=False)
    module = sys.modules["app"] if "app" in sys.modules else __import__("app")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = max(1, min(workers or gpus or 1, len(todo)))
    path = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {"PYTHONPATH": path}
    if not gpus:
        # Workers scheduled on CPUs stay there: Ray (2.60) leaves CUDA_VISIBLE_DEVICES alone for an actor that asks
        # for no GPU, so on a node with GPUs Ray did not count, each worker would load the model onto its cuda:0.
        env["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            logger.warning("Ray reports no GPU in its cluster while this machine has %d: its %d workers run on the "
                           "CPU (hours an image). Start Ray with its GPUs (`ray start --head --num-gpus N`) or drop "
                           "--ray to use this machine's GPU.", torch.cuda.device_count(), workers)
    actor = ray.remote(module.RayDecomposeWorker).options(
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES,
        runtime_env={"env_vars": env})
    settings = dataclasses.replace(settings, model=str(get_model_path(settings)), outputs=outputs)
    pool = ray.util.ActorPool([actor.remote(settings, worker_setup) for _ in range(workers)])
    # 3. One image per free worker; results in input order; a worker lost beyond its retries fails only its image.
    for image in todo:
        pool.submit(lambda worker, image: worker.decompose.remote(str(image), str(outputs), original_size, infer_kwargs),
                    image)
    items = []
    for image in todo:
        try:
            items.append(pool.get_next())
        except ray.exceptions.RayError as err:
            items.append(BatchItem(image, error=f"{type(err).__name__}: {str(err).splitlines()[0]}"))
    with contextlib.suppress(OSError):  # empty unless a worker was lost for good
        (outputs / INCOMPLETE_DIR).rmdir()
    if started_here:
        ray.shutdown()  # the workers' last log lines arrive before the summary
    return items, skipped


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


# `evaluate`: one row per ground truth and setting, in evaluate.csv; means per setting in evaluate.json.
EVAL_COLUMNS = ("ground_truth", "settings", "gt_layers", "pred_layers", "rgb_l1", "alpha_iou", "edit_cost", "merges",
                "recomposition_psnr_db", "recomposition_rgb_mae", "recomposition_alpha_error", "seconds", "error")
EVAL_MEANS = ("rgb_l1", "alpha_iou", "edit_cost", "merges", "recomposition_psnr_db", "seconds")


def parse_grid(items: list[str]) -> list[dict[str, Any]]:
    """`--grid` items `KEY=V1,V2` -> every combination, as {key: value} dicts; [{}] without a grid."""
    axes: dict[str, list] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in EVAL_GRID_KEYS or not values.strip():
            raise ValueError(f"--grid {item!r}: write KEY=V1,V2,... with KEY one of {', '.join(EVAL_GRID_KEYS)}")
        if key in axes:
            raise ValueError(f"--grid {item!r}: {key} is given twice; put all its values in one KEY=V1,V2,...")
        kind = PARAM[EVAL_GRID_KEYS[key]].type if EVAL_GRID_KEYS[key] else float
        try:
            axes[key] = [kind(value) for value in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid {item!r}: every value of {key} must be a {kind.__name__}") from None
        if key == "first_block_cache_threshold" and min(axes[key]) < 0:
            raise ValueError(f"--grid {item!r}: a FirstBlockCache threshold is 0 (off) or more")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def grid_label(combo: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in combo.items())


def set_first_block_cache(pipe, threshold: float) -> None:
    """Switch FirstBlockCache to `threshold` between runs (0: off), through diffusers' cache API."""
    from diffusers.hooks import FirstBlockCacheConfig

    if getattr(pipe, "_budget_stages", None) is not None:
        raise ValueError("--grid first_block_cache_threshold cannot switch the cache under --offload budget (the "
                         "low-VRAM engine wraps it): run one evaluate per threshold with --first-block-cache-threshold")
    if pipe.transformer._cache_config is not None:
        pipe.transformer.disable_cache()
    if threshold > 0:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def find_prediction(pred_dir: Path, ground_truth: Path, single: bool) -> Path:
    """The prediction for one ground truth in `--pred DIR`: DIR/<name>/ (PNG layers), DIR/<stem>.zip or .psd;
    with a single ground truth, DIR itself when it holds PNG layers."""
    pred_dir = Path(pred_dir)
    for candidate in (pred_dir / ground_truth.stem, pred_dir / ground_truth.name, pred_dir / f"{ground_truth.stem}.zip",
                      pred_dir / f"{ground_truth.stem}.psd"):
        if candidate.exists() and candidate.resolve() != ground_truth.resolve():
            return candidate
    if single and pred_dir.is_dir() and _layer_pngs(pred_dir):
        return pred_dir
    raise ValueError(f"no prediction for {ground_truth} in {pred_dir}: expected {ground_truth.stem}/ (PNG layers, "
                     f"bottom first), {ground_truth.stem}.zip or {ground_truth.stem}.psd")


def evaluation_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting (in order of first appearance): images scored, failed, and the mean of each EVAL_MEANS column."""
    summary = []
    for label in dict.fromkeys(row["settings"] for row in rows):
        done = [row for row in rows if row["settings"] == label and not row.get("error")]
        entry: dict[str, Any] = dict(settings=label, images=len(done),
                                     failed=sum(1 for row in rows if row["settings"] == label and row.get("error")))
        for column in EVAL_MEANS:
            values = [row[column] for row in done if row.get(column) is not None]
            entry[f"mean_{column}"] = float(np.mean(values)) if values else None
        summary.append(entry)
    return summary


def evaluation_table(summary: list[dict[str, Any]]) -> str:
    """The terminal table: one row per setting. Lower is better for L1 and edit cost; higher for IoU and PSNR."""
    head = f"{'settings':<40} {'images':>6} {'failed':>6} {'RGB L1':>8} {'IoU':>7} {'edit':>7} {'merges':>6} " \
           f"{'PSNR dB':>8} {'s/image':>8}"
    lines = [head, "-" * len(head)]

    def cell(value, width, digits):
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for entry in summary:
        lines.append(f"{entry['settings'][:40]:<40} {entry['images']:>6} {entry['failed']:>6} "
                     f"{cell(entry['mean_rgb_l1'], 8, 4)} {cell(entry['mean_alpha_iou'], 7, 4)} "
                     f"{cell(entry['mean_edit_cost'], 7, 4)} {cell(entry['mean_merges'], 6, 2)} "
                     f"{cell(entry['mean_recomposition_psnr_db'], 8, 2)} {cell(entry['mean_seconds'], 8, 2)}")
    return "\n".join(lines)


def write_evaluation(out: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> tuple[Path, Path]:
    """evaluate.csv (EVAL_COLUMNS, one row per ground truth and setting; an unreadable ground truth gets one row,
    settings "-", with its error) and evaluate.json (`info`, the summary per setting, the unreadable files and every
    row with its alignment path) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "evaluate.csv", out / "evaluate.json"
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EVAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    unreadable = [row for row in rows if row["settings"] == "-"]  # ground truth that could not be read
    report = dict(info, summary=evaluation_summary([row for row in rows if row not in unreadable]),
                  unreadable={row["ground_truth"]: row["error"] for row in unreadable}, rows=rows)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return csv_path, json_path


def evaluate_main(settings: Settings, ns: argparse.Namespace) -> int:
    """`app.py evaluate`: exit 0 when every ground truth was scored, 1 when any failed, 2 when nothing could run."""
    from tqdm.auto import tqdm

    # 1. Mistakes that would fail every image are caught before the model loads.
    truths = find_ground_truth(ns.ground_truth)
    if not truths:
        print(f"error: no ground truth in {' '.join(ns.ground_truth)}: pass PSDs, the studio's ZIPs or folders of "
              f"RGBA PNGs", file=sys.stderr)
        return 2
    # (A ValueError here ends `main` with its message and exit 2: `exits_with_message`.)
    if ns.max_merges < 0:
        raise ValueError(f"--max-merges {ns.max_merges} is negative: 0 scores without merges")
    if ns.pred is not None and ns.grid:
        raise ValueError("--grid varies how the model runs, --pred scores layers made without it: pass one")
    if ns.pred is not None and not Path(ns.pred).is_dir():
        raise ValueError(f"--pred {ns.pred} is not a folder")
    if Path(ns.out).exists() and not Path(ns.out).is_dir():
        raise ValueError(f"--out {ns.out} is a file: pass a folder (it is created if missing)")
    # The PARAMS values of each grid combination: the flags' (checked by their `type=`), then the grid's on top.
    base = {p.name: getattr(ns, p.name) for p in PARAMS}
    combos = parse_grid(ns.grid)
    settings_of = [dict(base, **{EVAL_GRID_KEYS[k]: v for k, v in combo.items() if EVAL_GRID_KEYS[k]})
                   for combo in combos]
    for values in settings_of:
        check_params(**dict(values, layers=values["layers"] or LAYERS_RANGE[0]))

    # 2. The ground truth, read once; a bad file is reported and skipped, the run goes on.
    layers_of: dict[Path, list[Image.Image]] = {}
    rows: list[dict[str, Any]] = []
    for path in truths:
        try:
            layers_of[path] = read_layered_file(path)
        except ValueError as err:
            rows.append(dict(ground_truth=str(path), settings="-", error=str(err)))
            print(f"skipped {path}: {err}", file=sys.stderr)
    info: dict[str, Any] = dict(arguments={k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                                           for k, v in vars(ns).items() if k != "auth"},
                                max_merges=ns.max_merges, group_top_layers=ns.group,
                                metrics="LayerD (github.com/CyberAgentAILab/LayerD, src/layerd/evaluation)",
                                psnr_cap_db=PSNR_CAP_DB)

    def score(path: Path, pred: list[Image.Image], label: str, seconds: float | None) -> dict[str, Any]:
        result = evaluate_layers(pred, layers_of[path], ns.max_merges, ns.group)
        return dict(ground_truth=str(path), settings=label, gt_layers=len(layers_of[path]), pred_layers=len(pred),
                    seconds=seconds, **result)

    # 3a. Layers made elsewhere: read and score, no model.
    if ns.pred is not None:
        info.update(pred=str(ns.pred), demo=None)
        for path in layers_of:
            try:
                pred = read_layered_file(find_prediction(ns.pred, path, single=len(truths) == 1))
                rows.append(score(path, pred, "pred", None))
            except ValueError as err:
                rows.append(dict(ground_truth=str(path), settings="pred", error=str(err)))
                print(f"skipped {path}: {err}", file=sys.stderr)
    # 3b. Decompose each flattened ground truth with every setting of the grid, the model loaded once.
    elif layers_of:
        environment = print_environment_info()
        pipe = load_pipeline(settings)  # ModelNotAvailableError & co.: exit 2 with the message (`exits_with_message`)
        info.update(run_info_for(pipe, environment))
        if pipe._studio_info["demo"]:
            print("DEMO MODEL in use: tiny random weights; its layers are noise, so its scores are poor by design.")
        pipe.set_progress_bar_config(desc="steps", position=1, leave=False)
        for combo, values in zip(combos, settings_of):
            label = grid_label(combo) if combo else \
                f"steps={ns.num_inference_steps} resolution={ns.resolution} seed={ns.seed}"
            if "first_block_cache_threshold" in combo:
                set_first_block_cache(pipe, combo["first_block_cache_threshold"])
            for path in tqdm(layers_of, desc=label, unit="image", position=0):
                gt = layers_of[path]
                layers = values["layers"] or min(max(len(gt), LAYERS_RANGE[0]), LAYERS_RANGE[1])
                try:
                    start = time.perf_counter()
                    result = infer(pipe, composite_layers(gt), **dict(values, layers=layers))
                    seconds = time.perf_counter() - start
                    export_layer_pngs(result.layers, Path(ns.out) / "pred" / safe_file_text(label) / path.stem)
                    rows.append(score(path, result.layers, label, seconds))
                except (ValueError, OutOfMemoryError) as err:
                    rows.append(dict(ground_truth=str(path), settings=label, error=str(err)))
                    tqdm.write(f"skipped {path} ({label}): {err}", file=sys.stderr)

    # 4. The files and the table.
    csv_path, json_path = write_evaluation(ns.out, rows, info)
    print(evaluation_table(evaluation_summary([row for row in rows if row["settings"] != "-"])))
    failed = [row for row in rows if row.get("error")]
    print(f"{len(rows) - len(failed)} scored, {len(failed)} failed; {csv_path}, {json_path}")
    return 1 if failed else 0


@exits_with_message
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command, settings, ns = parse_args(argv)
    if command == "ui" and network_warning(settings):
        logger.warning(network_warning(settings))
    if windows_path_warning(settings.outputs):
        logger.warning(windows_path_warning(settings.outputs))
    if command == "evaluate":
        return evaluate_main(settings, ns)
    if command == "decompose":
        # Mistakes that would fail every image are caught before the model loads.
        images = find_images(ns.images)
        if not images:
            print(f"error: no images in {' '.join(ns.images)}: pass image files, or folders holding "
                  f"{', '.join(IMAGE_SUFFIXES)} files", file=sys.stderr)
            return 2
        # (The parameters were checked by their flags' `type=`, from the same PARAMS table `infer` checks with.)
        infer_kwargs = {p.name: getattr(ns, p.name) for p in PARAMS}
        if ns.ray is not None:  # the library over a Ray cluster: this process only hands out images
            return main_ray(images, settings, ns, infer_kwargs)
    # Several GPUs: `--gpus N` starts the ranks (each runs this function again); torchrun starts them itself.
    if ns.gpus > 1 and "WORLD_SIZE" not in os.environ:
        check_gpus(ns.gpus, torch.cuda.device_count())  # ValueError: exit 2 with the message
        return launch_ranks(ns.gpus, list(sys.argv[1:] if argv is None else argv))
    parallel = init_distributed()
    if parallel is None or parallel.rank == 0:
        for partial in clean_partial_runs(settings.outputs):
            logger.info("Deleted %s: a run folder a stopped process left half-written", partial)
    environment = print_environment_info(print_it=parallel is None or parallel.rank == 0)
    if parallel is not None:  # rank 0 finds (or builds) the weights before the other ranks look
        if parallel.rank == 0:
            get_model_path(settings)
        torch.distributed.barrier(group=parallel.job_group)
    pipe = load_pipeline(settings)  # ModelNotAvailableError, check_machine_fits' (VRAM, RAM), plan_budget's: exit 2
    if parallel is not None:
        pipe._studio_info["optimizations"] += enable_multi_gpu(pipe, parallel)
        if parallel.rank != 0:  # the other ranks only follow rank 0's jobs
            serve_rank(pipe)
            stop_ranks(pipe)
            return 0
    if pipe._studio_info["demo"]:
        print("DEMO MODEL in use: tiny random weights; everything runs, but the layers are noise.")

    try:
        if command == "decompose":
            items = decompose_batch(pipe, images, settings.outputs, run_info_for(pipe, environment),
                                    original_size=ns.original_size, **infer_kwargs)
            print(batch_summary(items))
            return 1 if any(item.error for item in items) else 0

        demo = build_ui(pipe, settings, environment)
        print(f"Serving on http://{settings.host}:{settings.port}")
        stop_on_sigterm()
        demo.launch(**launch_options(settings))
        delete_gradio_files(demo)
        return 0
    finally:
        stop_ranks(pipe)


def main_ray(images: list[Path], settings: Settings, ns: argparse.Namespace, infer_kwargs: dict) -> int:
    """`decompose ... --ray [ADDRESS]`: the images over a Ray cluster, one summary at the end."""
    if ns.gpus > 1:
        raise ValueError("--ray and --gpus do not go together: Ray gives each worker one GPU of the cluster")
    try:
        import_ray()
    except ImportError as err:  # not a USER_ERRORS type: said here, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    get_model_path(settings)  # a missing model is said once, here, before any worker starts (exit 2)
    items, skipped = decompose_ray(images, settings, ns.ray, ns.ray_workers, ns.original_size, **infer_kwargs)
    if skipped:
        print(f"{len(skipped)} image(s) skipped: a complete run folder for each is already in {settings.outputs}")
    print(batch_summary(items))
    return 1 if any(item.error for item in items) else 0


if __name__ == "__main__":
    sys.exit(main())
