"""Draw the layered ground-truth set in assets/layered_gt: 13 small designs, one PSD each (the project makes its
own; no third-party pictures). Flat shapes, text, vertical gradients, semi-transparent and overlapping layers,
2 to 6 layers, square, landscape and portrait canvases. `python src/app.py evaluate assets/layered_gt ...` scores
a model against them.

Run: python assets/make_layered_gt.py   (writes the PSDs with the app's own `export_psd`, studio/exports.py; deterministic)

Each text layer's string, place, colour and font size go to `layered_gt/text_layers.json` (design -> lines, layer 1 =
bottom): the ground truth of `studio.design.text_cer`, which a PSD's pixel layers cannot carry.

Gradients run top to bottom only: every row is one colour, which the PSD's run-length compression stores in
a few bytes, so the files stay small.
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "assets"))
from studio.exports import export_psd  # noqa: E402  (the app's own writer; no torch)
import make_test_images  # noqa: E402  (the example images' script: its gradient)

OUT = Path(__file__).resolve().parent / "layered_gt"


def blank(size):
    return Image.new("RGBA", size, (0, 0, 0, 0))


def gradient(size, top, bottom):
    """An opaque vertical gradient between two RGB colours (the example images' own, with alpha)."""
    return make_test_images.gradient(size, top, bottom).convert("RGBA")


def solid(size, colour):
    return Image.new("RGBA", size, tuple(colour) + (255,))


def shape(size, kind, box, fill, opacity=255, **kwargs):
    """One shape on a transparent layer; `opacity` makes the whole layer see-through."""
    layer = blank(size)
    draw = ImageDraw.Draw(layer)
    getattr(draw, kind)(box, fill=tuple(fill) + (opacity,), **kwargs)
    return layer


def text(size, xy, words, fill, font_size, opacity=255):
    """One line in Pillow's default font; what was drawn rides along in `info["text"]` for text_layers.json."""
    layer = blank(size)
    ImageDraw.Draw(layer).text(xy, words, fill=tuple(fill) + (opacity,), font=ImageFont.load_default(size=font_size))
    layer.info["text"] = dict(text=words, xy=list(xy), fill=list(fill), opacity=opacity, font_size=font_size)
    return layer


def soft_shadow(size, box, radius=6, opacity=110):
    """A blurred dark rectangle: soft alpha everywhere along its edge."""
    return shape(size, "rectangle", box, (0, 0, 0), opacity).filter(ImageFilter.GaussianBlur(radius))


def designs():
    """name -> layers (bottom first). Sizes: 256x256, 320x192 (5:3), 192x320, 288x216 (4:3), 384x192 (2:1), ..."""
    d = {}
    s = (256, 256)
    d["01_minimal_square"] = [solid(s, (240, 236, 228)), shape(s, "rectangle", (64, 64, 192, 192), (40, 90, 200))]
    d["02_two_circles_overlap"] = [solid(s, (255, 255, 255)),
                                   shape(s, "ellipse", (30, 60, 170, 200), (230, 50, 60), 200),
                                   shape(s, "ellipse", (90, 60, 230, 200), (40, 120, 230), 160)]
    s = (320, 192)
    d["03_sale_banner"] = [gradient(s, (250, 200, 60), (240, 120, 40)),
                           shape(s, "rounded_rectangle", (20, 40, 300, 152), (255, 255, 255), 190, radius=24),
                           text(s, (60, 62), "SALE -40%", (200, 30, 40), 48)]
    s = (192, 320)
    d["04_portrait_poster"] = [gradient(s, (30, 30, 70), (150, 60, 110)),
                               shape(s, "ellipse", (36, 40, 156, 160), (250, 210, 80)),
                               shape(s, "rectangle", (0, 200, 192, 320), (20, 20, 40), 170),
                               text(s, (22, 230), "NIGHT", (255, 255, 255), 40)]
    s = (288, 216)
    d["05_landscape"] = [gradient(s, (110, 170, 240), (220, 235, 250)),
                         shape(s, "ellipse", (200, 20, 260, 80), (255, 215, 70)),
                         shape(s, "polygon", [(0, 216), (0, 150), (110, 90), (220, 170), (220, 216)], (70, 140, 70)),
                         shape(s, "polygon", [(100, 216), (200, 110), (288, 160), (288, 216)], (50, 115, 60), 230)]
    s = (256, 256)
    star = [(128, 28), (152, 100), (228, 100), (166, 144), (190, 218), (128, 172), (66, 218), (90, 144), (28, 100),
            (104, 100)]
    d["06_badge"] = [solid(s, (30, 60, 90)), shape(s, "ellipse", (20, 20, 236, 236), (240, 240, 240)),
                     shape(s, "polygon", star, (230, 170, 30)), text(s, (96, 118), "No.1", (30, 60, 90), 26)]
    s = (384, 192)
    d["07_wide_header"] = [gradient(s, (20, 120, 130), (10, 60, 80)),
                           shape(s, "rectangle", (0, 70, 384, 122), (255, 255, 255), 90),
                           shape(s, "rectangle", (24, 24, 88, 88), (250, 110, 60)),
                           text(s, (110, 72), "Layered studio", (255, 255, 255), 34),
                           shape(s, "ellipse", (320, 120, 372, 172), (250, 110, 60), 200)]
    s = (256, 256)
    d["08_six_cards"] = [solid(s, (245, 245, 245))] + [
        shape(s, "rounded_rectangle", (20 + 30 * i, 20 + 30 * i, 120 + 30 * i, 120 + 30 * i),
              colour, 255 - 25 * i, radius=10)
        for i, colour in enumerate([(220, 60, 60), (60, 160, 90), (60, 90, 220), (230, 180, 40), (150, 70, 190)])]
    s = (216, 288)
    d["09_ticket"] = [solid(s, (250, 244, 230)),
                      shape(s, "rectangle", (16, 16, 200, 272), (200, 60, 50), 255),
                      text(s, (36, 60), "ADMIT", (255, 255, 255), 40),
                      text(s, (64, 200), "ONE", (250, 230, 180), 36, 220)]
    s = (240, 240)
    d["10_sticker_transparent"] = [shape(s, "ellipse", (10, 10, 230, 230), (255, 255, 255)),
                                   shape(s, "ellipse", (24, 24, 216, 216), (90, 190, 120)),
                                   text(s, (62, 96), "HELLO", (255, 255, 255), 34)]
    s = (320, 240)
    bars = blank(s)
    draw = ImageDraw.Draw(bars)
    for i, h in enumerate([60, 110, 80, 150, 120]):
        draw.rectangle((40 + 52 * i, 210 - h, 80 + 52 * i, 210), fill=(70, 130, 200, 255))
    line = blank(s)
    ImageDraw.Draw(line).line([(60, 160), (112, 110), (164, 130), (216, 70), (268, 90)], fill=(230, 80, 60, 255), width=5)
    d["11_chart"] = [solid(s, (255, 255, 255)), bars, line, text(s, (40, 14), "Sales 2025", (40, 40, 40), 28)]
    s = (288, 160)
    d["12_button_shadow"] = [gradient(s, (235, 238, 245), (200, 205, 220)), soft_shadow(s, (60, 50, 236, 122)),
                             shape(s, "rounded_rectangle", (52, 40, 228, 110), (50, 110, 240), radius=18),
                             text(s, (96, 56), "Click", (255, 255, 255), 32)]
    s = (192, 256)
    d["13_glass_panels"] = [gradient(s, (250, 120, 90), (120, 60, 180)),
                            shape(s, "rectangle", (20, 30, 130, 150), (255, 255, 255), 80),
                            shape(s, "rectangle", (60, 90, 172, 220), (255, 255, 255), 120),
                            shape(s, "ellipse", (90, 20, 170, 100), (20, 20, 60), 140),
                            text(s, (30, 160), "glass", (255, 255, 255), 30),
                            shape(s, "rectangle", (0, 236, 192, 256), (20, 20, 60), 200)]
    return d


def compress_merged_image(path):
    """Store the PSD's merged image run-length compressed: psd-tools 1.26 writes it raw (4 bytes a pixel), which
    would make each file ~4x larger than its layers. Private record API, used only to shrink these assets."""
    from psd_tools import PSDImage
    from psd_tools.constants import Compression

    psd = PSDImage.open(path)
    record, header = psd._record.image_data, psd._record.header
    data = record.get_data(header)
    record.compression = Compression.RLE
    record.set_data(data, header)
    psd.save(path)


def main():
    OUT.mkdir(exist_ok=True)
    text_layers = {}
    for name, layers in designs().items():
        export_psd(layers, OUT / f"{name}.psd")
        compress_merged_image(OUT / f"{name}.psd")
        lines = [dict(layer=index + 1, **layer.info["text"]) for index, layer in enumerate(layers) if "text" in layer.info]
        if lines:
            text_layers[name] = lines
        print(f"{name}.psd: {len(layers)} layers, {layers[0].width}x{layers[0].height}")
    rows = ",\n".join(f" {json.dumps(name)}: {json.dumps(lines, ensure_ascii=False)}" for name, lines in text_layers.items())
    (OUT / "text_layers.json").write_text("{\n" + rows + "\n}\n")


if __name__ == "__main__":
    main()
