"""Draw the example images in assets/test_images (the project makes its own; no third-party pictures).

Run: python assets/make_test_images.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "test_images"


def gradient(size, top, bottom):
    """A vertical two-colour gradient, as a sky or a backdrop."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(height - 1, 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def landscape_3x2():
    """Sky, sun, hills and a house: a background and three separable objects."""
    image = gradient((960, 640), (120, 180, 240), (220, 235, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse([700, 60, 840, 200], fill=(255, 210, 60))
    draw.polygon([(0, 520), (260, 360), (520, 520)], fill=(70, 140, 70))
    draw.polygon([(380, 540), (700, 330), (960, 540)], fill=(50, 120, 60))
    draw.rectangle([0, 520, 960, 640], fill=(90, 160, 80))
    draw.rectangle([180, 420, 340, 560], fill=(200, 80, 60))
    draw.polygon([(160, 420), (260, 340), (360, 420)], fill=(120, 50, 40))
    draw.rectangle([240, 480, 280, 560], fill=(90, 60, 40))
    return image


def poster_9x16():
    """A portrait poster: backdrop, a card, a circle and a text banner."""
    image = gradient((576, 1024), (40, 30, 80), (200, 90, 120))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([60, 160, 516, 700], radius=40, fill=(245, 240, 230))
    draw.ellipse([168, 250, 408, 490], fill=(30, 140, 200))
    draw.rectangle([60, 780, 516, 900], fill=(250, 200, 40))
    draw.text((90, 820), "LAYERED", fill=(20, 20, 20), font_size=64)
    return image


def sticker_square_rgba():
    """A square sticker on transparency: the input keeps an alpha channel."""
    image = Image.new("RGBA", (768, 768), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse([84, 84, 684, 684], fill=(255, 255, 255, 255))
    draw.ellipse([124, 124, 644, 644], fill=(240, 90, 50, 255))
    draw.regular_polygon((384, 384, 180), n_sides=5, fill=(255, 230, 80, 255))
    return image


def desk_4x3():
    """A desk scene at 4:3: table, mug, book, lamp."""
    image = gradient((1024, 768), (235, 225, 210), (200, 190, 175))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 520, 1024, 768], fill=(140, 95, 60))
    draw.rectangle([160, 380, 300, 540], fill=(60, 110, 180))
    draw.arc([280, 410, 350, 490], start=270, end=90, fill=(60, 110, 180), width=14)
    draw.rectangle([420, 470, 700, 530], fill=(170, 40, 50))
    draw.rectangle([430, 440, 690, 472], fill=(40, 120, 90))
    draw.line([(840, 530), (840, 300), (760, 220)], fill=(50, 50, 50), width=12)
    draw.polygon([(700, 240), (800, 160), (830, 270)], fill=(240, 200, 60))
    return image


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    landscape_3x2().save(OUT / "landscape_3x2.png", optimize=True)
    poster_9x16().save(OUT / "poster_9x16.png", optimize=True)
    sticker_square_rgba().save(OUT / "sticker_square_rgba.png", optimize=True)
    desk_4x3().save(OUT / "desk_4x3.png", optimize=True)
    print("wrote", sorted(p.name for p in OUT.glob("*.png")))
