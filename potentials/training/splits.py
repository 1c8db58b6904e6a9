"""Train / validation / test splits: whole held-out trajectories (or contiguous time blocks),
stratified by kind of structure and temperature, beside a random-frame part."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from .batching import Frame
from .config import TrainConfig


def split_frames(
  frames: Union[int, Sequence[Frame]], config: TrainConfig
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Train / validation / test indices from a fixed seed (``config.split``; an int is a
  number of untagged frames and always splits at random)."""
  parts = split_parts(frames, config)
  return parts["train"], parts["valid"], parts["test"]


def split_parts(frames: Union[int, Sequence[Frame]], config: TrainConfig) -> Dict[str, np.ndarray]:
  """``{"train", "valid", "test", "test_random"}`` indices. With the trajectory split,
  ``test`` is whole held-out trajectories and ``test_random`` a random
  ``random_test_fraction`` of the training trajectories' frames, withheld from training: the
  figure a random split would report, beside the honest one. With the random split both
  test parts are the same frames."""
  if isinstance(frames, (int, np.integer)) or config.split == "random":
    n = frames if isinstance(frames, (int, np.integer)) else len(frames)
    train, valid, test = _random_split(int(n), config)
    return {"train": train, "valid": valid, "test": test, "test_random": test}
  train, valid, test = _trajectory_split(frames, config)
  rng = np.random.default_rng([config.seed, 1])
  pick = np.zeros(len(train), bool)
  pick[rng.permutation(len(train))[: int(round(config.random_test_fraction * len(train)))]] = True
  if pick.all():
    raise ValueError(f"{len(frames)} frames are too few for the requested split")
  return {"train": train[~pick], "valid": valid, "test": test, "test_random": train[pick]}


def _random_split(n: int, config: TrainConfig):
  perm = np.random.default_rng(config.seed).permutation(n)
  n_test = int(round(config.test_fraction * n))
  n_valid = int(round(config.valid_fraction * n))
  if n - n_test - n_valid < 1:
    raise ValueError(f"{n} frames are too few for the requested validation/test split")
  return perm[n_test + n_valid :], perm[n_test : n_test + n_valid], perm[:n_test]


def _strata(frames: Sequence[Frame]) -> List[List[List[int]]]:
  """Frame indices grouped into trajectories (in file order), and trajectories into strata:
  one per (config_type, temperature) with >= 3 trajectories, the rest of a config_type
  pooled. Untagged frames form one trajectory per config_type."""
  trajs: Dict[tuple, List[int]] = {}
  for i, f in enumerate(frames):
    key = (f.config_type, f.trajectory if f.trajectory is not None else f.config_type)
    trajs.setdefault(key, []).append(i)
  by_kind: Dict[Any, Dict[Any, List[List[int]]]] = {}
  for (kind, _), idx in trajs.items():
    by_kind.setdefault(kind, {}).setdefault(frames[idx[0]].temperature, []).append(idx)
  strata = []
  for temps in by_kind.values():
    pooled = []
    for group in temps.values():
      (strata.append(group) if len(group) >= 3 else pooled.extend(group))
    if pooled:
      strata.append(pooled)
  return strata


def _trajectory_split(frames: Sequence[Frame], config: TrainConfig):
  """Whole trajectories to test/valid/train per stratum; a stratum with fewer than 3
  trajectories is cut into contiguous time blocks instead (train first, test last)."""
  rng = np.random.default_rng(config.seed)
  out: Tuple[List[int], List[int], List[int]] = ([], [], [])
  for stratum in _strata(frames):
    if len(stratum) >= 3:
      order = rng.permutation(len(stratum))
      n_test = max(1, int(round(config.test_fraction * len(stratum))))
      n_valid = max(1, int(round(config.valid_fraction * len(stratum))))
      for rank, t in enumerate(order):
        part = 2 if rank < n_test else 1 if rank < n_test + n_valid else 0
        out[part].extend(stratum[t])
    else:
      for idx in stratum:
        n = len(idx)
        n_test = int(round(config.test_fraction * n))
        n_valid = int(round(config.valid_fraction * n))
        out[0].extend(idx[: n - n_test - n_valid])
        out[1].extend(idx[n - n_test - n_valid : n - n_test])
        out[2].extend(idx[n - n_test :])
  if not out[0]:
    raise ValueError(f"{len(frames)} frames are too few for the requested validation/test split")
  return tuple(np.asarray(sorted(o), np.int64) for o in out)


def split_summary(frames: Sequence[Frame], idx: np.ndarray) -> dict:
  """Which trajectories a split part holds (stored in model files; used by ``eqattn eval``)."""
  return {
    "frames": int(len(idx)),
    "trajectories": sorted(
      {str(frames[i].trajectory) for i in idx if frames[i].trajectory is not None}
    ),
  }
