"""Which examples every optimizer step consumes, decided before training starts.

The order comes from the seed through its own generator (never the global RNG), and a global batch does not
depend on how it is split across processes. Three things rely on that:

* resume: a restarted run consumes exactly the batches the killed one would have;
* data parallelism: 1 process with accumulation 2 and 2 processes with accumulation 1 see the same global
  batches, so they give the same loss curve;
* TR-DPO: the examples of each window of tau steps are known in advance, so the reference pass scores
  exactly those, once (``reference_forwards_per_example`` = 1.00).

An epoch is a fresh permutation of the train split cut into global batches; an incomplete last batch is
dropped (its examples come first in some other epoch's permutation), so every step has the same size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrainingSchedule:
    example_ids: tuple[int, ...]  # train split ids, sorted
    global_batch_size: int  # per_device_train_batch_size x gradient_accumulation_steps x processes
    num_steps: int  # optimizer steps
    seed: int

    @classmethod
    def from_config(cls, config, example_ids, world: int) -> TrainingSchedule:
        global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
        ids = tuple(sorted(int(i) for i in example_ids))
        steps_per_epoch = len(ids) // global_batch
        if steps_per_epoch == 0:
            from pipeline.errors import ConfigError

            raise ConfigError(
                f"per_device_train_batch_size: the global batch ({global_batch}) is larger than "
                f"the train split ({len(ids)} examples)"
            )
        steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
        return cls(ids, global_batch, steps, config.seed if config.data_seed is None else config.data_seed)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.example_ids) // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return np.asarray(self.example_ids, dtype=np.int64)[rng.permutation(len(self.example_ids))]

    def step_ids(self, step: int) -> np.ndarray:
        """The global batch of optimizer step ``step`` (0-based)."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside the schedule's {self.num_steps} steps")
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def window_ids(self, start_step: int, stop_step: int) -> np.ndarray:
        """All examples consumed by steps [start_step, stop_step), with repeats if an example recurs."""
        return np.concatenate([self.step_ids(s) for s in range(start_step, min(stop_step, self.num_steps))])

    def micro_batches(
        self,
        step: int,
        rank: int,
        world: int,
        accumulation: int,
        pair_tokens: Callable[[np.ndarray], np.ndarray] | None = None,
        *,
        packed: bool = False,
    ) -> list[np.ndarray]:
        """This rank's micro-batches of a step, in accumulation order: micro-batch ``a`` of rank ``r`` is bin
        ``a * world + r`` of the global batch cut into ``world * accumulation`` bins, so every rank makes the same
        number of forwards (ZeRO-3 needs ranks in lockstep) and the bins do not depend on how they are spread.

        ``pair_tokens``: example ids -> each pair's tokens in the run's layout. Without it the bins are equal
        slices in schedule order. With it, padded rows (``packed`` false) get equal slices of the
        batch sorted by length, so a micro-batch pads to a length near its own; packed rows get bins balanced
        by tokens (longest pair first into the lightest bin), of unequal pair counts: the caller weights each
        micro-batch's mean loss by its pairs (:meth:`pair_weight`). The gradient is a sum over pairs, so
        neither changes it; a loss that is not a per-pair mean (BCO's running mean, AOT's sorting within a
        micro-batch) sees different micro-batches."""
        batch = self.step_ids(step)
        bins = world * accumulation
        lengths = None if pair_tokens is None else pair_tokens(batch)
        if lengths is None or not packed:
            if lengths is not None:
                batch = batch[np.lexsort((batch, lengths))]
            micro = self.global_batch_size // bins
            groups = [batch[b * micro : (b + 1) * micro] for b in range(bins)]
        else:
            load = np.zeros(bins, dtype=np.int64)
            members: list[list[int]] = [[] for _ in range(bins)]
            for i in np.lexsort((batch, -lengths)):
                lightest = int(np.argmin(load))  # the first of equals: deterministic on every rank
                members[lightest].append(int(i))
                load[lightest] += lengths[i]
            groups = [batch[np.sort(m)] for m in members]
        return [groups[a * world + rank] for a in range(accumulation)]

    def pair_weight(self, pairs: int, world: int, accumulation: int) -> float:
        """What a micro-batch of ``pairs`` multiplies its mean loss by so that DeepSpeed's mean over the
        ``world * accumulation`` micro-batches is the mean over the global batch's pairs (1.0 for equal bins)."""
        return pairs * world * accumulation / self.global_batch_size


@dataclass(frozen=True)
class Cadence:
    """Every how many optimizer steps a run logs, evaluates and saves (None: never), from TrainingArguments'
    strategies and steps, resolved once the run's length is known: a ``*_steps`` below 1 is that fraction of
    the steps (rounded up), as transformers does; ``epoch`` is the steps of one epoch."""

    logging: int | None
    eval: int | None
    save: int | None
    final_eval: bool  # evaluate after the last step (unless eval_strategy is "no")

    @classmethod
    def of(cls, config, schedule: TrainingSchedule) -> Cadence:
        def every(strategy: str | None, steps: int | float | None) -> int | None:
            if strategy == "no":
                return None
            if strategy == "epoch":
                return schedule.steps_per_epoch
            if steps is None:
                return None
            return math.ceil(steps * schedule.num_steps) if steps < 1 else int(steps)

        eval_steps = config.eval_steps
        if config.eval_strategy == "steps" and eval_steps is None:
            eval_steps = config.logging_steps  # transformers' default
        return cls(
            every(config.logging_strategy, config.logging_steps),
            every(config.eval_strategy, eval_steps),
            every(config.save_strategy, config.save_steps),
            config.eval_strategy != "no",
        )

    @staticmethod
    def due(every: int | None, step: int) -> bool:
        return every is not None and step % every == 0
