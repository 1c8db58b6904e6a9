"""What every host-side evaluator shares (the ASE calculator, LAMMPS, batch evaluation and the
MD driver): the dtype rule, parameters on the device, the padding ladder of the atom axis,
the jitted model evaluation shared by calculators, positions moved into the cell, and the
checks of the model's output.

Shapes: ``positions (N, 3)`` Å, ``cell (3, 3)`` rows are lattice vectors, ``pbc (3,)`` bool.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import potentials
from potentials import electrostatics, ensemble, observables

from . import exported
from .neighbors import bucket_capacity
from .registry import COMPILED

__all__ = [
  "Evaluator",
  "atom_capacity",
  "check_finite",
  "device_params",
  "reference_positions",
  "resolve_dtype",
  "shared_evaluator",
]


def resolve_dtype(dtype: Any = None) -> np.dtype:
  """The dtype rule: ``"float32"``/``"float64"``/``np.float32``/``jnp.float64``... as a NumPy
  dtype; ``None`` is JAX's default float (float64 only under ``jax_enable_x64``).

  Raises ``ValueError`` for anything but float32 and float64, and for float64 when JAX's x64
  mode is off (library code never flips global JAX flags).
  """
  if dtype is None:
    return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)
  try:
    dt = np.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
  if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dt.name}")
  if dt == np.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
    raise ValueError(
      "dtype='float64' needs JAX's 64-bit mode, which is off. Enable it at the start of "
      "your program with jax.config.update('jax_enable_x64', True) (or set the "
      "environment variable JAX_ENABLE_X64=1), or use dtype='float32'."
    )
  return dt


def check_finite(energy: float, forces: np.ndarray) -> None:
  """Raises ``FloatingPointError`` when the model's energy or forces are not finite."""
  if not (math.isfinite(energy) and np.isfinite(forces).all()):
    raise FloatingPointError(
      "the model returned a non-finite energy or forces for this structure; check it "
      "for atoms far outside the training data (e.g. nearly overlapping atoms)"
    )


# Atom-axis ladder: multiples of 8, about 12.5 % apart. Padded atoms cost only per-atom work (no
# pairs), so a fine ladder wastes little while absorbing small changes in the atom count.
_ATOM_MINIMUM = 8
_ATOM_GROWTH = 1.125
# The atom capacity is refitted downwards only when less than this fraction is used.
_SHRINK_BELOW = 0.5


def device_params(potential: potentials.Potential, dtype: np.dtype) -> Any:
  """The parameters on the device, floating-point ones in ``dtype`` (once per calculator,
  so float64 runs are float64 end to end and no per-call conversion happens)."""
  return jax.tree_util.tree_map(
    lambda p: jnp.asarray(p, dtype) if jnp.issubdtype(p.dtype, jnp.floating) else jnp.asarray(p),
    potential.params,
  )


def atom_capacity(n: int, current: int | None) -> int:
  """Padded length of the atom axis for ``n`` atoms: ``current`` while ``n`` fits and uses at
  least half of it, so small changes in the atom count keep the compiled shape."""
  if current is None or n > current or n < _SHRINK_BELOW * current:
    return bucket_capacity(n, _ATOM_MINIMUM, _ATOM_GROWTH, 0.0)
  return current


class Evaluator:
  """The jitted model evaluation for one architecture and dtype, shared by calculators.

  ``fn(params, species, positions, cell, dst, src, shifts, atom_mask)`` (for a model with
  electrostatics ``charged[periodic]``, taking and giving more: :func:`_charged_evaluate`)
  returns the per-atom
  model energies (without element shifts), the forces, ``dE/dε`` (3, 3), its per-atom split
  (N, 3, 3), the squared distance and index of the closest pair, and for an ensemble its
  uncalibrated :class:`potentials.ensemble.Spread` (else None); a :class:`plugin.exported.
  ExportedJit`, so with eqattn's cache enabled a new process loads the traced program instead
  of tracing the model again. ``traces`` counts programs built, i.e. compilations.
  """

  def __init__(self, potential: potentials.Potential, dtype: np.dtype, uncertainty: bool) -> None:
    key = (potential.config, tuple(potential.species), np.dtype(dtype).name, uncertainty)
    self.fn, self.charged = None, {}
    if potential.config.electrostatics:  # one program for open systems, one for periodic
      for periodic in (False, True):
        fn = _charged_evaluate(potential, periodic)
        self.charged[periodic] = exported.ExportedJit(fn, "ase-evaluate-charged", key + (periodic,))
      return
    members = uncertainty and potential.num_members > 1
    readout = members and potential.config.force_heads  # member forces without backward passes
    if readout:
      pair_fn = ensemble.readout_mean(potential.member_forces_fn(include_shift=False))
    else:
      make = potential.member_energies_fn if members else potential.atomic_energies_from_pairs_fn
      pair_fn = make(include_shift=False)

    def evaluate(params, species, positions, cell, dst, src, shifts, atom_mask):
      energies = _of_pairs(pair_fn, params, species, dst, src, atom_mask)
      out = observables.compute(
        energies,
        positions,
        dst=dst,
        src=src,
        shifts=shifts,
        cell=cell,
        atom_strain=True,
        members=members and not readout and potential.config.committee,
        aux=readout,
      )
      spread = None
      if readout:
        member_e, deviations = out.aux
        spread = ensemble.readout_spread(jnp.sum(member_e, axis=0), deviations)
      elif members:  # padded atoms have zero forces in every member: no spread
        spread = ensemble.spread(out.member_energies, out.member_forces)
      return _results(out, dst, positions.shape[0], spread)

    self.fn = exported.ExportedJit(evaluate, "ase-evaluate", key)

  @property
  def traces(self) -> int:
    """Programs built so far (traced, or loaded traced from the cache), i.e. compilations."""
    if self.fn is None:
      return sum(f.builds for f in self.charged.values())
    return self.fn.builds


def _of_pairs(pair_fn, params, species, dst, src, atom_mask):
  """``r -> pair_fn(...)`` on the neighbour list's pairs (sorted by dst, padding last)."""
  return lambda r: pair_fn(
    params,
    species_index=species,
    r=r,
    dst=dst,
    src=src,
    atom_mask=atom_mask,
    indices_are_sorted=True,
  )


def _results(out: observables.Observables, dst, num_atoms: int, spread) -> tuple:
  """:class:`Evaluator`'s outputs, with the closest real pair (the host's overlap check)."""
  r = out.pair_vectors
  d2 = jnp.where(dst < num_atoms, jnp.sum(r * r, axis=-1), jnp.inf)
  closest = jnp.argmin(d2)
  return (
    out.energies,
    out.forces,
    out.strain_derivative,
    out.atom_strain_derivatives,
    d2[closest],
    closest,
    spread,
  )


def _charged_evaluate(potential: potentials.Potential, periodic: bool):
  """:class:`Evaluator`'s function for a model with electrostatics (one system, fully
  periodic or open): also takes ``total_charge`` (scalar, e), ``kvectors (K, 3)``,
  ``kmask (K,)`` and ``mesh`` (:func:`potentials.electrostatics.reciprocal_plan`) and also
  returns the charges ``(N,)``."""
  pair_fn = potential.energies_and_charges_from_pairs_fn(include_shift=False)
  config = potential.config

  def evaluate(
    params, species, positions, cell, dst, src, shifts, atom_mask, total, kvec, kmask, mesh
  ):
    energies = _of_pairs(pair_fn, params, species, dst, src, atom_mask)
    dtype = positions.dtype
    frames = electrostatics.one_system(atom_mask, total, periodic, kvec, kmask, dtype, mesh)
    long_range = electrostatics.model_long_range_fn(config, frames, dst, src, any_open=not periodic)
    out = observables.compute(
      energies,
      positions,
      dst=dst,
      src=src,
      shifts=shifts,
      cell=cell,
      atom_strain=True,
      long_range=long_range,
    )
    return _results(out, dst, positions.shape[0], None) + (out.charges,)

  return evaluate


def shared_evaluator(
  potential: potentials.Potential, dtype: np.dtype, uncertainty: bool = True
) -> Evaluator:
  """The evaluator of ``potential``'s architecture in ``dtype`` (:data:`plugin.registry.
  COMPILED`), keyed by what the compiled code depends on (not the parameters, which are
  arguments), so that many calculators for one model - or for retrained versions of it -
  compile only once per shape. ``uncertainty=False``: an ensemble's mean only (LAMMPS)."""
  key = (potential.config, tuple(potential.species), dtype.name, uncertainty)
  return COMPILED.get("evaluator", key, lambda: Evaluator(potential, dtype, uncertainty))


def reference_positions(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
  """Positions moved by lattice vectors into the cell (fully periodic) or centred on the
  origin (fully open), which keeps float32 pair vectors precise for atoms that drifted
  far. Neither move changes energy, forces or stress; the neighbour list is built from
  the moved positions, so its shifts stay consistent."""
  pos = np.asarray(positions, dtype=np.float64)
  if not np.isfinite(pos).all():
    return pos  # the neighbour list names the bad atom
  if pbc.all():
    det = np.linalg.det(cell) if np.isfinite(cell).all() else 0.0
    if abs(det) > 1e-6 * max(np.abs(cell).max(), 1e-300) ** 3:
      frac = pos @ np.linalg.inv(cell)
      return pos - np.floor(frac) @ cell
    return pos  # singular: the neighbour list raises the error
  if not pbc.any():
    return pos - pos.mean(axis=0)
  return pos


def pair_memory_bytes(config, num_pairs: int, dtype) -> int:
  """The largest buffer the model allocates for ``num_pairs`` pairs (bytes): per pair, the
  attention's tensor product holds ``features * (max_degree + 1)**4`` values per parity
  (measured: 7854 bytes per pair for the shipped copper model, 24 features, degree 2)."""
  parities = 2 if config.include_pseudotensors else 1
  per_pair = config.features * (config.max_degree + 1) ** 4 * parities
  return int(num_pairs) * per_pair * np.dtype(dtype).itemsize


def available_memory_bytes() -> int | None:
  """Memory the process may still allocate (``MemAvailable``; None where unknown)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def memory_shortfall(config, num_pairs: int, dtype) -> tuple[int, int] | None:
  """``(needed, available)`` bytes when ``num_pairs`` pairs need more memory than is
  available, else None (also where the available memory is unknown)."""
  need, have = pair_memory_bytes(config, num_pairs, dtype), available_memory_bytes()
  return None if have is None or need <= have else (need, have)


def memory_error(need: int, have: int, num_pairs: int, num_atoms: int, closest: float):
  """The ``MemoryError`` that refuses a structure before anything is allocated, with the
  figure and the likely cause (``closest``: the shortest pair, Å)."""
  return MemoryError(
    f"this structure needs about {need / 2**30:.1f} GiB for its {num_pairs} pairs "
    f"({num_pairs / max(num_atoms, 1):.0f} per atom; the closest {closest:.3g} Å apart), more "
    f"than the {have / 2**30:.1f} GiB available: a periodic cell much thinner than the cutoff "
    "or nearly overlapping atoms? Check the cell and positions; nothing was allocated"
  )


def closest_pair(positions: np.ndarray, cell: np.ndarray, dst, src, shifts, num_pairs: int):
  """``(distance Å, k)`` of the shortest of the first ``num_pairs`` pairs, on the host."""
  if num_pairs == 0:
    return np.inf, 0
  d, s = dst[:num_pairs], src[:num_pairs]
  r = positions[s] - positions[d] + np.asarray(shifts[:num_pairs], np.float64) @ cell
  d2 = np.einsum("ij,ij->i", r, r)
  k = int(np.argmin(d2))
  return float(np.sqrt(d2[k])), k


def overlap_message(numbers, i: int, j: int, across: bool, distance: float, limit: float) -> str:
  """The one wording of "two atoms too close" (``across``: through the periodic boundary)."""
  from potentials import elements

  zi, zj = elements.symbol(int(numbers[i])), elements.symbol(int(numbers[j]))
  if i == j:
    what = f"atom {i} ({zi}) and its own periodic image are"
  elif across:
    what = f"atoms {i} ({zi}) and {j} ({zj}) (across the periodic boundary) are"
  else:
    what = f"atoms {i} ({zi}) and {j} ({zj}) are"
  return (
    f"{what} only {distance:.3g} Å apart, closer than min_distance = {limit:g} Å; the model "
    "is not meant for overlapping atoms. Check the structure (duplicated atoms? wrong units "
    "or cell?)"
  )


def check_pair_memory(atoms, config, reach: float, dtype, headroom: float = 1.0) -> None:
  """``MemoryError`` (the figure and the closest pair) when the pairs within ``reach`` Å of
  ``atoms``, with ``headroom`` (a neighbour list's spare capacity), would need more memory
  than is available: found on the host, before anything is compiled or allocated."""
  from .neighbors import neighbor_pairs

  pbc = np.asarray(atoms.pbc, bool)
  cell = np.asarray(atoms.cell.array, np.float64)
  dst, src, shifts = neighbor_pairs(atoms.positions, cell if pbc.any() else None, pbc, reach)
  num_pairs = int(np.ceil(len(dst) * headroom))
  short = memory_shortfall(config, num_pairs, dtype)
  if short is not None:
    positions = np.asarray(atoms.positions, np.float64)
    distance, _ = closest_pair(positions, cell, dst, src, shifts, len(dst))
    raise memory_error(*short, num_pairs, len(atoms), distance)


def check_overlaps(atoms, limit: float) -> None:
  """Raises ``ValueError`` naming the closest two atoms of ``atoms`` if they are closer than
  ``limit`` Å (periodic images included); a host pair search within ``limit`` only."""
  from .neighbors import neighbor_pairs

  if not limit or len(atoms) == 0:
    return
  pbc = np.asarray(atoms.pbc, bool)
  cell = np.asarray(atoms.cell.array, np.float64)
  dst, src, shifts = neighbor_pairs(atoms.positions, cell if pbc.any() else None, pbc, limit)
  if len(dst) == 0:
    return
  distance, k = closest_pair(
    np.asarray(atoms.positions, np.float64), cell, dst, src, shifts, len(dst)
  )
  raise ValueError(
    overlap_message(
      atoms.numbers, int(dst[k]), int(src[k]), bool(np.any(shifts[k])), distance, limit
    )
  )
