"""Full training-state checkpoints: everything a run needs to continue exactly where it stopped.

    runs/<run>/checkpoints/step_<N>/
        learner/        DeepSpeed engine state of every rank (weights, optimizer, ZeRO partitions),
                        each rank's torch RNG, and the reference model when it is not model.path
        hf/             Hugging Face export (weights, config, tokenizer, processor): vLLM and
                        transformers load it, RL's model.path takes it
        trainer.pt      step, config, data stream (epoch and position: the epoch's order is
                        regenerated from the seed; pass-rate memory, bad and skipped rows),
                        sampler (carried-over groups with tokens, log-probs, rewards; counters),
                        the driver's RNGs
        COMPLETE.json   written last: the size of every file above

A checkpoint is written under `step_<N>.tmp/` and renamed when whole, so a crash mid-save leaves at
most a `.tmp` folder; one whose marker is missing or whose files disagree with it is incomplete:
`trainer.resume=auto` reports and skips it, an explicit path to it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from typing import Any

import numpy as np
import torch
import yaml

from engine.metrics import MetricsLog

log = logging.getLogger("pathorl.checkpoint")
MARKER = "COMPLETE.json"
STATE = "trainer.pt"
METRICS, LEDGER = "metrics.jsonl", "ledger.jsonl"
_NAME = re.compile(r"^step_(\d+)$")
_ROLLOUT_LOG = re.compile(r"^step_(\d+)\.msgpack$")  # rollout/records.py's RolloutLog


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or cannot continue this run: names the file."""


def path_for(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step}")


def begin(run_dir: str, step: int) -> str:
    """An empty temporary folder for step `step`'s checkpoint."""
    tmp = path_for(run_dir, step) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, state: dict[str, Any]) -> str:
    """Writes the trainer state and, last, the marker into `tmp`, then renames it to its final name."""
    torch.save(state, os.path.join(tmp, STATE))
    sizes = {}
    for folder, _, files in os.walk(tmp):
        for name in files:
            path = os.path.join(folder, name)
            sizes[os.path.relpath(path, tmp)] = os.path.getsize(path)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": state["step"], "files": sizes}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    final = tmp[: -len(".tmp")]
    if os.path.exists(final):  # the same step saved again (a resumed run that re-ran it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint (None when it is)."""
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        return f"{path} is not a folder"
    if not os.path.isfile(marker):
        return f"{path} has no {MARKER} (the save did not finish)"
    try:
        with open(marker) as f:
            sizes = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{marker} is unreadable ({e})"
    for rel, size in sizes.items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} is {os.path.getsize(file)} bytes, {MARKER} says {size} (truncated?)"
    if STATE not in sizes:
        return f"{path} holds no {STATE}"
    return None


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run; incomplete ones are reported and skipped."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = sorted((int(m.group(1)) for m in map(_NAME.match, os.listdir(folder)) if m), reverse=True)
    for step in steps:
        path = path_for(run_dir, step)
        why = problem(path)
        if why is None:
            return path
        log.warning("skipping incomplete checkpoint: %s", why)
    return None


def load_state(path: str) -> dict[str, Any]:
    """The trainer state of a complete checkpoint; CheckpointError naming the file otherwise."""
    why = problem(path)
    if why is not None:
        raise CheckpointError(f"trainer.resume: {why}")
    try:
        return torch.load(os.path.join(path, STATE), weights_only=False)
    except Exception as e:
        raise CheckpointError(f"trainer.resume: {os.path.join(path, STATE)} cannot be read ({type(e).__name__}: {e})")


def prune(run_dir: str, keep_last: int) -> list[str]:
    """Removes all but the newest `keep_last` complete checkpoints (never the newest complete one)
    and any leftover `.tmp` folders; returns what it removed."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    removed = [os.path.join(folder, n) for n in names if n.endswith(".tmp")]
    complete = sorted((int(m.group(1)) for m in map(_NAME.match, names)
                       if m and problem(os.path.join(folder, m.group(0))) is None), reverse=True)
    if keep_last > 0:
        removed += [path_for(run_dir, s) for s in complete[keep_last:]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# Fields a resumed run must share with its checkpoint: anything else may change and is logged.
MUST_MATCH = ("model.path", "model.dtype", "data.train", "data.shuffle", "data.system_prompt", "sft.train",
              "sft.batch_size", "sft.segment_weights", "sft.caption_instruction", "sft.max_length",
              "data.max_prompt_tokens", "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature",
              "learner.num_ranks", "learner.deepspeed_config", "algorithm.dynamic_sampling",
              "algorithm.filter_metric", "trainer.seed", "model.reference_path",
              # the engine state holds adapters of this shape on these layers (compared as in
              # `_lora_in_effect`: what the settings mean, not how they are written)
              "model.lora")


def _lora_in_effect(config: dict[str, Any]) -> dict[str, Any] | None:
    """A `to_dict(cfg)` tree's LoRA as the engine state holds it: None without adapters (rank 0 or
    null, whatever the other fields), else rank, α (null: 2·rank), the targets as a set, and
    train_vision; dropout changes nothing saved. Older checkpoints lack the section: no LoRA."""
    lora = (config.get("model") or {}).get("lora") or {}
    if not lora.get("rank"):
        return None
    return {"rank": lora["rank"], "alpha": lora["alpha"] if lora.get("alpha") is not None else 2.0 * lora["rank"],
            "target_modules": sorted(set(lora.get("target_modules") or [])),
            "train_vision": bool(lora.get("train_vision"))}


def compare(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(fields that forbid continuing the checkpoint, fields that changed safely), dotted names with
    both values. Configs are `to_dict(cfg)` trees; the run name and output folder never count."""
    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(current)
    for tree, flat_tree in ((saved, a), (current, b)):
        for k in [k for k in flat_tree if k.startswith("model.lora.")]:
            del flat_tree[k]
        flat_tree["model.lora"] = _lora_in_effect(tree)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and k not in ("trainer.run_name", "trainer.output_dir", "trainer.resume"))
    blocking = [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in changed if k in MUST_MATCH]
    safe = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed if k not in MUST_MATCH]
    return blocking, safe


def resolve(resume: str, run_dir: str, steps: int) -> str | None:
    """The checkpoint a run continues from, or None for a fresh start.

    "off": None. "auto": the newest complete checkpoint under `run_dir`, unless it is the last one
    of a run that finished (or already reaches `steps`): that run is not resumed, a rerun starts
    afresh. A path: that checkpoint, which must be complete (how a finished run is continued on
    purpose, with `steps` raised)."""
    if resume == "off":
        return None
    if resume == "auto":
        path = latest(run_dir)
        if path is None:
            return None
        state = load_state(path)
        return None if state.get("finished") or state["step"] >= steps else path
    why = problem(resume)
    if why is not None:
        raise CheckpointError(f"trainer.resume={resume}: {why}")
    step = load_state(resume)["step"]
    if step >= steps:
        raise CheckpointError(f"trainer.resume={resume} holds step {step}, and trainer.steps={steps}: nothing is left "
                              "to train (raise trainer.steps to continue it)")
    return resume


def rng_state() -> dict[str, Any]:
    """The driver's random generators (Python, NumPy, torch), for a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def archive_previous_run(run_dir: str) -> str | None:
    """Moves an earlier run's records (metrics.jsonl, ledger.jsonl, rollouts/, checkpoints/,
    config.yaml, hf/) under `run_dir` into `run_dir/previous-<time>/` and returns that folder (None
    when there was no earlier run). Without it a rerun under the same name appends to the old metrics
    and its summary mixes two runs; moving rather than deleting keeps the earlier run's record."""
    names = [n for n in (METRICS, LEDGER, "rollouts", "checkpoints", "config.yaml", "hf")
             if os.path.exists(os.path.join(run_dir, n))]
    if not names:  # any of them: a run that crashed before its first metrics row left a ledger
        return None
    newest = max(os.path.getmtime(os.path.join(run_dir, n)) for n in names)
    dest = _fresh_folder(run_dir, f"previous-{time.strftime('%Y%m%d-%H%M%S', time.localtime(newest))}")
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
    log.warning("run folder %s held an earlier run: moved its %s to %s", run_dir, ", ".join(names), dest)
    return dest


def _fresh_folder(parent: str, name: str) -> str:
    """parent/name, or parent/name-2, -3, … when taken; created."""
    dest, k = os.path.join(parent, name), 1
    while os.path.exists(dest):
        k += 1
        dest = os.path.join(parent, f"{name}-{k}")
    os.makedirs(dest)
    return dest


def set_aside_later_steps(run_dir: str, step: int) -> str | None:
    """A run resumed from step `step` that holds checkpoints or rollout logs of later steps (the
    attempt that crashed, or steps a rewind by path abandons): moves those, with copies of
    metrics.jsonl and ledger.jsonl as they were, into `run_dir/abandoned-<time>/` (checkpoints/,
    rollouts/), so no `trainer.resume=auto` picks such a checkpoint, the rollout logs hold one
    attempt per step, and nothing is lost. Returns that folder, or None."""
    later = []
    for sub, pattern in (("checkpoints", _NAME), ("rollouts", _ROLLOUT_LOG)):
        folder = os.path.join(run_dir, sub)
        later += [(sub, n) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                  if (m := pattern.match(n.removesuffix(".tmp"))) and int(m.group(1)) > step]
    if not later:
        return None
    dest = _fresh_folder(run_dir, f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
    for sub, name in later:
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
        os.replace(os.path.join(run_dir, sub, name), os.path.join(dest, sub, name))
    for name in (METRICS, LEDGER):
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copy2(os.path.join(run_dir, name), os.path.join(dest, name))
    log.warning("resuming %s at step %d: what later steps left (%s) and the records as they were are set aside "
                "in %s", run_dir, step, ", ".join(f"{sub}/{name}" for sub, name in sorted(later)), dest)
    return dest


def export_final(run_dir: str, step: int) -> str:
    """The final model at `run_dir/hf`: a copy of step `step`'s checkpoint's hf folder (the same
    weights, no second gather), written under a temporary name and renamed, so a crash leaves the
    whole export or none; the model is in the checkpoint either way."""
    final, tmp = os.path.join(run_dir, "hf"), os.path.join(run_dir, "hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(path_for(run_dir, step), "hf"), tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def truncate_jsonl(path: str, step: int, stage: str = "rl") -> int:
    """Cuts the `stage` rows of a run's jsonl log (metrics or ledger) past `step` — written after the
    checkpoint, before a crash; returns how many were cut. Rewritten through a temporary file."""
    if not os.path.exists(path):
        return 0
    keep, cut = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("stage", "rl") == stage and row.get("step", 0) > step:
                cut += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return cut


def check_continuation(path: str, config: dict[str, Any], uses_reference: bool, run_dir: str) -> dict[str, Any]:
    """The state of checkpoint `path`, once it is known to fit this config (`to_dict(cfg)`) and the
    run folder's ledger; CheckpointError naming the fields or the file otherwise."""
    state = load_state(path)
    blocking, safe = compare(state["config"], config)
    # A LoRA policy's reference is its own base weights (adapters off), always in the engine state.
    if uses_reference and not state["uses_reference"] and _lora_in_effect(config) is None:
        blocking.append("a KL term is now on, but the checkpoint's run kept no reference model")
    if blocking:
        raise CheckpointError(f"{path} cannot continue with this config:\n  " + "\n  ".join(blocking))
    if safe:
        log.warning("resuming %s with changed settings:\n  %s", path, "\n  ".join(safe))
    ledger = os.path.join(run_dir, LEDGER)
    lines = count_rows(ledger, state["step"], stage=state.get("stage", "rl"))
    if lines != state["ledger_lines"]:
        raise CheckpointError(f"{ledger} holds {lines} lines up to step {state['step']}, the checkpoint {path} "
                              f"recorded {state['ledger_lines']}: the ledger does not belong to this checkpoint")
    return state


def open_run(run_dir: str, config: dict[str, Any], resume: str, steps: int, uses_reference: bool,
             stage: str) -> tuple[str | None, dict[str, Any] | None]:
    """Prepares a run folder and returns (checkpoint path, its state) to continue from, or (None,
    None) for a fresh start: a fresh start moves an earlier run's records aside, a resumed one cuts
    the rows written after its checkpoint; either way config.yaml is (re)written. Every check runs
    before the folder is touched. `stage`: "rl" or "sft", which the checkpoint must be of."""
    path = resolve(resume, run_dir, steps)
    state = check_continuation(path, config, uses_reference, run_dir) if path else None
    if state is not None and state.get("stage", "rl") != stage:
        raise CheckpointError(f"{path} is a checkpoint of an {state.get('stage', 'rl').upper()} run, not of "
                              f"an {stage.upper()} one")
    os.makedirs(run_dir, exist_ok=True)
    if state is None:
        archive_previous_run(run_dir)
    else:
        set_aside_later_steps(run_dir, state["step"])
        cut_records(run_dir, state)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path, state


def cut_records(run_dir: str, state: dict[str, Any]) -> None:
    """Cuts the metrics and ledger rows written after the checkpoint, before the crash; restores the
    checkpoint's own metrics row if the crash came between the checkpoint and that row."""
    metrics, stage = os.path.join(run_dir, METRICS), state.get("stage", "rl")
    truncate_jsonl(metrics, state["step"], stage)
    truncate_jsonl(os.path.join(run_dir, LEDGER), state["step"], stage)
    if count_rows(metrics, state["step"], only_step=True, stage=stage) == 0:
        MetricsLog(metrics).write(state["record"])


def count_rows(path: str, step: int, only_step: bool = False, stage: str = "rl") -> int:
    """`stage` rows of a jsonl log (metrics, ledger) at steps <= `step` (== `step` with only_step)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sum(1 for r in rows if r.get("stage", "rl") == stage and (r["step"] == step if only_step else r["step"] <= step))
