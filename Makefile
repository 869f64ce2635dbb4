# pathorl: `make demo` runs the demo on a local Ray head; `make test` runs the tests.
# Both create the environment (.venv) and the tiny model + demo data when they are missing.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= launch/configs/demo.yaml
ARTIFACTS := artifacts/tiny-qwen2.5-vl/model.safetensors artifacts/demo-data/train.jsonl

.PHONY: demo pipeline test env artifacts
.DEFAULT_GOAL := demo

env:
	@launch/setup_env.sh

artifacts/tiny-qwen2.5-vl/model.safetensors: | env
	$(PY) launch/build_tiny_model.py --out artifacts/tiny-qwen2.5-vl

artifacts/demo-data/train.jsonl: | env
	$(PY) launch/build_demo_data.py --out artifacts/demo-data

artifacts: env $(ARTIFACTS)

demo: artifacts
	launch/demo.sh $(CONFIG)

artifacts/pipeline-data/sft_train.jsonl: artifacts/demo-data/train.jsonl
	$(PY) launch/build_pipeline_data.py --demo artifacts/demo-data --out artifacts/pipeline-data

# The seeds' staged recipe on the tiny model: continued pre-training on captions, chain-of-thought
# SFT, then GRPO, each stage from the previous one's model; then base / SFT / RL side by side.
pipeline: artifacts artifacts/pipeline-data/sft_train.jsonl
	launch/demo.sh launch/configs/pipeline_cpt.yaml,launch/configs/pipeline_sft.yaml,launch/configs/pipeline_rl.yaml
	$(PY) launch/eval.py --config launch/configs/pipeline_rl.yaml --data artifacts/demo-data/val.jsonl --n 4 \
	  --model base=artifacts/tiny-qwen2.5-vl --model cpt=runs/pipeline_cpt/hf --model sft=runs/pipeline_sft/hf \
	  --model rl=runs/pipeline_rl/hf --json runs/pipeline_eval.json --samples runs/pipeline_eval_samples.jsonl

test: artifacts
	$(PY) -m pytest tests -q -ra --durations=20 $(PYTEST_ARGS)
