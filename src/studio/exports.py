"""The export writers: pure functions `layers -> file` (bottom first), no Gradio and no torch in them, so the
combine tool writes its PSD with the same code. PNG, ZIP, PPTX, PSD; `EXPORTS` is the table the run folders and the
page follow (a new format: its `export_*` function and one row). What each layer is called and which are text comes
from `studio.naming.LayerLabels` (issue 26: named layers, editable text).
"""

import dataclasses
import io
import re
import unicodedata
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from studio.design import LayerText, add_text_boxes, hide_shape
from studio.images import check_layers, composite_layers, crop_to_alpha, layer_names
from studio.naming import LayerLabels

# Exports (section 6). PowerPoint's default widescreen slide is 13.333 in wide; the slide's longer side
# gets (about) that length and the shorter one follows the image's aspect ratio (PowerPoint accepts 1 to 56 in).
SLIDE_LONG_SIDE_EMU = 12192000  # 914400 EMU per inch
# python-pptx refuses a slide side under 1 in: a strip past 13.3:1 gets a 1 in short side and a longer slide.
SLIDE_MIN_SIDE_EMU = 914400
# Prompt text in file names is cut to this many UTF-8 bytes: readable, and far under the 255-byte name
# limit of ext4, NTFS and APFS (a Hangul or Han character takes 3 bytes).
FILE_NAME_TEXT_MAX_BYTES = 60


def safe_file_text(text: str, max_bytes: int = FILE_NAME_TEXT_MAX_BYTES) -> str:
    """Any prompt text as part of a file name that is valid on Linux, macOS and Windows.

    Letters, digits and combining marks of every script are kept (Hangul, Han, Latin, Devanagari ...);
    each run of anything else (spaces, slashes, dots, punctuation, emoji, control characters) becomes one
    "-". NFC first, so the same text typed on macOS and on Linux gives the same name. Cut to `max_bytes`
    of UTF-8 on a character boundary. "" when nothing is left.
    """
    text = unicodedata.normalize("NFC", text or "")
    kept = "".join(c if unicodedata.category(c)[0] in "LNM" else "-" for c in text)
    kept = re.sub(r"-+", "-", kept).strip("-")
    return kept.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").strip("-")


def export_stem(caption: str, seed: int) -> str:
    """`<caption>_seed<seed>`, the name of a run's ZIP, PPTX and PSD; `layers_seed<seed>` without text.

    The suffix also keeps a name from being one Windows reserves (CON, NUL, ...).
    """
    return f"{safe_file_text(caption) or 'layers'}_seed{seed}"


def layer_file_name(index: int) -> str:
    """`layer_1.png` is the bottom layer."""
    return f"layer_{index + 1}.png"


def export_layer_pngs(layers: list[Image.Image], folder: Path, file_names: list[str] | None = None) -> list[Path]:
    """Full-canvas layer_1.png ... layer_N.png (bottom first) in `folder`; `file_names` instead where given
    (`LayerLabels.file_names`: layer_2_red-circle.png)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, layer in enumerate(layers):
        path = folder / (file_names[index] if file_names else layer_file_name(index))
        layer.save(path)
        paths.append(path)
    return paths


def export_zip(layers: list[Image.Image], path: Path, extra_files: dict[str, bytes] | None = None,
               original_size_layers: list[Image.Image] | None = None, file_names: list[str] | None = None) -> Path:
    """layer_1.png ... layer_N.png (bottom first; `file_names` instead where given), composite.png and any extra
    files (params.json); with `original_size_layers`, the same layer and composite files under `original_size/` too."""
    check_layers(layers)
    sets = {"": layers, "original_size/": original_size_layers or []}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for prefix, set_layers in sets.items():
            for index, layer in enumerate(set_layers):
                archive.writestr(prefix + (file_names[index] if file_names else layer_file_name(index)),
                                 _png_bytes(layer))
            if set_layers:
                archive.writestr(prefix + "composite.png", _png_bytes(composite_layers(set_layers)))
        for name, data in (extra_files or {}).items():
            archive.writestr(name, data)
    return Path(path)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def export_pptx(layers: list[Image.Image], path: Path, names: list[str] | None = None,
                texts: list[LayerText | None] | None = None) -> Path:
    """One slide of the image's aspect ratio; each layer a named picture cropped to its alpha bounding box
    and placed at its offset, so objects can be selected and moved; bottom first in z-order.

    A fully transparent layer gets no picture (there is nothing to select); the others keep their numbers.
    `texts` (`studio.design`'s, per layer): a text layer's picture is hidden and an editable text box per line is put
    right above it, at its place, size and colour, named "<layer name>: <line>".
    """
    from pptx import Presentation
    from pptx.util import Emu

    check_layers(layers, names)
    names = names or layer_names(layers)
    width, height = layers[0].size
    emu_per_px = SLIDE_LONG_SIDE_EMU // max(width, height)  # whole EMUs per pixel: places and aspect ratio exact
    emu_per_px = max(emu_per_px, -(-SLIDE_MIN_SIDE_EMU // min(width, height)))  # strips: 1 in short side
    presentation = Presentation()
    presentation.slide_width, presentation.slide_height = Emu(width * emu_per_px), Emu(height * emu_per_px)
    slide = presentation.slides.add_slide(presentation.slide_layouts[6])  # layout 6: blank
    for index, (layer, name) in enumerate(zip(layers, names)):
        cropped = crop_to_alpha(layer)
        if cropped is None:
            continue
        image, (left, top) = cropped
        picture = slide.shapes.add_picture(io.BytesIO(_png_bytes(image)), Emu(left * emu_per_px), Emu(top * emu_per_px),
                                           Emu(image.width * emu_per_px), Emu(image.height * emu_per_px))
        picture.name = name
        text = texts[index] if texts else None
        if text is not None and text.is_text:  # kept, hidden: the pixels stay one click away in the Selection Pane
            hide_shape(picture)
            add_text_boxes(slide, text.lines, emu_per_px, name=name)
    presentation.save(path)
    return Path(path)


def export_psd(layers: list[Image.Image], path: Path, names: list[str] | None = None) -> Path:
    """An 8-bit RGB PSD with transparency: one named pixel layer per layer (bottom first), cropped to its
    alpha bounding box and placed at its offset, plus the merged composite that layer-less viewers show.

    A fully transparent layer stays as an empty (0x0) named layer, the way Photoshop stores one.
    """
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    check_layers(layers, names)
    names = names or layer_names(layers)
    psd = PSDImage.new(mode="RGBA", size=layers[0].size, color=(0, 0, 0, 0))
    # A negative layer count tells readers the composite's 4th channel is its alpha (PSD spec). psd-tools
    # 1.26 keeps that sign for files it read but has no public switch for a new document; without it
    # ImageMagick shows the composite's transparent parts as opaque black.
    psd._merged_alpha = True
    for layer, name in zip(layers, names):
        image, (left, top) = crop_to_alpha(layer) or (Image.new("RGBA", (0, 0)), (0, 0))
        psd_layer = PixelLayer.frompil(image, psd, top=top, left=left)  # frompil appends the layer to psd
        psd_layer.name = name  # the setter writes the Unicode name too; frompil's name= takes MacRoman only
    psd.save(path)  # psd-tools composites the layers into the file's merged image here
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Export:
    """One download: `save_run` writes it into every run folder, the page offers it in a box of its own."""

    key: str  # save_run's paths key (the download box's label is its upper case)
    suffix: str
    # write(layers, path, params.json bytes, the original-size layers or None, the layers' LayerLabels) -> path
    write: Callable[[list[Image.Image], Path, bytes, list[Image.Image] | None, LayerLabels], Path]
    at_original_size: bool = True  # also written into original_size/ (the ZIP holds both sizes instead)


# THE exports table, in the page's order. A new format: its `export_*` function above and one row here.
EXPORTS = (
    Export("pptx", ".pptx", lambda layers, path, params, original, labels: export_pptx(
        layers, path, labels.layer_names(layers), labels.pptx_texts(len(layers)))),
    Export("zip", ".zip", lambda layers, path, params, original, labels: export_zip(
        layers, path, {"params.json": params}, original, labels.file_names(len(layers))), at_original_size=False),
    Export("psd", ".psd", lambda layers, path, params, original, labels: export_psd(
        layers, path, labels.psd_names(layers))),
)
