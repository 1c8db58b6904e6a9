"""A shallow ensemble whose members' force deviations are read out (``force_heads``): their
physics, that they leave the model alone, both engines, training, the file and the guard."""

import dataclasses
import warnings

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np

import pytest

import potentials
from potentials import ensemble, observables, training
from potentials.training.batching import device_batch, make_batch
from plugin import cli, md
from plugin.ase import Calculator
from plugin.data import frame_from_atoms, read_frames

from conftest import TickClock, all_pairs, assert_jax_md_spread_matches, dimer_fn, random_cluster

TINY = dict(cutoff=3.0, features=8, max_degree=1, num_iterations=1, num_heads=2, num_basis=4)


def _with_readout_scale(pot, factor):
  """``pot`` with its readout's last layer times ``factor`` (0: identical members)."""
  ro = dict(pot.params["force_readout"])
  ro["out"] = {"kernel": np.asarray(ro["out"]["kernel"]) * factor}
  return pot.replace(params={**pot.params, "force_readout": ro})


@pytest.fixture(scope="module")
def readout():
  """3 heads with read-out force deviations of ~0.1-1 eV/Å, forces of a few eV/Å."""
  p = potentials.Potential.create(
    0, species=["H", "C", "O"], readout_heads=3, force_heads=True, **TINY
  )
  p = p.replace(params={**p.params, "scale": np.full_like(p.params["scale"], 5.0)})
  return _with_readout_scale(p, 300.0)


def _members(pot, z, pos, dst, src, **kw):
  r = potentials.ops.pair_vectors(jnp.asarray(pos), jnp.asarray(dst), jnp.asarray(src))
  fn = pot.member_forces_fn()
  e, d = fn(pot.params, species_index=jnp.asarray(pot.species_index(z)), r=r, dst=dst, src=src)
  return np.asarray(e), np.asarray(d)


def test_config_checks_and_old_configs():
  with pytest.raises(ValueError, match="readout_heads > 1"):
    potentials.ModelConfig(readout_heads=1, force_heads=True)
  with pytest.raises(ValueError, match="committee = 1"):
    potentials.ModelConfig(readout_heads=2, committee=2, force_heads=True)
  old = potentials.ModelConfig(readout_heads=3).to_dict()
  del old["force_heads"]  # a file written before the option
  assert potentials.ModelConfig.from_dict(old).force_heads is False
  single = potentials.Potential.create(0, species=["H"], **TINY)
  with pytest.raises(ValueError, match="force_heads"):
    single.member_forces_fn()


def test_heads_is_a_deprecated_name_of_readout_heads():
  """``heads`` (keyword, attribute, model-file key) read as the attention's heads: renamed."""
  with pytest.warns(DeprecationWarning, match="heads= is deprecated .*use readout_heads="):
    cfg = potentials.ModelConfig(heads=3)
  assert cfg.readout_heads == 3 and cfg == potentials.ModelConfig(readout_heads=3)
  with pytest.warns(DeprecationWarning, match="ModelConfig.heads is deprecated"):
    assert cfg.heads == 3
  old_file = {**cfg.to_dict(), "heads": 4}
  del old_file["readout_heads"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an old file is not the user's code: no warning
    assert potentials.ModelConfig.from_dict(old_file).readout_heads == 4
  with pytest.raises(TypeError, match="give only readout_heads="):
    potentials.ModelConfig(heads=2, readout_heads=2)


def test_deviations_rotate_with_the_structure_and_average_to_zero(readout, hco_cluster):
  """Rotation, reflection, translation, permutation: deviations are vectors (rotated,
  permuted), energies invariant; their mean over members is zero."""
  z, pos, dst, src = hco_cluster
  e0, d0 = _members(readout, z, pos, dst, src)
  assert d0.shape == (6, 3, 3) and np.abs(d0).max() > 0.05
  np.testing.assert_allclose(d0.mean(axis=1), 0, atol=1e-12)
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
  q = q * np.array([1, 1, -1])  # include a reflection
  perm = np.random.default_rng(2).permutation(len(z))
  pos2 = (pos @ q.T + [1.0, -2.0, 0.5])[perm]
  e1, d1 = _members(readout, z[perm], pos2, *all_pairs(pos2, TINY["cutoff"]))
  np.testing.assert_allclose(e1, e0[perm], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(d1, (d0 @ q.T)[perm], rtol=1e-9, atol=1e-12)


def test_padding_and_the_cutoff_leave_deviations_alone(readout):
  deviations = dimer_fn(readout, lambda *a, **k: readout.member_forces_fn()(*a, **k)[1])

  np.testing.assert_allclose(deviations(1.3, 3)[:2], deviations(1.3, 0), atol=1e-12)
  assert np.all(deviations(1.3, 3)[2:] == 0) and np.abs(deviations(1.3, 0)).max() > 1e-3
  # smooth at the cutoff: a pair about to leave contributes (almost) nothing
  assert np.abs(deviations(TINY["cutoff"] - 1e-3, 0)).max() < 1e-9


def test_readout_changes_nothing_the_model_predicts(readout, hco_cluster):
  """Energies, forces and member energies equal those of the same network without the
  readout, and no gradient of the deviations reaches the network's parameters."""
  z, pos, dst, src = hco_cluster
  plain = training.without_readout(readout)
  e_ro, f_ro = readout.energy_and_forces(z, pos, dst, src)
  e_pl, f_pl = plain.energy_and_forces(z, pos, dst, src)
  assert e_ro == e_pl and np.array_equal(f_ro, f_pl)
  r = potentials.ops.pair_vectors(jnp.asarray(pos), jnp.asarray(dst), jnp.asarray(src))
  kw = dict(species_index=jnp.asarray(readout.species_index(z)), r=r, dst=dst, src=src)
  member_e = plain.member_energies_fn()(plain.params, **kw)
  np.testing.assert_array_equal(readout.member_forces_fn()(readout.params, **kw)[0], member_e)
  grads = jax.grad(lambda p: jnp.sum(readout.member_forces_fn()(p, **kw)[1] ** 2))(readout.params)
  network = {k: v for k, v in grads.items() if k != "force_readout"}
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(network))
  assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["force_readout"]))


def test_compute_returns_aux_of_the_same_forward_pass(readout, hco_cluster):
  z, pos, dst, src = hco_cluster
  pair_fn = ensemble.readout_mean(readout.member_forces_fn())
  kw = dict(species_index=jnp.asarray(readout.species_index(z)), dst=dst, src=src)
  energies = lambda r: pair_fn(readout.params, r=r, **kw)
  pos = jnp.asarray(pos)
  out = observables.compute(energies, pos, dst=dst, src=src, strain=False, aux=True)
  plain = observables.compute(lambda r: energies(r)[0], pos, dst=dst, src=src, strain=False)
  np.testing.assert_array_equal(out.forces, plain.forces)
  assert out.aux[1].shape == (6, 3, 3) and plain.aux is None
  with pytest.raises(ValueError, match="aux"):
    observables.compute(energies, pos, dst=dst, src=src, members=True, aux=True)


def test_ase_and_jax_md_give_the_read_out_spread_in_one_compilation(readout):
  a = ase.build.molecule("CH3CH2OH")
  a.calc = Calculator(readout)
  f = a.get_forces()
  res = {k: a.calc.get_property(k, a) for k in ("energy_uncertainty", "forces_uncertainty")}
  assert a.calc.num_compilations == 1
  dst, src = all_pairs(a.positions, TINY["cutoff"])
  _, d = _members(readout, a.numbers, a.positions, dst, src)
  _, s_f = readout.uncertainty_scales
  np.testing.assert_allclose(
    res["forces_uncertainty"], s_f * np.sqrt(np.mean(d**2, axis=(1, 2))), rtol=2e-4, atol=1e-7
  )
  b = a.copy()  # the forces are the mean's, as without the readout
  b.calc = Calculator(training.without_readout(readout))
  np.testing.assert_allclose(b.get_forces(), f, atol=1e-5)
  assert_jax_md_spread_matches(readout, a, res)


def test_zero_readout_has_zero_spread_and_the_guard_fires_on_a_wide_one(readout):
  """Identical members (a zero readout) never trip the MD guard; a planted wide readout
  stops the run at the first check."""
  atoms = ase.build.molecule("CH3CH2OH")
  kw = dict(ensemble="nvt_langevin", temperature=300, timestep=0.25, total_steps=40, chunk=20)
  quiet = md.run(atoms, _with_readout_scale(readout, 0.0), max_uncertainty=1e-6, **kw)
  assert quiet.stopped is None and quiet.uncertain == []
  with pytest.warns(RuntimeWarning, match="force uncertainty"):
    r = md.run(atoms, readout, max_uncertainty=1e-3, **kw)
  assert r.stopped == "max_uncertainty" and r.total_steps == 20 and r.uncertain[0]["atoms"]


@pytest.mark.slow  # the loss gradient test shows the readout gets none by default
def test_training_leaves_the_readout_and_the_network_alone(readout, hco_cluster):
  """With a readout, the loss and the network's gradients are those of the same ensemble
  without one, and the readout gets none (it is fitted afterwards)."""
  z, pos, _, _ = hco_cluster
  frame = dataclasses.replace(
    frame_from_atoms(ase.Atoms(z, pos), TINY["cutoff"]), energy=-3.0, forces=np.ones((6, 3))
  )
  cfg = training.TrainConfig(nll_weight=1.0)
  bt = device_batch(make_batch([frame], readout, 1, 8, 64), jnp.float64)
  plain = training.without_readout(readout)
  (l_ro, _), g_ro = jax.value_and_grad(training.loss_fn(readout, cfg), has_aux=True)(
    readout.params, bt
  )
  (l_pl, _), g_pl = jax.value_and_grad(training.loss_fn(plain, cfg), has_aux=True)(plain.params, bt)
  assert float(l_ro) == pytest.approx(float(l_pl), rel=1e-12)
  for k in g_pl:
    for a, b in zip(jax.tree_util.tree_leaves(g_ro[k]), jax.tree_util.tree_leaves(g_pl[k])):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(g_ro["force_readout"]))


def test_fitted_readout_imitates_the_differentiated_members(readout):
  """A fresh readout fitted to a few structures gives about the spread of the members'
  differentiated forces on a structure it never saw."""
  plain = training.without_readout(readout)
  z = np.array([6, 8, 1, 1, 1, 6])
  frames = [
    frame_from_atoms(ase.Atoms(z, random_cluster(6, seed=s, box=3.0)), TINY["cutoff"])
    for s in range(8)
  ]
  copies = training.readout_fit.rattled(frames, 0.1)
  assert copies[0].forces is None and not np.allclose(copies[0].positions, frames[0].positions)
  # 600 readings of a clock that ticks a second each: about 600 epochs on any machine
  fitted = training.fit_force_readout(plain, frames, minutes=10, seed=1, clock=TickClock())
  assert fitted.config.force_heads and fitted.metadata["force_readout"]["r2"] > 0.8
  unseen = ase.Atoms(numbers=z, positions=random_cluster(6, seed=20, box=3.0))
  sigma = {}
  for name, pot in (("exact", plain), ("fitted", fitted), ("fresh", training.with_readout(plain))):
    unseen.calc = Calculator(pot, dtype="float64")
    sigma[name] = unseen.calc.get_property("forces_uncertainty", unseen)
  err = lambda s: np.linalg.norm(s - sigma["exact"]) / np.linalg.norm(sigma["exact"])
  assert err(sigma["fitted"]) < 0.5 < err(sigma["fresh"])


@pytest.mark.slow  # the readout fit, calibration and file are tested in Python by default
def test_cli_trains_force_heads_calibrated_and_the_file_round_trips(copper_data, tmp_path):
  model = tmp_path / "ro.eqm"
  hyper = '{"features": 8, "max_degree": 1, "num_iterations": 1, "num_basis": 4}'
  argv = ["train", str(copper_data), "--species", "Cu", "--cutoff", "3.0", "--model-config", hyper]
  argv += ["--epochs", "2", "--batch-size", "4", "--train-config", '{"readout_minutes": 0.05}']
  assert cli.main(argv + ["--readout-heads", "3", "--force-heads", "--out", str(model)]) == 0
  pot = potentials.load(model)
  assert pot.config.force_heads and pot.metadata["uncertainty"]["forces_scale"] > 0
  assert pot.metadata["force_readout"]["epochs"] >= 2 and "test_uncertainty" in pot.metadata
  # the differentiated ensemble drops the readout's calibration rather than misuse it
  plain = training.without_readout(pot)
  assert "uncertainty" not in plain.metadata and "force_readout" not in plain.metadata
  assert cli.main(argv + ["--force-heads", "--out", str(tmp_path / "x.eqm")]) == 2
  assert cli.main(argv + ["--committee", "2", "--force-heads"]) == 2
  assert cli.main(argv + ["--ensemble", "2", "--force-heads"]) == 2  # its deprecated name
  with pytest.raises(ValueError, match="readout_minutes"):
    training.TrainConfig(readout_minutes=0)


def test_committees_refuse_readouts_before_any_work(readout, copper_data):
  """A committee differentiates its members: stacking or training one from models with a
  readout fails at once, naming the fix."""
  with pytest.raises(ValueError, match="without_readout"):
    potentials.Potential.stack([readout, readout])
  frames = read_frames(str(copper_data), 3.0)
  cu = potentials.Potential.create(0, species=["Cu"], readout_heads=2, force_heads=True, **TINY)
  with pytest.raises(ValueError, match="without_readout"):
    training.train_committee(cu, frames, training.TrainConfig(epochs=1), members=2)
  with pytest.raises(ValueError, match="structures"):
    training.fit_force_readout(training.without_readout(cu), [])
