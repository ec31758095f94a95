"""RGBA images and layer stacks: reading an input image defensively, checking sizes before decoding, stacking,
cropping, resizing, and reading layered files (PSD, the studio's ZIP, folders of PNGs). Pure Pillow and numpy: the
combine tool uses it without torch.
"""

import io
import re
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
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
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


# Layered files: ground truth for `evaluate`, predictions for `evaluate --pred`.
GROUND_TRUTH_SUFFIXES = (".psd", ".zip")  # layered files; a folder of PNGs is the third kind
MIN_GROUND_TRUTH_LAYERS = 2  # one layer is the picture itself, not a decomposition


def _natural_key(name: str) -> list:
    """layer_2 before layer_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _layer_pngs(folder: Path) -> list[Path]:
    """A folder's PNG layers, bottom first in natural order; composite.png is the stack, not a layer."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".png"
                   and p.name.lower() != "composite.png" and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _check_layer_pixels(width: int, height: int, name: str) -> None:
    """A layer may be any size the model could take (no minimum side: `--pred` layers are only scored)."""
    if width * height > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {width}x{height}: more than the {MAX_INPUT_PIXELS:,} pixels (MAX_INPUT_PIXELS) "
                         f"a layer may have")


def _open_layer(source: Any, name: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            _check_layer_pixels(opened.width, opened.height, name)
            opened.load()
            return opened.convert("RGBA")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name} is not a readable PNG ({err})") from err


def _read_psd_layers(path: Path) -> list[Image.Image]:
    """The visible pixel layers of a PSD, bottom first, each placed at its offset on the PSD's canvas with its
    opacity folded into alpha. Blend modes, masks and effects are not applied (the app's own PSDs have none)."""
    from psd_tools import PSDImage

    try:
        psd = PSDImage.open(path)
        _check_layer_pixels(psd.width, psd.height, str(path))
        layers = []
        for psd_layer in psd.descendants():
            if psd_layer.is_group() or not psd_layer.is_visible():
                continue
            canvas = Image.new("RGBA", psd.size, (0, 0, 0, 0))
            _check_layer_pixels(psd_layer.width, psd_layer.height, f"{path}: layer {psd_layer.name!r}")
            pixels = psd_layer.topil() if psd_layer.width and psd_layer.height else None
            if pixels is not None:
                pixels = pixels.convert("RGBA")
                if psd_layer.opacity < 255:
                    pixels.putalpha(pixels.getchannel("A").point(lambda a, o=psd_layer.opacity: round(a * o / 255)))
                canvas.paste(pixels, (psd_layer.left, psd_layer.top))
            layers.append(canvas)
    except ValueError:
        raise
    except Exception as err:  # psd-tools raises struct.error, EOFError, AssertionError, ... on a damaged file
        raise ValueError(f"{path} is not a readable PSD ({type(err).__name__}: {err})") from err
    return layers


def read_layered_file(path: Path | str) -> list[Image.Image]:
    """Ground-truth (or predicted) layers, bottom first, all on one canvas, from a PSD, the studio's ZIP
    (layer_1.png ... at its top-most folder holding PNGs; composite.png and original_size/ left out) or a folder
    of RGBA PNGs (natural order, bottom first; composite.png left out).

    Raises ValueError naming the file: not found, not layered (one image), fewer than 2 layers, unreadable.
    """
    path = Path(path)
    if path.is_dir():
        files = _layer_pngs(path)
        layers = [_open_layer(file, str(file)) for file in files]
    elif not path.is_file():
        raise ValueError(f"{path} does not exist: pass a PSD, the studio's ZIP or a folder of RGBA PNGs")
    else:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == b"8BPS":
            layers = _read_psd_layers(path)
        elif magic == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(path) as archive:
                    names = [n for n in archive.namelist() if n.lower().endswith(".png") and not n.startswith("__MACOSX/")]
                    if names:
                        top = min((n.count("/"), str(Path(n).parent)) for n in names)[1]
                        names = [n for n in names if str(Path(n).parent) == top and Path(n).name.lower() != "composite.png"]
                    names.sort(key=lambda n: _natural_key(Path(n).name))
                    if not names:
                        raise ValueError(f"{path}: the ZIP holds no PNG layer (expected layer_1.png, layer_2.png, ...)")
                    layers = []
                    for name in names:
                        with archive.open(name) as data:
                            layers.append(_open_layer(io.BytesIO(data.read()), f"{path}/{name}"))
            except zipfile.BadZipFile as err:
                raise ValueError(f"{path} is not a readable ZIP ({err})") from err
        else:
            raise ValueError(f"{path} is one flat image, not a layered file: pass a PSD with layers, the studio's "
                             f"ZIP or a folder of RGBA PNGs (bottom first)")
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
