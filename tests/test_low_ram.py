"""Machines with less host RAM than the weights (32 GB; issue 12): from_pretrained maps the weight files, the budget
mode page-locks what moves most (`plan_host_ram`) and leaves the rest as views of the files. Planner figures are
written out here by hand from the real model's sizes; on the CPU nothing moves, so the demo pipeline checks that the
mode changes nothing but where weights live. Time and disk reads are measured by bench/bench_low_ram.py."""

import sys
from pathlib import Path

import pytest

import app
import studio.engine.memory
import studio.engine.plan
from studio.engine.memory import budget_sizes
from studio.engine.plan import BUDGET_FORWARDS_PER_IMAGE, BUDGET_HOST_RAM_RESERVE_GB, BUDGET_PAGE_CACHE_MIN_GB, budget_minimum_ram_gb, plan_budget, plan_host_ram
from studio.errors import OutOfMemoryError
from conftest import demo_settings, engine_on, machine_fits
from test_small_cards import DEFAULT_JOB_TOKENS, REAL

BLOCK = REAL["block_gb"]
TEXT_LAYER = REAL["text_layer_gb"]
ALLOWANCE = 30.0 - BUDGET_HOST_RAM_RESERVE_GB - BUDGET_PAGE_CACHE_MIN_GB  # a 32 GB desktop: 30 GB available


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's memory mappings of files."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    return spans


def _file_of(tensor, spans) -> str | None:
    address = tensor.data_ptr()
    return next((path for start, end, path in spans if start <= address < end), None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_from_pretrained_leaves_every_weight_a_view_of_its_safetensors_file(models_dir):
    pipe = app.load_pipeline(demo_settings(models_dir))  # float32 files loaded in float32: nothing to convert
    spans = _mapped_files()
    model_path = Path(pipe.model_path).resolve()
    for name in ("transformer", "text_encoder"):
        files = {_file_of(p, spans) for p in getattr(pipe.pipe, name).parameters()}
        assert files == {str(f.resolve()) for f in (model_path / name).glob("*.safetensors")}, name


def test_a_24_gb_card_with_32_gb_of_ram_page_locks_every_streamed_block_and_reads_the_text_encoder_from_the_files():
    plan = plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    ram = plan_host_ram(plan, REAL, 30.0)
    pinned = int(ALLOWANCE // BLOCK)  # 37 of the 60 blocks
    assert ram.low_ram and len(ram.pinned_blocks) == pinned > len(plan.streamed_blocks)
    assert set(plan.streamed_blocks) <= set(ram.pinned_blocks)
    assert ram.pinned_text_layers == () and not ram.pin_text_encoder and ram.pin_transformer_rest
    assert ram.pinned_gb == pytest.approx(pinned * BLOCK + REAL["other_transformer_gb"])
    # Per image: the 23 unpinned resident blocks and the text encoder, once each.
    assert ram.disk_read_gb_per_image == pytest.approx((60 - pinned) * BLOCK + REAL["text_encoder_gb"])


def test_a_12_gb_card_with_32_gb_of_ram_page_locks_the_text_layers_it_streams_first():
    plan = plan_budget(11.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    ram = plan_host_ram(plan, REAL, 30.0)
    text_streamed = plan.text_encoder.streamed_layers
    assert len(text_streamed) == 11 and ram.pinned_text_layers == text_streamed
    pinned = int((ALLOWANCE - 11 * TEXT_LAYER) // BLOCK)
    assert len(ram.pinned_blocks) == pinned < len(plan.streamed_blocks)
    assert set(ram.pinned_blocks) <= set(plan.streamed_blocks)  # the streamed ones first
    assert ram.pin_transformer_rest  # its 0.08 GB fit in what the blocks leave
    unpinned_streamed = len(plan.streamed_blocks) - pinned
    expected = (unpinned_streamed * BLOCK * BUDGET_FORWARDS_PER_IMAGE + len(plan.resident_blocks) * BLOCK
                + REAL["text_encoder_gb"] - 11 * TEXT_LAYER)
    assert ram.disk_read_gb_per_image == pytest.approx(expected)


def test_with_enough_ram_every_weight_is_page_locked_as_before():
    plan = plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    ram = plan_host_ram(plan, REAL, 60.0)
    assert not ram.low_ram and ram.disk_read_gb_per_image == 0 and len(ram.pinned_blocks) == 60
    machine_fits("budget", REAL, vram_gb=23.0, ram_gb=30.0)  # 24 / 32 fits
    machine_fits("budget", REAL, vram_gb=15.0, ram_gb=30.0)  # 16 / 32 fits


def test_a_machine_that_fits_nothing_is_told_its_figures_and_what_it_needs():
    with pytest.raises(ValueError) as err:
        machine_fits("budget", REAL, vram_gb=8.0, ram_gb=16.0)
    message = str(err.value)
    minimum = budget_minimum_ram_gb(REAL, 8.0)
    # The lossy option's figures: tests/test_lossy_low_ram.py.
    # 10 GB left after the system and the page cache: the 18 streamed text layers (7.8 GB), then 3 blocks.
    for part in ("This machine: 8.0 GB of VRAM, 16.0 GB of RAM available", "54 of the 57 streamed transformer blocks",
                 f"at 8.0 GB of VRAM it needs {minimum:.1f} GB of RAM"):
        assert part in message
    machine_fits("budget", REAL, vram_gb=8.0, ram_gb=minimum)  # the figure it names is enough
    with pytest.raises(ValueError):
        machine_fits("budget", REAL, vram_gb=8.0, ram_gb=minimum - 0.5)


@pytest.mark.parametrize("ram", [0.0, -3.0, float("nan")])
def test_a_ram_budget_that_is_no_amount_is_refused(ram):
    plan = plan_budget(23.0, image_tokens=DEFAULT_JOB_TOKENS, **REAL)
    with pytest.raises(ValueError, match="pass a positive number of GB"):
        plan_host_ram(plan, REAL, ram)


def test_too_little_ram_exits_2_before_loading_without_a_traceback(models_dir, tmp_path, rgba_image, capsys):
    rgba_image.save(tmp_path / "in.png")
    code = app.main(["decompose", str(tmp_path / "in.png"), "--demo", "--models-dir", str(models_dir), "--offload",
                     "budget", "--ram-budget", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: This machine:" in err and "1.0 GB of RAM available. Not enough host RAM for the budget mode" in err
    assert not (tmp_path / "o").exists()


def test_low_ram_budget_gives_the_layers_of_off_and_keeps_the_weights_in_their_files(models_dir, rgba_image,
                                                                                    monkeypatch):
    # The demo's weights are a few MB: without the reserve and the page cache, half of them is "low RAM".
    monkeypatch.setattr(studio.engine.plan, "BUDGET_HOST_RAM_RESERVE_GB", 0.0)
    monkeypatch.setattr(studio.engine.plan, "BUDGET_PAGE_CACHE_MIN_GB", 0.0)
    kwargs = dict(prompt="shapes", layers=2, num_inference_steps=2, seed=7)
    reference = app.infer(app.load_pipeline(demo_settings(models_dir)), rgba_image, **kwargs)
    pipe = app.load_pipeline(demo_settings(models_dir))
    sizes = budget_sizes(pipe.pipe.transformer, pipe.pipe.text_encoder, pipe.pipe.vae)
    half = (sizes["num_blocks"] * sizes["block_gb"] + sizes["text_encoder_gb"]) / 2
    applied = engine_on(pipe, float("inf"), resident_blocks=1, text_resident_layers=1,
                                        host_ram_gb=half)
    assert any(a.startswith("budget_low_ram(low RAM") for a in applied), applied
    if sys.platform.startswith("linux"):  # nothing was copied: every weight is still a view of its file
        spans = _mapped_files()
        assert all(_file_of(p, spans) for p in pipe.pipe.transformer.parameters())
    result = app.infer(pipe, rgba_image, **kwargs)
    for ours, theirs in zip(result.layers, reference.layers, strict=True):
        assert ours.tobytes() == theirs.tobytes()
    # Out of memory in a block read from the files: freed, advice given, the weights still the files', the next run
    # the same.
    block = pipe.pipe.transformer.transformer_blocks[-1]
    forward = block.forward

    def out_of_memory(*args, **kwargs):
        raise app.torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(block, "forward", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="the memory was freed. Try: .*smaller --vram-budget"):
        app.infer(pipe, rgba_image, **kwargs)
    monkeypatch.setattr(block, "forward", forward)
    assert pipe.stages.current is None  # everything went back to its host copy or its file
    if sys.platform.startswith("linux"):
        spans = _mapped_files()
        assert all(_file_of(p, spans) for p in pipe.pipe.transformer.parameters())
    again = app.infer(pipe, rgba_image, **kwargs)
    for ours, theirs in zip(again.layers, reference.layers, strict=True):
        assert ours.tobytes() == theirs.tobytes()


def test_each_rank_of_several_gpus_plans_with_its_share_of_the_ram(models_dir, tmp_path, rgba_image, monkeypatch,
                                                                     capsys):
    """`--gpus N` / torchrun: the N ranks of a machine load at once, so each plans with 1/N of the RAM it sees."""
    rgba_image.save(tmp_path / "in.png")
    monkeypatch.setattr(studio.engine.memory, "available_ram_gb", lambda: 6.0)  # the demo's MBs fit 6 GB with the 4 GB reserve...
    args = ["decompose", str(tmp_path / "in.png"), "--demo", "--models-dir", str(models_dir), "--offload", "budget",
            "--layers", "2", "--steps", "2", "--prompt", "shapes"]
    assert app.main([*args, "--out", str(tmp_path / "alone")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # ...but not 3 GB each (checked before any rank joins the others)
    assert app.main([*args, "--out", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert ("error: 2 GPUs of this machine each load the pipeline, so each has 1/2 of its RAM. This machine: "
            "inf GB of VRAM, 3.0 GB of RAM available.") in err
    assert "Traceback" not in err and not (tmp_path / "two").exists()
