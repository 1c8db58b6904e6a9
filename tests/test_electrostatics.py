"""potentials.electrostatics: Ewald sums against exact lattice constants and the open sum,
invariances, forces and stress against finite differences, padding (float64)."""

import math

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import primitive_neighbor_list

from potentials import electrostatics as es

jax.config.update("jax_enable_x64", True)

POINT = 0.02  # sigma (Å) of charges that act as points at interatomic distances


def periodic_energy(positions, charges, cell, sigma=POINT, real_cutoff=7.0, accuracy=1e-10):
  params = es.ewald_parameters(cell, real_cutoff, accuracy)
  i, j, s = primitive_neighbor_list(
    "ijS", (True,) * 3, np.asarray(cell), np.asarray(positions), real_cutoff
  )
  dst, src, shifts = jnp.asarray(i), jnp.asarray(j), jnp.asarray(s, jnp.float64)

  def energy(positions, charges, cell):
    r = positions[src] - positions[dst] + shifts @ cell
    return es.ewald_energy(positions, charges, cell, r, dst, src, params=params, sigma=sigma)

  return energy, energy(jnp.asarray(positions), jnp.asarray(charges), jnp.asarray(cell))


def rock_salt(cubic=True, a=5.64):
  atoms = ase.build.bulk("NaCl", "rocksalt", a=a, cubic=cubic)
  return atoms, np.where(atoms.numbers == 11, 1.0, -1.0)


def test_rock_salt_madelung_constant_in_cubic_and_triclinic_cells():
  madelung, a = 1.747564594633, 5.64
  exact = -es.COULOMB * madelung / (a / 2)  # per ion pair
  for cubic in (True, False):  # 8 atoms in a cube; 2 in the primitive (triclinic) fcc cell
    atoms, q = rock_salt(cubic)
    _, e = periodic_energy(atoms.positions, q, atoms.cell.array)
    assert float(e) / (len(atoms) / 2) == pytest.approx(exact, rel=1e-8)


def test_charged_cell_takes_the_neutralising_background():
  # one charge in a simple cubic box with a uniform opposite background: -k q^2 xi / (2 L)
  xi, length = 2.837297479481, 6.0
  _, e = periodic_energy(np.zeros((1, 3)), np.array([1.0]), np.eye(3) * length)
  assert float(e) == pytest.approx(-es.COULOMB * xi / (2 * length), rel=1e-8)


def molecule(seed=0):
  """Four smeared charges on a tetrahedron (neutral, dipole 2.24 e Å along z)."""
  rng = np.random.default_rng(seed)
  x = np.array([[1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]], float) * 0.8
  return x + 0.01 * rng.standard_normal((4, 3)), np.array([0.7, 0.7, -0.7, -0.7])


def test_large_cell_approaches_the_open_sum():
  x, q = molecule()
  open_ = es.open_energy(jnp.asarray(x), jnp.asarray(q), sigma=1.0)
  length = 24.0
  _, e = periodic_energy(x + 12.0, q, np.eye(3) * length, sigma=1.0, real_cutoff=9.0)
  # conducting boundaries: the open sum less 2 pi k |M|^2 / (3 V) for the dipole M (the
  # images' dipole-dipole energy, summed in spheres, is zero on a cubic lattice); what is left
  # are quadrupole terms ~ 1/L^5
  dipole = q @ x
  tin_foil = 2 * math.pi * es.COULOMB * (dipole @ dipole) / (3 * length**3)
  assert float(e) == pytest.approx(float(open_) - tin_foil, abs=1e-4)
  assert tin_foil > 0.01  # the check would see a missing dipole term
  # the kernel erf(r / 2 sigma) / r: finite at contact, Coulomb far away
  two = es.open_energy(jnp.array([[0.0, 0, 0], [0, 0, 3.0]]), jnp.array([1.0, -1.0]), sigma=0.5)
  assert float(two) == pytest.approx(-es.COULOMB * math.erf(3.0) / 3.0, rel=1e-12)


def test_invariant_under_translation_and_supercells():
  atoms, _ = rock_salt(cubic=True)
  rng = np.random.default_rng(1)
  atoms.positions += 0.1 * rng.standard_normal(atoms.positions.shape)
  q = rng.uniform(-1, 1, len(atoms))
  q -= q.mean()
  _, e = periodic_energy(atoms.positions, q, atoms.cell.array, sigma=0.4)
  _, moved = periodic_energy(atoms.positions + [0.3, -1.7, 2.2], q, atoms.cell.array, sigma=0.4)
  big = atoms.repeat((2, 1, 1))
  _, double = periodic_energy(big.positions, np.tile(q, 2), big.cell.array, sigma=0.4)
  assert float(moved) == pytest.approx(float(e), rel=1e-9)
  assert float(double) == pytest.approx(2 * float(e), rel=1e-9)


def test_forces_and_stress_match_finite_differences_with_position_dependent_charges():
  atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64)  # triclinic primitive cell
  atoms = atoms.repeat((2, 1, 1))
  rng = np.random.default_rng(2)
  atoms.positions += 0.15 * rng.standard_normal(atoms.positions.shape)
  q0 = np.where(atoms.numbers == 11, 0.8, -0.8)
  energy, _ = periodic_energy(atoms.positions, q0, atoms.cell.array, sigma=0.5)

  def total(x, cell):  # charges that move with the atoms (and stay neutral), as learnt ones
    c = 0.1 * jnp.tanh(x[:, 0] - x[:, 1])
    return energy(x, jnp.asarray(q0) + c - jnp.mean(c), cell)

  x, cell = jnp.asarray(atoms.positions), jnp.asarray(atoms.cell.array)
  grad = jax.grad(total)(x, cell)
  h = 1e-5
  for a, d in ((0, 0), (1, 2), (3, 1)):
    step = jnp.zeros_like(x).at[a, d].set(h)
    fd = (total(x + step, cell) - total(x - step, cell)) / (2 * h)
    assert float(grad[a, d]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)
  # stress: the derivative in a strain applied to positions and cell together
  strain = lambda eps: total(x @ (jnp.eye(3) + eps), cell @ (jnp.eye(3) + eps))  # noqa: E731
  analytic = jax.grad(strain)(jnp.zeros((3, 3)))
  for i, j in ((0, 0), (0, 2), (2, 1)):
    e = jnp.zeros((3, 3)).at[i, j].set(h)
    fd = (strain(e) - strain(-e)) / (2 * h)
    assert float(analytic[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_padding_is_inert():
  atoms, q = rock_salt(cubic=True)
  energy, e = periodic_energy(atoms.positions, q, atoms.cell.array, sigma=0.3)
  params = es.ewald_parameters(atoms.cell.array, 7.0, 1e-10)
  i, j, s = primitive_neighbor_list("ijS", (True,) * 3, atoms.cell.array, atoms.positions, 7.0)
  n = len(atoms)
  x = jnp.asarray(np.vstack([atoms.positions, [[9.0, 9.0, 9.0]]]))  # a padded atom
  charges = jnp.asarray(np.append(q, 0.0))
  dst = jnp.asarray(np.append(i, [n, n]))  # two padded pairs (dst = src = N)
  src = jnp.asarray(np.append(j, [n, n]))
  shifts = jnp.asarray(np.vstack([s, np.zeros((2, 3))]), jnp.float64)
  cell = jnp.asarray(atoms.cell.array)
  r = jnp.take(x, src, axis=0) - jnp.take(x, dst, axis=0) + shifts @ cell
  padded = es.ewald_energy(x, charges, cell, r, dst, src, params=params, sigma=0.3)
  assert float(padded) == pytest.approx(float(e), rel=1e-12)
  mask = jnp.array([True] * n + [False])
  big_q = charges.at[n].set(5.0)  # a padded atom's charge is ignored where masked
  assert float(es.open_energy(x, big_q, sigma=0.3, atom_mask=mask)) == pytest.approx(
    float(es.open_energy(x[:n], charges[:n], sigma=0.3)), rel=1e-12
  )


def test_parameters_refuse_what_cannot_work():
  with pytest.raises(ValueError, match="volume"):
    es.ewald_parameters(np.zeros((3, 3)), 5.0)
  with pytest.raises(ValueError, match="accuracy"):
    es.ewald_parameters(np.eye(3) * 5, 5.0, accuracy=2.0)
  p = es.ewald_parameters(np.eye(3) * 10.0, 5.0, 1e-6)
  assert p.alpha == pytest.approx(math.sqrt(math.log(1e6)) / 5.0)
  assert len(p.kvectors) and not np.any(np.all(p.kvectors == 0, axis=1))
