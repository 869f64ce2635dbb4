"""Plain-torch per-token log-prob, entropy and KL: the readable spec, the CPU path, the benchmark's
baseline for correctness.

For row n with target y and temperature T, in fp32 whatever the input dtype:
    z        = logits / T                      (divided, as vLLM's sampler does, so learner and
                                                rollout log-probs agree)
    lse      = log Σ_v exp(z_v)
    logp     = z_y − lse
    entropy  = lse − Σ_v p_v z_v               (p = softmax(z))
With g and e the upstream gradients of logp and entropy, and E[z] = Σ p z = lse − entropy:
    ∂loss/∂z_v = g·(1[v = y] − p_v) − e·p_v·(z_v − E[z]),     ∂loss/∂logits = ∂loss/∂z / T
From hidden states the logits are hidden · weightᵀ (+ bias), and the chain rule continues:
    ∂hidden = ∂logits · weight,   ∂weight = ∂logitsᵀ · hidden,   ∂bias = Σ_n ∂logits.
KL to a reference policy, Δ = logp − ref_logp (Schulman's estimators of KL(π‖π_ref)):
    k1 = Δ,   k2 = Δ²/2,   k3 = exp(−Δ) + Δ − 1
k3 is verl's `low_var_kl` (verl/trainer/ppo/core_algos.py, `kl_penalty`, which also answers to "k3")
to the letter: Δ is clamped to [−20, 20] (`K3_DELTA_CLAMP`) before both terms and the estimate to
[−10, 10] (`K3_VALUE_CLAMP`), so a token the policy has pushed far from the reference gives a bounded
value and zero gradient rather than exp(−Δ) = inf (or, with only the exponent clamped, a gradient of
the wrong sign). "k3_unclamped" is TRL's k3 (trl/trainer/grpo_trainer.py, no clamp) with only Δ
clamped to [−20, 20], for finite values: it keeps pulling a token far below the reference back
(gradient 1 − exp(−Δ)) where k3's value clamp gives up (zero gradient once k3 > 10, Δ ≲ −2.4). The
two agree while k3 ≤ 10.
Rows whose target is `ignore_index` give 0 for all three outputs and receive zero gradient.

Memory: [N, V] fp32 intermediates never exist. The autograd Functions below walk the unmasked
rows in chunks of at most `CHUNK_BYTES` of fp32 logits and recompute each chunk in backward, so
peak extra memory is a few such chunks (a few hundred MB at V = 151,936) for any N.
"""

import torch

K3_DELTA_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0

# Bytes of one fp32 [rows, V] chunk; a chunk step holds two of them.
CHUNK_BYTES = 64 << 20

KL_ESTIMATORS = {
    "k1": lambda delta: delta,
    "k2": lambda delta: 0.5 * delta.square(),
    "k3": lambda delta: _k3_unclamped(delta).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP),
    "k3_unclamped": lambda delta: _k3_unclamped(delta),
}


def _k3_unclamped(delta):
    d = delta.clamp(-K3_DELTA_CLAMP, K3_DELTA_CLAMP)
    return torch.exp(-d) + d - 1.0


def kl_to_reference(logprobs, ref_logprobs, kl, valid):
    """Per-token KL estimate `kl` ("k1" | "k2" | "k3") of logprobs [N] against ref_logprobs [N]
    (or None, giving None); 0 where valid [N] (bool) is False."""
    if ref_logprobs is None:
        return None
    estimate = KL_ESTIMATORS[kl](logprobs - ref_logprobs.float())
    return torch.where(valid, estimate, torch.zeros_like(estimate))


def _row_chunks(valid, n_vocab):
    """Indices of the True rows of valid [N], in chunks of at most CHUNK_BYTES fp32 logits."""
    rows = valid.nonzero().squeeze(1)
    return rows.split(max(1, CHUNK_BYTES // (4 * n_vocab)))


def _softmax_stats(z, targets):
    """z [R, V] fp32 scaled logits (overwritten), targets [R] -> (logp, lse, entropy), each [R] fp32.
    Works in max-shifted coordinates s = z − max ≤ 0: entropy = log Σ e − Σ e·s / Σ e with
    e = exp(s) subtracts small numbers, where lse − Σ p·z would cancel large ones."""
    z_max = z.amax(dim=-1, keepdim=True)
    shifted = z.sub_(z_max)
    target_shifted = shifted.gather(1, targets[:, None]).squeeze(1)
    e = shifted.exp()
    sum_e = e.sum(-1)
    # e = 0 where z = -inf; zeroing s there keeps 0·(-inf) = nan out of the sum.
    mean_shifted = e.mul_(shifted.nan_to_num_(neginf=0.0)).sum(-1) / sum_e
    log_sum_e = sum_e.log()
    return target_shifted - log_sum_e, z_max.squeeze(1) + log_sum_e, log_sum_e - mean_shifted


def _softmax_grad(z, targets, lse, entropy, g_logp, g_entropy):
    """∂loss/∂z [R, V] fp32, written over z [R, V], from per-row lse, entropy and upstream grads
    (all [R]); g_entropy None when the entropy took no part in the loss (the common case: it is a
    metric), which skips that term's three passes over [R, V]."""
    dz = softmax_grad_without_target(z, lse, entropy, g_logp, g_entropy)
    dz[torch.arange(len(targets), device=z.device), targets] += g_logp
    return dz


def softmax_grad_without_target(z, lse, entropy, g_logp, g_entropy):
    """`_softmax_grad` less the one-hot term g_logp·1[v = y], for a z that may be a vocabulary tile
    without the target (kernels.logprob_tiled adds that term after its tiles)."""
    log_p = z.sub_(lse[:, None])
    p = log_p.exp()
    if g_entropy is None:
        dz = p.mul_(-g_logp[:, None])
    else:
        # z − E[z] = log p + entropy; zeroed where p = 0 (z = -inf) to keep 0·(-inf) = nan out.
        centred = log_p.add_(entropy[:, None]).nan_to_num_(neginf=0.0)
        dz = centred.mul_(g_entropy[:, None]).add_(g_logp[:, None]).mul_(p).neg_()
    return dz


def _upstream(ctx, g_logp, g_entropy):
    """Upstream grads with unused outputs as None (set_materialize_grads(False)); logp's as zeros."""
    lse = ctx.saved_tensors[-2]
    return (torch.zeros_like(lse) if g_logp is None else g_logp), g_entropy


class _LogprobsFromLogits(torch.autograd.Function):
    """(logits [N, V], targets [N], temperature, ignore_index) -> (logp [N], entropy [N]) fp32."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index):
        valid = targets != ignore_index
        logp = logits.new_zeros(len(targets), dtype=torch.float32)
        entropy = torch.zeros_like(logp)
        lse = torch.zeros_like(logp)
        for rows in _row_chunks(valid, logits.shape[1]):
            z = logits[rows].float().div_(temperature)
            logp[rows], lse[rows], entropy[rows] = _softmax_stats(z, targets[rows])
        ctx.save_for_backward(logits, targets, valid, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        g_logp, g_entropy = _upstream(ctx, g_logp, g_entropy)
        logits, targets, valid, lse, entropy = ctx.saved_tensors
        dlogits = torch.zeros_like(logits)
        for rows in _row_chunks(valid, logits.shape[1]):
            z = logits[rows].float().div_(ctx.temperature)
            dz = _softmax_grad(z, targets[rows], lse[rows], entropy[rows], g_logp[rows],
                               None if g_entropy is None else g_entropy[rows])
            dlogits[rows] = dz.div_(ctx.temperature).to(logits.dtype)
        return dlogits, None, None, None


class _LogprobsFromHidden(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, ignore_index)
    -> (logp [N], entropy [N]) fp32, with logits = hidden · weightᵀ + bias computed in fp32 chunk by
    chunk. A non-fp32 weight is upcast once per call (a transient fp32 copy of the weight)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index):
        valid = targets != ignore_index
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        logp = hidden.new_zeros(len(targets), dtype=torch.float32)
        entropy = torch.zeros_like(logp)
        lse = torch.zeros_like(logp)
        for rows in _row_chunks(valid, weight.shape[0]):
            z = torch.nn.functional.linear(hidden[rows].float(), weight32, bias32).div_(temperature)
            logp[rows], lse[rows], entropy[rows] = _softmax_stats(z, targets[rows])
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        g_logp, g_entropy = _upstream(ctx, g_logp, g_entropy)
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        weight32 = weight.float()
        bias32 = None if bias is None else bias.float()
        dhidden = torch.zeros_like(hidden)
        dweight32 = torch.zeros_like(weight32)
        dbias32 = None if bias is None else torch.zeros_like(bias32)
        for rows in _row_chunks(valid, weight.shape[0]):
            x = hidden[rows].float()
            z = torch.nn.functional.linear(x, weight32, bias32).div_(ctx.temperature)
            dz = _softmax_grad(z, targets[rows], lse[rows], entropy[rows], g_logp[rows],
                               None if g_entropy is None else g_entropy[rows])
            dz /= ctx.temperature
            dhidden[rows] = (dz @ weight32).to(hidden.dtype)
            dweight32.addmm_(dz.t(), x)
            if bias is not None:
                dbias32 += dz.sum(0)
        dbias = None if bias is None else dbias32.to(bias.dtype)
        return dhidden, dweight32.to(weight.dtype), dbias, None, None, None


def logprobs_from_logits(logits, targets, temperature=1.0, ref_logprobs=None, kl="k3", ignore_index=-100):
    """logits [N, V] (fp32/bf16), targets [N] -> (logprobs [N], entropy [N], kl [N] | None), fp32.
    Inputs are assumed valid; `kernels.logprobs_from_logits` checks them."""
    logp, entropy = _LogprobsFromLogits.apply(logits, targets, float(temperature), ignore_index)
    return logp, entropy, kl_to_reference(logp, ref_logprobs, kl, targets != ignore_index)


def logprobs_from_hidden(hidden, weight, targets, bias=None, temperature=1.0, ref_logprobs=None, kl="k3",
                         ignore_index=-100):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> (logprobs [N], entropy [N],
    kl [N] | None), fp32, without materialising [N, V] logits. Inputs are assumed valid;
    `kernels.logprobs_from_hidden` checks them."""
    logp, entropy = _LogprobsFromHidden.apply(hidden, weight, bias, targets, float(temperature), ignore_index)
    return logp, entropy, kl_to_reference(logp, ref_logprobs, kl, targets != ignore_index)
