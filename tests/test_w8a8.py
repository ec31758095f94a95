"""W8A8 and the Fast preset (issue 25): the 8-bit linears' math by hand and against a float reference within a bound
derived from the quantization steps; their weights moved by their bytes as the low-VRAM engine moves them; through the
app: the preset on the flags, budget + Fast giving the layers of off + Fast, the block range honoured and recorded
(params.json, the page, the log), the planner's sizes from the files and the refusals' advice, evaluate's grid.

Every test here runs on the CPU, so the 8-bit products go through `reference_matmul` (there is no CUDA): the kernels
`torch._int_mm` / `torch._scaled_mm` share everything but the sum with it; bench/probe_w8a8.py checks them against
it on a GPU (`kernel_equals_reference`)."""

import itertools
import json
import logging
import math
import re

import numpy as np
import pytest
import torch

import app
from conftest import demo_settings, engine_on
from studio import w8a8
from studio.engine.memory import budget_sizes_from_files
from studio.engine.plan import budget_minimum_gb, budget_minimum_ram_gb, plan_budget, plan_host_ram, plan_machine
from studio.engine.stream import plan_loaded
from studio.evaluate import parse_grid
from studio.images import read_layered_file
from studio.modes import OFFLOAD, QUANT, fast_mode_for
from studio.quant import fast_sizes, planner_sizes, quant_problem
from test_small_cards import DEFAULT_JOB_TOKENS, REAL

MODES = tuple(w8a8.W8A8_MODES)


def _linear(weight, bias) -> torch.nn.Linear:
    weight, bias = torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


# ----------------------------------------------------------------------------------------------------
# The math, by hand
# ----------------------------------------------------------------------------------------------------
def test_int8_two_by_two_by_hand():
    # Scales: rows of x peak at 254 -> 254/127 = 2; rows of W peak at 63.5 -> 0.5 (both exact in binary).
    # x / 2 = [[127, -2.5], [3.5, 127]] rounds (ties to even) to [[127, -2], [4, 127]];
    # W / 0.5 = [[127, 2], [-4.4, 127]] rounds to [[127, 2], [-4, 127]].
    layer = w8a8.W8A8Linear.from_linear(_linear([[63.5, 1.0], [-2.2, 63.5]], [0.25, -0.75]), "int8_w8a8")
    assert layer.weight.tolist() == [[127, 2], [-4, 127]] and layer.weight.dtype == torch.int8
    assert layer.weight_scale.tolist() == [0.5, 0.5]
    # Integer sums: [127*127 + (-2)*2, 127*(-4) + (-2)*127] = [16125, -762]; [4*127 + 127*2, 4*(-4) + 127*127] =
    # [762, 16113]; times 2 * 0.5, plus the bias.
    out = layer(torch.tensor([[254.0, -5.0], [7.0, 254.0]]))
    assert out.tolist() == [[16125.25, -762.75], [762.25, 16112.25]]


def test_fp8_two_by_two_by_hand():
    # float8_e4m3fn keeps 3 mantissa bits. x rows peak at 448 and 224 -> scales 1 and 0.5; W rows peak at
    # 0.875 and 0.4375 -> scales 0.875/448 = 2**-9 and 2**-10.
    # x scaled: [[448, 3.3], [-34, 448]] -> [[448, 3.25], [-32, 448]] (3.3 is nearest 3.25; -34 is a tie between
    # -32 and -36 and goes to the even mantissa, -32). W scaled: [[448, 256], [-307.2, 448]] -> [[448, 256],
    # [-320, 448]] (spacing 32 between 256 and 512).
    layer = w8a8.W8A8Linear.from_linear(_linear([[0.875, 0.5], [-0.3, 0.4375]], [0.5, -1.0]), "fp8_w8a8")
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight.float().tolist() == [[448.0, 256.0], [-320.0, 448.0]]
    assert layer.weight_scale.tolist() == [2.0**-9, 2.0**-10]
    # Dequantized: x = [[448, 3.25], [-16, 224]], W = [[0.875, 0.5], [-0.3125, 0.4375]];
    # x @ W.T = [[392 + 1.625, -140 + 1.421875], [-14 + 112, 5 + 98]], plus the bias.
    out = layer(torch.tensor([[448.0, 3.3], [-17.0, 224.0]]))
    assert out.tolist() == [[394.125, -139.578125], [98.5, 102.0]]


# ----------------------------------------------------------------------------------------------------
# Against a float reference, within the bound of the quantization steps
# ----------------------------------------------------------------------------------------------------
def _rounding_error_bound(values: np.ndarray, mode: str) -> np.ndarray:
    """The largest error per element of per-row quantization, from the format alone: a row's scale s is its peak
    over 127 (int8: rounding to integers, error <= s/2) or over 448 (float8 e4m3: 3 mantissa bits, error <= 2**-4 of
    the value, or 2**-10 * s below the normal range). A factor 1 + 2**-20 covers the float32 division."""
    peak = np.abs(values).max(axis=1, keepdims=True)
    if mode == "int8_w8a8":
        bound = np.broadcast_to(peak / 127 / 2, values.shape)
    else:
        bound = np.maximum(2.0**-4 * np.abs(values), 2.0**-10 * peak / 448)
    return bound * (1 + 2.0**-20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_the_quantized_linear_stays_within_the_bound_of_its_quantization_steps(mode, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g)
    x[5, 7] = 9.0  # an outlier token: its scale is coarse, so its row's bound is wide
    linear = torch.nn.Linear(64, 48).to(dtype)
    torch.nn.init.normal_(linear.weight, std=0.2, generator=g)
    torch.nn.init.normal_(linear.bias, std=0.2, generator=g)
    x = x.to(dtype)
    out = w8a8.W8A8Linear.from_linear(linear, mode)(x)

    xs, ws = x.double().numpy(), linear.weight.detach().double().numpy()
    exact = xs @ ws.T + linear.bias.detach().double().numpy()
    ex, ew = _rounding_error_bound(xs, mode), _rounding_error_bound(ws, mode)
    # |x.w - x^.w^| <= sum_k |x_k| |w_k - w^_k| + |x_k - x^_k| |w^_k|, with |w^_k| <= |w_k| + its bound.
    bound = np.abs(xs) @ ew.T + ex @ (np.abs(ws) + ew).T
    # Then float32 arithmetic (a few roundings of 2**-24) and the output's rounding (bf16: 2**-8 relative).
    bound += (2.0**-20 + (2.0**-8 if dtype == torch.bfloat16 else 0.0)) * (np.abs(exact) + bound)
    error = np.abs(out.double().numpy() - exact)
    assert out.dtype == dtype
    assert (error <= bound).all(), f"worst excess {(error - bound).max():.3g}"
    assert error.max() > 0  # lossy indeed: the 8-bit path ran, not a float matmul


# ----------------------------------------------------------------------------------------------------
# What the engine sees: plain 1-byte tensors, laid out and moved by their bytes
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_path(models_dir):
    return app.build_demo_pipeline(models_dir / app.DEMO_MODEL_DIR.name)


def _demo_transformer(demo_path):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(demo_path / "transformer").eval()


def _transformer_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4 * 4 * 4, 32, generator=g), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g), encoder_hidden_states_mask=None,
                img_shapes=[[(1, 4, 4)] * 4], additional_t_cond=torch.zeros(1, dtype=torch.long), return_dict=False)


def _block_names(index: int) -> set[str]:
    return {f"transformer_blocks.{index}.{name}" for name in w8a8.TOKENWISE_LINEARS}


def test_only_the_chosen_blocks_token_wise_linears_are_quantized(demo_path):
    transformer = _demo_transformer(demo_path)
    before = {name: (type(m), m.weight.dtype) for name, m in transformer.named_modules()
              if getattr(m, "weight", None) is not None}
    replaced = w8a8.quantize_blocks(transformer, "int8_w8a8", "1-2")
    assert set(replaced) == _block_names(1) | _block_names(2)
    for name, module in transformer.named_modules():
        if name in replaced:
            assert type(module) is w8a8.W8A8Linear and module.weight.dtype == torch.int8
        elif name in before:  # blocks 0 and 3, img_mod / txt_mod in every block, and all outside the blocks
            assert (type(module), module.weight.dtype) == before[name], name
    for block in transformer.transformer_blocks:
        assert type(block.img_mod[1]) is torch.nn.Linear and type(block.txt_mod[1]) is torch.nn.Linear
    assert w8a8.quantized_blocks_of(transformer) == {1: "int8_w8a8", 2: "int8_w8a8"}


@pytest.mark.parametrize("mode", MODES)
def test_a_quantized_blocks_state_is_plain_tensors_of_one_byte(demo_path, mode):
    transformer = _demo_transformer(demo_path)
    w8a8.quantize_blocks(transformer, mode, "all")
    layer = transformer.transformer_blocks[0].attn.to_q
    assert type(layer.weight) is torch.nn.Parameter and not layer.weight.requires_grad
    assert layer.weight.element_size() == 1 and layer.weight.dtype == w8a8.W8A8_MODES[mode].weight_dtype
    assert type(layer.weight_scale) is torch.Tensor and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float32  # the loaded dtype (float32 on the CPU, bf16 on CUDA)


@pytest.mark.parametrize("mode", MODES)
def test_moving_the_8_bit_linears_into_one_flat_buffer_changes_no_output_byte(demo_path, mode):
    """As `_host_copies` does on CUDA: each block's W8A8 parameters and buffers copied into one uint8 buffer at
    aligned offsets, and `tensor.data` rebound to its view there (torchao's wrapper tensors would ignore the
    rebinding). Their sums are exact, so no alignment or order changes a bit. The float32 modulation linears beside
    them stay put: on the CPU a new alignment alone can change a float32 matmul's rounding (3.6e-7 here), which is
    why `_host_copies` moves nothing without CUDA."""
    transformer = _demo_transformer(demo_path)
    with torch.no_grad():
        exact = transformer(**_transformer_inputs(1))[0]
    w8a8.quantize_blocks(transformer, mode, "all")
    with torch.no_grad():
        before = transformer(**_transformer_inputs(1))[0]
    buffers = []
    for block in transformer.transformer_blocks:
        layers = [m for m in block.modules() if isinstance(m, w8a8.W8A8Linear)]
        tensors = [t for m in layers for t in itertools.chain(m.parameters(), m.buffers())]
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets = [0, *itertools.accumulate(-(-size // 512) * 512 for size in sizes)]
        flat = torch.zeros(offsets[-1], dtype=torch.uint8)
        for tensor, offset, size in zip(tensors, offsets, sizes):
            host = flat[offset : offset + size].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor.data)
            tensor.data = host
        buffers.append(flat)
        assert len(tensors) == 3 * len(w8a8.TOKENWISE_LINEARS)  # weight, weight_scale, bias of each
        assert all(flat.data_ptr() <= t.data_ptr() < flat.data_ptr() + flat.numel() for m in layers
                   for t in (m.weight, m.weight_scale, m.bias))
    with torch.no_grad():
        after = transformer(**_transformer_inputs(1))[0]
    assert torch.equal(before, after)
    assert not torch.equal(before, exact)  # the 8-bit linears did run


def test_the_planners_sizes_from_the_files_match_the_loaded_quantized_model(demo_path):
    sizes = w8a8.w8a8_element_sizes(demo_path, "fp8_w8a8", "0,3")
    assert sizes == {f"{name}.weight": 1 for name in _block_names(0) | _block_names(3)}
    transformer = _demo_transformer(demo_path)
    w8a8.quantize_blocks(transformer, "fp8_w8a8", "0,3")
    assert w8a8.element_sizes(transformer) == sizes
    # The planner's per-block bytes (as `budget_sizes_from_files` counts them with these sizes) equal the loaded
    # block's bytes, less the float32 scales that are not in the files (4 bytes per output channel).
    from safetensors import safe_open

    with safe_open(demo_path / "transformer" / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        planned = sum(math.prod(f.get_slice(k).get_shape()) * sizes.get(k, 4) for k in f.keys()
                      if k.startswith("transformer_blocks.3."))
    block = transformer.transformer_blocks[3]
    loaded = sum(t.numel() * t.element_size() for t in itertools.chain(block.parameters(), block.buffers()))
    scales = sum(m.weight_scale.numel() * 4 for m in block.modules() if isinstance(m, w8a8.W8A8Linear))
    assert planned == loaded - scales


@pytest.mark.parametrize("mode", MODES)
def test_fused_blocks_are_quantized_with_their_stacked_projections_and_give_the_unfused_blocks_output(demo_path, mode):
    """A block fused by `fuse_qkv_projections` (the exact path on CUDA; a bench's earlier row in the same process)
    has `to_qkv` / `to_added_qkv` in place of the six Q, K and V projections: W8A8 replaces those two. The same math:
    per-token scales from the shared input, per-row weight scales, exact sums on this CPU's reference path."""
    from studio.compiling import fuse_qkv_projections

    unfused, fused = _demo_transformer(demo_path), _demo_transformer(demo_path)
    fuse_qkv_projections(fused)
    replaced = w8a8.quantize_blocks(fused, mode, "all")
    w8a8.quantize_blocks(unfused, mode, "all")
    stacked = {"attn.to_qkv", "attn.to_out.0", "attn.to_added_qkv", "attn.to_add_out", "img_mlp.net.0.proj",
               "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"}
    assert set(replaced) == {f"transformer_blocks.{i}.{name}" for i in range(4) for name in stacked}
    assert w8a8.quantized_blocks_of(fused) == {i: mode for i in range(4)}
    attn, parts = fused.transformer_blocks[1].attn, unfused.transformer_blocks[1].attn
    assert type(attn.to_qkv) is w8a8.W8A8Linear and attn.to_qkv.weight.dtype == w8a8.W8A8_MODES[mode].weight_dtype
    assert not any(hasattr(attn, name) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    # The stacked layer is the three layers' rows: weights, scales and outputs bit for bit.
    assert torch.equal(attn.to_qkv.weight.view(torch.uint8),
                       torch.cat([parts.to_q.weight, parts.to_k.weight, parts.to_v.weight]).view(torch.uint8))
    assert torch.equal(attn.to_qkv.weight_scale,
                       torch.cat([parts.to_q.weight_scale, parts.to_k.weight_scale, parts.to_v.weight_scale]))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(attn.to_added_qkv(x), torch.cat([parts.add_q_proj(x), parts.add_k_proj(x),
                                                             parts.add_v_proj(x)], dim=-1))
        result, expected = fused(**_transformer_inputs(1))[0], unfused(**_transformer_inputs(1))[0]
    assert result.shape == expected.shape and torch.isfinite(result).all()
    assert torch.equal(result, expected)


def test_fusing_blocks_quantized_already_is_refused_before_any_block_changes(demo_path):
    """The app quantizes first and then leaves the 8-bit modes unfused (`fuse_problem`); fusing a quantized block
    would stack 1-byte weights into a Linear without their scales, so `fuse_qkv_projections` refuses it."""
    from studio.compiling import fuse_qkv_projections

    transformer = _demo_transformer(demo_path)
    w8a8.quantize_blocks(transformer, "int8_w8a8", "2")
    with pytest.raises(TypeError, match=r"transformer_blocks\.2\.attn\.to_q is a W8A8Linear .*before quantizing"):
        fuse_qkv_projections(transformer)
    assert not any(hasattr(block.attn, "to_qkv") for block in transformer.transformer_blocks)


# ----------------------------------------------------------------------------------------------------
# The block range, the modes, SageAttention: what the user is told
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("12-47", tuple(range(12, 48))), ("all", tuple(range(60))), ("none", ()), (" ", ()),
    ("default", tuple(range(12, 48))), ("0-3,50-59", (0, 1, 2, 3, *range(50, 60))), ("7", (7,)),
    ("5-6, 2 ,6-8", (2, 5, 6, 7, 8)),
])
def test_block_ranges(text, expected):
    assert w8a8.parse_block_range(text, 60) == expected


def test_block_ranges_round_trip_through_their_text():
    for indices in [(), (7,), tuple(range(12, 48)), (0, 1, 2, 3, 50, 51, 59)]:
        assert w8a8.parse_block_range(w8a8.format_block_range(indices), 60) == indices
    assert w8a8.format_block_range((0, 1, 2, 3, 50, 51, 59)) == "0-3,50-51,59"


@pytest.mark.parametrize("text, message", [
    ("12-60", r"'12-60': block 60 is past the last block, 59 \(the transformer has 60\)"),
    ("47-12", r"the range '47-12' ends before it starts; write it as 12-47"),
    ("12-47,x", r"'x' is not a block index or a range"),
    ("-3", r"'-3' is not a block index or a range"),
])
def test_a_bad_block_range_names_the_value_and_the_fix(text, message):
    with pytest.raises(ValueError, match=message + r".*Give block indices 0-59 .*e\.g\. 12-47.*all / none / default"):
        w8a8.parse_block_range(text, 60)


def test_the_default_keeps_the_first_and_last_fifth_in_bf16():
    assert w8a8.default_quantized_blocks(60) == tuple(range(12, 48))  # bf16: 0-11 and 48-59
    assert w8a8.default_quantized_blocks(4) == (0, 1, 2, 3)  # the demo: every block
    record = w8a8.w8a8_record("int8_w8a8", w8a8.default_quantized_blocks(60), 60, on_cuda=True)
    assert record == dict(quantized_blocks="12-47", bf16_blocks="0-11,48-59", kernel="torch._int_mm")


@pytest.mark.parametrize("mode, capability, expected", [
    ("fp8_w8a8", (8, 6), r"fp8_w8a8 needs a GPU of compute capability 8\.9 .* this one is 8\.6 \(--quantization "
                         r"int8_w8a8 runs on it\)"),
    ("int8_w8a8", (7, 5), r"int8_w8a8 needs a GPU of compute capability 8\.0 or newer for its int8 matmuls; this one "
                          r"is 7\.5$"),
    ("fp8_w8a8", (8, 9), None), ("int8_w8a8", (8, 0), None),
    ("fp8_w8a8", None, None),  # no CUDA: the reference matmul (the demo, these tests)
])
def test_a_mode_the_gpu_cannot_run_says_why_and_every_offload_mode_takes_them(mode, capability, expected):
    for offload in OFFLOAD.values():  # plain 1-byte tensors: every mode moves them
        problem = quant_problem(QUANT[mode], offload, capability, package_installed=False)
        assert problem is None if expected is None else re.search(expected, problem)


def test_fast_takes_int8_on_ampere_and_ada_and_fp8_from_hopper_on():
    assert [fast_mode_for(c) for c in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0), None]] == [
        None, "int8_w8a8", "int8_w8a8", "int8_w8a8", "fp8_w8a8", "fp8_w8a8", "int8_w8a8"]


def test_the_preset_sets_the_flags_a_person_left_alone(monkeypatch):
    fast = app.parse_args(["--preset", "fast"])[1]
    on_ada = app.apply_preset(fast, (8, 9))
    assert (on_ada.quantization, on_ada.quantized_blocks, on_ada.first_block_cache,
            on_ada.first_block_cache_threshold) == ("int8_w8a8", "default", True, 0.1)
    assert app.apply_preset(fast, (9, 0)).quantization == "fp8_w8a8"
    assert app.apply_preset(fast, (7, 5)).quantization is None  # no 8-bit kernel: bf16 (the load says so)
    mine = app.parse_args(["--preset", "fast", "--quantization", "fp8_w8a8", "--quantized-blocks", "20-30",
                           "--no-first-block-cache"])[1]
    assert app.apply_preset(mine, (8, 9)) == mine  # explicit flags win
    exact = app.parse_args([])[1]
    assert exact.preset == "exact" and app.apply_preset(exact, (8, 9)) == exact  # no preset: bf16, nothing changes
    monkeypatch.setenv("QIL_PRESET", "fast")
    assert app.apply_preset(app.parse_args([])[1], (8, 6)).quantization == "int8_w8a8"
    with pytest.raises(SystemExit):
        app.parse_args(["--preset", "turbo"])


@pytest.mark.parametrize("kwargs, expected", [
    (dict(on_cuda=False, capability=None, sage_version="2.2.0", triton=True), "needs a CUDA GPU"),
    (dict(on_cuda=True, capability=(7, 5), sage_version="2.2.0", triton=True), "capability 8.0 or newer; this GPU is 7.5"),
    (dict(on_cuda=True, capability=(8, 9), sage_version=None, triton=True), "is not installed. PyPI has only 1.0.6"),
    (dict(on_cuda=True, capability=(8, 9), sage_version="1.0.6", triton=True), "1.0.6 is installed and diffusers needs >= 2.1.1"),
    (dict(on_cuda=True, capability=(8, 9), sage_version="2.2.0", triton=False), "pip install triton-windows"),
    (dict(on_cuda=True, capability=(8, 9), sage_version="2.2.0", triton=True), None),
])
def test_sage_attention_says_why_it_cannot_run(kwargs, expected):
    problem = w8a8.sage_attention_problem(**kwargs)
    assert problem is None if expected is None else expected in problem


def test_pips_sageattention_is_too_old_for_diffusers_and_the_app_says_so_instead_of_crashing(monkeypatch):
    monkeypatch.setattr(app, "package_version", lambda package: "1.0.6" if package == "sageattention" else None)
    monkeypatch.setattr(app, "triton_available", lambda: True)
    assert ("sageattention 1.0.6 is installed and diffusers needs >= 2.1.1 (PyPI's 1.0.6 is too old): build it from "
            "https://github.com/thu-ml/SageAttention.") in app.sage_attention_unavailable(True, (8, 9))
    monkeypatch.setattr(app, "package_version", lambda package: "2.2.0" if package == "sageattention" else None)
    assert app.sage_attention_unavailable(True, (8, 9)) is None
    assert "this GPU is 7.5" in app.sage_attention_unavailable(True, (7, 5))


def test_sage_attention_on_this_cpu_machine_is_refused_with_the_reason_and_the_load_goes_on(models_dir, caplog):
    assert app.sage_attention_unavailable(False) == "SageAttention not applied: it needs a CUDA GPU."
    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        loaded = app.load_pipeline(demo_settings(models_dir, sage_attention=True))
    assert "SageAttention not applied: it needs a CUDA GPU." in caplog.text
    assert "sage_attention" not in loaded.optimizations


# ----------------------------------------------------------------------------------------------------
# Through the app: the engine, the block range, params.json, the page, the planner, evaluate
# ----------------------------------------------------------------------------------------------------
# A given prompt (no caption) and no CFG: one transformer call a step, the cheapest decomposition.
RUN = dict(prompt="a red circle on a blue square", layers=2, num_inference_steps=2, seed=11, true_cfg_scale=1.0)


def test_budget_and_fast_give_the_layers_of_off_and_fast(models_dir, rgba_image):
    """The Fast preset (int8 on this CPU: the reference matmul; FirstBlockCache at 0.1) with every weight resident,
    against the same under the low-VRAM engine with only block 0 resident and blocks 1-3 behind the streaming hooks
    (planned from the modules, as a bench's pipeline is; `load_pipeline` plans from the files: its sizes below)."""
    fast = dict(preset="fast", first_block_cache=True)  # FirstBlockCache left at its default: the preset's
    off = app.load_pipeline(demo_settings(models_dir, **fast))
    assert (off.quant.name, off.preset, off.lossy) == ("int8_w8a8", "fast", True)
    assert "first_block_cache(threshold=0.1)" in off.optimizations
    streamed = app.load_pipeline(demo_settings(models_dir, **fast))
    engine_on(streamed, resident_blocks=1)
    planned = app.load_pipeline(demo_settings(models_dir, offload="budget", **fast))
    assert planned.machine.sizes["ram_only_blocks"] == streamed.machine.sizes["ram_only_blocks"] == (0, 1, 2, 3)
    assert streamed.machine.default.streamed_blocks == (1, 2, 3)
    reference, result = (app.infer(loaded, rgba_image, **RUN) for loaded in (off, streamed))
    assert streamed.stages.plan.streamed_blocks == (1, 2, 3)  # the run went through the hooks
    for ours, theirs in zip(result.layers, reference.layers, strict=True):
        assert ours.tobytes() == theirs.tobytes()


def test_blocks_outside_the_range_keep_their_weights_and_params_json_the_page_and_the_log_say_what_was_quantized(
        models_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        loaded = app.load_pipeline(demo_settings(models_dir, preset="fast", quantization="fp8_w8a8",
                                                 quantized_blocks="1-2"))
    files = load_file(loaded.model_path / "transformer" / "diffusion_pytorch_model.safetensors")
    for index, block in enumerate(loaded.pipe.transformer.transformer_blocks):
        for name in w8a8.TOKENWISE_LINEARS:
            layer = block.get_submodule(name)
            if index in (1, 2):
                assert type(layer) is w8a8.W8A8Linear and layer.weight.dtype == torch.float8_e4m3fn
            else:  # the file's weights as they were loaded
                assert type(layer) is torch.nn.Linear
                assert torch.equal(layer.weight, files[f"transformer_blocks.{index}.{name}.weight"])
    what = dict(quantized_blocks="1-2", bf16_blocks="0,3", kernel="reference matmul (no CUDA)")
    info = loaded.run_info()
    assert (info["quantization"], info["lossy"], info["preset"], info["quantized"]) == ("fp8_w8a8", True, "fast", what)
    assert ("LOSSY: --quantization fp8_w8a8, quantized_blocks 1-2, bf16_blocks 0,3, kernel reference matmul (no CUDA): "
            "the layers differ from the model's bf16 output.") in caplog.text
    demo = app.build_ui(loaded, demo_settings(models_dir, outputs=tmp_path / "ui"))
    props = [c["props"] for c in demo.config["components"]]
    [banner] = [p["value"] for p in props if "Lossy mode in use" in str(p.get("value", ""))]
    assert "(fp8_w8a8: transformer blocks' matmuls in float8" in banner and "quantized blocks 1-2; bf16 blocks 0,3" in banner
    [preset] = [p for p in props if p.get("label") == "Preset"]
    assert preset["value"] == "fast" and preset["interactive"] is False and "--preset fast" in preset["info"]


def test_the_planner_sizes_the_8_bit_blocks_from_the_files_as_they_load(models_dir):
    path = app.get_model_path(demo_settings(models_dir))
    bf16 = budget_sizes_from_files(path, 4)
    sizes, exact = planner_sizes(path, 4, QUANT["int8_w8a8"], "0,3")
    assert exact == bf16 and "block_gbs" not in bf16 and sizes["ram_only_blocks"] == (0, 3)
    # Blocks 0 and 3: their token-wise weights at 1 byte instead of float32's 4; blocks 1 and 2 as they were.
    tokenwise = sum(m.weight.numel() for name, m in _demo_transformer(path).transformer_blocks[0].named_modules()
                    if name in w8a8.TOKENWISE_LINEARS)
    assert sizes["block_gbs"] == pytest.approx((bf16["block_gb"] - 3 * tokenwise / 2**30, bf16["block_gb"],
                                                bf16["block_gb"], bf16["block_gb"] - 3 * tokenwise / 2**30), abs=1e-12)
    assert sizes["block_gb"] == bf16["block_gb"]  # the largest: the streaming buffers are sized for it
    loaded = app.load_pipeline(demo_settings(models_dir, quantization="int8_w8a8", quantized_blocks="0,3"))
    from_modules = plan_loaded(loaded.pipe, float("inf"), quant=loaded.quant).sizes
    scales = sum(4 * m.weight_scale.numel() for m in loaded.pipe.transformer.transformer_blocks[0].modules()
                 if isinstance(m, w8a8.W8A8Linear))  # float32 scales: not in the files
    assert from_modules["block_gbs"] == pytest.approx(
        tuple(gb + scales / 2**30 * (i in (0, 3)) for i, gb in enumerate(sizes["block_gbs"])), abs=1e-12)
    assert from_modules["ram_only_blocks"] == (0, 3) and "text_layer_fp8_gb" not in from_modules


def test_fp8_w8a8_under_the_engine_keeps_the_text_encoder_in_bf16(models_dir):
    """fp8_w8a8's weights are float8 like fp8_storage's, but only fp8_storage stores text encoder layers in float8
    (16 and 12 GB cards): the engine reads the mode, not the weights' dtypes."""
    from studio.engine.memory import text_encoder_parts

    loaded = app.load_pipeline(demo_settings(models_dir, quantization="fp8_w8a8"))
    applied = engine_on(loaded, resident_blocks=1, text_resident_layers=1)
    assert "1/2 language layers resident, 1 streamed" in " ".join(applied)
    layers = text_encoder_parts(loaded.pipe.text_encoder)[0]
    assert {p.dtype for layer in layers for p in layer.parameters()} == {torch.float32}


# The real model (bench/RESULTS.md): a bf16 block 0.633 GB, of which 226,492,416 token-wise weights (2 x 3072 x 3072
# x 4 attention, 2 x 3072 x 12288 x 2 feed-forward) go to 1 byte; the modulation (113.2M weights) stays bf16.
FAST_BLOCK = REAL["block_gb"] - 226_492_416 / 2**30  # 0.422 GB
FAST = dict(REAL, block_gbs=tuple(FAST_BLOCK if 12 <= i <= 47 else REAL["block_gb"] for i in range(60)),
            ram_only_blocks=tuple(range(12, 48)))


def test_fast_keeps_more_blocks_resident_and_streams_fewer_bytes_on_a_24_gb_card():
    bf16, fast = (plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **sizes) for sizes in (REAL, FAST))
    # What the blocks may take: 23 GB less the other weights, the VAE, activations of 10,200 tokens, the 3 GB margin and
    # two bf16-sized blocks in flight (a bf16 sensitive block may stream).
    room = 23.0 - (REAL["other_transformer_gb"] + REAL["vae_gb"] + 0.25 + 10_200 * 116 * 1024 / 2**30 + 3.0) \
        - 2 * REAL["block_gb"]
    assert len(bf16.resident_blocks) == 26 and len(fast.resident_blocks) == 33
    held = sum(FAST["block_gbs"][i] for i in fast.resident_blocks)
    assert held <= room < held + FAST_BLOCK  # as many as fit, each at its own size
    assert sum(FAST["block_gbs"][i] for i in fast.streamed_blocks) == pytest.approx(13.72, abs=0.01)  # bf16: 21.52
    # 32 GB of RAM (29.4 available): the 36 8-bit blocks first (no file holds them), then bf16 blocks as they fit.
    ram = plan_host_ram(fast, FAST, 29.4)
    assert set(range(12, 48)) <= set(ram.pinned_blocks) and len(ram.pinned_blocks) == 48


def test_a_bf16_refusal_names_the_fast_presets_figures(models_dir, monkeypatch):
    # The real model at 8 GB of VRAM and 16 GB of RAM: bf16 is refused; Fast needs as much VRAM (block 0 and the
    # buffers stay bf16) and more RAM (its 36 8-bit blocks, 15.2 GB, held in RAM): the advice says so.
    with pytest.raises(ValueError) as err:
        plan_machine(OFFLOAD["budget"], REAL, 8.0, 16.0, fast_sizes=FAST)
    needed = budget_minimum_ram_gb(FAST, 8.0)
    assert needed > 6.0 + 36 * FAST_BLOCK > 16.0
    assert (f"The Fast preset, --preset fast (LOSSY: 8-bit matmuls in 36 of the 60 transformer blocks (12-47), their "
            f"weights at 1 byte, 15.2 GB held in RAM), needs at least {budget_minimum_gb(REAL):.1f} GB of VRAM and, at "
            f"8.0 GB of VRAM, {needed:.1f} GB of RAM available: it does not fit this machine either.") in str(err.value)
    # The demo (its 4 blocks all in 8 bits: smaller streaming buffers) on a card between the two minimums: only Fast
    # fits, and the refusal says so, before anything loads.
    path = app.get_model_path(demo_settings(models_dir))
    bf16_min, fast_min = budget_minimum_gb(budget_sizes_from_files(path, 4)), budget_minimum_gb(fast_sizes(path, 4))
    between = (bf16_min + fast_min) / 2
    with pytest.raises(ValueError, match=r"The Fast preset, --preset fast \(LOSSY: 8-bit matmuls in 4 of the 4 "
                                         r"transformer blocks \(0-3\).*: it fits this machine \(pass --preset fast\)\."):
        app.load_pipeline(demo_settings(models_dir, offload="budget", vram_budget_gb=between))
    loaded = app.load_pipeline(demo_settings(models_dir, offload="budget", vram_budget_gb=between, preset="fast"))
    assert loaded.machine.default.minimum_gb == pytest.approx(fast_min) and loaded.quant.name == "int8_w8a8"


def test_evaluate_grids_the_quantization_and_the_blocks_loading_once_per_setting(models_dir, tmp_path, capsys):
    assert parse_grid(["steps=2,4", "quantized_blocks=1-2,0+3", "quantization=bf16,int8_w8a8"]) == [
        {"quantization": "bf16", "steps": 2}, {"quantization": "bf16", "steps": 4},  # bf16 chooses no blocks: once
        *({"quantization": "int8_w8a8", "quantized_blocks": blocks, "steps": steps}
          for blocks in ("1-2", "0,3") for steps in (2, 4))]
    with pytest.raises(ValueError, match="a quantization is one of bf16, fp8_storage"):
        parse_grid(["quantization=int4"])
    from studio.exports import export_psd
    from test_evaluate import truth

    psd = export_psd(truth(), tmp_path / "design.psd")
    out = tmp_path / "out"
    code = app.main(["evaluate", str(psd), "--demo", "--models-dir", str(models_dir), "--no-first-block-cache",
                     "--steps", "2", "--true-cfg-scale", "1", "--prompt", "squares", "--layers", "2", "--grid",
                     "quantization=bf16,int8_w8a8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "evaluate.json").read_text())
    assert [row["settings"] for row in report["rows"]] == ["quantization=bf16", "quantization=int8_w8a8"]
    loads = report["loads"]
    assert (loads["quantization=bf16"]["lossy"], loads["quantization=int8_w8a8"]["lossy"]) == (False, True)
    assert loads["quantization=int8_w8a8"]["quantized"]["quantized_blocks"] == "0-3"
    bf16, int8 = (read_layered_file(out / "pred" / label / "design") for label in ("quantization-bf16",
                                                                                   "quantization-int8-w8a8"))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(bf16, int8, strict=True))  # two models ran
