"""PNG plots of one or more runs' metrics.jsonl (RL steps), several runs overlaid: written to
runs/<run>/plots/ at the end of a run, and on demand by `launch/summarize_run.py runs/a runs/b …`."""

from __future__ import annotations

import json
import os
from typing import Any

PANELS = {  # file name: (title, metric names or a prefix ending in "/")
    "reward": ("reward and its components", ["reward/"]),
    "accuracy": ("accuracy (sampled; greedy on validation)", ["reward/accuracy", "eval/greedy_accuracy"]),
    "response_length": ("response length (tokens)", ["response_length/mean"]),
    "kl": ("KL to the reference", ["kl"]),
    "entropy": ("entropy (nats/token)", ["entropy"]),
    "clipfrac": ("clipped fraction", ["clipfrac"]),
    "dynamic_sampling": ("dynamic sampling", ["dapo/yield", "dapo/filtered_frac"]),
}
SKIP = ("reward/errors",)


def read_rl(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("stage", "rl") == "rl"]


def _keys(rows: list[dict[str, Any]], wanted: list[str]) -> list[str]:
    present = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = []
    for w in wanted:
        out += [k for k in present if (k.startswith(w) if w.endswith("/") else k == w) and k not in SKIP]
    return out


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """Writes one PNG per panel that has data (and the step-time breakdown) into `out_dir`; returns
    the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {os.path.basename(os.path.normpath(d)): read_rl(d) for d in run_dirs}
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (title, wanted) in PANELS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for run, rows in runs.items():
            for key in _keys(rows, wanted):
                points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points), marker="." if len(points) < 30 else None,
                            label=f"{run}: {key}" if len(runs) > 1 else key)
                    drawn += 1
        if drawn:
            ax.set(title=title, xlabel="step")
            ax.legend(fontsize="small")
            written.append(_save(fig, out_dir, name))
        plt.close(fig)
    for run, rows in runs.items():
        phases = [k for k in _keys(rows, ["timing/"]) if k != "timing/step"]
        steps = [r for r in rows if r.get("step", 0) >= 1]
        if not phases or not steps:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.stackplot([r["step"] for r in steps], [[r.get(k, 0.0) or 0.0 for r in steps] for k in phases],
                     labels=[k.split("/", 1)[1] for k in phases])
        ax.set(title=f"step time by phase (s){': ' + run if len(runs) > 1 else ''}", xlabel="step")
        ax.legend(fontsize="small", loc="upper left")
        written.append(_save(fig, out_dir, "step_time" + (f"_{run}" if len(runs) > 1 else "")))
        plt.close(fig)
    return written


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
