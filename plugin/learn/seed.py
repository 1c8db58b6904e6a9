"""The first labels: rattled copies of the start structures.

Copies displaced by a ladder of amplitudes (from a tenth of ``rattle`` up to it) give the
first model the curvature around the start and some of the repulsive wall; periodic cells are
also strained a little (up to 2 %) so the stress has something to fit. A short MD with the
reference would add correlated frames at the price of many more reference calls; rattles
cost one call each and the exploration rounds reach the thermal region anyway.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
from ase import Atoms

_STRAIN = 0.02


def rattled(starts: Sequence[Atoms], count: int, rattle: float, seed: int) -> List[Atoms]:
  """``count`` copies of ``starts`` (taken in turn), displaced by Gaussian noise whose
  amplitude climbs from ``rattle / 10`` to ``rattle`` Å; periodic cells also strained."""
  rng = np.random.default_rng([seed, 17])
  amplitudes = np.geomspace(rattle / 10, rattle, count) if count > 1 else [rattle]
  out = []
  for i, amp in enumerate(amplitudes):
    a = starts[i % len(starts)].copy()
    a.calc = None
    if np.all(a.pbc):
      strain = np.eye(3) + rng.uniform(-_STRAIN, _STRAIN, (3, 3)) * (amp / rattle)
      a.set_cell(a.cell[:] @ (strain + strain.T) / 2, scale_atoms=True)
    a.positions = a.positions + rng.normal(0.0, amp, a.positions.shape)
    a.info = {"start": i % len(starts), "rattle": float(amp)}
    out.append(a)
  return out
