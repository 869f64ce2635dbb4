"""The RL maths against hand-derived cases and plain fp64 re-implementations of the published
formulas (GRPO, Dr. GRPO, RLOO, REINFORCE++, PPO/DAPO clip, dual clip, loss aggregation, KL, TIS,
overlong shaping, dynamic-sampling filter)."""

import math
import statistics

import pytest
import torch

from engine import algorithms as A


def _reference_advantages(name, rewards, groups, lengths):
    """Loop-over-groups fp64 reference; non-finite rewards take no part and get 0."""
    out = [0.0] * len(rewards)
    by_group = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    centred_all = []
    for idx in by_group.values():
        vals = [rewards[i] for i in idx if math.isfinite(rewards[i])]
        for i in idx:
            if not math.isfinite(rewards[i]):
                continue
            mean = sum(vals) / len(vals)
            if name == "grpo":
                out[i] = 0.0 if len(vals) < 2 else (rewards[i] - mean) / (statistics.stdev(vals) + 1e-6)
            elif name == "dr_grpo":
                out[i] = rewards[i] - mean
            elif name == "rloo":
                out[i] = 0.0 if len(vals) < 2 else rewards[i] - (sum(vals) - rewards[i]) / (len(vals) - 1)
            else:
                out[i] = rewards[i] - mean
                centred_all.append(out[i])
    if name == "reinforce_pp_baseline":  # each response's value repeated on each of its tokens
        tokens = [out[i] for i in range(len(out)) if math.isfinite(rewards[i]) for _ in range(lengths[i])]
        mu, var = statistics.fmean(tokens), statistics.variance(tokens)
        out = [(a - mu) / math.sqrt(var + 1e-8) if math.isfinite(r) and n else 0.0
               for a, r, n in zip(out, rewards, lengths)]
    return out


@pytest.mark.parametrize("name", sorted(A.ADVANTAGES))
def test_advantages_match_reference_with_edge_cases(name):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=g, dtype=torch.float64).round(decimals=1)
    groups = torch.arange(40) // 5
    rewards[5:10] = 0.7              # all-equal group
    rewards[12] = float("nan")       # a failed reward inside a group
    rewards[39] = float("inf")
    groups[30:35] = torch.arange(100, 105)   # five groups of size 1
    lengths = (torch.arange(40) * 7) % 13 + 1  # ragged
    got = A.ADVANTAGES[name](rewards, groups, lengths, 1e-6)
    want = _reference_advantages(name, rewards.tolist(), groups.tolist(), lengths.tolist())
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-9)
    assert torch.isfinite(got).all()
    if name != "reinforce_pp_baseline":
        assert got[5:10].abs().max() == 0 and got[30:35].abs().max() == 0


def test_grpo_hand_case():
    adv = A.ADVANTAGES["grpo"](torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long),
                               torch.tensor([3, 1, 2, 5]), 0.0)
    # mean 0.5, unbiased std sqrt(1/3): (±0.5)·sqrt(3)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 * math.sqrt(3))


def test_reinforce_pp_baseline_hand_case_with_ragged_lengths():
    """Two groups: rewards (1, 0) and (1, 1, 0), response lengths (1, 3) and (2, 2, 4).
    Centred by group: x = (0.5, −0.5) and (1/3, 1/3, −2/3). Repeated on 12 tokens:
        Σ n·x = 0.5 − 1.5 + 2/3 + 2/3 − 8/3 = −7/3,   μ = −7/36
        Σ n·x² = 0.25 + 0.75 + 2/9 + 2/9 + 16/9 = 29/9
        Σ n·(x − μ)² = 29/9 − 12·μ² = 29/9 − 49/108 = 299/108,   σ² = 299/1188 (N − 1 = 11)
    so A = (x + 7/36) / sqrt(299/1188 + 1e-8). Whitening per response (each counted once) gives
    other values: the short wrong answer in group 1 would not weigh 3 tokens."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1])
    lengths = torch.tensor([1, 3, 2, 2, 4])
    x = torch.tensor([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3], dtype=torch.float64)
    want = (x + 7 / 36) / math.sqrt(299 / 1188 + 1e-8)
    got = A.ADVANTAGES["reinforce_pp_baseline"](rewards, group, lengths, 1e-6)
    assert torch.allclose(got, want, atol=1e-12)
    # token-weighted: the whitened values have zero mean over tokens, not over responses
    assert float((got * lengths).sum()) == pytest.approx(0.0, abs=1e-12)
    assert float(got.sum()) != pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("ratio, adv, lo, hi, dual, loss, clipped", [
    (1.5, 1.0, 0.2, 0.28, None, -1.28, True),     # clip-higher caps the gain of a positive advantage
    (1.1, 1.0, 0.2, 0.28, None, -1.1, False),
    (0.5, 1.0, 0.2, 0.28, None, -0.5, False),      # the pessimistic (unclipped) branch
    (0.5, -1.0, 0.2, 0.28, None, 0.8, True),       # 1 - eps_low bounds a negative advantage
    (5.0, -1.0, 0.2, 0.28, None, 5.0, False),
    (5.0, -1.0, 0.2, 0.28, 3.0, 3.0, True),        # dual clip: loss <= c·|A|
    (5.0, 1.0, 0.2, 0.28, 3.0, -1.28, True),       # dual clip leaves positive advantages alone
])
def test_ppo_clip_hand_cases(ratio, adv, lo, hi, dual, loss, clipped):
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    got, was_clipped = A.ppo_clip_loss(logp, torch.zeros(1, dtype=torch.float64), torch.tensor([adv],
                                       dtype=torch.float64), lo, hi, dual)
    assert got.item() == pytest.approx(loss, abs=1e-12) and bool(was_clipped) == clipped
    got.sum().backward()
    # d/dlogp of -A·ρ is -A·ρ on the unclipped branch, 0 where clipped.
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -adv * ratio, abs=1e-12)


def test_ppo_clip_random_against_formula():
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(1000, generator=g, dtype=torch.float64) * 0.3, torch.randn(1000, generator=g,
                                                                                         dtype=torch.float64) * 0.3
    adv = torch.randn(1000, generator=g, dtype=torch.float64)
    got, _ = A.ppo_clip_loss(logp, old, adv, 0.2, 0.28, 3.0)
    for lp, o, a, l in zip(logp.tolist(), old.tolist(), adv.tolist(), got.tolist()):
        r = math.exp(lp - o)
        want = -min(r * a, min(max(r, 0.8), 1.28) * a)
        if a < 0:
            want = min(want, -3.0 * a)
        assert l == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("mode", A.LOSS_AGGREGATIONS)
def test_aggregation_is_independent_of_the_split(mode):
    """Σ over micro-batches of Σ w·loss equals the aggregate of the whole step, for any split."""
    g = torch.Generator().manual_seed(2)
    lengths = [3, 7, 1, 5, 9, 2, 4, 6]
    losses = [torch.randn(n, generator=g, dtype=torch.float64) for n in lengths]
    n_tokens, n_seqs, max_len = sum(lengths), len(lengths), 12
    want = {"token_mean": sum(l.sum() for l in losses) / n_tokens,
            "seq_mean_token_mean": sum(l.mean() for l in losses) / n_seqs,
            "seq_mean_token_sum": sum(l.sum() for l in losses) / n_seqs,
            "seq_mean_token_sum_norm": sum(l.sum() for l in losses) / (n_seqs * max_len)}[mode]
    for split in ([8], [2, 2, 2, 2], [1, 3, 4], [5, 3]):
        total, start = 0.0, 0
        for size in split:
            part = losses[start:start + size]
            seq_len = torch.tensor([len(l) for l in part])
            seq_index = torch.repeat_interleave(torch.arange(size), seq_len)
            w = A.token_weights(mode, seq_index, seq_len, n_seqs, n_tokens, max_len)
            total += float((torch.cat(part) * w).sum())
            start += size
        assert total == pytest.approx(float(want), rel=1e-12)


def test_kl_estimators():
    delta = torch.tensor([0.5, -0.3, 0.0, -30.0], dtype=torch.float64)
    ref = torch.zeros(4, dtype=torch.float64)
    assert torch.allclose(A.kl_estimate(delta, ref, "k1"), delta)
    assert torch.allclose(A.kl_estimate(delta, ref, "k2"), 0.5 * delta ** 2)
    k3 = A.kl_estimate(delta, ref, "k3")
    assert torch.allclose(k3[:3], torch.exp(-delta[:3]) + delta[:3] - 1)
    assert k3[3] == 10.0  # verl's low_var_kl: Δ clamped to ±20, the estimate to [−10, 10]
    assert (k3 >= 0).all()


@pytest.mark.parametrize("delta", [-math.inf, -50.0, -25.0, -10.0, -3.0, -2.0, 0.3, 5.0, 11.0, 12.0, 20.0, 25.0,
                                   math.inf])
def test_k3_is_verls_low_var_kl_and_k3_unclamped_trls(delta):
    """k3 value and gradient against verl's `kl_penalty(..., "low_var_kl")`, transcribed in fp64 (kl =
    clamp(ref − logp, ±20); clamp(exp(kl) − kl − 1, ±10)); the gradient of the clamped estimate by
    hand: ∂/∂logp = 1 − exp(−Δ) where neither clamp binds, else 0. Never negative, never infinite."""
    logp = torch.tensor([delta], dtype=torch.float64, requires_grad=True)
    ours = A.kl_estimate(logp, torch.zeros(1, dtype=torch.float64), "k3")
    kl = max(-20.0, min(20.0, -delta))
    want = max(-10.0, min(10.0, math.exp(kl) - kl - 1))
    assert ours.item() == pytest.approx(want, rel=1e-12)
    ours.sum().backward()
    free = abs(delta) < 20 and math.exp(-delta) + delta - 1 < 10
    assert logp.grad.item() == pytest.approx(1 - math.exp(-delta) if free else 0.0, rel=1e-12, abs=1e-12)
    # TRL's exp(ref − logp) − (ref − logp) − 1, with Δ held to ±20 only: it keeps pulling past 10.
    logp = torch.tensor([delta], dtype=torch.float64, requires_grad=True)
    trl = A.kl_estimate(logp, torch.zeros(1, dtype=torch.float64), "k3_unclamped")
    assert trl.item() == pytest.approx(math.exp(kl) - kl - 1, rel=1e-12)
    trl.sum().backward()
    assert logp.grad.item() == pytest.approx(1 - math.exp(-delta) if abs(delta) <= 20 else 0.0, rel=1e-12, abs=1e-12)


def test_tis_and_overlong():
    old, rollout = torch.tensor([0.0, -1.0, -3.0]), torch.tensor([-1.0, -1.0, 0.0])
    assert torch.allclose(A.tis_weights(old, rollout, 2.0), torch.tensor([2.0, 1.0, math.exp(-3.0)]))
    shaped = A.overlong_shaping(torch.tensor([10, 15, 18, 20, 25]), max_length=20, buffer=5, factor=1.0)
    assert shaped.tolist() == pytest.approx([0.0, 0.0, -0.6, -1.0, -1.0])


def test_zero_variance_groups():
    metric = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, float("nan"), 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4])
    assert A.zero_variance_groups(metric, group).tolist() == [True, True, True, False, False, True, True,
                                                              False, False, True]


def test_bad_inputs_are_refused_by_name_and_odd_ones_handled():
    """Inputs a caller can get wrong: integer rewards give float advantages (they were truncated to
    integers), an empty batch gives an empty result, and mismatched shapes or meaningless clip
    ranges, normalisers and caps raise a ValueError naming them instead of broadcasting silently."""
    group, lengths = torch.tensor([0, 0, 0]), torch.tensor([3, 3, 3])
    rloo = A.ADVANTAGES["rloo"](torch.tensor([1, 0, 0]), group, lengths)
    assert rloo.is_floating_point() and torch.allclose(rloo, torch.tensor([1.0, -0.5, -0.5]))
    assert A.ADVANTAGES["grpo"](torch.tensor([True, False, True]), group, lengths).abs().sum() > 0
    for name in A.ADVANTAGES:
        assert A.ADVANTAGES[name](torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)).shape == (0,)
        with pytest.raises(ValueError, match="one length"):
            A.ADVANTAGES[name](torch.zeros(3), torch.zeros(2, dtype=torch.long), lengths)
    assert A.zero_variance_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="one shape"):
        A.ppo_clip_loss(x, x, torch.ones(1), 0.2, 0.2)
    for lo, hi, dual in ((-0.5, 0.2, None), (1.5, 0.2, None), (0.2, -0.1, None), (0.2, 0.2, 0.5), (0.2, 0.2, -1.0)):
        with pytest.raises(ValueError, match="clip_low"):
            A.ppo_clip_loss(x, x, x, lo, hi, dual)
    index, seq_lengths = torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    for num_seqs, num_tokens, index_ in ((0, 3, index), (2, 0, index), (2, -5, index), (2, 3, torch.tensor([0, 0, 2]))):
        with pytest.raises(ValueError, match="token_weights"):
            A.token_weights("token_mean", index_, seq_lengths, num_seqs, num_tokens, 4)
    with pytest.raises(ValueError, match="cap"):
        A.tis_weights(x, x, 0.0)
