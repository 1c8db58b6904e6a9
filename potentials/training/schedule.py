"""A training run's clock: its budget, its progress and the learning rate at that progress.

A run is bounded by wall-clock time (``TrainConfig.time_limit``, or ``DEFAULT_MINUTES`` when
neither a limit nor ``epochs`` is given), by ``epochs``, or by both (whichever ends first).
Its *progress* is the fraction of that bound used so far, and the learning rate is a function
of progress, so the same schedule (warm-up, then a decay to ``final_lr_fraction``) is fitted
to any budget on any machine. The time bound covers the whole command: what follows training
(refitting shifts, the force readout, evaluation, calibration) is estimated and kept back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from .config import TrainConfig

# warm-up ends after ``warmup_epochs`` or at this progress, whichever comes first
WARMUP_CAP = 0.1


def decay(config: TrainConfig, d: float) -> float:
  """Learning rate at decay fraction ``d`` in [0, 1] (0: end of warm-up, 1: end of run)."""
  peak, low = config.learning_rate, config.learning_rate * config.final_lr_fraction
  d = min(max(d, 0.0), 1.0)
  if config.schedule == "exponential":  # log-linear: equal time in every decade of lr
    return peak * (low / peak) ** d
  return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * d))


def learning_rate(config: TrainConfig, step: int, total_steps: int, warmup_steps: int) -> float:
  """The learning rate of an epoch-bounded run: linear warm-up over ``warmup_steps`` to
  ``config.learning_rate``, then :func:`decay` to ``learning_rate * final_lr_fraction`` at
  ``total_steps``."""
  if step < warmup_steps:
    return config.learning_rate * (step + 1) / warmup_steps
  return decay(config, (step - warmup_steps) / max(total_steps - warmup_steps, 1))


@dataclasses.dataclass
class Budget:
  """How far a run has got, in time and in steps.

  Attributes:
    seconds: the whole command's wall-clock budget (None: bounded by ``max_steps`` only).
    max_steps: optimisation steps allowed by ``epochs`` (None: no cap).
    clock: seconds since an arbitrary origin (``time.perf_counter``; a test's fake clock).
    origin: the clock reading at which the command's time was zero (earlier processes of a
      resumed run moved it back by the seconds they used).
    reserve: seconds kept back for what follows training (updated as costs are measured).
  """

  seconds: Optional[float]
  max_steps: Optional[int]
  clock: Callable[[], float]
  origin: float
  reserve: float = 0.0

  def used(self) -> float:
    """Seconds of the budget used so far."""
    return self.clock() - self.origin

  def progress(self, step: int) -> float:
    """The fraction in [0, 1] of the run done before ``step``: of the training time (the
    budget less the reserve) or of the steps, whichever is further along."""
    p = 0.0
    if self.max_steps is not None:
      p = step / max(self.max_steps, 1)
    if self.seconds is not None:
      p = max(p, self.used() / max(self.seconds - self.reserve, 1e-9))
    return min(p, 1.0)

  def exhausted(self, step: int) -> bool:
    """No time or steps left for another optimisation step."""
    return self.progress(step) >= 1.0


def budget_of(
  config: TrainConfig,
  steps_per_epoch: int,
  *,
  clock: Callable[[], float],
  started: float,
  spent: float,
  reserve: float,
) -> Budget:
  """The budget of a run that began at clock reading ``started`` after earlier processes
  used ``spent`` seconds of it."""
  minutes = config.budget_minutes
  return Budget(
    seconds=None if minutes is None else 60.0 * minutes,
    max_steps=None if config.epochs is None else config.epochs * steps_per_epoch,
    clock=clock,
    origin=started - spent,
    reserve=reserve,
  )


@dataclasses.dataclass
class Schedule:
  """The learning rate as a function of step and progress: linear warm-up over
  ``warmup_steps`` (ending early at ``WARMUP_CAP`` progress), then :func:`decay` over the
  rest of the run. ``warm_progress`` is the progress at which warm-up ended (None: not yet)."""

  config: TrainConfig
  warmup_steps: int
  warm_progress: Optional[float] = None

  def __call__(self, step: int, progress: float) -> float:
    if self.warm_progress is None:
      if step < self.warmup_steps and progress < WARMUP_CAP:
        return self.config.learning_rate * (step + 1) / self.warmup_steps
      self.warm_progress = progress
    w = self.warm_progress
    return decay(self.config, (progress - w) / max(1.0 - w, 1e-9))
