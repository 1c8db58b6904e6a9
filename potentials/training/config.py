"""Training hyperparameters (:class:`TrainConfig`): one home for every training default."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Optional, Sequence

SPLITS = ("trajectory", "random")
MAX_SELECTION_FRAMES = 256  # validation frames read per epoch to pick the best weights
OPTIMIZERS = ("adam", "amsgrad")
LOSSES = ("mse", "huber")
SCHEDULES = ("exponential", "cosine")
# the budget of a run given neither ``time_limit`` nor ``epochs``: the cost of an epoch varies
# 1000-fold between datasets and machines, a wall-clock budget does not, and the schedule is
# fitted to whichever budget is given; 30 minutes on 2 CPU cores reach MACE-class accuracy on
# a small molecule (docs/benchmarks.md)
DEFAULT_MINUTES = 30.0
# frames per batch when ``batch_size`` is not given: as many as hold about this many
# neighbour pairs (a step's cost is proportional to its pairs), 1 to MAX_AUTO_BATCH frames.
# At equal epochs smaller batches trained better, down to a batch of ~1000-2600 pairs: on a
# Ni-Al alloy (32 atoms, ~1300 pairs a frame; 8-minute runs, two side by side, 16 epochs
# each) 43 meV/Å held out with 8 frames, 40 with 4, 34 with 2, and in a second pair (18
# epochs each) 31 with 1 frame and 31 with 2; ethanol (9 atoms, 72 pairs a frame) trained best
# at 8 frames (4 and 16 worse at equal time). benchmarks/recipe_check.py, docs/benchmarks.md.
# 720 keeps the 8 frames that the molecules of the tuning and checking sets (72 to 90 pairs)
# were measured with
PAIRS_PER_BATCH = 720
MAX_AUTO_BATCH = 8


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training hyperparameters (every field is stored in model files).

  Attributes:
    epochs: at most this many passes over the training set (None: no cap). With neither
      ``epochs`` nor ``time_limit``, the run has a budget of ``DEFAULT_MINUTES``.
    batch_size: frames per batch (batches are padded to a fixed atom and pair capacity);
      None: about ``PAIRS_PER_BATCH`` neighbour pairs a batch (:meth:`frames_per_batch`),
      resolved when training starts and stored as a number.
    learning_rate: peak learning rate; warm-up over ``warmup_epochs`` (at most a tenth of the
      run), then a decay (``schedule``) to ``learning_rate * final_lr_fraction`` at the end of
      the run: the time limit or the last epoch, whichever comes first.
    schedule: 'exponential' (log-linear: as much time at 1e-3 as at 1e-2, as the staged
      recipes of the shipped models) or 'cosine' (files written before the option).
    energy_weight, forces_weight, stress_weight: loss weights for (per-atom energy error)^2 in
      eV^2, (force component error)^2 in (eV/Å)^2 and (stress component error)^2 in
      (eV/Å^3)^2 (stress errors are multiplied by 100 first so all terms are O(1)).
    late_energy_weight: energy weight for the last ``late_fraction`` of training (None: no
      change); raising it late sharpens energies once forces have converged.
    valid_fraction, test_fraction: split of the frames (fixed ``seed``).
    split: 'trajectory' holds out whole trajectories (``Frame.trajectory``; contiguous time
      blocks where a kind of structure has too few), stratified by config_type and
      temperature: frames of one MD run are correlated, so a random split leaks. 'random'
      draws frames at random (for comparison with published random-split figures).
    random_test_fraction: with the trajectory split, this fraction of the training
      trajectories' frames is withheld at random and reported as ``test_random``: what a
      random split would claim, stored beside the held-out figure.
    clip_norm: global gradient-norm clipping.
    optimizer: 'amsgrad' or 'adam'.
    ema_decay: decay of the exponential moving average of the weights used for validation,
      the kept best model and the saved model (0: no averaging).
    loss: 'mse' or 'huber' (``huber_delta`` in the units of each weighted term's error).
    time_limit: wall-clock budget in minutes of the whole run (None: ``epochs``, else
      ``DEFAULT_MINUTES``): training, the force readout fit, evaluation and calibration; a
      committee shares it. The schedule follows the time used, training stops when only the
      (measured) cost of what follows is left, and the best weights are kept.
    nll_weight: with several readout heads (a shallow ensemble), the weight of the Gaussian
      negative log-likelihood of the per-atom energy error under the heads' spread (trains
      the spread; the mean is fitted by the other terms alone). Unused by single models.
    readout_minutes, readout_rattle: a shallow ensemble with ``force_heads`` gets its force
      readout fitted after training, for this many minutes, to its members' differentiated
      force deviations on the training frames and on copies displaced by ``readout_rattle``
      Å (:func:`~potentials.training.readout_fit.fit_force_readout`).
    seed: split, shuffling and initialisation.
  """

  epochs: Optional[int] = None
  batch_size: Optional[int] = None
  # lr 1e-2 (with the model defaults): the best at equal time on ethanol (training_ablation.py)
  # and, against batch 16 / lr 2e-3, 2.3x lower held-out force errors on a molecule and 4x on
  # an alloy nobody tuned for (benchmarks/recipe_check.py)
  learning_rate: float = 1e-2
  warmup_epochs: int = 2
  schedule: str = "exponential"
  # lr 1e-2 -> 2e-3: in 5-minute runs on ethanol 17.8 meV/Å held out against 20.1 for the
  # shipped recipe's span (-> 5e-4, its 145 minutes); benchmarks/accuracy.py --eqattn-args
  final_lr_fraction: float = 0.2
  # energy : forces 1 : 1, the shipped ethanol recipe's (1 : 10 trained worse there)
  energy_weight: float = 1.0
  forces_weight: float = 1.0
  # forces : stress 10 : 1, the shipped copper recipe's (10 : 1, then 20 : 1); at 1 : 1 the
  # stress term outweighed the forces five-fold on a Cu-Au alloy (66 meV/Å held out in 15 min)
  stress_weight: float = 0.1
  late_energy_weight: Optional[float] = None
  late_fraction: float = 0.2
  valid_fraction: float = 0.1
  test_fraction: float = 0.1
  split: str = "trajectory"
  random_test_fraction: float = 0.05
  clip_norm: float = 10.0
  optimizer: str = "amsgrad"  # trained better than adam at equal time (training_ablation.py)
  # the shipped recipes' later stages averaged the weights; from the start it costs nothing
  ema_decay: float = 0.99
  loss: str = "mse"
  huber_delta: float = 0.01
  time_limit: Optional[float] = None
  nll_weight: float = 1e-3
  readout_minutes: float = 2.0
  readout_rattle: float = 0.05
  seed: int = 0

  def __post_init__(self):
    for name, value, allowed in (
      ("split", self.split, SPLITS),
      ("optimizer", self.optimizer, OPTIMIZERS),
      ("loss", self.loss, LOSSES),
      ("schedule", self.schedule, SCHEDULES),
    ):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1 (or None: by pairs), got {self.batch_size}")
    if self.epochs is not None and self.epochs < 1:
      raise ValueError(f"epochs must be >= 1 (or None: bounded by time), got {self.epochs}")
    if self.time_limit is not None and self.time_limit <= 0:
      raise ValueError(f"time_limit must be > 0 minutes, got {self.time_limit}")
    if self.readout_minutes <= 0:
      raise ValueError(f"readout_minutes must be > 0, got {self.readout_minutes}")
    if not 0 <= self.late_fraction < 1:
      raise ValueError(f"late_fraction must be in [0, 1), got {self.late_fraction}")

  @property
  def budget_minutes(self) -> Optional[float]:
    """The wall-clock budget in minutes (None: bounded by ``epochs`` alone)."""
    if self.time_limit is None and self.epochs is None:
      return DEFAULT_MINUTES
    return self.time_limit

  def frames_per_batch(self, pairs_per_frame: Sequence[int]) -> int:
    """``batch_size``, or when it is None the frames that hold about ``PAIRS_PER_BATCH``
    pairs at the median frame's count (1 to ``MAX_AUTO_BATCH``)."""
    if self.batch_size is not None:
      return self.batch_size
    typical = max(statistics.median(pairs_per_frame), 1) if len(pairs_per_frame) else 1
    return int(min(MAX_AUTO_BATCH, max(1, round(PAIRS_PER_BATCH / typical))))

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    """From a stored config; files written before an option used the old behaviour (random
    split, adam, cosine decay, no averaging, forces weight 10, stress weight 1, 100 epochs)."""
    old = dict(split="random", optimizer="adam", schedule="cosine", final_lr_fraction=0.01)
    old.update(ema_decay=0.0, forces_weight=10.0, stress_weight=1.0, epochs=100)
    return cls(**{**old, **d})
