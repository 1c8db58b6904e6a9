"""Electrostatic energy of Gaussian charges: open boundaries and Ewald sums in any cell.

Units: eV, Å, elementary charges. Each atom carries a Gaussian charge of width ``sigma`` (Å);
two of them interact through ``COULOMB * q_i q_j * erf(r / (2 sigma)) / r``, which is the
Coulomb law beyond ~4 sigma and finite at contact, so a learnt short-range model owns the near
field. An atom never interacts with itself (no self-energy term), but it does with its own
periodic images. The energy of a periodic cell is the sum over all images, evaluated by
Ewald's split: the kernel is ``erf(beta r)/r = [erfc(alpha r) - erfc(beta r)]/r + erf(alpha r)/r``
(``beta = 1 / (2 sigma)``), the first part summed over pairs within ``real_cutoff`` and the
second in reciprocal space, less its own value at r = 0 (``alpha / sqrt(pi)`` per charge
squared) and, for a charged cell, the neutralising background (``-pi Q^2 / (2 V alpha^2)``).
Conditionally convergent sums are taken with conducting ("tin-foil") boundaries, the usual
choice in simulations: no dipole term.

Every function is pure in positions, charges and cell, so forces, stress (through a strain of
positions and cell) and the chain rule through charges that depend on positions come from
``jax.grad``. The reciprocal vectors are integer combinations fixed on the host
(:func:`ewald_parameters`) and scaled by the cell inside, so the energy is smooth in the cell
(NPT, stress) as long as the cell stays near the one the parameters were chosen for.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf, erfc

from . import observables, pme

COULOMB = 14.399645  # e^2 / (4 pi eps0) in eV Å (also the ZBL repulsion's, model.py)


@dataclasses.dataclass(frozen=True)
class EwaldParameters:
  """How an Ewald sum is split and truncated (chosen on the host by :func:`ewald_parameters`).

  Attributes:
    alpha: splitting parameter (1/Å): the real-space part decays as ``erfc(alpha r)``.
    real_cutoff: pairs farther apart than this (Å) are left out of the real-space part.
    kvectors: ``(K, 3)`` integer reciprocal-lattice indices of half of reciprocal space
      (``k = m @ (2 pi inv(cell).T)``; ``-m`` is counted through the factor 2).
  """

  alpha: float
  real_cutoff: float
  kvectors: np.ndarray


def ewald_parameters(cell, real_cutoff: float, accuracy: float = 1e-6) -> EwaldParameters:
  """Parameters for ``cell`` (rows are lattice vectors, Å) whose truncation errors are about
  ``accuracy`` relative to the pair energy at ``real_cutoff``: ``alpha`` such that
  ``erfc(alpha real_cutoff) ~ accuracy`` and every ``k`` with
  ``exp(-k^2 / (4 alpha^2)) > accuracy``."""
  cell = np.asarray(cell, np.float64)
  if not 0 < accuracy < 1:
    raise ValueError(f"accuracy must be in (0, 1), got {accuracy}")
  volume = abs(np.linalg.det(cell))
  if volume < 1e-9:
    raise ValueError("an Ewald sum needs a cell with a volume")
  alpha = alpha_for(real_cutoff, accuracy)
  k_cut = 2 * alpha * math.sqrt(-math.log(accuracy))
  # |m_i| <= |k| |a_i| / (2 pi): a_i . k = 2 pi m_i
  n = np.ceil(k_cut * np.linalg.norm(cell, axis=1) / (2 * math.pi)).astype(int)
  grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij"), axis=-1).reshape(
    -1, 3
  )
  recip = 2 * math.pi * np.linalg.inv(cell).T
  norms = np.linalg.norm(grid @ recip, axis=1)
  half = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0))
  half |= (grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0)
  keep = half & (norms <= k_cut)
  return EwaldParameters(float(alpha), float(real_cutoff), grid[keep].astype(np.int32))


def _kernel(r, beta):
  """``erf(beta r) / r`` with its limit ``2 beta / sqrt(pi)`` at r = 0 (padded pairs)."""
  small = r < 1e-6
  safe = jnp.where(small, 1.0, r)
  return jnp.where(small, 2 * beta / math.sqrt(math.pi), erf(beta * safe) / safe)


def open_energy(
  positions: jax.Array,
  charges: jax.Array,
  *,
  sigma: float,
  atom_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Electrostatic energy (eV) of ``(N,)`` charges at ``(N, 3)`` positions, no periodicity:
  every pair once, ``O(N^2)``. Padded atoms (``atom_mask`` False) take no part."""
  q = charges if atom_mask is None else jnp.where(atom_mask, charges, 0.0)
  d = positions[:, None, :] - positions[None, :, :]
  eye = jnp.eye(len(q), dtype=bool)
  r = jnp.sqrt(jnp.where(eye, 1.0, jnp.sum(d**2, axis=-1)))  # a safe gradient at i = j
  pair = jnp.where(eye, 0.0, q[:, None] * q[None, :] * _kernel(r, 0.5 / sigma))
  return 0.5 * COULOMB * jnp.sum(pair)


def real_space_energy(
  r: jax.Array,
  q_dst: jax.Array,
  q_src: jax.Array,
  *,
  alpha: float,
  sigma: float,
  real_cutoff: float,
) -> jax.Array:
  """The real-space part over directed pairs (both directions listed, as the model's pair
  lists; self-image pairs included): ``(1/2) k sum q_i q_j [erfc(alpha r) - erfc(beta r)]/r``
  for pairs within ``real_cutoff``. ``r`` ``(pairs, 3)``; padded pairs need zero charges."""
  term = _real_space_term(r, alpha=alpha, sigma=sigma, real_cutoff=real_cutoff)
  return 0.5 * COULOMB * jnp.sum(q_dst * q_src * term)


def _real_space_term(r, *, alpha, sigma, real_cutoff):
  """``[erfc(alpha d) - erfc(d / 2 sigma)] / d`` per pair vector ``r (pairs, 3)`` within
  ``real_cutoff``; 0 beyond it and for zero (padded) vectors."""
  d = jnp.linalg.norm(jnp.where(jnp.all(r == 0, axis=-1, keepdims=True), 1.0, r), axis=-1)
  term = (erfc(alpha * d) - erfc(0.5 / sigma * d)) / d
  return jnp.where((d <= real_cutoff) & jnp.any(r != 0, axis=-1), term, 0.0)


def _reciprocal_weight(k2, alpha):
  """``4 pi / k^2 exp(-k^2 / (4 alpha^2))``: the Gaussian-screened Coulomb kernel at ``k``."""
  return 4 * math.pi / k2 * jnp.exp(-k2 / (4 * alpha**2))


def reciprocal_energy(
  positions: jax.Array,
  charges: jax.Array,
  cell: jax.Array,
  *,
  alpha: float,
  kvectors: np.ndarray,
) -> jax.Array:
  """The reciprocal-space part, less its self term, plus the background of a charged cell:
  ``(k / V) sum_{half} (4 pi / k^2) exp(-k^2 / (4 alpha^2)) |S(k)|^2 - k alpha / sqrt(pi)
  sum q^2 - k pi Q^2 / (2 V alpha^2)``. Padded atoms need zero charges."""
  volume = jnp.abs(jnp.linalg.det(cell))
  recip = 2 * math.pi * jnp.linalg.inv(cell).T
  k = jnp.asarray(kvectors, positions.dtype) @ recip  # (K, 3)
  k2 = jnp.sum(k**2, axis=-1)
  phase = positions @ k.T  # (N, K)
  s_re, s_im = charges @ jnp.cos(phase), charges @ jnp.sin(phase)
  long = jnp.sum(_reciprocal_weight(k2, alpha) * (s_re**2 + s_im**2)) / volume
  self_ = alpha / math.sqrt(math.pi) * jnp.sum(charges**2)
  background = math.pi * jnp.sum(charges) ** 2 / (2 * volume * alpha**2)
  return COULOMB * (long - self_ - background)


def ewald_energy(
  positions: jax.Array,
  charges: jax.Array,
  cell: jax.Array,
  r: jax.Array,
  dst: jax.Array,
  src: jax.Array,
  *,
  params: EwaldParameters,
  sigma: float,
) -> jax.Array:
  """Energy (eV) of a periodic cell: :func:`real_space_energy` over the pair vectors ``r``
  ``(pairs, 3)`` of the directed pair list ``(dst, src)`` (every pair and self-image within
  ``params.real_cutoff``; padding ``N``) plus :func:`reciprocal_energy`."""
  q = lambda idx: jnp.take(charges, idx, mode="fill", fill_value=0.0)  # noqa: E731
  real = real_space_energy(
    r, q(dst), q(src), alpha=params.alpha, sigma=sigma, real_cutoff=params.real_cutoff
  )
  recip = reciprocal_energy(positions, charges, cell, alpha=params.alpha, kvectors=params.kvectors)
  return real + recip


# ------------------------------------------------------------------ per-atom, batches of frames
# What a model with learnt charges uses: every frame of a padded batch (one system is a batch
# of one) gets its own total charge, boundaries and reciprocal vectors; energies come per atom
# as ``q_i phi_i / 2`` (``phi_i``: the potential at atom i of every other charge, its images
# and, in a periodic cell, the background), which sums to the frame's energy.


class Frames(NamedTuple):
  """Per-frame data of a padded batch of ``B`` frames (one system: ``B = 1``).

  ``atom_frame (N,)`` frame of each atom (padding: ``B``); ``atom_mask (N,)``;
  ``total_charge (B,)`` in e; ``periodic (B,)`` bool (fully periodic frames take Ewald sums,
  others the open sum); ``kvectors (B, K, 3)`` integer reciprocal indices of each periodic
  frame's cell and ``kmask (B, K)`` which of them are real (:func:`kvector_table`);
  ``mesh``: None, or the spline moduli of a particle-mesh grid (:func:`reciprocal_plan`), which
  then replaces the reciprocal vectors (one grid shape for all frames)."""

  atom_frame: jax.Array
  atom_mask: jax.Array
  total_charge: jax.Array
  periodic: jax.Array
  kvectors: jax.Array
  kmask: jax.Array
  mesh: Optional[tuple] = None


def one_system(atom_mask, total_charge, periodic, kvectors, kmask, dtype, mesh=None) -> Frames:
  """:class:`Frames` of one system (``B = 1``; padded atoms, ``atom_mask`` False, in the
  padding frame): its scalar ``total_charge`` (e) and ``periodic`` flag, and its
  ``kvectors (K, 3)`` and ``kmask (K,)`` or its ``mesh`` (:func:`reciprocal_plan`)."""
  return Frames(
    atom_frame=jnp.where(atom_mask, 0, 1).astype(jnp.int32),
    atom_mask=jnp.asarray(atom_mask),
    total_charge=jnp.reshape(jnp.asarray(total_charge, dtype), (1,)),
    periodic=jnp.reshape(jnp.asarray(periodic), (1,)),
    kvectors=jnp.asarray(kvectors)[None],
    kmask=jnp.asarray(kmask)[None],
    mesh=None if mesh is None else tuple(jnp.asarray(m, dtype) for m in mesh),
  )


def checked_charge(value, name: str = "charge") -> float:
  """A structure's total charge (e) as a float, or a ValueError naming ``name``."""
  try:
    charge = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number (e), got {value!r}") from None
  if not math.isfinite(charge):
    raise ValueError(f"{name} must be finite, got {charge}")
  return charge


def alpha_for(real_cutoff: float, accuracy: float) -> float:
  """Ewald's splitting parameter (1/Å) with ``erfc(alpha real_cutoff) ~ accuracy``."""
  return math.sqrt(-math.log(accuracy)) / real_cutoff


def kvector_table(cells, periodic, real_cutoff: float, accuracy: float, capacity=None):
  """``(kvectors (B, K, 3) int32, kmask (B, K))`` of ``cells (B, 3, 3)`` (host, NumPy):
  :func:`ewald_parameters`' vectors of each periodic cell, none for the others, padded to
  ``K = capacity`` (default: the most any cell needs)."""
  cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
  periodic = np.broadcast_to(np.asarray(periodic, bool), (len(cells),))
  sets = [
    kvectors_of(c, real_cutoff, accuracy) if p else np.zeros((0, 3), np.int32)
    for c, p in zip(cells, periodic)
  ]
  need = max([len(s) for s in sets] + [0])
  k = need if capacity is None else int(capacity)
  if need > k:
    raise ValueError(f"a cell needs {need} reciprocal vectors, more than the capacity {k}")
  table, mask = np.zeros((len(cells), k, 3), np.int32), np.zeros((len(cells), k), bool)
  for b, s in enumerate(sets):
    table[b, : len(s)], mask[b, : len(s)] = s, True
  return table, mask


# The time of one PME term (a spline point of an atom, or a grid point's share of an FFT,
# ``G log2 G``) in Ewald terms (an atom and a reciprocal vector): measured, float32 energy and
# forces of the reciprocal part on 2 cores, 1e-6 accuracy: 60 ns against 2-4 ns (equal at ~24
# atoms of water density, PME 3.5x faster at 96 atoms, 15x at 375, 90x at 3000).
MESH_COST = 0.07


def reciprocal_plan(
  cells, periodic, num_atoms: int, real_cutoff: float, accuracy: float, mesh_at_least=None
):
  """``(kvectors (B, K, 3), kmask (B, K), mesh)`` of a batch of ``cells (B, 3, 3)`` (host):
  the Ewald sum's vectors (:func:`kvector_table`) and ``mesh`` None, or, where a PME grid fine
  enough for every periodic cell (:func:`pme.mesh_shape`) costs less for ``num_atoms`` atoms
  (:data:`MESH_COST`) or a grid shape ``mesh_at_least`` is given (a caller's compiled shape,
  which then only grows), no vectors (``K = 0``) and the grid's spline moduli
  (:func:`pme.moduli`)."""
  cells = np.asarray(cells, np.float64).reshape(-1, 3, 3)
  periodic = np.broadcast_to(np.asarray(periodic, bool), (len(cells),))
  if not periodic.any():
    return (*kvector_table(cells, periodic, real_cutoff, accuracy), None)
  alpha = alpha_for(real_cutoff, accuracy)
  shapes = [pme.mesh_shape(c, alpha, accuracy) for c, p in zip(cells, periodic) if p]
  shape = tuple(int(k) for k in np.max(shapes + [mesh_at_least or (0, 0, 0)], axis=0))
  if mesh_at_least is None:  # the cheaper of the two
    table, mask = kvector_table(cells, periodic, real_cutoff, accuracy)
    points = math.prod(shape)
    mesh_terms = num_atoms * pme.ORDER**3 + points * math.log2(points)
    if num_atoms * table.shape[1] <= MESH_COST * mesh_terms:
      return table, mask, None
  empty = np.zeros((len(cells), 0, 3), np.int32), np.zeros((len(cells), 0), bool)
  return (*empty, pme.moduli(shape))


def kvectors_of(cell, real_cutoff: float, accuracy: float) -> np.ndarray:
  """:func:`ewald_parameters`' ``kvectors`` of ``cell``, remembered per cell: batches are
  packed and MD steps taken many times over the same few cells."""
  cell = np.ascontiguousarray(cell, np.float64)
  return _kvectors(cell.tobytes(), float(real_cutoff), float(accuracy))


@functools.lru_cache(maxsize=4096)
def _kvectors(cell: bytes, real_cutoff: float, accuracy: float) -> np.ndarray:
  cell_array = np.frombuffer(cell, np.float64).reshape(3, 3)
  kvectors = ewald_parameters(cell_array, real_cutoff, accuracy).kvectors
  kvectors.flags.writeable = False  # shared by every caller
  return kvectors


def neutral_charges(raw: jax.Array, frames: Frames, weights=None) -> jax.Array:
  """``(N,)`` charges that sum to each frame's ``total_charge``: the raw charges less their
  frame's excess, shared in proportion to the positive ``weights`` (default: evenly), so a
  model can put a molecule's net charge on that molecule (padded atoms get 0)."""
  num = frames.total_charge.shape[0]
  seg = lambda v: jax.ops.segment_sum(v, frames.atom_frame, num_segments=num)  # noqa: E731
  raw = jnp.where(frames.atom_mask, raw, 0.0)
  w = frames.atom_mask.astype(raw.dtype) if weights is None else weights
  w = jnp.where(frames.atom_mask, w, 0.0)
  excess = (seg(raw) - frames.total_charge.astype(raw.dtype)) / jnp.maximum(seg(w), 1e-12)
  per_atom = w * jnp.take(excess, frames.atom_frame, mode="fill", fill_value=0.0)
  return jnp.where(frames.atom_mask, raw - per_atom, 0.0)


def _of_frame(values: jax.Array, frames: Frames, fill=0):
  return jnp.take(values, frames.atom_frame, axis=0, mode="fill", fill_value=fill)


def open_potentials(positions, charges, frames: Frames, *, sigma: float) -> jax.Array:
  """``(N,)`` potential (eV/e) at each atom of the other charges of its frame, for frames that
  are not periodic (0 at atoms of periodic frames); all pairs, ``O(N^2)``."""
  d = positions[:, None, :] - positions[None, :, :]
  same = frames.atom_frame[:, None] == frames.atom_frame[None, :]
  open_atom = frames.atom_mask & ~_of_frame(frames.periodic, frames, True)
  pair = same & open_atom[:, None] & open_atom[None, :] & ~jnp.eye(len(charges), dtype=bool)
  r = jnp.sqrt(jnp.where(pair, jnp.sum(d**2, axis=-1), 1.0))  # safe gradients off the pairs
  return COULOMB * jnp.sum(jnp.where(pair, _kernel(r, 0.5 / sigma) * charges[None, :], 0.0), 1)


def real_space_potentials(r, charges, dst, src, frames: Frames, *, alpha, sigma, real_cutoff):
  """``(N,)`` real-space part of the Ewald potential at each atom of a periodic frame from the
  directed pairs ``(dst, src)`` with vectors ``r (pairs, 3)`` (self-images included)."""
  n = charges.shape[0]
  periodic_atom = _of_frame(frames.periodic, frames, False)
  q_src = jnp.take(charges * periodic_atom, src, mode="fill", fill_value=0.0)
  term = _real_space_term(r, alpha=alpha, sigma=sigma, real_cutoff=real_cutoff)
  phi = jax.ops.segment_sum(q_src * term, dst, num_segments=n)
  return COULOMB * jnp.where(periodic_atom, phi, 0.0)


def reciprocal_potentials(positions, charges, cells, frames: Frames, *, alpha) -> jax.Array:
  """``(N,)`` reciprocal part of the Ewald potential at each atom of a periodic frame, with
  its self term and the share of a charged frame's background: from the reciprocal vectors,
  or from a particle-mesh grid where ``frames.mesh`` is given (:mod:`potentials.pme`)."""
  num = cells.shape[0]
  periodic = frames.periodic
  safe = jnp.where(periodic[:, None, None], cells, jnp.eye(3, dtype=cells.dtype))
  volume = jnp.abs(jnp.linalg.det(safe))  # (B,)
  if frames.mesh is None:
    long = _vector_potentials(positions, charges, safe, frames, alpha)
  else:
    q = jnp.where(_of_frame(periodic, frames, False), charges, 0.0)
    long = pme.mesh_potentials(positions, q, safe, frames.atom_frame, frames.mesh, alpha=alpha)
  seg = lambda v: jax.ops.segment_sum(v, frames.atom_frame, num_segments=num)  # noqa: E731
  total = seg(charges)
  background = math.pi * _of_frame(total / volume, frames) / alpha**2
  phi = long - 2 * alpha / math.sqrt(math.pi) * charges - background
  return COULOMB * jnp.where(_of_frame(periodic, frames, False), phi, 0.0)


def _vector_potentials(positions, charges, cells, frames: Frames, alpha) -> jax.Array:
  """``(N,)`` the reciprocal sum's long-range potential over each frame's vectors."""
  num = cells.shape[0]
  volume = jnp.abs(jnp.linalg.det(cells))  # (B,)
  recip = 2 * math.pi * jnp.swapaxes(jnp.linalg.inv(cells), 1, 2)
  k = jnp.einsum("bkm,bmj->bkj", frames.kvectors.astype(positions.dtype), recip)  # (B, K, 3)
  k2 = jnp.where(frames.kmask, jnp.sum(k**2, axis=-1), 1.0)
  weight = jnp.where(frames.kmask, _reciprocal_weight(k2, alpha), 0.0)
  phase = jnp.einsum("nj,nkj->nk", positions, _of_frame(k, frames))  # (N, K)
  cos, sin = jnp.cos(phase), jnp.sin(phase)
  seg = lambda v: jax.ops.segment_sum(v, frames.atom_frame, num_segments=num)  # noqa: E731
  s_re, s_im = seg(charges[:, None] * cos), seg(charges[:, None] * sin)  # (B, K)
  w = _of_frame(weight / volume[:, None], frames)
  return 2 * jnp.sum(w * (cos * _of_frame(s_re, frames) + sin * _of_frame(s_im, frames)), -1)


def atom_energies(
  positions, cells, r, dst, src, charges, frames: Frames, *, sigma, alpha, cutoff, any_open=True
):
  """``(N,)`` electrostatic energy of each atom, ``q_i phi_i / 2`` (eV), of neutralised
  ``charges`` in a batch of frames: the open sum in open frames, Ewald in periodic ones (its
  real-space part over the pairs given, which must hold every pair within ``cutoff``).
  ``any_open=False`` (static) skips the ``O(N^2)`` open sum where every frame is periodic."""
  phi = open_potentials(positions, charges, frames, sigma=sigma) if any_open else 0.0
  phi = phi + real_space_potentials(
    r, charges, dst, src, frames, alpha=alpha, sigma=sigma, real_cutoff=cutoff
  )
  phi = phi + reciprocal_potentials(positions, charges, cells, frames, alpha=alpha)
  return 0.5 * charges * phi


def long_range_fn(
  frames: Frames, dst, src, *, sigma: float, cutoff: float, accuracy: float, any_open=True
):
  """The ``long_range`` term of :func:`potentials.observables.compute` for a model with
  learnt charges on a batch of ``frames`` with the pair list ``(dst, src)``: the model's
  ``(raw charges, weights)`` neutralised per frame
  (:func:`neutral_charges`), their :func:`atom_energies`, and each
  atom an equal share of its frame's strain derivative not carried by pairs (the reciprocal
  and open sums'; ``docs/conventions.md``)."""
  alpha = alpha_for(cutoff, accuracy)
  num = frames.total_charge.shape[0]

  def term(positions, cell, r, charges) -> observables.LongRange:
    raw, weights = charges
    q = neutral_charges(raw, frames, weights)
    cells = cell if cell.ndim == 3 else cell[None]
    e = atom_energies(
      positions,
      cells,
      r,
      dst,
      src,
      q,
      frames,
      sigma=sigma,
      alpha=alpha,
      cutoff=cutoff,
      any_open=any_open,
    )
    mask = frames.atom_mask.astype(positions.dtype)
    count = jax.ops.segment_sum(mask, frames.atom_frame, num_segments=num)
    shares = mask / _of_frame(jnp.maximum(count, 1.0), frames, 1.0)
    return observables.LongRange(e, q, shares)

  return term


def model_long_range_fn(config, frames: Frames, dst, src, any_open=True):
  """:func:`long_range_fn` with the settings of a model's config (``ModelConfig``): Gaussian
  width ``charge_width``, real-space cutoff = the model's cutoff, ``ewald_accuracy``."""
  return long_range_fn(
    frames,
    dst,
    src,
    sigma=config.charge_width,
    cutoff=config.cutoff,
    accuracy=config.ewald_accuracy,
    any_open=any_open,
  )
