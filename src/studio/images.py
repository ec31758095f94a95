"""RGBA images and layer stacks: reading an input image defensively, checking sizes before decoding, stacking,
cropping, resizing, and reading layered files (PSD, the studio's ZIP, folders of PNGs). Pure Pillow and numpy: the
combine tool uses it without torch.
"""

import dataclasses
import errno
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from studio.params import RESOLUTIONS

# Input images. Pillow reads the header before any pixel, so the size is checked first: 64 MP still takes a
# full-size phone photo; a 20000x20000 image (400 MP, 1.6 GB as RGBA) is refused before it is decoded.
MAX_INPUT_PIXELS = 64_000_000
# The model works on 16 px patches of an image resized to ~640 or ~1024 px a side: a side under 16 px, or a
# strip longer than 16:1 (its short side falls under 160 px at 640; past 1600:1 the pipeline's size is 0), is refused.
MIN_INPUT_SIDE = 16
MAX_ASPECT_RATIO = 16
# The files `decompose DIR` takes from a folder (not recursive); a file named on the command line is tried
# whatever its name, so a bad one is reported instead of silently left out.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # what the UI takes
# Layers resized to the input's original size use Lanczos, the sharpest of Pillow's filters, for the
# 1.5-4x upscales from the model's 640/1024 buckets; it runs on premultiplied alpha (no dark halo).
ORIGINAL_SIZE_RESAMPLE = Image.Resampling.LANCZOS
# Pillow modes whose `convert("RGBA")` would clip: `to_rgba` scales them to 8 bits first.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNG / TIFF


def read_image_file(path: Path, notes: list[str] | None = None) -> Image.Image:
    """Decode an image file defensively; every refusal is a ValueError that names the file and the fix.

    Its size is checked from the header before any pixel is decoded, the EXIF orientation is applied, and an
    animation gives its first frame (a line saying so is appended to `notes`).
    """
    name = path.name
    kind = not_a_file(path)  # never opened: reading a FIFO waits for a writer, /dev/zero never ends
    if kind == "missing":
        raise ValueError(f"image file {str(path)!r} does not exist")
    if kind is not None:
        raise ValueError(f"{name} is {kind}, not an image file: pass the image file itself")
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes): the file holds no image. Choose the image file again.")
    # 1. The header: format, size, frame count. No pixel is decoded yet.
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError as err:  # Pillow's own guard, from the header, past twice MAX_IMAGE_PIXELS
        # Its message holds the image's pixel count ("Image size (400000000 pixels) exceeds limit of ..."): the user
        # is told the image's size, not Pillow's limit.
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels.group(1)) / 1e6:,.0f} megapixels" if pixels else "too large"
        raise ValueError(f"{name} is {size}: the limit is {MAX_INPUT_PIXELS / 1e6:.0f} megapixels. Scale it down "
                         f"first (the model works at about {RESOLUTIONS[-1]} px a side anyway).") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{name} is not an image: its content is no image format this app reads. Upload a PNG, "
                         f"JPEG or WebP file.") from None
    except (OSError, SyntaxError) as err:  # a known format with a broken header
        raise ValueError(f"{name} is damaged ({err}). Open it in an image editor and save it again, or export it "
                         f"as PNG.") from None
    with opened:
        check_image_size(opened.width, opened.height, name)
        frames = getattr(opened, "n_frames", 1)
        # 2. The pixels (of the first frame).
        try:
            opened.seek(0)
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a copy, turned upright as the EXIF orientation says
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ValueError(f"{name} is damaged: its pixels could not be decoded ({err}). Open it in an image "
                             f"editor and save it again, or export it as PNG.") from None
    if frames > 1 and notes is not None:
        notes.append(f"{name} is animated ({frames} frames): the first frame was used.")
    return image


def not_a_file(path: Path) -> str | None:
    """What `path` is when it is no regular file, said without opening it ("a FIFO (named pipe)", "a symlink loop",
    "a device (/dev/zero)", ...; "missing" when nothing is there); None for a regular file (or a link to one)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        return "a symlink to a missing file" if os.path.islink(path) else "missing"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return f"a device ({os.path.realpath(path)})"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """Refuse images too large to decode safely, or too small or too thin for the model."""
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels): the limit is "
                         f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels. Scale it down first (the model works at about "
                         f"{RESOLUTIONS[-1]} px a side anyway).")
    if min(width, height) < MIN_INPUT_SIDE:
        raise ValueError(f"{name} is {width}x{height} px: too small for the model. Use an image at least "
                         f"{MIN_INPUT_SIDE} px on each side.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{name} is {width}x{height} px, longer than {MAX_ASPECT_RATIO}:1: the model needs a "
                         f"wider strip. Crop it to at most {MAX_ASPECT_RATIO}:1 first.")


def to_rgba(image: Any, notes: list[str] | None = None) -> Image.Image:
    """Accept a path, PIL image, numpy array (HxW, HxWx3, HxWx4; uint8 or float 0..1) or Gradio's file value.

    Files go through `read_image_file` (size checked before decoding, EXIF orientation, first frame of an
    animation, which appends a line to `notes`). CMYK, 16-bit grey and palette images with transparency
    become RGBA with their colours and transparency kept.
    """
    if isinstance(image, dict):  # Gradio ImageEditor / FileData-like values
        image = image.get("composite") or image.get("background") or image.get("path") or image.get("name")
    if isinstance(image, (str, Path)):
        image = read_image_file(Path(image), notes)
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image array of shape {array.shape} is not HxW, HxWx3 or HxWx4")
        image = Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)
    if not isinstance(image, Image.Image):
        raise ValueError(f"cannot read an image from a {type(image).__name__}; pass a path, PIL image or array")
    check_image_size(image.width, image.height)
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's convert("RGBA") clips 16-bit values at 255 (most of the range turns white): scale to 8 bits.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) * (255 / 65535)).round().clip(0, 255).astype(np.uint8))
    # Pillow's own conversion covers the rest: a palette's transparency (tRNS) becomes alpha, CMYK becomes RGB
    # (Adobe's inverted CMYK JPEGs included); tests/test_hardening.py checks the pixels of each.
    return image.convert("RGBA")


def check_layers(layers: list[Image.Image], names: list[str] | None = None) -> None:
    """Exporters take one canvas: at least one layer, all of the first layer's size, one name per layer."""
    if not layers:
        raise ValueError("layers is empty: pass at least one RGBA layer (bottom first)")
    for index, layer in enumerate(layers):
        if layer.size != layers[0].size:
            raise ValueError(f"layer {index + 1} is {layer.width}x{layer.height} but layer 1 is "
                             f"{layers[0].width}x{layers[0].height}: all layers must share one canvas size")
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers: pass one name per layer, or none")


def composite_layers(layers: list[Image.Image]) -> Image.Image:
    """Stack RGBA layers bottom first with Porter-Duff "over"."""
    check_layers(layers)
    canvas = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
    for layer in layers:
        canvas = Image.alpha_composite(canvas, layer.convert("RGBA"))
    return canvas


def crop_to_alpha(layer: Image.Image) -> tuple[Image.Image, tuple[int, int]] | None:
    """The layer cut to the bounding box of its non-zero alpha, and the box's (left, top); None when empty.

    Lossless: every pixel outside the box is fully transparent, so placing the crop at (left, top) gives
    the layer back.
    """
    layer = layer.convert("RGBA")
    box = layer.getbbox(alpha_only=True)
    if box is None:
        return None
    return layer.crop(box), (box[0], box[1])


def layer_names(layers: list[Image.Image]) -> list[str]:
    """`Layer 1 (bottom)`, `Layer 2`, ..., `Layer N (top)`; `empty` is added for a fully transparent layer."""
    names = []
    for index, layer in enumerate(layers):
        notes = ["bottom"] if index == 0 else ["top"] if index == len(layers) - 1 else []
        if layer.convert("RGBA").getbbox(alpha_only=True) is None:
            notes.append("empty")
        names.append(f"Layer {index + 1}" + (f" ({', '.join(notes)})" if notes else ""))
    return names


def resize_layers(layers: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Resize RGBA layers to `size` (width, height) in premultiplied alpha, so edges get no dark halo.

    Resampling straight RGBA mixes the colour of the transparent pixels around a shape (black, here) into
    its edge. Premultiplied, a transparent pixel weighs nothing. Pillow's `resize` premultiplies RGBA by
    itself (Image.resize: "RGBA" -> "RGBa"); it is spelled out here because the no-halo edge is the point.
    """
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size={tuple(size)!r} is not an image size: pass (width, height), both at least 1 px")
    return [layer.convert("RGBA").convert("RGBa").resize((width, height), ORIGINAL_SIZE_RESAMPLE).convert("RGBA")
            for layer in layers]


# Layered files: the combine tool's input, `evaluate`'s ground truth and its predictions (`read_file_layers`). Every size
# is read from a header (an image's, a PSD's, a ZIP member's directory entry) and checked before a pixel is decoded.
GROUND_TRUTH_SUFFIXES = (".psd", ".zip")  # layered files; a folder of PNGs is the third kind
MIN_GROUND_TRUTH_LAYERS = 2  # one layer is the picture itself, not a decomposition
PSD_MAGIC, ZIP_MAGIC = b"8BPS", b"PK\x03\x04"  # what tells the kinds apart, whatever a file is called
# The studio's ZIP: layer_1.png (bottom) ... layer_N.png, plus composite.png and params.json
# (studio.exports.export_zip); a named layer's file is layer_2_red-circle.png (studio.naming.named_layer_file).
ZIP_LAYER_NAME = re.compile(r"layer_(\d+)(?:_[^/]*)?\.png$", re.IGNORECASE)
# A ZIP member is read as a stream, never whole; one larger than a PNG of the largest layer stored uncompressed (4
# bytes a pixel) is refused from the ZIP's directory: a 2 MB ZIP can hold gigabytes of zeros.
MAX_LAYER_FILE_BYTES = 4 * MAX_INPUT_PIXELS
# A stack holds each layer at its own size and once more on the canvas (compositing and the PSD export place every
# layer on it): at most this many pixels in all, 1 GB as RGBA. Eight 8000x8000 layers in a 2 MB ZIP took 5.3 GB.
MAX_STACK_PIXELS = 256_000_000
MAX_STACK_LAYERS = 200  # the app writes at most 10 a run; a ZIP of 10,000 one-pixel PNGs is no design


@dataclasses.dataclass(eq=False)
class FileLayer:
    """One layer of a layered file: its RGBA pixels at its own size, and where it sits."""

    image: Image.Image
    name: str
    source: str  # the file (and ZIP member) it came from, for messages
    left: int = 0  # its offset on the canvas: a PSD layer's own, 0 otherwise
    top: int = 0
    canvas: tuple[int, int] | None = None  # the PSD's canvas size; None: the layer's own size
    visible: bool = True
    note: str = ""  # what was not applied (a PSD blend mode, mask or effect)


def _natural_key(name: str) -> list:
    """layer_2 before layer_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _layer_pngs(folder: Path) -> list[Path]:
    """A folder's PNG layers, bottom first in natural order; composite.png is the stack, not a layer."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".png"
                   and p.name.lower() != "composite.png" and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _check_layer_pixels(width: int, height: int, name: str, what: str = "a layer") -> None:
    """A layer (or a canvas) may be any size the model could take (no minimum side: `--pred` layers are only scored)."""
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height}: more than the {MAX_INPUT_PIXELS:,} pixels (MAX_INPUT_PIXELS) "
                         f"{what} may have")


def check_stack(sizes: list[tuple[int, int]], canvas: tuple[int, int]) -> None:
    """Refuse a stack of layers of these sizes on this canvas beyond MAX_STACK_LAYERS or MAX_STACK_PIXELS."""
    if len(sizes) > MAX_STACK_LAYERS:
        raise ValueError(f"the stack would hold {len(sizes)} layers: more than the {MAX_STACK_LAYERS} "
                         f"(MAX_STACK_LAYERS) a stack may have")
    pixels = sum(w * h for w, h in sizes) + len(sizes) * canvas[0] * canvas[1]
    if pixels > MAX_STACK_PIXELS:
        raise ValueError(f"the stack would hold {len(sizes)} layers of {pixels / 1e6:,.0f} megapixels with their copies "
                         f"on the {canvas[0]}x{canvas[1]} canvas: more than the {MAX_STACK_PIXELS / 1e6:,.0f} megapixels "
                         f"(MAX_STACK_PIXELS) a stack may have. Use fewer or smaller layers.")


def _header_size(source: Any, name: str, unreadable: str | None = None) -> tuple[int, int]:
    """An image's size from its header, no pixel decoded; ValueError (`unreadable`, if given) when it is no image."""
    try:
        with Image.open(source) as opened:
            return opened.size
    except Image.DecompressionBombError:  # Pillow's own guard: past twice its MAX_IMAGE_PIXELS
        raise ValueError(f"{name} is over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: more than the "
                         f"{MAX_INPUT_PIXELS:,} pixels (MAX_INPUT_PIXELS) a layer may have") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{unreadable or f'{name} is not a readable image'} ({type(err).__name__})") from None


def _open_layer(source: Any, name: str) -> Image.Image:
    """The pixels, RGBA, of an image whose size was checked (checked again here: the header is read again)."""
    try:
        with Image.open(source) as opened:
            _check_layer_pixels(opened.width, opened.height, name)
            opened.load()
            return opened.convert("RGBA")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name} is not a readable PNG ({type(err).__name__})") from err


def _zip_members(names: list[str]) -> list[str]:
    """The layers of a ZIP, bottom first: in its top-most folder holding PNGs (the studio may add the same layers
    resized under original_size/), layer_1.png ... layer_N.png by number; any other ZIP: its PNGs in natural order.
    composite.png is left out: it is the stack itself, not a layer."""
    names = [n for n in names if n.lower().endswith(".png") and not n.startswith("__MACOSX/")]
    if names:
        top = min((n.count("/"), str(Path(n).parent)) for n in names)[1]
        names = [n for n in names if str(Path(n).parent) == top]
    numbered = sorted((int(m.group(1)), n) for n in names if (m := ZIP_LAYER_NAME.search(Path(n).name)))
    if numbered:
        return [n for _, n in numbered]
    return sorted((n for n in names if Path(n).name.lower() != "composite.png"), key=_natural_key)


def _stack_canvas(below: list, first: tuple[int, int]) -> tuple[int, int]:
    """The canvas of a stack: its bottom layer's (a PSD's canvas, else its own size); `first` when it is empty."""
    if not below:
        return first
    return below[0].canvas or below[0].image.size


def _read_image_layers(path: Path, label: str, below: list) -> list[FileLayer]:
    size = _header_size(path, "the image", unreadable="not a readable PNG, ZIP or PSD")
    _check_layer_pixels(*size, "the image")
    check_stack([layer.image.size for layer in below] + [size], _stack_canvas(below, size))
    return [FileLayer(image=_open_layer(path, "the image"), name=path.stem, source=label)]


def _read_folder_layers(path: Path, label: str, below: list) -> list[FileLayer]:
    files = _layer_pngs(path)
    sizes = [_header_size(file, file.name) for file in files]
    for file, size in zip(files, sizes):
        _check_layer_pixels(*size, file.name)
    if files:
        check_stack([layer.image.size for layer in below] + sizes, _stack_canvas(below, sizes[0]))
    return [FileLayer(image=_open_layer(file, file.name), name=file.stem, source=f"{label}/{file.name}")
            for file in files]


def _read_zip_layers(path: Path, label: str, below: list) -> list[FileLayer]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = _zip_members(archive.namelist())
            if not members:
                raise ValueError("the ZIP holds no PNG layer (expected layer_1.png, layer_2.png, ...)")
            sizes = []
            for member in members:
                stored = archive.getinfo(member).file_size  # the ZIP's directory: nothing is decompressed yet
                if stored > MAX_LAYER_FILE_BYTES:
                    raise ValueError(f"{member} is {stored / 1e6:,.0f} MB uncompressed: more than the "
                                     f"{MAX_LAYER_FILE_BYTES / 1e6:,.0f} MB (MAX_LAYER_FILE_BYTES) a layer file may hold")
                with archive.open(member) as data:  # a stream: only the header is decompressed
                    sizes.append(_header_size(data, member))
                _check_layer_pixels(*sizes[-1], member)
            check_stack([layer.image.size for layer in below] + sizes, _stack_canvas(below, sizes[0]))
            layers = []
            for member in members:
                with archive.open(member) as data:
                    layers.append(FileLayer(image=_open_layer(data, member), name=Path(member).stem,
                                            source=f"{label}/{member}"))
            return layers
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as err:  # damaged, encrypted, unknown codec
        raise ValueError(f"not a readable ZIP ({type(err).__name__})") from None


def _read_psd_layers(path: Path, label: str, below: list) -> list[FileLayer]:
    """Every non-group layer of a PSD, bottom first, at its offset on the PSD's canvas, with its visibility and its
    opacity folded into alpha. Blend modes other than normal, masks and effects are not applied (the note says so)."""
    from psd_tools import PSDImage
    from psd_tools.constants import BlendMode

    try:
        psd = PSDImage.open(path)  # the header and the layer records; channel data stays compressed
    except Exception as err:  # psd-tools raises struct.error, EOFError, AssertionError, ... on a damaged file
        raise ValueError(f"not a readable PSD ({type(err).__name__}: {err})") from None
    _check_layer_pixels(psd.width, psd.height, "its canvas", "a canvas")
    records = [psd_layer for psd_layer in psd.descendants() if not psd_layer.is_group()]
    if not records:
        raise ValueError("the PSD has no layers (only a flat image): save it with layers")
    for record in records:
        _check_layer_pixels(record.width, record.height, f"its layer {record.name!r}")
    check_stack([layer.image.size for layer in below] + [(max(r.width, 1), max(r.height, 1)) for r in records],
                _stack_canvas(below, psd.size))
    layers = []
    for record in records:
        try:
            pixels = record.topil() if record.width and record.height else None
        except Exception as err:  # a damaged channel
            raise ValueError(f"not a readable PSD ({type(err).__name__}: {err})") from None
        # An empty layer (no pixels) stays in the stack, named, as a 1x1 transparent layer.
        image = pixels.convert("RGBA") if pixels is not None else Image.new("RGBA", (1, 1), (0, 0, 0, 0))
        if record.opacity < 255:  # layer opacity folded into alpha, as "over" applies it
            image.putalpha(image.getchannel("A").point(lambda a, o=record.opacity: round(a * o / 255)))
        ignored = []
        if record.blend_mode not in (BlendMode.NORMAL, BlendMode.PASS_THROUGH):
            ignored.append(f"blend mode {record.blend_mode.name.lower()} shown as normal")
        if record.has_mask():
            ignored.append("mask not applied")
        if record.has_effects():
            ignored.append("effects not applied")
        layers.append(FileLayer(image=image, name=record.name, source=label, left=record.left, top=record.top,
                                canvas=psd.size, visible=record.is_visible(), note="; ".join(ignored)))
    return layers


def read_file_layers(path: Path | str, below: list | tuple = (), label: str | None = None) -> list[FileLayer]:
    """The layers of one file, bottom first: a PSD (every pixel layer at its offset), a ZIP (the studio's, or any ZIP
    of PNGs), a folder of PNGs (natural order) or one image. `below`: the layers already stacked under them (anything
    with `.image` and `.canvas`), which count in the stack's limits; `label`: the file's name in messages (default its
    path).

    Sizes are checked before a pixel is decoded: each layer and a PSD's canvas at most MAX_INPUT_PIXELS, a ZIP member
    at most MAX_LAYER_FILE_BYTES, the whole stack within MAX_STACK_PIXELS and MAX_STACK_LAYERS. Every refusal is a
    ValueError that starts with `label` and names the limit.
    """
    path, below = Path(path), list(below)
    label = str(path) if label is None else label
    try:
        kind = not_a_file(path)  # a FIFO or a device is never opened
        if kind == "a folder":
            return _read_folder_layers(path, label, below)
        if kind is not None:
            raise ValueError("no such file" if kind == "missing" else f"it is {kind}, not a layer file")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        read = {PSD_MAGIC: _read_psd_layers, ZIP_MAGIC: _read_zip_layers}.get(magic, _read_image_layers)
        return read(path, label, below)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None


def read_layered_file(path: Path | str) -> list[Image.Image]:
    """Ground-truth (or predicted) layers, bottom first, all on one canvas, from a PSD (its visible layers placed at
    their offsets), the studio's ZIP or a folder of RGBA PNGs (`read_file_layers`, which checks every size first).

    Raises ValueError naming the file: not found, not layered (one image), fewer than 2 layers, unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: pass a PSD, the studio's ZIP or a folder of RGBA PNGs")
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(4) not in (PSD_MAGIC, ZIP_MAGIC):
                raise ValueError(f"{path} is one flat image, not a layered file: pass a PSD with layers, the studio's "
                                 f"ZIP or a folder of RGBA PNGs (bottom first)")
    layers = []
    for layer in read_file_layers(path):
        if not layer.visible:
            continue
        if layer.canvas is not None:  # a PSD layer: placed at its offset on the PSD's canvas
            canvas = Image.new("RGBA", layer.canvas, (0, 0, 0, 0))
            canvas.paste(layer.image, (layer.left, layer.top))
            layers.append(canvas)
        else:
            layers.append(layer.image)
    if len(layers) < MIN_GROUND_TRUTH_LAYERS:
        raise ValueError(f"{path} holds {len(layers)} layer(s): layered ground truth needs at least "
                         f"{MIN_GROUND_TRUTH_LAYERS}")
    for index, layer in enumerate(layers):
        if layer.size != layers[0].size:
            raise ValueError(f"{path}: layer {index + 1} is {layer.width}x{layer.height} but layer 1 is "
                             f"{layers[0].width}x{layers[0].height}: all layers must share one canvas")
    return layers


def find_ground_truth(paths: list[Path | str]) -> list[Path]:
    """What `evaluate` scores, in the order given: a file as it is (a bad one is reported, not dropped); a folder
    holding PNGs and no PSD/ZIP is one ground truth; any other folder gives its PSD and ZIP files and its
    sub-folders that hold PNGs, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        children = sorted(path.iterdir(), key=lambda p: _natural_key(p.name))
        layered = [p for p in children if p.is_file() and p.suffix.lower() in GROUND_TRUTH_SUFFIXES]
        if not layered and _layer_pngs(path):
            found.append(path)
            continue
        found += [p for p in children if not p.name.startswith(".") and
                  (p in layered or (p.is_dir() and _layer_pngs(p)))]
    return found
