"""Public entry points: check the inputs, pick the backend, add the KL term.

backend="auto" runs the Triton kernels on CUDA tensors; on CPU tensors it runs the vocabulary-tiled
torch path (kernels.logprob_tiled) from hidden states and the torch reference from logits (whose
row chunks are the tiles already: there is no GEMM to fuse). "triton" forces the kernels (CPU tensors
only under TRITON_INTERPRET=1); "tiled" forces the tiled path (the reference from logits); "torch"
forces the reference. Every check runs before anything is launched and raises ValueError naming the argument.
The Triton modules are imported on first use: `import kernels` stays free of triton (CPU learners
never need it), and TRITON_INTERPRET is read when those modules decorate their kernels.
"""

import importlib
import math
import numbers

import torch

from kernels import logprob_tiled, reference

BACKENDS = ("auto", "triton", "tiled", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def _check_matrix(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-D tensor with a non-empty last dimension, got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32 or bfloat16, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {tensor.stride()}")


def _check_common(like, n_vocab, targets, temperature, ref_logprobs, kl, ignore_index, backend):
    """Checks shared by both entry points; `like` is the [N, ·] input the targets index into."""
    n_rows = like.shape[0]
    if not isinstance(targets, torch.Tensor) or targets.dtype not in INDEX_DTYPES:
        raise ValueError(f"targets: expected an int64 or int32 tensor, got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != (n_rows,):
        raise ValueError(f"targets: expected shape ({n_rows},) to match {n_rows} rows, got {tuple(targets.shape)}")
    if targets.device != like.device:
        raise ValueError(f"targets: expected device {like.device}, got {targets.device}")
    if not targets.is_contiguous():
        raise ValueError(f"targets: expected a contiguous tensor, got strides {targets.stride()}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= n_vocab))
    if out_of_range.any():
        row = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"targets: row {row} holds {int(targets[row])}, outside [0, {n_vocab}) and not "
                         f"ignore_index={ignore_index}")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if ref_logprobs is not None:
        if not isinstance(ref_logprobs, torch.Tensor) or not ref_logprobs.is_floating_point():
            raise ValueError(f"ref_logprobs: expected a floating-point tensor or None, got "
                             f"{getattr(ref_logprobs, 'dtype', type(ref_logprobs).__name__)}")
        if tuple(ref_logprobs.shape) != (n_rows,) or ref_logprobs.device != like.device:
            raise ValueError(f"ref_logprobs: expected shape ({n_rows},) on {like.device}, got "
                             f"{tuple(ref_logprobs.shape)} on {ref_logprobs.device}")
    if kl not in reference.KL_ESTIMATORS:
        raise ValueError(f"kl: expected one of {sorted(reference.KL_ESTIMATORS)}, got {kl!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _triton_module(backend, tensor, name):
    """The Triton module kernels.<name> to run on `tensor`, or None for a torch path."""
    if backend in ("torch", "tiled") or (backend == "auto" and not tensor.is_cuda) or tensor.shape[0] == 0:
        return None  # (an empty batch launches nothing)
    module = importlib.import_module(f"kernels.{name}")
    if not tensor.is_cuda and not module.INTERPRETED:
        raise ValueError(f"backend: 'triton' got CPU tensors, which need TRITON_INTERPRET=1 set before "
                         f"kernels.{name} is first imported; use backend='torch' or CUDA tensors")
    if not tensor.is_cuda and not module.TRITON_HELPERS_INTERPRETED:
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton itself "
                         "is first imported (vLLM imports it), or triton's own tl.* helpers cannot be "
                         "interpreted; set it in the environment of the process")
    return module


def logprobs_from_logits(logits, targets, temperature=1.0, ref_logprobs=None, kl="k3", ignore_index=-100,
                         backend="auto"):
    """Per-token log-prob of the targets, entropy and KL to a reference, from logits.

    logits [N, V] fp32/bf16, contiguous; targets [N] int64/int32, each in [0, V) or ignore_index;
    temperature > 0 divides the logits; ref_logprobs [N] or None; kl "k1" | "k2" | "k3".
    Returns (logprobs [N], entropy [N], kl [N] or None), fp32, 0 at ignored rows. All three are
    differentiable with respect to logits; rows equal to ignore_index get zero gradient.
    """
    _check_matrix("logits", logits)
    _check_common(logits, logits.shape[1], targets, temperature, ref_logprobs, kl, ignore_index, backend)
    triton_impl = _triton_module(backend, logits, "logprob_logits")
    if triton_impl is None:
        return reference.logprobs_from_logits(logits, targets, temperature, ref_logprobs, kl, ignore_index)
    logp, entropy = triton_impl.LogprobsFromLogits.apply(logits, targets, float(temperature), ignore_index)
    return logp, entropy, reference.kl_to_reference(logp, ref_logprobs, kl, targets != ignore_index)


def logprobs_from_hidden(hidden, weight, targets, bias=None, temperature=1.0, ref_logprobs=None, kl="k3",
                         ignore_index=-100, backend="auto"):
    """The outputs of `logprobs_from_logits` for logits = hidden · weightᵀ + bias, without ever
    holding [N, V] logits.

    hidden [N, H] and weight [V, H] (the LM head) contiguous, same dtype (fp32/bf16) and device;
    bias [V] or None, same dtype and device. Gradients flow into hidden, weight and bias.
    """
    _check_matrix("hidden", hidden)
    _check_matrix("weight", weight)
    n_vocab = weight.shape[0]
    if n_vocab == 0 or weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype \
            or weight.device != hidden.device:
        raise ValueError(f"weight: expected [V >= 1, {hidden.shape[1]}] {hidden.dtype} on {hidden.device} to "
                         f"match hidden, got {list(weight.shape)} {weight.dtype} on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias: expected a tensor or None, got {type(bias).__name__}")
        if (tuple(bias.shape) != (n_vocab,) or bias.dtype != weight.dtype or bias.device != weight.device
                or not bias.is_contiguous()):
            raise ValueError(f"bias: expected a contiguous [{n_vocab}] {weight.dtype} tensor on {weight.device}, "
                             f"got {list(bias.shape)} {bias.dtype} on {bias.device}, strides {bias.stride()}")
    _check_common(hidden, n_vocab, targets, temperature, ref_logprobs, kl, ignore_index, backend)
    triton_impl = _triton_module(backend, hidden, "logprob_hidden")
    if triton_impl is None and backend in ("tiled", "auto"):
        logp, entropy = logprob_tiled.logprobs_from_hidden(hidden, weight, targets, bias, temperature, ignore_index)
        return logp, entropy, reference.kl_to_reference(logp, ref_logprobs, kl, targets != ignore_index)
    if triton_impl is None:
        return reference.logprobs_from_hidden(hidden, weight, targets, bias, temperature, ref_logprobs, kl,
                                              ignore_index)
    logp, entropy = triton_impl.LogprobsFromHidden.apply(hidden, weight, bias, targets, float(temperature),
                                                         ignore_index)
    return logp, entropy, reference.kl_to_reference(logp, ref_logprobs, kl, targets != ignore_index)
