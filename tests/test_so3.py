import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from potentials import so3


def _unit(n, seed=0):
  u = np.random.default_rng(seed).normal(size=(n, 3))
  return u / np.linalg.norm(u, axis=-1, keepdims=True)


@pytest.mark.parametrize("cartesian_order", [True, False])
def test_racah_normalisation(cartesian_order):
  y = np.asarray(
    so3.spherical_harmonics(jnp.asarray(_unit(20)), 6, cartesian_order=cartesian_order)
  )
  for l in range(7):
    np.testing.assert_allclose(np.sum(y[:, l * l : (l + 1) ** 2] ** 2, axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize(
  "normalization,scale",
  [
    ("racah", lambda l: 4 * np.pi / (2 * l + 1)),
    ("4pi", lambda l: 4 * np.pi),
    ("orthonormal", lambda l: 1.0),
  ],
)
def test_orthogonality_by_quadrature(normalization, scale):
  # Gauss-Legendre in cos(theta) x uniform in phi integrates products up to degree 12 exactly.
  x, w = np.polynomial.legendre.leggauss(16)
  phi = np.linspace(0, 2 * np.pi, 32, endpoint=False)
  ct, ph = np.meshgrid(x, phi, indexing="ij")
  st = np.sqrt(1 - ct**2)
  pts = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
  weights = (w[:, None] * np.full_like(ph, 2 * np.pi / len(phi))).reshape(-1)
  y = np.asarray(so3.spherical_harmonics(jnp.asarray(pts), 6, normalization=normalization))
  gram = np.einsum("p,pi,pj->ij", weights, y, y)
  expected = np.diag([scale(l) for l in so3.degree_of_index(6)])
  np.testing.assert_allclose(gram, expected, atol=1e-12)


def test_explicit_low_degrees_and_orders():
  u = _unit(5, seed=1)
  x, y, z = u.T
  cart = np.asarray(so3.spherical_harmonics(jnp.asarray(u), 2))
  std = np.asarray(so3.spherical_harmonics(jnp.asarray(u), 2, cartesian_order=False))
  np.testing.assert_allclose(cart[:, 1:4], u, atol=1e-14)  # l=1 is (x, y, z)
  np.testing.assert_allclose(std[:, 1:4], np.stack([y, z, x], -1), atol=1e-14)  # m = -1, 0, 1
  s3 = np.sqrt(3)
  expected_std = np.stack(
    [s3 * x * y, s3 * y * z, (3 * z**2 - 1) / 2, s3 * x * z, s3 / 2 * (x**2 - y**2)], -1
  )
  np.testing.assert_allclose(std[:, 4:9], expected_std, atol=1e-14)
  np.testing.assert_allclose(std[:, so3.cartesian_permutation(2)], cart, atol=1e-15)
  # Cartesian order is m = 2, -2, 1, -1, 0
  np.testing.assert_allclose(cart[:, 4:9], expected_std[:, [4, 0, 3, 1, 2]], atol=1e-14)


@pytest.mark.parametrize("reflect", [False, True])
def test_harmonics_equivariance(reflect):
  rot = so3.random_rotation(7, reflect=reflect)
  u = _unit(30, seed=2)
  d = so3.wigner_d(rot, 6)
  y = np.asarray(so3.spherical_harmonics(jnp.asarray(u), 6))
  y_rot = np.asarray(so3.spherical_harmonics(jnp.asarray(u @ rot.T), 6))
  np.testing.assert_allclose(y_rot, y @ d.T, atol=1e-12)
  np.testing.assert_allclose(d @ d.T, np.eye(49), atol=1e-12)
  signs = np.sign(
    np.round([np.linalg.det(d[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2]) for l in range(7)])
  )
  # det D_l = (+1) for rotations; an inversion contributes (-1)^l per row: (-1)^(l(2l+1))
  expected = [(-1) ** (l * (2 * l + 1)) if reflect else 1 for l in range(7)]
  np.testing.assert_array_equal(signs, expected)


def test_finite_at_origin():
  f = lambda r: jnp.sum(so3.spherical_harmonics(r, 4) ** 2) + jnp.sum(so3.solid_harmonics(r, 4))
  r0 = jnp.zeros(3)
  y = so3.spherical_harmonics(r0, 4)
  assert float(y[0]) == 1.0 and np.all(np.asarray(y[1:]) == 0)
  g = jax.grad(f)(r0)
  assert np.all(np.isfinite(np.asarray(g)))


def test_clebsch_gordan_selection_rules():
  for l1, l2, l3 in itertools.product(range(4), repeat=3):
    c = so3.clebsch_gordan(l1, l2, l3)
    assert c.shape == (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
    allowed = abs(l1 - l2) <= l3 <= l1 + l2
    assert bool(np.any(c != 0)) == allowed, (l1, l2, l3)
    if allowed:  # isometry onto degree l3
      m = c.reshape(-1, 2 * l3 + 1)
      np.testing.assert_allclose(m.T @ m, np.eye(2 * l3 + 1), atol=1e-12)


@pytest.mark.parametrize("reflect", [False, True])
def test_clebsch_gordan_equivariance(reflect):
  rot = so3.random_rotation(11, reflect=reflect)
  d = so3.wigner_d(rot, 6)
  blk = lambda l: d[l * l : (l + 1) ** 2, l * l : (l + 1) ** 2]
  rng = np.random.default_rng(0)
  for l1, l2 in itertools.product(range(4), repeat=2):
    for l3 in range(abs(l1 - l2), l1 + l2 + 1):
      c = so3.clebsch_gordan(l1, l2, l3)
      x, y = rng.normal(size=2 * l1 + 1), rng.normal(size=2 * l2 + 1)
      lhs = np.einsum("abc,a,b->c", c, blk(l1) @ x, blk(l2) @ y)
      # D from harmonics carries (-1)^l under reflection; coupling keeps (-1)^(l1+l2).
      sign = (-1) ** (l1 + l2 + l3) if reflect else 1
      np.testing.assert_allclose(lhs, sign * blk(l3) @ np.einsum("abc,a,b->c", c, x, y), atol=1e-12)


def test_known_couplings():
  c110 = so3.clebsch_gordan(1, 1, 0)[..., 0]
  np.testing.assert_allclose(c110, np.eye(3) / np.sqrt(3), atol=1e-14)  # dot product
  c111 = so3.clebsch_gordan(1, 1, 1)
  a, b = np.array([1.0, 2, 3]), np.array([-1.0, 0.5, 2])
  np.testing.assert_allclose(
    np.einsum("abc,a,b->c", c111, a, b), np.cross(a, b) / np.sqrt(2), atol=1e-14
  )
  np.testing.assert_allclose(so3.clebsch_gordan(0, 3, 3)[0], np.eye(7), atol=1e-14)


def test_coupling_paths_parity():
  # 1- x 1- (P=1 inputs): 0+, 1+ (pseudo), 2+; with P=1 output the 1+ path is dropped.
  proper = {
    (l1, l2, l3)
    for (_, l1), (_, l2), (_, l3) in so3.coupling_paths(1, 1, 1, 1, 2, 1)
    if l1 == 1 and l2 == 1
  }
  assert proper == {(1, 1, 0), (1, 1, 2)}
  full = [
    (o, l3)
    for (_, l1), (_, l2), (o, l3) in so3.coupling_paths(1, 1, 1, 1, 2, 2)
    if l1 == 1 and l2 == 1
  ]
  assert sorted(full) == [(0, 0), (0, 1), (0, 2)]  # all parity + (index 0)
  # pseudoscalar x vector -> axial vector (parity +, index 0 in P=2)
  paths = so3.coupling_paths(2, 0, 2, 1, 1, 2)
  assert ((1, 0), (1, 1), (0, 1)) in paths and ((1, 0), (0, 1), (1, 1)) in paths
