"""Draw the README's picture of editable text (issue 26): a design's PPTX as LibreOffice renders it, as exported and
after its text box was edited, one above the other.

The design is assets/layered_gt/07_wide_header.psd at the model's 640 px, its text read by the app's own OCR and
exported by the app's own `export_pptx`; the edit changes the text box's string with python-pptx (what a user does by
typing in PowerPoint or Impress); LibreOffice renders both to PDF, poppler to PNG.

Run: python assets/make_design_screenshot.py   (needs soffice and pdftoppm; writes assets/screenshots/)
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from studio.design import read_layer_text  # noqa: E402
from studio.exports import export_pptx  # noqa: E402
from studio.images import layer_names, read_layered_file, resize_layers  # noqa: E402

OUT = ROOT / "assets" / "screenshots" / "pptx_editable_text.png"
WIDTH = 400  # each slide's width in the picture, in pixels
EDITED = "Your title here"


def render(pptx: Path, folder: Path) -> Image.Image:
    profile = f"-env:UserInstallation={(folder / 'lo-profile').as_uri()}"  # its own: another soffice may run
    subprocess.run(["soffice", profile, "--headless", "--convert-to", "pdf", "--outdir", str(folder), str(pptx)],
                   check=True, capture_output=True, timeout=180)
    page = folder / pptx.stem
    subprocess.run(["pdftoppm", "-png", "-singlefile", "-scale-to", str(WIDTH), str(folder / f"{pptx.stem}.pdf"),
                    str(page)], check=True)
    return Image.open(f"{page}.png").convert("RGB")


def main() -> int:
    from pptx import Presentation

    layers = resize_layers(read_layered_file(ROOT / "assets" / "layered_gt" / "07_wide_header.psd"), (640, 320))
    texts = read_layer_text(layers)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        exported = export_pptx(layers, folder / "exported.pptx", layer_names(layers), texts)
        presentation = Presentation(str(exported))
        (box,) = [shape for shape in presentation.slides[0].shapes if shape.has_text_frame]
        box.text_frame.paragraphs[0].runs[0].text = EDITED
        presentation.save(str(folder / "edited.pptx"))
        slides = [render(exported, folder), render(folder / "edited.pptx", folder)]
    captions = [f"PPTX in LibreOffice: the title is a text box ({box.name})", f"the same text box, retyped: {EDITED!r}"]
    gap, line = 6, 16
    picture = Image.new("RGB", (WIDTH, sum(s.height + line + gap for s in slides)), (255, 255, 255))
    draw, top = ImageDraw.Draw(picture), 0
    for slide, caption in zip(slides, captions):
        draw.text((2, top + 2), caption, fill=(40, 40, 40))
        picture.paste(slide, (0, top + line))
        top += slide.height + line + gap
    OUT.parent.mkdir(exist_ok=True)
    picture.save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(ROOT)} ({picture.width}x{picture.height}, {OUT.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
