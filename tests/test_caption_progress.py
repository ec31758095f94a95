"""The caption's progress: the tokens it has written, counted as the text encoder writes them (the page shows the
bar through Gradio's track_tqdm; tests/test_served_app.py sees it there)."""

from PIL import Image

import app


def test_the_caption_bar_counts_every_token_the_text_encoder_writes(demo_pipe):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import (
        calculate_dimensions,
    )

    image = Image.new("RGBA", (96, 64), (30, 90, 200, 255))
    width, height = calculate_dimensions(640 * 640, image.width / image.height)
    forwards = []  # generate runs the text encoder once per token: the prompt's pass gives the first, then one each
    handle = demo_pipe.pipe.text_encoder.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        with app.caption_progress(demo_pipe.pipe) as counter:
            caption = demo_pipe.pipe.get_image_caption(demo_pipe.pipe.image_processor.resize(image, height, width),
                                                  device=demo_pipe.pipe._execution_device)
    finally:
        handle.remove()

    assert caption
    assert 0 < counter.written == len(forwards) <= app.CAPTION_MAX_NEW_TOKENS
    assert counter.bar.n == counter.written and counter.bar.total == app.CAPTION_MAX_NEW_TOKENS
    assert counter.bar.unit == "caption tokens"
    assert "generate" not in vars(demo_pipe.pipe.text_encoder)  # the text encoder's own generate again afterwards
