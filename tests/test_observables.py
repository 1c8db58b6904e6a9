"""potentials.observables: energy, forces, strain derivative and its per-atom split of any
pair-energy function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from potentials import observables, ops
from conftest import random_cluster


def _pair_model(n):
  """Per-atom energies of a smooth pair potential; padded pairs (index n) add nothing."""

  def energies(r, dst):
    d2 = jnp.sum(r * r, axis=-1)
    phi = jnp.where(dst < n, jnp.exp(-0.5 * d2) * (1.0 + 0.3 * d2), 0.0)
    return 0.5 * jax.ops.segment_sum(phi, dst, num_segments=n)

  return energies


def _periodic_system(seed=0, n=5):
  rng = np.random.default_rng(seed)
  cell = np.diag([3.2, 3.5, 3.9]) + rng.normal(0, 0.2, (3, 3))
  pos = rng.uniform(0, 1, (n, 3)) @ cell
  images = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
  dst, src, shifts = [], [], []
  for i in range(n):
    for j in range(n):
      for s in images:
        if i != j or np.any(s):
          dst.append(i), src.append(j), shifts.append(s)
  return pos, cell, np.array(dst), np.array(src), np.array(shifts, float)


def _compute(pos, cell, dst, src, shifts, pad=0):
  n = len(pos)
  dst = np.concatenate([dst, np.full(pad, n)])
  src = np.concatenate([src, np.full(pad, n)])
  shifts = np.concatenate([shifts, np.zeros((pad, 3))])
  f = _pair_model(n)
  fn = jax.jit(
    lambda p, c: observables.compute(
      lambda r: f(r, jnp.asarray(dst)),
      p,
      dst=jnp.asarray(dst),
      src=jnp.asarray(src),
      shifts=jnp.asarray(shifts),
      cell=c,
      volumes=abs(jnp.linalg.det(c)),
      atom_strain=True,
    )
  )
  return fn(jnp.asarray(pos), jnp.asarray(cell))


def test_forces_and_stress_match_finite_differences():
  pos, cell, dst, src, shifts = _periodic_system()
  out = _compute(pos, cell, dst, src, shifts)
  assert out.energies.shape == (len(pos),)
  np.testing.assert_allclose(float(out.energy), float(np.sum(out.energies)), rtol=1e-14)
  h = 1e-5
  for i, a in [(0, 0), (3, 2)]:
    dp = np.zeros_like(pos)
    dp[i, a] = h
    fd = (
      float(_compute(pos + dp, cell, dst, src, shifts).energy)
      - float(_compute(pos - dp, cell, dst, src, shifts).energy)
    ) / (2 * h)
    assert abs(float(out.forces[i, a]) + fd) < 1e-8
  volume = abs(np.linalg.det(cell))
  for a, b in [(0, 0), (1, 2), (0, 2)]:
    eps = np.zeros((3, 3))
    eps[a, b] = eps[b, a] = h
    strain = lambda s: (
      _compute(pos @ (np.eye(3) + s * eps), cell @ (np.eye(3) + s * eps), dst, src, shifts).energy
    )
    fd = (float(strain(1)) - float(strain(-1))) / (2 * h) / (1 if a == b else 2)
    assert abs(float(out.strain_derivative[a, b]) - fd) < 1e-8
    assert abs(float(out.stress[a, b]) - fd / volume) < 1e-9
  np.testing.assert_allclose(out.strain_derivative, out.strain_derivative.T, atol=1e-12)


def test_padded_pairs_change_nothing():
  pos, cell, dst, src, shifts = _periodic_system(1)
  a, b = _compute(pos, cell, dst, src, shifts), _compute(pos, cell, dst, src, shifts, pad=7)
  for x, y in zip(a[:5] + a[6:], b[:5] + b[6:]):
    np.testing.assert_array_equal(x, y)


def test_batch_equals_frames_one_by_one():
  systems = [_periodic_system(s, n) for s, n in ((2, 4), (3, 3))]
  singles = [_compute(*s) for s in systems]
  # pack both frames into one padded system with one empty frame slot and padding
  pos = np.concatenate([s[0] for s in systems] + [np.zeros((2, 3))])
  n = [len(s[0]) for s in systems]
  offset = [0, n[0]]
  a_total = len(pos)
  dst = np.concatenate([s[2] + o for s, o in zip(systems, offset)] + [np.full(3, a_total)])
  src = np.concatenate([s[3] + o for s, o in zip(systems, offset)] + [np.full(3, a_total)])
  shifts = np.concatenate([s[4] for s in systems] + [np.zeros((3, 3))])
  pair_frame = np.concatenate(
    [np.full(len(s[2]), k) for k, s in enumerate(systems)] + [np.full(3, 3)]
  )
  atom_frame = np.concatenate([np.full(k, i) for i, k in enumerate(n)] + [np.full(2, 3)])
  cells = np.stack([s[1] for s in systems] + [np.zeros((3, 3))])
  volumes = np.abs(np.linalg.det(cells))
  f = _pair_model(a_total)
  out = observables.compute(
    lambda r: f(r, jnp.asarray(dst)),
    jnp.asarray(pos),
    dst=jnp.asarray(dst),
    src=jnp.asarray(src),
    shifts=jnp.asarray(shifts),
    cell=jnp.asarray(cells),
    atom_frame=jnp.asarray(atom_frame),
    pair_frame=jnp.asarray(pair_frame),
    volumes=jnp.asarray(volumes),
    atom_strain=True,
  )
  assert out.energy.shape == (3,) and out.stress.shape == (3, 3, 3)
  for k, single in enumerate(singles):
    np.testing.assert_allclose(out.energy[k], single.energy, rtol=1e-12)
    np.testing.assert_allclose(out.strain_derivative[k], single.strain_derivative, atol=1e-12)
    np.testing.assert_allclose(out.stress[k], single.stress, atol=1e-12)
    sl = slice(offset[k], offset[k] + n[k])
    np.testing.assert_allclose(out.forces[sl], single.forces, atol=1e-12)
    np.testing.assert_allclose(
      out.atom_strain_derivatives[sl], single.atom_strain_derivatives, atol=1e-12
    )
  assert np.all(np.asarray(out.atom_strain_derivatives[-2:]) == 0)  # padded atoms
  assert float(out.energy[2]) == 0 and np.all(np.asarray(out.stress[2]) == 0)
  assert np.all(np.asarray(out.forces[-2:]) == 0)
  with pytest.raises(ValueError, match="atom_frame, pair_frame"):
    observables.compute(
      lambda r: f(r, jnp.asarray(dst)),
      jnp.asarray(pos),
      dst=dst,
      src=src,
      shifts=shifts,
      cell=cells[0],
      atom_frame=atom_frame,
    )


def test_open_system_energies_only_and_no_stress():
  pos = random_cluster(6, seed=4)
  dst, src = np.nonzero(~np.eye(6, dtype=bool))
  f = _pair_model(6)
  energies = lambda r: f(r, jnp.asarray(dst))
  full = observables.compute(energies, jnp.asarray(pos), dst=dst, src=src, atom_strain=True)
  only = observables.compute(energies, jnp.asarray(pos), dst=dst, src=src, forces=False)
  assert only.forces is None and only.strain_derivative is None and full.stress is None
  np.testing.assert_array_equal(only.energies, full.energies)
  # an open system's strain derivative is the virial of its pair forces, sum_k r_k (x) dE/dr_k
  g = jax.grad(lambda r: jnp.sum(energies(r)))(full.pair_vectors)
  np.testing.assert_allclose(
    full.strain_derivative, np.asarray(full.pair_vectors).T @ g, atol=1e-12
  )
  np.testing.assert_allclose(np.sum(np.asarray(full.forces), axis=0), 0, atol=1e-12)
  # per-atom: defined the same way, summing to it
  assert full.atom_strain_derivatives.shape == (6, 3, 3) and only.atom_strain_derivatives is None
  np.testing.assert_allclose(
    np.sum(np.asarray(full.atom_strain_derivatives), axis=0), full.strain_derivative, atol=1e-12
  )
  with pytest.raises(ValueError, match="forces=True"):
    observables.compute(
      energies, jnp.asarray(pos), dst=dst, src=src, forces=False, atom_strain=True
    )


def test_pair_vectors_single_and_batched():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(4, 3))
  cells = rng.normal(size=(2, 3, 3))
  dst, src = np.array([0, 1, 3, 4]), np.array([1, 0, 2, 4])
  shifts = np.array([[1, 0, 0], [0, -1, 0], [1, 1, 1], [0, 0, 0]], float)
  frame = np.array([0, 0, 1, 2])
  r = ops.pair_vectors(
    jnp.asarray(pos), dst, src, jnp.asarray(shifts), jnp.asarray(cells), pair_frame=frame
  )
  for k in range(3):
    c = cells[frame[k]]
    np.testing.assert_allclose(r[k], pos[src[k]] - pos[dst[k]] + shifts[k] @ c, atol=1e-14)
  np.testing.assert_array_equal(r[3], 0)  # padding reads zeros
  single = ops.pair_vectors(
    jnp.asarray(pos), dst[:2], src[:2], jnp.asarray(shifts[:2]), jnp.asarray(cells[0])
  )
  np.testing.assert_allclose(single, r[:2], atol=1e-14)
  with pytest.raises(ValueError, match="without a cell"):
    ops.pair_vectors(jnp.asarray(pos), dst, src, jnp.asarray(shifts))


def test_potential_functions_take_keywords_and_the_old_species_keyword():
  import potentials as pt

  pot = pt.Potential.create(
    0,
    species=["H", "O"],
    cutoff=2.5,
    features=4,
    max_degree=1,
    num_iterations=1,
    num_heads=1,
    num_basis=3,
  )
  z = np.array([8, 1, 1])
  pos = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
  dst, src = np.nonzero(~np.eye(3, dtype=bool))
  idx = jnp.asarray(pot.species_index(z))
  f = pot.atomic_energies_from_pairs_fn()
  r = ops.pair_vectors(jnp.asarray(pos), dst, src)
  new = f(pot.params, species_index=idx, r=r, dst=dst, src=src)
  np.testing.assert_array_equal(new, f(pot.params, idx, r, dst, src))
  with pytest.warns(DeprecationWarning, match="species_index"):
    old = f(pot.params, species=idx, r=r, dst=dst, src=src)
  np.testing.assert_array_equal(new, old)
  with pytest.warns(DeprecationWarning, match="pair_energies_fn is deprecated"):
    old_name = pot.pair_energies_fn()  # it returned per-atom energies all along
  np.testing.assert_array_equal(new, old_name(pot.params, species_index=idx, r=r, dst=dst, src=src))
  out = observables.compute(
    lambda r: f(pot.params, species_index=idx, r=r, dst=dst, src=src),
    jnp.asarray(pos),
    dst=dst,
    src=src,
  )
  e, forces = pot.energy_and_forces(z, pos, dst, src)
  np.testing.assert_allclose(float(out.energy), e, rtol=1e-12)
  np.testing.assert_allclose(out.forces, forces, atol=1e-12)
  np.testing.assert_allclose(pot.atomic_energies(z, pos, dst, src), new, rtol=1e-12)


def test_atom_strain_derivatives_split_as_in_ase_lennard_jones():
  """A shifted Lennard-Jones potential through compute: per-atom ``W_i / V`` equals ASE's own
  ``LennardJones`` ``stresses`` (sign, Voigt order, half/half split), in a cell smaller than
  twice the cutoff (atoms pair with their own images) and triclinic."""
  from ase import Atoms
  from ase.calculators.lj import LennardJones
  from ase.neighborlist import neighbor_list

  sigma, epsilon, rc = 2.3, 0.4, 5.0
  cell = np.array([[4.0, 0.0, 0.0], [0.9, 3.8, 0.0], [0.4, -0.6, 4.2]])
  atoms = Atoms(
    "Ar3",
    scaled_positions=[[0.1, 0.2, 0.3], [0.55, 0.6, 0.5], [0.8, 0.1, 0.85]],
    cell=cell,
    pbc=True,
  )
  atoms.calc = LennardJones(sigma=sigma, epsilon=epsilon, rc=rc)
  i, j, shift = neighbor_list("ijS", atoms, rc)
  n = len(atoms)
  lj = lambda d2: 4 * epsilon * ((sigma**2 / d2) ** 6 - (sigma**2 / d2) ** 3)
  # Each pair's energy is shared unevenly, c_i / (c_i + c_j) to atom i (ASE: half each), so
  # the test tells the pair-gradient split from other per-atom rules (e.g. all to dst).
  c = np.array([1.0, 2.0, 3.0])
  weight = jnp.asarray(c[i] / (c[i] + c[j]))
  energies = lambda r: jax.ops.segment_sum(
    weight * (lj(jnp.sum(r * r, -1)) - lj(rc**2)), i, num_segments=n
  )
  out = observables.compute(
    energies,
    jnp.asarray(atoms.positions),
    dst=i,
    src=j,
    shifts=jnp.asarray(shift, float),
    cell=jnp.asarray(cell),
    atom_strain=True,
  )
  volume = atoms.get_volume()
  w = np.asarray(out.atom_strain_derivatives) / volume
  ours = w[:, [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
  theirs = atoms.get_stresses()
  assert np.any(i == j)  # self-image pairs are in
  np.testing.assert_allclose(float(out.energy), atoms.get_potential_energy(), rtol=1e-12)
  assert np.abs(np.asarray(out.energies) - atoms.get_potential_energies()).max() > 1e-3
  assert np.abs(theirs).max() > 1e-3 and np.ptp(theirs[:, 0]) > 1e-4  # atoms differ
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * np.abs(theirs).max())
  np.testing.assert_allclose(ours.sum(0), atoms.get_stress(), atol=1e-12)
