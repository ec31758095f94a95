"""The transformer's forward at the speed of its arithmetic, exactly (issue 24, item 5): torch.compile of the transformer
blocks (regional: each block's own forward, before any hook) and its on-disk caches, and each block's Q, K and V
projections fused into one matmul per stream.
"""

import logging
import os
import platform
import stat
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen

from studio.modes import OffloadMode, QuantMode

logger = logging.getLogger(__name__)


COMPILE_OPTIONS = dict(fullgraph=True, dynamic=True)
# torch.compile on Windows: the seed found PyTorch 2.4 failing there; triton-windows (Triton's Windows build) supports
# PyTorch 2.6 and newer.
WINDOWS_COMPILE_MIN_TORCH = (2, 6)
# Triton's kernels need compute capability 7.0 (Volta) or newer.
TRITON_MIN_CAPABILITY = (7, 0)


def compile_problem(offload: OffloadMode, quant: QuantMode) -> str | None:
    """Why the transformer blocks cannot be compiled with these modes (None: they can), from their rows."""
    if offload.compile_problem:
        return f"Regional compile does not apply with --offload {offload.name}: {offload.compile_problem}"
    if quant.compile_problem:
        return f"Regional compile does not apply with --quantization {quant.name}: {quant.compile_problem}"
    return None


def machine_compile_problem(on_cuda: bool, triton: bool, capability: tuple[int, int] | None,
                            system: str | None = None, torch_version: str | None = None) -> str | None:
    """Why this machine runs the blocks eagerly although compiling is the default (ENABLE_COMPILE); None: it compiles.
    `triton`: whether Triton is installed (Inductor's GPU kernels are Triton kernels)."""
    system = system or platform.system()
    version = tuple(int(part) for part in (torch_version or torch.__version__).split("+")[0].split(".")[:2])
    if not on_cuda:
        return "Regional compile off: no CUDA GPU (the blocks are compiled for the GPU; the CPU runs them as loaded)"
    if not triton:
        return ("Regional compile off: torch.compile's GPU kernels need Triton, which is not installed (pip install "
                "triton; on Windows pip install triton-windows)")
    if capability is not None and tuple(capability) < TRITON_MIN_CAPABILITY:
        return (f"Regional compile off: Triton needs compute capability {'.'.join(map(str, TRITON_MIN_CAPABILITY))} "
                f"or newer and this GPU has {'.'.join(map(str, capability))}")
    if system == "Windows" and version < WINDOWS_COMPILE_MIN_TORCH:
        return (f"Regional compile off: PyTorch {'.'.join(map(str, version))} on Windows (torch.compile failed there "
                f"with 2.4; triton-windows supports PyTorch {'.'.join(map(str, WINDOWS_COMPILE_MIN_TORCH))} and newer)")
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
        if not hasattr(block.forward, "_torchdynamo_orig_callable"):  # applied again (a bench's next row): once
            block.forward = torch.compile(block.forward, **COMPILE_OPTIONS)
    return len(blocks)


def compile_cache_file() -> Path:
    """torch's portable compile cache ("mega-cache") for the regional compile, beside Inductor's on-disk caches."""
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
    Inductor's and AOTAutograd's caches; on an H200 a second start then paid 7.7 s of compiling instead of 14.2 s with
    Inductor's caches alone (bench/results/speed_24gb.json, `second_start*`). A file that does not load (another
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


# ----------------------------------------------------------------------------------------------------------------
# Fused QKV projections
# ----------------------------------------------------------------------------------------------------------------
def fuse_problem(on_cuda: bool, quant: QuantMode, machine=None) -> str | None:
    """Why the blocks keep their separate Q, K and V projections (None: they are fused; ENABLE_FUSED_QKV). `machine`:
    the budget mode's `MachinePlan` (its RAM plan)."""
    if not on_cuda:
        return "Fused QKV projections not applied: they pay on a GPU (the CPU runs the blocks as loaded)"
    if quant.lossy or quant.compute != "bf16":
        return f"Fused QKV projections not applied with --quantization {quant.name}: its weights are kept per projection"
    ram = getattr(machine, "ram", None)
    if ram is not None and ram.low_ram:
        return ("Fused QKV projections not applied: with less RAM than the weights, blocks stay views of the weight "
                "files, and fused copies would be held in RAM (0.11 GB a block)")
    return None


# The projections `fuse_qkv_projections` stacks: each stream's Q, K and V.
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv_projections(transformer: torch.nn.Module) -> int:
    """Each block's Q, K and V projections (and the text stream's) as one Linear of the three stacked, the three removed
    (the weights are held once); the blocks' processor then runs one matmul per stream. Returns how many blocks.

    Why not diffusers' own `fuse_qkv_projections` (0.42.1): `Attention.fuse_projections` adds `to_qkv` and
    `to_added_qkv` beside the three it keeps (+0.11 GB a block, 6.8 GB for 60), and QwenDoubleStreamAttnProcessor2_0
    never reads them. Applied before any hook: the budget engine's block groups and host copies are made from the fused
    modules. A block fused already is left as it is.

    Only plain bf16 / float32 Linears are stacked: where a block was quantized already (W8A8, torchao, fp8_storage)
    it raises TypeError before any block changes, since a stacked Linear would drop the 8-bit weights' scales or
    casting hooks. The app never asks it (it quantizes first, and `fuse_problem` keeps the quantized modes'
    projections apart); the other order works: `w8a8.quantize_blocks` replaces a fused block's stacked projections.
    """
    blocks = transformer.transformer_blocks
    for index, block in enumerate(blocks):  # every block checked before any is changed
        for name in () if hasattr(block.attn, "to_qkv") else FUSED_PROJECTIONS:
            part = getattr(block.attn, name)
            if (type(part) is not torch.nn.Linear or type(part.weight) is not torch.nn.Parameter
                    or part.weight.element_size() < 2):
                raise TypeError(f"transformer_blocks.{index}.attn.{name} is a {type(part).__name__} with a "
                                f"{type(part.weight).__name__} of {part.weight.dtype}, not a bf16 / float32 Linear: it "
                                f"was quantized. Fuse the Q, K and V projections before quantizing "
                                f"(w8a8.quantize_blocks takes fused blocks).")
    with torch.no_grad():
        for block in blocks:
            attn = block.attn
            if hasattr(attn, "to_qkv"):
                continue
            attn.to_qkv = _stacked_linear(attn, ("to_q", "to_k", "to_v"))
            attn.to_added_qkv = _stacked_linear(attn, ("add_q_proj", "add_k_proj", "add_v_proj"))
            previous = attn.processor
            attn.set_processor(FusedQwenDoubleStreamAttnProcessor())
            attn.processor._attention_backend = previous._attention_backend
            attn.processor._parallel_config = previous._parallel_config
    return len(blocks)


def _stacked_linear(attn: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Linear:
    """One Linear whose weight and bias are those of `names` stacked (their outputs concatenated); `names` removed."""
    parts = [getattr(attn, name) for name in names]
    fused = torch.nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                            device="meta")  # no random init: the weights are set below
    fused.weight = torch.nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=parts[0].weight.requires_grad)
    if parts[0].bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=parts[0].bias.requires_grad)
    for name in names:
        delattr(attn, name)
    return fused


class FusedQwenDoubleStreamAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """diffusers' QwenDoubleStreamAttnProcessor2_0 (0.42.1) with each stream's Q, K and V from one matmul
    (`fuse_qkv_projections`); the rest as diffusers' (tests/test_exact.py compares the two on the demo model)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if not hasattr(attn, "to_qkv"):
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. Pass "
                             "encoder_hidden_states_mask to let the processor build the joint mask.")
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        # The one difference: Q, K and V of each stream from one matmul.
        img_query, img_key, img_value = (x.unflatten(-1, (-1, head_dim)) for x in attn.to_qkv(hidden_states).chunk(3, -1))
        txt_query, txt_key, txt_value = (x.unflatten(-1, (-1, head_dim))
                                         for x in attn.to_added_qkv(encoder_hidden_states).chunk(3, -1))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        joint_hidden_states = dispatch_attention_fn(
            torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1),
            torch.cat([txt_value, img_value], dim=1), attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config)
        joint_hidden_states = joint_hidden_states.flatten(2, 3).to(txt_query.dtype)
        img_attn_output = attn.to_out[0](joint_hidden_states[:, seq_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout
        txt_attn_output = attn.to_add_out(joint_hidden_states[:, :seq_txt, :].contiguous())
        return img_attn_output, txt_attn_output
