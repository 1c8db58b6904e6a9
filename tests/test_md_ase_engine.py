"""Tests for plugin.md.ase_engine and for what both engines share: the same start momenta and the
same temperature (plugin.thermo's 3N rule) for the same state."""

import ase
import ase.build
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.emt import EMT
from conftest import tiny_molecule_potential

import plugin.md as md
from plugin import thermo
from plugin.ase import Calculator
from plugin.md import ase_engine


@pytest.fixture(scope="module")
def ethanol():
  return ase.build.molecule("CH3CH2OH")


def test_both_engines_start_alike_and_report_the_same_temperature(ethanol):
  pot = tiny_molecule_potential()
  jax_md_run = md.run(ethanol, pot, total_steps=0, temperature=300.0, seed=4, dtype=jnp.float64)
  ase_run = md.run_ase(
    ethanol, Calculator(pot, dtype="float64"), steps=0, temperature=300.0, seed=4
  )
  # one Maxwell-Boltzmann initialiser: the same momenta (no drift, no rotation) from one seed
  np.testing.assert_allclose(
    jax_md_run.atoms.get_momenta(), ase_run.atoms.get_momenta(), rtol=0, atol=1e-12
  )
  # one temperature rule: both logs say 300 K for that state, as ASE's get_temperature does
  assert jax_md_run.log.temperature[0] == pytest.approx(300.0, rel=1e-9)
  assert ase_run.log.temperature[0] == pytest.approx(300.0, rel=1e-9)
  assert ase_run.atoms.get_temperature() == pytest.approx(300.0, rel=1e-9)
  # the same state with given momenta: the engines agree with each other and with ASE
  hot = ethanol.copy()
  hot.set_momenta(np.random.default_rng(0).normal(size=(len(hot), 3)))
  a = md.run(hot, pot, total_steps=0, dtype=jnp.float64).log
  b = md.run_ase(hot, Calculator(pot, dtype="float64"), steps=0).log
  assert a.temperature[0] == pytest.approx(b.temperature[0], rel=1e-12)
  assert a.temperature[0] == pytest.approx(hot.get_temperature(), rel=1e-12)
  assert a.ekin[0] == pytest.approx(b.ekin[0], rel=1e-12)


# ASE >= 3.28 deprecates Langevin's default fixcm=True; the engine keeps ASE's default.
@pytest.mark.filterwarnings("ignore:The implementation of `fixcm=True`:FutureWarning")
def test_ase_engine_log_and_trajectory(tmp_path):
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
  path = tmp_path / "emt.traj"
  seen = []
  result = md.run_ase(
    atoms,
    EMT(),
    ensemble="nve",
    timestep=2.0,
    steps=20,
    interval=5,
    temperature=600.0,
    traj=str(path),
    progress=lambda step, t, e: seen.append(step),
  )
  log = result.log
  np.testing.assert_array_equal(log.step, [0, 5, 10, 15, 20])
  np.testing.assert_allclose(log.time_ps, log.step * 2e-3)
  assert seen == [0, 5, 10, 15, 20] and log.temperature[0] == pytest.approx(600.0, rel=1e-9)
  np.testing.assert_allclose(log.conserved, log.etot)  # NVE conserves the total energy
  assert np.ptp(log.etot) < 1e-2 * np.ptp(log.epot)
  np.testing.assert_allclose(log.temperature, thermo.temperature_from_kinetic(log.ekin, len(atoms)))
  from ase.io import read

  frames = read(path, ":")
  assert len(frames) == 5
  assert frames[-1].get_potential_energy() == pytest.approx(log.epot[-1])
  # thermostats: Langevin runs (no conserved column); a JAX-MD-only ensemble says what to do
  langevin = md.run_ase(atoms, EMT(), ensemble="nvt_langevin", steps=5, interval=5).log
  assert langevin.conserved is None and len(langevin) == 2
  with pytest.raises(ValueError, match="nvt_nose_hoover.*no ASE engine.*plugin.md.run"):
    ase_engine.dynamics(atoms, "nvt_nose_hoover", 1.0, 300.0, 0)
