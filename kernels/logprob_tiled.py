"""Per-token log-prob and entropy from hidden states [N, H] and the LM head [V, H] (+ bias [V]) in
plain torch, tiled over the vocabulary as the Triton kernel is (kernels/logprob_hidden.py): the
CPU default. Maths and notation as in kernels/reference.py.

Why not the reference on CPU: it walks rows in 64 MB chunks of [rows, V] logits, and the ~10
elementwise passes it makes over each chunk run from main memory. At V = 151,936, H = 128 (the
demo model) those passes cost more than the LM-head GEMM itself (1,920 tokens on 2 cores: 0.84 s
of GEMM, 2.0 s in all for the forward, 5.3 s for forward + backward). Here each logits tile
[≤ ROW_BLOCK rows, vocabulary tile] is sized to `TILE_BYTES`, small enough to stay in cache from
the GEMM that makes it to the passes that reduce it:
  forward   an online log-sum-exp over the vocabulary tiles, per row: running max m, Σ e and
            Σ e·(z − m) with e = exp(z − m), rescaled by exp(m_old − m_new) when the max grows
            (Milakov & Gimelshein, arXiv 1805.02867); entropy = log Σe − Σe·(z − m) / Σe.
            The target's logit is one dot product per row.
  backward  the tile is recomputed, turned into ∂loss/∂z in place, and goes straight into the two
            gradient GEMMs (∂hidden += ∂z · W_tile, ∂W_tile += ∂zᵀ · hidden); the target's
            one-hot term is added after the tiles, as a gather and an index_add.
8·N·H·V FLOPs in all, as in the Triton kernel. When a backward will follow and the pass's logits
fit in `CACHE_BYTES`, the forward also writes each tile to a [N, V] buffer that the backward reads
instead of recomputing it: at a small hidden size (the demo's H = 128) the GEMM costs ~2× what
streaming its output through memory does, so this saves ~10–15% of forward + backward there. Measured on the demo's head, forward + backward:
1.6× the reference at 576 tokens, 2.0× at 2,048 (BENCHMARKS.md, "Re-measured with the
vocabulary-tiled CPU log-prob path").

Logits that are -inf (a -inf bias) give p = 0 and zero gradient, as in the reference. Rows whose
target is `ignore_index` are skipped and give 0.
"""

import torch

from kernels.reference import softmax_grad_without_target

# Bytes of one fp32 logits tile: a few MB stays in a CPU core's L2/L3 between the passes.
TILE_BYTES = 8 << 20
# Rows per tile: past ~2,000 rows the vocabulary tile would shrink below a few hundred entries,
# too thin for an efficient GEMM.
ROW_BLOCK = 2048
# Most bytes of fp32 logits a pass keeps for its backward (a micro-batch of ~1,700 tokens at V =
# 151,936); a larger pass recomputes its tiles in the backward instead.
CACHE_BYTES = 1 << 30


def _tiles(n_rows, n_vocab):
    """(row block, vocabulary tile) sizes for n_rows valid rows."""
    rows = max(1, min(n_rows, ROW_BLOCK))
    return rows, max(1, min(n_vocab, TILE_BYTES // (4 * rows)))


def _logits_tile(x, weight, bias32, v0, v1, temperature):
    """z = (x · weight[v0:v1]ᵀ + bias[v0:v1]) / T, [R, v1 − v0] fp32, and the fp32 weight tile."""
    w = weight[v0:v1].float()
    z = x @ w.T if bias32 is None else torch.addmm(bias32[v0:v1], x, w.T)
    return (z if temperature == 1.0 else z.div_(temperature)), w


class _LogprobsFromHiddenTiled(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, ignore_index)
    -> (logp [N], entropy [N]) fp32. bf16 inputs are upcast one vocabulary tile at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index):
        valid = targets != ignore_index
        rows = valid.nonzero().squeeze(1)
        x, y = hidden[rows].float(), targets[rows]
        bias32 = None if bias is None else bias.float()
        n, n_vocab = len(rows), weight.shape[0]
        block, tile = _tiles(n, n_vocab)
        m = torch.full((n,), float("-inf"), device=hidden.device)
        sum_e, sum_es = torch.zeros_like(m), torch.zeros_like(m)
        keep = any(ctx.needs_input_grad[:3]) and 4 * n * n_vocab <= CACHE_BYTES
        ctx.logits = torch.empty(n, n_vocab, device=hidden.device) if keep else None
        for v0 in range(0, n_vocab, tile):
            for r0 in range(0, n, block):
                r = slice(r0, r0 + block)
                z, _ = _logits_tile(x[r], weight, bias32, v0, v0 + tile, temperature)
                if keep:
                    ctx.logits[r, v0:v0 + tile] = z
                m_new = torch.maximum(m[r], z.amax(-1))
                # The max stays -inf while a row has seen only -inf logits: shift 0 then (exp(-inf) = 0).
                shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                s = z.sub_(shift[:, None])
                e = s.exp()
                es = torch.linalg.vecdot(e, s)
                if not torch.isfinite(es).all():  # 0·(-inf) where a logit is -inf
                    es = torch.linalg.vecdot(e, s.nan_to_num_(neginf=0.0))
                seen = torch.isfinite(m[r])
                moved = torch.where(seen, m[r] - shift, torch.zeros_like(shift))
                rescale = torch.where(seen, moved.exp(), torch.zeros_like(shift))
                sum_es[r] = (sum_es[r] + sum_e[r] * moved) * rescale + es
                sum_e[r] = sum_e[r] * rescale + e.sum(-1)
                m[r] = m_new
        log_sum_e = sum_e.log()
        target_z = torch.linalg.vecdot(x, weight[y].float())
        if bias32 is not None:
            target_z = target_z + bias32[y]
        logp = hidden.new_zeros(len(targets), dtype=torch.float32)
        entropy, lse = torch.zeros_like(logp), torch.zeros_like(logp)
        lse[rows] = m + log_sum_e
        logp[rows] = (target_z if temperature == 1.0 else target_z / temperature) - lse[rows]
        entropy[rows] = log_sum_e - sum_es / sum_e
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, rows, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        x, y = hidden[rows].float(), targets[rows]
        bias32 = None if bias is None else bias.float()
        n, n_vocab = len(rows), weight.shape[0]
        block, tile = _tiles(n, n_vocab)
        # ∂loss/∂logits = ∂loss/∂z / T: both upstream gradients are divided once, here.
        g = torch.zeros(n, device=x.device) if g_logp is None else g_logp[rows].float() / temperature
        g_ent = None if g_entropy is None else g_entropy[rows].float() / temperature
        lse_v, ent_v = lse[rows], entropy[rows]
        dx = torch.zeros_like(x)
        # A frozen LM head (LoRA) needs no weight gradient: one of the two gradient GEMMs is skipped.
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        dbias = torch.zeros(n_vocab, device=x.device) if bias is not None and ctx.needs_input_grad[2] else None
        logits, ctx.logits = ctx.logits, None
        for v0 in range(0, n_vocab, tile):
            for r0 in range(0, n, block):
                r = slice(r0, r0 + block)
                if logits is None:
                    z, w = _logits_tile(x[r], weight, bias32, v0, v0 + tile, temperature)
                else:
                    z, w = logits[r, v0:v0 + tile], weight[v0:v0 + tile].float()
                dz = softmax_grad_without_target(z, lse_v[r], ent_v[r], g[r], None if g_ent is None else g_ent[r])
                dx[r].addmm_(dz, w)
                if dweight is not None:
                    dweight[v0:v0 + tile].addmm_(dz.T, x[r])
                if dbias is not None:
                    dbias[v0:v0 + tile] += dz.sum(0)
        dx += g[:, None] * weight[y].float()
        if dweight is not None:
            dweight = dweight.index_add_(0, y, g[:, None] * x).to(weight.dtype)
        if dbias is not None:
            dbias = dbias.index_add_(0, y, g).to(bias.dtype)
        dhidden = torch.zeros_like(hidden)
        dhidden[rows] = dx.to(hidden.dtype)
        return dhidden, dweight, dbias, None, None, None


def logprobs_from_hidden(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> (logprobs [N], entropy [N]), fp32.
    Inputs are assumed valid; `kernels.logprobs_from_hidden` checks them and adds the KL."""
    return _LogprobsFromHiddenTiled.apply(hidden, weight, bias, targets, float(temperature), ignore_index)
