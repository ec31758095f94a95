"""Weight storage and quantized compute (all LOSSY, all opt-in): fp8_storage (float8 weights, bf16 compute;
`apply_fp8_storage`, and the text encoder's float8 layers on 12 GB cards), torchao's fp8/int8 dynamic compute, our
own 8-bit linears in the chosen blocks (int8_w8a8 / fp8_w8a8, `studio.w8a8`: every offload mode, the Fast preset),
and the sizes the planner needs for them before loading (from the weight files and a meta-device build).
"""

import itertools
import logging
from pathlib import Path
from typing import Any

import torch

from studio.engine.memory import module_gb, text_encoder_parts, budget_sizes_from_files, release_freed_heap
from studio.modes import QUANT, OffloadMode, QuantMode
from studio.w8a8 import meta_transformer, parse_block_range, quantize_blocks, w8a8_element_sizes, w8a8_record

logger = logging.getLogger(__name__)


def quant_problem(mode: QuantMode, offload: OffloadMode, capability: tuple[int, int] | None,
                  package_installed: bool) -> str | None:
    """Why `mode` cannot run here (None: it can), from its row. `capability` is the GPU's, None without CUDA."""
    flag = f"--quantization {mode.name}"
    if mode.min_capability is not None and capability is None and not mode.runs_on_cpu:
        return f"{flag} needs a CUDA GPU and this machine has none"
    if mode.min_capability is not None and capability is not None and capability < mode.min_capability:
        need = ".".join(map(str, mode.min_capability))
        other = QUANT["int8_w8a8"]
        instead = (f" (--quantization {other.name} runs on it)" if mode.block_range and mode is not other
                   and capability >= other.min_capability else "")
        return (f"{flag} needs a GPU of compute capability {need} or newer for its {mode.compute} matmuls; this one "
                f"is {capability[0]}.{capability[1]}{instead}")
    if mode.package is not None and not package_installed:
        return f"{flag} needs the {mode.package} package (pip install {mode.package}), which is not installed"
    if mode.offload_modes is not None and offload.name not in mode.offload_modes:
        return (f"{flag} runs only with --offload {' or '.join(mode.offload_modes)} (now: {offload.name}): the offload "
                f"hooks move weights by their bytes and cannot move torchao's quantized tensors")
    return None


def _torchao_linear_filter(module: torch.nn.Module, name: str) -> bool:
    """The transformer blocks' attention and feed-forward linears (one row per token). The modulation and timestep
    linears see one row per image, which int8's kernel refuses ("self.size(0) needs to be greater than 16") and which
    costs nothing."""
    return isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and "_mod." not in name


# torchao's config class of each of its modes (the rows' `package` is "torchao").
TORCHAO_CONFIGS = {"fp8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
                   "int8_dynamic": "Int8DynamicActivationInt8WeightConfig"}


def apply_torchao(transformer: torch.nn.Module, mode: QuantMode) -> None:
    """Quantize the blocks' linears with torchao's dynamic `mode` (LOSSY), on the GPU where it is fast."""
    import torchao.quantization

    config = getattr(torchao.quantization, TORCHAO_CONFIGS[mode.name])()
    torchao.quantization.quantize_(transformer, config, filter_fn=_torchao_linear_filter, device="cuda")


def apply_fp8_storage(transformer: torch.nn.Module) -> None:
    """--quantization fp8_storage (LOSSY): diffusers' layerwise casting stores the transformer's Linear weights in
    float8 and casts each layer to the compute dtype for its own forward. What it skips (norms, positional embedding,
    proj_out, the model's `_skip_layerwise_casting_patterns`: 0.04 GB of the real model) keeps the loaded dtype.

    It casts leaf by leaf: each layer's float8 copy is made from the bf16 weights that from_pretrained left as views of
    the mapped safetensors files, so loading holds the float8 transformer (19 GB) in anonymous RAM and the bf16 one
    (38 GB) only as page cache, which the OS evicts as it goes (bench/RESULTS.md: fp8_storage's RAM at load).
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

    layers = text_encoder_parts(text_encoder)[0]
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
    return module_gb(twin)


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
    return fp8_text_layer_gb(text_encoder_parts(text_encoder)[0][0])


def fp8_storage_element_sizes(model_path: Path | str) -> dict[str, int]:
    """Bytes per element of each transformer weight that fp8_storage stores in float8, by name (the others keep the
    loaded dtype), for the planner before loading (`budget_sizes_from_files`). The cast's own rule decides: the
    transformer is built from its config on the meta device (no memory; 0.3 s for the real one) and cast as
    `apply_fp8_storage` does."""
    transformer = meta_transformer(model_path, "--quantization fp8_storage cannot size its float8 weights")
    apply_fp8_storage(transformer)
    return {name: t.element_size() for name, t in itertools.chain(transformer.named_parameters(),
                                                                   transformer.named_buffers())
            if t.dtype == torch.float8_e4m3fn}


def fp8_storage_sizes(model_path: Path | str, element_size: int) -> dict[str, Any] | None:
    """fp8_storage's sizes from the files: the transformer's float8 weights, and `text_layer_fp8_gb`, a text encoder
    language layer in float8 (the planner stores so those that would stream, where the text encoder does not fit)."""
    sizes = budget_sizes_from_files(model_path, element_size, fp8_storage_element_sizes(model_path))
    if sizes is None:
        return None
    dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}.get(element_size, torch.bfloat16)
    return dict(sizes, text_layer_fp8_gb=fp8_text_layer_gb_from_files(model_path, dtype))


def w8a8_sizes(model_path: Path | str, element_size: int, mode: QuantMode, blocks: str) -> dict[str, Any] | None:
    """An 8-bit mode's sizes from the files (`block_range` rows): the chosen blocks' token-wise weights at 1 byte
    (`w8a8_element_sizes`, a meta build), each block's own size (`block_gbs`: the bf16 ones are larger) and
    `ram_only_blocks`, the 8-bit blocks, whose weights no file holds (the planner pins them)."""
    stored = w8a8_element_sizes(model_path, mode.name, blocks)
    sizes = budget_sizes_from_files(model_path, element_size, stored)
    if sizes is None:
        return None
    chosen = tuple(sorted({int(name.split(".")[1]) for name in stored}))
    return dict(sizes, ram_only_blocks=chosen)


def fast_sizes(model_path: Path | str, element_size: int) -> dict[str, Any] | None:
    """The Fast preset's sizes (its default blocks; int8 and fp8 both store 1 byte) for a bf16 refusal's advice
    (`plan_machine`'s `fast_sizes`); None where they cannot be read (the advice is then left out, never the load)."""
    try:
        return w8a8_sizes(model_path, element_size, QUANT["int8_w8a8"], "default")
    except (OSError, ValueError, TypeError, AttributeError) as err:  # another model's blocks: only the advice goes
        logger.info("The Fast preset's sizes could not be read (%s): refusals will not name its figures.", err)
        return None


def planner_sizes(model_path: Path | str, element_size: int, mode: QuantMode, blocks: str = "default"
                  ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The sizes `load_pipeline` checks the machine with before loading (`budget_sizes_from_files`): (the weights as
    they will be held, the other figures a refusal names). fp8_storage: (its float8 figures, the bf16 ones, to say
    what bf16 needs); the 8-bit modes: (theirs for `blocks`, bf16's); bf16: (bf16, fp8_storage's float8 figures, to
    say what the lossy option needs); the torchao modes (resident only): (bf16, None). (None, None) where the files
    cannot say. A bad `blocks` range raises ValueError here, before anything loads."""
    sizes = budget_sizes_from_files(model_path, element_size)
    if sizes is None:
        return None, None
    if mode.holds_transformer_in_ram:  # fp8_storage
        return fp8_storage_sizes(model_path, element_size), sizes
    if mode.block_range:  # int8_w8a8, fp8_w8a8
        return w8a8_sizes(model_path, element_size, mode, blocks), sizes
    if mode.lossy:
        return sizes, None
    try:  # only for a refusal's advice: never a reason for a bf16 load to fail
        return sizes, fp8_storage_sizes(model_path, element_size)
    except (OSError, ValueError) as err:
        logger.info("The lossy option's sizes could not be read (%s): refusals will not name its figures.", err)
        return sizes, None


def apply_w8a8(transformer: torch.nn.Module, mode: QuantMode, blocks: str) -> dict[str, Any]:
    """--quantization int8_w8a8 / fp8_w8a8 (LOSSY): the token-wise linears of the blocks `blocks` names become 8-bit
    linears (`studio.w8a8`), quantized on the GPU where there is one (the bf16 weights are file views: each goes there
    and back once); returns what params.json records of it (`w8a8_record`)."""
    on_cuda = torch.cuda.is_available()
    indices = parse_block_range(blocks, len(transformer.transformer_blocks))
    quantize_blocks(transformer, mode.name, indices, "cuda" if on_cuda else None)
    release_freed_heap()
    return w8a8_record(mode.name, indices, len(transformer.transformer_blocks), on_cuda)


def apply_quantization(transformer: torch.nn.Module, mode: QuantMode, blocks: str = "default") -> dict[str, Any]:
    """Store or compute the transformer as `mode` says (its row's own code; bf16 does nothing); returns what it
    quantized, for params.json (empty where the mode's name says it all). `blocks`: the block range of the
    `block_range` modes (`--quantized-blocks`)."""
    return QUANT_APPLY[mode.name](transformer, mode, blocks) or {}


# Each mode's own code (a new mode: its row in `studio.modes` and its function here), called (transformer, mode,
# blocks).
QUANT_APPLY = {
    "bf16": lambda transformer, mode, blocks: None,
    "fp8_storage": lambda transformer, mode, blocks: apply_fp8_storage(transformer),
    "fp8_dynamic": lambda transformer, mode, blocks: apply_torchao(transformer, mode),
    "int8_dynamic": lambda transformer, mode, blocks: apply_torchao(transformer, mode),
    "int8_w8a8": apply_w8a8,
    "fp8_w8a8": apply_w8a8,
}
