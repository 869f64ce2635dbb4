"""Print or export logged rollouts.

    python -m rollout.inspect runs/demo/rollouts                 # summary of every step
    python -m rollout.inspect runs/demo/rollouts/step_000003.msgpack --samples 2 --tokenizer artifacts/tiny-qwen2.5-vl
    python -m rollout.inspect runs/demo/rollouts --export out/   # rows.jsonl + responses.jsonl

--export writes the logged samples in the format of `python -m rewards check`, so a reward can be
replayed on real rollouts before a run (`--rows out/rows.jsonl --responses out/responses.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

from rollout.records import read


def _summary(records: list[dict]) -> None:
    by_step = defaultdict(list)
    for r in records:
        by_step[r.get("step", 0)].append(r)
    print(f"{'step':>5} {'groups':>6} {'samples':>7} {'errors':>6} {'reward':>7} {'len':>6} {'trunc':>6} {'p50 s':>6}")
    for step, group in sorted(by_step.items()):
        samples = [s for r in group for s in r["samples"]]
        rewards = [s["reward"] for s in samples if s.get("reward") is not None]
        lengths = [len(s["ids"]) for s in samples]
        print(f"{step:>5} {len(group):>6} {len(samples):>7} {sum(r['error'] is not None for r in group):>6} "
              f"{statistics.fmean(rewards) if rewards else float('nan'):>7.3f} "
              f"{statistics.fmean(lengths) if lengths else 0:>6.1f} "
              f"{sum(s['finish'] == 'length' for s in samples) / max(len(samples), 1):>6.2f} "
              f"{statistics.median(r['latency_s'] for r in group):>6.2f}")


def _show(records: list[dict], per_group: int, tokenizer) -> None:
    for r in records:
        print(f"== step {r.get('step')} {r['uid']} (row {r.get('row_id')}, worker {r['worker']}, "
              f"{r['latency_s']:.2f}s){' ERROR ' + r['error'] if r['error'] else ''}")
        for s in r["samples"][:per_group]:
            text = tokenizer.decode(s["ids"], skip_special_tokens=False) if tokenizer else f"{len(s['ids'])} tokens"
            comps = " ".join(f"{k}={v:.2f}" for k, v in (s.get("components") or {}).items() if v is not None)
            print(f"  [{s['finish']}] reward={s.get('reward')} {comps}\n    {text!r}")


def _export(records: list[dict], folder: str, tokenizer) -> None:
    if tokenizer is None:
        raise SystemExit("--export needs --tokenizer to decode the responses")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "rows.jsonl"), "w") as rows, \
            open(os.path.join(folder, "responses.jsonl"), "w") as responses:
        for r in records:
            for s in r["samples"]:
                rows.write(json.dumps(r["row"]) + "\n")
                responses.write(json.dumps({"response": tokenizer.decode(s["ids"], skip_special_tokens=True),
                                            "response_ids": s["ids"], "truncated": s["finish"] == "length"}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollout.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a step file or a run's rollouts/ folder")
    parser.add_argument("--step", type=int, help="only this step")
    parser.add_argument("--samples", type=int, default=0, help="print up to N samples per group")
    parser.add_argument("--tokenizer", help="model folder whose tokenizer decodes the samples")
    parser.add_argument("--export", metavar="FOLDER", help="write rows.jsonl + responses.jsonl for `rewards check`")
    args = parser.parse_args(argv)
    records = [r for r in read(args.path) if args.step is None or r.get("step") == args.step]
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.export:
        _export(records, args.export, tokenizer)
    elif args.samples:
        _show(records, args.samples, tokenizer)
    else:
        _summary(records)


if __name__ == "__main__":
    main()
