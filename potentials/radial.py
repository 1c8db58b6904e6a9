"""Radial basis functions, smooth cutoffs and the radial x angular pair basis.

Radial functions have the signature ``radial_fn(r, num) -> (..., num)`` (extra parameters via
``functools.partial``), cutoff functions ``cutoff_fn(r) -> (...)``; both are finite with finite
gradients for every ``r >= 0``, including ``r = 0`` and exactly at the cutoff.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from . import so3

RadialFn = Callable[[jax.Array, int], jax.Array]
CutoffFn = Callable[[jax.Array], jax.Array]


def reciprocal_bernstein(r: jax.Array, num: int) -> jax.Array:
  """Bernstein polynomials of degree ``num - 1`` in ``t = 1 - 1/(1 + r)``: ``(...) -> (..., num)``.

  ``t`` maps ``[0, inf)`` onto ``[0, 1)``, so the functions resolve short distances finely and
  decay smoothly; they sum to 1 for every r (partition of unity).
  """
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  t = 1 - 1 / (1 + r)
  s = 1 - t
  n = num - 1
  # Integer powers (lax.integer_pow) keep the gradient of t**0 at t = 0 finite.
  return jnp.stack([math.comb(n, k) * t**k * s ** (n - k) for k in range(num)], axis=-1)


def bessel(r: jax.Array, num: int, cutoff: float = 5.0) -> jax.Array:
  """Spherical Bessel functions of order 0 with zeros at the cutoff:
  ``sqrt(2/rc) * sin(k pi r / rc) / r`` for ``k = 1..num`` (``(...) -> (..., num)``).

  Written with ``sinc`` so the value ``sqrt(2/rc) * k pi / rc`` at r = 0 is exact and smooth.
  """
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  k = jnp.arange(1, num + 1, dtype=r.dtype)
  x = r[..., None] / cutoff
  return math.sqrt(2.0 / cutoff) * (k * jnp.pi / cutoff) * jnp.sinc(k * x)


def gaussian(r: jax.Array, num: int, cutoff: float = 5.0) -> jax.Array:
  """Gaussians on an even grid over ``[0, cutoff]`` with width equal to the spacing."""
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  centers = jnp.linspace(0.0, cutoff, num, dtype=r.dtype)
  width = cutoff / max(num - 1, 1)
  return jnp.exp(-0.5 * ((r[..., None] - centers) / width) ** 2)


def smooth_cutoff(r: jax.Array, cutoff: float = 1.0) -> jax.Array:
  """C-infinity bump ``exp(1 - 1/(1 - (r/rc)**2))`` for r < rc, else 0; equals 1 at r = 0."""
  x = r / cutoff
  inside = x < 1
  x2 = jnp.where(inside, x * x, 0.0)  # keep the unused branch finite for gradients
  return jnp.where(inside, jnp.exp(1 - 1 / (1 - x2)), 0.0)


def cosine_cutoff(r: jax.Array, cutoff: float = 1.0) -> jax.Array:
  """``0.5 (cos(pi r/rc) + 1)`` for r < rc, else 0 (C1 at the cutoff)."""
  x = jnp.minimum(r / cutoff, 1.0)
  return jnp.where(r < cutoff, 0.5 * (jnp.cos(jnp.pi * x) + 1), 0.0)


def basis(
  r: jax.Array,
  *,
  max_degree: int,
  num: int,
  radial_fn: RadialFn,
  cutoff_fn: Optional[CutoffFn] = None,
  return_cutoff: bool = False,
  cartesian_order: bool = True,
  normalization: str = "racah",
):
  """Radial x angular basis of pair vectors: ``(..., 3) -> (..., 1, (L+1)**2, num)``.

  ``out[..., 0, lm, k] = Y_lm(r/|r|) * radial_fn(|r|, num)[k] * cutoff_fn(|r|)``. With
  ``return_cutoff=True`` also returns the cutoff values ``(...)`` (1 when ``cutoff_fn`` is None),
  which :class:`potentials.SelfAttention` takes as ``cutoff_value``.
  """
  ylm, rbf, cut = basis_parts(
    r,
    max_degree=max_degree,
    num=num,
    radial_fn=radial_fn,
    cutoff_fn=cutoff_fn,
    cartesian_order=cartesian_order,
    normalization=normalization,
  )
  out = combine(ylm, rbf * cut[..., None])
  return (out, cut) if return_cutoff else out


def basis_parts(
  r: jax.Array,
  *,
  max_degree: int,
  num: int,
  radial_fn: RadialFn,
  cutoff_fn: Optional[CutoffFn] = None,
  cartesian_order: bool = True,
  normalization: str = "racah",
):
  """The factors of :func:`basis`: ``ylm (..., (L+1)**2)``, the radial functions without the
  cutoff ``rbf (..., num)`` and the cutoff values ``(...)`` (1 when ``cutoff_fn`` is None)."""
  if r.shape[-1] != 3:
    raise ValueError(f"r must have shape (..., 3), got {r.shape}")
  norm = so3.safe_norm(r)
  rbf = radial_fn(norm, num)
  cut = jnp.ones_like(norm) if cutoff_fn is None else cutoff_fn(norm)
  ylm = so3.spherical_harmonics(
    r, max_degree, cartesian_order=cartesian_order, normalization=normalization
  )
  return ylm, rbf, cut


def combine(ylm: jax.Array, radial: jax.Array) -> jax.Array:
  """``ylm (..., Q), radial (..., K) -> (..., 1, Q, K)``: the product basis layout."""
  return (ylm[..., :, None] * radial[..., None, :])[..., None, :, :]
