"""The reward worker process: loads every reward once, then runs tasks sent by `RewardRunner`.

Protocol (pickled messages on two pipes). Parent -> worker: first the rewards to load, then ("task",
task_id, spec, samples, timeout_s) per task, or None to exit. Worker -> parent: ("ready", styles,
is_async) or ("load_error", spec_name, message) once at start; then per task one ("result", task_id,
position, outcome, seconds) per sample as soon as that sample is scored, and ("done", task_id).
outcome = ("ok", score, metrics) or ("error", kind, message). Per-sample rewards run one call at a
time, in order (async ones run all calls of the task concurrently, each under
`asyncio.wait_for(timeout_s)`); batch rewards run one call on all of the task's samples. Sync calls
are never timed out here: the parent kills the process.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from rewards.compat import BATCH_STYLES, NonFiniteScore, ReturnTypeError, coerce, detect_style, invoke, split_batch
from rewards.registry import load_reference

ASYNC_THREADS = 64  # default executor size for async rewards that push blocking work to threads


def describe(exc: BaseException) -> str:
    """"Type: message (at file.py:line in function)" with the innermost frame of the traceback."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


def _outcome_of(style: str, raw: Any) -> tuple:
    try:
        score, metrics = coerce(style, raw)
        return ("ok", score, metrics)
    except ReturnTypeError as exc:
        return ("error", "type", str(exc))
    except NonFiniteScore as exc:
        return ("error", "nan", str(exc))
    except (Exception, SystemExit) as exc:
        return ("error", "exception", describe(exc))


def _failure(exc: BaseException, timeout_s: float) -> tuple:
    if isinstance(exc, TimeoutError):
        return ("error", "timeout", f"call exceeded {timeout_s:g} s ({describe(exc)})")
    if isinstance(exc, ReturnTypeError):
        return ("error", "type", str(exc))
    if isinstance(exc, NonFiniteScore):
        return ("error", "nan", str(exc))
    return ("error", "exception", describe(exc))


async def _with_executor(awaitable, timeout_s: float):
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(ASYNC_THREADS))
    return await asyncio.wait_for(awaitable, timeout_s)


class Worker:
    def __init__(self, conn, rewards: list[tuple[str, Any, str, dict, bool]]):
        self.conn = conn
        self.rewards = rewards  # (name, fn, style, kwargs, is_async) per spec

    def run(self, task_id: int, spec: int, samples: list, timeout_s: float):
        _, fn, style, kwargs, is_async = self.rewards[spec]
        if style in BATCH_STYLES:
            self._run_batch(task_id, fn, style, kwargs, samples, timeout_s)
        elif is_async:
            asyncio.run(self._run_concurrently(task_id, fn, style, kwargs, samples, timeout_s))
        else:
            for position, sample in enumerate(samples):
                start = time.perf_counter()
                try:
                    raw = invoke(style, fn, [sample], kwargs)
                    if inspect.isawaitable(raw):
                        raw = asyncio.run(_with_executor(raw, timeout_s))
                    outcome = _outcome_of(style, raw)
                except (Exception, SystemExit) as exc:
                    outcome = _failure(exc, timeout_s)
                self.conn.send(("result", task_id, position, outcome, time.perf_counter() - start))

    def _run_batch(self, task_id, fn, style, kwargs, samples, timeout_s):
        start = time.perf_counter()
        try:
            raw = invoke(style, fn, samples, kwargs)
            if inspect.isawaitable(raw):
                raw = asyncio.run(_with_executor(raw, timeout_s))
            outcomes = [_outcome_of(style, item) for item in split_batch(style, raw, len(samples))]
        except (Exception, SystemExit) as exc:
            outcomes = [_failure(exc, timeout_s)] * len(samples)
        share = (time.perf_counter() - start) / len(samples)
        for position, outcome in enumerate(outcomes):
            self.conn.send(("result", task_id, position, outcome, share))

    async def _run_concurrently(self, task_id, fn, style, kwargs, samples, timeout_s):
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(ASYNC_THREADS))

        async def one(position, sample):
            start = time.perf_counter()
            try:
                raw = await asyncio.wait_for(invoke(style, fn, [sample], kwargs), timeout_s)
                outcome = _outcome_of(style, raw)
            except (Exception, SystemExit) as exc:
                outcome = _failure(exc, timeout_s)
            self.conn.send(("result", task_id, position, outcome, time.perf_counter() - start))

        await asyncio.gather(*(one(p, s) for p, s in enumerate(samples)))


def serve(read_fd: int, write_fd: int):
    """Process entry point, on the pipe ends the parent passed. The first message is the list of
    (spec name, resolved reference, kwargs) per spec."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    inbox, conn = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        rewards = inbox.recv()
    except EOFError:
        return
    loaded = []
    for name, reference, kwargs in rewards:
        try:
            fn, module = load_reference(reference)
            style = detect_style(fn, module, reference)
        except BaseException as exc:
            conn.send(("load_error", name, describe(exc)))
            return
        loaded.append((name, fn, style, kwargs, inspect.iscoroutinefunction(fn)))
    worker = Worker(conn, loaded)
    conn.send(("ready", [r[2] for r in loaded], [r[4] for r in loaded]))
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        _, task_id, spec, samples, timeout_s = message
        worker.run(task_id, spec, samples, timeout_s)
        conn.send(("done", task_id))
