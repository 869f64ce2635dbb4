"""A vLLM multimodal generator in a Ray actor.

One thread owns the engine and runs its step loop; Ray calls (`submit`, `collect`, weight updates)
arrive on other threads of the same actor (max_concurrency > 1) and talk to the loop through queues,
so new prompts join the running batch at once and each prompt's group of samples is returned as soon
as its last sample finishes — a stream, not a barrier.

Token-in/token-out: results carry the prompt token ids vLLM actually ran (image placeholders
expanded) and each sample's token ids and sampled log-probs, so nobody re-tokenises text.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable

from PIL import Image

from rollout.records import GroupRequest, GroupResult, Sample, pack, to_record
from rollout.weight_sync import Bucket, join_group, receive


def engine_env(kv_cache_gib: float) -> None:
    # In-process engine: starts in seconds instead of a minute and lets us reach the model runner.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))


def engine_kwargs(model_path: str, dtype: str, max_model_len: int, seed: int, enforce_eager: bool,
                  tensor_parallel_size: int, gpu_memory_utilization: float, max_images_per_prompt: int) -> dict[str, Any]:
    """`vllm.LLM` arguments of a rollout engine (also what launch/bench_rollout.py gives raw vLLM)."""
    kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                  limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
                  # Sampled log-probs after temperature, as the learner computes them.
                  logprobs_mode="processed_logprobs")
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    else:
        kwargs["distributed_executor_backend"] = "uni"
    if _has_cuda():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return kwargs


class RolloutWorker:
    """Holds one `vllm.LLM`. Create it as a Ray actor with max_concurrency >= 3."""

    def __init__(self, index: int, model_path: str, sampling: dict[str, Any], dtype: str = "float32",
                 max_model_len: int = 1024, seed: int = 0, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                 max_images_per_prompt: int = 1):
        engine_env(kv_cache_gib)
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.index = index
        kwargs = engine_kwargs(model_path, dtype, max_model_len, seed + index, enforce_eager, tensor_parallel_size,
                               gpu_memory_utilization, max_images_per_prompt)
        self._sampling = dict(sampling, logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY)
        self._sampling_cls = SamplingParams
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._inbox: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._submitted: dict[str, float] = {}
        self._tokens_generated = 0
        self._busy_s = 0.0
        self._fatal: BaseException | None = None
        # The engine is built and stepped on one thread: vLLM's CPU backend binds the OpenMP threads
        # of the thread that creates it, and stepping it from another thread ran at half the speed.
        started = threading.Event()
        self._loop = threading.Thread(target=self._run, args=(kwargs, started), name=f"vllm-loop-{index}",
                                      daemon=True)
        self._loop.start()
        started.wait()
        self._raise_if_dead()

    # ---- Ray-facing API (called from other threads) ----

    def ready(self) -> int:
        return self.index

    def submit(self, requests: list[GroupRequest]) -> int:
        """Queues prompts; returns how many this worker has outstanding."""
        self._raise_if_dead()
        now = time.perf_counter()
        for req in requests:
            self._submitted[req.uid] = now
            self._inbox.put(("generate", req))
        return len(self._submitted)

    def collect(self, timeout_s: float = 1.0) -> bytes:
        """Finished groups as msgpack records (rollout/records.py); blocks until at least one is ready
        or `timeout_s` passes."""
        out = []
        try:
            out.append(self._done.get(timeout=timeout_s))
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self._raise_if_dead()
        return pack([to_record(r) for r in out])

    def outstanding(self) -> list[str]:
        return list(self._submitted)

    def load_weights(self, weights: Any) -> float:
        """Loads new weights into the engine: `weights` is a {name: array} mapping in Hugging Face
        names, or a callable yielding (name, tensor) pairs. Runs between generations; returns seconds."""
        return self._call(lambda: self._load_weights(weights))

    def join_weight_group(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str) -> None:
        """Joins the broadcast group of the weight source (rank 0); see rollout/weight_sync.py."""
        self._weight_group = join_group(master_addr, master_port, rank, world_size, backend)

    def receive_weights(self, plan: list[Bucket]) -> float:
        """Receives one broadcast of the weights (bucket by bucket, loading as they arrive)."""
        device = "cuda" if _has_cuda() else "cpu"
        return self._call(lambda: self._load_weights(lambda: receive(self._weight_group, plan, device)))

    def prompt_logprobs(self, prompt: str, images: list[Image.Image]) -> tuple[list[int], list[float | None]]:
        """Log-prob of every prompt token given the ones before (None for the first): the engine's
        view of a fixed sequence, for checking it against the learner."""
        return self._call(lambda: self._prompt_logprobs(prompt, images))

    def stats(self) -> dict[str, float]:
        return {"tokens_generated": float(self._tokens_generated), "busy_s": self._busy_s}

    # ---- engine thread ----

    def _call(self, fn: Callable[[], Any]) -> Any:
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._inbox.put(("call", (fn, reply)))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def _raise_if_dead(self) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"rollout worker {self.index}: engine loop died: {self._fatal!r}") from self._fatal

    def _run(self, engine_kwargs: dict[str, Any], started: threading.Event) -> None:
        try:
            from vllm import LLM

            self.llm = LLM(**engine_kwargs)
            self.engine = self.llm.llm_engine
        except BaseException as e:
            self._fatal = e
            raise
        finally:
            started.set()
        try:
            pending_calls: list = []
            while True:
                busy = self.engine.has_unfinished_requests()
                try:
                    kind, item = self._inbox.get(block=not busy and not pending_calls, timeout=None)
                except queue.Empty:
                    kind = None
                if kind == "generate":
                    self._add(item)
                    continue
                if kind == "call":
                    pending_calls.append(item)
                    continue
                if busy:
                    t0 = time.perf_counter()
                    for out in self.engine.step():
                        if out.finished:
                            self._finish(out)
                    self._busy_s += time.perf_counter() - t0
                elif pending_calls:
                    # Calls (weight loads, scoring) only run on an idle engine.
                    fn, reply = pending_calls.pop(0)
                    try:
                        reply.put((True, fn()))
                    except Exception as e:  # handed back to the caller
                        reply.put((False, e))
        except BaseException as e:  # the engine itself broke: every later call reports it
            self._fatal = e
            raise

    def _add(self, req: GroupRequest) -> None:
        prompt: dict[str, Any] = {"prompt": req.prompt}
        if req.images:
            prompt["multi_modal_data"] = {"image": req.images if len(req.images) > 1 else req.images[0]}
        try:
            params = self._sampling_cls(**{**self._sampling, **(req.sampling or {}), "n": req.n})
            self.engine.add_request(req.uid, prompt, params)
        except Exception as e:
            started = self._submitted.pop(req.uid, time.perf_counter())
            self._done.put(GroupResult(uid=req.uid, worker=self.index, error=f"{type(e).__name__}: {e}",
                                       latency_s=time.perf_counter() - started))

    def _finish(self, out: Any) -> None:
        samples = []
        for c in out.outputs:
            logprobs = [lp[tok].logprob for lp, tok in zip(c.logprobs or [], c.token_ids)]
            samples.append(Sample(token_ids=list(c.token_ids), logprobs=logprobs,
                                  finish_reason=str(c.finish_reason)))
            self._tokens_generated += len(c.token_ids)
        started = self._submitted.pop(out.request_id, time.perf_counter())
        # vLLM also ends requests with "abort", "error" (possibly after partial tokens) or
        # "repetition": such a sample is no complete response to reward and train on.
        odd = sorted({s.finish_reason for s in samples} - {"stop", "length"})
        error = f"vLLM ended samples with finish_reason {odd} (only 'stop' and 'length' are complete)" if odd else None
        self._done.put(GroupResult(uid=out.request_id, worker=self.index,
                                   prompt_token_ids=list(out.prompt_token_ids or []),
                                   samples=[] if error else samples, error=error,
                                   latency_s=time.perf_counter() - started))

    def _load_weights(self, weights: Any) -> float:
        import torch

        t0 = time.perf_counter()
        if callable(weights):
            items = weights()
        else:
            items = ((name, torch.as_tensor(array)) for name, array in weights.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        self.llm.collective_rpc(_repack_tied_lm_head)
        # Cached vision embeddings and KV blocks were computed by the old weights; processed pixels
        # (the multimodal processor cache) do not depend on weights and stay.
        self.engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def _prompt_logprobs(self, prompt: str, images: list[Image.Image]) -> tuple[list[int], list[float | None]]:
        request: dict[str, Any] = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        params = self._sampling_cls(max_tokens=1, prompt_logprobs=0, output_kind=self._final_only)
        uid = f"score-{time.perf_counter_ns()}"
        self.engine.add_request(uid, request, params)
        result = None
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id == uid:
                    result = out
        ids = list(result.prompt_token_ids)
        logprobs = [None if d is None else d[tok].logprob for d, tok in zip(result.prompt_logprobs, ids)]
        return ids, logprobs


def _repack_tied_lm_head(worker: Any) -> None:
    """vLLM's CPU backend packs each linear layer's weight for its GEMM. A reload repacks the layers
    it loads, but a tied LM head is never loaded (its checkpoint name is skipped) and keeps the
    packing of the old embedding: logits would come from stale weights. Repack it from the (shared,
    updated) embedding. Tied is decided by the head sharing the embedding's weight, not by the
    config flag: a folder holding both tensors makes vLLM clear the flag and tie them anyway."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    model = worker.model_runner.get_model()
    embeddings = {m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "VocabParallelEmbedding"}
    for module in model.modules():
        if type(module).__name__ == "ParallelLMHead" and module.weight.data_ptr() in embeddings:
            module.quant_method.process_weights_after_loading(module)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
