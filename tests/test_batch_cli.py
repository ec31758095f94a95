"""`app.py decompose IMG_OR_DIR...`: one model load for many images, a run folder each, bad files reported and skipped."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_app


@pytest.fixture(scope="module")
def batch(models_dir, tmp_path_factory):
    """A bad file first, then a folder of two images (and a note that is no image), then a missing file."""
    inputs = tmp_path_factory.mktemp("inputs")
    folder = inputs / "photos"
    folder.mkdir()
    Image.new("RGBA", (90, 60), (250, 120, 0, 255)).save(folder / "a.png")
    Image.new("RGB", (60, 90), (0, 120, 250)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image, and not taken from the folder")
    (inputs / "broken.png").write_bytes(b"this is no PNG")
    out = tmp_path_factory.mktemp("out")
    proc = run_app("decompose", str(inputs / "broken.png"), str(folder), str(inputs / "missing.png"),
                   "--layers", "2", "--steps", "2", "--prompt", "a card", "--seed", "3", "--out", str(out),
                   "--demo", "--models-dir", str(models_dir), "--no-first-block-cache", timeout=900)
    return proc, inputs, out


def test_every_good_image_gets_its_own_run_folder(batch):
    _, inputs, out = batch
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2
    params = [json.loads((f / "params.json").read_text()) for f in folders]
    assert sorted(Path(p["input_file"]).name for p in params) == ["a.png", "b.jpg"]
    assert [(p["layers"], p["num_inference_steps"], p["seed"]) for p in params] == [(2, 2, 3)] * 2
    for folder in folders:
        assert sorted(p.name for p in folder.glob("layer_*.png")) == ["layer_1.png", "layer_2.png"]
    # Each run folder says which image it holds: <stamp>_<image>_seed<seed>.
    assert [re.sub(r"^\d{8}-\d{6}-\d{6}_", "", f.name) for f in folders] == ["a_seed3", "b_seed3"]


def test_bad_files_are_reported_and_skipped_and_the_summary_lists_both(batch):
    proc, inputs, out = batch
    lines = proc.stdout.strip().splitlines()
    summary = lines[lines.index("2 of 4 images decomposed, 2 failed"):]
    ok = [line for line in summary if line.startswith("  ok")]
    failed = [line for line in summary if line.startswith("  FAILED")]
    # The images after the bad file still ran; each ok line names its run folder.
    assert [line.split()[1] for line in ok] == [str(inputs / "photos" / "a.png"), str(inputs / "photos" / "b.jpg")]
    assert all(Path(line.split(" -> ")[1]).parent == out for line in ok)
    # The message, without the exception's class (issue 23: the lines began "ValueError:").
    assert failed == [f"  FAILED  {inputs / 'broken.png'}: broken.png is not an image: its content is "
                      f"no image format this app reads. Upload a PNG, JPEG or WebP file.",
                      f"  FAILED  {inputs / 'missing.png'}: image file '{inputs / 'missing.png'}' "
                      f"does not exist"]


def test_exit_code_is_nonzero_when_any_image_failed(batch):
    proc, _, _ = batch
    assert proc.returncode == 1, proc.stderr[-2000:]


def test_the_demo_model_is_announced_and_each_run_records_its_parameters(batch):
    proc, _, out = batch
    assert "DEMO MODEL" in proc.stdout
    params = [json.loads(f.read_text()) for f in sorted(out.glob("*/params.json"))]
    assert {(p["caption"], p["auto_caption"], p["true_cfg_scale"]) for p in params} == {("a card", False, 4.0)}


def test_the_model_loads_once_and_progress_counts_images_and_steps(batch):
    proc, _, _ = batch
    assert proc.stderr.count("INFO Loaded ") == 1
    assert re.search(r"images: 100%\|[^|]*\| 4/4 ", proc.stderr)  # tqdm: "images: 100%|█████| 4/4 [..."
    assert len(re.findall(r"steps: 100%\|[^|]*\| 2/2 ", proc.stderr)) >= 2  # one bar per image that ran


def test_bad_parameters_stop_before_the_model_loads(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    proc = run_app("decompose", str(tmp_path / "in.png"), "--layers", "12", "--demo",
                   "--models-dir", str(tmp_path / "models"))
    assert proc.returncode == 2
    assert "layers=12 is out of range: use an integer from 2 to 10" in proc.stderr
    assert "Loaded " not in proc.stderr and not (tmp_path / "models").exists()


def test_a_long_caption_is_cut_on_the_per_image_line():
    from studio.batch import CAPTION_SHOWN_CHARS, short_text

    caption = "A flat illustration of a desk with a blue mug, a lamp and a plant, " * 15  # ~1,000 characters
    shown = short_text(caption)
    assert len(shown) <= CAPTION_SHOWN_CHARS + 1 and shown.endswith("…") and caption.startswith(shown[:-1])
    assert short_text("a card") == "a card"
