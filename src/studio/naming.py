"""What each layer is called (issue 26): names written by the pipeline's own Qwen2.5-VL (opt-in: "red circle" instead
of "Layer 2"), and `LayerLabels`, the one owner of a layer's name in the gallery, the PSD, the PPTX and its file.

The text encoder that captions the input is a vision-language model already in memory, so naming a layer costs no
new weights: it is shown the layer alone (cropped to what it covers, over grey) and asked for a 2-6 word name,
decoded greedily for at most LAYER_NAME_MAX_NEW_TOKENS tokens, the way diffusers' `get_image_caption` captions.
The name is cleaned so that it already is what the app's `safe_file_text` keeps (letters, digits and marks of any
script, single spaces), which makes `layer_2_red-circle.png` and the PSD/PPTX/gallery names one text. An empty
answer is no name: the layer keeps "Layer N".

torch is imported inside `name_layers` only: importing this module loads nothing.
"""

import dataclasses
import re
import time
import unicodedata

from PIL import Image

from studio.design import LayerText, text_layer_names
from studio.images import layer_names

# ----------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------
LAYER_NAME_MAX_NEW_TOKENS = 8  # a 2-6 word name is 2-8 tokens; greedy decoding stops at the first <|im_end|>
LAYER_NAME_MAX_WORDS = 6
LAYER_NAME_MAX_BYTES = 60  # the app's FILE_NAME_TEXT_MAX_BYTES: the name goes into file names whole
# The layer is shown cropped to its alpha bounding box plus this margin, no larger than this on its long side:
# ~256 vision tokens on the real processor (28 px a token), where the full canvas at 1024 px would be ~1,300.
LAYER_NAME_MARGIN_PX = 8
LAYER_NAME_IMAGE_SIDE = 448
LAYER_NAME_BACKGROUND = (128, 128, 128)  # mid grey: white and black objects both stand out
# Qwen2.5-VL's chat template with one image, as the pipeline's caption prompt writes it.
LAYER_NAME_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>This is one layer of a graphic design, shown on a grey background. "
    "Name what it shows in 2 to 6 words, such as \"red circle\", \"title text\" or \"sky background\". "
    "Answer with the name only.<|im_end|>\n<|im_start|>assistant\n")


def fallback_name(index: int) -> str:
    """The name of layer `index` (0 = bottom) when the model gives none: "Layer 1", "Layer 2", ..."""
    return f"Layer {index + 1}"


def clean_layer_name(text: str, max_words: int = LAYER_NAME_MAX_WORDS, max_bytes: int = LAYER_NAME_MAX_BYTES) -> str:
    """The model's answer as a layer name: its first line, NFC, every run of characters that are not letters,
    digits or marks (punctuation, quotes, emoji, U+FFFD) made one space, at most `max_words` words and `max_bytes`
    bytes of UTF-8 (whole words; one longer word is cut on a character boundary). "" when nothing is left.

    The result is a fixed point of the app's `safe_file_text` but for spaces (which it writes "-").
    """
    text = unicodedata.normalize("NFC", text or "").strip().split("\n", 1)[0]
    kept = "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text)
    words = re.sub(r"\s+", " ", kept).strip().split(" ")[:max_words]
    name = ""
    for word in words:
        longer = f"{name} {word}" if name else word
        if len(longer.encode("utf-8")) > max_bytes:
            if not name:
                name = word.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            break
        name = longer
    # A word cut inside a combining sequence may end on a bare mark; NFC again keeps it one character.
    return unicodedata.normalize("NFC", name).strip()


def named_layer_file(index: int, name: str) -> str:
    """The ZIP's / run folder's file of a named layer: `layer_2_red-circle.png`; `layer_2.png` for "Layer 2"."""
    if not name or name == fallback_name(index):
        return f"layer_{index + 1}.png"
    return f"layer_{index + 1}_{name.replace(' ', '-')}.png"


def layer_name_image(layer: Image.Image) -> Image.Image | None:
    """What the model is shown: the layer cropped to its alpha box (+ margin), over grey, long side at most
    LAYER_NAME_IMAGE_SIDE. None for a fully transparent layer (nothing to name)."""
    layer = layer.convert("RGBA")
    box = layer.getbbox(alpha_only=True)
    if box is None:
        return None
    m = LAYER_NAME_MARGIN_PX
    box = (max(box[0] - m, 0), max(box[1] - m, 0), min(box[2] + m, layer.width), min(box[3] + m, layer.height))
    crop = layer.crop(box)
    flat = Image.alpha_composite(Image.new("RGBA", crop.size, LAYER_NAME_BACKGROUND + (255,)), crop).convert("RGB")
    scale = LAYER_NAME_IMAGE_SIDE / max(flat.size)
    if scale < 1:
        flat = flat.resize((max(1, round(flat.width * scale)), max(1, round(flat.height * scale))),
                           Image.Resampling.LANCZOS)
    return flat


def name_layer(pipe, layer: Image.Image, max_new_tokens: int = LAYER_NAME_MAX_NEW_TOKENS) -> str:
    """The model's cleaned name for one layer ("" when it has none, or the layer is empty)."""
    import torch

    image = layer_name_image(layer)
    if image is None:
        return ""
    processor = pipe.processor  # the pipeline's Qwen2-VL processor (its `vl_processor`)
    inputs = processor(text=LAYER_NAME_PROMPT, images=image, padding=True, return_tensors="pt")
    inputs = inputs.to(pipe._execution_device)
    with torch.inference_mode():
        generated = pipe.text_encoder.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(generated[:, inputs.input_ids.shape[1]:], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)[0]
    return clean_layer_name(answer)


def name_layers(pipe, layers: list[Image.Image], max_new_tokens: int = LAYER_NAME_MAX_NEW_TOKENS
                ) -> tuple[list[str | None], float]:
    """A name per layer (bottom first), None where the model gives none (an empty layer: it is not asked), and the
    seconds taken.

    Run it where the caption runs (the app's pipeline lock, after `infer`): it uses the text encoder.
    """
    started = time.perf_counter()
    names = [name_layer(pipe, layer, max_new_tokens) or None for layer in layers]
    return names, time.perf_counter() - started


@dataclasses.dataclass(frozen=True)
class LayerLabels:
    """What each layer of a stack (bottom first) is called and holds as text: the model's names (`name_layers`) and the
    OCR's reads (`studio.design.read_layer_text`), None for a layer not named / not read, or for all of them.

    The one place that turns them into the gallery's captions, the PPTX's and PSD's layer names and the layers' file
    names; a sub-run splices its own into the stack's (`replaced`)."""

    names: tuple[str | None, ...] | None = None
    texts: tuple[LayerText | None, ...] | None = None

    def __post_init__(self):  # lists given (finish_layers' are) are kept as tuples: the labels are never edited
        for field in ("names", "texts"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, tuple(getattr(self, field)))

    def name(self, index: int) -> str | None:
        return self.names[index] if self.names else None

    def text(self, index: int) -> LayerText | None:
        """The layer's text when it is a text layer (`LayerText.is_text`), else None."""
        text = self.texts[index] if self.texts else None
        return text if text is not None and text.is_text else None

    def layer_names(self, layers: list[Image.Image]) -> list[str]:
        """PPTX picture names: the model's name, else `images.layer_names`' "Layer 2", "Layer 1 (bottom)"..."""
        return [self.name(index) or default for index, default in enumerate(layer_names(layers))]

    def psd_names(self, layers: list[Image.Image]) -> list[str]:
        """PSD layer names: a text layer is named `Text: <its string>` (psd-tools writes no type layer)."""
        return text_layer_names(self.layer_names(layers), [self.text(index) for index in range(len(layers))])

    def pptx_texts(self, count: int) -> list[LayerText | None] | None:
        """`export_pptx(texts=...)`: each text layer's lines (its picture is hidden under them)."""
        return [self.text(index) for index in range(count)] if self.texts else None

    def file_names(self, count: int) -> list[str]:
        """layer_1.png, layer_2_red-circle.png, ... (`named_layer_file`)."""
        return [named_layer_file(index, self.name(index) or "") for index in range(count)]

    def captions(self, count: int) -> list[str]:
        """The gallery's: `Layer 1 (bottom)`, `Layer 2: red circle`, `Layer 3: Text "ADMIT"`."""
        captions = []
        for index in range(count):
            caption = f"Layer {index + 1}" + (" (bottom)" if index == 0 else "")
            text = self.text(index)
            words = " / ".join(line.text for line in text.lines) if text is not None else None
            shown = [self.name(index)] * bool(self.name(index)) + [f'Text "{words}"'] * bool(words)
            captions.append(caption + (": " + ", ".join(shown) if shown else ""))
        return captions

    def scaled(self, size: tuple[int, int], to: tuple[int, int]) -> "LayerLabels":
        """The same labels for the layers resized from `size` to `to` (the exports at the input's original size)."""
        if not self.texts or size == to:
            return self
        x, y = to[0] / size[0], to[1] / size[1]
        return dataclasses.replace(self, texts=tuple(None if text is None else text.scaled(x, y)
                                                     for text in self.texts))

    def replaced(self, count: int, index: int, sub: "LayerLabels | None", sub_count: int) -> "LayerLabels":
        """The labels of a stack of `count` layers whose layer `index` was replaced by `sub_count` sub-layers
        labelled `sub` (a sub-run; `studio.stack.replace_layer`'s layers)."""
        sub = sub or LayerLabels()

        def spliced(old, new):
            if old is None and new is None:
                return None
            old, new = old or (None,) * count, new or (None,) * sub_count
            return tuple(old[:index]) + tuple(new) + tuple(old[index + 1:])

        return LayerLabels(spliced(self.names, sub.names), spliced(self.texts, sub.texts))
