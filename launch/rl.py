"""Entry point of an RL run; submitted to a Ray cluster with

    ray job submit --address http://127.0.0.1:8265 -- python launch/rl.py --config launch/configs/demo.yaml

or run directly (a local Ray instance is started). Dotted overrides follow the config:
    python launch/rl.py --config launch/configs/demo.yaml trainer.steps=10 rollout.temperature=0.8

A configuration, path, dataset or cluster that cannot work ends the job with exit status 2 and one
message naming the field, file or resource, before the run folder is touched and before any engine
starts (engine/config.py, engine/preflight.py).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import yaml  # noqa: E402

from engine.checkpoint import CheckpointError  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402
from engine.data import DataError  # noqa: E402
from engine.preflight import preflight  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see engine/config.py for the fields)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        data = preflight(cfg)
        # Under `ray job submit` RAY_ADDRESS names the cluster; run directly, a fresh local one starts
        # (never a stale cluster recorded in /tmp/ray by an earlier `ray start`).
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)
        trainer = Trainer(cfg, data)
    except (ConfigError, DataError, CheckpointError, OSError, yaml.YAMLError) as e:
        print(f"launch/rl.py: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        trainer.fit()
    finally:
        trainer.close()
    print(f"run finished: {os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name)}")


if __name__ == "__main__":
    main()
