"""The low-VRAM engine's planning: pure arithmetic over sizes (GiB), no torch. How many transformer blocks
and text encoder layers stay on the GPU within a VRAM budget (`plan_budget`, `plan_text_encoder`), which weights are
page-locked within the host RAM (`plan_host_ram`), whether a machine fits a mode before anything loads
(`plan_machine`), and the advice a refusal gives. Measurements behind the figures: bench/RESULTS.md.
"""

import dataclasses
import math
from typing import Any

from studio.modes import OffloadMode
from studio.params import DEFAULTS, LAYERS_RANGE

GIB = 2**30  # sizes are in GiB, like torch's memory statistics

# `auto`'s thresholds. Everything on a GPU of at least this much VRAM (transformer 41 GB + text encoder 17 GB + VAE
# + activations); below the budget mode's minimum (`budget_minimum_gb`, from the weight files) "sequential". The
# figure below is that minimum for the real model, used where the files cannot be read.
FULL_RESIDENCY_VRAM_GB = 64
BUDGET_AUTO_MIN_VRAM_GB = 7.0
# Left free inside the budget: the allocator's cache above its allocated peak, the CUDA context (outside PyTorch's
# allocator) and some slack. 24 GB plans for a 21 GB peak.
BUDGET_SAFETY_MARGIN_GB = 3.0
# Transformer activations while denoising, per token (image + text) and fixed (latents, CFG's two predictions):
# fitted to the full-size model's measured peaks (bench/RESULTS.md, "Activations").
BUDGET_ACTIVATION_KB_PER_TOKEN = 116.0
BUDGET_ACTIVATION_FIXED_GB = 0.25


def image_tokens(layers: int, resolution: int) -> int:
    """Image tokens of one job: the layers plus two frames (input and composite), of 16 px patches at the bucket."""
    return (layers + 2) * (resolution // 16) ** 2


# Each job is planned for its own image tokens plus BUDGET_PLAN_TEXT_TOKENS prompt tokens (a 512-token caption and
# the template). The largest job the UI allows: 1024 bucket, 10 layers = layers + 2 frames of up to 4,320 tokens
# (64x64 at 1:1; the pipeline's rounding to 32 px reaches 216x20 at 11.3:1).
BUDGET_PLAN_IMAGE_TOKENS = (LAYERS_RANGE[1] + 2) * 4320
# The job `auto` and the loader's checks plan for: the model card's default (640 bucket, 4 layers). A larger job
# that does not fit the budget is refused when it starts, with what would fit.
BUDGET_DEFAULT_JOB_IMAGE_TOKENS = image_tokens(DEFAULTS["layers"], DEFAULTS["resolution"])
BUDGET_PLAN_TEXT_TOKENS = 600
# Streamed blocks on the GPU at once: the one computing and the next one arriving.
BUDGET_STREAM_BUFFERS = 2
# Text encoder activations beside its weights, the largest of its calls (issue 24, from the code): the prompt
# encoding (BUDGET_PLAN_TEXT_TOKENS = 600 tokens: full-vocabulary logits 0.17 GB in bf16, its 29 hidden states 0.12 GB,
# MLP temporaries 0.06 GB); the caption's prefill at the 1024 bucket (~1,470 tokens: MLP temporaries 0.16 GB, KV cache
# 0.08 GB), then the decoder's static KV cache (2,048 slots: 0.11 GB); the vision tower alone (4,900 patches: MLP
# temporaries 0.1 GB). Measured: the 16 GB split's caption peaked at 12.74 GB reserved beside 12.5 GB of weights
# (bench/results/caption_sequence_bf16_16.json).
BUDGET_TEXT_ENCODER_ACTIVATION_GB = 0.5
# Text encoder on cards where its 15.4 GB do not fit whole (16 and 12 GB): the caption's decode activations are
# small and steady, so it is planned with a smaller margin than denoising's.
BUDGET_TEXT_ENCODER_MARGIN_GB = 1.0
# Host RAM left to the OS, Python and Gradio beside the page-locked weight copies.
BUDGET_HOST_RAM_RESERVE_GB = 4.0
# With less RAM than the weights (32 GB machines) the weights copied least often stay views of the safetensors files,
# read through the OS page cache, which needs this much room of its own.
BUDGET_PAGE_CACHE_MIN_GB = 2.0
# Transformer calls of the default image (50 steps, two with true CFG): how often a streamed block is copied.
BUDGET_FORWARDS_PER_IMAGE = 100
# Beyond this many GB read from disk per image (~6 min at a desktop NVMe's 7 GB/s, more than `sequential` costs) the
# budget mode refuses a machine whose RAM is too small, with the figures, rather than run for hours.
BUDGET_MAX_DISK_READ_GB_PER_IMAGE = 2500.0


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

    split=False: the whole text encoder is resident, one stage (24 GB cards and up). split=True (16 and 12 GB cards):
    two phases. The vision tower runs first, alone (a stage of its own, entered when it is called and left when the
    language model starts); then the language model's stage: lm_head, the final norm and `resident_layers`, with the
    token-embedding table in host RAM (a lookup of one row per token). Where all the language layers fit (16 GB cards)
    nothing is copied per caption token and the caption decodes as CUDA graphs (`studio.caption`); where they do not
    (12 GB), the other layers stream in per token (`streamed_layers`). Under --quantization fp8_storage (LOSSY) the
    layers that would stream are stored in float8 instead and stay resident too (`fp8_layers`, cast to bf16 for their
    own forward): nothing is copied per token.
    """

    split: bool
    resident_layers: tuple[int, ...]  # in the loaded dtype (bf16)
    streamed_layers: tuple[int, ...]
    peak_gb: float  # predicted allocator peak while captioning / encoding the prompt (the larger phase)
    minimum_gb: float  # the smallest budget that holds this stage
    streamed_gb_per_token: float  # copied host -> GPU per decoded caption token
    fp8_layers: tuple[int, ...] = ()  # resident in float8 (fp8_storage only: LOSSY)

    @property
    def num_layers(self) -> int:
        return len(self.resident_layers) + len(self.streamed_layers) + len(self.fp8_layers)

    @property
    def decode_on_gpu(self) -> bool:
        """Every weight a decode step reads stays on the GPU, in bf16, at fixed addresses: CUDA graphs can replay it."""
        return not self.streamed_layers and not self.fp8_layers

    def describe(self) -> str:
        layers = self.num_layers
        if not self.split:
            return f"the whole text encoder resident ({layers}/{layers} language layers, one stage)"
        if self.decode_on_gpu:
            held = "all resident (nothing copied per caption token)"
        elif self.fp8_layers:
            held = f"{len(self.fp8_layers)} in float8 (LOSSY), all resident (nothing copied per caption token)"
        else:
            held = f"{len(self.streamed_layers)} streamed ({self.streamed_gb_per_token:.1f} GB copied per caption token)"
        return (f"{len(self.resident_layers)}/{layers} language layers resident, {held}; the vision tower runs "
                f"first, alone; token embeddings in host RAM")


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
    block_gbs: tuple[float, ...] | None = None,
    ram_only_blocks: tuple[int, ...] = (),
) -> BudgetPlan:
    """How many transformer blocks (and text encoder layers) stay on the GPU within `vram_budget_gb`. Pure
    arithmetic on sizes (GiB).

    Raises ValueError naming the minimum budget when not even one transformer block, or one language layer of the
    text encoder, fits beside the streamed ones. `resident_blocks` / `text_resident_layers` override the counts
    (tests, tuning). Without `text_num_layers` the text encoder is one piece that must be resident.
    `text_layer_fp8_gb` (fp8_storage's sizes only): a language layer stored in float8, for `plan_text_encoder`.
    `block_gbs` (the 8-bit modes' sizes, `studio.w8a8`): each block's own size where they differ (`block_gb` is then
    the largest: the streaming buffers and the minimum stay sized for it); `ram_only_blocks` is `plan_host_ram`'s.
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
    if block_gbs is not None:  # blocks of two sizes: as many as their own sizes leave room for
        count = max([c for c in range(count, num_blocks + 1) if fixed + resident_gb(block_gbs, c)
                     + (streaming if c < num_blocks else 0.0) <= vram_budget_gb], default=count)
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
        denoise_peak_gb=fixed - BUDGET_SAFETY_MARGIN_GB + (resident_gb(block_gbs, count) if block_gbs else count * block_gb)
        + (streaming if streamed else 0.0),
        text_encoder_peak_gb=text_encoder_peak,
        host_ram_gb=other_transformer_gb + (sum(block_gbs) if block_gbs else num_blocks * block_gb) + text_encoder_gb,
        text_encoder=text,
        minimum_gb=minimum,
    )


def resident_gb(block_gbs: tuple[float, ...], count: int) -> float:
    """The size of the `count` blocks that stay resident (`streamed_block_indices` picks the others), each its own."""
    streamed = set(streamed_block_indices(len(block_gbs), count))
    return sum(gb for index, gb in enumerate(block_gbs) if index not in streamed)


def each_block_gb(sizes: dict[str, Any]) -> tuple[float, ...]:
    """Each transformer block's size: `block_gbs` where the blocks differ (8-bit beside bf16), else `block_gb`."""
    return tuple(sizes.get("block_gbs") or (sizes["block_gb"],) * sizes["num_blocks"])


def plan_default_job(vram_gb: float, sizes: dict[str, Any]) -> BudgetPlan:
    """`plan_budget` for the default job (BUDGET_DEFAULT_JOB_IMAGE_TOKENS): what the loader's checks, the RAM plan
    and the refusals' advice plan with before loading."""
    return plan_budget(vram_gb, image_tokens=BUDGET_DEFAULT_JOB_IMAGE_TOKENS, **sizes)


def plan_text_encoder(vram_budget_gb: float, *, text_encoder_gb: float, layer_gb: float, num_layers: int,
                      vision_gb: float, embed_gb: float, vae_gb: float, resident_layers: int | None = None,
                      fp8_layer_gb: float = 0.0) -> TextEncoderPlan:
    """The caption stage within `vram_budget_gb` (GiB): the whole text encoder when it fits, else the two phases
    (see TextEncoderPlan) with as many language layers resident as fit. Pure; the caller raises on `minimum_gb`.

    In order: the whole text encoder (24 GB cards); the two phases with every language layer resident (16 GB cards:
    lm_head and 28 layers, 13.2 GB, beside the VAE and the activations, nothing copied per caption token); under
    fp8_storage (`fp8_layer_gb`, LOSSY: a layer in float8) as many bf16 layers as fit beside the others in float8,
    nothing streamed; else the exact bf16 split, whose streamed layers cost their bytes once per decoded token (a
    512-token caption: 512 copies), so as many stay as fit, spread like the transformer's (`streamed_block_indices`).
    `resident_layers` (tests, tuning) forces the two phases with that many bf16 layers resident.
    """
    margin = BUDGET_TEXT_ENCODER_MARGIN_GB
    whole = text_encoder_gb + vae_gb + BUDGET_TEXT_ENCODER_ACTIVATION_GB
    everything = tuple(range(num_layers))
    if num_layers == 0:  # sizes without the layer split (older callers): one piece, resident
        return TextEncoderPlan(False, everything, (), whole, whole + margin, 0.0)
    # Two phases: the vision tower alone, then lm_head, the final norm and the language layers (the embeddings stay in
    # host RAM); the larger phase is the stage's peak. Streaming adds two layers in flight.
    head = text_encoder_gb - num_layers * layer_gb - vision_gb - embed_gb
    vision = vision_gb + vae_gb + BUDGET_TEXT_ENCODER_ACTIVATION_GB
    base = head + vae_gb + BUDGET_TEXT_ENCODER_ACTIVATION_GB

    def peak(count: int) -> float:  # `count` bf16 layers resident, the others streamed
        return max(vision, base + count * layer_gb + (BUDGET_STREAM_BUFFERS * layer_gb if count < num_layers else 0.0))

    def peak_fp8(count: int) -> float:  # `count` bf16 layers, the others float8
        return max(vision, base + count * layer_gb + (num_layers - count) * fp8_layer_gb)

    minimum = min(whole, peak(1)) + margin
    if resident_layers is None and whole + margin <= vram_budget_gb:
        return TextEncoderPlan(False, everything, (), whole, minimum, 0.0)
    if resident_layers is None and peak(num_layers) + margin <= vram_budget_gb:  # exact, nothing copied per token
        return TextEncoderPlan(True, everything, (), peak(num_layers), minimum, 0.0)
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
    or the machine refused; see `fp8_storage_host_ram`. The 8-bit modes' `ram_only_blocks` (in `sizes`) are
    page-locked before any other block, or the machine refused: no file holds their weights either."""
    if not ram_gb > 0:  # NaN too
        raise ValueError(f"--ram-budget {ram_gb} GB: pass a positive number of GB (the host RAM the app may use)")
    blocks = range(sizes["num_blocks"])
    text = plan.text_encoder
    text_streamed = text.streamed_layers if text is not None and text.split else ()
    text_fp8 = text.fp8_layers if text is not None else ()  # float8 copies in RAM (fp8_storage): no file has them
    layer_gb, each = sizes.get("text_layer_gb", 0.0), each_block_gb(sizes)
    ram_only = tuple(sizes.get("ram_only_blocks", ()))  # 8-bit blocks: copies in RAM that no file has
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
    # 2. Then the blocks streamed at the default job (every call), the resident ones and the rest (once per image);
    #    8-bit blocks first, which exist only in RAM.
    ram_only_gb = sum(each[index] for index in ram_only)
    if ram_only_gb > left and not transformer_in_ram:
        raise ValueError(
            f"Not enough host RAM for the budget mode at {plan.vram_budget_gb:g} GB of VRAM: its {len(ram_only)} "
            f"transformer blocks in 8 bits are held in RAM ({ram_only_gb:.1f} GB; no file holds those copies), so it "
            f"needs at least {ram_gb - left + ram_only_gb:.1f} GB ({BUDGET_HOST_RAM_RESERVE_GB:g} GB for the system, "
            f"{BUDGET_PAGE_CACHE_MIN_GB:g} GB of page cache) and {ram_gb:.1f} GB is available.")
    pinned_blocks = []
    order = [*ram_only, *(i for i in [*plan.streamed_blocks, *plan.resident_blocks] if i not in ram_only)]
    for index in [] if transformer_in_ram else order:
        if each[index] <= left:
            pinned_blocks.append(index)
            left -= each[index]
    if transformer_in_ram:
        pinned_blocks, left = fp8_storage_host_ram(plan, sizes, ram_gb, left, text_pinned_gb)
    pin_rest = transformer_in_ram or sizes["other_transformer_gb"] <= left
    left -= sizes["other_transformer_gb"] if pin_rest else 0.0
    pin_text = text_rest_gb <= left
    # 3. What is read from the files per image: each copy of an unpinned weight, at worst from disk.
    file_streamed = set(plan.streamed_blocks) - set(pinned_blocks)
    streamed_gb = sum(each[index] for index in file_streamed)
    resident_file_gb = sum(each[index] for index in set(plan.resident_blocks) - set(pinned_blocks))
    file_gb = (streamed_gb + resident_file_gb + (0.0 if pin_rest else sizes["other_transformer_gb"])
               + (0.0 if pin_text else text_rest_gb))
    disk_gb = (streamed_gb * forwards + resident_file_gb
               + (0.0 if pin_rest else sizes["other_transformer_gb"]) + (0.0 if pin_text else text_rest_gb))
    if disk_gb > BUDGET_MAX_DISK_READ_GB_PER_IMAGE:
        raise ValueError(
            f"Not enough host RAM for the budget mode at {plan.vram_budget_gb:g} GB of VRAM: with {ram_gb:.1f} GB "
            f"available, {len(file_streamed)} of the {len(plan.streamed_blocks)} streamed transformer blocks would be read "
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
    1.3 GB/s), exact where its language layers all fit the card (24 and 16 GB). All its language layers in float8
    (12.2 GB -> 6.1 GB; with its bf16 rest 9.4 GB) would not fit RAM either (19.0 + 9.4 > 23.4) and would make every
    caption lossy. On a 12 GB card only the layers that would stream per caption token are float8
    (`plan_text_encoder`; `text_pinned_gb` counts them here, 18 layers 3.9 GB).
    """
    held = sum(each_block_gb(sizes)) + sizes["other_transformer_gb"]
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


def weights_gb(sizes: dict[str, Any]) -> float:
    """The transformer's and the text encoder's weights together (GiB), from `budget_sizes`."""
    return sizes["text_encoder_gb"] + sizes["other_transformer_gb"] + sum(each_block_gb(sizes))


def budget_minimum_gb(sizes: dict[str, Any], image_tokens: int = BUDGET_DEFAULT_JOB_IMAGE_TOKENS) -> float:
    """The smallest VRAM budget (GiB) in which the budget mode runs a job of `image_tokens` (default: the default job)."""
    return plan_budget(float("inf"), image_tokens=image_tokens, **sizes).minimum_gb


def check_host_ram(needed_gb: float, available_gb: float) -> None:
    """Raise before loading when host RAM cannot hold the weights (the offload modes other than budget keep them all
    in RAM; the budget mode below this reads part of them from the files: `plan_host_ram`)."""
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


@dataclasses.dataclass(frozen=True)
class MachinePlan:
    """What `plan_machine` decided before anything loads; the engine applies it as it is (planned once).

    `default` and `largest` are the budget mode's plans for the default job and the largest job that fits (the default
    one where the largest does not: a larger job is refused when it starts); `ram` which weights are page-locked.
    Other modes have only the figures. `hint`: a bf16 budget run that fits only by reading blocks from disk at every
    call is told the lossy option's figures (a log line at load; `auto` stays bf16)."""

    vram_gb: float
    ram_gb: float | None  # None: not checked (no GPU)
    sizes: dict[str, Any]  # the weights as they will be held (`budget_sizes_from_files` or `budget_sizes`)
    default: BudgetPlan | None = None
    largest: BudgetPlan | None = None
    largest_problem: str | None = None  # why the largest job does not fit (small cards)
    ram: HostRamPlan | None = None
    hint: str | None = None
    resident_blocks: int | None = None  # overrides of the counts for every job (tests, tuning)
    text_resident_layers: int | None = None

    def plan_for(self, image_tokens: int) -> BudgetPlan:
        """The budget plan of one job (its image tokens): as many blocks resident as its activations leave room for."""
        return plan_budget(self.vram_gb, image_tokens=image_tokens, resident_blocks=self.resident_blocks,
                           text_resident_layers=self.text_resident_layers, **self.sizes)


def plan_machine(offload: OffloadMode, sizes: dict[str, Any], vram_gb: float, ram_gb: float | None,
                 transformer_in_ram: bool = False, lossy_sizes: dict[str, Any] | None = None,
                 exact_sizes: dict[str, Any] | None = None, resident_blocks: int | None = None,
                 text_resident_layers: int | None = None, fast_sizes: dict[str, Any] | None = None) -> MachinePlan:
    """Before loading: the plan of an offload mode (its row's `vram` and `host_ram` uses, `studio.modes`) on a
    machine with `vram_gb` of VRAM and `ram_gb` of available host RAM (None: not checked, no GPU), or a ValueError
    naming the machine's figures and the mode that would fit. Pure arithmetic on `sizes` (`transformer_in_ram`:
    fp8_storage's float8 figures, held in RAM). `lossy_sizes`: the float8 figures of a bf16 run, for a refusal to say
    what the lossy option needs (`fp8_storage_advice`); `exact_sizes`: the bf16 figures of an fp8_storage run;
    `fast_sizes`: the Fast preset's figures of a bf16 run, for the refusal to say what it needs (`fast_advice`)."""
    all_gb = weights_gb(sizes)
    machine = f"This machine: {vram_gb:.1f} GB of VRAM, {ram_gb or 0:.1f} GB of RAM available."
    lossy_advice = fp8_storage_advice(lossy_sizes, vram_gb, ram_gb) + fast_advice(fast_sizes, vram_gb, ram_gb)
    # 1. Modes that keep every weight in RAM, and their VRAM.
    if offload.host_ram == "all" and ram_gb is not None:
        try:
            check_host_ram(all_gb, ram_gb)
        except ValueError as err:
            low_ram = budget_minimum_ram_gb(sizes, vram_gb)
            budget = (f"here it needs {low_ram:.1f} GB of RAM" if low_ram is not None
                      else f"it needs {budget_minimum_gb(sizes):.1f} GB of VRAM")
            raise ValueError(f"{machine} {err} (The budget mode: {budget}; the sequential mode ~1 GB of VRAM and "
                             f"all the weights in RAM.){lossy_advice}") from None
    largest_job = activation_gb(BUDGET_PLAN_IMAGE_TOKENS + BUDGET_PLAN_TEXT_TOKENS) + BUDGET_SAFETY_MARGIN_GB
    needs = {"everything": all_gb + sizes["vae_gb"] + largest_job,
             "largest_model": sizes["other_transformer_gb"] + sum(each_block_gb(sizes))
             + sizes["vae_gb"] + largest_job}
    if offload.vram in needs and vram_gb < needs[offload.vram]:
        fits = "budget" if vram_gb >= budget_minimum_gb(sizes) else "sequential"
        raise ValueError(f"--offload {offload.name} needs ~{needs[offload.vram]:.0f} GB of VRAM and this GPU has "
                         f"{vram_gb:.1f} GB: use --offload auto (here: {fits}).")
    if offload.vram != "planned":
        return MachinePlan(vram_gb, ram_gb, sizes)

    # 2. The budget mode: the default job's plan (raises naming the minimum and the fix), the largest job's, and
    #    which weights are page-locked in the RAM there is (less RAM than the weights: the rest read from the files).
    def plan(tokens: int) -> BudgetPlan:
        return plan_budget(vram_gb, image_tokens=tokens, resident_blocks=resident_blocks,
                           text_resident_layers=text_resident_layers, **sizes)

    try:
        default = plan(BUDGET_DEFAULT_JOB_IMAGE_TOKENS)
    except ValueError as err:
        raise ValueError(f"{err}{lossy_advice}") from None
    try:
        largest, largest_problem = plan(BUDGET_PLAN_IMAGE_TOKENS), None
    except ValueError as err:  # small cards: the default job fits, the largest is refused when it starts
        largest, largest_problem = default, str(err)
    try:
        ram = plan_host_ram(default, sizes, float("inf") if ram_gb is None else ram_gb,
                            transformer_in_ram=transformer_in_ram)
    except ValueError as err:
        exact = budget_minimum_ram_gb(exact_sizes, vram_gb) if exact_sizes else None
        raise ValueError(f"{machine} {err} {low_ram_advice(sizes, vram_gb, transformer_in_ram)}{lossy_advice}"
                         + (f" Without --quantization (bf16, exact) the budget mode leaves the transformer in its "
                            f"files and needs {exact:.1f} GB of RAM here." if exact is not None else "")) from None
    hint = None if transformer_in_ram or ram_gb is None else fp8_storage_hint(ram, sizes, lossy_sizes, vram_gb, ram_gb)
    return MachinePlan(vram_gb, ram_gb, sizes, default, largest, largest_problem, ram, hint, resident_blocks,
                       text_resident_layers)


def fp8_storage_hint(exact: HostRamPlan, sizes: dict[str, Any], lossy_sizes: dict[str, Any] | None, vram_gb: float,
                     ram_gb: float) -> str | None:
    """For a bf16 budget run (`exact`: its RAM plan) that fits only by reading transformer blocks from disk at every
    call (16 GB of VRAM with 32 GB of RAM: bench/RESULTS.md): the lossy option's figures where it fits and reads less.
    None where bf16 reads less than the weights' size per image."""
    if lossy_sizes is None or exact.disk_read_gb_per_image <= weights_gb(sizes):
        return None
    try:
        lossy = plan_host_ram(plan_default_job(vram_gb, lossy_sizes), lossy_sizes, ram_gb, transformer_in_ram=True)
    except ValueError:
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
    held = sum(each_block_gb(lossy_sizes)) + lossy_sizes["other_transformer_gb"]
    vram_needed = budget_minimum_gb(lossy_sizes)
    ram_needed = budget_minimum_ram_gb(lossy_sizes, max(vram_gb, vram_needed), fp8_storage=True)
    fits = vram_gb >= vram_needed and (ram_gb is None or ram_needed <= ram_gb)
    at = f"at {vram_gb:.1f} GB of VRAM" if vram_gb >= vram_needed else f"at {vram_needed:.1f} GB of VRAM"
    text = fp8_text_layers_note(lossy_sizes, max(vram_gb, vram_needed)) or "; the text encoder stays bf16"
    return (f" The lossy option, --quantization fp8_storage (LOSSY: the transformer stored in float8, {held:.1f} GB "
            f"held in RAM{text}), needs at least {vram_needed:.1f} GB of VRAM and, {at}, "
            f"{ram_needed:.1f} GB of RAM available: "
            + ("it fits this machine (pass --quantization fp8_storage)." if fits else "it does not fit this machine either."))


def fast_advice(fast_sizes: dict[str, Any] | None, vram_gb: float, ram_gb: float | None) -> str:
    """For a bf16 refusal: what the Fast preset (--preset fast, LOSSY: 8-bit matmuls in the blocks `ram_only_blocks`
    names, their weights at 1 byte and held in RAM; `fast_sizes`, its figures) needs on this machine in the budget
    mode, and whether it fits. "" without `fast_sizes`. With the real model's default blocks (12-47) it needs as much
    VRAM as bf16 (block 0 and the streaming buffers stay bf16-sized) and more RAM (no file holds the 8-bit blocks):
    a speed preset, which the advice says as it is; fp8_storage is the one that fits smaller machines."""
    if fast_sizes is None:
        return ""
    blocks = tuple(fast_sizes.get("ram_only_blocks", ()))
    each = each_block_gb(fast_sizes)
    named = f" ({blocks[0]}-{blocks[-1]})" if blocks and blocks == tuple(range(blocks[0], blocks[-1] + 1)) else ""
    vram_needed = budget_minimum_gb(fast_sizes)
    ram_needed = budget_minimum_ram_gb(fast_sizes, max(vram_gb, vram_needed))
    fits = vram_gb >= vram_needed and (ram_gb is None or ram_needed <= ram_gb)
    at = f"at {vram_gb:.1f} GB of VRAM" if vram_gb >= vram_needed else f"at {vram_needed:.1f} GB of VRAM"
    return (f" The Fast preset, --preset fast (LOSSY: 8-bit matmuls in {len(blocks)} of the {len(each)} transformer "
            f"blocks{named}, their weights at 1 byte, {sum(each[i] for i in blocks):.1f} GB held in RAM), needs at "
            f"least {vram_needed:.1f} GB of VRAM and, {at}, {ram_needed:.1f} GB of RAM available: "
            + ("it fits this machine (pass --preset fast)." if fits else "it does not fit this machine either."))
