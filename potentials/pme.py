"""Smooth particle-mesh Ewald (PME): the reciprocal part of an Ewald sum on a grid.

The Ewald sum's reciprocal part costs ``O(N K)`` for ``K`` reciprocal vectors, and ``K`` grows
with the cell's volume, so a large cell costs ``O(N^2)``. PME (Essmann et al., J. Chem. Phys.
103, 8577 (1995)) spreads the charges onto a periodic grid with cardinal B-splines of order
``ORDER``, convolves them with the screened Coulomb kernel by FFT and interpolates the potential
back at the atoms with the same splines: ``O(N p^3 + G log G)`` for ``G`` grid points. The
spline's smoothing of the structure factor is undone by its Euler exponential moduli
``|b(m)|^2`` (:func:`moduli`), which depend only on the grid's size, so the host computes them
once and they travel as arguments whose lengths are the grid's shape (static under ``jit``).

Everything inside is pure in positions, charges and cell: forces, stress (positions and cell
strained together leave the fractional coordinates, hence the spreading, unchanged; the kernel
sees the cell) and the chain rule through learnt charges come from ``jax.grad``. B-splines of
order ``p`` are ``p - 2`` times continuously differentiable, so energies and forces are
continuous as atoms cross grid cells.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ORDER = 6  # spline order: even (the moduli of odd orders vanish at the Nyquist frequency)


def spline_weights(frac: jax.Array, order: int = ORDER) -> jax.Array:
  """``(..., order)`` values ``M_order(frac + j)`` of the cardinal B-spline for ``frac`` in
  ``[0, 1)`` and every ``j < order`` (they sum to 1): the weights of the grid points
  ``floor(u) - j`` for an atom at grid coordinate ``u``."""
  xp = jnp if isinstance(frac, jax.Array) else np
  w = xp.stack([frac, 1 - frac], axis=-1)  # order 2: M_2(x) = x on [0, 1), 2 - x on [1, 2)
  for n in range(3, order + 1):
    x = frac[..., None] + xp.arange(n, dtype=w.dtype)
    zero = xp.zeros(w.shape[:-1] + (1,), w.dtype)
    below, shifted = xp.concatenate([w, zero], -1), xp.concatenate([zero, w], -1)
    w = (x * below + (n - x) * shifted) / (n - 1)
  return w


def moduli(shape: tuple[int, ...], order: int = ORDER) -> tuple[np.ndarray, ...]:
  """``|b_d(m)|^2`` for every frequency ``m`` (NumPy's FFT order) of a grid of ``shape``:
  ``1 / |sum_k M_order(k + 1) exp(2 pi i m k / K)|^2``; remembered per shape."""
  return tuple(_moduli(int(k), int(order)) for k in shape)


@functools.lru_cache(maxsize=256)
def _moduli(size: int, order: int) -> np.ndarray:
  values = spline_weights(np.zeros(()), order)[1:]  # M(1) .. M(order - 1)
  m = np.arange(size)
  phase = np.exp(2j * np.pi * np.outer(m, np.arange(order - 1)) / size)
  out = 1.0 / np.abs(phase @ values) ** 2
  out.flags.writeable = False  # shared by every caller
  return out


def mesh_shape(cell, alpha: float, accuracy: float) -> tuple[int, int, int]:
  """Grid points along each lattice vector of ``cell`` (rows, Å) for an Ewald splitting
  ``alpha`` (1/Å): the smallest even FFT-friendly size (at least ``2 ORDER``) at which every
  frequency's interpolation error, about ``2 (x / (1 - x))^ORDER`` of its term for ``x = |m| /
  K``, weighted by the term's Gaussian ``exp(-k^2 / 4 alpha^2)``, stays below ``accuracy``."""
  spacing = 1.0 / np.linalg.norm(np.linalg.inv(np.asarray(cell, np.float64)), axis=0)
  return tuple(_size_for(2 * math.pi / float(d), alpha, accuracy) for d in spacing)


@functools.lru_cache(maxsize=4096)  # asked at every calculator call, mostly of the same cell
def _size_for(k_step: float, alpha: float, accuracy: float) -> int:
  """The grid size along one direction whose frequencies ``m k_step`` (1/Å) meet
  :func:`mesh_shape`'s error bound."""
  size = _fft_size(2 * ORDER)
  while True:
    m = np.arange(1, size // 2 + 1)
    x = m / size
    error = np.exp(-((m * k_step) ** 2) / (4 * alpha**2)) * 2 * (x / (1 - x)) ** ORDER
    if error.max() <= accuracy:
      return size
    size = _fft_size(size + 1)


def _fft_size(n: int) -> int:
  """The smallest even ``2^a 3^b 5^c`` at least ``n``."""
  while True:
    m = n
    for p in (2, 3, 5):
      while m % p == 0:
        m //= p
    if m == 1 and n % 2 == 0:
      return n
    n += 1


def mesh_potentials(
  positions: jax.Array,
  charges: jax.Array,
  cells: jax.Array,
  atom_frame: jax.Array,
  spline_moduli: tuple[jax.Array, ...],
  *,
  alpha: float,
) -> jax.Array:
  """``(N,)`` long-range part of the reciprocal Ewald potential at each atom (eV/e before the
  Coulomb constant; no self or background term): ``(1 / V) sum_{m != 0} (4 pi / k^2)
  exp(-k^2 / 4 alpha^2) Re[exp(i k r_i) S(k)*]``, with ``S`` from the grid.

  ``positions (N, 3)``, ``charges (N,)`` (zero where an atom takes no part), ``cells (B, 3, 3)``
  (rows: lattice vectors; non-singular), ``atom_frame (N,)`` each atom's frame (``B``: padding),
  ``spline_moduli``: :func:`moduli` of the grid, one shape for all ``B`` frames."""
  shape = tuple(m.shape[0] for m in spline_moduli)
  num = cells.shape[0]
  frame = jnp.clip(atom_frame, 0, num - 1)
  inv = jnp.linalg.inv(cells)  # (B, 3, 3)
  u = jnp.einsum("nj,njk->nk", positions, inv[frame]) * jnp.asarray(shape, positions.dtype)
  base = jnp.floor(u)
  w = spline_weights(u - base, ORDER)  # (N, 3, p): gradients flow through the fraction only
  idx = (base.astype(jnp.int32)[..., None] - jnp.arange(ORDER)) % jnp.asarray(shape)[:, None]
  flat = _flat_index(atom_frame, idx, shape)  # (N, p, p, p); padding beyond the grid
  weight = w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
  size = num * math.prod(shape)
  grid = (
    jnp.zeros(size, positions.dtype)
    .at[flat.ravel()]
    .add((charges[:, None, None, None] * weight).ravel(), mode="drop")
  )
  grid = grid.reshape((num,) + shape)
  kernel = _kernel(cells, shape, spline_moduli, alpha)  # (B, K1, K2, K3 // 2 + 1)
  conv = jnp.fft.irfftn(jnp.fft.rfftn(grid, axes=(1, 2, 3)) * kernel, s=shape, axes=(1, 2, 3))
  volume = jnp.abs(jnp.linalg.det(cells))
  scale = math.prod(shape) / volume  # irfftn's 1/G undone, the Ewald sum's 1/V
  at_atoms = jnp.take(conv.ravel(), flat, mode="fill", fill_value=0.0)
  return scale[frame] * jnp.sum(at_atoms * weight, axis=(1, 2, 3))


def _flat_index(atom_frame, idx, shape):
  """``(N, p, p, p)`` index into the ``(B, K1, K2, K3)`` grids of each atom's spline points."""
  k1, k2, k3 = shape
  i0 = atom_frame[:, None, None, None] * k1 + idx[:, 0, :, None, None]
  return ((i0 * k2 + idx[:, 1, None, :, None]) * k3) + idx[:, 2, None, None, :]


def _kernel(cells, shape, spline_moduli, alpha):
  """``(4 pi / k^2) exp(-k^2 / 4 alpha^2) |b(m)|^2`` on the real-FFT half grid of each frame
  (0 at ``m = 0``)."""
  dtype = cells.dtype
  m = [np.fft.fftfreq(k, 1.0 / k) for k in shape[:2]] + [np.fft.rfftfreq(shape[2], 1.0 / shape[2])]
  grid_m = np.stack(np.meshgrid(*m, indexing="ij"), axis=-1)  # (K1, K2, K3h, 3)
  recip = 2 * math.pi * jnp.swapaxes(jnp.linalg.inv(cells), 1, 2)  # (B, 3, 3) rows: b_d
  k = jnp.einsum("xyzd,bdj->bxyzj", jnp.asarray(grid_m, dtype), recip)
  k2 = jnp.sum(k**2, axis=-1)
  origin = np.zeros(grid_m.shape[:3], bool)
  origin[0, 0, 0] = True
  safe = jnp.where(origin, 1.0, k2)
  b1, b2, b3 = spline_moduli
  b3 = b3[: grid_m.shape[2]]
  bb = b1[:, None, None] * b2[None, :, None] * b3[None, None, :]
  return jnp.where(origin, 0.0, 4 * math.pi / safe * jnp.exp(-safe / (4 * alpha**2)) * bb)
