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
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf, erfc

COULOMB = 14.399645  # e^2 / (4 pi eps0) in eV Å (the ZBL repulsion of model.py uses the same)


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
  p = math.sqrt(-math.log(accuracy))
  alpha = p / real_cutoff
  k_cut = 2 * alpha * p
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
  d = jnp.linalg.norm(jnp.where(jnp.all(r == 0, axis=-1, keepdims=True), 1.0, r), axis=-1)
  beta = 0.5 / sigma
  term = (erfc(alpha * d) - erfc(beta * d)) / d
  term = jnp.where((d <= real_cutoff) & jnp.any(r != 0, axis=-1), term, 0.0)
  return 0.5 * COULOMB * jnp.sum(q_dst * q_src * term)


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
  weight = 4 * math.pi / k2 * jnp.exp(-k2 / (4 * alpha**2))
  long = jnp.sum(weight * (s_re**2 + s_im**2)) / volume
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
