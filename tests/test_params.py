"""The parameter table (PARAMS): one row per parameter drives infer's checks, the widgets, the API and the CLI.

Abuse over HTTP (the shared demo server, through gradio_client): over-long and non-text prompts, seeds out of
range or not whole numbers are refused with a message naming the value, and the server keeps serving.
"""

import dataclasses
import inspect
import json
import math

import pytest
from PIL import Image

import app
from studio.params import DEFAULTS, MAX_SEED, PARAMS, PROMPT_MAX_CHARS, check_param, check_params

# The cheapest good run: 2 layers, 2 steps, no CFG pass, a prompt (no auto-caption).
GOOD = dict(prompt="a params card", layers=2, num_inference_steps=2, true_cfg_scale=1.0, seed=5)


# --- the table ------------------------------------------------------------------------------------------
def test_infer_takes_exactly_the_rows_and_passes_each_pipeline_row_to_the_pipeline(demo_pipe, rgba_image, monkeypatch):
    """PARAMS drives `infer` completely: its keywords are the rows (anything else is refused by name), a row not given
    takes its default, and every `pipeline` row reaches the pipeline's call under its own name."""
    named = [name for name, p in inspect.signature(app.infer).parameters.items() if p.kind != p.VAR_KEYWORD]
    assert named == ["loaded", "image", "stop"]  # `stop` is the run's control, not a decomposition parameter
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) strength: use prompt, negative_prompt"):
        app.infer(demo_pipe, rgba_image, strength=0.5)
    calls = []
    pipeline_class = type(demo_pipe.pipe)
    call = pipeline_class.__call__
    monkeypatch.setattr(pipeline_class, "__call__", lambda self, **kwargs: (calls.append(kwargs), call(self, **kwargs))[1])
    given = dict(prompt="a row card", negative_prompt="blur", true_cfg_scale=1.5, num_inference_steps=2, layers=2,
                 cfg_normalize=False, use_en_prompt=False, seed=11)
    result = app.infer(demo_pipe, rgba_image, **given)
    [kwargs] = calls
    for p in PARAMS:
        expected = given.get(p.name, DEFAULTS[p.name])
        assert result.params["prompt_given" if p.name == "prompt" else p.name] == expected, p.name
        if p.pipeline:
            assert kwargs[p.name] == expected, p.name
        else:
            assert p.name not in kwargs, p.name  # seed and randomize_seed make the generator
    assert kwargs["generator"].initial_seed() == 11


def test_every_row_default_has_the_rows_type():
    for p in PARAMS:
        assert isinstance(p.default, p.type), p.name


@pytest.mark.parametrize("name, value, expected", [
    ("seed", 7.0, 7),  # the API's numbers may come as whole floats
    ("seed", 0, 0),
    ("seed", MAX_SEED, MAX_SEED),
    ("true_cfg_scale", 2, 2.0),
    ("resolution", 1024, 1024),
    ("prompt", None, ""),  # an empty Textbox sends None
    ("negative_prompt", "x" * PROMPT_MAX_CHARS, "x" * PROMPT_MAX_CHARS),
    ("cfg_normalize", False, False),
])
def test_check_param_takes_valid_values_in_the_rows_type(name, value, expected):
    checked = check_param(name, value)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize("name, value, message", [
    ("seed", 2**64 - 1, r"seed=18446744073709551615 is out of range: use an integer from 0 to 2147483647"),
    ("seed", -1, r"seed=-1 is out of range"),
    ("seed", math.inf, r"seed=inf is not a whole number"),
    ("seed", math.nan, r"seed=nan is not a whole number"),
    ("seed", 1.5, r"seed=1.5 is not a whole number"),
    ("seed", True, r"seed=True is not a whole number"),
    ("seed", "7", r"seed='7' is not a whole number"),
    ("layers", [3], r"layers=\[3\] is not a whole number"),
    ("true_cfg_scale", math.nan, r"true_cfg_scale=nan is not a number"),
    ("prompt", ["x"], r"prompt must be text, not a list \(\['x'\]\): send one string"),
    ("negative_prompt", {"a": 1}, r"negative_prompt must be text, not a dict"),
    ("prompt", "x" * (PROMPT_MAX_CHARS + 1), r"prompt is 2,001 characters long: the limit is 2,000"),
    ("cfg_normalize", "false", r"cfg_normalize='false' is not true or false"),
])
def test_check_param_refuses_with_the_value_and_what_is_accepted(name, value, message):
    with pytest.raises(ValueError, match=message):
        check_param(name, value)


def test_an_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) steps"):
        check_params(steps=3)


# --- the command line -----------------------------------------------------------------------------------
def test_every_row_has_its_decompose_flag_with_the_rows_default():
    _, _, ns = app.parse_args(["decompose", "x.png"])
    assert {p.name: getattr(ns, p.name) for p in PARAMS} == DEFAULTS
    _, _, ns = app.parse_args(["decompose", "x.png", "--no-cfg-normalize", "--randomize-seed", "--zh-caption",
                               "--negative-prompt", "blurry", "--seed", "12", "--true-cfg-scale", "2.5"])
    assert (ns.cfg_normalize, ns.randomize_seed, ns.use_en_prompt, ns.negative_prompt, ns.seed, ns.true_cfg_scale) == \
        (False, True, False, "blurry", 12, 2.5)


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64 - 1)], "seed=18446744073709551615 is out of range"),
    (["--seed", "1.5"], "'1.5' is not a whole number"),
    (["--true-cfg-scale", "nan"], "true_cfg_scale=nan is not a number"),
    (["--prompt", "x" * 2001], "prompt is 2,001 characters long: the limit is 2,000"),
])
def test_a_bad_flag_value_exits_2_with_the_tables_message_before_loading(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse's exit, before any model loads
        app.main(["decompose", str(tmp_path), "--models-dir", str(tmp_path / "models"), *args])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


# --- over HTTP -------------------------------------------------------------------------------------------
def client_for(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


ABUSE = [
    ("prompt_list", dict(prompt=["x"]), r"prompt must be text, not a list"),
    ("negative_prompt_list", dict(negative_prompt=["x"]), r"negative_prompt must be text, not a list"),
    ("prompt_1MB", dict(prompt="x" * 1_000_000), r"prompt is 1,000,000 characters long: the limit is 2,000"),
    ("negative_prompt_long", dict(negative_prompt="y" * 2001), r"negative_prompt is 2,001 characters long"),
    ("seed_2**64-1", dict(seed=2**64 - 1), r"seed=18446744073709551615 is out of range: use an integer from 0 to"),
    ("seed_negative", dict(seed=-3), r"seed=-3 is out of range"),
    ("seed_fraction", dict(seed=2.5), r"seed=2.5 is not a whole number"),
    ("seed_bool", dict(seed=True), r"seed=True is not a whole number"),
    ("seed_text", dict(seed="12"), r"seed='12' is not a whole number"),
    ("layers_text", dict(layers="3"), r"layers='3' is not a whole number"),
    ("cfg_normalize_text", dict(cfg_normalize="no"), r"cfg_normalize='no' is not true or false"),
]


def test_abusive_values_are_refused_by_name_and_the_server_keeps_serving(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, _ = server
    client = client_for(url, tmp_path)
    image = tmp_path / "in.png"
    Image.new("RGBA", (64, 48), (200, 30, 30, 255)).save(image)
    for _case, overrides, message in ABUSE:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(image)), **dict(GOOD, **overrides), api_name="/decompose")
    # A whole float is a whole number: 6.0 is seed 6, and the server still runs.
    gallery, *_, caption, seed = client.predict(handle_file(str(image)), **dict(GOOD, seed=6.0), api_name="/decompose")
    assert (len(gallery), caption, seed) == (2, GOOD["prompt"], 6)


def raw_call(url: str, api_name: str, body: str) -> str:
    """POST a JSON body as written (Infinity and NaN too, which gradio_client will not send) to Gradio's REST
    route; return the event stream's text."""
    import httpx

    event_id = httpx.post(f"{url}gradio_api/call/{api_name}", content=body,
                          headers={"content-type": "application/json"}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=300).text


def test_infinity_and_nan_seeds_sent_as_raw_json_are_refused_by_name(server, tmp_path):
    import httpx

    url, _ = server
    image = tmp_path / "in.png"
    Image.new("RGBA", (64, 48), (20, 200, 30, 255)).save(image)
    (uploaded,) = httpx.post(f"{url}gradio_api/upload", files={"files": ("in.png", image.read_bytes(), "image/png")}).json()
    file_value = json.dumps({"path": uploaded, "meta": {"_type": "gradio.FileData"}})

    def body(seed: str) -> str:
        return (f'{{"data": [{file_value}, "a raw card", " ", {seed}, false, 1.0, 2, 2, 640, true, true, '
                f'true, false, false, "en", false, false]}}')  # ... the designer's options (issue 26), original_size

    for literal, message in (("Infinity", "seed=inf is not a whole number"),
                             ("-Infinity", "seed=-inf is not a whole number"), ("NaN", "seed=nan is not a whole number")):
        stream = raw_call(url, "decompose", body(literal))
        assert "event: error" in stream and message in stream, literal
    assert "event: complete" in raw_call(url, "decompose", body("8"))


def test_a_prompt_over_the_cap_is_refused_for_a_layer_too(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, _ = server
    client = client_for(url, tmp_path)
    image = tmp_path / "in.png"
    Image.new("RGBA", (64, 48), (30, 30, 200, 255)).save(image)
    client.predict(handle_file(str(image)), **GOOD, api_name="/decompose")
    with pytest.raises(AppError, match=r"prompt is 2,001 characters long: the limit is 2,000"):
        client.predict(layer_number=1, layers=2, prompt="z" * 2001, num_inference_steps=2, api_name="/decompose_layer")


def test_the_api_parameters_are_the_tables_in_order(server):
    from gradio_client import Client

    url, _ = server
    info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = [p["parameter_name"] for p in info["/decompose"]["parameters"]]
    assert names == ["image", *(p.name for p in PARAMS), "original_size"]
    layer_names = [p["parameter_name"] for p in info["/decompose_layer"]["parameters"]]
    assert layer_names == ["layer_number", "layers", "prompt",
                           *(p.name for p in PARAMS if p.name not in ("layers", "prompt"))]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in info["/decompose"]["parameters"]}
    assert defaults["seed"] == DEFAULTS["seed"] and defaults["num_inference_steps"] == 2  # the server's steps


# --- the load-flag table ----------------------------------------------------------------------------------
def test_a_bad_environment_value_names_the_variable_and_what_it_takes(monkeypatch):
    monkeypatch.setenv("QIL_GPUS", "x")
    with pytest.raises(ValueError, match=r"QIL_GPUS='x' is not accepted \(.*\): set it like --gpus, or unset it"):
        app.parse_args([])


def test_every_settings_field_is_one_row_with_its_flag_and_variable(monkeypatch):
    names = [row.name for row in app.LOAD_FLAGS]
    assert sorted(names) == sorted(field.name for field in dataclasses.fields(app.Settings))
    assert len(set(row.flag for row in app.LOAD_FLAGS)) == len(names)
    monkeypatch.setenv("QIL_VRAM_BUDGET", "11.5")  # a row whose variable is not its field's name
    monkeypatch.setenv("QIL_FIRST_BLOCK_CACHE", "0")
    settings = app.parse_args(["--outputs-max-gb", "3"])[1]
    assert settings.vram_budget_gb == 11.5 and settings.first_block_cache is False and settings.outputs_max_gb == 3.0


def test_ray_workers_without_ray_is_refused(capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["decompose", "in.png", "--ray-workers", "2"])
    assert "--ray-workers 2 needs --ray: the local batch runs one pipeline" in capsys.readouterr().err
