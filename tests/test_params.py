"""The parameter table (app.PARAMS): one row per parameter drives infer's checks, the widgets, the API and the CLI.

Abuse over HTTP (the shared demo server, through gradio_client): over-long and non-text prompts, seeds out of
range or not whole numbers are refused with a message naming the value, and the server keeps serving.
"""

import inspect
import json
import math

import pytest
from PIL import Image

import app

# The cheapest good run: 2 layers, 2 steps, no CFG pass, a prompt (no auto-caption).
GOOD = dict(prompt="a params card", layers=2, num_inference_steps=2, true_cfg_scale=1.0, seed=5)


# --- the table ------------------------------------------------------------------------------------------
def test_every_infer_parameter_has_one_row_and_the_defaults_are_infers():
    signature = inspect.signature(app.infer).parameters
    # `stop` is the run's control (Stop, a client leaving), not a decomposition parameter.
    assert sorted(p.name for p in app.PARAMS) == sorted(n for n in signature if n not in ("pipe", "image", "stop"))
    for p in app.PARAMS:
        assert signature[p.name].default == p.default, p.name
        assert isinstance(p.default, p.type), p.name


@pytest.mark.parametrize("name, value, expected", [
    ("seed", 7.0, 7),  # the API's numbers may come as whole floats
    ("seed", 0, 0),
    ("seed", app.MAX_SEED, app.MAX_SEED),
    ("true_cfg_scale", 2, 2.0),
    ("resolution", 1024, 1024),
    ("prompt", None, ""),  # an empty Textbox sends None
    ("negative_prompt", "x" * app.PROMPT_MAX_CHARS, "x" * app.PROMPT_MAX_CHARS),
    ("cfg_normalize", False, False),
])
def test_check_param_takes_valid_values_in_the_rows_type(name, value, expected):
    checked = app.check_param(name, value)
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
    ("prompt", "x" * (app.PROMPT_MAX_CHARS + 1), r"prompt is 2,001 characters long: the limit is 2,000"),
    ("cfg_normalize", "false", r"cfg_normalize='false' is not true or false"),
])
def test_check_param_refuses_with_the_value_and_what_is_accepted(name, value, message):
    with pytest.raises(ValueError, match=message):
        app.check_param(name, value)


def test_an_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) steps"):
        app.check_params(steps=3)


# --- the command line -----------------------------------------------------------------------------------
def test_every_row_has_its_decompose_flag_with_the_rows_default():
    _, _, ns = app.parse_args(["decompose", "x.png"])
    assert {p.name: getattr(ns, p.name) for p in app.PARAMS} == app.DEFAULTS
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
        return f'{{"data": [{file_value}, "a raw card", " ", {seed}, false, 1.0, 2, 2, 640, true, true, false]}}'

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
    assert names == ["image", *(p.name for p in app.PARAMS), "original_size"]
    layer_names = [p["parameter_name"] for p in info["/decompose_layer"]["parameters"]]
    assert layer_names == ["layer_number", "layers", "prompt",
                           *(p.name for p in app.PARAMS if p.name not in ("layers", "prompt"))]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in info["/decompose"]["parameters"]}
    assert defaults["seed"] == app.DEFAULTS["seed"] and defaults["num_inference_steps"] == 2  # the server's steps
