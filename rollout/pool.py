"""A pool of vLLM rollout workers (Ray actors in one placement group).

`submit` hands each prompt group to the worker with the least outstanding work; `results` streams
groups back as each completes, from whichever worker finishes first, so the driver (rewards, dynamic
sampling) acts before the slowest sample of the step is done.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.worker import GroupRequest, GroupResult, RolloutWorker

log = logging.getLogger("pathorl.rollout")


class RolloutPool:
    def __init__(self, model_path: str, num_workers: int, sampling: dict[str, Any], *, dtype: str = "float32",
                 max_model_len: int = 1024, seed: int = 0, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 num_cpus_per_worker: float = 1.0, num_gpus_per_worker: float = 0.0, env_vars: dict | None = None):
        self.num_workers = num_workers
        bundle = {"CPU": num_cpus_per_worker}
        if num_gpus_per_worker:
            bundle["GPU"] = num_gpus_per_worker * tensor_parallel_size
        self._pg = placement_group([bundle] * num_workers, strategy="PACK")
        ray.get(self._pg.ready())
        self._worker_kwargs = dict(model_path=model_path, sampling=sampling, dtype=dtype, max_model_len=max_model_len,
                                   seed=seed, kv_cache_gib=kv_cache_gib,
                                   gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                   tensor_parallel_size=tensor_parallel_size)
        self._actor_options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker * tensor_parallel_size,
                                   max_concurrency=4,
                                   runtime_env={"env_vars": dict(env_vars or {})})
        self.workers = [self._start(i) for i in range(num_workers)]
        self._starting = [w.ready.remote() for w in self.workers]
        self._outstanding: list[dict[str, GroupRequest]] = [{} for _ in range(num_workers)]
        self._collecting: dict[Any, int] = {}

    def _start(self, index: int) -> Any:
        strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index)
        actor_cls = ray.remote(RolloutWorker)
        return actor_cls.options(scheduling_strategy=strategy, **self._actor_options).remote(
            index=index, **self._worker_kwargs)

    def wait_ready(self) -> None:
        """Blocks until every engine is up (construction only launches them, so the caller can start
        the learners meanwhile)."""
        ray.get(self._starting)

    @property
    def outstanding(self) -> int:
        """Groups submitted and not yet returned."""
        return sum(len(o) for o in self._outstanding)

    def submit(self, requests: list[GroupRequest]) -> None:
        """Queues prompt groups, each on the worker with the fewest outstanding samples."""
        batches: list[list[GroupRequest]] = [[] for _ in self.workers]
        for req in requests:
            load = [sum(r.n for r in o.values()) for o in self._outstanding]
            i = min(range(len(load)), key=load.__getitem__)
            self._outstanding[i][req.uid] = req
            batches[i].append(req)
        ray.get([self.workers[i].submit.remote(b) for i, b in enumerate(batches) if b])

    def results(self, timeout_s: float | None = None) -> list[GroupResult]:
        """The next finished groups (at least one unless nothing is outstanding or `timeout_s` passes)."""
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        while self.outstanding:
            for i, pending in enumerate(self._outstanding):
                if pending and i not in self._collecting.values():
                    self._collecting[self.workers[i].collect.remote(1.0)] = i
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready, _ = ray.wait(list(self._collecting), num_returns=1, timeout=wait)
            if not ready:
                return []
            out = []
            for ref in ready:
                i = self._collecting.pop(ref)
                for result in ray.get(ref):
                    if self._outstanding[i].pop(result.uid, None) is not None:
                        out.append(result)
            if out:
                return out
        return []

    def load_weights(self, weights_ref: Any) -> float:
        """Every worker loads the weights behind `weights_ref` (an object ref of {name: array});
        returns the wall time of the slowest."""
        t0 = time.perf_counter()
        ray.get([w.load_weights.remote(weights_ref) for w in self.workers])
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self._pg)
