"""What the weights and the machine measure: the sizes the planner takes (from loaded modules or from the
weight files' headers), the host RAM available (cgroup-aware), and giving freed heap back to the system.
"""

import collections
import itertools
import math
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from studio.engine.plan import GIB


def budget_sizes(transformer: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module,
                 text_layer_fp8_gb: float | None = None) -> dict[str, Any]:
    """The sizes `plan_budget` takes (GiB), from loaded models. `text_layer_fp8_gb` (fp8_storage: a language layer
    in float8, `quant.fp8_text_layer_gb`) is passed on to the planner. A text encoder some of whose layers are float8
    already (a re-plan) counts them at their bf16 size: the plan's own."""
    blocks = transformer.transformer_blocks
    layers, vision, embed = text_encoder_parts(text_encoder)
    layer_gb = max(module_gb(layer) for layer in layers)
    saved_by_fp8 = sum(layer_gb - module_gb(layer) for layer in layers)
    block_gbs = [module_gb(block) for block in blocks]
    sizes = dict(block_gb=max(block_gbs), num_blocks=len(blocks),
                 other_transformer_gb=module_gb(transformer) - module_gb(*blocks),
                 text_encoder_gb=module_gb(text_encoder) + saved_by_fp8, vae_gb=module_gb(vae),
                 text_layer_gb=layer_gb, text_num_layers=len(layers),
                 text_vision_gb=module_gb(vision), text_embed_gb=module_gb(embed), **_each_block(block_gbs))
    return sizes if text_layer_fp8_gb is None else dict(sizes, text_layer_fp8_gb=text_layer_fp8_gb)


def _each_block(block_gbs: list[float]) -> dict[str, Any]:
    """{"block_gbs": each block's size} where the blocks differ (8-bit blocks beside bf16 ones: `studio.w8a8`), for
    the planner; {} where they are all alike (`block_gb` says it)."""
    return dict(block_gbs=tuple(block_gbs)) if len(set(block_gbs)) > 1 else {}


def budget_sizes_from_files(model_path: Path | str, element_size: int,
                            stored: dict[str, int] | None = None) -> dict[str, Any] | None:
    """The same sizes read from the safetensors headers of a diffusers folder (no weights loaded), for weights held
    in a dtype of `element_size` bytes; `stored`: the transformer weights held in another, {name: bytes per element}
    (fp8_storage: `fp8_storage_element_sizes`; the 8-bit modes: `w8a8_element_sizes`). None when a model's files are
    missing (the loader will say so)."""
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
    count = sum(1 for key in numels["transformer"] if key.startswith("block"))
    blocks = [numels["transformer"][f"block{i}"] for i in range(count)]  # in block order (`block_gbs`)
    layers = [v for k, v in numels["text_encoder"].items() if k.startswith("layer")]
    if not blocks or not layers:  # not the Qwen-Image layout: nothing to plan from (the loader says what is wrong)
        return None
    return dict(block_gb=max(blocks) * gb, num_blocks=len(blocks), other_transformer_gb=numels["transformer"]["other"] * gb,
                text_encoder_gb=sum(numels["text_encoder"].values()) * gb, vae_gb=numels["vae"]["vae"] * gb,
                text_layer_gb=max(layers) * gb, text_num_layers=len(layers),
                text_vision_gb=numels["text_encoder"]["vision"] * gb, text_embed_gb=numels["text_encoder"]["embed"] * gb,
                **_each_block([block * gb for block in blocks]))


def text_encoder_parts(text_encoder: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module, torch.nn.Module]:
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


def module_gb(*modules: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for m in modules for t in itertools.chain(m.parameters(), m.buffers())) / GIB


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
