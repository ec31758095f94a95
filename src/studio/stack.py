"""The layer stack of recursive decomposition ("decompose this layer" again): plain data, no Gradio, no torch.
`decompose_layer` itself, which runs the model, is in src/app.py.
"""

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.exports import export_layer_pngs
from studio.images import resize_layers
from studio.naming import LayerLabels
from studio.params import LAYERS_RANGE
from studio.runs import SUB_RUNS_DIR, DecomposeResult, save_run

# A layer usually holds fewer things than the whole image, so a sub-run asks for fewer layers by default.
SUB_RUN_LAYERS = 2


@dataclasses.dataclass
class LayerStack:
    """What the UI shows and the exports write: RGBA layers bottom first on one canvas, with one step of undo."""

    layers: list[Image.Image]  # RGBA, bottom first, all of one size (the canvas)
    run_folder: Path  # the first decomposition's run folder; sub-runs are saved under it
    files: dict[str, Any] = dataclasses.field(default_factory=dict)  # save_run's paths for exactly these layers
    previous: "LayerStack | None" = None  # the stack before the last sub-run (one step of undo)
    original_size: tuple[int, int] | None = None  # also export at the input's size (exports' original-size option)
    caption: str | None = None  # the caption and seed of the run that made these layers (shown after an undo too)
    seed: int | None = None
    labels: LayerLabels = dataclasses.field(default_factory=LayerLabels)  # the layers' names and text (studio.naming)


def fit_to_canvas(layers: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Fit sub-layers to the canvas `size` (width, height); layers already that size are returned as they are.

    A sub-run returns its layers at the resolution bucket of the layer it was given, which can differ from the
    stack's canvas (another bucket, or the 32 px rounding of the aspect ratio): those go through the exports'
    `resize_layers` (premultiplied Lanczos, no dark edges).
    """
    size = (int(size[0]), int(size[1]))
    return [layer if layer.size == size else resize_layers([layer], size)[0]
            for layer in (layer.convert("RGBA") for layer in layers)]


def check_layer_index(index: int, count: int) -> None:
    """Reject an index outside a stack of `count` layers; the message counts layers from 1, as the gallery does."""
    if not isinstance(index, (int, np.integer)):
        raise ValueError(f"layer index {index!r} is not a whole number: choose a layer from 1 (bottom) to {count}")
    if not 0 <= index < count:
        raise ValueError(f"Layer {index + 1} is not in the stack: it has {count} layers. Choose a layer from 1 "
                         f"(bottom) to {count}.")


def replace_layer(layers: list[Image.Image], index: int, sub_layers: list[Image.Image]) -> list[Image.Image]:
    """A new list in which `layers[index]` is replaced, in place, by `sub_layers` (bottom first) fit to the canvas."""
    check_layer_index(index, len(layers))
    if not sub_layers:
        raise ValueError(f"no sub-layers to put in place of layer {index + 1}: a decomposition gives at least "
                         f"{LAYERS_RANGE[0]}")
    return list(layers[:index]) + fit_to_canvas(sub_layers, layers[0].size) + list(layers[index + 1:])


def undo(stack: LayerStack) -> LayerStack:
    """The stack before the last sub-run. One step only: the restored stack has no undo of its own."""
    if stack.previous is None:
        raise ValueError("nothing to undo: undo goes back one sub-run, and there is none since the last "
                         "decomposition or undo")
    return stack.previous


def save_sub_run(stack: LayerStack, new_layers: list[Image.Image], index: int, result: DecomposeResult,
                 run_info: dict[str, Any] | None = None, labels: LayerLabels | None = None) -> dict[str, Any]:
    """Write one sub-run under `stack.run_folder/sub_runs/` and return its paths.

    The folder is a normal run folder for the *new stack* (layer PNGs, composite, ZIP, PPTX, PSD: what the UI
    offers), whose params.json holds the sub-run's parameters and a `sub_run` entry with the index it replaced.
    Next to them: `input_layer.png` (the layer that was decomposed, alpha as it was) and `sub_layers/` (the
    sub-run's own output at the model's resolution). `labels`: the new stack's (`LayerLabels.replaced`).
    """
    sub_run = dict(replaced_index=index, replaced_file=stack.labels.file_names(len(stack.layers))[index],
                   sub_layers=len(result.layers),
                   stack_layers_before=len(stack.layers), stack_layers_after=len(new_layers),
                   applied_to=str(stack.files.get("folder", stack.run_folder)))
    step = dataclasses.replace(result, layers=new_layers, labels=labels or LayerLabels())

    def input_and_sub_layers(folder: Path) -> dict[str, Any]:
        stack.layers[index].save(folder / "input_layer.png")
        return {"input_layer": folder / "input_layer.png",
                "sub_layers": export_layer_pngs(result.layers, folder / "sub_layers")}

    return save_run(step, Path(stack.run_folder) / SUB_RUNS_DIR, dict(run_info or {}, sub_run=sub_run),
                    original_size=stack.original_size, extra_files=input_and_sub_layers)


def check_stack_files(stack: LayerStack) -> None:
    """Refuse a stack whose run folder (or its layer files) was deleted, e.g. by hand or by an older app's pruning:
    a sub-run would recreate a folder holding only sub_runs/, and the page could not show the layers."""
    files = [stack.run_folder, *stack.files.get("layers", [])]
    if not all(Path(path).exists() for path in files):
        raise ValueError("The files of these layers are no longer on the server (their run folder was deleted). "
                         "Decompose the image again.")
