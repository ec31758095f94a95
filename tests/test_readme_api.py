"""README's "Call a running app from Python" block, run as it is against the demo app, one paragraph at a time."""

import io
import json
import re
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT

README_URL = "http://127.0.0.1:7869/"


def readme_api_block() -> list[str]:
    """The README's tested code block, split at its blank lines into paragraphs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- tests/test_readme_api.py runs this block.*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    return code.strip().split("\n\n")


@pytest.fixture(scope="module")
def readme_run(server):
    """Run each paragraph of the block in one namespace (from the repository root, where its image path
    points); keep what each call returned."""
    url, outputs = server
    paragraphs = readme_api_block()
    calls = [p for p in paragraphs if "client.predict(" in p]
    assert [re.search(r'api_name="(/\w+)"', p).group(1) for p in calls] == ["/decompose", "/decompose_layer", "/undo"]
    assert sum(README_URL in p for p in paragraphs) == 1
    namespace: dict = {}
    returned = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        for paragraph in paragraphs:
            exec(paragraph.replace(README_URL, url), namespace)
            if paragraph not in calls:
                continue
            returned.append(dict(gallery=namespace["gallery"], zip=namespace["zip_path"], pptx=namespace["pptx"],
                                 psd=namespace["psd"], caption=namespace["caption"], seed=namespace["seed"]))
    return namespace, returned, outputs


def zip_layers(path) -> list[Image.Image]:
    with zipfile.ZipFile(path) as archive:
        names = sorted((n for n in archive.namelist() if n.startswith("layer_")), key=lambda n: int(n[6:-4]))
        return [Image.open(io.BytesIO(archive.read(n))) for n in names]


def test_decompose_returns_three_rgba_layers_and_the_files(readme_run):
    _, (first, _, _), _ = readme_run
    assert len(first["gallery"]) == 3
    assert [Image.open(item["image"]).mode for item in first["gallery"]] == ["RGBA"] * 3
    assert [Path(first[k]).suffix for k in ("pptx", "zip", "psd")] == [".pptx", ".zip", ".psd"]
    assert len(zip_layers(first["zip"])) == 3


def test_decompose_layer_returns_the_whole_stack_with_layer_2_replaced(readme_run):
    _, (first, second, _), outputs = readme_run
    assert len(second["gallery"]) == 4
    stack = zip_layers(second["zip"])
    before = zip_layers(first["zip"])
    assert len(stack) == 4
    # Bottom and top are the first run's layers, untouched; layers 2 and 3 are new.
    assert stack[0].tobytes() == before[0].tobytes() and stack[3].tobytes() == before[2].tobytes()
    assert stack[1].tobytes() != before[1].tobytes()
    # Saved as a sub-run of the first run's folder, with the index it replaced.
    (run_folder,) = [p for p in outputs.iterdir() if (p / "sub_runs").is_dir()]  # the one run decomposed again
    (sub_run,) = (run_folder / "sub_runs").iterdir()
    params = json.loads((sub_run / "params.json").read_text())
    assert params["sub_run"]["replaced_index"] == 1 and params["layers"] == 2
    assert params["sub_run"]["applied_to"] == str(run_folder)


def test_undo_returns_the_stack_before(readme_run):
    _, (first, _, undone), _ = readme_run
    assert len(undone["gallery"]) == 3
    assert Path(undone["zip"]).read_bytes() == Path(first["zip"]).read_bytes()
    assert Path(undone["psd"]).read_bytes() == Path(first["psd"]).read_bytes()
    assert (undone["caption"], undone["seed"]) == (first["caption"], first["seed"])  # the restored run's


def test_undo_goes_back_one_step_only(readme_run):
    from gradio_client.exceptions import AppError

    namespace, _, _ = readme_run
    with pytest.raises(AppError, match="nothing to undo"):
        namespace["client"].predict(api_name="/undo")


def test_a_layer_outside_the_stack_is_refused_with_the_range(readme_run):
    from gradio_client.exceptions import AppError

    namespace, _, _ = readme_run  # after the README's undo, the stack has 3 layers
    with pytest.raises(AppError, match=r"^Layer 7 is not in the stack: it has 3 layers. Choose a layer from 1 \(bottom\) to 3\.$"):
        namespace["client"].predict(layer_number=7, layers=2, api_name="/decompose_layer")


def test_decompose_layer_before_any_decomposition_says_what_to_do(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(url, verbose=False)  # a new session: no stack yet
    with pytest.raises(AppError, match="No layers yet: decompose an image first"):
        client.predict(layer_number=1, api_name="/decompose_layer")
