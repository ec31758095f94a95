"""src/tool/combine_layers.py: layers from PNGs, the studio's ZIP and PSDs, stacked bottom -> top, never rescaled."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from studio.exports import export_zip
from studio.images import composite_layers
from conftest import free_port
from tool import combine_layers as cl

TOOL = Path(cl.__file__)


def shape_layer(size, box, color, ellipse=False):
    """An opaque shape on transparency."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if ellipse else draw.rectangle)(box, fill=color)
    return image


def pixels(image):
    return np.asarray(image.convert("RGBA"))


def save(image, path):
    image.save(path)
    return path


def test_studio_zip_gives_its_layers_in_number_order_without_the_composite(tmp_path):
    # Eleven layers: layer_10.png and layer_11.png must come after layer_9.png, not after layer_1.png.
    layers = [shape_layer((40, 30), (i, i, i + 5, i + 5), (20 * i, 0, 255 - 20 * i, 255)) for i in range(11)]
    archive = export_zip(layers, tmp_path / "layers.zip", {"params.json": b"{}"})

    stack = cl.read_layers(archive)

    assert [layer.name for layer in stack] == [f"layer_{i + 1}" for i in range(11)]
    assert all(np.array_equal(pixels(a.image), pixels(b)) for a, b in zip(stack, layers))
    assert np.array_equal(pixels(cl.composite_stack(stack)), pixels(composite_layers(layers)))


def test_zip_layers_come_from_its_top_folder_only(tmp_path):
    import zipfile

    red, blue = Image.new("RGBA", (8, 6), (255, 0, 0, 255)), Image.new("RGBA", (16, 12), (0, 0, 255, 255))
    path = tmp_path / "with_original_size.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, image in [("layer_1.png", red), ("original_size/layer_1.png", blue), ("composite.png", red),
                            ("original_size/composite.png", blue)]:
            with archive.open(name, "w") as handle:
                image.save(handle, format="PNG")

    stack = cl.read_layers(path)

    assert [(l.source, l.image.size) for l in stack] == [("with_original_size.zip/layer_1.png", (8, 6))]


def test_psd_layers_keep_their_offsets_visibility_and_canvas(tmp_path):
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    psd = PSDImage.new(mode="RGBA", size=(100, 60), color=(0, 0, 0, 0))
    psd.append(PixelLayer.frompil(Image.new("RGBA", (30, 20), (255, 0, 0, 255)), psd, name="red", top=10, left=20))
    # Half off the canvas, to the upper right.
    psd.append(PixelLayer.frompil(Image.new("RGBA", (20, 20), (0, 0, 255, 255)), psd, name="blue", top=-10, left=90))
    hidden = PixelLayer.frompil(Image.new("RGBA", (100, 60), (0, 255, 0, 255)), psd, name="hidden green")
    hidden.visible = False
    psd.append(hidden)
    path = tmp_path / "doc.psd"
    psd.save(path)

    stack = cl.read_layers(path)
    result = pixels(cl.composite_stack(stack))

    assert [(l.name, l.left, l.top, l.visible) for l in stack] == [
        ("red", 20, 10, True), ("blue", 90, -10, True), ("hidden green", 0, 0, False)]
    assert cl.canvas_size(stack) == (100, 60)
    assert result.shape == (60, 100, 4)
    assert tuple(result[10, 20]) == (255, 0, 0, 255) and tuple(result[29, 49]) == (255, 0, 0, 255)
    assert tuple(result[9, 20]) == (0, 0, 0, 0) and tuple(result[10, 50]) == (0, 0, 0, 0)
    assert tuple(result[0, 99]) == (0, 0, 255, 255) and tuple(result[10, 99]) == (0, 0, 0, 0)
    assert result[:, :, 1].max() == 0  # the hidden green layer is not drawn


def test_loose_pngs_sit_on_the_bottom_layers_canvas_unscaled(tmp_path):
    bottom = save(Image.new("RGBA", (120, 80), (0, 0, 255, 255)), tmp_path / "bottom.png")
    small = save(shape_layer((50, 30), (0, 0, 49, 29), (255, 0, 0, 255)), tmp_path / "small.png")
    large = save(shape_layer((200, 40), (150, 0, 199, 39), (0, 255, 0, 255)), tmp_path / "large.png")

    stack, errors = cl.add_files([], [bottom, small, large])
    result = pixels(cl.composite_stack(stack))

    assert errors == []
    assert [layer.image.size for layer in stack] == [(120, 80), (50, 30), (200, 40)]  # never rescaled
    assert result.shape == (80, 120, 4)
    assert tuple(result[29, 49]) == (255, 0, 0, 255) and tuple(result[30, 50]) == (0, 0, 255, 255)
    assert result[:, :, 1].max() == 0  # the large layer's green lies beyond x=120: cut off, not squeezed in
    notes = " ".join(cl.stack_notes(stack))
    assert "Canvas 120×80" in notes and "'large'" in notes and "cut off" in notes and "'small'" in notes


def test_compositing_is_porter_duff_over_on_straight_alpha():
    red = cl.Layer(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "red", "test")
    blue = cl.Layer(Image.new("RGBA", (4, 4), (0, 0, 255, 128)), "blue", "test")

    out = pixels(cl.composite_stack([red, blue]))[0, 0].astype(float)

    a_top = a_bottom = 128 / 255
    alpha = a_top + a_bottom * (1 - a_top)
    expected_rgb = (np.array([0, 0, 255]) * a_top + np.array([255, 0, 0]) * a_bottom * (1 - a_top)) / alpha
    assert abs(out[3] - alpha * 255) <= 1
    assert np.all(np.abs(out[:3] - expected_rgb) <= 1)


def test_reorder_and_hide_change_the_composite_and_leave_the_old_stack_alone():
    red = cl.Layer(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), "red", "test")
    blue = cl.Layer(shape_layer((8, 8), (0, 0, 3, 7), (0, 0, 255, 255)), "blue", "test")
    stack = [red, blue]

    lowered = cl.move_layer(stack, 1, -1)
    hidden = cl.set_visible(stack, 1, False)
    removed = cl.remove_layer(stack, 0)

    assert [l.name for l in stack] == ["red", "blue"] and stack[1].visible
    assert tuple(pixels(cl.composite_stack(stack))[0, 0]) == (0, 0, 255, 255)
    assert [l.name for l in lowered] == ["blue", "red"]
    assert tuple(pixels(cl.composite_stack(lowered))[0, 0]) == (255, 0, 0, 255)
    assert tuple(pixels(cl.composite_stack(hidden))[0, 0]) == (255, 0, 0, 255)
    assert tuple(pixels(cl.composite_stack(removed))[0, 7]) == (0, 0, 0, 0)
    assert cl.move_layer(stack, 1, +5) == stack  # already on top: stays there


def test_bad_files_are_named_and_cost_nothing_already_stacked(tmp_path):
    good = save(Image.new("RGBA", (10, 10), (255, 0, 0, 255)), tmp_path / "good.png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "broken.png"
    truncated.write_bytes(good.read_bytes()[:40])
    no_png = tmp_path / "empty.zip"
    import zipfile
    with zipfile.ZipFile(no_png, "w") as archive:
        archive.writestr("readme.txt", "nothing here")
    stack = cl.read_layers(good)

    new_stack, errors = cl.add_files(stack, [text, good, truncated, no_png])

    assert len(stack) == 1  # the caller's stack is untouched
    assert len(new_stack) == 2 and all(layer.name == "good" for layer in new_stack)
    assert [e.split(":")[0] for e in errors] == ["notes.txt", "broken.png", "empty.zip"]
    assert "no PNG layer" in errors[2]


def test_psd_of_the_stack_reads_back_with_names_and_the_same_picture(tmp_path):
    stack = [cl.Layer(Image.new("RGBA", (60, 40), (0, 0, 255, 255)), "sky", "test"),
             cl.Layer(shape_layer((20, 20), (0, 0, 19, 19), (255, 0, 0, 200), ellipse=True), "sun", "test",
                      left=30, top=5),
             cl.Layer(Image.new("RGBA", (60, 40), (0, 255, 0, 255)), "hidden", "test", visible=False)]

    path = cl.export_stack_psd(stack, tmp_path / "stack.psd")
    back = cl.read_layers(path)

    assert [l.name for l in back] == ["sky", "sun"]  # visible layers only
    assert cl.canvas_size(back) == (60, 40)
    assert np.array_equal(pixels(cl.composite_stack(back)), pixels(cl.composite_stack(stack)))


def test_command_line_writes_the_composite_and_refuses_a_bad_file(tmp_path, capsys):
    bottom = save(Image.new("RGBA", (30, 20), (0, 0, 255, 255)), tmp_path / "bottom.png")
    top = save(shape_layer((30, 20), (0, 0, 9, 9), (255, 0, 0, 255)), tmp_path / "top.png")
    bad = tmp_path / "bad.png"
    bad.write_text("garbage")
    out = tmp_path / "out.png"

    ok = subprocess.run([sys.executable, str(TOOL), str(bottom), str(top), "-o", str(out)],
                        capture_output=True, text=True, timeout=120)
    refused = cl.main([str(bottom), str(bad), "-o", str(tmp_path / "no.png")])  # in-process: saves a start-up

    assert ok.returncode == 0, ok.stderr
    result = pixels(Image.open(out))
    assert result.shape == (20, 30, 4)
    assert tuple(result[0, 0]) == (255, 0, 0, 255) and tuple(result[19, 29]) == (0, 0, 255, 255)
    assert refused == 2
    assert "error: bad.png: not a readable PNG, ZIP or PSD" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()



def test_ui_upload_with_a_bad_file_keeps_what_was_stacked(tmp_path):
    from gradio_client import Client, handle_file

    bottom = save(Image.new("RGBA", (30, 20), (0, 0, 255, 255)), tmp_path / "bottom.png")
    top = save(shape_layer((30, 20), (0, 0, 9, 9), (255, 0, 0, 255)), tmp_path / "top.png")
    bad = tmp_path / "bad.psd"
    bad.write_bytes(b"8BPS not really")
    demo = cl.build_ui()
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict([handle_file(bottom)], api_name="/add_files")
        _, preview, notes, png, psd = client.predict([handle_file(bad), handle_file(top)], api_name="/add_files")
    finally:
        demo.close()

    result = pixels(Image.open(png))
    assert result.shape == (20, 30, 4)
    assert tuple(result[0, 0]) == (255, 0, 0, 255) and tuple(result[19, 29]) == (0, 0, 255, 255)
    assert np.array_equal(pixels(Image.open(preview)), result)  # the page shows what the PNG download holds
    assert "Canvas 30×20" in notes
    assert [l.name for l in cl.read_layers(psd)] == ["bottom", "top"]


def test_command_line_o_without_layer_files_says_what_is_missing_instead_of_serving(tmp_path, capsys):
    assert cl.main(["-o", str(tmp_path / "none.png")]) == 2
    assert f"error: -o {tmp_path / 'none.png'} needs the layer files to combine" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()


def test_browser_a_hidden_layer_leaves_the_composite_and_the_psd(tmp_path):
    """In Chromium: each layer's "visible" box can be clicked; the hidden layer is gone from the composite shown and
    from the PSD download; the arrows that would leave the stack are greyed out; the downloads carry a name."""
    import httpx
    from playwright.sync_api import expect, sync_playwright
    from psd_tools import PSDImage

    from test_served_app import CHROMIUM, CHROMIUM_ARGS

    bottom = save(Image.new("RGBA", (40, 30), (0, 0, 255, 255)), tmp_path / "bottom.png")
    top = save(shape_layer((40, 30), (0, 0, 19, 14), (255, 0, 0, 255)), tmp_path / "top.png")
    demo = cl.build_ui()
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=cl.CSS)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_context(accept_downloads=True, viewport={"width": 1366, "height": 900}).new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("input[type=file]").first.set_input_files([str(bottom), str(top)])
            shown = page.get_by_label("visible")
            expect(shown).to_have_count(2, timeout=30_000)
            assert [box.is_enabled() for box in shown.all()] == [True, True]  # was <input disabled>
            # The list shows the top first: its ↑ and the bottom's ↓ would leave the stack.
            assert page.locator("#layer-2-up").is_disabled() and page.locator("#layer-1-down").is_disabled()
            assert page.locator("#layer-1-up").is_enabled() and page.locator("#layer-2-down").is_enabled()
            preview = page.locator("img[src*='_combined.png']").first
            expect(preview).to_be_visible(timeout=30_000)
            before = preview.get_attribute("src")
            shown.first.click()  # the top layer's box
            expect(shown.first).not_to_be_checked()
            expect(page.locator("img[src*='_combined.png']").first).not_to_have_attribute("src", before, timeout=30_000)
            composite = Image.open(io_bytes(httpx.get(page.locator("img[src*='_combined.png']").first
                                                      .get_attribute("src")).content))
            assert np.array_equal(pixels(composite), pixels(Image.open(bottom)))  # no red left
            with page.expect_download() as download_info:
                page.get_by_role("button", name="Download PSD (visible layers)").click()
            assert download_info.value.suggested_filename == "bottom_combined.psd"
            download_info.value.save_as(tmp_path / "visible.psd")
            psd = PSDImage.open(tmp_path / "visible.psd")
            assert [layer.name for layer in psd] == ["bottom"]
            browser.close()
    finally:
        demo.close()


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)
