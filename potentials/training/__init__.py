"""Fitting a :class:`potentials.Potential` to energies, forces and stresses.

Modules: :mod:`.config` (``TrainConfig``), :mod:`.batching` (``Frame``, padded batches),
:mod:`.splits` (held-out trajectories, random part), :mod:`.evaluation` (predictions, metrics,
element shifts), :mod:`.calibration` (ensembles' spread against their errors),
:mod:`.readout_fit` (a shallow ensemble's force readout), :mod:`.schedule` (budget,
progress, learning rate) and :mod:`.loop` (loss, ``train``, ``train_committee``). Every
public name is importable from ``potentials.training`` as before the split.
"""

from ..io import load_checkpoint, save_checkpoint
from .batching import Batch, Frame, batch_capacity, bucket, buckets, device_batch, make_batch
from .batching import kvector_capacity
from .batching import _device_batch  # noqa: F401  (old name of device_batch)
from .config import DEFAULT_MINUTES, LOSSES, MAX_SELECTION_FRAMES, OPTIMIZERS, SCHEDULES, SPLITS
from .config import TrainConfig
from .evaluation import (
  error_metrics,
  evaluate,
  fit_element_shifts,
  grouped_metrics,
  predict_energies,
  predict_fn,
  predictions,
  refit_shifts,
)
from .calibration import calibrate, spearman, spread_records, uncertainty_metrics
from .readout_fit import fit_force_readout, with_readout, without_readout
from .loop import TrainResult, loss_fn, train, train_committee
from .schedule import Budget, learning_rate
from .splits import split_frames, split_parts, split_summary

__all__ = [
  "Batch",
  "Frame",
  "batch_capacity",
  "bucket",
  "buckets",
  "device_batch",
  "make_batch",
  "kvector_capacity",
  "predictions",
  "DEFAULT_MINUTES",
  "LOSSES",
  "SCHEDULES",
  "Budget",
  "MAX_SELECTION_FRAMES",
  "OPTIMIZERS",
  "SPLITS",
  "TrainConfig",
  "error_metrics",
  "evaluate",
  "fit_element_shifts",
  "grouped_metrics",
  "predict_energies",
  "predict_fn",
  "refit_shifts",
  "TrainResult",
  "learning_rate",
  "loss_fn",
  "train",
  "train_committee",
  "calibrate",
  "spearman",
  "spread_records",
  "uncertainty_metrics",
  "fit_force_readout",
  "with_readout",
  "without_readout",
  "split_frames",
  "split_parts",
  "split_summary",
  "load_checkpoint",
  "save_checkpoint",
]
