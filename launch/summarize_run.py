"""Prints what a run learned: the reward curve (first vs last steps), evaluation and timings (an SFT
stage: its training and validation loss), and writes PNG plots (engine/plots.py), several runs overlaid:

    python launch/summarize_run.py --config launch/configs/demo.yaml [overrides…]
    python launch/summarize_run.py runs/demo runs/demo_dapo [--plots DIR]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import load_config  # noqa: E402
from engine.plots import plot_runs  # noqa: E402


def summarize(records: list[dict], window: int = 5) -> dict:
    rl = [r for r in records if r.get("stage") == "rl" and r.get("step", 0) >= 1]  # step 0: the baseline eval
    if not rl:
        sft = [r for r in records if r.get("stage") == "sft"]
        val = [r["sft/val_nll"] for r in sft if "sft/val_nll" in r]
        return {"sft_steps": len(sft), "sft/nll": {"first": sft[0].get("sft/nll"), "last": sft[-1].get("sft/nll")},
                "sft/val_nll": {"first": val[0], "last": val[-1]} if val else None} if sft else {}
    # Disjoint windows: in a run shorter than 2·window each takes half its steps (the middle one, of
    # an odd count, in neither), so a short run's gain is not 0 by construction.
    window = min(window, len(rl) // 2) or 1
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
    parser.add_argument("--config", help="the run's config (its run folder is summarised)")
    parser.add_argument("args", nargs="*", help="with --config: section.field=value overrides; else run folders")
    parser.add_argument("--plots", help="folder for the PNG plots (default: <run>/plots, or runs/compare-<a>-<b>…)")
    args = parser.parse_args()
    if args.config:
        cfg = load_config(args.config, args.args)
        runs = [os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name)]
    else:
        runs = args.args
    if not runs:
        parser.error("give --config or one or more run folders")
    summaries = {}
    for run in runs:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            summaries[run] = summarize([json.loads(line) for line in f if line.strip()])
    print(json.dumps(summaries[runs[0]] if len(runs) == 1 else summaries, indent=2))
    if any(s.get("steps") for s in summaries.values()):
        names = [os.path.basename(os.path.normpath(r)) for r in runs]
        out = args.plots or (os.path.join(runs[0], "plots") if len(runs) == 1 else
                             os.path.join(os.path.dirname(os.path.normpath(runs[0])), "compare-" + "-".join(names)))
        print("plots:", ", ".join(plot_runs(runs, out)))


if __name__ == "__main__":
    main()
