"""Offload modes, quantization modes and presets as data: one row of capabilities each.

A new mode is its row here plus its own code (the function that applies it, registered where the modes are applied:
`OFFLOAD_APPLY` in src/app.py, `QUANT_APPLY` in studio/quant.py). Nothing else compares mode names: checks read the row.
Imports no torch.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class OffloadMode:
    """Where the weights live while a job runs."""

    name: str
    summary: str  # for --help and messages
    vram: str  # what must fit the GPU: "everything", "largest_model" (one component at a time), "planned" (the
    #            low-VRAM engine's plan), "one_layer" (accelerate streams every layer)
    host_ram: str  # "all": every weight held in RAM; "planned": what does not fit RAM is read from the files
    cpu: bool  # runs without CUDA as it is (budget: its hooks with every weight on the CPU); else "off" replaces it
    compile_problem: str | None = None  # why --compile cannot apply in this mode; None: it can
    caption_graphs_problem: str | None = None  # why the caption's decode cannot be replayed as CUDA graphs (it then
    #                                            goes through transformers' generate); None: `studio.caption`'s decoder


OFFLOAD_ROWS = (
    OffloadMode("off", "every weight on the GPU (~60 GB of VRAM)", vram="everything", host_ram="all", cpu=True),
    # model: accelerate's hook moves the whole text encoder in when it is called (the prefill) and out when the next
    # model is: the decode steps, which never call it, read resident weights at fixed addresses.
    OffloadMode("model", "whole components move to the GPU in turn (the 41 GB transformer must fit alone)",
                vram="largest_model", host_ram="all", cpu=False),
    OffloadMode("sequential", "accelerate streams every layer from the CPU (~1 GB of VRAM, ~12x slower per step)",
                vram="one_layer", host_ram="all", cpu=False,
                compile_problem="accelerate's hooks on every layer inside a block would break the compiled graph at "
                                "each weight copy",
                caption_graphs_problem="accelerate's hooks move the text encoder's weights inside its forward, which a "
                                       "CUDA graph cannot replay"),
    # budget: a graph is captured per caption, after the prefill has brought the weights in (24 GB: the whole text
    # encoder; 16 GB: its language phase, every layer resident). Where language layers stream per token (12 GB) or are
    # cast from float8 per call (fp8_storage), hooks run inside each step: the decoder runs its steps eagerly
    # (`caption.caption_graphs_problem` says so at load).
    OffloadMode("budget", "the low-VRAM engine: each stage has the GPU in turn, blocks that do not fit stream in "
                          "ahead of use", vram="planned", host_ram="planned", cpu=True),
)
OFFLOAD = {mode.name: mode for mode in OFFLOAD_ROWS}
# "auto" is not a mode: `resolve_offload_mode` picks one of the rows for the machine.
OFFLOAD_CHOICES = ("auto", *OFFLOAD)


@dataclasses.dataclass(frozen=True)
class QuantMode:
    """How the transformer's weights are stored and computed."""

    name: str  # the --quantization value; "bf16" is the default (no flag)
    summary: str
    lossy: bool  # the layers differ from the model's bf16 output: the page, params.json and the log say LOSSY
    storage_bytes: int | None  # bytes per transformer weight held; None: the loaded dtype's
    compute: str  # the matmuls' type: "bf16", "fp8" or "int8"
    min_capability: tuple[int, int] | None = None  # the GPU's compute capability it needs; None: any (the CPU too)
    package: str | None = None  # the package it needs beside the requirements
    offload_modes: tuple[str, ...] | None = None  # the offload modes it runs in; None: every one
    compile_problem: str | None = None  # why --compile cannot apply with it
    forces_compile: bool = False  # it pays only compiled: --compile is turned on with it
    holds_transformer_in_ram: bool = False  # its weights exist only in RAM (no file holds them): the planner pins all
    block_range: bool = False  # --quantized-blocks picks its blocks (the others stay bf16); their 8-bit weights exist
    #                            only in RAM, so the planner pins those blocks (`ram_only_blocks` in its sizes)
    runs_on_cpu: bool = False  # without CUDA it computes the same math through a reference matmul (the demo, the tests)


QUANT_ROWS = (
    QuantMode("bf16", "bf16 weights and compute: the model's own output", lossy=False, storage_bytes=None,
              compute="bf16"),
    QuantMode("fp8_storage", "transformer weights stored in float8, computed in bf16 (half the weight memory)",
              lossy=True, storage_bytes=1, compute="bf16", holds_transformer_in_ram=True,
              compile_problem="its casting hooks on every layer inside a block would be traced into the compiled "
                              "graph"),
    # torchao's dynamic quantization: it pays only compiled, and only with every weight resident (the budget engine
    # moves weights by their bytes and cannot move torchao's quantized tensors).
    QuantMode("fp8_dynamic", "transformer matmuls in float8 (torchao)", lossy=True, storage_bytes=1, compute="fp8",
              min_capability=(8, 9), package="torchao", offload_modes=("off",), forces_compile=True),
    QuantMode("int8_dynamic", "transformer matmuls in int8 (torchao)", lossy=True, storage_bytes=1, compute="int8",
              min_capability=(8, 0), package="torchao", offload_modes=("off",), forces_compile=True),
    # Our own 8-bit linears (`studio.w8a8`): plain 1-byte tensors the low-VRAM engine moves by their bytes, so they
    # run in every offload mode; the modulation and timestep linears (one row per image) stay bf16.
    QuantMode("int8_w8a8", "transformer blocks' matmuls in int8 (torch._int_mm), weights stored in 1 byte; "
                           "Ampere and Ada (RTX 30/40) have 4x the bf16 rate in int8", lossy=True, storage_bytes=1,
              compute="int8", min_capability=(8, 0), block_range=True, runs_on_cpu=True),
    QuantMode("fp8_w8a8", "transformer blocks' matmuls in float8 (row-wise torch._scaled_mm), weights stored in 1 "
                          "byte; Ada and Hopper", lossy=True, storage_bytes=1, compute="fp8", min_capability=(8, 9),
              block_range=True, runs_on_cpu=True),
)
QUANT = {mode.name: mode for mode in QUANT_ROWS}
BF16 = QUANT["bf16"]


def fast_mode_for(capability: tuple[int, int] | None) -> str | None:
    """The 8-bit mode of the Fast preset on a GPU of `capability` (None: no CUDA, the reference matmul on the CPU).

    int8 on Ampere and Ada (Ada GeForce: int8 4x the bf16 rate, fp8 2x); fp8 from Hopper on, where `_int_mm` was
    slower than bf16 (H100: 3.02 ms a block against 2.82 ms, shared/PERF_METHOD.md) and fp8 faster (1.90 ms).
    None below int8's compute capability: Fast then has no 8-bit mode.
    """
    if capability is None:
        return "int8_w8a8"
    if capability >= (9, 0):
        return "fp8_w8a8"
    return "int8_w8a8" if capability >= QUANT["int8_w8a8"].min_capability else None


@dataclasses.dataclass(frozen=True)
class Preset:
    """A choice a person makes by one name (`--preset`, the page). Explicit flags win over its settings."""

    name: str
    label: str  # the page's
    quantization: str | None  # None: bf16; FAST_QUANTIZATION: the card's 8-bit mode (`fast_mode_for`)
    quantized_blocks: str  # `--quantized-blocks` text
    first_block_cache_threshold: float  # FirstBlockCache on at this threshold
    lossy: bool


FAST_QUANTIZATION = "8-bit"  # in a Preset: the card's own 8-bit mode, `fast_mode_for`
PRESET_ROWS = (
    # Exact: bf16 weights and compute, the model's own output (FirstBlockCache at the seed's 0.1, as without a preset).
    Preset("exact", "Exact (bf16)", None, "default", 0.1, lossy=False),
    # Fast: 8-bit matmuls in the middle blocks (the first and last fifth bf16) and FirstBlockCache at the seed's 0.1.
    # SageAttention stays its own opt-in flag: pip's package is too old for diffusers (`studio.w8a8`).
    Preset("fast", "Fast (8-bit, lossy)", FAST_QUANTIZATION, "default", 0.1, lossy=True),
)
PRESETS = {preset.name: preset for preset in PRESET_ROWS}


def quant_mode(name: str | None) -> QuantMode:
    """The row of a --quantization value (None: bf16); a ValueError names the value and the choices."""
    if name is None:
        return BF16
    if name not in QUANT:
        raise ValueError(f"--quantization {name!r} is not one of {', '.join(QUANT)}")
    return QUANT[name]


def offload_mode(name: str) -> OffloadMode:
    """The row of a concrete offload mode (not "auto"); a ValueError names the value and the choices."""
    if name not in OFFLOAD:
        raise ValueError(f"offload mode {name!r} is not one of {', '.join(OFFLOAD)}")
    return OFFLOAD[name]
