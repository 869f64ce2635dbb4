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
        raise RuntimeError(f"{what}: Ray could not reserve {len(bundles)} bundle(s) of {_fmt(bundles[0])} within "
                           f"{timeout_s:g} s; free now: {_fmt(ray.available_resources())}, cluster total: "
                           f"{_fmt(ray.cluster_resources())}")
    return pg


def _fmt(resources: dict[str, Any]) -> str:
    """CPUs and GPUs (Ray leaves out a resource none of which is free)."""
    return "{" + ", ".join(f"{k}: {resources.get(k, 0):g}" for k in ("CPU", "GPU")) + "}"
