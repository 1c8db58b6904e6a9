"""Pair lists of a batch of replicas (:mod:`plugin.md.replicas`): per replica, every pair
within ``cutoff + dr_threshold`` found by brute force (``N^2`` candidates times the periodic
images a small cell needs, from the shared image table of :mod:`plugin.neighbors.cells`),
compacted into ``capacity`` slots sorted by ``dst`` and kept until an atom of that replica
moved ``dr_threshold / 2``; the rebuild runs only when some replica needs it and replaces
only those replicas' lists. Shapes carry a leading replica axis in a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax_md import dataclasses as jmd_dataclasses
from jax_md import space

from plugin.neighbors.cells import box_widths, images_needed, shift_table

__all__ = [
  "Geometry",
  "ReplicaList",
  "ReplicaNeighborFns",
  "image_table",
  "pair_vectors",
  "shift",
]

Array = jax.Array


@jmd_dataclasses.dataclass
class Geometry:
  """One replica's fixed data (a leading replica axis in a batch).

  ``box (3, 3)``: lattice vectors as columns (periodic; positions are fractional) or the
  free-space box of :mod:`plugin.md.system` (open; positions Cartesian); ``periodic ()`` bool;
  ``species (N,)`` species indices (padding 0); ``mask (N,)`` real atoms. For a model with
  learnt charges also ``charge ()`` (e), and the Ewald sum's ``kvectors (K, 3)`` and
  ``kmask (K,)``, or a PME grid's ``mesh`` (three spline moduli, ``(K_d,)``)
  (:func:`potentials.electrostatics.reciprocal_plan`); None otherwise.
  """

  box: Array
  periodic: Array
  species: Array
  mask: Array
  charge: Optional[Array] = None
  kvectors: Optional[Array] = None
  kmask: Optional[Array] = None
  mesh: Optional[tuple] = None


@jmd_dataclasses.dataclass
class ReplicaList:
  """Pairs of one replica (a leading replica axis in a batch).

  ``dst, src (capacity,)`` int32, sorted by ``dst``, padding ``N``; ``shifts (capacity, 3)``
  int32 image shifts against ``reference_position (N, 3)`` (the positions at the last rebuild):
  ``r = box @ (u[src] - u[dst] + shift)`` with ``u`` unwrapped against the reference (periodic),
  ``r = R[src] - R[dst]`` (open); ``count ()``: pairs found at the last rebuild; ``overflow ()``:
  some rebuild found more than ``capacity``; ``geometry``: the replica's :class:`Geometry`.
  """

  dst: Array
  src: Array
  shifts: Array
  reference_position: Array
  count: Array
  overflow: Array
  geometry: Geometry
  max_occupancy: int = jmd_dataclasses.static_field()
  update_fn: Callable = jmd_dataclasses.static_field()

  def update(self, R: Array) -> "ReplicaList":
    return self.update_fn(R, self)

  @property
  def did_buffer_overflow(self) -> Array:
    return jnp.any(self.overflow)

  @property
  def cell_size_too_small(self) -> bool:
    return False


def _candidates(R: Array, geom: Geometry, table: np.ndarray):
  """Every (dst, src, image) candidate of one replica: ``(r (N, N, S, 3), shifts (N, N, S, 3),
  allowed (N, N, S))``; ``table (S, 3)`` the image shifts of the batch."""
  n = R.shape[0]
  f = lax.stop_gradient(R)
  d = f[None, :, :] - f[:, None, :]  # [dst, src]: u_src - u_dst
  k = jnp.where(geom.periodic, jnp.floor(d + 0.5), 0.0)
  c = (d - k)[:, :, None, :] + table.astype(R.dtype)
  r = jnp.where(geom.periodic, jnp.einsum("...j,ij->...i", c, geom.box), c)
  zero = np.all(table == 0, axis=1)
  allowed = (
    (geom.periodic | zero)
    & ~(np.eye(n, dtype=bool)[:, :, None] & zero)
    & (geom.mask[:, None] & geom.mask[None, :])[:, :, None]
  )
  shifts = table[None, None] - k[:, :, None].astype(jnp.int32)
  return r, shifts, allowed


def _build(R: Array, geom: Geometry, table: np.ndarray, capacity: int, list_cutoff: float):
  """``(dst, src, shifts, count)`` of one replica: the pairs within ``list_cutoff`` (dst-major,
  so ``dst`` is sorted) in ``capacity`` slots."""
  n = R.shape[0]
  r, shifts, allowed = _candidates(R, geom, table)
  mask = ((jnp.sum(r * r, axis=-1) < list_cutoff**2) & allowed).reshape(-1)
  count = jnp.sum(mask, dtype=jnp.int32)
  slot = jnp.where(mask, jnp.cumsum(mask) - 1, capacity)  # slot >= capacity: dropped
  ends = lambda a: jnp.asarray(np.broadcast_to(a, allowed.shape).reshape(-1), jnp.int32)
  fill = lambda a, pad: (
    jnp.full((capacity,) + a.shape[1:], pad, a.dtype).at[slot].set(a, mode="drop")
  )
  dst = fill(ends(np.arange(n)[:, None, None]), n)
  src = fill(ends(np.arange(n)[None, :, None]), n)
  return dst, src, fill(shifts.reshape(-1, 3), 0), count


def _moved(R: Array, nbrs: ReplicaList) -> Array:
  """Largest squared displacement (Å^2) of a real atom since the last rebuild."""
  geom = nbrs.geometry
  du = R - nbrs.reference_position
  dx = jnp.where(geom.periodic, space.raw_transform(geom.box, du - jnp.round(du)), du)
  return jnp.max(jnp.where(geom.mask, jnp.sum(dx * dx, axis=-1), 0.0))


def pair_vectors(R: Array, nbrs: ReplicaList, perturbation=None) -> Array:
  """One replica's pair vectors (Å), padded pairs a finite vector beyond ``far`` (set by the
  caller through the energy's cutoff); real-space gradients for fractional ``R``."""
  geom = nbrs.geometry
  take = lambda a, i: jnp.take(a, i, axis=0, mode="clip")
  g = R - jnp.round(lax.stop_gradient(R - nbrs.reference_position))  # unwrapped
  periodic = space.transform(
    geom.box, take(g, nbrs.src) - take(g, nbrs.dst) + nbrs.shifts.astype(R.dtype)
  )
  r = jnp.where(geom.periodic, periodic, take(R, nbrs.src) - take(R, nbrs.dst))
  if perturbation is not None:
    r = space.raw_transform(perturbation, r)
  return r


def shift(R: Array, dR: Array, neighbor: ReplicaList, **kwargs) -> Array:
  """JAX-MD's shift of one replica: fractional and wrapped (periodic, as
  ``space.periodic_general(..., fractional_coordinates=True)``) or free."""
  box = neighbor.geometry.box
  wrapped = jnp.mod(R + space.transform(space.inverse(box), dR), 1.0)
  return jnp.where(neighbor.geometry.periodic, wrapped, R + dR)


def image_table(
  boxes: Sequence[np.ndarray], periodic: Sequence[bool], list_cutoff: float
) -> np.ndarray:
  """The image shifts the narrowest periodic box of a batch needs (``(S, 3)`` int32); ``boxes``
  ``(3, 3)`` each, lattice vectors as columns."""
  images = np.zeros(3, int)
  for box, p in zip(boxes, periodic):
    if p:
      need = images_needed(box_widths(box), list_cutoff)
      images = np.maximum(images, need.astype(int))
  return shift_table(tuple(int(k) for k in images))


class ReplicaNeighborFns:
  """``allocate(R, extra_capacity=0)`` and the in-loop update of a batch's pair lists (the
  interface :func:`plugin.md.engine.allocate` and the step use); ``place`` puts the arrays
  with a replica axis on the devices (:func:`plugin.md.replicas.placement`)."""

  def __init__(
    self,
    geometry: Geometry,
    table: np.ndarray,
    list_cutoff: float,
    dr_threshold: float,
    capacity_multiplier: float,
    place: Callable = lambda tree: tree,
  ):
    self.geometry, self.table = geometry, table
    self.list_cutoff, self.multiplier = list_cutoff, capacity_multiplier
    self.place = place  # puts arrays with a replica axis on the devices
    half_skin2 = (0.5 * dr_threshold) ** 2
    build = lambda R, g, capacity: _build(R, g, table, capacity, list_cutoff)
    self._build = jax.jit(jax.vmap(build, in_axes=(0, 0, None)), static_argnums=2)

    def update(R, nbrs):
      moved = jax.vmap(_moved)(R, nbrs) > half_skin2 if dr_threshold > 0 else None

      def rebuild(nbrs):
        dst, src, shifts, count = jax.vmap(build, in_axes=(0, 0, None))(
          R, nbrs.geometry, nbrs.max_occupancy
        )
        pick = moved if moved is not None else jnp.ones(R.shape[0], bool)
        sel = lambda new, old: jnp.where(pick.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        return dataclasses.replace(
          nbrs,
          dst=sel(dst, nbrs.dst),
          src=sel(src, nbrs.src),
          shifts=sel(shifts, nbrs.shifts),
          reference_position=sel(R, nbrs.reference_position),
          count=sel(count, nbrs.count),
          overflow=nbrs.overflow | (pick & (count > nbrs.max_occupancy)),
        )

      if moved is None:
        return rebuild(nbrs)
      return lax.cond(jnp.any(moved), rebuild, lambda nbrs: nbrs, nbrs)

    self.update = update

  def allocate(
    self, R: Array, extra_capacity: int = 0, geometry: Optional[Geometry] = None, **kwargs
  ) -> ReplicaList:
    """A list for ``R`` (``geometry``: the batch's now, e.g. with parked replicas; default
    the one it started with)."""
    geom = jax.tree.map(lambda x: jnp.asarray(x), self.geometry if geometry is None else geometry)
    B, n = R.shape[:2]
    count = int(jnp.max(self._build(R, geom, 0)[3]))
    full = n * n * len(self.table)
    capacity = max(1, min(full, int(count * self.multiplier + n * extra_capacity)))
    dst, src, shifts, counts = self._build(R, geom, capacity)
    return self.place(
      ReplicaList(
        dst=dst,
        src=src,
        shifts=shifts,
        reference_position=R,
        count=counts,
        overflow=counts > capacity,
        geometry=geom,
        max_occupancy=capacity,
        update_fn=self.update,
      )
    )
