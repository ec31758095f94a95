"""Layers a designer can use as they are (issue 26): text layers read back as text, empty and repeated layers
dropped, soft edges cleaned of the colour that was behind them.

Pure functions on RGBA layers (bottom first, one canvas, as everywhere in the studio) that return data or new
layers; the exporters, `save_run`, `evaluate` and the page decide what to do with it. No torch and no `app` here,
so every one of them (and the tools) can import this module:

    read_layer_text(layers)          -> [LayerText]  OCR on the CPU: each line's string, box, colour, font size;
                                                      `is_text` when the layer is nothing but its lines
    add_text_boxes(slide, lines, emu_per_px)         PPTX: an editable text box per line (`export_pptx(texts=)`
                                                      puts them above the layer's hidden picture)
    text_layer_names(names, texts)                   PSD: "Text: <string>" names (psd-tools 1.26 writes no type layer)
    text_params(texts)                               params.json's record of the text read
    text_cer(pred_layers, truth) / ground_truth_text(path)    `evaluate`: OCR of the predicted layers against
                                                      the strings the ground truth was drawn with
    tidy_layers(layers, report)      -> TidyResult   drop empty layers, merge a near-duplicate into the layer below
    decontaminate_edges(layer)                       "Clean edges": the layer's own colour carried into its soft edge
    fetch_ocr_model(model, models_dir)               a recognition model for a script the bundled one cannot read
    finish_layers(layers, ...)       -> Finished     all of the above after a decomposition, as its PARAMS ask

The OCR is RapidOCR (`rapidocr-onnxruntime`, Apache-2.0): PaddleOCR's PP-OCRv4 detector and Chinese/English
recogniser as ONNX files inside its wheel, run by onnxruntime on the CPU on Linux, Windows and macOS, offline.
Its recogniser's 6,623 characters hold no Hangul syllable, so Korean needs a second model (`KOREAN_OCR`), fetched
into models/ocr/ on first use the way the main weights are fetched.
"""

import dataclasses
import functools
import json
import logging
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.scores import layer_report

logger = logging.getLogger("qwen_layered_studio")

# ----------------------------------------------------------------------------------------------------
# 1. Constants (figures measured on assets/layered_gt scaled to a 640 px long side: bench/bench_text_layers.py)
# ----------------------------------------------------------------------------------------------------
# A line is kept when the recogniser is this sure: the designs' lines read at 0.99-1.00, while shapes taken for
# a character (a rounded card read as '口', a bar chart as '山') read at 0.64 and 0.78.
OCR_MIN_SCORE = 0.85
# ... and when its box is mostly empty (mean alpha in the box): glyphs fill 20-27 % of the designs' line boxes,
# the shapes misread as a character 42-49 %.
TEXT_MAX_INK = 0.40
# ... and when it holds a letter or a digit: a line chart's polyline reads as "//".
# The detector sees the layer at its own size up to this long side (RapidOCR's default instead scales the *short*
# side up to 736 px: a 640 x 320 layer became 1472 x 736, and reading the designs took 3.6x longer, same result).
OCR_DET_MAX_SIDE = 960
# ... and only the box of what the layer covers, this much wider each side: reading the designs' 52 layers took half
# the time, the same strings read; the shapes misread as a character were no longer read at all.
OCR_CROP_MARGIN_PX = 16
# A layer *is* text (and becomes text in the exports) when this share of its alpha lies inside its lines' boxes
# (1.00 for every text layer of the designs); with less, its lines are text inside a picture and stay pixels.
TEXT_LAYER_MIN_SHARE = 0.90
# ... and every line read at least this sure. A wrong text box is worse than a picture: the bundled model reads
# Korean as Chinese characters (밤 -> 品 at 0.988, 유리 -> 2 at 0.895), while the designs' English and Chinese lines
# read at 0.993-1.000 (bench/results/text_layers_cpu.json).
TEXT_LAYER_MIN_SCORE = 0.99
# A line's font size comes from the height of its ink (rows of the box where alpha > 0.5) and what its characters
# reach in Arial, the font its PPTX text box is given (Arial on Windows and macOS, the metric-compatible Liberation
# Sans on Linux; Pillow's default font, which drew the designs, has the same widths within 7 %): capitals, digits and
# ascenders reach CAP_HEIGHT_EM above the baseline, lowercase alone X_HEIGHT_EM, descenders DESCENDER_EM below it.
# Han, kana and Hangul reach CJK_ABOVE_EM and CJK_BELOW_EM. (The detector's box height alone was 0.82-1.13 em.)
CAP_HEIGHT_EM = 0.72
X_HEIGHT_EM = 0.52
DESCENDER_EM = 0.21
CJK_ABOVE_EM, CJK_BELOW_EM = 0.77, 0.11
ASCENDERS = set("bdfhijklt!?%&@#$/|()[]{}'\"")  # lowercase and signs that reach the capitals' height (i's dot too)
DESCENDERS = set("gjpqy,;")
TEXT_FONT = "Arial"
# From the top of a text box (no inset) to its first baseline: measured 1.01-1.02 em in LibreOffice 7.4 (Liberation
# Sans, single spacing; Arial's ascent alone is 0.905 em); PowerPoint not measured.
FIRST_BASELINE_EM = 1.015
TEXT_BOX_LINE_EM = 1.25  # a one-line box's height: room for the descenders below that baseline
# A line's colour and opacity: the medians over its glyphs' core, the pixels whose alpha is at least this share of
# the box's highest (the anti-aliased rim carries what was behind; resampling overshoots the highest alpha: text
# drawn at 86 % opacity reaches 100 % after a Lanczos upscale, while its core's median stays at 88 %).
LINE_CORE_ALPHA_SHARE = 0.75
# A core this opaque is opaque text (thin strokes of opaque text give medians of 0.97-1.00 on the designs).
OPAQUE_TEXT = 0.95
# The OCR sees the layer flattened on black when its visible colour is light, on white when dark: white text
# on a white page reads as nothing.
OCR_LIGHT_LUMA = 0.5
# A PSD layer name holds at most 255 characters; a long line is cut well before.
TEXT_NAME_MAX_CHARS = 100
EMU_PER_POINT = 12700  # python-pptx: 914400 EMU per inch, 72 points per inch
# "Clean edges": pixels at or above this alpha carry the layer's own colour; those between 0 and it are the edge.
EDGE_OPAQUE_ALPHA = 254
# ... and their colour is taken from opaque pixels this many pixels inside: a Lanczos upscale (the app's
# resize_layers) overshoots the colour of the 2-4 opaque pixels next to an edge.
EDGE_INTERIOR_DEPTH = 3
EDGE_INTERIOR_REACH = 12  # rings grown from that interior (edges are 2-6 px wide at 640 px); further, local opaque colour
OCR_MODELS_DIR_NAME = "ocr"  # under models/, beside the pipeline's weights; never committed


# ----------------------------------------------------------------------------------------------------
# 2. OCR models: the bundled one, and the ones fetched on first use
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OcrModel:
    """A text recogniser for some scripts; `repo_id` None means the one inside the rapidocr wheel."""

    languages: tuple[str, ...]  # what `read_layer_text(language=...)` accepts for it
    repo_id: str | None  # the hub repo it is fetched from on first use
    filename: str | None  # the ONNX file in that repo, and under models/ocr/
    keys_filename: str | None  # its character list, needed when the ONNX file does not carry one in its metadata
    download_size: str  # for messages
    rec_img_shape: tuple[int, int, int] = (3, 48, 320)  # the line image it was trained on (PP-OCRv3/v4: 48 px high)


BUNDLED_OCR = OcrModel(("en", "zh"), None, None, None, "bundled in rapidocr-onnxruntime (15 MB)")
# PaddleOCR's Korean recogniser converted to ONNX by RapidOCR's authors (Apache-2.0), on the hub. Not fetched here
# (no network on this machine): whether the file carries its character list is not verified, so PaddleOCR's
# korean_dict.txt is looked for beside it when it does not, and the message says where to put it.
KOREAN_OCR = OcrModel(("ko",), "SWHL/RapidOCR", "PP-OCRv1/korean_mobile_v2.0_rec_infer.onnx", "korean_dict.txt",
                      "3.3 MB", rec_img_shape=(3, 32, 320))  # PaddleOCR 2.0's multilingual models read 32 px lines
OCR_MODELS = (BUNDLED_OCR, KOREAN_OCR)


class OcrModelNotAvailableError(FileNotFoundError):
    """A recognition model that is neither under models/ocr/ nor downloadable now; the message says what to do.
    A FileNotFoundError, so the app's user-error handling (OSError: message, exit 2, gr.Error) shows it."""


def ocr_model(language: str) -> OcrModel:
    for model in OCR_MODELS:
        if language in model.languages:
            return model
    known = sorted(code for model in OCR_MODELS for code in model.languages)
    raise ValueError(f"language={language!r} has no OCR model here: use one of {known}")


def ocr_offline_message(model: OcrModel, models_dir: Path | str) -> str:
    local = Path(models_dir) / OCR_MODELS_DIR_NAME / model.filename
    return "\n".join([
        f"Text in {'/'.join(model.languages)} needs the recognition model {Path(model.filename).name} "
        f"({model.download_size}) from the Hugging Face hub ({model.repo_id}), which could not be reached.",
        f"  Put the file at: {local}",
        "  or run once with network access so it downloads there.",
        "  Until then, text layers in that language stay pictures (the other exports are not affected)."])


def fetch_ocr_model(model: OcrModel, models_dir: Path | str, offline: bool = False) -> Path:
    """The model's ONNX file under `models_dir`/ocr/, downloaded from the hub on first use (`offline`: never).

    Raises OcrModelNotAvailableError with `ocr_offline_message` when it is not there and cannot be fetched.
    """
    local = Path(models_dir) / OCR_MODELS_DIR_NAME / model.filename
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("No %s in %s: downloading it from %s (%s)", Path(model.filename).name, local.parent, model.repo_id,
                model.download_size)
    try:
        return Path(hf_hub_download(model.repo_id, model.filename, local_dir=Path(models_dir) / OCR_MODELS_DIR_NAME,
                                    local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise OcrModelNotAvailableError(ocr_offline_message(model, models_dir) +
                                        f"\n  (hub error: {type(err).__name__})") from err


def _carries_characters(onnx_file: Path) -> bool:
    """PaddleOCR models converted by RapidOCR keep their character list in the ONNX metadata ("character")."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return "character" in session.get_modelmeta().custom_metadata_map


@functools.lru_cache(maxsize=4)
def ocr_engine(language: str = "en", models_dir: str | None = None):
    """The RapidOCR engine for `language`, created on first use and cached (rembg's way with its sessions)."""
    from rapidocr_onnxruntime import RapidOCR

    model = ocr_model(language)
    if model.repo_id is None:
        return RapidOCR(det_limit_side_len=OCR_DET_MAX_SIDE, det_limit_type="max")
    if models_dir is None:
        raise ValueError(f"language={language!r} needs a models folder to fetch {model.filename} into: pass models_dir")
    recogniser = fetch_ocr_model(model, models_dir)
    options = dict(rec_model_path=str(recogniser), rec_img_shape=list(model.rec_img_shape),
                   det_limit_side_len=OCR_DET_MAX_SIDE, det_limit_type="max")
    if not _carries_characters(recogniser):
        keys = recogniser.with_name(model.keys_filename)
        if not keys.is_file():
            raise OcrModelNotAvailableError(
                f"{recogniser} carries no character list: put PaddleOCR's {model.keys_filename} "
                f"(ppocr/utils/dict/{model.keys_filename} in PaddleOCR's repository) at {keys}")
        options["rec_keys_path"] = str(keys)
    return RapidOCR(**options)


# ----------------------------------------------------------------------------------------------------
# 3. Reading text layers
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextLine:
    """One line of text read from a layer, in the layer's pixels."""

    text: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive), axis-aligned around the detector's box
    score: float  # the recogniser's confidence, 0..1
    colour: tuple[int, int, int]  # sRGB of the glyphs
    opacity: float  # 0..1: the glyphs' alpha (a layer drawn at 86 % opacity gives 0.86)
    font_px: float  # the font's size (em) in pixels (`ink_em`)
    ink_left: int  # the first column with ink: where the text starts
    baseline: float  # the y of the text's baseline

    def scaled(self, x: float, y: float) -> "TextLine":
        """The line on a canvas `x` times as wide and `y` times as high (the exports at the input's original size;
        the font follows the height)."""
        left, top, right, bottom = self.box
        box = (round(left * x), round(top * y), round(right * x), round(bottom * y))
        return dataclasses.replace(self, box=box, font_px=self.font_px * y, ink_left=round(self.ink_left * x),
                                   baseline=self.baseline * y)

    def as_params(self) -> dict[str, Any]:
        return dict(text=self.text, box=list(self.box), score=round(self.score, 4), colour=list(self.colour),
                    opacity=round(self.opacity, 4), font_px=round(self.font_px, 1), ink_left=self.ink_left,
                    baseline=round(self.baseline, 1))


@dataclasses.dataclass(frozen=True)
class LayerText:
    """What the OCR found in one layer: its lines (top to bottom) and the share of its alpha they cover."""

    lines: tuple[TextLine, ...]
    share: float  # of the layer's alpha inside the lines' boxes, 0..1

    @property
    def is_text(self) -> bool:
        """The layer is its text: the exports may replace its picture by text boxes."""
        return (bool(self.lines) and self.share >= TEXT_LAYER_MIN_SHARE
                and min(line.score for line in self.lines) >= TEXT_LAYER_MIN_SCORE)

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def scaled(self, x: float, y: float) -> "LayerText":
        return LayerText(tuple(line.scaled(x, y) for line in self.lines), self.share)


def flatten_for_ocr(layer: Image.Image) -> Image.Image:
    """The layer over black when its visible colour is light, over white when dark (the OCR reads RGB)."""
    rgba = np.asarray(layer.convert("RGBA"), dtype=np.float64) / 255.0
    alpha = rgba[..., 3]
    weight = float(alpha.sum())
    mean = (rgba[..., :3] * alpha[..., None]).sum((0, 1)) / weight if weight > 0 else np.zeros(3)
    luma = float(mean @ [0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's "L"
    background = (0, 0, 0, 255) if luma > OCR_LIGHT_LUMA else (255, 255, 255, 255)
    return Image.alpha_composite(Image.new("RGBA", layer.size, background), layer.convert("RGBA")).convert("RGB")


def line_colour(pixels: np.ndarray) -> tuple[tuple[int, int, int], float]:
    """The colour and opacity (0..1) of the glyphs in a box of straight RGBA uint8 pixels (LINE_CORE_ALPHA_SHARE)."""
    alpha = pixels[..., 3]
    if not alpha.any():
        return (0, 0, 0), 0.0
    core = pixels[alpha >= LINE_CORE_ALPHA_SHARE * int(alpha.max())]
    colour = tuple(int(v) for v in np.median(core[:, :3], axis=0).round())
    opacity = float(np.median(core[:, 3])) / 255.0
    return colour, 1.0 if opacity >= OPAQUE_TEXT else opacity


def ink_em(text: str) -> tuple[float, float]:
    """How far `text`'s glyphs reach above and below the baseline, in em (Arial's proportions; see CAP_HEIGHT_EM)."""
    if not any(c.isascii() and c.isalnum() for c in text):
        return CJK_ABOVE_EM, CJK_BELOW_EM
    tall = any(c.isupper() or c.isdigit() or c in ASCENDERS for c in text)
    return (CAP_HEIGHT_EM if tall else X_HEIGHT_EM), (DESCENDER_EM if any(c in DESCENDERS for c in text) else 0.0)


def read_text_lines(layer: Image.Image, engine) -> tuple[list[TextLine], float]:
    """The lines `engine` (a RapidOCR) reads in one layer that pass OCR_MIN_SCORE and TEXT_MAX_INK and hold a letter
    or a digit, top to bottom, and the share of the layer's alpha inside their boxes."""
    rgba = np.asarray(layer.convert("RGBA"))
    alpha = rgba[..., 3].astype(np.float64) / 255.0
    total = float(alpha.sum())
    if total == 0:
        return [], 0.0
    # The detector sees what the layer covers (+ OCR_CROP_MARGIN_PX), not its empty canvas: 2x faster on the designs.
    height, width = alpha.shape
    box = layer.getbbox(alpha_only=True)
    crop = (max(box[0] - OCR_CROP_MARGIN_PX, 0), max(box[1] - OCR_CROP_MARGIN_PX, 0),
            min(box[2] + OCR_CROP_MARGIN_PX, width), min(box[3] + OCR_CROP_MARGIN_PX, height))
    found, _ = engine(flatten_for_ocr(layer.crop(crop)))
    lines, inside = [], np.zeros(alpha.shape, bool)
    for quad, text, score in found or []:
        quad = np.asarray(quad, dtype=np.float64) + crop[:2]
        left, top = (int(v) for v in np.floor(quad.min(0)).clip(0))
        right, bottom = int(min(np.ceil(quad[:, 0].max()), width)), int(min(np.ceil(quad[:, 1].max()), height))
        text = unicodedata.normalize("NFC", text).strip()
        if right <= left or bottom <= top or float(score) < OCR_MIN_SCORE:
            continue
        if not any(unicodedata.category(c)[0] in "LN" for c in text):
            continue
        if alpha[top:bottom, left:right].mean() > TEXT_MAX_INK:
            continue
        colour, opacity = line_colour(rgba[top:bottom, left:right])
        inked = alpha[top:bottom, left:right] > 0.5 * opacity
        rows, columns = np.flatnonzero(inked.any(1)), np.flatnonzero(inked.any(0))
        if not rows.size:
            continue
        above, below = ink_em(text)
        font_px = (rows[-1] + 1 - rows[0]) / (above + below)
        lines.append(TextLine(text, (left, top, right, bottom), float(score), colour, opacity, font_px,
                              left + int(columns[0]), top + rows[0] + above * font_px))
        inside[top:bottom, left:right] = True
    lines.sort(key=lambda line: (line.box[1], line.box[0]))
    return lines, float(alpha[inside].sum() / total)


def read_layer_text(layers: list[Image.Image], language: str = "en", models_dir: Path | str | None = None,
                    engine=None) -> list[LayerText]:
    """OCR of every layer (bottom first): its lines and whether it is a text layer (`LayerText.is_text`).

    `language`: "en" or "zh" (the bundled model reads both, mixed) or "ko" (Korean: fetched into `models_dir`/ocr/ on
    first use; OcrModelNotAvailableError offline). 0.14-0.39 s a layer at 640 px on 2 CPU cores (text or not).
    """
    engine = engine or ocr_engine(language, None if models_dir is None else str(models_dir))
    texts = []
    for layer in layers:
        lines, share = read_text_lines(layer, engine)
        texts.append(LayerText(tuple(lines), share))
    return texts


# ----------------------------------------------------------------------------------------------------
# 4. Text into the exports: PPTX text boxes, PSD names, params.json
# ----------------------------------------------------------------------------------------------------
def hide_shape(shape) -> None:
    """Hide a python-pptx shape (`hidden="1"` on its cNvPr): it stays in the file and in the Selection Pane."""
    shape._element._nvXxPr.cNvPr.set("hidden", "1")


def add_text_boxes(slide, lines: list[TextLine] | tuple[TextLine, ...], emu_per_px: int, name: str = "Text") -> list:
    """An editable text box for each line on a python-pptx `slide`, at the line's place and size, on top of what the
    slide holds (`export_pptx` adds them right after the layer's picture, so the layers above still cover them).

    `emu_per_px`: the slide's whole EMUs per pixel (export_pptx's). Each box has no insets, no wrap and no autofit;
    it starts at the line's ink and puts the text's baseline where the picture's was, in the line's colour (and
    opacity), size and TEXT_FONT (the glyphs' own font is not recognised).
    """
    from lxml import etree
    from pptx.dml.color import RGBColor
    from pptx.enum.text import MSO_ANCHOR, MSO_AUTO_SIZE
    from pptx.oxml.ns import qn
    from pptx.util import Emu, Pt

    shapes = []
    for line in lines:
        top = line.baseline - FIRST_BASELINE_EM * line.font_px
        width = line.box[2] - line.ink_left
        box = slide.shapes.add_textbox(Emu(line.ink_left * emu_per_px), Emu(round(top * emu_per_px)),
                                       Emu(width * emu_per_px), Emu(round(TEXT_BOX_LINE_EM * line.font_px * emu_per_px)))
        box.name = f"{name}: {line.text}"
        frame = box.text_frame
        frame.word_wrap, frame.auto_size, frame.vertical_anchor = False, MSO_AUTO_SIZE.NONE, MSO_ANCHOR.TOP
        frame.margin_left = frame.margin_right = frame.margin_top = frame.margin_bottom = 0
        run = frame.paragraphs[0].add_run()
        run.text = line.text
        run.font.size = Pt(round(line.font_px * emu_per_px / EMU_PER_POINT, 1))
        run.font.name = TEXT_FONT
        run.font.color.rgb = RGBColor(*line.colour)
        if line.opacity < 1.0:  # DrawingML alpha in 1/1000 %; python-pptx has no setter for it
            colour = run.font.color._color._xClr  # the <a:srgbClr> just written
            etree.SubElement(colour, qn("a:alpha")).set("val", str(round(line.opacity * 100000)))
        shapes.append(box)
    return shapes


def text_layer_names(names: list[str], texts: list[LayerText | None]) -> list[str]:
    """PSD layer names: `Text: <its lines, " / " between>` for a text layer, the given name otherwise (also for a
    layer not read: None).

    psd-tools 1.26 reads type layers but cannot make one (its TypeLayer is read-only: no constructor, and a
    type layer's TySh block needs Photoshop's EngineData of fonts and style runs, which nothing here could check),
    so a text layer stays pixels, named by its text; the strings go to params.json (`text_params`).
    """
    named = []
    for name, text in zip(names, texts):
        if text is not None and text.is_text:
            words = " / ".join(line.text for line in text.lines)
            name = "Text: " + (words if len(words) <= TEXT_NAME_MAX_CHARS else words[:TEXT_NAME_MAX_CHARS - 1] + "…")
        named.append(name)
    return named


def text_params(texts: list[LayerText | None]) -> list[dict[str, Any]]:
    """params.json's "text": per layer that has lines (1 = bottom), whether it is a text layer and its lines."""
    return [dict(layer=index + 1, is_text=text.is_text, share=round(text.share, 4),
                 lines=[line.as_params() for line in text.lines])
            for index, text in enumerate(texts) if text is not None and text.lines]


# ----------------------------------------------------------------------------------------------------
# 5. Text scores for `evaluate`
# ----------------------------------------------------------------------------------------------------
TEXT_TRUTH_FILE = "text_layers.json"  # beside the ground-truth PSDs: design -> its drawn lines (assets/make_layered_gt.py)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions of characters from a to b."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ground_truth_text(path: Path | str) -> list[str] | None:
    """The strings drawn into a ground-truth design (its TEXT_TRUTH_FILE entry); [] for a design without text,
    None when its folder has no TEXT_TRUTH_FILE (no text ground truth: `evaluate` leaves text_cer out)."""
    path = Path(path)
    table = path.parent / TEXT_TRUTH_FILE
    if not table.is_file():
        return None
    return [line["text"] for line in json.loads(table.read_text(encoding="utf-8")).get(path.stem, [])]


def text_cer(pred_layers: list[Image.Image], truth: list[str], engine=None, ignore_spaces: bool = False,
             texts: list[LayerText] | None = None) -> dict[str, Any]:
    """Character error rate of the text read in the predicted layers against the ground truth's strings.

    Every line read in any predicted layer may match (a model may leave a title on its card's layer); each truth
    string takes the unused read line nearest to it (edit distance), longest strings first, and one not read at
    all counts all its characters wrong. `cer` = errors / truth characters (0 = perfect; lines read beyond the
    truth are listed in `extra`, not counted). `ignore_spaces`: compare without spaces (the recogniser often drops
    the space in "SALE -40%"). Pass `texts` (read_layer_text's) to reuse an OCR already made.
    """
    texts = texts if texts is not None else read_layer_text(pred_layers, engine=engine)
    reads = [line.text for text in texts if text is not None for line in text.lines]
    clean = (lambda s: s.replace(" ", "")) if ignore_spaces else (lambda s: s)
    rows, used = {}, set()
    for index in sorted(range(len(truth)), key=lambda i: -len(truth[i])):
        want = clean(truth[index])
        scored = [(edit_distance(want, clean(read)), j) for j, read in enumerate(reads) if j not in used]
        errors, best = min(scored) if scored else (len(want), None)
        if best is not None and errors >= len(want):
            errors, best = len(want), None  # nothing read resembles it: missed, not matched to a stranger
        if best is not None:
            used.add(best)
        rows[index] = dict(truth=truth[index], read=None if best is None else reads[best], errors=errors,
                           chars=len(want))
    lines = [rows[index] for index in range(len(truth))]
    chars = sum(row["chars"] for row in lines)
    errors = sum(row["errors"] for row in lines)
    return dict(cer=errors / chars if chars else 0.0, errors=errors, chars=chars, lines=lines,
                extra=[read for j, read in enumerate(reads) if j not in used],
                text_layers=sum(text is not None and text.is_text for text in texts))


# ----------------------------------------------------------------------------------------------------
# 6. No empty or repeated layers
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TidyResult:
    """What `tidy_layers` kept and why; `summary()` is the gallery's line, `as_params()` params.json's record."""

    layers: list[Image.Image]  # the layers kept, bottom first
    kept: list[int]  # their numbers among the layers asked (1 = bottom)
    dropped: list[dict[str, Any]]  # {"layer": n, "coverage": c}: empty
    merged: list[dict[str, Any]]  # {"layer": n, "into": m}: stacked onto the near-duplicate layer below it
    asked: int

    def summary(self) -> str:
        """E.g. "4 layers asked, 3 kept (1 empty)"."""
        reasons = [f"{len(self.dropped)} empty"] * bool(self.dropped)
        reasons += [f"{len(self.merged)} merged into a near-duplicate below"] * bool(self.merged)
        return f"{self.asked} layers asked, {len(self.layers)} kept" + (f" ({', '.join(reasons)})" if reasons else "")

    def as_params(self) -> dict[str, Any]:
        return dict(asked=self.asked, kept=self.kept, dropped=self.dropped, merged=self.merged)


def tidy_layers(layers: list[Image.Image], report: list[dict[str, Any]] | None = None,
                min_coverage: float | None = None, merge_duplicates: bool = True) -> TidyResult:
    """Drop the empty layers and merge each near-duplicate into the layer below it, before export.

    `report` is `studio.scores.layer_report(layers)` (one owner for coverage and near-duplicates; made here when
    not given): a layer is dropped
    when its `empty` flag is set, or, with `min_coverage`, when its coverage (mean alpha) is under it. A layer whose
    `duplicate_of` is the kept layer right below it is stacked onto that one ("over": the composite is unchanged,
    up to rounding). A duplicate of a lower layer with others between stays: moving it down would put those others
    on top of it. At least one layer is always kept (the most covering one), since exports need a canvas.
    """
    report = layer_report(layers) if report is None else report
    if len(report) != len(layers):
        raise ValueError(f"{len(report)} report rows for {len(layers)} layers: pass layer_report(layers)")
    empty = [row["empty"] if min_coverage is None else row["coverage"] < min_coverage for row in report]
    if all(empty):
        best = max(range(len(layers)), key=lambda i: report[i]["coverage"])
        empty = [i != best for i in range(len(layers))]
    kept_layers: list[Image.Image] = []
    kept: list[int] = []
    dropped, merged = [], []
    for index, (layer, row) in enumerate(zip(layers, report)):
        number = index + 1
        if empty[index]:
            dropped.append(dict(layer=number, coverage=row["coverage"]))
        elif merge_duplicates and kept and row["duplicate_of"] == kept[-1]:
            kept_layers[-1] = Image.alpha_composite(kept_layers[-1].convert("RGBA"), layer.convert("RGBA"))
            merged.append(dict(layer=number, into=kept[-1]))
        else:
            kept_layers.append(layer)
            kept.append(number)
    return TidyResult(kept_layers, kept, dropped, merged, len(layers))


# ----------------------------------------------------------------------------------------------------
# 7. Clean edges
# ----------------------------------------------------------------------------------------------------
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _neighbour_sum(values: np.ndarray) -> np.ndarray:
    """For every pixel, the sum of `values` over its 8 neighbours (zero outside the image)."""
    height, width = values.shape[:2]
    padded = np.pad(values, ((1, 1), (1, 1)) + ((0, 0),) * (values.ndim - 2))
    total = np.zeros(values.shape)
    for dy, dx in _NEIGHBOURS:
        total += padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
    return total


def _grow_colour(seeds: np.ndarray, reach: np.ndarray, colour: np.ndarray, rings: int | None = None) -> np.ndarray:
    """Carry the seeds' colours into `reach` ring by ring, at most `rings` rings (in place on `colour`); returns
    the pixels given one."""
    known, grown = seeds.copy(), 0
    while rings is None or grown < rings:
        counts, sums = _neighbour_sum(known), _neighbour_sum(colour * known[..., None])
        ring = reach & ~known & (counts > 0)
        if not ring.any():
            break
        colour[ring] = sums[ring] / counts[ring][:, None]
        known |= ring
        grown += 1
    return known & ~seeds


def decontaminate_edges(layer: Image.Image, opaque_alpha: int = EDGE_OPAQUE_ALPHA,
                        depth: int = EDGE_INTERIOR_DEPTH) -> Image.Image:
    """The layer with the colour of every semi-transparent pixel (0 < alpha < `opaque_alpha`) replaced by its own
    colour carried out from its opaque interior: image editors' "decontaminate colours".

    Why: a model (or a matting) returns edge pixels whose colour is partly what was behind them; over another
    background that colour shows as a halo. Alpha is kept; opaque and fully transparent pixels are not touched.
    How: from the opaque pixels at least `depth` pixels inside (resampling rings: a Lanczos upscale brightens the
    opaque pixels next to an edge), colour grows one ring of pixels at a time through the layer's visible pixels,
    each new pixel taking the mean colour of its already-coloured neighbours (8-connected): a discrete
    nearest-interior-pixel fill. Parts too thin to have such a depth (text strokes) start from their opaque pixels.
    Semi-transparent pixels with no opaque pixel connected to them (a soft shadow has none) keep their colour.
    """
    rgba = np.array(layer.convert("RGBA"))
    alpha = rgba[..., 3]
    box = Image.fromarray(alpha).getbbox()
    if box is None:
        return Image.fromarray(rgba, "RGBA")
    # 1. Work on the visible pixels' box, one pixel wider so that shifted neighbours stay inside.
    left, top, right, bottom = max(box[0] - 1, 0), max(box[1] - 1, 0), box[2] + 1, box[3] + 1
    crop_alpha = alpha[top:bottom, left:right]
    opaque, visible = crop_alpha >= opaque_alpha, crop_alpha > 0
    edge = visible & ~opaque
    if not opaque.any() or not edge.any():
        return Image.fromarray(rgba, "RGBA")
    colour = rgba[top:bottom, left:right, :3].astype(np.float64)
    # 2. The interior: the opaque pixels `depth` rings inside (an erosion, one 3x3 minimum per ring).
    interior = opaque
    for _ in range(depth):
        interior = interior & (_neighbour_sum(interior) == len(_NEIGHBOURS))
    # 3. Grow colour from the interior over the visible pixels near it; then from all opaque pixels into the edge
    #    pixels it did not reach (thin parts, and the tips of a star, which the interior is too far from).
    filled = np.zeros_like(edge)
    if interior.any():
        filled = _grow_colour(interior, visible, colour, rings=EDGE_INTERIOR_REACH) & edge
    missed = edge & ~filled
    if missed.any():
        thin = colour.copy()
        reached = _grow_colour(opaque, missed, thin)
        colour[reached] = thin[reached]
        filled |= reached
    # 4. Write the edge's new colour; alpha, the opaque and the transparent pixels stay as they were.
    rgba[top:bottom, left:right, :3][filled] = np.clip(colour[filled].round(), 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def decontaminate_layers(layers: list[Image.Image], opaque_alpha: int = EDGE_OPAQUE_ALPHA) -> list[Image.Image]:
    """`decontaminate_edges` on each layer (the "Clean edges" export option)."""
    return [decontaminate_edges(layer, opaque_alpha) for layer in layers]


# ----------------------------------------------------------------------------------------------------
# 8. After a decomposition: what its PARAMS rows tidy_layers, clean_edges, text_layers and name_layers ask
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Finished:
    """The layers as they are exported and what was learnt about them, per layer (bottom first)."""

    layers: list[Image.Image]
    texts: list[LayerText] | None  # what the OCR read in each layer (text_layers), else None
    names: list[str | None] | None  # each layer's name from `name` (name_layers; None: no name), else None
    record: dict[str, Any]  # for params.json: tidy, text, layer_names, design_seconds
    notes: list[str]  # for the user: what could not be done (the Korean OCR model offline)


def finish_layers(layers: list[Image.Image], tidy: bool = True, clean_edges: bool = False, text_layers: bool = False,
                  language: str = "en", models_dir: Path | str | None = None,
                  name: Callable[[list[Image.Image]], list[str | None]] | None = None) -> Finished:
    """The layers a designer gets instead of the model's own, in this order: empty layers dropped and near-duplicates
    merged (`tidy_layers`), soft edges cleaned (`decontaminate_layers`), text read (`read_layer_text`), each layer
    named by `name` (the app's: the text encoder, under the pipeline's lock). Each step's seconds are recorded.

    An OCR model that cannot be had (Korean, offline) does not fail the run: the text stays pixels and the message
    is a note for the user.
    """
    record: dict[str, Any] = dict(tidy=None, text=None, layer_names=None)
    seconds: dict[str, float] = {}
    texts, names, notes = None, None, []
    started = time.perf_counter()
    if tidy:
        tidied = tidy_layers(layers)
        layers = tidied.layers
        record["tidy"] = dict(tidied.as_params(), summary=tidied.summary())
        seconds["tidy"] = time.perf_counter() - started
    if clean_edges:
        started = time.perf_counter()
        layers = decontaminate_layers(layers)
        seconds["clean_edges"] = time.perf_counter() - started
    if text_layers:
        started = time.perf_counter()
        try:
            texts = read_layer_text(layers, language, models_dir)
            record["text"] = text_params(texts)
        except OcrModelNotAvailableError as err:
            logger.warning("%s", err)
            notes.append(str(err))
        seconds["ocr"] = time.perf_counter() - started
    if name is not None:
        started = time.perf_counter()
        names = name(layers)
        record["layer_names"] = names
        seconds["naming"] = time.perf_counter() - started
    record["design_seconds"] = {step: round(value, 3) for step, value in seconds.items()}
    return Finished(layers, texts, names, record, notes)
