"""Fused per-token log-prob, entropy and KL for the learner: Triton kernels on GPU, a chunked torch
reference (kernels.reference) on CPU. See kernels/dispatch.py for the API and backend choice."""

from kernels import reference
from kernels.dispatch import logprobs_from_hidden, logprobs_from_logits

__all__ = ["logprobs_from_hidden", "logprobs_from_logits", "reference"]
