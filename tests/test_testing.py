import subprocess
import sys
import textwrap

import ase.units
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from plugin import testing


@pytest.fixture(scope="module")
def copper():
  return bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)


def test_drift_statistics_recovers_slope_and_error():
  rng = np.random.default_rng(0)
  t = np.linspace(0, 10, 400)
  white = rng.normal(0, 1e-4, t.size)
  slope, err, rms = testing.drift_statistics(t, 2e-5 * t + white)  # 0.02 meV/atom/ps
  assert abs(slope - 0.02) < 4 * err and err < 0.01
  assert rms == pytest.approx(0.1, rel=0.2)
  # correlated noise (slow oscillation) must widen the error bar, not hide it
  _, err_corr, _ = testing.drift_statistics(t, 2e-5 * t + 5e-4 * np.sin(2 * t))
  assert err_corr > 3 * err


def test_emt_conserves_energy_and_verlet_order(copper, tmp_path):
  report = testing.assert_energy_conserved(
    copper,
    EMT(),
    temperature=600,
    timestep=2.0,
    duration=0.6,
    warmup=0.1,
    max_drift=0.5,
    order_range=(3.5, 4.5),
    plot=str(tmp_path / "nve.png"),
  )
  assert (tmp_path / "nve.png").stat().st_size > 10_000
  assert 3.5 < report.order_ratio < 4.5
  assert report.engine == "ase" and report.num_atoms == 32
  assert 200 < report.mean_temperature < 450  # equipartition halves the initial 600 K


class HeatingEMT(EMT):
  """EMT whose forces are 5% too large: not the gradient of its energy."""

  def calculate(self, *args, **kwargs):
    super().calculate(*args, **kwargs)
    self.results["forces"] = self.results["forces"] * 1.05


def test_non_conservative_forces_fail_with_figures(copper):
  with pytest.raises(AssertionError, match=r"energy not conserved: .*meV/atom"):
    testing.assert_energy_conserved(
      copper,
      HeatingEMT(),
      temperature=600,
      timestep=2.0,
      duration=0.6,
      warmup=0.1,
      max_drift=0.5,
      max_fluctuation=0.02,
    )


def test_bad_arguments(copper):
  with pytest.raises(ValueError, match="calculator"):
    testing.check_energy_conservation(copper.copy())
  with pytest.raises(ValueError, match="warmup"):
    testing.check_energy_conservation(copper, EMT(), duration=1.0, warmup=2.0)


def test_jax_md_engine_with_neighbor_list():
  import jax.numpy as jnp
  from jax_md import space

  import potentials
  from plugin import jax_md as pj

  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  pot = potentials.Potential.create(
    0,
    species=["Cu"],
    cutoff=3.0,
    features=8,
    max_degree=1,
    num_iterations=1,
    num_heads=2,
    num_basis=6,
  )
  box = jnp.asarray(np.diag(atoms.cell.lengths()))
  displacement, shift = space.periodic(jnp.diag(box))
  neighbor_fn, energy_fn = pj.neighbor_list(
    pot, displacement, jnp.diag(box), atomic_numbers=atoms.numbers, dr_threshold=0.2
  )
  atoms.rattle(0.05, seed=1)
  atoms.wrap()
  report = testing.check_energy_conservation(
    atoms,
    energy_fn=energy_fn,
    neighbor_fn=neighbor_fn,
    shift_fn=shift,
    temperature=300,
    timestep=1.0,
    duration=0.2,
    warmup=0.02,
    sample_interval=10,
    dtype=jnp.float64,
  )
  assert report.engine == "jax-md" and np.all(np.isfinite(report.total))
  assert abs(report.drift) < 1.0 and report.fluctuation < 1.0


@pytest.mark.slow  # test_md_replicas.py checks replicas against runs alone by default
def test_replicas_in_one_program_equal_separate_runs():
  """K replicas on the JAX-MD engine (one compiled program): each replica's drift is the drift
  of its run alone (seed + k), the report's drift their mean and its error their spread."""
  from conftest import tiny_copper_potential

  atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  atoms.rattle(0.05, seed=1)
  atoms.wrap()
  pot = tiny_copper_potential()
  kw = dict(
    **testing.engine_kwargs("jax-md", pot, atoms, "float64"),
    temperature=300,
    timestep=1.0,
    duration=0.1,
    warmup=0.02,
    sample_interval=5,
  )
  many = testing.check_energy_conservation(atoms, replicas=3, seed=4, **kw)
  alone = [testing.check_energy_conservation(atoms, seed=4 + k, **kw) for k in range(3)]
  drifts = np.array([r.drift for r in alone])
  np.testing.assert_allclose(many.replica_drifts, drifts, rtol=1e-6, atol=1e-9)
  assert many.drift == pytest.approx(drifts.mean(), rel=1e-6)
  assert many.drift_error == pytest.approx(drifts.std(ddof=1) / np.sqrt(3), rel=1e-6)
  np.testing.assert_allclose(many.total, np.mean([r.total for r in alone], axis=0), atol=1e-9)
  assert many.replicas == 3 and "3 replicas" in many.summary()
  with pytest.raises(ValueError, match="replicas must be a positive integer"):
    testing.check_energy_conservation(atoms, replicas=0, **kw)


def test_pytest_fixture_is_registered(tmp_path):
  test = tmp_path / "test_user.py"
  test.write_text(
    textwrap.dedent("""
      from ase.build import bulk
      from ase.calculators.emt import EMT

      def test_user(energy_conservation):
          atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
          report = energy_conservation(atoms, EMT(), temperature=300, timestep=2.0,
                                       duration=0.2, warmup=0.02)
          assert report.drift_error >= 0
          # independent replicas: the error bar is their spread
          two = energy_conservation(atoms, EMT(), temperature=300, timestep=2.0,
                                    duration=0.1, warmup=0.02, replicas=2)
          assert two.replicas == 2 and len(two.replica_drifts) == 2
          assert two.drift_error > 0
  """)
  )
  out = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
    capture_output=True,
    text=True,
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  assert "1 passed" in out.stdout


def test_engines_agree_on_a_triclinic_cell():
  # primitive FCC cells are triclinic; both engines must see the same crystal and trajectory
  import jax

  if not jax.config.jax_enable_x64:
    pytest.skip("needs x64")
  from conftest import tiny_copper_potential

  pot = tiny_copper_potential()
  atoms = bulk("Cu", "fcc", a=3.6).repeat(4)  # 64 atoms, widths 8.3 Å >= 2 (3 Å + 0.5 Å)
  atoms.rattle(0.05, seed=2)
  atoms.wrap()
  run = dict(temperature=300, timestep=1.0, duration=0.06, warmup=0.01, sample_interval=10)
  ase_run = testing.check_energy_conservation(
    atoms, **testing.engine_kwargs("ase", pot, atoms, "float64"), **run
  )
  jax_run = testing.check_energy_conservation(
    atoms, **testing.engine_kwargs("jax-md", pot, atoms, "float64"), **run
  )
  assert jax_run.engine == "jax-md" and ase_run.engine == "ase"
  # same forces and velocity Verlet: the runs differ only by round-off (~1e-8 eV here), while
  # the potential energy itself changes by ~0.7 eV
  assert len(ase_run.time_ps) == len(jax_run.time_ps) == 7  # t = 0 once, then every 10 steps
  np.testing.assert_allclose(jax_run.total, ase_run.total, rtol=0, atol=1e-6)
  np.testing.assert_allclose(jax_run.potential, ase_run.potential, rtol=0, atol=1e-6)
  # one start (plugin.thermo.maxwell_boltzmann) and one temperature rule for both engines
  np.testing.assert_allclose(jax_run.kinetic[0], ase_run.kinetic[0], rtol=1e-12)
  assert jax_run.mean_temperature == pytest.approx(ase_run.mean_temperature, rel=1e-6)
  assert 2 * ase_run.kinetic[0] / (3 * len(atoms) * ase.units.kB) == pytest.approx(300, rel=1e-9)


def test_engine_kwargs_refuses_what_it_cannot_run(copper):
  from conftest import tiny_copper_potential

  slab = copper.copy()
  slab.pbc = [True, True, False]
  with pytest.raises(ValueError, match="periodic along all axes or none"):
    testing.engine_kwargs("jax-md", tiny_copper_potential(), slab)
  with pytest.raises(ValueError, match="engine must be"):
    testing.engine_kwargs("lammps", tiny_copper_potential(), copper)
