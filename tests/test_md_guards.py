"""Guards against runaway MD (plugin.md.guards): the rule, planted exploding runs stopped with
their last good frame written (JAX-MD engine, ASE engine, the ASE observer), non-finite states
stopped inside the compiled loop, and the CLI's exit status and one-line reason."""

from __future__ import annotations

import math

import ase.build
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import write
from ase.io.trajectory import Trajectory
from ase.md.verlet import VelocityVerlet
from conftest import tiny_copper_potential

import plugin.ase
import plugin.md as md
from plugin import cli, thermo
from plugin.md import guards
from plugin.md.settings import DEFAULTS, guard_limits

KW = dict(
  ensemble="nve",
  temperature=300.0,
  timestep=2.0,
  chunk=20,
  log_interval=5,
  dr_threshold=0.2,
  dtype=jnp.float64,
  seed=0,
)


def cu32(rattle: float = 0.15) -> ase.Atoms:
  atoms = ase.build.bulk("Cu", "fcc", a=3.4, cubic=True).repeat(2)
  atoms.rattle(rattle, seed=0)
  return atoms


@pytest.fixture(scope="module")
def exploding():
  """The tiny Cu model with 100x its forces: at 2 fs, NVE heats past 5000 K in a few steps."""
  pot = tiny_copper_potential(3.0)
  return pot.replace(params=dict(pot.params, scale=jnp.array([2000.0], jnp.float32)))


# ------------------------------------------------------------------------------------------
# the rule (no MD)


def test_default_limits_and_the_host_rule():
  assert guard_limits(max_temperature=None, max_force=None, temperature=300.0) == (
    DEFAULTS.max_temperature_floor,
    math.inf,
  )
  assert guard_limits(max_temperature=None, max_force=2.0, temperature=1000.0) == (
    DEFAULTS.max_temperature_factor * 1000.0,
    2.0,
  )
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="max_temperature must be > 0"):
      guard_limits(max_temperature=bad, max_force=None, temperature=300.0)
  with pytest.raises(ValueError, match="max_force must be > 0"):
    guard_limits(max_temperature=None, max_force=0.0, temperature=300.0)
  x, p, f, m = np.zeros((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones(2)
  limits = dict(max_temperature=1e9, max_force=10.0)
  assert guards.check(x, p, f, 0.0, m, **limits) == (guards.OK, 0.0)
  assert guards.check(x + np.nan, p, f, 0.0, m, **limits)[0] == guards.NON_FINITE
  assert guards.check(x, p, f, np.inf, m, **limits)[0] == guards.NON_FINITE_ENERGY
  code, t = guards.check(x, p, f, 0.0, m, max_temperature=1.0, max_force=10.0)
  assert code == guards.HOT and t == pytest.approx(thermo.temperature(p, m))
  code, fmax = guards.check(x, p, 10 * f, 0.0, m, **limits)
  assert code == guards.FORCE and fmax == pytest.approx(10 * math.sqrt(3))


def test_non_finite_forces_stop_the_compiled_loop_at_the_last_good_step():
  # One particle in a harmonic well whose forces turn NaN beyond |x| = 2 (the trap); started
  # at the centre with momentum 3, it would swing out to 3 (omega = 1 in internal units).
  from jax_md import space
  from plugin.md import engine as eng
  from plugin.md.ensembles import Params

  trap = 2.0

  def energy_fn(R, **kw):
    cliff = jnp.where(jnp.abs(R) > trap, jnp.sqrt(trap - jnp.abs(R)), 0.0)  # NaN past it
    return 0.5 * jnp.sum(R**2) + jnp.sum(cliff)

  dt_fs = 0.5
  params = Params.from_user(
    timestep=dt_fs, temperature=0.0, friction=0.0, tau_t=1.0, tau_p=1.0, pressure=0.0
  )
  key = eng.EngineKey(
    ensemble="nve",
    params=params,
    numbers=(29,),
    periodic=False,
    box=tuple(np.eye(3).ravel()),
    dr_threshold=0.0,
    capacity_multiplier=1.0,
    chunk=10,
    log_interval=5,
    traj_interval=0,
  )
  engine = eng.make_engine(
    key,
    energy_fn=energy_fn,
    neighbor_fn=None,
    displacement_fn=None,
    shift_fn=space.free()[1],
    cutoff=0.0,
  )
  carry, extra, _ = eng.start(
    engine, jnp.zeros((1, 3)), np.eye(3), np.ones(1), np.array([[3.0, 0.0, 0.0]]), seed=0
  )
  chunks = list(eng.simulate_chunks(engine, carry, 0, 1000, extra))
  last = chunks[-1]
  assert last.guard == guards.NON_FINITE and len(chunks) < 10
  x = float(last.carry[0].position[0, 0])
  dt = dt_fs * thermo.FS
  # the last good step is inside the trap and the next one (analytically) beyond it
  assert 0 < x <= trap and 3.0 * math.sin((last.stop + 1) * dt) > trap
  assert x == pytest.approx(3.0 * math.sin(last.stop * dt), abs=1e-2)
  assert np.all(np.isfinite(np.asarray(last.carry[0].force)))
  assert all(c.guard == 0 for c in chunks[:-1])


# ------------------------------------------------------------------------------------------
# planted runaways in plugin.md.run


def test_exploding_run_stopped_by_the_default_temperature_guard(exploding, tmp_path):
  path = tmp_path / "boom.extxyz"
  with pytest.warns(RuntimeWarning, match="MD stopped at step"):
    result = md.run(cu32(), exploding, total_steps=200, traj=path, **KW)
  assert result.stopped == "max_temperature" and result.total_steps < 200
  assert result.reason.startswith(f"MD stopped at step {result.total_steps + 1}: temperature")
  assert "exceeded max_temperature 5000 K" in result.reason and "\n" not in result.reason
  frames = md.read_trajectory(path)
  last = frames[-1]
  # the last good state is the trajectory's last frame, the result's atoms and the last row
  assert last.info["md_step"] == result.total_steps == result.log.step[-1]
  assert 0 < last.get_temperature() <= 5000.0
  assert np.all(np.isfinite(last.positions)) and np.all(np.isfinite(last.get_forces()))
  np.testing.assert_allclose(last.positions, result.atoms.positions, atol=1e-6)
  assert result.log.temperature[-1] == pytest.approx(last.get_temperature(), rel=1e-6)
  # the same run with the guard off goes on to the end, far hotter
  off = md.run(
    cu32(), exploding, total_steps=result.total_steps + 10, max_temperature=math.inf, **KW
  )
  assert off.stopped is None and off.log.temperature[-1] > 5000.0


def test_force_guard(exploding, tmp_path):
  # From the perfect lattice (no force) the forces grow as the atoms move. The unguarded
  # run's largest force per frame: the limit lies between the start's and the run's largest,
  # so the guard must fire no later than the first frame above it.
  unguarded = tmp_path / "unguarded.extxyz"
  md.run(cu32(0.0), exploding, total_steps=40, traj=unguarded, max_temperature=math.inf, **KW)
  fmax = np.array(
    [np.linalg.norm(f.get_forces(), axis=1).max() for f in md.read_trajectory(unguarded)]
  )
  assert fmax[0] < 1e-3 < fmax.max()
  limit = 0.5 * (fmax[0] + fmax.max())
  first_above = 5 * int(np.argmax(fmax > limit))  # a frame every log_interval = 5 steps
  path = tmp_path / "force.h5"
  with pytest.warns(RuntimeWarning, match="max_force"):
    result = md.run(
      cu32(0.0),
      exploding,
      total_steps=200,
      traj=path,
      max_force=limit,
      max_temperature=math.inf,
      **KW,
    )
  assert result.stopped == "max_force" and result.total_steps < first_above
  assert f"exceeded max_force {limit:g} eV/Å" in result.reason
  frames = md.read_trajectory(path)
  assert frames[-1].info["md_step"] == result.total_steps
  assert all(np.linalg.norm(f.get_forces(), axis=1).max() <= limit for f in frames)
  # a start already beyond the limit is refused, naming the option
  with pytest.raises(ValueError, match="start structure fails a runaway guard.*max_force"):
    md.run(cu32(), exploding, total_steps=10, max_force=1e-3, **KW)


# ------------------------------------------------------------------------------------------
# ASE: the observer and the ASE engine


def test_ase_observer_stops_dynamics_before_the_runaway_frame_is_written(tmp_path):
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  atoms.rattle(0.05, seed=1)
  atoms.calc = EMT()
  dyn = VelocityVerlet(atoms, timestep=40.0 * ase.units.fs)  # far too long for Cu
  path = tmp_path / "emt.traj"
  traj = Trajectory(str(path), "w", atoms)
  dyn.attach(traj.write, interval=1)  # attached first; the guard still runs before it
  g = plugin.ase.guard(dyn, temperature=300.0)
  with pytest.raises(plugin.ase.RunawayError, match="exceeded max_temperature 5000 K") as e:
    dyn.run(100)
  traj.close()
  assert e.value.guard == "max_temperature" and g.last_good is e.value.last_good
  frames = ase.io.read(path, ":")
  assert len(frames) == e.value.step  # steps 0 .. step - 1: never the runaway one
  np.testing.assert_allclose(frames[-1].positions, e.value.last_good.positions)
  assert frames[-1].get_temperature() <= 5000.0


# ------------------------------------------------------------------------------------------
# the CLI: exit status and one-line reason, both engines


@pytest.mark.parametrize("engine", [pytest.param("jax-md", marks=pytest.mark.slow), "ase"])
def test_cli_exit_status_and_one_line_reason(exploding, tmp_path, capsys, engine):
  model, structure = tmp_path / "boom.eqm", tmp_path / "cu.extxyz"
  exploding.save(model)
  write(structure, cu32())
  out = tmp_path / "boom.extxyz"
  status = cli.main(
    [
      "md",
      str(structure),
      "--model",
      str(model),
      "--ensemble",
      "nve",
      "--dt",
      "2",
      "--steps",
      "200",
      "--engine",
      engine,
      "--out",
      str(out),
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the reason
  assert status == cli.RUNAWAY_STATUS != 0
  reason = [line for line in err if "MD stopped" in line]
  assert reason == err[-1:] and reason[0].startswith("eqattn md: MD stopped at step")
  assert "max_temperature 5000 K" in reason[0] and str(out) in reason[0]
  last = md.read_trajectory(out, -1)
  assert np.all(np.isfinite(last.positions)) and last.get_temperature() <= 5000.0
  assert f"the last good frame is step {last.info['md_step']}" in reason[0]


@pytest.mark.slow  # tests/test_md_replicas.py drops a runaway replica by default
def test_cli_batch_finishes_the_systems_that_did_not_run_away(exploding, tmp_path, capsys):
  # the rattled cell runs away, the perfect one (no forces) finishes: its summary is printed,
  # the runaway's line names the guard, and the exit status says one stopped
  model, calm, hot = tmp_path / "boom.eqm", tmp_path / "calm.extxyz", tmp_path / "hot.extxyz"
  exploding.save(model)
  perfect = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  write(calm, perfect)
  write(hot, cu32())
  out = tmp_path / "b.traj"
  argv = ["md", str(calm), str(hot), "--model", str(model), "--ensemble", "nve"]
  argv += ["--temperature", "1", "--dt", "2", "--steps", "100", "--out", str(out)]
  status = cli.main(argv)
  captured = capsys.readouterr()
  assert status == cli.RUNAWAY_STATUS
  assert "system 0 (Cu32, 1 K, " in captured.out and "done: 100 steps" in captured.out
  assert "system 1 (Cu32, 1 K, " in captured.out and "left the batch: MD stopped" in captured.out
  assert captured.err.strip().splitlines()[-1].startswith("eqattn md: system 1: MD stopped")
  assert md.read_trajectory(tmp_path / "b.0.traj", -1).info["md_step"] == 100
  assert md.read_trajectory(tmp_path / "b.1.traj", -1).info["md_step"] < 100
