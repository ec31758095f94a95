"""Shared fixtures: the tiny random demo pipeline, built offline and loaded through the app's real load path."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import app  # noqa: E402
from studio.params import DEFAULTS  # noqa: E402
from studio.serving import launch_options  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _own_temp_dir(tmp_path_factory):
    """The test process's temp files go under pytest's own folder: gradio_client 1.x leaves an empty
    /tmp/<40 hex> folder behind for every file it downloads (client.py, `_download_file`)."""
    import tempfile

    before, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tempdir"))
    yield
    tempfile.tempdir = before


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models/ folder of the session's own, so tests never touch the user's weight cache."""
    return tmp_path_factory.mktemp("models")


# How long a test waits for one demo job over HTTP (its own, or one queued behind another) before failing: a
# 2-step demo run takes ~5-15 s on an idle 2-core CPU, several times that on a busy one. Below pytest.ini's
# per-test timeout, so a stuck job fails with its own message.
JOB_TIMEOUT_S = 300


def free_port() -> int:
    """A port nothing listens on, for a test server on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition()` every 0.1 s until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_app(*args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """`python src/app.py ARGS...` in a subprocess, the way a user runs it."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "src" / "app.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def demo_settings(models_dir: Path, **overrides) -> "app.Settings":
    """Settings for the demo model; FirstBlockCache off unless a test turns it on (it changes outputs)."""
    values = dict(demo=True, models_dir=models_dir, offload="off", first_block_cache=False)
    values.update(overrides)
    return app.Settings(**values)


@pytest.fixture(scope="session")
def demo_pipe(models_dir):
    """The demo pipeline, loaded once per session with FirstBlockCache off."""
    return app.load_pipeline(demo_settings(models_dir))


@pytest.fixture(scope="session")
def rgba_image():
    """A 3:2 RGBA test image with a transparent border."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 20, 280, 180], fill=(30, 90, 200, 255))
    draw.ellipse([100, 50, 200, 150], fill=(230, 40, 40, 255))
    return image


# The shared server's upload limit (tests/test_hardening.py sends a file just over it).
UPLOAD_LIMIT = "1mb"


@pytest.fixture(scope="session")
def server(demo_pipe, models_dir, tmp_path_factory):
    """One in-process UI server on the demo pipeline for every HTTP test; yields (url, outputs folder).

    Two differences from `python src/app.py --demo`: the default step count is 2, not the model card's 50, so
    the README's calls (which leave steps at the default) run in seconds; uploads are capped at UPLOAD_LIMIT.
    Tests share its outputs folder: they find their run by seed or caption, never by counting folders.
    """
    outputs = tmp_path_factory.mktemp("server-outputs")
    settings = demo_settings(models_dir, outputs=outputs, host="127.0.0.1", port=free_port(),
                             max_upload_size=UPLOAD_LIMIT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DEFAULTS, "num_inference_steps", 2)
        demo = app.build_ui(demo_pipe, settings)
    demo.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}/", outputs
    demo.close()


def engine_on(loaded, vram_budget_gb: float = float("inf"), **plan_kwargs) -> list[str]:
    """The low-VRAM engine on a pipeline loaded with --offload off (its weights on the CPU), planned from its modules
    and the mode it was loaded in (`plan_loaded`: resident_blocks, text_resident_layers, host_ram_gb, text_layer_fp8_gb)
    as `load_pipeline` plans the budget mode from the files; a test forces the counts this way. Returns what was
    applied."""
    from studio.engine.stream import enable_budget_offload, plan_loaded
    from studio.modes import OFFLOAD

    loaded.machine = plan_loaded(loaded.pipe, vram_budget_gb, **dict(quant=loaded.quant) | plan_kwargs)
    loaded.stages, applied = enable_budget_offload(loaded.pipe, loaded.machine)
    loaded.offload = OFFLOAD["budget"]
    return applied


def machine_fits(mode: str, sizes: dict, vram_gb: float, ram_gb: float | None, fp8_storage: bool = False, **kwargs):
    """`plan_machine` for an offload mode's row, as `load_pipeline` calls it before loading (`fp8_storage`: `sizes`
    are its float8 figures, held in RAM). Raises ValueError where the machine does not fit."""
    from studio.engine.plan import plan_machine
    from studio.modes import OFFLOAD

    return plan_machine(OFFLOAD[mode], sizes, vram_gb, ram_gb, transformer_in_ram=fp8_storage, **kwargs)
