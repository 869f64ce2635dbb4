"""Benchmark the fused log-prob pass (forward + backward) against eager torch, torch.compile and
Liger-Kernel, at Qwen2.5-VL LM-head shapes.

Every implementation computes, for T tokens, hidden [T, H] and the LM head weight [V, H] (bf16),
per-token log-probs (and, where the implementation offers them, entropy and k3 KL to reference
log-probs), reduces them to a GRPO-style scalar loss and backpropagates into hidden and weight.
Reported per (model, T, implementation): median wall time of forward + backward (CUDA events),
peak memory above the inputs, TFLOP/s counting 8·T·H·V (logits forward, their recomputation or
saved-activation backward, and the two gradient GEMMs), and that as a % of a bf16 matmul peak
measured in the same run.

    python launch/bench_kernels.py                         # all models, T = 4k..64k, all impls
    python launch/bench_kernels.py --models 7b --tokens 16384 65536 --impls eager ours --json out.json
    python launch/bench_kernels.py --device cpu --tiny     # smoke test of the script on a CPU
    python launch/bench_kernels.py --device cpu --models demo --tokens 576 1024 --impls ours ours_recompute \
        --rounds 5 --warmup 1 --iters 3                  # side by side on a noisy machine: medians of rounds

Implementations: eager (hidden @ Wᵀ, fp32 log_softmax, gather), compile (the same function under
torch.compile), liger_linear (LigerFusedLinearGRPOLoss on hidden states), liger_logits (Liger's
Triton GRPO loss on materialised logits), ours (kernels.logprobs_from_hidden) and ours_logits
(materialised logits + kernels.logprobs_from_logits), ours_reference (kernels.logprobs_from_hidden
with backend="torch", the readable chunked reference), ours_recompute (the tiled path with its
logits cache off: the backward recomputes every tile). Liger rows are skipped, with the reason in
the table, when liger_kernel cannot be imported or its API differs. On CPU "ours" runs the
vocabulary-tiled torch path (backend="auto"), times are wall-clock and memory is not measured;
`--models demo` is the demo model's LM head (H = 128), the CPU learner's case:

    python launch/bench_kernels.py --device cpu --models demo --tokens 576 2048 --impls eager ours ours_reference
"""

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import logprob_tiled  # noqa: E402

MODELS = {"3b": (2048, 151_936), "7b": (3584, 152_064), "demo": (128, 151_936)}
TINY_MODELS = {"3b": (64, 1_000), "7b": (96, 1_031), "demo": (16, 1_000)}
DEFAULT_TOKENS = [4096, 8192, 16384, 32768, 65536]
TINY_TOKENS = [256, 512]
IMPLS = ["eager", "compile", "liger_linear", "liger_logits", "ours", "ours_logits", "ours_reference", "ours_recompute"]
SEQUENCE_LENGTH = 1024  # tokens per sequence, for the implementations that take [B, L] batches
BETA = 0.04  # KL weight in the loss
TEMPERATURE = 1.0


def eager_logprobs(hidden, weight, targets, ref_logprobs):
    """The textbook pass: full logits, fp32 log-softmax, gather, k3 KL -> (logp [T], kl [T])."""
    logits = hidden @ weight.t()
    log_probs = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    logp = log_probs.gather(1, targets[:, None]).squeeze(1)
    delta = logp - ref_logprobs
    return logp, torch.exp(-delta) + delta - 1


def grpo_loss(logp, kl, advantages):
    """On-policy GRPO token loss (ratio 1, so no clipping) plus the KL penalty, token mean."""
    return (-advantages * logp + BETA * kl).mean()


def sequence_length(n_tokens):
    """Tokens per sequence for the implementations that take [B, L] batches."""
    return min(SEQUENCE_LENGTH, n_tokens)


def make_step(impl, device):
    """A function (hidden, weight, targets, ref_logprobs, advantages) -> scalar loss for `impl`,
    or raise RuntimeError saying why the implementation is unavailable."""
    if impl == "eager":
        return lambda h, w, t, ref, adv: grpo_loss(*eager_logprobs(h, w, t, ref), adv)
    if impl == "compile":
        torch._dynamo.reset()  # one compilation per shape, never the recompile limit's eager fallback
        compiled = torch.compile(eager_logprobs, dynamic=False)
        return lambda h, w, t, ref, adv: grpo_loss(*compiled(h, w, t, ref), adv)
    if impl in ("ours", "ours_reference", "ours_recompute"):
        backend = {"ours": "auto", "ours_reference": "torch", "ours_recompute": "tiled"}[impl]

        def ours(h, w, t, ref, adv):
            kept = logprob_tiled.CACHE_BYTES
            logprob_tiled.CACHE_BYTES = 0 if impl == "ours_recompute" else kept  # read by the forward only
            try:
                logp, _, kl = kernels.logprobs_from_hidden(h, w, t, temperature=TEMPERATURE, ref_logprobs=ref,
                                                           backend=backend)
            finally:
                logprob_tiled.CACHE_BYTES = kept
            return grpo_loss(logp, kl, adv)
        return ours
    if impl == "ours_logits":
        def ours_logits(h, w, t, ref, adv):
            logp, _, kl = kernels.logprobs_from_logits(h @ w.t(), t, temperature=TEMPERATURE, ref_logprobs=ref)
            return grpo_loss(logp, kl, adv)
        return ours_logits
    if device.type != "cuda":
        raise RuntimeError("Liger-Kernel needs CUDA")
    try:
        if impl == "liger_linear":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        else:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as exc:
        raise RuntimeError(f"liger_kernel not importable: {exc}") from exc
    if impl == "liger_linear":
        loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, use_ref_model=True, loss_type="bnpo",
                                           temperature=TEMPERATURE)

        def liger_linear(h, w, t, ref, adv):
            length = sequence_length(h.shape[0])
            batch = h.shape[0] // length
            out = loss_fn(h.view(batch, length, -1), w, t.view(batch, length),
                          torch.ones(batch, length, device=h.device), adv.view(batch, length)[:, 0],
                          ref_per_token_logps=ref.view(batch, length))
            return out[0] if isinstance(out, tuple) else out
        return liger_linear

    def liger_logits(h, w, t, ref, adv):
        length = sequence_length(h.shape[0])
        batch = h.shape[0] // length
        # Liger's kernel takes L + 1 logits per sequence and drops the last, as a causal LM emits them.
        logits = torch.nn.functional.pad((h @ w.t()).view(batch, length, -1), (0, 0, 0, 1))
        loss, _ = triton_grpo_loss(logits, None, ref.view(batch, length), t.view(batch, length),
                                   adv.view(batch, length)[:, 0], temperature=TEMPERATURE, beta=BETA,
                                   loss_type="bnpo", reduce=True)
        return loss
    return liger_logits


class Timer:
    """Median seconds and peak bytes of a callable: CUDA events and allocator stats on a GPU,
    perf_counter (and no memory figure) on a CPU."""

    def __init__(self, device):
        self.device = device

    def measure(self, fn, warmup, iters):
        for _ in range(warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times), torch.cuda.max_memory_allocated() - base
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), None


def matmul_peak_tflops(device, dtype, size, timer):
    """Measured dense matmul throughput [TFLOP/s] at size × size × size in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timer.measure(lambda: a @ b, warmup=3, iters=10)
    return 2 * size ** 3 / seconds / 1e12


def bench_one(step, n_hidden, n_vocab, n_tokens, device, dtype, timer, args):
    """(median seconds, peak bytes above the inputs | None) of forward + backward of `step`."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n_tokens, n_hidden, device=device, generator=gen) / math.sqrt(n_hidden)).to(dtype)
    weight = torch.randn(n_vocab, n_hidden, device=device, generator=gen).to(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    targets = torch.randint(0, n_vocab, (n_tokens,), device=device, generator=gen)
    ref_logprobs = -torch.rand(n_tokens, device=device, generator=gen) * 10
    length = sequence_length(n_tokens)
    advantages = torch.randn(n_tokens // length, device=device, generator=gen).repeat_interleave(length)

    def fwd_bwd():
        step(hidden, weight, targets, ref_logprobs, advantages).backward()
        hidden.grad = weight.grad = None  # so the next call's peak counts fresh gradients

    return timer.measure(fwd_bwd, args.warmup, args.iters)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["3b", "7b"])
    parser.add_argument("--tokens", nargs="+", type=int, help="T values (default 4096 .. 65536; --tiny: 256 512)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny H and V, for a smoke test of this script")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweep every implementation this many times, interleaved, and report each one's median "
                             "(side-by-side ratios on a noisy machine)")
    parser.add_argument("--peak-size", type=int, default=8192, help="matrix size of the matmul peak measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible (use --device cpu --tiny for a smoke test)")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device: expected cuda or cpu, got {args.device}")
    tokens = args.tokens or (TINY_TOKENS if args.tiny else DEFAULT_TOKENS)
    if any(t <= 0 or t % sequence_length(t) for t in tokens):
        parser.error(f"--tokens: each T must be positive, and a multiple of {SEQUENCE_LENGTH} when above it")
    if args.warmup < 1 or args.iters < 1 or args.rounds < 1:
        parser.error("--warmup, --iters and --rounds must be >= 1 (warm-up also absorbs torch.compile's compilation)")
    shapes = TINY_MODELS if args.tiny else MODELS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device)

    peak = matmul_peak_tflops(device, dtype, 256 if args.tiny else args.peak_size, timer)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "matmul_peak_tflops": peak, "tiny": args.tiny,
            "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {dtype}  "
          f"measured matmul peak {peak:.1f} TFLOP/s")
    header = f"{'model':>5} {'H':>5} {'V':>7} {'T':>6} {'impl':>13} {'ms':>9} {'peak GiB':>9} {'TFLOP/s':>8} {'%peak':>6}"
    print(header)

    rows = []
    for impl in [i for _ in range(args.rounds) for i in args.impls]:
        for model in args.models:
            n_hidden, n_vocab = shapes[model]
            for n_tokens in tokens:
                row = {"model": model, "H": n_hidden, "V": n_vocab, "T": n_tokens, "impl": impl}
                try:
                    step = make_step(impl, device)
                    seconds, peak_bytes = bench_one(step, n_hidden, n_vocab, n_tokens, device, dtype, timer, args)
                    tflops = 8 * n_tokens * n_hidden * n_vocab / seconds / 1e12
                    row.update(status="ok", ms=seconds * 1e3, peak_bytes=peak_bytes, tflops=tflops,
                               pct_of_peak=100 * tflops / peak)
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as exc:  # an unavailable or failing baseline must not hide the other rows
                    row["status"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                step = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                prefix = f"{model:>5} {n_hidden:>5} {n_vocab:>7} {n_tokens:>6} {impl:>13}"
                if row["status"] == "ok":
                    mem = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f}"
                    print(f"{prefix} {row['ms']:>9.2f} {mem:>9} {row['tflops']:>8.2f} {row['pct_of_peak']:>6.1f}",
                          flush=True)
                else:
                    print(f"{prefix}  {row['status']}", flush=True)

    if args.rounds > 1:
        print(f"# median of {args.rounds} interleaved rounds")
        runs: dict[tuple, list[float]] = {}
        for r in rows:
            if r["status"] == "ok":
                runs.setdefault((r["model"], r["T"], r["impl"]), []).append(r["ms"])
        for (model, n_tokens, impl), ms in runs.items():
            print(f"{model:>5} {n_tokens:>6} {impl:>13} {statistics.median(ms):>9.2f}  ({min(ms):.2f}-{max(ms):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"# wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
