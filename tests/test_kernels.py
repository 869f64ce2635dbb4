"""kernels/: per-token log-prob, entropy and KL, values and gradients, against an fp64 oracle written
independently from the published formulas (torch.log_softmax in float64, autograd for gradients).

Every backend runs here: the torch reference, the Triton kernels under the Triton interpreter on
CPU, and (hidden-state path) the vocabulary-tiled torch path that is the CPU default, with tiles
shrunk so that the small shapes below take several row blocks and vocabulary tiles. TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. when kernels.logprob_logits
and kernels.logprob_hidden are first imported (`import kernels` does not import them), and again by
parts of triton that the interpreter imports at the first launch. So it is set around that import
and, by an autouse fixture, around this module's tests, and restored in between: other test modules,
and the processes they start, see the environment unchanged.

Tolerances, max |ours − oracle| with the oracle computed from the same input values in fp64
(observed maxima in brackets, all backends):
  logprobs, entropy, kl, fp32 and bf16 inputs (fp32 maths)  ≤ 1e-5                     [2.0e-6]
  gradients, fp32 inputs                                    ≤ 5e-6 · max(1, max|oracle|) [0.8e-6]
  gradients, bf16 inputs                                    ≤ 2e-2 · max(1, max|oracle|) [0.9e-2]
The weight gradient sums over rows and reaches ~16 here, hence errors relative to the scale. bf16
gradients are rounded to bf16 once (logits path, reference) or twice (the Triton hidden path rounds
∂logits to bf16 before its two GEMMs), and the interpreter truncates fp32 -> bf16 where a GPU
rounds to nearest, so each rounding may cost up to 2^-7 relative: observed ≤ 0.9e-2.
Shapes are chosen to take every loop of the kernels: several vocabulary tiles with a ragged last
one, row counts that are not multiples of the row block, and for the hidden path several row
blocks, vocabulary splits, K steps and backward vocabulary chunks (interpreter tiles, see
kernels.logprob_hidden.INTERPRETER_TILES).
"""

import contextlib
import math
import os

import pytest
import torch


@contextlib.contextmanager
def triton_interpreter():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


with triton_interpreter():
    from kernels import logprob_hidden, logprob_logits

import kernels  # noqa: E402
from kernels import logprob_tiled  # noqa: E402

assert logprob_logits.INTERPRETED and logprob_hidden.INTERPRETED, (
    "kernels.logprob_logits/logprob_hidden were imported before this module set TRITON_INTERPRET=1")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_for_this_module():
    with triton_interpreter():
        yield


@pytest.fixture(autouse=True, params=["recomputed", "cached"])
def _small_tiles(monkeypatch, request):
    """Tiles of 8 rows × 16 vocabulary entries for the tiled path: several of each, a ragged last;
    its backward recomputes them, or reads the forward's logits (every test runs both ways)."""
    monkeypatch.setattr(logprob_tiled, "ROW_BLOCK", 8)
    monkeypatch.setattr(logprob_tiled, "TILE_BYTES", 4 * 8 * 16)
    monkeypatch.setattr(logprob_tiled, "CACHE_BYTES", 0 if request.param == "recomputed" else 1 << 30)


VALUE_ATOL = 1e-5
FP32_GRAD_RTOL = 5e-6
BF16_GRAD_RTOL = 2e-2
BACKENDS = ["torch", "triton"]
HIDDEN_BACKENDS = BACKENDS + ["tiled"]
KL_TEMPERATURE = {None: 1.0, "k1": 0.7, "k2": 1.0, "k3": 1.3}


def oracle(logits64, targets, temperature, ref_logprobs, kl, ignore_index):
    """fp64 (logprobs, entropy, kl | None) from the textbook formulas."""
    valid = targets != ignore_index
    log_probs = torch.log_softmax(logits64 / temperature, dim=-1)
    logp = log_probs.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    zero = torch.zeros_like(logp)
    if ref_logprobs is None:
        return torch.where(valid, logp, zero), torch.where(valid, entropy, zero), None
    log_ratio = ref_logprobs.double() - logp  # log(π_ref / π)
    estimate = {"k1": -log_ratio, "k2": log_ratio ** 2 / 2, "k3": log_ratio.exp() - 1 - log_ratio}[kl]
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero), torch.where(valid, estimate, zero)


def weighted_loss(outputs, weights):
    """Σ_n a_n·logp_n + b_n·entropy_n + c_n·kl_n: every output feeds the gradient, row by row."""
    return sum((out * w).sum() for out, w in zip(outputs, weights) if out is not None)


def make_targets(n_rows, n_vocab, ignore_index, generator):
    targets = torch.randint(0, n_vocab, (n_rows,), generator=generator)
    targets[torch.randperm(n_rows, generator=generator)[: n_rows // 4]] = ignore_index
    return targets


def ref_logprobs_near(logits64, targets, temperature, ignore_index, generator):
    """Reference-policy log-probs 0.3 nats (std) from the policy's, as after a few updates."""
    with torch.no_grad():
        logp = oracle(logits64, targets, temperature, None, "k3", ignore_index)[0]
    return (logp + 0.3 * torch.randn(len(targets), generator=generator, dtype=torch.float64)).float()


def assert_close(name, ours, expected, atol):
    err = (ours.double() - expected).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.3g}"


def assert_grad_close(name, ours, expected, dtype):
    scale = max(1.0, expected.abs().max().item())
    atol = (FP32_GRAD_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL) * scale
    assert_close(name, ours, expected, atol)


def check_outputs(ours, expected, kl):
    for name, out, ref in zip(("logprobs", "entropy", "kl"), ours, expected):
        if kl is None and name == "kl":
            assert out is None
            continue
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert_close(name, out, ref, VALUE_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,n_vocab", [(13, 9000), (45, 301)])
@pytest.mark.parametrize("kl", list(KL_TEMPERATURE))
def test_logits_path_matches_fp64_oracle(backend, dtype, n_rows, n_vocab, kl):
    gen = torch.Generator().manual_seed(n_rows * 7 + n_vocab)
    temperature = KL_TEMPERATURE[kl]
    logits = (3 * torch.randn(n_rows, n_vocab, generator=gen)).to(dtype)
    targets = make_targets(n_rows, n_vocab, -100, gen)
    logits64 = logits.double().requires_grad_()
    ref_logprobs = None if kl is None else ref_logprobs_near(logits64, targets, temperature, -100, gen)
    weights = torch.randn(3, n_rows, generator=gen, dtype=torch.float64)

    expected = oracle(logits64, targets, temperature, ref_logprobs, kl, -100)
    weighted_loss(expected, weights).backward()
    logits.requires_grad_()
    ours = kernels.logprobs_from_logits(logits, targets, temperature, ref_logprobs, kl=kl or "k3", backend=backend)
    weighted_loss(ours, weights.float()).backward()

    check_outputs(ours, expected, kl)
    assert logits.grad.dtype == dtype
    assert_grad_close("dlogits", logits.grad, logits64.grad, dtype)
    masked = targets == -100
    assert torch.all(torch.stack(ours[:2])[:, masked] == 0)
    assert torch.all(logits.grad[masked] == 0)


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl", list(KL_TEMPERATURE))
def test_hidden_path_matches_fp64_oracle(backend, dtype, kl):
    n_rows, n_hidden, n_vocab, ignore_index = 37, 40, 101, -1
    gen = torch.Generator().manual_seed(3)
    temperature = KL_TEMPERATURE[kl]
    with_bias = kl in ("k1", "k3")
    hidden = torch.randn(n_rows, n_hidden, generator=gen).to(dtype)
    weight = (0.4 * torch.randn(n_vocab, n_hidden, generator=gen)).to(dtype)
    bias = torch.randn(n_vocab, generator=gen).to(dtype) if with_bias else None
    targets = make_targets(n_rows, n_vocab, ignore_index, gen)
    params64 = [t.double().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]

    def logits64():
        return params64[0] @ params64[1].T + (params64[2] if with_bias else 0)

    ref_logprobs = None if kl is None else ref_logprobs_near(logits64(), targets, temperature, ignore_index, gen)
    weights = torch.randn(3, n_rows, generator=gen, dtype=torch.float64)

    expected = oracle(logits64(), targets, temperature, ref_logprobs, kl, ignore_index)
    weighted_loss(expected, weights).backward()
    params = [t.requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    ours = kernels.logprobs_from_hidden(hidden, weight, targets, bias, temperature, ref_logprobs, kl=kl or "k3",
                                        ignore_index=ignore_index, backend=backend)
    weighted_loss(ours, weights.float()).backward()

    check_outputs(ours, expected, kl)
    for name, param, param64 in zip(("dhidden", "dweight", "dbias"), params, params64):
        assert param.grad.dtype == dtype
        assert_grad_close(name, param.grad, param64.grad, dtype)
    assert torch.all(hidden.grad[targets == ignore_index] == 0)


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_gradient_when_only_logprobs_feed_the_loss(backend):
    """The learner's usual case: entropy is a metric, so no gradient reaches it (None upstream)."""
    n_rows, n_hidden, n_vocab, ignore_index = 19, 24, 257, -100
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(n_rows, n_hidden, generator=gen), 0.5 * torch.randn(n_vocab, n_hidden, generator=gen)
    targets = make_targets(n_rows, n_vocab, ignore_index, gen)
    a = torch.randn(n_rows, generator=gen, dtype=torch.float64)
    params64 = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    logp64 = oracle(params64[0] @ params64[1].T, targets, 0.9, None, "k3", ignore_index)[0]
    (logp64 * a).sum().backward()
    params = [hidden.requires_grad_(), weight.requires_grad_()]
    logp, entropy, _ = kernels.logprobs_from_hidden(hidden, weight, targets, temperature=0.9, backend=backend)
    (logp * a.float()).sum().backward()
    for name, param, param64 in zip(("dhidden", "dweight"), params, params64):
        assert_grad_close(name, param.grad, param64.grad, torch.float32)


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_frozen_lm_head(backend):
    """A LoRA policy's LM head takes no gradient: hidden's gradient is unchanged, weight's is None."""
    n_rows, n_hidden, n_vocab = 11, 16, 90
    gen = torch.Generator().manual_seed(17)
    hidden, weight = torch.randn(n_rows, n_hidden, generator=gen), 0.5 * torch.randn(n_vocab, n_hidden, generator=gen)
    targets = make_targets(n_rows, n_vocab, -100, gen)
    weights = torch.randn(3, n_rows, generator=gen, dtype=torch.float64)
    hidden64 = hidden.double().requires_grad_()
    weighted_loss(oracle(hidden64 @ weight.double().T, targets, 1.1, None, "k3", -100), weights).backward()
    hidden.requires_grad_()
    weighted_loss(kernels.logprobs_from_hidden(hidden, weight, targets, temperature=1.1, backend=backend),
                  weights.float()).backward()
    assert weight.grad is None
    assert_grad_close("dhidden", hidden.grad, hidden64.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows(backend):
    """65,539 rows (past the 65,535 limit of CUDA's second and third grid axes); with V = 5 the
    logits kernel packs 512 rows per program, which keeps the interpreter to 129 programs."""
    n_rows, n_vocab = 65_539, 5
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(n_rows, n_vocab, generator=gen)
    targets = make_targets(n_rows, n_vocab, -100, gen)
    logits64 = logits.double().requires_grad_()
    ref_logprobs = ref_logprobs_near(logits64, targets, 0.9, -100, gen)
    weights = torch.randn(3, n_rows, generator=gen, dtype=torch.float64)
    expected = oracle(logits64, targets, 0.9, ref_logprobs, "k3", -100)
    weighted_loss(expected, weights).backward()
    logits.requires_grad_()
    ours = kernels.logprobs_from_logits(logits, targets, 0.9, ref_logprobs, backend=backend)
    weighted_loss(ours, weights.float()).backward()
    check_outputs(ours, expected, "k3")
    assert_grad_close("dlogits", logits.grad, logits64.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend):
    """Vocabulary entries masked to -inf (as samplers do) have p = 0: finite outputs, zero gradient."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(9, 700, generator=gen)
    targets = make_targets(9, 700, -100, gen)
    banned = torch.rand(9, 700, generator=gen) < 0.3
    banned[torch.arange(9), targets.clamp(min=0)] = False
    logits[banned] = float("-inf")
    weights = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    # exp(-1e4 / T) underflows to exactly 0 in fp64 too, with finite logs (no 0·inf in the oracle).
    logits64 = logits.double().masked_fill(banned, -1e4).requires_grad_()
    expected = oracle(logits64, targets, 0.8, None, "k3", -100)
    weighted_loss(expected, weights).backward()
    logits.requires_grad_()
    ours = kernels.logprobs_from_logits(logits, targets, 0.8, backend=backend)
    weighted_loss(ours, weights.float()).backward()
    check_outputs(ours, expected, None)
    assert_grad_close("dlogits", logits.grad, logits64.grad, torch.float32)
    assert torch.all(logits.grad[banned] == 0)


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_minus_inf_bias_on_the_hidden_path(backend):
    """A -inf bias masks vocabulary entries, including the whole first tiles of the tiled path (its
    online max starts from rows that have seen only -inf): finite outputs, zero gradient there."""
    n_rows, n_hidden, n_vocab = 21, 12, 150
    gen = torch.Generator().manual_seed(13)
    hidden, weight = torch.randn(n_rows, n_hidden, generator=gen), 0.5 * torch.randn(n_vocab, n_hidden, generator=gen)
    targets = make_targets(n_rows, n_vocab, -100, gen).clamp(max=n_vocab - 1)
    banned = torch.rand(n_vocab, generator=gen) < 0.3
    banned[:40] = True
    banned[targets.clamp(min=0)] = False
    bias = torch.zeros(n_vocab).masked_fill(banned, float("-inf"))
    weights = torch.randn(3, n_rows, generator=gen, dtype=torch.float64)
    params64 = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    expected = oracle(params64[0] @ params64[1].T + bias.double().masked_fill(banned, -1e4), targets, 0.8, None,
                      "k3", -100)
    weighted_loss(expected, weights).backward()
    params = [hidden.requires_grad_(), weight.requires_grad_()]
    ours = kernels.logprobs_from_hidden(hidden, weight, targets, bias, 0.8, backend=backend)
    weighted_loss(ours, weights.float()).backward()
    check_outputs(ours, expected, None)
    for name, param, param64 in zip(("dhidden", "dweight"), params, params64):
        assert_grad_close(name, param.grad, param64.grad, torch.float32)
    assert torch.all(weight.grad[banned] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delta", [-30.0, -3.0, -1.0, 5.0, 30.0])
def test_k3_clamp(backend, delta):
    """Hand-derived: two equal logits give logp = log ½ and ∂logp/∂logits = (½, −½) for target 0.
    k3 = clamp(exp(−d) + d − 1, ±10) with d = clamp(Δ, ±20) (verl's low_var_kl), so
    ∂k3/∂logp = 1 − exp(−Δ) where no clamp binds and 0 where one does."""
    logits = torch.zeros(1, 2, requires_grad=True)
    ref_logprobs = torch.tensor([math.log(0.5) - delta])
    _, _, kl = kernels.logprobs_from_logits(logits, torch.tensor([0]), ref_logprobs=ref_logprobs, kl="k3",
                                            backend=backend)
    kl.sum().backward()
    d = max(-20.0, min(20.0, delta))
    assert kl.item() == pytest.approx(min(10.0, math.exp(-d) + d - 1), rel=1e-6)
    slope = 1 - math.exp(-delta) if abs(delta) < 20 and math.exp(-delta) + delta - 1 < 10 else 0.0
    torch.testing.assert_close(logits.grad, torch.tensor([[0.5 * slope, -0.5 * slope]]))


@pytest.mark.parametrize("backend", ["auto", "triton", "tiled"])
def test_empty_batch_and_auto_backend(backend):
    """An empty batch returns empty outputs; on CPU "auto" is the torch reference from logits and
    the tiled path from hidden states, bit for bit."""
    empty = kernels.logprobs_from_logits(torch.zeros(0, 11), torch.zeros(0, dtype=torch.long),
                                         ref_logprobs=torch.zeros(0), backend=backend)
    assert [tuple(t.shape) for t in empty] == [(0,)] * 3
    logits = torch.randn(6, 11)
    targets = torch.tensor([1, 2, -100, 4, 5, 10])
    auto = kernels.logprobs_from_logits(logits, targets, backend="auto")
    torch_ref = kernels.logprobs_from_logits(logits, targets, backend="torch")
    assert torch.equal(auto[0], torch_ref[0]) and torch.equal(auto[1], torch_ref[1])
    empty = kernels.logprobs_from_hidden(torch.zeros(0, 4), torch.ones(11, 4), torch.zeros(0, dtype=torch.long),
                                         ref_logprobs=torch.zeros(0), backend=backend)
    assert [tuple(t.shape) for t in empty] == [(0,)] * 3
    hidden, weight = torch.randn(6, 4), torch.randn(11, 4)
    auto = kernels.logprobs_from_hidden(hidden, weight, targets, backend="auto")
    tiled = kernels.logprobs_from_hidden(hidden, weight, targets, backend="tiled")
    assert torch.equal(auto[0], tiled[0]) and torch.equal(auto[1], tiled[1])


def _logits_call(**overrides):
    args = dict(logits=torch.zeros(4, 7), targets=torch.tensor([0, 1, 6, -100]), temperature=1.0,
                ref_logprobs=torch.zeros(4), kl="k3", ignore_index=-100, backend="triton")
    args.update(overrides)
    return kernels.logprobs_from_logits(**args)


def _hidden_call(**overrides):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(7, 8), targets=torch.tensor([0, 1, 6, -100]),
                bias=None, backend="triton")
    args.update(overrides)
    return kernels.logprobs_from_hidden(**args)


@pytest.mark.parametrize("call,argument,value", [
    (_logits_call, "logits", torch.zeros(2, 3, 4)),
    (_logits_call, "logits", torch.zeros(4, 7, dtype=torch.float16)),
    (_logits_call, "logits", torch.zeros(7, 4).t()),
    (_logits_call, "logits", [[0.0] * 7] * 4),
    (_logits_call, "targets", torch.zeros(3, dtype=torch.long)),
    (_logits_call, "targets", torch.zeros(4)),
    (_logits_call, "targets", torch.tensor([0, 1, 7, 2])),
    (_logits_call, "targets", torch.tensor([0, -2, 1, 2])),
    (_logits_call, "targets", torch.zeros(8, dtype=torch.long)[::2]),
    (_logits_call, "temperature", 0.0),
    (_logits_call, "temperature", -1.0),
    (_logits_call, "temperature", float("nan")),
    (_logits_call, "temperature", float("inf")),
    (_logits_call, "temperature", "1.0"),
    (_logits_call, "temperature", True),
    (_logits_call, "ref_logprobs", torch.zeros(3)),
    (_logits_call, "ref_logprobs", torch.zeros(4, dtype=torch.long)),
    (_logits_call, "kl", "k4"),
    (_logits_call, "ignore_index", 1.5),
    (_logits_call, "backend", "cuda"),
    (_hidden_call, "hidden", torch.zeros(8)),
    (_hidden_call, "hidden", torch.zeros(8, 4).t()),
    (_hidden_call, "weight", torch.zeros(7, 9)),
    (_hidden_call, "weight", torch.zeros(7, 8, dtype=torch.bfloat16)),
    (_hidden_call, "weight", torch.zeros(0, 8)),
    (_hidden_call, "bias", torch.zeros(6)),
    (_hidden_call, "bias", torch.zeros(7, dtype=torch.bfloat16)),
    (_hidden_call, "targets", torch.tensor([0, 1, 7, -100])),
])
def test_bad_input_names_the_argument(call, argument, value):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        call(**{argument: value})


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(logprob_logits, "INTERPRETED", False)
    with pytest.raises(ValueError, match="^backend:.*TRITON_INTERPRET"):
        _logits_call()
