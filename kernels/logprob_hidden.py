"""Triton log-prob and entropy from hidden states [N, H] and the LM-head weight [V, H] (+ bias [V]),
never holding [N, V] logits in memory (maths in kernels/reference.py).

Forward: one fused kernel. A program owns BLOCK_N rows and one of `n_splits` vocabulary ranges; it
walks that range in BLOCK_V tiles, computes each [BLOCK_N, BLOCK_V] logits tile with tl.dot over H
in BLOCK_K steps (fp32 accumulator), and folds it into an online log-sum-exp (running max from
-inf, Σ exp(z − m), Σ exp(z − m)·(z − m)) and the target's logit. The per-range partials ([n_splits, N],
fp32) are merged in torch. Splitting the vocabulary gives small batches enough programs, and with
the vocabulary range as the fastest program index the ~2 programs per SM in flight cover 16 ranges
× ~8–16 row blocks: each weight tile is read by ~8–16 programs and each hidden row block by 16,
from a working set (~30 MB at H = 3584) that fits an H100's L2.

Backward: for one vocabulary chunk at a time (sized so its scratch fits `scratch_bytes`), a kernel
recomputes the logits tiles with the same tile code as the forward (identical fp32 logits) and
writes ∂loss/∂logits for that chunk into an [N, chunk] scratch in the input dtype; cuBLAS then
forms ∂weight[chunk] = scratchᵀ · hidden (one GEMM over all rows, fp32 accumulation, written
directly) and ∂hidden += scratch · weight[chunk] (accumulated across chunks in fp32). That is
8·N·H·V FLOPs in all: 2 forward, 2 recompute, 4 in the two gradient GEMMs.

Offsets are int64 and both grids are one-dimensional (2³¹ − 1 programs), so any N works.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class Tiles:
    """Launch configuration of the kernels below."""

    block_n: int
    """Rows of hidden per tile."""
    block_v: int
    """Vocabulary entries per tile."""
    block_k: int
    """Hidden features per tl.dot step."""
    max_splits: int
    """Most vocabulary ranges the forward splits a row block into."""
    group_n: int
    """Row blocks that sweep the vocabulary together in the backward kernel (L2 reuse)."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining depth of the tl.dot loop."""
    scratch_bytes: int
    """Budget for the backward's [N, chunk] gradient scratch; sets the vocabulary chunk."""


# Hopper-sized tiles: a 128×128 fp32 accumulator over 8 warps, 3-stage bf16 pipeline (96 KiB of
# shared memory); fp32 inputs halve BLOCK_K to stay in the same shared-memory budget.
GPU_TILES = {
    torch.bfloat16: Tiles(128, 128, 64, 16, 16, 8, 3, 1 << 30),
    torch.float32: Tiles(128, 128, 32, 16, 16, 8, 3, 1 << 30),
}
# The interpreter runs each program in Python: tiny tiles and scratch so that small test shapes
# still take every loop (several row blocks, vocabulary tiles, splits, K steps and chunks).
INTERPRETER_TILES = Tiles(16, 32, 16, 2, 2, 1, 1, 8 << 10)


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, hidden, stride_x, stride_w, temperature,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of (x[rows] · w[cols]ᵀ + b[cols]) / temperature."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    x_ptrs = x_ptr + rows[:, None] * stride_x
    w_ptrs = w_ptr + cols[None, :] * stride_w
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        x = tl.load(x_ptrs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, targets_ptr, max_part_ptr, sum_exp_part_ptr, mean_shifted_part_ptr,
                    z_target_part_ptr,
                    n_rows, n_vocab, hidden, stride_x, stride_w, vocab_per_split, n_splits, temperature,
                    ignore_index, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    split = pid % n_splits
    rows = (pid // n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (targets != ignore_index)

    # Running max m (from -inf), Σ e and Σ e·(z − m) with e = exp(z − m), as in kernels/logprob_logits.py.
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, n_vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, valid, col_ok, hidden, stride_x, stride_w, temperature,
                         HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        # Logits of -inf (a -inf bias) keep a row's max at -inf until a finite one comes; the
        # shift is 0 until then, and p = 0 entries add 0 (not 0·(-inf)) to Σ e·(z − m).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        moved = tl.where(m == float("-inf"), 0.0, shift - m)
        rescale = tl.exp(m - shift)
        e = tl.where(col_ok[None, :], tl.exp(z - shift[:, None]), 0.0)
        e_shifted = tl.where(e > 0, e * (z - shift[:, None]), 0.0)
        sum_exp_shifted = rescale * (sum_exp_shifted - moved * sum_exp) + tl.sum(e_shifted, axis=1)
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        m = m_new

    offsets = split * n_rows + rows
    tl.store(max_part_ptr + offsets, m, mask=row_ok)
    tl.store(sum_exp_part_ptr + offsets, sum_exp, mask=row_ok)
    tl.store(mean_shifted_part_ptr + offsets, sum_exp_shifted / sum_exp, mask=row_ok)
    tl.store(z_target_part_ptr + offsets, z_target, mask=row_ok)


@triton.jit
def _backward_kernel(x_ptr, w_ptr, b_ptr, targets_ptr, lse_ptr, mean_z_ptr, g_logp_ptr, g_entropy_ptr, dz_ptr,
                     n_rows, v_begin, v_count, hidden, stride_x, stride_w, stride_dz, temperature, ignore_index,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped order: GROUP_N row blocks sweep the chunk's column blocks together, so the programs
    # in flight share a few rows of hidden and a few tiles of weight.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(v_count, BLOCK_V)
    first_row_block = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_row_block, GROUP_N)
    row_block = first_row_block + (pid % per_group) % group_size
    col_block = (pid % per_group) // group_size

    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (targets != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    mean_z = tl.load(mean_z_ptr + rows, mask=valid, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=valid, other=0.0)
    g_entropy = tl.load(g_entropy_ptr + rows, mask=valid, other=0.0)
    local_cols = col_block.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local_cols < v_count
    cols = v_begin + local_cols

    z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, valid, col_ok, hidden, stride_x, stride_w, temperature,
                     HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(p > 0, -p * (g_logp[:, None] + g_entropy[:, None] * (z - mean_z[:, None])), 0.0)
    dz += tl.where(cols[None, :] == targets[:, None], g_logp[:, None], 0.0)
    dz = tl.where(valid[:, None], dz / temperature, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + local_cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# What @triton.jit saw above: CPU tensors can only run through the interpreter.
INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)
# triton's own helpers (tl.max, ...) were decorated when triton was first imported, maybe earlier.
TRITON_HELPERS_INTERPRETED = isinstance(tl.max, InterpretedFunction)


def _tiles(hidden):
    return GPU_TILES[hidden.dtype] if hidden.is_cuda else INTERPRETER_TILES


def _dot_options(hidden):
    """UPCAST and PRECISION for tl.dot. fp32 inputs get true fp32 products (TF32 would cost ~1e-3 in
    the logits). The interpreter (triton 3.7) multiplies bf16 tiles as their raw uint16 bits, so
    there bf16 operands are upcast first: exact, as bf16 products are exact in fp32 and the
    accumulator is fp32 on the GPU too."""
    upcast = INTERPRETED and hidden.dtype == torch.bfloat16
    return {"UPCAST": upcast, "PRECISION": "ieee" if upcast or hidden.dtype == torch.float32 else "tf32"}


class LogprobsFromHidden(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, ignore_index)
    -> (logp [N], entropy [N]) fp32. Inputs are assumed valid (kernels.dispatch checks them):
    contiguous, one dtype (fp32/bf16), one device."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index):
        n_rows, n_hidden = hidden.shape
        n_vocab = weight.shape[0]
        tiles = _tiles(hidden)
        n_vocab_tiles = triton.cdiv(n_vocab, tiles.block_v)
        tiles_per_split = triton.cdiv(n_vocab_tiles, min(tiles.max_splits, n_vocab_tiles))
        n_splits = triton.cdiv(n_vocab_tiles, tiles_per_split)
        max_part, sum_exp_part, mean_shifted_part, z_target_part = torch.empty(
            4, n_splits, n_rows, dtype=torch.float32, device=hidden.device).unbind(0)
        grid = (triton.cdiv(n_rows, tiles.block_n) * n_splits,)
        _forward_kernel[grid](
            hidden, weight, bias, targets, max_part, sum_exp_part, mean_shifted_part, z_target_part,
            n_rows, n_vocab, n_hidden, hidden.stride(0), weight.stride(0), tiles_per_split * tiles.block_v,
            n_splits, temperature, ignore_index, HAS_BIAS=bias is not None, **_dot_options(hidden),
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages)

        # Merge the ranges in coordinates shifted by the row max, like the kernel.
        row_max = max_part.amax(0)
        weights = sum_exp_part * torch.exp(max_part - row_max)
        log_sum_exp = weights.sum(0).log()
        # A range whose logits are all -inf has weight 0 and a 0/0 mean: it adds nothing.
        mean_shifted = torch.where(weights > 0, weights * (mean_shifted_part + max_part - row_max), 0.0)
        mean_shifted = mean_shifted.sum(0) / weights.sum(0)
        lse = row_max + log_sum_exp
        mean_z = lse - (log_sum_exp - mean_shifted)
        valid = targets != ignore_index
        logp = torch.where(valid, z_target_part.sum(0) - lse, 0.0)
        entropy = torch.where(valid, log_sum_exp - mean_shifted, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_z)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, lse, mean_z = ctx.saved_tensors
        n_rows, n_hidden = hidden.shape
        n_vocab = weight.shape[0]
        tiles = _tiles(hidden)
        g_logp, g_entropy = g_logp.contiguous(), g_entropy.contiguous()

        chunk_budget = tiles.scratch_bytes // (n_rows * hidden.element_size())
        chunk = min(max(tiles.block_v, chunk_budget // tiles.block_v * tiles.block_v),
                    triton.cdiv(n_vocab, tiles.block_v) * tiles.block_v)
        scratch = torch.empty(n_rows, chunk, dtype=hidden.dtype, device=hidden.device)
        dhidden32 = torch.zeros(n_rows, n_hidden, dtype=torch.float32, device=hidden.device)
        dweight = torch.empty_like(weight)
        dbias32 = None if bias is None else torch.empty(n_vocab, dtype=torch.float32, device=bias.device)
        for v_begin in range(0, n_vocab, chunk):
            v_count = min(chunk, n_vocab - v_begin)
            dz = scratch[:, :v_count]
            grid = (triton.cdiv(n_rows, tiles.block_n) * triton.cdiv(v_count, tiles.block_v),)
            _backward_kernel[grid](
                hidden, weight, bias, targets, lse, mean_z, g_logp, g_entropy, dz,
                n_rows, v_begin, v_count, n_hidden, hidden.stride(0), weight.stride(0), dz.stride(0),
                ctx.temperature, ctx.ignore_index, HAS_BIAS=bias is not None, **_dot_options(hidden),
                GROUP_N=tiles.group_n, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)
            torch.mm(dz.t(), hidden, out=dweight[v_begin:v_begin + v_count])
            dhidden32 += dz @ weight[v_begin:v_begin + v_count]
            if bias is not None:
                dbias32[v_begin:v_begin + v_count] = dz.sum(0, dtype=torch.float32)
        dbias = None if bias is None else dbias32.to(bias.dtype)
        return dhidden32.to(hidden.dtype), dweight, dbias, None, None, None
