"""JAX-MD neighbour lists with periodic images, for boxes narrower than twice the list cutoff
(where JAX-MD's own minimum-image list would miss pairs): :class:`ImageNeighborList` and the
functions that build, update and read it. :func:`plugin.jax_md.neighbor_list` picks it."""

from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses as jmd_dataclasses
from jax_md import partition, space

from plugin.neighbors.cells import (
  box_matrix_traced,
  box_widths,
  box_widths_traced,
  images_needed,
  shift_table,
)

__all__ = [
  "ImageNeighborList",
  "check_image_geometry",
  "image_geometry",
  "image_list_fns",
  "is_general",
]

Array = jax.Array
DisplacementFn = Callable[..., Array]


@jmd_dataclasses.dataclass
class ImageNeighborList(partition.NeighborList):
  """A JAX-MD ``Sparse`` neighbour list whose pairs carry integer image shifts.

  ``idx (2, capacity)``: ``idx[0]`` = src, ``idx[1]`` = dst (sorted), padding ``N``, as
  JAX-MD's. ``shifts (capacity, 3)`` int32: pair ``k`` is
  ``r_k = box @ (u[src] - u[dst] + shifts[k])`` for the fractional positions ``u`` at the last
  rebuild (``reference_position``); atoms that have wrapped across a face since then are
  unwrapped against it, so the vector stays continuous. Padded pairs have shift 0.
  ``images`` (static): the largest ``|n|`` per lattice vector the list covers.
  """

  shifts: Array
  images: Tuple[int, int, int] = jmd_dataclasses.static_field()


def image_geometry(bmat: np.ndarray, fractional: bool, general: bool):
  """``(boxes, fractional_of, pair_vectors)`` reading ``box=``/``new_box=``/``perturbation=``
  as JAX-MD's ``space.periodic_general`` (``general``) or ``space.periodic`` do, with
  ``space.transform``, whose derivative keeps gradients in real space as theirs do."""
  inv0 = np.linalg.inv(bmat)

  def boxes(kw, dtype):
    """(box the positions live in, box the displacements are measured in)."""
    if not general and "box" in kw:
      raise space.UnexpectedBoxException(
        "`space.periodic` does not accept a box argument. Perhaps you meant to use "
        "`space.periodic_general`?"
      )
    t_pos = box_matrix_traced(kw["box"], dtype) if "box" in kw else jnp.asarray(bmat, dtype)
    t_disp = box_matrix_traced(kw["new_box"], dtype) if general and "new_box" in kw else t_pos
    return t_pos, t_disp

  def fractional_of(R, t_pos):
    return R if fractional else space.transform(jnp.linalg.inv(t_pos), R)

  def pair_vectors(R, reference, src, dst, shifts, kw):
    take = lambda a, i: jnp.take(a, i, axis=0, mode="clip")
    t_pos, t_disp = boxes(kw, R.dtype)
    n = shifts.astype(R.dtype)
    if fractional or (general and ("box" in kw or "new_box" in kw)):
      f, f_ref = fractional_of(R, t_pos), fractional_of(reference, t_pos)
      g = f - jnp.round(jax.lax.stop_gradient(f - f_ref))  # unwrapped against the rebuild
      r = space.transform(t_disp, take(g, src) - take(g, dst) + n)
    else:
      # Real coordinates in the list's own box: stay in real space (no round trip through
      # fractional coordinates, which costs float32 precision).
      jump = jnp.round(jax.lax.stop_gradient(space.raw_transform(inv0, R - reference)))
      m = n - take(jump, src) + take(jump, dst)
      r = take(R, src) - take(R, dst) + space.raw_transform(t_pos, m)
    if kw.get("perturbation") is not None:
      r = space.raw_transform(kw["perturbation"], r)
    return r

  return boxes, fractional_of, pair_vectors


def image_list_fns(
  geometry,
  bmat: np.ndarray,
  n: int,
  list_cutoff: float,
  dr_threshold: float,
  capacity_multiplier: float,
  fractional: bool,
):
  """``(allocate, update, too_few_images)`` of :class:`ImageNeighborList` (see the module
  docstring)."""
  boxes, fractional_of, _ = geometry

  def build(R, kw, images, capacity):
    """All ``(dst, src, shift)`` within ``list_cutoff`` (dst-major, so dst is sorted),
    compacted into ``capacity`` slots; also their count."""
    t_pos, t_disp = boxes(kw, R.dtype)
    f = jax.lax.stop_gradient(fractional_of(R, t_pos))
    d = f[None, :, :] - f[:, None, :]  # [dst, src]: u_src - u_dst
    k = jnp.floor(d + 0.5)
    table = shift_table(images)
    c = (d - k)[:, :, None, :] + table.astype(R.dtype)  # (N, N, S, 3)
    r = jnp.einsum("...j,ij->...i", c, t_disp)
    self_pair = np.eye(n, dtype=bool)[:, :, None] & np.all(table == 0, axis=1)
    mask = ((jnp.sum(r * r, axis=-1) < list_cutoff**2) & ~self_pair).reshape(-1)
    shifts = (table[None, None] - k[:, :, None].astype(jnp.int32)).reshape(-1, 3)
    count = jnp.sum(mask, dtype=jnp.int32)
    slot = jnp.where(mask, jnp.cumsum(mask) - 1, capacity)  # slot >= capacity: dropped
    ends = lambda a: jnp.asarray(np.broadcast_to(a, c.shape[:3]).reshape(-1), jnp.int32)
    dst_all, src_all = ends(np.arange(n)[:, None, None]), ends(np.arange(n)[None, :, None])
    fill = lambda a, pad: (
      jnp.full((capacity,) + a.shape[1:], pad, a.dtype).at[slot].set(a, mode="drop")
    )
    idx = jnp.stack([fill(src_all, n), fill(dst_all, n)])
    return idx, fill(shifts, 0), count

  def too_few_images(kw, images, cutoff):
    need = images_needed(box_widths_traced(box_matrix_traced(kw["box"])), cutoff, jnp)
    return jnp.any(need > jnp.asarray(images))

  def allocate(R, extra_capacity=0, **kw):
    widths = box_widths(kw["box"] if "box" in kw else bmat)
    images = tuple(int(x) for x in images_needed(widths, list_cutoff))
    R = jnp.asarray(R)
    count = int(build(R, kw, images, 0)[2])
    full = n * n * len(shift_table(images)) - n
    capacity = max(1, min(full, int(count * capacity_multiplier + n * extra_capacity)))
    idx, shifts, count = build(R, kw, images, capacity)
    error = partition.PartitionError(jnp.zeros((), jnp.uint8))
    return ImageNeighborList(
      idx=idx,
      reference_position=R,
      error=error.update(partition.PEC.NEIGHBOR_LIST_OVERFLOW, count > capacity),
      cell_list_capacity=None,
      max_occupancy=capacity,
      format=partition.Sparse,
      cell_size=None,
      cell_list_fn=None,
      update_fn=update,
      shifts=shifts,
      images=images,
    )

  def update(R, nbrs, **kw):
    if "box" in kw and not fractional:
      raise ValueError(
        "neighbour lists accept a box= keyword only with fractional "
        "coordinates (space.periodic_general(..., fractional_coordinates=True))"
      )
    error = nbrs.error
    if "box" in kw:
      # A new box moves every pair: rebuild, and say so if it needs more image shifts.
      error = error.update(
        partition.PEC.NEIGHBOR_LIST_OVERFLOW, too_few_images(kw, nbrs.images, list_cutoff)
      )

    def rebuild(R):
      idx, shifts, count = build(R, kw, nbrs.images, nbrs.max_occupancy)
      return jmd_dataclasses.replace(
        nbrs,
        idx=idx,
        shifts=shifts,
        reference_position=R,
        error=error.update(partition.PEC.NEIGHBOR_LIST_OVERFLOW, count > nbrs.max_occupancy),
      )

    if "box" in kw or dr_threshold == 0:
      return rebuild(R)
    t_pos, _ = boxes({}, R.dtype)
    du = fractional_of(R, t_pos) - fractional_of(nbrs.reference_position, t_pos)
    dx = space.raw_transform(t_pos, du - jnp.round(du))
    moved = jnp.max(jnp.sum(dx * dx, axis=-1)) > (0.5 * dr_threshold) ** 2
    return jax.lax.cond(moved, rebuild, lambda R: jmd_dataclasses.replace(nbrs, error=error), R)

  return allocate, update, too_few_images


def is_general(displacement_fn: DisplacementFn, bmat: np.ndarray) -> bool:
  """``space.periodic_general`` takes ``box=``; ``space.periodic`` raises."""
  try:
    displacement_fn(jnp.zeros(3), jnp.zeros(3), box=jnp.asarray(bmat))
  except space.UnexpectedBoxException:
    return False
  return True


def check_image_geometry(
  displacement_fn: DisplacementFn, geometry, bmat: np.ndarray, fractional: bool, general: bool
) -> None:
  """The image list computes pair vectors itself: check them against the user's space on a
  pair whose wrapped displacement crosses the box (which depends on the box)."""
  u = np.array([[0.1, 0.15, 0.2], [0.9, 0.8, 0.75]])
  R = jnp.asarray(u if fractional else u @ bmat.T)
  shift = -jnp.floor(jnp.asarray(u[1] - u[0]) + 0.5).astype(jnp.int32)[None]
  kws = [{}, {"perturbation": 1.01 * jnp.eye(3)}]
  if general and fractional:
    kws.append({"box": jnp.asarray(1.02 * bmat)})
  for kw in kws:
    ours = geometry[2](R, R, jnp.ones(1, jnp.int32), jnp.zeros(1, jnp.int32), shift, kw)[0]
    theirs = displacement_fn(R[1], R[0], **kw)
    if not np.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(bmat).max()):
      raise ValueError(
        "displacement_fn does not match the box given to neighbor_list: small boxes use a "
        "list with periodic images, which needs space.periodic(box) or "
        "space.periodic_general(box, fractional_coordinates=...) built with that same box"
      )


# --------------------------------------------------------------------------------------------
# the public constructor
