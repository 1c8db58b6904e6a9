"""The one state object of a learning run, kept in ``OUT/state.json`` (written atomically).

The labels file is the truth about reference calls; the state records what was decided
around them (rounds, the frames waiting for labels, a training under way, the time used), so a
killed run continues where it was: ``eqattn learn ... --resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

FILE = "state.json"
VERSION = 1


@dataclasses.dataclass
class LearnState:
  """Attributes:
  fingerprint: :meth:`LearnOptions.fingerprint` of the run (a resume must match it).
  species: atomic numbers of the start structures (the model's species).
  rounds: one record per finished round (0: the seed labels), see :func:`plugin.learn.learn`.
  elapsed_s: seconds used by this run's earlier processes.
  isolated_atoms: each element's lone-atom energy from the reference (eV, keys as strings).
  current: the record of the round under way (None between rounds).
  pending: ``{"round": r}`` while the frames in ``pending.extxyz`` wait for labels.
  training: ``{"round": r, "config": {...}}`` while a training runs (its checkpoint resumes).
  stop_reason: why exploration ended ("converged", "labels", "time"); None while it goes on.
  final: the record of the last training on all labels, once done.
  """

  fingerprint: Dict[str, Any]
  species: List[int]
  rounds: List[dict] = dataclasses.field(default_factory=list)
  elapsed_s: float = 0.0
  isolated_atoms: Dict[str, float] = dataclasses.field(default_factory=dict)
  current: Optional[dict] = None
  pending: Optional[dict] = None
  training: Optional[dict] = None
  stop_reason: Optional[str] = None
  final: Optional[dict] = None

  def save(self, folder: Path) -> None:
    """Write ``folder/state.json`` atomically (a kill leaves the old or the new one)."""
    path = Path(folder) / FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
      fh.write(json.dumps({"version": VERSION, **dataclasses.asdict(self)}, indent=1))
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)

  @classmethod
  def load(cls, folder: Path) -> "LearnState":
    path = Path(folder) / FILE
    try:
      data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise ValueError(f"{path} cannot be read ({e}); start again in a new folder") from None
    if data.pop("version", None) != VERSION:
      raise ValueError(f"{path} was written by another eqattn version; start a new folder")
    return cls(**data)


def differences(saved: dict, now: dict) -> List[str]:
  """The options that differ between a saved fingerprint and this run's, as ``name: a -> b``."""
  now = json.loads(json.dumps(now))  # tuples as lists, as saved
  keys = sorted(set(saved) | set(now))
  return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
