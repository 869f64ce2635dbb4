"""The driver loop. One RL step, top to bottom:

    rollout → reward → filter      streamed: groups are scored and filtered as each completes, and
                                   freed capacity is refilled with new prompts (dynamic sampling);
                                   one-step-off: the next step's prompts start generating here
    old/ref log-probs              learner passes, only when some KL or several updates need them,
                                   and π_old of groups that carry over to a later step
    advantages                     pure functions of the group rewards (engine/algorithms.py)
    update                         DeepSpeed learner ranks
    weight sync                    learner → every vLLM engine (after the prefetched groups are done)
    eval / checkpoint              when due (full training state: engine/checkpoint.py)

Each phase is timed (`timing/<phase>`), the step's metrics are appended to
runs/<run name>/metrics.jsonl and its groups' fates to ledger.jsonl (engine/ledger.py). A run with a
checkpoint in its folder continues from it (`trainer.resume`). Before step 1: the optional SFT
format warm-up (engine/sft.py's loop) and a step-0 evaluation; after the last step the final model
is exported to runs/<run name>/hf.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import ray
import torch

from engine import algorithms as A
from engine import checkpoint, ledger
from engine import sft as sft_stage
from engine.config import Config, absolute_paths, to_dict
from engine.data import DataError, PromptBuilder, PromptStream
from engine.evaluate import evaluate_prompts, flat_metrics, summarize
from engine.learner import Sequence
from engine.learner_group import LearnerGroup, split_mini_batches
from engine.loggers import RunLog
from engine.metrics import PhaseTimer, Progress, mean
from engine.plots import plot_runs
from engine.preflight import RunData, check_cluster, preflight
from engine.sampler import GroupSampler, ScoredGroup, StepRollout, start_pool
from engine.schedule import lr_at
from engine.sft_data import Example, ExampleBuilder, normalise
from rewards import RewardRunner, RewardSpec
from rewards.judge import start_judge_actor
from rollout.records import RolloutLog, to_record

log = logging.getLogger("pathorl.trainer")


class Trainer:
    def __init__(self, cfg: Config, data: RunData | None = None):
        """`data`: what `preflight(cfg)` returned (run here when None). Every check runs before the
        run folder is touched: an earlier run's records move aside only for a run that can start."""
        from transformers import AutoProcessor

        self.cfg = cfg
        data = data or preflight(cfg)
        check_cluster(cfg, ray.cluster_resources())
        absolute_paths(cfg)
        self.run_dir = os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name)
        self.ledger_path = os.path.join(self.run_dir, checkpoint.LEDGER)
        resume, state = checkpoint.open_run(self.run_dir, to_dict(cfg), cfg.trainer.resume, cfg.trainer.steps,
                                            cfg.uses_reference, "rl")
        self.metrics = RunLog(self.run_dir, cfg.trainer.loggers, to_dict(cfg), cfg.trainer.wandb_project,
                              cfg.trainer.run_name)
        self.processor = AutoProcessor.from_pretrained(cfg.model.path)
        self.tokenizer = self.processor.tokenizer
        self.builder = PromptBuilder.from_config(self.processor, cfg.data)
        self.stream = PromptStream(data.train, self.builder, cfg.data.bad_rows, cfg.trainer.seed, cfg.data.shuffle,
                                   cfg.algorithm.skip_solved_epochs, skipped=list(data.skipped))
        self.val_rows = data.val
        self.judge = None
        if cfg.reward.judge_model:
            # The judge_vllm reward runs in worker processes that join this cluster through RAY_ADDRESS.
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
            gpu = bool(cfg.learner.num_gpus)
            self.judge = start_judge_actor(
                cfg.reward.judge_model, num_cpus=cfg.reward.judge_num_cpus, num_gpus=1 if gpu else 0,
                env_vars=None if gpu else {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.rollout.kv_cache_gib)))},
                dtype=cfg.model.dtype, enforce_eager=cfg.rollout.enforce_eager)
        self.rewards = RewardRunner(
            [RewardSpec(f.name, f.fn, f.weight, dict(f.kwargs), timeout_s=f.timeout_s) for f in cfg.reward.functions],
            num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s, on_error=cfg.reward.on_error,
            fallback_score=cfg.reward.fallback_score)
        self.pool = start_pool(cfg, cfg.model.path)
        self.learners = LearnerGroup(cfg)
        self.pool.wait_ready()
        self.learners.wait_ready()
        self.sampler = GroupSampler(cfg, self.pool, self.stream, self.rewards, self.tokenizer)
        self.rollout_log = RolloutLog(os.path.join(self.run_dir, "rollouts")) if cfg.trainer.log_rollouts else None
        self.start_step = 1
        if state is not None:
            self._restore(resume, state)

    # ---- resume ----

    def _restore(self, path: str, state: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.learners.load_state(os.path.join(path, "learner"))
        self.stream.load_state_dict(state["stream"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.sync_weights()
        self.start_step = state["step"] + 1
        log.info("resumed from %s in %.1f s: continuing at step %d", path, time.perf_counter() - t0, self.start_step)

    def _save_checkpoint(self, step: int, record: dict[str, Any]) -> str:
        tmp = checkpoint.begin(self.run_dir, step)
        self.learners.save_state(os.path.join(tmp, "learner"))
        self.learners.save(os.path.join(tmp, "hf"))
        state = {"step": step, "stage": "rl", "finished": step == self.cfg.trainer.steps, "config": to_dict(self.cfg),
                 "uses_reference": self.cfg.uses_reference,
                 "stream": self.stream.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": checkpoint.rng_state(),
                 "ledger_lines": checkpoint.count_rows(self.ledger_path, step), "record": record}
        path = checkpoint.commit(tmp, state)
        for old in checkpoint.prune(self.run_dir, self.cfg.trainer.keep_last):
            log.info("removed checkpoint %s (trainer.keep_last=%d)", old, self.cfg.trainer.keep_last)
        return os.path.join(path, "hf")

    # ---- sequences, log-probs, advantages ----

    def _sequences(self, groups: list[ScoredGroup]) -> tuple[list[Sequence], list[Any], list[tuple[int, int]], list[float]]:
        """Sequences of the samples that have a reward, the images, (group, sample) per sequence, and
        each sequence's shaped reward. A carried-over group's sequences bring their generating
        policy's log-probs."""
        algo, r = self.cfg.algorithm, self.cfg.rollout
        seqs, images, origin, rewards = [], [], [], []
        for gi, g in enumerate(groups):
            image = -1
            if g.prompt.pixel_values is not None:
                images.append((g.prompt.pixel_values, g.prompt.image_grid_thw))
                image = len(images) - 1
            for si, (sample, score) in enumerate(zip(g.result.samples, g.scores)):
                if score is None or not sample.token_ids:
                    continue
                shaped = score
                if algo.overlong_buffer:
                    shaped += float(A.overlong_shaping(torch.tensor([len(sample.token_ids)]), r.max_new_tokens,
                                                       algo.overlong_buffer, algo.overlong_factor)[0])
                seqs.append(Sequence(prompt_ids=g.result.prompt_token_ids, response_ids=sample.token_ids, image=image,
                                     rollout_logprobs=sample.logprobs, old_logprobs=g.old_logprobs.get(si)))
                origin.append((gi, si))
                rewards.append(shaped)
        return seqs, images, origin, rewards

    def _advantages(self, seqs: list[Sequence], origin: list[tuple[int, int]], rewards: list[float]) -> dict:
        algo = self.cfg.algorithm
        r = torch.tensor(rewards, dtype=torch.float64)
        stats = {}
        if algo.kl_reward_coef > 0:
            seq_kl = torch.tensor([float(A.kl_estimate(torch.tensor(s.old_logprobs), torch.tensor(s.ref_logprobs),
                                                       algo.kl_estimator).sum()) for s in seqs], dtype=torch.float64)
            r = r - algo.kl_reward_coef * seq_kl
            stats["kl_reward/mean"] = float(seq_kl.mean())
        lengths = torch.tensor([len(s.response_ids) for s in seqs])
        adv = A.ADVANTAGES[algo.advantage](r, torch.tensor([g for g, _ in origin]), lengths, algo.adv_eps)
        for s, a in zip(seqs, adv.tolist()):
            s.advantage = a
        stats["advantage/mean"] = float(adv.mean())
        stats["advantage/abs_mean"] = float(adv.abs().mean())
        return stats

    def _keep_generating_policy(self, groups: list[ScoredGroup]) -> None:
        """Records π_old for groups that will be trained at a later step, while the learner still
        holds the weights that generated them (the update about to run would make them stale)."""
        pending = [g for g in groups if not g.old_logprobs]
        seqs, images, origin, _ = self._sequences(pending)
        if seqs:
            for (gi, si), lp in zip(origin, self.learners.compute_logprobs(seqs, images, "old")):
                pending[gi].old_logprobs[si] = lp

    # ---- the loop ----

    def sync_weights(self) -> float:
        self.learners.gather_weights()
        return self.pool.sync_weights(self.learners.weight_source)

    def fit(self) -> None:
        cfg = self.cfg
        if self.start_step == 1:
            self.sft_warmup()
            if cfg.trainer.eval_before_train:
                self.metrics.write({"stage": "rl", "step": 0, **self.evaluate()})
        progress = Progress("rl", cfg.trainer.steps, self.start_step)
        for step in range(self.start_step, cfg.trainer.steps + 1):
            timer = PhaseTimer()
            t_step = time.perf_counter()
            rollout = self.sampler.sample(timer, step)
            if cfg.rollout.max_staleness and step < cfg.trainer.steps:
                with timer("data"):
                    self.sampler.prefetch()  # generates on these weights while this step trains
            if self.rollout_log:
                with timer("log"):
                    self.rollout_log.write(step, self._records(step, rollout))

            seqs, images, origin, rewards = self._sequences(rollout.groups)
            train = [s for s, (g, i) in zip(seqs, origin)
                     if not (cfg.algorithm.mask_truncated and rollout.groups[g].result.samples[i].finish_reason == "length")]
            with timer("old_ref_logprobs"):
                if seqs and cfg.uses_reference:
                    for s, lp in zip(seqs, self.learners.compute_logprobs(seqs, images, "ref")):
                        s.ref_logprobs = lp
                fresh = [s for s in seqs if s.old_logprobs is None]
                if fresh and (cfg.algorithm.kl_reward_coef > 0 or cfg.learner.mini_batches > 1 or cfg.learner.epochs > 1):
                    for s, lp in zip(fresh, self.learners.compute_logprobs(fresh, images, "old")):
                        s.old_logprobs = lp
                self._keep_generating_policy(self.sampler.carry)
            with timer("advantages"):
                adv_stats = self._advantages(seqs, origin, rewards) if seqs else {}
            stats: dict[str, float] = {}
            mini_batches = self._mini_batches(step, train, origin, seqs)
            if mini_batches:
                lc = cfg.learner
                lr = lr_at(step, cfg.trainer.steps, lc.lr, lc.lr_schedule, lc.warmup_steps, lc.min_lr_ratio)
                with timer("update"):
                    stats = self.learners.update(mini_batches, images, lr)
                stats["learner/lr"] = lr
                stats["learner/mini_batches"] = float(len(mini_batches))
                stats["learner/sequences"] = float(len(train))
                self.sampler.stats.tokens_trained += sum(len(s.response_ids) for s in train)
            else:
                log.warning("step %d: only %d sequences to train on (learner.num_ranks=%d); update skipped", step,
                            len(train), self.learners.world_size)
            passed_over, self.stream.passed_over = self.stream.passed_over, []
            ledger.append(self.ledger_path, ledger.step_entries(step, rollout, passed_over, trained=bool(mini_batches)))
            if cfg.rollout.max_staleness:
                with timer("prefetch_wait"):
                    self.sampler.finish_prefetch()
            with timer("weight_sync"):
                self.sync_weights()
            record = {"stage": "rl", "step": step, **self._rollout_metrics(rollout), **adv_stats, **stats,
                      **_staleness(step, rollout.groups)}
            if (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0) or step == cfg.trainer.steps:
                with timer("eval"):
                    record.update(self.evaluate())
            if (cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or step == cfg.trainer.steps:
                with timer("checkpoint"):
                    record["checkpoint"] = self._save_checkpoint(step, {**record, **timer.metrics()})
            step_s = time.perf_counter() - t_step
            record.update(timer.metrics())
            record["timing/step"] = step_s
            record["throughput/tokens_per_s"] = record["response_length/total"] / step_s
            self.metrics.write(record)
            eta = progress.update(step, reward=record.get("reward/mean", float("nan")),
                                  tok_s=record["throughput/tokens_per_s"])
            log.info("step %d/%d  reward %.3f  acc %s  len %.1f  kl %s  %.1fs  %.0f tok/s  eta %s", step,
                     cfg.trainer.steps, record.get("reward/mean", float("nan")), _fmt(record.get("reward/accuracy")),
                     record.get("response_length/mean", float("nan")), _fmt(record.get("kl")), step_s,
                     record["throughput/tokens_per_s"], eta)
        # The final model at a fixed place, for the next stage's model.path and launch/eval.py: the
        # last step's checkpoint holds it already.
        final = (checkpoint.export_final(self.run_dir, cfg.trainer.steps) if cfg.trainer.steps >= self.start_step
                 else self.learners.save(os.path.join(self.run_dir, "hf")))
        log.info("final model: %s", final)
        try:
            plot_runs([self.run_dir], os.path.join(self.run_dir, "plots"))
        except Exception as e:  # a report, never worth failing a finished run for
            log.warning("plots of %s were not written (%s: %s)", self.run_dir, type(e).__name__, e)

    def _records(self, step: int, rollout: StepRollout) -> list[dict]:
        """The step's groups as msgpack records with the row, the rewards and the components."""
        records = []
        for prompt, result, scores, components in (
                [(g.prompt, g.result, g.scores, g.components) for g in rollout.seen]
                + [(p, r, [], {}) for p, r in rollout.failed]):
            rec = to_record(result)
            rec.update(step=step, row_id=prompt.uid, images=prompt.row["images"],
                       row={k: v for k, v in prompt.row.items() if not k.startswith("_")})
            for i, (sample, score) in enumerate(zip(rec["samples"], scores)):
                sample["reward"] = score
                sample["components"] = {name: values[i] for name, values in components.items()}
            records.append(rec)
        return records

    def _mini_batches(self, step: int, train: list[Sequence], origin, seqs) -> list[list[Sequence]]:
        """The step's sequences as PPO mini-batches along prompt groups (fewer than configured when
        the step is thin; none when it cannot feed every learner rank)."""
        group_of = {id(s): g for s, (g, _) in zip(seqs, origin)}
        split = split_mini_batches([group_of[id(s)] for s in train], self.cfg.learner.mini_batches,
                                   self.learners.world_size)
        if split and len(split) < self.cfg.learner.mini_batches:
            log.warning("step %d: %d sequences fill %d of learner.mini_batches=%d PPO mini-batches; training on "
                        "those", step, len(train), len(split), self.cfg.learner.mini_batches)
        return [[train[i] for i in idx] for idx in split]

    def _rollout_metrics(self, rollout: StepRollout) -> dict[str, float]:
        samples = [(s, sc) for g in rollout.seen for s, sc in zip(g.result.samples, g.scores)]
        lengths = [len(s.token_ids) for s, _ in samples]
        out = {
            "reward/mean": mean(sc for _, sc in samples if sc is not None),
            "reward/errors": float(rollout.reward_errors),
            "rollout/errors": float(len(rollout.generation_errors)),
            "rollout/groups": float(len(rollout.seen)),
            "response_length/mean": mean(lengths),
            "response_length/max": float(max(lengths, default=0)),
            "response_length/total": float(sum(lengths)),
            "response_length/truncated_frac": mean(s.finish_reason == "length" for s, _ in samples),
            "data/skipped": float(len(self.stream.skipped)),
            "data/epoch": float(self.stream.epoch),
        }
        for name in self.cfg.reward.functions:
            values = [v for g in rollout.seen for v in g.components.get(name.name, []) if v is not None]
            out[f"reward/{name.name}"] = mean(values)
        if self.cfg.rollout.max_staleness:
            out["async/prefetched_groups"] = float(rollout.prefetched)
        if self.cfg.algorithm.dynamic_sampling:
            out.update(self.sampler.metrics())
            out["dapo/train_groups"] = float(len(rollout.groups))
        return out

    # ---- SFT warm-up, evaluation ----

    def sft_warmup(self) -> None:
        """Supervised warm-up on format examples, through the SFT stage's loop: each sampled row is
        trained once with every one of its options as the answer, so it teaches the output format
        and, at its optimum, no preference among a row's options (one random option per row adds
        image-answer noise that RL must undo)."""
        sft = self.cfg.sft
        if sft.steps <= 0:
            return
        rng = random.Random(self.cfg.trainer.seed)
        choice = []  # positions of the multiple-choice rows, not the rows: those may hold image bytes
        for i in range(min(len(self.stream.rows), self.cfg.data.check_rows)):
            try:
                if self.stream.row_at(i)["options"]:
                    choice.append(i)
            except DataError:
                continue
        if not choice:
            raise ValueError("sft.steps > 0 needs multiple-choice rows (with options) in data.train")
        builder = ExampleBuilder(self.processor, "", sft.segment_weights, sft.max_length)

        def batch() -> list[Example]:
            out = []
            for i in rng.sample(choice, min(sft.batch_size, len(choice))):
                row = self.stream.row_at(i)
                for option in row["options"]:
                    response = sft.response_template.format(think=sft.think, answer=option)
                    fields = {"id": row["id"], "images": row["images"], "question": row["question"],
                              "options": row["options"], "response": response}
                    try:
                        out.append(builder.build(normalise(fields, row["_where"], self.cfg.data.system_prompt, "")))
                    except DataError as e:
                        log.warning("sft: skipping bad row: %s", e)
                        break
            return out

        sft_stage.train(self.learners, sft, self.metrics, sft.steps, batch)
        self.learners.start_rl_stage()
        self.sync_weights()

    def evaluate(self) -> dict[str, float]:
        """Greedy responses (and trainer.eval_n samples) on up to `eval_max_rows` validation rows: the
        metrics of engine/evaluate.py as eval/<metric> and eval/<data_source>/<metric>, and the
        greedy responses' mean reward as eval/reward/mean."""
        if not self.val_rows:
            return {}
        t = self.cfg.trainer
        prompts = []
        for row in self.val_rows[: t.eval_max_rows]:
            try:
                prompts.append(self.builder.build(row))
            except DataError as e:
                log.warning("eval: skipping bad row: %s", e)
        rows = evaluate_prompts(self.sampler, prompts, t.eval_n, t.eval_temperature, t.eval_correct,
                                t.eval_correct_threshold)
        record = flat_metrics(summarize(rows, t.eval_n))
        record["eval/reward/mean"] = mean(r.greedy_reward for r in rows if r.greedy_reward is not None)
        return record

    def close(self) -> None:
        if self.judge is not None:
            ray.kill(self.judge)
        self.rewards.close()
        self.pool.shutdown()
        self.learners.shutdown()
        self.metrics.close()


def _staleness(step: int, groups: list[ScoredGroup]) -> dict[str, float]:
    """Steps between generation and this update over the trained groups (0: on-policy)."""
    ages = [step - g.step for g in groups]
    return {"staleness/mean": mean(ages), "staleness/max": float(max(ages))} if ages else {}


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"
