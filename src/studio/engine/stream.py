"""The low-VRAM engine's moving parts: page-locked host copies, diffusers' group-offloading hooks on the
streamed blocks and text encoder layers, and the stages (text encoder, transformer, VAE) that take the GPU in turn.
"""

import contextlib
import functools
import itertools
import logging
import weakref
from collections.abc import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.group_offloading import (
    _GROUP_OFFLOADING,
    GroupOffloadingConfig,
    GroupOffloadingHook,
    GroupOffloadingType,
    ModuleGroup,
)

from studio.engine.memory import budget_sizes, release_freed_heap, text_encoder_parts
from studio.engine.plan import BUDGET_PLAN_IMAGE_TOKENS, GIB, BudgetPlan, MachinePlan, TextEncoderPlan, plan_machine
from studio.modes import BF16, OFFLOAD, QuantMode
from studio.params import DEFAULTS, LAYERS_RANGE, RESOLUTIONS
from studio.quant import apply_fp8_text_layers, fp8_text_layer_gb
from studio.w8a8 import quantized_blocks_of

logger = logging.getLogger(__name__)


# A decomposition runs in stages, and each stage has the GPU to itself:
#   "text_encoder"  caption + prompt encoding with all 8.3B weights resident (16.6 GB: they fit a 24 GB card);
#                   on 16 and 12 GB cards split in two phases (`TextEncoderPlan`): "text_vision", the vision tower
#                   alone for its one call per caption, then "text_encoder", the language model with as many layers
#                   resident as fit (all of them at 16 GB; at 12 GB the others streamed per token through the same
#                   hooks as the blocks), the token embeddings looked up in host RAM;
#   "transformer"   as many of the 60 blocks resident as the budget holds after this job's activations; each
#                   other block is copied in on a side CUDA stream while the blocks before it compute (diffusers'
#                   group offloading ModuleGroup + GroupOffloadingHook, one block per group, chained in block
#                   order). Measured at a 24 GB cap (H100): 28 of 60 resident at 640 px / 4 layers, 1.04x the
#                   all-resident forward, bitwise equal output;
#   "vae"           encode and decode (the VAE's 0.25 GB stay on the GPU throughout).
# Off the GPU, each model's weights live in one page-locked host buffer: entering a stage is one copy at PCIe
# speed, leaving it is free (the GPU copy is dropped; the host copy never changes).
# FirstBlockCache's hooks wrap ours: a step it skips never calls the later blocks, so none of their weights
# move (bench/results/h100_24gb.json counted block calls and bytes moved).
_PAGE_BYTES = 4096  # cudaHostRegister locks whole pages
_TENSOR_ALIGN_BYTES = 512  # each tensor starts aligned inside the host buffer: full-speed copies, any dtype
_START_STREAMING_HOOK = "budget_start_streaming"


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


class BudgetStages:
    """Which stage's weights are on the GPU, and which transformer blocks stream for the job at hand.

    `enter(stage)` switches stages; the transformer's stage is planned per job (its image tokens), so a 640 px
    job keeps more blocks resident than the largest one. `release()` sends everything back and empties the GPU.
    """

    def __init__(self, device: torch.device, machine: MachinePlan, weights: dict[str, list],
                 block_weights: list[list], hooks: dict, start_hook, stream: "torch.cuda.Stream | None"):
        self.device = device
        self.machine = machine  # the plan made before loading; `machine.plan_for(image tokens)` plans a job
        self.weights = weights  # "transformer" (all but its blocks), "text_encoder": [(tensor, host copy)]
        self.block_weights = block_weights  # per transformer block: [(tensor, host copy)]
        self.hooks = hooks  # block index (1 on) -> its group-offloading hook
        self.start_hook = start_hook
        self.stream = stream
        self.plan: BudgetPlan | None = None  # the current job's split
        self.current: str | None = None
        self.stage_bytes = 0  # copied to the GPU by stage changes so far (for logs and the benchmark)
        self.removers: list[Callable[[], None]] = []  # what `disable_budget_offload` runs

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
            self.plan = self.machine.plan_for(image_tokens)
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
    index: hook}, start hook); which transformer blocks stream is set per job by `BudgetStages._split`, the text
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
                               stream: "torch.cuda.Stream | None") -> tuple[list[torch.nn.Module], set[int], set[int], list]:
    """The text encoder where it does not fit whole (16 and 12 GB cards; `TextEncoderPlan`): the streamed language
    layers (12 GB) get the same groups and hooks as the streamed transformer blocks (`install_block_hooks`), chained
    once (the split does not depend on the job), layer 0 (always resident) starting the copies; the token-embedding
    table is looked up in host RAM, one row per token. Returns (the modules that got group hooks, ids of the vision
    tower's weights: its own stage, ids of the weights that enter with no stage, removers of the embedding's hooks).
    The vision tower's patch_embed (3 MB) enters with the language stage too: transformers' generate() takes the
    model's device from its first parameter."""
    host = torch.device("cpu")
    layers, vision, embed = text_encoder_parts(text_encoder)
    hooked: list[torch.nn.Module] = []
    if plan.streamed_layers:  # no hook at all on a layer that stays: the caption's CUDA graphs need hook-free steps
        exclude = ("past_key_values", "past_key_value")  # the KV cache is updated in place
        hooks, start_hook = install_block_hooks(layers, device, stream, indices=plan.streamed_layers, start_at=0,
                                                group_id="text_encoder.layers", exclude_kwargs=exclude)
        chain_streamed(list(hooks.values()), start_hook)
        hooked = list(layers)
    removers = [embed.register_forward_pre_hook(lambda module, args: tuple(a.to(host) if torch.is_tensor(a) else a
                                                                           for a in args)).remove,
                embed.register_forward_hook(lambda module, args, output: output.to(device)).remove]
    vision_ids = _tensor_ids(vision)
    off_stage = _tensor_ids(embed, *(layers[i] for i in plan.streamed_layers))
    return hooked, vision_ids, off_stage, removers


def _tensor_ids(*modules: torch.nn.Module) -> set[int]:
    return {id(t) for m in modules for t in itertools.chain(m.parameters(), m.buffers())}


def install_stage_hooks(pipe, stages: BudgetStages, split_text_encoder: bool = False) -> None:
    """Each model, when called, first brings its stage's weights to the GPU and sends the others back
    (forward pre-hooks; the text encoder's `generate` too). Their removal goes to `stages.removers`.
    `split_text_encoder`: the text encoder's two phases, entered by its vision tower and its language model (a hook
    on the text encoder itself would bring the language layers in before the vision tower runs)."""
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae
    _, vision, _ = text_encoder_parts(text_encoder)

    def enter_transformer(module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        stages.enter("transformer", image_tokens=hidden_states.shape[1])

    stages.removers.append(transformer.register_forward_pre_hook(enter_transformer, with_kwargs=True).remove)
    text_stages = (((vision, "text_vision"), (text_encoder.model.language_model, "text_encoder")) if split_text_encoder
                   else ((text_encoder, "text_encoder"),))
    for module, stage in (*text_stages, (vae.encoder, "vae"), (vae.decoder, "vae")):
        handle = module.register_forward_pre_hook(lambda module, args, stage=stage: stages.enter(stage))
        stages.removers.append(handle.remove)
    # transformers' generate() reads the model's device before its first forward: the weights must be on the GPU
    # when generate starts (a caption's prefill starts with the vision tower).
    generate = text_encoder.generate

    @functools.wraps(generate)
    def generate_on_gpu(*args, **kwargs):
        stages.enter("text_vision" if split_text_encoder and kwargs.get("pixel_values") is not None else "text_encoder")
        return generate(*args, **kwargs)

    text_encoder.generate = generate_on_gpu
    stages.removers.append(lambda: delattr(text_encoder, "generate"))


def plan_loaded(pipe, vram_budget_gb: float, host_ram_gb: float | None = None, resident_blocks: int | None = None,
                text_resident_layers: int | None = None, text_layer_fp8_gb: float | None = None,
                quant: QuantMode = BF16) -> MachinePlan:
    """The budget mode's plan for a pipeline already in memory (a bench's, or a test's), from its modules' sizes;
    `load_pipeline` plans from the weight files instead, before loading. `resident_blocks` fixes the number of resident
    transformer blocks for every job (tests, tuning); `text_resident_layers` splits the text encoder with that many
    language layers resident; `host_ram_gb` None: every weight page-locked. `quant`: the mode it was loaded in
    (`Loaded.quant`), never guessed from the weights' dtypes (fp8_w8a8's are float8 too, and its text encoder stays
    bf16): fp8_storage's float8 language layer (`text_layer_fp8_gb`, by default `quant.fp8_text_layer_gb`) and its
    transformer held in RAM; the 8-bit modes' blocks held in RAM (`ram_only_blocks`)."""
    if text_layer_fp8_gb is None and quant.holds_transformer_in_ram:  # fp8_storage
        text_layer_fp8_gb = fp8_text_layer_gb(text_encoder_parts(pipe.text_encoder)[0][0])
    sizes = budget_sizes(pipe.transformer, pipe.text_encoder, pipe.vae, text_layer_fp8_gb)
    if quant.block_range:  # int8_w8a8, fp8_w8a8: no file holds their 8-bit blocks
        sizes["ram_only_blocks"] = tuple(quantized_blocks_of(pipe.transformer))
    return plan_machine(OFFLOAD["budget"], sizes, vram_budget_gb, host_ram_gb,
                        transformer_in_ram=text_layer_fp8_gb is not None, resident_blocks=resident_blocks,
                        text_resident_layers=text_resident_layers)


def enable_budget_offload(pipe, machine: MachinePlan) -> tuple[BudgetStages, list[str]]:
    """Offload mode "budget" (see the comment above), as `machine` (`plan_machine`) planned it. Returns the stages
    (what `release_budget_vram` and `disable_budget_offload` take) and what was applied, by name.

    Without CUDA the same hooks run with every weight on the CPU: nothing moves and the outputs equal "off"
    (tests/test_budget_offload.py checks this on the demo pipeline). Weight storage (fp8) goes first, and
    FirstBlockCache, if enabled before, is put back outside our hooks.
    """
    transformer, text_encoder, vae = pipe.transformer, pipe.text_encoder, pipe.vae
    blocks = transformer.transformer_blocks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"

    # 1. The plan, made before anything moved: the default job's, the largest job's (the default one on small cards,
    #    where the largest is refused when it starts) and the host RAM's.
    default, largest, ram = machine.default, machine.largest, machine.ram
    if machine.largest_problem:
        logger.warning("Low-VRAM engine: the largest job (%d px, %d layers) will not fit: %s", RESOLUTIONS[-1],
                       LAYERS_RANGE[1], machine.largest_problem)
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
    transformer_pin = text_encoder_pin = None
    if ram.low_ram:
        layers = text_encoder_parts(text_encoder)[0]
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

    # 4b. The text encoder where it does not fit whole (16 and 12 GB cards): its vision tower a stage of its own, the
    #     same hooks on its streamed language layers, its embeddings in host RAM. The split does not depend on the job.
    vision_ids: set[int] = set()  # the vision tower's weights: the "text_vision" stage
    off_stage: set[int] = set()  # ids of text encoder weights that enter with no stage
    removers: list[Callable[[], None]] = []
    if text_plan.split:
        text_modules, vision_ids, off_stage, removers = install_text_encoder_hooks(text_encoder, text_plan, device,
                                                                                   stream)
        hooked += text_modules
    language_ids = _tensor_ids(text_encoder_parts(text_encoder)[1].patch_embed)  # in both phases: see the function

    # 5. Stages: each model, when called, first brings its stage's weights to the GPU and sends the others back.
    block_ids = [{id(t) for t in itertools.chain(b.parameters(), b.buffers())} for b in blocks]
    in_blocks = set().union(*block_ids)
    stages = BudgetStages(
        device, machine,
        {"transformer": [pair for pair in transformer_weights if id(pair[0]) not in in_blocks],
         "text_encoder": [pair for pair in text_encoder_weights
                          if id(pair[0]) not in off_stage and (id(pair[0]) not in vision_ids or id(pair[0]) in language_ids)],
         "text_vision": [pair for pair in text_encoder_weights if id(pair[0]) in vision_ids],
         "text_encoder_streamed": [pair for pair in text_encoder_weights if id(pair[0]) in off_stage]},  # never a stage
        [[pair for pair in transformer_weights if id(pair[0]) in ids] for ids in block_ids],
        hooks, start_hook, stream)
    install_stage_hooks(pipe, stages, split_text_encoder=text_plan.split)
    stages.removers += removers
    for module in hooked:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        stages.removers.append(functools.partial(registry.remove_hook, _GROUP_OFFLOADING, recurse=False))
        stages.removers.append(functools.partial(registry.remove_hook, _START_STREAMING_HOOK, recurse=False))

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
    return stages, applied


def disable_budget_offload(stages: BudgetStages) -> None:
    """Undo `enable_budget_offload`: hooks off, weights left in their host copies (on the CPU)."""
    stages.release()
    for remove in stages.removers:
        remove()
