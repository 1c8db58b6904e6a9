"""Boxes and image tables shared by eqattn's neighbour lists (JAX-MD image lists, replica
lists): a JAX-MD box as a matrix, its perpendicular widths, how many periodic images a cutoff
reaches, and the table of image shifts.

A box is JAX-MD's: a scalar, ``(3,)`` side lengths, or a ``(3, 3)`` matrix whose *columns* are
the lattice vectors (ASE's ``cell.T``).
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "box_matrix",
  "box_matrix_traced",
  "box_widths",
  "box_widths_traced",
  "check_box",
  "images_needed",
  "shift_table",
]

Array = jax.Array
Box = Any


def box_matrix(box: Box) -> np.ndarray:
  """JAX-MD box (scalar, ``(3,)`` or ``(3, 3)``) as a float64 ``(3, 3)`` matrix whose *columns*
  are the lattice vectors (``x = box @ u`` for fractional ``u``; ASE's ``cell.T``)."""
  b = np.asarray(box, dtype=np.float64)
  if b.ndim == 0:
    b = np.full(3, float(b))
  if b.ndim == 1:
    if b.shape != (3,):
      raise ValueError(f"box side lengths must have shape (3,), got {b.shape}")
    b = np.diag(b)
  if b.shape != (3, 3):
    raise ValueError(
      f"box must be a scalar, a (3,) vector or a (3, 3) matrix; got shape "
      f"{b.shape} (eqattn's JAX-MD plugin is three-dimensional)"
    )
  if not np.all(np.isfinite(b)):
    raise ValueError(f"box contains non-finite values:\n{b}")
  return b


def box_widths(box: Box) -> np.ndarray:
  """Perpendicular widths ``(3,)`` (Å) of the box: the distance between opposite faces, i.e.
  ``V / |a_j x a_k|`` = ``1 / |row i of box^-1|``. Zero for a singular box."""
  b = box_matrix(box)
  if abs(np.linalg.det(b)) <= 1e-12 * max(np.abs(b).max(), 1e-300) ** 3:
    return np.zeros(3)
  return 1.0 / np.linalg.norm(np.linalg.inv(b), axis=1)


def box_widths_traced(box: Array) -> Array:
  """Traceable :func:`box_widths` for a box passed at call time (NPT changes it every step)."""
  box = jnp.asarray(box)
  if box.ndim == 0:
    return jnp.full((3,), box)
  if box.ndim == 1:
    return box
  return 1.0 / jnp.linalg.norm(jnp.linalg.inv(box), axis=1)


def check_box(box: Box, cutoff: float, dr_threshold: float = 0.0) -> None:
  """Raise ``ValueError`` unless every perpendicular width of ``box`` is at least
  ``2 * (cutoff + dr_threshold)``, the limit of JAX-MD's minimum image convention (its own
  neighbour list and displacement functions). :func:`plugin.jax_md.neighbor_list` does not need
  it: it switches to an image list (:mod:`plugin.neighbors.images`) below that width."""
  widths = box_widths(box)
  need = 2.0 * (cutoff + dr_threshold)
  if np.all(widths >= need):
    return
  if np.any(widths <= 0):
    raise ValueError(f"box is singular (zero volume):\n{box_matrix(box)}")
  axis = int(np.argmin(widths))
  reps = tuple(max(1, math.ceil(need / w)) for w in widths)
  raise ValueError(
    f"box too small for JAX-MD's minimum image convention: its perpendicular width across "
    f"lattice vector {axis} (the distance between the two faces that vector crosses) is "
    f"{widths[axis]:.4g} Å, but 2 * (cutoff {cutoff:g} Å + "
    f"dr_threshold {dr_threshold:g} Å) = {need:.4g} Å is needed (widths: "
    f"{np.array2string(widths, precision=4)} Å). Pairs with periodic images would be missed "
    f"silently. Fix: simulate a supercell, e.g. atoms.repeat({reps}) in ASE, replicating "
    f"positions and species accordingly (or use a smaller dr_threshold if that suffices)."
  )


def box_matrix_traced(box: Array, dtype=None) -> Array:
  box = jnp.asarray(box, dtype)
  if box.ndim == 0:
    return box * jnp.eye(3, dtype=dtype)
  if box.ndim == 1:
    return jnp.diag(box)
  return box


def images_needed(widths, list_cutoff: float, xp=np):
  """Largest image shift per lattice vector that can hold a pair within ``list_cutoff`` once
  fractional differences are wrapped into [-1/2, 1/2): ``|n| - 1/2 < list_cutoff / width``
  (generous by a hair at equality, never short)."""
  return xp.floor(list_cutoff / widths + 0.5 + 1e-6)


def shift_table(images: Tuple[int, int, int]) -> np.ndarray:
  """Every image shift ``(S, 3)`` int32 with ``|n_k| <= images[k]`` per lattice vector."""
  ranges = [np.arange(-k, k + 1) for k in images]
  return np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3).astype(np.int32)
