"""The Gradio app answers /decompose over HTTP; without weights the command line fails offline clearly.
(The headless `decompose` command: tests/test_batch_cli.py.)"""

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_app


def test_api_decompose_returns_layers_files_caption_and_seed(server, tmp_path):
    from gradio_client import Client, handle_file

    url, outputs = server
    Image.new("RGBA", (120, 80), (20, 200, 90, 255)).save(tmp_path / "in.png")
    client = Client(url, verbose=False)
    # Only the image and the few values this test changes: the rest take the endpoint's defaults.
    gallery, pptx, zip_path, psd, caption, seed = client.predict(
        handle_file(str(tmp_path / "in.png")), prompt="a green card", layers=3, num_inference_steps=2, seed=9,
        api_name="/decompose")
    assert len(gallery) == 3
    assert [Image.open(item["image"]).mode for item in gallery] == ["RGBA"] * 3
    assert [Path(p).suffix for p in (pptx, zip_path, psd)] == [".pptx", ".zip", ".psd"]
    assert (caption, seed) == ("a green card", 9)
    (params,) = [json.loads(f.read_text()) for f in outputs.glob("*/params.json")
                 if json.loads(f.read_text())["caption"] == "a green card"]
    assert (params["layers"], params["seed"]) == (3, 9)


def test_api_reports_bad_parameters_as_a_message(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, _ = server
    Image.new("RGB", (64, 64), "white").save(tmp_path / "in.png")
    client = Client(url, verbose=False)
    # The handler takes raw values (Gradio's preprocess is off), so check_params names the value and range.
    with pytest.raises(AppError, match="layers=12 is out of range: use an integer from 2 to 10"):
        client.predict(handle_file(str(tmp_path / "in.png")), prompt="x", layers=12, api_name="/decompose")


def test_no_weights_and_no_hub_exits_nonzero_with_what_to_do(tmp_path):
    # An empty models dir and a hub endpoint nothing listens on: the download fails at once.
    proc = run_app("--models-dir", str(tmp_path / "models"),
                   env_extra={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"})
    assert proc.returncode == 2
    assert str(tmp_path / "models" / "Qwen-Image-Layered") in proc.stderr
    assert "--demo" in proc.stderr
    assert "Traceback" not in proc.stderr
