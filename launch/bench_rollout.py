"""Rollout throughput: raw `vllm.LLM.generate` against the pathorl rollout pool, side by side in one run.

    python launch/bench_rollout.py                          # the demo's tiny model and prompts, one worker, 3 repeats
    python launch/bench_rollout.py --workers 1,2,4 --mem-bw 3350 --json out.json   # e.g. an H100 (GB/s)

Same model, prompts (with their images), sampling parameters and engine arguments for both. Raw vLLM
runs in a child process (its engine is gone before the pool starts); the pool runs its Ray actors with
the cores split evenly between workers. Each side first generates a warm-up round (engine start-up,
first multimodal batch), then the timed round: every prompt submitted at once, `--n` samples each.

The configurations run `--repeats` times, interleaved (raw before Ray starts, raw while the Ray
cluster is up, each pool size; then again), and the ratios are reported as median and range. Raw
vLLM with the cluster up shares the cores with Ray's own processes exactly as the pool does, which
separates what the pool's code costs from what running Ray beside it costs; each round also reports
the CPU time every other process on the machine took (`others_cpu_frac`: CPU-seconds per wall
second, the Ray daemons and the driver).

Every sample runs to `--max-tokens` (EOS ignored) unless `--variable-length`: both sides then do the
same work, where random response lengths would change a round's cost from round to round.

Reported per configuration: tokens/s, prompts/s, the ratio to raw vLLM (goal >= 0.95 with one
worker), the share of the wall time spent outside the engine's steps (`outside`: submission,
results, the driver; raw vLLM's generate loop likewise) and the engine's own speed (`eng tok/s`:
tokens per second of stepping, which the code around the engine cannot change), scaling efficiency (tokens/s of k workers / (k x one worker's)), p50/p99 group latency
(submission to the group's completion, as the driver sees it; raw generate returns all groups at
the end). With `--mem-bw` (GB/s; "measure" times a large memory copy here) the decode roofline:
a decode step must read every weight once, so a step takes at least weight_bytes / bandwidth and
yields one token per running sequence; the ceiling is running_sequences x bandwidth / weight_bytes
tokens/s, and "% of roofline" is the measured tokens/s against it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(ROOT, "artifacts", "tiny-qwen2.5-vl")
DEMO_DATA = os.path.join(ROOT, "artifacts", "demo-data", "train.jsonl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help="Hugging Face Qwen2.5-VL folder (default: the demo's tiny model)")
    p.add_argument("--data", default=DEMO_DATA, help="rows in the engine's dataset schema (default: the demo's)")
    p.add_argument("--prompts", type=int, default=32, help="prompts in the timed round")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (the group size)")
    p.add_argument("--max-tokens", type=int, default=48, help="max new tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--variable-length", action="store_true",
                   help="stop samples at EOS (default: every sample runs to --max-tokens, so both sides do the "
                        "same work; with random lengths a round's cost varies with them)")
    p.add_argument("--workers", default="1", help="comma-separated pool sizes to run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="1 on GPU machines")
    p.add_argument("--mem-bw", default=None,
                   help="memory bandwidth in GB/s for the decode roofline, or 'measure' (a large copy here)")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    try:
        args.workers = sorted({int(k) for k in args.workers.split(",")})
    except ValueError:
        p.error(f"--workers: expected comma-separated integers, got {args.workers!r}")
    if not args.workers or args.workers[0] < 1:
        p.error("--workers: pool sizes must be >= 1")
    for name in ("prompts", "n", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.mem_bw not in (None, "measure"):
        try:
            args.mem_bw = float(args.mem_bw)
        except ValueError:
            p.error(f"--mem-bw: expected GB/s or 'measure', got {args.mem_bw!r}")
    return args


def ensure_demo_inputs(args: argparse.Namespace) -> None:
    """Builds the demo's tiny model and data when the defaults are asked for and missing."""
    if args.model == DEMO_MODEL and not os.path.exists(os.path.join(DEMO_MODEL, "model.safetensors")):
        from launch.build_tiny_model import build

        build(DEMO_MODEL)
    if args.data == DEMO_DATA and not os.path.exists(DEMO_DATA):
        from launch.build_demo_data import build

        build(os.path.dirname(DEMO_DATA))
    for what, path in (("--model", os.path.join(args.model, "config.json")), ("--data", args.data)):
        if not os.path.exists(path):
            raise SystemExit(f"{what}: {path} does not exist")


def load_prompts(args: argparse.Namespace) -> list[tuple[str, list]]:
    """(chat-templated prompt text, decoded images) for the first `--prompts` rows, cycling the rows
    when there are fewer; decoded once here and shared by both sides."""
    from transformers import AutoProcessor

    from engine.config import PATHO_R1_SYSTEM_PROMPT
    from engine.data import PromptBuilder, load_rows

    rows, _ = load_rows(args.data, "skip")
    if not rows:
        raise SystemExit(f"--data: {args.data} has no usable rows")
    builder = PromptBuilder(AutoProcessor.from_pretrained(args.model), PATHO_R1_SYSTEM_PROMPT, args.max_model_len)
    prompts = []
    for k in range(args.prompts):
        p = builder.build(rows[k % len(rows)])
        prompts.append((p.text, p.images))
    return prompts


def engine_config(args: argparse.Namespace) -> dict:
    from rollout.worker import engine_kwargs

    return engine_kwargs(args.model, args.dtype, args.max_model_len, 0, enforce_eager=True, tensor_parallel_size=1,
                         gpu_memory_utilization=0.8, max_images_per_prompt=1)


def sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens, ignore_eos=not args.variable_length)


def run_raw(args: argparse.Namespace, prompts: list[tuple[str, list]], threads: int) -> dict:
    """Raw vLLM in this (child) process: one `generate` call with every prompt, after a warm-up."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from rollout.worker import engine_env

    engine_env(1.0)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_config(args))
    params = SamplingParams(n=args.n, logprobs=0, **sampling(args))
    requests = [{"prompt": text, "multi_modal_data": {"image": images[0]}} if images else {"prompt": text}
                for text, images in prompts]
    llm.generate(requests[:4], params, use_tqdm=False)
    busy = [0.0]
    step = llm.llm_engine.step

    def timed_step():  # the engine's own time, as the pool's worker counts it (RolloutWorker.stats)
        t = time.perf_counter()
        try:
            return step()
        finally:
            busy[0] += time.perf_counter() - t

    llm.llm_engine.step = timed_step
    others = OthersCPU([os.getpid()])
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"wall_s": wall, "tokens": tokens, "latencies_s": [wall] * len(outputs), "others_cpu_frac": others.frac(wall),
            "engine_busy_s": busy[0]}


def run_pool(args: argparse.Namespace, prompts: list[tuple[str, list]], workers: int) -> dict:
    import ray

    from rollout.pool import RolloutPool
    from rollout.records import GroupRequest

    cpus = os.cpu_count() or 1
    per_worker = max(1, cpus // workers)
    pool = RolloutPool(args.model, workers, sampling(args), dtype=args.dtype, max_model_len=args.max_model_len,
                       num_cpus_per_worker=cpus / workers, num_gpus_per_worker=args.gpus_per_worker,
                       env_vars=None if args.gpus_per_worker else {"OMP_NUM_THREADS": str(per_worker)})
    try:
        pool.wait_ready()

        def round_trip(batch: list[tuple[str, list]], tag: str) -> tuple[float, int, list[float]]:
            t0 = time.perf_counter()
            pool.submit([GroupRequest(uid=f"{tag}-{k}", prompt=text, images=images, n=args.n)
                         for k, (text, images) in enumerate(batch)])
            tokens, latencies = 0, []
            while pool.outstanding:
                for result in pool.results():
                    if result.error:
                        raise RuntimeError(f"prompt {result.uid}: {result.error}")
                    latencies.append(time.perf_counter() - t0)
                    tokens += sum(len(s.token_ids) for s in result.samples)
            return time.perf_counter() - t0, tokens, latencies

        round_trip(prompts[: 4 * workers], "warmup")
        others = OthersCPU([p.pid for p in psutil.process_iter(["cmdline"])
                            if any("RolloutWorker" in c for c in p.info["cmdline"] or [])])
        busy_before = sum(s["busy_s"] for s in ray.get([w.stats.remote() for w in pool.workers]))
        wall, tokens, latencies = round_trip(prompts, "timed")
        busy = sum(s["busy_s"] for s in ray.get([w.stats.remote() for w in pool.workers])) - busy_before
    finally:
        pool.shutdown()
    return {"wall_s": wall, "tokens": tokens, "latencies_s": latencies, "others_cpu_frac": others.frac(wall),
            "engine_busy_s": busy / workers}


class OthersCPU:
    """CPU time taken by every process on the machine except `engines` (the measured vLLM process
    or actors) from construction to `frac`: the machine's busy time less the engines' own."""

    def __init__(self, engines: list[int]):
        self.engines = [psutil.Process(pid) for pid in engines]
        self.start = self._busy() - self._engines()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    def _engines(self) -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in self.engines)

    def frac(self, wall: float) -> float:
        """CPU-seconds of the other processes per wall second since construction."""
        return (self._busy() - self._engines() - self.start) / wall


def weight_bytes(model_path: str) -> int:
    """Bytes of the weights a decode step reads (the checkpoint's tensors; tied heads counted once)."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(model_path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_path, name), "pt") as f:
                for key in f.keys():
                    if "visual" in key:
                        continue  # the vision tower runs once per image, not per decode step
                    t = f.get_slice(key)
                    numel = 1
                    for d in t.get_shape():
                        numel *= d
                    total += numel * {"F32": 4, "BF16": 2, "F16": 2}.get(t.get_dtype(), 4)
    return total


def measure_bandwidth() -> float:
    """GB/s of a 512 MiB device-to-device copy (read + write), best of 5."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.ones(128 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def summarise(name: str, run: dict, prompts: int) -> dict:
    tps = run["tokens"] / run["wall_s"]
    lat = sorted(run["latencies_s"])
    return {"name": name, "tokens": run["tokens"], "wall_s": run["wall_s"], "tokens_per_s": tps,
            "prompts_per_s": prompts / run["wall_s"], "p50_group_latency_s": statistics.median(lat),
            "p99_group_latency_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ensure_demo_inputs(args)
    prompts = load_prompts(args)
    cpus = os.cpu_count() or 1
    print(f"bench_rollout: {args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, "
          f"temperature={args.temperature}, model={args.model}, {cpus} CPUs", flush=True)

    import ray

    def raw_run() -> dict:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            return ex.submit(run_raw, args, prompts, cpus).result()

    raw_name, raw_ray_name = "raw vllm.LLM.generate", "raw vllm.LLM.generate, Ray cluster up"
    pool_names = {k: f"pathorl pool, {k} worker{'s' if k > 1 else ''}" for k in args.workers}
    runs: dict[str, list[dict]] = {name: [] for name in (raw_name, raw_ray_name, *pool_names.values())}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        runs[raw_name].append(raw_run())
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            runs[raw_ray_name].append(raw_run())
            for k, name in pool_names.items():
                runs[name].append(run_pool(args, prompts, k))
        finally:
            ray.shutdown()

    def tps(run: dict) -> float:
        return run["tokens"] / run["wall_s"]

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    rows = []
    for name, rs in runs.items():
        median_run = sorted(rs, key=tps)[len(rs) // 2]
        row = summarise(name, median_run, args.prompts)
        row["tokens_per_s_repeats"] = [tps(r) for r in rs]
        row["others_cpu_frac"] = statistics.median(r["others_cpu_frac"] for r in rs)
        # Wall time outside the engine's steps (submission, results, the driver), and the engine's own
        # speed: tokens per second of stepping (per worker's share), which the code around it cannot change.
        row["outside_engine_frac"] = statistics.median(1 - r["engine_busy_s"] / r["wall_s"] for r in rs)
        row["engine_tokens_per_busy_s"] = statistics.median(r["tokens"] / r["engine_busy_s"] for r in rs)
        workers = next((k for k, n in pool_names.items() if n == name), None)
        row["workers"] = workers
        if name != raw_name:  # ratios per repeat: each against the raw runs of the same repeat
            row["ratio_to_raw"] = spread([tps(r) / tps(raw) for r, raw in zip(rs, runs[raw_name])])
        if workers:
            row["ratio_to_raw_ray_up"] = spread([tps(r) / tps(raw) for r, raw in zip(rs, runs[raw_ray_name])])
            row["scaling_efficiency"] = statistics.median(
                tps(r) / (workers * tps(one)) for r, one in zip(rs, runs[pool_names[min(pool_names)]]))
        rows.append(row)

    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "cpus": cpus, "rows": rows}
    if 1 in args.workers:
        one_worker = next(r for r in rows if r["workers"] == 1)
        result["ratio_to_raw"] = one_worker["ratio_to_raw"]["median"]
        result["ratio_to_raw_ray_up"] = one_worker["ratio_to_raw_ray_up"]["median"]
    if args.mem_bw is not None:
        bw = measure_bandwidth() if args.mem_bw == "measure" else args.mem_bw
        wb = weight_bytes(args.model)
        running = args.prompts * args.n
        ceiling = running * bw * 1e9 / wb
        result["roofline"] = {"mem_bw_gb_s": bw, "weight_bytes_per_decode_step": wb,
                              "min_decode_step_s": wb / (bw * 1e9), "running_sequences": running,
                              "tokens_per_s_ceiling": ceiling}
        for r in rows:
            r["pct_of_roofline"] = 100.0 * r["tokens_per_s"] / ceiling

    header = (f"{'':40} {'tokens/s':>9} {'prompts/s':>9} {'ratio (min-max)':>20} {'vs Ray up':>20} {'scaling':>7} "
              f"{'p50 s':>7} {'p99 s':>7} {'others':>6} {'outside':>7} {'eng tok/s':>9}")
    if args.mem_bw is not None:
        header += f" {'% roof':>7}"
    print(header)

    def ratio(r: dict, key: str) -> str:
        v = r.get(key)
        return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})" if v else "1"

    for r in rows:
        line = (f"{r['name']:40} {r['tokens_per_s']:9.1f} {r['prompts_per_s']:9.2f} {ratio(r, 'ratio_to_raw'):>20} "
                f"{ratio(r, 'ratio_to_raw_ray_up'):>20} {r.get('scaling_efficiency', float('nan')):7.2f} "
                f"{r['p50_group_latency_s']:7.2f} {r['p99_group_latency_s']:7.2f} {r['others_cpu_frac']:6.2f} "
                f"{r['outside_engine_frac']:7.3f} {r['engine_tokens_per_busy_s']:9.1f}")
        if args.mem_bw is not None:
            line += f" {r['pct_of_roofline']:7.3f}"
        print(line)
    if "roofline" in result:
        rf = result["roofline"]
        print(f"decode roofline: {rf['weight_bytes_per_decode_step'] / 1e6:.1f} MB of weights per step at "
              f"{rf['mem_bw_gb_s']:.1f} GB/s -> >= {rf['min_decode_step_s'] * 1e3:.2f} ms/step, "
              f"{rf['tokens_per_s_ceiling']:.0f} tokens/s with {rf['running_sequences']} sequences running")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
