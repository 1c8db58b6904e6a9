"""The model on one LAMMPS rank: energies, forces and virial from local + ghost rows.

LAMMPS gives each rank its own atoms (``nlocal`` rows) and copies of every atom within the
ghost cutoff of its subdomain (the ghost rows, Cartesian images with the periodic shifts
already applied). The pair style asks for a ghost cutoff of the model's receptive field
(``Potential.receptive_field``) plus LAMMPS' skin, so every atom that can change a local atom's
energy is a row. Then, with an open-boundary neighbour list among the rows,

* the rank's energy is the sum of its local atoms' energies (ghost rows are evaluated as
  neighbours, masked out of the sum, so every atom's energy is counted on exactly one rank);
* forces are ``-dE_rank/dR`` on every row: LAMMPS adds the ghost rows' forces to their owners
  (reverse communication), which sums ``-dE/dR`` over ranks;
* the virial is ``-dE_rank/dε`` (the strain derivative of :func:`potentials.observables.compute`,
  in LAMMPS' order ``xx yy zz xy xz yz``); LAMMPS sums it over ranks.

Along a periodic direction that LAMMPS does not divide among ranks (processor grid 1 there,
e.g. y and z with ``processors * 1 1``, or every direction on one rank) the ghosts are only
periodic images of the rank's own rows. There the rank keeps one row per atom and image along
the divided directions (local rows first), and the neighbour list is periodic along the
undivided directions, as the ASE calculator's is: exact, and the ghost shell along them is not
evaluated (on one rank only the local atoms are). Forces on the dropped rows are zero; their
atoms' forces reach the kept row through the periodic shifts.

Shapes are padded as in the ASE calculator (atom ladder, pair capacity buckets) and the jitted
function is the calculator's own, so a LAMMPS run compiles a few times at the start and rarely
after; ``compilations`` counts them. Per-element reference energies are added in float64 on
the host.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

import potentials
from potentials import elements
from plugin.ase import Calculator, _shared_evaluator, atom_capacity, device_params, resolve_dtype
from plugin.neighbors import NeighborListBuilder

__all__ = ["RankEvaluator", "keep_rows", "lammps_cell"]


def lammps_cell(box: Sequence[float]) -> np.ndarray:
  """Cell rows ``a, b, c`` of a LAMMPS box ``(xprd, yprd, zprd, xy, xz, yz)``."""
  lx, ly, lz, xy, xz, yz = (float(v) for v in box)
  return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


class RankEvaluator:
  """Evaluates ``potential`` for the rows LAMMPS holds on one rank.

  Args:
    potential: the model.
    type_elements: element symbol of each LAMMPS atom type (``pair_coeff * * Cu``), in type
      order.
    dtype: ``"float32"`` (default) or ``"float64"`` (needs JAX's x64 mode).
    min_distance: raise when two rows are closer than this (Å); 0 or None: no check.

  Attributes:
    cutoff: the interaction range LAMMPS must cover with ghosts (the receptive field).
    compilations: traces of the jitted function triggered by this evaluator.
    rows, local: rows evaluated and local atoms, summed over calls (``rows / local`` is the
      ghost overhead).
  """

  def __init__(
    self,
    potential: potentials.Potential,
    *,
    type_elements: Sequence[str],
    dtype: Any = "float32",
    min_distance: float | None = 0.1,
  ) -> None:
    self.potential = potential
    self.dtype = resolve_dtype(dtype)
    numbers = [elements.atomic_number(s) for s in type_elements]
    # LAMMPS types are 1-based; index 0 is never used
    self.type_species = np.concatenate([[0], potential.species_index(numbers)]).astype(np.int32)
    self.cutoff = potential.receptive_field
    self.min_distance = float(min_distance or 0.0)
    self.neighbors = NeighborListBuilder(potential.cutoff, shift_dtype=self.dtype)
    self.atom_capacity: int | None = None
    self.compilations = self.rows = self.local = 0
    self._params = device_params(potential, self.dtype)
    self._shifts = potential.element_shifts
    self._evaluator = _shared_evaluator(potential, self.dtype, uncertainty=False)

  def compute(
    self,
    x: np.ndarray,
    types: np.ndarray,
    tags: np.ndarray,
    nlocal: int,
    *,
    box: Sequence[float],
    periodicity: Sequence[int],
    procgrid: Sequence[int],
  ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(energy, rows, forces, virial, energies)`` of this rank: the local atoms' energy
    (eV), the indices of the evaluated rows and their forces (``(len(rows), 3)``), the virial
    ``-dE/dε`` (``xx yy zz xy xz yz``, eV) and the local atoms' energies. ``procgrid``: ranks
    along x, y, z (0 0 0: treat every direction as divided)."""
    cell = lammps_cell(box)
    pbc = np.asarray(periodicity, bool) & (np.asarray(procgrid) == 1)
    if pbc.all():  # one rank, fully periodic: every ghost is an image of a local atom
      rows = np.arange(nlocal)
    elif pbc.any():
      rows = keep_rows(x, tags, nlocal, cell, pbc)
    else:
      rows = np.arange(len(x))
    self.rows += len(rows)
    self.local += nlocal
    if len(rows) == 0:
      return 0.0, rows, np.zeros((0, 3)), np.zeros(6), np.zeros(0)
    cell = np.where(pbc[:, None], cell, 0.0)  # open directions need no cell vector
    species = self.type_species[types[rows]]
    positions = Calculator._reference_positions(x[rows], cell, pbc)
    n = len(rows)
    previous = self.atom_capacity
    na = self.atom_capacity = atom_capacity(n, previous)
    if previous is not None and na != previous:
      self.neighbors.reset_capacity()  # a new atom axis compiles anyway: refit the pairs too
    pairs = self.neighbors.build(positions, cell, pbc)
    dst, src = pairs.dst, pairs.src
    dst[pairs.num_pairs :] = na  # padding index: the padded atom count
    src[pairs.num_pairs :] = na
    pos = np.zeros((na, 3), self.dtype)
    pos[:n] = positions
    padded_species = np.zeros(na, np.int32)
    padded_species[:n] = species
    local = np.arange(na) < nlocal  # ghost rows are neighbours only: no energy of their own
    traces = self._evaluator.traces
    out = self._evaluator.fn(
      self._params, padded_species, pos, cell.astype(self.dtype), dst, src, pairs.shifts, local
    )
    self.compilations += self._evaluator.traces - traces
    e_model, forces, de, _, d2, closest, _ = jax.device_get(out)  # per-atom virials, spread
    if pairs.num_pairs and self.min_distance and d2 < self.min_distance**2:
      raise ValueError(
        f"atoms {int(tags[rows[pairs.dst[closest]]])} and {int(tags[rows[pairs.src[closest]]])} "
        f"are only {float(np.sqrt(d2)):.3g} Å apart, closer than min_distance = "
        f"{self.min_distance:g} Å; check the structure and time step, or give "
        "min_distance 0 in the pair_style line to skip this check"
      )
    energies = e_model[:nlocal].astype(np.float64) + self._shifts[species[:nlocal]]
    forces = forces[:n].astype(np.float64)
    energy = float(np.sum(energies))
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
      raise FloatingPointError(
        "the model returned a non-finite energy or forces; check the "
        "structure for atoms far outside the training data"
      )
    de = np.asarray(de, np.float64)
    virial = -np.array([de[0, 0], de[1, 1], de[2, 2], de[0, 1], de[0, 2], de[1, 2]])
    return energy, rows, forces, virial, energies


def keep_rows(
  x: np.ndarray, tags: np.ndarray, nlocal: int, cell: np.ndarray, periodic: np.ndarray
) -> np.ndarray:
  """Indices of one row per atom and image along the non-``periodic`` directions (the local
  row where there is one), in row order (local rows are the first ``nlocal``).

  Copies of one atom differ by whole lattice vectors, so their fractional coordinates differ
  by integers: relative to any one copy (the first row with that tag), the rounded
  differences along the other directions tell images apart; those along ``periodic`` ones
  are ignored (the periodic list makes the images).
  """
  if len(x) == 0:
    return np.zeros(0, np.int64)
  frac = x @ np.linalg.inv(cell)
  _, first, inverse = np.unique(tags, return_index=True, return_inverse=True)
  image = np.rint(frac - frac[first[inverse.ravel()]]).astype(np.int64)
  image[:, periodic] = 0
  base = 2 * int(np.abs(image).max()) + 1  # one integer key per (tag, image)
  key = tags.astype(np.int64)
  for d in range(3):
    key = key * base + image[:, d] + base // 2
  _, keep = np.unique(key, return_index=True)  # first occurrence: local rows win
  keep = np.sort(keep)
  if np.count_nonzero(keep < nlocal) != nlocal:
    raise ValueError("two local atoms share an atom ID; give every atom its own ID")
  return keep
