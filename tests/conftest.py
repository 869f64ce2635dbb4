"""Shared fixtures: the tiny Qwen2.5-VL model and the demo dataset, built once (offline) under
artifacts/ exactly as `make demo` builds them, and reused when already there."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> str:
    path = ROOT / "artifacts" / "tiny-qwen2.5-vl"
    if not (path / "model.safetensors").exists():
        from launch.build_tiny_model import build

        os.makedirs(path.parent, exist_ok=True)
        build(str(path))
    return str(path)


@pytest.fixture(scope="session")
def demo_data() -> str:
    path = ROOT / "artifacts" / "demo-data"
    if not (path / "train.jsonl").exists():
        from launch.build_demo_data import build

        build(str(path))
    return str(path)
