"""Layer names from the pipeline's Qwen2.5-VL (src/studio/naming.py, issue 26).

On the tiny random demo model the words are noise, so these tests check the mechanics only: one name per layer,
names that the app's file-name rule keeps as they are, the word and byte limits, the same names on a second run,
and no name where there is nothing to name. Quality needs the real weights.
"""

import time

import pytest
from PIL import Image, ImageDraw

import app
from studio import naming
from studio.exports import safe_file_text
from studio.images import read_layered_file

GT_DIR = app.ROOT_DIR / "assets" / "layered_gt"


def test_clean_layer_name_keeps_words_and_drops_everything_else():
    assert naming.clean_layer_name('"Red circle!"\nThe layer shows a red circle.') == "Red circle"
    assert naming.clean_layer_name("one two three four five six seven eight") == "one two three four five six"
    assert naming.clean_layer_name("\ufffdh ascr\ufffd\ufffdtantound") == "h ascr tantound"  # a demo answer
    assert naming.clean_layer_name("🙂 — ...") == ""
    assert naming.clean_layer_name("빨간 원") == "빨간 원"  # Hangul stays, as in export names


def test_clean_layer_name_stays_within_the_byte_limit_on_whole_words_and_characters():
    long_words = " ".join(["word"] * 3 + ["a" * 50])
    assert naming.clean_layer_name(long_words) == "word word word"
    hangul = "가" * 30  # 90 bytes of UTF-8 in one word
    cut = naming.clean_layer_name(hangul)
    assert cut == "가" * 20 and len(cut.encode("utf-8")) == 60


def test_names_are_what_the_apps_file_name_rule_keeps():
    for text in ["Red circle!", "title: 'SALE -40%'", "빨간 원 / 배경", "a\u0301 b"]:
        name = naming.clean_layer_name(text)
        assert safe_file_text(name) == name.replace(" ", "-")


def test_named_layer_files():
    assert naming.named_layer_file(1, "red circle") == "layer_2_red-circle.png"
    assert naming.named_layer_file(1, "Layer 2") == "layer_2.png"  # the fallback adds nothing
    assert naming.named_layer_file(0, "") == "layer_1.png"


def test_the_model_sees_the_layer_cropped_over_grey_within_the_size_limit():
    layer = Image.new("RGBA", (1024, 1024), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((100, 200, 899, 399), fill=(255, 0, 0, 255))
    shown = naming.layer_name_image(layer)
    # 800 x 200 plus an 8 px margin each side is 816 x 216, shrunk to a 448 px long side.
    assert shown.size == (448, round(216 * 448 / 816))
    assert shown.getpixel((0, 0)) == naming.LAYER_NAME_BACKGROUND
    assert shown.getpixel((224, 59)) == (255, 0, 0)
    assert naming.layer_name_image(Image.new("RGBA", (64, 64))) is None


@pytest.fixture(scope="module")
def ticket():
    """09_ticket's four layers, and an empty fifth."""
    layers = read_layered_file(GT_DIR / "09_ticket.psd")
    return layers + [Image.new("RGBA", layers[0].size, (0, 0, 0, 0))]


def test_the_demo_model_names_every_layer_the_same_way_twice(demo_pipe, ticket):
    """Once as the app runs it (`name_layers_locked`: under the pipeline's lock, the caption's kernels), once plainly."""
    started = time.perf_counter()
    names = app.name_layers_locked(demo_pipe, ticket)
    locked_s = time.perf_counter() - started
    again, seconds = naming.name_layers(demo_pipe.pipe, ticket)
    print(f"demo model, CPU: {seconds / len(ticket):.3f} s a layer ({locked_s:.2f} s for {len(ticket)} layers in the "
          f"app's lock)")
    assert len(names) == len(ticket) and names == again
    assert names[4] is None  # empty: nothing to name, the model is not asked
    assert not app._PIPELINE_LOCK.locked()  # given back
    for name in names[:4]:
        if name is None:  # the demo's noise may decode to nothing a name keeps
            continue
        assert name == naming.clean_layer_name(name) and name  # already clean, never empty
        assert len(name.split(" ")) <= naming.LAYER_NAME_MAX_WORDS
        assert len(name.encode("utf-8")) <= naming.LAYER_NAME_MAX_BYTES
        assert safe_file_text(name) == name.replace(" ", "-")


def test_the_answer_is_greedy_and_at_most_max_new_tokens_long(demo_pipe, ticket):
    encoder, calls = demo_pipe.pipe.text_encoder, []
    generate = encoder.generate

    def recording(*args, **kwargs):  # the real generate, its output's new tokens counted
        out = generate(*args, **kwargs)
        calls.append((kwargs["max_new_tokens"], kwargs["do_sample"], out.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    encoder.generate = recording
    try:
        naming.name_layer(demo_pipe.pipe, ticket[1], max_new_tokens=3)
        naming.name_layers(demo_pipe.pipe, ticket[:2])
    finally:
        del encoder.generate
    assert [(limit, sample) for limit, sample, _ in calls] == [(3, False), (8, False), (8, False)]
    assert all(0 < written <= limit for limit, _, written in calls)
