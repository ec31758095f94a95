"""The demo model: the real classes at toy size with random weights, built offline (`--demo`), for machines
without the 57 GB of weights. It loads through the same `from_pretrained` path; its layers are noise.
"""

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)



# Qwen's special tokens the pipeline's prompt templates use.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
# The layered pipeline's caption and prompt templates: the demo tokenizer learns its merges from them.
LAYERED_DEMO_CORPUS = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                       "relationships of the objects and background. You are a helpful assistant. Image Annotator.")


def build_demo_components(corpus: str) -> dict[str, Any]:
    """The parts every tiny Qwen-Image pipeline shares: tokenizer, Qwen2.5-VL text encoder, processor, scheduler.

    Used by `build_demo_pipeline` here and by the edit tool's demo builder (src/tool/edit_rgba_image.py).
    Seeds torch, so every machine builds the same demo weights; build the pipeline's own models right after.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    # 1. A byte-level BPE tokenizer (Qwen2's kind) trained on the pipeline's own templates.
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    # 2. The text encoder. Seeded, so every machine builds the same demo weights.
    torch.manual_seed(0)
    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
                       rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                         window_size=28)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])).eval()
    # The caption sees at most 112x112 px (16 vision tokens) so a 512-token caption stays ~2 s on a CPU.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor)
    # 3. The published scheduler config of Qwen-Image (Qwen-Image-Edit-2509 ships the same one).
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, processor=processor, scheduler=scheduler)


def save_demo_pipeline(pipe, path: Path, note: str) -> Path:
    """Save next to the target, then rename: a half-written folder is never taken for a model."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    pipe.save_pretrained(partial)
    (partial / "DEMO_MODEL.txt").write_text(note + "\n")
    partial.rename(path)
    return path


def build_demo_pipeline(path: Path) -> Path:
    """Build (once) a tiny random QwenImageLayeredPipeline of the real classes and save it to `path`.

    It loads through the same `from_pretrained` path as the real weights, so everything but the output
    quality is exercised: its layers are noise. Cached: an existing `model_index.json` means done.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    from diffusers import AutoencoderKLQwenImage, QwenImageLayeredPipeline, QwenImageTransformer2DModel

    logger.info("Building the tiny demo pipeline in %s", path)
    # 1. Tokenizer, text encoder, processor and scheduler (seeds torch: the weights below follow from it).
    components = build_demo_components(LAYERED_DEMO_CORPUS)
    # 2. The real DiT's switches (layer-3D RoPE, the RGB/RGBA t-cond), at 4 blocks of width 32 (enough blocks
    #    for FirstBlockCache to have a tail to skip). in_channels = 4 * z_dim: latents are packed in 2x2 patches.
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=32, out_channels=8, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), use_additional_t_cond=True, use_layer3d_rope=True)
    # RGBA in (input_channels=4). z_dim must differ from 4: the pipeline tells images from latents by channels.
    # base_dim=2: the full-size convolutions are the demo's main CPU cost (a 2-layer run: 2.0 s, not 2.8 s, and its
    # noise layers save in 0.6 s, not 1.8 s).
    vae = AutoencoderKLQwenImage(base_dim=2, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], input_channels=4,
                                 latents_mean=[0.0] * 8, latents_std=[1.0] * 8)

    # 3. Save (atomically).
    pipe = QwenImageLayeredPipeline(vae=vae, transformer=transformer, **components)
    return save_demo_pipeline(pipe, path, "Tiny random Qwen-Image-Layered pipeline built by src/app.py --demo. "
                                          "Its layers are noise.")


def is_demo_model(path: Path | str) -> bool:
    return (Path(path) / "DEMO_MODEL.txt").is_file()
