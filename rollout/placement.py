"""Placement groups that either come up in bounded time or fail naming what is missing."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group


def reserve(bundles: list[dict[str, float]], what: str, timeout_s: float, strategy: str = "PACK") -> PlacementGroup:
    """A ready placement group of `bundles`; raises RuntimeError after `timeout_s` seconds, naming
    `what` wanted it, the bundles and what the cluster has free, instead of waiting forever."""
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        custom = [k for k in bundles[0] if k not in ("CPU", "GPU")]
        raise RuntimeError(f"{what}: Ray could not reserve {len(bundles)} bundle(s) of {_fmt(bundles[0], custom)} "
                           f"within {timeout_s:g} s; free now: {_fmt(ray.available_resources(), custom)}, cluster "
                           f"total: {_fmt(ray.cluster_resources(), custom)}")
    return pg


def _fmt(resources: dict[str, Any], keys: list[str] | None = None) -> str:
    """CPUs, GPUs and the custom resources asked for (Ray leaves out a resource none of which is free)."""
    return "{" + ", ".join(f"{k}: {resources.get(k, 0):g}" for k in ["CPU", "GPU", *(keys or [])]) + "}"
