"""src/tool/edit_rgba_image.py on a tiny random QwenImageEditPlusPipeline built offline and loaded by app.load_pipeline."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import app
from studio.params import flag_values
from studio.runs import DecomposeResult, save_run
from studio.stack import LayerStack
from studio.errors import ModelNotAvailableError
from conftest import demo_settings, free_port
from tool import edit_rgba_image as edit


@pytest.fixture(scope="module")
def edit_pipe(models_dir):
    """The demo edit pipeline, through the app's real load path (FirstBlockCache off: it changes outputs), in the
    low-VRAM engine's "budget" mode: on a CPU its hooks run with every weight in place, so the edit pipeline is
    shown to work under them (the engine was written against the layered pipeline)."""
    return app.load_pipeline(demo_settings(models_dir, offload="budget"), edit.EDIT_MODEL)


def synthetic_layer(size=(150, 100)):
    """Opaque shapes in colours far from the green, on transparency (an odd size: the model works at 1248x832)."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle([10, 10, 70, 90], fill=(30, 90, 200, 255))
    draw.ellipse([60, 20, 140, 80], fill=(230, 40, 40, 255))
    draw.polygon([(75, 5), (95, 5), (85, 25)], fill=(250, 250, 250, 255))
    return layer


def test_demo_edit_pipeline_loads_through_the_apps_load_path(edit_pipe, models_dir):
    assert type(edit_pipe.pipe).__name__ == "QwenImageEditPlusPipeline"
    assert edit_pipe.demo and edit_pipe.model_path == models_dir / "demo-tiny-random-edit"
    assert edit_pipe.dtype == "float32"  # the CPU loads in float32
    assert edit_pipe.offload.name == "budget" and any(o.startswith("budget_offload(") for o in edit_pipe.optimizations)
    assert edit_pipe.pipe.vae.config.input_channels == 3  # the edit model sees RGB: the layer on green
    assert not edit_pipe.pipe.transformer.config.use_layer3d_rope  # Edit-2509's DiT, not the layered one


def test_the_tool_takes_the_apps_loading_flags(tmp_path):
    flags = ["--offload", "budget", "--vram-budget", "20", "--models-dir", str(tmp_path), "--quantization",
             "fp8_storage", "--no-first-block-cache", "--demo"]

    _, app_settings, _ = app.parse_args(flags)
    tool_settings = app.Settings(**flag_values(edit.parse_args(flags), edit.FLAGS))

    assert tool_settings == dataclasses.replace(app_settings, port=7871)
    assert tool_settings.offload == "budget" and tool_settings.vram_budget_gb == 20.0
    assert tool_settings.quantization == "fp8_storage" and tool_settings.demo


def test_chroma_key_round_trip_is_exact_on_a_synthetic_layer():
    layer = synthetic_layer()

    on_green = edit.flatten_on_background(layer)
    back = edit.unmix_background(on_green, edit.chroma_key_matte(on_green))

    assert on_green.mode == "RGB" and on_green.getpixel((0, 0)) == edit.BACKGROUND_COLOR
    assert np.array_equal(np.asarray(back.getchannel("A")), np.asarray(layer.getchannel("A")))
    opaque = np.asarray(layer.getchannel("A")) == 255
    assert np.array_equal(np.asarray(back)[opaque], np.asarray(layer)[opaque])


def test_chroma_key_absorbs_drift_and_unmixing_takes_the_green_out_of_edges():
    red = np.array([230, 40, 40], np.float32)
    green = np.array(edit.BACKGROUND_COLOR, np.float32)
    pixels = np.array([[green + [6, -8, 5],  # the model's green, a few levels off: still background
                        0.5 * red + 0.5 * green]], np.float32)  # a half-covered edge pixel
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    half = Image.fromarray(np.array([[0, 128]], np.uint8), "L")

    alpha = np.asarray(edit.chroma_key_matte(image))
    unmixed = np.asarray(edit.unmix_background(image, half))

    assert alpha[0, 0] == 0
    assert np.all(np.abs(unmixed[0, 1, :3].astype(float) - red) <= 2)  # red again, no green fringe


def test_rmbg_missing_falls_back_to_the_chroma_key_or_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotAvailableError) as missing:
        edit.load_rmbg(tmp_path, allow_download=False)

    assert str(tmp_path / "RMBG-2.0") in str(missing.value) and "chroma_key" in str(missing.value)
    assert edit.choose_matte("auto", None) == "chroma_key"
    assert edit.choose_matte("chroma_key", object()) == "chroma_key"
    assert edit.choose_matte("auto", object()) == "rmbg"
    with pytest.raises(ValueError, match="models/RMBG-2.0"):
        edit.choose_matte("rmbg", None)


def test_missing_edit_weights_fail_offline_with_the_apps_message(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never download in a test

    code = edit.main(["--models-dir", str(tmp_path), "--matte", "chroma_key"])

    err = capsys.readouterr().err
    assert code == 2
    assert "No Qwen-Image-Edit-2509 weights found" in err
    assert str(tmp_path / "Qwen-Image-Edit-2509") in err and "--demo" in err and "--model" in err



@pytest.fixture(scope="module")
def edit_server(edit_pipe, models_dir, tmp_path_factory):
    """The tool's UI on the demo edit pipeline, in this process: (url, outputs folder)."""
    outputs = tmp_path_factory.mktemp("edit-outputs")
    from studio.serving import launch_options

    # As the tool's `main` launches it (ServingGuard in front): its Sessions stop a job whose client stopped
    # listening, and only the guard counts who listens (one count per process, shared with the other servers here).
    settings = demo_settings(models_dir, outputs=outputs, host="127.0.0.1", port=free_port())
    demo = edit.build_ui(edit_pipe, settings, rmbg=None, matte="chroma_key")
    demo.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{settings.port}/", outputs
    demo.close()


def status_of_stream(url: str) -> int:
    """The status of a GET whose answer may be an endless stream (a heartbeat): read at its start, then closed."""
    import httpx

    with httpx.stream("GET", url, timeout=30) as response:
        return response.status_code


def test_the_tool_asks_for_its_login_from_the_app_s_flag_table(edit_pipe, models_dir, tmp_path, monkeypatch):
    """--auth (or QIL_AUTH) comes from the app's serving rows and reaches Gradio's login: nothing answers without it."""
    import httpx

    from studio.serving import launch_options

    monkeypatch.setenv("QIL_AUTH", "bob:pa55word")
    settings = app.Settings(**flag_values(edit.parse_args(["--host", "127.0.0.1", "--port", str(free_port()), "--demo",
                                                           "--models-dir", str(models_dir),
                                                           "--outputs", str(tmp_path)]), edit.FLAGS))
    assert settings.auth == ("bob", "pa55word")
    demo = edit.build_ui(edit_pipe, settings, rmbg=None, matte="chroma_key")
    demo.launch(**launch_options(settings), prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{settings.port}/"
    try:
        anonymous = [httpx.post(f"{url}gradio_api/call/edit", json={"data": []}, timeout=30).status_code,
                     status_of_stream(f"{url}gradio_api/heartbeat/any"),
                     httpx.get(f"{url}config", timeout=30).status_code]
        user = httpx.Client(timeout=30)
        assert user.post(f"{url}login", data={"username": "bob", "password": "pa55word"}).status_code == 200
        assert user.get(f"{url}config").status_code == 200
    finally:
        demo.close()
    assert anonymous == [401, 401, 401]


def test_edit_api_keeps_the_layer_size_and_gives_alpha_back(edit_server, tmp_path):
    from gradio_client import Client, handle_file

    url, outputs = edit_server
    layer = synthetic_layer()
    layer_path = tmp_path / "layer.png"
    layer.save(layer_path)
    client = Client(url, verbose=False)
    result_path, seed, info = client.predict(handle_file(layer_path), "make the ellipse green", 7, False, 2.0,
                                             2, " ", "chroma_key", api_name="/edit")

    result = Image.open(result_path)
    (run,) = [p for p in (outputs / "edits").iterdir() if p.name.endswith("_seed7")]
    params = json.loads((run / "params.json").read_text())
    model_output = Image.open(run / "edited_on_green.png")
    expected_alpha = edit.chroma_key_matte(model_output.resize(layer.size, Image.LANCZOS))
    assert result.mode == "RGBA" and result.size == layer.size == (150, 100)
    assert model_output.size == (1248, 832)  # the model worked at its own size; the result came back
    # The alpha is the matte of the edit, not the input's copied over (the demo's edit is noise: opaque).
    assert np.array_equal(np.asarray(result.getchannel("A")), np.asarray(expected_alpha))
    assert not np.array_equal(np.asarray(result.getchannel("A")), np.asarray(layer.getchannel("A")))
    assert seed == 7 and params["seed"] == 7 and params["matte_used"] == "chroma_key" and "chroma_key" in info
    assert params["input_size"] == [150, 100] and params["demo"] is True
    assert params["generator_device"] == "cpu"  # no CUDA here: the CPU generator, and params.json says so


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("Meeting notes, not a picture.\n"),
     "notes.png is not an image: its content is no image format this app reads. Upload a PNG, JPEG or WebP file."),
    (lambda p: Image.new("RGBA", (1, 1), (200, 30, 30, 255)).save(p),
     "notes.png is 1x1 px: too small for the model. Use an image at least 16 px on each side."),
])
def test_a_bad_file_gets_the_apps_message_not_gradios_dump(edit_server, tmp_path, make, message):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, _ = edit_server
    bad = tmp_path / "notes.png"
    make(bad)
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(bad), "make it red", 7, False, 2.0, 2, " ", "chroma_key", api_name="/edit")

    text = str(refused.value)
    assert text == message  # the app's reader's message, whole: the file's name, the fix
    assert "preprocess" not in text and str(tmp_path) not in text and "gradio" not in text.lower()


@pytest.mark.parametrize("with_meta", [False, True])
def test_a_server_file_named_in_a_raw_value_is_never_read(edit_server, tmp_path, with_meta):
    """Over HTTP, as an attacker would: a value naming a PNG elsewhere on the server, with and without Gradio's
    `meta`, is refused before the file is read, with the same message whether the file exists or not."""
    import httpx

    url, outputs = edit_server
    secret = tmp_path / "secret.png"
    Image.new("RGBA", (64, 64), (1, 2, 3, 255)).save(secret)
    runs_before = set((outputs / "edits").glob("*")) if (outputs / "edits").exists() else set()

    def call(path):
        value = {"path": str(path), **({"meta": {"_type": "gradio.FileData"}} if with_meta else {})}
        event = httpx.post(f"{url}gradio_api/call/edit", json={"data": [value, "make it red", 7, False, 2.0, 2, " ",
                                                                       "chroma_key"]}).json()["event_id"]
        return httpx.get(f"{url}gradio_api/call/edit/{event}", timeout=300).text

    # Served as `main` serves it (show_error): Gradio's refusal of a value with `meta` repeats the path the client
    # sent, and nothing else of the server's (tests/test_trust.py checks the app the same way).
    missing = tmp_path / "missing.png"
    answer, answer_missing = call(secret).replace(str(secret), "<sent>"), call(missing).replace(str(missing), "<sent>")

    assert "event: error" in answer and "event: complete" not in answer
    assert str(tmp_path) not in answer
    assert ("not uploaded by a user" if with_meta else "was not uploaded to this app") in answer, answer
    assert answer == answer_missing  # nothing tells whether the file exists
    runs_after = set((outputs / "edits").glob("*")) if (outputs / "edits").exists() else set()
    assert runs_after == runs_before  # no edit ran on it


def test_the_studios_edit_this_layer_puts_the_tools_edit_in_its_place_with_undo(edit_server, models_dir, tmp_path):
    """The studio page's "Edit this layer": the selected layer goes to this tool's API, the edited layer replaces it
    in the stack (saved as a sub-run of the stack's run folder), and one undo gives the stack back (issue 23)."""
    url, _ = edit_server
    bottom = Image.new("RGBA", (150, 100), (20, 20, 20, 255))
    layers = [bottom, synthetic_layer()]
    outputs = tmp_path / "outputs"
    paths = save_run(DecomposeResult(layers=layers, caption="two layers", auto_caption=False, seed=5, params={},
                                     duration_s=0.1), outputs)
    stack = LayerStack(layers=layers, run_folder=paths["folder"], files=paths, caption="two layers", seed=5)
    settings = demo_settings(models_dir, outputs=outputs, edit_tool=url)

    gallery, *_, caption, seed, edited = app.edit_layer_handler(settings, {}, 2, "make the ellipse green", stack,
                                                                 seed=7, num_inference_steps=2, matte="chroma_key")
    assert (len(gallery), caption, seed) == (2, "make the ellipse green", 7)
    assert edited.layers[0] is bottom and edited.layers[1].size == (150, 100)
    assert not np.array_equal(np.asarray(edited.layers[1]), np.asarray(layers[1]))  # the tool's edit took its place
    params = json.loads(edited.files["params"].read_text())
    assert params["sub_run"]["replaced_index"] == 1 and params["edit_instruction"] == "make the ellipse green"
    assert edited.files["folder"].parent == paths["folder"] / "sub_runs"
    *_, restored = app.undo_handler(edited)
    assert restored.layers == layers


def test_the_studios_edit_this_layer_says_how_to_start_the_tool_when_it_does_not_answer(models_dir, tmp_path):
    import gradio as gr

    layers = [Image.new("RGBA", (40, 30), (20, 20, 20, 255))] * 2
    paths = save_run(DecomposeResult(layers=layers, caption="x", auto_caption=False, seed=5, params={}, duration_s=0.1),
                     tmp_path)
    stack = LayerStack(layers=layers, run_folder=paths["folder"], files=paths)
    settings = demo_settings(models_dir, outputs=tmp_path, edit_tool=f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(gr.Error, match=r"The edit tool does not answer at http://127\.0\.0\.1:\d+/\. Start it in a "
                                       r"second terminal with `python src/tool/edit_rgba_image.py`"):
        app.edit_layer_handler(settings, {}, 1, "make it red", stack)


def test_a_set_stop_ends_the_edit_before_it_runs_its_model(edit_pipe):
    """The tool's Stop (and a session that ends: the page closed, the studio's client gone) sets the edit's stop."""
    import threading

    from studio.errors import RunStopped

    stop = threading.Event()
    stop.set()
    with pytest.raises(RunStopped):
        edit.edit_layer(edit_pipe, synthetic_layer(), "make it red", num_inference_steps=2, matte="chroma_key",
                        stop=stop)
