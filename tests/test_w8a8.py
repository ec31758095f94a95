"""W8A8 (src/studio/w8a8.py): its math checked by hand and against a float reference within a bound derived from the
quantization steps, the block range honoured, and its weights moved by their bytes as the low-VRAM engine moves them.

Every test here runs on the CPU, so the 8-bit products go through `reference_matmul` (the demo transformer is 32 wide;
there is no CUDA): the kernels `torch._int_mm` / `torch._scaled_mm` share everything but the sum with it, and are
checked on a GPU when the module is wired into the app."""

import itertools
import math
import re

import numpy as np
import pytest
import torch

import app
from conftest import demo_settings
from studio import w8a8

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
    record = w8a8.w8a8_record("int8_w8a8", w8a8.default_quantized_blocks(60), 60, on_cuda=False)
    assert record["quantized_blocks"] == "12-47" and record["bf16_blocks"] == "0-11,48-59" and record["lossy"]


@pytest.mark.parametrize("mode, capability, expected", [
    ("fp8_w8a8", (8, 6), r"fp8_w8a8 needs a GPU of compute capability 8\.9 .* this one is 8\.6 \(use --quantization int8_w8a8\)"),
    ("int8_w8a8", (7, 5), r"int8_w8a8 needs a GPU of compute capability 8\.0 .*torch\._int_mm; this one is 7\.5$"),
    ("fp8_w8a8", (8, 9), None), ("int8_w8a8", (8, 0), None), ("fp8_w8a8", None, None),
])
def test_a_mode_the_gpu_cannot_run_says_why(mode, capability, expected):
    problem = w8a8.w8a8_problem(mode, capability)
    assert problem is None if expected is None else re.search(expected, problem)


def test_fast_takes_int8_on_ampere_and_ada_and_fp8_from_hopper_on():
    assert [w8a8.fast_mode_for(c) for c in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0), None]] == [
        None, "int8_w8a8", "int8_w8a8", "int8_w8a8", "fp8_w8a8", "fp8_w8a8", "int8_w8a8"]
    assert not w8a8.PRESETS["exact"].lossy and w8a8.PRESETS["exact"].quantization is None


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


def test_sage_attention_here_on_this_cpu_machine():
    assert w8a8.sage_attention_problem_here() == "SageAttention not applied: it needs a CUDA GPU."


# ----------------------------------------------------------------------------------------------------
# Through the engine: budget + 8-bit computes what off + 8-bit computes
# ----------------------------------------------------------------------------------------------------
def test_the_engine_plans_and_streams_8_bit_blocks_and_they_compute_what_off_computes(models_dir):
    """The Fast preset's parts (8-bit blocks, FirstBlockCache at 0.1) under the low-VRAM engine with only block 0
    resident, the others behind its streaming hooks, against every weight resident. On the CPU the engine moves
    nothing (`_host_copies`); the whole decomposition through `infer` is checked where the app offers the mode."""
    outputs = []
    for streaming in (False, True):
        pipe = app.load_pipeline(demo_settings(models_dir, first_block_cache=True))
        w8a8.quantize_blocks(pipe.transformer, "int8_w8a8", "default")
        if streaming:
            app.enable_budget_offload(pipe, vram_budget_gb=float("inf"), resident_blocks=1)
        with torch.no_grad(), pipe.transformer.cache_context("cond"):
            outputs.append(pipe.transformer(**_transformer_inputs(1))[0])
        if streaming:
            assert pipe._budget_stages.plan.streamed_blocks == (1, 2, 3)
            assert pipe._budget_stages.current == "transformer"
    assert torch.equal(*outputs)
