"""The headless batch (`app.py decompose IMG_OR_DIR...`) and the same batch over a Ray cluster (`--ray`): one
code path for run folders (`decompose_batch`, then `studio.runs.save_run`). The app passes in how to load and run
the model.
"""

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# TODO from app: Settings, get_model_path, infer, load_pipeline, print_environment_info, run_info_for
from studio.errors import OutOfMemoryError, terminal_safe
from studio.images import IMAGE_SUFFIXES
from studio.runs import completed_images, save_run
from studio.scores import score_line

logger = logging.getLogger(__name__)


def find_images(paths: list[Path | str]) -> list[Path]:
    """The images `decompose` runs on, in the order given: a folder gives its entries named like images
    (IMAGE_SUFFIXES, sorted, not recursive), files or not, so that a FIFO, a device or a broken link named a.png is
    reported and counted, not left out; anything else is taken as it is, so a missing or bad file fails visibly."""
    images: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images += sorted(p for p in path.iterdir()
                             if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        else:
            images.append(path)
    return images


@dataclasses.dataclass
class BatchItem:
    image: Path
    folder: Path | None = None  # its run folder, when it worked
    error: str | None = None  # why it failed
    warnings: list[str] = dataclasses.field(default_factory=list)  # input notes, exports that failed
    score: dict[str, Any] | None = None  # its `recomposition_score`, when it worked


def decompose_batch(loaded, infer: Callable, images: list[Path], outputs: Path, run_info: dict[str, Any] | None = None,
                    original_size: bool = False, **infer_kwargs) -> list[BatchItem]:
    """Decompose each image into its own run folder under `outputs`: `infer(loaded, image, **infer_kwargs)` (the app's
    `infer` and what it loaded).

    One progress bar counts the images, the pipeline's own bar the current image's steps. A file that
    cannot be read as an image (or whose run folder cannot be written) is reported and skipped.
    """
    from tqdm.auto import tqdm

    # 1. The pipeline's step bar sits under the images bar and clears itself after each image.
    loaded.pipe.set_progress_bar_config(desc="steps", position=1, leave=False)
    items: list[BatchItem] = []
    for image in tqdm(images, desc="images", unit="image", position=0):
        # 2. Decompose and save. Bad input: missing (ValueError), not an image or truncated (OSError),
        #    a decompression bomb (Pillow's own error). Anything else is a bug or the machine: it stops the batch.
        try:
            result = infer(loaded, image, **infer_kwargs)
            # The absolute path, as Ray's workers record it: `completed_images` (resume) matches on it.
            paths = save_run(result, outputs, dict(run_info or {}, input_file=os.path.realpath(image)),
                             original_size=result.params["input_size"] if original_size else None,
                             name=Path(image).stem)
        except (ValueError, OSError, Image.DecompressionBombError, OutOfMemoryError) as err:
            items.append(BatchItem(image, error=str(err)))  # the messages name the file and the fix
            tqdm.write(terminal_safe(f"skipped {image}: {err}"), file=sys.stderr)
            continue
        warnings = result.notes + [f"{key} export failed: {reason}" for key, reason in paths["failed"].items()]
        items.append(BatchItem(image, folder=paths["folder"], warnings=warnings, score=result.params["recomposition"]))
        tqdm.write(terminal_safe(f"{image} -> {paths['folder']} (caption: {short_text(result.caption)}); "
                                 f"{score_line(result.params['recomposition'])}"), file=sys.stderr)
        for warning in warnings:
            tqdm.write(terminal_safe(f"  note: {warning}"), file=sys.stderr)
    return items


# A caption runs to ~1,000 characters: the per-image line shows its start (params.json holds it whole).
CAPTION_SHOWN_CHARS = 80


def short_text(text: str, limit: int = CAPTION_SHOWN_CHARS) -> str:
    """`text` on one line, cut at a word to about `limit` characters with an ellipsis."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


def batch_summary(items: list[BatchItem]) -> str:
    """What `decompose` prints at the end: the recomposition PSNRs, the count, then each image that worked, then each
    that failed (a file name's control characters written as escapes: `terminal_safe`)."""
    done = [item for item in items if item.error is None]
    failed = [item for item in items if item.error is not None]
    lines = [f"{len(done)} of {len(items)} images decomposed, {len(failed)} failed"]
    scored = [item for item in done if item.score]
    if scored:  # after the count line, before the list of run folders (which stays last)
        lines.append("recomposition PSNR: " + ", ".join(f"{item.image.name} {item.score['psnr_db']:.2f} dB"
                                                           for item in scored)
                     + f"; mean {np.mean([item.score['psnr_db'] for item in scored]):.2f} dB (params.json: recomposition)")
    for item in done:
        lines.append(f"  ok      {item.image} -> {item.folder}")
        lines += [f"          note: {warning}" for warning in item.warnings]
    lines += [f"  FAILED  {item.image}: {item.error}" for item in failed]
    return "\n".join(terminal_safe(line) for line in lines)


# A library over a cluster: `decompose DIR --ray [ADDRESS]`. Each worker is a Ray actor holding one pipeline
# (one GPU each where the cluster has GPUs); `ray.util.ActorPool` gives each image to a free worker. A worker
# that dies is restarted by Ray, which retries the image it was on (max_restarts / max_task_retries): only that
# image is redone. Each image goes through `decompose_batch` (the local batch's own code) into a staging folder
# OUT/.incomplete/<hash>/ and is moved into OUT/ once written, so a run folder in OUT/ is always complete and a
# rerun skips the images that have one. Every node must see the images and OUT/ at the same paths (a shared
# file system), and this repository's src/ (PYTHONPATH is passed to the workers).
RAY_RETRIES = 3  # restarts of a worker that dies, and retries of the image it was on
INCOMPLETE_DIR = ".incomplete"  # under the outputs folder: images being written by a Ray worker
# `ray.init` retries an address where nothing listens for minutes, saying only Ray's own warnings: the address is
# tried first, for at most this long.
RAY_CONNECT_TIMEOUT_S = 20


def check_ray_address(address: str | None) -> None:
    """Refuse a cluster address (--ray HOST:PORT, ray://HOST:PORT, or RAY_ADDRESS) where nothing answers, within
    RAY_CONNECT_TIMEOUT_S; no address (or "auto", "local") starts or finds Ray on this machine, Ray's own way."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS") or ""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if address in ("auto", "local") or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ValueError(f"--ray {address}: no Ray cluster answers at {host}:{port} ({err.strerror or 'timed out'}, "
                         f"tried for up to {RAY_CONNECT_TIMEOUT_S} s). Start one there (`ray start --head`), check the "
                         f"address, or pass --ray without an address to start Ray on this machine.") from None


def import_ray():
    """Ray is optional: imported only for --ray."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray, which is not installed: pip install ray==2.60.0 "
                          "(or run without --ray: the local batch)") from None
    return ray


class RayDecomposeWorker:
    """One pipeline in a Ray actor (see `decompose_ray`): `start(settings)` loads it (the app's `start_pipeline`),
    `infer` runs a job; `worker_setup(loaded)` runs after loading (tests inject faults)."""

    def __init__(self, settings, start: Callable, infer: Callable, worker_setup: Callable | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.loaded, self.infer = start(settings), infer
        self.run_info = self.loaded.run_info()
        if worker_setup is not None:
            worker_setup(self.loaded)

    def decompose(self, image: str, outputs: str, original_size: bool, infer_kwargs: dict) -> BatchItem:
        import hashlib

        staging = Path(outputs) / INCOMPLETE_DIR / hashlib.sha256(image.encode()).hexdigest()[:16]
        shutil.rmtree(staging, ignore_errors=True)  # what a worker that died on this image left
        [item] = decompose_batch(self.loaded, self.infer, [Path(image)], staging, self.run_info, original_size,
                                 **infer_kwargs)
        if item.folder is not None:
            item.folder = item.folder.rename(Path(outputs) / item.folder.name)
        shutil.rmtree(staging, ignore_errors=True)
        return item


def decompose_ray(images: list[Path], settings, start: Callable, infer: Callable, address: str | None = None,
                  workers: int | None = None, original_size: bool = False, worker_setup: Callable | None = None,
                  **infer_kwargs) -> tuple[list[BatchItem], list[Path]]:
    """Decompose `images` on a Ray cluster into `settings.outputs`; returns (items run, images skipped as done).

    `start(settings)` and `infer` are the app's own functions: Ray sends them to the workers by reference to the module
    `app` (the caller passes the module's, not `__main__`'s), as it sends the worker class by reference to this one;
    the workers import both from src/. `settings.model` names the weights' folder (every worker loads the same)."""
    ray = import_ray()
    # 1. Resume: images with a complete run folder are skipped.
    outputs = Path(settings.outputs).resolve()
    done = completed_images(outputs)
    images = [Path(os.path.realpath(image)) for image in images]  # (a symlink loop stays itself, to be reported)
    skipped = [image for image in images if str(image) in done]
    todo = [image for image in images if str(image) not in done]
    if not todo:
        return [], skipped
    # 2. The cluster.
    started_here = not ray.is_initialized()
    if started_here:
        check_ray_address(address)
        ray.init(address=address or None, include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = max(1, min(workers or gpus or 1, len(todo)))
    src = Path(__file__).resolve().parent.parent  # the workers import `app` and `studio` from src/
    path = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {"PYTHONPATH": path}
    if not gpus:
        # Workers scheduled on CPUs stay there: Ray (2.60) leaves CUDA_VISIBLE_DEVICES alone for an actor that asks
        # for no GPU, so on a node with GPUs Ray did not count, each worker would load the model onto its cuda:0.
        env["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            logger.warning("Ray reports no GPU in its cluster while this machine has %d: its %d workers run on the "
                           "CPU (hours an image). Start Ray with its GPUs (`ray start --head --num-gpus N`) or drop "
                           "--ray to use this machine's GPU.", torch.cuda.device_count(), workers)
    actor = ray.remote(RayDecomposeWorker).options(
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES,
        runtime_env={"env_vars": env})
    settings = dataclasses.replace(settings, outputs=outputs)
    pool = ray.util.ActorPool([actor.remote(settings, start, infer, worker_setup) for _ in range(workers)])
    # 3. One image per free worker; results in input order; a worker lost beyond its retries fails only its image.
    for image in todo:
        pool.submit(lambda worker, image: worker.decompose.remote(str(image), str(outputs), original_size, infer_kwargs),
                    image)
    items = []
    for image in todo:
        try:
            items.append(pool.get_next())
        except ray.exceptions.RayError as err:
            items.append(BatchItem(image, error=f"{type(err).__name__}: {str(err).splitlines()[0]}"))
    with contextlib.suppress(OSError):  # empty unless a worker was lost for good
        (outputs / INCOMPLETE_DIR).rmdir()
    if started_here:
        ray.shutdown()  # the workers' last log lines arrive before the summary
    return items, skipped
