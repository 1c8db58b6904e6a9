"""JAX-MD energy functions for eqattn potentials, fed by JAX-MD's own neighbour list.

Shaped like JAX-MD's ``energy.*_neighbor_list`` functions::

    displacement_fn, shift_fn = space.periodic_general(box)      # fractional coordinates
    neighbor_fn, energy_fn = plugin.jax_md.neighbor_list(
        potential, displacement_fn, box, atomic_numbers=Z, fractional_coordinates=True)
    nbrs = neighbor_fn.allocate(R)
    E = energy_fn(R, nbrs)                    # eV; forces: -jax.grad(energy_fn)(R, nbrs)
    init_fn, apply_fn = simulate.nve(energy_fn, shift_fn, dt)   # metal units: Å, eV, amu

Conventions (``docs/conventions.md``)
-------------------------------------
* **Rows of ``idx``.** JAX-MD's ``Sparse`` list has ``idx`` of shape ``(2, capacity)``; both
  directions of every pair are present and unused slots hold ``N``. JAX-MD builds it by
  flattening an ``(N, candidates)`` table row by row, where the row number is written into
  ``idx[1]`` and the candidate into ``idx[0]``, then compacting the valid entries in order
  (``partition.prune_*_sparse``). So ``idx[1]`` is non-decreasing over the valid entries and is
  followed by the padding ``N``. We take ``dst = idx[1]`` (centre, receives the message) and
  ``src = idx[0]`` (neighbour), which makes ``indices_are_sorted=True`` valid for the model's
  ``segment_sum`` over ``dst``. One corner case: when the capacity equals the whole candidate
  table, JAX-MD's compaction can leave ``(N, k)`` with ``k < N`` in the last slot; we map every
  pair with either end ``== N`` to ``(N, N)``, which keeps ``dst`` sorted in all cases.
* **Pair vectors** come from the user's displacement function: JAX-MD's ``displacement(Ra, Rb)``
  is ``Ra - Rb`` (minimum image), so ``r = displacement(R[src], R[dst]) = R[src] - R[dst]``,
  the model's convention. Keyword arguments of ``energy_fn`` (``box=``, ``perturbation=``,
  ``new_box=`` ...) are passed to the displacement function exactly as JAX-MD's ``smap`` does,
  which is what ``quantity.stress`` and ``simulate.npt_nose_hoover`` rely on.
* **Padding.** Padded pairs are gathered with a clipped index and their vector is replaced by a
  finite vector beyond the cutoff with ``jnp.where``, so they cannot create NaN in values or
  gradients; the model also masks them (``dst == src == N``).
* **Forces** are ``-jax.grad(energy_fn)(R, nbrs)``. With fractional coordinates JAX-MD's
  ``periodic_general`` defines the derivative of the displacement so that this gradient is
  already the real-space (Cartesian) gradient, which is what its integrators expect.
* **Units.** Å, eV, amu: JAX-MD's ``units.metal_unit_system`` (time unit ~10.18 fs).
* **Stress.** ``quantity.stress(energy_fn, R, box, neighbor=nbrs)`` returns JAX-MD's sign
  convention ``sigma = -(1/V) dE/d(eps)`` (plus the kinetic term when velocities are given),
  i.e. the *negative* of ASE's ``atoms.get_stress()`` (``+(1/V) dE/d(eps)``), as a 3x3 matrix.
* **Per-atom virials.** ``atom_virial_fn(energy_fn)(R, nbrs)`` gives ``W (N, 3, 3)`` (eV) in
  the same sign, ``sum_i W_i / V`` = that stress without velocities.

Small boxes: periodic images
----------------------------
JAX-MD's neighbour list and displacement functions use the minimum image convention, which is
exact only when every perpendicular width of the box is at least ``2 * (rc + dr_threshold)``.
``neighbor_fn.allocate`` chooses the list automatically from the box it allocates for
(``box=``, else the constructor's):

* every width ``>= 2 * (cutoff + dr_threshold)``: JAX-MD's own list (cell list or all pairs),
  the fast path for large systems;
* any width smaller (a 1-atom primitive cell, a 4-atom cubic cell, a skewed triclinic cell, a
  thin periodic cell, an NPT box that compressed below the limit): an :class:`ImageNeighborList`,
  whose pairs carry integer image shifts ``n`` (``r = R[src] - R[dst] + box @ n``, i.e.
  ``shift @ cell`` in ASE's row convention). It enumerates the ``(i, j, n)`` candidates for a
  static range of shifts that covers ``cutoff + dr_threshold`` in the allocation box
  (``N * N * S`` distances: cheap for the small cells it is for) and keeps the ones within
  ``cutoff + dr_threshold`` in a padded array of fixed capacity.

Both are ``partition.NeighborList`` objects with the same ``update``/``did_buffer_overflow``
API, and ``energy_fn`` takes either. The image list is rebuilt when an atom moved more than
``dr_threshold / 2`` (as JAX-MD's), and at every ``update(R, box=b)`` (a changing box moves
every pair). It sets the overflow bit (``did_buffer_overflow``) when the pairs exceed its
capacity or when ``b`` is so narrow that it needs more image shifts than allocated; the caller
then allocates again (``plugin.md.run`` replays the chunk), so no pair is missed silently.
A JAX-MD list meeting a box narrower than it supports (NPT) reports it the same way:
``nbrs.update(R, box=b)`` sets ``cell_size_too_small`` below ``2 * (rc + dr_threshold)``, and
``energy_fn(..., box=b)`` returns NaN below ``2 * rc`` (a jitted function cannot raise); an
allocation for the narrow box then gives an image list.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses as jmd_dataclasses
from jax_md import partition, space

import potentials
from plugin.defaults import DEFAULTS
from plugin.neighbors.cells import (
  box_matrix,
  box_matrix_traced,
  box_widths,
  box_widths_traced,
  check_box,
)
from plugin.neighbors.images import (
  ImageNeighborList,
  check_image_geometry,
  image_geometry,
  image_list_fns,
  is_general,
)
from plugin.quiet import quiet
from potentials import deprecation, electrostatics, ensemble, observables

__all__ = [
  "neighbor_list",
  "atom_virial_fn",
  "charge_fn",
  "uncertainty_fn",
  "ImageNeighborList",
  "box_matrix",
  "box_widths",
  "check_box",
]

Array = jax.Array
Box = Any  # scalar, (3,) side lengths, or (3, 3) upper-triangular matrix (columns = vectors)
DisplacementFn = Callable[..., Array]
EnergyFn = Callable[..., Array]


# --------------------------------------------------------------------------------------------
# checks of the user's space


def _probe_space(
  displacement_fn: DisplacementFn, box: np.ndarray, fractional_coordinates: bool
) -> bool:
  """Whether ``displacement_fn`` is periodic, found by evaluating it on two probe vectors per
  axis; also catches a ``fractional_coordinates`` flag that does not match the space.

  A vector of 1/4 of a lattice vector is its own minimum image; in fractional coordinates
  the displacement of ``u = e_i / 4`` has length ``|a_i| / 4``, in real coordinates the
  displacement of ``x = e_i / 4`` has length 1/4. A vector of 3/4 of a lattice vector wraps to
  1/4 of it in a periodic space and stays 3/4 long in free space.
  """
  lengths = np.linalg.norm(box, axis=0)
  zero = jnp.zeros(3)
  periodic = []
  for i in range(3):
    e = np.eye(3)[i]
    # The 1/4 probe is unambiguous only if 1/4 Å is its own image and |a_i| is not ~1 Å
    # (thinner boxes skip it).
    if box_widths(box).min() >= 1.0:
      quarter = float(np.linalg.norm(displacement_fn(zero, jnp.asarray(0.25 * e))))
      frac_like = abs(quarter - 0.25 * lengths[i]) <= 1e-4 * lengths[i]
      real_like = abs(quarter - 0.25) <= 1e-4
      if fractional_coordinates and real_like and not frac_like:
        raise ValueError(
          "fractional_coordinates=True, but displacement_fn treats positions as "
          "real coordinates; build it with space.periodic_general(box, "
          "fractional_coordinates=True) or pass fractional_coordinates=False"
        )
      if not fractional_coordinates and frac_like and not real_like:
        raise ValueError(
          "fractional_coordinates=False, but displacement_fn treats positions "
          "as fractional coordinates; pass fractional_coordinates=True"
        )
    probe = 0.75 * (e if fractional_coordinates else box[:, i])
    d = float(np.linalg.norm(displacement_fn(zero, jnp.asarray(probe))))
    periodic.append(d < 0.5 * lengths[i])
  if len(set(periodic)) != 1:
    raise ValueError(
      "displacement_fn is periodic along some box axes only; JAX-MD spaces are "
      "periodic along all axes (space.periodic, space.periodic_general) or none "
      "(space.free)"
    )
  return periodic[0]


def _check_positions(
  R: Any, n: int, box: np.ndarray, periodic: bool, fractional_coordinates: bool
) -> None:
  """Shape, finiteness and (periodic spaces) inside-the-box checks of concrete positions."""
  try:
    R = np.asarray(R)
  except jax.errors.TracerArrayConversionError:
    return  # traced: nothing concrete to check (JAX-MD's allocate is not jittable anyway)
  if R.shape != (n, 3):
    raise ValueError(
      f"positions must have shape ({n}, 3) (one row per species entry), got {R.shape}"
    )
  if not np.issubdtype(R.dtype, np.floating):
    raise ValueError(f"positions must be floating point, got {R.dtype}")
  bad = ~np.isfinite(R).all(axis=1)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
      f"positions of atom {i} are not finite: {R[i]} "
      f"({int(bad.sum())} atom(s) with NaN/inf positions)"
    )
  if periodic:
    # JAX-MD's cell list bins by int(position / cell_size); atoms outside the box land in the
    # wrong cell and pairs can be missed silently. Its shift_fn keeps them inside afterwards.
    u = R if fractional_coordinates else np.linalg.solve(box, R.T.astype(np.float64)).T
    tol = 1e-6
    if np.any(u < -tol) or np.any(u > 1 + tol):
      i = int(np.argmax(((u < -tol) | (u > 1 + tol)).any(axis=1)))
      what = "fractional coordinates" if fractional_coordinates else "positions"
      raise ValueError(
        f"{what} must lie inside the box for JAX-MD's neighbour list; atom {i} "
        f"is at fractional position {u[i]}. Wrap them first (e.g. "
        f"atoms.wrap() in ASE, or R % 1 for fractional coordinates)."
      )


@deprecation.renamed(species="atomic_numbers")
def neighbor_list(
  potential: potentials.Potential,
  displacement_fn: DisplacementFn,
  box: Box,
  *,
  atomic_numbers: Sequence[int],
  dr_threshold: float = DEFAULTS.dr_threshold,
  capacity_multiplier: float = DEFAULTS.capacity_multiplier,
  fractional_coordinates: bool = False,
  per_particle: bool = False,
  format: partition.NeighborListFormat = partition.Sparse,
  charge: float = 0.0,
  **neighbor_kwargs,
) -> Tuple[partition.NeighborListFns, EnergyFn]:
  """JAX-MD neighbour list and energy function of an eqattn potential.

  Args:
    potential: the :class:`potentials.Potential` (its ``cutoff`` is the list's ``r_cutoff``).
    displacement_fn: from ``jax_md.space`` (``free``, ``periodic``, ``periodic_general``).
    box: the box given to JAX-MD's neighbour list: scalar, ``(3,)`` or upper-triangular
      ``(3, 3)`` with lattice vectors as columns. Any periodic box works: one at least
      ``2 * (cutoff + dr_threshold)`` wide in every direction gets JAX-MD's own list, a
      narrower one an :class:`ImageNeighborList` (chosen at ``allocate``, from the box it
      allocates for; see the module docstring). For ``space.free`` it is only the cell-list
      region.
    atomic_numbers: ``(N,)`` one per atom (unknown elements raise
      :class:`potentials.UnknownElementError`). Its old name ``species=`` (which elsewhere
      means a model's elements) still works, deprecated.
    dr_threshold: skin (Å); the list is rebuilt when an atom moved more than half of it.
    capacity_multiplier: extra room in the list, as in ``partition.neighbor_list``.
    fractional_coordinates: positions in the unit cube (``space.periodic_general`` default);
      needed for a box that changes (``box=``, NPT).
    per_particle: if True, ``energy_fn`` returns per-atom energies ``(N,)`` instead of the total
      (JAX-MD's ``per_particle`` flag of its ``energy.*_neighbor_list`` functions).
    format: must be ``partition.Sparse`` (the model needs both directions of each pair).
    charge: the system's total charge (e), for a model with learnt charges and
      electrostatics (``ModelConfig.electrostatics``; the ASE calculator's
      ``atoms.info["charge"]``); a local model refuses a non-zero value.
    **neighbor_kwargs: passed to ``partition.neighbor_list`` (e.g. ``disable_cell_list``).

  Returns:
    ``(neighbor_fn, energy_fn)``. ``neighbor_fn`` is a ``partition.NeighborListFns``
    (``allocate(R)`` checks positions and picks the list, ``update(R, nbrs)`` /
    ``nbrs.update(R)`` are jittable).
    ``energy_fn(R, neighbor, **kwargs)`` takes ``R (N, 3)`` and a neighbour list from
    ``neighbor_fn`` and returns the energy (eV): a scalar, or ``(N,)`` with ``per_particle``.
    Keyword arguments go to ``displacement_fn`` (``box=``, ``perturbation=``), except
    ``params=``, which replaces ``potential.params`` (e.g. to differentiate by parameters).
    Other keywords (``kT``, ... passed on by ``simulate``) are ignored, as in JAX-MD.
  """
  z = _checked_arguments(atomic_numbers, format, dr_threshold, neighbor_kwargs)
  charge = _checked_charge(potential, charge)
  species_idx = jnp.asarray(potential.species_index(z))  # raises UnknownElementError
  n, cutoff, bmat = int(z.size), float(potential.cutoff), box_matrix(box)
  periodic = _probe_space(displacement_fn, bmat, fractional_coordinates)
  geometry = dict(bmat=bmat, n=n, fractional=fractional_coordinates)
  image_fns = None
  if periodic:
    if np.any(box_widths(bmat) <= 0):
      raise ValueError(f"box is singular (zero volume):\n{bmat}")
    image_fns = _image_fns(displacement_fn, cutoff, dr_threshold, capacity_multiplier, geometry)
  fns = partition.neighbor_list(
    displacement_fn,
    box,
    cutoff,
    dr_threshold=dr_threshold,
    capacity_multiplier=capacity_multiplier,
    fractional_coordinates=fractional_coordinates,
    format=format,
    **neighbor_kwargs,
  )
  fns = partition.NeighborListFns(
    _quiet_index_scatter(fns.allocate), _quiet_index_scatter(fns.update)
  )
  width = 2.0 * (cutoff + dr_threshold)  # the narrowest box JAX-MD's own list serves
  neighbor_fn = _list_fns(fns, image_fns, periodic, width, geometry, neighbor_kwargs)
  long_range = None
  if potential.config.electrostatics:
    long_range = _long_range_fn(potential.config, displacement_fn, geometry, periodic, charge)
  energy_fn = _energy_fn(
    potential, displacement_fn, species_idx, periodic, per_particle, image_fns, long_range
  )
  return neighbor_fn, energy_fn


def _checked_charge(potential: potentials.Potential, charge) -> float:
  """The total charge, a finite number; non-zero only for a model with electrostatics."""
  charge = electrostatics.checked_charge(charge)
  if charge != 0 and not potential.config.electrostatics:
    raise ValueError(
      f"charge={charge:g} is for a model with learnt charges (ModelConfig.electrostatics); "
      "this model is local and its energy does not depend on a total charge"
    )
  return charge


def _long_range_fn(config, displacement_fn, geometry: dict, periodic: bool, charge: float):
  """``term(R, r, dst, src, kwargs, charges, strain=None) -> observables.LongRange``: the
  electrostatics of a model with learnt charges (``charges``: its raw charges and weights)
  for one system of this space: the open sum in free space, Ewald in a periodic one, whose
  reciprocal vectors or PME grid (``electrostatics.reciprocal_plan``) are chosen once for the
  constructor's box (a box that changes, NPT, scales them, as the ASE calculator's cell does
  not: fine while the box stays near it).

  Positions are read through ``displacement_fn`` (each atom's displacement from the origin:
  real coordinates, equal to the true ones up to lattice vectors, which the Ewald sum does not
  see), so ``box=``, ``perturbation=`` and fractional coordinates act on them exactly as on
  the pair vectors, derivatives included. The cell is ``new_box``/``box``/the constructor's,
  times ``perturbation``; ``strain`` strains positions and cell as ``observables.compute``."""
  n, bmat = geometry["n"], geometry["bmat"]
  table, mask, mesh = electrostatics.reciprocal_plan(
    bmat.T, periodic, n, config.cutoff, config.ewald_accuracy
  )
  origin = jnp.zeros(3)

  def term(R, r, dst, src, kwargs, charges, strain=None):
    frames = electrostatics.one_system(
      np.ones(n, bool), charge, periodic, table[0], mask[0], R.dtype, mesh
    )
    positions = jax.vmap(lambda a: displacement_fn(a, origin.astype(R.dtype), **kwargs))(R)
    cell = _cell_rows(bmat, kwargs, R.dtype)
    if strain is not None:
      positions = observables.strained(positions, strain)
      cell = observables.strained_cell(cell, strain)
    fn = electrostatics.model_long_range_fn(config, frames, dst, src, any_open=not periodic)
    return fn(positions, cell, r, charges)

  return term


def _cell_rows(bmat: np.ndarray, kwargs: dict, dtype) -> Array:
  """The cell (rows: lattice vectors) that ``kwargs`` give the displacement function."""
  box = box_matrix_traced(kwargs.get("new_box", kwargs.get("box", bmat)), dtype)
  if kwargs.get("perturbation") is not None:
    box = space.raw_transform(kwargs["perturbation"], box.T).T  # the columns, perturbed
  return box.T


def _checked_arguments(atomic_numbers, format, dr_threshold: float, neighbor_kwargs) -> np.ndarray:
  """The atomic numbers ``(N,)``, after checking :func:`neighbor_list`'s arguments."""
  if format is not partition.Sparse:
    raise ValueError(
      f"format must be partition.Sparse (both directions of each pair, "
      f"idx of shape (2, capacity)); got {format}"
    )
  if not neighbor_kwargs.get("mask_self", True):
    raise ValueError(
      "mask_self=False would put zero-length self pairs into the list; "
      "the model needs them excluded"
    )
  if not (np.isfinite(dr_threshold) and dr_threshold >= 0):
    raise ValueError(f"dr_threshold must be a finite number >= 0, got {dr_threshold}")
  z = np.asarray(atomic_numbers)
  if z.ndim != 1 or z.size == 0 or not np.issubdtype(z.dtype, np.integer):
    raise ValueError(
      f"atomic_numbers must be a non-empty 1-D integer array, got "
      f"{z.dtype} array of shape {z.shape}"
    )
  return z


def _image_fns(displacement_fn, cutoff, dr_threshold, capacity_multiplier, geometry: dict):
  """``(allocate, update, too_few_images, pair_vectors)`` of the image list for boxes too
  narrow for JAX-MD's own (:mod:`plugin.neighbors.images`)."""
  bmat, fractional = geometry["bmat"], geometry["fractional"]
  general = is_general(displacement_fn, bmat)
  space_of = image_geometry(bmat, fractional, general)
  check_image_geometry(displacement_fn, space_of, bmat, fractional, general)
  fns = image_list_fns(
    space_of,
    bmat,
    geometry["n"],
    cutoff + dr_threshold,
    dr_threshold,
    capacity_multiplier,
    fractional,
  )
  return (*fns, space_of[2])


def _list_fns(fns, image_fns, periodic: bool, width: float, geometry: dict, neighbor_kwargs):
  """``NeighborListFns`` whose ``allocate`` checks the positions and picks JAX-MD's list or
  the image list (boxes narrower than ``width``), and whose ``update`` flags a box that
  shrank below ``width`` (NPT) with JAX-MD's own error bit."""
  bmat, n, fractional = geometry["bmat"], geometry["n"], geometry["fractional"]

  def update_fn(R: Array, neighbors: partition.NeighborList, **kwargs) -> partition.NeighborList:
    if isinstance(neighbors, ImageNeighborList):
      return neighbors.update(R, **kwargs)
    nbrs = fns.update(R, neighbors, **kwargs)
    if periodic and "box" in kwargs:
      # A shrinking box (NPT) can break the minimum image convention mid-run; report it with
      # JAX-MD's own error bit, readable as nbrs.cell_size_too_small.
      too_small = jnp.any(box_widths_traced(kwargs["box"]) < width)
      nbrs = jmd_dataclasses.replace(
        nbrs, error=nbrs.error.update(partition.PEC.CELL_SIZE_TOO_SMALL, too_small)
      )
    return nbrs

  def allocate_fn(R: Array, extra_capacity: int = 0, **kwargs) -> partition.NeighborList:
    b = box_matrix(kwargs["box"]) if "box" in kwargs else bmat
    if periodic and np.any(box_widths(b) <= 0):
      raise ValueError(f"box is singular (zero volume):\n{b}")
    small = periodic and box_widths(b).min() < width
    _check_positions(R, n, b, periodic and not small, fractional)
    if small:
      unsupported = set(neighbor_kwargs) - {"disable_cell_list", "mask_self"}
      if unsupported:
        raise ValueError(
          f"{sorted(unsupported)} not supported for boxes narrower than "
          f"2 * (cutoff + dr_threshold) = {width:g} Å, which use a "
          f"list with periodic images"
        )
      return image_fns[0](R, extra_capacity, **kwargs)
    nbrs = fns.allocate(R, extra_capacity, **kwargs)
    # With fractional coordinates JAX-MD keeps the cell size as a 0-d jax array in a static
    # (pytree metadata) field. Recent JAX compares metadata while tracing, so a freshly
    # allocated list meeting a cached trace of the same energy_fn (e.g. simulate's
    # eval_shape inside jit) fails with "Exception raised while checking equality of metadata
    # fields". A Python float has the same value and compares plainly.
    cell_size = nbrs.cell_size
    if cell_size is not None and np.ndim(cell_size) == 0:
      cell_size = float(cell_size)
    # Route nbrs.update(...) through update_fn, so its box check runs too.
    return jmd_dataclasses.replace(nbrs, update_fn=update_fn, cell_size=cell_size)

  return partition.NeighborListFns(allocate_fn, update_fn)


# JAX's FutureWarning "scatter inputs have incompatible types" (int64 into int32) comes from
# JAX-MD 0.2.29 itself: under x64 its sparse pruning without a cell list
# (``partition.prune_neighbor_list_sparse``, small systems) scatters ``jnp.arange(N)``, int64,
# into its int32 index array. No array of ours reaches that scatter (the indices are JAX-MD's
# own, all ``<= N``, so the cast is exact); only that message is silenced, while tracing.
_quiet_index_scatter = quiet("scatter inputs have incompatible types", FutureWarning)


def _energy_fn(
  potential: potentials.Potential,
  displacement_fn: DisplacementFn,
  species_idx: Array,
  periodic: bool,
  per_particle: bool,
  image_fns,
  long_range=None,
) -> EnergyFn:
  # jitted: its trace is cached, so init, step and observe (and their gradients) trace the
  # model once per shape between them, not once each.
  jitted = lambda fn: jax.jit(fn, static_argnames=("indices_are_sorted",))  # noqa: E731
  member_energies = None
  if long_range is not None:  # local energies and raw charges; the term adds the rest
    pair_energies = jitted(potential.energies_and_charges_from_pairs_fn())
  else:
    pair_energies = jitted(potential.atomic_energies_from_pairs_fn())
    # with force_heads the members' force deviations are read out: no backward pass each
    config = potential.config
    members_fn = potential.member_forces_fn if config.force_heads else potential.member_energies_fn
    member_energies = jitted(members_fn())
  default_params = potential.params
  cutoff = float(potential.cutoff)
  n = int(species_idx.shape[0])

  def pairs(R, neighbor, kwargs):
    """``(r, dst, src, ok)``: pair vectors, ends (padding ``N``), and whether the list can
    hold every pair for ``box=`` (None: no check)."""
    # dst = idx[1] (sorted by construction in JAX-MD, see module docstring), src = idx[0].
    src_raw, dst_raw = neighbor.idx[0], neighbor.idx[1]
    valid = (src_raw < n) & (dst_raw < n)
    dst = jnp.where(valid, dst_raw, n)
    src = jnp.where(valid, src_raw, n)
    ok = None
    if isinstance(neighbor, ImageNeighborList):
      r = image_fns[3](R, neighbor.reference_position, src, dst, neighbor.shifts, kwargs)
      if "box" in kwargs:
        ok = ~image_fns[2](kwargs, neighbor.images, cutoff)
    else:
      d = space.map_bond(lambda ra, rb: displacement_fn(ra, rb, **kwargs))
      r = d(jnp.take(R, src, axis=0, mode="clip"), jnp.take(R, dst, axis=0, mode="clip"))
      if periodic and "box" in kwargs:
        # A box narrower than 2 * cutoff makes minimum-image pair vectors wrong.
        ok = jnp.all(box_widths_traced(kwargs["box"]) >= 2.0 * cutoff)
    # Padded pairs: a finite vector beyond the cutoff; `where` also zeroes their gradients.
    far = jnp.zeros_like(r).at[:, 0].set(2.0 * cutoff + 1.0)
    return jnp.where(valid[:, None], r, far), dst, src, ok

  def model(R, neighbor, kwargs, fn=pair_energies):
    """``(energies, r, dst, src, ok)`` for one call: the checked arguments' per-atom energy
    function of the pair vectors (``fn``: the mean, or the members), the pair vectors and
    ends, and ``ok`` of :func:`pairs`."""
    if neighbor is None:
      raise TypeError(
        "energy_fn needs a neighbour list: energy_fn(R, nbrs) or "
        "energy_fn(R, neighbor=nbrs), with nbrs = neighbor_fn.allocate(R)"
      )
    for key in ("per_particle", "per_atom"):
      if key in kwargs:
        raise TypeError(
          f"{key}= is not a call-time option; build the function with "
          f"neighbor_list(..., per_particle=True) for per-atom energies"
        )
    if "species" in kwargs:
      raise TypeError(
        "species are fixed when the energy function is built "
        "(neighbor_list(..., atomic_numbers=...)); build a new one for other species"
      )
    if R.shape != (n, 3):
      raise ValueError(f"positions must have shape ({n}, 3) to match species, got {R.shape}")
    if neighbor.format is not partition.Sparse:
      raise ValueError(f"neighbour list format must be partition.Sparse, got {neighbor.format}")
    params = kwargs.pop("params", default_params)
    r, dst, src, ok = pairs(R, neighbor, kwargs)
    energies = lambda r: fn(
      params, species_index=species_idx, r=r, dst=dst, src=src, indices_are_sorted=True
    )
    return energies, r, dst, src, ok

  def loud(x, ok):
    # The list cannot hold every pair for this box: a jitted function cannot raise, so make
    # it loud instead of silently wrong.
    return x if ok is None else jnp.where(ok, x, jnp.nan)

  def charged(R, neighbor, kwargs):
    """:func:`model` of a model with electrostatics: ``energies(r, strain=None) ->
    (local + electrostatic energies (N,), observables.LongRange)``."""
    local, r, dst, src, ok = model(R, neighbor, kwargs)

    def energies(r, strain=None):
      rs = r if strain is None else observables.strained(r, strain)
      e, charges = local(rs)
      term = long_range(R, rs, dst, src, kwargs, charges, strain)
      return e + term.energies, term

    return energies, r, dst, src, ok

  def energy_fn(R: Array, neighbor: Optional[partition.NeighborList] = None, **kwargs) -> Array:
    if long_range is not None:
      energies, r, _, _, ok = charged(R, neighbor, kwargs)
      e = loud(energies(r)[0], ok)
    else:
      energies, r, _, _, ok = model(R, neighbor, kwargs)
      e = loud(energies(r), ok)
    return e if per_particle else jnp.sum(e)

  def atom_virials(R: Array, neighbor: Optional[partition.NeighborList] = None, **kwargs) -> Array:
    if long_range is not None:
      return loud(*charged_atom_virials(R, neighbor, kwargs))
    energies, r, dst, src, ok = model(R, neighbor, kwargs)
    grad_r = jax.grad(lambda r: jnp.sum(energies(r)))(r)
    # JAX-MD's sign: minus the strain derivative (see atom_virial_fn)
    w = -observables.atom_strain_derivatives(r=r, grad_r=grad_r, dst=dst, src=src, num_atoms=n)
    return loud(w, ok)

  def charged_atom_virials(R, neighbor, kwargs):
    # the pairs' split plus an equal share of the rest (docs/conventions.md, Electrostatics)
    energies, r, dst, src, ok = charged(R, neighbor, kwargs)

    def total(eps, dr):
      e, term = energies(r + dr, eps)
      return jnp.sum(e), term.shares

    zero = (jnp.zeros((3, 3), r.dtype), jnp.zeros_like(r))
    (g_eps, g_r), shares = jax.grad(total, argnums=(0, 1), has_aux=True)(*zero)
    w = observables.atom_strain_derivatives(r=r, grad_r=g_r, dst=dst, src=src, num_atoms=n)
    return -(w + observables.rest_by_share(w, g_eps, shares)), ok

  def charges(R: Array, neighbor: Optional[partition.NeighborList] = None, **kwargs) -> Array:
    energies, r, _, _, ok = charged(R, neighbor, kwargs)
    return loud(energies(r)[1].charges, ok)

  if long_range is not None:
    uncertainty = functools.partial(_no_ensemble, "a model with electrostatics")
    _COMPANIONS[energy_fn] = _Companions(atom_virials, uncertainty, charges)
  else:
    uncertainty = _uncertainty_fn(potential, model, pairs, loud, member_energies)
    _COMPANIONS[energy_fn] = _Companions(atom_virials, uncertainty, None)
  return energy_fn


def _no_ensemble(what: str, *args, **kwargs):
  raise ValueError(f"{what} is a single model: it has no ensemble uncertainty")


def _uncertainty_fn(potential, model, pairs, loud, member_energies) -> Callable:
  """The :func:`uncertainty_fn` of an energy function built from ``model``, ``pairs`` and
  ``loud`` (:func:`_energy_fn`'s): every member's energy and forces, from one forward pass
  with ``force_heads``, else one backward pass per head (``ensemble.member_forces``)."""
  energy_scale, forces_scale = potential.uncertainty_scales
  committee = potential.config.committee

  def uncertainty(R: Array, neighbor: Optional[partition.NeighborList] = None, **kwargs):
    energies, r, _, _, ok = model(R, neighbor, dict(kwargs), fn=member_energies)
    if potential.config.force_heads:  # one forward pass
      member_e, deviations = energies(r)
      out = ensemble.readout_spread(
        jnp.sum(member_e, axis=0),
        deviations,
        energy_scale=energy_scale,
        forces_scale=forces_scale,
      )
      return jax.tree_util.tree_map(lambda x: loud(x, ok), out)
    vectors = lambda R: pairs(R, neighbor, {k: v for k, v in kwargs.items() if k != "params"})[0]

    def totals(R):  # a committee: one copy of R per network (potentials.ensemble.cotangents)
      r = vectors(R) if committee == 1 else jax.vmap(vectors)(R)
      return jnp.sum(energies(r), axis=0)

    member_e, forces = ensemble.member_forces(totals, R, committee)
    out = ensemble.spread(member_e, forces, energy_scale=energy_scale, forces_scale=forces_scale)
    return jax.tree_util.tree_map(lambda x: loud(x, ok), out)

  return uncertainty


class _Companions(NamedTuple):
  """What :func:`atom_virial_fn`, :func:`uncertainty_fn` and :func:`charge_fn` find for an
  energy function."""

  atom_virials: Callable
  uncertainty: Callable
  charges: Optional[Callable]


# energy function -> its companions: the energy function stays a plain function (what
# jax_md.simulate takes), nothing is hung on it, and an entry goes when the function does
_COMPANIONS: "weakref.WeakKeyDictionary[Callable, _Companions]" = weakref.WeakKeyDictionary()


def _companion(energy_fn: EnergyFn, field: str, missing: str) -> Callable:
  """``energy_fn``'s companion ``field`` (:class:`_Companions`), or a TypeError ``missing``."""
  fn = getattr(_COMPANIONS.get(energy_fn), field, None)
  if fn is None:
    raise TypeError(missing)
  return fn


def uncertainty_fn(energy_fn: EnergyFn) -> Callable[..., "ensemble.Spread"]:
  """The ensemble uncertainty of an energy function from :func:`neighbor_list`, like
  :func:`atom_virial_fn`: ``spread_fn(R, neighbor, **kwargs) ->``
  :class:`potentials.ensemble.Spread` with ``energy`` (eV), ``forces`` ``(N,)`` (eV/Å, per
  atom the calibrated standard deviation of one force component over the members) and
  ``member_energies`` ``(members,)`` (eV). It takes what ``energy_fn`` takes, is pure and
  jittable (use it inside jitted MD loops, e.g. every few steps), and costs one forward pass
  of every member plus one backward pass per member; a shallow ensemble with
  ``force_heads`` reads its members' force deviations out of one forward pass instead. A
  single model (one member) gives zeros. NaN, like ``energy_fn``, for a ``box=`` the list
  cannot hold.
  """
  return _companion(
    energy_fn,
    "uncertainty",
    "uncertainty_fn needs the energy_fn returned by plugin.jax_md.neighbor_list(...) "
    "itself (the uncertainty needs the ensemble's member energies, not just their mean)",
  )


def atom_virial_fn(energy_fn: EnergyFn) -> Callable[..., Array]:
  """Per-atom virials of an energy function from :func:`neighbor_list`, like
  ``quantity.force(energy_fn)``: returns ``virial_fn(R, neighbor, **kwargs) -> (N, 3, 3)``
  (eV), taking what ``energy_fn`` takes (``box=``, ``perturbation=``, ``params=``); pure and
  jittable, for use inside jitted MD loops.

  ``W_i = -(1/2) sum over the pairs k of atom i (as either end) of sym(r_k (x) dE/dr_k)``:
  each pair's share of the strain derivative, split half and half between its two atoms
  (:func:`potentials.observables.atom_strain_derivatives`; JAX-MD's list holds both
  directions, each split the same way). The sign is JAX-MD's: ``sum_i W_i = -dE/dε``, so
  ``sum_i W_i / V == quantity.stress(energy_fn, R, box, neighbor=nbrs)`` without velocities
  (LAMMPS' per-atom virial: its ``compute stress/atom`` reports minus this, in pressure times
  volume). ASE's per-atom ``Calculator(...).get_stresses()`` is the Voigt form of
  ``-W_i / V``. NaN, like ``energy_fn``, for a ``box=`` the list cannot hold. Shapes: ``R``
  ``(N, 3)`` (real or fractional, as for ``energy_fn``), result ``(N, 3, 3)``, symmetric.
  """
  return _companion(
    energy_fn,
    "atom_virials",
    "atom_virial_fn needs the energy_fn returned by plugin.jax_md.neighbor_list(...) itself "
    "(per-atom virials need the model's pair vectors, not just an energy)",
  )


def charge_fn(energy_fn: EnergyFn) -> Callable[..., Array]:
  """The learnt charges of an energy function from :func:`neighbor_list` of a model with
  electrostatics (``ModelConfig.electrostatics``), like :func:`atom_virial_fn`:
  ``charges_fn(R, neighbor, **kwargs) -> (N,)`` (e), summing to the ``charge`` the energy
  function was built with; pure and jittable (the ASE calculator's ``charges``)."""
  return _companion(
    energy_fn,
    "charges",
    "charge_fn needs the energy_fn that plugin.jax_md.neighbor_list(...) returned for a "
    "model with learnt charges (ModelConfig.electrostatics)",
  )
