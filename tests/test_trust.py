"""Trust, round two (issue 10): only uploads and examples are read, Stop and a leaving client stop the run,
run folders a session shows survive pruning, run folders are whole or absent, one failed export costs only
itself, and client-facing errors carry no server paths.

Over HTTP against the real UI server on the tiny demo pipeline, as an attacker or a client would call it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest
from PIL import Image

import app
from conftest import ROOT, demo_settings, free_port

GOOD = dict(prompt="a test card", layers=2, num_inference_steps=2, true_cfg_scale=1.0, seed=5)
META = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def server(demo_pipe, models_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("trust-outputs")
    settings = demo_settings(models_dir, outputs=outputs, host="127.0.0.1", port=free_port())
    demo = app.build_ui(demo_pipe, settings)
    demo.launch(**app.launch_options(settings), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}/", outputs, demo
    demo.close()


def client_for(url: str, tmp_path: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def plain_png(path: Path, size=(96, 64), colour=(20, 160, 90, 255)) -> Path:
    Image.new("RGBA", size, colour).save(path)
    return path


def decompose_values(image) -> list:
    """All 12 inputs of /decompose, as a raw HTTP client sends them: the image, then GOOD's settings."""
    d = app.DEFAULTS
    return [image, GOOD["prompt"], d["negative_prompt"], GOOD["seed"], False, GOOD["true_cfg_scale"],
            GOOD["num_inference_steps"], GOOD["layers"], d["resolution"], d["cfg_normalize"], d["use_en_prompt"], False]


def call_over_http(url: str, endpoint: str, data: list) -> tuple[str, str]:
    """POST /gradio_api/call/<endpoint> as any HTTP client can, then read its result stream: (event, message)."""
    event_id = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=600).text
    events = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
    data = json.loads([line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")][-1])
    return events[-1], data["error"] if isinstance(data, dict) and "error" in data else data


def run_folders(outputs: Path) -> set[Path]:
    return {p for p in outputs.iterdir() if p.is_dir() and not p.name.startswith(".")}


# --- 1. the file-read hole -----------------------------------------------------------------------------
def test_decompose_reads_no_server_file_with_or_without_meta_and_says_nothing_of_other_files(server, tmp_path):
    url, outputs, _ = server
    secret = plain_png(tmp_path / "secret.png")  # an image on the server that nobody uploaded
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    cache_file = Path(os.environ["GRADIO_TEMP_DIR"]) / "not-an-upload" / "layer.png"  # in Gradio's cache, not uploaded
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    plain_png(cache_file)
    before = run_folders(outputs)
    answers = {}
    for name, value in {
        "path without meta": {"path": str(secret)},
        "traversal": {"path": str(Path(os.environ["GRADIO_TEMP_DIR"]) / ".." / ".." / secret.relative_to("/"))},
        "empty file": {"path": str(empty)},
        "missing file": {"path": str(missing)},
        "cache file, not an upload, without meta": {"path": str(cache_file)},
        "cache file, not an upload, with meta": {"path": str(cache_file), "meta": META},
    }.items():
        answers[name] = call_over_http(url, "decompose", decompose_values(value))
    # Each is refused with the same words, whether the file exists, is empty or is missing.
    assert {answer for answer in answers.values()} == {("error", app.NOT_AN_UPLOAD_MESSAGE)}, answers
    # A bare string is no image value: Gradio's own validation refuses it (naming only what was sent).
    event, data = call_over_http(url, "decompose", decompose_values(str(secret)))
    assert event == "error" and "Input should be a valid dictionary" in data
    # With Gradio's meta key, a file outside its upload cache is refused by Gradio itself, by the path the client gave.
    event, data = call_over_http(url, "decompose", decompose_values({"path": str(secret), "meta": META}))
    assert event == "error" and "not uploaded by a user" in data
    event, data = call_over_http(url, "decompose", decompose_values({"path": str(missing), "meta": META}))
    assert event == "error" and "not uploaded by a user" in data and "does not exist" not in data
    assert run_folders(outputs) == before  # nothing ran


def test_readable_upload_takes_uploads_examples_and_the_cached_copy_of_an_example(tmp_path):
    cache = tmp_path / "cache"
    for folder in ("0123abcd", "feed", "beef"):
        (cache / folder).mkdir(parents=True)
    (tmp_path / "assets").mkdir()
    upload = plain_png(cache / "0123abcd" / "in.png")
    example = plain_png(tmp_path / "assets" / "card.png")
    copy = cache / "feed" / "card.png"  # Gradio's copy of the example, which the page sends
    copy.write_bytes(example.read_bytes())
    forged = plain_png(cache / "beef" / "card.png", colour=(1, 2, 3, 255))  # an example's name, other bytes
    uploaded = {str(upload)}
    assert app.readable_upload({"path": str(upload)}, uploaded, cache) == upload
    assert app.readable_upload(str(example), uploaded, cache, [str(example)]) == example
    assert app.readable_upload({"path": str(copy), "meta": META}, uploaded, cache, [str(example)]) == example
    for refused in (forged, example, tmp_path / "nope.png", cache / "0123abcd" / ".." / "0123abcd" / "x.png"):
        with pytest.raises(ValueError, match="was not uploaded to this app"):
            app.readable_upload({"path": str(refused)}, uploaded, cache)
    # A symlink inside the cache that points out of it is resolved first.
    (cache / "link.png").symlink_to(tmp_path / "assets" / "card.png")
    with pytest.raises(ValueError, match="was not uploaded to this app"):
        app.readable_upload({"path": str(cache / "link.png")}, {str(cache / "link.png")}, cache)


def test_the_page_s_cached_copy_of_an_example_decomposes(server, tmp_path):
    url, _, demo = server
    example = Path(app.example_images()[0])
    cached = [p for p in Path(os.environ["GRADIO_TEMP_DIR"]).rglob(example.name) if p.read_bytes() == example.read_bytes()]
    assert cached, "Gradio keeps a copy of each example in its cache for the page"
    gallery, *_ = client_for(url, tmp_path).predict({"path": str(cached[0]), "meta": META}, **GOOD, api_name="/decompose")
    assert len(gallery) == 2
