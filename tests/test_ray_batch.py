"""`decompose DIR --ray`: the library over a Ray cluster gives the local batch's run folders, survives a worker that
dies, and a rerun skips what is done. One local Ray instance (2 CPUs) for the whole module: Ray starts slowly."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from studio.batch import decompose_batch, decompose_ray, find_images
from studio.runs import completed_images, run_folder_complete
from conftest import demo_settings

ray = pytest.importorskip("ray")  # in requirements.txt; the missing-Ray message is tested below without it
JOB = dict(prompt="a card", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2, layers=2, resolution=640,
           seed=3)
VARYING = ("created", "duration_s", "design_seconds")  # the params.json entries (timings) that differ between two runs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("library")
    Image.new("RGBA", (90, 60), (250, 120, 0, 255)).save(folder / "a.png")
    Image.new("RGB", (60, 90), (0, 120, 250)).save(folder / "b.jpg")
    return folder, find_images([folder])


@pytest.fixture(scope="module")
def local_batch(demo_pipe, images, tmp_path_factory):
    """The reference: the local batch, one thread (as each 1-CPU Ray worker), so the floats match exactly. Given the
    images by relative paths, as `decompose library/` from the library's parent folder does."""
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = images[0].resolve()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder.parent)
            relative = [Path(folder.name) / image.name for image in images[1]]
            items = decompose_batch(demo_pipe, app.infer, relative, out,
                                        demo_pipe.run_info(), **JOB)
    finally:
        torch.set_num_threads(threads)
    assert all(item.error is None for item in items)
    return {json.loads((item.folder / "params.json").read_text())["input_file"]: item.folder for item in items}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def kill_once(marker, setups_log):
    """Runs in each worker after loading: the first transformer call of the whole run kills its worker process
    (os._exit, no cleanup: as a node that dies). Every setup is logged, so restarts can be counted, with the
    worker's CUDA_VISIBLE_DEVICES."""

    def setup(pipe):
        with open(setups_log, "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')!r}\n")

        def die_once(module, args, kwargs):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # one worker wins, once
            except FileExistsError:
                return
            os._exit(1)

        pipe.pipe.transformer.register_forward_pre_hook(die_once, with_kwargs=True)

    return setup


@pytest.fixture(scope="module")
def ray_run(ray_cluster, models_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray")
    marker, setups_log = out.parent / "killed", out.parent / "setups.log"
    settings = demo_settings(models_dir, outputs=out, offload="off")
    items, skipped = decompose_ray(images[1], settings, app.start_pipeline, app.infer, workers=2, worker_setup=kill_once(marker, setups_log), **JOB)
    return out, items, skipped, marker, setups_log


def test_ray_run_folders_equal_the_local_batch(ray_run, local_batch):
    out, items, skipped, _, _ = ray_run
    assert skipped == [] and [item.error for item in items] == [None, None]
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2  # no folder left behind by the worker that died
    for folder in folders:
        params = json.loads((folder / "params.json").read_text())
        local = local_batch[params["input_file"]]
        local_params = json.loads((local / "params.json").read_text())
        assert {k: v for k, v in params.items() if k not in VARYING} == \
               {k: v for k, v in local_params.items() if k not in VARYING}
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in local.iterdir())
        for name in ("layer_1.png", "layer_2.png", "composite.png"):
            np.testing.assert_array_equal(np.asarray(Image.open(folder / name)), np.asarray(Image.open(local / name)))


def test_a_worker_that_dies_loses_only_its_image_which_is_retried(ray_run):
    out, items, _, marker, setups_log = ray_run
    assert marker.exists()  # a worker really died mid-image
    setups = [line.split() for line in setups_log.read_text().splitlines()]
    pids = [pid for pid, _ in setups]
    assert len(pids) == 3 and len(set(pids)) == 3  # two workers, then the dead one restarted in a new process
    # A cluster without GPUs runs CPU workers, and they see no GPU (Ray 2.60 would leave every GPU of a node visible).
    assert {visible for _, visible in setups} == {"''"}
    assert all(item.folder.parent == out and run_folder_complete(item.folder) for item in items)


def test_a_second_run_skips_every_image_with_a_complete_run_folder(ray_run, images, models_dir, capsys):
    out, _, _, _, _ = ray_run
    before = sorted(p.name for p in out.iterdir())
    code = app.main(["decompose", str(images[0]), "--layers", "2", "--steps", "2", "--prompt", "a card", "--seed", "3",
                     "--out", str(out), "--demo", "--models-dir", str(models_dir), "--no-first-block-cache",
                     "--ray", "--ray-workers", "2"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"2 image(s) skipped: a complete run folder for each is already in {out}" in stdout
    assert "0 of 0 images decomposed, 0 failed" in stdout
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_library_begun_by_the_local_batch_with_a_relative_path_is_resumed_by_ray(local_batch, images, models_dir,
                                                                                     monkeypatch):
    """`decompose library/` (relative) then `decompose library/ --ray`: the local batch recorded each image's absolute
    path, as the Ray workers do, so the Ray run finds every run folder complete and skips them all (no Ray start)."""
    folder = images[0].resolve()
    assert sorted(local_batch) == sorted(str(folder / image.name) for image in images[1])
    monkeypatch.chdir(folder.parent)
    relative = [Path(folder.name) / image.name for image in images[1]]
    out = next(iter(local_batch.values())).parent
    items, skipped = decompose_ray(relative, demo_settings(models_dir, outputs=out), app.start_pipeline, app.infer, **JOB)
    assert (items, sorted(skipped)) == ([], sorted(folder / image.name for image in images[1]))


def test_a_run_folder_missing_any_export_is_not_complete(ray_run, tmp_path):
    out, items, _, _, _ = ray_run
    folder = shutil.copytree(items[0].folder, tmp_path / "copy")
    assert run_folder_complete(folder)
    next(folder.glob("*.psd")).unlink()  # a worker killed while writing the last file
    assert not run_folder_complete(folder)
    (folder / "params.json").write_text("{not json")
    assert not run_folder_complete(folder)
    assert completed_images(tmp_path) == {}


def test_missing_ray_exits_2_with_the_install_line(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = app.main(["decompose", str(images[0]), "--demo", "--models-dir", str(tmp_path / "models"), "--ray"])
    assert code == 2
    assert "--ray needs Ray, which is not installed: pip install ray==2.60.0" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("args, message", [
    (["--ray", "--gpus", "2"], "--ray and --gpus do not go together"),
])
def test_ray_with_gpus_is_refused(images, tmp_path, capsys, args, message):
    code = app.main(["decompose", str(images[0]), "--demo", "--models-dir", str(tmp_path / "models"), *args])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_ray_workers_below_one_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["decompose", "x.png", "--ray", "--ray-workers", value])
    assert exit_info.value.code == 2
    assert f"argument --ray-workers: {value} is not 1 or more" in capsys.readouterr().err
