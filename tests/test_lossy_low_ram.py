"""The opt-in lossy weights on 32 GB machines (issue 12): --quantization fp8_storage planned by the budget mode's host
RAM planner at its stored sizes (the transformer's Linear weights at 1 byte, held in RAM; the text encoder bf16, read
from the files), the refusals that name its figures, and the engine's exactness under it on the demo pipeline.
Planner figures are written out by hand from the real model's sizes; time and disk reads: bench/bench_low_ram.py
--quantization fp8_storage."""

import json
import sys

import pytest
import torch

import app
import studio.engine.plan
from studio.engine.stream import plan_loaded
from studio.engine.memory import budget_sizes_from_files, text_encoder_parts
from studio.engine.plan import BUDGET_HOST_RAM_RESERVE_GB, BUDGET_PAGE_CACHE_MIN_GB, budget_minimum_ram_gb, plan_budget, plan_host_ram, streamed_block_indices
from studio.quant import apply_fp8_text_layers, fp8_storage_element_sizes, fp8_storage_sizes, planner_sizes
from studio.modes import BF16, QUANT
from studio.runs import save_run
from conftest import demo_settings, engine_on, machine_fits
from test_low_ram import _file_of, _mapped_files
from test_small_cards import DEFAULT_JOB_TOKENS, REAL

GIB = 2**30
# The real transformer under fp8_storage (diffusers' layerwise casting, measured on the meta device): a block's
# weights at 1 byte but its four 128-wide q/k RMSNorm weights in bf16 (2 bytes: +512 bytes); outside the blocks
# norm_out.linear (6144 x 3072 + 6144), proj_out (64 x 3072 + 64) and txt_norm (3584) stay bf16, 19,080,768 weights,
# the other 21,448,832 (img_in, txt_in, the timestep embedding) at 1 byte.
BLOCK_FP8 = REAL["block_gb"] / 2 + 4 * 128 / GIB
OTHER_FP8 = (19_080_768 * 2 + 21_448_832) / GIB
# A text encoder language layer stored in float8 (16 GB cards): its 233,050,624 Linear weights and biases at 1 byte,
# its two 3584-wide RMSNorm weights in bf16.
TEXT_LAYER_FP8 = (233_050_624 + 2 * 3584 * 2) / GIB
FP8 = dict(REAL, block_gb=BLOCK_FP8, other_transformer_gb=OTHER_FP8, text_layer_fp8_gb=TEXT_LAYER_FP8)
TRANSFORMER_FP8 = 60 * BLOCK_FP8 + OTHER_FP8  # 19.05 GB
RESERVE = BUDGET_HOST_RAM_RESERVE_GB + BUDGET_PAGE_CACHE_MIN_GB  # 4 + 2


def test_on_a_24_gb_card_with_32_gb_fp8_keeps_the_whole_transformer_in_ram_and_the_text_encoder_in_its_files():
    plan = plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **FP8)
    # Resident blocks at the default job (640 px, 4 layers): 23 GB less the fixed part (the other weights, the VAE,
    # activations of 9,600 + 600 tokens at 116 KB and 0.25 GB fixed, the 3 GB margin) and two blocks in flight.
    fixed = OTHER_FP8 + REAL["vae_gb"] + 0.25 + 10_200 * 116 * 1024 / GIB + 3.0
    assert len(plan.resident_blocks) == int((23.0 - fixed - 2 * BLOCK_FP8) // BLOCK_FP8) == 55  # bf16: 26
    ram = plan_host_ram(plan, FP8, 29.4, transformer_in_ram=True)  # a 32 GB desktop (2 GB for its own use)
    assert ram.pinned_blocks == tuple(range(60)) and ram.pin_transformer_rest
    assert not ram.pin_text_encoder and ram.pinned_text_layers == ()
    assert ram.pinned_gb == pytest.approx(TRANSFORMER_FP8) and TRANSFORMER_FP8 == pytest.approx(19.05, abs=0.01)
    # 29.4 - 6 - 19.05 = 4.35 GB left: the text encoder's 15.4 GB stay in the files, read once per image at worst.
    assert ram.file_backed_gb == pytest.approx(REAL["text_encoder_gb"])
    assert ram.disk_read_gb_per_image == pytest.approx(REAL["text_encoder_gb"])  # bf16 here: 31 GB, 35 GB measured


def test_on_a_16_gb_card_with_32_gb_fp8_reads_no_transformer_block_and_keeps_the_text_encoder_bf16():
    """The caption's two phases hold every bf16 language layer at 16 GB (tests/test_small_cards.py): no text layer is
    stored in float8 and none streams; the text encoder stays in its files, read once per caption at worst."""
    plan = plan_budget(15.0, image_tokens=DEFAULT_JOB_TOKENS, **FP8)
    text = plan.text_encoder
    assert text == plan_budget(15.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL).text_encoder  # as bf16 plans it
    assert text.resident_layers == tuple(range(28)) and text.fp8_layers == () == text.streamed_layers
    ram = plan_host_ram(plan, FP8, 29.4, transformer_in_ram=True)
    assert ram.pinned_blocks == tuple(range(60)) and ram.pinned_text_layers == ()
    assert ram.pinned_gb == pytest.approx(TRANSFORMER_FP8)
    # bf16 at 16/32: blocks from disk at every call (657 GB per image planned). fp8: the text encoder, once per caption.
    assert ram.disk_read_gb_per_image == pytest.approx(REAL["text_encoder_gb"])


def test_on_a_12_gb_card_with_32_gb_fp8_streams_no_text_layer():
    plan = plan_budget(11.0, image_tokens=DEFAULT_JOB_TOKENS, **FP8)
    text = plan.text_encoder
    # bf16 keeps 17 of 28 layers and streams 11 per caption token (4.8 GB a token). fp8: the language phase holds
    # lm_head and the final norm, the VAE, 0.5 GB of activations, 10 bf16 layers and 18 float8 ones: 9.999 GB, under
    # 11 GB less the 1 GB margin; an 11th bf16 layer would not fit. The vision tower runs before, alone.
    head = REAL["text_encoder_gb"] - 28 * REAL["text_layer_gb"] - REAL["text_vision_gb"] - REAL["text_embed_gb"]
    fixed = head + REAL["vae_gb"] + 0.5
    assert fixed + 10 * REAL["text_layer_gb"] + 18 * TEXT_LAYER_FP8 + 1.0 <= 11.0
    assert fixed + 11 * REAL["text_layer_gb"] + 17 * TEXT_LAYER_FP8 + 1.0 > 11.0
    assert len(text.resident_layers) == 10 and len(text.fp8_layers) == 18 and text.streamed_layers == ()
    assert text.streamed_gb_per_token == 0.0 and text.peak_gb == pytest.approx(fixed + 10 * REAL["text_layer_gb"]
                                                                                 + 18 * TEXT_LAYER_FP8)
    assert 0 in text.resident_layers and text.fp8_layers == streamed_block_indices(28, 10)  # spread, layer 0 bf16
    ram = plan_host_ram(plan, FP8, 29.4, transformer_in_ram=True)
    assert ram.pinned_blocks == tuple(range(60)) and ram.pinned_text_layers == text.fp8_layers
    # The float8 layers exist only in RAM: page-locked.
    assert ram.pinned_gb == pytest.approx(TRANSFORMER_FP8 + 18 * TEXT_LAYER_FP8)
    assert ram.disk_read_gb_per_image == pytest.approx(REAL["text_encoder_gb"] - 18 * REAL["text_layer_gb"])


def test_where_even_float8_text_layers_do_not_fit_fp8_streams_the_bf16_text_layers_as_before():
    """Even 1 bf16 layer beside 27 float8 ones does not fit 7 GB (an 8 GB card): the split streams, exact, as in bf16."""
    fp8, bf16 = (plan_budget(7.0, image_tokens=DEFAULT_JOB_TOKENS, **sizes).text_encoder for sizes in (FP8, REAL))
    assert fp8 == bf16 and fp8.fp8_layers == () and len(fp8.streamed_layers) > 0


def test_fp8_never_leaves_transformer_blocks_in_the_files_it_refuses_with_the_figures():
    plan = plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **FP8)
    needed = RESERVE + TRANSFORMER_FP8  # 25.05 GB
    with pytest.raises(ValueError) as err:
        plan_host_ram(plan, FP8, 24.0, transformer_in_ram=True)
    assert (f"its transformer is held in RAM in float8 ({TRANSFORMER_FP8:.1f} GB; no file holds those copies), so it "
            f"needs at least {needed:.1f} GB") in str(err.value) and "24.0 GB is available" in str(err.value)
    plan_host_ram(plan, FP8, needed + 0.01, transformer_in_ram=True)  # the figure it names is enough
    # The same sizes planned as bf16 files would have left blocks in the files: the flag is what holds them.
    assert plan_host_ram(plan, FP8, 24.0).pinned_blocks != tuple(range(60))
    assert budget_minimum_ram_gb(FP8, 23.0, fp8_storage=True) == 25.5  # 25.05 up to the planner's 0.5 GB step


def test_an_fp8_refusal_says_what_bf16_needs_and_a_disk_bound_bf16_plan_names_fp8():
    # 24 GB of VRAM, 24 GB of RAM: fp8 needs 25.05 GB (above); bf16 fits from 6 GB: 4 for the system and 2 of page
    # cache, every block in the files: 34 streamed at the default job x 0.633 GB x 100 calls + 26 resident + the text
    # encoder = 2,184 GB from disk per image, under the 2,500 GB limit.
    assert 34 * 0.633 * 100 + 26 * 0.633 + REAL["other_transformer_gb"] + REAL["text_encoder_gb"] < 2500
    with pytest.raises(ValueError, match=r"Without --quantization \(bf16, exact\) the budget mode leaves the "
                                         r"transformer in its files and needs 6\.0 GB of RAM here\."):
        machine_fits("budget", FP8, vram_gb=23.0, ram_gb=24.0, fp8_storage=True, exact_sizes=REAL)
    # 16 GB / 32 GB in bf16 reads blocks at every call (657 GB per image): the load log names fp8's figures.
    hint = machine_fits("budget", REAL, 15.0, 29.4, lossy_sizes=FP8).hint
    assert "--quantization fp8_storage (LOSSY" in hint and "in float8 too" not in hint  # the text encoder stays bf16
    assert f"reads up to {REAL['text_encoder_gb']:.0f} GB per image" in hint  # 15 GB
    # 12 GB / 32 GB: 18 text layers in float8 too.
    hint = machine_fits("budget", REAL, 11.0, 29.4, lossy_sizes=FP8).hint
    assert "18 of the text encoder's 28 layers in float8 too" in hint
    assert f"reads up to {REAL['text_encoder_gb'] - 18 * REAL['text_layer_gb']:.0f} GB per image" in hint  # 8 GB
    assert machine_fits("budget", REAL, 23.0, 29.4, lossy_sizes=FP8).hint is None  # 24 / 32: bf16 reads 31 GB, less than its weights


def test_the_fp8_sizes_read_from_the_files_are_those_of_the_cast_model(models_dir):
    pipe = app.load_pipeline(demo_settings(models_dir, quantization="fp8_storage"))
    path = pipe.model_path
    stored = fp8_storage_element_sizes(path)
    cast = {name for name, p in pipe.pipe.transformer.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert set(stored) == cast and set(stored.values()) == {1}
    loaded = plan_loaded(pipe.pipe, float("inf"), quant=pipe.quant).sizes  # the modules' sizes, the float8 layer's too
    from_files = fp8_storage_sizes(path, 4)  # float32 on the CPU, the cast weights at 1 byte
    assert set(from_files) == set(loaded)
    for key, value in loaded.items():
        assert from_files[key] == pytest.approx(value, abs=2**-20), key
    bf16 = budget_sizes_from_files(path, 4)
    assert from_files["block_gb"] < bf16["block_gb"] / 3  # float32 -> float8, the norms excepted
    # A text encoder layer cast as the engine casts it (16 GB cards) holds what the planner counted: its Linear
    # weights and biases at 1 byte, its two RMSNorm weights in float32.
    layer = text_encoder_parts(pipe.pipe.text_encoder)[0][1]
    apply_fp8_text_layers(pipe.pipe.text_encoder, (1,))
    linear = sum(p.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    norms = sum(p.numel() for name, p in layer.named_parameters() if "norm" in name)
    assert linear + norms == sum(p.numel() for p in layer.parameters()) and norms > 0
    assert {p.dtype for m in layer.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()} == {torch.float8_e4m3fn}
    assert from_files["text_layer_fp8_gb"] == pytest.approx((linear + 4 * norms) / GIB, abs=2**-30)
    assert planner_sizes(path, 4, QUANT["fp8_storage"]) == (from_files, bf16)  # bf16's, for an fp8 refusal's advice
    assert planner_sizes(path, 4, BF16) == (bf16, from_files)  # the lossy figures, for a bf16 refusal's advice


def test_a_machine_bf16_does_not_fit_but_fp8_does_is_told_the_flag_and_its_figures():
    # A 6 GB card (5.8 GB free) with 40 GB of RAM: the budget mode needs 6.6 GB of VRAM in bf16, so `auto` takes
    # sequential, which keeps all 53.5 GB of bf16 weights in RAM. In fp8 the budget mode fits.
    with pytest.raises(ValueError) as err:
        machine_fits("sequential", REAL, vram_gb=5.8, ram_gb=40.0, lossy_sizes=FP8)
    message = str(err.value)
    fp8_ram = budget_minimum_ram_gb(FP8, 5.8, fp8_storage=True)
    assert RESERVE + TRANSFORMER_FP8 < fp8_ram <= 40.0  # plus the text encoder's streamed layers at this card
    for part in ("This machine: 5.8 GB of VRAM, 40.0 GB of RAM available.", "needs 53.5 GB plus 4 GB",
                 "The lossy option, --quantization fp8_storage (LOSSY: the transformer stored in float8, 19.0 GB held "
                 "in RAM; the text encoder stays bf16), needs at least 5.6 GB of VRAM and, at 5.8 GB of VRAM, "
                 f"{fp8_ram:.1f} GB of RAM available: it fits this machine (pass --quantization fp8_storage)."):
        assert part in message
    machine_fits("budget", FP8, vram_gb=5.8, ram_gb=40.0, fp8_storage=True)  # and it does


def test_a_machine_that_fits_nothing_names_what_it_has_the_smallest_modes_needs_and_the_lossy_ones():
    with pytest.raises(ValueError) as err:
        machine_fits("budget", REAL, vram_gb=8.0, ram_gb=16.0, lossy_sizes=FP8)
    message = str(err.value)
    for part in ("This machine: 8.0 GB of VRAM, 16.0 GB of RAM available.",
                 f"at 8.0 GB of VRAM it needs {budget_minimum_ram_gb(REAL, 8.0):.1f} GB of RAM available",
                 "--quantization fp8_storage (LOSSY", "it does not fit this machine either."):
        assert part in message
    # fp8 at 8 GB needs more RAM than 16 GB: 6 GB reserved, 19.05 GB of float8 transformer, streamed text layers.
    assert budget_minimum_ram_gb(FP8, 8.0, fp8_storage=True) > RESERVE + TRANSFORMER_FP8 > 16.0


def test_too_little_ram_for_fp8_exits_2_naming_the_float8_transformer(models_dir, tmp_path, rgba_image, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(studio.engine.plan, "BUDGET_HOST_RAM_RESERVE_GB", 0.0)  # the demo's weights are a few MB
    monkeypatch.setattr(studio.engine.plan, "BUDGET_PAGE_CACHE_MIN_GB", 0.0)
    rgba_image.save(tmp_path / "in.png")
    code = app.main(["decompose", str(tmp_path / "in.png"), "--demo", "--models-dir", str(models_dir), "--offload",
                     "budget", "--quantization", "fp8_storage", "--ram-budget", "0.00001", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists()
    assert "Not enough host RAM for --quantization fp8_storage in the budget mode" in err
    assert "The budget mode with --quantization fp8_storage (LOSSY: the transformer in float8, held in RAM)" in err
    assert "Without --quantization (bf16, exact) the budget mode leaves the transformer in its files and needs" in err


def test_fp8_budget_with_little_ram_gives_the_layers_of_fp8_off_and_reads_the_text_encoder_from_its_files(
        demo_pipe, models_dir, rgba_image, monkeypatch, tmp_path):
    """The text encoder split as on a 16 GB card (1 of its 2 layers bf16): under fp8_storage the other layer is
    stored in float8 and stays resident instead of streaming. The reference is fp8 + --offload off with the same layer
    cast by diffusers' apply_layerwise_casting directly; the caption (empty prompt) runs through both."""
    from diffusers.hooks import apply_layerwise_casting

    monkeypatch.setattr(studio.engine.plan, "BUDGET_HOST_RAM_RESERVE_GB", 0.0)
    monkeypatch.setattr(studio.engine.plan, "BUDGET_PAGE_CACHE_MIN_GB", 0.0)
    kwargs = dict(prompt="", layers=2, num_inference_steps=2, seed=7)
    reference_pipe = app.load_pipeline(demo_settings(models_dir, quantization="fp8_storage"))
    apply_layerwise_casting(text_encoder_parts(reference_pipe.pipe.text_encoder)[0][1], torch.float8_e4m3fn,
                            torch.float32)
    reference = app.infer(reference_pipe, rgba_image, **kwargs)
    pipe = app.load_pipeline(demo_settings(models_dir, quantization="fp8_storage"))
    sizes = plan_loaded(pipe.pipe, float("inf"), quant=pipe.quant).sizes  # with the float8 language layer's size
    transformer = sizes["num_blocks"] * sizes["block_gb"] + sizes["other_transformer_gb"]
    ram_gb = transformer + sizes["text_layer_fp8_gb"] + sizes["text_encoder_gb"] / 4  # not the whole text encoder
    applied = engine_on(pipe, float("inf"), resident_blocks=1, text_resident_layers=1,
                                        host_ram_gb=ram_gb)
    split = next(a for a in applied if a.startswith("budget_text_encoder_split"))
    assert "1/2 language layers resident, 1 in float8 (LOSSY), all resident (nothing copied per caption token)" in split
    low_ram = next(a for a in applied if a.startswith("budget_low_ram"))
    assert f"{sizes['num_blocks']} transformer blocks, 1 text encoder layers)" in low_ram
    layers = text_encoder_parts(pipe.pipe.text_encoder)[0]
    assert {p.dtype for p in layers[1].parameters()} == {torch.float8_e4m3fn, torch.float32}  # its norms stay
    assert {p.dtype for p in layers[0].parameters()} == {torch.float32}
    if sys.platform.startswith("linux"):
        spans = _mapped_files()  # the cast weights are float8 copies in RAM; the text encoder's others are its files'
        files = [(_file_of(p, spans) or "").endswith(".safetensors")
                 for p in [*pipe.pipe.transformer.parameters(), *layers[1].parameters()] if p.dtype == torch.float8_e4m3fn]
        assert files and not any(files)
        assert all((_file_of(p, spans) or "").endswith(".safetensors") for name, p in
                   pipe.pipe.text_encoder.named_parameters() if p.dtype != torch.float8_e4m3fn and ".layers.1." not in name)
    result = app.infer(pipe, rgba_image, **kwargs)
    assert result.caption == reference.caption and len(result.caption) > 100
    for ours, theirs in zip(result.layers, reference.layers, strict=True):
        assert ours.tobytes() == theirs.tobytes()
    # fp8 changes the layers (lossy) and says so wherever it is recorded.
    bf16 = app.infer(demo_pipe, rgba_image, **kwargs)  # the session's bf16 (float32 on the CPU) demo pipeline
    assert any(a.tobytes() != b.tobytes() for a, b in zip(bf16.layers, reference.layers, strict=True))
    assert reference_pipe.lossy is True
    assert "fp8_storage (LOSSY: transformer weights stored in float8, computed in bf16 (half the weight memory))" \
        in reference_pipe.optimizations
    paths = save_run(result, tmp_path, reference_pipe.run_info())
    params = json.loads(paths["params"].read_text())
    assert params["lossy"] is True and any("LOSSY" in name for name in params["optimizations"])
    # ... and on the page: the banner names the mode (a bf16 pipeline's page has none).
    def banners(pipe):
        demo = app.build_ui(pipe, demo_settings(models_dir, outputs=tmp_path / "ui"))
        return [c["props"].get("value", "") for c in demo.config["components"] if c["type"] == "markdown"
                and "Lossy mode in use" in str(c["props"].get("value", ""))]
    [banner] = banners(reference_pipe)
    assert "(fp8_storage: transformer weights stored in float8, computed in bf16" in banner
    assert not banners(demo_pipe)


def test_a_transformer_config_naming_no_diffusers_model_is_refused_for_fp8_and_only_drops_the_advice_for_bf16(
        models_dir, tmp_path):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(app.get_model_path(demo_settings(models_dir)), folder)
    config = folder / "transformer" / "config.json"
    for name in ("os", "NoSuchModel", None):  # a module attribute that is no model class, an unknown name, none
        config.write_text(json.dumps(dict(json.loads(config.read_text()), _class_name=name)))
        with pytest.raises(ValueError, match=r"names no diffusers model class .*: --quantization fp8_storage cannot"):
            planner_sizes(folder, 4, QUANT["fp8_storage"])
        sizes, lossy = planner_sizes(folder, 4, BF16)
        assert sizes == budget_sizes_from_files(folder, 4) and lossy is None
    # The same for the text encoder's config (its float8 layers are sized from it): the transformer's put back.
    config.write_text(json.dumps(dict(json.loads(config.read_text()), _class_name="QwenImageTransformer2DModel")))
    text_config = folder / "text_encoder" / "config.json"
    for name in (["os"], ["NoSuchModel"], None):
        text_config.write_text(json.dumps(dict(json.loads(text_config.read_text()), architectures=name)))
        with pytest.raises(ValueError, match=r"names no transformers model class .*: --quantization fp8_storage cannot "
                                             r"size its text encoder's float8 layers"):
            planner_sizes(folder, 4, QUANT["fp8_storage"])
        sizes, lossy = planner_sizes(folder, 4, BF16)
        assert sizes == budget_sizes_from_files(folder, 4) and lossy is None
