"""Synchronous vs one-step-off rollouts, side by side in one run: the demo (or any config) trained
with `rollout.max_staleness` 0 and then 1, every other setting equal.

    .venv/bin/python launch/bench_async.py [--config launch/configs/demo.yaml] [--out runs/bench-async]
                                           [--variants sync one_step_off sync_all_cores]
                                           [--json out.json] [override ...]

Every run gets `algorithm.tis_cap=2.0` (one-step-off needs it; on-policy samples weigh ≈ 1).
Variants: `sync` and `one_step_off` (max_staleness 0 and 1) give the engine and the learner one core
each (`rollout.cpu_threads=1`, `learner.torch_threads=1`), so that the one-step-off run has
something to overlap on two cores; `sync_all_cores` is the synchronous run with the config's own
threads (by default every core for each phase in turn), the best a synchronous run does here.
Reported per run: the median RL step time without evaluation and checkpoint time (steps 2..N),
the median time of each phase, the RL stage's wall time, the reward curve (mean reward per block of
10 steps) and the evaluations; the two runs' plots are overlaid in <out>/plots
(launch/summarize_run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.plots import plot_runs  # noqa: E402

PHASES = ("rollout", "reward", "old_ref_logprobs", "update", "prefetch_wait", "weight_sync")
OWN_CORES = ["rollout.cpu_threads=1", "learner.torch_threads=1"]
VARIANTS = {
    "sync": OWN_CORES + ["rollout.max_staleness=0"],
    "one_step_off": OWN_CORES + ["rollout.max_staleness=1"],
    "sync_all_cores": ["rollout.max_staleness=0"],
}


def _run(config: str, out: str, name: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "launch/rl.py", "--config", config, f"trainer.output_dir={out}",
           f"trainer.run_name={name}", "trainer.resume=off", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("stage") == "rl" and r["step"] > 0]
    train = [r["timing/step"] - r.get("timing/eval", 0.0) - r.get("timing/checkpoint", 0.0) for r in rows[1:]]
    rewards = [r["reward/mean"] for r in rows]
    return {
        "step_s": statistics.median(train),
        "rl_wall_s": sum(r["timing/step"] for r in rows),
        **{f"{p}_s": statistics.median(r.get(f"timing/{p}", 0.0) for r in rows[1:]) for p in PHASES},
        "reward_by_10_steps": [round(statistics.mean(rewards[i:i + 10]), 3) for i in range(0, len(rewards), 10)],
        "eval_accuracy": {r["step"]: r["eval/greedy_accuracy"] for r in rows if "eval/greedy_accuracy" in r},
        "staleness_mean": statistics.mean(r.get("staleness/mean", 0.0) for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="launch/configs/demo.yaml")
    ap.add_argument("--out", default="runs/bench-async")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    runs = {name: _run(args.config, out, name, ["algorithm.tis_cap=2.0", *VARIANTS[name], *args.overrides])
            for name in args.variants}
    results: dict = dict(runs)
    for base in ("sync", "sync_all_cores"):
        if base in runs and "one_step_off" in runs:
            results[f"step_time_ratio_one_step_off_vs_{base}"] = runs["one_step_off"]["step_s"] / runs[base]["step_s"]
            results[f"rl_wall_ratio_one_step_off_vs_{base}"] = runs["one_step_off"]["rl_wall_s"] / runs[base]["rl_wall_s"]
    plot_runs([os.path.join(out, name) for name in runs], os.path.join(out, "plots"))
    print(f"| | {' | '.join(['step s', 'RL wall s', *(p + ' s' for p in PHASES), 'reward by 10 steps', 'eval acc'])} |")
    for name, r in runs.items():
        cells = [f"{r['step_s']:.2f}", f"{r['rl_wall_s']:.0f}", *(f"{r[p + '_s']:.2f}" for p in PHASES),
                 " ".join(map(str, r["reward_by_10_steps"])), json.dumps(r["eval_accuracy"])]
        print(f"| {name} | {' | '.join(cells)} |")
    for key, value in results.items():
        if key.startswith(("step_time_ratio", "rl_wall_ratio")):
            print(f"{key}: {value:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
