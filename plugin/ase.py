"""ASE calculator for eqattn potentials.

Usage::

    import potentials
    from plugin.ase import Calculator

    atoms.calc = Calculator(potentials.load("model.eqm"))       # float32 by default
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

It works with every ASE integrator, optimizer and cell filter (VelocityVerlet, Langevin,
NPTBerendsen, IsotropicMTKNPT, BFGS, FIRE, FrechetCellFilter, ...), for open, mixed and periodic
boundaries and orthorhombic or triclinic cells of any size (cells smaller than twice the cutoff
interact with their own periodic images exactly).

Properties and conventions (``docs/conventions.md``)
---------------------------------------------------
One call of one jitted function gives everything, so ASE never evaluates the model twice for
the same structure:

* ``energy`` = ``free_energy`` (eV): the sum of ``energies``, the per-atom energies (eV). The
  model's per-atom outputs are computed in ``dtype``; the per-element reference energies
  (``potential.element_shifts``, often ~1e3 eV per atom) are added and summed in float64 on the
  host, so float32 runs lose no precision to them.
* ``forces`` = ``-dE/dR`` (eV/Å).
* ``stress`` = ``(1/V) dE/dε`` (eV/Å³, Voigt ``xx yy zz yz xz xy``; ASE's sign: a compressed
  crystal has negative stress), where the symmetric strain ``ε`` deforms positions and cell
  together, ``R' = R (I + ε)``, ``cell' = cell (I + ε)``, at ``ε = 0``
  (:func:`potentials.observables.compute`). Only for fully periodic cells; asking for it
  otherwise raises ``PropertyNotImplementedError``.
* ``stresses`` (eV/Å³, ``(N, 6)``, same sign and Voigt order): per-atom stress ``W_i / V``, where
  ``W_i`` is atom ``i``'s share of ``dE/dε``: every pair's ``sym(r (x) dE/dr)`` is split half
  and half between its two atoms (``potentials.observables.atom_strain_derivatives``). So
  ``stresses.sum(0) == stress``, as in ASE's own classical calculators (``LennardJones``).
  Periodic cells only, like ``stress``.

Results are float64 NumPy arrays (what ASE's integrators expect) whatever ``dtype`` is.

Ensembles
---------
For an ensemble (``potential.num_members > 1``: a committee and/or readout heads,
:mod:`potentials.ensemble`) the properties above are the members' mean, and the same jitted
call also gives ``energy_uncertainty`` (eV), ``forces_uncertainty`` (``(N,)`` eV/Å: per atom,
the calibrated standard deviation of one force component over the members) and
``member_energies`` (``(members,)`` eV), e.g. ``calc.get_property("forces_uncertainty",
atoms)``. Every member's forces cost one backward pass each (batched in one program).

Compilations
------------
JAX compiles once per input shape. Pair arrays come from a `plugin.neighbors.NeighborListBuilder`,
whose capacity follows a fixed geometric ladder (with 10 % headroom) and only grows when the pair
count exceeds it; it is refitted only when the padded atom axis changes, which compiles anyway.
The atom axis is padded to a ladder of multiples of 8 about 12.5 % apart (padded atoms are masked
out and have no pairs) and kept while the atom count fits and fills at least half of it. So an
MD, relaxation or NPT run compiles once, plus once per pair-capacity growth (rare after the first
steps), and adding or removing a few atoms, or changing species, usually does not recompile.

The jitted function is shared by all calculators for the same architecture (config and species
list) and dtype - parameters are arguments - so creating many calculators, or swapping in a
retrained model, compiles nothing new for shapes already seen. ``Calculator.num_compilations``
counts the compilations triggered by this calculator's own calls: the shared function increments
a counter in its Python body, which runs only when JAX traces it, i.e. exactly once per new input
signature, each of which is then compiled by XLA.

Bad input
---------
Errors are raised as ``ValueError`` with the reason and the fix: elements the model does not
know (``potentials.UnknownElementError``, naming them and the model's species), NaN/inf
positions, zero-length or singular periodic cells (from the neighbour list) and two atoms closer
than ``min_distance`` (named, with their distance); a non-finite model output raises
``FloatingPointError``. Nothing is stored after an error. An empty
``Atoms`` has energy 0, empty forces and per-atom energies, and zero stress; a lone atom or an
atom without neighbours gets its element's reference energy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

import potentials
from potentials import deprecation, electrostatics, observables
from plugin.defaults import DEFAULTS

from . import host
from .host import atom_capacity, device_params, resolve_dtype
from .neighbors import NeighborListBuilder, bucket_capacity

__all__ = ["Calculator", "resolve_dtype", "atom_capacity", "device_params"]

_voigt = observables.voigt  # one home: potentials.observables
# what an ensemble's calculator adds (module docstring)
UNCERTAINTY = ("energy_uncertainty", "forces_uncertainty", "member_energies")


class Calculator(_AseCalculator):
  """ASE calculator for an eqattn :class:`potentials.Potential`.

  Args:
      potential: the model (``potentials.load(path)`` or ``potentials.Potential.create``).
      dtype: floating-point type of the model evaluation, ``"float32"`` (default, fastest) or
          ``"float64"`` (requires ``jax.config.update("jax_enable_x64", True)``).
      min_distance: raise ``ValueError`` when two atoms (or an atom and a periodic image) are
          closer than this (Å); the model is not meant for overlapping atoms. ``None`` or 0
          disables the check.
      **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (``atoms``,
          ``label``, ``directory``, ...).

  Attributes:
      potential, dtype, min_distance: as given (``dtype`` as a NumPy dtype).
      num_compilations: XLA compilations of the (shared) energy function that this
          calculator's calls triggered (see the module docstring).
      neighbors: the `NeighborListBuilder` (its ``capacity`` is the current pair capacity).
      atom_capacity: current length of the padded atom axis (``None`` before the first call).
  """

  implemented_properties = ["energy", "free_energy", "forces", "stress", "stresses", "energies"]

  def __init__(
    self,
    potential: potentials.Potential,
    *,
    dtype: Any = DEFAULTS.dtype,
    min_distance: float | None = DEFAULTS.min_distance,
    **kwargs: Any,
  ) -> None:
    if not isinstance(potential, potentials.Potential):
      raise TypeError(
        f"potential must be a potentials.Potential, got {type(potential).__name__}; "
        "load one with potentials.load(path)"
      )
    self.potential = potential
    self.dtype = resolve_dtype(dtype)
    if min_distance is not None and not (math.isfinite(min_distance) and min_distance >= 0):
      raise ValueError(f"min_distance must be a finite number >= 0 Å, got {min_distance!r}")
    self.min_distance = float(min_distance or 0.0)
    self.neighbors = NeighborListBuilder(potential.cutoff, shift_dtype=self.dtype)
    self.atom_capacity: int | None = None
    self._compilations = 0
    # Parameters live on the device once, in the evaluation dtype, so that float64 runs are
    # float64 end to end and no per-call conversion happens.
    self._params = device_params(potential, self.dtype)
    self._shifts = potential.element_shifts  # float64, added on the host
    self._evaluator = host.shared_evaluator(potential, self.dtype)
    self._fits: int | None = None  # the pair capacity last found to fit in memory
    if potential.num_members > 1:
      self.implemented_properties = type(self).implemented_properties + list(UNCERTAINTY)
    if potential.config.electrostatics:
      self.implemented_properties = type(self).implemented_properties + ["charges"]
    self._kvector_capacity = 0
    self._mesh = None  # PME grid moduli once a cell needed one
    # per-structure cache: species and mask on the device, rebuilt when numbers change
    self._numbers: np.ndarray | None = None
    self._species_host: np.ndarray | None = None
    self._species_dev: jax.Array | None = None
    self._mask_dev: jax.Array | None = None
    super().__init__(**kwargs)

  # ------------------------------------------------------------------ public helpers
  @property
  def num_compilations(self) -> int:
    """How many times the energy function was traced and compiled (one per input shape)."""
    return self._compilations

  def __repr__(self) -> str:
    return (
      f"Calculator(species={list(self.potential.symbols)}, cutoff={self.potential.cutoff}, "
      f"dtype={self.dtype.name}, num_compilations={self.num_compilations})"
    )

  # ------------------------------------------------------------------ ASE interface
  def calculate(
    self,
    atoms: Atoms | None = None,
    properties: Sequence[str] | None = None,
    system_changes: Sequence[str] = all_changes,
  ) -> None:
    """Compute energy, free_energy, energies, forces and (periodic cells) stress and stresses
    at once."""
    if properties is None:
      properties = ["energy"]
    super().calculate(atoms, properties, system_changes)
    atoms = self.atoms  # the copy ASE keeps for check_state
    self.results = {}
    pbc = np.asarray(atoms.pbc, dtype=bool)
    periodic = bool(pbc.all())
    asked = [p for p in ("stress", "stresses") if p in properties]
    if asked and not periodic:
      raise PropertyNotImplementedError(
        f"{asked[0]} needs a fully periodic cell (a volume), but pbc = {pbc.tolist()}; set "
        f"atoms.pbc = True with a proper cell, or do not ask for {asked[0]} (e.g. do not "
        "use a cell filter or NPT on this system)"
      )
    try:
      self.results = self._compute(atoms, periodic)
    except Exception:
      self.atoms = None  # nothing cached: the next call recomputes (and raises again)
      self.neighbors.reset_capacity()  # a failed structure's pair capacity is not kept
      self._fits = None
      raise

  def _compute(self, atoms: Atoms, periodic: bool) -> dict[str, Any]:
    n = len(atoms)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if n == 0:
      self.neighbors.build(np.zeros((0, 3)), cell, atoms.pbc)  # validates the cell
      results = {
        "energy": 0.0,
        "free_energy": 0.0,
        "energies": np.zeros(0),
        "forces": np.zeros((0, 3)),
      }
      if periodic:
        results["stress"], results["stresses"] = np.zeros(6), np.zeros((0, 6))
      return results

    species = self._prepare_species(atoms.numbers)
    positions = host.reference_positions(atoms.positions, cell, atoms.pbc)
    previous = self.atom_capacity
    na = self._atom_capacity(n)
    if previous is not None and na != previous:
      # A different system size compiles anyway: let the pair capacity fit it too. With
      # a fixed atom axis it only grows, so MD and NPT runs cannot flip between shapes.
      self.neighbors.reset_capacity()
    pairs = self.neighbors.build(positions, cell, atoms.pbc)  # validates positions and cell
    self._refuse_before_allocating(atoms, positions, cell, pairs)
    if self._species_dev is None or self._species_dev.shape[0] != na:
      padded = np.zeros(na, np.int32)
      padded[:n] = species
      self._species_dev = jnp.asarray(padded)
      self._mask_dev = jnp.asarray(np.arange(na) < n)

    pos = np.zeros((na, 3), self.dtype)
    pos[:n] = positions
    dst, src = pairs.dst, pairs.src
    # The builder pads pairs with index n; with padded atoms the padding index is na.
    dst[pairs.num_pairs :] = na
    src[pairs.num_pairs :] = na
    evaluator = self._evaluator
    traces = evaluator.traces
    args = (self._params, self._species_dev, pos, cell.astype(self.dtype), dst, src)
    args = args + (pairs.shifts, self._mask_dev)
    if evaluator.fn is None:  # learnt charges: the electrostatics' inputs too
      fn = evaluator.charged[periodic]
      out = fn(*args, *self._electrostatics_inputs(atoms, cell, periodic))
    else:
      out = evaluator.fn(*args)
    self._compilations += evaluator.traces - traces
    e_model, forces, virial, atom_virials, d2, closest, spread, *charges = jax.device_get(out)

    if pairs.num_pairs and self.min_distance and d2 < self.min_distance**2:
      self._raise_overlap(atoms, pairs, int(closest), float(np.sqrt(d2)))
    energies = e_model[:n].astype(np.float64) + self._shifts[species]
    forces = forces[:n].astype(np.float64)
    energy = float(np.sum(energies))
    host.check_finite(energy, forces)
    results = {"energy": energy, "free_energy": energy, "energies": energies, "forces": forces}
    if periodic:
      volume = abs(float(np.linalg.det(cell)))
      results["stress"] = _voigt(np.asarray(virial, np.float64) / volume)
      results["stresses"] = _voigt(np.asarray(atom_virials[:n], np.float64) / volume)
    if spread is not None:
      results.update(self._uncertainty(spread, float(np.sum(self._shifts[species])), n))
    if charges:
      results["charges"] = np.asarray(charges[0][:n], np.float64)
    return results

  def _electrostatics_inputs(self, atoms: Atoms, cell: np.ndarray, periodic: bool) -> tuple:
    """``(total_charge, kvectors, kmask, mesh)`` of a model with learnt charges: the total
    charge is ``atoms.info["charge"]`` (default 0); the cell's reciprocal vectors padded to a
    capacity, or its PME grid (``electrostatics.reciprocal_plan``), which only grow (NPT runs
    keep their compiled shapes)."""
    if not periodic and np.any(atoms.pbc):
      raise ValueError(
        "this model has long-range electrostatics, which need a fully periodic cell or an "
        f"open system, but pbc = {np.asarray(atoms.pbc).tolist()}; set atoms.pbc to all True "
        "(with a cell) or all False"
      )
    total = electrostatics.checked_charge(atoms.info.get("charge", 0.0), "atoms.info['charge']")
    cfg = self.potential.config
    shape = None if self._mesh is None else tuple(len(m) for m in self._mesh)
    table, mask, mesh = electrostatics.reciprocal_plan(
      cell, periodic, len(atoms), cfg.cutoff, cfg.ewald_accuracy, mesh_at_least=shape
    )
    if mesh is not None:
      self._mesh = mesh
      return np.asarray(total, self.dtype), table[0], mask[0], mesh
    if table.shape[1] > self._kvector_capacity:
      self._kvector_capacity = bucket_capacity(table.shape[1], 8, 1.25, 0.1)
    args = (cell, periodic, cfg.cutoff, cfg.ewald_accuracy)
    table, mask = electrostatics.kvector_table(*args, capacity=self._kvector_capacity)
    return np.asarray(total, self.dtype), table[0], mask[0], None

  def _uncertainty(self, spread, shift: float, n: int) -> dict[str, Any]:
    """Calibrated ensemble results (see :mod:`potentials.ensemble`)."""
    energy_scale, forces_scale = self.potential.uncertainty_scales
    return {
      "energy_uncertainty": energy_scale * float(spread.energy),
      "forces_uncertainty": forces_scale * np.asarray(spread.forces[:n], np.float64),
      "member_energies": np.asarray(spread.member_energies, np.float64) + shift,
    }

  # ------------------------------------------------------------------ host-side helpers
  def _prepare_species(self, numbers: np.ndarray) -> np.ndarray:
    """Species indices, cached while the atomic numbers stay the same."""
    if self._numbers is None or not np.array_equal(numbers, self._numbers):
      species = self.potential.species_index(np.asarray(numbers))  # unknown -> error
      self._numbers = np.array(numbers, copy=True)
      self._species_host = species
      self._species_dev = None  # re-upload with the next atom capacity
    return self._species_host

  def _atom_capacity(self, n: int) -> int:
    cap = atom_capacity(n, self.atom_capacity)
    if cap != self.atom_capacity:
      self._species_dev = None
    self.atom_capacity = cap
    return cap

  def _refuse_before_allocating(self, atoms: Atoms, positions, cell, pairs) -> None:
    """Pairs that would need more memory than is available: overlapping atoms are named
    (the usual cause), else the memory figure; checked on the host, before the model runs,
    once per pair capacity that passed (the memory figure is read from the system)."""
    if pairs.capacity == self._fits:
      return
    short = host.memory_shortfall(self.potential.config, pairs.capacity, self.dtype)
    if short is None:
      self._fits = pairs.capacity
      return
    args = (pairs.dst, pairs.src, pairs.shifts, pairs.num_pairs)
    distance, k = host.closest_pair(np.asarray(positions, np.float64), cell, *args)
    if self.min_distance and distance < self.min_distance:
      self._raise_overlap(atoms, pairs, k, distance)
    raise host.memory_error(*short, pairs.capacity, len(atoms), distance)

  def _raise_overlap(self, atoms: Atoms, pairs: Any, k: int, distance: float) -> None:
    i, j, across = int(pairs.dst[k]), int(pairs.src[k]), bool(np.any(pairs.shifts[k]))
    text = host.overlap_message(atoms.numbers, i, j, across, distance, self.min_distance)
    raise ValueError(f"{text}, or pass min_distance=None to the Calculator to skip this check.")


# Runaway guards as an ASE observer: guard(dyn, max_temperature=..., max_force=...).
from plugin.md.guards import RunawayError, guard  # noqa: E402,F401


def calculate_many(potential: potentials.Potential, structures: Sequence[Atoms], **kwargs):
  """Energies, forces and stresses of many structures in size-bucketed batches, one dict per
  structure: :func:`plugin.screening.calculate_many` (imported on first use, so that this
  module stays quick to import)."""
  from plugin.screening import calculate_many as _calculate_many

  return _calculate_many(potential, structures, **kwargs)


def evaluate(potential: potentials.Potential, structures: Sequence[Atoms], **kwargs):
  """Deprecated name of :func:`calculate_many` (one of three unrelated ``evaluate``s)."""
  deprecation.warn("plugin.ase.evaluate", "plugin.ase.calculate_many")
  return calculate_many(potential, structures, **kwargs)
