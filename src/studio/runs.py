"""Run folders: what one decomposition leaves on disk (layers, composite, params.json and the exports), written
whole or not at all (`atomic_run_folder`), and their lifetime (`prune_outputs`, `clean_partial_runs`). No torch.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from PIL import Image

from studio.exports import EXPORTS, export_layer_pngs, export_stem, layer_file_name, safe_file_text
from studio.images import composite_layers, resize_layers
from studio.naming import LayerLabels

logger = logging.getLogger(__name__)


# A run folder's name says which image it holds: `<stamp>_<the input's name>_seed<seed>`, the name cut to this many
# characters (a sub-run's folder has no name: it lives in its run's).
RUN_NAME_MAX_CHARS = 24
# The longest path the app writes inside the outputs folder, in characters: a sub-run's original-size PPTX,
# <stamp>_<24-char name>_seed<10 digits> (62) / sub_runs / <stamp>_seed<10> (37) / original_size /
# <60-char text>_seed<10>_<32000x2000>.pptx (91), with separators: 215 (Gradio's cached copies,
# .gradio-cache/<64 hex>/<name>, stay under 160). Windows without long paths enabled stops at 259 characters, which
# leaves 43 for the outputs folder (`windows_path_warning`).
RUN_PATH_MAX_CHARS = 215
WINDOWS_MAX_PATH_CHARS = 259  # MAX_PATH (260) less the terminating NUL


@dataclasses.dataclass
class DecomposeResult:
    layers: list[Image.Image]  # RGBA, bottom first
    caption: str  # the prompt that conditioned the run (the auto-caption when the prompt was empty)
    auto_caption: bool  # True when the model wrote the caption
    seed: int
    params: dict[str, Any]  # every input, for params.json
    duration_s: float
    notes: list[str] = dataclasses.field(default_factory=list)  # what the input needed, for the user (animated GIF ...)
    labels: LayerLabels = dataclasses.field(default_factory=LayerLabels)  # layer names and text (studio.naming)


def windows_path_warning(outputs: Path, windows: bool = os.name == "nt") -> str | None:
    """On Windows, the start-up warning for an outputs folder too deep for the longest path a run writes
    (RUN_PATH_MAX_CHARS) under the 260-character limit; None elsewhere, or when it fits."""
    if not windows:
        return None
    outputs = Path(outputs).absolute()
    if len(str(outputs)) + 1 + RUN_PATH_MAX_CHARS <= WINDOWS_MAX_PATH_CHARS:
        return None
    return (f"The outputs folder {outputs} is {len(str(outputs))} characters long: a run writes paths up to "
            f"{RUN_PATH_MAX_CHARS} characters inside it, past Windows' 260-character limit. Pass a shorter --outputs "
            f"(at most {WINDOWS_MAX_PATH_CHARS - 1 - RUN_PATH_MAX_CHARS} characters, e.g. C:\\qil-outputs), or enable "
            f"long paths (LongPathsEnabled, see Microsoft's 'Maximum Path Length Limitation').")


def new_run_folder(outputs: Path, seed: int, name: str | None = None) -> Path:
    """`<stamp>_seed<seed>`, or `<stamp>_<name>_seed<seed>` with the input's `name` (made safe, RUN_NAME_MAX_CHARS)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = safe_file_text(name or "", RUN_NAME_MAX_CHARS) if name else ""
    folder = Path(outputs) / (f"{stamp}_{name}_seed{seed}" if name else f"{stamp}_seed{seed}")
    folder.mkdir(parents=True, exist_ok=False)
    return folder


# A run folder is written under this prefix (+ the writer's process id) and renamed when complete: a run folder
# without it is whole. `clean_partial_runs` deletes those a killed process left behind.
PARTIAL_PREFIX = ".partial-"


@contextlib.contextmanager
def atomic_run_folder(outputs: Path, seed: int, name: str | None = None):
    """Yield `(partial, final)`: write the run into `partial`; when the block ends without error it is renamed to
    `final` (one rename, so a run folder is either complete or absent); after an error it is deleted."""
    final = new_run_folder(outputs, seed, name)  # reserves the name (stamps are unique per microsecond)
    final.rmdir()
    partial = final.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{final.name}")
    partial.mkdir()
    try:
        yield partial, final
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, final)


def clean_partial_runs(outputs: Path) -> list[Path]:
    """Delete the half-written run folders (`PARTIAL_PREFIX`) of processes that no longer run, in `outputs`
    and in its runs' sub_runs/. Called at start-up; returns what was deleted."""
    import psutil

    outputs = Path(outputs)
    if not outputs.is_dir():
        return []
    deleted = []
    for partial in [*outputs.glob(f"{PARTIAL_PREFIX}*"), *outputs.glob(f"*/{SUB_RUNS_DIR}/{PARTIAL_PREFIX}*")]:
        pid = partial.name[len(PARTIAL_PREFIX):].partition("-")[0]
        if partial.is_dir() and not (pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)
            deleted.append(partial)
    return deleted


def _export_or_note(failed: dict[str, str], key: str, export: Callable[..., Path], *args) -> Path | None:
    """Run one export; if it fails, log the reason and note it under `failed[key]` so the layers and the other
    exports are still saved and offered. (Deliberately broad: any exporter bug must cost only its own file.)"""
    try:
        return export(*args)
    except Exception as err:
        logger.exception("The %s export failed", key)
        failed[key] = f"{type(err).__name__}: {err}"
        return None


def export_failures_message(failed: dict[str, str]) -> str | None:
    """What the user is told when some exports failed (the layers and the other files are there)."""
    if not failed:
        return None
    names = ", ".join(("original-size " if key.startswith("original_") else "") + key.removeprefix("original_").upper()
                      for key in failed)
    return (f"The {names} export failed and is not offered (the reason is in the server log); the layers and the "
            f"other files were saved.")


def save_run(result: DecomposeResult, outputs: Path, run_info: dict[str, Any] | None = None,
             original_size: tuple[int, int] | None = None,
             extra_files: Callable[[Path], dict[str, Any]] | None = None, name: str | None = None) -> dict[str, Any]:
    """Write one run's folder (`name`: the input's, in the folder's name) and return its paths.

    At the model's resolution: layer_1.png ... layer_N.png, composite.png, params.json and
    <stem>.zip / .pptx / .psd, where <stem> is `export_stem(caption, seed)`. With `original_size`
    (width, height; the input's is `result.params["input_size"]`), the layers are also resized to it and
    written to original_size/ (layer PNGs, composite.png, <stem>_<W>x<H>.pptx / .psd; paths["original"]);
    the ZIP then holds both sets. `extra_files(folder)` may write more files (it returns their paths).

    The folder is written under a temporary name and renamed when complete (`atomic_run_folder`). An export that
    fails costs only its own file: it is missing from `paths`, and `paths["failed"]` names it with the reason.
    """
    with atomic_run_folder(outputs, result.seed, name) as (partial, final):
        paths = _write_run(result, partial, run_info, original_size)
        if extra_files is not None:
            paths.update(extra_files(partial))
    # The same paths, in the renamed folder.
    def moved(value):
        if isinstance(value, Path) and value.is_relative_to(partial):
            return final / value.relative_to(partial)
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [moved(item) for item in value]
        return value
    return moved(paths)


def _write_run(result: DecomposeResult, folder: Path, run_info: dict[str, Any] | None,
               original_size: tuple[int, int] | None) -> dict[str, Any]:
    """`save_run`'s files, written into `folder`. An export (ZIP, PPTX, PSD) that fails is left out and named in
    `paths["failed"]` ({key: reason}); the layer PNGs, composite and params.json are always written."""
    original_layers = resize_layers(result.layers, original_size) if original_size else None
    params = dict(result.params, seed=result.seed, caption=result.caption, auto_caption=result.auto_caption,
                  duration_s=round(result.duration_s, 3), created=datetime.datetime.now().isoformat(timespec="seconds"),
                  export_original_size=list(original_layers[0].size) if original_layers else None,
                  **(run_info or {}))
    # Named layers' files (layer_2_red-circle.png) are listed for `run_folder_complete`.
    labels, file_names = result.labels, result.labels.file_names(len(result.layers))
    params["layer_files"] = file_names
    params_bytes = json.dumps(params, indent=2, ensure_ascii=False).encode("utf-8")
    stem = export_stem(result.caption, result.seed)
    failed: dict[str, str] = {}
    paths: dict[str, Any] = {"folder": folder, "failed": failed}
    paths["layers"] = export_layer_pngs(result.layers, folder, file_names)
    paths["composite"] = folder / "composite.png"
    composite_layers(result.layers).save(paths["composite"])
    paths["params"] = folder / "params.json"
    paths["params"].write_bytes(params_bytes)
    for export in EXPORTS:
        path = _export_or_note(failed, export.key, export.write, result.layers, folder / f"{stem}{export.suffix}",
                               params_bytes, original_layers, labels)
        if path is not None:
            paths[export.key] = path
    if original_layers:
        sub = folder / "original_size"
        size = "{}x{}".format(*original_layers[0].size)
        paths["original"] = {"folder": sub, "layers": export_layer_pngs(original_layers, sub, file_names),
                             "composite": sub / "composite.png"}
        composite_layers(original_layers).save(paths["original"]["composite"])
        for export in EXPORTS:
            if export.at_original_size:
                path = _export_or_note(failed, f"original_{export.key}", export.write, original_layers,
                                       sub / f"{stem}_{size}{export.suffix}", params_bytes, None,
                                       labels.scaled(result.layers[0].size, original_layers[0].size))
                if path is not None:
                    paths["original"][export.key] = path
    if failed:  # params.json says which files are missing and why
        params_bytes = json.dumps(dict(params, failed_exports=failed), indent=2, ensure_ascii=False).encode("utf-8")
        paths["params"].write_bytes(params_bytes)
    return paths


def prune_outputs(outputs: Path, max_bytes: float, max_age_s: float,
                  keep: "Path | Collection[Path] | None" = None) -> list[Path]:
    """Delete run folders, oldest first, until none is older than `max_age_s` and together they hold at most
    `max_bytes` (0: no limit). `keep` (the run just saved, and every run a live session shows) is never deleted.
    Returns what was deleted.

    Only run folders (those holding a params.json, or a sub_runs/ folder left without one) are touched: Gradio's
    cache (.gradio-cache, which Gradio's delete_cache cleans), half-written runs (`clean_partial_runs`) and
    anything else put in the outputs folder stay. A run's age is that of its newest sub-run.
    """
    keep = {Path(keep)} if isinstance(keep, (str, Path)) else {Path(path) for path in keep or ()}
    runs = [p for p in Path(outputs).iterdir() if p.is_dir() and not p.name.startswith(".")
            and ((p / "params.json").is_file() or (p / SUB_RUNS_DIR).is_dir())]
    last_used = {run: max([run.stat().st_mtime] + [sub.stat().st_mtime for sub in (run / SUB_RUNS_DIR).glob("*")])
                 for run in runs}
    runs.sort(key=last_used.get)
    sizes = {run: sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) for run in runs}
    total, now, deleted = sum(sizes.values()), time.time(), []
    for run in runs:
        too_old = max_age_s > 0 and now - last_used[run] > max_age_s
        too_big = max_bytes > 0 and total > max_bytes
        if run in keep or not (too_old or too_big):
            continue
        shutil.rmtree(run)
        total -= sizes[run]
        deleted.append(run)
    return deleted


SUB_RUNS_DIR = "sub_runs"  # inside the first decomposition's run folder, one folder per sub-run


def run_folder_complete(folder: Path) -> bool:
    """True when `folder` holds everything `save_run` writes (its params.json says which files)."""
    try:
        params = json.loads((folder / "params.json").read_text(encoding="utf-8"))
        stem = export_stem(params["caption"], params["seed"])
        names = params.get("layer_files") or [layer_file_name(i) for i in range(params["layers"])]
        names = list(names) + ["composite.png"]
        failed = params.get("failed_exports") or {}  # an export that failed is not written (and never will be)
        names += [f"{stem}{export.suffix}" for export in EXPORTS if export.key not in failed]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() for name in names)


def completed_images(outputs: Path) -> dict[str, Path]:
    """input_file -> its complete run folder, for the run folders directly under `outputs`."""
    done = {}
    for folder in sorted(Path(outputs).glob("*/params.json")):
        if run_folder_complete(folder.parent):
            done[json.loads(folder.read_text(encoding="utf-8")).get("input_file")] = folder.parent
    return done
