"""Supervised fine-tuning on the RL learner: one loop for the SFT stage (`launch/sft.py`: chain-of-
thought SFT, continued pre-training on captions) and the RL run's format warm-up.

    data (engine/sft_data.py) → sequences with loss weights → learner update (token-budget
    micro-batches, LR schedule of engine/schedule.py) → validation loss → checkpoint

Each step's loss is the negative log-likelihood of the target tokens averaged with their loss
weights over the whole step (all micro-batches and ranks: the normaliser is passed explicitly, so
the update does not depend on the split). The stage writes the same run folder as RL —
metrics.jsonl (stage "sft"), checkpoints/step_<N>/ with the full training state and an HF export —
and the final model to <run>/hf, which RL's model.path (or the next stage's) takes.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from engine import checkpoint
from engine.config import Config, SFTConfig, absolute_paths, to_dict
from engine.data import DataError
from engine.learner import Sequence
from engine.learner_group import LearnerGroup
from engine.loggers import RunLog
from engine.metrics import PhaseTimer, Progress
from engine.schedule import lr_at
from engine.sft_data import Conversation, Example, ExampleBuilder, normalise, read_records

log = logging.getLogger("pathorl.sft")


def to_sequences(examples: list[Example]) -> tuple[list[Sequence], list[Any]]:
    """Learner sequences: the tokens before the first target are the prompt, the rest (to the last
    target) the response with its loss weights; each example's images are one entry of `images`."""
    seqs, images = [], []
    for ex in examples:
        targets = [i for i, w in enumerate(ex.weights) if w > 0]
        first, last = max(targets[0], 1), targets[-1]  # token 0 has nothing to be predicted from
        image = -1
        if ex.pixel_values is not None:
            images.append((ex.pixel_values, ex.image_grid_thw))
            image = len(images) - 1
        seqs.append(Sequence(prompt_ids=ex.input_ids[:first], response_ids=ex.input_ids[first:last + 1], image=image,
                             loss_weights=ex.weights[first:last + 1], vision_in_response=True))
    return seqs, images


def load_conversations(path: str, cfg: Config) -> tuple[list[Conversation], list[str]]:
    """Every row of an SFT data file normalised; bad rows are skipped with their cause (or fatal
    with data.bad_rows=fatal)."""
    rows, skipped = [], []
    for where, raw in read_records(path):
        try:
            rows.append(normalise(raw, where, cfg.data.system_prompt, cfg.sft.caption_instruction))
        except DataError as e:
            if cfg.data.bad_rows == "fatal":
                raise
            log.warning("skipping bad row: %s", e)
            skipped.append(str(e))
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return rows, skipped


@dataclass
class ExampleStream:
    """Epoch-shuffled examples; a row that fails to build (image, length, tags) is skipped and never
    served again, or fatal."""

    rows: list[Conversation]
    builder: ExampleBuilder
    bad_rows: str = "skip"
    seed: int = 0
    skipped: list[str] = field(default_factory=list)
    epoch: int = 0
    _order: list[int] = field(default_factory=list)
    _pos: int = 0
    _bad: set[int] = field(default_factory=set)

    def take(self, k: int) -> list[Example]:
        out = []
        for _ in range(k + 2 * len(self.rows)):
            if len(out) == k:
                return out
            if self._pos >= len(self._order):
                if self._order:
                    self.epoch += 1
                self._order = list(range(len(self.rows)))
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)
                self._pos = 0
            i = self._order[self._pos]
            self._pos += 1
            if i in self._bad:
                continue
            try:
                out.append(self.builder.build(self.rows[i]))
            except DataError as e:
                if self.bad_rows == "fatal":
                    raise
                log.warning("skipping bad row: %s", e)
                self.skipped.append(str(e))
                self._bad.add(i)
        if not out:
            raise DataError("every SFT row is bad; nothing left to train on")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "order": list(self._order), "pos": self._pos, "bad": sorted(self._bad),
                "skipped": list(self.skipped), "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self.rows):
            raise checkpoint.CheckpointError(f"the checkpoint's SFT data has {state['num_rows']} rows, sft.train "
                                             f"has {len(self.rows)}: the training data changed")
        self.epoch, self._order, self._pos = state["epoch"], list(state["order"]), state["pos"]
        self._bad, self.skipped = set(state["bad"]), list(state["skipped"])


def validation_loss(learners: LearnerGroup, examples: list[Example]) -> dict[str, float]:
    """Weighted negative log-likelihood of the validation targets under the current policy."""
    seqs, images = to_sequences(examples)
    logps = learners.compute_logprobs(seqs, images, "old", temperature=1.0)
    total = sum(w * lp for s, row in zip(seqs, logps) for w, lp in zip(s.loss_weights, row))
    weight = sum(sum(s.loss_weights) for s in seqs)
    return {"sft/val_nll": -total / weight, "sft/val_examples": float(len(seqs))}


def train(learners: LearnerGroup, sft: SFTConfig, metrics: RunLog, total: int, batch: Callable[[], list[Example]],
          validate: Callable[[], dict[str, float]] | None = None,
          save: Callable[[int, dict[str, Any]], str] | None = None, start: int = 1,
          skipped: Callable[[], int] = lambda: 0) -> None:
    """Steps `start`…`total` of supervised training: `batch()` gives each step's examples,
    `validate()` runs every sft.eval_every steps and at the end, `save(step, record)` every
    sft.save_every steps and at the end; `skipped()` counts the bad rows so far (`data/skipped`)."""
    progress = Progress("sft", total, start)
    for k in range(start, total + 1):
        timer = PhaseTimer()
        with timer("data"):
            seqs, images = to_sequences(batch())
        lr = lr_at(k, total, sft.lr, sft.lr_schedule, sft.warmup_steps, sft.min_lr_ratio)
        with timer("update"):
            stats = learners.sft_update(seqs, images, lr, sft.max_tokens_per_micro_batch)
        record = {"stage": "sft", "step": k, "sft/lr": lr, "sft/examples": float(len(seqs)),
                  "sft/target_tokens": float(sum(sum(s.loss_weights) for s in seqs)),
                  "data/skipped": float(skipped()), **stats}
        if validate is not None and ((sft.eval_every and k % sft.eval_every == 0) or k == total):
            with timer("eval"):
                record.update(validate())
        if save is not None and ((sft.save_every and k % sft.save_every == 0) or k == total):
            with timer("checkpoint"):
                record["checkpoint"] = save(k, {**record, **timer.metrics()})
        record.update(timer.metrics())
        metrics.write(record)
        eta = progress.update(k, nll=stats.get("sft/nll", float("nan")))
        if k % 10 == 0 or k == total or k == start:
            log.info("sft %d/%d  nll %.3f%s  lr %.2e  %.1fs  eta %s", k, total, stats.get("sft/nll", float("nan")),
                     f"  val {record['sft/val_nll']:.3f}" if "sft/val_nll" in record else "", lr,
                     sum(timer.seconds.values()), eta)


class SFTStage:
    """The standalone SFT stage (launch/sft.py): its own run folder, checkpoints and resume."""

    def __init__(self, cfg: Config):
        from transformers import AutoProcessor

        absolute_paths(cfg)
        self.cfg = cfg
        processor = AutoProcessor.from_pretrained(cfg.model.path)
        base = os.path.dirname(os.path.abspath(cfg.sft.train))
        builder = ExampleBuilder(processor, base, cfg.sft.segment_weights, cfg.sft.max_length)
        rows, skipped = load_conversations(cfg.sft.train, cfg)
        self.stream = ExampleStream(rows, builder, cfg.data.bad_rows, cfg.trainer.seed, skipped=skipped)
        self.total = cfg.sft.steps or cfg.sft.epochs * -(-len(rows) // cfg.sft.batch_size)
        self.val: list[Example] = []
        if cfg.sft.val:
            val_rows, _ = load_conversations(cfg.sft.val, cfg)
            val_builder = ExampleBuilder(processor, os.path.dirname(os.path.abspath(cfg.sft.val)),
                                         cfg.sft.segment_weights, cfg.sft.max_length)
            for conv in val_rows[: cfg.sft.val_max_rows]:
                try:
                    self.val.append(val_builder.build(conv))
                except DataError as e:
                    if cfg.data.bad_rows == "fatal":
                        raise
                    log.warning("skipping bad validation row: %s", e)
        self.run_dir = os.path.join(cfg.trainer.output_dir, cfg.trainer.run_name)
        resume, state = checkpoint.open_run(self.run_dir, to_dict(cfg), cfg.trainer.resume, self.total, False, "sft")
        self.metrics = RunLog(self.run_dir, cfg.trainer.loggers, to_dict(cfg), cfg.trainer.wandb_project,
                              cfg.trainer.run_name)
        self.learners = LearnerGroup(cfg, use_reference=False)
        self.learners.wait_ready()
        self.start = 1
        if state is not None:
            self.learners.load_state(os.path.join(resume, "learner"))
            self.stream.load_state_dict(state["stream"])
            checkpoint.set_rng_state(state["rng"])
            self.start = state["step"] + 1
            log.info("resumed from %s: continuing at SFT step %d of %d", resume, self.start, self.total)

    def _save(self, step: int, record: dict[str, Any]) -> str:
        tmp = checkpoint.begin(self.run_dir, step)
        self.learners.save_state(os.path.join(tmp, "learner"))
        self.learners.save(os.path.join(tmp, "hf"))
        state = {"step": step, "stage": "sft", "finished": step == self.total, "config": to_dict(self.cfg),
                 "uses_reference": False, "stream": self.stream.state_dict(), "rng": checkpoint.rng_state(),
                 "ledger_lines": 0, "record": record}
        path = checkpoint.commit(tmp, state)
        for old in checkpoint.prune(self.run_dir, self.cfg.trainer.keep_last):
            log.info("removed checkpoint %s (trainer.keep_last=%d)", old, self.cfg.trainer.keep_last)
        return os.path.join(path, "hf")

    def fit(self) -> str:
        """Trains to the last step; returns the final model's folder (<run>/hf)."""
        train(self.learners, self.cfg.sft, self.metrics, self.total,
              lambda: self.stream.take(self.cfg.sft.batch_size),
              validate=(lambda: validation_loss(self.learners, self.val)) if self.val else None,
              save=self._save, start=self.start, skipped=lambda: len(self.stream.skipped))
        final = (checkpoint.export_final(self.run_dir, self.total) if self.total >= self.start
                 else self.learners.save(os.path.join(self.run_dir, "hf")))
        if self.stream.skipped:
            log.warning("%d SFT rows were skipped (first: %s)", len(self.stream.skipped), self.stream.skipped[0])
        return final

    def close(self) -> None:
        self.learners.shutdown()
        self.metrics.close()

