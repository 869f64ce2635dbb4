"""Evaluates one or more models on a validation file with vLLM, the run's rewards and the metrics of
engine/evaluate.py (greedy accuracy, mean@n, unbiased pass@k, maj@n, format rate, mean length), per
data_source and overall, side by side in one Markdown table:

    python launch/eval.py --model base=artifacts/tiny-qwen2.5-vl --model rl=runs/demo/hf \\
        --data artifacts/demo-data/val.jsonl --n 8 --temperature 1.0 --json eval.json --samples eval.jsonl

`--config` (an RL config) supplies the system prompt, rewards, generation length and engine
settings (default: the engine's defaults, Patho-R1's rewards); `--rewards name=fn` replaces its
reward functions. `--json` holds {model: {"overall": {...}, "by_source": {source: {...}}}};
`--samples` one line per response (`model`, `uid`, `data_source`, `sample`: "greedy" or 0…n−1,
`correct` 0/1, `extracted` answer, `response`), from which the table can be recomputed. Runs a local
Ray instance (or the cluster in RAY_ADDRESS). Exit status 2 on a bad argument, path or row.
"""

import argparse
import json
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import yaml  # noqa: E402

from engine.config import ConfigError, RewardFunctionConfig, load_config  # noqa: E402
from engine.data import DataError, PromptBuilder, PromptStream, load_rows  # noqa: E402
from engine.evaluate import evaluate_prompts, markdown_table, summarize  # noqa: E402
from engine.preflight import model_problems  # noqa: E402
from engine.sampler import GroupSampler, start_pool  # noqa: E402
from rewards import RewardRunner, RewardSpec  # noqa: E402


def evaluate_model(cfg, model_path: str, rows: list[dict], n: int, temperature: float, correct: str,
                   threshold: float) -> list:
    """Judged responses of one model (engine/evaluate.py's RowResult per row)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    builder = PromptBuilder.from_config(processor, cfg.data)
    stream = PromptStream(rows, builder, cfg.data.bad_rows, cfg.trainer.seed, shuffle=False)
    prompts = []
    for row in rows:
        try:
            prompts.append(builder.build(row))
        except DataError as e:
            if cfg.data.bad_rows == "fatal":
                raise
            logging.warning("skipping bad row: %s", e)
    pool = start_pool(cfg, model_path)
    rewards = RewardRunner([RewardSpec(f.name, f.fn, f.weight, dict(f.kwargs), timeout_s=f.timeout_s)
                            for f in cfg.reward.functions], num_workers=cfg.reward.num_workers,
                           timeout_s=cfg.reward.timeout_s, on_error=cfg.reward.on_error,
                           fallback_score=cfg.reward.fallback_score)
    try:
        pool.wait_ready()
        sampler = GroupSampler(cfg, pool, stream, rewards, processor.tokenizer)
        return evaluate_prompts(sampler, prompts, n, temperature, correct, threshold)
    finally:
        rewards.close()
        pool.shutdown()


def _reward(spec: str) -> RewardFunctionConfig:
    name, sep, fn = spec.partition("=")
    fn, _, weight = fn.rpartition(":") if fn.count(":") > (1 if ".py:" in fn else 0) else (fn, "", "")
    if not sep or not name or not fn:
        raise ConfigError(f"--rewards {spec!r}: expected name=fn[:weight]")
    try:
        return RewardFunctionConfig(name=name, fn=fn, weight=float(weight or 1.0))
    except ValueError:
        raise ConfigError(f"--rewards {spec!r}: weight {weight!r} is not a number") from None


def _named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    return (name, path) if sep and name else (spec, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="[name=]Hugging Face folder (repeatable)")
    parser.add_argument("--data", required=True, help="validation rows (any form data.val takes: jsonl, parquet, "
                        "a save_to_disk folder; our, verl's or EasyR1's schema)")
    parser.add_argument("--config", help="RL config for system prompt, rewards and engine settings")
    parser.add_argument("--rewards", action="append", default=[], help="name=fn[:weight] (repeatable; replaces the config's)")
    parser.add_argument("--n", type=int, default=8, help="sampled responses per row besides the greedy one")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-rows", type=int, default=0, help="evaluate the first N rows (0: all)")
    parser.add_argument("--correct", default="accuracy", help="reward component that judges correctness")
    parser.add_argument("--threshold", type=float, default=1.0, help="score at or above which a response is correct")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--samples", help="write one jsonl line per response here")
    parser.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.n < 0 or not 0.01 <= args.temperature <= 2 or args.max_rows < 0:
            raise ConfigError(f"--n and --max-rows must be >= 0 and --temperature in [0.01, 2] (vLLM's range), got "
                              f"{args.n}, {args.max_rows} and {args.temperature}")
        cfg = load_config(args.config, args.overrides)
        if args.rewards:
            cfg.reward.functions = [_reward(spec) for spec in args.rewards]
        if args.correct not in {f.name for f in cfg.reward.functions}:
            raise ConfigError(f"--correct {args.correct!r} is not a reward component "
                              f"(components: {[f.name for f in cfg.reward.functions]})")
        models = [_named(m) for m in args.model]
        names = [name for name, _ in models]
        problems = [f"--model: the name {n!r} is given {names.count(n)} times (results are kept by name)"
                    for n in sorted(set(names)) if names.count(n) > 1]
        problems += [p for name, path in models for p in model_problems(path, f"--model {name}")]
        if problems:
            raise ConfigError("\n  ".join(problems))
        rows, _ = load_rows(args.data, cfg.data.bad_rows)
        rows = rows[: args.max_rows] if args.max_rows else rows
        if not rows:
            raise DataError(f"{args.data}: no row to evaluate")
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)
        results = {name: evaluate_model(cfg, path, rows, args.n, args.temperature, args.correct, args.threshold)
                   for name, path in models}
    except (ConfigError, DataError, OSError, ValueError, yaml.YAMLError) as e:
        print(f"launch/eval.py: {e}", file=sys.stderr)
        sys.exit(2)
    summaries = {name: summarize(rows_, args.n) for name, rows_ in results.items()}
    print(markdown_table(summaries))
    if args.json:
        finite = {name: {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in m.items()}
                  for name, m in summaries.items()}  # JSON has no NaN: a metric without a population is null
        with open(args.json, "w") as f:
            json.dump(finite, f, indent=1, allow_nan=False)
    if args.samples:
        with open(args.samples, "w") as f:
            for name, judged in results.items():
                for r in judged:
                    lines = [("greedy", int(r.greedy_correct), r.greedy_extracted, r.greedy_text)] + [
                        (i, int(s["correct"]), s["extracted"], s["text"]) for i, s in enumerate(r.samples)]
                    for sample, correct, extracted, text in lines:
                        f.write(json.dumps({"model": name, "uid": r.uid, "data_source": r.data_source, "sample": sample,
                                            "correct": correct, "extracted": extracted, "response": text}) + "\n")


if __name__ == "__main__":
    main()
