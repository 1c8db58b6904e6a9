"""Many systems in one program (plugin.md.replicas through plugin.md.run on a list): every
replica's trajectory equals its run alone (mixed sizes, species and cells; NVE float64 to
1e-10 after 200 steps), overflow replays leave every replica's result unchanged, per-replica
temperatures and seeds, one output file per system and resume, guards, refusals, and sharding
over two forced CPU devices (a subprocess) equal to one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_copper_potential

import potentials
import plugin.md as md
from plugin.ase import Calculator
from plugin.md import driver, replicas
from plugin.md import engine as eng
from plugin.md import system as msys
from plugin.neighbors.replicas import image_table

NVE = dict(
  ensemble="nve",
  temperature=300.0,
  timestep=0.5,
  total_steps=200,
  chunk=50,
  log_interval=10,
  dr_threshold=0.3,
  dtype=jnp.float64,
)


def mixed_potential():
  """A tiny random model of H, C, O and Cu: molecules and metals in one batch."""
  pot = potentials.Potential.create(
    0,
    species=["H", "C", "O", "Cu"],
    cutoff=3.0,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=2,
    num_basis=4,
    density_features=False,
  )
  return pot.replace(params={**pot.params, "scale": np.full(4, 5.0, np.float32)})


def mixed_systems():
  """An open molecule (9 atoms), a cubic Cu cell (32) and a small triclinic Cu cell (8 atoms,
  narrower than twice the list cutoff: pairs with periodic images)."""
  mol = ase.build.molecule("CH3CH2OH")
  cubic = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  cubic.rattle(0.05, seed=1)
  tri = ase.build.bulk("Cu", "fcc", a=3.6).repeat(2)
  tri.rattle(0.05, seed=2)
  return [mol, cubic, tri]


@pytest.fixture(scope="module")
def pot():
  return mixed_potential()


@pytest.fixture(scope="module")
def batch(pot):
  return md.run(mixed_systems(), pot, seed=[0, 1, 2], **NVE)


@pytest.fixture(scope="module")
def alone(pot):
  return [md.run(a, pot, seed=i, **NVE) for i, a in enumerate(mixed_systems())]


def position_difference(a: ase.Atoms, b: ase.Atoms) -> float:
  """Largest distance between corresponding atoms (periodic: the nearest image)."""
  if a.pbc.all():
    f = a.get_scaled_positions(wrap=False) - b.get_scaled_positions(wrap=False)
    return float(np.abs((f - np.round(f)) @ a.cell.array).max())
  return float(np.abs(a.positions - b.positions).max())


def test_every_replica_equals_its_run_alone(batch, alone):
  assert len(batch) == 3
  for i, (one, many) in enumerate(zip(alone, batch)):
    assert many.total_steps == one.total_steps == 200
    assert position_difference(one.atoms, many.atoms) < 1e-10
    np.testing.assert_allclose(many.atoms.get_momenta(), one.atoms.get_momenta(), atol=1e-10)
    np.testing.assert_allclose(many.atoms.get_forces(), one.atoms.get_forces(), atol=1e-9)
    np.testing.assert_allclose(many.log.etot, one.log.etot, atol=1e-10)
    np.testing.assert_allclose(many.log.temperature, one.log.temperature, rtol=1e-9)
    assert len(many.atoms) == len(one.atoms)
    # the atoms moved and energy is conserved: a real trajectory, not a frozen one
    assert position_difference(many.atoms, mixed_systems()[i]) > 1e-3
    assert np.ptp(many.log.etot) < 1e-3 * len(many.atoms)
  periodic = batch[1]
  np.testing.assert_allclose(periodic.atoms.get_stress(), alone[1].atoms.get_stress(), atol=1e-10)
  np.testing.assert_allclose(periodic.log.pressure, alone[1].log.pressure, rtol=1e-9)


def test_a_model_of_the_same_shape_reuses_the_batch_program(pot, batch):
  """The parameters are an argument of the batch program, not constants in it: another model
  of the same shape (an active-learning round's) compiles nothing and moves by its own
  forces, as it does alone."""
  other = pot.replace(params=jax.tree.map(lambda x: 1.1 * x, pot.params))
  again = md.run(mixed_systems(), other, seed=[0, 1, 2], **NVE)
  assert again[0].num_compilations == 0
  alone = md.run(mixed_systems()[0], other, seed=0, **NVE)
  assert position_difference(again[0].atoms, alone.atoms) < 1e-10
  assert position_difference(again[0].atoms, batch[0].atoms) > 1e-6  # not the first model's


@pytest.mark.slow  # two minutes cold; tests/test_md.py replays an overflow by default
def test_overflow_replay_changes_no_replica(pot):
  """At a = 3.4 Å the second Cu shell straddles the list cutoff (3.3 Å): the 32-atom cell's
  pair count grows as it vibrates and overflows a list allocated without headroom; the replays
  leave every replica's trajectory as it is with ample room (and a list that overflows where
  it is built, capacity_multiplier < 1, is grown before the start forces are computed)."""
  systems = mixed_systems()
  systems[1] = ase.build.bulk("Cu", "fcc", a=3.4, cubic=True).repeat(2)
  systems[1].rattle(0.15, seed=0)
  kw = dict(NVE, total_steps=100)
  roomy = md.run(systems, pot, seed=[0, 1, 2], capacity_multiplier=3.0, **kw)
  tight = md.run(systems, pot, seed=[0, 1, 2], capacity_multiplier=1.0, **kw)
  short = md.run(systems, pot, seed=[0, 1, 2], capacity_multiplier=0.5, **kw)
  assert roomy[0].num_reallocations == 0 and tight[0].num_reallocations > 0
  for a, b, c in zip(roomy, tight, short):
    for other in (b, c):
      assert position_difference(a.atoms, other.atoms) < 1e-12
      np.testing.assert_allclose(a.log.etot, other.log.etot, atol=1e-12)


@pytest.mark.slow  # each replica equals its run alone by default
def test_temperatures_and_seeds_per_replica_langevin(tmp_path):
  """Copies of one system at two temperatures and seeds (float32, Langevin): each equals its
  run alone to round-off; files are named from one path, and resume continues every one."""
  pot = tiny_copper_potential(3.0)
  cu = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  kw = dict(
    ensemble="nvt_langevin",
    timestep=2.0,
    chunk=20,
    log_interval=10,
    dr_threshold=0.3,
    dtype=jnp.float32,
    friction=0.02,
  )
  out = tmp_path / "md.extxyz"
  many = md.run([cu, cu], pot, temperature=[300.0, 600.0], seed=5, total_steps=40, traj=out, **kw)
  for i, (t, many_i) in enumerate(zip((300.0, 600.0), many)):
    one = md.run(cu, pot, temperature=t, seed=5 + i, total_steps=40, **kw)
    assert position_difference(one.atoms, many_i.atoms) < 1e-4
    np.testing.assert_allclose(many_i.log.temperature, one.log.temperature, rtol=1e-3)
  assert many[1].log.temperature[-1] > many[0].log.temperature[-1]
  paths = [tmp_path / "md.0.extxyz", tmp_path / "md.1.extxyz"]
  assert [p.exists() for p in paths] == [True, True] and not out.exists()
  frames = md.read_trajectory(paths[1])
  assert [f.info["md_step"] for f in frames] == [0, 10, 20, 30, 40]
  # resume both to step 60; the first 40 steps are not rerun
  more = md.run(
    [cu, cu], pot, temperature=[300.0, 600.0], seed=5, total_steps=60, traj=out, resume=True, **kw
  )
  assert [r.first_step for r in more] == [40, 40] and [r.total_steps for r in more] == [60, 60]
  assert [f.info["md_step"] for f in md.read_trajectory(paths[0])][-3:] == [40, 50, 60]


@pytest.mark.slow  # a second integrator over replicas; Langevin runs by default
def test_nose_hoover_replicas_and_refusals(pot):
  cu = tiny_copper_potential(3.0)
  cell = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  kw = dict(
    ensemble="nvt_nose_hoover",
    timestep=2.0,
    total_steps=20,
    chunk=20,
    dr_threshold=0.3,
    dtype=jnp.float64,
  )
  many = md.run([cell, cell], cu, temperature=[300.0, 500.0], seed=[1, 2], **kw)
  for t, s, m in zip((300.0, 500.0), (1, 2), many):
    one = md.run(cell, cu, temperature=t, seed=s, **kw)
    assert position_difference(one.atoms, m.atoms) < 1e-10
    np.testing.assert_allclose(m.log.conserved, one.log.conserved, atol=1e-10)
  systems = mixed_systems()
  with pytest.raises(ValueError, match="must have one size; use nvt_langevin"):
    md.run(systems, pot, **dict(kw, total_steps=1))
  with pytest.raises(ValueError, match="not run for several systems at once"):
    md.run([cell, cell], cu, ensemble="npt", total_steps=1)
  with pytest.raises(ValueError, match="3 entries for 2 systems"):
    md.run([cell, cell], cu, temperature=[1.0, 2.0, 3.0], total_steps=1)
  with pytest.raises(ValueError, match="same trajectory file"):
    md.run([cell, cell], cu, traj=["a.traj", "a.traj"], total_steps=1)
  with pytest.raises(ValueError, match="empty"):
    md.run([], cu, total_steps=1)


def test_a_runaway_replica_leaves_the_batch_and_the_others_finish(tmp_path):
  # the hot replica runs away: it stops at its last good step (frame written, guard named)
  # while the calm ones go on to the end in the same program, each as it runs alone
  pot = tiny_copper_potential(3.0)
  exploding = pot.replace(params=dict(pot.params, scale=jnp.array([2000.0], jnp.float32)))
  calm = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)  # perfect: no forces
  hot = calm.copy()
  hot.rattle(0.15, seed=0)
  out = tmp_path / "g.traj"
  kw = dict(
    ensemble="nve",
    timestep=2.0,
    total_steps=200,
    chunk=20,
    log_interval=5,
    dr_threshold=0.2,
    dtype=jnp.float64,
    max_temperature=5000.0,
  )
  with pytest.warns(RuntimeWarning, match="system 1: MD stopped at step"):
    res = md.run(
      [calm, hot, calm], exploding, temperature=[1.0, 300.0, 2.0], seed=[0, 1, 2], traj=out, **kw
    )
  assert res[1].stopped == "max_temperature" and res[1].total_steps < 200
  assert "system" not in res[1].reason and res[1].reason.startswith("MD stopped at step")
  for i, r in enumerate(res):
    last = md.read_trajectory(md.driver.replica_path(out, i))[-1]
    assert last.info["md_step"] == r.total_steps == r.log.step[-1]
    assert last.get_temperature() <= 5000.0 and np.all(np.isfinite(last.positions))
    # the energy of the last good step (no recorded step) is that step's own
    fresh = last.copy()
    fresh.calc = Calculator(exploding, dtype="float64")
    assert fresh.get_potential_energy() == pytest.approx(last.get_potential_energy(), rel=1e-10)
  for i in (0, 2):
    assert res[i].stopped is None and res[i].total_steps == 200
    alone = md.run(calm, exploding, temperature=[1.0, 300.0, 2.0][i], seed=i, **kw)
    assert position_difference(res[i].atoms, alone.atoms) < 1e-10
    np.testing.assert_allclose(res[i].log.etot, alone.log.etot, rtol=0, atol=1e-9)
  assert res[0].num_compilations == 1  # the runaway is parked: one program for the whole run
  # a wall-time limit stops every system still running at a chunk's end, its frame written
  walled = tmp_path / "w.traj"
  with pytest.warns(RuntimeWarning, match="max_wall_time"):
    res = md.run(
      [calm, hot, calm], exploding, temperature=[1.0, 300.0, 2.0], seed=[0, 1, 2], traj=walled,
      max_wall_time=1e-6, **kw,
    )  # fmt: skip
  for i in (0, 2):
    last = md.read_trajectory(md.driver.replica_path(walled, i))[-1]
    assert res[i].stopped == "max_wall_time" and last.info["md_step"] == res[i].total_steps < 200


def test_a_parked_replica_stands_still_and_keeps_no_pairs(pot):
  """Parking (how a system leaves a batch without a new program): the replica's pairs,
  momenta and forces are gone and stay gone through a reallocation of the list, it does not
  move, and every other replica steps exactly as before."""
  systems = [msys.from_atoms(a, 3.0, 0.3) for a in mixed_systems()]
  rng = np.random.default_rng(0)
  momenta = [0.1 * rng.normal(size=s.R.shape) for s in systems]
  batch = replicas.stack(systems, momenta, pot)
  key = driver._batch_key([md.MDOptions(**NVE).for_system(i, 3) for i in range(3)], systems)
  engine = driver._batch_engine(pot, key, batch)
  carry, extra, _ = replicas.start(engine, batch, [0, 1, 2], jnp.float64, pot.params)
  parked = replicas.park(carry, [1])
  assert int(parked[1].count[1]) == 0 and np.all(np.asarray(parked[1].dst[1]) == batch.num_atoms)
  grown, _ = eng.allocate(engine, parked[0].position, None, extra + 1, like=parked[1])
  assert int(grown.count[1]) == 0 and np.array_equal(
    np.asarray(grown.count)[[0, 2]], np.asarray(carry[1].count)[[0, 2]]
  )
  limits = jnp.asarray([[np.inf, np.inf, 1.0], [np.inf, np.inf, 0.0], [np.inf, np.inf, 1.0]])
  runs = [next(eng.simulate_chunks(engine, c, 0, 50, extra, limits)) for c in (carry, parked)]
  (s0, _, _), (s1, _, _) = runs[0].carry, runs[1].carry
  np.testing.assert_array_equal(s1.position[1], parked[0].position[1])
  assert not np.any(np.asarray(s1.momentum[1])) and not np.any(np.asarray(s1.force[1]))
  for k in (0, 2):
    np.testing.assert_array_equal(s1.position[k], s0.position[k])


def test_padding_and_pair_list_match_brute_force(pot):
  """The replica list holds exactly the pairs within cutoff + skin of every system (images
  in the small cell), and padding atoms none."""
  from plugin.md import system as msys

  systems = [msys.from_atoms(a, 3.0, 0.3) for a in mixed_systems()]
  batch = replicas.stack(systems, [np.zeros_like(s.R) for s in systems], pot)
  table = image_table([s.box for s in systems], [s.periodic for s in systems], 3.3)
  fns = replicas.ReplicaNeighborFns(batch.geometry, table, 3.3, 0.3, 1.5)
  nbrs = fns.allocate(jnp.asarray(batch.R))
  for i, (s, a) in enumerate(zip(systems, mixed_systems())):
    n = int(nbrs.count[i])
    dst, src = np.asarray(nbrs.dst[i]), np.asarray(nbrs.src[i])
    assert np.all(dst[:n] < len(a)) and np.all(src[:n] < len(a)) and np.all(np.diff(dst[:n]) >= 0)
    assert np.all(dst[n:] == batch.num_atoms)
    if a.pbc.all():
      from ase.neighborlist import neighbor_list

      expected = len(neighbor_list("i", a, 3.3))
    else:
      d = np.linalg.norm(a.positions[:, None] - a.positions[None], axis=-1)
      expected = int(np.sum((d < 3.3) & ~np.eye(len(a), dtype=bool)))
    assert n == expected


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np, jax.numpy as jnp
    import plugin.md as md
    from test_md_replicas import mixed_potential, mixed_systems, NVE
    assert jax.device_count() == 2
    systems = mixed_systems()[1:] * 2  # four periodic systems: two per device
    res = md.run(systems, mixed_potential(), seed=[0, 1, 2, 3], **dict(NVE, total_steps=60))
    np.save({out!r}, np.concatenate([r.atoms.positions.ravel() for r in res]
                                    + [r.log.etot for r in res]))
""")


@pytest.mark.slow  # forces two host devices; a GPU box has its own
def test_sharded_over_two_devices_equals_one_device(pot, tmp_path):
  out = tmp_path / "sharded.npy"
  tests = str(Path(__file__).parent)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  subprocess.run(
    [sys.executable, "-c", SHARDED.format(tests=tests, out=str(out))],
    check=True,
    env=env,
    cwd=str(Path(__file__).parents[1]),
    timeout=600,
  )
  systems = mixed_systems()[1:] * 2
  res = md.run(systems, pot, seed=[0, 1, 2, 3], **dict(NVE, total_steps=60))
  ref = np.concatenate([r.atoms.positions.ravel() for r in res] + [r.log.etot for r in res])
  np.testing.assert_allclose(np.load(out), ref, atol=1e-10)
