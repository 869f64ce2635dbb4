"""Triton log-prob and entropy from logits [N, V]: forward and backward (maths in kernels/reference.py).

Each program owns BLOCK_N rows and walks the vocabulary in BLOCK_V tiles with an online
log-sum-exp in fp32 (running max m starting at -inf, Σ exp(z − m) and Σ exp(z − m)·(z − m)),
so bf16 logits are read once and never upcast in memory. Backward re-reads the logits and
recomputes p = exp(z − lse) from the saved fp32 lse. Row offsets are int64 (N·V can pass 2³¹) and
the grid is one-dimensional over row blocks (CUDA allows 2³¹ − 1 there, unlike the 65,535 of the
other grid axes). Masked rows are not read and get zero outputs and zero gradient.

The kernel is memory-bound: tiles hold TILE_ELEMENTS elements, BLOCK_V = min(4096, V) lanes of a
row and as many rows as fit, so a large vocabulary gets one row per program and a tiny one packs
hundreds of rows into a program.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_BLOCK_V = 4096
TILE_ELEMENTS = 4096
NUM_WARPS = 8


@triton.jit
def _forward_kernel(logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, n_rows, n_vocab, stride_row,
                    temperature, ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (targets != ignore_index)
    row_ptrs = logits_ptr + rows * stride_row

    # Running max m (from -inf), Σ e and Σ e·(z − m) with e = exp(z − m): shifted coordinates keep the
    # entropy log Σ e − Σ e·(z − m) / Σ e a difference of small numbers (as in the reference).
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = valid[:, None] & (cols < n_vocab)[None, :]
        z = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # A row that has seen only -inf keeps m = -inf (and empty sums); 0 stands in for it.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        moved = tl.where(m == float("-inf"), 0.0, shift - m)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        sum_exp_shifted = rescale * (sum_exp_shifted - moved * sum_exp) + tl.sum(
            e * tl.where(e > 0, z - shift[:, None], 0.0), axis=1)
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        m = m_new

    sum_exp = tl.where(valid, sum_exp, 1.0)
    log_sum_exp = tl.log(sum_exp)
    lse = tl.where(valid, m + log_sum_exp, 0.0)
    z_target = tl.load(row_ptrs + tl.where(valid, targets, 0), mask=valid, other=0.0).to(tl.float32) / temperature
    tl.store(logp_ptr + rows, tl.where(valid, z_target - lse, 0.0), mask=row_ok)
    tl.store(entropy_ptr + rows, tl.where(valid, log_sum_exp - sum_exp_shifted / sum_exp, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _backward_kernel(logits_ptr, dlogits_ptr, targets_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr,
                     n_rows, n_vocab, stride_row, stride_drow, temperature, ignore_index,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (targets != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    mean_z = lse - tl.load(entropy_ptr + rows, mask=valid, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=valid, other=0.0)
    g_entropy = tl.load(g_entropy_ptr + rows, mask=valid, other=0.0)
    row_ptrs = logits_ptr + rows * stride_row
    drow_ptrs = dlogits_ptr + rows * stride_drow

    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < n_vocab
        z = tl.load(row_ptrs[:, None] + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                    other=float("-inf")).to(tl.float32) / temperature
        p = tl.exp(z - lse[:, None])
        # p = 0 where z = -inf: any finite stand-in for z keeps 0·(-inf) = nan out.
        centred = tl.where(p > 0, z, 0.0) - mean_z[:, None]
        dz = -p * (g_logp[:, None] + g_entropy[:, None] * centred)
        dz += tl.where(cols[None, :] == targets[:, None], g_logp[:, None], 0.0)
        dz = tl.where(valid[:, None], dz / temperature, 0.0)
        tl.store(drow_ptrs[:, None] + cols[None, :], dz.to(dlogits_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# What @triton.jit saw above: CPU tensors can only run through the interpreter.
INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)
# triton's own helpers (tl.max, ...) were decorated when triton was first imported, maybe earlier.
TRITON_HELPERS_INTERPRETED = isinstance(tl.max, InterpretedFunction)


def _blocks(n_rows, n_vocab):
    block_v = min(triton.next_power_of_2(n_vocab), MAX_BLOCK_V)
    block_n = min(max(1, TILE_ELEMENTS // block_v), triton.next_power_of_2(n_rows))
    return block_n, block_v


class LogprobsFromLogits(torch.autograd.Function):
    """(logits [N, V] contiguous fp32/bf16, targets [N] int, temperature, ignore_index)
    -> (logp [N], entropy [N]) fp32. Inputs are assumed valid (kernels.dispatch checks them)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index):
        n_rows, n_vocab = logits.shape
        logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        block_n, block_v = _blocks(n_rows, n_vocab)
        _forward_kernel[(triton.cdiv(n_rows, block_n),)](
            logits, targets, logp, entropy, lse, n_rows, n_vocab, logits.stride(0), temperature, ignore_index,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=NUM_WARPS)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        n_rows, n_vocab = logits.shape
        dlogits = torch.empty_like(logits)
        block_n, block_v = _blocks(n_rows, n_vocab)
        _backward_kernel[(triton.cdiv(n_rows, block_n),)](
            logits, dlogits, targets, lse, entropy, g_logp.contiguous(), g_entropy.contiguous(),
            n_rows, n_vocab, logits.stride(0), dlogits.stride(0), ctx.temperature, ctx.ignore_index,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=NUM_WARPS)
        return dlogits, None, None, None
