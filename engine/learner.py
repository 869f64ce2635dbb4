"""The DeepSpeed learner: one Ray actor per data-parallel rank.

Each rank holds the policy under a DeepSpeed engine (ZeRO config from a DeepSpeed JSON; gloo on CPU,
NCCL on GPU) and, when some KL is on, a frozen reference model — or, for a LoRA policy
(`model.lora`, engine/lora.py), only adapters are trained and the reference is the same model with
its adapters switched off. It computes the policy's per-token
log-probs of the response tokens — hidden states of the language model, then the LM head through
`kernels.logprobs_from_hidden`, so [tokens × vocabulary] logits never exist — and the loss and update.
With `learner.shared_prefix` a micro-batch computes each prompt once for all of its responses
(engine/collate.py): same log-probs and gradients, the cost of the unique tokens.

Loss normalisers are global: the driver passes the step's total sequence and token counts, every
micro-batch on every rank weights its tokens by them, and the per-rank loss is multiplied by the
world size because DeepSpeed averages gradients over ranks. The update therefore does not depend on
how the step is split into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import algorithms as A
from engine import lora
from engine.collate import collate, collate_shared, selected_hidden, shared_prefix_supported
from kernels import logprobs_from_hidden, logprobs_from_logits
from rollout.weight_sync import join_group, send


@dataclass
class Sequence:
    """One response to train on, with everything the learner needs (token ids, no text)."""

    prompt_ids: list[int]
    response_ids: list[int]
    image: int = -1
    """Index into the batch's `images` (-1: no image)."""
    advantage: float = 0.0
    rollout_logprobs: list[float] = field(default_factory=list)
    old_logprobs: list[float] | None = None
    """Log-probs of the policy that generated the response (π_old); None: the current policy's."""
    ref_logprobs: list[float] | None = None
    loss_weights: list[float] | None = None
    """Supervised loss weight per response token (SFT targets, segment masks); None: 1 each."""
    vision_in_response: bool = False
    """The response holds real image placeholders (a later user turn of an SFT conversation). RL
    responses are sampled: a placeholder there is text, never an image slot."""


@dataclass
class Shard:
    """A rank's part of one optimizer step."""

    sequences: list[Sequence]
    images: list[tuple[torch.Tensor, torch.Tensor]]
    """(pixel_values, image_grid_thw) per prompt, shared by the prompt's sequences."""
    index: list[int]
    """Position of each of `sequences` in the step's list (results are returned in this order)."""
    micro_sizes: list[int]
    """Sequences per micro-batch, in order (the same count of micro-batches on every rank: empty ones
    run with zero weight so every rank joins the same number of gradient reductions)."""
    num_seqs: int
    """Sequences in the whole optimizer step (all ranks)."""
    num_tokens: float
    """Loss tokens in the whole optimizer step (all ranks), counted by their loss weights."""


class Learner:
    """A data-parallel learner rank. Construct as a Ray actor, then call `init` on all ranks at once."""

    def __init__(self, model: dict[str, Any], learner: dict[str, Any], algorithm: dict[str, Any], temperature: float,
                 max_response_len: int, use_reference: bool, seed: int):
        self.model_cfg, self.cfg, self.algo = model, learner, algorithm
        self.temperature = temperature
        self.max_response_len = max_response_len
        self.use_reference = use_reference
        self.seed = seed
        self.cuda = torch.cuda.is_available() and learner.get("num_gpus", 0) > 0

    def endpoint(self) -> tuple[str, int]:
        """This rank's node address and a free TCP port on it (for a rendezvous it hosts)."""
        import socket

        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((address, 0))
            return address, s.getsockname()[1]

    def init(self, rank: int, world_size: int, master_addr: str, master_port: int) -> bool:
        """Starts this rank; returns whether its passes share each prompt across its responses."""
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        if not self.cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(self.cfg["torch_threads"])
        import deepspeed
        from transformers import AutoModelForImageTextToText

        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.rank, self.world_size = rank, world_size
        dtype = getattr(torch, self.model_cfg["dtype"])
        with open(self.cfg["deepspeed_config"]) as f:
            ds_config = json.load(f)
        # With DeepSpeed's bf16 mode on, it casts the model and keeps fp32 master weights, so the
        # policy is loaded in fp32; otherwise the optimizer works on parameters of model.dtype.
        ds_bf16 = ds_config.get("bf16", {}).get("enabled", False)
        # ZeRO-3 partitions the parameters across ranks: every gather (forward, export, save) is a
        # collective that all ranks must enter together.
        self.zero3 = (ds_config.get("zero_optimization") or {}).get("stage", 0) == 3
        self._gathered: dict[str, torch.Tensor] | None = None
        torch.manual_seed(self.seed)
        policy = AutoModelForImageTextToText.from_pretrained(
            self.model_cfg["path"], dtype=torch.float32 if ds_bf16 else dtype)
        if self.cfg["gradient_checkpointing"]:
            policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
        # Forward passes go through the Hugging Face model itself (engine/collate.py reaches into
        # it). With LoRA, peft injects the adapters into its layers in place and the engine holds the
        # peft model: checkpoints carry base weights and adapters, the optimizer only the adapters.
        self.policy = policy
        self.lora = lora.enabled(self.model_cfg["lora"])
        if self.lora:
            self.lora_scale = lora.scaling(self.model_cfg["lora"])
            policy = lora.wrap(policy, self.model_cfg["lora"])
        ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                         gradient_clipping=self.cfg["grad_clip"],
                         # We call step() once per optimizer step after a variable number of backwards.
                         managed_gradient_accumulation=False)
        ds_config.pop("train_batch_size", None)
        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=self.cfg["lr"],
                                          betas=tuple(self.cfg["betas"]),
                                          weight_decay=self.cfg["weight_decay"])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
        self.device = self.engine.device
        self.ref = None
        self.ref_is_initial = True
        if self.use_reference and not self.lora:
            self.ref = AutoModelForImageTextToText.from_pretrained(
                self.model_cfg["reference_path"] or self.model_cfg["path"], dtype=dtype)
            self.ref.to(self.device).eval().requires_grad_(False)
        config = self.policy.config
        self.image_token_id = config.image_token_id
        self.vision_token_ids = [t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None]
        self.shared_prefix = shared_prefix_supported(self.policy, self.cfg["shared_prefix"], warn=rank == 0)
        return self.shared_prefix

    # ---- forward ----

    def _collate(self, seqs: list[Sequence], images: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        if self.shared_prefix and not any(s.vision_in_response for s in seqs):
            return collate_shared(seqs, images, self.image_token_id, self.vision_token_ids,
                                  self.policy.model.get_rope_index)
        return collate(seqs, images, self.image_token_id, self.vision_token_ids)

    def _token_logprobs(self, model: torch.nn.Module, batch: dict[str, Any],
                        temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob, entropy) [N] of the response tokens under `model` at `temperature` (None: the
        rollout temperature, which RL's ratios need; supervised losses use 1)."""
        temperature = self.temperature if temperature is None else temperature
        selected = selected_hidden(model, batch, self.device)
        targets = batch["targets"].to(self.device)
        if self.zero3 and model is self.policy:
            # A partitioned LM head is gathered only inside its own forward (whose backward also
            # reduce-scatters its gradient), so the logits are materialised here.
            logp, entropy, _ = logprobs_from_logits(model.lm_head(selected).contiguous(), targets,
                                                    temperature=temperature, backend=self.cfg["logprob_backend"])
        else:
            logp, entropy, _ = logprobs_from_hidden(selected, model.lm_head.weight, targets,
                                                    temperature=temperature, backend=self.cfg["logprob_backend"])
        return logp, entropy

    def _micro_batches(self, shard: Shard) -> list[list[Sequence]]:
        ends = torch.tensor(shard.micro_sizes).cumsum(0).tolist()
        return [shard.sequences[end - size:end] for size, end in zip(shard.micro_sizes, ends)]

    @torch.no_grad()
    def compute_logprobs(self, shard: Shard, which: str, temperature: float | None = None) -> list[list[float]]:
        """Per-sequence log-probs of the response tokens under the current policy ("old") or the
        frozen reference ("ref"; with LoRA the policy with its adapters off), at `temperature`
        (None: the rollout temperature)."""
        reference = which == "ref"
        model = self.ref if reference and not self.lora else self.policy
        adapters_off = self.engine.module.disable_adapter() if reference and self.lora else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        out = []
        with adapters_off:
            for mb in self._micro_batches(shard):
                if not mb:
                    if self.zero3 and which == "old":  # join the other ranks' parameter gathers
                        self._token_logprobs(model, self._collate(shard.sequences[:1], shard.images), temperature)
                    continue
                logp, _ = self._token_logprobs(model, self._collate(mb, shard.images), temperature)
                out.extend(x.tolist() for x in logp.float().cpu().split([len(s.response_ids) for s in mb]))
        model.train(was_training)
        return out

    # ---- updates ----

    def _backward_micro(self, mb: list[Sequence], shard: Shard, loss_fn, temperature: float | None) -> dict[str, float]:
        """Forward + backward of one micro-batch; `loss_fn(batch, logp, entropy, seqs)` returns the
        per-token weighted loss [N] whose sum is this micro-batch's share of the step's loss."""
        empty = not mb
        seqs = mb or shard.sequences[:1]
        batch = self._collate(seqs, shard.images)
        logp, entropy = self._token_logprobs(self.policy, batch, temperature)
        weighted, stats = loss_fn(batch, logp, entropy, seqs)
        if empty:
            weighted = weighted * 0.0  # joins the gradient reduction, contributes nothing
            stats = {}
        self.engine.backward(weighted.sum() * self.world_size, scale_wrt_gas=False)
        return stats

    def _rl_loss(self, shard: Shard):
        algo = self.algo

        def loss_fn(batch, logp, entropy, seqs):
            dev = logp.device
            logp = logp.float()

            def per_token(values):
                return torch.tensor([x for s in seqs for x in values(s)], dtype=torch.float32, device=dev)

            lengths = torch.tensor([len(s.response_ids) for s in seqs], device=dev)
            seq_index = torch.repeat_interleave(torch.arange(len(seqs), device=dev), lengths)
            adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32, device=dev)[seq_index]
            rollout = per_token(lambda s: s.rollout_logprobs)
            # π_old is the policy that generated the sample: its stored log-probs when the sample is
            # off-policy (a carried-over group, or a later PPO mini-batch/epoch); for a sample
            # generated by the current weights and trained once, the current log-probs (ratio 1).
            has_old = torch.tensor([s.old_logprobs is not None for s in seqs], device=dev)[seq_index]
            old = torch.where(has_old, per_token(lambda s: s.old_logprobs or [0.0] * len(s.response_ids)),
                              logp.detach())
            loss_t, clipped = A.ppo_clip_loss(logp, old, adv, algo["clip_low"], algo["clip_high"], algo["dual_clip"])
            if algo["tis_cap"] is not None:
                loss_t = loss_t * A.tis_weights(old, rollout, algo["tis_cap"])
            stats = {"pg_loss": loss_t, "clipfrac": clipped.float(), "entropy": entropy.float(),
                     "ratio/mean": torch.exp((logp - old).clamp(-20.0, 20.0)),
                     "mismatch/abs_logprob_diff": (logp - rollout).abs(),
                     "mismatch/kl": A.kl_estimate(rollout, logp, "k3")}
            if seqs[0].ref_logprobs is not None:
                kl = A.kl_estimate(logp, per_token(lambda s: s.ref_logprobs), algo["kl_estimator"])
                stats["kl"] = kl
                if algo["kl_loss_coef"] > 0:
                    loss_t = loss_t + algo["kl_loss_coef"] * kl
            if algo["entropy_coef"] != 0:  # negative: an entropy penalty, as verl applies any non-zero value
                loss_t = loss_t - algo["entropy_coef"] * entropy.float()
            w = A.token_weights(algo["loss_agg"], seq_index, lengths, shard.num_seqs, shard.num_tokens,
                                self.max_response_len).to(dev, torch.float32)
            # Statistics are token means over the whole step: summed over micro-batches and ranks.
            sums = {k: float((v.detach() * (1.0 / shard.num_tokens)).sum()) for k, v in stats.items()}
            sums["loss"] = float((loss_t.detach() * w).sum())
            return loss_t * w, sums

        return loss_fn

    def _sft_loss(self, shard: Shard):
        def loss_fn(batch, logp, entropy, seqs):
            w = torch.tensor([x for s in seqs for x in (s.loss_weights or [1.0] * len(s.response_ids))],
                             dtype=torch.float32, device=logp.device) / shard.num_tokens
            return -logp * w, {"sft/nll": float(-(logp.detach().float() * w).sum())}
        return loss_fn

    def _optimizer_step(self, shard: Shard, loss_fn, lr: float, temperature: float | None = None) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        stats: dict[str, float] = {}
        t0 = time.perf_counter()
        for mb in self._micro_batches(shard):
            for k, v in self._backward_micro(mb, shard, loss_fn, temperature).items():
                stats[k] = stats.get(k, 0.0) + v
        self.engine.step()
        stats["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0) / self.world_size
        stats["learner/update_s"] = (time.perf_counter() - t0) / self.world_size
        stats["learner/peak_memory_gb"] = self._peak_memory_gb() / self.world_size
        return stats

    def _peak_memory_gb(self) -> float:
        """Peak GPU memory allocated by this rank, or on CPU the process's peak resident set."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def update(self, shards: list[Shard], lr: float) -> dict[str, float]:
        """One RL step: an optimizer step per shard (PPO mini-batch), repeated `epochs` times.
        Returns this rank's weighted statistic sums (the driver adds the ranks)."""
        total: dict[str, float] = {}
        for _ in range(self.cfg["epochs"]):
            for shard in shards:
                for k, v in self._optimizer_step(shard, self._rl_loss(shard), lr).items():
                    total[k] = total.get(k, 0.0) + v / (len(shards) * self.cfg["epochs"])
        return total

    def sft_update(self, shard: Shard, lr: float) -> dict[str, float]:
        """One supervised step: negative log-likelihood of the response tokens, averaged with their
        loss weights over the whole step."""
        return self._optimizer_step(shard, self._sft_loss(shard), lr, temperature=1.0)

    @torch.no_grad()
    def start_rl_stage(self) -> None:
        """After the SFT warm-up: the reference becomes a frozen copy of the current policy (the KL
        anchors RL to the model it starts from, as the seeds do), and the optimizer state is cleared.
        Adam's second moments from SFT gradients (norm ~1) would otherwise shrink RL's steps (norm
        ~0.1) about tenfold for the next ~1/(1 − β₂) = 1000 steps.

        With LoRA the adapters are folded into the base weights, W ← W + (α/r)·B·A, and B is zeroed:
        the policy is unchanged, and "adapters off" — the reference — is now this policy, with no
        copy of the weights. Training continues on fresh adapters (A keeps its values, B = 0: LoRA's
        own initialisation, Hu et al. 2021 §4.1)."""
        if self.lora:
            lora.fold_into_base(self.engine.module, self.lora_scale)
            # ZeRO-1/2 and DeepSpeed's bf16 mode keep fp32 master copies of the trained parameters
            # (the adapters) and write them back after each step: they must take the zeroed B.
            refresh = getattr(self.optimizer, "refresh_fp32_params", None)
            if refresh is not None:
                refresh()
        if self.ref is not None:
            self.ref.load_state_dict(self._full_state())
            self.ref_is_initial = False
        getattr(self.optimizer, "optimizer", self.optimizer).state.clear()

    # ---- full training state ----

    def save_state(self, path: str) -> None:
        """Every rank (together): the DeepSpeed engine state — weights, optimizer, ZeRO partitions;
        with LoRA the base weights (the reference) and the adapters — and this rank's torch RNG; rank
        0 also the reference model when it is no longer model.path."""
        self.engine.save_checkpoint(path, tag="engine", save_latest=False)
        torch.save(torch.get_rng_state(), os.path.join(path, f"rng_rank{self.rank}.pt"))
        if self.rank == 0 and self.ref is not None and not self.ref_is_initial:
            torch.save(self.ref.state_dict(), os.path.join(path, "reference.pt"))

    def load_state(self, path: str) -> None:
        """Restores what `save_state` wrote (every rank, together)."""
        loaded, _ = self.engine.load_checkpoint(path, tag="engine", load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state under {path}/engine")
        torch.set_rng_state(torch.load(os.path.join(path, f"rng_rank{self.rank}.pt")))
        reference = os.path.join(path, "reference.pt")
        if self.ref is not None and os.path.exists(reference):
            self.ref.load_state_dict(torch.load(reference, map_location=self.device))
            self.ref_is_initial = False

    # ---- weights out ----

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The policy's whole state dict. Under ZeRO-3 every rank must call it at once: the
        partitions are gathered for the copy (a rank's own state dict holds empty placeholders)."""
        module = self.engine.module
        if not self.zero3:
            return module.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            # One copy per tensor: tied weights (embedding and LM head) stay one tensor, so exports
            # write the head once, as transformers does, and vLLM sees the model as tied.
            copies: dict[tuple, torch.Tensor] = {}
            state = {}
            for k, v in module.state_dict().items():
                key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else (k,)
                if key not in copies:
                    copies[key] = v.detach().clone()
                state[k] = copies[key]
            return state

    def gather_weights(self) -> None:
        """Every rank, before a weight sync: under ZeRO-3 rank 0 keeps the gathered weights for the
        transport (and for a rollout worker that restarts before the next sync)."""
        if self.zero3:
            full = self._full_state()
            self._gathered = full if self.rank == 0 else None

    def _export_tensors(self) -> Mapping[str, torch.Tensor]:
        """The policy's parameters in Hugging Face names (the tied LM head is not repeated). With
        LoRA the adapters are merged in, each layer as it is read (engine/lora.py): no second copy of
        the adapted weights, the training weights untouched, plain weights for any vLLM."""
        if self.zero3 and self._gathered is None:
            raise RuntimeError("ZeRO-3: gather_weights() must run on every learner rank before a weight export")
        state = self._gathered if self.zero3 else self.engine.module.state_dict()
        head, embedding = self.policy.get_output_embeddings(), self.policy.get_input_embeddings()
        # Tied by identity, not by the config flag, which says tied even where transformers left the
        # folder's two different tensors untied: then the head is sent like any layer.
        skip = {"lm_head.weight"} if head is not None and head.weight is embedding.weight else set()
        if self.lora:
            return lora.MergedWeights(state, self.lora_scale, skip)
        return {name: t.detach() for name, t in state.items() if name not in skip}

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The weights as CPU copies, for the object-store transport."""
        return {name: t.to("cpu", copy=True).contiguous() for name, t in self._export_tensors().items()}

    def weight_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of the exported weights, in export order (the broadcast plan's input)."""
        return [(k, tuple(v.shape), v.dtype) for k, v in self._export_tensors().items()]

    def join_weight_group(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str) -> None:
        self._weight_group = join_group(master_addr, master_port, rank, world_size, backend)

    def broadcast_weights(self, plan: list) -> int:
        """Sends the policy to every engine of the weight group (rank 0 of that group)."""
        return send(self._weight_group, self._export_tensors(), plan, str(self.device))

    def save(self, path: str) -> str:
        """Writes a Hugging Face folder (weights, config, tokenizer, processor) loadable by
        transformers and vLLM — with LoRA the adapters merged in; rank 0 writes, the others return
        once they helped gather (ZeRO-3)."""
        state = self._full_state() if self.zero3 else None
        if self.rank != 0:
            return path
        if self.lora:  # merged layer by layer into host memory
            state = {name: t.to("cpu", copy=True) for name, t in self._export_tensors().items()}
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        # The processor (tokenizer, chat template, image processor) through its own save_pretrained:
        # the export is self-contained whatever model.path holds besides.
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(self.model_cfg["path"]).save_pretrained(tmp)
        # Replace atomically-ish: a crash mid-save never leaves a half-written checkpoint at `path`.
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path
