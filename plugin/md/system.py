"""ASE ``Atoms`` <-> the JAX-MD engine's frame, and the integrator state <-> ``atoms.info``.

Periodic systems use fractional coordinates (``space.periodic_general``); ASE cells that are not
lower triangular are rotated into ASE's standard form inside and rotated back on output.
Non-periodic systems (molecules, clusters) use ``space.free()``, shifted into the region of
JAX-MD's cell list. Mixed periodicity (slabs) is refused: JAX-MD's spaces are periodic along all
axes or none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import ase
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from plugin import thermo
from potentials import electrostatics, observables


@dataclasses.dataclass(frozen=True)
class System:
  """An ``Atoms`` in the engine's frame. Periodic: ``R`` fractional, ``box`` = lattice vectors
  as columns (upper triangular), ``Q`` rotates ASE's frame into it (``x_internal = x @ Q.T``).
  Free: ``R`` Cartesian, shifted by ``origin`` into the cell-list region ``box``."""

  numbers: np.ndarray  # (N,)
  masses: np.ndarray  # (N,) amu
  periodic: bool
  pbc: np.ndarray  # (3,) bool, as given
  R: np.ndarray  # (N, 3)
  momenta: Optional[np.ndarray]  # (N, 3), internal frame, or None when not set
  box: np.ndarray  # (3, 3)
  Q: np.ndarray  # (3, 3)
  origin: np.ndarray  # (3,)
  cell_in: np.ndarray  # (3, 3) the input cell (kept for non-periodic output)
  charge: float = 0.0  # total charge (e), atoms.info["charge"]: for learnt charges


def _checked(atoms: ase.Atoms):
  """``(pbc, positions, masses, momenta or None)`` of ``atoms``, or a clear error."""
  if not isinstance(atoms, ase.Atoms):
    raise TypeError(f"atoms must be an ase.Atoms, got {type(atoms).__name__}")
  if len(atoms) == 0:
    raise ValueError("atoms is empty: nothing to simulate")
  if atoms.constraints:
    raise ValueError(
      f"atoms has ASE constraints ({atoms.constraints}); JAX-MD's integrators "
      f"cannot apply them. Remove them (del atoms.constraints), or run ASE's "
      f"integrators with the eqattn ASE calculator."
    )
  pbc = np.asarray(atoms.pbc, bool)
  if pbc.any() and not pbc.all():
    raise ValueError(
      f"pbc={pbc.tolist()}: JAX-MD's spaces are periodic along all axes or none. "
      f"For a slab, make it fully periodic with enough vacuum along the "
      f"non-periodic axis (atoms.pbc = True; atoms.center(vacuum=..., axis=2))."
    )
  pos = atoms.get_positions()
  if not np.all(np.isfinite(pos)):
    i = int(np.argmax(~np.isfinite(pos).all(axis=1)))
    raise ValueError(f"positions of atom {i} are not finite: {pos[i]}")
  masses = atoms.get_masses().astype(np.float64)
  if np.any(masses <= 0):
    raise ValueError(f"all masses must be positive (amu); got {masses.min()}")
  p = atoms.get_momenta() if atoms.has("momenta") else None
  if p is not None and not np.any(p):
    p = None  # all zero: treated as "not set" (Maxwell-Boltzmann)
  if p is not None and not np.all(np.isfinite(p)):
    raise ValueError("atoms has non-finite momenta")
  return pbc, pos, masses, p


def from_atoms(
  atoms: ase.Atoms, cutoff: float, skin: float, reference: Optional[System] = None
) -> System:
  """Checks ``atoms`` and converts it to the engine's frame.

  ``reference`` (resume): keep its free-space origin and box, so a resumed run uses the same
  frame as the run it continues.
  """
  pbc, pos, masses, p = _checked(atoms)
  cell_in = atoms.cell.array.copy()
  if pbc.all():
    if abs(atoms.cell.volume) < 1e-9:
      raise ValueError(f"periodic atoms need a cell with non-zero volume, got\n{cell_in}")
    rcell, Q = atoms.cell.standard_form()
    if np.allclose(rcell.array, cell_in, rtol=0, atol=1e-12):
      rcell, Q = cell_in, np.eye(3)  # already lower triangular: no rotation at all
    else:
      rcell = rcell.array
    R = atoms.cell.scaled_positions(pos) % 1.0
    R = np.where(R >= 1.0, 0.0, R)  # % can round up to exactly 1.0
    return System(
      atoms.numbers.copy(),
      masses,
      True,
      pbc,
      R,
      None if p is None else p @ Q.T,
      np.asarray(rcell).T.copy(),
      Q,
      np.zeros(3),
      cell_in,
      _charge(atoms),
    )
  if reference is not None:
    origin, box = reference.origin, reference.box
  else:
    # JAX-MD's cell list bins positions in [0, box); atoms that leave it later are still
    # binned correctly (cell indices wrap), so this only needs to fit the start.
    margin = cutoff + skin
    origin = pos.min(axis=0) - margin
    box = np.diag(np.maximum(pos.max(axis=0) - origin + margin, 1.0))
  return System(
    atoms.numbers.copy(),
    masses,
    False,
    pbc,
    pos - origin,
    p,
    box,
    np.eye(3),
    origin,
    cell_in,
    _charge(atoms),
  )


def _charge(atoms: ase.Atoms) -> float:
  """``atoms.info["charge"]`` (default 0), a finite number or a clear error."""
  return electrostatics.checked_charge(atoms.info.get("charge", 0.0), "atoms.info['charge']")


def start_momenta(system: System, temperature: float, seed: int) -> np.ndarray:
  """The system's momenta, or (none set) :func:`plugin.thermo.maxwell_boltzmann` ones at
  ``temperature``, in the engine's frame. Open boundaries: without rigid rotation."""
  if system.momenta is not None:
    return system.momenta
  positions = None if system.periodic else system.R
  return thermo.maxwell_boltzmann(system.masses, temperature, seed, positions) @ system.Q.T


def to_atoms(
  system: System,
  R: np.ndarray,
  momenta: np.ndarray,
  forces: np.ndarray,
  energy: float,
  box: np.ndarray,
  info: Dict[str, Any],
  virial: Optional[np.ndarray] = None,
  charges: Optional[np.ndarray] = None,
) -> ase.Atoms:
  """Engine-frame arrays back to ASE ``Atoms`` (ASE's frame, Cartesian, float64); ``virial``
  (periodic, (3, 3) ``dU/d eps``) becomes the calculator's ``stress`` (ASE's convention),
  ``charges`` (a model with learnt charges) its ``charges``."""
  R, momenta, forces = (np.asarray(a, np.float64) for a in (R, momenta, forces))
  results = {} if charges is None else {"charges": np.asarray(charges, np.float64)}
  if system.periodic:
    cell = np.asarray(box, np.float64).T @ system.Q
    positions = R @ cell
    momenta, forces = momenta @ system.Q, forces @ system.Q
    if virial is not None:
      sigma = system.Q.T @ np.asarray(virial, np.float64) @ system.Q / abs(np.linalg.det(cell))
      results["stress"] = observables.voigt(sigma)
  else:
    cell = system.cell_in
    positions = R + system.origin
  atoms = ase.Atoms(
    numbers=system.numbers,
    positions=positions,
    cell=cell,
    pbc=system.pbc,
    masses=system.masses,
    momenta=momenta,
    info={**info, "charge": system.charge} if system.charge else dict(info),
  )
  atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces, **results)
  return atoms


# ------------------------------------------------------------------------------------------
# extended state (thermostats, barostat, random key) <-> atoms.info["md_state"]

PARTICLE_FIELDS = ("position", "momentum", "force", "mass")


def extended_state(state) -> Dict[str, np.ndarray]:
  """The integrator's variables besides positions, momenta, forces and masses, by key path."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in leaves
    if getattr(path[0], "name", None) not in PARTICLE_FIELDS
  }


def restore_extended(state, saved: Dict[str, Any]):
  """``state`` with its extended variables replaced by ``saved`` (from :func:`extended_state`);
  returns ``(state, ok)``; ``ok`` is False (and ``state`` unchanged) if they do not match."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  new = []
  for path, leaf in leaves:
    if getattr(path[0], "name", None) in PARTICLE_FIELDS:
      new.append(leaf)
      continue
    value = saved.get(jax.tree_util.keystr(path))
    if value is None or np.shape(value) != np.shape(leaf):
      return state, False
    new.append(jnp.asarray(np.asarray(value), dtype=jnp.asarray(leaf).dtype))
  return jax.tree_util.tree_unflatten(treedef, new), True
