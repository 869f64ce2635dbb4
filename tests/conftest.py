"""Shared fixtures: the tiny Qwen2.5-VL model and the demo dataset, built once (offline) under
artifacts/ exactly as `make demo` builds them, and reused when already there."""

import os
from pathlib import Path

import pytest

# Triton decorates its own language helpers (tl.max, tl.sum, ...) when first imported, reading
# TRITON_INTERPRET at that moment, and vLLM imports triton. The kernel tests run under the
# interpreter, so triton is first imported here with it on, before any test module can import
# vLLM; the variable is restored at once, so no other test, nor any process one starts, sees it.
_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import triton.language  # noqa: E402,F401

if _saved_interpret is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session(request):
    """A local Ray instance with 2 CPUs for one test module (its own namespace)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=f"pathorl-{request.module.__name__}")
    yield
    ray.shutdown()


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
