"""Tests for plugin.md, the jitted MD driver: NVE energy conservation, overflow replay,
interrupted + resumed trajectories, NVT, NPT, open boundaries,
refusals.

Compiling the chunk function dominates the cost, so tests share compiled engines: runs with the
same settings (``REF`` below) reuse one compilation (the driver caches engines by potential and
settings). conftest enables float64; the NVT Langevin test runs float32 on purpose.
"""

from __future__ import annotations

import csv
import dataclasses
import functools

import ase
import ase.build
import ase.cluster
import ase.io
import ase.units
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_copper_potential
from ase.io.trajectory import Trajectory
from jax_md import simulate, space

import potentials
import plugin.md as md
from plugin import thermo
from plugin.md import engine as eng
from plugin.md.ensembles import Params, npt_fractional_shift

RC = 3.0
SKIN = 0.2  # box widths >= 2 * (RC + SKIN) = 6.4 Å


@pytest.fixture(scope="module")
def pot():
  return tiny_copper_potential(RC)


def cu32(a: float = 3.4, rattle: float = 0.15) -> ase.Atoms:
  """32 rattled fcc Cu atoms in a 2x2x2 cubic cell. At a = 3.4 Å the second shell (3.4 Å)
  straddles the list cutoff RC + SKIN = 3.2 Å, so the pair count changes as atoms vibrate."""
  atoms = ase.build.bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
  atoms.rattle(rattle, seed=0)
  return atoms


# The shared NVE reference: float64, 1 fs, 200 steps in chunks of 50, a row and a frame every
# 10 steps. Every run with these settings (and the same potential) reuses one compilation.
REF = dict(
  ensemble="nve",
  temperature=300.0,
  timestep=1.0,
  chunk=50,
  log_interval=10,
  dr_threshold=SKIN,
  dtype=jnp.float64,
  seed=0,
)
STEPS = 200


@pytest.fixture(scope="module")
def reference(pot, tmp_path_factory):
  path = tmp_path_factory.mktemp("md") / "reference.traj"
  result = md.run(cu32(), pot, total_steps=STEPS, traj=path, **REF)
  return result, path


def frames(path):
  with Trajectory(str(path)) as t:
    return [a for a in t]


# --------------------------------------------------------------------------------------------
# units and velocities (no MD)


def test_md_reexports_thermo():
  # plugin.md's units and velocity helpers are plugin.thermo's (tests/test_thermo.py).
  assert (md.FS, md.KB, md.BAR) == (thermo.FS, thermo.KB, thermo.BAR)
  assert md.temperature is thermo.temperature and md.kinetic_energy is thermo.kinetic_energy
  assert md.maxwell_boltzmann is thermo.maxwell_boltzmann


def test_free_particle_moves_v_times_t(pot):
  # A lone atom (open boundaries, no pairs at all) feels no force: x(t) = x(0) + v t.
  atoms = ase.Atoms("Cu", positions=[[0.3, -1.0, 2.0]])
  v = np.array([[0.01, -0.02, 0.005]])  # Å per ASE time unit
  atoms.set_velocities(v)
  result = md.run(atoms, pot, total_steps=100, chunk=50, timestep=1.5, dtype=jnp.float64)
  expected = atoms.positions + v * (100 * 1.5 * ase.units.fs)
  # JAX-MD rounds dt to float32 inside velocity Verlet: relative 6e-8 of the displacement.
  np.testing.assert_allclose(result.atoms.positions, expected, rtol=0, atol=1e-8)
  np.testing.assert_allclose(result.atoms.get_velocities(), v, rtol=1e-12)
  assert result.log.epot[0] == pytest.approx(-3.5)  # the element shift: an isolated atom
  assert result.log.pressure is None and result.log.volume is None
  assert result.log.time_ps[-1] == pytest.approx(0.15)


# --------------------------------------------------------------------------------------------
# NVE: conservation, compile count, start temperature


def test_nve_conserves_energy(reference):
  result, _ = reference
  log = result.log
  np.testing.assert_array_equal(log.step, np.arange(0, STEPS + 1, 10))
  np.testing.assert_allclose(log.time_ps, log.step * 1e-3)
  assert log.temperature[0] == pytest.approx(300.0, rel=1e-9)  # Maxwell-Boltzmann, rescaled
  assert np.all(np.isfinite(log.pressure)) and np.ptp(log.volume) == 0
  drift = np.abs(log.etot - log.etot[0]).max()
  print(
    f"NVE float64, dt 1 fs, 200 fs: max |E(t) - E(0)| = {drift:.2e} eV "
    f"(E_kin(0) = {log.ekin[0]:.3f} eV, potential energy varied by {np.ptp(log.epot):.3f} eV)"
  )
  assert np.ptp(log.epot) > 0.1  # atoms really moved through the landscape
  assert drift <= 1e-4 * log.ekin[0]
  # One compilation for four chunks; the generous default list never overflowed here.
  assert result.num_compilations == 1
  assert result.num_reallocations == 0
  assert len(result.chunk_times_s) == STEPS // 50
  # The final atoms carry energy, forces and momenta consistent with the log.
  final = result.atoms
  assert final.get_potential_energy() == pytest.approx(log.epot[-1], rel=1e-12)
  assert final.get_kinetic_energy() == pytest.approx(log.ekin[-1], rel=1e-9)
  assert np.abs(final.get_forces()).max() > 0.1
  np.testing.assert_allclose(final.get_momenta().sum(axis=0), 0.0, atol=1e-9)
  assert final.info["md_step"] == STEPS


def test_same_settings_do_not_recompile(pot, reference, tmp_path):
  # 3 chunks, the last one short (20 steps). Whether frames are recorded is compiled in, so
  # this run writes a trajectory as the reference did.
  result = md.run(cu32(), pot, total_steps=120, traj=tmp_path / "again.traj", **REF)
  assert result.num_compilations == 0
  assert result.total_steps == 120 and result.log.step[-1] == 120


def test_overflow_replay_matches_run_without_overflow(pot, reference, tmp_path):
  ref, _ = reference
  # capacity_multiplier=1.0: the list has room for exactly the start's pairs, and the second
  # shell crossing the list cutoff overflows it within the first chunks.
  result = md.run(
    cu32(), pot, total_steps=STEPS, capacity_multiplier=1.0, **REF, traj=tmp_path / "overflow.traj"
  )
  dx = np.abs(result.atoms.positions - ref.atoms.positions).max()
  dp = np.abs(result.atoms.get_momenta() - ref.atoms.get_momenta()).max()
  de = np.abs(result.log.etot - ref.log.etot).max()
  print(
    f"overflow replay: {result.num_reallocations} reallocation(s), "
    f"{result.num_compilations} compilation(s); max |dx| = {dx:.1e} Å, "
    f"|dp| = {dp:.1e}, |dE| = {de:.1e} eV vs the run that never overflowed"
  )
  assert result.num_reallocations >= 1
  # One compilation per capacity, never one per chunk.
  assert result.num_compilations <= 1 + result.num_reallocations
  np.testing.assert_array_equal(result.log.step, ref.log.step)
  assert dx <= 1e-9 and dp <= 1e-9 and de <= 1e-9


# --------------------------------------------------------------------------------------------
# trajectories: incremental frames, interruption, resume


def test_trajectory_frames(reference):
  result, path = reference
  fr = frames(path)
  assert [f.info["md_step"] for f in fr] == list(range(0, STEPS + 1, 10))
  last = fr[-1]
  np.testing.assert_allclose(last.positions, result.atoms.positions, rtol=0, atol=1e-12)
  np.testing.assert_allclose(last.get_momenta(), result.atoms.get_momenta(), rtol=0, atol=1e-12)
  np.testing.assert_allclose(last.cell.array, result.atoms.cell.array)
  assert last.get_potential_energy() == pytest.approx(result.log.epot[-1], rel=1e-12)
  assert last.get_forces().shape == (32, 3)
  assert last.info["md_time_fs"] == pytest.approx(STEPS * 1.0)
  # frame energies are the log's potential energies
  np.testing.assert_allclose([f.get_potential_energy() for f in fr], result.log.epot, rtol=1e-12)


def test_recorded_energy_and_stress_are_the_models_at_those_positions(pot, reference):
  # a recorded step's energy and stress come from that step's own force pass (engine.
  # energy_tap; the start's from init's), not a second evaluation: still the calculator's
  from plugin.ase import Calculator

  for f in frames(reference[1])[::4]:
    a = f.copy()
    a.calc = Calculator(pot, dtype="float64")
    assert a.get_potential_energy() == pytest.approx(f.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(a.get_stress(), f.get_stress(), rtol=0, atol=1e-12)


def test_the_chunk_program_holds_the_model_once():
  # the chunk traces the energy for the step's forces (and once for its shapes), never again
  # for the energies (and virials, periodic) it records
  traced = []

  def energy_fn(R, **kw):
    traced.append(1)
    return 0.5 * jnp.sum(R**2)

  params = Params.from_user(
    timestep=0.5, temperature=300.0, friction=0.01, tau_t=100.0, tau_p=1000.0, pressure=0.0
  )
  for ensemble, periodic in (("nvt_langevin", True), ("nve", False)):
    key = eng.EngineKey(
      ensemble=ensemble, params=params, numbers=(29, 29), periodic=periodic,
      box=tuple(np.eye(3).ravel()), dr_threshold=0.2, capacity_multiplier=1.0, chunk=10,
      log_interval=5, traj_interval=5,
    )  # fmt: skip
    shift_fn = (space.periodic_general(np.eye(3)) if periodic else space.free())[1]
    engine = eng.make_engine(
      key, energy_fn=energy_fn, neighbor_fn=None, displacement_fn=None, shift_fn=shift_fn,
      cutoff=0.0,
    )  # fmt: skip
    R = jnp.asarray([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    carry, _, known = eng.start(engine, R, np.eye(3), np.ones(2), np.zeros((2, 3)), seed=0)
    assert set(known) == ({"epot", "virial"} if periodic else {"epot"})
    traced.clear()
    engine.chunk_fn.lower(carry, 0, 10, 10, eng.no_limits(R.dtype))
    assert len(traced) == 2, ensemble


def test_interrupted_run_resumes_to_the_same_trajectory(pot, reference, tmp_path):
  ref, ref_path = reference
  path, log_path = tmp_path / "run.traj", tmp_path / "run.csv"

  def interrupt(p: md.Progress):
    assert p.step == 50 and p.total_steps == STEPS and p.steps_per_s > 0
    raise KeyboardInterrupt  # e.g. Ctrl-C, or a job killed between chunks

  with pytest.raises(KeyboardInterrupt):
    md.run(cu32(), pot, total_steps=STEPS, traj=path, log_file=log_path, progress=interrupt, **REF)
  assert [f.info["md_step"] for f in frames(path)] == [0, 10, 20, 30, 40, 50]
  with pytest.raises(FileExistsError, match="resume=True"):
    md.run(cu32(), pot, total_steps=STEPS, traj=path, **REF)

  # The same call with resume=True continues from the last frame (step 50) to step 200.
  result = md.run(cu32(), pot, total_steps=STEPS, traj=path, log_file=log_path, resume=True, **REF)
  assert result.first_step == 50 and result.steps == 150
  # The list is allocated afresh at step 50; a new capacity (pair count) compiles once more.
  assert result.num_compilations <= 1
  got, want = frames(path), frames(ref_path)
  assert [f.info["md_step"] for f in got] == [f.info["md_step"] for f in want]
  dx = max(np.abs(a.positions - b.positions).max() for a, b in zip(got, want))
  dp = max(np.abs(a.get_momenta() - b.get_momenta()).max() for a, b in zip(got, want))
  print(
    f"interrupted at step 50 and resumed: max |dx| = {dx:.1e} Å, |dp| = {dp:.1e} "
    f"amu Å/t over 200 steps vs the straight run"
  )
  assert dx <= 1e-9 and dp <= 1e-9
  # The CSV log holds every row once, in order, as the straight run's.
  with open(log_path) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == list(ref.log.step)
  np.testing.assert_allclose([float(r["etot_eV"]) for r in rows], ref.log.etot, atol=1e-9)
  assert set(rows[0]) == {
    "step",
    "time_ps",
    "epot_eV",
    "ekin_eV",
    "etot_eV",
    "temperature_K",
    "conserved_eV",
    "pressure_bar",
    "volume_A3",
  }

  # Resuming a finished run is a no-op that returns its last frame.
  done = md.run(cu32(), pot, total_steps=STEPS, traj=path, resume=True, **REF)
  assert done.steps == 0 and len(frames(path)) == len(want)
  np.testing.assert_allclose(done.atoms.positions, got[-1].positions)


def test_wall_time_limit_stops_after_a_chunk_and_resumes(pot, reference, tmp_path):
  # a limit shorter than one chunk: the run stops at the first chunk's end with that frame
  # written; resume=True (no limit) then gives the straight run's trajectory
  ref, ref_path = reference
  path = tmp_path / "walled.traj"
  with pytest.warns(RuntimeWarning, match="max_wall_time 1e-06 s reached"):
    cut = md.run(cu32(), pot, total_steps=STEPS, traj=path, max_wall_time=1e-6, **REF)
  assert cut.stopped == "max_wall_time" and cut.total_steps == 50 and "resume=True" in cut.reason
  assert frames(path)[-1].info["md_step"] == 50
  done = md.run(cu32(), pot, total_steps=STEPS, traj=path, resume=True, **REF)
  assert done.stopped is None and done.total_steps == STEPS
  np.testing.assert_allclose(frames(path)[-1].positions, frames(ref_path)[-1].positions, atol=1e-9)
  with pytest.raises(ValueError, match="max_wall_time"):
    md.run(cu32(), pot, total_steps=STEPS, max_wall_time=0.0, **REF)


# --------------------------------------------------------------------------------------------
# thermostats, barostat, open boundaries


@pytest.mark.slow  # the model tests check rotations by default
def test_rotated_cell_gives_the_rotated_trajectory(pot, reference):
  # A cell that is not lower triangular is rotated into ASE's standard form inside and the
  # results rotated back: the same run on a rotated copy of the system is the rotated run.
  angle, axis = 0.7, np.array([1.0, 2.0, 2.0]) / 3.0
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues
  atoms = cu32()
  atoms.set_momenta(md.maxwell_boltzmann(atoms.get_masses(), 300.0, seed=5))
  turned = atoms.copy()
  turned.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
  turned.positions = atoms.positions @ rot.T
  turned.set_momenta(atoms.get_momenta() @ rot.T)
  kw = dict(REF, total_steps=50)
  straight, rotated = md.run(atoms, pot, **kw), md.run(turned, pot, **kw)
  a, b = straight.atoms, rotated.atoms
  np.testing.assert_allclose(b.cell.array, a.cell.array @ rot.T, atol=1e-12)
  np.testing.assert_allclose(b.get_scaled_positions(), a.get_scaled_positions(), atol=1e-9)
  np.testing.assert_allclose(b.get_momenta(), a.get_momenta() @ rot.T, atol=1e-9)
  np.testing.assert_allclose(b.get_forces(), a.get_forces() @ rot.T, atol=1e-9)
  np.testing.assert_allclose(rotated.log.epot, straight.log.epot, rtol=1e-12)


def test_nvt_langevin_reaches_target_temperature(pot):
  # float32 (the default dtype) in a triclinic cell, started cold at 100 K, thermostat at
  # 600 K with tau 20 fs.
  atoms = cu32(3.6, 0.05)
  atoms.set_cell([[7.2, 0.0, 0.0], [1.1, 7.1, 0.0], [0.7, -0.9, 7.3]], scale_atoms=True)
  result = md.run(
    atoms,
    pot,
    ensemble="nvt_langevin",
    temperature=600.0,
    init_temperature=100.0,
    friction=0.05,
    timestep=2.0,
    total_steps=400,
    chunk=100,
    log_interval=10,
    dr_threshold=SKIN,
  )
  t = result.log.temperature
  assert t[0] == pytest.approx(100.0, rel=1e-4)
  late = t[len(t) // 2 :].mean()
  print(f"Langevin: T(0) = {t[0]:.0f} K, mean T over the last 400 fs = {late:.0f} K (target 600 K)")
  assert 450.0 <= late <= 750.0
  assert result.atoms.get_positions().dtype == np.float64  # ASE side is float64 always


def test_npt_atoms_at_rest_stay_at_fractional_positions():
  # No forces, no momenta, a shrinking box: in fractional coordinates nothing may move. JAX-MD
  # 0.2.29's NPT step alone moves atoms by u * ln(s) / L (it adds the real-space scaling term to
  # fractional positions); the driver's shift takes that term out again.
  box = jnp.eye(3) * 7.0
  _, shift_fn = space.periodic_general(box, fractional_coordinates=True)
  energy_fn = lambda R, **kwargs: 0.0 * jnp.sum(R)
  npt = functools.partial(simulate.npt_nose_hoover, energy_fn, dt=0.01, pressure=0.0, kT=1e-3)
  R = jnp.array([[0.1, 0.1, 0.1], [0.9, 0.9, 0.9]])
  init, apply_jaxmd = npt(shift_fn=shift_fn)
  apply_driver = lambda state: npt(
    shift_fn=npt_fractional_shift(shift_fn, simulate.npt_box(state))
  )[1](state)
  for apply, moves in ((apply_jaxmd, True), (apply_driver, False)):
    state = init(jax.random.PRNGKey(0), R, box, mass=1.0, momenta=jnp.zeros((2, 3)))
    state = state.set(box_momentum=-0.05 * state.box_mass)  # the box shrinks
    state = jax.jit(lambda s: jax.lax.fori_loop(0, 200, lambda i, s: apply(s), s))(state)
    assert float(simulate.npt_box(state)[0, 0]) < 0.95 * 7.0
    du = np.abs(np.asarray(state.position - R)).max()
    assert (du > 1e-3) if moves else (du < 1e-12)


@pytest.mark.slow  # a long NPT run; NPT keeps fractional positions by default
def test_npt_compression(pot, tmp_path):
  # Heavy atoms (1e5 amu) barely move while the barostat compresses the box fast (target
  # 4e4 bar, internal ~1.4e4 bar): pairs enter the cutoff because the box shrinks, not because
  # atoms moved, which JAX-MD's displacement-based rebuild alone does not notice.
  atoms = cu32(3.6, 0.3)
  atoms.set_masses(np.full(len(atoms), 1e5))
  result = md.run(
    atoms,
    pot,
    ensemble="npt",
    temperature=300.0,
    pressure=40000.0,
    timestep=1.0,
    tau_p=500.0,
    tau_t=50.0,
    total_steps=100,
    chunk=50,
    log_interval=10,
    dr_threshold=SKIN,
    dtype=jnp.float64,
    traj=tmp_path / "npt.traj",
  )
  v, p, h = result.log.volume, result.log.pressure, result.log.conserved
  du = (result.atoms.get_scaled_positions() - atoms.get_scaled_positions() + 0.5) % 1.0 - 0.5
  print(
    f"NPT: volume {v[0]:.2f} -> {v[-1]:.2f} Å^3, pressure {p[0]:.0f} -> {p[-1]:.0f} bar, "
    f"max |du| = {np.abs(du).max():.1e}, conserved quantity drift "
    f"{np.abs(h - h[0]).max():.1e} eV"
  )
  assert np.all(np.isfinite(v)) and np.all(np.isfinite(p))
  assert v[-1] < 0.85 * v[0]
  assert v[0] == pytest.approx(atoms.get_volume(), rel=1e-12)
  assert np.abs(du).max() < 0.005  # (0.017 with JAX-MD's fractional drift)
  assert np.abs(h - h[0]).max() < 1e-4
  # the final cell is an isotropic scaling of the start cell, and frames carry it
  cell = result.atoms.cell.array
  np.testing.assert_allclose(cell / cell[0, 0], np.eye(3), atol=1e-12)
  assert abs(result.atoms.get_volume() - v[-1]) <= 1e-9 * v[-1]
  last = frames(tmp_path / "npt.traj")[-1]
  np.testing.assert_allclose(last.cell.array, cell)
  assert result.num_compilations == 1 + result.num_reallocations
  # The list carried through the compression was complete: the final energy equals one from a
  # freshly allocated list (a zero-step run only allocates and evaluates). Without the forced
  # rebuilds the difference is ~4e-6 eV here.
  fresh = md.run(result.atoms, pot, total_steps=0, dr_threshold=SKIN, dtype=jnp.float64)
  assert abs(fresh.log.epot[0] - result.log.epot[-1]) <= 1e-12 * abs(fresh.log.epot[0])


def small_cell_energy_matches_ase(pot, result) -> float:
  """Relative difference of the run's last energy to the ASE calculator's on its last frame
  (which sees every periodic image): a missed pair would show."""
  from plugin.ase import Calculator

  final = result.atoms.copy()
  final.calc = Calculator(pot, dtype="float64")
  e_ref = final.get_potential_energy()
  return abs(result.log.epot[-1] - e_ref) / abs(e_ref)


def test_small_cell_nve(pot):
  # A 4-atom cell of 3.6 Å, narrower than 2 * (cutoff + skin): a list with periodic images.
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  atoms.rattle(0.1, seed=1)
  result = md.run(
    atoms,
    pot,
    ensemble="nve",
    temperature=600.0,
    timestep=1.0,
    total_steps=100,
    chunk=50,
    log_interval=10,
    dr_threshold=SKIN,
    dtype=jnp.float64,
  )
  e = result.log.etot
  print(
    f"small-cell NVE: max |E(t) - E(0)| = {np.abs(e - e[0]).max():.1e} eV, "
    f"E_pot {result.log.epot[0]:.4f} -> {result.log.epot[-1]:.4f} eV"
  )
  assert np.ptp(result.log.epot) > 1e-3  # the atoms moved
  assert np.abs(e - e[0]).max() < 1e-4
  assert small_cell_energy_matches_ase(pot, result) <= 1e-10
  assert result.num_compilations <= 1 + result.num_reallocations


@pytest.mark.slow
def test_npt_small_cell_compression(pot):
  # The 4-atom cell compressed by more than 10 % (linear): the second shell enters the list
  # (overflow, replayed with a list allocated for the compressed box). No pair is missed and
  # the chunk compiles once per list shape.
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  atoms.rattle(0.1, seed=0)
  atoms.set_masses(np.full(len(atoms), 1e5))
  result = md.run(
    atoms,
    pot,
    ensemble="npt",
    temperature=300.0,
    pressure=30000.0,
    timestep=1.0,
    tau_p=300.0,
    tau_t=50.0,
    total_steps=150,
    chunk=50,
    log_interval=10,
    dr_threshold=SKIN,
    dtype=jnp.float64,
  )
  v, h = result.log.volume, result.log.conserved
  scale = (v[-1] / v[0]) ** (1 / 3)
  print(
    f"small-cell NPT: linear scale {scale:.3f}, {result.num_reallocations} "
    f"reallocation(s), {result.num_compilations} compilation(s), conserved quantity drift "
    f"{np.abs(h - h[0]).max():.1e} eV"
  )
  assert scale < 0.9 and result.num_reallocations >= 1
  assert result.num_compilations <= 1 + result.num_reallocations
  assert np.abs(h - h[0]).max() < 1e-3
  assert small_cell_energy_matches_ase(pot, result) <= 1e-10


@pytest.mark.slow
def test_npt_box_shrinking_below_the_minimum_image_limit(pot):
  # 32 atoms in a 6.7 Å box start on JAX-MD's own list; the box shrinks below
  # 2 * (cutoff + skin) = 6.4 Å, the list reports it, and the replay continues on a list with
  # periodic images (one more compilation), without missing a pair.
  atoms = cu32(3.35)
  atoms.set_masses(np.full(len(atoms), 1e5))
  result = md.run(
    atoms,
    pot,
    ensemble="npt",
    temperature=300.0,
    pressure=40000.0,
    timestep=1.0,
    tau_p=500.0,
    tau_t=50.0,
    total_steps=100,
    chunk=50,
    log_interval=10,
    dr_threshold=SKIN,
    dtype=jnp.float64,
  )
  width = result.atoms.cell.lengths().min()
  print(
    f"NPT through the limit: final width {width:.3f} Å, {result.num_reallocations} "
    f"reallocation(s), {result.num_compilations} compilation(s)"
  )
  assert width < 2 * (RC + SKIN) and result.num_reallocations >= 1
  assert result.num_compilations <= 1 + result.num_reallocations
  assert np.abs(result.log.conserved - result.log.conserved[0]).max() < 1e-3
  assert small_cell_energy_matches_ase(pot, result) <= 1e-10


def test_molecule_open_boundaries(pot, tmp_path):
  # A 13-atom Cu cluster around the origin (negative coordinates), Nose-Hoover NVT, extxyz.
  cluster = ase.cluster.Icosahedron("Cu", noshells=2, latticeconstant=3.6)
  cluster.positions -= cluster.get_center_of_mass()
  path = tmp_path / "cluster.xyz"
  result = md.run(
    cluster,
    pot,
    ensemble="nvt_nose_hoover",
    temperature=300.0,
    timestep=1.0,
    total_steps=100,
    chunk=50,
    traj=path,
    traj_interval=25,
    dr_threshold=SKIN,
    dtype=jnp.float64,
    progress=True,
  )
  assert result.log.pressure is None
  assert np.all(np.isfinite(result.log.etot))
  h = result.log.conserved  # the Nose-Hoover chain's extended energy
  print(
    f"cluster NVT: T {result.log.temperature[0]:.0f} -> {result.log.temperature[-1]:.0f} K, "
    f"conserved quantity drift {np.abs(h - h[0]).max():.1e} eV"
  )
  assert np.abs(h - h[0]).max() < 1e-3
  assert not result.atoms.pbc.any()
  # positions come back in the caller's frame: the cluster has not jumped anywhere
  com = result.atoms.get_center_of_mass()
  assert np.abs(com).max() < 0.05
  assert np.abs(result.atoms.positions - cluster.positions).max() < 1.0
  fr = ase.io.read(str(path), ":")
  assert [f.info["md_step"] for f in fr] == [0, 25, 50, 75, 100]
  np.testing.assert_allclose(fr[-1].positions, result.atoms.positions, atol=1e-6)
  np.testing.assert_allclose(fr[-1].get_momenta(), result.atoms.get_momenta(), atol=1e-6)
  assert fr[-1].get_potential_energy() == pytest.approx(result.log.epot[-1], abs=1e-6)


# --------------------------------------------------------------------------------------------
# refusals


def test_errors(pot, tmp_path):
  atoms = cu32()
  with pytest.raises(ValueError, match="unknown ensemble 'nvp'.*nve, nvt_langevin"):
    md.run(atoms, pot, ensemble="nvp")
  with pytest.raises(ValueError, match="steps must be an integer >= 0"):
    md.run(atoms, pot, total_steps=-1)
  with pytest.raises(ValueError, match="timestep"):
    md.run(atoms, pot, timestep=0.0)
  slab = atoms.copy()
  slab.pbc = [True, True, False]
  with pytest.raises(ValueError, match="periodic along all axes or none"):
    md.run(slab, pot, total_steps=10)
  molecule = atoms.copy()
  molecule.pbc = False
  with pytest.raises(ValueError, match="npt needs a periodic system"):
    md.run(molecule, pot, ensemble="npt", total_steps=10)
  with pytest.raises(ValueError, match=r"\.traj"):
    md.run(atoms, pot, total_steps=10, traj=tmp_path / "out.dcd")
  with pytest.raises(ValueError, match="folder .*nodir does not exist .create it first"):
    md.run(atoms, pot, total_steps=10, traj=tmp_path / "nodir" / "md.traj")  # before any work
  with pytest.raises(ValueError, match="log_file .*folder .*nodir does not exist"):
    md.run(atoms, pot, total_steps=10, log_file=tmp_path / "nodir" / "md.csv")
  gold = atoms.copy()
  gold.numbers[3] = 79
  with pytest.raises(potentials.UnknownElementError, match="Au"):
    md.run(gold, pot, total_steps=10, dr_threshold=SKIN)


def test_refused_before_allocating_as_the_calculator_refuses(pot, tmp_path, monkeypatch):
  # pairs that need more memory than is available are refused on the host before anything
  # is compiled (the figure and the closest pair), as plugin.ase.Calculator refuses them;
  # nothing is written, and the same call runs once the memory is there
  from plugin import host

  need = host.pair_memory_bytes(pot.config, 100, np.float32)  # 32 atoms have more pairs
  monkeypatch.setattr(host, "available_memory_bytes", lambda: need)
  traj = tmp_path / "md.traj"
  with pytest.raises(MemoryError, match=r"GiB for its \d+ pairs .* nothing was allocated"):
    md.run(cu32(), pot, total_steps=10, traj=traj, dr_threshold=SKIN)
  assert not traj.exists()
  monkeypatch.undo()
  assert md.run(cu32(), pot, total_steps=10, traj=traj, dr_threshold=SKIN).total_steps == 10


def test_options_object_checked_once_and_overridden():
  # one frozen, checked options object: run's keywords are overrides of it
  base = md.MDOptions(ensemble="nvt_langevin", temperature=500.0, total_steps=20, chunk=10)
  assert md.MDOptions.make(base, total_steps=40) == dataclasses.replace(base, total_steps=40)
  # run()'s old keyword: a count it was not once a run resumed
  with pytest.warns(DeprecationWarning, match="steps= is deprecated .*use total_steps="):
    assert md.MDOptions.make(base, steps=40) == dataclasses.replace(base, total_steps=40)
  assert md.MDOptions.make() == md.MDOptions() and md.MDOptions().timestep == md.DEFAULTS.timestep
  with pytest.raises(TypeError, match="unknown MD option.*tempreature.*fields: ensemble"):
    md.MDOptions.make(base, tempreature=300.0)
  for bad, match in [
    (dict(ensemble="nvp"), "unknown ensemble"),
    (dict(timestep=-1.0), "timestep must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(chunk=0), "chunk must be a positive integer"),
    (dict(max_uncertainty=-0.1), "max_uncertainty must be a number > 0"),
    (dict(uncertainty_action="ignore"), "uncertainty_action must be 'stop' or 'flag'"),
    (dict(max_temperature=0.0), "max_temperature must be > 0 K"),
  ]:
    with pytest.raises(ValueError, match=match):
      md.MDOptions(**bad)
  many = md.MDOptions(temperature=[300.0, 400.0], seed=7)
  assert many.temperature == (300.0, 400.0)
  assert [many.for_system(i, 2).seed for i in range(2)] == [7, 8]
  assert many.for_system(1, 2).temperature == 400.0
  with pytest.raises(ValueError, match="temperature has 2 entries for 3 systems"):
    many.for_system(0, 3)
  with pytest.raises(ValueError, match="one temperature or seed per system is for a list"):
    md.run(cu32(), None, many)
