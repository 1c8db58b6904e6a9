"""Which explored frames to label: the most uncertain, kept apart from each other.

Neighbouring frames of one MD replica are nearly the same structure and share their
uncertainty, so picking the top k by uncertainty alone labels k copies of one event.
:func:`select` picks greedily by uncertainty times the distance (in a structural fingerprint)
to what is already picked or labelled, so a second frame from the same event scores near zero.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms

from plugin.neighbors import neighbor_pairs_from_atoms

_BINS = 24


def fingerprint(atoms: Atoms, species: Sequence[int], cutoff: float) -> np.ndarray:
  """A structure's fingerprint: per ordered element pair, the smoothed histogram of pair
  distances within ``cutoff`` per atom (invariant to rotation, translation and permutation),
  concatenated and scaled to unit length."""
  dst, src, shifts = neighbor_pairs_from_atoms(atoms, cutoff)
  pos = atoms.positions
  r = np.linalg.norm(pos[src] - pos[dst] + shifts @ atoms.cell[:], axis=1)
  index = {int(z): i for i, z in enumerate(species)}
  z = np.array([index[int(n)] for n in atoms.numbers])
  k = len(species)
  centres = np.linspace(0.5, cutoff, _BINS)
  width = centres[1] - centres[0]
  weights = np.exp(-0.5 * ((r[:, None] - centres[None]) / width) ** 2)  # (pairs, bins)
  hist = np.zeros((k * k, _BINS))
  np.add.at(hist, z[dst] * k + z[src], weights)
  v = (hist / max(len(atoms), 1)).ravel()
  return v / max(np.linalg.norm(v), 1e-12)


def select(
  scores: np.ndarray,
  fingerprints: np.ndarray,
  count: int,
  *,
  labelled: np.ndarray | None = None,
  threshold: float = 0.0,
) -> list[int]:
  """Indices of up to ``count`` candidates, most informative first.

  Args:
    scores: ``(n,)`` each candidate's calibrated force uncertainty (eV/Å).
    fingerprints: ``(n, d)`` unit-length fingerprints of the candidates.
    count: how many to pick.
    labelled: ``(m, d)`` fingerprints already labelled (a candidate near one counts less).
    threshold: candidates at or below it are not picked (they need no label).
  """
  scores = np.asarray(scores, np.float64)
  eligible = scores > threshold
  if not eligible.any() or count < 1:
    return []
  fps = np.asarray(fingerprints, np.float64)
  near = np.full(len(scores), np.inf)  # distance to the closest picked or labelled structure
  if labelled is not None and len(labelled):
    near = _closest(fps, np.asarray(labelled, np.float64))
  picked: list[int] = []
  for _ in range(min(count, int(eligible.sum()))):
    gain = np.where(eligible, scores * np.minimum(near, 1.0), -np.inf)
    gain[picked] = -np.inf
    best = int(np.argmax(gain))
    if not np.isfinite(gain[best]) or gain[best] <= 0:
      break
    picked.append(best)
    near = np.minimum(near, np.linalg.norm(fps - fps[best], axis=1))
  return picked


def _closest(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> np.ndarray:
  """Distance from each row of ``a`` to its nearest row of ``b`` (in chunks: bounded memory)."""
  out = np.empty(len(a))
  for i in range(0, len(a), chunk):
    d = np.linalg.norm(a[i : i + chunk, None] - b[None], axis=2)
    out[i : i + chunk] = d.min(axis=1)
  return out
