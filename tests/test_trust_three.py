"""Trust, round three (issue 22): the tools as hardened as the app, run folders private, no request too big, nothing
left behind. Hostile files are made here, small (their headers lie); HTTP is raw where the item is about HTTP.
"""

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest
from conftest import demo_settings, free_port, wait_for
from PIL import Image

import app
import studio.serving
from studio.images import MAX_INPUT_PIXELS, MAX_LAYER_FILE_BYTES, MAX_STACK_PIXELS, read_layered_file
from studio.params import DEFAULTS, PARAMS
from studio.runs import DecomposeResult, save_run
from studio.serving import (NOT_AN_UPLOAD_MESSAGE, Sessions, clean_gradio_caches, launch_options, network_warning)

META = {"_type": "gradio.FileData"}


def png_header(width: int, height: int) -> bytes:
    """A 68-byte PNG whose header says width x height RGBA: a decoder would allocate 4 bytes a pixel for it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def claim_size(path: Path, member_size: int) -> Path:
    """Make a ZIP's directory (and local header) say its member holds `member_size` bytes uncompressed: a bomb as the
    ZIP describes it (a 2 MB ZIP of zeros says the same of gigabytes)."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        data[at + offset:at + offset + 4] = struct.pack("<I", member_size)
    path.write_bytes(bytes(data))
    return path


def psd_with_canvas(path: Path, width: int, height: int) -> Path:
    """A 1.4 KB PSD with one 8x8 layer whose header says its canvas is width x height."""
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    psd = PSDImage.new(mode="RGBA", size=(16, 16), color=(0, 0, 0, 0))
    psd.append(PixelLayer.frompil(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), psd, name="red"))
    buffer = io.BytesIO()
    psd.save(buffer)
    data = bytearray(buffer.getvalue())
    data[14:22] = struct.pack(">II", height, width)  # the file header: rows, then columns
    path.write_bytes(bytes(data))
    return path


def png(path: Path, size=(96, 64), colour=(20, 160, 90, 255)) -> Path:
    Image.new("RGBA", size, colour).save(path)
    return path


# --- 1. the combine tool: the app's limits, before anything is decoded ------------------------------------------
def test_combine_refuses_a_layer_a_canvas_and_a_stack_too_large_from_their_headers(tmp_path):
    from tool import combine_layers as cl

    bottom = cl.read_layers(png(tmp_path / "bottom.png", (100, 80)))
    eight = zip_of(tmp_path / "eight.zip", {f"layer_{i}.png": png_header(8000, 8000) for i in range(1, 9)})
    wide = tmp_path / "wide.png"
    wide.write_bytes(png_header(8001, 8000))
    canvas = psd_with_canvas(tmp_path / "canvas.psd", 30000, 30000)
    bomb = claim_size(zip_of(tmp_path / "bomb.zip", {"layer_1.png": png_header(16, 16)}), 3_000_000_000)

    stack, errors = cl.add_files(bottom, [eight, wide, canvas, bomb])

    assert stack == bottom  # nothing added; the stack already there stays
    assert errors[0].startswith("eight.zip: the stack would hold 9 layers of ")
    assert f"more than the {MAX_STACK_PIXELS / 1e6:,.0f} megapixels (MAX_STACK_PIXELS)" in errors[0]
    assert errors[1] == (f"wide.png: the image is 8001x8000: more than the {MAX_INPUT_PIXELS:,} pixels "
                         f"(MAX_INPUT_PIXELS) a layer may have")
    assert errors[2] == (f"canvas.psd: its canvas is 30000x30000: more than the {MAX_INPUT_PIXELS:,} pixels "
                         f"(MAX_INPUT_PIXELS) a canvas may have")
    assert errors[3] == (f"bomb.zip: layer_1.png is 3,000 MB uncompressed: more than the "
                         f"{MAX_LAYER_FILE_BYTES / 1e6:,.0f} MB (MAX_LAYER_FILE_BYTES) a layer file may hold")
    # Headless, the same refusal and nothing written.
    assert cl.main([str(canvas), "-o", str(tmp_path / "out.png")]) == 2
    assert not (tmp_path / "out.png").exists()


def test_evaluate_refuses_a_zip_bomb_from_its_directory_and_a_stack_past_the_budget(tmp_path):
    bomb = claim_size(zip_of(tmp_path / "bomb.zip", {"layer_1.png": png_header(16, 16)}), 3_000_000_000)
    with pytest.raises(ValueError, match=r"bomb.zip: layer_1.png is 3,000 MB uncompressed: more than the .* "
                                         r"\(MAX_LAYER_FILE_BYTES\)"):
        read_layered_file(bomb)
    eight = zip_of(tmp_path / "eight.zip", {f"layer_{i}.png": png_header(8000, 8000) for i in range(1, 9)})
    with pytest.raises(ValueError, match=r"eight.zip: the stack would hold 8 layers .*\(MAX_STACK_PIXELS\)"):
        read_layered_file(eight)


def status_of_stream(client: httpx.Client, path: str) -> int:
    with client.stream("GET", path) as response:
        return response.status_code


@pytest.fixture()
def combine_server(tmp_path, monkeypatch):
    """The combine tool as its main() starts it, with --auth from QIL_AUTH, on 127.0.0.1."""
    from tool import combine_layers as cl

    monkeypatch.setenv("QIL_AUTH", "alice:s3cret")
    monkeypatch.setattr(cl, "OUTPUTS_DIR", tmp_path)  # its cache: here, not in the repository's outputs/
    args = cl.parse_args(["--host", "127.0.0.1", "--port", str(free_port())])
    demo = cl.build_ui().queue()
    demo.launch(**launch_options(args), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{args.port}/", demo, args
    demo.close()


def test_combine_tool_asks_for_its_login_everywhere_and_serves_what_it_wrote_from_gradio_s_cache(combine_server,
                                                                                                tmp_path):
    import tempfile

    from gradio.utils import get_upload_folder

    url, demo, args = combine_server
    assert args.auth == ("alice", "s3cret") and launch_options(args)["allowed_paths"] == []
    assert network_warning(args) is None and "without a login" in network_warning(type(args)(**{**vars(args),
                                                                                                  "auth": None,
                                                                                                  "host": "0.0.0.0"}))
    session = "0123456789"
    # 1. No login: every route says so, those Gradio leaves open included; FastAPI's /openapi.json is off.
    anonymous = httpx.Client(base_url=url, timeout=30)
    answers = {
        "call": anonymous.post("gradio_api/call/add_files", json={"data": [[]]}).status_code,
        "upload": anonymous.post("gradio_api/upload", files={"files": ("a.png", b"x", "image/png")}).status_code,
        "heartbeat": status_of_stream(anonymous, f"gradio_api/heartbeat/{session}"),  # (an endless stream when open)
        "reset": anonymous.post("gradio_api/reset", json={"event_id": "x"}).status_code,
        "cancel": anonymous.post("gradio_api/cancel", json={"session_hash": session, "fn_index": 0,
                                                             "event_id": "x"}).status_code,
        "startup-events": anonymous.get("gradio_api/startup-events").status_code,
        "gradio openapi": anonymous.get("gradio_api/openapi.json").status_code,
        "fastapi openapi": anonymous.get("openapi.json").status_code,
    }
    assert answers == {**{name: 401 for name in answers}, "fastapi openapi": 404}, answers
    # 2. Logged in: an upload is stacked, and the composite comes from Gradio's cache, not a /tmp folder of the tool's.
    temp_before = set(Path(tempfile.gettempdir()).glob("combine_layers-*"))
    user = httpx.Client(base_url=url, timeout=60)
    assert user.post("login", data={"username": "alice", "password": "s3cret"}).status_code == 200
    (upload,) = user.post("gradio_api/upload", files={"files": ("mine.png", png(tmp_path / "m.png").read_bytes(),
                                                                 "image/png")}).json()
    event_id = user.post("gradio_api/call/add_files", json={"data": [[{"path": upload, "meta": META}]]}).json()["event_id"]
    stream = user.get(f"gradio_api/call/add_files/{event_id}").text
    result = json.loads(stream.split("data: ")[-1])
    composite = result[2]["path"]
    assert Path(composite).is_relative_to(get_upload_folder()) and Image.open(composite).size == (96, 64)
    assert user.get(result[2]["url"]).status_code == 200 and anonymous.get(result[2]["url"]).status_code == 401
    assert set(Path(tempfile.gettempdir()).glob("combine_layers-*")) == temp_before
    assert demo.delete_cache is not None  # Gradio deletes the tool's uploads and downloads on a schedule


def test_a_foreign_host_name_and_a_cross_origin_upload_are_refused(combine_server, tmp_path):
    from gradio.utils import get_upload_folder

    url, *_ = combine_server
    # DNS rebinding: a page of evil.example whose name resolves to this machine.
    assert httpx.get(url, headers={"host": "evil.example"}).status_code == 400
    assert httpx.get(url, headers={"host": f"localhost:{url.rsplit(':', 1)[1][:-1]}"}).status_code == 200
    # A page of another origin posting a multipart upload (a browser sends it without asking): nothing is stored.
    before = {p for p in Path(get_upload_folder()).rglob("*") if p.is_file()}
    refused = httpx.post(f"{url}gradio_api/upload", headers={"origin": "http://evil.example"},
                         files={"files": ("x.png", png(tmp_path / "x.png").read_bytes(), "image/png")})
    assert refused.status_code == 403
    assert {p for p in Path(get_upload_folder()).rglob("*") if p.is_file()} == before


def test_the_combine_tool_warns_when_it_listens_on_every_interface_without_a_login(tmp_path, monkeypatch, caplog):
    from tool import combine_layers as cl

    monkeypatch.delenv("QIL_AUTH", raising=False)
    monkeypatch.setattr(cl, "OUTPUTS_DIR", tmp_path)  # its start-up cleans the outputs folder's cache: this one's
    with socket.socket() as busy:  # the port is taken: the tool stops at its launch, after its start-up messages
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level("WARNING"):
            assert cl.main(["--port", str(port)]) == 2  # its default host: every interface (0.0.0.0)
    assert f"The app listens on 0.0.0.0:{port} without a login" in caplog.text


# --- 2. run folders: reachable only through the copies a session was given -------------------------------------
@pytest.fixture(scope="module")
def app_server(demo_pipe, models_dir, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("trust3-outputs")
    settings = demo_settings(models_dir, outputs=outputs, host="127.0.0.1", port=free_port())
    sessions = Sessions()
    demo = app.build_ui(demo_pipe, settings, sessions)
    demo.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}/", outputs, settings, sessions
    demo.close()


def upload(url: str, image: Path) -> dict:
    (path,) = httpx.post(f"{url}gradio_api/upload", files={"files": (image.name, image.read_bytes(), "image/png")},
                         timeout=30).json()
    return {"path": path, "meta": META}


def job_values(image: dict, seed: int, steps: int = 2, **changes) -> list:
    """/decompose's inputs as a raw client sends them: the image, every PARAMS value in the table's order, original_size."""
    values = dict(DEFAULTS, prompt="a raw card", seed=seed, true_cfg_scale=1.0, num_inference_steps=steps, layers=2,
                  original_size=False)
    values.update(changes)
    return [image, *(values[p.name] for p in PARAMS), values["original_size"]]


def raw_run(url: str, data: list) -> tuple[str, object, str]:
    """A raw client: POST the job, read its result stream to the end. (event, data, the stream's text)."""
    event_id = httpx.post(f"{url}gradio_api/call/decompose", json={"data": data}, timeout=30).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/decompose/{event_id}", timeout=600).text
    events = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
    data = json.loads(stream.rsplit("data: ", 1)[-1])
    return events[-1], data["error"] if isinstance(data, dict) and "error" in data else data, stream


def run_folders(outputs: Path) -> set[Path]:
    return {p for p in outputs.iterdir() if (p / "params.json").is_file()}


@pytest.fixture(scope="module")
def raw_result(app_server, tmp_path_factory):
    url, outputs, *_ = app_server
    before = run_folders(outputs)
    event, data, stream = raw_run(url, job_values(upload(url, png(tmp_path_factory.mktemp("in") / "in.png")), 71))
    assert event == "complete", data
    (folder,) = run_folders(outputs) - before
    return folder, data, stream


def test_a_run_s_files_reach_its_client_as_copies_and_its_folder_is_not_served(app_server, raw_result):
    url, outputs, *_ = app_server
    folder, data, stream = raw_result
    gallery, pptx, zip_file, psd, caption, seed, _stack = data
    assert (len(gallery), caption, seed) == (2, "a raw card", 71)
    # The response names no run folder; what it names is Gradio's copy, whose bytes are the run's.
    assert folder.name not in stream and str(folder) not in stream
    for value, original in [(gallery[0]["image"], folder / "layer_1.png"), (zip_file, folder / zip_file["orig_name"])]:
        copy = httpx.get(value["url"], timeout=30)
        assert copy.status_code == 200 and copy.content == original.read_bytes()
    # Nobody reads the run folder itself, by its path or by a path into it.
    climbing = Path(os.environ["GRADIO_TEMP_DIR"]) / os.path.relpath(folder / "params.json", os.environ["GRADIO_TEMP_DIR"])
    for path in (folder / "params.json", folder / "layer_1.png", climbing):
        assert httpx.get(f"{url}gradio_api/file={path}", timeout=30).status_code == 403, path


def test_a_raw_client_s_run_folder_is_released_when_its_job_ends(app_server, raw_result):
    url, outputs, settings, sessions = app_server
    folder, *_ = raw_result
    # Its stream closed with the result: nobody shows it any more (the server counts the stream's end just after the
    # client has read it).
    wait_for(lambda: folder not in sessions.shown_folders(), 10, "the run folder to be released")
    layers = [Image.new("RGBA", (64, 48), (20, 160, 90, 255))] * 2
    newer = save_run(DecomposeResult(layers=layers, caption="a newer run", auto_caption=False, seed=72,
                                     params={"input_size": [64, 48]}, duration_s=0.1), outputs)["folder"]
    limit = settings.outputs_max_gb
    settings.outputs_max_gb = 1e-9  # every run is over the limit now
    try:
        app.prune_runs(settings, sessions, newer)  # what the next run of any client does after saving it
    finally:
        settings.outputs_max_gb = limit
    assert not folder.exists() and newer.is_dir()


# --- 3. sizes and lifetimes ----------------------------------------------------------------------------------
def test_an_oversized_body_is_refused_before_it_is_read_and_the_server_keeps_serving(app_server):
    url, *_ = app_server
    port = int(url.rstrip("/").rsplit(":", 1)[1])

    def answer_of(raw: socket.socket) -> str:
        """The whole HTTP answer: its head, then as many bytes of body as its Content-Length says."""
        data = b""
        while b"\r\n\r\n" not in data:
            data += raw.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += raw.recv(65536)
        return (head + b"\r\n\r\n" + body).decode()

    head = b"POST /gradio_api/call/decompose HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # says 100 MB, sends 1 KB, waits
        raw.sendall(head + b"Content-Length: 100000000\r\n\r\n" + b"{" * 1024)
        declared = answer_of(raw)
    assert time.monotonic() - start < 5  # answered without waiting for the 100 MB
    body = b"[" * 2_100_000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # no length said: counted as it comes
        raw.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body)
        streamed = answer_of(raw)
    for answer in (declared, streamed):
        assert answer.startswith("HTTP/1.1 413") and "the limit is 2,000,000 bytes" in answer
    assert httpx.get(url, timeout=30).status_code == 200


@pytest.fixture()
def counted_steps(demo_pipe, monkeypatch):
    """Counts the transformer's calls; a client is gone after 1 s (CLIENT_GONE_S) instead of 5."""
    calls: list = []
    handle = demo_pipe.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(studio.serving, "CLIENT_GONE_S", 1.0)
    yield calls
    handle.remove()


def test_a_job_whose_raw_client_never_listens_is_stopped_and_a_session_queues_two_jobs_at_most(app_server,
                                                                                            counted_steps, tmp_path):
    url, outputs, *_ = app_server
    image = upload(url, png(tmp_path / "in.png"))
    before = run_folders(outputs)
    # Posted, never listened to: 50 steps, stopped within a few.
    httpx.post(f"{url}gradio_api/call/decompose", json={"data": job_values(image, 81, steps=50)}, timeout=30)
    wait_for(lambda: app._PIPELINE_LOCK.locked(), 60, "the job to start")
    # Meanwhile one session queues jobs behind it: two are taken, the third is refused with the limit.
    joins = [httpx.post(f"{url}gradio_api/queue/join", timeout=30,
                        json={"data": job_values(image, 82, layers=99), "fn_index": fn_index(url, "decompose"),
                              "session_hash": "queuer"}) for _ in range(3)]
    assert [join.status_code for join in joins] == [200, 200, 429]
    assert joins[2].json()["detail"] == ("This session already has 2 jobs waiting or running (the limit per session): "
                                         "wait for one to finish.")
    wait_for(lambda: not app._PIPELINE_LOCK.locked(), 120, "the unlistened job to stop")
    # Stopped within ~CLIENT_GONE_S: a few steps, however fast this machine's are, not the 50 a job left running does
    # (true CFG 1: one transformer call a step).
    assert len(counted_steps) < 25
    assert run_folders(outputs) == before


def fn_index(url: str, api_name: str) -> int:
    config = httpx.get(f"{url}config", timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def test_a_job_whose_raw_client_disconnects_is_stopped(app_server, counted_steps, tmp_path):
    url, outputs, *_ = app_server
    before = run_folders(outputs)
    event_id = httpx.post(f"{url}gradio_api/call/decompose", json={"data": job_values(
        upload(url, png(tmp_path / "in.png")), 91, steps=50)}, timeout=30).json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/decompose/{event_id}", timeout=60):
        wait_for(lambda: len(counted_steps) >= 1, 60, "the first step")
    stopped_at = len(counted_steps)
    wait_for(lambda: not app._PIPELINE_LOCK.locked(), 120, "the job to stop")
    # The steps of ~CLIENT_GONE_S after the disconnect (6 on a fast CI machine), not the rest of the 50 a job left
    # running does (true CFG 1: one transformer call a step); and nothing saved.
    assert len(counted_steps) < stopped_at + 25
    assert run_folders(outputs) == before


def test_a_killed_process_s_cache_is_deleted_at_start_up_and_a_running_one_s_kept(tmp_path):
    import psutil

    cache = tmp_path / ".gradio-cache"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive, \
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as killed:
        owners = {proc: cache / f"{proc.pid}-{int(psutil.Process(proc.pid).create_time())}" for proc in (alive, killed)}
        for folder in owners.values():
            (folder / "0123abcd").mkdir(parents=True)
            png(folder / "0123abcd" / "upload.png")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        (cache / "4e5f").mkdir()  # what an older version left at the top of the cache
        assert sorted(clean_gradio_caches(tmp_path)) == sorted([owners[killed], cache / "4e5f"])
        assert [p.name for p in cache.iterdir()] == [owners[alive].name]
        alive.kill()


# --- 4. smaller holes ----------------------------------------------------------------------------------------
def test_a_file_value_that_names_no_absolute_path_is_refused_without_naming_the_server_s_folder(app_server):
    url, *_ = app_server
    for path in ("file:///etc/passwd", "outputs/params.json", "https://example.org/a.png"):
        answer = httpx.post(f"{url}gradio_api/call/decompose", json={"data": job_values({"path": path, "meta": META},
                                                                                         1)}, timeout=30)
        assert (answer.status_code, answer.json()["detail"]) == (400, NOT_AN_UPLOAD_MESSAGE), path
        assert os.getcwd() not in answer.text


def test_original_size_must_be_a_boolean(app_server, tmp_path):
    url, *_ = app_server
    event, message, _ = raw_run(url, job_values(upload(url, png(tmp_path / "in.png")), 1, original_size="no"))
    assert (event, message) == ("error", "original_size='no' is not true or false: send a boolean")


def test_the_score_view_of_a_deleted_run_says_so_without_its_path(tmp_path):
    from studio.stack import LayerStack

    gone = tmp_path / "20260101-000000-000000_seed1"
    stack = LayerStack(layers=[Image.new("RGBA", (8, 8))], run_folder=gone,
                       files={"layers": [gone / "layer_1.png"], "composite": gone / "composite.png",
                              "params": gone / "params.json"})
    with pytest.raises(ValueError) as refused:
        app.recomposition_view(str(png(tmp_path / "in.png")), stack)
    assert "no longer on the server" in str(refused.value) and str(tmp_path) not in str(refused.value)


@pytest.fixture(scope="module")
def hostile_batch(models_dir, tmp_path_factory):
    """`decompose` over a folder holding a FIFO, a symlink loop, a link to /dev/zero and a name with a terminal
    escape sequence, into an outputs folder holding another process's half-written run."""
    base = tmp_path_factory.mktemp("hostile")
    folder, out = base / "in", base / "out"
    folder.mkdir()
    out.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "red\x1b[2J\x1b[31m.png").write_bytes(b"not an image")
    foreign = out / ".partial-999999999-20260101-000000-000000_seed1"  # no such process: killed, or not ours
    foreign.mkdir()
    stdout, stderr = io.StringIO(), io.StringIO()  # (capsys is for one test: the module's tests share this run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", stdout)
        patch.setattr(sys, "stderr", stderr)
        code = app.main(["decompose", str(folder), str(folder / "pipe.png"), "--out", str(out), "--demo",
                         "--models-dir", str(models_dir), "--steps", "2"])
    return code, stdout.getvalue(), stderr.getvalue(), folder, foreign


def test_decompose_names_what_a_fifo_a_loop_and_a_device_are_and_counts_them(hostile_batch):
    code, stdout, stderr, folder, _ = hostile_batch
    assert code == 1
    lines = stdout.splitlines()
    summary = lines[lines.index("0 of 5 images decomposed, 5 failed"):]
    assert sorted(summary[1:]) == sorted([
        f"  FAILED  {folder / 'loop.png'}: loop.png is a symlink loop, not an image file: pass the image "
        f"file itself",
        f"  FAILED  {folder / 'pipe.png'}: pipe.png is a FIFO (named pipe), not an image file: pass the "
        f"image file itself",
        f"  FAILED  {folder / 'pipe.png'}: pipe.png is a FIFO (named pipe), not an image file: pass the "
        f"image file itself",
        f"  FAILED  {folder}/red\\x1b[2J\\x1b[31m.png: red\\x1b[2J\\x1b[31m.png is not an image: its content "
        f"is no image format this app reads. Upload a PNG, JPEG or WebP file.",
        f"  FAILED  {folder / 'zero.png'}: zero.png is a device (/dev/zero), not an image file: pass the "
        f"image file itself"])
    assert "\x1b[2J" not in stdout + stderr and "\x1b[31m" not in stdout + stderr  # the name's escapes stay text


def test_decompose_deletes_no_half_written_run_it_did_not_write(hostile_batch):
    *_, foreign = hostile_batch
    assert foreign.is_dir()


def test_decompose_ray_at_an_address_where_nothing_listens_gives_up_with_its_own_message(tmp_path, models_dir, capsys):
    pytest.importorskip("ray")
    start = time.monotonic()
    code = app.main(["decompose", str(png(tmp_path / "in.png")), "--ray", "127.0.0.1:1", "--out", str(tmp_path),
                     "--demo", "--models-dir", str(models_dir)])
    assert code == 2 and time.monotonic() - start < 30
    assert "error: --ray 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1 (Connection refused" in capsys.readouterr().err


def test_a_compile_cache_others_can_write_is_not_loaded(tmp_path, monkeypatch, caplog):
    import torch._inductor.config

    from studio.compiling import compile_cache_file, load_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", False)
    compile_cache_file().write_bytes(b"a pickle someone else wrote")
    tmp_path.chmod(0o777)
    with caplog.at_level("WARNING"):
        assert load_compile_cache() is False
    assert f"Compile caches not used: {tmp_path} is writable by other users (mode drwxrwxrwx)" in caplog.text
    assert torch._inductor.config.force_disable_caches  # Inductor's own caches there are not read either
    tmp_path.chmod(0o700)
    compile_cache_file().chmod(0o666)
    with caplog.at_level("WARNING"):
        assert load_compile_cache() is False
    assert f"{compile_cache_file()} is writable by other users" in caplog.text


def test_rmbg_is_downloaded_at_its_pinned_revision_only(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from studio.errors import ModelNotAvailableError
    from tool import edit_rgba_image as edit

    asked = []

    def offline(repo_id, **kwargs):  # the hub cannot be reached here: record what would be fetched
        asked.append((repo_id, kwargs.get("revision")))
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotAvailableError):
        edit.load_rmbg(tmp_path)
    assert asked == [("briaai/RMBG-2.0", edit.RMBG_REVISION)] and len(edit.RMBG_REVISION) == 40


def test_the_ranks_of_gpus_n_meet_on_the_loopback_only():
    import psutil

    from studio.parallel import loopback_interface, loopback_store

    port = free_port()
    store = loopback_store(0, 1, port)
    listening = {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}
    store.set("ranks", "met")
    assert store.get("ranks") == b"met"
    assert "127.0.0.1" in {a.address for a in psutil.net_if_addrs()[loopback_interface()]}


def test_the_edit_tool_writes_each_edit_whole_and_keeps_its_folder_within_the_limits(tmp_path):
    from tool import edit_rgba_image as edit

    layer = Image.new("RGBA", (32, 32), (200, 10, 10, 255))
    result = edit.EditResult(image=layer, edited=layer.convert("RGB"), matte="chroma_key", seed=5,
                             params={"prompt": "red"}, duration_s=0.1)
    broken = edit.EditResult(**{**vars(result), "edited": None})  # its save fails half-way
    with pytest.raises(AttributeError):
        edit.save_edit(broken, layer, tmp_path)
    assert list((tmp_path / "edits").iterdir()) == []  # nothing half-written left
    first = edit.save_edit(result, layer, tmp_path)
    second = edit.save_edit(result, layer, tmp_path)
    assert sorted(p.name for p in first.iterdir()) == ["edited.png", "edited_on_green.png", "input.png", "params.json"]
    settings = demo_settings(tmp_path, outputs=tmp_path, outputs_max_gb=1e-9)  # every edit is over the limit
    assert edit.prune_edits(settings, second) == [first]
    assert [p.name for p in (tmp_path / "edits").iterdir()] == [second.name]
