"""Ensembles (committee and readout heads) and their uncertainty: the members' physics, the
mean, the file, ASE, JAX-MD, the MD guard, training with calibration, selection."""

import warnings

import ase.build
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError

import potentials
from potentials import ensemble, observables, training
from plugin import cli, md
from plugin import jax_md as pjm
from plugin.ase import Calculator
from plugin.data import read_frames

from conftest import assert_jax_md_spread_matches, dimer_fn, tiny_molecule_potential

TINY = dict(cutoff=3.0, features=8, max_degree=1, num_iterations=1, num_heads=2, num_basis=4)


def _scaled(p, seed=0):
  """Forces of a few eV/Å and distinct element shifts, like a trained model."""
  rng = np.random.default_rng(seed)
  shift = np.asarray(p.params["shift"]) + rng.normal(0, 1.0, np.shape(p.params["shift"]))
  shift = shift.astype(np.float32)
  return p.replace(
    params={**p.params, "scale": np.full_like(p.params["scale"], 5.0), "shift": shift}
  )


@pytest.fixture(scope="module")
def members():
  return [
    _scaled(potentials.Potential.create(k, species=["H", "C", "O"], **TINY), k) for k in (1, 2)
  ]


@pytest.fixture(scope="module")
def both():
  """A committee of 2 networks with 3 heads each (6 members)."""
  p = potentials.Potential.create(0, species=["H", "C", "O"], readout_heads=3, committee=2, **TINY)
  return _scaled(p)


def _member_energies(pot, z, pos, dst, src):
  r = potentials.ops.pair_vectors(jnp.asarray(pos), jnp.asarray(dst), jnp.asarray(src))
  e = pot.member_energies_fn()(
    pot.params, species_index=jnp.asarray(pot.species_index(z)), r=r, dst=dst, src=src
  )
  return np.asarray(jnp.sum(e, axis=0))


def test_committee_is_the_mean_of_its_members_and_round_trips(members, hco_cluster, tmp_path):
  z, pos, dst, src = hco_cluster
  committee = potentials.Potential.stack(members)
  assert committee.num_members == 2 and committee.config.committee == 2
  single = [m.energy(z, pos, dst, src) for m in members]
  np.testing.assert_allclose(_member_energies(committee, z, pos, dst, src), single, rtol=1e-10)
  np.testing.assert_allclose(committee.energy(z, pos, dst, src), np.mean(single), rtol=1e-10)
  # with shifts added on the host (float32 path): the same members
  e_no_shift = committee.member_energies_fn(include_shift=False)
  r = potentials.ops.pair_vectors(jnp.asarray(pos), jnp.asarray(dst), jnp.asarray(src))
  host = (
    np.asarray(
      jnp.sum(
        e_no_shift(
          committee.params, species_index=committee.species_index(z), r=r, dst=dst, src=src
        ),
        0,
      )
    )
    + committee.element_shifts[committee.species_index(z)].sum()
  )
  np.testing.assert_allclose(host, single, rtol=1e-10)
  path = tmp_path / "committee.eqm"
  committee.save(path)
  loaded = potentials.load(path)
  for a, b in zip(loaded.members(), members):  # members agree with the separate models
    assert a.energy(z, pos, dst, src) == pytest.approx(b.energy(z, pos, dst, src), rel=1e-12)
  with pytest.raises(ValueError, match="one architecture"):
    potentials.Potential.stack([members[0], potentials.Potential.create(0, species=["H"], **TINY)])


def test_member_forces_are_each_members_gradient(both, hco_cluster):
  z, pos, dst, src = hco_cluster
  sp = jnp.asarray(both.species_index(z))
  fn = both.member_energies_fn()
  energies = lambda r: fn(both.params, species_index=sp, r=r, dst=dst, src=src)
  args = dict(dst=jnp.asarray(dst), src=jnp.asarray(src))
  members = jax.jit(
    lambda R, m: observables.compute(energies, R, **args, members=m), static_argnums=1
  )
  out = members(jnp.asarray(pos), 2)
  assert out.member_energies.shape == (6,) and out.member_forces.shape == (6, 6, 3)
  # every member's own gradient (jacobian of the member energies), and finite differences
  totals = jax.jit(lambda R: jnp.sum(energies(potentials.ops.pair_vectors(R, **args)), axis=0))
  np.testing.assert_allclose(out.member_forces, -jax.jacrev(totals)(jnp.asarray(pos)), atol=1e-12)
  h, i, c = 1e-5, 2, 1
  d = np.zeros_like(pos)
  d[i, c] = h
  fd = -(totals(jnp.asarray(pos + d)) - totals(jnp.asarray(pos - d))) / (2 * h)
  np.testing.assert_allclose(out.member_forces[:, i, c], fd, atol=1e-7)
  np.testing.assert_allclose(out.forces, out.member_forces.mean(0), atol=1e-12)
  # the one-member-per-backward-pass path (members=True) gives the same
  np.testing.assert_allclose(
    members(jnp.asarray(pos), True).member_forces, out.member_forces, atol=1e-12
  )


def test_members_are_invariant_and_uncertainty_equivariant(both, hco_cluster):
  """Rotation, reflection, translation and permutation act on every member: energies and
  per-atom uncertainties are invariant (permuted with the atoms)."""
  z, pos, dst, src = hco_cluster
  a = ase.Atoms(numbers=z, positions=pos)
  a.calc = Calculator(both, dtype="float64")
  e0 = a.calc.get_property("member_energies", a).copy()
  u0 = a.calc.get_property("forces_uncertainty", a).copy()
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
  q = q * np.array([1, 1, -1])  # include a reflection
  perm = np.random.default_rng(2).permutation(len(z))
  b = ase.Atoms(numbers=z[perm], positions=(pos @ q.T + [1.0, -2.0, 0.5])[perm])
  b.calc = Calculator(both, dtype="float64")
  np.testing.assert_allclose(b.calc.get_property("member_energies", b), e0, rtol=1e-10)
  np.testing.assert_allclose(b.calc.get_property("forces_uncertainty", b), u0[perm], rtol=1e-8)


def test_padding_and_the_cutoff_leave_members_alone(both):
  """Padded atoms change nothing; every member is smooth as a pair crosses the cutoff."""
  members_at = dimer_fn(both, both.member_energies_fn())

  np.testing.assert_allclose(members_at(1.3, 3)[:2], members_at(1.3, 0), atol=1e-12)
  assert np.all(members_at(1.3, 3)[2:] == 0)
  rc = TINY["cutoff"]
  inside, outside = members_at(rc - 1e-6, 0).sum(0), members_at(rc + 1e-6, 0).sum(0)
  np.testing.assert_allclose(inside, outside, atol=1e-9)


def test_ase_and_jax_md_agree_in_one_compilation(both):
  a = ase.build.molecule("CH3CH2OH")
  a.calc = Calculator(both)
  a.get_forces()
  results = {k: a.calc.get_property(k, a) for k in ("energy_uncertainty", "forces_uncertainty")}
  assert a.calc.num_compilations == 1  # every property came from the one call
  assert results["forces_uncertainty"].shape == (9,) and results["energy_uncertainty"] > 0
  assert np.mean(a.calc.results["member_energies"]) == pytest.approx(a.get_potential_energy())
  assert_jax_md_spread_matches(both, a, results)
  with pytest.raises(TypeError, match="neighbor_list"):
    pjm.uncertainty_fn(lambda R, nbrs: 0.0)


def test_identical_members_have_zero_uncertainty_and_single_models_none(members):
  twins = potentials.Potential.stack([members[0], members[0]])
  a = ase.build.molecule("CH3CH2OH")
  a.calc = Calculator(twins)
  e = a.get_potential_energy()
  assert a.calc.get_property("energy_uncertainty", a) == 0
  assert np.all(a.calc.get_property("forces_uncertainty", a) == 0)
  b = a.copy()
  b.calc = Calculator(members[0])
  assert b.get_potential_energy() == pytest.approx(e, rel=1e-6)
  with pytest.raises(PropertyNotImplementedError):
    b.calc.get_property("forces_uncertainty", b)


def test_calibration_scale_and_spearman():
  rng = np.random.default_rng(0)
  sigma = rng.uniform(0.1, 1.0, 20000)
  errors = 2.0 * sigma * rng.normal(size=sigma.size)
  s = ensemble.calibration_scale(errors, sigma)
  assert s == pytest.approx(2.0, rel=0.03)  # Gaussian errors: the 68 % quantile is one sigma
  assert np.mean(np.abs(errors) <= s * sigma) == pytest.approx(0.683, abs=0.01)
  assert ensemble.calibration_scale(errors, np.zeros_like(sigma)) == 1.0
  assert training.spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 45.0])) == pytest.approx(
    1
  )
  assert training.spearman(np.array([1, 2, 2, 3.0]), np.array([3, 2, 2, 1.0])) == pytest.approx(-1)


def _bad_committee(good):
  """A committee whose second member is ``good`` with its weights perturbed: it disagrees
  wherever it is asked."""
  rng = np.random.default_rng(5)
  noisy = jax.tree_util.tree_map(
    lambda p: (np.asarray(p) + 0.3 * rng.normal(size=np.shape(p)) * np.std(p)).astype(p.dtype),
    good.params,
  )
  return potentials.Potential.stack([good, good.replace(params=noisy)])


# slow: test_force_readout.py stops a run on its spread, test_learn.py flags replicas by default
@pytest.mark.slow
def test_md_uncertainty_guard_stops_or_flags_and_names_atoms(tmp_path):
  good = tiny_molecule_potential()
  atoms = ase.build.molecule("CH3CH2OH")
  kw = dict(ensemble="nvt_langevin", temperature=300, timestep=0.25, total_steps=60, chunk=20)
  quiet = md.run(atoms, potentials.Potential.stack([good, good]), max_uncertainty=1e-3, **kw)
  assert quiet.stopped is None and quiet.uncertain == []
  bad = _bad_committee(good)
  traj = tmp_path / "md.traj"
  with pytest.warns(RuntimeWarning, match="force uncertainty"):
    r = md.run(atoms, bad, max_uncertainty=1e-3, traj=str(traj), **kw)
  assert r.stopped == "max_uncertainty" and r.total_steps == 20
  assert r.uncertain[0]["atoms"] and "atom(s) [" in r.reason
  assert ase.io.read(traj, ":")[-1].info["md_step"] == 20  # the uncertain frame is written
  with pytest.warns(RuntimeWarning, match="MD flagged"):
    r = md.run(atoms, bad, max_uncertainty=1e-3, uncertainty_action="flag", **kw)
  assert (
    r.stopped is None and r.total_steps == 60 and [e["step"] for e in r.uncertain] == [20, 40, 60]
  )
  with pytest.raises(ValueError, match="ensemble"):
    md.run(atoms, good, max_uncertainty=0.1, **kw)
  # a batch checks every replica: the molecule leaves at its uncertain chunk with the value
  # it has alone; two H atoms beyond the cutoff (no forces, no spread) go on to the end
  far = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 8.0]])
  with pytest.warns(RuntimeWarning, match="system 0: MD stopped at step 20: force uncertainty"):
    rs = md.run([atoms, far], bad, max_uncertainty=1e-3, seed=[0, 1], **kw)
  assert rs[0].stopped == "max_uncertainty" and rs[0].total_steps == 20
  assert rs[0].uncertain[0]["max_uncertainty"] == pytest.approx(
    r.uncertain[0]["max_uncertainty"], rel=1e-4
  )
  assert rs[1].stopped is None and rs[1].total_steps == 60 and rs[1].uncertain == []
  with pytest.warns(RuntimeWarning, match="system 1: MD flagged at step (20|40|60)"):
    flagged = md.run([far, atoms], bad, max_uncertainty=1e-3, uncertainty_action="flag", **kw)
  assert [e["step"] for e in flagged[1].uncertain] == [20, 40, 60] and not flagged[0].uncertain


def test_shallow_training_calibrates_and_select_picks_frames(copper_data, tmp_path, capsys):
  model = tmp_path / "heads.eqm"
  hyper = '{"features": 8, "max_degree": 1, "num_iterations": 1, "num_basis": 4}'
  argv = ["train", str(copper_data), "--species", "Cu", "--cutoff", "3.0", "--model-config", hyper]
  argv += ["--epochs", "2", "--batch-size", "4", "--readout-heads", "3", "--out", str(model)]
  assert cli.main(argv) == 0
  pot = potentials.load(model)
  cal = pot.metadata["uncertainty"]
  assert pot.config.readout_heads == 3 and cal["members"] == 3 and cal["forces_scale"] > 0
  assert pot.uncertainty_scales == (cal["energy_scale"], cal["forces_scale"])
  assert "forces_spearman" in pot.metadata["test_uncertainty"]
  assert "uncertainty on the test frames" in capsys.readouterr().out
  out = tmp_path / "picked.extxyz"
  assert (
    cli.main(["select", str(copper_data), "--model", str(model), "--n", "4", "--out", str(out)])
    == 0
  )
  picked = ase.io.read(out, ":")
  assert len(picked) == 4 and picked[0].calc is None  # structures only: no model values as labels
  scores = [p.info["max_force_uncertainty"] for p in picked]
  assert min(scores) > 0 and len({p.info["source_index"] for p in picked}) == 4
  assert cli.main(["select", str(copper_data), "--model", str(_single(tmp_path)), "--n", "2"]) == 2


def _single(tmp_path):
  path = tmp_path / "single.eqm"
  potentials.Potential.create(0, species=["Cu"], **TINY).save(path)
  return path


@pytest.mark.slow  # committees of whole models; shallow ensembles (the default) train by default
def test_committee_training_shares_the_split(copper_data):
  frames = read_frames(str(copper_data), 3.0)
  pot = potentials.Potential.create(0, species=["Cu"], **TINY)
  cfg = training.TrainConfig(epochs=1, batch_size=4, time_limit=5.0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = training.train_committee(pot, frames, cfg, members=2, progress=False)
  c = res.potential
  assert c.config.committee == 2 and c.metadata["training"]["committee"] == [1, 1]
  # the budget is the committee's, shared: each member gets half of what is left
  assert c.metadata["training"]["config"]["time_limit"] == 5.0
  first, second = c.metadata["training"]["member_minutes"]
  # member 0 gets half of what is left once the split is made; it ended early (1 epoch)
  assert first == pytest.approx(2.5, abs=0.01) and 2.5 < second < 5.0
  assert len(c.metadata["member_test_metrics"]) == 2 and "uncertainty" in c.metadata
  f = frames[0]
  e = [m.energy(f.numbers, f.positions, f.dst, f.src, f.shifts, f.cell) for m in c.members()]
  assert e[0] != e[1]  # independently initialised
  assert c.energy(f.numbers, f.positions, f.dst, f.src, f.shifts, f.cell) == pytest.approx(
    np.mean(e)
  )
