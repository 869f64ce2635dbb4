# pathorl: `make demo` runs the demo on a local Ray head; `make test` runs the tests.
# Both create the environment (.venv) and the tiny model + demo data when they are missing.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= launch/configs/demo.yaml
ARTIFACTS := artifacts/tiny-qwen2.5-vl/model.safetensors artifacts/demo-data/train.jsonl

.PHONY: demo test env artifacts
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

test: artifacts
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)
