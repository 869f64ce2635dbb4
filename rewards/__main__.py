"""Command line: try a reward on real rows and responses before a run.

    python -m rewards check path/to/file.py:fn --rows rows.jsonl --responses responses.jsonl [--json]
    python -m rewards check mc_accuracy --rows rows.jsonl --responses responses.jsonl

rows.jsonl: dataset rows in the engine's schema ({"id", "images", "question", "options", "answer",
"data_source", ...}), verl's ({"prompt": [{"role", "content"}], "reward_model": {"ground_truth"},
"extra_info", ...}), TRL's ({"prompt": [...], "solution", ...}) or EasyR1's ({"problem", "answer",
...}), handed to the reward as in training (a verl reward gets reward_model.ground_truth and
extra_info as stored); image paths relative to the file's folder are made absolute.
responses.jsonl: one JSON object per line, aligned with the rows, with "response" (text) and optionally "response_ids",
"response_length", "truncated". Prints each sample's score and extra metrics, every error, and the
timing; with --json, one JSON object per sample ({"index", "id", "score", "error", "metrics"}) and the
summary on stderr. Exit status: 0 without errors, 1 if any sample failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewards.api import RewardInput, RewardSpec
from rewards.runner import RewardRunner


def _read_jsonl(path: str, what: str) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} {path}, line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{what} {path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _engine_fields(row: dict, where: str) -> dict:
    """A verl or EasyR1 row with the `question` (user text) and string `answer` the engine serves it
    with (engine/row_schemas.py does this for runs; rewards/ does not import the engine)."""
    if "reward_model" in row or isinstance(row.get("prompt"), list):
        truth = (row.get("reward_model") or {}).get("ground_truth") if "reward_model" in row \
            else row.get("solution", row.get("answer"))  # TRL's conversational rows
        chat = row.get("prompt") if isinstance(row.get("prompt"), list) else []
        contents = [m.get("content") for m in chat if isinstance(m, dict) and m.get("role") == "user"]
        texts = [c if isinstance(c, str) else "".join(p.get("text") or "" for p in c if isinstance(p, dict))
                 for c in contents if isinstance(c, (str, list))]
        question = "\n".join(t.replace("<image>", "") for t in texts)
    elif "problem" in row and "question" not in row:
        truth, question = row.get("answer"), str(row["problem"]).replace("<image>", "")
    else:
        return row
    if isinstance(truth, bool) or not isinstance(truth, (str, int, float)) or truth != truth or truth == "":
        raise ValueError(f"{where}: the ground truth must be a non-empty string or a number, got {truth!r:.80}")
    return {**row, "question": question, "options": [], "answer": str(truth)}


def load_inputs(rows_path: str, responses_path: str) -> list[RewardInput]:
    """RewardInputs from a rows file and an aligned responses file (see the module docstring)."""
    rows, responses = _read_jsonl(rows_path, "rows"), _read_jsonl(responses_path, "responses")
    if len(rows) != len(responses):
        raise ValueError(f"{rows_path} has {len(rows)} rows but {responses_path} has {len(responses)} responses")
    folder = Path(rows_path).resolve().parent
    inputs = []
    for k, (row, reply) in enumerate(zip(rows, responses)):
        if not isinstance(reply.get("response"), str):
            raise ValueError(f"responses {responses_path}, object {k + 1}: 'response' must be a string")
        if isinstance(row.get("images"), list):
            row = {**row, "images": [str(folder / p) if isinstance(p, str) else p for p in row["images"]]}
        row = _engine_fields(row, f"rows {rows_path}, line {k + 1}")
        inputs.append(RewardInput.from_row(k, row, reply["response"], reply.get("response_ids"),
                                           reply.get("response_length"), bool(reply.get("truncated", False))))
    return inputs


def check(args: argparse.Namespace) -> int:
    name = args.reward.rpartition(":")[2] or args.reward
    spec = RewardSpec(name=name, fn=args.reward, kwargs=json.loads(args.kwargs))
    inputs = load_inputs(args.rows, args.responses)
    with RewardRunner([spec], num_workers=args.workers, timeout_s=args.timeout) as runner:
        batch = runner.score(inputs)
    errors = {e.index: e for e in batch.errors}
    for k, sample in enumerate(inputs):
        metrics = {key.partition("/")[2]: col[k] for key, col in batch.metrics.items() if col[k] is not None}
        error = errors.get(sample.index)
        row_id = sample.extra.get("id", k)
        if args.json:
            print(json.dumps({"index": sample.index, "id": row_id, "score": batch.scores[k],
                              "error": f"{error.kind}: {error.message}" if error else None, "metrics": metrics}))
        elif error:
            print(f"sample {sample.index} (id {row_id}): ERROR ({error.kind}) {error.message}")
        else:
            extra = "".join(f"  {key}={value:g}" for key, value in metrics.items())
            score = "None (not applicable)" if batch.scores[k] is None else f"{batch.scores[k]:g}"
            print(f"sample {sample.index} (id {row_id}): score {score}{extra}")
    scored = [s for s in batch.scores if s is not None]
    mean = f"{sum(scored) / len(scored):g}" if scored else "n/a"
    summary = (f"{len(inputs)} samples, {len(batch.errors)} error(s), mean score {mean}; "
               f"{batch.elapsed_s:.3f} s wall, {batch.call_seconds[name]:.3f} s inside the reward "
               f"({runner.styles[0]} style)")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 1 if batch.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("check", help="score responses with one reward and report every error")
    sub.add_argument("reward", help="a built-in name or path/to/file.py:function")
    sub.add_argument("--rows", required=True, help="dataset rows (jsonl: the engine's, verl's or EasyR1's schema)")
    sub.add_argument("--responses", required=True, help="responses (jsonl, aligned with the rows)")
    sub.add_argument("--json", action="store_true", help="one JSON object per sample on stdout")
    sub.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds per reward call (default 30)")
    sub.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    try:
        return check(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
