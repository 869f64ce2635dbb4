"""One RL step, side by side in one run: ours with the shared-prefix learner passes on and off, and
Hugging Face TRL's `GRPOTrainer` on the same tiny model, data and settings.

    .venv/bin/python launch/bench_step.py [--config launch/configs/demo.yaml] [--steps 7] [--json out.json]
                                          [--trl-venv /tmp/pathorl-trl-venv | --no-trl] [override ...]

Ours: two `launch/rl.py` runs (local Ray) of the config with `sft.steps=0` (TRL has no warm-up), no
evaluation, `learner.shared_prefix` true then false; each phase's time comes from metrics.jsonl
(`timing/<phase>`), the learner's token counts per pass (`learner/pass_tokens`, padded, and the
unique tokens) and its peak memory (`learner/peak_memory_gb`) from the update's statistics. The
last step (final evaluation, checkpoint) and the first (warm-up) are left out of the medians.
TRL: `launch/trl_step.py` inside a throwaway virtualenv that `make_trl_venv` creates (TRL is not a
project dependency), same config and overrides, medians over steps 2..N-1 as well.

The learner passes are the reference (and old-policy) pass plus the update: the shared-vs-unshared
speedup is their time unshared over their time shared. TRL's step time is compared with ours shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.trl_step import make_trl_venv  # noqa: E402

COMMON = ["sft.steps=0", "trainer.eval_every=0", "data.val=null", "trainer.save_every=0"]


def _ours(config: str, out: str, name: str, steps: int, overrides: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "launch/rl.py", "--config", config, f"trainer.output_dir={out}", f"trainer.run_name={name}",
           f"trainer.steps={steps}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("stage") == "rl"][1:-1]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    result = {k: median(f"timing/{k}") for k in ("step", "rollout", "reward", "old_ref_logprobs", "update", "weight_sync")}
    result["step_s"] = result.pop("step")
    result["learner_passes_s"] = result["old_ref_logprobs"] + result["update"]
    result["generated_tokens"] = median("response_length/total")
    result["rollout_tokens_per_s"] = statistics.median(r["response_length/total"] / r["timing/rollout"] for r in rows)
    for key in ("pass_tokens", "pass_padded_tokens", "unique_tokens", "peak_memory_gb"):
        result[key] = median(f"learner/{key}")
    result["reward_mean"] = median("reward/mean")
    return result


def _trl(venv: str, config: str, steps: int, overrides: list[str]) -> dict[str, float]:
    python = make_trl_venv(venv)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [python, "launch/trl_step.py", "--config", config, "--steps", str(steps - 1), "--json", out.name,
               *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        with open(out.name) as f:
            report = json.load(f)
    m = report["median"]
    return {"step_s": m["step_s"], "rollout": m["rollout_s"], "reward": m["reward_s"], "old_ref_logprobs": m["ref_logprob_s"],
            "update": m["update_s"], "learner_passes_s": m["ref_logprob_s"] + m["update_s"],
            "generated_tokens": m["generated_tokens"], "rollout_tokens_per_s": m["rollout_tokens_per_s"],
            "reward_mean": m["reward"], "trl_version": report["trl_version"]}


def _learner_passes(config: str, overrides: list[str], model_path: str, repeats: int) -> dict[str, Any]:
    """The learner's two passes over one step's sequences, shared prefix against unshared, in this
    process and interleaved (shared, unshared, shared, …), without Ray, vLLM or DeepSpeed around
    them: a no-grad log-prob pass (the reference pass) and a forward + backward (the update's), cut
    into micro-batches by `make_shards` and collated as the learner does (`engine.collate`), the
    log-probs through the learner's kernel API. Responses are the step's full length (as untrained
    policies write them). The optimizer step, the same in both, is left out."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from engine.collate import collate, collate_shared, selected_hidden
    from engine.config import load_config
    from engine.data import PromptBuilder, load_rows
    from engine.learner import Sequence
    from engine.learner_group import make_shards
    from kernels import logprobs_from_hidden

    cfg = load_config(config, overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    builder = PromptBuilder.from_config(AutoProcessor.from_pretrained(model_path), cfg.data)
    rows, _ = load_rows(cfg.data.train)
    prompts = [builder.build(r) for r in rows[: cfg.rollout.prompts_per_step]]
    images = [(p.pixel_values, p.image_grid_thw) for p in prompts]
    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(prompt_ids=p.prompt_ids, image=i,
                     response_ids=torch.randint(0, 151000, (cfg.rollout.max_new_tokens,), generator=g).tolist())
            for i, p in enumerate(prompts) for _ in range(cfg.rollout.group_size)]
    ids = (model.config.image_token_id, [model.config.image_token_id, model.config.video_token_id])

    def batches(shared: bool) -> list[dict]:
        shard = make_shards(seqs, images, 1, cfg.learner.micro_batch_size, cfg.learner.max_tokens_per_micro_batch,
                            shared)[0]
        ends = torch.tensor(shard.micro_sizes).cumsum(0).tolist()
        parts = [shard.sequences[end - n:end] for n, end in zip(shard.micro_sizes, ends) if n]
        if shared:
            return [collate_shared(mb, shard.images, *ids, model.model.get_rope_index) for mb in parts]
        return [collate(mb, shard.images, *ids) for mb in parts]

    def logp(batch: dict) -> torch.Tensor:
        return logprobs_from_hidden(selected_hidden(model, batch, "cpu"), model.lm_head.weight, batch["targets"],
                                    temperature=cfg.rollout.temperature, backend=cfg.learner.logprob_backend)[0]

    for mode in ("shared", "unshared"):  # warm-up: first calls pay for allocator growth and kernel setup
        batch = batches(mode == "shared")[0]
        logp(batch).sum().backward()
        model.zero_grad(set_to_none=True)
    times: dict[str, dict[str, list[float]]] = {m: {"ref": [], "update": []} for m in ("shared", "unshared")}
    for _ in range(repeats):
        for mode in ("shared", "unshared"):
            made = batches(mode == "shared")
            t0 = time.perf_counter()
            with torch.no_grad():
                for batch in made:
                    logp(batch)
            t1 = time.perf_counter()
            for batch in made:
                logp(batch).sum().backward()
            model.zero_grad(set_to_none=True)
            times[mode]["ref"].append(t1 - t0)
            times[mode]["update"].append(time.perf_counter() - t1)
    both = [(s_ref + s_up, u_ref + u_up) for s_ref, s_up, u_ref, u_up in zip(
        times["shared"]["ref"], times["shared"]["update"], times["unshared"]["ref"], times["unshared"]["update"])]
    speedups = [u / s for s, u in both]
    return {"model": model_path, "sequences": len(seqs), "repeats": repeats, "times_s": times,
            "speedup": {"median": statistics.median(speedups), "min": min(speedups), "max": max(speedups)}}


def _table(results: dict[str, dict[str, float]]) -> str:
    cols = [("step_s", "step s", "{:.2f}"), ("rollout", "rollout s", "{:.2f}"),
            ("rollout_tokens_per_s", "rollout tok/s", "{:.0f}"), ("generated_tokens", "generated tok/step", "{:.0f}"),
            ("old_ref_logprobs", "ref pass s", "{:.2f}"), ("update", "update s", "{:.2f}"),
            ("learner_passes_s", "ref + update s", "{:.2f}"), ("pass_tokens", "learner tok/pass", "{:.0f}"),
            ("pass_padded_tokens", "padded tok/pass", "{:.0f}"), ("unique_tokens", "unique tok", "{:.0f}"),
            ("peak_memory_gb", "learner peak GiB", "{:.2f}")]
    lines = ["| | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = [fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "–" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=7, help="RL steps per run (medians over 2..steps-1)")
    parser.add_argument("--trl-venv", default=os.path.join(tempfile.gettempdir(), "pathorl-trl-venv"))
    parser.add_argument("--no-trl", action="store_true", help="ours only")
    parser.add_argument("--passes-model", action="append", default=[],
                        help="also time the learner's passes alone, shared vs unshared, on this model folder "
                             "(repeatable; e.g. a larger tiny model whose layers, not its LM head, dominate)")
    parser.add_argument("--passes-repeats", type=int, default=3)
    parser.add_argument("--no-steps", action="store_true", help="only the isolated learner passes")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3: the first and last steps are left out of the medians")
    summary: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "steps": args.steps}
    if not args.no_steps:
        results: dict[str, dict[str, float]] = {}
        os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="bench_step-", dir=os.path.join(ROOT, "runs")) as out:
            for name, shared in (("ours, shared prefix", "true"), ("ours, unshared", "false")):
                results[name] = _ours(args.config, out, name.split(", ")[1].replace(" ", "_"), args.steps,
                                      [f"learner.shared_prefix={shared}", *args.overrides])
        if not args.no_trl:
            results["TRL GRPOTrainer"] = _trl(args.trl_venv, args.config, args.steps, args.overrides)
        shared, unshared = results["ours, shared prefix"], results["ours, unshared"]
        summary.update(results=results,
                       shared_vs_unshared_learner_speedup=unshared["learner_passes_s"] / shared["learner_passes_s"],
                       shared_vs_unshared_ref_pass_speedup=unshared["old_ref_logprobs"] / shared["old_ref_logprobs"],
                       learner_tokens_unshared_over_shared=unshared["pass_tokens"] / shared["pass_tokens"])
        if "TRL GRPOTrainer" in results:
            trl = results["TRL GRPOTrainer"]
            summary["step_time_ratio_vs_trl"] = shared["step_s"] / trl["step_s"]
            summary["rollout_tokens_per_s_ratio_vs_trl"] = shared["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"]
        print(_table(results))
    summary["learner_passes_alone"] = [_learner_passes(args.config, args.overrides, path, args.passes_repeats)
                                       for path in args.passes_model]
    for passes in summary["learner_passes_alone"]:
        sp = passes["speedup"]
        print(f"learner passes alone on {passes['model']}: shared prefix {sp['median']:.2f}x faster "
              f"(range {sp['min']:.2f}-{sp['max']:.2f}, {passes['repeats']} interleaved repeats)")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
