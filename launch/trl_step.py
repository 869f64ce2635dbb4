"""Hugging Face TRL's `GRPOTrainer` on our model, data and settings: the TRL half of launch/bench_step.py.

TRL is not a dependency of pathorl. `make_trl_venv` makes a throwaway virtualenv that reuses this
environment's packages (torch, transformers, ...) and adds TRL; this script runs inside it:

    python -c "from launch.trl_step import make_trl_venv; print(make_trl_venv('/tmp/trl-venv'))"
    /tmp/trl-venv/bin/python launch/trl_step.py --steps 6 --json trl.json
    /tmp/trl-venv/bin/python launch/trl_step.py --config launch/configs/demo.yaml rollout.group_size=4

Settings come from the same config and dotted overrides as launch/rl.py (default: the demo's), mapped
onto `GRPOConfig` (https://huggingface.co/docs/trl/grpo_trainer, "Looking deeper into the GRPO
method" and "Loss Types"; parameters in GRPOConfig's docstring):

    rollout.group_size        num_generations
    rollout.prompts_per_step  generation_batch_size = prompts_per_step x group_size (one generation
                              per optimizer step, as ours)
    learner.micro_batch_size  per_device_train_batch_size: the largest divisor of the step's
                              completions not above it (TRL needs equal micro-batches; 15 x 4 for
                              the demo's 60, ours cuts 16+16+16+12); gradient_accumulation_steps
                              makes up the step. Each loss type below is split-invariant.
    rollout.max_new_tokens    max_completion_length
    rollout.temperature/top_p temperature / top_p (top_k=0: no top-k, as ours)
    algorithm.kl_loss_coef    beta, with TRL's only estimator, k3 ("Estimating the KL divergence")
    algorithm.loss_agg        loss_type: seq_mean_token_mean -> "grpo" (sample-level mean of token
                              means), token_mean -> "dapo", seq_mean_token_sum_norm -> "dr_grpo"
    algorithm.advantage       scale_rewards: grpo -> "group" (std-normalised), dr_grpo -> "none"
    algorithm.clip_low/high   epsilon / epsilon_high
    algorithm.mask_truncated  mask_truncated_completions
    learner.lr, betas, weight_decay, grad_clip
                              learning_rate, adam_beta1/2, weight_decay, max_grad_norm; constant
                              schedule (lr_scheduler_type="constant")
    model.dtype               model_init_kwargs dtype, bf16
    reward.functions          one TRL reward function scoring through our RewardRunner (the same
                              specs, worker processes, timeouts and on_error as a run)
    data.system_prompt        the system turn; the user turn is images then format_prompt(question,
                              options), rendered by the processor's own chat template, as
                              engine/data.py does (checked token for token before training)

Generation is transformers `generate` (use_vllm=False). Settings with no TRL counterpart (another
KL estimator, KL in the reward, dual clip, TIS, dynamic sampling, an entropy bonus, overlong
shaping, several mini-batches or epochs, a non-constant schedule) are refused rather than silently
dropped. The SFT warm-up (sft.*) is not run: compare against our RL steps with sft.steps=0.

Per step (a TrainerCallback; the step is timed from the previous step's end, so data loading and
logging count): step_s; prompt_s (chat template and image processing for generation); rollout_s
(`generate` over all completions) with generated_tokens and rollout_tokens_per_s; ref_logprob_s (the
reference model's pass); reward_s; update_s (step_s less generation, reference pass and scoring:
the policy's forward and backward over the micro-batches, the optimizer step, and the step's data
loading and logging, which are small); TRL's logged kl, reward, mean completion length and clipped
(truncated) ratio. `median` is over steps 2..N (step 1 pays one-off warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEMO_CONFIG = os.path.join(ROOT, "launch", "configs", "demo.yaml")
# Pinned because the timing hooks below override private GRPOTrainer methods; 1.16.0 is the newest
# release and accepts the transformers installed here (trl requires transformers>=4.56.2).
TRL_REQUIREMENT = "trl==1.16.0"
HOOKED = ("_tokenize_prompts", "_generate_single_turn", "_get_per_token_logps_and_entropies",
          "_calculate_rewards", "_generate_and_score_completions")
LOSS_TYPES = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "seq_mean_token_sum_norm": "dr_grpo"}
SCALE_REWARDS = {"grpo": "group", "dr_grpo": "none"}
LOGGED = ("kl", "reward", "completions/mean_length", "completions/clipped_ratio")


def make_trl_venv(path: str, requirement: str = TRL_REQUIREMENT) -> str:
    """Makes (afresh) a virtualenv at `path` that sees this interpreter's site-packages after its
    own and has TRL installed; returns its python. Reusing the site-packages avoids downloading a
    second torch; pip installs only what is missing (trl, accelerate, datasets, ...) into `path`
    and never touches this environment (pip does not uninstall outside the environment it runs in)."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", path], check=True)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir rather than a bare path line: it also runs the .pth files there (pathorl's editable
    # install), and appends, so the packages pip installs into the venv win.
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    with open(os.path.join(purelib, "zz_pathorl_site.pth"), "w") as f:
        f.write("\n".join(lines) + "\n")
    # --no-warn-conflicts: the reused packages' own pins (unrelated to TRL) would be reported as
    # conflicts of this venv.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
                    requirement], check=True)
    return python


def _abs(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEMO_CONFIG, help="run config, as for launch/rl.py (default: the demo's)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=4")
    p.add_argument("--model", default=None, help="Hugging Face Qwen2.5-VL folder (default: the config's model.path)")
    p.add_argument("--data", default=None, help="training rows (default: the config's data.train)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps to time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the config's learner.torch_threads)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def unsupported(cfg) -> list[str]:
    """The settings of `cfg` that GRPOTrainer cannot reproduce."""
    a, lc = cfg.algorithm, cfg.learner
    checks = [
        (a.kl_loss_coef > 0 and a.kl_estimator not in ("k3", "k3_unclamped"),
         f"algorithm.kl_estimator={a.kl_estimator!r} (TRL: k3 only; ours k3_unclamped is TRL's, k3 clamps at 10)"),
        (a.kl_reward_coef > 0, "algorithm.kl_reward_coef > 0 (TRL: KL in the loss only)"),
        (a.advantage not in SCALE_REWARDS, f"algorithm.advantage={a.advantage!r} (TRL: grpo or dr_grpo)"),
        (a.loss_agg not in LOSS_TYPES, f"algorithm.loss_agg={a.loss_agg!r}"),
        (a.dual_clip is not None, "algorithm.dual_clip"),
        (a.tis_cap is not None, "algorithm.tis_cap (TRL corrects only vLLM rollouts)"),
        (a.dynamic_sampling, "algorithm.dynamic_sampling"),
        (a.entropy_coef != 0, "algorithm.entropy_coef (TRL's bonus is normalised differently)"),
        (a.overlong_buffer > 0, "algorithm.overlong_buffer"),
        (a.skip_solved_epochs > 0, "algorithm.skip_solved_epochs"),
        (lc.mini_batches != 1 or lc.epochs != 1, "learner.mini_batches/epochs != 1"),
        (lc.lr_schedule != "constant" or lc.warmup_steps > 0, "learner.lr_schedule/warmup_steps (constant only)"),
    ]
    return [what for bad, what in checks if bad]


def trl_settings(cfg, steps: int, output_dir: str) -> dict:
    """GRPOConfig keyword arguments for `cfg` (the mapping in the module docstring)."""
    a, lc, ro = cfg.algorithm, cfg.learner, cfg.rollout
    completions = ro.prompts_per_step * ro.group_size
    micro = max(d for d in range(1, min(lc.micro_batch_size, completions) + 1) if completions % d == 0)
    return dict(
        output_dir=output_dir, max_steps=steps, seed=cfg.trainer.seed,
        num_generations=ro.group_size, per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro, max_completion_length=ro.max_new_tokens,
        temperature=ro.temperature, top_p=ro.top_p, top_k=0, use_vllm=False,
        beta=a.kl_loss_coef, loss_type=LOSS_TYPES[a.loss_agg], scale_rewards=SCALE_REWARDS[a.advantage],
        epsilon=a.clip_low, epsilon_high=a.clip_high, mask_truncated_completions=a.mask_truncated,
        learning_rate=lc.lr, lr_scheduler_type="constant", weight_decay=lc.weight_decay,
        adam_beta1=lc.betas[0], adam_beta2=lc.betas[1], max_grad_norm=lc.grad_clip,
        model_init_kwargs={"dtype": cfg.model.dtype}, bf16=cfg.model.dtype == "bfloat16",
        # GRPOConfig turns gradient checkpointing on by default; ours is off unless configured.
        gradient_checkpointing=lc.gradient_checkpointing,
        shuffle_dataset=cfg.data.shuffle, remove_unused_columns=False,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
    )


def trl_reward(rows: list[dict], runner, eos_ids: set[int]):
    """A TRL reward function scoring with our RewardRunner `runner` (weighted sum of its specs).

    TRL's reward signature (GRPO docs, "Using a custom reward function"): dataset columns arrive as
    keyword lists (`row_index` points into `rows`); conversational completions are
    [{"role": "assistant", "content": text}]; None marks an excluded sample, as in our runner."""
    from rewards import RewardInput

    def pathorl(prompts, completions, completion_ids, row_index, **_):
        inputs = [RewardInput.from_row(k, rows[i], c[0]["content"], ids, truncated=not ids or ids[-1] not in eos_ids)
                  for k, (i, c, ids) in enumerate(zip(row_index, completions, completion_ids))]
        return runner.score(inputs).scores

    return pathorl


def run(args: argparse.Namespace) -> dict:
    # Imported here, not at the top: make_trl_venv runs in the project environment, which has no TRL.
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from engine.config import load_config
    from engine.data import PromptBuilder, load_rows
    from rewards import RewardRunner, RewardSpec, format_prompt

    missing = [name for name in HOOKED if not hasattr(GRPOTrainer, name)]
    if missing:
        raise SystemExit(f"TRL {trl.__version__} lacks {missing}, which the timing hooks override; "
                         f"make the venv with {TRL_REQUIREMENT}")
    cfg = load_config(args.config, args.overrides)
    problems = unsupported(cfg)
    if problems:
        raise SystemExit("settings GRPOTrainer cannot reproduce: " + "; ".join(problems))
    model_path = _abs(args.model or cfg.model.path)
    rows, _ = load_rows(_abs(args.data or cfg.data.train), cfg.data.bad_rows)
    torch.set_num_threads(args.threads or cfg.learner.torch_threads)

    # The arguments GRPOTrainer loads its processor with when given none.
    processor = transformers.AutoProcessor.from_pretrained(model_path, padding_side="left", truncation_side="left")
    # Our prompt builder decodes the images, so TRL is given exactly the pixels our rollout is.
    built = [PromptBuilder(processor, cfg.data.system_prompt, cfg.data.max_prompt_tokens).build(row) for row in rows]
    # GRPO docs, "Vision-Language Model (VLM) Training / Dataset Format": a conversational `prompt`
    # and an `images` column of PIL images; TRL puts the images before the user text, as ours.
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "system", "content": cfg.data.system_prompt},
                    {"role": "user", "content": format_prompt(row["question"], row["options"])}],
         "images": prompt.images, "row_index": i}
        for i, (row, prompt) in enumerate(zip(rows, built))])
    eos = transformers.GenerationConfig.from_pretrained(model_path).eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    rewards = RewardRunner(
        [RewardSpec(f.name, f.fn, f.weight, dict(f.kwargs), timeout_s=f.timeout_s) for f in cfg.reward.functions],
        num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s, on_error=cfg.reward.on_error,
        fallback_score=cfg.reward.fallback_score)

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.phases: dict[str, float] = defaultdict(float)
            self._last = 0.0

        def on_train_begin(self, *_, **__):
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            p = self.phases
            step = {"step": state.global_step, "step_s": now - self._last, "prompt_s": p["prompt_s"],
                    "rollout_s": p["rollout_s"], "generated_tokens": int(p["generated_tokens"]),
                    "rollout_tokens_per_s": p["generated_tokens"] / p["rollout_s"] if p["rollout_s"] else 0.0,
                    "ref_logprob_s": p["ref_logprob_s"], "reward_s": p["reward_s"],
                    "update_s": now - self._last - p["generate_and_score_s"]}
            self.steps.append(step)
            self.phases.clear()
            self._last = now
            print(f"step {step['step']}: {step['step_s']:.1f} s (rollout {step['rollout_s']:.1f} s, "
                  f"{step['generated_tokens']} tokens, ref {step['ref_logprob_s']:.1f} s, "
                  f"update {step['update_s']:.1f} s)", file=sys.stderr, flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.steps and logs:
                self.steps[-1].update({k: logs[k] for k in LOGGED if k in logs})

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its rollout, reference pass and scoring timed into `recorder.phases`."""

        recorder: StepRecorder

        @contextlib.contextmanager
        def _timed(self, key: str):
            start = time.perf_counter()
            try:
                yield
            finally:
                self.recorder.phases[key] += time.perf_counter() - start

        def _tokenize_prompts(self, *a, **kw):
            with self._timed("prompt_s"):
                return super()._tokenize_prompts(*a, **kw)

        def _generate_single_turn(self, *a, **kw):
            with self._timed("rollout_s"):
                completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            self.recorder.phases["generated_tokens"] += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

        def _get_per_token_logps_and_entropies(self, model, *a, **kw):
            if model is not self.ref_model:
                return super()._get_per_token_logps_and_entropies(model, *a, **kw)
            with self._timed("ref_logprob_s"):
                return super()._get_per_token_logps_and_entropies(model, *a, **kw)

        def _calculate_rewards(self, *a, **kw):
            with self._timed("reward_s"):
                return super()._calculate_rewards(*a, **kw)

        def _generate_and_score_completions(self, *a, **kw):
            with self._timed("generate_and_score_s"):
                return super()._generate_and_score_completions(*a, **kw)

    recorder = StepRecorder()
    with tempfile.TemporaryDirectory(prefix="trl-step-") as out, rewards:
        settings = trl_settings(cfg, args.steps, out)
        trainer = TimedGRPOTrainer(model=model_path, reward_funcs=[trl_reward(rows, rewards, eos_ids)],
                                   args=GRPOConfig(**settings), train_dataset=dataset, processing_class=processor,
                                   callbacks=[recorder])
        trainer.recorder = recorder
        # The recorder reports each step; TRL's progress bar and log lines would repeat it.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        first = prepare_multimodal_messages(dataset[0]["prompt"], images=dataset[0]["images"])
        trl_ids, _, _ = trainer._tokenize_prompts([first])
        if list(trl_ids[0]) != built[0].prompt_ids:
            raise SystemExit(f"TRL's prompt tokens differ from engine/data.py's for row {rows[0]['id']!r}")
        recorder.phases.clear()
        trainer.train()

    timed = recorder.steps[1:] or recorder.steps
    keys = [k for k in recorder.steps[0] if k != "step"]
    median = {k: statistics.median(s[k] for s in timed if k in s) for k in keys if any(k in s for s in timed)}
    settings.pop("output_dir")
    return {"trl_version": trl.__version__, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "model": model_path, "config": args.config, "overrides": args.overrides, "trl_settings": settings,
            "steps": recorder.steps, "median_steps": [s["step"] for s in timed], "median": median}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Everything is local; without this, a hub lookup would wait for a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Libraries print warnings on stdout (DeepSpeed's accelerator notice); stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
