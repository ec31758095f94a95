"""torch.compile of the transformer blocks (regional: each block's own forward, before any hook) and its
on-disk caches; the caption decode's static cache and compiled step.
"""

import logging
import os
import stat
from pathlib import Path
from typing import Any

import torch

from studio.modes import OffloadMode, QuantMode

logger = logging.getLogger(__name__)


COMPILE_OPTIONS = dict(fullgraph=True, dynamic=True)
# One static cache length for every caption (prompt with image tokens, ~1,400 at 1024 px, + 512 new tokens): every
# image shape then shares one compiled graph. 2048 tokens of KV cache cost 0.1 GB; a longer prompt grows it (recompiles).
CAPTION_CACHE_TOKENS = 2048
CAPTION_COMPILE_OPTIONS = dict(mode="reduce-overhead", fullgraph=False, dynamic=False)


def compile_problem(offload: OffloadMode, quant: QuantMode) -> str | None:
    """Why the transformer blocks cannot be compiled with these modes (None: they can), from their rows."""
    if offload.compile_problem:
        return f"--compile does not apply with --offload {offload.name}: {offload.compile_problem}"
    if quant.compile_problem:
        return f"--compile does not apply with --quantization {quant.name}: {quant.compile_problem}"
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


def compile_cache_problem() -> str | None:
    """Why the compile caches (TORCHINDUCTOR_CACHE_DIR and the mega-cache file in it) must not be read: loading them
    unpickles graphs and runs their kernels, so a folder or file that another user can write (or owns) would run their
    code in this process. None when they are this user's alone (or on Windows, where ACLs, not mode bits, decide)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is None:
        return None
    for path in (Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]), compile_cache_file()):
        try:
            info = path.stat()
        except OSError:
            continue  # not there yet: nothing to read
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} is writable by other users (mode {stat.filemode(info.st_mode)})"
        if info.st_uid != uid:
            return f"{path} belongs to another user (uid {info.st_uid})"
    return None


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
    if problem := compile_cache_problem():
        import torch._inductor.config

        torch._inductor.config.force_disable_caches = True  # Inductor's own caches in that folder are not read either
        logger.warning("Compile caches not used: %s, and loading them runs their code. Compiling without them; make "
                       "the folder this user's alone (chmod -R go-w, chown) or delete it.", problem)
        return False
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
    if artifacts is None or not artifacts[0] or compile_cache_problem():
        return None
    path = compile_cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a start cut while writing leaves no half file to load
    partial.write_bytes(artifacts[0])
    partial.replace(path)
    return path


def caption_compile_problem(offload: OffloadMode, on_cuda: bool, triton: bool) -> str | None:
    """Why the caption's decode is not compiled with these settings (None: it is; ENABLE_CAPTION_COMPILE).
    `triton`: whether Triton is installed (torch.compile's GPU kernels are Triton kernels)."""
    if not on_cuda:
        return "caption decode not compiled: its CUDA graphs need a CUDA GPU (the CPU decodes eagerly)"
    if not triton:
        return ("caption decode not compiled: torch.compile's GPU kernels need Triton, which is not installed "
                "(pip install triton; on Windows pip install triton-windows)")
    if offload.caption_graphs_problem:
        return f"caption decode not compiled with --offload {offload.name}: {offload.caption_graphs_problem}"
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
