"""Prints what a run learned: the reward curve (first vs last steps), evaluation and timings (an SFT
stage: its training and validation loss).

    python launch/summarize_run.py --config launch/configs/demo.yaml [overrides…]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import load_config  # noqa: E402


def summarize(records: list[dict], window: int = 5) -> dict:
    rl = [r for r in records if r.get("stage") == "rl" and r.get("step", 0) >= 1]  # step 0: the baseline eval
    if not rl:
        sft = [r for r in records if r.get("stage") == "sft"]
        val = [r["sft/val_nll"] for r in sft if "sft/val_nll" in r]
        return {"sft_steps": len(sft), "sft/nll": {"first": sft[0].get("sft/nll"), "last": sft[-1].get("sft/nll")},
                "sft/val_nll": {"first": val[0], "last": val[-1]} if val else None} if sft else {}
    first, last = rl[:window], rl[-window:]

    def avg(rows, key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else float("nan")

    out = {"steps": len(rl)}
    for key in ("reward/mean", "reward/accuracy", "reward/format", "response_length/mean"):
        out[key] = {"first": avg(first, key), "last": avg(last, key)}
    out["reward_gain"] = out["reward/mean"]["last"] - out["reward/mean"]["first"]
    evals = [r for r in records if r.get("stage") == "rl" and "eval/reward/mean" in r]
    if evals:
        out["eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    out["seconds"] = {"rl_steps": sum(r.get("timing/step", 0.0) for r in rl),
                      "sft": sum(sum(v for k, v in r.items() if k.startswith("timing/"))
                                 for r in records if r.get("stage") == "sft")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    path = os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    print(json.dumps(summarize(records), indent=2))


if __name__ == "__main__":
    main()
