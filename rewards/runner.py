"""RewardRunner: scores batches with every configured reward in a pool of worker processes.

Isolation. Rewards run in `num_workers` worker processes: fresh interpreters (`python -c`; never a
fork of a trainer holding threads and GPU state, never a re-import of the trainer's main script)
with the parent's environment, working directory and sys.path, talking over two pipes. Each call has
a time limit; a call past it has its worker killed and replaced while the other workers go on; the
rest of that worker's task is queued again. A worker that dies (segfault, os._exit) is handled the
same way. Exceptions, timeouts, NaN or infinite scores and wrong return types become `RewardError`
records naming the reward and the sample; under on_error="exclude" (default) the sample's score is
None so the trainer drops it, "fallback" puts `fallback_score` in the failed component, "raise"
raises the first error once the batch is scored. Model output is only ever passed to rewards as
data.

Scheduling. Per-sample rewards are cut into about 4 chunks per worker; batch rewards get one call
per `RewardSpec.chunk_size` samples (the whole batch by default). Chunks of all rewards share one
queue, so different rewards run side by side.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from rewards.api import RewardBatch, RewardError, RewardInput, RewardSpec
from rewards.compat import BATCH_STYLES
from rewards.registry import resolve_reference

ON_ERROR = ("exclude", "fallback", "raise")
ASYNC_GRACE_S = 1.0  # async calls time out inside the worker first; the kill is the backstop


@dataclass
class _Task:
    task_id: int
    spec: int
    positions: list[int]  # positions in the scored batch, in the order sent
    reported: set[int] = field(default_factory=set)  # task-local positions with a result

    def unreported(self) -> list[int]:
        return [k for k in range(len(self.positions)) if k not in self.reported]


WORKER_COMMAND = "import sys; from rewards.worker import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection  # worker -> parent
    out: Connection  # parent -> worker
    started: float
    task: _Task | None = None
    ready: bool = False
    last_event: float = 0.0


def _stop(worker: _Worker):
    if worker.process.poll() is None:
        worker.process.kill()
    worker.process.wait()
    worker.conn.close()
    worker.out.close()


def _stop_all(workers: list[_Worker]):
    for worker in workers:
        try:
            worker.out.send(None)
        except OSError:
            pass
    for worker in workers:
        try:
            worker.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        _stop(worker)


class RewardRunner:
    """Scores `RewardInput`s with weighted rewards in isolated worker processes.

    Args:
        specs: the reward components (unique names).
        num_workers: worker processes (each loads every reward once).
        timeout_s: time limit of one reward call (one sample, or one batch call).
        on_error: "exclude" | "fallback" | "raise" (see the module docstring).
        fallback_score: the failed component's value under on_error="fallback".
        start_timeout_s: time limit for a worker to start and import every reward.
    """

    def __init__(self, specs: list[RewardSpec], num_workers: int = 2, timeout_s: float = 30.0,
                 on_error: str = "exclude", fallback_score: float = 0.0, start_timeout_s: float = 120.0):
        if not specs or not all(isinstance(s, RewardSpec) for s in specs):
            raise ValueError(f"RewardRunner needs a non-empty list of RewardSpec, got {specs!r}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardRunner: reward names must be unique, got {names}")
        if on_error not in ON_ERROR:
            raise ValueError(f"RewardRunner: on_error must be one of {ON_ERROR}, got {on_error!r}")
        if num_workers < 1:
            raise ValueError(f"RewardRunner: num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0 or not start_timeout_s > 0:
            raise ValueError(f"RewardRunner: timeouts must be > 0, got {timeout_s} and {start_timeout_s}")
        if not math.isfinite(fallback_score):
            raise ValueError(f"RewardRunner: fallback_score must be finite, got {fallback_score}")
        self.specs = list(specs)
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.fallback_score = float(fallback_score)
        self.start_timeout_s = start_timeout_s
        self._rewards = [(s.name, resolve_reference(s.fn), dict(s.kwargs)) for s in specs]
        self._next_task = 0
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        self.styles: list[str] = []
        """Detected style of each spec (see rewards.compat), known once the workers started."""
        self.is_async: list[bool] = []
        for _ in range(num_workers):
            self._workers.append(self._spawn())
        self._wait_ready()

    # --- worker lifecycle -------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        from_worker, worker_out = os.pipe()
        worker_in, to_worker = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = subprocess.Popen([sys.executable, "-c", WORKER_COMMAND, str(worker_in), str(worker_out)],
                                   pass_fds=(worker_in, worker_out), env=env, stdin=subprocess.DEVNULL)
        os.close(worker_in)
        os.close(worker_out)
        worker = _Worker(process, Connection(from_worker, writable=False), Connection(to_worker, readable=False),
                         started=time.monotonic())
        try:
            worker.out.send(self._rewards)
        except OSError:  # exited at once; reading its pipe reports how
            pass
        return worker

    def _on_ready(self, worker: _Worker, message: tuple):
        if message[0] == "died":
            self.close()
            raise RuntimeError(f"a reward worker exited while starting (exit code {message[1]})")
        if message[0] == "load_error":
            _, name, text = message
            self.close()
            raise ValueError(f"reward {name!r} could not be loaded: {text}")
        _, styles, is_async = message
        self.styles, self.is_async = styles, is_async
        worker.ready = True

    def _wait_ready(self):
        pending = list(self._workers)
        while pending:
            left = min(w.started for w in pending) + self.start_timeout_s - time.monotonic()
            ready = wait([w.conn for w in pending], timeout=max(left, 0))
            if not ready:
                self.close()
                raise RuntimeError(f"reward workers did not start within {self.start_timeout_s:g} s")
            for worker in [w for w in pending if w.conn in ready]:
                pending.remove(worker)
                self._on_ready(worker, self._receive(worker))

    def _receive(self, worker: _Worker) -> tuple:
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            return ("died", worker.process.wait())

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (they change when a worker is replaced)."""
        return [w.process.pid for w in self._workers if w.process.poll() is None]

    def close(self):
        """Stops the worker processes (also done by `with` and at garbage collection)."""
        self._finalizer()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- scoring ----------------------------------------------------------------------------------

    def _tasks(self, n: int) -> deque[_Task]:
        per_spec = []
        for k, spec in enumerate(self.specs):
            if self.styles[k] in BATCH_STYLES:
                size = spec.chunk_size or n
            else:
                size = max(1, math.ceil(n / (4 * self.num_workers)))
            per_spec.append([list(range(a, min(a + size, n))) for a in range(0, n, size)])
        tasks = deque()
        for round_ in range(max(len(chunks) for chunks in per_spec)):
            for k, chunks in enumerate(per_spec):
                if round_ < len(chunks):
                    tasks.append(_Task(self._new_task_id(), k, chunks[round_]))
        return tasks

    def _new_task_id(self) -> int:
        self._next_task += 1
        return self._next_task

    def _deadline(self, worker: _Worker) -> float:
        if not worker.ready:
            return worker.started + self.start_timeout_s
        spec = worker.task.spec
        limit = self.specs[spec].timeout_s or self.timeout_s
        return worker.last_event + limit + (ASYNC_GRACE_S if self.is_async[spec] else 0.0)

    def score(self, inputs: list[RewardInput]) -> RewardBatch:
        """Scores every input with every reward. Not reentrant: one call at a time per runner."""
        if not self._finalizer.alive:
            raise RuntimeError("RewardRunner.score called after close()")
        if not all(isinstance(x, RewardInput) for x in inputs):
            raise TypeError("RewardRunner.score expects a list of RewardInput")
        indices = [x.index for x in inputs]
        if len(set(indices)) != len(indices):
            raise ValueError("RewardRunner.score: RewardInput.index values must be unique within a call")
        start = time.monotonic()
        outcomes: dict[tuple[int, int], tuple] = {}
        seconds = [0.0] * len(self.specs)
        try:
            if inputs:
                self._run(inputs, self._tasks(len(inputs)), outcomes, seconds)
        except BaseException:
            self._replace_busy()
            raise
        return self._assemble(inputs, outcomes, seconds, time.monotonic() - start)

    def _run(self, inputs, queue: deque[_Task], outcomes: dict, seconds: list[float]):
        while True:
            for k, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and queue:
                    task = queue.popleft()
                    limit = self.specs[task.spec].timeout_s or self.timeout_s
                    try:
                        samples = [inputs[p] for p in task.positions]
                        worker.out.send(("task", task.task_id, task.spec, samples, limit))
                    except OSError:  # died while idle: run the task on its replacement
                        queue.appendleft(task)
                        _stop(worker)
                        self._workers[k] = self._spawn()
                        continue
                    worker.task, worker.last_event = task, time.monotonic()
            busy = [w for w in self._workers if w.task is not None or not w.ready]
            if not busy:
                return
            left = min(self._deadline(w) for w in busy) - time.monotonic()
            ready = set(wait([w.conn for w in busy], timeout=max(left, 0)))
            for worker in busy:
                if worker.conn in ready:
                    self._handle(worker, self._receive(worker), queue, outcomes, seconds)
                elif time.monotonic() >= self._deadline(worker):
                    if not worker.ready:
                        self.close()
                        raise RuntimeError(f"a reward worker did not start within {self.start_timeout_s:g} s")
                    self._fail_task(worker, queue, outcomes, "timeout")

    def _handle(self, worker: _Worker, message: tuple, queue, outcomes, seconds):
        kind = message[0]
        if not worker.ready:
            self._on_ready(worker, message)
        elif kind == "died":
            self._fail_task(worker, queue, outcomes, "died", message[1])
        elif kind == "result":
            _, task_id, position, outcome, spent = message
            task = worker.task
            task.reported.add(position)
            outcomes[(task.spec, task.positions[position])] = outcome
            seconds[task.spec] += spent
            worker.last_event = time.monotonic()
        elif kind == "done":
            worker.task = None

    def _fail_task(self, worker: _Worker, queue: deque[_Task], outcomes: dict, why: str, exit_code=None):
        """Kills `worker`, records the error of the call(s) it was running, queues the rest of its
        task first, and starts a replacement."""
        task = worker.task
        _stop(worker)
        self._workers[self._workers.index(worker)] = self._spawn()
        spec = self.specs[task.spec]
        left = task.unreported()
        one_at_a_time = self.styles[task.spec] not in BATCH_STYLES and not self.is_async[task.spec]
        failed, retry = (left[:1], left[1:]) if one_at_a_time else (left, [])
        limit = spec.timeout_s or self.timeout_s
        if why == "timeout":
            error = ("error", "timeout", f"call exceeded {limit:g} s; worker killed and replaced")
        else:
            error = ("error", "exception", f"worker process died (exit code {exit_code}) during the call; replaced")
        for k in failed:
            outcomes[(task.spec, task.positions[k])] = error
        if retry:
            queue.appendleft(_Task(self._new_task_id(), task.spec, [task.positions[k] for k in retry]))

    def _replace_busy(self):
        if not self._finalizer.alive:
            return
        for k, worker in enumerate(self._workers):
            if worker.task is not None or not worker.ready:
                _stop(worker)
                self._workers[k] = self._spawn()

    def _assemble(self, inputs, outcomes: dict, seconds: list[float], elapsed: float) -> RewardBatch:
        n = len(inputs)
        components = {spec.name: [None] * n for spec in self.specs}
        metrics: dict[str, list[float | None]] = {}
        errors: list[RewardError] = []
        failed = [False] * n
        for pos in range(n):
            for k, spec in enumerate(self.specs):
                outcome = outcomes[(k, pos)]
                if outcome[0] == "ok":
                    components[spec.name][pos] = outcome[1]
                    for key, value in outcome[2].items():
                        metrics.setdefault(f"{spec.name}/{key}", [None] * n)[pos] = value
                else:
                    errors.append(RewardError(spec.name, inputs[pos].index, outcome[2], outcome[1]))
                    failed[pos] = True
                    if self.on_error == "fallback":
                        components[spec.name][pos] = self.fallback_score
        scores: list[float | None] = [None] * n
        for pos in range(n):
            values = [(spec.weight, components[spec.name][pos]) for spec in self.specs]
            applicable = [w * v for w, v in values if v is not None]
            if failed[pos] and self.on_error != "fallback":
                continue
            if not applicable:
                errors.append(RewardError(",".join(components), inputs[pos].index,
                                          "no reward applies: every reward returned None (not applicable)", "nan"))
                if self.on_error == "fallback":
                    scores[pos] = self.fallback_score
                continue
            scores[pos] = sum(applicable)
        if errors and self.on_error == "raise":
            first = errors[0]
            first.add_note(f"{len(errors)} reward error(s) in this batch of {n} samples")
            raise first
        return RewardBatch(scores=scores, components=components, metrics=metrics, errors=errors,
                           call_seconds={spec.name: seconds[k] for k, spec in enumerate(self.specs)},
                           elapsed_s=elapsed)
