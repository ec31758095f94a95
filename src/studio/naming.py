"""Layer names written by the pipeline's own Qwen2.5-VL (issue 26, opt-in): "red circle" instead of "Layer 2".

The text encoder that captions the input is a vision-language model already in memory, so naming a layer costs no
new weights: it is shown the layer alone (cropped to what it covers, over grey) and asked for a 2-6 word name,
decoded greedily for at most LAYER_NAME_MAX_NEW_TOKENS tokens, the way diffusers' `get_image_caption` captions.
The name is cleaned so that it already is what the app's `safe_file_text` keeps (letters, digits and marks of any
script, single spaces), which makes `layer_2_red-circle.png` and the PSD/PPTX/gallery names one text. An empty
answer falls back to "Layer N".

torch is imported inside `name_layers` only: importing this module loads nothing.
"""

import re
import time
import unicodedata

from PIL import Image

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
                ) -> tuple[list[str], float]:
    """A name per layer (bottom first), `fallback_name` where the model gives none, and the seconds taken.

    Run it where the caption runs (the app's pipeline lock, after `infer`): it uses the text encoder.
    """
    started = time.perf_counter()
    names = [name_layer(pipe, layer, max_new_tokens) or fallback_name(index) for index, layer in enumerate(layers)]
    return names, time.perf_counter() - started
