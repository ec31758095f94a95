"""Bad input, faults and access, against the real UI server on the tiny demo pipeline.

Bad files are refused with a message that names the file and the fix (in the API error, which is the text the
page shows); hard but valid files (CMYK, 16-bit, palette transparency, EXIF rotation, animation) are decoded
right; after each refusal the server still serves. Out of memory, two clients at once, a client that
vanishes mid-run, the upload limit, the outputs limits and the login come after.
"""

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import app
from studio.images import to_rgba
from studio.runs import prune_outputs
from studio.serving import launch_options, network_warning
from conftest import JOB_TIMEOUT_S, ROOT, demo_settings, free_port

# The cheapest good run: 2 layers, 2 steps, no CFG pass, a prompt (no auto-caption).
GOOD = dict(prompt="a test card", layers=2, num_inference_steps=2, true_cfg_scale=1.0, seed=5)


# --- files, each made here ---------------------------------------------------------------------------
def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def plain_png(path: Path, size=(96, 64), colour=(20, 160, 90, 255)) -> Path:
    Image.new("RGBA", size, colour).save(path)
    return path


def corrupt_png(path: Path) -> Path:
    """A real PNG whose compressed pixel data was scrambled: the header reads, the pixels do not."""
    data = bytearray(png_bytes(Image.new("RGB", (64, 64), (10, 200, 30))))
    idat = data.index(b"IDAT") + 4
    for i in range(idat, idat + 20):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def text_as_png(path: Path) -> Path:
    path.write_text("Meeting notes, not a picture.\n")
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def one_pixel_png(path: Path) -> Path:
    return plain_png(path, size=(1, 1))


def huge_png(path: Path, side: int = 20000) -> Path:
    """A valid side x side 1-bit PNG of ~50 KB: decoded as RGBA it would take side*side*4 bytes (1.6 GB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + one bit per pixel, all black
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (96, 64), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    return path


def grey_16_bit_png(path: Path) -> Path:
    values = np.full((64, 96), 32896, np.uint16)  # 32896 / 65535 * 255 = 128
    values[:, :48] = 65535
    Image.fromarray(values).save(path)
    return path


def palette_png_with_transparency(path: Path) -> Path:
    """Palette index 0 red and fully transparent (tRNS), index 1 blue and opaque; left half index 1."""
    image = Image.new("P", (96, 64), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 48, 64))
    image.save(path, transparency=0)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 96x64, left half red, right half blue; EXIF orientation 6: shown turned 90 degrees clockwise,
    i.e. 64x96 with red on top."""
    image = Image.new("RGB", (96, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif)
    return path


def animated_gif(path: Path) -> Path:
    """Three frames: red, green, blue."""
    frames = [Image.new("RGB", (96, 64), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


# --- to_rgba, no server --------------------------------------------------------------------------------
def test_cmyk_jpeg_becomes_rgb_red(tmp_path):
    assert tuple(np.asarray(to_rgba(cmyk_jpeg(tmp_path / "c.jpg")))[10, 10]) == (255, 0, 0, 255)


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    pixels = np.asarray(to_rgba(grey_16_bit_png(tmp_path / "g.png")))
    # Pillow's plain convert would clip both halves to 255.
    assert tuple(pixels[10, 10]) == (255, 255, 255, 255)
    assert tuple(pixels[10, 80]) == (128, 128, 128, 255)


def test_palette_transparency_becomes_alpha(tmp_path):
    pixels = np.asarray(to_rgba(palette_png_with_transparency(tmp_path / "p.png")))
    assert tuple(pixels[10, 10]) == (0, 0, 255, 255)
    assert pixels[10, 80, 3] == 0


def test_exif_orientation_is_applied(tmp_path):
    image = to_rgba(exif_rotated_jpeg(tmp_path / "e.jpg"))
    assert image.size == (64, 96)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[20, 32, :3] - (255, 0, 0)).max() < 40  # top: red
    assert np.abs(pixels[76, 32, :3] - (0, 0, 255)).max() < 40  # bottom: blue


def test_animated_gif_gives_its_first_frame_and_a_note(tmp_path):
    notes = []
    image = to_rgba(animated_gif(tmp_path / "a.gif"), notes)
    assert tuple(np.asarray(image)[10, 10]) == (255, 0, 0, 255)
    assert notes == ["a.gif is animated (3 frames): the first frame was used."]


def test_too_many_pixels_is_refused_from_the_header(tmp_path):
    # 8200 x 8200 = 67 MP: over MAX_INPUT_PIXELS (64 MP) but under Pillow's own guard, so the app's check speaks.
    path = huge_png(tmp_path / "big.png", side=8200)
    with pytest.raises(ValueError, match=r"big\.png is 8200x8200 \(67 megapixels\): the limit is 64 megapixels"):
        to_rgba(path)


def test_20000x20000_is_refused_without_decoding_its_pixels(tmp_path):
    # In a fresh process, whose peak memory is only the imports: decoding would add 400 MB (1-bit pixels
    # are held one byte each), converting 1.6 GB.
    path = huge_png(tmp_path / "huge.png")
    code = ("import resource, sys; sys.path.insert(0, 'src'); from studio.images import to_rgba\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    to_rgba(sys.argv[1])\nexcept ValueError as err:\n    print(err)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    message, grown_mb = proc.stdout.strip().splitlines()
    assert message.startswith("huge.png is 400 megapixels: the limit is 64 megapixels.")  # its size, not Pillow's
    assert int(grown_mb) < 50


# --- the server ----------------------------------------------------------------------------------------
def client_for(url: str, tmp_path: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def decompose(client, path: Path, **overrides):
    """One /decompose call; returns (gallery, pptx, zip, psd, caption, seed)."""
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), **dict(GOOD, **overrides), api_name="/decompose")


def run_params(outputs: Path, seed: int) -> dict:
    """params.json of the newest run with this seed."""
    files = sorted(outputs.glob("*/params.json"), key=lambda p: p.stat().st_mtime)
    return [params for params in map(json.loads, map(Path.read_text, files)) if params["seed"] == seed][-1]


# Each refused file, then a good request on the same server: the hard-but-valid files take turns as that
# good request (each must succeed, and be read right).
REFUSED_THEN_GOOD = [
    ("corrupt_png", corrupt_png, r"corrupt_png\.png is damaged: its pixels could not be decoded", cmyk_jpeg),
    ("text_renamed_png", text_as_png, r"text_renamed_png\.png is not an image", grey_16_bit_png),
    ("zero_bytes", empty_file, r"zero_bytes\.png is empty \(0 bytes\)", palette_png_with_transparency),
    ("one_pixel", one_pixel_png, r"one_pixel\.png is 1x1 px: too small for the model", exif_rotated_jpeg),
    ("20000x20000", huge_png, r"20000x20000\.png is 400 megapixels: the limit is 64 megapixels", animated_gif),
]
SUFFIX = {cmyk_jpeg: ".jpg", exif_rotated_jpeg: ".jpg", animated_gif: ".gif"}


@pytest.mark.parametrize("case, make_bad, message, make_good", REFUSED_THEN_GOOD, ids=[c[0] for c in REFUSED_THEN_GOOD])
def test_refused_file_gets_a_clear_message_and_the_next_request_succeeds(server, tmp_path, case, make_bad, message,
                                                                         make_good):
    from gradio_client.exceptions import AppError

    url, outputs = server
    client = client_for(url, tmp_path)
    with pytest.raises(AppError, match=message):
        decompose(client, make_bad(tmp_path / f"{case}.png"))

    seed = zlib.crc32(case.encode()) % 1000
    gallery, _, _, _, caption, used_seed = decompose(client, make_good(tmp_path / f"good{SUFFIX.get(make_good, '.png')}"),
                                                     seed=seed)
    assert (len(gallery), caption, used_seed) == (2, GOOD["prompt"], seed)
    params = run_params(outputs, seed)
    if make_good is exif_rotated_jpeg:
        assert params["input_size"] == [64, 96]  # upright
    if make_good is animated_gif:
        assert params["input_notes"] == ["good.gif is animated (3 frames): the first frame was used."]


def test_out_of_range_parameters_are_refused_by_name_and_the_next_request_succeeds(server, tmp_path):
    from gradio_client.exceptions import AppError

    url, _ = server
    client = client_for(url, tmp_path)
    image = plain_png(tmp_path / "in.png")
    refused = {
        "layers": (12, r"layers=12 is out of range: use an integer from 2 to 10"),
        "num_inference_steps": (1, r"num_inference_steps=1 is out of range: use an integer from 2 to 50"),
        "true_cfg_scale": (11.0, r"true_cfg_scale=11.0 is out of range: use a number from 1.0 to 10.0"),
        "resolution": (800, r"resolution=800 is not supported: use one of \(640, 1024\)"),
    }
    for name, (value, message) in refused.items():
        with pytest.raises(AppError, match=message):
            decompose(client, image, **{name: value})
    gallery, *_ = decompose(client, image)
    assert len(gallery) == 2


def test_upload_over_the_size_limit_is_refused_by_gradio(server, tmp_path):
    url, _ = server
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)  # ~1.5 MB as PNG
    path = tmp_path / "big.png"
    Image.fromarray(noise).save(path)
    assert path.stat().st_size > 1_000_000
    # gradio_client reads the limit from the server and refuses before sending ...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
        decompose(client_for(url, tmp_path), path)
    # ... and the server's upload route refuses it too (for any other client).
    response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", path.read_bytes(), "image/png")})
    assert response.status_code == 413
    assert "maximum allowed size" in response.text


# --- faults --------------------------------------------------------------------------------------------
def test_out_of_memory_says_what_to_change_frees_the_run_and_the_next_request_works(server, demo_pipe, tmp_path):
    from gradio_client.exceptions import AppError

    url, _ = server
    client = client_for(url, tmp_path)
    image = plain_png(tmp_path / "in.png")
    latents = []

    def out_of_memory(module, args, kwargs):  # the fault, raised from inside the pipeline's denoising loop
        latents.append(weakref.ref(kwargs["hidden_states"]))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    hook = demo_pipe.pipe.transformer.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    try:
        with pytest.raises(AppError) as refused:
            decompose(client, image, layers=3)
    finally:
        hook.remove()
    message = str(refused.value)
    assert message.startswith("Out of GPU memory during the decomposition; the memory was freed. Try: ")
    assert "fewer layers (this run asked for 3)" in message
    assert "--offload budget (now: off" in message
    # The run's tensors are gone: nothing (such as a kept traceback) holds the latents the transformer got.
    assert len(latents) == 1 and latents[0]() is None
    gallery, *_ = decompose(client, image)
    assert len(gallery) == 2


def test_two_clients_at_once_both_finish_one_at_a_time_with_their_own_results(server, tmp_path, monkeypatch):
    url, outputs = server
    running, most_running, lock = [0], [0], threading.Lock()
    real_infer = app.infer

    def counting_infer(*args, **kwargs):  # the real infer, counted while it runs
        with lock:
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])
        try:
            return real_infer(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(app, "infer", counting_infer)  # the handler looks `infer` up at call time
    from gradio_client import handle_file

    square = plain_png(tmp_path / "square.png", size=(64, 64), colour=(200, 0, 0, 255))
    wide = plain_png(tmp_path / "wide.png", size=(128, 64), colour=(0, 0, 200, 255))
    jobs = [client_for(url, tmp_path).submit(handle_file(str(path)), **dict(GOOD, prompt=prompt, seed=seed),
                                             api_name="/decompose")
            for path, prompt, seed in ((square, "the square one", 11), (wide, "the wide one", 22))]
    (square_gallery, *_, square_caption, square_seed), (wide_gallery, *_, wide_caption, wide_seed) = \
        [job.result(timeout=JOB_TIMEOUT_S) for job in jobs]

    assert most_running[0] == 1
    assert (square_caption, square_seed, wide_caption, wide_seed) == ("the square one", 11, "the wide one", 22)
    square_size = Image.open(square_gallery[0]["image"]).size
    wide_size = Image.open(wide_gallery[0]["image"]).size
    assert square_size[0] == square_size[1] and wide_size[0] == 2 * wide_size[1]
    assert run_params(outputs, 11)["input_size"] == [64, 64] and run_params(outputs, 22)["input_size"] == [128, 64]


def test_a_client_that_disconnects_mid_run_does_not_leave_the_app_stuck(server, demo_pipe, tmp_path):
    url, _ = server
    image = plain_png(tmp_path / "in.png")
    started = threading.Event()
    hook = demo_pipe.pipe.transformer.register_forward_pre_hook(lambda *_: started.set())
    # A client in its own process, killed once its run is in the denoising loop: its connection just drops.
    code = ("import sys; from gradio_client import Client, handle_file\n"
            "Client(sys.argv[1], verbose=False).predict(handle_file(sys.argv[2]), prompt='gone', layers=2, "
            "num_inference_steps=2, true_cfg_scale=1.0, seed=31, api_name='/decompose')\n")
    leaver = subprocess.Popen([sys.executable, "-c", code, url, str(image)])
    try:
        assert started.wait(timeout=JOB_TIMEOUT_S), "the leaving client's run never reached the transformer"
    finally:
        hook.remove()
        leaver.kill()
        leaver.wait()
    # The next client is served: its job waits only for the abandoned one (a 2-step demo run), well within the
    # result's timeout; a stuck app would never answer it.
    from gradio_client import handle_file

    job = client_for(url, tmp_path).submit(handle_file(str(image)), **dict(GOOD, seed=32), api_name="/decompose")
    gallery, *_, caption, seed = job.result(timeout=JOB_TIMEOUT_S)
    assert (len(gallery), caption, seed) == (2, GOOD["prompt"], 32)


# --- access and disk -----------------------------------------------------------------------------------
def test_with_auth_an_unauthenticated_api_call_is_refused(demo_pipe, models_dir, tmp_path):
    from gradio_client import Client

    settings = demo_settings(models_dir, outputs=tmp_path / "outputs", host="127.0.0.1", port=free_port(),
                             auth=("alice", "s3cret"))
    demo = app.build_ui(demo_pipe, settings)
    demo.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{settings.port}/"
    try:
        image = png_bytes(Image.new("RGB", (64, 64)))
        assert httpx.post(f"{url}gradio_api/upload", files={"files": ("in.png", image, "image/png")}).status_code == 401
        call = httpx.post(f"{url}gradio_api/call/decompose", json={"data": [None]})
        assert call.status_code == 401
        from gradio_client.exceptions import AuthenticationError

        with pytest.raises(AuthenticationError):  # the config itself answers 401 without the login
            Client(url, verbose=False)
        # With the login, the same endpoint is there.
        assert "/decompose" in Client(url, auth=("alice", "s3cret"), verbose=False).view_api(print_info=False,
                                                                                            return_format="dict")["named_endpoints"]
    finally:
        demo.close()


def test_auth_comes_from_the_flag_or_the_environment(monkeypatch):
    assert app.parse_args(["--auth", "alice:pa:ss"])[1].auth == ("alice", "pa:ss")
    monkeypatch.setenv("QIL_AUTH", "bob:hunter2")
    assert app.parse_args([])[1].auth == ("bob", "hunter2")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "nopassword"])


def test_start_up_on_all_interfaces_without_login_warns(tmp_path):
    # No weights and no hub: main() stops (exit 2) before it binds a port, after the start-up warning.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIL_")}
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "app.py"), "--host", "0.0.0.0", "--port", "7869",
                           "--models-dir", str(tmp_path / "models")], capture_output=True, text=True, timeout=300,
                          env=dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2"))
    assert proc.returncode == 2
    assert "WARNING The app listens on 0.0.0.0:7869 without a login: anyone who can reach this machine" in proc.stderr


def test_network_warning_only_when_listening_on_all_interfaces_without_login():
    assert "without a login" in network_warning(app.Settings(host="0.0.0.0"))
    assert network_warning(app.Settings(host="0.0.0.0", auth=("a", "b"))) is None
    assert network_warning(app.Settings(host="127.0.0.1")) is None


def test_prune_outputs_deletes_oldest_runs_beyond_the_size_and_age_limits(tmp_path):
    now = time.time()

    def run(name: str, megabytes: int, age_hours: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "params.json").write_text("{}")
        (folder / "layer_1.png").write_bytes(b"\0" * megabytes * 1_000_000)
        os.utime(folder, (now - age_hours * 3600,) * 2)
        return folder

    ancient, old, middle, new = run("a", 1, 200), run("b", 3, 3), run("c", 3, 2), run("d", 3, 0)
    (tmp_path / ".gradio-cache").mkdir()
    (tmp_path / "notes").mkdir()  # not a run folder: no params.json
    deleted = prune_outputs(tmp_path, max_bytes=7e6, max_age_s=168 * 3600, keep=new)
    assert deleted == [ancient, old]  # too old; then oldest first until 6 MB <= 7 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gradio-cache", "c", "d", "notes"]
    # The run just saved stays even when it alone is over the limit; 0 turns a limit off.
    assert prune_outputs(tmp_path, max_bytes=1, max_age_s=0, keep=new) == [middle]
    assert prune_outputs(tmp_path, max_bytes=0, max_age_s=0) == []
