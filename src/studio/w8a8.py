"""W8A8: the transformer blocks' token-wise linears in 8 bits, weights and activations (issue 25). LOSSY.

Each selected block's attention and feed-forward linears (the ones every token passes through: 6.8B weights a stream)
become a `W8A8Linear`: the weight stored in 1 byte (int8 or float8_e4m3fn) with one float32 scale per output channel,
the activations quantized per token on the fly, and the product taken by the 8-bit tensor-core kernel,
`torch._int_mm` (int8; Ada has 4x the bf16 rate) or `torch._scaled_mm` with row-wise scales (fp8; 2x). The
modulation linears (`img_mod` / `txt_mod`, one row per image) and everything outside `transformer_blocks` stay bf16.
The first and last fifth of the blocks (0-11 and 48-59 of 60) stay bf16 by default, as the issue reports NVIDIA's
TensorRT-LLM preset for this model does on its fp8 path; `parse_block_range` reads `--quantized-blocks`.

Why a module of our own and not torchao's quantized tensors (checked with torchao 0.18.0 on torch 2.14, CPU):
  * the low-VRAM engine moves every parameter and buffer by rebinding `tensor.data` (`_host_copies`,
    `_BudgetStages.enter` / `release`, `PageLockedModuleGroup._init_cpu_param_dict`). torchao's weights are wrapper
    subclasses (`Int8Tensor`: `qdata` int8, `scale`, `zero_point`): `param.data = other` changes only the empty outer
    wrapper and leaves `param.qdata` where it was (measured: after the rebinding `qdata` still pointed at the old
    memory), and `param.data` returns a wrapper without `qdata`, so `host.copy_(param.data)` raises. diffusers 0.42
    moves them with `torch.utils.swap_tensors` and per-attribute `setattr` (group_offloading.py,
    `_swap_torchao_tensor` / `_restore_torchao_tensor`); our engine would need the same branch at each of those
    places, plus flattening each subclass into its inner tensors to lay them out in the one page-locked buffer;
  * the outer tensor reports the original dtype: an int8 weight says `dtype=bfloat16, element_size()=2`, so the
    planner's sizes (`_module_gb`, numel x element_size) would count 2 bytes a weight;
  * torchao is not installed on the GPU machines (torch 2.11; torchao 0.18's C extensions need torch >= 2.11) and
    would travel as a wheel, for two matmul calls and a per-row quantization.
Here the state is plain tensors (an int8 / float8 Parameter, a float32 buffer, the bias in the loaded dtype): the
engine lays them out and moves them by their bytes like any bf16 weight, and the planner counts 1 byte a weight.

Exactness. Off CUDA, or where a kernel's shape rules are not met, `reference_matmul` computes the same math: the
8-bit values' products summed in float64, where they are exact (int8: integers, below 2**28 at the model's widths;
float8 e4m3: multiples of 2**-18, exact up to K ~ 170,000; the model's K is at most 12,288), rounded once to
float32, then the same float32 epilogue (`_epilogue`) as the kernel path. For int8 that is the kernel's result bit
for bit (its int32 sum is exact and converts to float32 the same way); fp8's kernel sums in float32 in its own order,
which differs from the exact sum by float32 accumulation rounding, far below the fp8 step. Being exact, the
reference's result depends on no summation order or memory alignment. The tiny demo transformer (width 32) runs
this reference path on the CPU: that is what the tests check.
"""

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------
# 1. The modes' kernels, and constants
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class W8A8Mode:
    """How a `--quantization` mode of this module (its row in `studio.modes`: `block_range`) stores and multiplies."""

    name: str  # the --quantization value
    weight_dtype: torch.dtype  # weights and activations are stored in this 1-byte type
    max_value: float  # a row's largest magnitude maps to this (symmetric scales; int8 keeps -128 unused)
    kernel: str  # the torch function that multiplies on CUDA
    rate_vs_bf16: float  # dense tensor rate against bf16 with fp32 accumulate on Ada GeForce (whitepaper)


W8A8_MODES = {
    "int8_w8a8": W8A8Mode("int8_w8a8", torch.int8, 127.0, "torch._int_mm", 4.0),
    "fp8_w8a8": W8A8Mode("fp8_w8a8", torch.float8_e4m3fn, 448.0, "torch._scaled_mm", 2.0),
}

# The token-wise linears of a diffusers 0.42 QwenImageTransformerBlock, relative to the block: what W8A8 replaces.
# Not `img_mod.1` / `txt_mod.1`: the modulation sees one row per image (int8's kernel refuses M <= 16, and the
# FLOPs are nil).
TOKENWISE_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # image stream attention
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",  # text stream attention
    "img_mlp.net.0.proj", "img_mlp.net.2",  # image stream feed-forward (up, down)
    "txt_mlp.net.0.proj", "txt_mlp.net.2",  # text stream feed-forward
)
# A block fused by `studio.compiling.fuse_qkv_projections` holds each stream's Q, K and V as one stacked Linear: W8A8
# replaces that one in place of the three. The same math: a token's scale comes from its input, which the three share,
# and the weight's scales are per output row, so the stacked layer's rows are the three layers' rows.
FUSED_LINEARS = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
# The bf16 fraction at each end of the stack under "default": 12 of 60 blocks at the start and 12 at the end.
SENSITIVE_FRACTION = 0.2
# torch._int_mm on CUDA refuses M <= 16 ("self.size(0) needs to be greater than 16") and K, N not multiples of 8.
# A short prompt's text stream has fewer than 17 tokens: zero rows are added (rows are independent and integer sums
# exact, so the real rows' results do not change) instead of leaving the kernel.
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8
# torch._scaled_mm (row-wise) needs K and N multiples of 16 and a bf16 output on CUDA.
SCALED_MM_MULTIPLE = 16
# fp8: accumulate without the periodic promotion of partial sums (faster on Hopper); torchao's default for
# per-tensor / per-row fp8 inference (Float8DynamicActivationFloat8WeightConfig).
FP8_FAST_ACCUM = True
# A row of zeros gets this scale instead of 0 (its quantized values are then 0, not NaN).
MIN_SCALE = 1e-12


def w8a8_mode(name: str) -> W8A8Mode:
    """The row of `name`; a ValueError that lists the modes otherwise."""
    if name not in W8A8_MODES:
        raise ValueError(f"8-bit compute mode {name!r} is not one of {', '.join(W8A8_MODES)}")
    return W8A8_MODES[name]


# ----------------------------------------------------------------------------------------------------
# 2. Block ranges ("12-47", "all", "none", "default", "0-3,50-59")
# ----------------------------------------------------------------------------------------------------
def default_quantized_blocks(num_blocks: int) -> tuple[int, ...]:
    """All but the first and last fifth: 12-47 of the real model's 60 blocks, all 4 of the demo's."""
    keep = int(num_blocks * SENSITIVE_FRACTION)
    return tuple(range(keep, num_blocks - keep))


def parse_block_range(text: str, num_blocks: int) -> tuple[int, ...]:
    """The block indices `--quantized-blocks TEXT` names, sorted: "all", "none", "default" (`default_quantized_blocks`),
    or comma-separated indices and inclusive ranges ("12-47", "0-3,50-59"). ValueError naming the bad part and the fix."""
    last = num_blocks - 1
    fix = (f"Give block indices 0-{last} and inclusive ranges separated by commas (e.g. "
           f"{_format(default_quantized_blocks(num_blocks)) or '0-' + str(last)}), or all / none / default.")
    words = str(text).strip().lower()
    if words == "all":
        return tuple(range(num_blocks))
    if words in ("none", ""):
        return ()
    if words == "default":
        return default_quantized_blocks(num_blocks)
    chosen: set[int] = set()
    for part in words.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"--quantized-blocks {text!r}: {part.strip()!r} is not a block index or a range. {fix}")
        start, end = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if end < start:
            raise ValueError(f"--quantized-blocks {text!r}: the range {part.strip()!r} ends before it starts; "
                             f"write it as {end}-{start}. {fix}")
        if end > last:
            raise ValueError(f"--quantized-blocks {text!r}: block {end} is past the last block, {last} (the "
                             f"transformer has {num_blocks}). {fix}")
        chosen.update(range(start, end + 1))
    return tuple(sorted(chosen))


def _format(indices: Iterable[int]) -> str:
    """Sorted indices as the shortest range text: (0, 1, 2, 3, 50) -> "0-3,50"; () -> ""."""
    runs = []
    for _, run in itertools.groupby(enumerate(sorted(set(indices))), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        runs.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(runs)


def format_block_range(indices: Iterable[int]) -> str:
    """The canonical text of a block selection, as params.json records it: "12-47", "0-3,50-59", or "none"."""
    return _format(indices) or "none"


# ----------------------------------------------------------------------------------------------------
# 3. Quantization and the matmul (one function for each step; kernel and reference paths share all but the sum)
# ----------------------------------------------------------------------------------------------------
def quantize_rows(values: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: (8-bit values, float32 scale per row, shape [rows, 1]).

    scale = max |row| / max_value; q = x / scale, rounded to the nearest integer (ties to even, `torch.round`) and
    clamped to +-127 for int8, clamped to +-448 and rounded to nearest-even float8_e4m3fn for fp8 (the cast of an
    out-of-range value would give NaN). Computed in float32 whatever the input dtype. Weights: rows are output
    channels; activations: rows are tokens.
    """
    row = w8a8_mode(mode)
    values = values.to(torch.float32)
    scale = values.abs().amax(dim=1, keepdim=True).clamp(min=MIN_SCALE) / row.max_value
    scaled = values / scale
    if row.weight_dtype == torch.int8:
        quantized = torch.round(scaled).clamp(-row.max_value, row.max_value).to(torch.int8)
    else:
        quantized = scaled.clamp(-row.max_value, row.max_value).to(row.weight_dtype)
    return quantized, scale


def reference_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x_q @ w_q.T of 8-bit values in float32: the products summed exactly (float64; see the module's docstring)
    and rounded once. For int8 this is the kernel's int32 sum converted to float32, bit for bit."""
    return (x_q.to(torch.float64) @ w_q.to(torch.float64).t()).to(torch.float32)


def _epilogue(accumulated: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The float32 sum times the token's and the channel's scale, plus the bias, rounded once to `out_dtype`."""
    out = accumulated * x_scale * w_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def kernel_problem(mode: str, x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why the CUDA kernel cannot take these operands (None: it can); the caller then takes the reference path."""
    if not (x_q.is_cuda and w_q.is_cuda):
        return "not on CUDA"
    (_, k), n = x_q.shape, w_q.shape[0]
    if mode == "int8_w8a8" and (k % INT_MM_MULTIPLE or n % INT_MM_MULTIPLE):
        return f"torch._int_mm needs K and N multiples of {INT_MM_MULTIPLE} (K={k}, N={n})"
    if mode == "fp8_w8a8" and (k % SCALED_MM_MULTIPLE or n % SCALED_MM_MULTIPLE):
        return f"torch._scaled_mm needs K and N multiples of {SCALED_MM_MULTIPLE} (K={k}, N={n})"
    if mode == "fp8_w8a8" and out_dtype != torch.bfloat16:
        return f"torch._scaled_mm with row-wise scales writes bf16, not {out_dtype}"
    return None


def w8a8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                mode: str) -> torch.Tensor:
    """y = x @ W.T + bias for a 2-D `x` [tokens, in] and a quantized W: each token quantized on its own scale, the
    8-bit product on the kernel where it can run (`kernel_problem`), else `reference_matmul`; output in x's dtype."""
    x_q, x_scale = quantize_rows(x, mode)
    out_dtype = x.dtype
    if kernel_problem(mode, x_q, w_q, out_dtype) is None:
        if mode == "int8_w8a8":
            rows = x_q.shape[0]
            if rows < INT_MM_MIN_ROWS:  # zero rows, dropped after (see INT_MM_MIN_ROWS)
                x_q = torch.cat([x_q, x_q.new_zeros(INT_MM_MIN_ROWS - rows, x_q.shape[1])])
            accumulated = torch._int_mm(x_q, w_q.t())[:rows].to(torch.float32)
            return _epilogue(accumulated, x_scale, w_scale, bias, out_dtype)
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                                bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                                use_fast_accum=FP8_FAST_ACCUM)
    return _epilogue(reference_matmul(x_q, w_q), x_scale, w_scale, bias, out_dtype)


class W8A8Linear(torch.nn.Module):
    """A Linear whose weight is stored in 1 byte with a float32 scale per output channel, and whose input is quantized
    per token at every call (dynamic; LOSSY). Its state is plain tensors, so the low-VRAM engine moves it by its bytes:
        weight        Parameter [out, in], int8 or float8_e4m3fn, requires_grad=False
        weight_scale  buffer [out], float32
        bias          Parameter [out] in the loaded dtype (bf16 on CUDA), or None
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, w8a8_mode(mode).name
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=W8A8_MODES[mode].weight_dtype,
                                                     device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: str, device: torch.device | str | None = None) -> "W8A8Linear":
        """Quantize `linear`'s weight per output channel (on `device` when given, e.g. "cuda": faster than the CPU;
        the result goes back to the weight's device). Works on the meta device (no memory: the planner's sizes)."""
        weight = linear.weight.detach()
        quantized, scale = quantize_rows(weight if device is None else weight.to(device), mode)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, weight.dtype, "meta")
        module.weight = torch.nn.Parameter(quantized.to(weight.device), requires_grad=False)
        module.weight_scale = scale.view(-1).to(weight.device)
        if linear.bias is not None:  # kept as it was loaded (a view of the weight file until the engine copies it)
            module.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = w8a8_matmul(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.bias, self.mode)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}")


# ----------------------------------------------------------------------------------------------------
# 4. Applying it to the transformer, and its sizes for the planner
# ----------------------------------------------------------------------------------------------------
def tokenwise_linears(block: torch.nn.Module) -> tuple[str, ...]:
    """The `TOKENWISE_LINEARS` of `block` as it is now: where it was fused (`FUSED_LINEARS`), the stacked projection in
    place of the three it holds."""
    names = list(TOKENWISE_LINEARS)
    for fused, parts in FUSED_LINEARS.items():
        parent_name, _, child = fused.rpartition(".")
        if hasattr(block.get_submodule(parent_name), child):
            start = names.index(parts[0])
            names[start : start + len(parts)] = [fused]
    return tuple(names)


def quantize_blocks(transformer: torch.nn.Module, mode: str, blocks: Iterable[int] | str = "default",
                    device: torch.device | str | None = None) -> list[str]:
    """Replace the token-wise linears of `transformer.transformer_blocks[i]` for each i in `blocks` (indices or
    `parse_block_range` text) by `W8A8Linear`s of `mode`; return the replaced modules' names. The linears are
    `tokenwise_linears(block)`: `TOKENWISE_LINEARS`, or on a block fused already its stacked Q, K and V. Modulation
    linears and everything outside the blocks keep their class and dtype. Apply it before the engine's host copies
    (they then lay out the 1-byte weights); `device="cuda"` quantizes there (each weight goes there and back once)."""
    w8a8_mode(mode)
    stack = transformer.transformer_blocks
    indices = parse_block_range(blocks, len(stack)) if isinstance(blocks, str) else tuple(sorted(set(blocks)))
    if indices and not 0 <= indices[0] <= indices[-1] < len(stack):
        raise ValueError(f"blocks {format_block_range(indices)} are out of range: the transformer has {len(stack)} "
                         f"blocks (0-{len(stack) - 1})")
    replaced = []
    for index in indices:
        block = stack[index]
        for name in tokenwise_linears(block):
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, child) if not child.isdigit() else parent[int(child)]
            if isinstance(linear, W8A8Linear):
                if linear.mode != mode:
                    raise ValueError(f"transformer_blocks.{index}.{name} is already {linear.mode}, not {mode}")
                continue
            if type(linear) is not torch.nn.Linear:
                raise TypeError(f"transformer_blocks.{index}.{name} is a {type(linear).__name__}, not a torch Linear: "
                                f"this is not the diffusers 0.42 QwenImageTransformerBlock that W8A8 knows")
            setattr(parent, child, W8A8Linear.from_linear(linear, mode, device))
            replaced.append(f"transformer_blocks.{index}.{name}")
    return replaced


def quantized_blocks_of(transformer: torch.nn.Module) -> dict[int, str]:
    """{block index: mode} of the blocks that hold W8A8Linears (what was applied, e.g. for params.json)."""
    found = {}
    for index, block in enumerate(transformer.transformer_blocks):
        modes = {m.mode for m in block.modules() if isinstance(m, W8A8Linear)}
        if modes:
            found[index] = modes.pop()
    return found


def element_sizes(transformer: torch.nn.Module) -> dict[str, int]:
    """Bytes per element of each 1-byte W8A8 weight, by its name in the weight files."""
    return {f"{name}.weight": module.weight.element_size() for name, module in transformer.named_modules()
            if isinstance(module, W8A8Linear)}


def w8a8_element_sizes(model_path: Path | str, mode: str, blocks: Iterable[int] | str = "default") -> dict[str, int]:
    """`element_sizes` before loading, for the planner (`budget_sizes_from_files(model_path, 2, sizes)`): the
    transformer is built from its config on the meta device (no memory) and quantized by `quantize_blocks` itself.

    Not in the files, so not counted there: the float32 scales (4 bytes per output channel, 0.22 MB a block of the
    real model against its 453 MB in W8A8: 226.5M token-wise weights at 1 byte, 113.2M modulation weights in bf16)."""
    transformer = meta_transformer(model_path, f"--quantization {mode} cannot size its 8-bit weights")
    quantize_blocks(transformer, mode, blocks)
    return element_sizes(transformer)


def meta_transformer(model_path: Path | str, purpose: str) -> torch.nn.Module:
    """The pipeline's transformer built from its config on the meta device (no memory; 0.3 s for the real one), for
    sizing a storage mode before loading. ValueError naming the config and `purpose` where it names no model class."""
    import diffusers

    folder = Path(model_path) / "transformer"
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    model_class = getattr(diffusers, str(name), None)
    if not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        raise ValueError(f"{folder / 'config.json'} names no diffusers model class ({name!r}): {purpose}; pass the "
                         f"folder of a diffusers pipeline")
    with torch.device("meta"):
        return model_class.from_config(model_class.load_config(folder))


def w8a8_record(mode: str, blocks: Iterable[int], num_blocks: int, on_cuda: bool) -> dict:
    """What params.json records of an 8-bit run beside its mode's name (`Loaded.run_info`'s "quantized")."""
    row = w8a8_mode(mode)
    chosen = tuple(sorted(set(blocks)))
    return dict(quantized_blocks=format_block_range(chosen),
                bf16_blocks=format_block_range(sorted(set(range(num_blocks)) - set(chosen))),
                kernel=row.kernel if on_cuda else "reference matmul (no CUDA)")


# ----------------------------------------------------------------------------------------------------
# 5. SageAttention (8-bit attention, opt-in) through diffusers' attention dispatcher
# ----------------------------------------------------------------------------------------------------
# diffusers 0.42's dispatcher offers "sage" (sageattn: picks the kernel per GPU: sm80 fp16 PV, sm89 / sm120 fp8 PV,
# sm90 its own), "sage_varlen", four "_sage_qk_int8_pv_*" variants, and "sage_hub" / "sage_blackwell_hub" (kernels
# downloaded from the Hugging Face Hub by the `kernels` package at first use). All but the hub ones need
# sageattention >= 2.1.1, which PyPI does not have: its newest is 1.0.6 (Triton only), with which diffusers marks
# every Sage backend unusable and `set_attention_backend("sage")` raises RuntimeError. 2.x is built from source
# (nvcc and a CUDA toolkit matching torch's). "sage" refuses an attention mask: the layered pipeline passes none for
# one image with one prompt (it drops an all-True prompt mask).
SAGE_BACKEND = "sage"
SAGE_MIN_CAPABILITY = (8, 0)  # sageattn's kernels: sm80, sm86, sm89, sm90, sm120


def sage_attention_problem(on_cuda: bool, capability: tuple[int, int] | None, sage_version: str | None,
                           triton: bool, required: str | None = None) -> str | None:
    """Why SageAttention cannot run (None: it can). `required`: diffusers' minimum version (its
    `_REQUIRED_SAGE_VERSION`, read when None); the app's `sage_attention_unavailable` fills the rest from this
    machine."""
    from packaging.version import Version

    if required is None:
        from diffusers.models import attention_dispatch

        required = getattr(attention_dispatch, "_REQUIRED_SAGE_VERSION", "2.1.1")
    if not on_cuda:
        return "SageAttention not applied: it needs a CUDA GPU."
    if capability is not None and capability < SAGE_MIN_CAPABILITY:
        return (f"SageAttention not applied: its kernels need compute capability "
                f"{'.'.join(map(str, SAGE_MIN_CAPABILITY))} or newer; this GPU is {capability[0]}.{capability[1]}.")
    if sage_version is None:
        return (f"SageAttention not applied: the `sageattention` package (>= {required}) is not installed. PyPI has "
                f"only 1.0.6, too old for diffusers: build it from https://github.com/thu-ml/SageAttention "
                f"(needs nvcc).")
    if Version(sage_version) < Version(required):
        return (f"SageAttention not applied: sageattention {sage_version} is installed and diffusers needs >= "
                f"{required} (PyPI's 1.0.6 is too old): build it from https://github.com/thu-ml/SageAttention.")
    if not triton:
        return ("SageAttention not applied: it needs Triton, which is not installed (pip install triton; on Windows "
                "pip install triton-windows).")
    return None
