"""Start-up checks that read the file system, the data and the hardware.

`load_config` has already checked every field on its own (engine/config.py). These run next, before
anything in the run folder is moved or written and before Ray, vLLM or DeepSpeed start, so a bad
path, a missing file or a dataset the engines cannot take ends the run at once with a message that
names the field or file; `check_cluster` then tests the Ray cluster's resources before any actor is
placed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from engine.config import Config, ConfigError, DataConfig
from engine.data import DataError, LazyRows, load_rows, open_rows, valid_rows
from engine.lora import enabled as lora_enabled
from engine.lora import target_layers

log = logging.getLogger("pathorl.preflight")
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class RunData:
    """The rows of a run."""

    train: LazyRows
    """Training rows, read as they are served (only the good ones when checked at start-up)."""
    skipped: list[str] = field(default_factory=list)
    """Problems of the training rows skipped as bad at start-up (data.bad_rows=skip)."""
    val: list[dict[str, Any]] = field(default_factory=list)


def preflight(cfg: Config) -> RunData:
    """Checks paths, files and hardware (all problems reported together), then opens the training
    rows (checking them all when there are at most data.check_rows) and loads the validation rows;
    raises ConfigError, or DataError for a bad row under data.bad_rows=fatal."""
    problems = model_problems(cfg.model.path, "model.path")
    if cfg.reward.judge_model:
        problems += model_problems(cfg.reward.judge_model, "reward.judge_model", policy=False)
    if cfg.model.reference_path:
        problems += model_problems(cfg.model.reference_path, "model.reference_path")
    problems += _deepspeed_problems(cfg.learner.deepspeed_config) + logger_problems(cfg.trainer.loggers)
    problems += lora_problems(cfg)
    for name, path in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if path is not None and not os.path.exists(path):
            problems.append(f"{name}: {_where(path)} is not a file or folder")
    if cfg.data.format_prompt is not None and not os.path.isfile(cfg.data.format_prompt):
        problems.append(f"data.format_prompt: {_where(cfg.data.format_prompt)} is not a file")
    for i, f in enumerate(cfg.reward.functions):
        problems += _reward_problems(f.fn, f"reward.functions[{i}].fn")
    if cfg.trainer.resume not in ("auto", "off"):
        from engine.checkpoint import problem

        why = problem(cfg.trainer.resume)
        if why is not None:
            problems.append(f"trainer.resume: {why} (use auto, off or a complete checkpoint folder)")
    if cfg.learner.num_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"learner.num_gpus={cfg.learner.num_gpus} but this machine has no CUDA device "
                            "(set learner.num_gpus=0 to learn on CPU)")
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))
    train, skipped, crowded = open_train(cfg.data)
    val = load_rows(cfg.data.val, cfg.data.bad_rows)[0] if cfg.data.val else []
    limit = cfg.data.max_images_per_prompt
    crowded += [f"{r['_where']} has {len(r['images'])}" for r in val if len(r["images"]) > limit]
    if crowded:
        raise ConfigError(f"data.max_images_per_prompt={limit}, but {len(crowded)} row(s) carry more images "
                          f"({'; '.join(crowded[:3])}): raise data.max_images_per_prompt")
    return RunData(train=train, skipped=skipped, val=val)


def open_train(data: DataConfig) -> tuple[LazyRows, list[str], list[str]]:
    """data.train's rows, checked whole when there are at most data.check_rows of them (then only
    the good ones are kept); the problems of the rows skipped, and the rows with more than
    data.max_images_per_prompt images ("<where> has <n>")."""
    train, skipped, crowded = open_rows(data.train), [], []
    if len(train) > data.check_rows:
        log.info("data.train has %d rows (more than data.check_rows=%d): rows are checked as they are served",
                 len(train), data.check_rows)
        return train, skipped, crowded
    good = []  # positions only: the rows themselves may hold image bytes
    for i, row in valid_rows(train, data.bad_rows, skipped):
        good.append(i)
        if len(row["images"]) > data.max_images_per_prompt:
            crowded.append(f"{row['_where']} has {len(row['images'])}")
    if not good:
        raise DataError(f"{data.train}: no usable rows ({len(skipped)} skipped)")
    return train.subset(good), skipped, crowded


def logger_problems(loggers: list[str]) -> list[str]:
    """Loggers whose package is not installed."""
    import importlib.util

    from engine.loggers import PACKAGES

    return [f"trainer.loggers lists {name}, but the {PACKAGES[name]} package is not installed "
            f"(pip install {PACKAGES[name]}, or remove it from trainer.loggers)"
            for name in loggers if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]


def preflight_sft(cfg: Config) -> None:
    """The SFT stage's start-up checks: model, DeepSpeed config, data files and resume path (the rows
    are read and checked by the stage itself, bad ones skipped or fatal by data.bad_rows)."""
    problems = model_problems(cfg.model.path, "model.path") + _deepspeed_problems(cfg.learner.deepspeed_config)
    problems += logger_problems(cfg.trainer.loggers) + lora_problems(cfg)
    if cfg.sft.train is None:
        problems.append("sft.train is not set: the SFT stage needs a data file")
    for name, path in (("sft.train", cfg.sft.train), ("sft.val", cfg.sft.val)):
        if path is not None and not os.path.isfile(path):
            problems.append(f"{name}: {_where(path)} is not a file")
    if cfg.trainer.resume not in ("auto", "off"):
        from engine.checkpoint import problem

        why = problem(cfg.trainer.resume)
        if why is not None:
            problems.append(f"trainer.resume: {why} (use auto, off or a complete checkpoint folder)")
    if problems:
        raise ConfigError("the SFT stage cannot start:\n  " + "\n  ".join(problems))


def check_cluster(cfg: Config, available: dict[str, float]) -> None:
    """Fails at once when the Ray cluster (its total `available` resources, e.g.
    `ray.cluster_resources()`) cannot hold the run's actors at all, naming the resource."""
    r, lc = cfg.rollout, cfg.learner
    judge = bool(cfg.reward.judge_model)
    gpu_run = lc.num_gpus > 0
    needs = {
        "CPU": {"rollout.num_workers x rollout.num_cpus_per_worker": r.num_workers * r.num_cpus_per_worker,
                "learner.num_ranks x learner.num_cpus": lc.num_ranks * lc.num_cpus,
                "reward.judge_num_cpus": cfg.reward.judge_num_cpus if judge else 0.0},
        "GPU": {"rollout.num_workers (one GPU each)": r.num_workers if gpu_run else 0.0,
                "learner.num_ranks x learner.num_gpus": lc.num_ranks * lc.num_gpus,
                "the judge (one GPU)": 1.0 if gpu_run and judge else 0.0},
    }
    for resource in {*r.resources, *lc.resources}:
        needs[resource] = {"rollout.num_workers x rollout.resources": r.num_workers * r.resources.get(resource, 0.0),
                           "learner.num_ranks x learner.resources": lc.num_ranks * lc.resources.get(resource, 0.0)}
    short = []
    for resource, parts in needs.items():
        total, have = sum(parts.values()), available.get(resource, 0.0)
        if total > have + 1e-9:
            detail = " + ".join(f"{k} = {v:g}" for k, v in parts.items() if v)
            short.append(f"{total:g} {resource} ({detail}) but the Ray cluster has {have:g}")
    if short:
        raise ConfigError("the run cannot be placed: it needs " + "; and ".join(short))


def _where(path: str) -> str:
    return path if os.path.isabs(path) else f"{path} (resolved against {os.getcwd()})"


def model_problems(path: str, name: str, policy: bool = True) -> list[str]:
    """A local Hugging Face folder; for a `policy` (trained, rolled out, evaluated) also one that
    transformers loads through AutoModelForImageTextToText with an image placeholder token, as the
    learner needs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; vLLM reports its own support when it starts)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return [f"{name}: {_where(path)} is not a Hugging Face model folder (no config.json there); models "
                "are read from local folders only, never looked up on a hub"]
    weights = [] if any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path)) else [
        f"{name}: {_where(path)} holds no weights (no *.safetensors or *.bin file next to config.json)"]
    if not policy:
        return weights
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # an unknown model_type, a broken config.json
        return [f"{name}: {path}/config.json cannot be read by transformers {transformers.__version__} "
                f"({type(e).__name__}: {e})"]
    if type(config) not in AutoModelForImageTextToText._model_mapping:
        return [f"{name}: {path} is a {config.model_type!r} model, which transformers {transformers.__version__} "
                "has no AutoModelForImageTextToText class for: the policy must be a vision-language model "
                "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL)"]
    if getattr(config, "image_token_id", None) is None:
        return [f"{name}: {path}: config.json has no image_token_id, which the learner places image features by"]
    return weights


def lora_problems(cfg: Config) -> list[str]:
    """model.lora against the model's layers (a skeleton on the meta device: no weights are read)
    and the DeepSpeed config; nothing when LoRA is off or the model or config is unusable (reported
    by their own checks)."""
    lora = dataclasses.asdict(cfg.model.lora)
    if not lora_enabled(lora) or model_problems(cfg.model.path, "model.path"):
        return []
    problems = []
    if not _deepspeed_problems(cfg.learner.deepspeed_config):
        with open(cfg.learner.deepspeed_config) as f:
            if (json.load(f).get("zero_optimization") or {}).get("stage", 0) == 3:
                problems.append(f"model.lora with ZeRO-3 ({cfg.learner.deepspeed_config}) is not supported yet: folding "
                                "the adapters into partitioned weights is not implemented; use ZeRO stage 0-2")
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(cfg.model.path))
    return problems + target_layers(skeleton, lora)[1]


def _deepspeed_problems(path: str) -> list[str]:
    name = "learner.deepspeed_config"
    if not os.path.isfile(path):
        return [f"{name}: {_where(path)} is not a file"]
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return [f"{name}: {path} is not valid JSON ({e})"]
    if not isinstance(ds, dict):
        return [f"{name}: {path} must hold a JSON object"]
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        return [f"{name}: {path} sets zero_optimization.stage={stage!r}; supported stages are {SUPPORTED_ZERO_STAGES}"]
    return []


def _reward_problems(fn: str, name: str) -> list[str]:
    """A reward reference must name a built-in, or a Python file that defines the function (read,
    not executed: the reward workers import it)."""
    from rewards.registry import resolve_reference

    try:
        resolved = resolve_reference(fn)
    except (ValueError, FileNotFoundError) as e:
        return [f"{name}: {e}"]
    path, sep, func = resolved.rpartition(":")
    if not sep:
        return []
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as e:
        return [f"{name}: {path} does not parse ({e.msg}, line {e.lineno})"]
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    if func not in defined:
        return [f"{name}: {path} defines no top-level {func!r}"]
    return []
