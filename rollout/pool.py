"""A pool of vLLM rollout workers (Ray actors in one placement group).

`submit` hands each prompt group to the worker with the least outstanding work; `results` streams
groups back as each completes, from whichever worker finishes first, so the driver (rewards, dynamic
sampling) acts before the slowest sample of the step is done.

Worker loss: when a worker dies, its outstanding groups go to the survivors at once and the worker
is restarted in its bundle; it takes work again after loading the current weights. A group is
returned exactly once (results are matched to outstanding requests by uid).

Weight sync: "object_store" (CPU default) puts one copy of the weights in Ray's shared memory and
every engine loads it through vLLM's reload API; "broadcast" (GPU default) streams them in buckets
from learner rank 0 over a NCCL (GPU) or gloo (CPU) group (rollout/weight_sync.py). The weight
source is an actor with `export_weights`, `weight_specs`, `endpoint`, `join_weight_group` and
`broadcast_weights` (engine/learner.py); the pool knows nothing else of the learner.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.placement import reserve
from rollout.records import GroupRequest, GroupResult, from_record, unpack
from rollout.weight_sync import plan_buckets
from rollout.worker import RolloutWorker

log = logging.getLogger("pathorl.rollout")
TRANSPORTS = ("object_store", "broadcast")


class RolloutPool:
    def __init__(self, model_path: str, num_workers: int, sampling: dict[str, Any], *, dtype: str = "float32",
                 max_model_len: int = 1024, seed: int = 0, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 num_cpus_per_worker: float = 1.0, num_gpus_per_worker: float = 0.0, env_vars: dict | None = None,
                 weight_transport: str = "object_store", bucket_mb: float = 256.0, max_images_per_prompt: int = 1,
                 placement_timeout_s: float = 300.0, resources: dict[str, float] | None = None):
        if weight_transport not in TRANSPORTS:
            raise ValueError(f"weight transport must be one of {TRANSPORTS}, got {weight_transport!r}")
        self.num_workers = num_workers
        self.transport = weight_transport
        self.bucket_mb = bucket_mb
        bundle = {"CPU": num_cpus_per_worker, **(resources or {})}
        if num_gpus_per_worker:
            bundle["GPU"] = num_gpus_per_worker * tensor_parallel_size
        self._pg = reserve([bundle] * num_workers, "rollout workers", placement_timeout_s)
        self._worker_kwargs = dict(model_path=model_path, sampling=sampling, dtype=dtype, max_model_len=max_model_len,
                                   seed=seed, kv_cache_gib=kv_cache_gib,
                                   gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                   tensor_parallel_size=tensor_parallel_size,
                                   max_images_per_prompt=max_images_per_prompt)
        self._actor_options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker * tensor_parallel_size,
                                   max_concurrency=4, runtime_env={"env_vars": dict(env_vars or {})})
        self.workers = [self._start(i) for i in range(num_workers)]
        self._starting = {i: w.ready.remote() for i, w in enumerate(self.workers)}
        self._usable: set[int] = set()
        self._outstanding: list[dict[str, GroupRequest]] = [{} for _ in range(num_workers)]
        self._collecting: dict[Any, int] = {}
        self._plan = None  # broadcast plan; None until the group is (re)built
        self.weights_source: Any = None
        """Actor whose `export_weights` brings a restarted worker to the current weights."""
        self.restarts = 0

    def _start(self, index: int) -> Any:
        strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index)
        actor_cls = ray.remote(RolloutWorker)
        return actor_cls.options(scheduling_strategy=strategy, **self._actor_options).remote(
            index=index, **self._worker_kwargs)

    def wait_ready(self) -> None:
        """Blocks until every engine is up (construction only launches them, so the caller can start
        the learners meanwhile)."""
        for i in list(self._starting):
            self._admit(i, block=True)

    def _admit(self, i: int, block: bool) -> bool:
        """Makes worker i usable once it is up; a restarted one first loads the current weights."""
        ready, _ = ray.wait([self._starting[i]], timeout=None if block else 0)
        if not ready:
            return False
        ray.get(self._starting.pop(i))
        if self.restarts and self.weights_source is not None:
            ray.get(self.workers[i].load_weights.remote(self.weights_source.export_weights.remote()))
        self._usable.add(i)
        return True

    def _lost(self, i: int, error: Exception) -> None:
        orphans = list(self._outstanding[i].values())
        log.warning("rollout worker %d died (%s); restarting it, %d groups go to the survivors", i,
                    type(error).__name__, len(orphans))
        self._outstanding[i] = {}
        self._usable.discard(i)
        self._collecting = {ref: w for ref, w in self._collecting.items() if w != i}
        self.workers[i] = self._start(i)
        self._starting[i] = self.workers[i].ready.remote()
        self._plan = None
        self.restarts += 1
        if not self._usable:
            self._admit(i, block=True)
        self.submit(orphans)

    @property
    def outstanding(self) -> int:
        """Groups submitted and not yet returned."""
        return sum(len(o) for o in self._outstanding)

    def submit(self, requests: list[GroupRequest]) -> None:
        """Queues prompt groups, each on the usable worker with the fewest outstanding samples."""
        batches: dict[int, list[GroupRequest]] = {}
        for req in requests:
            i = min(self._usable, key=lambda w: sum(r.n for r in self._outstanding[w].values()))
            self._outstanding[i][req.uid] = req
            batches.setdefault(i, []).append(req)
        for i, batch in batches.items():
            try:
                ray.get(self.workers[i].submit.remote(batch))
            except RayActorError as e:
                self._lost(i, e)

    def results(self, timeout_s: float | None = None) -> list[GroupResult]:
        """The next finished groups (at least one unless nothing is outstanding or `timeout_s` passes)."""
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        while self.outstanding:
            for i in list(self._starting):
                self._admit(i, block=False)
            for i in self._usable:
                if self._outstanding[i] and i not in self._collecting.values():
                    self._collecting[self.workers[i].collect.remote(1.0)] = i
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready, _ = ray.wait(list(self._collecting), num_returns=1, timeout=wait)
            if not ready:
                return []
            out = []
            for ref in ready:
                i = self._collecting.pop(ref)
                try:
                    records = unpack(ray.get(ref))
                except RayActorError as e:
                    self._lost(i, e)
                    continue
                for result in map(from_record, records):
                    if self._outstanding[i].pop(result.uid, None) is not None:
                        out.append(result)
            if out:
                return out
        return []

    def sync_weights(self, source: Any) -> float:
        """Every engine takes the weights of `source` (learner rank 0); returns seconds."""
        t0 = time.perf_counter()
        self.weights_source = source
        self.wait_ready()
        if self.transport == "object_store":
            weights = source.export_weights.remote()
            ray.get([w.load_weights.remote(weights) for w in self.workers])
        else:
            if self._plan is None:
                self._join(source)
            ray.get([source.broadcast_weights.remote(self._plan)]
                    + [w.receive_weights.remote(self._plan) for w in self.workers])
        return time.perf_counter() - t0

    def _join(self, source: Any) -> None:
        """(Re)builds the broadcast group: rank 0 the source, ranks 1..N the workers."""
        address, port = ray.get(source.endpoint.remote())
        world = self.num_workers + 1
        backend = "nccl" if self._actor_options["num_gpus"] else "gloo"
        ray.get([source.join_weight_group.remote(address, port, 0, world, backend)]
                + [w.join_weight_group.remote(address, port, i + 1, world, backend)
                   for i, w in enumerate(self.workers)])
        self._plan = plan_buckets(ray.get(source.weight_specs.remote()), self.bucket_mb)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self._pg)
