"""Built-in reward names, loading of "file.py:function" references, and the seeds' reward recipes."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from rewards.api import RewardSpec

# name -> "module:function". All built-ins take one RewardInput (`sample`) except judge_vllm
# (`samples`, a batch); see each function's docstring for its kwargs.
BUILTINS = {
    "patho_r1_format": "rewards.pathology:patho_r1_format",
    "mc_accuracy": "rewards.pathology:mc_accuracy",
    "patho_r1": "rewards.pathology:patho_r1",
    "patho_r1_dapo": "rewards.pathology:patho_r1_dapo",
    "overlong": "rewards.pathology:overlong",
    "open_exact_match": "rewards.pathology:open_exact_match",
    "open_token_f1": "rewards.pathology:open_token_f1",
    "yes_no_accuracy": "rewards.pathology:yes_no_accuracy",
    "pathreasoner_format": "rewards.pathology:pathreasoner_format",
    "entity_dice": "rewards.entities:entity_dice",
    "judge_http": "rewards.judge:judge_http",
    "judge_vllm": "rewards.judge:judge_vllm",
}


def resolve_reference(fn: str) -> str:
    """Normalises a RewardSpec.fn: a built-in name stays as is; "file.py:function" gets an absolute
    path (resolved against the current directory), so worker processes find it from anywhere."""
    if fn in BUILTINS:
        return fn
    path, sep, name = fn.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"reward {fn!r} is neither a built-in ({', '.join(sorted(BUILTINS))}) "
                         f"nor 'path/to/file.py:function'")
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"reward {fn!r}: file {file} does not exist")
    return f"{file}:{name}"


def load_reference(fn: str) -> tuple[Callable[..., Any], ModuleType]:
    """The function a resolved reference names, and its module. Loads user files as modules named
    after their path, with the file's folder on sys.path so it can import its neighbours."""
    if fn in BUILTINS:
        module_name, name = BUILTINS[fn].split(":")
        module = importlib.import_module(module_name)
    else:
        path, _, name = fn.rpartition(":")
        module_name = "pathorl_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            folder = str(Path(path).parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    fn_obj = getattr(module, name, None)
    if not callable(fn_obj):
        raise AttributeError(f"reward {fn!r}: {module.__file__} has no function {name!r}")
    return fn_obj, module


def patho_r1_specs(variant: str = "grpo", max_length: int | None = None, buffer: int | None = None,
                   factor: float = 1.0) -> list[RewardSpec]:
    """Patho-R1's rewards as components (so `components["accuracy"]` stays the bare accuracy that
    DAPO's dynamic sampling needs). "grpo": 0.1 * format + 0.9 * accuracy. "dapo": +-1 accuracy plus
    the overlong penalty (needs max_length and buffer, in tokens)."""
    if variant == "grpo":
        return [RewardSpec("format", "patho_r1_format", 0.1), RewardSpec("accuracy", "mc_accuracy", 0.9)]
    if variant == "dapo":
        if max_length is None or buffer is None:
            raise ValueError("patho_r1_specs('dapo') needs max_length and buffer")
        return [RewardSpec("accuracy", "mc_accuracy", 1.0, {"incorrect": -1.0}),
                RewardSpec("overlong", "overlong", 1.0, {"max_length": max_length, "buffer": buffer,
                                                         "factor": factor})]
    raise ValueError(f"patho_r1_specs: variant must be 'grpo' or 'dapo', got {variant!r}")


def pathreasoner_specs(judge: str = "judge_http", judge_kwargs: dict[str, Any] | None = None,
                       alpha: float = 0.5) -> list[RewardSpec]:
    """PathReasoner-R1's reward R_format + R_semantic + alpha * R_entity (alpha = 0.5), the semantic
    part scored by `judge` ("judge_http" or "judge_vllm") with `judge_kwargs`."""
    if judge not in ("judge_http", "judge_vllm"):
        raise ValueError(f"pathreasoner_specs: judge must be 'judge_http' or 'judge_vllm', got {judge!r}")
    return [RewardSpec("format", "pathreasoner_format", 1.0),
            RewardSpec("semantic", judge, 1.0, dict(judge_kwargs or {})),
            RewardSpec("entity", "entity_dice", alpha)]
