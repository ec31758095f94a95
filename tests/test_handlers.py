"""The UI's handlers are module functions: called here directly on the demo pipeline, without a server."""

import functools
import inspect
from pathlib import Path

import pytest
from PIL import Image

import app
from studio.exports import EXPORTS
from studio.params import DEFAULTS, PARAM, PARAMS
from conftest import demo_settings

FAST = dict(prompt="a handler card", num_inference_steps=2, true_cfg_scale=1.0)


@pytest.fixture(scope="module")
def first_run(demo_pipe, models_dir, tmp_path_factory):
    import gradio  # noqa: F401  (the handlers raise gr.Error)

    outputs = tmp_path_factory.mktemp("handler-outputs")
    settings = demo_settings(models_dir, outputs=outputs)
    image = outputs / "in.png"
    Image.new("RGBA", (96, 64), (120, 60, 200, 255)).save(image)
    returned = app.decompose_handler(demo_pipe, settings, {"demo": True}, str(image), layers=2, seed=3, **FAST)
    return settings, returned


def test_decompose_handler_returns_the_stack_view_caption_seed_and_stack(first_run):
    settings, returned = first_run
    view, (caption, seed, stack) = app.StackView(*returned[:len(app.StackView._fields)]), returned[-3:]
    assert (len(view.gallery), caption, seed, len(stack.layers)) == (2, FAST["prompt"], 3, 2)
    # One download per EXPORTS row, in its order, each the file save_run wrote into the run folder.
    downloads = [getattr(view, export.key) for export in EXPORTS]
    assert [Path(p).suffix for p in downloads] == [export.suffix for export in EXPORTS]
    assert all(Path(p).parent == stack.run_folder and Path(p).is_file() for p in downloads)


def test_decompose_layer_and_undo_handlers_replace_and_restore_the_stack(demo_pipe, first_run):
    import gradio as gr

    settings, returned = first_run
    stack = returned[-1]
    *view, caption, seed, bigger = app.decompose_layer_handler(demo_pipe, settings, {}, 2, stack, layers=2, seed=4,
                                                               **FAST)
    assert (len(view[0]), seed, len(bigger.layers)) == (3, 4, 3)
    assert bigger.layers[0] is stack.layers[0]  # the bottom layer is untouched
    *view, caption, seed, restored = app.undo_handler(bigger)
    assert restored.layers == stack.layers and len(view) == len(app.StackView._fields) and len(view[0]) == 2
    assert (caption, seed) == (FAST["prompt"], 3)  # the restored run's caption and seed
    with pytest.raises(gr.Error, match="nothing to undo") as refused:
        app.undo_handler(restored)
    assert refused.value.duration is None  # an error stays on the page until closed
    with pytest.raises(gr.Error, match=r"^'Layer 5 is not in the stack: it has 2 layers. Choose a layer from 1 \(bottom\) to 2.'$"):
        app.decompose_layer_handler(demo_pipe, settings, {}, 5, stack, layers=2, **FAST)


def test_gradio_handler_gives_gradio_the_tables_names_and_calls_positionally():
    calls = []
    handler = app.gradio_handler(lambda **values: calls.append(values) or "ok", ["image", *PARAM],
                                 dict(DEFAULTS, prompt=None))
    parameters = inspect.signature(handler).parameters
    assert list(parameters) == ["image", *PARAM]
    assert parameters["prompt"].default is None and parameters["layers"].default == DEFAULTS["layers"]
    assert handler("img", *range(len(PARAMS))) == "ok"
    assert calls == [dict(image="img", **{name: i for i, name in enumerate(PARAM)})]


def test_handlers_are_bound_with_partial_in_build_ui(demo_pipe, models_dir, tmp_path):
    demo = app.build_ui(demo_pipe, demo_settings(models_dir, outputs=tmp_path))
    bound = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name in ("decompose", "decompose_layer", "undo")}
    assert set(bound) == {"decompose", "decompose_layer", "undo"}
    for name, module_function in (("decompose", app.decompose_handler), ("decompose_layer", app.decompose_layer_handler)):
        called = bound[name].handler
        assert isinstance(called, functools.partial) and called.func is module_function
    # The GPU events report progress (the pipeline's tqdm bars: caption tokens, steps) to the page.
    assert {fn.api_name: fn.tracks_progress for fn in demo.fns.values() if fn.api_name in bound} == \
        {"decompose": True, "decompose_layer": True, "undo": False}


def test_the_pages_comparison_reads_only_uploads(demo_pipe, models_dir, tmp_path, first_run):
    """The page's own step after a run (its Input | composite view) gets the client's raw image value too: it goes
    through readable_upload, and a file no client uploaded is never read."""
    _, returned = first_run
    secret = tmp_path / "secret.png"  # a real image on the server that no client uploaded
    Image.new("RGBA", (64, 64), (1, 2, 3, 255)).save(secret)
    demo = app.build_ui(demo_pipe, demo_settings(models_dir, outputs=tmp_path / "out"))
    finishes = [fn.fn.handler for fn in demo.fns.values()
                if getattr(getattr(fn.fn, "handler", None), "func", None) is app.page_finish]
    assert len(finishes) == 4  # after Decompose, Decompose this layer, Edit this layer, Undo
    read_upload = finishes[0].keywords["read_upload"]
    with pytest.raises(ValueError, match="not uploaded to this app"):
        read_upload({"path": str(secret)})
    comparison, score, shown = app.page_comparison("decompose", returned[-1], {"path": str(secret)}, None,
                                                   read_upload=read_upload)
    assert (comparison, shown) == (None, None) and "no longer on the server" in score


def test_undo_on_the_page_with_nothing_to_undo_is_a_warning_and_changes_nothing(first_run):
    """The page's Undo (greyed out then; a click can still race a run) warns and stops its chain without an error
    toast, so no output of the page changes (issue 23); the API's /undo still answers with an error."""
    import gradio as gr

    stack = first_run[1][-1]  # a first run: nothing to undo
    with pytest.warns(UserWarning, match="Nothing to undo"), pytest.raises(gr.Error) as quiet:
        app.page_nothing_to_undo(stack)
    assert quiet.value.visible is False
    with pytest.raises(gr.Error, match="Nothing to undo: decompose an image first"):
        app.undo_handler(None)
