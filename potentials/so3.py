"""Real spherical harmonics, rotation matrices of irreps and Clebsch-Gordan coefficients.

Conventions (see ``docs/conventions.md``):

* Degree/order axis: all blocks ``l = 0..L`` concatenated, ``(L+1)**2`` entries.
  Standard order runs ``m = -l..l``; Cartesian order (the default, ``cartesian_order=True``)
  runs ``m = l, -l, l-1, -(l-1), ..., 0`` so that the ``l = 1`` block is ``(x, y, z)``.
* Normalisation ``'racah'`` (default, Schmidt semi-normalised): on the unit sphere
  ``sum_m Y_lm(u)**2 == 1`` and ``int Y_lm Y_l'm' dOmega = 4 pi / (2l+1) delta delta``.
  ``'4pi'`` multiplies degree ``l`` by ``sqrt(2l+1)`` (orthogonal with norm ``4 pi``),
  ``'orthonormal'`` by ``sqrt((2l+1) / (4 pi))``.

Everything that is a constant of the basis (polynomial coefficients, generators, coupling
coefficients) is computed once in float64 NumPy and cached; JAX code only sees constants.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# monomial exponents (a, b, c) of x^a y^b z^c -> coefficient
Poly = Dict[Tuple[int, int, int], float]

NORMALIZATIONS = ("racah", "4pi", "orthonormal")


# ----------------------------------------------------------------------------- polynomials
def _padd(*terms: Tuple[float, Poly]) -> Poly:
  out: Poly = {}
  for scale, p in terms:
    for k, v in p.items():
      out[k] = out.get(k, 0.0) + scale * v
  return {k: v for k, v in out.items() if v != 0.0}


def _pmul_var(p: Poly, axis: int) -> Poly:
  out: Poly = {}
  for k, v in p.items():
    kk = list(k)
    kk[axis] += 1
    out[tuple(kk)] = v
  return out


def _pmul_r2(p: Poly) -> Poly:
  return _padd(*((1.0, _pmul_var(_pmul_var(p, a), a)) for a in range(3)))


@functools.lru_cache(maxsize=None)
def _solid_harmonics(max_degree: int) -> Tuple[Tuple[Poly, ...], ...]:
  """Racah-normalised regular solid harmonics S_lm as polynomials, standard order m=-l..l.

  Built with the standard three-term recursion (sectoral terms from x and y, the rest from z
  and r^2), which keeps the real phase convention with S_1 = (y, z, x) in standard order.
  """
  S = [{0: {(0, 0, 0): 1.0}}]  # S[l][m]
  for l in range(max_degree):
    cur, nxt = S[l], {}
    f = math.sqrt((2.0 if l == 0 else 1.0) * (2 * l + 1) / (2 * l + 2))
    d = 0.0 if l == 0 else 1.0
    nxt[l + 1] = _padd((f, _pmul_var(cur[l], 0)), (-f * d, _pmul_var(cur[-l], 1)))
    nxt[-l - 1] = _padd((f, _pmul_var(cur[l], 1)), (f * d, _pmul_var(cur[-l], 0)))
    for m in range(-l, l + 1):
      terms = [((2 * l + 1), _pmul_var(cur[m], 2))]
      if abs(m) <= l - 1:
        terms.append((-math.sqrt((l + m) * (l - m)), _pmul_r2(S[l - 1][m])))
      nxt[m] = _padd(*terms)
      norm = 1.0 / math.sqrt((l + m + 1) * (l - m + 1))
      nxt[m] = {k: v * norm for k, v in nxt[m].items()}
    S.append(nxt)
  return tuple(tuple(S[l][m] for m in range(-l, l + 1)) for l in range(max_degree + 1))


def _monomials(l: int):
  return [(a, b, l - a - b) for a in range(l, -1, -1) for b in range(l - a, -1, -1)]


def cartesian_permutation(max_degree: int) -> np.ndarray:
  """Indices that reorder standard order (m=-l..l) into Cartesian order, for all degrees."""
  perm = []
  for l in range(max_degree + 1):
    order = []
    for m in range(l, 0, -1):
      order += [m, -m]
    order.append(0)
    perm += [l * l + (m + l) for m in order]
  return np.asarray(perm, dtype=np.int64)


def degree_of_index(max_degree: int) -> np.ndarray:
  """Degree l of every entry of the (L+1)**2 axis (same in both orderings)."""
  return np.concatenate([np.full(2 * l + 1, l) for l in range(max_degree + 1)])


def _norm_factors(max_degree: int, normalization: str) -> np.ndarray:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  ls = np.arange(max_degree + 1, dtype=np.float64)
  if normalization == "racah":
    return np.ones_like(ls)
  if normalization == "4pi":
    return np.sqrt(2 * ls + 1)
  return np.sqrt((2 * ls + 1) / (4 * np.pi))


@functools.lru_cache(maxsize=None)
def _sh_tables(max_degree: int, cartesian_order: bool, normalization: str):
  """Exponent table (M, 3) and coefficient matrix (M, (L+1)**2) for all harmonics."""
  mons = [m for l in range(max_degree + 1) for m in _monomials(l)]
  index = {m: i for i, m in enumerate(mons)}
  coeff = np.zeros((len(mons), (max_degree + 1) ** 2))
  sh = _solid_harmonics(max_degree)
  for l in range(max_degree + 1):
    for i, poly in enumerate(sh[l]):
      for k, v in poly.items():
        coeff[index[k], l * l + i] = v
  coeff *= _norm_factors(max_degree, normalization)[degree_of_index(max_degree)][None, :]
  if cartesian_order:
    coeff = coeff[:, cartesian_permutation(max_degree)]
  return np.asarray(mons, dtype=np.int64), coeff


def safe_norm(r: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """Euclidean norm whose gradient is 0 (not NaN) at r = 0."""
  r2 = jnp.sum(r * r, axis=axis, keepdims=keepdims)
  pos = r2 > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, r2, 1)), 0)


def solid_harmonics(
  r: jax.Array,
  max_degree: int,
  *,
  cartesian_order: bool = True,
  normalization: str = "racah",
) -> jax.Array:
  """Regular solid harmonics ``|r|**l Y_lm(r/|r|)``: shape ``(..., 3) -> (..., (L+1)**2)``."""
  if r.shape[-1] != 3:
    raise ValueError(f"r must have shape (..., 3), got {r.shape}")
  if max_degree < 0:
    raise ValueError(f"max_degree must be >= 0, got {max_degree}")
  mons, coeff = _sh_tables(max_degree, cartesian_order, normalization)
  # Powers 0..L of each coordinate: (..., 3, L+1).
  powers = [jnp.ones_like(r)]
  for _ in range(max_degree):
    powers.append(powers[-1] * r)
  powers = jnp.stack(powers, axis=-1)
  monomials = powers[..., 0, mons[:, 0]] * powers[..., 1, mons[:, 1]] * powers[..., 2, mons[:, 2]]
  return jnp.einsum(
    "...m,mk->...k",
    monomials,
    jnp.asarray(coeff, dtype=r.dtype),
    precision=jax.lax.Precision.HIGHEST,
  )


def spherical_harmonics(
  r: jax.Array,
  max_degree: int,
  *,
  r_is_normalized: bool = False,
  cartesian_order: bool = True,
  normalization: str = "racah",
) -> jax.Array:
  """Real spherical harmonics of the direction of ``r``: ``(..., 3) -> (..., (L+1)**2)``.

  At ``r = 0`` (no direction) every degree ``l > 0`` is 0 and ``Y_00`` keeps its value; values
  and gradients are finite there.
  """
  if not r_is_normalized:
    norm = safe_norm(r, keepdims=True)
    r = r / jnp.where(norm > 0, norm, 1)
  return solid_harmonics(
    r, max_degree, cartesian_order=cartesian_order, normalization=normalization
  )


# ----------------------------------------------------------------------------- rotations
def _sh_numpy(points: np.ndarray, max_degree: int, cartesian_order: bool) -> np.ndarray:
  mons, coeff = _sh_tables(max_degree, cartesian_order, "racah")
  u = points / np.linalg.norm(points, axis=-1, keepdims=True)
  mono = np.prod(u[:, None, :] ** mons[None, :, :], axis=-1)
  return mono @ coeff


@functools.lru_cache(maxsize=None)
def _sample_points(n: int = 256) -> np.ndarray:
  return np.random.default_rng(1234).normal(size=(n, 3))


def wigner_d(rot: np.ndarray, max_degree: int, *, cartesian_order: bool = True) -> np.ndarray:
  """Block-diagonal ``((L+1)**2, (L+1)**2)`` matrix D with ``Y(rot @ u) = D @ Y(u)``.

  ``rot`` is any orthogonal 3x3 matrix; for an improper one (det -1) degree l picks up
  ``(-1)**l`` as the harmonics do. Features of parity ``p`` transform with
  ``p * (-1)**l * D_l`` (see :func:`feature_transform`).
  """
  rot = np.asarray(rot, dtype=np.float64)
  pts = _sample_points()
  a = _sh_numpy(pts, max_degree, cartesian_order)
  b = _sh_numpy(pts @ rot.T, max_degree, cartesian_order)
  d = np.zeros(((max_degree + 1) ** 2,) * 2)
  for l in range(max_degree + 1):
    s = slice(l * l, (l + 1) ** 2)
    sol, *_ = np.linalg.lstsq(a[:, s], b[:, s], rcond=None)
    d[s, s] = sol.T
  return d


def parities(num_parity: int, max_degree: int) -> np.ndarray:
  """Parity (+1/-1) of every (parity channel, degree/order) entry: shape (P, (L+1)**2)."""
  ls = degree_of_index(max_degree)
  if num_parity == 1:
    return ((-1.0) ** ls)[None, :]
  if num_parity == 2:
    return np.stack([np.ones(len(ls)), -np.ones(len(ls))])
  raise ValueError(f"parity axis must have size 1 or 2, got {num_parity}")


def feature_transform(
  rot: np.ndarray, num_parity: int, max_degree: int, *, cartesian_order: bool = True
) -> np.ndarray:
  """Matrices (P, Q, Q) that act on features (..., P, Q, F) under the orthogonal map ``rot``."""
  d = wigner_d(rot, max_degree, cartesian_order=cartesian_order)
  det = np.sign(np.linalg.det(rot))
  ls = degree_of_index(max_degree)
  # D from the harmonics already carries (-1)**l for improper maps; remove it, apply parity.
  par = parities(num_parity, max_degree) * (det**ls)[None, :]
  return np.where(det < 0, par[:, :, None], 1.0) * d[None]


def random_rotation(seed: int, *, reflect: bool = False) -> np.ndarray:
  """A Haar-random proper rotation (or, with ``reflect``, improper orthogonal) 3x3 matrix."""
  q, rr = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  q = q * np.sign(np.diag(rr))[None, :]
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return -q if reflect else q


# ----------------------------------------------------------------------------- coupling
@functools.lru_cache(maxsize=None)
def _generators(l: int, cartesian_order: bool) -> np.ndarray:
  """Generators (3, 2l+1, 2l+1) with ``grad Y_l(r) . (axis x r) = J_axis @ Y_l(r)``.

  The harmonics are polynomials, so the gradient is exact; the least-squares fit over
  sample points only expresses it in the harmonic basis.
  """
  mons, coeff = _sh_tables(l, cartesian_order, "racah")
  coeff = coeff[:, l * l :]
  pts = _sample_points()
  pts = pts / np.linalg.norm(pts, axis=-1, keepdims=True)
  y = _sh_numpy(pts, l, cartesian_order)[:, l * l :]
  grad = np.zeros((len(pts), 3, 2 * l + 1))
  for k in range(3):
    dm = mons.copy()
    fac = dm[:, k].astype(np.float64)
    dm[:, k] = np.maximum(dm[:, k] - 1, 0)
    mono = fac[None, :] * np.prod(pts[:, None, :] ** dm[None, :, :], axis=-1)
    grad[:, k, :] = mono @ coeff
  out = []
  for axis in np.eye(3):
    dy = np.einsum("pk,pkm->pm", np.cross(axis[None, :], pts), grad)
    sol, *_ = np.linalg.lstsq(y, dy, rcond=None)
    out.append(sol.T)
  return np.stack(out)


@functools.lru_cache(maxsize=None)
def clebsch_gordan(l1: int, l2: int, l3: int, cartesian_order: bool = True) -> np.ndarray:
  """Real coupling tensor C (2l1+1, 2l2+1, 2l3+1) for the harmonics of this module.

  ``z_m3 = sum C[m1, m2, m3] x_m1 y_m2`` is equivariant: rotating x (degree l1) and y (degree
  l2) rotates z as degree l3. It is zero unless ``|l1-l2| <= l3 <= l1+l2``. Normalised so that
  ``C`` is an isometry onto degree l3 (``sum_{m1,m2} C[..., m3]**2 == 1``), with the sign fixed
  by making the first entry of magnitude > 1e-6 positive. Parity is not part of C: the
  product of parities p1*p2 gives the output's parity (see :func:`coupling_paths`).
  """
  dims = (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
  if not abs(l1 - l2) <= l3 <= l1 + l2:
    return np.zeros(dims)
  j1, j2, j3 = (_generators(l, cartesian_order) for l in (l1, l2, l3))
  i1, i2, i3 = (np.eye(d) for d in dims)
  gram = np.zeros((math.prod(dims),) * 2)
  for a in range(3):
    m = (
      np.kron(np.kron(j1[a].T, i2), i3)
      + np.kron(np.kron(i1, j2[a].T), i3)
      - np.kron(np.kron(i1, i2), j3[a])
    )
    gram += m.T @ m
  # The invariant is the null vector of sum_a M_a^T M_a (eigh of a d x d matrix is cheap).
  evals, evecs = np.linalg.eigh(gram)
  if evals[0] > 1e-8 or (len(evals) > 1 and evals[1] < 1e-4):
    raise RuntimeError(f"coupling ({l1},{l2},{l3}) is not one-dimensional: {evals[:2]}")
  c = evecs[:, 0].reshape(dims)
  c *= math.sqrt(dims[2]) / np.linalg.norm(c)
  c[np.abs(c) < 1e-12] = 0.0
  c += 0.0  # no negative zeros
  first = c.ravel()[np.argmax(np.abs(c.ravel()) > 1e-6)]
  return c * np.sign(first)


def coupling_paths(p1: int, l1max: int, p2: int, l2max: int, l3max: int, out_parity: int) -> list:
  """All allowed paths ``((i1, l1), (i2, l2), (i3, l3))`` between parity channels.

  ``p1``/``p2`` are the sizes of the inputs' parity axes; ``out_parity`` (1 or 2) the size of
  the output's. A path exists when the triangle rule holds and the product of the input
  parities is representable in the output (with P=1 only proper tensors, parity (-1)**l).
  """
  par1, par2 = parities(p1, l1max), parities(p2, l2max)
  paths = []
  for i1 in range(p1):
    for l1 in range(l1max + 1):
      for i2 in range(p2):
        for l2 in range(l2max + 1):
          for l3 in range(abs(l1 - l2), min(l1 + l2, l3max) + 1):
            parity = par1[i1, l1 * l1] * par2[i2, l2 * l2]
            if out_parity == 1:
              if parity != (-1) ** l3:
                continue
              i3 = 0
            else:
              i3 = 0 if parity > 0 else 1
            paths.append(((i1, l1), (i2, l2), (i3, l3)))
  return paths
