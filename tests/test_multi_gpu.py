"""Several processes, one image (section 4c): two ranks on the CPU (gloo) give one process's layers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import app
from studio.batch import decompose_batch
from studio.errors import STOPPED_MESSAGE
from studio.parallel import launch_ranks
from conftest import ROOT

# One thread per process in both runs: the same float32 summation order, so the layers can be compared exactly.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
JOB = ["--layers", "2", "--steps", "2", "--prompt", "a card", "--seed", "3", "--true-cfg-scale", "4",
       "--no-first-block-cache"]
JOB_KWARGS = dict(layers=2, num_inference_steps=2, prompt="a card", seed=3, true_cfg_scale=4.0)  # JOB, for `infer`


def layer_arrays(out):
    [folder] = [p for p in out.iterdir() if p.is_dir()]
    return folder, [np.asarray(Image.open(folder / f"layer_{i}.png")) for i in (1, 2)]


@pytest.fixture(scope="module")
def one_and_two_processes(demo_pipe, models_dir, tmp_path_factory):
    """One process: the local batch (what `decompose` runs) on this process's demo pipeline, one thread (as each
    rank), so the floats match exactly (tests/test_ray_batch.py compares Ray's worker processes the same way)."""
    image = tmp_path_factory.mktemp("in") / "a.png"
    Image.new("RGBA", (90, 60), (250, 120, 0, 255)).save(image)
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        [item] = decompose_batch(demo_pipe, app.infer, [image], one, demo_pipe.run_info(),
                                     **JOB_KWARGS)
    finally:
        torch.set_num_threads(threads)
    assert item.error is None
    proc_two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "src" / "app.py"), "decompose", str(image), *JOB, "--out", str(two), "--demo",
         "--models-dir", str(models_dir)],
        capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD), timeout=600)
    assert proc_two.returncode == 0, proc_two.stderr[-3000:]
    return proc_two, layer_arrays(one), layer_arrays(two)


def test_two_ranks_give_the_layers_of_one_process(one_and_two_processes):
    _, (_, layers_one), (_, layers_two) = one_and_two_processes
    assert [a.shape for a in layers_one] == [(512, 768, 4)] * 2  # 640 bucket, 3:2
    assert not np.array_equal(layers_one[0], layers_one[1])  # two real layers, not copies of one buffer
    for a, b in zip(layers_one, layers_two):
        np.testing.assert_array_equal(a, b)


def test_the_two_ranks_split_cfg_and_only_rank_0_writes(one_and_two_processes):
    proc, (_, _), (folder_two, _) = one_and_two_processes
    params = json.loads((folder_two / "params.json").read_text())
    assert "cfg_parallel(2 halves)" in params["optimizations"]
    assert "Rank 0 of 2: CFG-parallel halves of 1 rank(s)" in proc.stderr
    assert "Rank 1 of 2: CFG-parallel halves of 1 rank(s)" in proc.stderr
    assert len([p for p in folder_two.parent.iterdir()]) == 1  # one run folder: rank 1 saved nothing
    assert proc.stdout.count("1 of 1 images decomposed, 0 failed") == 1  # one summary, rank 0's


@pytest.mark.parametrize("gpus", ["2", "8"])
def test_more_gpus_than_the_machine_has_exits_2_before_loading(tmp_path, capsys, gpus):
    if app.torch.cuda.device_count() >= int(gpus):
        pytest.skip("this machine has that many GPUs")
    code = app.main(["--gpus", gpus, "--demo", "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--gpus {gpus} needs {gpus} CUDA GPUs, this machine has {app.torch.cuda.device_count()}" in err
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_gpus_below_one_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--gpus", value])
    assert exit_info.value.code == 2
    assert f"argument --gpus: {value} is not 1 or more" in capsys.readouterr().err


def test_launch_ranks_starts_the_ranks_itself_and_they_give_the_same_layers(one_and_two_processes, models_dir,
                                                                             tmp_path, monkeypatch):
    """What `--gpus 2` runs (on a GPU machine): the ranks spawned by the app, here on the CPU with gloo."""
    _, (folder_one, layers_one), _ = one_and_two_processes
    image = json.loads((folder_one / "params.json").read_text())["input_file"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks read it when they import torch
    code = launch_ranks(2, ["decompose", image, *JOB, "--out", str(tmp_path), "--demo",
                                "--models-dir", str(models_dir)], app.main)
    assert code == 0
    assert "WORLD_SIZE" not in os.environ  # this process stays a single one
    folder, layers = layer_arrays(tmp_path)
    assert "cfg_parallel(2 halves)" in json.loads((folder / "params.json").read_text())["optimizations"]
    for a, b in zip(layers_one, layers):
        np.testing.assert_array_equal(a, b)


def test_the_ranks_stop_and_fail_together_and_then_run_the_next_job(models_dir, demo_pipe, tmp_path):
    """Rank 0 stopped in the steps or in its caption, rank 1 out of memory: every rank leaves the job at the same
    point (none waits in a collective for one that left), and the next job runs on both, as one process runs it."""
    out_json, out_npz = tmp_path / "results.json", tmp_path / "layers.npz"
    app.get_model_path(app.Settings(demo=True, models_dir=models_dir))  # built once, before the ranks look
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "ranks_agree.py"), str(models_dir), str(out_json), str(out_npz)],
        capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    assert results["stop_in_steps"] == f"RunStopped: {STOPPED_MESSAGE}"
    assert results["rank1_out_of_memory"].startswith("OutOfMemoryError: Out of GPU memory during the decomposition")
    assert results["stop_in_caption"] == f"RunStopped: {STOPPED_MESSAGE}"
    assert results["caption_forwards_before_stop"] == 2  # stopped before its third token
    assert proc.stderr.count(f"Rank 1: {STOPPED_MESSAGE}") == 2  # rank 1 left both stopped jobs too
    assert "Rank 1: Out of GPU memory" in proc.stderr
    # The last job: rank 0's caption on both ranks, the layers one process gives.
    torch_threads = app.torch.get_num_threads()
    app.torch.set_num_threads(1)  # the ranks ran one thread each: the same float32 summation order
    try:
        alone = app.infer(demo_pipe, Image.new("RGBA", (90, 60), (250, 120, 0, 255)), prompt="", layers=2,
                          num_inference_steps=2, true_cfg_scale=4.0, seed=3, randomize_seed=False)
    finally:
        app.torch.set_num_threads(torch_threads)
    assert results["last_caption"] == alone.caption and alone.caption
    with np.load(out_npz) as two:
        for i, layer in enumerate(alone.layers):
            np.testing.assert_array_equal(two[f"arr_{i}"], np.asarray(layer))
