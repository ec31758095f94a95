"""Edit one RGBA layer with a text instruction (Qwen-Image-Edit-2509), keeping its transparency.

    python src/tool/edit_rgba_image.py [--demo] [--offload MODE] [--matte auto|rmbg|chroma_key] [--port 7871]

The seed's method: the layer is put on a flat green, `QwenImageEditPlusPipeline` edits that picture, the
result is resized back to the layer's size, and the alpha is recovered from it: by RMBG-2.0 when its
weights are available, else (and by choice) by a chroma-key matte of the known green, which needs no model.

Sections, as in src/app.py (whose environment probe, loading, offload modes and offline message this
tool imports rather than copies):
    1. flags       the edit model, the background colour, the matte's tolerances, port 7871
    3. demo model  `build_demo_edit_pipeline`: a tiny random QwenImageEditPlusPipeline of the real classes
    4. loading     EDIT_MODEL for `app.load_pipeline` (the app's load flags, `FLAGS`); `load_rmbg`
    5. infer       `flatten_on_background`, `chroma_key_matte`, `rmbg_matte`, `unmix_background`, `edit_layer`
    7. UI          `build_ui` (api_name="edit")
    8. main
"""

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # src/, for `import app` and `studio`
import app  # noqa: E402  (loads no model on import)
from studio.demo_model import build_demo_components, save_demo_pipeline  # noqa: E402
from studio.errors import ModelNotAvailableError, OutOfMemoryError, RunStopped, exits_with_message  # noqa: E402
from studio.images import to_rgba  # noqa: E402
from studio.params import MAX_SEED, PARAM, add_flags, check_param, flag_values, param_widget  # noqa: E402
from studio.runs import atomic_run_folder, clean_partial_runs, prune_outputs  # noqa: E402
from studio.serving import (Sessions, clean_gradio_caches, client_error, delete_gradio_files, gradio_cache_schedule,  # noqa: E402
                            launch_options, network_warning, readable_upload, remove_process_cache, serving_flags,
                            stop_on_sigterm, use_process_cache)

logger = logging.getLogger("qwen_layered_studio.edit_rgba_image")

# ----------------------------------------------------------------------------------------------------
# 1. Flags
# ----------------------------------------------------------------------------------------------------
MODEL_ID = "Qwen/Qwen-Image-Edit-2509"  # the same 20B MMDiT + Qwen2.5-VL-7B as Qwen-Image-Layered (~58 GB in bf16)
RMBG_MODEL_ID = "briaai/RMBG-2.0"  # BiRefNet background removal; gated on the hub, non-commercial licence
# RMBG-2.0 ships the code it runs with its weights (trust_remote_code): downloaded from this commit only, never from
# whatever its main branch holds that day.
RMBG_REVISION = "5df4c9c76d8170882c34f6986e848ee07fd0ba43"
RMBG_INPUT_SIZE = 1024  # RMBG-2.0 sees a 1024x1024 picture, normalized with ImageNet's mean and std
RMBG_MEAN, RMBG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOST = app.HOST
PORT = 7871  # the app is 7869, combine_layers 7870
# The seed's green: rare in layers, so the edit model keeps it as "background" and a key can find it again.
BACKGROUND_COLOR = (30, 215, 96)
# Chroma key: RGB distance to the background colour below the first value -> transparent, above the second
# -> opaque, linear between. 24 absorbs the few levels the model and the resize drift from the flat green;
# 72 keeps saturated colours opaque. Green parts of a layer closer than 72 to the key turn partly
# transparent: RMBG-2.0 does not have that limit.
CHROMA_KEY_TOLERANCE = (24.0, 72.0)
MATTES = ("auto", "rmbg", "chroma_key")  # auto: RMBG-2.0 when loaded, else the chroma key
# Qwen-Image-Edit-2509's model card: 40 steps, true CFG 4 with a one-space negative prompt. The parameters are the
# app's PARAMS rows (their checks, widgets and limits), with these defaults.
DEFAULTS = dict(prompt="", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=40, seed=0,
                randomize_seed=False, matte="auto")
# The app's load flags that the edit tool takes, and its own place on the network.
FLAGS = (*(row for row in app.LOAD_FLAGS if "edit" in row.commands),
         *serving_flags(HOST, PORT, app.MAX_UPLOAD_SIZE, commands=("edit",)))
# The edit pipeline's system prompt: the demo tokenizer learns its merges from it.
EDIT_DEMO_CORPUS = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                    "then explain how the user's text instruction should alter or modify the image. Generate a new "
                    "image that meets the user's requirements while maintaining consistency with the original input.")


# ----------------------------------------------------------------------------------------------------
# 3. Demo model: the edit pipeline's real classes at toy size, random weights, built offline
# ----------------------------------------------------------------------------------------------------
def build_demo_edit_pipeline(path: Path) -> Path:
    """Build (once) a tiny random QwenImageEditPlusPipeline and save it to `path`; its edits are noise.

    Text encoder, processor, tokenizer and scheduler come from the app's `build_demo_components`.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    logger.info("Building the tiny demo edit pipeline in %s", path)
    # 1. The parts every Qwen-Image pipeline shares (seeds torch: the weights below follow from it).
    components = build_demo_components(EDIT_DEMO_CORPUS)
    # 2. Edit-2509's DiT switches are the defaults (no layer-3D RoPE, no RGBA t-cond), at 2 blocks of width 32.
    #    in_channels = 4 * z_dim: latents are packed in 2x2 patches; the condition image's latents ride along.
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=32, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    # RGB in (input_channels=3, the default): the edit model sees the layer flattened on green.
    # z_dim must differ from 3: `prepare_latents` tells images from latents by their channel count.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 8,
                                 latents_std=[1.0] * 8)
    # 3. Save (atomically).
    pipe = QwenImageEditPlusPipeline(vae=vae, transformer=transformer, **components)
    return save_demo_pipeline(pipe, path, "Tiny random Qwen-Image-Edit-2509 pipeline built by "
                                              "src/tool/edit_rgba_image.py --demo. Its edits are noise.")


# ----------------------------------------------------------------------------------------------------
# 4. Loading: the app's `load_pipeline` with this spec; RMBG-2.0 through the app's `find_weights`
# ----------------------------------------------------------------------------------------------------
EDIT_MODEL = app.ModelSpec(model_id=MODEL_ID, local_dir_name="Qwen-Image-Edit-2509",
                           pipeline_class="QwenImageEditPlusPipeline", build_demo=build_demo_edit_pipeline,
                           demo_dir_name="demo-tiny-random-edit", download_size="~58 GB")
RMBG_MODEL = app.ModelSpec(model_id=RMBG_MODEL_ID, local_dir_name="RMBG-2.0", pipeline_class=None, build_demo=None,
                           demo_dir_name=None, download_size="~0.9 GB", marker_file="config.json",
                           revision=RMBG_REVISION)
RMBG_HINT = ("  RMBG-2.0 is gated: accept its licence (non-commercial) on its hub page and log in with `hf auth login`.\n"
             "  Without it, choose the chroma-key matte (--matte chroma_key), which needs no model.")


def load_rmbg(models_dir: Path, allow_download: bool = True):
    """RMBG-2.0 from models/RMBG-2.0, else the hub (unless `allow_download` is off, as with --demo).

    Raises ModelNotAvailableError saying what to do. Kept on the CPU between edits: it moves to the
    GPU only for its forward pass, leaving the VRAM to the edit model.
    """
    local = Path(models_dir) / RMBG_MODEL.local_dir_name
    if not allow_download and not (local / RMBG_MODEL.marker_file).is_file():
        raise ModelNotAvailableError(f"No RMBG-2.0 weights in {local} (--demo does not download them).\n" + RMBG_HINT)
    try:
        path = app.find_weights(models_dir, RMBG_MODEL)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(f"{err}\n{RMBG_HINT}") from err
    from transformers import AutoModelForImageSegmentation

    try:
        # trust_remote_code: RMBG-2.0 ships its BiRefNet code with the weights (birefnet.py), from RMBG_REVISION.
        model = AutoModelForImageSegmentation.from_pretrained(path, trust_remote_code=True, revision=RMBG_REVISION)
    except ImportError as err:  # its code needs packages the app does not (kornia, timm)
        raise ModelNotAvailableError(f"RMBG-2.0's code could not be imported ({err}): pip install kornia timm\n"
                                         + RMBG_HINT) from err
    logger.info("Loaded RMBG-2.0 from %s", path)
    return model.eval().float()


# ----------------------------------------------------------------------------------------------------
# 5. Infer: pure image functions, then one edit
# ----------------------------------------------------------------------------------------------------
def flatten_on_background(layer: Image.Image, color: tuple[int, int, int] = BACKGROUND_COLOR) -> Image.Image:
    """The layer composited ("over") on a flat colour: what the edit model sees."""
    background = Image.new("RGBA", layer.size, (*color, 255))
    return Image.alpha_composite(background, layer.convert("RGBA")).convert("RGB")


def chroma_key_matte(image: Image.Image, color: tuple[int, int, int] = BACKGROUND_COLOR,
                     tolerance: tuple[float, float] = CHROMA_KEY_TOLERANCE) -> Image.Image:
    """Alpha ("L") from each pixel's RGB distance to the known background colour (see CHROMA_KEY_TOLERANCE).

    A few lines of numpy: the maintained matting libraries (pymatting, rembg's alpha matting) need a trimap
    or a model, and a known flat background needs neither.
    """
    low, high = tolerance
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = np.linalg.norm(rgb - np.asarray(color, dtype=np.float32), axis=-1)
    alpha = np.clip((distance - low) / (high - low), 0.0, 1.0)
    return Image.fromarray(np.round(alpha * 255).astype(np.uint8), mode="L")


def unmix_background(image: Image.Image, alpha: Image.Image,
                     color: tuple[int, int, int] = BACKGROUND_COLOR) -> Image.Image:
    """RGBA with the background taken out of semi-transparent pixels, so edges carry no green fringe.

    A pixel over the background is C = a*F + (1 - a)*B; with B known, F = (C - (1 - a)*B) / a.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0
    foreground = (rgb - (1.0 - a) * np.asarray(color, dtype=np.float32)) / np.maximum(a, 1e-6)
    foreground = np.where(a > 0, np.clip(np.round(foreground), 0, 255), 0).astype(np.uint8)
    return Image.fromarray(np.dstack([foreground, np.asarray(alpha, dtype=np.uint8)]), mode="RGBA")


def rmbg_matte(model, image: Image.Image) -> Image.Image:
    """Alpha ("L") at the image's size from RMBG-2.0 (its last output, through a sigmoid, as in its model card)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resized = np.asarray(image.convert("RGB").resize((RMBG_INPUT_SIZE, RMBG_INPUT_SIZE), Image.BILINEAR), np.float32)
    normalized = (resized / 255.0 - np.asarray(RMBG_MEAN, np.float32)) / np.asarray(RMBG_STD, np.float32)
    batch = torch.from_numpy(normalized.transpose(2, 0, 1)).unsqueeze(0).to(device)
    try:
        model.to(device)
        with torch.inference_mode():
            prediction = model(batch)[-1].sigmoid()[0, 0].float().cpu().numpy()
    finally:
        model.to("cpu")
    mask = Image.fromarray(np.round(prediction * 255).astype(np.uint8), mode="L")
    return mask.resize(image.size, Image.BILINEAR)


def choose_matte(matte: str, rmbg) -> str:
    """"rmbg" or "chroma_key" for the requested `matte`, given whether RMBG-2.0 is loaded."""
    if matte not in MATTES:
        raise ValueError(f"matte={matte!r} is not one of {MATTES}")
    if matte == "rmbg" and rmbg is None:
        raise ValueError("RMBG-2.0 is not loaded: put its weights in models/RMBG-2.0 and restart the tool, "
                         "or choose the chroma-key matte.")
    return "rmbg" if matte in ("auto", "rmbg") and rmbg is not None else "chroma_key"


@dataclasses.dataclass
class EditResult:
    image: Image.Image  # RGBA at the input layer's size
    edited: Image.Image  # the pipeline's RGB output, at its own size (~1024x1024 area)
    matte: str  # "rmbg" or "chroma_key": what recovered the alpha
    seed: int
    params: dict[str, Any]  # every input, for params.json
    duration_s: float


def edit_layer(
    loaded,
    layer: Any,
    prompt: str,
    negative_prompt: str = DEFAULTS["negative_prompt"],
    true_cfg_scale: float = DEFAULTS["true_cfg_scale"],
    num_inference_steps: int = DEFAULTS["num_inference_steps"],
    seed: int = DEFAULTS["seed"],
    randomize_seed: bool = DEFAULTS["randomize_seed"],
    matte: str = DEFAULTS["matte"],
    rmbg=None,
    stop=None,
) -> EditResult:
    """Edit one RGBA layer as `prompt` says; the result keeps the layer's size. The pipeline's tqdm reports steps.
    Setting `stop` (a threading.Event: the page's Stop, or its client leaving) ends the edit at its next step."""
    # 1. Check inputs.
    pipe = loaded.pipe
    rgba = to_rgba(layer)
    prompt = check_param("prompt", prompt).strip()  # text, at most PROMPT_MAX_CHARS
    if not prompt:
        raise ValueError("The prompt is empty: say what to change, e.g. 'make the cup red'.")
    num_inference_steps = check_param("num_inference_steps", num_inference_steps)
    true_cfg_scale = check_param("true_cfg_scale", true_cfg_scale)
    negative_prompt = check_param("negative_prompt", negative_prompt)
    seed = check_param("seed", seed)
    randomize_seed = check_param("randomize_seed", randomize_seed)
    matte_used = choose_matte(matte, rmbg)
    seed = random.randint(0, MAX_SEED) if randomize_seed else seed
    start = time.perf_counter()
    # 2. Put the layer on the flat green.
    flat = flatten_on_background(rgba)
    # 3. Edit at the pipeline's own size (~1024x1024 area, the model's), with the app's noise (CUDA on a GPU).
    #    The app's guarded run: memory freed after it (budget release, FirstBlockCache reset), OOM -> a message.
    #    (The pipeline resizes to its own ~1 MP whatever the layer's size, so a smaller layer would not help.)
    generator = app.noise_generator(pipe, seed)
    edited = app.run_pipeline(
        loaded, lambda: pipe(image=flat, prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                           num_inference_steps=num_inference_steps, num_images_per_prompt=1, generator=generator,
                           callback_on_step_end=app.stop_callback(stop)).images[0],
        app.out_of_memory_message(loaded, job="edit", program="tool"), stop=stop)
    # 4. Back to the layer's size, then the alpha: matted at the size it is delivered at.
    resized = edited.convert("RGB").resize(rgba.size, Image.LANCZOS)
    alpha = rmbg_matte(rmbg, resized) if matte_used == "rmbg" else chroma_key_matte(resized)
    image = unmix_background(resized, alpha)
    params = dict(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=float(true_cfg_scale),
                  num_inference_steps=num_inference_steps, seed=seed, randomize_seed=bool(randomize_seed),
                  matte=matte, matte_used=matte_used, background_color=list(BACKGROUND_COLOR),
                  input_size=list(rgba.size), model_size=list(edited.size), generator_device=generator.device.type)
    return EditResult(image=image, edited=edited, matte=matte_used, seed=seed, params=params,
                      duration_s=time.perf_counter() - start)


EDITS_DIR = "edits"  # inside the outputs folder: one folder per edit


def save_edit(result: EditResult, layer: Image.Image, outputs: Path, run_info: dict[str, Any] | None = None) -> Path:
    """One run folder under outputs/edits: input.png, edited.png (RGBA), edited_on_green.png, params.json; written
    under a temporary name and renamed when complete (`studio.runs.atomic_run_folder`), like the app's run folders."""
    with atomic_run_folder(Path(outputs) / EDITS_DIR, result.seed) as (partial, final):
        to_rgba(layer).save(partial / "input.png")
        result.image.save(partial / "edited.png")
        result.edited.save(partial / "edited_on_green.png")
        params = dict(result.params, duration_s=round(result.duration_s, 3), **(run_info or {}))
        (partial / "params.json").write_text(json.dumps(params, indent=2, ensure_ascii=False), encoding="utf-8")
    return final


def prune_edits(settings, just_saved: Path) -> list[Path]:
    """The app's outputs limits (--outputs-max-gb, --outputs-max-age-hours) on outputs/edits, oldest first; the edit
    just saved always stays."""
    return prune_outputs(Path(settings.outputs) / EDITS_DIR, settings.outputs_max_gb * 1e9,
                         settings.outputs_max_age_hours * 3600, keep=just_saved)


# ----------------------------------------------------------------------------------------------------
# 7. UI
# ----------------------------------------------------------------------------------------------------
MATTE_CHOICES = [("Auto: RMBG-2.0 when loaded, else chroma key", "auto"), ("RMBG-2.0", "rmbg"),
                 ("Chroma key on the green (no model; green parts of the layer turn partly transparent)", "chroma_key")]


def build_ui(loaded, settings, rmbg=None, matte: str = DEFAULTS["matte"]):
    """The Gradio Blocks app. The handler only maps widget values to `edit_layer`/`save_edit` arguments."""
    use_process_cache(settings.outputs)  # before gradio is imported: it reads GRADIO_TEMP_DIR then
    import gradio as gr
    from gradio.utils import get_upload_folder

    run_info = loaded.run_info()
    sessions = Sessions()  # each session's running edit: Stop, or the session ending (the page closed, the studio's
    # "Edit this layer" client gone), stops it at its next step

    def edit(image, prompt, seed=DEFAULTS["seed"], randomize_seed=DEFAULTS["randomize_seed"],
             true_cfg_scale=DEFAULTS["true_cfg_scale"], num_inference_steps=DEFAULTS["num_inference_steps"],
             negative_prompt=DEFAULTS["negative_prompt"], matte=matte, request: gr.Request = None,
             progress=gr.Progress(track_tqdm=True)):
        if image is None:
            raise gr.Error("No layer: upload an RGBA image (a PNG with transparency) first.", duration=None)
        session = getattr(request, "session_hash", None)
        stop = sessions.start_job(session)
        try:
            # Uploads only (`app.readable_upload`), then the app's reader: size checked before decoding, messages
            # that name the file.
            layer = to_rgba(readable_upload(image, demo.upload_file_set, get_upload_folder()))
            result = edit_layer(loaded, layer, prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                                num_inference_steps=num_inference_steps, seed=seed, randomize_seed=randomize_seed,
                                matte=matte, rmbg=rmbg, stop=stop)
            folder = save_edit(result, layer, settings.outputs, run_info)
            prune_edits(settings, folder)
        except (ValueError, OutOfMemoryError, RunStopped) as err:
            raise gr.Error(str(err), duration=None) from err  # stays on the page until closed
        except Exception as err:  # a bug or the machine: the details stay in the server log
            raise gr.Error(client_error(err, "editing the layer"), duration=None) from err
        finally:
            sessions.end_job(session, stop)
        logger.info("Edit saved in %s (%.1f s, matte %s)", folder, result.duration_s, result.matte)
        # The folder's name only: the page is no place for the server's paths.
        return result.image, result.seed, f"Alpha recovered by **{result.matte}**. Saved as `edits/{folder.name}`."

    # delete_cache: Gradio deletes its uploads and result copies on the app's schedule, and all of them at exit.
    with gr.Blocks(title="Edit an RGBA layer", delete_cache=gradio_cache_schedule(settings)) as demo:
        gr.Markdown("# Edit an RGBA layer\nQwen-Image-Edit-2509 edits the layer on a flat green; the transparency "
                    "is recovered afterwards. The result keeps the layer's size.")
        if loaded.demo:
            gr.Markdown("**Demo model in use** — tiny random weights: everything runs, but the edits are noise.")
        if rmbg is None:
            gr.Markdown("RMBG-2.0 is not loaded (put it in `models/RMBG-2.0`): alpha comes from the chroma key.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Layer (RGBA)", type="pil", image_mode="RGBA")
                prompt = param_widget(gr, PARAM["prompt"], label="Edit instruction", lines=2,
                                      placeholder="e.g. make the cup red")
                with gr.Accordion("Advanced settings", open=False):
                    with gr.Row():
                        seed, randomize_seed = (param_widget(gr, PARAM[name], value=DEFAULTS[name])
                                                for name in ("seed", "randomize_seed"))
                    true_cfg_scale, num_inference_steps, negative_prompt = (
                        param_widget(gr, PARAM[name], value=DEFAULTS[name])
                        for name in ("true_cfg_scale", "num_inference_steps", "negative_prompt"))
                    matte_choice = gr.Radio(MATTE_CHOICES, value=matte, label="Alpha recovery")
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", scale=3)
                    stop_button = gr.Button("Stop", variant="stop", scale=1)
            with gr.Column():
                result = gr.Image(label="Edited layer", type="pil", image_mode="RGBA", format="png", interactive=False)
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                info = gr.Markdown()
        edit_event = gr.on([run.click, prompt.submit], edit,
              inputs=[image, prompt, seed, randomize_seed, true_cfg_scale, num_inference_steps, negative_prompt,
                      matte_choice],
              outputs=[result, used_seed, info], api_name="edit",
              # The handler takes Gradio's raw file value: `readable_upload` checks it (Gradio checks a value's
              # path only when it carries its `meta` key, and its cache holds more than uploads), and `to_rgba`
              # reads it with the app's checks and messages (Gradio's preprocess would fail with its own dump).
              preprocess=False,
              concurrency_limit=1)  # one GPU job at a time; others wait in Gradio's queue
        # Stop: Gradio cancels the event on the page, and the pipeline stops at its next step (a cancelled event's
        # thread would run on). Not in the queue of the edits: it must not wait for one.
        def stop_edit(request: gr.Request):
            sessions.stop(request.session_hash)

        def end_session(request: gr.Request):
            sessions.end(request.session_hash)

        stop_button.click(stop_edit, None, None, cancels=[edit_event], api_visibility="private",
                          concurrency_limit=None)
        demo.unload(end_session)
    demo.queue(default_concurrency_limit=1)
    return demo


# ----------------------------------------------------------------------------------------------------
# 8. main
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edit_rgba_image.py", description=__doc__.split("\n")[0])
    parser.add_argument("--matte", default=DEFAULTS["matte"], choices=MATTES,
                        help="alpha recovery: auto (RMBG-2.0 when available, else chroma key), rmbg, chroma_key")
    add_flags(parser, FLAGS, "edit")  # --offload, --model, --demo, --auth, ... from the app's table
    return parser.parse_args(argv)


@exits_with_message
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ns = parse_args(argv)
    settings = app.Settings(**flag_values(ns, FLAGS))
    for leftover in [*clean_partial_runs(Path(settings.outputs) / EDITS_DIR), *clean_gradio_caches(settings.outputs)]:
        logger.info("Deleted %s: left by a process that no longer runs", leftover)
    app.print_environment_info(app.environment_info())
    loaded = app.load_pipeline(settings, EDIT_MODEL)  # no weights, or the machine cannot fit the mode: exit 2
    rmbg = None
    if ns.matte != "chroma_key":
        try:
            rmbg = load_rmbg(settings.models_dir, allow_download=not settings.demo)
        except ModelNotAvailableError as err:
            if ns.matte == "rmbg":
                print(f"error: {err}", file=sys.stderr)
                return 2
            logger.warning("Alpha recovery falls back to the chroma key:\n%s", err)
    demo = build_ui(loaded, settings, rmbg, ns.matte)
    if network_warning(settings):
        logger.warning(network_warning(settings))
    print(f"Serving on http://{settings.host}:{settings.port}")
    stop_on_sigterm()  # SIGTERM closes Gradio like Ctrl+C: its cache is cleared
    demo.launch(**launch_options(settings))
    delete_gradio_files(demo)
    remove_process_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
