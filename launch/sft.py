"""Entry point of an SFT stage (chain-of-thought SFT, or continued pre-training on image-caption
pairs) on the RL engine's DeepSpeed learner; submitted to a Ray cluster like an RL run:

    ray job submit --address http://127.0.0.1:8265 -- python launch/sft.py --config launch/configs/pipeline_sft.yaml

or run directly (a local Ray instance is started). The config is the RL config (engine/config.py):
`sft.*` holds the data and the optimisation, `model`, `learner` and `trainer` (run name, seed,
checkpoints, resume) mean what they mean for RL. The final model lands in runs/<run>/hf, the folder
the next stage's `model.path` takes. Bad configuration or data: exit status 2 with the field or file.
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
from engine.preflight import preflight_sft  # noqa: E402
from engine.sft import SFTStage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see engine/config.py for the fields)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stage = None
    try:
        cfg = load_config(args.config, args.overrides)
        preflight_sft(cfg)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)
        stage = SFTStage(cfg)
        final = stage.fit()
    except (ConfigError, DataError, CheckpointError, OSError, yaml.YAMLError) as e:
        print(f"launch/sft.py: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if stage is not None:
            stage.close()
    print(f"SFT finished: {final}")


if __name__ == "__main__":
    main()
