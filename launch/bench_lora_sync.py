"""LoRA weight sync: bytes moved and time per sync, the merged route (the product) against vLLM's
LoRA-adapter route (measured only), side by side on the tiny model, and bytes at 7B.

    .venv/bin/python launch/bench_lora_sync.py [--rank 8] [--repeats 5] [--json out.json]

(a) merged (what engine/learner.py and rollout/worker.py do): a peft policy's weights with the
    adapters merged layer by layer (engine/lora.py `MergedWeights`), copied to host memory, loaded
    by a rollout worker through vLLM's reload API; bytes = every exported tensor.
(b) adapter: the adapter written as a peft folder (`save_pretrained`) and loaded by a vLLM engine
    started with `enable_lora` as a new adapter version (`add_lora` with a fresh id); bytes = the
    adapter file. Its log-probs of a fixed sequence are compared with the merged engine's.
Both also report decode throughput (8 prompts x 32 sampled tokens): the adapter route computes
the adapters at every generated token, the merged route never.
(c) bytes per sync for Qwen2.5-VL-7B with the PathReasoner preset's adapters (rank 64 on the seven
    projections of the language model), counted on a meta-device skeleton.

Each route runs in a child process of its own (no Ray) with the rollout worker's engine arguments,
and syncs `--repeats` times, new adapter values each time; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import lora  # noqa: E402
from rollout.worker import RolloutWorker, engine_env, engine_kwargs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "artifacts", "tiny-qwen2.5-vl")
PROMPT = "<|im_start|>user\nIs this H&E?<|im_end|>\n<|im_start|>assistant\n<think>Pink and purple.</think><answer>A</answer>"


def _lora_cfg(rank: int) -> dict:
    return {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "train_vision": False,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _policy(path: str, rank: int):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)  # the same A in both routes' processes
    model = lora.wrap(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), _lora_cfg(rank))
    model.eval()
    return model


@torch.no_grad()
def _new_adapters(model, seed: int) -> None:
    """Adapter values as after some training: B no longer 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _merged(model, scale: float) -> dict[str, torch.Tensor]:
    tied = getattr(model.get_base_model().config, "tie_word_embeddings", False)
    skip = {"lm_head.weight"} if tied else set()
    return {k: v.to("cpu", copy=True).contiguous() for k, v in lora.MergedWeights(model.state_dict(), scale, skip).items()}


def _decode_tokens_per_s(llm, **kwargs) -> float:
    """Sampled tokens per second of 8 copies of PROMPT, 32 new tokens each (median of 3 rounds after
    a warm-up round): what the route costs every generated token."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=32, ignore_eos=True, temperature=1.0, seed=0)
    llm.generate([PROMPT] * 8, params, use_tqdm=False, **kwargs)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = llm.generate([PROMPT] * 8, params, use_tqdm=False, **kwargs)
        rates.append(sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t0))
    return statistics.median(rates)


def _scored(logprobs: list) -> torch.Tensor:
    return torch.tensor([x for x in logprobs if x is not None], dtype=torch.float64)


def merged_route(path: str, rank: int, repeats: int) -> tuple[dict, torch.Tensor]:
    model, scale = _policy(path, rank), lora.scaling(_lora_cfg(rank))
    worker = RolloutWorker(0, path, sampling={"max_tokens": 1})
    export_s, load_s, nbytes = [], [], 0
    for i in range(repeats):
        _new_adapters(model, i)
        t0 = time.perf_counter()
        weights = _merged(model, scale)
        export_s.append(time.perf_counter() - t0)
        load_s.append(worker.load_weights(weights))
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    _, logprobs = worker.prompt_logprobs(PROMPT, [])
    tokens_per_s = worker._call(lambda: _decode_tokens_per_s(worker.llm))  # on the engine's own thread
    return ({"bytes": nbytes, "export_s": statistics.median(export_s), "load_s": statistics.median(load_s),
             "sync_s": statistics.median(e + l for e, l in zip(export_s, load_s)), "decode_tokens_per_s": tokens_per_s},
            _scored(logprobs))


def adapter_route(path: str, rank: int, repeats: int) -> tuple[dict, torch.Tensor | None]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model = _policy(path, rank)
    engine_env(1.0)
    kwargs = engine_kwargs(path, "float32", 1024, 0, True, 1, 0.5, 1)
    try:
        llm = LLM(**kwargs, enable_lora=True, max_lora_rank=rank, max_loras=1)
    except Exception as e:  # the route's answer on this platform
        return {"works": False, "error": f"{type(e).__name__}: {e}"[:500]}, None
    save_s, load_s, nbytes = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        request = None
        for i in range(repeats):
            _new_adapters(model, i)
            folder = os.path.join(tmp, f"v{i}")
            t0 = time.perf_counter()
            model.save_pretrained(folder)
            save_s.append(time.perf_counter() - t0)
            nbytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
            request = LoRARequest(f"policy-v{i}", i + 1, folder)
            t0 = time.perf_counter()
            try:
                llm.llm_engine.add_lora(request)
            except Exception as e:
                return {"works": False, "error": f"{type(e).__name__}: {e}"[:500]}, None
            load_s.append(time.perf_counter() - t0)
            if i:
                llm.llm_engine.remove_lora(i)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        out = llm.generate([PROMPT], params, lora_request=request, use_tqdm=False)[0]
        tokens_per_s = _decode_tokens_per_s(llm, lora_request=request)
    logprobs = [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
    return ({"works": True, "bytes": nbytes, "save_s": statistics.median(save_s), "load_s": statistics.median(load_s),
             "sync_s": statistics.median(s + l for s, l in zip(save_s, load_s)), "decode_tokens_per_s": tokens_per_s},
            _scored(logprobs))


def bytes_at_7b(rank: int = 64) -> dict:
    """Per-sync bytes for Qwen2.5-VL-7B in bf16: the merged weights, and the adapters alone."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                     "tie_word_embeddings": False},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
        tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    modules = dict(model.named_modules())
    layers, _ = lora.target_layers(model, _lora_cfg(rank))
    adapter = sum(rank * (modules[n].in_features + modules[n].out_features) for n in layers)
    full = sum(p.numel() for p in model.parameters())
    return {"params": full, "merged_bytes_bf16": 2 * full, "adapter_params": adapter, "adapter_bytes_bf16": 2 * adapter}


def _in_child(route, args):
    """`route` in a fresh process: one in-process vLLM engine per process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(route, args.model, args.rank, args.repeats).result()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TINY, help="Hugging Face Qwen2.5-VL folder (default: the tiny model)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    merged, merged_lp = _in_child(merged_route, args)
    adapter, adapter_lp = _in_child(adapter_route, args)
    if adapter_lp is not None:
        adapter["max_abs_logprob_diff_vs_merged"] = float((adapter_lp - merged_lp).abs().max())
    result = {"model": args.model, "rank": args.rank, "repeats": args.repeats, "merged": merged, "adapter": adapter,
              "qwen2.5-vl-7b_rank64": bytes_at_7b()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
