"""Errors at the top level: a user's mistake or a machine's limit ends the app and both tools with its message
and exit code 2, never a traceback (`exits_with_message`). Each `main` runs in-process: an exception that
escaped would fail the test with its traceback."""

import pytest
from PIL import Image

import app
import studio.engine.plan
from studio.errors import exits_with_message
from tool import combine_layers
from tool import edit_rgba_image as edit

TOO_SMALL = "is too small for the budget offload mode: it needs at least"


def test_app_a_vram_budget_too_small_exits_2_with_plan_budgets_message(demo_pipe, models_dir, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGBA", (64, 64), (10, 20, 30, 255)).save(image)
    code = app.main(["decompose", str(image), "--demo", "--models-dir", str(models_dir), "--out", str(tmp_path / "o"),
                     "--offload", "budget", "--vram-budget", "1", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.splitlines()[-1]  # after the loading progress bars
    assert last.startswith("error: --vram-budget 1 GB " + TOO_SMALL) and "--offload sequential" in last
    assert not (tmp_path / "o").exists()  # nothing ran


def test_app_not_enough_host_ram_exits_2_with_check_host_rams_message(demo_pipe, models_dir, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(studio.engine.plan, "BUDGET_HOST_RAM_RESERVE_GB", 1e6)  # a machine whose RAM cannot hold the copies
    Image.new("RGBA", (64, 64)).save(tmp_path / "in.png")
    code = app.main(["decompose", str(tmp_path), "--demo", "--models-dir", str(models_dir), "--offload", "budget",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Not enough host RAM for the budget mode" in err


def test_edit_tool_a_vram_budget_too_small_exits_2_with_the_message(models_dir, capsys):
    code = edit.main(["--demo", "--models-dir", str(models_dir), "--offload", "budget", "--vram-budget", "1",
                      "--matte", "chroma_key"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1].startswith("error: --vram-budget 1 GB " + TOO_SMALL)


def test_combine_tool_an_output_it_cannot_write_exits_2_with_the_message(tmp_path, capsys):
    layer = tmp_path / "layer.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(layer)
    out = tmp_path / "no-such-folder" / "out.png"
    code = combine_layers.main([str(layer), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "No such file or directory" in err and str(out) in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        exits_with_message(broken)([])
