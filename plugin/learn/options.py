"""``LearnOptions``: every option of :func:`plugin.learn.learn` in one frozen, checked object.

Cheap to import (no JAX): the ``eqattn learn`` parser reads its defaults. What a resumed run
must share with the run it continues is :meth:`LearnOptions.fingerprint`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Tuple

# A per-atom force uncertainty (calibrated, eV/Å) under which a structure needs no label: a
# few times the force errors of the shipped models (5-25 meV/Å), so that a model that stops
# on it is already in MD's useful range, not in its final accuracy.
UNCERTAINTY_TARGET = 0.1


def default_workers() -> int:
  """Label workers: every core but one, which trains (at least one)."""
  return max(1, (os.cpu_count() or 2) - 1)


@dataclasses.dataclass(frozen=True)
class LearnOptions:
  """Options of an active-learning run (user units: K, minutes, eV/Å, fs, ps).

  Attributes:
    reference: the teacher, a spec of :func:`plugin.learn.reference.reference_from_spec`
      (``"gfn2"``, ``"gfn1"``, ``"emt"``, ``"module:callable"``).
    temperatures: the exploration ladder (K); the stopping rule reads the highest.
    time_limit: minutes for the whole run (labels, training, exploration, report).
    max_labels: reference calls at most (seed labels and failed calls included).
    uncertainty_target: calibrated per-atom force uncertainty (eV/Å); the run stops when a
      whole exploration round at the top temperature stays under it.
    workers: label worker processes (0: label in this process, no timeout).
    label_timeout: seconds per reference call; a call past it is killed and recorded.
    seed_labels: labels before the first model: rattled copies of the start structures and,
      with ``seed_md``, frames of MD with the reference (two thirds of them).
    seed_md: take seed labels from MD with the reference at the ladder's temperatures (in
      this process, one frame per 20 steps); None (default): when one reference call on the
      first start shows that MD fits 5 % of ``time_limit``.
    rattle: largest displacement amplitude of the seed copies (Å; a ladder up to it).
    rounds: exploration rounds planned (None: a quarter of ``time_limit`` in minutes, 3 to
      12); each gets an equal share of the exploration time and of the labels left, and the
      first model, trained from scratch, twice a share. Once a round has measured its fixed
      costs (MD, scoring, labels, next-round and test errors), only rounds whose training
      gets at least as long are kept; the rest of the time goes to the final training.
    per_round: at most this many labels selected per round (most uncertain, kept diverse).
    check_per_round: extra labels per round drawn uniformly from the exploration frames (an
      unbiased picture of MD's error, beside the selected frames' worst case).
    replicas: MD replicas per temperature and start structure.
    explore_ps: picoseconds of MD per replica and round.
    timestep: fs; None: 0.5 with hydrogen present, else 2.0.
    readout_heads: members of the shallow ensemble (force uncertainty read out).
    final_fraction: share of the time limit kept for the last training on all labels.
    seed: random seed (rattles, MD, model initialisation).
    model: other :class:`potentials.ModelConfig` fields (default: its defaults).
    train: other :class:`potentials.training.TrainConfig` fields for every training (its
      ``time_limit`` is set by the loop).
  """

  reference: str = "gfn2"
  temperatures: Tuple[float, ...] = (300.0, 600.0)
  time_limit: float = 60.0
  max_labels: int = 600
  uncertainty_target: float = UNCERTAINTY_TARGET
  workers: int = dataclasses.field(default_factory=default_workers)
  label_timeout: float = 600.0
  seed_labels: int = 24
  seed_md: Optional[bool] = None
  rattle: float = 0.15
  rounds: Optional[int] = None
  per_round: int = 100
  check_per_round: int = 8
  replicas: int = 4
  explore_ps: float = 1.0
  timestep: Optional[float] = None
  readout_heads: int = 4
  final_fraction: float = 0.3
  seed: int = 0
  model: dict = dataclasses.field(default_factory=dict)
  train: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    temps = tuple(float(t) for t in self.temperatures)
    object.__setattr__(self, "temperatures", temps)
    if not temps or not all(math.isfinite(t) and t > 0 for t in temps):
      raise ValueError(f"temperatures must be > 0 K, got {self.temperatures}")
    for name in ("time_limit", "uncertainty_target", "label_timeout", "rattle", "explore_ps"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for name in ("max_labels", "seed_labels", "per_round", "replicas", "readout_heads"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
    if self.readout_heads < 2:
      raise ValueError("readout_heads must be >= 2: the uncertainty is the heads' spread")
    if self.seed_md is not None and not isinstance(self.seed_md, bool):
      raise ValueError(f"seed_md must be True, False or None (by cost), got {self.seed_md!r}")
    if not isinstance(self.workers, int) or self.workers < 0:
      raise ValueError(f"workers must be an integer >= 0, got {self.workers!r}")
    if self.rounds is not None and (not isinstance(self.rounds, int) or self.rounds < 1):
      raise ValueError(f"rounds must be an integer >= 1 (or None), got {self.rounds!r}")
    if self.check_per_round < 0:
      raise ValueError(f"check_per_round must be >= 0, got {self.check_per_round}")
    if self.timestep is not None and not self.timestep > 0:
      raise ValueError(f"timestep must be > 0 fs, got {self.timestep}")
    if not 0 < self.final_fraction < 1:
      raise ValueError(f"final_fraction must be in (0, 1), got {self.final_fraction}")
    if self.seed_labels > self.max_labels:
      raise ValueError(f"seed_labels ({self.seed_labels}) exceed max_labels ({self.max_labels})")

  @property
  def planned_rounds(self) -> int:
    """Exploration rounds: ``rounds``, else one per 4 minutes of the limit, 3 to 12 (a round
    costs its compilations and a fine-tune; fewer, longer rounds train better)."""
    return self.rounds or int(min(12, max(3, self.time_limit // 4)))

  @property
  def top_temperature(self) -> float:
    return max(self.temperatures)

  def fingerprint(self) -> dict:
    """What a resumed run must share with the one it continues: the reference and what
    shapes the data. Budgets (time, labels, workers, timeout) may change on resume."""
    keep = ("reference", "temperatures", "rattle", "replicas", "timestep", "readout_heads")
    return {k: getattr(self, k) for k in keep} | {"seed": self.seed, "model": self.model}

  def timestep_for(self, numbers) -> float:
    """fs: the option, else 0.5 with hydrogen (its vibrations are fast), else 2.0."""
    if self.timestep is not None:
      return float(self.timestep)
    return 0.5 if 1 in set(int(z) for z in numbers) else 2.0
