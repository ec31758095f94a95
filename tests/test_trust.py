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
from conftest import ROOT, demo_settings, free_port, wait_for
from PIL import Image

import app
import studio.exports
import studio.images
from studio.batch import batch_summary, decompose_batch, find_images
from studio.errors import RunStopped
from studio.exports import export_pptx
from studio.params import DEFAULTS
from studio.runs import DecomposeResult, PARTIAL_PREFIX, SUB_RUNS_DIR, clean_partial_runs, export_failures_message, prune_outputs, save_run
from studio.serving import NOT_AN_UPLOAD_MESSAGE, Sessions, launch_options, readable_upload

GOOD = dict(prompt="a test card", layers=2, num_inference_steps=2, true_cfg_scale=1.0, seed=5)
META = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def server(demo_pipe, models_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("trust-outputs")
    settings = demo_settings(models_dir, outputs=outputs, host="127.0.0.1", port=free_port())
    demo = app.build_ui(demo_pipe, settings)
    demo.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}/", outputs, demo, settings
    demo.close()


def client_for(url: str, tmp_path: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def plain_png(path: Path, size=(96, 64), colour=(20, 160, 90, 255)) -> Path:
    Image.new("RGBA", size, colour).save(path)
    return path


def decompose_values(image) -> list:
    """All 17 inputs of /decompose, as a raw HTTP client sends them: the image, then GOOD's settings."""
    d = DEFAULTS
    return [image, GOOD["prompt"], d["negative_prompt"], GOOD["seed"], False, GOOD["true_cfg_scale"],
            GOOD["num_inference_steps"], GOOD["layers"], d["resolution"], d["cfg_normalize"], d["use_en_prompt"],
            d["tidy_layers"], d["clean_edges"], d["text_layers"], d["text_language"], d["name_layers"], False]


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
    url, outputs, *_ = server
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
    assert {answer for answer in answers.values()} == {("error", NOT_AN_UPLOAD_MESSAGE)}, answers
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
    assert readable_upload({"path": str(upload)}, uploaded, cache) == upload
    assert readable_upload(str(example), uploaded, cache, [str(example)]) == example
    assert readable_upload({"path": str(copy), "meta": META}, uploaded, cache, [str(example)]) == example
    for refused in (forged, example, tmp_path / "nope.png", cache / "0123abcd" / ".." / "0123abcd" / "x.png"):
        with pytest.raises(ValueError, match="was not uploaded to this app"):
            readable_upload({"path": str(refused)}, uploaded, cache)
    # A symlink inside the cache that points out of it is resolved first.
    (cache / "link.png").symlink_to(tmp_path / "assets" / "card.png")
    with pytest.raises(ValueError, match="was not uploaded to this app"):
        readable_upload({"path": str(cache / "link.png")}, {str(cache / "link.png")}, cache)


def test_the_page_s_cached_copy_of_an_example_decomposes(server, tmp_path):
    url, *_ = server
    example = Path(app.example_images()[0])
    cached = [p for p in Path(os.environ["GRADIO_TEMP_DIR"]).rglob(example.name) if p.read_bytes() == example.read_bytes()]
    assert cached, "Gradio keeps a copy of each example in its cache for the page"
    # Raw HTTP, as the page sends it (gradio_client would upload a local file itself).
    event, data = call_over_http(url, "decompose", decompose_values({"path": str(cached[0]), "meta": META}))
    assert event == "complete" and len(data[0]) == 2, data


# --- 3. Stop, and a client that leaves -----------------------------------------------------------------
LONG = dict(GOOD, num_inference_steps=50)  # ~50 transformer calls; each one slowed down by `slow_steps`


@pytest.fixture()
def slow_steps(demo_pipe):
    """Each transformer call takes 0.3 s longer and is counted; weak references to its latents are kept."""
    calls: list = []

    def hook(module, args, kwargs):
        calls.append(weakref.ref(kwargs["hidden_states"]))
        time.sleep(0.3)

    handle = demo_pipe.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    yield calls
    handle.remove()


def test_stop_ends_the_run_at_the_next_step_frees_it_and_the_app_stays_ready(server, slow_steps, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, outputs, *_ = server
    client = client_for(url, tmp_path)
    image = plain_png(tmp_path / "in.png")
    before = run_folders(outputs)
    job = client.submit(handle_file(str(image)), **dict(LONG, seed=41), api_name="/decompose")
    wait_for(lambda: len(slow_steps) >= 2, 300, "the run's second step")
    client.predict(api_name="/stop")  # what the Stop button calls, from the same session
    with pytest.raises(AppError, match="Stopped: the run ended at the next step and its memory was freed"):
        job.result(timeout=120)
    assert 2 <= len(slow_steps) <= 4  # the step running when Stop came, at most one more: not 50
    assert all(latents() is None for latents in slow_steps)  # nothing holds the run's tensors
    assert run_folders(outputs) == before  # nothing half-saved
    slow_steps.clear()
    gallery, *_, seed = client.predict(handle_file(str(image)), **dict(GOOD, seed=42), api_name="/decompose")
    assert (len(gallery), seed) == (2, 42)


def test_a_client_that_disconnects_stops_its_own_job(server, slow_steps, tmp_path):
    url, outputs, *_ = server
    image = plain_png(tmp_path / "in.png")
    before = run_folders(outputs)
    # A client in its own process, killed once its run is in the denoising loop: its connections just drop.
    code = ("import sys; from gradio_client import Client, handle_file\n"
            "Client(sys.argv[1], verbose=False).predict(handle_file(sys.argv[2]), prompt='gone', layers=2, "
            "num_inference_steps=50, true_cfg_scale=1.0, seed=31, api_name='/decompose')\n")
    leaver = subprocess.Popen([sys.executable, "-c", code, url, str(image)])
    try:
        wait_for(lambda: len(slow_steps) >= 2, 300, "the leaving client's second step")
    finally:
        leaver.kill()
        leaver.wait()
    left_at = len(slow_steps)
    wait_for(lambda: not app._PIPELINE_LOCK.locked(), 60, "the run to end")
    assert len(slow_steps) <= left_at + 3  # stopped within a few steps of leaving, not after 50
    assert run_folders(outputs) == before


def test_infer_with_a_set_stop_event_stops_during_the_caption(demo_pipe, rgba_image):
    stop = threading.Event()
    calls = []
    handle = demo_pipe.pipe.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1) or stop.set())
    try:
        with pytest.raises(RunStopped, match="Stopped"):
            app.infer(demo_pipe, rgba_image, prompt="", layers=2, num_inference_steps=2, true_cfg_scale=1.0, stop=stop)
    finally:
        handle.remove()
    assert len(calls) == 1  # the caption's first token, then no more (it would write up to 512)
    assert not app._PIPELINE_LOCK.locked()


# --- 4. pruning and the sessions' run folders ----------------------------------------------------------
def test_prune_keeps_every_shown_run_deletes_orphans_and_ages_a_run_by_its_last_sub_run(tmp_path):
    now = time.time()

    def run(name: str, age_hours: float, params: bool = True) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if params:
            (folder / "params.json").write_text("{}")
        (folder / "layer_1.png").write_bytes(b"\0" * 1_000_000)
        os.utime(folder, (now - age_hours * 3600,) * 2)
        return folder

    shown_a, shown_b, old, new = run("a", 300), run("b", 299), run("c", 5), run("d", 0)
    orphan = run("e", 4, params=False)  # what an older app's sub-run left: only sub_runs/
    (orphan / SUB_RUNS_DIR / "x").mkdir(parents=True)
    os.utime(orphan / SUB_RUNS_DIR / "x", (now - 4 * 3600,) * 2)
    os.utime(orphan, (now - 4 * 3600,) * 2)
    recent_sub = run("f", 400)  # old first run, sub-run a minute ago: in use
    (recent_sub / SUB_RUNS_DIR / "y").mkdir(parents=True)
    deleted = prune_outputs(tmp_path, max_bytes=4.5e6, max_age_s=200 * 3600, keep={shown_a, shown_b, new})
    assert deleted == [old, orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "d", "f"]


def sub_run(client, **overrides):
    return client.predict(2, **dict(layers=2, prompt="the bottom layer", seed=7, true_cfg_scale=1.0,
                                    num_inference_steps=2), **overrides, api_name="/decompose_layer")


def newest_run(outputs: Path) -> Path:
    return max((p for p in outputs.iterdir() if (p / "params.json").is_file()), key=lambda p: p.stat().st_mtime)


def test_pruning_spares_a_live_session_s_run_and_prunes_it_after_the_session_ends(server, tmp_path, monkeypatch):
    from gradio_client import handle_file

    url, outputs, _, settings = server
    ended: list[str] = []  # the sessions Gradio's unload has ended (the real `end` still runs)
    end = Sessions.end
    monkeypatch.setattr(Sessions, "end", lambda self, session: (end(self, session), ended.append(session))[0])
    image = plain_png(tmp_path / "in.png")
    alice, bob = client_for(url, tmp_path / "a"), client_for(url, tmp_path / "b")
    alice.predict(handle_file(str(image)), **dict(GOOD, seed=51), api_name="/decompose")
    alices_run = newest_run(outputs)
    limit = settings.outputs_max_gb
    settings.outputs_max_gb = 1e-9  # every run is over the limit from now on
    try:
        bob.predict(handle_file(str(image)), **dict(GOOD, seed=52), api_name="/decompose")
        bobs_run = newest_run(outputs)
        assert alices_run.is_dir() and bobs_run.is_dir()  # Alice's page still shows hers
        alice.close()  # her session ends (Gradio's unload)
        wait_for(lambda: alice.session_hash in ended, 60, "Gradio's unload to end Alice's session")
        sub_run(bob)  # pruning runs after a layer decomposition too
        assert not alices_run.exists() and bobs_run.is_dir()
        assert [p.name for p in outputs.iterdir() if p.name.startswith(PARTIAL_PREFIX)] == []
    finally:
        settings.outputs_max_gb = limit


def test_undo_and_decompose_layer_after_the_run_folder_went_say_so_without_a_server_path(server, tmp_path):
    import shutil

    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, outputs, *_ = server
    client = client_for(url, tmp_path)
    client.predict(handle_file(str(plain_png(tmp_path / "in.png"))), **dict(GOOD, seed=53), api_name="/decompose")
    run = newest_run(outputs)
    sub_run(client)
    shutil.rmtree(run)  # deleted behind the app's back (by hand, or by an older version's pruning)
    for call in (lambda: client.predict(api_name="/undo"), lambda: sub_run(client)):
        with pytest.raises(AppError) as refused:
            call()
        message = str(refused.value)
        assert "no longer on the server" in message and "Decompose the image again" in message
        assert str(outputs) not in message and "Errno" not in message
    assert not run.exists()  # the sub-run did not recreate it


# --- 5. run folders are whole or absent ----------------------------------------------------------------
def card_result(size=(96, 64), seed=1) -> "DecomposeResult":
    """A two-layer result made here (no model): a green card under a red square."""
    bottom = Image.new("RGBA", size, (20, 160, 90, 255))
    top = Image.new("RGBA", size, (0, 0, 0, 0))
    top.paste((200, 30, 30, 255), (8, 8, 40, 40))
    return DecomposeResult(layers=[bottom, top], caption="a card", auto_caption=False, seed=seed,
                               params={"input_size": list(size)}, duration_s=0.1)


def test_a_process_killed_while_saving_leaves_no_run_folder_and_start_up_cleans_its_leftover(tmp_path):
    outputs = tmp_path / "outputs"
    # A process that dies (SIGKILL: no clean-up of any kind) in the middle of writing the exports.
    code = ("import os, signal, sys; sys.path[:0] = ['src', 'tests']; import studio.exports, studio.runs, test_trust\n"
            "studio.exports.export_pptx = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "studio.runs.save_run(test_trust.card_result(), sys.argv[1])\n")
    killed = subprocess.run([sys.executable, "-c", code, str(outputs)], cwd=ROOT, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    (partial,) = outputs.iterdir()
    assert partial.name.startswith(f"{PARTIAL_PREFIX}") and (partial / "params.json").is_file()
    assert not prune_outputs(outputs, max_bytes=1, max_age_s=1)  # not a run folder: pruning leaves it
    # A live process's half-written folder stays; the dead one's goes.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        live = outputs / f"{PARTIAL_PREFIX}{alive.pid}-20260101-000000-000000_seed1"
        live.mkdir()
        assert clean_partial_runs(outputs) == [partial]
        alive.kill()
    assert [p.name for p in outputs.iterdir()] == [live.name]
    # A save that completes leaves one whole folder and nothing partial.
    paths = save_run(card_result(seed=2), outputs)
    assert paths["folder"].name.endswith("_seed2") and paths["folder"].parent == outputs
    assert all(Path(p).is_file() for p in (*paths["layers"], paths["composite"], paths["params"], paths["zip"],
                                            paths["pptx"], paths["psd"]))
    assert sorted(p.name.startswith(PARTIAL_PREFIX) for p in outputs.iterdir()) == [False, True]


# --- 6. one export that fails costs only itself --------------------------------------------------------
@pytest.mark.parametrize("size", [(1024, 64), (940, 64), (64, 1000)])  # 16:1, 14.7:1, 1:15.6
def test_pptx_of_a_strip_gets_a_slide_of_at_least_one_inch_with_the_image_s_aspect(tmp_path, size):
    from pptx import Presentation

    path = export_pptx(card_result(size).layers, tmp_path / "strip.pptx")
    presentation = Presentation(str(path))
    width, height = presentation.slide_width, presentation.slide_height
    assert min(width, height) >= 914400 and max(width, height) <= 51206400  # PowerPoint's 1 to 56 inches
    assert width * size[1] == height * size[0]  # exact aspect ratio
    square = [s for s in presentation.slides[0].shapes if s.shape_type == 13][-1]  # 13: picture; the top layer
    assert square.left * size[0] == width * 8  # the red square still sits at x = 8 px


def test_save_run_keeps_the_layers_and_other_exports_when_one_export_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the PSD writer broke")

    monkeypatch.setattr(studio.exports, "export_psd", broken)
    paths = save_run(card_result(), tmp_path, original_size=(192, 128))
    assert paths["failed"] == {"psd": "RuntimeError: the PSD writer broke",
                               "original_psd": "RuntimeError: the PSD writer broke"}
    assert "psd" not in paths and "psd" not in paths["original"]
    assert all(Path(p).is_file() for p in (*paths["layers"], paths["zip"], paths["pptx"], paths["original"]["pptx"]))
    assert not list(paths["folder"].rglob("*.psd"))
    assert json.loads(paths["params"].read_text())["failed_exports"] == paths["failed"]
    assert export_failures_message(paths["failed"]).startswith("The PSD, original-size PSD export failed")


def test_over_http_a_failed_export_still_gives_the_layers_and_the_other_files(server, tmp_path, monkeypatch):
    from gradio_client import handle_file

    def broken(*args, **kwargs):
        raise RuntimeError("the PPTX writer broke")

    monkeypatch.setattr(studio.exports, "export_pptx", broken)
    url, *_ = server
    gallery, pptx, zip_file, psd, caption, seed = client_for(url, tmp_path).predict(
        handle_file(str(plain_png(tmp_path / "in.png"))), **dict(GOOD, seed=61), api_name="/decompose")
    assert (len(gallery), pptx, caption, seed) == (2, None, GOOD["prompt"], 61)
    assert Path(zip_file).suffix == ".zip" and Path(psd).suffix == ".psd"


def test_batch_takes_a_gif_from_a_folder_prints_its_note_and_names_a_failed_export(demo_pipe, tmp_path, monkeypatch,
                                                                                     capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the ZIP writer broke")

    monkeypatch.setattr(studio.exports, "export_zip", broken)
    folder = tmp_path / "in"
    folder.mkdir()
    frames = [Image.new("RGB", (96, 64), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "blink.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert find_images([folder]) == [folder / "blink.gif"]
    items = decompose_batch(demo_pipe, app.infer, find_images([folder]), tmp_path / "out", prompt="a card", layers=2,
                                num_inference_steps=2, true_cfg_scale=1.0)
    assert "  note: blink.gif is animated (2 frames): the first frame was used." in capsys.readouterr().err
    summary = batch_summary(items).splitlines()
    assert summary[0] == "1 of 1 images decomposed, 0 failed"
    assert summary[1].startswith("recomposition PSNR: blink.gif ")
    assert summary[3:] == ["          note: blink.gif is animated (2 frames): the first frame was used.",
                           "          note: zip export failed: RuntimeError: the ZIP writer broke"]


# --- 15. client-facing errors --------------------------------------------------------------------------
def test_an_unexpected_error_reaches_the_client_without_server_paths_or_internals(server, tmp_path, monkeypatch,
                                                                                  caplog):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/srv/studio/secret/weights.bin")

    monkeypatch.setattr(app, "infer", broken)  # the handler's one call into the model
    url, *_ = server
    with pytest.raises(AppError) as refused:
        client_for(url, tmp_path).predict(handle_file(str(plain_png(tmp_path / "in.png"))), **GOOD,
                                          api_name="/decompose")
    message = str(refused.value)
    assert message.startswith("Something went wrong on the server while decomposing the image (FileNotFoundError). "
                              "The details are in the server's log.")
    assert "/srv/studio" not in message and "Errno" not in message
    assert "/srv/studio/secret/weights.bin" in caplog.text  # the server log keeps the details


# --- 1 (continued). the two tools read only uploads ----------------------------------------------------
@pytest.fixture()
def cache_file_not_uploaded():
    """An image inside Gradio's upload cache that no client uploaded (like the copies of results it serves)."""
    import shutil

    from gradio.utils import get_upload_folder

    made = []

    def make() -> Path:  # called once the tool has set Gradio's cache folder (GRADIO_TEMP_DIR)
        made.append(Path(get_upload_folder()) / "trust-not-an-upload")
        made[-1].mkdir(parents=True, exist_ok=True)
        return plain_png(made[-1] / "layer.png")

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def test_combine_tool_stacks_only_uploaded_files(tmp_path, cache_file_not_uploaded):
    from gradio_client import Client, handle_file

    from tool import combine_layers as cl

    demo = cl.build_ui()
    port = free_port()
    demo.queue().launch(**launch_options(app.Settings(host="127.0.0.1", port=port)), prevent_thread_lock=True,
                        quiet=True)  # as the tool's main() launches it
    url = f"http://127.0.0.1:{port}/"
    try:
        secret = plain_png(tmp_path / "secret.png")
        event, message = call_over_http(url, "add_files", [[], [{"path": str(secret)}]])
        assert event == "error"  # without meta: Gradio's validation refuses it
        event, message = call_over_http(url, "add_files", [[], [{"path": str(secret), "meta": META}]])
        assert event == "error" and "not uploaded by a user" in message  # outside the cache: Gradio refuses it
        # Inside Gradio's cache but never uploaded: nothing is stacked (before: its pixels came back).
        event, (_, _, preview, notes, png, psd) = call_over_http(
            url, "add_files", [[], [{"path": str(cache_file_not_uploaded()), "meta": META}]])
        assert (event, preview, png, psd) == ("complete", None, None, None)
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        # An upload is stacked.
        _, preview, *_ = client.predict([handle_file(str(plain_png(tmp_path / "mine.png")))], api_name="/add_files")
        assert Image.open(preview).size == (96, 64)
    finally:
        demo.close()


def test_edit_tool_edits_only_uploaded_files(models_dir, tmp_path, cache_file_not_uploaded):
    from tool import edit_rgba_image as edit

    edit_pipe = app.load_pipeline(demo_settings(models_dir), edit.EDIT_MODEL)
    demo = edit.build_ui(edit_pipe, demo_settings(models_dir, outputs=tmp_path / "outputs"), matte="chroma_key")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        for value in ({"path": str(cache_file_not_uploaded()), "meta": META},  # before: edited
                      {"path": str(plain_png(tmp_path / "secret.png"))},
                      {"path": str(tmp_path / "missing.png")}):
            answer = call_over_http(f"http://127.0.0.1:{port}/", "edit",
                                    [value, "make it red", 7, False, 2.0, 2, " ", "chroma_key"])
            assert answer == ("error", NOT_AN_UPLOAD_MESSAGE)
    finally:
        demo.close()
    assert not (tmp_path / "outputs" / "edits").exists()
