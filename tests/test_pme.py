"""potentials.pme: particle-mesh Ewald against exact lattice constants and the Ewald sum,
forces and stress against finite differences, invariances, batches with padding and open
frames, and the choice between the two (float64)."""

import math

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import primitive_neighbor_list

from potentials import electrostatics as es
from potentials import pme

jax.config.update("jax_enable_x64", True)

CUTOFF = 5.0


def frames_of(cells, periodic, counts, accuracy, mesh):
  """Frames of a batch (atoms of frame b are the next ``counts[b]``; one padded atom last)
  with the Ewald vectors or one PME grid for all (``mesh``: True, or a grid shape)."""
  cells = np.asarray(cells, np.float64)
  table, kmask = es.kvector_table(cells, periodic, CUTOFF, accuracy)
  moduli = None
  if mesh:
    alpha = es.alpha_for(CUTOFF, accuracy)
    shapes = [pme.mesh_shape(c, alpha, accuracy) for c, p in zip(cells, periodic) if p]
    shape = np.max(shapes, axis=0) if mesh is True else mesh
    moduli = tuple(jnp.asarray(m) for m in pme.moduli(shape))
    table, kmask = table[:, :0], kmask[:, :0]
  frame = np.concatenate([np.full(c, b) for b, c in enumerate(counts)] + [[len(counts)]])
  return es.Frames(
    atom_frame=jnp.asarray(frame, jnp.int32),
    atom_mask=jnp.asarray(frame < len(counts)),
    total_charge=jnp.zeros(len(counts)),
    periodic=jnp.asarray(periodic),
    kvectors=jnp.asarray(table),
    kmask=jnp.asarray(kmask),
    mesh=moduli,
  )


def energy_fn(atoms_list, accuracy=1e-7, mesh=True, sigma=0.4):
  """``energy(x, q, cells) -> (B,)`` energies of a batch of ``atoms_list`` (concatenated, a
  padded atom last) through :func:`es.atom_energies` (compiled); and the batch's x, cells."""
  periodic = [bool(a.pbc.all()) for a in atoms_list]
  cells = np.stack([a.cell.array if p else np.eye(3) for a, p in zip(atoms_list, periodic)])
  counts = [len(a) for a in atoms_list]
  frames = frames_of(cells, periodic, counts, accuracy, mesh)
  dst, src, shifts, start = [], [], [], 0
  for a, p in zip(atoms_list, periodic):
    if p:
      i, j, s = primitive_neighbor_list("ijS", (True,) * 3, a.cell.array, a.positions, CUTOFF)
      dst.append(i + start), src.append(j + start), shifts.append(s)
    start += len(a)
  none = [np.zeros(0, int)]
  dst, src = jnp.asarray(np.concatenate(dst + none)), jnp.asarray(np.concatenate(src + none))
  shifts = np.concatenate(shifts + [np.zeros((0, 3))]).astype(np.float64)
  frame_of_pair = np.asarray(frames.atom_frame)[np.asarray(dst)]
  alpha = es.alpha_for(CUTOFF, accuracy)

  @jax.jit
  def energy(x, q, cells):
    r = x[src] - x[dst] + jnp.einsum("pi,pij->pj", shifts, cells[frame_of_pair])
    kw = dict(sigma=sigma, alpha=alpha, cutoff=CUTOFF)
    e = es.atom_energies(x, cells, r, dst, src, q, frames, **kw)
    return jax.ops.segment_sum(e, frames.atom_frame, num_segments=len(atoms_list))

  x = np.vstack([a.positions for a in atoms_list] + [np.full((1, 3), 7.0)])
  return energy, jnp.asarray(x), jnp.asarray(cells)


def salt(cubic=False, rattle=0.15, seed=0, repeat=(2, 1, 1)):
  atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64, cubic=cubic).repeat(repeat)
  atoms.positions += rattle * np.random.default_rng(seed).standard_normal(atoms.positions.shape)
  return atoms


def learnt_like(x, n):
  """Neutral charges that move with the atoms, as learnt ones do (padded atom: 0)."""
  q0 = jnp.asarray(np.resize([0.8, -0.8], n))
  c = q0 + 0.1 * jnp.tanh(x[:n, 0] - x[:n, 1])
  return jnp.append(c - jnp.mean(c), 0.0)


def test_spline_weights_and_moduli():
  frac = np.linspace(0, 0.999, 7)
  w = np.asarray(pme.spline_weights(jnp.asarray(frac)))
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-14)  # a partition of unity
  assert (w >= 0).all()
  # continuity: a weight at frac -> 1 is the next point's weight at frac = 0
  end, start = pme.spline_weights(jnp.asarray(1 - 1e-12)), pme.spline_weights(jnp.asarray(0.0))
  np.testing.assert_allclose(end[:-1], start[1:], atol=1e-10)
  b = pme.moduli((16, 20, 24))
  assert [len(m) for m in b] == [16, 20, 24] and all(np.isfinite(m).all() for m in b)
  assert b[0][0] == pytest.approx(1.0)  # the splines sum to 1: no correction at m = 0


def test_madelung_constant_in_cubic_and_triclinic_cells():
  madelung, a = 1.747564594633, 5.64
  exact = -es.COULOMB * madelung / (a / 2)  # per ion pair
  for cubic in (True, False):
    atoms = salt(cubic, rattle=0.0, repeat=(1, 1, 1))
    energy, x, cells = energy_fn([atoms], accuracy=1e-9, sigma=0.02)
    q = jnp.append(jnp.where(jnp.asarray(atoms.numbers) == 11, 1.0, -1.0), 0.0)
    assert float(energy(x, q, cells)[0]) / (len(atoms) / 2) == pytest.approx(exact, rel=1e-8)


def test_agrees_with_the_ewald_sum_energies_forces_and_stress():
  atoms = salt(repeat=(2, 2, 1))  # triclinic
  n = len(atoms)
  results = {}
  for mesh in (False, True):
    energy, x, cells = energy_fn([atoms], accuracy=1e-8, mesh=mesh)
    total = lambda x, cells: energy(x, learnt_like(x, n), cells)[0]  # noqa: E731
    strain = lambda eps: total(x @ (jnp.eye(3) + eps), cells @ (jnp.eye(3) + eps))  # noqa: E731
    derivatives = jax.jit(
      lambda x, cells: (jax.grad(total)(x, cells), jax.grad(strain)(jnp.zeros((3, 3))))
    )
    results[mesh] = (total(x, cells), *derivatives(x, cells))
  (e0, f0, s0), (e1, f1, s1) = results[False], results[True]
  assert float(e1) == pytest.approx(float(e0), rel=1e-7)
  np.testing.assert_allclose(f1, f0, atol=1e-5 * np.abs(f0).max())
  np.testing.assert_allclose(s1, s0, atol=1e-5 * np.abs(s0).max())
  assert np.abs(f0[:n]).max() > 0.1 and np.abs(f0[n]).max() == 0  # padding: no force


def test_forces_and_stress_are_the_mesh_energy_derivatives():
  atoms = salt(seed=3)  # triclinic, atoms off the grid points
  n = len(atoms)
  energy, x, cells = energy_fn([atoms], accuracy=1e-5)
  total = lambda x, cells: energy(x, learnt_like(x, n), cells)[0]  # noqa: E731
  grad = jax.jit(jax.grad(total))(x, cells)
  h = 1e-5
  for a, d in ((0, 0), (1, 2), (3, 1)):
    step = jnp.zeros_like(x).at[a, d].set(h)
    fd = (total(x + step, cells) - total(x - step, cells)) / (2 * h)
    assert float(grad[a, d]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)
  strain = lambda eps: total(x @ (jnp.eye(3) + eps), cells @ (jnp.eye(3) + eps))  # noqa: E731
  analytic = jax.jit(jax.grad(strain))(jnp.zeros((3, 3)))
  for i, j in ((0, 0), (0, 2), (2, 1)):
    e = jnp.zeros((3, 3)).at[i, j].set(h)
    fd = (strain(e) - strain(-e)) / (2 * h)
    assert float(analytic[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_translation_and_supercell_within_the_accuracy():
  atoms = salt(cubic=True, repeat=(1, 1, 1), seed=4)
  q = np.random.default_rng(4).uniform(-1, 1, len(atoms))
  q = jnp.append(q - q.mean(), 0.0)
  energy, x, cells = energy_fn([atoms], accuracy=1e-8)
  e = float(energy(x, q, cells)[0])
  assert float(energy(x + jnp.asarray([0.37, -1.71, 2.23]), q, cells)[0]) == pytest.approx(
    e, rel=1e-7
  )
  big = atoms.repeat((2, 1, 1))
  energy2, x2, cells2 = energy_fn([big], accuracy=1e-8)
  q2 = jnp.append(jnp.tile(q[:-1], 2), 0.0)
  assert float(energy2(x2, q2, cells2)[0]) == pytest.approx(2 * e, rel=1e-7)


def test_a_batch_with_an_open_frame_and_padding_equals_each_frame_alone():
  a, b = salt(seed=5), salt(cubic=True, repeat=(1, 1, 1), seed=6)
  molecule = ase.Atoms("NaCl", positions=[[0, 0, 0], [2.5, 0.2, 0.0]])  # open
  alpha = es.alpha_for(CUTOFF, 1e-7)
  need = [pme.mesh_shape(c.cell.array, alpha, 1e-7) for c in (a, b)]
  shape = tuple(np.max(need, axis=0) + 2)  # one grid for both cells, and for each alone
  batch, x, cells = energy_fn([a, molecule, b], mesh=shape)
  rng = np.random.default_rng(7)
  q = rng.uniform(-1, 1, len(x))
  q[-1] = 0.0
  ends = np.cumsum([0, len(a), len(molecule), len(b)])
  for k in range(3):  # each frame's charges neutral
    q[ends[k] : ends[k + 1]] -= q[ends[k] : ends[k + 1]].mean()
  together = batch(x, jnp.asarray(q), cells)
  for k, atoms in enumerate((a, molecule, b)):
    alone, xa, ca = energy_fn([atoms], mesh=shape)
    qa = jnp.append(jnp.asarray(q[ends[k] : ends[k + 1]]), 0.0)
    assert float(together[k]) == pytest.approx(float(alone(xa, qa, ca)[0]), rel=1e-9, abs=1e-12)


def test_the_plan_takes_the_cheaper_sum_and_keeps_a_compiled_grid(monkeypatch):
  small, large = np.eye(3) * 9.3, np.eye(3) * 31.0  # ~96 and ~3000 atoms of water
  table, mask, mesh = es.reciprocal_plan(small, True, 8, CUTOFF, 1e-6)
  assert mesh is None and table.shape[1] > 0 and mask.all()
  table, _, mesh = es.reciprocal_plan(large, True, 3000, CUTOFF, 1e-6)
  assert table.shape[1] == 0 and [len(m) for m in mesh] == [100] * 3
  assert es.reciprocal_plan(large, False, 3000, CUTOFF, 1e-6)[2] is None  # open
  # a caller's grid only grows: a smaller cell keeps it, a longer one widens that axis
  kept = es.reciprocal_plan(small, True, 8, CUTOFF, 1e-6, mesh_at_least=(100, 100, 100))[2]
  assert [len(m) for m in kept] == [100] * 3
  longer = np.diag([40.0, 31.0, 31.0])
  grown = es.reciprocal_plan(longer, True, 3000, CUTOFF, 1e-6, mesh_at_least=(100, 100, 100))
  assert len(grown[2][0]) > 100 and [len(m) for m in grown[2][1:]] == [100, 100]
  # a tighter accuracy needs a finer grid (and may make the vectors cheaper again)
  fine = pme.mesh_shape(large, es.alpha_for(CUTOFF, 1e-10), 1e-10)
  assert min(fine) > 100
  monkeypatch.setattr(es, "MESH_COST", 0.0)
  assert es.reciprocal_plan(small, True, 8, CUTOFF, 1e-6)[2] is not None
  assert math.prod(len(m) for m in es.reciprocal_plan(small, True, 8, CUTOFF, 1e-6)[2]) > 0
