"""LoRA policies (`model.lora`) through `peft`: which layers get adapters, and the adapters merged
into plain Hugging Face weights for vLLM and for exports.

A LoRA layer computes h = W·x + (α/r)·B·A·x with W frozen, A [r, in] and B [out, r] trained, B
initialised to 0 (Hu et al. 2021, "LoRA", eq. 3 and §4.1; peft's `LoraLayer`). Merged, it is the
plain linear layer W' = W + (α/r)·B·A, which is what the rollout engines load and what exports hold.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping
from typing import Any

import torch

ADAPTER = "default"  # peft's name for the one adapter get_peft_model adds
_PREFIX = "base_model.model."  # PeftModel → LoraModel → the Hugging Face model
_BASE = ".base_layer"  # peft moves an adapted layer's own weight under <layer>.base_layer


def enabled(lora: dict[str, Any]) -> bool:
    """Whether `model.lora` (as a dict) asks for adapters: a rank of 0 or null means none."""
    return bool(lora["rank"])


def alpha(lora: dict[str, Any]) -> float:
    """α; null means 2·rank, so that the factor α/r of B·A is 2 whatever the rank."""
    return lora["alpha"] if lora["alpha"] is not None else 2.0 * lora["rank"]


def scaling(lora: dict[str, Any]) -> float:
    """α/r, the factor of B·A."""
    return alpha(lora) / lora["rank"]


def _tower_prefixes(model: torch.nn.Module, train_vision: bool) -> tuple[str, ...]:
    """Module-name prefixes of the parts that may be adapted: the language model, and the vision
    tower (merger included) with `train_vision`. Qwen2-, 2.5- and 3-VL keep them at
    model.language_model and model.visual of the *ForConditionalGeneration class."""
    inner = model.model
    parts = [inner.language_model] + ([inner.visual] if train_vision else [])
    names = {id(m): n for n, m in model.named_modules()}
    return tuple(names[id(p)] + "." for p in parts)


def eligible_layers(model: torch.nn.Module, train_vision: bool) -> list[str]:
    """Full names of the linear layers an adapter may go on. The LM head never gets one: the learner
    reads its weight directly for the fused log-prob kernels."""
    prefixes = _tower_prefixes(model, train_vision)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefixes)]


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def target_layers(model: torch.nn.Module, lora: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(full names of the layers `lora.target_modules` select, problems): each target must match at
    least one eligible layer; a problem names model.lora.target_modules and lists what exists."""
    eligible = eligible_layers(model, lora["train_vision"])
    selected = [n for n in eligible if any(_matches(n, t) for t in lora["target_modules"])]
    unmatched = [t for t in lora["target_modules"] if not any(_matches(n, t) for n in eligible)]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in eligible})
    if not unmatched and lora["train_vision"]:
        vision = _tower_prefixes(model, True)[1]
        if not any(n.startswith(vision) for n in selected):
            tower = sorted({n.rsplit(".", 1)[-1] for n in eligible if n.startswith(vision)})
            return selected, [f"model.lora.train_vision is true but model.lora.target_modules {lora['target_modules']} "
                              f"select no layer of the vision tower of {type(model).__name__}; its linear layers "
                              f"are named {tower}"]
    if not unmatched:
        return selected, []
    where = "language model and vision tower" if lora["train_vision"] else "language model (model.lora.train_vision=false)"
    return selected, [f"model.lora.target_modules: {unmatched} match no linear layer of the {where} of "
                      f"{type(model).__name__}; a name matches a layer's full name or its last dotted parts. "
                      f"Its layers are named {kinds}, e.g. {eligible[0] if eligible else '(none)'}"]


def wrap(model: torch.nn.Module, lora: dict[str, Any]) -> torch.nn.Module:
    """`model` as a peft model with fresh adapters on the selected layers; only those train. Raises
    ValueError naming model.lora.target_modules when a target matches nothing."""
    from peft import LoraConfig, get_peft_model

    layers, problems = target_layers(model, lora)
    if problems:
        raise ValueError(problems[0])
    config = LoraConfig(r=lora["rank"], lora_alpha=alpha(lora), lora_dropout=lora["dropout"],
                        target_modules=layers, bias="none")
    return get_peft_model(model, config)


def delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """(α/r)·B·A in fp32 (a: A [r, in], b: B [out, r]), the adapter's weight update (Hu et al. 2021)."""
    return scale * (b.float() @ a.float())


class MergedWeights(Mapping):
    """A peft model's state dict seen as the Hugging Face model's: names without peft's prefix and
    `.base_layer`, each adapted layer's weight merged, W + (α/r)·B·A, when it is looked up, so a
    sync holds one merged layer at a time, never a second copy of the adapted weights. The training
    weights are only read."""

    def __init__(self, state: Mapping[str, torch.Tensor], scale: float, skip: Container[str] = ()):
        """`state`: the peft model's state dict; `skip`: Hugging Face names left out."""
        self._state, self._scale = state, scale
        self._source: dict[str, str] = {}
        for name in state:
            hf = name.removeprefix(_PREFIX).replace(_BASE + ".", ".")
            if ".lora_" not in name and hf not in skip:
                self._source[hf] = name

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._source[name]
        weight = self._state[source]
        if not source.endswith(_BASE + ".weight"):
            return weight
        layer = source[: -len(_BASE + ".weight")]
        a, b = (self._state[f"{layer}.lora_{m}.{ADAPTER}.weight"] for m in "AB")
        return (weight.float() + delta(a, b, self._scale)).to(weight.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


@torch.no_grad()
def fold_into_base(peft_model: torch.nn.Module, scale: float) -> None:
    """Adds every adapter's update to its frozen base weight and zeroes B, in place: the policy is
    unchanged and "adapters off" now means this policy. (The optimizer's own fp32 copies of B must be
    refreshed by the caller.)"""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            base = module.get_base_layer().weight
            a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            base.copy_((base.float() + delta(a, b, scale)).to(base.dtype))
            b.zero_()
