"""Many structures at once: energies, forces and stresses for screening sets.

``plugin.ase.calculate_many(potential, structures)`` evaluates a list of ``ase.Atoms`` of any sizes
and cells in padded batches sorted into size buckets (:func:`potentials.training.buckets`), so
thousands of structures compile a handful of programs, and returns one dict of results per
structure, in ASE's units and conventions (those of :class:`plugin.ase.Calculator`, with which
it agrees to round-off).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
from ase import Atoms

import potentials
from potentials import observables, training

from .data import frame_from_atoms
from .defaults import DEFAULTS
from .host import resolve_dtype

PROPERTIES = ("energy", "free_energy", "forces", "stress")


def calculate_many(
  potential: potentials.Potential,
  structures: Sequence[Atoms],
  *,
  properties: Sequence[str] = ("energy", "forces", "stress"),
  dtype: Any = DEFAULTS.dtype,
  batch_size: int = 64,
  max_atoms: int = 4096,
) -> List[Dict[str, Any]]:
  """One dict per structure with the asked ``properties``: ``energy`` (eV), ``free_energy``
  (the same), ``forces`` ((N, 3) eV/Å), ``stress`` (Voigt, eV/Å³, ASE's sign; None for a
  structure that is not fully periodic).

  Batches hold up to ``batch_size`` structures and ``max_atoms`` atoms; ``dtype`` is the
  model's (``"float64"`` needs ``jax_enable_x64``).
  """
  unknown = set(properties) - set(PROPERTIES)
  if unknown:
    raise ValueError(f"unknown properties {sorted(unknown)}; choose from {PROPERTIES}")
  structures = list(structures)
  for i, atoms in enumerate(structures):
    if not isinstance(atoms, Atoms):
      raise TypeError(f"structure {i} is a {type(atoms).__name__}, not an ase.Atoms")
    pbc = np.asarray(atoms.pbc, bool)
    if pbc.all() and abs(atoms.cell.volume) < 1e-9:
      raise ValueError(f"structure {i} is periodic but its cell has no volume")
    potential.species_index(atoms.numbers)  # UnknownElementError names the element and the fix
  frames = [frame_from_atoms(a, potential.cutoff) for a in structures]
  results: List[Dict[str, Any]] = [{} for _ in structures]
  dtype = resolve_dtype(dtype)
  for b, idx, (e, f, s) in training.predictions(
    potential, frames, batch_size=batch_size, max_atoms=max_atoms, dtype=dtype
  ):
    for slot, i in enumerate(idx):
      out = results[i]
      if "energy" in properties or "free_energy" in properties:
        for name in ("energy", "free_energy"):
          if name in properties:
            out[name] = float(e[slot])
      if "forces" in properties:
        out["forces"] = f[b.atom_frame == slot]
      if "stress" in properties:
        periodic = bool(np.all(frames[i].pbc))
        out["stress"] = observables.voigt(s[slot]) if periodic else None
  return results
