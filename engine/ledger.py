"""runs/<run>/ledger.jsonl: one line per scored group, so anyone can audit that every training row
was consumed exactly once per epoch, across any number of crashes and resumes.

    {"step": 7, "uid": "row-12", "epoch": 1, "status": "trained"}

status: "trained" (in this step's update), "dropped" (dynamic sampling found no signal, the step
could not train, or, one-step-off, a carried group would have trained two updates after its
policy), "carried" (qualified, kept for a later step, where its "trained" line follows), "failed"
(generation failed; the row is not served again), "skipped" (passed over: a bad row, or one skipped
as solved by pass-rate scheduling). Every (uid, epoch) ends in exactly one of trained,
dropped, failed or skipped — except a group still carried (or, one-step-off, generated ahead for the
next step, with no line yet) when the run stops, which its last checkpoint holds and a continued
run trains; a run that reaches trainer.steps leaves no group generated ahead.
"""

from __future__ import annotations

import json
from typing import Any

STATUSES = ("trained", "dropped", "carried", "failed", "skipped")


def step_entries(step: int, rollout: Any, passed_over: list[tuple[str, int]], trained: bool) -> list[dict[str, Any]]:
    """The ledger lines of one step: `rollout` is the step's StepRollout, `passed_over` the stream's
    (row id, epoch) pairs passed over while sampling it, `trained` whether the update ran."""
    carried = {id(g) for g in rollout.carried}
    kept = {id(g) for g in rollout.groups}
    lines = [(g.prompt, "trained" if trained else "dropped") for g in rollout.groups]
    lines += [(g.prompt, "carried" if id(g) in carried else "dropped") for g in rollout.seen
              if id(g) not in kept]
    lines += [(g.prompt, "dropped") for g in rollout.expired]
    lines += [(p, "failed") for p, _ in rollout.failed]
    out = [{"step": step, "uid": p.uid, "epoch": p.epoch, "status": status} for p, status in lines]
    out += [{"step": step, "uid": uid, "epoch": epoch, "status": "skipped"} for uid, epoch in passed_over]
    return out


def append(path: str, entries: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in entries)
