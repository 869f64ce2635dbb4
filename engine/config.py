"""Typed run configuration: dataclasses with every field documented, loaded from YAML with dotted
command-line overrides (`trainer.steps=40 rollout.temperature=0.8`).

    cfg = load_config("launch/configs/demo.yaml", ["trainer.steps=10"])

Unknown keys and wrongly typed values fail at load time with the dotted name of the field; checks
that span fields (e.g. KL on without a reference model) live in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

PATHO_R1_SYSTEM_PROMPT = (
    "You are a pathology expert, your task is to answer question step by step. Use the following format:"
    "<think> Your step-by-step reasoning </think><answer> Your final answer </answer>"
)


def _projections() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    rank: int | None = 0
    """Rank r of the LoRA adapters (Hu et al. 2021) the learner trains instead of the full weights
    (engine/lora.py, through peft); 0 or null: no LoRA. The KL reference is then the policy with its
    adapters switched off (no second copy of the weights), and the rollout engines and HF exports get
    the adapters merged into plain weights."""
    alpha: float | None = None
    """LoRA's α: an adapter adds (α/r)·B·A to its layer's weight. null: 2·rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input in update passes. 0 by default: with dropout the update pass
    computes the log-probs of a perturbed policy, not the one that sampled, and every PPO ratio of an
    on-policy sample is off 1."""
    target_modules: list[str] = field(default_factory=_projections)
    """Linear layers that get adapters; a name matches a layer whose full name equals it or ends with
    "." + it (peft's rule). Default: the attention and MLP projections. The LM head is never adapted.
    A name that matches no layer stops the run at start-up, listing the layer names that exist."""
    train_vision: bool = False
    """Also adapt the vision tower's (model.visual, merger included) layers that target_modules match.
    False: only the language model's layers get adapters; the vision tower stays frozen."""


@dataclass
class ModelConfig:
    path: str = "artifacts/tiny-qwen2.5-vl"
    """Hugging Face folder of the Qwen2.5-VL policy; it initialises the learner, the reference model
    and the rollout engines."""
    dtype: str = "float32"
    """Parameter dtype for learner and rollout: "float32" or "bfloat16"."""
    max_model_len: int = 1024
    """Longest prompt + response (tokens) the rollout engine accepts."""
    reference: bool | None = None
    """Keep a frozen copy of the initial policy as the KL reference. None: exactly when some KL term
    is on (algorithm.kl_loss_coef or kl_reward_coef > 0); false with a KL term on is an error."""
    reference_path: str | None = None
    """Hugging Face folder of the KL reference when it is not the initial policy (e.g. the model
    after your SFT stage while RL starts elsewhere); null: model.path. An SFT warm-up (sft.steps > 0)
    re-anchors the reference to the policy it ends with."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full-weight training (README "LoRA")."""


@dataclass
class DataConfig:
    train: str = "artifacts/demo-data/train.jsonl"
    """Training rows: a jsonl or parquet file, a Hugging Face `save_to_disk` folder or a folder of
    shards, in our schema or verl's or EasyR1's (README "Dataset schema"; engine/row_schemas.py),
    read lazily. Image paths are relative to the data file's folder."""
    val: str | None = "artifacts/demo-data/val.jsonl"
    """Validation rows for periodic greedy evaluation (any form data.train takes; loaded whole);
    None disables evaluation."""
    system_prompt: str = PATHO_R1_SYSTEM_PROMPT
    """System turn of our and EasyR1's rows (Patho-R1's by default; "" gives none, i.e. the chat
    template's default). verl rows keep their own chat list: none is added, as in verl."""
    format_prompt: str | None = None
    """EasyR1's data.format_prompt: a Jinja template file rendering each EasyR1 row's `problem` as
    `{{ content }}` (e.g. EasyR1's examples/format_prompt/r1v.jinja); None uses `problem` as is."""
    check_rows: int = 100_000
    """A data.train of at most this many rows is checked whole before the run starts: every bad row
    reported at once (the run stops then under bad_rows=fatal), duplicate ids refused, bad rows
    left out of the epochs. A larger one is checked row by row as it is served (bad rows skipped
    then, or fatal), its ids are not compared, and the format warm-up draws from its first
    check_rows rows."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (image tokens included) are bad rows."""
    bad_rows: str = "skip"
    """What a malformed row, a missing/unreadable image or an over-long prompt does: "skip" (logged,
    counted in `data/skipped`) or "fatal" (the run stops with the file, row and problem)."""
    shuffle: bool = True
    """Reshuffle the training rows every epoch (seeded by trainer.seed)."""
    max_images_per_prompt: int = 1
    """Most images one row may carry; the rollout engines reserve room for this many per prompt. A
    row with more fails the start-up check, naming this field and the row."""


@dataclass
class RolloutConfig:
    num_workers: int = 1
    """vLLM engines (Ray actors) generating in parallel."""
    group_size: int = 8
    """Samples per prompt (the G of GRPO)."""
    prompts_per_step: int = 8
    """Prompt groups trained on per step (after dynamic-sampling filtering)."""
    temperature: float = 1.0
    """Sampling temperature, in [0.01, 2] (vLLM's range); the learner divides its logits by the same
    value."""
    top_p: float = 1.0
    """Nucleus sampling mass. Only 1.0 is accepted: vLLM samples (and reports log-probs) from the
    truncated distribution while the learner's log-probs use the full softmax, so top_p < 1 would
    bias every importance ratio."""
    max_new_tokens: int = 64
    """Response length limit; responses stopped here are `truncated`."""
    seed: int = 0
    """Engine seed of each vLLM worker (plus its index)."""
    group_seeds: bool = False
    """Give every training group its own vLLM seed, derived from (trainer.seed, row id, epoch), so a
    resumed run samples exactly what the uninterrupted one did. Off: groups draw from each engine's
    stream (a resumed run trains correctly but on different samples). Off by default: with it on the
    demo reached its goal in 0 of 3 runs against 2 of 2 with it off, although the seeded samples'
    statistics agree with unseeded ones (BENCHMARKS.md); the cause is not understood."""
    max_staleness: int = 0
    """One-step-off asynchronous rollouts (verl's one_step_off_policy recipe). 0: rollout and learning
    take turns. 1: as soon as a step's groups are in, the next step's prompts start generating on the
    same weights, overlapping the learner's passes and update; the engines take the new weights once
    those groups are done, so every group comes from one policy and is trained at most one update
    after it. Such a group's π_old is the learner's policy at its update, and the gap to the policy
    that generated it is corrected by truncated importance sampling with the engine's log-probs
    (decoupled PPO), so 1 needs algorithm.tis_cap. Give engines and learner their own cores
    (rollout.cpu_threads, learner.torch_threads): here they run at the same time."""
    kv_cache_gib: float = 1.0
    """CPU only: KV-cache size per engine (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.5
    """GPU only: fraction of each rollout GPU vLLM may take."""
    enforce_eager: bool = True
    """Skip vLLM's graph capture / compilation (faster start; compilation pays off on long runs)."""
    tensor_parallel_size: int = 1
    """GPUs per engine. Only 1 for now: the in-process weight reload hands vLLM a generator of
    tensors, which cannot be sent to the worker processes of a tensor-parallel engine."""
    num_cpus_per_worker: float = 1.0
    """Ray CPUs reserved by each engine."""
    resources: dict[str, float] = field(default_factory=dict)
    """Further Ray resources each engine's placement bundle asks for, e.g. {rollout_node: 0.01} to
    place the engines on the nodes started with `ray start --resources='{"rollout_node": 1}'`."""
    cpu_threads: int = 0
    """CPU only: OpenMP threads of each engine (sampling over the vocabulary is the hot loop); 0 means
    every core of the machine, since rollout and learning take turns in a synchronous loop. Ray would
    otherwise pin it to one thread per reserved CPU (measured: 240 vs 420 tokens/s on two cores)."""
    weight_sync: str = "auto"
    """How engines receive new weights: "object_store" (one shared-memory copy, loaded through vLLM's
    reload API), "broadcast" (bucketed NCCL/gloo broadcast from learner rank 0), or "auto"
    (broadcast with GPUs, object store on CPU)."""
    weight_sync_bucket_mb: float = 256.0
    """Bucket size of the broadcast weight sync."""


@dataclass
class RewardFunctionConfig:
    name: str = ""
    """Component name (metrics `reward/<name>`). "accuracy" is the component DAPO filtering reads."""
    fn: str = ""
    """Built-in reward name or "path/to/file.py:function" (verl, EasyR1, OpenRLHF, TRL styles accepted)."""
    weight: float = 1.0
    """Weight of this component in the scalar reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the function."""
    timeout_s: float | None = None
    """Per-call time limit overriding reward.timeout_s."""


def _patho_r1_rewards() -> list[RewardFunctionConfig]:
    return [
        RewardFunctionConfig(name="format", fn="patho_r1_format", weight=0.1),
        RewardFunctionConfig(name="accuracy", fn="mc_accuracy", weight=0.9),
    ]


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=_patho_r1_rewards)
    """Reward components, summed with their weights (default: Patho-R1, 0.1 format + 0.9 accuracy)."""
    num_workers: int = 2
    """Reward worker processes (isolated from the driver; a crash or hang costs one call)."""
    timeout_s: float = 30.0
    """Per-call time limit; a call past it is killed and recorded as an error."""
    on_error: str = "exclude"
    """A failed reward: "exclude" the sample from the update, "fallback" to `fallback_score`, or
    "raise" (stop the run)."""
    fallback_score: float = 0.0
    """Score used for failed samples when on_error="fallback"."""
    judge_model: str | None = None
    """Hugging Face folder of an LLM judge served for the run by a vLLM Ray actor (the `judge_vllm`
    reward finds it by name); null: no judge actor."""
    judge_num_cpus: float = 1.0
    """CPUs reserved for the judge actor (on GPU machines it takes one GPU)."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """Advantage estimator: "grpo", "dr_grpo", "rloo" or "reinforce_pp_baseline" (engine/algorithms.py)."""
    adv_eps: float = 1e-6
    """Added to the group std in `grpo`."""
    clip_low: float = 0.2
    """PPO ratio clip below 1 (ε_low)."""
    clip_high: float = 0.2
    """PPO ratio clip above 1 (ε_high; DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip bound c (> 1) on the loss of negative-advantage tokens; None disables it."""
    loss_agg: str = "seq_mean_token_mean"
    """Loss aggregation (verl's agg_loss modes, with underscores): "token_mean" (DAPO, global token
    count), "seq_mean_token_mean" (GRPO), "seq_mean_token_sum" or "seq_mean_token_sum_norm"
    (Dr.GRPO). The default is the GRPO paper's sample-level mean; verl's actor and TRL default to
    the token mean ("token_mean")."""
    kl_estimator: str = "k3"
    """KL estimator to the reference model: "k1", "k2", "k3" (verl's low_var_kl, clamped) or
    "k3_unclamped" (TRL's k3; kernels/reference.py), used by both KL terms (verl has two settings: kl_loss_type, default low_var_kl, for the loss, and kl_penalty,
    default "kl" = k1, for the reward; set "k1" here to match the latter)."""
    kl_loss_coef: float = 0.0
    """β of the KL term added to the loss (GRPO); 0 disables it."""
    kl_reward_coef: float = 0.0
    """β of the KL subtracted from the reward (PPO style); 0 disables it."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient: the loss subtracts entropy_coef·H (negative: an entropy penalty);
    entropy is always logged."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: penalise responses longer than max_new_tokens − buffer linearly, −factor
    at the limit; 0 disables it."""
    overlong_factor: float = 1.0
    """Penalty at the length limit for overlong shaping."""
    mask_truncated: bool = False
    """Exclude responses that hit max_new_tokens from the loss."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's loss by min(π_old/π_rollout, cap) to correct
    the rollout/learner mismatch; None disables it."""
    dynamic_sampling: bool = False
    """DAPO: drop prompt groups whose `filter_metric` has zero variance and refill with new prompts."""
    filter_metric: str = "accuracy"
    """Reward component whose variance dynamic sampling tests (never a length-shaped score)."""
    max_sampling_rounds: int = 4
    """Dynamic sampling gives up after this many times the step's prompts were generated, trains on
    what qualified and warns."""
    skip_solved_epochs: int = 0
    """Pass-rate-aware scheduling: skip, for this many epochs, prompts whose samples were all right or all
    wrong last time (0 disables it)."""


@dataclass
class LearnerConfig:
    deepspeed_config: str = "launch/configs/deepspeed_zero2.json"
    """DeepSpeed JSON (ZeRO stage, precision, offload). Batch sizes and gradient clipping in it are
    overridden by this config."""
    num_ranks: int = 1
    """Data-parallel learner processes (Ray actors in one torch.distributed group)."""
    lr: float = 1e-5
    """AdamW learning rate for RL steps (the peak, under a schedule)."""
    lr_schedule: str = "constant"
    """RL learning-rate schedule after the warm-up: "constant" or "cosine" (decays to
    lr·min_lr_ratio at the last step; engine/schedule.py)."""
    warmup_steps: int = 0
    """RL steps of linear learning-rate warm-up."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; the loss is normalised globally, so this changes
    memory, not the update."""
    max_tokens_per_micro_batch: int = 0
    """When > 0, micro-batches are cut by padded token count (sequences × longest, prompt included)
    instead of micro_batch_size: short and long sequences pack without large padding. A sequence
    longer than the budget runs alone. With shared_prefix the packed rows are counted (a prompt once
    per row with its responses)."""
    shared_prefix: bool = True
    """Reference, old-policy and update passes compute each prompt (vision tower and prompt tokens)
    once per micro-batch, its responses attending to it through a block attention mask with their
    unshared rotary positions (engine/collate.py): the same log-probs and gradients as one sequence
    per response, for the cost of the unique tokens. False: every sequence carries its own prompt.
    A model class without `get_rope_index` runs unshared, with a warning."""
    mini_batches: int = 1
    """Optimizer steps per RL step (PPO mini-batches); 1 keeps the update on-policy and skips the
    separate old-log-prob pass."""
    epochs: int = 1
    """Passes over the step's samples."""
    logprob_backend: str = "auto"
    """Per-token log-prob implementation (kernels/): "auto" (the Triton kernels on GPU, the vocabulary-tiled
    torch path on CPU), "triton", "tiled" or "torch" (the chunked reference, for comparison)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    torch_threads: int = 2
    """CPU only: intra-op threads of each learner process."""
    num_cpus: float = 1.0
    """Ray CPUs reserved by each learner rank."""
    num_gpus: float = 0.0
    """Ray GPUs per learner rank (1 on GPU clusters)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Further Ray resources each rank's placement bundle asks for (custom node resources, as
    rollout.resources): pins the ranks to chosen nodes."""


@dataclass
class SFTConfig:
    train: str | None = None
    """Supervised data for the SFT stage (`launch/sft.py`): jsonl or parquet in any format of
    engine/sft_data.py (ShareGPT `conversations`, OpenAI `messages`, `caption` pairs, or our schema
    with `response`). Image paths are relative to the file's folder. None: no SFT stage; an RL run
    with sft.steps > 0 then warms up on format examples of data.train."""
    val: str | None = None
    """Held-out supervised data: its loss is measured every eval_every steps and at the end."""
    epochs: int = 1
    """Passes over sft.train (when sft.steps is 0)."""
    steps: int = 0
    """Optimizer steps. SFT stage: 0 runs `epochs` passes over sft.train. RL run without sft.train:
    the format warm-up's steps before RL (0: none)."""
    lr: float = 1e-4
    """Peak learning rate."""
    lr_schedule: str = "constant"
    """"constant" or "cosine" after the warm-up (engine/schedule.py, shared with RL)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    batch_size: int = 16
    """Examples per optimizer step (the format warm-up: rows per step, each giving one example per
    option)."""
    max_tokens_per_micro_batch: int = 0
    """Micro-batches cut by padded token count (> 0) rather than learner.micro_batch_size."""
    max_length: int = 2048
    """Examples longer than this (tokens, images included) are bad rows."""
    segment_weights: dict[str, float] = field(default_factory=dict)
    """Loss weight of each tagged span <tag>…</tag> of a target, e.g. {observe: 0.0, think: 1.0,
    answer: 1.0}; untagged target text keeps weight 1. When set, a target with a tag it does not
    name is a bad row. Empty: every target token weighs 1."""
    caption_instruction: str = "Describe this pathology image."
    """User turn of image-caption rows (continued pre-training)."""
    eval_every: int = 0
    """Validation loss on sft.val every N steps (0: at the end only)."""
    val_max_rows: int = 256
    """Validation rows used."""
    save_every: int = 0
    """SFT stage: full-state checkpoint every N steps (the last step always saves one)."""
    response_template: str = "<think>{think}</think><answer>{answer}</answer>"
    """Target response; {answer} takes each option's text in turn, so the warm-up teaches the format,
    never the answers."""
    think: str = "I compare the stain and the tissue pattern with each option."
    """Text placed in {think}."""


@dataclass
class TrainerConfig:
    run_name: str = ""
    """Run name; default: the config file's stem. Outputs go to <output_dir>/<run_name>/."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    steps: int = 40
    """RL steps."""
    seed: int = 0
    """Seed of data order, SFT examples and learner initialisation."""
    eval_every: int = 0
    """Greedy validation every N steps (0: only at the end when data.val is set)."""
    eval_max_rows: int = 64
    """Validation rows used per evaluation."""
    eval_before_train: bool = False
    """Evaluate once before the first RL step (a step-0 baseline, logged as step 0)."""
    eval_n: int = 0
    """Sampled responses per validation row besides the greedy one (mean@n, pass@k, maj@n;
    engine/evaluate.py); 0: greedy only."""
    eval_temperature: float = 1.0
    """Sampling temperature of the eval_n responses, in [0.01, 2]."""
    eval_correct: str = "accuracy"
    """Reward component that judges a response correct (score >= eval_correct_threshold)."""
    eval_correct_threshold: float = 1.0
    """Score of `eval_correct` at or above which a response counts as correct."""
    save_every: int = 0
    """Full training-state checkpoint (engine/checkpoint.py) every N RL steps, under
    <run>/checkpoints/step_<N>/; the last step always saves one (0: only that)."""
    keep_last: int = 0
    """Keep only the newest K complete checkpoints (0: keep all); the newest is never removed."""
    resume: str = "auto"
    """"auto": continue from the newest complete checkpoint in the run folder (a finished run is not
    resumed: it is archived and the run starts afresh); "off": always start afresh (an earlier run's
    records move to previous-<time>/); or the path of a checkpoint folder to continue from (raise
    trainer.steps to continue a finished run)."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Metrics destinations (engine/loggers.py): "jsonl" (runs/<run>/metrics.jsonl; always needed),
    "tensorboard" (runs/<run>/tensorboard/<stage>/), "wandb" (needs the wandb package; WANDB_MODE=offline
    works without a network). A logger other than jsonl that fails is reported once and disabled."""
    wandb_project: str = "pathorl"
    """wandb project name (the run name is trainer.run_name)."""
    log_rollouts: bool = True
    """Write each step's rollout records (msgpack) under <run>/rollouts/."""
    placement_timeout_s: float = 300.0
    """Longest wait for the Ray cluster to grant the rollout and learner placement groups; past it
    the run stops naming the resources it could not get (a cluster that lacks them altogether is
    refused at once)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        """Fails on values and field combinations that cannot work, naming the fields. Pure: the
        file system, the hardware and the cluster are checked by engine/preflight.py."""
        a, r = self.algorithm, self.rollout
        problems = _range_problems(self) + _choice_problems(self)
        if r.top_p != 1.0:
            problems.append(f"rollout.top_p={r.top_p}: only 1.0 is supported (vLLM's log-probs come from the "
                            "truncated distribution, the learner's from the full softmax: every ratio would be biased)")
        if r.tensor_parallel_size != 1:
            problems.append(f"rollout.tensor_parallel_size={r.tensor_parallel_size}: only 1 is supported (the weight "
                            "reload passes a tensor generator, which cannot reach tensor-parallel worker processes)")
        if self.data.max_prompt_tokens + r.max_new_tokens > self.model.max_model_len:
            problems.append(f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rollout.max_new_tokens "
                            f"({r.max_new_tokens}) > model.max_model_len ({self.model.max_model_len}): a long prompt "
                            "could not be generated to the full length")
        if a.clip_low < 0 or a.clip_high < 0:
            problems.append(f"algorithm.clip_low ({a.clip_low}) and algorithm.clip_high ({a.clip_high}) must be >= 0")
        if a.clip_high < a.clip_low:
            problems.append(f"algorithm.clip_high ({a.clip_high}) < algorithm.clip_low ({a.clip_low}): "
                            "clip-higher needs clip_high >= clip_low")
        if a.dual_clip is not None and a.dual_clip <= 1.0:
            problems.append(f"algorithm.dual_clip ({a.dual_clip}) must be > 1 or null")
        if a.advantage in ("grpo", "rloo") and r.group_size < 2:
            problems.append(f"algorithm.advantage={a.advantage!r} needs rollout.group_size >= 2, got {r.group_size}")
        if a.kl_loss_coef < 0 or a.kl_reward_coef < 0:
            problems.append("algorithm.kl_loss_coef and algorithm.kl_reward_coef must be >= 0")
        if self.model.reference is False and self.kl_on:
            problems.append(f"model.reference is false but a KL term is on (algorithm.kl_loss_coef={a.kl_loss_coef}, "
                            f"algorithm.kl_reward_coef={a.kl_reward_coef}): KL needs the reference model")
        problems += _lora_problems(self.model)
        if any(f.fn == "judge_vllm" for f in self.reward.functions) and not self.reward.judge_model:
            problems.append("reward.functions uses judge_vllm but reward.judge_model is not set (the judge to serve)")
        if a.overlong_buffer < 0 or a.overlong_buffer >= r.max_new_tokens:
            problems.append(f"algorithm.overlong_buffer ({a.overlong_buffer}) must be in [0, rollout.max_new_tokens "
                            f"= {r.max_new_tokens})")
        if a.overlong_factor < 0:
            problems.append(f"algorithm.overlong_factor ({a.overlong_factor}) must be >= 0: it is the penalty at the "
                            "length limit (a negative one would reward overlong responses)")
        if a.tis_cap is not None and a.tis_cap < 1.0:
            problems.append(f"algorithm.tis_cap ({a.tis_cap}) must be >= 1 or null")
        if r.max_staleness not in (0, 1):
            problems.append(f"rollout.max_staleness must be 0 (synchronous) or 1 (one-step-off), got {r.max_staleness}")
        elif r.max_staleness == 1 and a.tis_cap is None:
            problems.append("rollout.max_staleness=1 trains groups generated one update earlier: set algorithm.tis_cap "
                            "(e.g. 2.0, verl's rollout_is_threshold) to correct for the policy that generated them")
        if a.dynamic_sampling and a.filter_metric not in {f.name for f in self.reward.functions}:
            problems.append(f"algorithm.filter_metric={a.filter_metric!r} is not a reward component "
                            f"(reward.functions names: {[f.name for f in self.reward.functions]})")
        if self.data.val and self.trainer.eval_correct not in {f.name for f in self.reward.functions}:
            problems.append(f"trainer.eval_correct={self.trainer.eval_correct!r} is not a reward component "
                            f"(reward.functions names: {[f.name for f in self.reward.functions]}): evaluation "
                            "judges correctness by it")
        if a.max_sampling_rounds < 1:
            problems.append(f"algorithm.max_sampling_rounds must be >= 1, got {a.max_sampling_rounds}")
        if self.learner.mini_batches < 1 or self.learner.epochs < 1:
            problems.append("learner.mini_batches and learner.epochs must be >= 1")
        if self.sft.batch_size < self.learner.num_ranks:
            problems.append(f"sft.batch_size ({self.sft.batch_size}) < learner.num_ranks ({self.learner.num_ranks}): "
                            "every rank needs an example each SFT step")
        if r.prompts_per_step % self.learner.mini_batches:
            problems.append(f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of "
                            f"learner.mini_batches ({self.learner.mini_batches})")
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))

    @property
    def kl_on(self) -> bool:
        return self.algorithm.kl_loss_coef > 0 or self.algorithm.kl_reward_coef > 0

    @property
    def uses_reference(self) -> bool:
        """The frozen reference model is loaded only when some KL term is on (or model.reference)."""
        return self.kl_on if self.model.reference is None else self.model.reference


class ConfigError(ValueError):
    """A configuration that cannot be loaded or cannot work."""


def _choice_problems(cfg: Config) -> list[str]:
    """Enumerated fields outside their choices."""
    from engine.algorithms import ADVANTAGES, LOSS_AGGREGATIONS
    from engine.schedule import SCHEDULES
    from kernels.dispatch import BACKENDS
    from kernels.reference import KL_ESTIMATORS

    choices = {
        "algorithm.advantage": (cfg.algorithm.advantage, sorted(ADVANTAGES)),
        "algorithm.loss_agg": (cfg.algorithm.loss_agg, LOSS_AGGREGATIONS),
        "algorithm.kl_estimator": (cfg.algorithm.kl_estimator, sorted(KL_ESTIMATORS)),
        "learner.logprob_backend": (cfg.learner.logprob_backend, BACKENDS),
        "data.bad_rows": (cfg.data.bad_rows, ("skip", "fatal")),
        "reward.on_error": (cfg.reward.on_error, ("exclude", "fallback", "raise")),
        "rollout.weight_sync": (cfg.rollout.weight_sync, ("auto", "object_store", "broadcast")),
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16")),
        "learner.lr_schedule": (cfg.learner.lr_schedule, SCHEDULES),
        "sft.lr_schedule": (cfg.sft.lr_schedule, SCHEDULES),
    }
    return [f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
            for name, (value, allowed) in choices.items() if value not in allowed]


def _lora_problems(model: ModelConfig) -> list[str]:
    """model.lora on its own and with the reference it implies (the policy with adapters off)."""
    lora = model.lora
    if lora.rank is not None and lora.rank < 0:
        return [f"model.lora.rank must be >= 0 or null (0/null: no LoRA), got {lora.rank}"]
    if not lora.rank:
        return []
    problems = []
    if lora.alpha is not None and not (math.isfinite(lora.alpha) and lora.alpha > 0):
        problems.append(f"model.lora.alpha must be a finite number > 0 or null (2·rank), got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        problems.append("model.lora.target_modules is empty: name the layers to adapt")
    if model.reference_path:
        problems.append(f"model.reference_path ({model.reference_path}) cannot be used with model.lora: the KL "
                        "reference of a LoRA policy is its base weights (adapters off)")
    return problems


def _non_finite(node: Any, where: str) -> list[tuple[str, float]]:
    """(dotted name, value) of the NaN or infinite numbers anywhere in a config (no field means anything
    with them, and NaN passes every `<` check)."""
    if dataclasses.is_dataclass(node):
        return [p for f in dataclasses.fields(node) for p in _non_finite(getattr(node, f.name), f"{where}.{f.name}")]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(node, (list, tuple)):
        return [p for i, v in enumerate(node) for p in _non_finite(v, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, float) and not math.isfinite(node) else []


def _range_problems(cfg: Config) -> list[str]:
    """Numbers outside the range where they mean something."""
    problems = [f"{name.lstrip('.')} must be a finite number, got {value}" for name, value in _non_finite(cfg, "")]
    at_least = {  # field: (value, minimum)
        "trainer.steps": (cfg.trainer.steps, 0), "trainer.eval_every": (cfg.trainer.eval_every, 0),
        "trainer.save_every": (cfg.trainer.save_every, 0), "trainer.eval_max_rows": (cfg.trainer.eval_max_rows, 1),
        "trainer.keep_last": (cfg.trainer.keep_last, 0), "trainer.eval_n": (cfg.trainer.eval_n, 0),
        "sft.steps": (cfg.sft.steps, 0), "sft.batch_size": (cfg.sft.batch_size, 1),
        "sft.epochs": (cfg.sft.epochs, 1), "sft.warmup_steps": (cfg.sft.warmup_steps, 0),
        "sft.max_tokens_per_micro_batch": (cfg.sft.max_tokens_per_micro_batch, 0),
        "sft.max_length": (cfg.sft.max_length, 2), "sft.eval_every": (cfg.sft.eval_every, 0),
        "sft.val_max_rows": (cfg.sft.val_max_rows, 1), "sft.save_every": (cfg.sft.save_every, 0),
        "learner.warmup_steps": (cfg.learner.warmup_steps, 0),
        "learner.max_tokens_per_micro_batch": (cfg.learner.max_tokens_per_micro_batch, 0),
        "data.check_rows": (cfg.data.check_rows, 0),
        "rollout.num_workers": (cfg.rollout.num_workers, 1), "rollout.group_size": (cfg.rollout.group_size, 1),
        "rollout.prompts_per_step": (cfg.rollout.prompts_per_step, 1),
        "rollout.max_new_tokens": (cfg.rollout.max_new_tokens, 1), "rollout.cpu_threads": (cfg.rollout.cpu_threads, 0),
        "learner.num_ranks": (cfg.learner.num_ranks, 1), "learner.micro_batch_size": (cfg.learner.micro_batch_size, 1),
        "learner.torch_threads": (cfg.learner.torch_threads, 1), "learner.num_gpus": (cfg.learner.num_gpus, 0),
        "learner.grad_clip": (cfg.learner.grad_clip, 0), "learner.weight_decay": (cfg.learner.weight_decay, 0),
        "reward.num_workers": (cfg.reward.num_workers, 1), "reward.judge_num_cpus": (cfg.reward.judge_num_cpus, 0),
        "data.max_images_per_prompt": (cfg.data.max_images_per_prompt, 1),
        "data.max_prompt_tokens": (cfg.data.max_prompt_tokens, 1), "model.max_model_len": (cfg.model.max_model_len, 2),
        "rollout.num_cpus_per_worker": (cfg.rollout.num_cpus_per_worker, 0), "learner.num_cpus": (cfg.learner.num_cpus, 0),
    }
    problems += [f"{name} must be >= {low}, got {value}" for name, (value, low) in at_least.items() if value < low]
    positive = {
        "rollout.temperature": cfg.rollout.temperature, "learner.lr": cfg.learner.lr, "sft.lr": cfg.sft.lr,
        "reward.timeout_s": cfg.reward.timeout_s, "rollout.kv_cache_gib": cfg.rollout.kv_cache_gib,
        "rollout.weight_sync_bucket_mb": cfg.rollout.weight_sync_bucket_mb, "algorithm.adv_eps": cfg.algorithm.adv_eps,
        "trainer.placement_timeout_s": cfg.trainer.placement_timeout_s,
        "trainer.eval_temperature": cfg.trainer.eval_temperature,
    }
    problems += [f"{name} must be a finite number > 0, got {value}" for name, value in positive.items()
                 if not (math.isfinite(value) and value > 0)]
    # vLLM raises a temperature below 0.01 to 0.01 without a word (the learner would divide by the
    # configured one: every ratio biased) and refuses one above 2.
    for name, value in (("rollout.temperature", cfg.rollout.temperature),
                        ("trainer.eval_temperature", cfg.trainer.eval_temperature)):
        if value > 0 and not 0.01 <= value <= 2.0:
            problems.append(f"{name} must be in [0.01, 2] (what vLLM samples at), got {value}")
    for name, ratio in (("learner.min_lr_ratio", cfg.learner.min_lr_ratio), ("sft.min_lr_ratio", cfg.sft.min_lr_ratio)):
        if not 0 <= ratio <= 1:
            problems.append(f"{name} must be in [0, 1], got {ratio}")
    for tag, weight in cfg.sft.segment_weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < math.inf:
            problems.append(f"sft.segment_weights.{tag} must be a number >= 0, got {weight!r}")
    for section, resources in (("rollout", cfg.rollout.resources), ("learner", cfg.learner.resources)):
        for name, amount in resources.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 < amount < math.inf:
                problems.append(f"{section}.resources.{name} must be a number > 0, got {amount!r}")
            if name in ("CPU", "GPU", "memory"):
                problems.append(f"{section}.resources.{name}: CPUs and GPUs are set by their own fields")
    from engine.loggers import LOGGERS

    unknown = [name for name in cfg.trainer.loggers if name not in LOGGERS]
    if unknown or "jsonl" not in cfg.trainer.loggers:
        problems.append(f"trainer.loggers must include 'jsonl' and name only {', '.join(map(repr, LOGGERS))}; "
                        f"got {cfg.trainer.loggers}")
    if not 0 < cfg.rollout.gpu_memory_utilization <= 1:
        problems.append(f"rollout.gpu_memory_utilization must be in (0, 1], got {cfg.rollout.gpu_memory_utilization}")
    if len(cfg.learner.betas) != 2 or not all(0 <= b < 1 for b in cfg.learner.betas):
        problems.append(f"learner.betas must be two numbers in [0, 1), got {cfg.learner.betas}")
    for i, f in enumerate(cfg.reward.functions):
        if not f.name or not f.fn:
            problems.append(f"reward.functions[{i}]: name and fn are both required, got name={f.name!r} fn={f.fn!r}")
        if f.timeout_s is not None and not f.timeout_s > 0:
            problems.append(f"reward.functions[{i}].timeout_s must be > 0 or null, got {f.timeout_s}")
    names = [f.name for f in cfg.reward.functions]
    if len(set(names)) != len(names):
        problems.append(f"reward.functions: component names must be unique, got {names}")
    if not cfg.reward.functions:
        problems.append("reward.functions is empty: a run needs at least one reward")
    return problems


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads "1e-5" as a string; it is meant as a number
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}"
                          f" (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (true/false only): under PyYAML's YAML 1.1 rules `resume: off`
    or `trainer.resume=off` would reach a string field as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file's tree, merged over the file named by its `base:` key (a path relative to it)."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    with open(path) as f:
        tree = _load_yaml(f) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path to another config, got {base!r}")
    return _merge(_read_yaml(os.path.join(os.path.dirname(path), base), chain + (real,)), tree)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (None: all defaults) and `section.field=value` overrides, whose values
    are parsed as YAML (`x=3` is an int, `x=[1,2]` a list, `x=null` None). A file may start from
    another with `base: other.yaml`: its sections are merged over that file's, field by field."""
    tree = _read_yaml(path) if path is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        _set_dotted(tree, key.strip(), _load_yaml(raw))
    cfg = _build(Config, tree, "")
    if not cfg.trainer.run_name:
        cfg.trainer.run_name = os.path.splitext(os.path.basename(path))[0] if path else "default"
    cfg.validate()
    return cfg


ACTOR_PATHS = ("model.path", "model.reference_path", "learner.deepspeed_config", "trainer.output_dir",
               "reward.judge_model")


def absolute_paths(cfg: Config) -> None:
    """Makes the paths Ray actors open (models, the DeepSpeed config, the run folder they write
    checkpoints and exports into) absolute, resolved against the driver's working directory: an
    actor on another node, or in a cluster started from another folder, has another working
    directory. On a multi-node cluster these paths must be on storage every node shares."""
    for dotted in ACTOR_PATHS:
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, os.path.abspath(value))
    if cfg.trainer.resume not in ("auto", "off"):
        cfg.trainer.resume = os.path.abspath(cfg.trainer.resume)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
