"""Combine RGBA layers into one picture: loose PNGs, the studio's ZIP, or a PSD, stacked bottom -> top.

    python src/tool/combine_layers.py                          the Gradio tool (port 7870)
    python src/tool/combine_layers.py LAYER.png... -o OUT.png  headless; -o OUT.psd writes the stack as a PSD

Sections, as in src/app.py:
    1. flags     canvas rule, port, login (--auth / QIL_AUTH)
    2. reading   `read_layers` (PNG / ZIP / PSD -> `Layer`s, the app's size limits checked before decoding:
                 `studio.images.read_file_layers`), `add_files` (keeps the stack when a file is bad)
    3. stacking  `canvas_size`, `composite_stack`, `export_stack_psd`, `move_layer`, `set_visible`, `remove_layer`
    4. UI        `build_ui` (reorder, hide, remove; the composite updates on every change)
    5. main

Layers are never rescaled: a PSD layer sits at its offset on the PSD's canvas; a loose PNG sits at the
top-left corner of a canvas the size of the bottom layer (the upstream tool resized every layer to the
smallest height, which distorts them). Compositing is Porter-Duff "over" on straight alpha
(`studio.images.composite_layers`), and the PSD writer is `studio.exports.export_psd`: one home for each.
"""

import argparse
import dataclasses
import logging
import secrets
import sys
import zipfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # src/, for `studio`
# Torch-free modules only: the combine tool starts in well under a second and never loads the model.
from studio.errors import exits_with_message, terminal_safe  # noqa: E402
from studio.exports import export_psd, safe_file_text  # noqa: E402
from studio.images import composite_layers, read_file_layers  # noqa: E402
from studio.params import add_flags  # noqa: E402
from studio.serving import (GRADIO_CACHE_MAX_AGE_S, LAN_HOST, clean_gradio_caches, delete_gradio_files,  # noqa: E402
                            launch_options, network_warning, readable_upload, remove_process_cache, serving_flags,
                            stop_on_sigterm, use_process_cache)

logger = logging.getLogger("qwen_layered_studio.combine_layers")

# ----------------------------------------------------------------------------------------------------
# 1. Flags
# ----------------------------------------------------------------------------------------------------
HOST = LAN_HOST  # reachable from the LAN like the app; --host 127.0.0.1 keeps it local
PORT = 7870  # the app is 7869, the edit tool 7871
MAX_UPLOAD_SIZE = "50mb"  # Gradio's upload route refuses bigger files before anything reads them
FLAGS = serving_flags(HOST, PORT, MAX_UPLOAD_SIZE, commands=("combine",))
OUTPUTS_DIR = Path(__file__).resolve().parents[2] / "outputs"  # the app's; Gradio's cache goes inside it
# Gradio deletes its uploads and the tool's downloads after this long (and all of them at exit).
CACHE_SCHEDULE = (GRADIO_CACHE_MAX_AGE_S // 4, GRADIO_CACHE_MAX_AGE_S)
CANVAS_NOTE = ("The canvas is the size of the bottom layer (a PSD's own canvas when that layer came from a PSD). "
               "Loose PNGs sit at its top-left corner and are never rescaled; PSD layers keep their offsets.")


@dataclasses.dataclass(eq=False)  # eq=False: compared and hashed by identity, so Gradio's State sees every edit
class Layer:
    image: Image.Image  # RGBA at its own size
    name: str
    source: str  # the file it came from, for the UI and for messages
    left: int = 0  # offset on the canvas: a PSD layer's own, 0 for loose PNGs
    top: int = 0
    canvas: tuple[int, int] | None = None  # the PSD's canvas size; None: the layer's own size
    visible: bool = True
    note: str = ""  # what was not carried over (a PSD blend mode, mask or effect)


class LayerFileError(ValueError):
    """A file that holds no readable layer. The message starts with the file's name."""


# ----------------------------------------------------------------------------------------------------
# 2. Reading: `studio.images.read_file_layers`, shared with `evaluate`, checks every size before decoding
# ----------------------------------------------------------------------------------------------------
def read_layers(path: Path | str, below: list[Layer] = ()) -> list[Layer]:
    """The layers of one file, bottom first: loose PNGs (WebP, ...) at the top-left corner, the studio's ZIP
    (layer_1.png ... layer_N.png of its top folder; composite.png left out) or any ZIP of PNGs, or a PSD (every
    non-group layer at its offset on the PSD's canvas, with its visibility and opacity; blend modes, masks and effects
    are not applied and the layer's note says so). `below`: the stack they go on, which counts in the stack's limits.

    The app's limits apply before anything is decoded (`studio.images`): a layer or a PSD's canvas of at most
    MAX_INPUT_PIXELS, a ZIP member of at most MAX_LAYER_FILE_BYTES, a stack of at most MAX_STACK_PIXELS and
    MAX_STACK_LAYERS. Raises LayerFileError, its message starting with the file's name, when the file holds none.
    """
    path = Path(path)
    try:
        read = read_file_layers(path, below, label=path.name)
    except ValueError as err:  # names the file and the limit (or what is wrong with it), never a server path
        raise LayerFileError(str(err)) from None
    except (OSError, zipfile.BadZipFile, Image.DecompressionBombError) as err:
        # The reason's text can hold the server's path of the upload: it goes to the log, its kind to the user.
        logger.info("%s is not a readable layer file: %s", path, err)
        raise LayerFileError(f"{path.name}: not a readable PNG, ZIP or PSD ({type(err).__name__}). Export the "
                             f"layers again as PNG files, the studio's ZIP or a PSD saved with its layers.") from err
    return [Layer(**{field.name: getattr(layer, field.name) for field in dataclasses.fields(layer)}) for layer in read]


def add_files(stack: list[Layer], paths: list[Path | str]) -> tuple[list[Layer], list[str]]:
    """The stack with every readable file's layers on top, and one message per bad file.

    The given stack is never changed: a bad file (or one past the stack's limits) costs only itself.
    """
    stack, errors = list(stack), []
    for path in paths:
        try:
            stack.extend(read_layers(path, stack))
        except LayerFileError as err:
            errors.append(str(err))
    return stack, errors


# ----------------------------------------------------------------------------------------------------
# 3. Stacking: pure functions on a list of layers, bottom first
# ----------------------------------------------------------------------------------------------------
def canvas_size(stack: list[Layer]) -> tuple[int, int]:
    """The bottom layer's PSD canvas, or the bottom layer's own size."""
    if not stack:
        raise ValueError("the stack is empty: add at least one layer")
    bottom = stack[0]
    return bottom.canvas or bottom.image.size


def place_on_canvas(layer: Layer, size: tuple[int, int]) -> Image.Image:
    """The layer at its offset on a transparent canvas; what lies outside the canvas is cut off."""
    canvas = Image.new("RGBA", size, (0, 0, 0, 0))
    canvas.paste(layer.image, (layer.left, layer.top))  # a plain copy: the canvas under it is empty
    return canvas


def composite_stack(stack: list[Layer]) -> Image.Image:
    """The visible layers composited bottom -> top ("over") on the stack's canvas."""
    size = canvas_size(stack)
    visible = [place_on_canvas(layer, size) for layer in stack if layer.visible]
    if not visible:
        return Image.new("RGBA", size, (0, 0, 0, 0))
    return composite_layers(visible)


def export_stack_psd(stack: list[Layer], path: Path) -> Path:
    """The visible layers as a PSD on the stack's canvas, named as in the stack, bottom first."""
    visible = [layer for layer in stack if layer.visible]
    if not visible:
        raise ValueError("no visible layer to export: show at least one layer")
    size = canvas_size(stack)
    return export_psd([place_on_canvas(layer, size) for layer in visible], path,
                          names=[layer.name for layer in visible])


def save_stack(stack: list[Layer], path: Path) -> Path:
    """`.psd`: the layers as a PSD; `.png`: the composite."""
    path = Path(path)
    if path.suffix.lower() == ".psd":
        return export_stack_psd(stack, path)
    composite_stack(stack).save(path)
    return path


def move_layer(stack: list[Layer], index: int, step: int) -> list[Layer]:
    """A new stack with layer `index` moved `step` places up (+) or down (-), kept within the stack."""
    target = min(max(index + step, 0), len(stack) - 1)
    stack = list(stack)
    stack.insert(target, stack.pop(index))
    return stack


def set_visible(stack: list[Layer], index: int, visible: bool) -> list[Layer]:
    stack = list(stack)
    stack[index] = dataclasses.replace(stack[index], visible=bool(visible))
    return stack


def remove_layer(stack: list[Layer], index: int) -> list[Layer]:
    return stack[:index] + stack[index + 1:]


def stack_notes(stack: list[Layer]) -> list[str]:
    """What the user should know about the canvas: its size, and layers that do not fit it."""
    if not stack:
        return ["Add PNG layers, a ZIP from the studio or a PSD."]
    width, height = canvas_size(stack)
    notes = [f"Canvas {width}×{height}. {CANVAS_NOTE}"]
    for layer in stack:
        w, h = layer.image.size
        if layer.left < 0 or layer.top < 0 or layer.left + w > width or layer.top + h > height:
            notes.append(f"'{layer.name}' ({w}×{h} at {layer.left}, {layer.top}) reaches beyond the canvas: "
                         f"that part is cut off. Put the largest layer at the bottom to see all of it.")
        elif layer.canvas is None and (w, h) != (width, height):
            notes.append(f"'{layer.name}' is {w}×{h}, smaller than the canvas: it sits at the top-left corner.")
        if layer.note:
            notes.append(f"'{layer.name}': {layer.note}.")
    return notes


# ----------------------------------------------------------------------------------------------------
# 4. UI
# ----------------------------------------------------------------------------------------------------
# The tool's CSS: the app's page.css (the checkerboard behind RGBA previews) and the layer list's compact rows.
PAGE_CSS = (Path(__file__).resolve().parents[1] / "studio" / "page.css").read_text(encoding="utf-8")
CSS = PAGE_CSS + """
.layer-row { align-items: center !important; gap: var(--size-2) !important; flex-wrap: nowrap !important; }
.layer-row > * { min-width: 0 !important; }
.layer-row .layer-thumb { flex: 0 0 56px !important; width: 56px; height: 56px; }
.layer-row .layer-name { flex: 1 1 0 !important; width: auto !important; overflow: hidden; padding: 0 !important; }
.layer-row .layer-name p { margin: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.layer-row .layer-shown { flex: 0 0 auto !important; width: auto !important; padding: 0 var(--size-2) !important; }
.layer-row button { flex: 0 0 34px !important; min-width: 34px !important; padding: 2px !important; }
"""


def download_stem(stack: list[Layer]) -> str:
    """The downloads' name: the bottom layer's file (a ZIP's or PSD's own name), then "_combined"."""
    source = Path(stack[0].source.split("/")[0]).stem if stack else "layers"
    return f"{safe_file_text(source) or 'layers'}_combined"


def build_ui():
    """The Gradio Blocks app. Handlers map widget values to the functions above and refresh the view."""
    # Gradio reads GRADIO_TEMP_DIR when it is imported: its cache goes in this process's folder beside the app's.
    use_process_cache(OUTPUTS_DIR)
    import gradio as gr
    from gradio.utils import get_upload_folder

    def view(stack):
        """Composite, notes and the two downloads of the current stack, written straight into Gradio's cache (in a
        folder nobody can guess), which Gradio serves and deletes on its schedule (`CACHE_SCHEDULE`)."""
        notes = "\n".join(f"- {note}" for note in stack_notes(stack))
        if not stack:
            return None, notes, None, None
        folder = Path(get_upload_folder()) / secrets.token_hex(16)
        folder.mkdir(parents=True)
        stem = folder / download_stem(stack)  # the files keep a readable name
        png = str(save_stack(stack, stem.with_suffix(".png")))  # the preview shows this same file
        psd = str(export_stack_psd(stack, stem.with_suffix(".psd"))) if any(l.visible for l in stack) else None
        return png, notes, png, psd

    def on_upload(stack, files):
        # Gradio checks that a file lies in its upload cache; `readable_upload` that it was uploaded (the
        # cache also holds the copies of results served to other sessions).
        readable, refused = [], []
        for file in files or []:
            try:
                readable.append(readable_upload(str(file), demo.upload_file_set, get_upload_folder()))
            except ValueError as err:
                refused.append(f"{Path(str(file)).name}: {err}")
        stack, errors = add_files(stack or [], readable)
        errors = refused + errors
        for message in errors:
            gr.Warning(message)
        return stack, None, *view(stack)

    def on_change(new_stack):
        return new_stack, *view(new_stack)

    with gr.Blocks(title="Combine layers", delete_cache=CACHE_SCHEDULE) as demo:
        gr.Markdown("# Combine layers\nStack RGBA layers bottom → top: PNGs, the studio's ZIP, or a PSD. Reorder, hide "
                    "and remove them; the composite follows every change. " + CANVAS_NOTE)
        stack = gr.State([])
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Add layers (PNG, ZIP or PSD; added on top, in the order given)",
                                file_count="multiple", file_types=[".png", ".webp", ".zip", ".psd"], height=140)
                layer_list = gr.Column()
                clear = gr.Button("Remove all layers", size="sm", variant="secondary")
            with gr.Column():
                preview = gr.Image(label="Composite", type="filepath", image_mode="RGBA", interactive=False,
                                   height=420, elem_classes="checker")
                with gr.Row():
                    png_button = gr.DownloadButton("Download PNG")
                    psd_button = gr.DownloadButton("Download PSD (visible layers)")
                notes = gr.Markdown()
        view_outputs = [preview, notes, png_button, psd_button]

        with layer_list:
            @gr.render(inputs=stack)
            def render_layers(layers):
                if layers:
                    gr.Markdown("**Layers** — the top of the list is the top of the stack.")
                for index in reversed(range(len(layers))):
                    layer = layers[index]
                    w, h = layer.image.size
                    where = " (bottom)" if index == 0 else " (top)" if index == len(layers) - 1 else ""
                    with gr.Row(equal_height=True, elem_classes="layer-row"):
                        gr.Image(layer.image, format="png", height=56, width=56, show_label=False, container=False,
                                 interactive=False, buttons=[], elem_classes=["layer-thumb", "checker"])
                        gr.Markdown(f"**{index + 1}{where}** {layer.name}  \n{w}×{h} at ({layer.left}, "
                                    f"{layer.top}) · {layer.source}", elem_classes="layer-name")
                        # interactive: Gradio would draw a checkbox made inside gr.render as a disabled one
                        shown = gr.Checkbox(layer.visible, label="visible", interactive=True, min_width=0, scale=0,
                                            container=False, elem_classes="layer-shown")
                        up = gr.Button("↑", size="sm", min_width=0, scale=0, interactive=index < len(layers) - 1,
                                       elem_id=f"layer-{index + 1}-up")
                        down = gr.Button("↓", size="sm", min_width=0, scale=0, interactive=index > 0,
                                         elem_id=f"layer-{index + 1}-down")
                        remove = gr.Button("✕", size="sm", min_width=0, scale=0, variant="stop",
                                           elem_id=f"layer-{index + 1}-remove")
                    private = dict(outputs=[stack, *view_outputs], api_visibility="private")
                    shown.input(lambda s, v, i=index: on_change(set_visible(s, i, v)), [stack, shown], **private)
                    up.click(lambda s, i=index: on_change(move_layer(s, i, +1)), stack, **private)
                    down.click(lambda s, i=index: on_change(move_layer(s, i, -1)), stack, **private)
                    remove.click(lambda s, i=index: on_change(remove_layer(s, i)), stack, **private)

        files.upload(on_upload, [stack, files], [stack, files, *view_outputs], api_name="add_files")
        clear.click(lambda: on_change([]), None, [stack, *view_outputs], api_visibility="private")
    return demo


# ----------------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="combine_layers.py", description=__doc__.split("\n")[0])
    parser.add_argument("layers", nargs="*", type=Path,
                        help="layer files bottom first (PNG, the studio's ZIP, PSD); none: start the Gradio tool")
    parser.add_argument("-o", "--output", type=Path,
                        help="OUT.png: the composite; OUT.psd: the stack as a PSD (needed with LAYER files)")
    add_flags(parser, FLAGS, "combine")  # --host, --port, --auth, --max-upload-size (and their QIL_* variables)
    return parser.parse_args(argv)


@exits_with_message  # a file that cannot be written, a busy port: the message and exit code 2
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.output is not None and not args.layers:  # -o means "headless": it needs the files to combine
        print(f"error: -o {args.output} needs the layer files to combine, e.g. "
              f"combine_layers.py layer_1.png layer_2.png -o {args.output} (without files and -o, the tool starts its "
              f"page)", file=sys.stderr)
        return 2
    if args.layers:
        if args.output is None or args.output.suffix.lower() not in (".png", ".psd"):
            print(f"error: -o {args.output or ''} must name a .png (the composite) or a .psd (the layers) file, "
                  f"e.g. -o combined.png", file=sys.stderr)
            return 2
        stack, errors = add_files([], args.layers)
        if errors:  # headless: write nothing rather than a stack with a layer missing
            for message in errors:
                print(terminal_safe(f"error: {message}"), file=sys.stderr)
            return 2
        for note in stack_notes(stack)[1:]:
            print(terminal_safe(f"note: {note}"), file=sys.stderr)
        path = save_stack(stack, args.output)
        print(f"{path} ({len(stack)} layers, canvas {canvas_size(stack)[0]}x{canvas_size(stack)[1]})")
        return 0
    if network_warning(args):
        logger.warning(network_warning(args))
    for leftover in clean_gradio_caches(OUTPUTS_DIR):
        logger.info("Deleted %s: Gradio's cache of a process that no longer runs", leftover)
    print(f"Serving on http://{args.host}:{args.port}")
    stop_on_sigterm()  # SIGTERM closes Gradio like Ctrl+C
    # CSS: the checkerboard and the layer rows. run_history off: Gradio's "Runs" page would leave the tool, and its
    # "Load run" restores the picture but not the stack behind it.
    demo = build_ui().queue()
    demo.launch(**launch_options(args, css=CSS), run_history=False)
    delete_gradio_files(demo)
    remove_process_cache()  # the uploads and downloads of this process, whatever Gradio left
    return 0


if __name__ == "__main__":
    sys.exit(main())
