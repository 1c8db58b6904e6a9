"""Indexed operations on pair graphs: pair vectors, segment softmax, index normalisation.

Pair conventions (``docs/conventions.md``): pair ``k`` runs from the centre ``dst[k]`` (which
receives the message) to the neighbour ``src[k]``; its vector is
``r_k = R[src] - R[dst] + shifts_k @ cell``; a padded pair has ``dst = src = N``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp


def pair_vectors(
  positions: jax.Array,
  dst: jax.Array,
  src: jax.Array,
  shifts: Optional[jax.Array] = None,
  cell: Optional[jax.Array] = None,
  *,
  pair_frame: Optional[jax.Array] = None,
) -> jax.Array:
  """``R[src] - R[dst] (+ shifts @ cell)`` ``(pairs, 3)``; padded indices (>= N) read zeros.

  ``cell`` is ``(3, 3)`` (rows are lattice vectors), or ``(B, 3, 3)`` for a batch of frames
  with ``pair_frame (pairs,)`` the frame of each pair (padding ``B`` gets a zero cell).
  """
  r = jnp.take(positions, src, axis=0, mode="fill", fill_value=0) - jnp.take(
    positions, dst, axis=0, mode="fill", fill_value=0
  )
  if shifts is None:
    return r
  if cell is None:
    raise ValueError("shifts given without a cell")
  shifts, cell = shifts.astype(r.dtype), cell.astype(r.dtype)
  if pair_frame is None:
    return r + shifts @ cell
  cells = jnp.take(cell, pair_frame, axis=0, mode="fill", fill_value=0)
  return r + jnp.einsum("ei,eij->ej", shifts, cells)


def segment_softmax(
  logits: jax.Array,
  weights: Optional[jax.Array],
  valid: jax.Array,
  segment_ids: jax.Array,
  num_segments: int,
  *,
  indices_are_sorted: bool = False,
):
  """Softmax of ``logits`` within segments, each term multiplied by ``weights`` first.

  Returns ``(u, inv)`` with ``u (pairs, H)`` unnormalised terms (each <= 1) and
  ``inv (num_segments, H)`` the reciprocal of each segment's sum, so the normalised weight of
  pair k is ``u[k] * inv[segment_ids[k]]``. A segment with no active pair has ``inv = 0``.

  Pairs with ``valid == False`` or ``weights <= 0`` are inactive: they neither contribute nor
  set the stabilising shift, which is the per-segment maximum of ``logits + log(weights)``
  over active pairs (so a zero-weight pair with a huge logit cannot underflow the others).
  Gradients are finite everywhere: the shift is a constant (it cancels), inactive pairs get
  exactly zero, and ``log`` is never evaluated at 0 (weights below the dtype's smallest normal
  number are clamped to it).
  """
  dt = logits.dtype
  if weights is None:
    active = valid
    log_w = logits
  else:
    weights = weights.astype(dt)
    active = valid & (weights > 0)
    tiny = jnp.finfo(dt).tiny
    log_w = logits + jnp.log(jnp.where(active, jnp.maximum(weights, tiny), 1))[:, None]
  log_w = jnp.where(active[:, None], log_w, -jnp.inf)
  shift = jax.ops.segment_max(
    jax.lax.stop_gradient(log_w),
    segment_ids,
    num_segments=num_segments,
    indices_are_sorted=indices_are_sorted,
  )
  shift = jnp.where(jnp.isfinite(shift), shift, 0)
  shift_k = jnp.take(shift, segment_ids, axis=0, mode="clip")
  u = jnp.exp(jnp.where(active[:, None], log_w - shift_k, -jnp.inf))
  denom = jax.ops.segment_sum(
    u, segment_ids, num_segments=num_segments, indices_are_sorted=indices_are_sorted
  )
  has = denom > 0
  inv = jnp.where(has, 1 / jnp.where(has, denom, 1), 0)
  return u, inv


# ------------------------------------------------------------------ index normalisation
def flatten_batch(x: Optional[jax.Array], nbatch: int, keep: int) -> Optional[jax.Array]:
  """Merge the ``nbatch`` leading axes of ``x`` into the next one, keeping the ``keep``
  trailing axes: ``(B..., N, *tail) -> (prod(B) * N, *tail)``."""
  if x is None or nbatch == 0:
    return x
  return x.reshape((-1,) + x.shape[x.ndim - keep :])


def flat_indices(idx: jax.Array, batch_shape: Tuple[int, ...], n: int) -> jax.Array:
  """Offset per-system indices ``(B..., pairs)`` into a flat batch of ``prod(B) * n`` atoms;
  out-of-range (padding) maps to ``prod(B) * n``."""
  nb = math.prod(batch_shape)
  offsets = (jnp.arange(nb, dtype=idx.dtype) * n).reshape(batch_shape + (1,))
  flat = jnp.where(idx < n, idx + offsets, nb * n)
  return flat.reshape(-1)


def pair_scalar(c: jax.Array, pair_shape) -> jax.Array:
  """Reduce a broadcastable array (..., P[, 1, 1, 1]) to one value per pair (..., P)."""
  extra = c.ndim - len(pair_shape)
  if extra < 0 or any(s != 1 for s in c.shape[len(pair_shape) :]):
    raise ValueError(
      f"cutoff_value of shape {c.shape} does not give one value per pair "
      f"(pairs shape {tuple(pair_shape)})"
    )
  return jnp.broadcast_to(c.reshape(c.shape[: len(pair_shape)]), pair_shape)


class FlatPairs(NamedTuple):
  """A pair graph over the flattened batch: ``dst``/``src``/``valid`` are ``(pairs,)``,
  ``basis (pairs, 1, Q, K)`` and ``cut (pairs,)`` (either may be None)."""

  dst: jax.Array
  src: jax.Array
  valid: jax.Array
  basis: Optional[jax.Array]
  cut: Optional[jax.Array]
  indices_are_sorted: bool


def dense_to_sparse(
  adj_idx: jax.Array, where: Optional[jax.Array], n: int, batch_shape: Tuple[int, ...]
):
  """Dense neighbour table ``adj_idx (B..., N, M)`` as sparse ``(dst, src, mask)``, each
  ``(B..., N * M)``; ``dst`` is sorted. ``where`` defaults to ``adj_idx < N``."""
  m = adj_idx.shape[-1]
  if adj_idx.shape[:-1] != batch_shape + (n,):
    raise ValueError(
      f"adj_idx shape {adj_idx.shape} does not match {n} inputs with batch shape {batch_shape}"
    )
  if where is None:
    where = adj_idx < n
  dst = jnp.broadcast_to(jnp.arange(n, dtype=adj_idx.dtype)[:, None], adj_idx.shape)
  flat = batch_shape + (n * m,)
  return dst.reshape(flat), adj_idx.reshape(flat), where.reshape(flat)


def normalize_pairs(
  n: int,
  batch_shape: Tuple[int, ...],
  *,
  basis=None,
  cutoff_value=None,
  adj_idx=None,
  where=None,
  dst_idx=None,
  src_idx=None,
  num_segments=None,
  indices_are_sorted: bool = False,
) -> FlatPairs:
  """Dense (``adj_idx``/``where``) or sparse (``dst_idx``/``src_idx``/``where``) pairs of a
  batch of systems with ``n`` atoms each as one flat sparse list over ``prod(B) * n`` atoms.

  Pairs with an end outside ``[0, n)`` or ``where == False`` are invalid. Dense inputs have
  ``basis (B..., N, M, 1, Q, K)`` and ``cutoff_value (B..., N, M[, 1...])``, sparse ones
  ``(B..., pairs, ...)``.
  """
  nb = len(batch_shape)
  if adj_idx is not None:
    if dst_idx is not None or src_idx is not None:
      raise ValueError("give either adj_idx (dense) or dst_idx/src_idx (sparse), not both")
    m = adj_idx.shape[-1]
    dst, src, mask = dense_to_sparse(adj_idx, where, n, batch_shape)
    if basis is not None:
      basis = basis.reshape(batch_shape + (n * m,) + basis.shape[-3:])
    if cutoff_value is not None:
      cutoff_value = cutoff_value.reshape(batch_shape + (n * m,) + cutoff_value.shape[nb + 2 :])
    sorted_ = True
  else:
    if dst_idx is None or src_idx is None:
      raise RuntimeError("either adj_idx or both dst_idx and src_idx must be given")
    dst, src, mask, sorted_ = dst_idx, src_idx, where, indices_are_sorted
  if num_segments is not None and num_segments != n:
    raise ValueError(f"num_segments ({num_segments}) must equal the number of inputs ({n})")
  if dst.shape != src.shape or dst.shape[:-1] != batch_shape:
    raise ValueError(
      f"index shapes {dst.shape}/{src.shape} do not match {n} inputs with batch shape {batch_shape}"
    )
  pair_shape = dst.shape
  valid = (dst < n) & (src < n) & (dst >= 0) & (src >= 0)
  if mask is not None:
    valid = valid & jnp.broadcast_to(mask, pair_shape)
  cut = None if cutoff_value is None else pair_scalar(cutoff_value, pair_shape)
  if nb:
    dst = flat_indices(dst, batch_shape, n)
    src = flat_indices(src, batch_shape, n)
    sorted_ = False
  return FlatPairs(
    dst,
    src,
    valid.reshape(-1),
    flatten_batch(basis, nb, 3),
    None if cut is None else cut.reshape(-1),
    sorted_,
  )
