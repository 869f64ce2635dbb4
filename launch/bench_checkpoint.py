"""What full training-state checkpoints cost on a config (default: the demo): size, save time,
restore time, and what `trainer.save_every=1` adds to a step — measured side by side in one run.

    .venv/bin/python launch/bench_checkpoint.py [--config launch/configs/demo.yaml] [--steps 6] [--json out.json]

Three `launch/rl.py` runs on the same config and seed (SFT warm-up cut to 5 steps, no evaluation):
(a) `steps` RL steps saving only the final checkpoint, (b) the same saving after every step, and
(c) run (b) continued from its step `steps - 1` checkpoint (trainer.resume=<path>), whose log
states the restore time (DeepSpeed state, data stream, sampler, RNGs, weight sync into vLLM).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(config: str, out: str, name: str, *overrides: str) -> str:
    cmd = [sys.executable, "launch/rl.py", "--config", config, f"trainer.output_dir={out}", f"trainer.run_name={name}",
           "sft.steps=5", "trainer.eval_every=0", "data.val=null", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc.stderr


def _rl_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("stage") == "rl"]


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    n = args.steps
    os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint-", dir=os.path.join(ROOT, "runs")) as out:
        _run(args.config, out, "final_only", f"trainer.steps={n}", "trainer.save_every=0")
        _run(args.config, out, "every_step", f"trainer.steps={n}", "trainer.save_every=1")
        ckpt = os.path.join(out, "every_step", "checkpoints", f"step_{n - 1}")
        size = {part: _size(os.path.join(ckpt, part)) for part in ("learner", "hf")}
        size["total"] = _size(ckpt)
        log = _run(args.config, out, "every_step", f"trainer.steps={n}", "trainer.save_every=1", f"trainer.resume={ckpt}")
        restore = float(re.search(r"resumed from \S+ in ([0-9.]+) s", log).group(1))
        plain, saving = _rl_rows(os.path.join(out, "final_only", "metrics.jsonl")), _rl_rows(
            os.path.join(out, "every_step", "metrics.jsonl"))
    # steps 1 .. n-1: the last step of both runs saves a checkpoint
    step_plain = statistics.median(r["timing/step"] for r in plain[:-1])
    step_saving = statistics.median(r["timing/step"] for r in saving[:-1])
    save_s = statistics.median(r["timing/checkpoint"] for r in saving[:-1])
    result = {"config": args.config, "steps": n, "checkpoint_bytes": size, "save_s_median": save_s,
              "restore_s": restore, "step_s_median_save_every_0": step_plain, "step_s_median_save_every_1": step_saving,
              "save_every_1_step_time_ratio": step_saving / step_plain}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
